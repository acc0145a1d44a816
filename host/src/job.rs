//! A job, end to end: source → data streams → assembly → decode → queue → plugin.
//!
//! Two tasks run a job. The *path* task, on a blocking thread, reads the source and runs the
//! sans-IO stages ([`Path`]): each packet goes through data-stream reassembly, completed
//! streams through part assembly, and whole messages into the bounded [`FrameQueue`]. The
//! *plugin* task takes messages from the queue, decodes them into frames, calls the job's
//! plugin instance and forwards what it emits.
//!
//! Decode runs on the plugin's side of the queue, not the path's: the two tasks then split
//! the work about evenly between two cores, and a message evicted from a full queue (the
//! plugin is behind) is never decoded at all. Every rejection on the way is counted by reason in the
//! job's [`JobCounters`]; none of them stops the job. A plugin trap follows the job type's
//! [`TrapPolicy`].
//!
//! The plugin instance (its `Store` and all its memory) is created when the job starts and
//! dropped when [`run`] returns, whatever the outcome.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_protocol::DataPacket;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::assembly::{Assembler, AssemblyEvent, AssemblyLimits};
use crate::capture::CaptureReader;
use crate::config::{Config, Limits, LiveKitConfig, TrapPolicy};
use crate::decode::{self, DecodeError, DecodeLimits, Frame};
use crate::livekit::{self, LiveKitReport, LiveKitSource, LiveKitStats, PacketQueue, SessionError};
use crate::metrics::{self, GaugeShare};
use crate::queue::FrameQueue;
use crate::sandbox::{CallError, JobInfo, Plugin, PluginLimits, PluginResult, Processor};
use crate::source::{self, Pacing, PacketSink, SourceSpec};
use crate::streams::{DataStreams, StreamEvent, StreamLimits};
use crate::telemetry::{self, JobCounters};

