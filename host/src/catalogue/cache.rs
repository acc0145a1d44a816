//! Compiled plugins on disk, so that a restarted host does not compile again.
//!
//! An entry is the machine code wasmtime produced for one component on one engine
//! configuration, named `<component sha256>-<engine key>.cwasm`. The engine key hashes what
//! makes code loadable (wasmtime's version, the target and CPU features, and the engine's
//! settings, memory sizes included), so a changed host compiles afresh instead of
//! loading code built for something else.
//!
//! Loading machine code trusts it completely, so every entry carries a header of our own:
//! a magic, the component digest, the engine key, the code's length and its sha256. An
//! entry is used only when all of them match what this host expects; anything else
//! (truncated, flipped, another engine's) is deleted, counted, and compiled again. The
//! directory is made private to the host's user, and refused when someone else owns it.
//! Entries are written to a temporary file and renamed into place, so a crash leaves no
//! half-written entry under a real name.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;

const MAGIC: &[u8; 8] = b"FHCWASM1";
/// magic, component digest, engine key, code length, code sha256.
const HEADER_LEN: usize = 8 + 32 + 32 + 8 + 32;
const SUFFIX: &str = ".cwasm";
const TEMP_PREFIX: &str = ".tmp-";

pub struct ArtifactCache {
    dir: PathBuf,
    engine_key: [u8; 32],
    /// The engine key's first 16 hex digits, part of every entry's name.
    engine_tag: String,
}

/// Why a cached entry was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheMiss {
    #[error("no entry")]
    Absent,
    #[error("entry {path} is unusable ({why}); deleted")]
    Invalid { path: PathBuf, why: String },
}

impl ArtifactCache {
    /// Opens (creating it, mode 0700) the cache directory, and clears out what this engine
    /// cannot use: temporary files of an interrupted write and entries of other engines.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let meta = fs::metadata(dir)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to user {}, not to this host's user {me}: compiled code is run \
                     as is, so the cache must be private",
                    dir.display(),
                    meta.uid()
                ),
            ));
        }
        let exposed = meta.permissions().mode() & 0o022 != 0;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let engine_key = engine_key(engine);
        let engine_tag = hex(&engine_key[..8]);
        let cache = Self {
            dir: dir.to_path_buf(),
            engine_key,
            engine_tag,
        };
        if exposed {
            // Others could write here: nothing in it can be trusted to run.
            tracing::warn!(dir = %dir.display(), "The compiled-plugin cache was writable by others; emptying it");
            cache.sweep_all();
        }
        cache.sweep();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest_hex: &str) -> PathBuf {
        self.dir
            .join(format!("{digest_hex}-{}{SUFFIX}", self.engine_tag))
    }

    /// The verified machine code for the component whose sha256 is `digest_hex`.
    pub fn get(&self, digest_hex: &str) -> Result<Vec<u8>, CacheMiss> {
        let path = self.path(digest_hex);
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                if let Err(why) = trusted(&meta) {
                    return Err(self.invalid(path, why));
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheMiss::Absent);
            }
            Err(error) => return Err(self.invalid(path, error.to_string())),
        }
        let mut bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheMiss::Absent);
            }
            Err(error) => return Err(self.invalid(path, error.to_string())),
        };
        match self.verify(digest_hex, &bytes) {
            Ok(()) => Ok(bytes.split_off(HEADER_LEN)),
            Err(why) => Err(self.invalid(path, why)),
        }
    }

    /// Deletes an entry that could not be used, so that it is written afresh.
    pub fn invalid(&self, path: PathBuf, why: String) -> CacheMiss {
        if fs::remove_file(&path).is_err() {
            fs::remove_dir_all(&path).ok();
        }
        CacheMiss::Invalid { path, why }
    }

    /// Deletes the entry of `digest_hex`: wasmtime refused its code.
    pub fn evict(&self, digest_hex: &str, why: String) -> CacheMiss {
        self.invalid(self.path(digest_hex), why)
    }

    fn verify(&self, digest_hex: &str, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("{} bytes, shorter than the header", bytes.len()));
        }
        let (header, code) = bytes.split_at(HEADER_LEN);
        if &header[..8] != MAGIC {
            return Err("not a framehost cache entry".into());
        }
        if hex(&header[8..40]) != digest_hex {
            return Err("written for another component".into());
        }
        if header[40..72] != self.engine_key {
            return Err("written by another engine".into());
        }
        let len = u64::from_le_bytes(header[72..80].try_into().expect("8 bytes"));
        if len != code.len() as u64 {
            return Err(format!(
                "code is {} bytes, the header says {len}",
                code.len()
            ));
        }
        if Sha256::digest(code)[..] != header[80..112] {
            return Err("code does not match its checksum".into());
        }
        Ok(())
    }

    /// Stores the machine code of the component whose sha256 is `digest_hex`.
    pub fn put(&self, digest_hex: &str, code: &[u8]) -> std::io::Result<()> {
        let digest = decode_hex32(digest_hex).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{digest_hex:?} is not a sha256 in hex"),
            )
        })?;
        let mut file = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.dir)?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&digest);
        header.extend_from_slice(&self.engine_key);
        header.extend_from_slice(&(code.len() as u64).to_le_bytes());
        header.extend_from_slice(&Sha256::digest(code));
        file.write_all(&header)?;
        file.write_all(code)?;
        file.as_file().sync_all()?;
        file.persist(self.path(digest_hex))
            .map_err(|error| error.error)?;
        Ok(())
    }

    /// Entries and their total size, for `plugin list`.
    pub fn usage(&self) -> (usize, u64) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
            .filter_map(|e| e.metadata().ok())
            .fold((0, 0), |(n, bytes), meta| (n + 1, bytes + meta.len()))
    }

    /// Removes every entry and temporary file.
    fn sweep_all(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(SUFFIX) || name.starts_with(TEMP_PREFIX) {
                self.invalid(entry.path(), "swept".into());
            }
        }
    }

    /// Removes temporary files and entries this engine cannot load.
    fn sweep(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mine = format!("-{}{SUFFIX}", self.engine_tag);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale =
                name.starts_with(TEMP_PREFIX) || (name.ends_with(SUFFIX) && !name.ends_with(&mine));
            if stale {
                tracing::debug!(file = %name, "Removing a stale compiled-plugin cache file");
                fs::remove_file(entry.path()).ok();
            }
        }
    }
}

