//! TEST SUPPORT ONLY: a frame processor that misbehaves on purpose, so that the host's
//! bounds (memory limit, call deadline, trap handling, failure policy) can be tested
//! against a real component. Never route a production job type to it.
//!
//! The job's config picks the behaviour: `{"mode": "leak", "after": 5}`.
//!
//! | mode | what each `process` call does |
//! | --- | --- |
//! | `ok` | nothing; returns `Ok` (the default) |
//! | `leak` | allocates 1 MiB more, writes every page of it, and never frees any of it |
//! | `spin` | loops forever (until the host's deadline interrupts it) |
//! | `panic` | panics, which traps the instance |
//! | `stack` | recurses without bound until the wasm stack overflows and traps |
//! | `error` | returns `Err`, rejecting the frame as a well-behaved plugin would |
//!
//! `after` (default 0) makes the first `after` frames behave before the mode starts.
//! `finish` returns `{"mode": .., "frames": ..}`. The behaviours live in plain Rust
//! ([`Misbehaviour`]) so their selection is tested natively; the component glue is
//! compiled for `wasm32` only.

use std::hint::black_box;

use serde::Deserialize;

#[cfg(target_arch = "wasm32")]
mod plugin;

/// Bytes `leak` keeps per call.
pub const LEAK_BYTES: usize = 1 << 20;

/// Which way to misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ok,
    Leak,
    Spin,
    Panic,
    Stack,
    Error,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Leak => "leak",
            Mode::Spin => "spin",
            Mode::Panic => "panic",
            Mode::Stack => "stack",
            Mode::Error => "error",
        }
    }
}

/// The job's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Frames to behave for before misbehaving. Defaults to 0.
    #[serde(default)]
    pub after: u64,
}

fn default_mode() -> Mode {
    Mode::Ok
}

impl Config {
    /// Parses the job's config JSON; `{}`, `null` or nothing mean `ok`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let text = if text.is_empty() || text == "null" {
            "{}"
        } else {
            text
        };
        serde_json::from_str(text).map_err(|e| format!("invalid misbehave config: {e}"))
    }
}

/// One job's misbehaviour: counts frames and, once past `after`, does what `mode` says.
#[derive(Debug)]
pub struct Misbehaviour {
    config: Config,
    frames: u64,
    /// What `leak` holds on to, forever.
    hoard: Vec<Box<[u8]>>,
}

impl Misbehaviour {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            frames: 0,
            hoard: Vec::new(),
        }
    }

    /// Handles one frame. `spin`, `panic` and `stack` never return.
    pub fn process(&mut self, index: u64) -> Result<(), String> {
        self.frames += 1;
        if self.frames <= self.config.after {
            return Ok(());
        }

        match self.config.mode {
            Mode::Ok => Ok(()),
            Mode::Leak => {
                self.hoard.push(committed_block(LEAK_BYTES, index));
                Ok(())
            }
            Mode::Spin => spin(),
            Mode::Panic => panic!("misbehave: panicking at frame {index}, as configured"),
            Mode::Stack => {
                let depth = dive(black_box(0));
                // Unreachable in practice; using the result keeps the call alive.
                Err(format!("misbehave: recursion ended at depth {depth}"))
            }
            Mode::Error => Err(format!("misbehave: rejecting frame {index}, as configured")),
        }
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Bytes held by `leak` so far.
    pub fn leaked_bytes(&self) -> usize {
        self.hoard.iter().map(|b| b.len()).sum()
    }

    /// The `finish` summary.
    pub fn summary_json(&self) -> String {
        serde_json::json!({
            "mode": self.config.mode.name(),
            "after": self.config.after,
            "frames": self.frames,
            "leaked_bytes": self.leaked_bytes(),
        })
        .to_string()
    }
}

/// Allocates `len` bytes and writes one byte in every 4 KiB, so each page is really
/// committed rather than merely reserved; the non-zero, call-dependent value stops the
/// allocator or optimizer from treating it as zeroed memory.
fn committed_block(len: usize, seed: u64) -> Box<[u8]> {
    let mut block = vec![0u8; len].into_boxed_slice();
    for (i, page) in block.chunks_mut(4096).enumerate() {
        page[0] = (seed as usize).wrapping_add(i) as u8 | 1;
    }
    black_box(block)
}

/// Loops forever. `black_box` makes every iteration observable to the optimizer, so the
/// loop cannot be folded away or proven to terminate.
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Recurses without bound. Each frame holds a local array that is read after the
/// recursive call returns, so the call is not in tail position and cannot become a loop;
/// the exit test is on a `black_box`ed value the optimizer cannot see through.
#[inline(never)]
fn dive(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let mut frame = [0u8; 256];
    frame[(depth % 256) as usize] = depth as u8;
    black_box(&mut frame);
    let below = dive(black_box(depth + 1));
    below.wrapping_add(u64::from(frame[(depth % 7) as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_to_ok() {
        for text in ["", "{}", "null"] {
            let c = Config::from_json(text).unwrap();
            assert_eq!((c.mode, c.after), (Mode::Ok, 0));
        }
        let c = Config::from_json(r#"{"mode": "stack", "after": 3}"#).unwrap();
        assert_eq!((c.mode, c.after), (Mode::Stack, 3));
    }

    #[test]
    fn unknown_modes_and_keys_are_refused() {
        assert!(Config::from_json(r#"{"mode": "explode"}"#).is_err());
        assert!(Config::from_json(r#"{"mode": "ok", "afterr": 1}"#).is_err());
    }

    #[test]
    fn leak_keeps_a_mebibyte_per_frame_after_the_grace_frames() {
        let mut m = Misbehaviour::new(Config {
            mode: Mode::Leak,
            after: 2,
        });
        for i in 0..5 {
            m.process(i).unwrap();
        }
        assert_eq!(m.leaked_bytes(), 3 * LEAK_BYTES);
        assert!(m.summary_json().contains(r#""frames":5"#));
    }

    #[test]
    fn error_mode_rejects_frames_after_the_grace_frames() {
        let mut m = Misbehaviour::new(Config {
            mode: Mode::Error,
            after: 1,
        });
        assert!(m.process(0).is_ok());
        assert!(m.process(1).unwrap_err().contains("frame 1"));
    }

    #[test]
    #[should_panic(expected = "panicking at frame 0")]
    fn panic_mode_panics() {
        Misbehaviour::new(Config {
            mode: Mode::Panic,
            after: 0,
        })
        .process(0)
        .ok();
    }

    #[test]
    fn spin_mode_does_not_return() {
        let spinner = std::thread::spawn(|| {
            Misbehaviour::new(Config {
                mode: Mode::Spin,
                after: 0,
            })
            .process(0)
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        // The thread cannot be stopped; it ends with the test process.
        assert!(!spinner.is_finished());
    }

    /// Runs the stack mode in a child copy of this test binary, since an overflow aborts
    /// the whole process.
    #[test]
    fn stack_mode_overflows_the_stack() {
        const CHILD: &str = "MISBEHAVE_STACK_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let result = Misbehaviour::new(Config {
                mode: Mode::Stack,
                after: 0,
            })
            .process(0);
            unreachable!("recursion returned: {result:?}");
        }

        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::stack_mode_overflows_the_stack"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&status.stderr);
        assert!(!status.status.success());
        assert!(stderr.contains("overflow"), "child said: {stderr}");
    }

    #[test]
    fn ok_mode_does_nothing() {
        let mut m = Misbehaviour::new(Config::from_json("{}").unwrap());
        for i in 0..3 {
            m.process(i).unwrap();
        }
        assert_eq!((m.frames(), m.leaked_bytes()), (3, 0));
    }
}