/// A job as submitted: `{"id": "...", "type": "...", "source": {...}, "config": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique id: 1 to 128 characters from `A-Z a-z 0-9 - _` (it is part of NATS subjects).
    pub id: String,
    /// The job type, which selects the plugin and its limits.
    #[serde(rename = "type")]
    pub job_type: String,
    pub source: SourceSpec,
    /// Handed to the plugin as JSON text. Must be an object; defaults to `{}`.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl JobSpec {
    /// Parses and validates a job.
    pub fn parse(bytes: &[u8]) -> Result<Self, JobError> {
        let spec: Self = serde_json::from_slice(bytes).map_err(|e| {
            JobError::permanent("bad_job", format!("job is not a valid JobSpec: {e}"))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Job ids are NATS subject tokens: 1 to 128 characters of `A-Z a-z 0-9 - _`.
    pub fn validate_id(id: &str) -> Result<(), JobError> {
        if crate::config::is_name(id, 128) {
            return Ok(());
        }
        Err(JobError::permanent(
            "bad_job",
            format!("job id {id:?} must be 1-128 characters of A-Z a-z 0-9 - _"),
        ))
    }

    pub fn validate(&self) -> Result<(), JobError> {
        Self::validate_id(&self.id)?;
        if let SourceSpec::LiveKit(room) = &self.source {
            room.validate()
                .map_err(|message| JobError::permanent("bad_job", message))?;
        }
        if !self.config.is_object() {
            return Err(JobError::permanent(
                "bad_job",
                "job config must be a JSON object",
            ));
        }
        Ok(())
    }
}

/// Everything a job needs besides its spec and plugin.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub streams: StreamLimits,
    pub assembly: AssemblyLimits,
    pub decode: DecodeLimits,
    /// Decoded frames waiting for the plugin; past it the oldest is dropped.
    pub queue_depth: usize,
    pub plugin: PluginLimits,
    pub on_trap: TrapPolicy,
    pub max_restarts: u32,
    /// Time between [`JobEvent::Progress`] events.
    pub progress_interval: Duration,
    /// How jobs whose source is a LiveKit room join it.
    pub livekit: LiveKitConfig,
}

impl JobSettings {
    /// The settings of a job that runs under `limits`.
    pub fn new(config: &Config, limits: &Limits) -> Self {
        Self {
            streams: config.streams.limits(),
            assembly: config.assembly.limits(),
            decode: config.decode.limits(),
            queue_depth: limits.queue_depth.unwrap_or(config.host.queue_depth),
            plugin: limits.plugin_limits(),
            on_trap: limits.on_trap,
            max_restarts: limits.max_restarts,
            progress_interval: Duration::from_secs(config.host.progress_interval_secs.max(1)),
            livekit: config.livekit.clone(),
        }
    }
}

/// What a running job reports as it goes.
#[derive(Debug)]
pub enum JobEvent {
    Progress(Box<JobReport>),
    Result { frame: u64, result: PluginResult },
}

/// Counters and outcome of a job; the `--json` line of `replay` and the body of the final
/// status message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobReport {
    pub job_id: String,
    pub job_type: String,
    pub plugin: String,
    pub plugin_digest: String,
    pub packets_in: u64,
    pub streams_completed: u64,
    /// Whole messages that came out of assembly: candidate frames.
    pub frames_in: u64,
    /// Frames the plugin processed without error.
    pub frames_processed: u64,
    /// Frames evicted from the full queue, or discarded when the job stopped early.
    pub frames_dropped: u64,
    /// Rejections at every stage, by reason: streams and parts lost on the way, messages
    /// that failed to decode, frames the plugin refused.
    pub frames_rejected: BTreeMap<String, u64>,
    /// Packets the data-stream stage passed over, by kind: `other_topic` (stream headers on
    /// another topic), `not_stream`, `byte_stream`, `unknown_stream`, `duplicate_chunk`,
    /// `duplicate_header`.
    pub packets_ignored: BTreeMap<String, u64>,
    pub results: u64,
    pub results_dropped: u64,
    pub plugin_restarts: u32,
    pub image_bytes: u64,
    pub elapsed_secs: f64,
    pub frames_per_sec: f64,
    pub decoded_mib_per_sec: f64,
    pub plugin_memory_peak_bytes: u64,
    pub peak_rss_bytes: u64,
    /// True when the job was stopped before its source ended.
    pub stopped: bool,
    /// What ended the job: `end_of_capture`, `stopped`, `source_left`, `server_leave`,
    /// `room_moved`, `idle_timeout`, `max_duration`; absent while it runs or when it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ended_by: String,
    /// The LiveKit session's counters, for jobs in a room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub livekit: Option<LiveKitReport>,
    /// The plugin's own summary (from `finish`).
    pub summary: serde_json::Value,
}

/// Permanent failures are not retried; transient ones are redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    Permanent,
    Transient,
}

#[derive(Debug, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct JobError {
    pub kind: FailureKind,
    /// Short label: `plugin_panic`, `bad_capture`, `unknown_job_type`, ...
    pub reason: &'static str,
    pub message: String,
    /// What the job had done before it failed.
    pub report: Option<Box<JobReport>>,
}

impl JobError {
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Permanent,
            reason,
            message: message.into(),
            report: None,
        }
    }

    pub fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Transient,
            reason,
            message: message.into(),
            report: None,
        }
    }

    fn with_report(mut self, report: JobReport) -> Self {
        self.report = Some(Box::new(report));
        self
    }
}

