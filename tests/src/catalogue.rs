//! What catalogue tests need: `framehost plugin …` run as a user runs it, the replicas'
//! published status, plugin versions that differ only in their bytes, and routes written
//! behind the command line's back (as a buggy or hostile publisher could).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectMetadata;
use framehost::catalogue::nats::{self, Buckets, ReplicaStatus, RouteDoc};
use framehost::config::Limits;

use crate::{Cluster, artifacts};

/// Bound on a `framehost plugin` command, compile included (a debug build on a busy
/// two-core machine).
pub const COMMAND: Duration = Duration::from_secs(180);

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A copy of the component at `source` in `dir`, with a custom section holding `tag`
/// appended: the same plugin, another digest. Custom sections are ignored by the runtime,
/// so it behaves like the original.
pub fn variant(source: &Path, dir: &Path, tag: &str) -> PathBuf {
    let mut bytes =
        std::fs::read(source).unwrap_or_else(|e| panic!("cannot read {}: {e}", source.display()));
    let name = b"framehost-test-version";
    let mut payload = Vec::new();
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    bytes.push(0); // custom section id
    leb128(&mut bytes, payload.len() as u64);
    bytes.extend_from_slice(&payload);
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin");
    let path = dir.join(format!("{stem}-{tag}.wasm"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl Cluster {
    /// Runs `framehost plugin ARGS` against this cluster's server.
    pub async fn plugin_cli(&self, args: &[&str]) -> CliOutput {
        let mut command = tokio::process::Command::new(artifacts::framehost_bin());
        command.arg("plugin").args(args);
        if args.first() != Some(&"check") {
            command.args(["--nats", &self.nats.url()]);
        }
        command
            .env("NO_COLOR", "1")
            .env_remove("FRAMEHOST_NATS_URL")
            .env_remove("FRAMEHOST_CONFIG")
            .kill_on_drop(true);
        let output = self
            .within(
                COMMAND,
                format!("framehost plugin {}", args.join(" ")),
                command.output(),
            )
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot run framehost plugin: {e}")));
        CliOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `plugin push --job-type T FILE --wait` plus `extra`; fails the test unless every
    /// replica then serves it. Returns the pushed digest.
    pub async fn push_plugin(&self, job_type: &str, file: &Path, extra: &[&str]) -> String {
        let file = file.to_str().expect("UTF-8 path");
        let mut args = vec!["push", "--job-type", job_type, file, "--wait", "150"];
        args.extend_from_slice(extra);
        let out = self.plugin_cli(&args).await;
        self.check(out.success, format!("plugin push failed:\n{}", out.text()));
        framehost::sandbox::digest_of(&std::fs::read(file).expect("pushed file"))
    }

    /// The catalogue buckets, as a host opens them.
    pub async fn buckets(&self) -> Buckets {
        Buckets::open(&self.js, &self.config.catalogue, self.config.nats.replicas)
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot open the catalogue buckets: {e:#}")))
    }

    /// What replica `host` last published, if it is live.
    pub async fn replica(&self, host: &str) -> Option<ReplicaStatus> {
        let buckets = self.buckets().await;
        let value = buckets
            .replicas
            .get(nats::replica_key(host))
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot read the replicas bucket: {e}")))?;
        Some(
            serde_json::from_slice(&value)
                .unwrap_or_else(|e| self.fail(format!("unreadable replica status: {e}"))),
        )
    }

    /// Waits until replica `host` publishes a status for which `done` holds; returns it.
    pub async fn wait_replica(
        &self,
        host: &str,
        what: &str,
        done: impl Fn(&ReplicaStatus) -> bool,
    ) -> ReplicaStatus {
        self.within(COMMAND, format!("replica {host}: {what}"), async {
            loop {
                if let Some(status) = self.replica(host).await
                    && done(&status)
                {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    /// Stores `bytes` as the object of `digest` (whatever they hash to) and routes
    /// `job_type` to `digest`, without any of `plugin push`'s checks.
    pub async fn write_route_unchecked(&self, job_type: &str, digest: &str, bytes: &[u8]) {
        let buckets = self.buckets().await;
        let meta = ObjectMetadata {
            name: nats::object_name(digest),
            ..Default::default()
        };
        buckets
            .objects
            .put(meta, &mut &bytes[..])
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot store the object: {e}")));
        let key = nats::route_key(job_type);
        let previous = buckets
            .routes
            .entry(&key)
            .await
            .ok()
            .flatten()
            .map(|e| e.revision);
        let doc = RouteDoc {
            digest: digest.to_owned(),
            name: "unchecked".into(),
            size: bytes.len() as u64,
            limits: Limits::default(),
            previous,
            pushed_at: 0,
            pushed_by: "test".into(),
            rolled_back_from: None,
        };
        buckets
            .routes
            .put(key, serde_json::to_vec(&doc).expect("serializes").into())
            .await
            .unwrap_or_else(|e| self.fail(format!("cannot write the route: {e}")));
    }
}

/// The digest replica `status` serves for `job_type`, if any.
pub fn serving(status: &ReplicaStatus, job_type: &str) -> Option<String> {
    status
        .catalogue
        .routes
        .get(job_type)?
        .serving
        .as_ref()
        .map(|s| s.digest.clone())
}
