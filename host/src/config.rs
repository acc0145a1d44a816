//! Configuration: one TOML file, every option with a default, any option overridden from
//! the environment.
//!
//! Every option is documented where it is defined, with its default and unit, and listed in
//! the README's configuration table and `examples/framehost.toml`. A missing file section
//! means "all defaults". `FRAMEHOST_<SECTION>__<KEY>=value` overrides `section.key` (see
//! [`ENV_PREFIX`]); secrets are read from files named in the configuration or from the
//! environment, and never printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. `tls://` requires TLS. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// A NATS credentials file (`.creds`: user JWT and nkey seed). Default: none.
    pub credentials_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`) to sign the server's challenge. Default: none.
    pub nkey_seed_file: Option<PathBuf>,
    /// User name, with `password` or `password_file`. Default: none.
    pub user: Option<String>,
    /// The user's password. Prefer `password_file`. Never printed.
    pub password: Option<Secret>,
    /// A file holding the user's password.
    pub password_file: Option<PathBuf>,
    /// An authentication token. Prefer `token_file`. Never printed.
    pub token: Option<Secret>,
    /// A file holding the token.
    pub token_file: Option<PathBuf>,
    /// TLS to the server.
    pub tls: NatsTls,
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
            credentials_file: None,
            nkey_seed_file: None,
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            tls: NatsTls::default(),
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
    /// At most one way to authenticate, each complete; the files it names readable.
    fn check_auth(&self) -> Result<(), String> {
        let ways = [
            ("credentials_file", self.credentials_file.is_some()),
            ("nkey_seed_file", self.nkey_seed_file.is_some()),
            ("user", self.user.is_some()),
            ("token", self.token.is_some() || self.token_file.is_some()),
        ];
        let set: Vec<&str> = ways.iter().filter(|w| w.1).map(|w| w.0).collect();
        if set.len() > 1 {
            return Err(format!(
                "nats: give one way to authenticate, not {}",
                set.join(" and ")
            ));
        }
        if self.user.is_some() != (self.password.is_some() || self.password_file.is_some()) {
            return Err("nats.user and nats.password (or password_file) go together".into());
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err("nats.tls.cert_file and nats.tls.key_file go together".into());
        }
        for (name, path) in [
            ("nats.credentials_file", &self.credentials_file),
            ("nats.nkey_seed_file", &self.nkey_seed_file),
            ("nats.tls.ca_file", &self.tls.ca_file),
            ("nats.tls.cert_file", &self.tls.cert_file),
            ("nats.tls.key_file", &self.tls.key_file),
        ] {
            if let Some(path) = path {
                std::fs::File::open(path)
                    .map_err(|e| format!("cannot read {name} {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Names JetStream and NATS subjects will take.
    fn check_names(&self) -> Result<(), String> {
        for (name, value) in [
            ("stream", &self.stream),
            ("dead_letter_stream", &self.dead_letter_stream),
            ("consumer", &self.consumer),
        ] {
            if !is_name(value, 255) {
                return Err(format!(
                    "nats.{name} {value:?} must be 1 to 255 of A-Z a-z 0-9 - _"
                ));
            }
        }
        if !self
            .subject_prefix
            .split('.')
            .all(|token| is_name(token, 255))
        {
            return Err(format!(
                "nats.subject_prefix {:?} must be dot-separated tokens of A-Z a-z 0-9 - _",
                self.subject_prefix
            ));
        }
        for server in self.url.split(',').map(str::trim) {
            let scheme = server.split_once("://").map(|(scheme, _)| scheme);
            if server.is_empty()
                || scheme.is_some_and(|s| !["nats", "tls", "ws", "wss"].contains(&s))
            {
                return Err(format!(
                    "nats.url {:?}: each server is nats://, tls://, ws:// or wss:// host:port",
                    redact_url(&self.url)
                ));
            }
        }
        Ok(())
    }

    /// The nkey seed, read from `nkey_seed_file`.
    pub fn nkey_seed(&self) -> Result<Option<Secret>, ConfigError> {
        inline_or_file("nats.nkey_seed", &None, &self.nkey_seed_file)
    }

    /// The password, given inline or read from `password_file`.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        inline_or_file("nats.password", &self.password, &self.password_file)
    }

    /// The token, given inline or read from `token_file`.
    pub fn token(&self) -> Result<Option<Secret>, ConfigError> {
        inline_or_file("nats.token", &self.token, &self.token_file)
    }
}

/// TLS to the NATS server. A `tls://` URL or a server that demands TLS uses it too.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTls {
    /// Refuse to talk to the server without TLS. Default false.
    pub required: bool,
    /// PEM file of the CA(s) that signed the server's certificate, in addition to the
    /// system's roots. Default: none.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
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
    /// Bytes all messages being assembled may hold together, per job; the part that would
    /// pass it drops its message (`assembly_full`). Default 64 MiB.
    pub max_buffered_bytes: usize,
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
            max_buffered_bytes: limits.max_buffered_bytes,
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
            max_buffered_bytes: self.max_buffered_bytes,
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
    /// The key's secret. Prefer `api_secret_file` or the `LIVEKIT_API_SECRET` environment
    /// variable to writing it here. Never logged or printed.
    pub api_secret: Option<Secret>,
    /// A file holding the API secret (a mounted Kubernetes Secret, say).
    pub api_secret_file: Option<PathBuf>,
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
            api_secret_file: None,
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