/// How long a job's end waits for its source to notice the stop.
const PATH_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Runs a job to its end: the source is exhausted, `stop` is cancelled, or the job fails.
///
/// Events (progress, results) go to `events`; a slow receiver slows the plugin, it does not
/// grow a buffer.
pub async fn run(
    spec: &JobSpec,
    plugin: &Plugin,
    settings: &JobSettings,
    events: mpsc::Sender<JobEvent>,
    stop: CancellationToken,
) -> Result<JobReport, JobError> {
    let started = Instant::now();
    let counters = Arc::new(JobCounters::new(metrics::metrics().job(&spec.job_type)));
    let queue = Arc::new(FrameQueue::<Assembled>::new(settings.queue_depth));
    let info = JobInfo {
        job_id: spec.id.clone(),
        job_type: spec.job_type.clone(),
        room: spec.source.room(),
        config_json: spec.config.to_string(),
    };
    let mut report = JobReport {
        job_id: spec.id.clone(),
        job_type: spec.job_type.clone(),
        plugin: plugin.name().to_owned(),
        plugin_digest: plugin.digest().to_owned(),
        ..Default::default()
    };

    let processor = plugin
        .instantiate(&info, settings.plugin)
        .await
        .map_err(|error| {
            // A full pool or a refused instance may clear up on another host or later; an
            // `init` that fails or traps will fail again.
            let (kind, reason) = match error {
                CallError::Instantiate(_) => (FailureKind::Transient, error.reason()),
                _ => (FailureKind::Permanent, "plugin_init"),
            };
            JobError {
                kind,
                reason,
                message: error.to_string(),
                report: None,
            }
        })?;

    let livekit_stats =
        matches!(spec.source, SourceSpec::LiveKit(_)).then(|| Arc::new(LiveKitStats::default()));

    // The path stops when the plugin side fails or the job is stopped.
    let path_stop = stop.child_token();
    let path_task = {
        let path = Path::new(spec.id.clone(), settings, counters.clone(), started);
        let source = spec.source.clone();
        let queue = queue.clone();
        let path_stop = path_stop.clone();
        let runtime = tokio::runtime::Handle::current();
        // The job's span (its id and type) follows the path onto its thread.
        let span = tracing::Span::current();
        let livekit = livekit_stats
            .clone()
            .map(|stats| (settings.livekit.clone(), stats));
        tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            let outcome = feed(&source, path, &queue, &path_stop, &runtime, livekit);
            queue.close();
            outcome
        })
    };

    let mut plugin_side = PluginSide {
        job_id: &spec.id,
        plugin,
        info: &info,
        settings,
        counters: &counters,
        events: &events,
        processor,
        restarts: 0,
        livekit: livekit_stats.as_deref(),
    };
    let outcome = plugin_side.run(&queue, &stop, started, &report).await;

    // Whatever happened, the path is told to stop and is waited for: no task outlives the job.
    path_stop.cancel();
    let discarded = queue.close_and_clear() as u64;
    counters.drop_frames(discarded);
    // A source blocked in a read cannot see the stop: the job ends without it rather than
    // holding its slot. The thread exits when the read returns; the queue it would fill is
    // closed and its buffers stay bounded.
    let path_outcome = match tokio::time::timeout(PATH_EXIT_WAIT, path_task).await {
        Ok(joined) => joined.unwrap_or_else(|e| {
            Err(JobError::permanent(
                "internal",
                format!("path task failed: {e}"),
            ))
        }),
        Err(_) => {
            tracing::error!(job_id = %spec.id, "The job's source did not stop within {PATH_EXIT_WAIT:?}; ending the job without it");
            Ok("stopped")
        }
    };
    let path_outcome = path_outcome.map(|ended_by| {
        report.ended_by = ended_by.to_owned();
    });
    report.livekit = livekit_stats.as_deref().map(LiveKitStats::report);

    let finished = match outcome.and(path_outcome) {
        Ok(()) => {
            let summary = plugin_side.processor.finish().await;
            forward_results(&mut plugin_side.processor, u64::MAX, &counters, &events).await;
            Ok(summary)
        }
        Err(error) => Err(error),
    };

    report.stopped = stop.is_cancelled();
    if report.stopped {
        report.ended_by = "stopped".into();
    }
    let processor = &plugin_side.processor;
    fill_report(
        &mut report,
        &counters,
        started,
        plugin_side.restarts,
        processor.memory_peak(),
        processor.results_dropped(),
    );
    counters
        .metrics
        .plugin_memory_peak
        .observe(report.plugin_memory_peak_bytes as f64);
    match finished {
        Ok(Ok(text)) => {
            report.summary = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            Ok(report)
        }
        Ok(Err(error)) => {
            Err(JobError::permanent(error.reason(), format!("finish: {error}")).with_report(report))
        }
        Err(error) => Err(error.with_report(report)),
    }
}

