//! The component glue: the WIT exports, one tracker per instance, results out via `emit`.

use std::sync::Mutex;

use serde::Serialize;

use crate::{BBox, Detection, FrameReport, Summary, Tracker, TrackerConfig};

wit_bindgen::generate!({
    path: "../../wit",
    world: "frame-processor",
});

use exports::framehost::plugin::processor::Guest;
use framehost::plugin::host::{self, LogLevel};
use framehost::plugin::types::{Frame, JobInfo};

/// The job's tracker. The host makes one instance per job and calls it from one thread,
/// so the lock is never contended; it only gives the global a safe interior.
static STATE: Mutex<Option<State>> = Mutex::new(None);

struct State {
    tracker: Tracker,
    /// Results the host refused (its per-call bound); reported in the summary.
    results_dropped: u64,
}

#[derive(Serialize)]
struct FinalSummary {
    #[serde(flatten)]
    tracker: Summary,
    results_dropped: u64,
}

struct Component;

impl Guest for Component {
    fn init(job: JobInfo) -> Result<(), String> {
        let config = TrackerConfig::from_json(&job.config_json).map_err(|e| e.to_string())?;
        host::log(
            LogLevel::Info,
            &format!(
                "tracker ready: iou_threshold={} min_hits={} max_age={} per_label={}",
                config.iou_threshold, config.min_hits, config.max_age, config.per_label
            ),
        );

        *lock() = Some(State {
            tracker: Tracker::new(config),
            results_dropped: 0,
        });
        Ok(())
    }

    fn process(frame: Frame) -> Result<(), String> {
        let mut guard = lock();
        let state = guard.as_mut().ok_or("process called before init")?;

        let detections: Vec<Detection> = frame
            .detections
            .into_iter()
            .map(|d| Detection {
                label: d.label,
                confidence: d.confidence,
                bbox: BBox::new(
                    f64::from(d.bbox.left),
                    f64::from(d.bbox.top),
                    f64::from(d.bbox.width),
                    f64::from(d.bbox.height),
                ),
            })
            .collect();
        let tracks = state.tracker.update(frame.index, &detections);

        let report = FrameReport {
            frame: frame.index,
            tracks,
        };
        let json = serde_json::to_vec(&report).map_err(|e| format!("cannot encode: {e}"))?;
        if !host::emit("application/json", &json) {
            if state.results_dropped == 0 {
                host::log(
                    LogLevel::Warn,
                    "host refused a result; counting further ones",
                );
            }
            state.results_dropped += 1;
        }
        Ok(())
    }

    fn finish() -> Result<String, String> {
        let state = lock().take().ok_or("finish called before init")?;
        let summary = FinalSummary {
            tracker: state.tracker.summary(),
            results_dropped: state.results_dropped,
        };
        serde_json::to_string(&summary).map_err(|e| format!("cannot encode summary: {e}"))
    }
}

/// A panic inside a call traps the instance, so a poisoned lock is never seen again;
/// taking the data regardless keeps the glue free of unwraps.
fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

export!(Component);
