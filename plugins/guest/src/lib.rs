//! Writing a framehost frame processor as one trait impl and one macro call.
//!
//! A plugin is a WebAssembly component of the `frame-processor` world
//! (`wit/frame-processor.wit`): the host calls `init` once, `process` once per frame and
//! `finish` once, on one instance per job. Without this crate every plugin repeats the
//! same glue around its real work: the bindings, a global holding the job's state between
//! calls, parsing the job's config JSON, publishing results while counting the ones the
//! host refused, and adding that count to the summary. Here that glue is written once:
//!
//! ```
//! use framehost_guest::{Frame, JobInfo, Output, Processor};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Deserialize)]
//! #[serde(default, deny_unknown_fields)]
//! struct Config {
//!     every: u64,
//! }
//!
//! #[derive(Serialize)]
//! struct Summary {
//!     frames: u64,
//! }
//!
//! struct Sampler {
//!     every: u64,
//!     frames: u64,
//! }
//!
//! impl Processor for Sampler {
//!     type Config = Config;
//!     type Summary = Summary;
//!
//!     fn init(_job: &JobInfo, config: Config) -> Result<Self, String> {
//!         Ok(Sampler { every: config.every.max(1), frames: 0 })
//!     }
//!
//!     fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String> {
//!         self.frames += 1;
//!         if frame.index % self.every == 0 {
//!             out.emit_json(&serde_json::json!({"frame": frame.index}))?;
//!         }
//!         Ok(())
//!     }
//!
//!     fn finish(self, _out: &mut Output) -> Result<Summary, String> {
//!         Ok(Summary { frames: self.frames })
//!     }
//! }
//!
//! framehost_guest::export_processor!(Sampler);
//! ```
//!
//! The crate builds natively as well as for `wasm32-wasip2`, so a plugin's logic, and its
//! [`Processor`] impl with an [`Output::recording`], can be unit tested with a plain
//! `cargo test`. Natively [`log`] writes to stderr and [`export_processor!`] exports
//! nothing; only the component build talks to the host.

mod config;
mod glue;
mod output;

wit_bindgen::generate!({
    path: "../../wit",
    world: "frame-processor",
    pub_export_macro: true,
    default_bindings_module: "framehost_guest",
});

pub use config::from_json as config_from_json;
pub use framehost::plugin::host::LogLevel;
pub use framehost::plugin::types::{Bbox, Detection, Frame, Image, ImageFormat, JobInfo};
pub use output::{Emitted, Output, log};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A frame processor: the state of one job, created by `init`, fed every frame, consumed by
/// `finish`.
///
/// The host runs one instance per job and calls it from one thread, so `self` is the job's
/// state with no sharing to think about. An `Err` from `process` rejects that frame only
/// (the host counts it as `plugin_error`) and the job goes on; an `Err` from `init` or
/// `finish` fails the job. A panic traps the instance, which the host handles by the job
/// type's `on_trap` policy.
pub trait Processor: Sized + Send + 'static {
    /// The job's `config` object. Absent, `null` or `{}` give `Default::default()`; use
    /// `#[serde(default, deny_unknown_fields)]` so that a misspelt key fails the job
    /// instead of being ignored.
    type Config: DeserializeOwned + Default;

    /// What `finish` reports. It must serialize to a JSON object (a struct or a map); the
    /// crate adds one key to it, `results_dropped`, which is therefore reserved.
    type Summary: Serialize;

    /// Parses the job's config JSON. The default is [`config_from_json`]; override it to
    /// word the errors differently. An error fails the job.
    fn parse_config(json: &str) -> Result<Self::Config, String> {
        config_from_json(json)
    }

    /// Starts the job. Validate the config here: an error fails the job before any frame.
    fn init(job: &JobInfo, config: Self::Config) -> Result<Self, String>;

    /// Handles one frame, in order, publishing any results through `out`. An error rejects
    /// this frame only.
    fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String>;

    /// Ends the job and returns its summary. `out` still accepts results, for a plugin that
    /// publishes something only at the end.
    fn finish(self, out: &mut Output) -> Result<Self::Summary, String>;
}

/// Exports a [`Processor`] as the component's `processor` interface.
///
/// Call it once, at the crate root or in any module, with the type's name:
/// `framehost_guest::export_processor!(MyProcessor);`. It declares the global that holds
/// the job's instance between calls and the WIT exports that forward to the trait. Outside
/// `wasm32` it exports nothing, so the crate still builds and tests natively.
#[macro_export]
macro_rules! export_processor {
    ($processor:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static SLOT: $crate::__private::Slot<$processor> = $crate::__private::Slot::new();

            // Named so as not to shadow the processor's own type in this block.
            struct __FramehostExport;
            $crate::export! { __FramehostExport with_types_in $crate }

            impl $crate::__private::Guest for __FramehostExport {
                fn init(job: $crate::JobInfo) -> ::core::result::Result<(), ::std::string::String> {
                    SLOT.init(job)
                }

                fn process(
                    frame: $crate::Frame,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    SLOT.process(frame)
                }

                fn finish() -> ::core::result::Result<::std::string::String, ::std::string::String>
                {
                    SLOT.finish()
                }
            }
        };

        // Natively there is nothing to export; naming the impl still checks that the type
        // is a `Processor` and keeps it from being reported as unused.
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            let _ = <$processor as $crate::Processor>::init;
        };
    };
}

/// What [`export_processor!`] expands to refers to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::exports::framehost::plugin::processor::Guest;
    pub use crate::glue::Slot;
}