fn fill_report(
    report: &mut JobReport,
    counters: &JobCounters,
    started: Instant,
    restarts: u32,
    memory_peak: u64,
    results_dropped: u64,
) {
    let get = JobCounters::get;
    report.packets_in = get(&counters.packets_in);
    report.streams_completed = get(&counters.streams_completed);
    report.frames_in = get(&counters.frames_in);
    report.frames_processed = get(&counters.frames_processed);
    report.frames_dropped = get(&counters.frames_dropped);
    report.frames_rejected = counters.rejected();
    report.packets_ignored = counters.ignored();
    report.results = get(&counters.results);
    report.results_dropped = results_dropped;
    report.plugin_restarts = restarts;
    report.image_bytes = get(&counters.image_bytes);
    report.plugin_memory_peak_bytes = report.plugin_memory_peak_bytes.max(memory_peak);
    report.peak_rss_bytes = telemetry::peak_rss_bytes().unwrap_or(0);
    let elapsed = started.elapsed().as_secs_f64();
    report.elapsed_secs = elapsed;
    if elapsed > 0.0 {
        report.frames_per_sec = report.frames_processed as f64 / elapsed;
        report.decoded_mib_per_sec = report.image_bytes as f64 / elapsed / (1 << 20) as f64;
    }
}

/// The plugin task's state.
struct PluginSide<'a> {
    job_id: &'a str,
    plugin: &'a Plugin,
    info: &'a JobInfo,
    settings: &'a JobSettings,
    counters: &'a JobCounters,
    events: &'a mpsc::Sender<JobEvent>,
    processor: Processor,
    restarts: u32,
    /// A room job's session counters, for progress reports.
    livekit: Option<&'a LiveKitStats>,
}

impl PluginSide<'_> {
    /// Feeds frames to the plugin until the queue ends or the job is stopped, or returns the
    /// failure that ended the job.
    async fn run(
        &mut self,
        queue: &FrameQueue<Assembled>,
        stop: &CancellationToken,
        started: Instant,
        template: &JobReport,
    ) -> Result<(), JobError> {
        let mut progress = tokio::time::interval(self.settings.progress_interval);
        progress.tick().await;
        loop {
            let message = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = progress.tick() => {
                    let mut report = template.clone();
                    fill_report(&mut report, self.counters, started, self.restarts,
                        self.processor.memory_peak(), self.processor.results_dropped());
                    report.livekit = self.livekit.map(LiveKitStats::report);
                    // Progress is advisory: a full channel skips one rather than waiting.
                    let _ = self.events.try_send(JobEvent::Progress(Box::new(report)));
                    continue;
                }
                message = queue.pop() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            let index = message.index;
            let decoding = Instant::now();
            let decoded = message.decode(&self.settings.decode);
            metrics::observe(&self.counters.metrics.decode_seconds, decoding.elapsed());
            let frame = match decoded {
                Ok(frame) => frame,
                Err(error) => {
                    let detail = format!(
                        "message {:?} from {:?}: {error}",
                        message.message_id, message.sender
                    );
                    self.counters.reject(self.job_id, error.reason(), &detail);
                    continue;
                }
            };
            JobCounters::add(&self.counters.image_bytes, frame.image_bytes() as u64);
            let calling = Instant::now();
            let processed = self.processor.process(frame).await;
            metrics::observe(
                &self.counters.metrics.plugin_call_seconds,
                calling.elapsed(),
            );
            match processed {
                Ok(()) => self.counters.frame_processed(),
                Err(CallError::Returned(message)) => {
                    self.counters.reject(self.job_id, "plugin_error", &message);
                }
                Err(trap) => self.recover(index, trap).await?,
            }
            forward_results(&mut self.processor, index, self.counters, self.events).await;
        }
        Ok(())
    }

    /// Applies the trap policy: restart the plugin (the frame is lost) or fail the job.
    async fn recover(&mut self, index: u64, trap: CallError) -> Result<(), JobError> {
        let reason = trap.reason();
        let may_restart = self.settings.on_trap == TrapPolicy::Restart
            && self.restarts < self.settings.max_restarts;
        if !may_restart {
            tracing::error!(job_id = self.job_id, frame = index, reason, error = %trap, "Plugin failed; failing the job");
            self.counters.reject(self.job_id, reason, &trap);
            return Err(JobError::permanent(
                reason,
                format!("frame {index}: {trap}"),
            ));
        }
        self.restarts += 1;
        self.counters.reject(self.job_id, reason, &trap);
        tracing::warn!(job_id = self.job_id, frame = index, reason, restarts = self.restarts, error = %trap, "Plugin trapped; restarting it");
        // The old instance is dropped (and its memory freed) as the new one replaces it.
        self.processor = self
            .plugin
            .instantiate(self.info, self.settings.plugin)
            .await
            .map_err(|e| JobError::permanent("plugin_init", format!("restart after trap: {e}")))?;
        Ok(())
    }
}

