//! One NATS server (or a cluster of them), the framehost hosts a test starts against it, and
//! what tests check.

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use framehost::capture::synth::SynthOptions;
use framehost::config::{Config, JobTypeConfig, NatsConfig};
use framehost::job::JobSpec;
use framehost::livekit::{LiveKitSource, Secret};
use framehost::source::SourceSpec;
use futures::StreamExt as _;
use tempfile::TempDir;

use crate::livekit::LiveKitDouble;
use crate::{HostProcess, JobWatch, NatsServer, captures};
use framehost::intake::{JobState, JobStatus};

/// Bound on a job's run in tests, from submission to its final status: generous, since a
/// debug host on a busy two-core machine is slow, and a hang is what it catches.
pub const JOB_WAIT: Duration = Duration::from_secs(150);

/// Log lines of each host shown when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Jobs [`Cluster::submit_all`] publishes before it awaits their acks.
pub const SUBMIT_IN_FLIGHT: usize = 256;

/// Awaits `fut` for at most `limit`; past it, panics saying what was awaited, followed by
/// `context()` (the hosts' logs).
pub async fn within<F: Future>(
    limit: Duration,
    what: impl Display,
    context: impl FnOnce() -> String,
    fut: F,
) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(output) => output,
        Err(_) => panic!(
            "timed out after {limit:?} waiting for {what}\n{}",
            context()
        ),
    }
}

/// A NATS server with JetStream (or a cluster of them), the framehost hosts started against
/// it, a client for the test, and a scratch directory.
pub struct Cluster {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// The configuration hosts are started with; tests adjust it before starting one.
    pub config: Config,
    pub scratch: TempDir,
    /// Environment variables hosts are started with, besides the harness's own.
    pub host_env: Vec<(String, String)>,
    hosts: Vec<HostProcess>,
}

impl Cluster {
    /// Starts a server; no host yet. The configuration template points at the server and
    /// serves no job type until the test adds some.
    pub async fn start() -> Self {
        let nats = NatsServer::start()
            .await
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e:#}"));
        Self::on(nats).await
    }

    /// Starts a cluster of `size` servers; no host yet. Hosts get every server's URL and
    /// create their streams and buckets with `size` replicas.
    pub async fn start_nats_cluster(size: usize) -> Self {
        let nats = NatsServer::start_cluster(size)
            .await
            .unwrap_or_else(|e| panic!("cannot start a cluster of {size} nats-servers: {e:#}"));
        let mut cluster = Self::on(nats).await;
        cluster.config.nats.replicas = size;
        cluster
    }

    async fn on(nats: NatsServer) -> Self {
        let client = async_nats::connect(nats.urls())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to nats-server at {}: {e}", nats.url()));
        let js = jetstream::new(client.clone());
        let scratch = tempfile::Builder::new()
            .prefix("framehost-test-")
            .tempdir()
            .expect("cannot create a scratch directory");
        let mut config = Config::default();
        config.nats.url = nats.url();
        // Each test compiles into its own cache: nothing is shared with other tests or the
        // user's own cache.
        config.catalogue.cache_dir = Some(scratch.path().join("compiled"));
        Self {
            nats,
            client,
            js,
            config,
            scratch,
            host_env: Vec::new(),
            hosts: Vec::new(),
        }
    }

    /// The `[nats]` section every host and submitter of this cluster uses. Submitters create
    /// the stream and consumer when they come first, so they must agree with the hosts
    /// (`ack_wait_secs` above all).
    pub fn nats_config(&self) -> &NatsConfig {
        &self.config.nats
    }

    /// Routes `name` to `plugin` with default limits, and returns its settings to adjust.
    pub fn serve_job_type(&mut self, name: &str, plugin: PathBuf) -> &mut JobTypeConfig {
        self.config
            .job_types
            .insert(name.to_owned(), JobTypeConfig::new(plugin));
        self.config.job_types.get_mut(name).expect("just inserted")
    }

    /// Starts `framehost serve` with the current configuration and `HOSTNAME=name`, and
    /// waits until it pulls jobs. Returns its index for [`Cluster::host`].
    pub async fn start_host(&mut self, name: &str) -> usize {
        let host = HostProcess::start_with_env(name, &self.config, &self.host_env)
            .unwrap_or_else(|e| self.fail(format!("cannot start host {name}: {e:#}")));
        self.hosts.push(host);
        let index = self.hosts.len() - 1;
        // Compiling the plugins takes a few seconds in a debug build, more on a busy machine.
        if let Err(error) = self.hosts[index]
            .wait_serving(Duration::from_secs(120))
            .await
        {
            self.fail(format!("{error:#}"));
        }
        index
    }

