//! Configuration: one TOML file, every option with a default.
//!
//! Every option is documented where it is defined, with its default and unit, and listed in
//! the README's configuration table. A missing file section means "all defaults".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::assembly::AssemblyLimits;
use crate::decode::DecodeLimits;
use crate::livekit::{ApiKey, Credentials, LiveKitSource, RetryPolicy, Secret, SessionConfig};
use crate::sandbox::{PluginLimits, SandboxConfig};
use crate::streams::StreamLimits;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub host: HostConfig,
    pub streams: StreamsConfig,
    pub assembly: AssemblyConfig,
    pub decode: DecodeConfig,
    pub sandbox: SandboxSection,
    pub livekit: LiveKitConfig,
    pub catalogue: CatalogueConfig,
    /// Job types this host serves from local files, by name. Routes from the catalogue
    /// directory and from NATS add to these; a job whose type nobody routes fails
    /// permanently.
    pub job_types: BTreeMap<String, JobTypeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// JetStream stream that holds jobs (work-queue retention). Default `FRAMEHOST_JOBS`.
    pub stream: String,
    /// Subject prefix: jobs are published on `<prefix>.jobs.<type>`, status on
    /// `<prefix>.status.<job id>`, results on `<prefix>.results.<job id>`, stop requests on
    /// `<prefix>.control.<job id>`. Default `framehost`.
    pub subject_prefix: String,
    /// Durable pull consumer shared by every replica. Default `framehost-workers`.
    pub consumer: String,
    /// Seconds JetStream waits for an ack before redelivering; running jobs send
    /// in-progress acks every third of it. Default 30.
    pub ack_wait_secs: u64,
    /// Deliveries before a job is given up on and dead-lettered. Default 5.
    pub max_deliver: i64,
    /// Seconds before a job that failed transiently is redelivered. Default 5.
    pub nak_delay_secs: u64,
    /// Stream where permanently failed jobs are kept for operators, with the reason.
    /// Default `FRAMEHOST_DEAD`.
    pub dead_letter_stream: String,
    /// JetStream replicas of the streams and buckets framehost creates (jobs, dead letters,
    /// given-up advisories, catalogue KV and object store). 1 for a single server, 3 for a
    /// cluster; 1 to 5. Streams that already exist keep the replicas they were made with.
    /// Default 1.
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "FRAMEHOST_JOBS".into(),
            subject_prefix: "framehost".into(),
            consumer: "framehost-workers".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            nak_delay_secs: 5,
            dead_letter_stream: "FRAMEHOST_DEAD".into(),
            replicas: 1,
        }
    }
}

impl NatsConfig {
    pub fn jobs_subject(&self, job_type: &str) -> String {
        format!("{}.jobs.{job_type}", self.subject_prefix)
    }
    pub fn status_subject(&self, job_id: &str) -> String {
        format!("{}.status.{job_id}", self.subject_prefix)
    }
    pub fn results_subject(&self, job_id: &str) -> String {
        format!("{}.results.{job_id}", self.subject_prefix)
    }
    pub fn control_subject(&self, job_id: &str) -> String {
        format!("{}.control.{job_id}", self.subject_prefix)
    }
    pub fn dead_letter_subject(&self) -> String {
        format!("{}.dead", self.subject_prefix)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Jobs run at once by this host; it pulls a job only while a slot is free. Default 4.
    pub max_jobs: usize,
    /// Decoded frames waiting for the plugin, per job; past it the oldest is dropped
    /// (`frames_dropped`). Default 8.
    pub queue_depth: usize,
    /// Seconds between progress status messages of a running job. Default 2.
    pub progress_interval_secs: u64,
    /// Seconds running jobs get to finish after SIGTERM before they are handed back to the
    /// queue. Keep it below the pod's `terminationGracePeriodSeconds`. Default 25.
    pub shutdown_grace_secs: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            max_jobs: 4,
            queue_depth: 8,
            progress_interval_secs: 2,
            shutdown_grace_secs: 25,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// The only data-stream topic read; streams on other topics are never buffered.
    /// Default `agentChat`.
    pub topic: String,
    /// Largest text stream, in bytes after decompression. Default 16 MiB.
    pub max_stream_bytes: usize,
    /// Bytes all open streams of a job may hold together. Default 64 MiB.
    pub max_buffered_bytes: usize,
    /// Streams open at once per job. Default 64.
    pub max_open_streams: usize,
    /// Milliseconds without a packet after which an unfinished stream is dropped.
    /// Default 10,000.
    pub idle_timeout_ms: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        let limits = StreamLimits::default();
        Self {
            topic: limits.topic,
            max_stream_bytes: limits.max_stream_bytes,
            max_buffered_bytes: limits.max_buffered_bytes,
            max_open_streams: limits.max_open_streams,
            idle_timeout_ms: limits.idle_timeout.as_millis() as u64,
        }
    }
}

