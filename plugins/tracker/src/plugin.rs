//! The component glue: one [`Tracker`] per job, its confirmed tracks published per frame.

use framehost_guest::{Frame, JobInfo, LogLevel, Output, Processor, log};

use crate::{BBox, Detection, FrameReport, Summary, Tracker, TrackerConfig};

struct Component {
    tracker: Tracker,
}

impl Processor for Component {
    type Config = TrackerConfig;
    type Summary = Summary;

    /// The tracker's own parser, for its own wording of errors and its range checks.
    fn parse_config(json: &str) -> Result<TrackerConfig, String> {
        TrackerConfig::from_json(json).map_err(|e| e.to_string())
    }

    fn init(_job: &JobInfo, config: TrackerConfig) -> Result<Self, String> {
        log(
            LogLevel::Info,
            &format!(
                "tracker ready: iou_threshold={} min_hits={} max_age={} per_label={}",
                config.iou_threshold, config.min_hits, config.max_age, config.per_label
            ),
        );
        Ok(Component {
            tracker: Tracker::new(config),
        })
    }

    fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String> {
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
        let tracks = self.tracker.update(frame.index, &detections);

        out.emit_json(&FrameReport {
            frame: frame.index,
            tracks,
        })?;
        Ok(())
    }

    fn finish(self, _out: &mut Output) -> Result<Summary, String> {
        Ok(self.tracker.summary())
    }
}

framehost_guest::export_processor!(Component);
