//! Intake: jobs from NATS JetStream, status and results back to NATS.
//!
//! Jobs live in a work-queue stream (`nats.stream`, subjects `<prefix>.jobs.>`). Every replica
//! pulls from one shared durable consumer, one message at a time and only while it has a free
//! job slot (`host.max_jobs`), so a busy host leaves jobs for idle ones and the queue's lag
//! is an honest scaling signal.
//!
//! A running job's message gets an in-progress ack every third of `ack_wait`. When the job
//! ends: success acks it; a transient failure naks it with `nak_delay_secs` (it is redelivered,
//! maybe elsewhere); a permanent failure, or a transient one on the last allowed delivery,
//! copies the job to the dead-letter stream with the reason in its headers and terminates it.
//! A host that dies mid-job stops sending in-progress acks, and JetStream redelivers the job
//! after `ack_wait`; a job that took every host down with it until `max_deliver` is
//! dead-lettered from JetStream's max-deliveries advisory.
//!
//! Status messages (JSON [`JobStatus`]) go to `<prefix>.status.<job id>`; each plugin result to
//! `<prefix>.results.<job id>` with its content type and frame index in headers. A message on
//! `<prefix>.control.<job id>` whose body is `stop` ends that job early (it is then acked).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::catalogue::{self, Catalogue};
use crate::config::{Config, NatsConfig, redact_url};
use crate::job::{self, FailureKind, JobError, JobEvent, JobReport, JobSettings, JobSpec};
use crate::metrics::{UNROUTED, metrics};
use crate::ops::Readiness;

/// Header carrying a result's frame index.
pub const FRAME_HEADER: &str = "Framehost-Frame";
/// Headers of a dead-lettered job.
pub const REASON_HEADER: &str = "Framehost-Reason";
pub const ERROR_HEADER: &str = "Framehost-Error";
pub const DELIVERIES_HEADER: &str = "Framehost-Deliveries";

/// What happened to a job, published on its status subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub state: JobState,
    /// The host that ran the job.
    pub host: String,
    /// Which delivery of the job this is, from 1.
    pub delivery: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailureKind>,
    /// The plugin version (`sha256:<hex>`) the job runs on, in `started`; later statuses
    /// carry it in the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<JobReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Started,
    Progress,
    Finished,
    /// Ended early by a stop request; acked.
    Stopped,
    /// Failed; `kind` says whether it will be redelivered.
    Failed,
    /// Handed back to the queue (host shutting down); another replica takes it.
    Requeued,
}

impl JobState {
    /// Whether no further status will follow for this delivery.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Started | Self::Progress)
    }
}

/// How [`connect`] treats a server that does not answer at first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstConnect {
    /// Keep trying (a service waiting for its broker).
    Retry,
    /// Fail at once (a command a person is waiting on).
    FailFast,
}

/// Connects to NATS. Once connected, the client reconnects by itself after a drop.
pub async fn connect(
    config: &NatsConfig,
    first: FirstConnect,
) -> anyhow::Result<async_nats::Client> {
    let mut options = auth_options(config).await?;
    if first == FirstConnect::Retry {
        tracing::info!(
            url = %redact_url(&config.url),
            "Connecting to NATS (retrying until it answers)"
        );
        options = options.retry_on_initial_connect();
    }
    // A service says when it (re)connects; a command a person runs need not.
    let service = first == FirstConnect::Retry;
    options
        .name("framehost")
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting")
                }
                async_nats::Event::Connected if service => tracing::info!("NATS connected"),
                async_nats::Event::Connected => tracing::debug!("NATS connected"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        })
        .connect(server_urls(&config.url))
        .await
        .with_context(|| format!("cannot connect to NATS at {}", redact_url(&config.url)))
}