/// Sends what the plugin emitted during the last call.
async fn forward_results(
    processor: &mut Processor,
    frame: u64,
    counters: &JobCounters,
    events: &mpsc::Sender<JobEvent>,
) {
    for result in processor.take_results() {
        JobCounters::add(&counters.results, 1);
        if events
            .send(JobEvent::Result { frame, result })
            .await
            .is_err()
        {
            // Nobody is listening (the caller only wants the report): keep counting.
        }
    }
}

/// Runs the source into the path until it ends or `stop` is cancelled. Returns what ended
/// it (see [`JobReport::ended_by`]).
fn feed(
    source: &SourceSpec,
    mut path: Path,
    queue: &FrameQueue<Assembled>,
    stop: &CancellationToken,
    runtime: &tokio::runtime::Handle,
    livekit: Option<(LiveKitConfig, Arc<LiveKitStats>)>,
) -> Result<&'static str, JobError> {
    match source {
        SourceSpec::LiveKit(room) => {
            let (config, stats) = livekit.expect("LiveKit jobs get LiveKit settings");
            feed_room(room, &config, stats, path, queue, stop, runtime)
        }
        SourceSpec::Capture {
            path: file,
            realtime,
        } => {
            let mut reader = CaptureReader::open(file).map_err(|e| {
                JobError::permanent("bad_capture", format!("{}: {e}", file.display()))
            })?;
            let pacing = if *realtime {
                Pacing::Realtime
            } else {
                Pacing::AsFastAsPossible
            };
            let mut sink = QueueSink {
                path: &mut path,
                queue,
                stop,
                runtime,
                lossless: !*realtime,
            };
            let end =
                source::read_capture(&mut reader, Instant::now(), pacing, &mut sink).map_err(|e| {
                    JobError::permanent("bad_capture", format!("{}: {e}", file.display()))
                });
            // What is still open when the capture ends will never complete.
            if let Ok(end) = &end {
                let mut messages = Vec::new();
                path.finish(*end, &mut messages);
                sink_messages(&path, messages, queue, runtime, !*realtime, stop);
            }
            path.record_ignored();
            end.map(|_| {
                if stop.is_cancelled() {
                    "stopped"
                } else {
                    "end_of_capture"
                }
            })
        }
    }
}

/// How often a live job checks its clocks (stream and message timeouts, idle, maximum
/// duration) when no packet arrives.
const LIVE_TICK: Duration = Duration::from_millis(250);

/// Packets already waiting that a live job takes after the one it waited for.
const LIVE_BATCH: usize = 256;

