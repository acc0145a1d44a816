//! Metrics: the process's Prometheus registry, and the handles the frame path feeds.
//!
//! One registry per process ([`metrics`]). A job resolves its handles once, when it starts
//! ([`JobMetrics`]): from then on the frame path only increments atomics and observes
//! histograms, with no label lookup. Labels are bounded: the job type (only types some
//! source routes; anything else is `unrouted`), a short reason or stage name from the
//! code, and a plugin digest per routed job type. Never a job id.
//!
//! What is cheaper to read than to track — process RSS, the plugin versions the catalogue
//! serves — is read when `/metrics` is scraped ([`Metrics::encode`]).

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::catalogue::Catalogue;

/// The `job_type` label of jobs whose type no source routes: their type is whatever a
/// submitter wrote, and would make a series per typo.
pub const UNROUTED: &str = "unrouted";

/// The process's registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobType {
    job_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobReason {
    job_type: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStage {
    job_type: String,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    job_type: String,
    digest: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refused {
    job_type: String,
    digest: String,
    step: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the host exports; see the README's table.
pub struct Metrics {
    registry: Registry,
    jobs_running: Family<JobType, Gauge>,
    jobs_started: Family<JobType, Counter>,
    jobs_finished: Family<JobType, Counter>,
    jobs_requeued: Family<JobType, Counter>,
    jobs_failed: Family<JobReason, Counter>,
    frames_received: Family<JobType, Counter>,
    frames_processed: Family<JobType, Counter>,
    frames_dropped: Family<JobType, Counter>,
    frames_rejected: Family<JobReason, Counter>,
    stage_seconds: HistogramFamily<JobStage>,
    bytes_held: Family<Stage, Gauge>,
    plugin_memory: Family<JobType, Gauge>,
    plugin_memory_peak: HistogramFamily<JobType>,
    plugin_versions: Family<Version, Gauge>,
    plugin_versions_refused: Family<Refused, Gauge>,
    rss: Gauge,
    /// Held while a scrape refreshes and encodes, so that two scrapes never see each
    /// other's half-refreshed version gauges.
    scrape: Mutex<()>,
}

/// Stage latencies: 0.5 ms to about 16 s, doubling.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Linear memory a plugin instance grew to: 1 MiB to 4 GiB, doubling.
fn memory_histogram() -> Histogram {
    Histogram::new(exponential_buckets((1u64 << 20) as f64, 2.0, 13))
}

impl Metrics {
    fn new() -> Self {
        let metrics = Self {
            registry: Registry::default(),
            jobs_running: Family::default(),
            jobs_started: Family::default(),
            jobs_finished: Family::default(),
            jobs_requeued: Family::default(),
            jobs_failed: Family::default(),
            frames_received: Family::default(),
            frames_processed: Family::default(),
            frames_dropped: Family::default(),
            frames_rejected: Family::default(),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            bytes_held: Family::default(),
            plugin_memory: Family::default(),
            plugin_memory_peak: Family::new_with_constructor(memory_histogram),
            plugin_versions: Family::default(),
            plugin_versions_refused: Family::default(),
            rss: Gauge::default(),
            scrape: Mutex::new(()),
        };
        let mut registry = Registry::with_prefix("framehost");
        let m = &metrics;
        registry.register("jobs_running", "Jobs running now", m.jobs_running.clone());
        registry.register("jobs_started", "Jobs started", m.jobs_started.clone());
        registry.register(
            "jobs_finished",
            "Jobs that ran to their end (finished, or stopped on request)",
            m.jobs_finished.clone(),
        );
        registry.register(
            "jobs_requeued",
            "Jobs handed back to the queue at shutdown",
            m.jobs_requeued.clone(),
        );
        registry.register(
            "jobs_failed",
            "Jobs that failed, by reason",
            m.jobs_failed.clone(),
        );
        registry.register(
            "frames_received",
            "Whole messages out of assembly: candidate frames",
            m.frames_received.clone(),
        );
        registry.register(
            "frames_processed",
            "Frames the plugin processed without error",
            m.frames_processed.clone(),
        );
        registry.register(
            "frames_dropped",
            "Frames evicted from a full queue or discarded when a job stopped early",
            m.frames_dropped.clone(),
        );
        registry.register(
            "frames_rejected",
            "Frames, streams and parts rejected on the way, by reason",
            m.frames_rejected.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Time spent in a stage per frame: assembly (first part to whole message), decode, \
             plugin_call",
            m.stage_seconds.clone(),
        );
        registry.register(
            "stage_bytes_held",
            "Bytes held by a buffering stage (data_stream, assembly), summed over running jobs",
            m.bytes_held.clone(),
        );
        registry.register(
            "plugin_memory_bytes",
            "Linear memory of live plugin instances, summed",
            m.plugin_memory.clone(),
        );
        registry.register(
            "plugin_memory_peak_bytes",
            "Largest linear memory of each job's plugin instance, observed when the job ends",
            m.plugin_memory_peak.clone(),
        );
        registry.register(
            "plugin_versions_loaded",
            "1 for the plugin version (digest) new jobs of a type start on",
            m.plugin_versions.clone(),
        );
        registry.register(
            "plugin_versions_refused",
            "1 for a job type's wanted version this host refused (by the step that refused it), \
             until a version of that type loads",
            m.plugin_versions_refused.clone(),
        );
        registry.register(
            "process_rss_bytes",
            "Resident set size of the host process",
            m.rss.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The metrics as Prometheus text, with RSS and the catalogue's versions read now.
    pub fn encode(&self, catalogue: Option<&Catalogue>) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rss) = crate::telemetry::rss_bytes() {
            self.rss.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        if let Some(catalogue) = catalogue {
            self.plugin_versions.clear();
            for (job_type, digest) in catalogue.serving() {
                let labels = Version { job_type, digest };
                self.plugin_versions.get_or_create(&labels).set(1);
            }
            self.plugin_versions_refused.clear();
            for (job_type, refused) in catalogue.refusals() {
                let labels = Refused {
                    job_type,
                    digest: refused.digest,
                    step: refused.step.as_str(),
                };
                self.plugin_versions_refused.get_or_create(&labels).set(1);
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The handles one job of `job_type` feeds. `job_type` must be a routed type (or
    /// [`UNROUTED`]).
    pub fn job(&self, job_type: &str) -> JobMetrics {
        let ty = JobType {
            job_type: job_type.to_owned(),
        };
        let stage = |stage| {
            self.stage_seconds.get_or_create_owned(&JobStage {
                job_type: job_type.to_owned(),
                stage,
            })
        };
        let held = |stage| self.bytes_held.get_or_create_owned(&Stage { stage });
        JobMetrics {
            job_type: job_type.to_owned(),
            frames_received: self.frames_received.get_or_create_owned(&ty),
            frames_processed: self.frames_processed.get_or_create_owned(&ty),
            frames_dropped: self.frames_dropped.get_or_create_owned(&ty),
            rejected: self.frames_rejected.clone(),
            assembly_seconds: stage("assembly"),
            decode_seconds: stage("decode"),
            plugin_call_seconds: stage("plugin_call"),
            stream_bytes_held: held("data_stream"),
            assembly_bytes_held: held("assembly"),
            plugin_memory_peak: self.plugin_memory_peak.get_or_create_owned(&ty),
        }
    }

    /// The gauge of live plugin memory for `job_type`.
    pub fn plugin_memory(&self, job_type: &str) -> Gauge {
        self.plugin_memory.get_or_create_owned(&JobType {
            job_type: job_type.to_owned(),
        })
    }

    /// Counts a job start; the job counts as running until the guard is dropped.
    pub fn job_started(&self, job_type: &str) -> RunningJob {
        let ty = JobType {
            job_type: job_type.to_owned(),
        };
        self.jobs_started.get_or_create(&ty).inc();
        let running = self.jobs_running.get_or_create_owned(&ty);
        running.inc();
        RunningJob { running }
    }

    pub fn job_finished(&self, job_type: &str) {
        self.jobs_finished
            .get_or_create(&JobType {
                job_type: job_type.to_owned(),
            })
            .inc();
    }

    pub fn job_requeued(&self, job_type: &str) {
        self.jobs_requeued
            .get_or_create(&JobType {
                job_type: job_type.to_owned(),
            })
            .inc();
    }

    pub fn job_failed(&self, job_type: &str, reason: &'static str) {
        self.jobs_failed
            .get_or_create(&JobReason {
                job_type: job_type.to_owned(),
                reason,
            })
            .inc();
    }
}

/// A job counted in `framehost_jobs_running` while this lives.
pub struct RunningJob {
    running: Gauge,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.running.dec();
    }
}

/// One job's handles into the registry, resolved when it starts. Cloning shares them.
///
/// The [`Default`] handles are detached: they count, but into no registry (unit tests,
/// and commands that run one job without serving metrics).
#[derive(Clone)]
pub struct JobMetrics {
    job_type: String,
    pub frames_received: Counter,
    pub frames_processed: Counter,
    pub frames_dropped: Counter,
    rejected: Family<JobReason, Counter>,
    pub assembly_seconds: Histogram,
    pub decode_seconds: Histogram,
    pub plugin_call_seconds: Histogram,
    pub stream_bytes_held: Gauge,
    pub assembly_bytes_held: Gauge,
    pub plugin_memory_peak: Histogram,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self {
            job_type: String::new(),
            frames_received: Counter::default(),
            frames_processed: Counter::default(),
            frames_dropped: Counter::default(),
            rejected: Family::default(),
            assembly_seconds: stage_histogram(),
            decode_seconds: stage_histogram(),
            plugin_call_seconds: stage_histogram(),
            stream_bytes_held: Gauge::default(),
            assembly_bytes_held: Gauge::default(),
            plugin_memory_peak: memory_histogram(),
        }
    }
}

impl JobMetrics {
    /// Counts a rejection. Not on the path of a good frame: it takes the family's read lock.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&JobReason {
                job_type: self.job_type.clone(),
                reason,
            })
            .inc();
    }
}

/// Observes `elapsed` in a stage histogram, in seconds.
pub fn observe(histogram: &Histogram, elapsed: Duration) {
    histogram.observe(elapsed.as_secs_f64());
}

/// Keeps a gauge equal to the sum of several owners' values: each owner moves it by the
/// change of its own value, and takes its share back when dropped.
pub struct GaugeShare {
    gauge: Gauge,
    value: i64,
}

impl GaugeShare {
    pub fn new(gauge: Gauge) -> Self {
        Self { gauge, value: 0 }
    }

    /// Sets this owner's share to `value`.
    pub fn set(&mut self, value: u64) {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        if value != self.value {
            self.gauge.inc_by(value - self.value);
            self.value = value;
        }
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.gauge.dec_by(self.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_sum_and_leave_nothing_behind() {
        let gauge = Gauge::<i64>::default();
        let mut a = GaugeShare::new(gauge.clone());
        let mut b = GaugeShare::new(gauge.clone());
        a.set(100);
        b.set(50);
        a.set(30);
        assert_eq!(gauge.get(), 80);
        drop(a);
        assert_eq!(gauge.get(), 50);
        drop(b);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn a_job_s_counts_show_under_its_type() {
        let job = metrics().job("metrics-unit-test");
        job.frames_processed.inc();
        job.rejected("bad_json");
        observe(&job.plugin_call_seconds, Duration::from_millis(3));
        let running = metrics().job_started("metrics-unit-test");
        let text = metrics().encode(None);
        for line in [
            r#"framehost_frames_processed_total{job_type="metrics-unit-test"} 1"#,
            r#"framehost_frames_rejected_total{job_type="metrics-unit-test",reason="bad_json"} 1"#,
            r#"framehost_stage_duration_seconds_count{job_type="metrics-unit-test",stage="plugin_call"} 1"#,
            r#"framehost_jobs_running{job_type="metrics-unit-test"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        drop(running);
        let text = metrics().encode(None);
        assert!(
            text.lines()
                .any(|l| l == r#"framehost_jobs_running{job_type="metrics-unit-test"} 0"#)
        );
    }
}