/// The servers of a `nats.url` that lists several, comma separated (the client reads a
/// single string as one address).
fn server_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// The client options for the configured credentials and TLS. Secrets go to the client
/// and nowhere else.
async fn auth_options(config: &NatsConfig) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("cannot read nats.credentials_file {}", path.display()))?;
    }
    if let Some(seed) = config.nkey_seed()? {
        options = options.nkey(seed.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&config.user, config.password()?) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = config.token()? {
        options = options.token(token.expose().to_owned());
    }
    let tls = &config.tls;
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// Creates the jobs stream, the dead-letter stream and the shared consumer if missing.
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> anyhow::Result<consumer::PullConsumer> {
    let jobs = js
        .get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{}.jobs.>", config.subject_prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create or open the jobs stream {}", config.stream))?;
    js.get_or_create_stream(stream::Config {
        name: config.dead_letter_stream.clone(),
        subjects: vec![format!("{}.>", config.dead_letter_subject())],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(14 * 24 * 3600),
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .with_context(|| {
        format!(
            "cannot create or open the dead-letter stream {}",
            config.dead_letter_stream
        )
    })?;
    let mut consumer: consumer::PullConsumer = jobs
        .get_or_create_consumer(
            &config.consumer,
            consumer::pull::Config {
                durable_name: Some(config.consumer.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(config.ack_wait_secs),
                max_deliver: config.max_deliver,
                filter_subject: format!("{}.jobs.>", config.subject_prefix),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("cannot create or open the consumer {}", config.consumer))?;

    // An existing consumer keeps the settings it was made with: say so when they differ,
    // since in-progress acks are timed from the configured ack_wait.
    if let Ok(info) = consumer.info().await {
        let actual = &info.config;
        if actual.ack_wait != Duration::from_secs(config.ack_wait_secs)
            || actual.max_deliver != config.max_deliver
        {
            tracing::warn!(
                consumer = %config.consumer,
                ack_wait_secs = actual.ack_wait.as_secs(),
                max_deliver = actual.max_deliver,
                configured_ack_wait_secs = config.ack_wait_secs,
                configured_max_deliver = config.max_deliver,
                "The existing consumer was made with other settings, which stay in force; \
                 delete the consumer (it is recreated) to apply the configured ones"
            );
        }
    }
    Ok(consumer)
}

/// Pulls and runs jobs until `shutdown` is cancelled, then lets running jobs finish within
/// `host.shutdown_grace_secs` and hands the rest back to the queue. Tells `readiness` when
/// NATS is connected and the plugins are loaded.
pub async fn serve(
    config: Arc<Config>,
    catalogue: Arc<Catalogue>,
    shutdown: CancellationToken,
    readiness: Arc<Readiness>,
) -> anyhow::Result<()> {
    let client = tokio::select! {
        client = connect(&config.nats, FirstConnect::Retry) => client?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    readiness.nats_connected(&client);
    let js = jetstream::new(client.clone());
    let consumer = tokio::select! {
        consumer = ensure_streams(&js, &config.nats) => consumer?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let host = hostname();
    // Subscribed before the first pull, so that no job given up on while this host runs is
    // missed.
    let given_up = tokio::select! {
        watcher = watch_max_deliveries(client.clone(), js.clone(), config.clone(), catalogue.clone()) => watcher?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    // The catalogue's cluster side: routes pushed with `plugin push`, and this replica's
    // status for `plugin list`. Stopped with the host.
    let catalogue_stop = CancellationToken::new();
    let _stop_catalogue = catalogue_stop.clone().drop_guard();
    let buckets = tokio::select! {
        buckets = catalogue::nats::Buckets::open(&js, &config.catalogue, config.nats.replicas) => buckets?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    if config.catalogue.nats {
        catalogue::nats::spawn_follow(
            catalogue.clone(),
            js.clone(),
            buckets.clone(),
            catalogue_stop.clone(),
        );
    }
    catalogue::nats::spawn_peers(
        catalogue.clone(),
        buckets.replicas.clone(),
        host.clone(),
        catalogue_stop.clone(),
    );
    let status = catalogue::nats::spawn_status(
        catalogue.clone(),
        buckets.replicas.clone(),
        host.clone(),
        catalogue_stop.clone(),
    );
    tokio::select! {
        _ = catalogue.ready() => {}
        _ = shutdown.cancelled() => return Ok(()),
    }
    readiness.routes_loaded();
    let loaded = catalogue.status();
    let refused: Vec<_> = loaded
        .routes
        .iter()
        .filter(|(_, r)| r.refused.is_some())
        .map(|(t, _)| t.as_str())
        .collect();
    if !refused.is_empty() {
        tracing::warn!(job_types = ?refused, "Some plugin versions were refused (see above, or `framehost plugin list`)");
    }
    tracing::info!(
        host = %host,
        stream = %config.nats.stream,
        consumer = %config.nats.consumer,
        max_jobs = config.host.max_jobs,
        job_types = ?catalogue.job_types(),
        compiled = loaded.counts.compiles,
        from_cache = loaded.counts.cache_hits,
        "Serving jobs"
    );

    // In-progress acks follow the consumer's ack wait, whatever the configuration says.
    let ack_wait = consumer
        .cached_info()
        .config
        .ack_wait
        .max(Duration::from_secs(3));
    let slots = Arc::new(Semaphore::new(config.host.max_jobs));
    let stop_jobs = CancellationToken::new();
    let mut running = tokio::task::JoinSet::new();

    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = next_job(&consumer) => message,
        };
        match message {
            Ok(Some(message)) => {
                let runner = Runner {
                    config: config.clone(),
                    catalogue: catalogue.clone(),
                    client: client.clone(),
                    js: js.clone(),
                    host: host.clone(),
                    ack_wait,
                };
                let stop = stop_jobs.child_token();
                running.spawn(async move {
                    runner.run(message, stop).await;
                    drop(slot);
                });
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(error = %error, "Cannot pull jobs; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Reap finished jobs so the set does not grow.
        while running.try_join_next().is_some() {}
    }

    let grace = Duration::from_secs(config.host.shutdown_grace_secs);
    tracing::info!(
        running = running.len(),
        grace_secs = grace.as_secs(),
        "Shutting down: no more jobs pulled"
    );
    if tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            running = running.len(),
            "Grace period over: handing running jobs back"
        );
        stop_jobs.cancel();
        while running.join_next().await.is_some() {}
    }
    given_up.abort();
    catalogue_stop.cancel();
    // The status task removes this replica from the bucket on its way out.
    tokio::time::timeout(Duration::from_secs(2), status)
        .await
        .ok();
    client.flush().await.ok();
    Ok(())
}

/// What JetStream says when a consumer gives up on a message after `max_deliver` tries.
#[derive(Deserialize)]
struct MaxDeliveriesAdvisory {
    stream_seq: u64,
    deliveries: i64,
}

/// Dead-letters the jobs JetStream gave up on without any host settling them: a job whose
/// every delivery ended with its host dying (killed, out of memory) reaches `max_deliver`
/// with no host seeing a last delivery, and would otherwise sit in the work queue for good.
///
/// JetStream announces it with an advisory on a plain subject, which may fire while no host
/// is up; a small work-queue stream (`<nats.stream>_GIVEN_UP`) keeps the advisories until a
/// host takes one through a shared durable consumer. The dead-letter copy is also
/// de-duplicated by a message id made of the stream sequence, and deleting a job twice is
/// harmless.
async fn watch_max_deliveries(
    client: async_nats::Client,
    js: jetstream::Context,
    config: Arc<Config>,
    catalogue: Arc<Catalogue>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let nats = &config.nats;
    let advisories_name = format!("{}_GIVEN_UP", nats.stream);
    let advisories = js
        .get_or_create_stream(stream::Config {
            name: advisories_name.clone(),
            subjects: vec![format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
                nats.stream, nats.consumer
            )],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(14 * 24 * 3600),
            num_replicas: nats.replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create or open the stream {advisories_name}"))?;
    let consumer: consumer::PullConsumer = advisories
        .get_or_create_consumer(
            "framehost-given-up",
            consumer::pull::Config {
                durable_name: Some("framehost-given-up".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .context("cannot create or open the advisories consumer")?;
    let mut advisories = consumer
        .messages()
        .await
        .context("cannot pull JetStream advisories")?;
    let jobs = js
        .get_stream(&nats.stream)
        .await
        .with_context(|| format!("cannot open the jobs stream {}", nats.stream))?;
    let host = hostname();
    Ok(tokio::spawn(async move {
        let nats = &config.nats;
        while let Some(message) = advisories.next().await {
            let Ok(message) = message else {
                // The pull resumes by itself after a reconnect.
                continue;
            };
            let Ok(advisory) = serde_json::from_slice::<MaxDeliveriesAdvisory>(&message.payload)
            else {
                message.ack().await.ok();
                continue;
            };
            let seq = advisory.stream_seq;
            let job = match jobs.get_raw_message(seq).await {
                Ok(job) => job,
                // Already handled, or the job was settled after all.
                Err(_) => {
                    message.ack().await.ok();
                    continue;
                }
            };
            let spec = JobSpec::parse(&job.payload).ok();
            let job_type = spec
                .as_ref()
                .map_or(UNROUTED, |spec| job_type_label(&catalogue, &spec.job_type));
            let job_id = spec.as_ref().map(|spec| spec.id.clone());
            let key = job_id.clone().unwrap_or_else(|| format!("seq-{seq}"));
            let error = format!(
                "no host finished the job in {} deliveries (each host running it died or lost its connection)",
                advisory.deliveries
            );
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("max-deliveries-{seq}").as_str());
            headers.insert(REASON_HEADER, "max_deliveries");
            headers.insert(ERROR_HEADER, error.as_str());
            headers.insert(DELIVERIES_HEADER, advisory.deliveries.to_string().as_str());
            let subject = format!("{}.{key}", nats.dead_letter_subject());
            let kept = match js
                .publish_with_headers(subject, headers, job.payload.clone())
                .await
            {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if !kept {
                tracing::error!(
                    stream_seq = seq,
                    "Cannot dead-letter a job JetStream gave up on; retrying"
                );
                let delay = Duration::from_secs(nats.nak_delay_secs);
                message.ack_with(AckKind::Nak(Some(delay))).await.ok();
                continue;
            }
            jobs.delete_message(seq).await.ok();
            message.ack().await.ok();
            tracing::error!(job_id = %key, deliveries = advisory.deliveries, "Job given up on by JetStream; dead-lettered");
            metrics().job_failed(job_type, "max_deliveries");
            if let Some(job_id) = job_id {
                let status = JobStatus {
                    job_id,
                    state: JobState::Failed,
                    host: host.clone(),
                    delivery: advisory.deliveries,
                    reason: Some("max_deliveries".into()),
                    error: Some(error),
                    kind: Some(FailureKind::Permanent),
                    plugin_digest: None,
                    report: None,
                };
                let body = serde_json::to_vec(&status).expect("status serializes");
                client
                    .publish(nats.status_subject(&status.job_id), body.into())
                    .await
                    .ok();
            }
        }
    }))
}

async fn next_job(consumer: &consumer::PullConsumer) -> anyhow::Result<Option<jetstream::Message>> {
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    match batch.next().await {
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(error)) => Err(anyhow::anyhow!(error)),
        None => Ok(None),
    }
}

/// Runs one delivered job and settles its message.
struct Runner {
    config: Arc<Config>,
    catalogue: Arc<Catalogue>,
    client: async_nats::Client,
    js: jetstream::Context,
    host: String,
    /// The consumer's own ack wait, which may differ from the configured one.
    ack_wait: Duration,
}

impl Runner {
    async fn run(self, message: jetstream::Message, shutdown_stop: CancellationToken) {
        let delivery = message.info().map(|info| info.delivered).unwrap_or(1);
        let spec = match JobSpec::parse(&message.payload) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(subject = %message.subject, error = %error, "Job refused");
                metrics().job_failed(UNROUTED, error.reason);
                self.dead_letter(&message, None, &error, delivery).await;
                return;
            }
        };
        let span = tracing::info_span!("job", job_id = %spec.id, job_type = %spec.job_type, room = %spec.source.room());
        self.run_spec(message, spec, delivery, shutdown_stop)
            .instrument(span)
            .await;
    }

    async fn run_spec(
        &self,
        message: jetstream::Message,
        spec: JobSpec,
        delivery: i64,
        shutdown_stop: CancellationToken,
    ) {
        let nats = &self.config.nats;
        let status = |state| JobStatus {
            job_id: spec.id.clone(),
            state,
            host: self.host.clone(),
            delivery,
            reason: None,
            error: None,
            kind: None,
            plugin_digest: None,
            report: None,
        };

        let Some(route) = self.catalogue.route(&spec.job_type) else {
            let error = if self.catalogue.is_wanted(&spec.job_type) {
                // Routed, but its version is loading or was refused here: another replica
                // (or this one, a moment later) may serve it.
                JobError::transient(
                    "plugin_not_loaded",
                    format!(
                        "job type {:?} is routed but no version of it is loaded on this host \
                         (still loading, or refused: see `framehost plugin list`)",
                        spec.job_type
                    ),
                )
            } else {
                let elsewhere = self
                    .catalogue
                    .served_elsewhere(&spec.job_type, catalogue::nats::REPLICA_TTL);
                if elsewhere.is_empty() {
                    JobError::permanent(
                        "unknown_job_type",
                        format!("no plugin serves job type {:?} on this host", spec.job_type),
                    )
                } else {
                    // The replicas' catalogues differ (a directory or [job_types] on some
                    // of them only): hand the job back for one that has it.
                    JobError::transient(
                        "job_type_elsewhere",
                        format!(
                            "job type {:?} is not routed on this host, but replicas {} serve \
                             it: give every replica the same catalogue (push the plugin, or \
                             mount the same directory everywhere)",
                            spec.job_type,
                            elsewhere.join(", ")
                        ),
                    )
                }
            };
            self.fail(&message, &spec, delivery, error).await;
            return;
        };

        let _running = metrics().job_started(&spec.job_type);

        // Subscribed before `Started` is published, so that a stop request sent as soon as
        // the job is seen to start is not lost.
        let control = self.client.subscribe(nats.control_subject(&spec.id)).await;
        tracing::info!(
            delivery,
            plugin = route.plugin.name(),
            digest = route.plugin.digest(),
            "Job started"
        );
        self.publish_status(&JobStatus {
            plugin_digest: Some(route.plugin.digest().to_owned()),
            ..status(JobState::Started)
        })
        .await;

        // Stop requests: from the control subject, or from the host's shutdown.
        let stop = CancellationToken::new();
        let by_shutdown = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            let by_shutdown = by_shutdown.clone();
            let client = self.client.clone();
            let host = self.host.clone();
            spawn_in_span(async move {
                let mut control = control.ok();
                loop {
                    tokio::select! {
                        _ = shutdown_stop.cancelled() => {
                            by_shutdown.store(true, Ordering::SeqCst);
                            stop.cancel();
                            return;
                        }
                        request = async {
                            match control.as_mut() {
                                Some(sub) => sub.next().await,
                                None => std::future::pending().await,
                            }
                        } => match request {
                            Some(request) if request.payload.trim_ascii() == b"stop" => {
                                tracing::info!("Stop requested");
                                stop.cancel();
                                // `job stop` waits for this answer to know a host has the job.
                                if let Some(reply) = request.reply {
                                    let answer = format!("stopping on {host}");
                                    client.publish(reply, answer.into()).await.ok();
                                }
                                return;
                            }
                            Some(_) => {}
                            None => control = None,
                        },
                    }
                }
            })
        };

        // In-progress acks keep JetStream from redelivering a job that is still running.
        let heartbeat = {
            let acker = message.clone();
            let every = self.ack_wait.div_f64(3.0);
            spawn_in_span(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(error) = acker.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %error, "In-progress ack failed");
                    }
                }
            })
        };

        let (events_tx, mut events_rx) = mpsc::channel(64);
        let publisher = {
            let client = self.client.clone();
            let results_subject = nats.results_subject(&spec.id);
            let status_subject = nats.status_subject(&spec.id);
            let progress = status(JobState::Progress);
            spawn_in_span(async move {
                while let Some(event) = events_rx.recv().await {
                    match event {
                        JobEvent::Result { frame, result } => {
                            let mut headers = HeaderMap::new();
                            headers.insert("Content-Type", result.content_type.as_str());
                            if frame != u64::MAX {
                                headers.insert(FRAME_HEADER, frame.to_string().as_str());
                            }
                            let published = client
                                .publish_with_headers(
                                    results_subject.clone(),
                                    headers,
                                    result.data.into(),
                                )
                                .await;
                            if let Err(error) = published {
                                tracing::warn!(error = %error, "Result not published");
                            }
                        }
                        JobEvent::Progress(report) => {
                            let status = JobStatus {
                                report: Some(*report),
                                ..progress.clone()
                            };
                            let body = serde_json::to_vec(&status).expect("status serializes");
                            client
                                .publish(status_subject.clone(), body.into())
                                .await
                                .ok();
                        }
                    }
                }
            })
        };

        let settings = JobSettings::new(&self.config, &route.limits);
        let outcome = job::run(&spec, &route.plugin, &settings, events_tx, stop.clone()).await;
        publisher.await.ok();
        watcher.abort();
        heartbeat.abort();

        match outcome {
            Ok(report) if report.stopped && by_shutdown.load(Ordering::SeqCst) => {
                metrics().job_requeued(&spec.job_type);
                tracing::info!(
                    frames_processed = report.frames_processed,
                    "Job handed back to the queue"
                );
                settle(&message, AckKind::Nak(None)).await;
                self.publish_status(&JobStatus {
                    report: Some(report),
                    ..status(JobState::Requeued)
                })
                .await;
            }
            Ok(report) => {
                let state = if report.stopped {
                    JobState::Stopped
                } else {
                    JobState::Finished
                };
                tracing::info!(
                    frames_in = report.frames_in,
                    frames_processed = report.frames_processed,
                    frames_dropped = report.frames_dropped,
                    frames_rejected = report.frames_rejected.values().sum::<u64>(),
                    results = report.results,
                    elapsed_secs = report.elapsed_secs,
                    "Job {}",
                    if report.stopped {
                        "stopped"
                    } else {
                        "finished"
                    }
                );
                metrics().job_finished(&spec.job_type);
                // Status first: once acked, a watcher may stop listening.
                self.publish_status(&JobStatus {
                    report: Some(report),
                    ..status(state)
                })
                .await;
                settle(&message, AckKind::Ack).await;
            }
            Err(error) => self.fail(&message, &spec, delivery, error).await,
        }
    }

    /// Settles a failed job: nak a transient failure, dead-letter and terminate the rest.
    async fn fail(
        &self,
        message: &jetstream::Message,
        spec: &JobSpec,
        delivery: i64,
        error: JobError,
    ) {
        metrics().job_failed(
            job_type_label(&self.catalogue, &spec.job_type),
            error.reason,
        );
        let last_delivery = delivery >= self.config.nats.max_deliver;
        let will_retry = error.kind == FailureKind::Transient && !last_delivery;
        tracing::error!(
            reason = error.reason,
            kind = ?error.kind,
            delivery,
            will_retry,
            error = %error.message,
            "Job failed"
        );
        let status = JobStatus {
            job_id: spec.id.clone(),
            state: JobState::Failed,
            host: self.host.clone(),
            delivery,
            reason: Some(error.reason.to_owned()),
            error: Some(error.message.clone()),
            kind: Some(if will_retry {
                FailureKind::Transient
            } else {
                FailureKind::Permanent
            }),
            plugin_digest: None,
            report: error.report.as_deref().cloned(),
        };
        if will_retry {
            let delay = Duration::from_secs(self.config.nats.nak_delay_secs);
            settle(message, AckKind::Nak(Some(delay))).await;
        } else {
            self.dead_letter(message, Some(&spec.id), &error, delivery)
                .await;
        }
        self.publish_status(&status).await;
    }

    /// Keeps the job where an operator can inspect it, then tells JetStream to drop it.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        job_id: Option<&str>,
        error: &JobError,
        delivery: i64,
    ) {
        let nats = &self.config.nats;
        let key = job_id.map(str::to_owned).unwrap_or_else(|| {
            message
                .info()
                .map(|i| format!("seq-{}", i.stream_sequence))
                .unwrap_or_else(|_| "unknown".into())
        });
        let mut headers = HeaderMap::new();
        headers.insert(REASON_HEADER, error.reason);
        headers.insert(ERROR_HEADER, one_line(&error.message).as_str());
        headers.insert(DELIVERIES_HEADER, delivery.to_string().as_str());
        let subject = format!("{}.{key}", nats.dead_letter_subject());
        let kept = match self
            .js
            .publish_with_headers(subject, headers, message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match kept {
            Ok(()) => settle(message, AckKind::Term).await,
            Err(error) => {
                // Without a copy, terminating would lose the job: let it be redelivered.
                tracing::error!(error = %error, "Cannot dead-letter the job; leaving it to be redelivered");
                settle(
                    message,
                    AckKind::Nak(Some(Duration::from_secs(nats.nak_delay_secs))),
                )
                .await;
            }
        }
    }

    async fn publish_status(&self, status: &JobStatus) {
        let subject = self.config.nats.status_subject(&status.job_id);
        let body = serde_json::to_vec(status).expect("status serializes");
        if let Err(error) = self.client.publish(subject, body.into()).await {
            tracing::warn!(error = %error, "Status not published");
        }
        self.client.flush().await.ok();
    }
}

/// The `job_type` label of a job: its type if some source routes it, else [`UNROUTED`].
fn job_type_label<'a>(catalogue: &Catalogue, job_type: &'a str) -> &'a str {
    if catalogue.is_wanted(job_type) {
        job_type
    } else {
        UNROUTED
    }
}

