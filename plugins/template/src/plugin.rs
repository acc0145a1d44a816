//! The component glue: one [`LabelCounter`] per job.

use framehost_guest::{Frame, JobInfo, LogLevel, Output, Processor, log};

use crate::{Config, LabelCounter, Summary};

impl Processor for LabelCounter {
    type Config = Config;
    type Summary = Summary;

    fn init(job: &JobInfo, config: Config) -> Result<Self, String> {
        let counter = LabelCounter::new(config)?;
        log(
            LogLevel::Info,
            &format!(
                "{} ready: min_confidence={}",
                job.job_type, config.min_confidence
            ),
        );
        Ok(counter)
    }

    fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String> {
        let counts = self.count(frame.index, &frame.detections);
        out.emit_json(&counts)?;
        Ok(())
    }

    fn finish(self, _out: &mut Output) -> Result<Summary, String> {
        Ok(self.summary())
    }
}

framehost_guest::export_processor!(LabelCounter);

#[cfg(test)]
mod tests {
    use framehost_guest::{Bbox, Detection};

    use super::*;

    /// The glue too runs natively: a recording `Output` keeps what would go to the host.
    #[test]
    fn publishes_one_result_per_frame() {
        let job = JobInfo {
            job_id: "job-1".into(),
            job_type: "label-counts".into(),
            room: "lobby".into(),
            config_json: r#"{"min_confidence": 0.3}"#.into(),
        };
        let config = LabelCounter::parse_config(&job.config_json).unwrap();
        let mut counter = LabelCounter::init(&job, config).unwrap();

        let frame = Frame {
            index: 4,
            timestamp: None,
            received_ms: 120,
            width: 640,
            height: 480,
            detections: vec![Detection {
                label: "person".into(),
                confidence: 0.4,
                bbox: Bbox {
                    left: 0.0,
                    top: 0.0,
                    width: 0.5,
                    height: 0.5,
                },
                object_id: None,
            }],
            image: None,
            extra_json: "{}".into(),
        };
        let mut out = Output::recording();
        counter.process(frame, &mut out).unwrap();

        let emitted = out.emitted();
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].content_type, "application/json");
        assert_eq!(emitted[0].data, br#"{"frame":4,"counts":{"person":1}}"#);
        assert_eq!(counter.finish(&mut out).unwrap().detections, 1);
    }
}
