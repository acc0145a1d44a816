//! A multi-object tracker frame processor.
//!
//! For each frame the plugin matches the frame's detections to the tracks it holds and
//! publishes the confirmed tracks as one `application/json` result:
//! `{"frame": 7, "tracks": [{"id": 1, "label": "person", "confidence": 0.9,
//! "bbox": [left, top, width, height]}]}` with boxes normalized as in the WIT contract.
//! `finish` returns the [`Summary`] as JSON.
//!
//! The tracker itself ([`Tracker`]) is plain Rust with no WebAssembly in it, so it is unit
//! tested natively and the MOT evaluator (`examples/mot_track.rs`) runs the very same code
//! the plugin runs. The component glue is a `framehost_guest::Processor` around it.
//!
//! Configuration (the job's `config` object, every key optional) is [`TrackerConfig`].

pub mod assign;
pub mod geometry;
pub mod kalman;
pub mod tracker;

pub use geometry::BBox;
pub use tracker::{
    ConfigError, Detection, FrameReport, Summary, TrackReport, Tracker, TrackerConfig,
};

mod plugin;