/// Acks, naks or terminates, retrying through a NATS reconnect for up to a minute. An ack or
/// a term waits for JetStream to confirm it, through a consumer leader election too: lost,
/// it would run the job again. A nak is only sent: lost, the job comes back after
/// `ack_wait` instead of `nak_delay_secs`, whereas sent twice (the first applied, its
/// answer lost) it could hand back a later delivery running elsewhere.
async fn settle(message: &jetstream::Message, kind: AckKind) {
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = match kind {
            AckKind::Ack | AckKind::Term => confirmed(message, clone_kind(&kind)).await,
            ref other => message.ack_with(clone_kind(other)).await,
        };
        match attempt {
            Ok(()) => return,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %error, "Ack failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                tracing::error!(error = %error, "Ack failed; the job will be redelivered");
                return;
            }
        }
    }
}

/// Sends `kind` for `message` and waits for JetStream to confirm it (the server answers an
/// ack or term that asks for a reply).
///
/// Not the client's `double_ack`: it takes any answer for a confirmation, including the
/// server's "no responders" while a clustered consumer is between leaders (its ack subject
/// then has no subscriber), and the ack is lost: the job would run again after `ack_wait`.
/// A request fails on "no responders", and `settle` tries again.
async fn confirmed(message: &jetstream::Message, kind: AckKind) -> Result<(), async_nats::Error> {
    let reply = message
        .reply
        .clone()
        .ok_or("not a JetStream message: no reply subject")?;
    message.context.client().request(reply, kind.into()).await?;
    Ok(())
}