/// Runs a LiveKit session into the path until the session ends, the job is stopped, no
/// frame came for the idle timeout or the job reached its maximum duration.
fn feed_room(
    room: &LiveKitSource,
    config: &LiveKitConfig,
    stats: Arc<LiveKitStats>,
    mut path: Path,
    queue: &FrameQueue<Assembled>,
    stop: &CancellationToken,
    runtime: &tokio::runtime::Handle,
) -> Result<&'static str, JobError> {
    // The job itself was checked when it was parsed: what is missing here is the host's
    // configuration, which another host may have right.
    let job = config
        .job(&path.job_id, room)
        .map_err(|message| JobError::transient("livekit_not_configured", message))?;
    let minted = matches!(job.session.credentials, livekit::Credentials::Mint { .. });
    let (packets, mut arrivals) = PacketQueue::new(job.packet_queue_len, job.packet_queue_bytes);
    let session_stop = stop.child_token();
    let session = {
        let counters = path.counters.clone();
        let session_stop = session_stop.clone();
        let session_config = job.session.clone();
        let session = async move {
            livekit::session::run(&session_config, &packets, &stats, &counters, &session_stop).await
        };
        runtime.spawn(tracing::Instrument::in_current_span(session))
    };

    let started = Instant::now();
    let mut last_frame = started;
    let mut frames_seen = JobCounters::get(&path.counters.frames_in);
    let mut ended_by = None;
    let mut messages = Vec::new();
    let mut tick_at = tokio::time::Instant::now() + LIVE_TICK;
    loop {
        let next = runtime.block_on(async {
            tokio::select! {
                arrived = arrivals.recv() => Some(arrived),
                _ = tokio::time::sleep_until(tick_at) => None,
                _ = stop.cancelled() => None,
            }
        });
        let now = Instant::now();
        match next {
            Some(Some(arrived)) => {
                path.packet(arrived.packet, arrived.at, &mut messages);
                // Packets come in bursts (a frame is dozens): take what is waiting without
                // a wake-up each.
                for _ in 0..LIVE_BATCH {
                    let Ok(arrived) = arrivals.try_recv() else {
                        break;
                    };
                    path.packet(arrived.packet, arrived.at, &mut messages);
                }
            }
            // The session has ended and every packet it sent was taken.
            Some(None) => break,
            None => {
                path.tick(now, &mut messages);
                tick_at = tokio::time::Instant::now() + LIVE_TICK;
            }
        }
        sink_messages(
            &path,
            std::mem::take(&mut messages),
            queue,
            runtime,
            false,
            stop,
        );

        let frames = JobCounters::get(&path.counters.frames_in);
        if frames != frames_seen {
            frames_seen = frames;
            last_frame = now;
        }
        if stop.is_cancelled() {
            ended_by = Some("stopped");
        } else if now.duration_since(started) >= job.max_duration {
            tracing::info!(job_id = %path.job_id, max_duration = ?job.max_duration, "The job reached its maximum duration");
            ended_by = Some("max_duration");
        } else if now.duration_since(last_frame) >= job.idle_timeout {
            tracing::info!(job_id = %path.job_id, idle_timeout = ?job.idle_timeout, "No frame within the idle timeout; ending the job");
            ended_by = Some("idle_timeout");
        }
        if ended_by.is_some() {
            session_stop.cancel();
            break;
        }
    }

    // The session leaves the room; what it delivered before that still counts. Its sends
    // are bounded, but a session that still does not end is dropped rather than waited on.
    let outcome = runtime.block_on(async {
        let abort = session.abort_handle();
        match tokio::time::timeout(livekit::SESSION_EXIT_WAIT, session).await {
            Ok(joined) => Some(joined),
            Err(_) => {
                abort.abort();
                None
            }
        }
    });
    let Some(outcome) = outcome else {
        tracing::error!(job_id = %path.job_id, "The LiveKit session did not end within {:?}; dropped it", livekit::SESSION_EXIT_WAIT);
        let mut messages = Vec::new();
        path.finish(Instant::now(), &mut messages);
        sink_messages(&path, messages, queue, runtime, false, stop);
        path.record_ignored();
        return Ok(ended_by.unwrap_or("stopped"));
    };
    while let Ok(arrived) = arrivals.try_recv() {
        path.packet(arrived.packet, arrived.at, &mut messages);
    }
    let end = Instant::now();
    path.finish(end, &mut messages);
    sink_messages(&path, messages, queue, runtime, false, stop);
    path.record_ignored();

    let end = match outcome {
        Ok(Ok(end)) => end,
        Ok(Err(error)) => return Err(session_error(error, minted)),
        Err(error) => {
            return Err(JobError::permanent(
                "internal",
                format!("LiveKit session task failed: {error}"),
            ));
        }
    };
    tracing::info!(job_id = %path.job_id, ended_by = ended_by.unwrap_or(end.label()), detail = %end, "Left the room");
    Ok(ended_by.unwrap_or(end.label()))
}