/// Resident memory of a host with no job running: the runtime, wasmtime and its compiled
/// plugins, the NATS client. A release build serving the tracker and frame-stats plugins
/// measured 73 MiB idle (VmHWM); the rest is headroom for the compiled code of more job
/// types.
pub const BASE_RESIDENT_BYTES: u64 = 128 << 20;

/// A worst-case bound on a host's resident memory, from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The host without jobs ([`BASE_RESIDENT_BYTES`]).
    pub base: u64,
    /// Jobs at once (`host.max_jobs`).
    pub jobs: u64,
    /// One job at its worst, by what holds the memory. A decoded frame is never larger than
    /// its assembled text, so `assembly.max_message_bytes` bounds each.
    pub per_job: Vec<(&'static str, u64)>,
}

impl MemoryBudget {
    pub fn per_job_total(&self) -> u64 {
        self.per_job.iter().map(|(_, bytes)| bytes).sum()
    }

    /// `base + jobs × per_job_total`.
    pub fn total(&self) -> u64 {
        self.base + self.jobs * self.per_job_total()
    }
}

/// The operations endpoint of `serve`: Prometheus metrics on `/metrics`, liveness on
/// `/healthz`, readiness on `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the endpoint at all. Default true.
    pub enabled: bool,
    /// Socket address to listen on; `serve` fails at start if it cannot be bound.
    /// Default `0.0.0.0:9180`.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 9180)),
        }
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

/// `FRAMEHOST_<SECTION>__<KEY>` variables set in the environment, as (name, value), sorted.
fn env_overrides() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value)))
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && name.contains("__"))
        .map(|(name, value)| (name, value.to_string_lossy().into_owned()))
        .collect();
    vars.sort();
    vars
}

/// `table` with the overrides laid over it, read as a configuration. An error names the
/// variables at fault.
fn with_overrides(
    table: toml::Table,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut all = table.clone();
    apply_overrides(&mut all, overrides)?;
    let error = match all.try_into::<Config>() {
        Ok(config) => return Ok(config),
        Err(error) => error,
    };
    // Which of them is wrong: each alone over the table.
    let culprits: Vec<&str> = overrides
        .iter()
        .filter(|one| {
            let mut alone = table.clone();
            apply_overrides(&mut alone, std::slice::from_ref(*one)).is_err()
                || alone.try_into::<Config>().is_err()
        })
        .map(|(name, _)| name.as_str())
        .collect();
    let names = if culprits.is_empty() {
        overrides.iter().map(|(name, _)| name.as_str()).collect()
    } else {
        culprits
    };
    Err(ConfigError::Overridden {
        names: names.join(", "),
        // Read from a table, the error has no source text to quote, only the option's path.
        error: error.to_string().trim().replace('\n', " "),
    })
}