fn clone_kind(kind: &AckKind) -> AckKind {
    match kind {
        AckKind::Ack => AckKind::Ack,
        AckKind::Nak(delay) => AckKind::Nak(*delay),
        AckKind::Progress => AckKind::Progress,
        AckKind::Next => AckKind::Next,
        AckKind::Term => AckKind::Term,
    }
}

/// Spawns a task of the current job, in its span: its log lines carry the job's id.
fn spawn_in_span<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task.in_current_span())
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "framehost".into())
}

/// Publishes a job and, with `wait`, follows its status until a final state, calling
/// `on_status` for each status message. Returns the last status seen.
pub async fn submit(
    config: &NatsConfig,
    spec: &JobSpec,
    wait: Option<Duration>,
    mut on_status: impl FnMut(&JobStatus),
) -> anyhow::Result<Option<JobStatus>> {
    let client = connect(config, FirstConnect::FailFast).await?;
    let js = jetstream::new(client.clone());
    ensure_streams(&js, config).await?;

    // Subscribe before publishing so that no status is missed.
    let mut statuses = match wait {
        Some(_) => Some(client.subscribe(config.status_subject(&spec.id)).await?),
        None => None,
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", spec.id.as_str());
    let body = serde_json::to_vec(spec)?;
    let stored = js
        .publish_with_headers(config.jobs_subject(&spec.job_type), headers, body.into())
        .await
        .context("cannot publish the job")?
        .await
        .context("JetStream did not store the job")?;
    if stored.duplicate {
        anyhow::bail!(
            "a job with id {} was already submitted in the last 2 minutes; JetStream dropped \
             this one as a duplicate (give it another --id)",
            spec.id
        );
    }

    let (Some(wait), Some(statuses)) = (wait, statuses.as_mut()) else {
        return Ok(None);
    };
    let mut last = None;
    let outcome = tokio::time::timeout(wait, async {
        while let Some(message) = statuses.next().await {
            let Ok(status) = serde_json::from_slice::<JobStatus>(&message.payload) else {
                continue;
            };
            on_status(&status);
            let done = status.state.is_final()
                && !(status.state == JobState::Failed
                    && status.kind == Some(FailureKind::Transient))
                && status.state != JobState::Requeued;
            last = Some(status);
            if done {
                break;
            }
        }
    })
    .await;
    if outcome.is_err() {
        anyhow::bail!("job {} did not end within {:?}", spec.id, wait);
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_names_each_server() {
        assert_eq!(
            server_urls("nats://127.0.0.1:4001, nats://127.0.0.1:4002,nats://127.0.0.1:4003"),
            [
                "nats://127.0.0.1:4001",
                "nats://127.0.0.1:4002",
                "nats://127.0.0.1:4003"
            ]
        );
        assert_eq!(
            server_urls("nats://127.0.0.1:4222"),
            ["nats://127.0.0.1:4222"]
        );
    }
}