/// A refused token the host minted is the host's configuration (another host may have the
/// right secret): transient. A refused token the job brought is the job's: permanent.
fn session_error(error: SessionError, minted: bool) -> JobError {
    match error {
        SessionError::TokenRefused(_) if minted => JobError::transient(
            "livekit_token_refused",
            format!(
                "{error} (the token was minted by this host: check livekit.api_key and api_secret)"
            ),
        ),
        SessionError::TokenRefused(_) => JobError::permanent(
            "livekit_token_refused",
            format!("{error} (the job's own token)"),
        ),
        SessionError::Invalid(_) => JobError::permanent("bad_job", error.to_string()),
        SessionError::Unreachable { .. } => {
            JobError::transient("livekit_unreachable", error.to_string())
        }
    }
}

/// Pushes packets through the path and its frames into the queue.
struct QueueSink<'a> {
    path: &'a mut Path,
    queue: &'a FrameQueue<Assembled>,
    stop: &'a CancellationToken,
    runtime: &'a tokio::runtime::Handle,
    /// Wait for room in the queue (a file) instead of dropping the oldest frame (live).
    lossless: bool,
}

impl PacketSink for QueueSink<'_> {
    fn stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    fn packet(&mut self, packet: DataPacket, now: Instant) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        let mut messages = Vec::new();
        self.path.packet(packet, now, &mut messages);
        sink_messages(
            self.path,
            messages,
            self.queue,
            self.runtime,
            self.lossless,
            self.stop,
        );
        true
    }
}

fn sink_messages(
    path: &Path,
    messages: Vec<Assembled>,
    queue: &FrameQueue<Assembled>,
    runtime: &tokio::runtime::Handle,
    lossless: bool,
    stop: &CancellationToken,
) {
    let mut messages = messages.into_iter();
    while let Some(message) = messages.next() {
        if lossless {
            let pushed = runtime.block_on(async {
                tokio::select! {
                    pushed = queue.push_wait(message) => pushed.is_ok(),
                    _ = stop.cancelled() => false,
                }
            });
            if !pushed {
                // The job is ending: this message and the rest never reach the plugin.
                let lost = 1 + messages.len() as u64;
                path.counters.drop_frames(lost);
                return;
            }
        } else if queue.push(message).is_some() {
            path.counters.drop_frames(1);
            path.counters.warn(
                &path.job_id,
                "queue_full",
                &"Frame dropped: the plugin is behind and the queue is full (oldest dropped)",
            );
        }
    }
}

/// A whole message out of assembly, numbered, waiting to be decoded into a frame.
#[derive(Debug)]
pub struct Assembled {
    /// The frame's index: messages are numbered as they complete, so a message dropped
    /// later (queue full, bad JSON) leaves a gap the plugin can see.
    pub index: u64,
    pub message_id: String,
    pub sender: String,
    /// Milliseconds from the job's start to the message's first part.
    pub received_ms: u64,
    pub text: String,
}

impl Assembled {
    pub fn decode(&self, limits: &DecodeLimits) -> Result<Frame, DecodeError> {
        decode::decode(&self.text, self.index, self.received_ms, limits)
    }
}

/// The sans-IO part of the frame path: packets in, whole messages out.
pub struct Path {
    job_id: String,
    streams: DataStreams,
    assembler: Assembler,
    counters: Arc<JobCounters>,
    started: Instant,
    next_index: u64,
    stream_events: Vec<StreamEvent>,
    assembly_events: Vec<AssemblyEvent>,
    /// This job's part of `framehost_stage_bytes_held`.
    stream_bytes: GaugeShare,
    assembly_bytes: GaugeShare,
}

impl Path {
    pub fn new(
        job_id: String,
        settings: &JobSettings,
        counters: Arc<JobCounters>,
        started: Instant,
    ) -> Self {
        let stream_bytes = GaugeShare::new(counters.metrics.stream_bytes_held.clone());
        let assembly_bytes = GaugeShare::new(counters.metrics.assembly_bytes_held.clone());
        Self {
            job_id,
            streams: DataStreams::new(settings.streams.clone()),
            assembler: Assembler::new(settings.assembly.clone()),
            counters,
            stream_bytes,
            assembly_bytes,
            started,
            next_index: 0,
            stream_events: Vec::new(),
            assembly_events: Vec::new(),
        }
    }