/// Every option, each set (the optional ones too), with one job type `_` standing for any:
/// what tells an override which options are text.
fn every_option() -> toml::Table {
    let mut config = Config::default();
    let nats = &mut config.nats;
    nats.credentials_file = Some("f".into());
    nats.nkey_seed_file = Some("f".into());
    nats.user = Some("u".into());
    nats.password = Some(Secret::new("p"));
    nats.password_file = Some("f".into());
    nats.token = Some(Secret::new("t"));
    nats.token_file = Some("f".into());
    nats.tls.ca_file = Some("f".into());
    nats.tls.cert_file = Some("f".into());
    nats.tls.key_file = Some("f".into());
    config.sandbox.max_instances = Some(8);
    let lk = &mut config.livekit;
    lk.url = Some("wss://x".into());
    lk.api_key = Some("k".into());
    lk.api_secret = Some(Secret::new("s"));
    lk.api_secret_file = Some("f".into());
    config.catalogue.dir = Some("d".into());
    config.catalogue.cache_dir = Some("d".into());
    config.catalogue.defaults.queue_depth = Some(8);
    config.job_types.insert(
        "_".into(),
        JobTypeConfig {
            memory_mib: Some(1),
            call_deadline_ms: Some(1),
            on_trap: Some(TrapPolicy::Fail),
            max_restarts: Some(1),
            queue_depth: Some(1),
            ..JobTypeConfig::new("p.wasm")
        },
    );
    toml::Table::try_from(&config).expect("the options serialize")
}

/// Lays the overrides over `table`; an error names the variable. An empty value removes
/// the option (its default applies).
fn apply_overrides(
    table: &mut toml::Table,
    overrides: &[(String, String)],
) -> Result<(), ConfigError> {
    let options = every_option();
    for (name, raw) in overrides {
        let env_error = |error: String| ConfigError::Env {
            name: name.clone(),
            error,
        };
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(env_error("empty option name between `__`".into()));
        }
        let (key, sections) = path.split_last().expect("split yields one part at least");
        let mut at = &mut *table;
        let mut known = Some(&options);
        for (depth, section) in sections.iter().enumerate() {
            // Any job type's options are those of `_`.
            let lookup = if depth == 1 && sections[0] == "job_types" {
                "_"
            } else {
                section.as_str()
            };
            let option = known.and_then(|t| t.get(lookup));
            if option.is_some_and(|value| !value.is_table()) {
                return Err(env_error(format!("`{section}` is not a section")));
            }
            known = option.and_then(toml::Value::as_table);
            let entry = at
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = entry
                .as_table_mut()
                .ok_or_else(|| env_error(format!("`{section}` is not a section")))?;
        }
        if raw.is_empty() {
            at.remove(key);
            continue;
        }
        let value = match known.and_then(|t| t.get(key)) {
            Some(toml::Value::String(_)) => toml::Value::String(raw.clone()),
            _ => toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut parsed| parsed.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.clone())),
        };
        at.insert(key.clone(), value);
    }
    Ok(())
}

/// A TOML error as "line L, column C: message", without the text of the line.
fn describe(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// The secret given inline, else the one in `file`, if either is set.
fn inline_or_file(
    option: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    if inline.is_some() {
        return Ok(inline.clone());
    }
    let mut secret = None;
    read_secret_file(option, &mut secret, file)?;
    Ok(secret)
}

/// Reads a secret from `file` into `secret`; both given is an error. The error names the
/// option and the file, never the content.
fn read_secret_file(
    option: &str,
    secret: &mut Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let Some(path) = file else {
        return Ok(());
    };
    let invalid =
        |why: String| ConfigError::Invalid(format!("{option}_file {}: {why}", path.display()));
    if secret.is_some() {
        return Err(invalid(format!("{option} is given too: give one")));
    }
    let file = std::fs::File::open(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_SECRET_FILE_BYTES + 1),
        &mut text,
    )
    .map_err(|e| invalid(format!("cannot read it as text: {e}")))?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(invalid(format!(
            "larger than {MAX_SECRET_FILE_BYTES} bytes"
        )));
    }
    // Editors and `kubectl create secret --from-file` leave a final newline.
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    *secret = Some(Secret::new(text));
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The file's text is not a configuration. The message names the place, never the
    /// text there: it may be a secret.
    #[error("invalid config {path}: {error}")]
    Parse { path: String, error: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("invalid environment override {name}: {error}")]
    Env { name: String, error: String },
    #[error("invalid config with the environment override {names}: {error}")]
    Overridden { names: String, error: String },
}

