//! The local source: the `[job_types]` files of the configuration and the catalogue
//! directory's `<job type>.wasm` files, looked at every `catalogue.poll_interval_ms`.
//!
//! Polling rather than inotify: it sees changes made over NFS, in another mount namespace
//! and by a Kubernetes ConfigMap swapping its `..data` link, and it costs a few `stat`s. A
//! file is read once it has stayed the same (size, modification time, inode) for one whole
//! interval, so a plugin being copied in is not loaded half-written. Limits come from an
//! optional `<job type>.toml` beside the plugin, over `[catalogue.defaults]`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Catalogue, Fetch, Origin, Refusal, RouteSpec, Step, check_job_type};
use crate::config::{Config, Limits, LimitsPatch};
use crate::sandbox::digest_of;

/// What identifies a file's version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        meta.is_file().then(|| Self {
            len: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ino: meta.ino(),
        })
    }
}

/// One job type's files as last seen.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    stamps: (Option<Stamp>, Option<Stamp>),
    /// The stamps were the same at the previous look too.
    settled: bool,
    /// What was last offered: digest, limits, and whether it was unusable.
    offered: Option<(String, Limits, bool)>,
}

/// Where a job type's files are, and what they are worth without a `.toml`.
#[derive(Debug, Clone)]
struct Candidate {
    plugin: PathBuf,
    limits_file: Option<PathBuf>,
    base: Limits,
    origin: Origin,
}

pub struct DirSource {
    catalogue: Arc<Catalogue>,
    dir: Option<PathBuf>,
    pinned: BTreeMap<String, Candidate>,
    defaults: Limits,
    interval: Duration,
    max_bytes: u64,
    seen: BTreeMap<(Origin, String), Seen>,
    /// Names in the directory already reported as unusable.
    warned: std::collections::BTreeSet<String>,
}

impl DirSource {
    pub fn new(catalogue: Arc<Catalogue>, config: &Config) -> Self {
        let defaults = config.catalogue.defaults;
        let pinned = config
            .job_types
            .iter()
            .map(|(name, t)| {
                let candidate = Candidate {
                    plugin: t.plugin.clone(),
                    limits_file: None,
                    base: t.limits(&defaults),
                    origin: Origin::Config,
                };
                (name.clone(), candidate)
            })
            .collect();
        Self {
            max_bytes: catalogue.max_plugin_bytes(),
            catalogue,
            dir: config.catalogue.dir.clone(),
            pinned,
            defaults,
            interval: Duration::from_millis(config.catalogue.poll_interval_ms),
            seen: BTreeMap::new(),
            warned: Default::default(),
        }
    }

    /// Loads what is there now (every file at once, settled or not), then watches until
    /// `stop`. Registers with the catalogue as a source, ready after the first look.
    pub fn spawn(mut self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        self.catalogue.add_source();
        tokio::spawn(async move {
            self.look(true).await;
            self.catalogue.source_ready();
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => self.look(false).await,
                }
            }
        })
    }

    /// The files to look at; `None` for the directory's part when it cannot be listed
    /// right now (so that what it served is kept, not withdrawn, through a hiccup).
    fn candidates(&mut self) -> (BTreeMap<(Origin, String), Candidate>, bool) {
        let mut out: BTreeMap<_, _> = self
            .pinned
            .iter()
            .map(|(name, c)| ((c.origin, name.clone()), c.clone()))
            .collect();
        let Some(dir) = &self.dir else {
            return (out, true);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                if self.warned.insert(String::new()) {
                    tracing::warn!(dir = %dir.display(), error = %error, "Cannot read the catalogue directory; its plugins keep serving as they were");
                }
                return (out, false);
            }
        };
        self.warned.remove("");
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            if let Err(error) = check_job_type(&name) {
                if self.warned.insert(name.clone()) {
                    tracing::warn!(file = %path.display(), "Ignoring a plugin file: {error}");
                }
                continue;
            }
            let candidate = Candidate {
                limits_file: Some(path.with_extension("toml")),
                plugin: path,
                base: self.defaults,
                origin: Origin::Dir,
            };
            out.insert((Origin::Dir, name), candidate);
        }
        (out, true)
    }

    /// One look at every file: offers what changed and settled, withdraws what is gone.
    async fn look(&mut self, first: bool) {
        let (candidates, dir_listed) = self.candidates();
        let gone: Vec<_> = self
            .seen
            .keys()
            .filter(|key| !candidates.contains_key(*key))
            .filter(|(origin, _)| dir_listed || *origin != Origin::Dir)
            .cloned()
            .collect();
        for (origin, name) in gone {
            self.seen.remove(&(origin, name.clone()));
            tracing::info!(job_type = %name, origin = ?origin, "Plugin file removed");
            self.catalogue.withdraw(&name, origin).await;
        }
        for ((origin, name), candidate) in candidates {
            let stamps = (
                Stamp::of(&candidate.plugin),
                candidate.limits_file.as_deref().and_then(Stamp::of),
            );
            let key = (origin, name.clone());
            let seen = self.seen.entry(key).or_insert_with(|| Seen {
                stamps,
                settled: false,
                offered: None,
            });
            let unchanged = seen.stamps == stamps;
            seen.stamps = stamps;
            let ready = first || (unchanged && !seen.settled);
            seen.settled = unchanged;
            if !ready {
                continue;
            }
            let spec = self.read(&name, &candidate).await;
            let seen = self.seen.get_mut(&(origin, name)).expect("inserted above");
            let version = (spec.digest.clone(), spec.limits, spec.unusable.is_some());
            if seen.offered.as_ref() != Some(&version) {
                seen.offered = Some(version);
                self.catalogue.offer(spec).await;
            }
        }
    }

    /// Reads a job type's files into a spec. A plugin or limits file that cannot be read
    /// still makes a spec, marked unusable: the catalogue refuses it (so `plugin list` says
    /// why), the version before it keeps serving, and the job type stays wanted, so its jobs
    /// wait for a replica that can serve them instead of failing as unknown.
    async fn read(&self, name: &str, candidate: &Candidate) -> RouteSpec {
        let (digest, mut unusable) = match read_plugin(&candidate.plugin, self.max_bytes).await {
            Ok(bytes) => (digest_of(&bytes), None),
            Err(refusal) => (String::new(), Some(refusal)),
        };
        let limits = match &candidate.limits_file {
            Some(path) => read_limits(path, &candidate.base).unwrap_or_else(|reason| {
                unusable.get_or_insert(Refusal::new(
                    Step::Limits,
                    format!("{}: {reason}", path.display()),
                ));
                candidate.base
            }),
            None => candidate.base,
        };
        RouteSpec {
            job_type: name.to_owned(),
            name: candidate
                .plugin
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(name)
                .to_owned(),
            digest,
            limits,
            origin: candidate.origin,
            revision: None,
            fetch: Fetch::File(candidate.plugin.clone()),
            unusable,
            stands_in_for: None,
        }
    }
}

