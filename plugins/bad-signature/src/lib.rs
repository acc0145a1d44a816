//! Test support only: exports `framehost:plugin/processor@0.1.0` with the right function
//! names and the wrong types.
//!
//! Built from a private, edited copy of the contract (`wit/frame-processor.wit` in this
//! crate) in which `process` takes a `string` rather than a `frame`; `init` and `finish`
//! match the real contract. Checking export names alone (which wasmtime's generated
//! `Pre::new` does) accepts this component; a host must compare the export's types and
//! refuse it when loading. Never route a job type to it.

wit_bindgen::generate!({
    path: "wit",
    world: "frame-processor",
});

use exports::framehost::plugin::processor::{Guest, JobInfo};
use framehost::plugin::host::{self, LogLevel};

struct BadSignature;

impl Guest for BadSignature {
    fn init(job: JobInfo) -> Result<(), String> {
        host::log(
            LogLevel::Error,
            &format!("bad-signature test plugin loaded for job {}", job.job_id),
        );
        Ok(())
    }

    fn process(frame: String) -> Result<(), String> {
        Err(format!(
            "bad-signature got a string of {} bytes",
            frame.len()
        ))
    }

    fn finish() -> Result<String, String> {
        Ok("{}".into())
    }
}

export!(BadSignature);