/// Environment variables that override options: `FRAMEHOST_<SECTION>__<KEY>=value` sets
/// `section.key`, one `__` per level (`FRAMEHOST_CATALOGUE__DEFAULTS__MEMORY_MIB=128`,
/// `FRAMEHOST_JOB_TYPES__TRACKING__PLUGIN=/plugins/tracker.wasm`). Names are lower-cased.
/// A value is taken as text where the option is text, else read as a TOML value (`8`,
/// `true`, `["a", "b"]`), falling back to text; quote it (`'"123"'`) to force text. Only
/// names with a `__` are read, so `FRAMEHOST_CONFIG` and Kubernetes' service variables are
/// not options.
pub const ENV_PREFIX: &str = "FRAMEHOST_";

/// What `config check` prints for a secret given inline.
const REDACTED: &str = "<redacted>";

/// `url` (or a comma-separated list of them) with any `user:password@` replaced, for logs
/// and messages.
pub fn redact_url(url: &str) -> String {
    let redact = |one: &str| {
        let Some((scheme, rest)) = one.split_once("://") else {
            return one.to_owned();
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => format!("{scheme}://{REDACTED}{}", &rest[at..]),
            None => one.to_owned(),
        }
    };
    url.split(',').map(redact).collect::<Vec<_>>().join(",")
}

/// The longest secret file read, in bytes.
const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

