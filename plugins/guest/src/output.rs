//! Results and log lines out of the sandbox.

use serde::Serialize;

use crate::LogLevel;

/// Where a plugin publishes its results: the host's `emit`, or a list in a native test.
///
/// The host bounds results per call (64 by default) and bytes per result (1 MiB by
/// default); past either bound it drops the result and says so. `Output` counts those
/// refusals, logs a warning at the first, and [`export_processor!`](crate::export_processor)
/// reports the count as `results_dropped` in the job's summary.
#[derive(Debug)]
pub struct Output {
    sink: Sink,
    results_dropped: u64,
}

#[derive(Debug)]
enum Sink {
    /// The host's `emit`; only reachable inside a component.
    #[cfg(target_arch = "wasm32")]
    Host,
    /// Kept in memory, or refused when `refuse` is set.
    Record { emitted: Vec<Emitted>, refuse: bool },
}

/// One result an [`Output::recording`] kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub content_type: String,
    pub data: Vec<u8>,
}

impl Output {
    /// An output that keeps every result, for testing a processor natively.
    pub fn recording() -> Self {
        Self::record(false)
    }

    /// An output that refuses every result as a host past its bound would, for testing how
    /// a processor copes.
    pub fn refusing() -> Self {
        Self::record(true)
    }

    fn record(refuse: bool) -> Self {
        Self {
            sink: Sink::Record {
                emitted: Vec::new(),
                refuse,
            },
            results_dropped: 0,
        }
    }

    /// The output a component instance uses: the host inside `wasm32`, a recording
    /// natively (where there is no host to call).
    pub(crate) fn for_instance() -> Self {
        #[cfg(target_arch = "wasm32")]
        let sink = Sink::Host;
        #[cfg(not(target_arch = "wasm32"))]
        let sink = Sink::Record {
            emitted: Vec::new(),
            refuse: false,
        };
        Self {
            sink,
            results_dropped: 0,
        }
    }

    /// Publishes one result. Returns whether it was accepted; a refused one is counted in
    /// [`results_dropped`](Self::results_dropped) and is not retried.
    pub fn emit(&mut self, content_type: &str, data: &[u8]) -> bool {
        let accepted = match &mut self.sink {
            #[cfg(target_arch = "wasm32")]
            Sink::Host => crate::framehost::plugin::host::emit(content_type, data),
            Sink::Record { refuse: true, .. } => false,
            Sink::Record { emitted, .. } => {
                emitted.push(Emitted {
                    content_type: content_type.to_owned(),
                    data: data.to_vec(),
                });
                true
            }
        };

        if !accepted {
            if self.results_dropped == 0 {
                log(
                    LogLevel::Warn,
                    "host refused a result; counting further ones",
                );
            }
            self.results_dropped += 1;
        }
        accepted
    }

    /// Publishes `value` as one `application/json` result. Returns whether it was accepted,
    /// or an error (`cannot encode: ...`) when it does not serialize.
    pub fn emit_json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<bool, String> {
        let json = serde_json::to_vec(value).map_err(|e| format!("cannot encode: {e}"))?;
        Ok(self.emit("application/json", &json))
    }

    /// Results refused so far.
    pub fn results_dropped(&self) -> u64 {
        self.results_dropped
    }

    /// The results a recording output kept, oldest first; empty for the host's output.
    pub fn emitted(&self) -> &[Emitted] {
        match &self.sink {
            #[cfg(target_arch = "wasm32")]
            Sink::Host => &[],
            Sink::Record { emitted, .. } => emitted,
        }
    }
}

/// Writes a line to the host's log, tagged by the host with the job id. Natively (in unit
/// tests) the line goes to stderr.
///
/// The host bounds a job's log bytes (1 MiB by default) and drops the rest, so log what
/// happened to the job, not every frame.
pub fn log(level: LogLevel, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::framehost::plugin::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_keeps_results_in_order() {
        let mut out = Output::recording();
        assert!(out.emit("text/plain", b"one"));
        assert_eq!(out.emit_json(&[1, 2]), Ok(true));

        let emitted = out.emitted();
        assert_eq!(emitted.len(), 2);
        assert_eq!(
            (emitted[0].content_type.as_str(), &emitted[0].data[..]),
            ("text/plain", &b"one"[..])
        );
        assert_eq!(emitted[1].content_type, "application/json");
        assert_eq!(emitted[1].data, b"[1,2]");
        assert_eq!(out.results_dropped(), 0);
    }

    #[test]
    fn refused_results_are_counted() {
        let mut out = Output::refusing();
        assert!(!out.emit("text/plain", b"one"));
        assert_eq!(out.emit_json(&"two"), Ok(false));
        assert_eq!(out.results_dropped(), 2);
        assert!(out.emitted().is_empty());
    }

    #[test]
    fn unencodable_values_are_an_error_not_a_drop() {
        let mut out = Output::recording();
        let map = std::collections::HashMap::from([((1, 2), 3)]);
        let err = out.emit_json(&map).unwrap_err();
        assert!(err.starts_with("cannot encode: "), "{err}");
        assert_eq!(out.results_dropped(), 0);
    }
}
