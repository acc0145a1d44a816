//! A frame processor that decodes each frame's image inside the sandbox and reports the
//! colour of every detection's pixels.
//!
//! Per frame it publishes one `application/json` result:
//! `{"frame": 3, "width": 640, "height": 480, "format": "jpeg", "objects": [{"label":
//! "person", "mean_rgb": [r, g, b], "mean_luma": y, "pixels": n}]}`. A frame whose image is
//! missing, of an unknown format or undecodable is rejected with the reason, and the job
//! goes on. `finish` returns the [`Summary`] as JSON.
//!
//! It exists to prove that image bytes cross the host intact and to give plugin authors a
//! model for image work; the statistics core ([`FrameStats`]) is plain Rust, tested
//! natively, and the component glue is a `framehost_guest::Processor` around it.

pub mod stats;

pub use stats::{
    ConfigError, FrameResult, FrameStats, FrameStatsConfig, ImageKind, ObjectStats, Region, Summary,
};

mod plugin;
