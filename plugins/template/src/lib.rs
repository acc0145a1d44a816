//! A frame processor to copy: counts each frame's detections by label.
//!
//! Per frame it publishes one `application/json` result, `{"frame": 7, "counts":
//! {"car": 1, "person": 2}}`, counting only detections at or above `min_confidence`
//! (config key, default 0.5). `finish` returns the [`Summary`]: frames seen, detections
//! counted and ignored, and the totals per label.
//!
//! The layout is the one to keep when copying it: the logic ([`LabelCounter`]) is plain
//! Rust in its own module with native unit tests, and `plugin.rs` is the few lines that
//! make it a component through `framehost_guest`. See `plugins/GUIDE.md`.

pub mod counts;

pub use counts::{Config, FrameCounts, LabelCounter, MAX_LABELS, Summary};

mod plugin;
