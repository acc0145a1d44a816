//! Track management: prediction, association, birth, confirmation and death.

use serde::{Deserialize, Serialize};

use crate::assign::match_by_iou;
use crate::geometry::BBox;
use crate::kalman::BoxFilter;

/// The tracker's settings, read from the job's config JSON. Every field is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// Least IoU between a track's predicted box and a detection for them to match, in
    /// `(0, 1]`. Defaults to 0.3.
    pub iou_threshold: f64,
    /// Consecutive matched frames a new track needs before it gets an id and is reported,
    /// at least 1. Defaults to 3; 1 reports every detection at once.
    pub min_hits: u32,
    /// Frames a confirmed track may go unmatched (coasting on its prediction, not
    /// reported) before it is dropped. Defaults to 10. A track that has not been confirmed
    /// is dropped at its first miss.
    pub max_age: u32,
    /// When true (the default), a track only matches detections with its own label, so a
    /// person and the bicycle under them never swap identities. When false, labels are
    /// ignored for matching and a track reports the label of its latest detection.
    pub per_label: bool,
    /// Detections below this confidence are ignored. Defaults to 0.0 (keep all).
    pub min_confidence: f32,
    /// Bound on live tracks (tentative and confirmed). Past it, new detections start no
    /// track and are counted in `births_refused`. Defaults to 256.
    pub max_tracks: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            iou_threshold: 0.3,
            min_hits: 3,
            max_age: 10,
            per_label: true,
            min_confidence: 0.0,
            max_tracks: 256,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl TrackerConfig {
    /// Parses the job's config JSON (`{}`, `null` or nothing give the defaults) and checks
    /// the bounds.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let invalid = |e: serde_json::Error| ConfigError(format!("invalid tracker config: {e}"));
        let value: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(text).map_err(invalid)?
        };

        // serde would also read a struct from an array of its fields; a config is a map.
        let config: Self = match value {
            serde_json::Value::Null => Self::default(),
            serde_json::Value::Object(_) => serde_json::from_value(value).map_err(invalid)?,
            _ => return Err(ConfigError("tracker config must be a JSON object".into())),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.iou_threshold > 0.0 && self.iou_threshold <= 1.0) {
            return Err(ConfigError(format!(
                "iou_threshold must be in (0, 1], got {}",
                self.iou_threshold
            )));
        }
        if self.min_hits == 0 {
            return Err(ConfigError("min_hits must be at least 1".into()));
        }
        if self.max_tracks == 0 {
            return Err(ConfigError("max_tracks must be at least 1".into()));
        }
        Ok(())
    }
}

/// One detection handed to the tracker.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub label: String,
    pub confidence: f32,
    pub bbox: BBox,
}

/// A confirmed track that was matched in the current frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackReport {
    /// Stable for the track's life, from 1, in order of confirmation; never reused.
    pub id: u64,
    pub label: String,
    /// The confidence of the detection matched this frame.
    pub confidence: f32,
    /// The detection's box as `[left, top, width, height]`, normalized. The detector's
    /// box is reported rather than the filter's estimate: the filter exists to predict
    /// where to look, and smoothing would only lag a good detector.
    pub bbox: [f32; 4],
}

/// The result the plugin publishes for one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameReport {
    pub frame: u64,
    pub tracks: Vec<TrackReport>,
}

/// Counters over a tracker's life, returned by `finish`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub frames: u64,
    /// Detections used for tracking.
    pub detections: u64,
    /// Detections skipped for an empty or non-finite box or a confidence below the bound.
    pub detections_ignored: u64,
    /// Tracks that reached `min_hits` and got an id.
    pub tracks_confirmed: u64,
    /// New tracks dropped before confirmation (usually spurious detections).
    pub tracks_unconfirmed_dropped: u64,
    /// Live tracks when the summary was taken.
    pub tracks_live: u64,
    /// Detections that started no track because `max_tracks` was reached.
    pub births_refused: u64,
    /// Matched frames of the longest confirmed track, and its id (0 when none).
    pub longest_track_frames: u64,
    pub longest_track_id: u64,
}