/// Whether an entry is one this host wrote: a regular file (not a link, pipe or device) of
/// this user that nobody else may write.
fn trusted(meta: &fs::Metadata) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != me {
        return Err(format!("owned by user {}, not {me}", meta.uid()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err("writable by others".into());
    }
    Ok(())
}

/// What identifies code this engine can load: wasmtime's own compatibility hash, fed
/// through sha256 (std's hashers are not stable across Rust releases), and our format.
fn engine_key(engine: &Engine) -> [u8; 32] {
    struct Sha256Hasher(Sha256);
    impl Hasher for Sha256Hasher {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            unreachable!("only the sha256 is read")
        }
    }
    let mut hasher = Sha256Hasher(Sha256::new());
    MAGIC.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.0.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        write!(s, "{b:02x}").expect("writing to a String");
        s
    })
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path) -> ArtifactCache {
        ArtifactCache::open(dir, &Engine::default()).unwrap()
    }

    const DIGEST: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn an_entry_round_trips_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        assert!(matches!(cache.get(DIGEST), Err(CacheMiss::Absent)));
        cache.put(DIGEST, b"machine code").unwrap();
        assert_eq!(cache.get(DIGEST).unwrap(), b"machine code");
        assert_eq!(cache.usage().0, 1);

        // One flipped bit in the code: refused, deleted.
        let path = cache.path(DIGEST);
        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&path, &bytes).unwrap();
        let miss = cache.get(DIGEST).unwrap_err();
        assert!(miss.to_string().contains("checksum"), "{miss}");
        assert!(!path.exists());

        // A truncated entry, and an entry copied under another component's name.
        cache.put(DIGEST, b"machine code").unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..HEADER_LEN - 1]).unwrap();
        assert!(
            cache
                .get(DIGEST)
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
        let other = DIGEST.replace("00", "11");
        fs::write(cache.path(&other), &bytes).unwrap();
        let miss = cache.get(&other).unwrap_err();
        assert!(miss.to_string().contains("another component"), "{miss}");
    }

    #[test]
    fn entries_others_could_have_written_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        cache.put(DIGEST, b"code").unwrap();
        let path = cache.path(DIGEST);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let miss = cache.get(DIGEST).unwrap_err();
        assert!(miss.to_string().contains("writable by others"), "{miss}");
        assert!(!path.exists());

        // A pipe under an entry's name is refused without being opened (which would block).
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let miss = cache.get(DIGEST).unwrap_err();
        assert!(miss.to_string().contains("not a regular file"), "{miss}");

        // A directory others could write: everything in it is thrown away on open.
        cache.put(DIGEST, b"code").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let reopened = ArtifactCache::open(dir.path(), &Engine::default()).unwrap();
        assert!(matches!(reopened.get(DIGEST), Err(CacheMiss::Absent)));
    }

    #[test]
    fn opening_sweeps_temporary_files_and_other_engines_entries() {
        let dir = tempfile::tempdir().unwrap();
        let first = cache(dir.path());
        first.put(DIGEST, b"code").unwrap();
        fs::write(dir.path().join(".tmp-half"), b"x").unwrap();
        fs::write(
            dir.path().join(format!("{DIGEST}-0000000000000000.cwasm")),
            b"x",
        )
        .unwrap();
        let again = cache(dir.path());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("{DIGEST}-{}.cwasm", again.engine_tag)]);
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
