//! Small synthetic captures, made with the library's own generator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use framehost::capture::synth::{SynthOptions, SynthReport, synth};

/// A capture of `frames` frames of about `image_kib` KiB each, every frame message split into
/// `parts` parts, recorded at `fps`; four synthetic objects move across the frames.
pub fn options(frames: u32, image_kib: u32, parts: u32, fps: f64) -> SynthOptions {
    SynthOptions {
        frames,
        image_kib,
        parts,
        fps,
        ..Default::default()
    }
}

/// Writes a capture to `path`.
pub fn make(path: &Path, options: &SynthOptions) -> SynthReport {
    synth(options, path, |_| {})
        .unwrap_or_else(|e| panic!("cannot make a capture at {}: {e}", path.display()))
}

/// A capture made once per test process and shared by its tests: `<dir>/<name>.cap`.
///
/// Made under a temporary name and renamed into place, so that another test run sharing the
/// directory (the shared target dir) never reads a half-written file.
pub fn shared(dir: &Path, name: &str, options: &SynthOptions) -> PathBuf {
    static MADE: OnceLock<Mutex<HashMap<PathBuf, SynthReport>>> = OnceLock::new();
    let path = dir.join(format!("{name}.cap"));
    let mut made = MADE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !made.contains_key(&path) {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let partial = dir.join(format!("{name}.cap.{}.partial", std::process::id()));
        let report = make(&partial, options);
        std::fs::rename(&partial, &path)
            .unwrap_or_else(|e| panic!("cannot move the capture to {}: {e}", path.display()));
        made.insert(path.clone(), report);
    }
    path
}
