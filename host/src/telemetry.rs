//! Telemetry: logging set-up, a job's counters, and rate-limited warnings for tripped bounds.
//!
//! Every bound that trips anywhere on the frame path is counted here under a short reason
//! label and logged with the job id: the first time at once, then at most once per
//! [`WARN_INTERVAL`] per reason with the number suppressed meanwhile.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::metrics::JobMetrics;

/// Shortest time between two warnings for the same reason in the same job.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Installs the global `tracing` subscriber: human-readable on stderr, or JSON lines.
/// `RUST_LOG` overrides `default_filter`.
pub fn init_logging(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only for a person at a terminal, never into a log file or collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second initialisation (tests, embedding) keeps the first subscriber.
    drop(result);
}

/// What happened to one job's frames, shared by the job's source and plugin tasks.
///
/// The job's report reads these; the process's metrics are fed through [`JobCounters::metrics`]
/// alongside, rejections here.
#[derive(Default)]
pub struct JobCounters {
    pub packets_in: AtomicU64,
    pub streams_completed: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_processed: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub image_bytes: AtomicU64,
    pub results: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    ignored: Mutex<BTreeMap<&'static str, u64>>,
    warnings: Mutex<BTreeMap<&'static str, WarnState>>,
    pub metrics: JobMetrics,
}

struct WarnState {
    last: Instant,
    suppressed: u64,
}

impl JobCounters {
    /// Counters of a job whose frames also count in the process's metrics through `metrics`.
    pub fn new(metrics: JobMetrics) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A whole message came out of assembly.
    pub fn frame_received(&self) {
        Self::add(&self.frames_in, 1);
        self.metrics.frames_received.inc();
    }

    /// The plugin processed a frame without error.
    pub fn frame_processed(&self) {
        Self::add(&self.frames_processed, 1);
        self.metrics.frames_processed.inc();
    }

    /// `n` frames were evicted from the queue or discarded at the job's end.
    pub fn drop_frames(&self, n: u64) {
        Self::add(&self.frames_dropped, n);
        self.metrics.frames_dropped.inc_by(n);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts a rejected frame (or part of one) under `reason` and logs it, rate-limited.
    pub fn reject(&self, job_id: &str, reason: &'static str, detail: &dyn std::fmt::Display) {
        *self
            .rejected
            .lock()
            .expect("counters lock")
            .entry(reason)
            .or_insert(0) += 1;
        self.metrics.rejected(reason);
        self.warn(job_id, reason, &format_args!("Frame rejected: {detail}"));
    }

    /// Logs that a bound tripped, at most once per [`WARN_INTERVAL`] per reason.
    pub fn warn(&self, job_id: &str, reason: &'static str, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut warnings = self.warnings.lock().expect("counters lock");
        match warnings.get_mut(reason) {
            Some(state) if now.duration_since(state.last) < WARN_INTERVAL => state.suppressed += 1,
            Some(state) => {
                tracing::warn!(job_id, reason, suppressed = state.suppressed, "{detail}");
                state.last = now;
                state.suppressed = 0;
            }
            None => {
                tracing::warn!(job_id, reason, "{detail}");
                warnings.insert(
                    reason,
                    WarnState {
                        last: now,
                        suppressed: 0,
                    },
                );
            }
        }
    }

    pub fn rejected(&self) -> BTreeMap<String, u64> {
        let rejected = self.rejected.lock().expect("counters lock");
        rejected.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// Records packets the data-stream stage passed over (not ours, duplicates), by kind.
    pub fn set_ignored(&self, kind: &'static str, count: u64) {
        let mut ignored = self.ignored.lock().expect("counters lock");
        if count > 0 {
            ignored.insert(kind, count);
        } else {
            ignored.remove(kind);
        }
    }

    pub fn ignored(&self) -> BTreeMap<String, u64> {
        let ignored = self.ignored.lock().expect("counters lock");
        ignored.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.lock().expect("counters lock").values().sum()
    }
}

/// The process's resident set size now, in bytes (Linux; `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// The process's peak resident set size, in bytes (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// The number of memory mappings of this process (Linux; `None` elsewhere).
pub fn memory_mappings() -> Option<usize> {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .map(|maps| maps.lines().count())
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_by_reason() {
        let counters = JobCounters::default();
        for _ in 0..3 {
            counters.reject("job-1", "bad_json", &"unexpected end");
        }
        counters.reject("job-1", "bad_base64", &"invalid byte");
        let rejected = counters.rejected();
        assert_eq!(rejected["bad_json"], 3);
        assert_eq!(rejected["bad_base64"], 1);
        assert_eq!(counters.rejected_total(), 4);
        // Only the first of the three was logged; the others wait for the interval.
        assert_eq!(counters.warnings.lock().unwrap()["bad_json"].suppressed, 2);
    }

    #[test]
    fn rss_is_readable_here() {
        assert!(rss_bytes().unwrap() > 0);
        assert!(peak_rss_bytes().unwrap() >= rss_bytes().unwrap() / 2);
        assert!(memory_mappings().unwrap() > 0);
    }
}