#[derive(Debug)]
struct Track {
    /// `None` until confirmed, so that ids are not spent on spurious detections.
    id: Option<u64>,
    label: String,
    filter: BoxFilter,
    /// Consecutive matched frames, for confirmation.
    streak: u32,
    /// Matched frames in total.
    hits: u64,
    /// Frames since the last match.
    misses: u64,
    last_box: BBox,
    last_confidence: f32,
}

/// A SORT-style multi-object tracker: a constant-velocity Kalman filter per track, optimal
/// IoU matching of predictions to detections, birth after `min_hits` consecutive matches
/// and death after `max_age` missed frames.
///
/// Memory is bounded by `max_tracks` live tracks; nothing else grows with the job.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    tracks: Vec<Track>,
    next_id: u64,
    last_frame: Option<u64>,
    summary: Summary,
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            tracks: Vec::new(),
            next_id: 1,
            last_frame: None,
            summary: Summary::default(),
        }
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Advances to frame `index` with its detections and returns the confirmed tracks
    /// matched in it, by id.
    ///
    /// Frame indexes should increase; a gap (frames the host dropped) is predicted across
    /// and counts as that many missed frames. An index that does not increase counts as
    /// one frame later.
    pub fn update(&mut self, index: u64, detections: &[Detection]) -> Vec<TrackReport> {
        let dt = match self.last_frame {
            Some(last) if index > last => index - last,
            _ => 1,
        };
        self.last_frame = Some(index);
        self.summary.frames += 1;

        // Past max_age every track is dead anyway; capping keeps predictions sane.
        let dt = dt.min(u64::from(self.config.max_age) + 1);
        for track in &mut self.tracks {
            track.filter.predict(dt as f64);
            track.misses += dt;
        }

        let offered = detections.len();
        let detections: Vec<&Detection> = detections
            .iter()
            .filter(|d| d.bbox.is_valid() && d.confidence >= self.config.min_confidence)
            .collect();
        self.summary.detections += detections.len() as u64;
        self.summary.detections_ignored += (offered - detections.len()) as u64;

        let predicted: Vec<BBox> = self.tracks.iter().map(|t| t.filter.bbox()).collect();
        let boxes: Vec<BBox> = detections.iter().map(|d| d.bbox).collect();
        let per_label = self.config.per_label;
        let tracks = &self.tracks;
        let matching = match_by_iou(&predicted, &boxes, self.config.iou_threshold, |t, d| {
            !per_label || tracks[t].label == detections[d].label
        });

        for &(t, d) in &matching.pairs {
            self.observe(t, detections[d]);
        }
        for &t in &matching.unmatched_tracks {
            self.tracks[t].streak = 0;
        }
        self.drop_dead_tracks();
        for &d in &matching.unmatched_detections {
            self.start_track(detections[d]);
        }

        let mut reports: Vec<TrackReport> = self
            .tracks
            .iter()
            .filter(|t| t.misses == 0)
            .filter_map(|t| {
                let b = t.last_box;
                Some(TrackReport {
                    id: t.id?,
                    label: t.label.clone(),
                    confidence: t.last_confidence,
                    bbox: [b.left, b.top, b.width, b.height].map(|v| v as f32),
                })
            })
            .collect();
        reports.sort_by_key(|r| r.id);
        reports
    }

    /// Counters so far; `tracks_live` is the current number of tracks.
    pub fn summary(&self) -> Summary {
        Summary {
            tracks_live: self.tracks.len() as u64,
            ..self.summary.clone()
        }
    }

    fn observe(&mut self, t: usize, detection: &Detection) {
        let track = &mut self.tracks[t];
        track.filter.update(&detection.bbox);
        track.streak = track.streak.saturating_add(1);
        track.hits += 1;
        track.misses = 0;
        track.last_box = detection.bbox;
        track.last_confidence = detection.confidence;
        if !self.config.per_label {
            track.label.clone_from(&detection.label);
        }
        self.confirm_if_ready(t);
    }

    fn start_track(&mut self, detection: &Detection) {
        if self.tracks.len() >= self.config.max_tracks {
            self.summary.births_refused += 1;
            return;
        }
        self.tracks.push(Track {
            id: None,
            label: detection.label.clone(),
            filter: BoxFilter::new(&detection.bbox),
            streak: 1,
            hits: 1,
            misses: 0,
            last_box: detection.bbox,
            last_confidence: detection.confidence,
        });
        self.confirm_if_ready(self.tracks.len() - 1);
    }

    fn confirm_if_ready(&mut self, t: usize) {
        let track = &mut self.tracks[t];
        if track.id.is_none() && track.streak >= self.config.min_hits {
            track.id = Some(self.next_id);
            self.next_id += 1;
            self.summary.tracks_confirmed += 1;
        }
        if let Some(id) = track.id
            && track.hits > self.summary.longest_track_frames
        {
            self.summary.longest_track_frames = track.hits;
            self.summary.longest_track_id = id;
        }
    }

    fn drop_dead_tracks(&mut self) {
        let max_age = u64::from(self.config.max_age);
        let mut unconfirmed_dropped = 0;
        self.tracks.retain(|t| match t.id {
            Some(_) => t.misses <= max_age,
            None if t.misses > 0 => {
                unconfirmed_dropped += 1;
                false
            }
            None => true,
        });
        self.summary.tracks_unconfirmed_dropped += unconfirmed_dropped as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(label: &str, left: f64, top: f64) -> Detection {
        Detection {
            label: label.into(),
            confidence: 0.9,
            bbox: BBox::new(left, top, 0.1, 0.2),
        }
    }

    fn ids(reports: &[TrackReport]) -> Vec<u64> {
        reports.iter().map(|r| r.id).collect()
    }

    #[test]
    fn empty_config_gives_the_defaults() {
        assert_eq!(
            TrackerConfig::from_json("{}").unwrap(),
            TrackerConfig::default()
        );
        assert_eq!(
            TrackerConfig::from_json("  ").unwrap(),
            TrackerConfig::default()
        );
        let c = TrackerConfig::from_json(r#"{"min_hits": 1, "per_label": false}"#).unwrap();
        assert_eq!((c.min_hits, c.per_label, c.max_age), (1, false, 10));
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let typo = TrackerConfig::from_json(r#"{"min_hit": 2}"#).unwrap_err();
        assert!(typo.0.contains("min_hit"), "{typo}");
        assert!(TrackerConfig::from_json(r#"{"iou_threshold": 0}"#).is_err());
        assert!(TrackerConfig::from_json(r#"{"iou_threshold": 1.5}"#).is_err());
        assert!(TrackerConfig::from_json(r#"{"min_hits": 0}"#).is_err());
        assert!(TrackerConfig::from_json(r#"{"max_tracks": 0}"#).is_err());
        assert!(TrackerConfig::from_json("[1]").is_err());
    }

    #[test]
    fn a_moving_object_is_reported_from_its_third_frame_with_one_id() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut seen = Vec::new();
        for i in 0..10 {
            let d = det("person", 0.1 + 0.02 * i as f64, 0.3);
            let out = tracker.update(i, std::slice::from_ref(&d));
            if i < 2 {
                assert!(out.is_empty(), "frame {i}: reported before min_hits");
                continue;
            }
            assert_eq!(ids(&out), vec![1]);
            assert_eq!(out[0].bbox, [d.bbox.left as f32, 0.3, 0.1, 0.2]);
            seen.push(out[0].id);
        }
        assert_eq!(seen.len(), 8);

        let s = tracker.summary();
        assert_eq!((s.frames, s.detections, s.tracks_confirmed), (10, 10, 1));
        assert_eq!((s.longest_track_frames, s.longest_track_id), (10, 1));
    }

    #[test]
    fn crossing_objects_keep_their_ids() {
        // Two people walk towards each other, a little apart in depth, and pass through
        // each other's boxes; the filter's velocity carries each through the overlap.
        let mut tracker = Tracker::new(TrackerConfig {
            per_label: false,
            ..TrackerConfig::default()
        });
        let mut track_one_follows_a = None;
        for i in 0..40u64 {
            let a = det("person", 0.1 + 0.015 * i as f64, 0.40);
            let b = det("person", 0.7 - 0.015 * i as f64, 0.44);
            let out = tracker.update(i, &[b, a]);
            for r in out.iter().filter(|r| r.id == 1) {
                let on_a = (f64::from(r.bbox[1]) - 0.40).abs() < 1e-6;
                let expected = *track_one_follows_a.get_or_insert(on_a);
                assert_eq!(on_a, expected, "frame {i}: ids swapped");
            }
        }
        assert_eq!(tracker.summary().tracks_confirmed, 2);
    }

    #[test]
    fn a_short_gap_keeps_the_id_and_a_long_one_ends_the_track() {
        let config = TrackerConfig {
            max_age: 3,
            ..TrackerConfig::default()
        };
        let mut tracker = Tracker::new(config);
        let at = |i: u64| det("person", 0.1 + 0.01 * i as f64, 0.3);
        for i in 0..5 {
            tracker.update(i, &[at(i)]);
        }

        // Three missed frames: the track coasts unreported, then picks up again.
        for i in 5..8 {
            assert!(tracker.update(i, &[]).is_empty());
        }
        assert_eq!(ids(&tracker.update(8, &[at(8)])), vec![1]);

        // Four missed frames is one too many.
        for i in 9..13 {
            tracker.update(i, &[]);
        }
        assert_eq!(tracker.summary().tracks_live, 0);
        for i in 13..16 {
            tracker.update(i, &[at(i)]);
        }
        assert_eq!(ids(&tracker.update(16, &[at(16)])), vec![2]);
    }

    #[test]
    fn skipped_frame_indexes_count_as_missed_frames() {
        let config = TrackerConfig {
            max_age: 3,
            ..TrackerConfig::default()
        };
        let mut tracker = Tracker::new(config);
        for i in 0..5 {
            tracker.update(i, &[det("person", 0.2, 0.2)]);
        }
        tracker.update(9, &[]);
        assert_eq!(tracker.summary().tracks_live, 0);
    }

    #[test]
    fn labels_keep_tracks_apart_unless_told_otherwise() {
        let run = |per_label: bool| {
            let mut tracker = Tracker::new(TrackerConfig {
                per_label,
                min_hits: 1,
                ..TrackerConfig::default()
            });
            tracker.update(0, &[det("person", 0.3, 0.3)]);
            tracker.update(1, &[det("bicycle", 0.3, 0.3)])
        };

        let split = run(true);
        assert_eq!((ids(&split), split[0].label.as_str()), (vec![2], "bicycle"));
        let merged = run(false);
        assert_eq!(
            (ids(&merged), merged[0].label.as_str()),
            (vec![1], "bicycle")
        );
    }

    #[test]
    fn spurious_detections_never_get_an_id() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        for i in 0..6 {
            // A steady object, and a flicker somewhere new every frame.
            let flicker = det("person", 0.05 + 0.15 * i as f64, 0.7);
            tracker.update(i, &[det("person", 0.5, 0.1), flicker]);
        }
        let s = tracker.summary();
        assert_eq!(s.tracks_confirmed, 1);
        assert_eq!(s.tracks_unconfirmed_dropped, 5);
    }

    #[test]
    fn invalid_and_low_confidence_detections_are_ignored() {
        let mut tracker = Tracker::new(TrackerConfig {
            min_confidence: 0.5,
            min_hits: 1,
            ..TrackerConfig::default()
        });
        let mut weak = det("person", 0.1, 0.1);
        weak.confidence = 0.2;
        let mut empty = det("person", 0.5, 0.5);
        empty.bbox.width = 0.0;
        let out = tracker.update(0, &[weak, empty, det("person", 0.7, 0.7)]);
        assert_eq!(out.len(), 1);
        let s = tracker.summary();
        assert_eq!((s.detections, s.detections_ignored), (1, 2));
    }

    #[test]
    fn live_tracks_are_bounded() {
        let mut tracker = Tracker::new(TrackerConfig {
            max_tracks: 2,
            ..TrackerConfig::default()
        });
        let dets: Vec<Detection> = (0..5)
            .map(|i| det("person", 0.15 * i as f64, 0.0))
            .collect();
        tracker.update(0, &dets);
        let s = tracker.summary();
        assert_eq!((s.tracks_live, s.births_refused), (2, 3));
    }

    #[test]
    fn frame_report_has_the_published_shape() {
        let report = FrameReport {
            frame: 7,
            tracks: vec![TrackReport {
                id: 3,
                label: "person".into(),
                confidence: 0.5,
                bbox: [0.25, 0.5, 0.125, 0.25],
            }],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"frame": 7, "tracks": [
                {"id": 3, "label": "person", "confidence": 0.5, "bbox": [0.25, 0.5, 0.125, 0.25]}
            ]})
        );
    }
}
