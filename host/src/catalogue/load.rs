//! Turning a plugin's bytes into a [`Plugin`]: the checks before compiling, compiling (or
//! loading cached machine code) and linking against the world. Each failure names its
//! [`Step`], so that an operator sees where a version was refused.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use wasmtime::Engine;

use super::cache::{ArtifactCache, CacheMiss};
use crate::sandbox::{LoadError, Plugin, Sandbox, digest_of};

/// Where loading a version stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The route's limits do not fit this host.
    Limits,
    /// The bytes could not be read or downloaded, or are too large.
    Fetch,
    /// The bytes are not the ones the route names.
    Digest,
    /// Not a WebAssembly component (a core module, precompiled code, something else).
    NotComponent,
    /// wasmtime could not compile it.
    Compile,
    /// Its imports or exports do not fit the `frame-processor` world.
    World,
    /// Instantiating it failed: wrong export types, or its start-up code trapped.
    Instantiate,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limits => "limits",
            Self::Fetch => "fetch",
            Self::Digest => "digest",
            Self::NotComponent => "not_component",
            Self::Compile => "compile",
            Self::World => "world",
            Self::Instantiate => "instantiate",
        }
    }
}

/// Why a version was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{step:?} failed: {reason}")]
pub struct Refusal {
    pub step: Step,
    pub reason: String,
}

impl Refusal {
    pub fn new(step: Step, reason: impl Into<String>) -> Self {
        Self {
            step,
            reason: reason.into(),
        }
    }
}

impl From<LoadError> for Refusal {
    fn from(error: LoadError) -> Self {
        let step = match error {
            LoadError::Compile(_) => Step::Compile,
            LoadError::World(_) => Step::World,
            LoadError::Read { .. } => Step::Fetch,
        };
        Self::new(step, error.to_string())
    }
}

/// Checks that `bytes` are a WebAssembly component whose digest is `digest`, before any
/// compiler sees them.
pub fn check_bytes(bytes: &[u8], digest: Option<&str>) -> Result<(), Refusal> {
    if let Some(expected) = digest {
        let actual = digest_of(bytes);
        if actual != expected {
            return Err(Refusal::new(
                Step::Digest,
                format!("the bytes hash to {actual}, the route names {expected}"),
            ));
        }
    }
    check_kind(bytes)
}

/// A component starts with the wasm magic and version 0x0d, layer 1; a core module with
/// version 1, layer 0.
fn check_kind(bytes: &[u8]) -> Result<(), Refusal> {
    let refuse = |reason: &str| Err(Refusal::new(Step::NotComponent, reason));
    if Engine::detect_precompiled(bytes).is_some() {
        return refuse(
            "precompiled machine code (.cwasm) is never accepted: publish the .wasm component",
        );
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return refuse("not a WebAssembly file (no \\0asm magic)");
    }
    match bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => refuse(
            "a core WebAssembly module, not a component: build for wasm32-wasip2, or wrap \
             the module with `wasm-tools component new`",
        ),
        _ => refuse("an unknown WebAssembly version or layer"),
    }
}

/// Compiles components, through the on-disk cache when there is one. Counts what it does,
/// for `plugin list` and the tests that prove a restart does not compile.
pub struct Compiler {
    sandbox: Sandbox,
    cache: Option<ArtifactCache>,
    compiles: AtomicU64,
    cache_hits: AtomicU64,
    cache_invalid: AtomicU64,
}

/// What a [`Compiler`] has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompileCounts {
    pub compiles: u64,
    pub cache_hits: u64,
    pub cache_invalid: u64,
}

impl Compiler {
    pub fn new(sandbox: Sandbox, cache: Option<ArtifactCache>) -> Self {
        Self {
            sandbox,
            cache,
            compiles: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_invalid: AtomicU64::new(0),
        }
    }

    pub fn cache(&self) -> Option<&ArtifactCache> {
        self.cache.as_ref()
    }

    pub fn counts(&self) -> CompileCounts {
        CompileCounts {
            compiles: self.compiles.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_invalid: self.cache_invalid.load(Ordering::Relaxed),
        }
    }

    /// Checks, compiles (or loads the cached code) and links a component whose bytes have
    /// the digest `digest`. Blocking: seconds of CPU for a large plugin that is not cached.
    pub fn load(&self, name: &str, digest: &str, bytes: &[u8]) -> Result<Plugin, Refusal> {
        check_bytes(bytes, Some(digest))?;
        let digest_hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        if let Some(plugin) = self.load_cached(name, digest, digest_hex, bytes.len()) {
            return Ok(plugin);
        }
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let component = self.sandbox.compile(bytes)?;
        let plugin = self.sandbox.link(name, digest, bytes.len(), &component)?;
        if let Some(cache) = &self.cache {
            let stored = component
                .serialize()
                .map_err(std::io::Error::other)
                .and_then(|code| cache.put(digest_hex, &code));
            if let Err(error) = stored {
                tracing::warn!(digest, error = %error, dir = %cache.dir().display(), "Cannot cache the compiled plugin");
            }
        }
        Ok(plugin)
    }

    fn load_cached(
        &self,
        name: &str,
        digest: &str,
        digest_hex: &str,
        size: usize,
    ) -> Option<Plugin> {
        let cache = self.cache.as_ref()?;
        let miss = match cache.get(digest_hex) {
            Ok(code) => {
                // SAFETY: `code` passed the entry's checksum, engine key and digest checks:
                // it is what `Component::serialize` wrote into our private cache directory
                // for this component on an engine with these settings.
                match unsafe { self.sandbox.deserialize(&code) } {
                    Ok(component) => {
                        // A component that compiled and linked before links again; if the
                        // world changed under it, compiling afresh says so properly.
                        match self.sandbox.link(name, digest, size, &component) {
                            Ok(plugin) => {
                                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                                return Some(plugin);
                            }
                            Err(error) => cache.evict(digest_hex, error.to_string()),
                        }
                    }
                    Err(error) => cache.evict(digest_hex, format!("{error:#}")),
                }
            }
            Err(miss) => miss,
        };
        if let CacheMiss::Invalid { path, why } = &miss {
            self.cache_invalid.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(digest, path = %path.display(), why, "Cached compiled plugin not used; compiling again");
        }
        None
    }
}