impl StreamsConfig {
    pub fn limits(&self) -> StreamLimits {
        StreamLimits {
            topic: self.topic.clone(),
            max_stream_bytes: self.max_stream_bytes,
            max_buffered_bytes: self.max_buffered_bytes,
            max_open_streams: self.max_open_streams,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssemblyConfig {
    /// Most parts one message may be split into. Default 64.
    pub max_parts: u32,
    /// Largest assembled message, in bytes. Default 32 MiB.
    pub max_message_bytes: usize,
    /// Messages being assembled at once per job. Default 16.
    pub max_open_messages: usize,
    /// Milliseconds from a message's first part until it is dropped unfinished.
    /// Default 10,000.
    pub max_age_ms: u64,
}

impl Default for AssemblyConfig {
    fn default() -> Self {
        let limits = AssemblyLimits::default();
        Self {
            max_parts: limits.max_parts,
            max_message_bytes: limits.max_message_bytes,
            max_open_messages: limits.max_open_messages,
            max_age_ms: limits.max_age.as_millis() as u64,
        }
    }
}

impl AssemblyConfig {
    pub fn limits(&self) -> AssemblyLimits {
        AssemblyLimits {
            max_parts: self.max_parts,
            max_message_bytes: self.max_message_bytes,
            max_open_messages: self.max_open_messages,
            max_age: Duration::from_millis(self.max_age_ms),
            ..AssemblyLimits::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeConfig {
    /// Most detections in one frame. Default 1,000.
    pub max_detections: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_detections: DecodeLimits::default().max_detections,
        }
    }
}

impl DecodeConfig {
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_detections: self.max_detections,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSection {
    /// Plugin instances live at once (pool slots). Default: twice `host.max_jobs`, at
    /// least 4, so re-instantiation after a trap always finds a slot.
    pub max_instances: Option<u32>,
    /// Largest memory any job type may be given, in MiB; each slot reserves this much
    /// address space. Default 256.
    pub max_memory_mib: u64,
    /// Wasm stack per call, in KiB. Default 1,024.
    pub max_wasm_stack_kib: usize,
    /// Results a plugin may emit per call. Default 64.
    pub max_results_per_call: usize,
    /// Largest single result, in KiB. Default 1,024.
    pub max_result_kib: usize,
    /// Plugin log output kept per job, in KiB. Default 1,024.
    pub max_log_kib_per_job: usize,
}

impl Default for SandboxSection {
    fn default() -> Self {
        let d = SandboxConfig::default();
        Self {
            max_instances: None,
            max_memory_mib: d.max_memory_bytes >> 20,
            max_wasm_stack_kib: d.max_wasm_stack_bytes >> 10,
            max_results_per_call: d.max_results_per_call,
            max_result_kib: d.max_result_bytes >> 10,
            max_log_kib_per_job: d.max_log_bytes_per_job >> 10,
        }
    }
}

/// How jobs join LiveKit rooms. Only jobs whose source is a room use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveKitConfig {
    /// Server for jobs that name none, e.g. `wss://example.livekit.cloud`. No default.
    pub url: Option<String>,
    /// API key for the tokens the host mints for jobs that bring none. Falls back to the
    /// `LIVEKIT_API_KEY` environment variable.
    pub api_key: Option<String>,
    /// The key's secret. Prefer the `LIVEKIT_API_SECRET` environment variable to writing it
    /// here. Never logged.
    pub api_secret: Option<Secret>,
    /// Lifetime of a minted token, in seconds; it is only needed to join (the server
    /// refreshes it while connected). Default 600.
    pub token_ttl_secs: u64,
    /// Milliseconds for the signal WebSocket to connect, and again for the server's
    /// JoinResponse (or ReconnectResponse). Default 5,000.
    pub connect_timeout_ms: u64,
    /// Milliseconds from the server's offer until the data channel is up. Default 15,000.
    pub ice_timeout_ms: u64,
    /// Failed resumes and joins in a row before the job fails as transient (and is
    /// redelivered). Default 10.
    pub retry_attempts: u32,
    /// Milliseconds before the first retry, doubled each time, with jitter. Default 300.
    pub retry_initial_delay_ms: u64,
    /// Longest wait between retries, in milliseconds. Default 7,000.
    pub retry_max_delay_ms: u64,
    /// Milliseconds a departed source participant may take to rejoin before the job ends.
    /// Default 5,000.
    pub source_grace_ms: u64,
    /// A job ends after this many seconds without a frame, unless the job says otherwise.
    /// Default 120.
    pub idle_timeout_secs: u64,
    /// Longest a job may stay in a room, in seconds, unless the job says otherwise.
    /// Default 14,400 (4 hours).
    pub max_duration_secs: u64,
    /// Packets waiting for a job's data-stream stage; past it they are dropped and counted
    /// (`livekit_queue_full`). Default 4,096.
    pub packet_queue_len: usize,
    /// Bytes those packets may hold together. Default 32 MiB.
    pub packet_queue_bytes: usize,
    /// Senders whose packet sequence numbers a job remembers for de-duplication.
    /// Default 256.
    pub max_senders: usize,
}

impl Default for LiveKitConfig {
    fn default() -> Self {
        Self {
            url: None,
            api_key: None,
            api_secret: None,
            token_ttl_secs: 600,
            connect_timeout_ms: 5_000,
            ice_timeout_ms: 15_000,
            retry_attempts: 10,
            retry_initial_delay_ms: 300,
            retry_max_delay_ms: 7_000,
            source_grace_ms: 5_000,
            idle_timeout_secs: 120,
            max_duration_secs: 4 * 3600,
            packet_queue_len: 4_096,
            packet_queue_bytes: 32 << 20,
            max_senders: 256,
        }
    }
}

/// A LiveKit job's settings: the host's defaults with the job's own values applied.
#[derive(Debug, Clone)]
pub struct LiveKitJob {
    pub session: SessionConfig,
    pub idle_timeout: Duration,
    pub max_duration: Duration,
    pub packet_queue_len: usize,
    pub packet_queue_bytes: usize,
}

impl LiveKitConfig {
    /// Takes the API key and secret from the environment where the file has none.
    pub fn apply_env(&mut self) {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if self.api_key.is_none() {
            self.api_key = var("LIVEKIT_API_KEY");
        }
        if self.api_secret.is_none() {
            self.api_secret = var("LIVEKIT_API_SECRET").map(Secret::new);
        }
    }

    /// The settings of one job in `source`, or why the job cannot run.
    pub fn job(&self, job_id: &str, source: &LiveKitSource) -> Result<LiveKitJob, String> {
        let url = source.url.clone().or_else(|| self.url.clone()).ok_or(
            "no LiveKit server URL: give the job one (`url`, or --livekit-url) or set \
                 livekit.url in the configuration",
        )?;
        source.validate()?;
        let credentials = match (&source.token, &self.api_key, &self.api_secret) {
            (Some(token), _, _) => Credentials::Token(token.clone()),
            (None, Some(key), Some(secret)) => Credentials::Mint {
                api: ApiKey {
                    key: key.clone(),
                    secret: secret.clone(),
                },
                identity: format!("framehost-{job_id}"),
                ttl: Duration::from_secs(self.token_ttl_secs.max(60)),
            },
            _ => {
                return Err("no LiveKit token: give one (the job's `token`, or \
                     FRAMEHOST_LIVEKIT_TOKEN), or an API key and secret to mint one \
                     (livekit.api_key/api_secret in the configuration, or LIVEKIT_API_KEY/\
                     LIVEKIT_API_SECRET)"
                    .into());
            }
        };
        let ms = Duration::from_millis;
        Ok(LiveKitJob {
            session: SessionConfig {
                job_id: job_id.to_owned(),
                url,
                room: source.room.clone(),
                credentials,
                source_identity: source.source_identity.clone(),
                source_grace: ms(self.source_grace_ms),
                retry: RetryPolicy {
                    attempts: self.retry_attempts,
                    initial_delay: ms(self.retry_initial_delay_ms),
                    max_delay: ms(self.retry_max_delay_ms),
                },
                connect_timeout: ms(self.connect_timeout_ms),
                ice_timeout: ms(self.ice_timeout_ms),
                max_senders: self.max_senders,
            },
            idle_timeout: Duration::from_secs(
                source.idle_timeout_secs.unwrap_or(self.idle_timeout_secs),
            ),
            max_duration: Duration::from_secs(
                source.max_duration_secs.unwrap_or(self.max_duration_secs),
            ),
            packet_queue_len: self.packet_queue_len,
            packet_queue_bytes: self.packet_queue_bytes,
        })
    }
}

/// What a job type runs and the limits of its jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTypeConfig {
    /// Path of the plugin component (`.wasm`), relative to the config file's directory.
    /// Watched: a changed file is loaded without a restart.
    pub plugin: PathBuf,
    /// Limits for this job type; what is left out comes from `[catalogue.defaults]`.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub call_deadline_ms: Option<u64>,
    #[serde(default)]
    pub on_trap: Option<TrapPolicy>,
    #[serde(default)]
    pub max_restarts: Option<u32>,
    #[serde(default)]
    pub queue_depth: Option<usize>,
}

impl JobTypeConfig {
    pub fn new(plugin: impl Into<PathBuf>) -> Self {
        Self {
            plugin: plugin.into(),
            memory_mib: None,
            call_deadline_ms: None,
            on_trap: None,
            max_restarts: None,
            queue_depth: None,
        }
    }

    /// What this section sets, over `defaults`.
    pub fn limits(&self, defaults: &Limits) -> Limits {
        LimitsPatch {
            memory_mib: self.memory_mib,
            call_deadline_ms: self.call_deadline_ms,
            on_trap: self.on_trap,
            max_restarts: self.max_restarts,
            queue_depth: self.queue_depth,
        }
        .apply(defaults)
    }
}

/// The limits a job type's jobs run under. Part of a route: pushed with a plugin version,
/// or set in `[job_types.T]`, `[catalogue.defaults]` or a `<job type>.toml` beside a
/// watched plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory per job, in MiB. Default 64; at most `sandbox.max_memory_mib`.
    pub memory_mib: u64,
    /// Milliseconds one plugin call may run. Default 5,000.
    pub call_deadline_ms: u64,
    /// What a trap (panic, memory limit, deadline) does: `fail` the job, or `restart`
    /// the plugin and drop the frame, up to `max_restarts` times. Default `fail`.
    pub on_trap: TrapPolicy,
    /// Restarts allowed per job under `on_trap = "restart"`. Default 3.
    pub max_restarts: u32,
    /// Decoded frames waiting for the plugin, per job. Default: `host.queue_depth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            call_deadline_ms: 5_000,
            on_trap: TrapPolicy::Fail,
            max_restarts: 3,
            queue_depth: None,
        }
    }
}