    /// Runs one packet through the stages; messages it completes are appended to `out`.
    pub fn packet(&mut self, packet: DataPacket, now: Instant, out: &mut Vec<Assembled>) {
        JobCounters::add(&self.counters.packets_in, 1);
        if self.streams.next_deadline().is_some_and(|d| d <= now) {
            self.streams.expire(now, &mut self.stream_events);
        }
        if self.assembler.next_deadline().is_some_and(|d| d <= now) {
            self.assembler.expire(now, &mut self.assembly_events);
        }
        self.streams.push(packet, now, &mut self.stream_events);
        self.drain(now, out);
    }

    /// Expires streams and messages whose time is up, with no packet to prompt it: a live
    /// source can fall silent.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Assembled>) {
        if self.streams.next_deadline().is_some_and(|d| d <= now) {
            self.streams.expire(now, &mut self.stream_events);
        }
        if self.assembler.next_deadline().is_some_and(|d| d <= now) {
            self.assembler.expire(now, &mut self.assembly_events);
        }
        self.drain(now, out);
    }

    /// Copies what the data-stream stage passed over into the job's counters, and says so
    /// when nothing at all was on the job's topic: a sender on another topic looks like an
    /// empty stream otherwise.
    pub fn record_ignored(&self) {
        let ignored = self.streams.ignored();
        let counters = &self.counters;
        counters.set_ignored("not_stream", ignored.not_stream);
        counters.set_ignored("other_topic", ignored.other_topic);
        counters.set_ignored("byte_stream", ignored.byte_stream);
        counters.set_ignored("unknown_stream", ignored.unknown_stream);
        counters.set_ignored("duplicate_chunk", ignored.duplicate_chunk);
        counters.set_ignored("duplicate_header", ignored.duplicate_header);
        if ignored.other_topic > 0 && JobCounters::get(&counters.streams_completed) == 0 {
            tracing::warn!(
                job_id = %self.job_id,
                topic = %self.streams.limits().topic,
                streams_on_other_topics = ignored.other_topic,
                "No stream arrived on the job's topic; streams on other topics were ignored"
            );
        }
    }

    /// Expires everything still open: the source has ended.
    pub fn finish(&mut self, now: Instant, out: &mut Vec<Assembled>) {
        let forever = now + Duration::from_secs(365 * 24 * 3600);
        self.streams.expire(forever, &mut self.stream_events);
        self.drain(now, out);
        self.assembler.expire(forever, &mut self.assembly_events);
        self.drain(now, out);
    }

    fn drain(&mut self, now: Instant, out: &mut Vec<Assembled>) {
        for event in self.stream_events.drain(..) {
            match event {
                StreamEvent::Text(stream) => {
                    JobCounters::add(&self.counters.streams_completed, 1);
                    self.assembler.push(stream, now, &mut self.assembly_events);
                }
                StreamEvent::Rejected(rejected) => {
                    let detail = format!(
                        "stream {:?} from {:?}: {}",
                        rejected.stream_id, rejected.sender, rejected.reason
                    );
                    self.counters
                        .reject(&self.job_id, rejected.reason.reason(), &detail);
                }
            }
        }
        for event in self.assembly_events.drain(..) {
            match event {
                AssemblyEvent::Message(message) => {
                    self.counters.frame_received();
                    metrics::observe(
                        &self.counters.metrics.assembly_seconds,
                        now.saturating_duration_since(message.first_part_at),
                    );
                    let received_ms = message
                        .first_part_at
                        .saturating_duration_since(self.started)
                        .as_millis();
                    out.push(Assembled {
                        index: self.next_index,
                        message_id: message.message_id,
                        sender: message.sender,
                        received_ms: u64::try_from(received_ms).unwrap_or(u64::MAX),
                        text: message.text,
                    });
                    self.next_index += 1;
                }
                AssemblyEvent::Rejected(rejected) => {
                    let detail = format!(
                        "message {:?} from {:?}: {}",
                        rejected.message_id, rejected.sender, rejected.reason
                    );
                    self.counters
                        .reject(&self.job_id, rejected.reason.reason(), &detail);
                }
            }
        }
        self.stream_bytes.set(self.streams.bytes_held() as u64);
        self.assembly_bytes.set(self.assembler.bytes_held() as u64);
    }
}
