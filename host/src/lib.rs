//! framehost: runs sandboxed WebAssembly video-analytics plugins over LiveKit text streams.
//!
//! One module per stage of the frame path (see DESIGN.md):
//!
//! ```text
//! intake ─► job ─► source ─► streams ─► assembly ─► decode ─► queue ─► sandbox ─► results
//! ```
//!
//! `job` is where the path is put together; read it first.

pub mod assembly;
pub mod bench;
pub mod capture;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod decode;
pub mod intake;
pub mod job;
pub mod livekit;
pub mod metrics;
pub mod ops;
pub mod queue;
pub mod sandbox;
pub mod source;
pub mod streams;
pub mod telemetry;