impl Limits {
    pub fn plugin_limits(&self) -> PluginLimits {
        PluginLimits {
            memory_bytes: self.memory_mib << 20,
            call_deadline: Duration::from_millis(self.call_deadline_ms),
        }
    }

    /// Whether a host whose pool slots hold `max_memory_mib` can run jobs under these.
    pub fn check(&self, max_memory_mib: u64) -> Result<(), String> {
        if self.memory_mib == 0 || self.memory_mib > max_memory_mib {
            return Err(format!(
                "memory_mib {} must be between 1 and sandbox.max_memory_mib ({max_memory_mib})",
                self.memory_mib
            ));
        }
        if !(1..=3_600_000).contains(&self.call_deadline_ms) {
            return Err(format!(
                "call_deadline_ms {} must be between 1 and 3600000",
                self.call_deadline_ms
            ));
        }
        if self.max_restarts > 1000 {
            return Err(format!(
                "max_restarts {} must be at most 1000",
                self.max_restarts
            ));
        }
        if let Some(depth) = self.queue_depth
            && !(1..=4096).contains(&depth)
        {
            return Err(format!("queue_depth {depth} must be between 1 and 4096"));
        }
        Ok(())
    }
}

/// Some limits, to lay over others: a `<job type>.toml` beside a watched plugin, or the
/// options of `plugin push`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsPatch {
    pub memory_mib: Option<u64>,
    pub call_deadline_ms: Option<u64>,
    pub on_trap: Option<TrapPolicy>,
    pub max_restarts: Option<u32>,
    pub queue_depth: Option<usize>,
}

