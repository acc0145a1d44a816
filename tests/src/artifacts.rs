//! The framehost binary and the plugins, as built by `scripts/test` before the tests run.
//!
//! Tests never invoke cargo themselves: `cargo test` holds the build lock, and a build from
//! inside a test would wait for it forever.

use std::path::{Path, PathBuf};

/// The workspace's target directory: `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let workspace = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        // A relative target dir is relative to where cargo was run: the workspace root for
        // scripts/test.
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("target"),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// `target/debug/framehost`, or the binary `$FRAMEHOST_BIN` names (benchmarks run the
/// release build).
pub fn framehost_bin() -> PathBuf {
    let path = match std::env::var_os("FRAMEHOST_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => target_dir().join("debug").join("framehost"),
    };
    if !path.is_file() {
        panic!(
            "the framehost binary is missing at {}: run `cargo build -p framehost` first \
             (scripts/test does it before `cargo test`)",
            path.display()
        );
    }
    path
}

/// The multi-object tracker plugin.
pub fn tracker() -> PathBuf {
    plugin("tracker")
}

/// The plugin that decodes each frame's image and reports colour statistics.
pub fn frame_stats() -> PathBuf {
    plugin("frame_stats")
}

/// The test plugin that misbehaves as its job config says.
pub fn misbehave() -> PathBuf {
    plugin("misbehave")
}

/// A valid component of another world (it does not export the processor interface).
pub fn other_world() -> PathBuf {
    plugin("other_world")
}

/// A component exporting the processor interface by name, with the wrong function types.
pub fn bad_signature() -> PathBuf {
    plugin("bad_signature")
}

/// The test plugin that tries to read files and the environment and to open sockets, and
/// reports what it got.
pub fn escape() -> PathBuf {
    plugin("escape")
}

/// `target/wasm32-wasip2/release/<name>.wasm`.
pub fn plugin(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip2")
        .join("release")
        .join(format!("{name}.wasm"));
    if !path.is_file() {
        panic!(
            "plugin {name} is missing at {}: run `scripts/build-plugins` first \
             (scripts/test does it before `cargo test`)",
            path.display()
        );
    }
    path
}
