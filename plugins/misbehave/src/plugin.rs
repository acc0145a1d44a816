//! The component glue for the misbehaving test plugin.

use std::sync::Mutex;

use crate::{Config, Misbehaviour};

wit_bindgen::generate!({
    path: "../../wit",
    world: "frame-processor",
});

use exports::framehost::plugin::processor::Guest;
use framehost::plugin::host::{self, LogLevel};
use framehost::plugin::types::{Frame, JobInfo};

static STATE: Mutex<Option<Misbehaviour>> = Mutex::new(None);

struct Component;

impl Guest for Component {
    fn init(job: JobInfo) -> Result<(), String> {
        let config = Config::from_json(&job.config_json)?;
        host::log(
            LogLevel::Warn,
            &format!(
                "misbehave test plugin: mode={} after={}",
                config.mode.name(),
                config.after
            ),
        );
        *lock() = Some(Misbehaviour::new(config));
        Ok(())
    }

    fn process(frame: Frame) -> Result<(), String> {
        let mut guard = lock();
        let state = guard.as_mut().ok_or("process called before init")?;
        state.process(frame.index)
    }

    fn finish() -> Result<String, String> {
        let state = lock().take().ok_or("finish called before init")?;
        Ok(state.summary_json())
    }
}

/// After a trap the instance is gone, so a poisoned lock is never seen again.
fn lock() -> std::sync::MutexGuard<'static, Option<Misbehaviour>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

export!(Component);