impl LimitsPatch {
    pub fn apply(&self, base: &Limits) -> Limits {
        Limits {
            memory_mib: self.memory_mib.unwrap_or(base.memory_mib),
            call_deadline_ms: self.call_deadline_ms.unwrap_or(base.call_deadline_ms),
            on_trap: self.on_trap.unwrap_or(base.on_trap),
            max_restarts: self.max_restarts.unwrap_or(base.max_restarts),
            queue_depth: self.queue_depth.or(base.queue_depth),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrapPolicy {
    #[default]
    Fail,
    Restart,
}

/// Where plugins come from besides `[job_types]`, and where their compiled code is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogueConfig {
    /// A directory of plugins, watched: `<job type>.wasm` serves that job type, with limits
    /// from an optional `<job type>.toml` beside it. Default: none.
    pub dir: Option<PathBuf>,
    /// Milliseconds between looks at `dir` and the `[job_types]` files; a changed file is
    /// loaded once it has stayed the same for one interval. Default 2,000.
    pub poll_interval_ms: u64,
    /// Follow the routes published with `framehost plugin push` in the NATS key-value
    /// bucket `routes_bucket`. A route there wins over a local one for the same job type.
    /// Default true.
    pub nats: bool,
    /// Key-value bucket of routes (job type → plugin digest and limits). Default
    /// `framehost-routes`.
    pub routes_bucket: String,
    /// Object store holding plugin bytes, named by digest. Default `framehost-plugins`.
    pub objects_bucket: String,
    /// Key-value bucket where each replica says which versions it serves. Default
    /// `framehost-replicas`.
    pub replicas_bucket: String,
    /// Largest plugin accepted, in MiB. Default 64.
    pub max_plugin_mib: u64,
    /// Keep compiled plugins on disk, so that a restart does not compile again. Default true.
    pub cache: bool,
    /// Where compiled plugins are kept. Default `$XDG_CACHE_HOME/framehost/compiled`, else
    /// `$HOME/.cache/framehost/compiled`. Mount a volume here in a container.
    pub cache_dir: Option<PathBuf>,
    /// Limits for job types whose route does not set them.
    pub defaults: Limits,
}

impl Default for CatalogueConfig {
    fn default() -> Self {
        Self {
            dir: None,
            poll_interval_ms: 2_000,
            nats: true,
            routes_bucket: "framehost-routes".into(),
            objects_bucket: "framehost-plugins".into(),
            replicas_bucket: "framehost-replicas".into(),
            max_plugin_mib: 64,
            cache: true,
            cache_dir: None,
            defaults: Limits::default(),
        }
    }
}

impl CatalogueConfig {
    /// The compiled-code directory, if the cache is on and a place for it is known.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.cache {
            return None;
        }
        if let Some(dir) = &self.cache_dir {
            return Some(dir.clone());
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|home| PathBuf::from(home).join(".cache"))
            })?;
        Some(base.join("framehost").join("compiled"))
    }
}