/// A `<job type>.toml` over `base`; no file means `base`.
fn read_limits(path: &Path, base: &Limits) -> Result<Limits, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str::<LimitsPatch>(&text)
            .map(|patch| patch.apply(base))
            .map_err(|e| e.to_string()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(*base),
        Err(error) => Err(error.to_string()),
    }
}

/// Reads a plugin file, refusing one larger than `max_bytes` before reading it.
pub async fn read_plugin(path: &Path, max_bytes: u64) -> Result<Vec<u8>, Refusal> {
    use tokio::io::AsyncReadExt;
    let fail = |e: std::io::Error| Refusal::new(Step::Fetch, format!("{}: {e}", path.display()));
    let meta = tokio::fs::metadata(path).await.map_err(fail)?;
    // A pipe would block the read for good, and a device (a link to /dev/zero) has no
    // length to bound it by.
    if !meta.is_file() {
        return Err(Refusal::new(
            Step::Fetch,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let len = meta.len();
    if len > max_bytes {
        return Err(Refusal::new(
            Step::Fetch,
            format!(
                "{} is {len} bytes, over catalogue.max_plugin_mib ({} bytes)",
                path.display(),
                max_bytes
            ),
        ));
    }
    let file = tokio::fs::File::open(path).await.map_err(fail)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(fail)?;
    if bytes.len() as u64 > max_bytes {
        return Err(Refusal::new(
            Step::Fetch,
            format!("{} grew past {max_bytes} bytes while read", path.display()),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_regular_files_within_the_bound_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("ok.wasm");
        std::fs::write(&plugin, b"\0asm").unwrap();
        assert_eq!(read_plugin(&plugin, 4).await.unwrap(), b"\0asm");
        let refusal = read_plugin(&plugin, 3).await.unwrap_err();
        assert!(
            refusal.reason.contains("over catalogue.max_plugin_mib"),
            "{refusal:?}"
        );

        // A pipe would block the reader for good; a device has no length to bound.
        let pipe = dir.path().join("pipe.wasm");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&pipe)
                .status()
                .unwrap()
                .success()
        );
        let zero = dir.path().join("zero.wasm");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for path in [pipe, zero, dir.path().to_path_buf()] {
            let refusal = read_plugin(&path, 1 << 20).await.unwrap_err();
            assert!(refusal.reason.contains("not a regular file"), "{refusal:?}");
        }
    }

    #[test]
    fn a_limits_file_lays_over_the_base_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let base = Limits::default();
        assert_eq!(read_limits(&path, &base).unwrap(), base);
        std::fs::write(&path, "memory_mib = 40\n").unwrap();
        assert_eq!(read_limits(&path, &base).unwrap().memory_mib, 40);
        std::fs::write(&path, "memry_mib = 40\n").unwrap();
        assert!(read_limits(&path, &base).unwrap_err().contains("memry_mib"));
    }
}
