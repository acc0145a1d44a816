//! Counting detections by label, frame by frame and over the job.

use std::collections::BTreeMap;

use framehost_guest::Detection;
use serde::{Deserialize, Serialize};

/// Most distinct labels kept in [`Summary::totals`]. Detections of labels first seen
/// after that are still counted per frame, and in [`Summary::other_labels`] over the
/// job, so that a sender inventing labels cannot grow the plugin's memory without bound.
pub const MAX_LABELS: usize = 256;

/// The job's config object; every key is optional.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Detections below this confidence are ignored, in `[0, 1]`. Defaults to 0.5.
    pub min_confidence: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_confidence: 0.5,
        }
    }
}

/// The result published for one frame. Labels sort by name, so equal frames give equal
/// JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameCounts {
    pub frame: u64,
    pub counts: BTreeMap<String, u64>,
}

/// What `finish` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub frames: u64,
    /// Detections at or above `min_confidence`.
    pub detections: u64,
    /// Detections below `min_confidence`.
    pub ignored: u64,
    /// Counted detections per label, for the first [`MAX_LABELS`] labels seen.
    pub totals: BTreeMap<String, u64>,
    /// Counted detections of labels past [`MAX_LABELS`].
    pub other_labels: u64,
}

/// Counts one job's detections.
#[derive(Debug)]
pub struct LabelCounter {
    config: Config,
    summary: Summary,
}

impl LabelCounter {
    /// Refuses a `min_confidence` outside `[0, 1]`.
    pub fn new(config: Config) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&config.min_confidence) {
            return Err(format!(
                "min_confidence must be in [0, 1], got {}",
                config.min_confidence
            ));
        }
        Ok(Self {
            config,
            summary: Summary::default(),
        })
    }

    /// Counts one frame's detections and adds them to the job's totals.
    pub fn count(&mut self, index: u64, detections: &[Detection]) -> FrameCounts {
        self.summary.frames += 1;

        let mut counts = BTreeMap::new();
        for d in detections {
            if d.confidence < self.config.min_confidence {
                self.summary.ignored += 1;
                continue;
            }
            *counts.entry(d.label.clone()).or_insert(0) += 1;
        }

        for (label, n) in &counts {
            self.summary.detections += n;
            if let Some(total) = self.summary.totals.get_mut(label) {
                *total += n;
            } else if self.summary.totals.len() < MAX_LABELS {
                self.summary.totals.insert(label.clone(), *n);
            } else {
                self.summary.other_labels += n;
            }
        }
        FrameCounts {
            frame: index,
            counts,
        }
    }

    pub fn summary(&self) -> Summary {
        self.summary.clone()
    }
}

#[cfg(test)]
mod tests {
    use framehost_guest::Bbox;

    use super::*;

    fn detection(label: &str, confidence: f32) -> Detection {
        Detection {
            label: label.into(),
            confidence,
            bbox: Bbox {
                left: 0.1,
                top: 0.1,
                width: 0.2,
                height: 0.2,
            },
            object_id: None,
        }
    }

    #[test]
    fn counts_per_frame_and_over_the_job() {
        let mut counter = LabelCounter::new(Config::default()).unwrap();
        let first = counter.count(
            0,
            &[
                detection("person", 0.9),
                detection("car", 0.6),
                detection("person", 0.5),
                detection("person", 0.2),
            ],
        );
        assert_eq!(
            serde_json::to_value(&first).unwrap(),
            serde_json::json!({"frame": 0, "counts": {"car": 1, "person": 2}})
        );
        let empty = counter.count(1, &[]);
        assert!(empty.counts.is_empty());
        counter.count(2, &[detection("person", 1.0)]);

        let summary = counter.summary();
        assert_eq!(
            (summary.frames, summary.detections, summary.ignored),
            (3, 4, 1)
        );
        assert_eq!(
            summary.totals,
            BTreeMap::from([("car".into(), 1), ("person".into(), 3)])
        );
    }

    #[test]
    fn labels_past_the_bound_are_counted_apart() {
        let mut counter = LabelCounter::new(Config {
            min_confidence: 0.0,
        })
        .unwrap();
        for i in 0..MAX_LABELS + 2 {
            let frame = counter.count(i as u64, &[detection(&format!("label{i}"), 0.5)]);
            assert_eq!(
                frame.counts.len(),
                1,
                "every frame still reports its labels"
            );
        }
        counter.count(999, &[detection("label0", 0.5)]);

        let summary = counter.summary();
        assert_eq!(summary.totals.len(), MAX_LABELS);
        assert_eq!(summary.totals["label0"], 2);
        assert_eq!(summary.other_labels, 2);
        assert_eq!(summary.detections, MAX_LABELS as u64 + 3);
    }

    #[test]
    fn min_confidence_must_be_a_probability() {
        for bad in [-0.1, 1.5, f32::NAN] {
            let err = LabelCounter::new(Config {
                min_confidence: bad,
            })
            .unwrap_err();
            assert!(err.starts_with("min_confidence must be in [0, 1]"), "{err}");
        }
        let config: Config =
            framehost_guest::config_from_json(r#"{"min_confidence": 0.8}"#).unwrap();
        assert_eq!(config.min_confidence, 0.8);
        assert!(framehost_guest::config_from_json::<Config>(r#"{"min_conf": 0.8}"#).is_err());
    }
}
