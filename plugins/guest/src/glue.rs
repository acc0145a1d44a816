//! The job's instance between calls, and the three WIT calls in terms of [`Processor`].

use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::{Frame, JobInfo, Output, Processor};

/// The global that [`export_processor!`](crate::export_processor) declares: empty until
/// `init`, the job's processor and output until `finish` takes them.
///
/// The host makes one instance per job and calls it from one thread, so the lock is never
/// contended; it only gives the global a safe interior. A panic inside a call traps the
/// instance, so a poisoned lock is never seen again, and taking the data regardless keeps
/// the glue free of unwraps.
pub struct Slot<P>(Mutex<Option<Instance<P>>>);

struct Instance<P> {
    processor: P,
    out: Output,
}

/// `finish`'s JSON: the processor's summary with `results_dropped` added last.
#[derive(Serialize)]
struct FinalSummary<'a, S> {
    #[serde(flatten)]
    summary: &'a S,
    results_dropped: u64,
}

impl<P: Processor> Slot<P> {
    #[allow(clippy::new_without_default)] // a `static` needs a `const fn`
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    pub fn init(&self, job: JobInfo) -> Result<(), String> {
        let config = P::parse_config(&job.config_json)?;
        let processor = P::init(&job, config)?;
        *self.lock() = Some(Instance {
            processor,
            out: Output::for_instance(),
        });
        Ok(())
    }

    pub fn process(&self, frame: Frame) -> Result<(), String> {
        let mut guard = self.lock();
        let instance = guard.as_mut().ok_or("process called before init")?;
        instance.processor.process(frame, &mut instance.out)
    }

    pub fn finish(&self) -> Result<String, String> {
        let Instance { processor, mut out } =
            self.lock().take().ok_or("finish called before init")?;
        let summary = processor.finish(&mut out)?;

        // Flattening keeps the summary's own key order; a map shows a clash that the
        // flattened text would only show as a duplicate key.
        let encode = |e: serde_json::Error| format!("cannot encode summary: {e}");
        match serde_json::to_value(&summary).map_err(encode)? {
            serde_json::Value::Object(map) if map.contains_key("results_dropped") => {
                return Err("summary must not have a results_dropped key".into());
            }
            serde_json::Value::Object(_) => {}
            _ => return Err("summary must be a JSON object".into()),
        }
        serde_json::to_string(&FinalSummary {
            summary: &summary,
            results_dropped: out.results_dropped(),
        })
        .map_err(encode)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Instance<P>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Emits the index of every frame; refuses frames whose index is in `reject`.
    struct Echo {
        job_id: String,
        config: EchoConfig,
        frames: u64,
    }

    #[derive(Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct EchoConfig {
        reject: Vec<u64>,
        summary_key: Option<String>,
    }

    impl Processor for Echo {
        type Config = EchoConfig;
        type Summary = serde_json::Value;

        fn init(job: &JobInfo, config: EchoConfig) -> Result<Self, String> {
            if job.job_type.is_empty() {
                return Err("no job type".into());
            }
            Ok(Echo {
                job_id: job.job_id.clone(),
                config,
                frames: 0,
            })
        }

        fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String> {
            if self.config.reject.contains(&frame.index) {
                return Err(format!("frame {} rejected", frame.index));
            }
            self.frames += 1;
            out.emit_json(&serde_json::json!({"frame": frame.index}))?;
            Ok(())
        }

        fn finish(self, out: &mut Output) -> Result<serde_json::Value, String> {
            out.emit("text/plain", b"bye");
            let mut summary =
                serde_json::json!({"zeta": 1, "job": self.job_id, "frames": self.frames});
            if let Some(key) = self.config.summary_key {
                summary = serde_json::json!({ key: 0 });
            }
            Ok(summary)
        }
    }

    fn job(config: &str) -> JobInfo {
        JobInfo {
            job_id: "j1".into(),
            job_type: "echo".into(),
            room: "room".into(),
            config_json: config.into(),
        }
    }

    fn frame(index: u64) -> Frame {
        Frame {
            index,
            timestamp: None,
            received_ms: 0,
            width: 0,
            height: 0,
            detections: Vec::new(),
            image: None,
            extra_json: "{}".into(),
        }
    }

    #[test]
    fn a_job_runs_through_the_slot() {
        let slot = Slot::<Echo>::new();
        slot.init(job(r#"{"reject": [1]}"#)).unwrap();
        slot.process(frame(0)).unwrap();
        assert_eq!(slot.process(frame(1)).unwrap_err(), "frame 1 rejected");
        slot.process(frame(2)).unwrap();

        let emitted: Vec<String> = {
            let guard = slot.lock();
            let out = &guard.as_ref().unwrap().out;
            out.emitted()
                .iter()
                .map(|e| String::from_utf8(e.data.clone()).unwrap())
                .collect()
        };
        assert_eq!(emitted, [r#"{"frame":0}"#, r#"{"frame":2}"#]);

        // The summary's own keys, then the count.
        assert_eq!(
            slot.finish().unwrap(),
            r#"{"frames":2,"job":"j1","zeta":1,"results_dropped":0}"#
        );
        assert_eq!(slot.finish().unwrap_err(), "finish called before init");
    }

    #[test]
    fn refused_results_reach_the_summary() {
        let slot = Slot::<Echo>::new();
        slot.init(job("{}")).unwrap();
        slot.lock().as_mut().unwrap().out = Output::refusing();
        slot.process(frame(0)).unwrap();
        slot.process(frame(1)).unwrap();

        // The result emitted in `finish` counts too.
        let summary: serde_json::Value = serde_json::from_str(&slot.finish().unwrap()).unwrap();
        assert_eq!(summary["results_dropped"], 3);
    }

    #[test]
    fn calls_out_of_order_and_bad_configs_are_errors() {
        let slot = Slot::<Echo>::new();
        assert_eq!(
            slot.process(frame(0)).unwrap_err(),
            "process called before init"
        );
        assert_eq!(slot.finish().unwrap_err(), "finish called before init");

        let typo = slot.init(job(r#"{"rejct": []}"#)).unwrap_err();
        assert!(typo.starts_with("invalid config: unknown field"), "{typo}");
        let mut no_type = job("{}");
        no_type.job_type.clear();
        assert_eq!(slot.init(no_type).unwrap_err(), "no job type");
        assert_eq!(
            slot.process(frame(0)).unwrap_err(),
            "process called before init"
        );
    }

    #[test]
    fn a_struct_summary_keeps_its_field_order() {
        #[derive(Serialize)]
        struct Summary {
            zeta: u32,
            alpha: u32,
        }
        let text = serde_json::to_string(&FinalSummary {
            summary: &Summary { zeta: 1, alpha: 2 },
            results_dropped: 3,
        })
        .unwrap();
        assert_eq!(text, r#"{"zeta":1,"alpha":2,"results_dropped":3}"#);
    }

    #[test]
    fn the_count_key_is_reserved() {
        let slot = Slot::<Echo>::new();
        slot.init(job(r#"{"summary_key": "results_dropped"}"#))
            .unwrap();
        assert_eq!(
            slot.finish().unwrap_err(),
            "summary must not have a results_dropped key"
        );
    }
}
