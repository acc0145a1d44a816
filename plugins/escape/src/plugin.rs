//! The component glue: one [`Escape`] per job.

use framehost_guest::{Frame, JobInfo, Output, Processor};

use crate::{Config, Escape, Outcome, Summary};

#[derive(serde::Serialize)]
struct FrameReport<'a> {
    frame: u64,
    attempts: &'a [Outcome],
}

impl Processor for Escape {
    type Config = Config;
    type Summary = Summary;

    fn init(_job: &JobInfo, config: Config) -> Result<Self, String> {
        Ok(Escape::new(config))
    }

    fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String> {
        let attempts = self.attempt_frame();
        out.emit_json(&FrameReport {
            frame: frame.index,
            attempts: &attempts,
        })?;
        Ok(())
    }

    fn finish(self, _out: &mut Output) -> Result<Summary, String> {
        Ok(self.summary())
    }
}

framehost_guest::export_processor!(Escape);