impl Config {
    /// Reads a TOML file and applies the environment's overrides. Relative paths in it are
    /// resolved against the file's directory; secret files are read.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let parse_error = |error: toml::de::Error| ConfigError::Parse {
            path: path.display().to_string(),
            error: describe(&error, &text),
        };
        // The file alone is read too, so that its own mistakes are blamed on it, with their
        // line; the environment may still complete it (a job type's plugin, say).
        let from_file = toml::from_str::<Config>(&text);
        let overrides = env_overrides();
        let config = if overrides.is_empty() {
            from_file.map_err(parse_error)?
        } else {
            let table: toml::Table = toml::from_str(&text).map_err(parse_error)?;
            match (with_overrides(table, &overrides), from_file) {
                (Ok(config), _) => config,
                (Err(_), Err(file_error)) => return Err(parse_error(file_error)),
                (Err(env_error), Ok(_)) => return Err(env_error),
            }
        };
        // Absolute, so that the paths `config check` prints mean the same from anywhere.
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        config.finish(&base)
    }

    /// The defaults with the environment's overrides, for commands run without a file.
    /// Relative paths are resolved against the working directory.
    pub fn from_env() -> Result<Self, ConfigError> {
        with_overrides(toml::Table::new(), &env_overrides())?.finish(Path::new("."))
    }

    /// [`load`](Self::load) the file if one is given, else [`from_env`](Self::from_env).
    pub fn load_or_env(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Self::load(path),
            None => Self::from_env(),
        }
    }

    /// Resolves relative paths against `base`, reads secret files, validates.
    fn finish(mut self, base: &Path) -> Result<Self, ConfigError> {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        for job_type in self.job_types.values_mut() {
            resolve(&mut job_type.plugin);
        }
        let nats = &mut self.nats;
        let tls = &mut nats.tls;
        [
            &mut self.catalogue.dir,
            &mut self.catalogue.cache_dir,
            &mut self.livekit.api_secret_file,
            &mut nats.credentials_file,
            &mut nats.nkey_seed_file,
            &mut nats.password_file,
            &mut nats.token_file,
            &mut tls.ca_file,
            &mut tls.cert_file,
            &mut tls.key_file,
        ]
        .into_iter()
        .flatten()
        .for_each(resolve);

        for (option, secret) in [
            ("livekit.api_secret", &self.livekit.api_secret),
            ("nats.password", &self.nats.password),
            ("nats.token", &self.nats.token),
        ] {
            if secret.as_ref().is_some_and(|s| s.expose() == REDACTED) {
                return Err(ConfigError::Invalid(format!(
                    "{option} is {REDACTED:?}, the placeholder `config check` prints: give \
                     the secret itself, or better its file"
                )));
            }
        }
        read_secret_file(
            "livekit.api_secret",
            &mut self.livekit.api_secret,
            &self.livekit.api_secret_file,
        )?;
        self.livekit.apply_env();
        let nats = &mut self.nats;
        read_secret_file("nats.password", &mut nats.password, &nats.password_file)?;
        read_secret_file("nats.token", &mut nats.token, &nats.token_file)?;
        self.validate()?;
        Ok(self)
    }

    /// A copy fit to print: secrets given inline show as `<redacted>`, and those read from
    /// files are left out (their file is shown).
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        let redact = |secret: &mut Option<Secret>, file: &Option<PathBuf>| {
            if file.is_some() {
                *secret = None;
            } else if secret.is_some() {
                *secret = Some(Secret::new(REDACTED));
            }
        };
        config.nats.url = redact_url(&config.nats.url);
        let lk = &mut config.livekit;
        redact(&mut lk.api_secret, &lk.api_secret_file);
        let nats = &mut config.nats;
        redact(&mut nats.password, &nats.password_file);
        redact(&mut nats.token, &nats.token_file);
        config
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        // Ranges wide enough for any real deployment, narrow enough that no arithmetic on
        // them overflows.
        let lk = &self.livekit;
        let (st, asm, sb) = (&self.streams, &self.assembly, &self.sandbox);
        const GIB: u64 = 1 << 30;
        let ranges: &[(&str, u64, u64, u64)] = &[
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
            ("nats.nak_delay_secs", self.nats.nak_delay_secs, 0, 86_400),
            (
                "host.progress_interval_secs",
                self.host.progress_interval_secs,
                1,
                3600,
            ),
            (
                "host.shutdown_grace_secs",
                self.host.shutdown_grace_secs,
                0,
                86_400,
            ),
            (
                "streams.max_stream_bytes",
                st.max_stream_bytes as u64,
                1,
                GIB,
            ),
            (
                "streams.max_buffered_bytes",
                st.max_buffered_bytes as u64,
                1,
                4 * GIB,
            ),
            (
                "streams.max_open_streams",
                st.max_open_streams as u64,
                1,
                65_536,
            ),
            ("streams.idle_timeout_ms", st.idle_timeout_ms, 1, 3_600_000),
            ("assembly.max_parts", asm.max_parts as u64, 1, 65_536),
            (
                "assembly.max_message_bytes",
                asm.max_message_bytes as u64,
                1,
                GIB,
            ),
            (
                "assembly.max_open_messages",
                asm.max_open_messages as u64,
                1,
                65_536,
            ),
            (
                "assembly.max_buffered_bytes",
                asm.max_buffered_bytes as u64,
                1,
                4 * GIB,
            ),
            ("assembly.max_age_ms", asm.max_age_ms, 1, 3_600_000),
            (
                "decode.max_detections",
                self.decode.max_detections as u64,
                1,
                1_000_000,
            ),
            (
                "sandbox.max_results_per_call",
                sb.max_results_per_call as u64,
                1,
                65_536,
            ),
            (
                "sandbox.max_result_kib",
                sb.max_result_kib as u64,
                1,
                1 << 20,
            ),
            (
                "sandbox.max_log_kib_per_job",
                sb.max_log_kib_per_job as u64,
                0,
                1 << 20,
            ),
            (
                "livekit.packet_queue_bytes",
                lk.packet_queue_bytes as u64,
                1,
                4 * GIB,
            ),
        ];
        for &(name, value, low, high) in ranges {
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
        self.nats.check_auth().or_else(invalid)?;
        self.nats.check_names().or_else(invalid)?;
        if self.streams.topic.is_empty() {
            return invalid("streams.topic must not be empty".into());
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
        if self.metrics.enabled && self.metrics.listen.port() == 0 {
            return invalid(format!(
                "metrics.listen {} needs a port: probes and scrapers must know where to look",
                self.metrics.listen
            ));
        }
        Ok(())
    }

    /// The most memory a host may hold resident under this configuration: what sizes a
    /// pod's memory limit (see docs/deployment.md).
    pub fn memory_budget(&self) -> MemoryBudget {
        let queue_depth = self
            .job_types
            .values()
            .filter_map(|t| t.queue_depth)
            .chain(self.catalogue.defaults.queue_depth)
            .fold(self.host.queue_depth, usize::max) as u64;
        let message = self.assembly.max_message_bytes as u64;
        let sandbox = &self.sandbox;
        MemoryBudget {
            base: BASE_RESIDENT_BYTES,
            jobs: self.host.max_jobs as u64,
            per_job: vec![
                ("plugin linear memory", sandbox.max_memory_mib << 20),
                ("open data streams", self.streams.max_buffered_bytes as u64),
                (
                    "messages being assembled, and one assembled",
                    self.assembly.max_buffered_bytes as u64 + message,
                ),
                (
                    "decoded frames queued, and one in the call",
                    (queue_depth + 1) * message,
                ),
                (
                    "LiveKit packets queued",
                    self.livekit.packet_queue_bytes as u64,
                ),
                (
                    "results of one call, and plugin log",
                    ((sandbox.max_results_per_call * sandbox.max_result_kib) as u64
                        + sandbox.max_log_kib_per_job as u64)
                        << 10,
                ),
            ],
        }
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

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    fn overridden(file: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        with_overrides(toml::from_str(file).unwrap(), &vars(pairs))
    }

    #[test]
    fn environment_overrides_reach_every_level_and_keep_text_as_text() {
        let config = overridden(
            "[host]\nmax_jobs = 2\nqueue_depth = 3\n",
            &[
                ("FRAMEHOST_HOST__MAX_JOBS", "6"),
                ("FRAMEHOST_NATS__STREAM", "123"),
                ("FRAMEHOST_NATS__URL", "tls://a:4222,tls://b:4222"),
                ("FRAMEHOST_NATS__TLS__REQUIRED", "true"),
                ("FRAMEHOST_CATALOGUE__NATS", "false"),
                ("FRAMEHOST_CATALOGUE__DEFAULTS__ON_TRAP", "restart"),
                ("FRAMEHOST_JOB_TYPES__TRACKING__PLUGIN", "/plugins/t.wasm"),
                ("FRAMEHOST_LIVEKIT__API_SECRET_FILE", "/run/secrets/lk"),
            ],
        )
        .unwrap();
        assert_eq!(config.host.max_jobs, 6);
        assert_eq!(config.host.queue_depth, 3, "the file's other options stay");
        assert_eq!(
            config.nats.stream, "123",
            "a text option takes digits as text"
        );
        assert_eq!(config.nats.url, "tls://a:4222,tls://b:4222");
        assert!(config.nats.tls.required);
        assert!(!config.catalogue.nats);
        assert_eq!(config.catalogue.defaults.on_trap, TrapPolicy::Restart);
        assert_eq!(
            config.job_types["tracking"].plugin,
            Path::new("/plugins/t.wasm")
        );
        assert_eq!(
            config.livekit.api_secret_file.as_deref(),
            Some(Path::new("/run/secrets/lk"))
        );
    }

    #[test]
    fn a_bad_override_names_its_variable() {
        let message = |pairs: &[(&str, &str)]| overridden("", pairs).unwrap_err().to_string();
        let typo = message(&[("FRAMEHOST_HOST__MAX_JOB", "6")]);
        assert!(
            typo.contains("FRAMEHOST_HOST__MAX_JOB") && typo.contains("unknown field `max_job`"),
            "{typo}"
        );
        let not_a_number = message(&[("FRAMEHOST_HOST__MAX_JOBS", "lots")]);
        assert!(not_a_number.contains("max_jobs"), "{not_a_number}");
        let too_deep = message(&[("FRAMEHOST_HOST__MAX_JOBS__X", "1")]);
        assert!(
            too_deep.contains("FRAMEHOST_HOST__MAX_JOBS__X") && too_deep.contains("not a section"),
            "{too_deep}"
        );
        let empty = message(&[("FRAMEHOST___X", "1")]);
        assert!(empty.contains("empty option name"), "{empty}");
    }

    #[test]
    fn secrets_come_from_files_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lk"), "lk-secret\n").unwrap();
        std::fs::write(dir.path().join("pw"), "nats-password").unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let file = dir.path().join("framehost.toml");
        let write = |text: &str| std::fs::write(&file, text).unwrap();

        write(
            "[livekit]\napi_key = \"k\"\napi_secret_file = \"lk\"\n\
             [nats]\nuser = \"u\"\npassword_file = \"pw\"\n",
        );
        let config = Config::load(&file).unwrap();
        assert_eq!(
            config.livekit.api_secret.as_ref().unwrap().expose(),
            "lk-secret"
        );
        assert_eq!(
            config.nats.password().unwrap().unwrap().expose(),
            "nats-password"
        );
        let printed = toml::to_string(&config.redacted()).unwrap();
        assert!(!printed.contains("lk-secret") && !printed.contains("nats-password"));
        assert!(printed.contains("api_secret_file"), "{printed}");

        let error = |text: &str| {
            write(text);
            Config::load(&file).unwrap_err().to_string()
        };
        let both = error("[livekit]\napi_secret = \"x\"\napi_secret_file = \"lk\"\n");
        assert!(both.contains("give one"), "{both}");
        let missing = error("[nats]\ntoken_file = \"nope\"\n");
        assert!(
            missing.contains("nats.token_file") && missing.contains("nope"),
            "{missing}"
        );
        let empty = error("[nats]\ntoken_file = \"empty\"\n");
        assert!(empty.contains("empty"), "{empty}");
        let two_ways = error("[nats]\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n");
        assert!(two_ways.contains("one way to authenticate"), "{two_ways}");
        let half_tls = error("[nats.tls]\ncert_file = \"lk\"\n");
        assert!(half_tls.contains("go together"), "{half_tls}");
    }

    #[test]
    fn the_example_file_names_every_option() {
        let mut options = Vec::new();
        flatten("", &every_option(), &mut options);

        // What the example names, commented out or not.
        let example = include_str!("../../examples/framehost.toml");
        let mut section = String::new();
        let mut named = std::collections::BTreeSet::new();
        for line in example.lines().map(str::trim) {
            let line = line.trim_start_matches('#').trim();
            if let Some(header) = line.strip_prefix('[') {
                section = header.split(']').next().unwrap_or_default().to_owned();
            } else if let Some((key, _)) = line.split_once('=')
                && is_name(key.trim(), 64)
            {
                named.insert(format!("{section}.{}", key.trim()));
            }
        }
        let missing: Vec<&String> = options.iter().filter(|o| !named.contains(*o)).collect();
        assert!(
            missing.is_empty(),
            "examples/framehost.toml lacks {missing:?}"
        );
    }

    fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) if path != "job_types" => flatten(&path, inner, out),
                _ if path == "job_types" => {}
                _ => out.push(path),
            }
        }
    }

    #[test]
    fn urls_lose_their_credentials_in_print() {
        assert_eq!(
            redact_url("nats://bob:pw@a:4222, tls://tok@b:4222,nats://c:4222"),
            "nats://<redacted>@a:4222, tls://<redacted>@b:4222,nats://c:4222"
        );
        assert_eq!(redact_url("nats://a:4222/x@y"), "nats://a:4222/x@y");
    }

    #[test]
    fn a_file_error_names_its_line_and_never_shows_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.toml");
        for text in [
            "[nats]\nuser = \"u\"\npassword = \"S3CRET\n",
            "[nats]\ntoken = S3CRET\n",
            "[nats]\npasswrd = \"S3CRET\"\n",
        ] {
            std::fs::write(&file, text).unwrap();
            let error = Config::load(&file).unwrap_err().to_string();
            assert!(!error.contains("S3CRET"), "{error}");
            assert!(error.contains("line "), "{error}");
        }
        // A secret written as a number is taken as its digits, not refused with them.
        std::fs::write(&file, "[nats]\nuser = \"u\"\npassword = 98765432\n").unwrap();
        let config = Config::load(&file).unwrap();
        assert_eq!(config.nats.password.unwrap().expose(), "98765432");
        // The placeholder `config check` prints is not a secret.
        std::fs::write(&file, "[nats]\ntoken = \"<redacted>\"\n").unwrap();
        let error = Config::load(&file).unwrap_err().to_string();
        assert!(error.contains("placeholder"), "{error}");
    }

    #[test]
    fn overrides_take_text_as_text_blame_only_the_culprit_and_unset_when_empty() {
        let config = overridden(
            "[nats]\ntoken_file = \"t\"\n[job_types.t]\nplugin = \"p.wasm\"\n",
            &[
                ("FRAMEHOST_LIVEKIT__API_SECRET", "1234567"),
                ("FRAMEHOST_JOB_TYPES__T__MEMORY_MIB", "32"),
                ("FRAMEHOST_NATS__TOKEN_FILE", ""),
            ],
        )
        .unwrap();
        assert_eq!(config.livekit.api_secret.unwrap().expose(), "1234567");
        assert_eq!(config.job_types["t"].memory_mib, Some(32));
        assert_eq!(config.nats.token_file, None, "an empty value unsets");
        let error = overridden(
            "",
            &[
                ("FRAMEHOST_HOST__MAX_JOBS", "many"),
                ("FRAMEHOST_NATS__STREAM", "S"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("FRAMEHOST_HOST__MAX_JOBS") && !error.contains("FRAMEHOST_NATS__STREAM"),
            "{error}"
        );
    }

    #[test]
    fn the_environment_may_complete_the_file_and_a_file_error_keeps_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.toml");
        std::fs::write(
            &file,
            "[host]\nmax_jobs = 2\n[job_types.t]\nmemory_mib = 32\n",
        )
        .unwrap();
        let overrides = vars(&[("FRAMEHOST_JOB_TYPES__T__PLUGIN", "/plugins/t.wasm")]);
        let text = std::fs::read_to_string(&file).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let config = with_overrides(table, &overrides).unwrap();
        assert_eq!(config.job_types["t"].plugin, Path::new("/plugins/t.wasm"));
        // Without the environment, the file alone names its line.
        let error = Config::load(&file).unwrap_err().to_string();
        assert!(
            error.contains("line 3") && error.contains("plugin"),
            "{error}"
        );
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        for (text, expected) in [
            (
                "[nats]\nnak_delay_secs = 9223372036854775807",
                "nats.nak_delay_secs",
            ),
            (
                "[host]\nprogress_interval_secs = 0",
                "host.progress_interval_secs",
            ),
            ("[assembly]\nmax_parts = 0", "assembly.max_parts"),
            ("[decode]\nmax_detections = 0", "decode.max_detections"),
            (
                "[sandbox]\nmax_result_kib = 99999999999",
                "sandbox.max_result_kib",
            ),
            ("[nats]\nstream = \"my.stream\"", "nats.stream"),
            ("[nats]\nsubject_prefix = \"a b*\"", "nats.subject_prefix"),
            ("[nats]\nurl = \"\"", "nats.url"),
            ("[nats]\nurl = \"ftp://x\"", "nats.url"),
            ("[streams]\ntopic = \"\"", "streams.topic"),
        ] {
            let config: Config = toml::from_str(text).unwrap();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let fine: Config =
            toml::from_str("[nats]\nsubject_prefix = \"acme.video\"\nurl = \"a:4222\"").unwrap();
        fine.validate().unwrap();
    }

    #[test]
    fn the_memory_budget_follows_the_limits() {
        let mut config = Config::default();
        let budget = config.memory_budget();
        assert_eq!(budget.jobs, 4);
        assert_eq!(budget.total(), budget.base + 4 * budget.per_job_total());
        config.host.max_jobs = 8;
        config.sandbox.max_memory_mib = 128;
        let bigger = config.memory_budget();
        assert_eq!(
            bigger.per_job_total(),
            budget.per_job_total() - (128 << 20),
            "plugin memory is counted at the sandbox's cap"
        );
        assert_eq!(bigger.jobs, 8);
        config.job_types.insert(
            "deep".into(),
            JobTypeConfig {
                queue_depth: Some(100),
                ..JobTypeConfig::new("p.wasm")
            },
        );
        let deep = config.memory_budget();
        let frames =
            |b: &MemoryBudget| b.per_job.iter().find(|p| p.0.contains("frames")).unwrap().1;
        assert_eq!(frames(&deep), 101 * (32 << 20), "the deepest queue counts");
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

    #[test]
    fn metrics_listen_on_9180_unless_told_otherwise() {
        let config: Config = toml::from_str("").unwrap();
        assert!(config.metrics.enabled);
        assert_eq!(config.metrics.listen.to_string(), "0.0.0.0:9180");
        let config: Config = toml::from_str("[metrics]\nlisten = \"127.0.0.1:0\"").expect("parses");
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("metrics.listen 127.0.0.1:0 needs a port"),
            "{err}"
        );
        assert!(toml::from_str::<Config>("[metrics]\nlisten = \"nowhere\"").is_err());
    }
}