    pub fn host(&mut self, index: usize) -> &mut HostProcess {
        &mut self.hosts[index]
    }

    /// The tail of every host's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for host in &self.hosts {
            out.push_str(&format!(
                "----- log of host {} (last {LOG_TAIL_LINES} lines) -----\n{}\n",
                host.name(),
                host.log_tail(LOG_TAIL_LINES)
            ));
        }
        if self.hosts.is_empty() {
            out.push_str("(no host was started)\n");
        }
        // A cluster's elections and catch-up explain many a failure; a single server's log
        // seldom does.
        if self.nats.len() > 1 {
            out.push_str(&self.nats.log_tail(LOG_TAIL_LINES));
        }
        out
    }

    /// Panics with `message` and the hosts' logs.
    pub fn fail(&self, message: impl Display) -> ! {
        panic!("{message}\n{}", self.logs())
    }

    /// Panics with `message` and the hosts' logs unless `condition` holds.
    #[track_caller]
    pub fn check(&self, condition: bool, message: impl Display) {
        if !condition {
            self.fail(message);
        }
    }

    /// [`within`], with the hosts' logs on timeout.
    pub async fn within<F: Future>(
        &self,
        limit: Duration,
        what: impl Display,
        fut: F,
    ) -> F::Output {
        within(limit, what, || self.logs(), fut).await
    }

    /// Waits, for at most [`JOB_WAIT`], until `watch` sees a status in `state`, and returns
    /// it; fails the test with the hosts' logs otherwise.
    pub async fn until(
        &self,
        watch: &mut JobWatch,
        state: JobState,
        what: impl Display,
    ) -> JobStatus {
        self.within(JOB_WAIT, what, watch.until(state))
            .await
            .unwrap_or_else(|| self.fail("status subscription ended"))
    }

    /// Waits, for at most [`JOB_WAIT`], for the job's final status (finished, stopped,
    /// failed or requeued).
    pub async fn until_final(&self, watch: &mut JobWatch, what: impl Display) -> JobStatus {
        self.within(JOB_WAIT, what, watch.until_final())
            .await
            .unwrap_or_else(|| self.fail("status subscription ended"))
    }

    /// Submits `spec` and waits for its final status, watching from before it is
    /// published.
    pub async fn run(&self, spec: &JobSpec) -> JobStatus {
        let mut watch = self.watch(&spec.id).await;
        self.submit(spec).await;
        self.until_final(&mut watch, format!("the final status of {}", spec.id))
            .await
    }

    /// Makes a capture in the scratch directory.
    pub fn capture(&self, name: &str, options: &SynthOptions) -> PathBuf {
        let path = self.scratch.path().join(format!("{name}.cap"));
        captures::make(&path, options);
        path
    }

    /// A job reading `capture`.
    pub fn job(&self, id: &str, job_type: &str, capture: &Path, realtime: bool) -> JobSpec {
        JobSpec {
            id: id.to_owned(),
            job_type: job_type.to_owned(),
            source: SourceSpec::Capture {
                path: capture.to_path_buf(),
                realtime,
            },
            config: serde_json::json!({}),
        }
    }

    /// Points the hosts' `[livekit]` section at `double`, with its key and secret.
    pub fn use_livekit(&mut self, double: &LiveKitDouble) {
        let lk = &mut self.config.livekit;
        lk.url = Some(double.url());
        lk.api_key = Some(double.api_key().to_owned());
        lk.api_secret = Some(Secret::new(double.api_secret()));
    }

    /// A job in the LiveKit room `room` that ends when `source_identity` leaves; the host
    /// mints its token.
    pub fn room_job(&self, id: &str, job_type: &str, room: &str, source_identity: &str) -> JobSpec {
        JobSpec {
            id: id.to_owned(),
            job_type: job_type.to_owned(),
            source: SourceSpec::LiveKit(LiveKitSource {
                room: room.to_owned(),
                url: None,
                token: None,
                source_identity: Some(source_identity.to_owned()),
                max_duration_secs: None,
                idle_timeout_secs: None,
            }),
            config: serde_json::json!({}),
        }
    }

    /// Subscribes to a job's status and results; do it before submitting the job.
    pub async fn watch(&self, id: &str) -> JobWatch {
        JobWatch::new(&self.client, self.nats_config(), id)
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot subscribe to job {id}: {e}")))
    }

    /// Publishes a job the way `framehost job submit` does (without waiting for it).
    pub async fn submit(&self, spec: &JobSpec) {
        let submitted = framehost::intake::submit(self.nats_config(), spec, None, |_| {});
        if let Err(error) = self
            .within(
                Duration::from_secs(30),
                format!("job {} to be stored", spec.id),
                submitted,
            )
            .await
        {
            self.fail(format!("cannot submit job {}: {error:#}", spec.id));
        }
    }

    /// Publishes every job as `framehost job submit` does (its id as the message id), up to
    /// [`SUBMIT_IN_FLIGHT`] at a time, and waits until JetStream has stored each one. A
    /// publish left unanswered (a server lost, a stream leader being elected) is sent again
    /// under the same message id, which JetStream de-duplicates; a duplicate on the first
    /// send fails the test (a job id used twice). Fails the test if the jobs are not all
    /// stored within two minutes.
    pub async fn submit_all(&self, specs: &[JobSpec]) {
        let nats = self.nats_config();
        let stored = async {
            // Answered by the meta and stream leaders: retried, like the publishes, while a
            // cluster elects them.
            while let Err(error) = framehost::intake::ensure_streams(&self.js, nats).await {
                eprintln!("submit: cannot open the jobs stream yet ({error:#}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let mut pending: Vec<&JobSpec> = specs.iter().collect();
            let mut resend = false;
            while !pending.is_empty() {
                let sends = futures::stream::iter(pending.iter().copied())
                    .map(|spec| async move {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", spec.id.as_str());
                        let body = serde_json::to_vec(spec).expect("a job serializes");
                        let subject = nats.jobs_subject(&spec.job_type);
                        let ack = async {
                            self.js
                                .publish_with_headers(subject, headers, body.into())
                                .await?
                                .await
                                .map_err(anyhow::Error::from)
                        };
                        (spec, ack.await)
                    })
                    .buffer_unordered(SUBMIT_IN_FLIGHT)
                    .collect::<Vec<_>>()
                    .await;
                let mut unanswered = Vec::new();
                for (spec, ack) in sends {
                    match ack {
                        Ok(ack) if ack.duplicate && !resend => {
                            anyhow::bail!("job id {} was submitted before", spec.id)
                        }
                        Ok(_) => {}
                        Err(_) => unanswered.push(spec),
                    }
                }
                pending = unanswered;
                resend = true;
                if !pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            anyhow::Ok(())
        };
        let stored = self
            .within(
                Duration::from_secs(120),
                format!("{} jobs to be stored", specs.len()),
                stored,
            )
            .await;
        if let Err(error) = stored {
            self.fail(format!("cannot submit the jobs: {error:#}"));
        }
    }

    /// Messages in the jobs (work-queue) stream: jobs not yet acked or terminated.
    pub async fn jobs_in_queue(&self) -> u64 {
        self.jobs_stream_state().await.messages
    }

    /// The jobs stream's counters.
    pub async fn jobs_stream_state(&self) -> jetstream::stream::State {
        let mut stream = self
            .js
            .get_stream(&self.nats_config().stream)
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot open the jobs stream: {e}")));
        let info = stream
            .info()
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot read the jobs stream: {e}")));
        info.state.clone()
    }

    /// Waits until the jobs stream is empty: every job was acked or terminated. A host
    /// settles a job just after publishing its final status, hence the (bounded) wait.
    pub async fn wait_queue_empty(&self, why: &str) {
        let empty = async {
            while self.jobs_in_queue().await > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.within(
            Duration::from_secs(20),
            format!("the jobs stream to be empty ({why})"),
            empty,
        )
        .await;
    }

    /// The dead-lettered copy of a job, stored under `<prefix>.dead.<key>` (the job id, or
    /// `seq-<stream sequence>` for a job that could not be parsed).
    pub async fn dead_letter(&self, key: &str) -> Option<StreamMessage> {
        let nats = self.nats_config();
        let stream = self.js.get_stream(&nats.dead_letter_stream).await.ok()?;
        stream
            .get_last_raw_message_by_subject(&format!("{}.{key}", nats.dead_letter_subject()))
            .await
            .ok()
    }

    /// Waits for a dead-lettered job to be stored.
    pub async fn wait_dead_letter(&self, key: &str) -> StreamMessage {
        let found = async {
            loop {
                if let Some(message) = self.dead_letter(key).await {
                    return message;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.within(
            Duration::from_secs(30),
            format!(
                "job {key} in the dead-letter stream {}",
                self.nats_config().dead_letter_stream
            ),
            found,
        )
        .await
    }
}

impl Cluster {
    /// The shared consumer's state: what is pending, unacked, redelivered.
    pub async fn consumer_info(&self) -> jetstream::consumer::Info {
        let nats = self.nats_config();
        let read = async {
            let stream = self.js.get_stream(&nats.stream).await?;
            let mut consumer: jetstream::consumer::PullConsumer = stream
                .get_consumer(&nats.consumer)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            anyhow::Ok(consumer.info().await?.clone())
        };
        match self
            .within(Duration::from_secs(20), "the consumer's info", read)
            .await
        {
            Ok(info) => info,
            Err(error) => self.fail(format!(
                "cannot read the consumer {}: {error}",
                nats.consumer
            )),
        }
    }
}

/// Leaders in a cluster of NATS servers, and the test's own view of it.
impl Cluster {
    /// Connects the test's own client to `url` alone, for instance a server of a cluster
    /// the test will not kill: a core NATS subscription misses what is published while
    /// its client reconnects.
    pub async fn use_client(&mut self, url: &str) {
        self.client = async_nats::connect(url)
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot connect to {url}: {e}")));
        self.js = jetstream::new(self.client.clone());
    }

    /// The server leading the jobs stream, by `server_name`, if it has a leader now.
    pub async fn stream_leader(&self) -> Option<String> {
        let subject = format!("$JS.API.STREAM.INFO.{}", self.nats_config().stream);
        self.leader_from(&subject).await
    }

    /// The server leading the shared consumer, if it has a leader now.
    pub async fn consumer_leader(&self) -> Option<String> {
        let nats = self.nats_config();
        let subject = format!("$JS.API.CONSUMER.INFO.{}.{}", nats.stream, nats.consumer);
        self.leader_from(&subject).await
    }

    /// Asks the jobs stream's leader, then the consumer's, to step down until `node` leads
    /// both (each step down elects one of the other replicas). Fails the test if that does
    /// not happen within a few dozen elections.
    pub async fn move_leaders_to(&self, node: &str) {
        let nats = self.nats_config();
        let stream = format!("$JS.API.STREAM.INFO.{}", nats.stream);
        let stream_down = format!("$JS.API.STREAM.LEADER.STEPDOWN.{}", nats.stream);
        let consumer = format!("$JS.API.CONSUMER.INFO.{}.{}", nats.stream, nats.consumer);
        let consumer_down = format!(
            "$JS.API.CONSUMER.LEADER.STEPDOWN.{}.{}",
            nats.stream, nats.consumer
        );
        for (info, step_down) in [(&stream, &stream_down), (&consumer, &consumer_down)] {
            let mut elections = 0;
            loop {
                let leader = self.wait_leader(info, None).await;
                if leader == node {
                    break;
                }
                elections += 1;
                self.check(
                    elections <= 30,
                    format!("{node} did not become the leader ({info}) in 30 elections"),
                );
                self.client
                    .request(step_down.clone(), "".into())
                    .await
                    .unwrap_or_else(|e| self.fail(format!("{step_down} failed: {e}")));
                self.wait_leader(info, Some(&leader)).await;
            }
        }
    }

    /// Waits until the JetStream object `info` describes has a leader other than `not`.
    pub async fn wait_leader(&self, info: &str, not: Option<&str>) -> String {
        let elected = async {
            loop {
                if let Some(leader) = self.leader_from(info).await
                    && Some(leader.as_str()) != not
                {
                    return leader;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.within(
            Duration::from_secs(30),
            format!("a leader for {info} other than {not:?}"),
            elected,
        )
        .await
    }

    /// `cluster.leader` of a JetStream info request's answer.
    async fn leader_from(&self, subject: &str) -> Option<String> {
        let request = self.client.request(subject.to_owned(), "".into());
        let reply = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .ok()?
            .ok()?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        info["cluster"]["leader"]
            .as_str()
            .filter(|leader| !leader.is_empty())
            .map(str::to_owned)
    }
}