/// Whether `text` is 1 to `max_len` characters of `A-Z a-z 0-9 - _`: what a name must be
/// to stand as a NATS subject token, a key-value key or a bucket name.
pub fn is_name(text: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("invalid config {path}: {error}")]
    Parse {
        path: String,
        error: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; plugin paths are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            error: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for job_type in config.job_types.values_mut() {
            if job_type.plugin.is_relative() {
                job_type.plugin = base.join(&job_type.plugin);
            }
        }
        let catalogue = &mut config.catalogue;
        for dir in [&mut catalogue.dir, &mut catalogue.cache_dir]
            .into_iter()
            .flatten()
        {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        config.livekit.apply_env();
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        // Ranges wide enough for any real deployment, narrow enough that no arithmetic on
        // them overflows.
        let lk = &self.livekit;
        let ranges: [(&str, u64, u64, u64); 16] = [
            ("host.max_jobs", self.host.max_jobs as u64, 1, 1024),
            ("host.queue_depth", self.host.queue_depth as u64, 1, 4096),
            ("nats.ack_wait_secs", self.nats.ack_wait_secs, 3, 86_400),
            (
                "nats.max_deliver",
                self.nats.max_deliver.max(0) as u64,
                1,
                1000,
            ),
            (
                "sandbox.max_memory_mib",
                self.sandbox.max_memory_mib,
                1,
                4096,
            ),
            (
                "sandbox.max_wasm_stack_kib",
                self.sandbox.max_wasm_stack_kib as u64,
                64,
                65_536,
            ),
            (
                "sandbox.max_instances",
                self.sandbox.max_instances.unwrap_or(1) as u64,
                1,
                10_000,
            ),
            ("livekit.token_ttl_secs", lk.token_ttl_secs, 60, 86_400),
            (
                "livekit.connect_timeout_ms",
                lk.connect_timeout_ms,
                100,
                120_000,
            ),
            ("livekit.ice_timeout_ms", lk.ice_timeout_ms, 100, 300_000),
            ("livekit.retry_attempts", lk.retry_attempts as u64, 0, 1000),
            (
                "livekit.retry_max_delay_ms",
                lk.retry_max_delay_ms,
                1,
                600_000,
            ),
            ("livekit.source_grace_ms", lk.source_grace_ms, 0, 600_000),
            (
                "livekit.max_duration_secs",
                lk.max_duration_secs,
                1,
                30 * 86_400,
            ),
            (
                "livekit.packet_queue_len",
                lk.packet_queue_len as u64,
                1,
                1 << 20,
            ),
            ("livekit.max_senders", lk.max_senders as u64, 1, 1 << 16),
        ];
        for (name, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                return invalid(format!("{name} must be between {low} and {high}"));
            }
        }
        // JetStream replicates a stream to at most five servers.
        if !(1..=5).contains(&self.nats.replicas) {
            return invalid("nats.replicas must be between 1 and 5".into());
        }
        if let Some(slots) = self.sandbox.max_instances
            && (slots as usize) < self.host.max_jobs
        {
            return invalid(format!(
                "sandbox.max_instances ({slots}) must be at least host.max_jobs ({}): every \
                 running job holds a plugin instance",
                self.host.max_jobs
            ));
        }
        let max_memory_mib = self.sandbox.max_memory_mib;
        self.catalogue
            .defaults
            .check(max_memory_mib)
            .or_else(|e| invalid(format!("catalogue.defaults: {e}")))?;
        for (name, job_type) in &self.job_types {
            crate::catalogue::check_job_type(name)
                .or_else(|e| invalid(format!("job_types.{name}: {e}")))?;
            job_type
                .limits(&self.catalogue.defaults)
                .check(max_memory_mib)
                .or_else(|e| invalid(format!("job_types.{name}: {e}")))?;
        }
        let c = &self.catalogue;
        if !(50..=3_600_000).contains(&c.poll_interval_ms) {
            return invalid("catalogue.poll_interval_ms must be between 50 and 3600000".into());
        }
        if !(1..=1024).contains(&c.max_plugin_mib) {
            return invalid("catalogue.max_plugin_mib must be between 1 and 1024".into());
        }
        for (name, bucket) in [
            ("routes_bucket", &c.routes_bucket),
            ("objects_bucket", &c.objects_bucket),
            ("replicas_bucket", &c.replicas_bucket),
        ] {
            if !is_name(bucket, 64) {
                return invalid(format!(
                    "catalogue.{name} {bucket:?} must be made of A-Z a-z 0-9 - _"
                ));
            }
        }
        Ok(())
    }

    pub fn sandbox_config(&self) -> SandboxConfig {
        let s = &self.sandbox;
        SandboxConfig {
            max_instances: s
                .max_instances
                .unwrap_or_else(|| (self.host.max_jobs as u32 * 2).max(4)),
            max_memory_bytes: s.max_memory_mib << 20,
            max_wasm_stack_bytes: s.max_wasm_stack_kib << 10,
            max_results_per_call: s.max_results_per_call,
            max_result_bytes: s.max_result_kib << 10,
            max_log_bytes_per_job: s.max_log_kib_per_job << 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config.host.max_jobs, 4);
        assert_eq!(config.streams.topic, "agentChat");
        assert_eq!(config.sandbox_config().max_instances, 8);
        config.validate().unwrap();
    }

    #[test]
    fn job_types_and_limits() {
        let config: Config = toml::from_str(
            r#"
            [host]
            max_jobs = 2
            [job_types.tracking]
            plugin = "tracker.wasm"
            memory_mib = 32
            on_trap = "restart"
            "#,
        )
        .unwrap();
        let tracking = config.job_types["tracking"].limits(&config.catalogue.defaults);
        assert_eq!(tracking.plugin_limits().memory_bytes, 32 << 20);
        assert_eq!(
            tracking.plugin_limits().call_deadline,
            Duration::from_secs(5)
        );
        assert_eq!(tracking.on_trap, TrapPolicy::Restart);
        assert_eq!(config.sandbox_config().max_instances, 4);
    }

    #[test]
    fn the_example_file_lists_valid_options() {
        let config: Config = toml::from_str(include_str!("../../examples/framehost.toml"))
            .expect("examples/framehost.toml parses");
        config.validate().unwrap();
        assert_eq!(config.livekit.retry_attempts, 10);
    }

    #[test]
    fn a_room_job_needs_a_url_and_credentials() {
        let source: LiveKitSource = serde_json::from_str(r#"{"room": "r1"}"#).unwrap();
        let mut lk = LiveKitConfig::default();
        let err = lk.job("j", &source).unwrap_err();
        assert!(err.contains("no LiveKit server URL"), "{err}");
        lk.url = Some("ws://127.0.0.1:7880".into());
        let err = lk.job("j", &source).unwrap_err();
        assert!(err.contains("no LiveKit token"), "{err}");
        let zero: LiveKitSource =
            serde_json::from_str(r#"{"room": "r1", "idle_timeout_secs": 0}"#).unwrap();
        assert!(zero.validate().is_err());
        lk.api_key = Some("key".into());
        lk.api_secret = Some(Secret::new("secret"));
        let job = lk.job("j", &source).unwrap();
        assert!(
            matches!(job.session.credentials, Credentials::Mint { ref identity, .. } if identity == "framehost-j")
        );
        assert_eq!(job.idle_timeout, Duration::from_secs(120));
        // A job's token wins, and never shows in a debug print.
        let source: LiveKitSource =
            serde_json::from_str(r#"{"room": "r1", "token": "jwt-text", "idle_timeout_secs": 5}"#)
                .unwrap();
        let job = lk.job("j", &source).unwrap();
        assert!(matches!(job.session.credentials, Credentials::Token(_)));
        assert_eq!(job.idle_timeout, Duration::from_secs(5));
        assert!(!format!("{job:?} {source:?}").contains("jwt-text"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[host]\nmax_job = 3").is_err());
        let config: Config =
            toml::from_str("[job_types.t]\nplugin = \"p.wasm\"\nmemory_mib = 4096").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("job_types.t: memory_mib 4096"), "{err}");
    }

    #[test]
    fn replicas_are_one_to_five() {
        let replicas = |n: usize| {
            let mut config = Config::default();
            config.nats.replicas = n;
            config.validate()
        };
        assert_eq!(Config::default().nats.replicas, 1);
        assert!(replicas(3).is_ok() && replicas(5).is_ok());
        for n in [0, 6] {
            let err = replicas(n).unwrap_err().to_string();
            assert!(
                err.contains("nats.replicas must be between 1 and 5"),
                "{err}"
            );
        }
    }
}
