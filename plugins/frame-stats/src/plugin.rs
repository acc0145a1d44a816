//! The component glue: the WIT exports around one [`FrameStats`] per instance.

use std::sync::Mutex;

use serde::Serialize;

use crate::{FrameStats, FrameStatsConfig, ImageKind, Region, Summary};

wit_bindgen::generate!({
    path: "../../wit",
    world: "frame-processor",
});

use exports::framehost::plugin::processor::Guest;
use framehost::plugin::host::{self, LogLevel};
use framehost::plugin::types::{Frame, ImageFormat, JobInfo};

/// The job's state. One instance serves one job from one thread; the lock only gives the
/// global a safe interior.
static STATE: Mutex<Option<State>> = Mutex::new(None);

struct State {
    stats: FrameStats,
    /// Results the host refused (its per-call bound); reported in the summary.
    results_dropped: u64,
}

#[derive(Serialize)]
struct FinalSummary {
    #[serde(flatten)]
    stats: Summary,
    results_dropped: u64,
}

struct Component;

impl Guest for Component {
    fn init(job: JobInfo) -> Result<(), String> {
        let config = FrameStatsConfig::from_json(&job.config_json).map_err(|e| e.to_string())?;
        host::log(
            LogLevel::Info,
            &format!(
                "frame-stats ready: max_decode_bytes={}",
                config.max_decode_bytes
            ),
        );
        *lock() = Some(State {
            stats: FrameStats::new(config),
            results_dropped: 0,
        });
        Ok(())
    }

    fn process(frame: Frame) -> Result<(), String> {
        let mut guard = lock();
        let state = guard.as_mut().ok_or("process called before init")?;

        let regions: Vec<Region> = frame
            .detections
            .into_iter()
            .map(|d| Region {
                label: d.label,
                left: d.bbox.left,
                top: d.bbox.top,
                width: d.bbox.width,
                height: d.bbox.height,
            })
            .collect();
        let image = frame.image.as_ref().map(|img| {
            let kind = match img.format {
                ImageFormat::Jpeg => ImageKind::Jpeg,
                ImageFormat::Png => ImageKind::Png,
                ImageFormat::Other => ImageKind::Other,
            };
            (kind, img.data.as_slice())
        });

        let result = state.stats.process(frame.index, image, &regions)?;
        let json = serde_json::to_vec(&result).map_err(|e| format!("cannot encode: {e}"))?;
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
            stats: state.stats.summary(),
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
