//! `framehost serve`, run as an operator runs it: a binary, a config file, a host name.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use framehost::config::Config;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::artifacts;
use crate::nats_server::{free_port, tail};
use crate::scrape::{self, Answer, Scrape};

/// A running `framehost serve`. Its config and log live in a temporary directory; dropping
/// it kills the process.
pub struct HostProcess {
    name: String,
    child: Child,
    dir: TempDir,
    metrics_port: u16,
}

impl HostProcess {
    /// Writes `config` as TOML and starts `framehost serve --config FILE` with
    /// `HOSTNAME=name`, so that its status messages say which host ran a job. Output goes to
    /// a log file (see [`HostProcess::log_tail`]). Its metrics endpoint listens on a free
    /// port of 127.0.0.1 of its own ([`HostProcess::metrics_port`]).
    pub fn start(name: &str, config: &Config) -> anyhow::Result<Self> {
        Self::start_with_env(name, config, &[])
    }

    /// [`HostProcess::start`], with `env` added to its environment.
    pub fn start_with_env(
        name: &str,
        config: &Config,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let metrics_port = free_port()?;
        let mut config = config.clone();
        config.metrics.enabled = true;
        config.metrics.listen = ([127, 0, 0, 1], metrics_port).into();
        let dir = tempfile::Builder::new()
            .prefix(&format!("framehost-host-{name}-"))
            .tempdir()
            .context("cannot create the host's directory")?;
        let config_path = dir.path().join("framehost.toml");
        let toml = toml::to_string(&config).context("cannot write the config as TOML")?;
        std::fs::write(&config_path, toml)
            .with_context(|| format!("cannot write {}", config_path.display()))?;

        let log = std::fs::File::create(dir.path().join("host.log"))
            .context("cannot create the host's log")?;
        let child = Command::new(artifacts::framehost_bin())
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("HOSTNAME", name)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,wasmtime=warn,cranelift=warn")
            .env_remove("FRAMEHOST_NATS_URL")
            .env_remove("FRAMEHOST_CONFIG")
            .env_remove("FRAMEHOST_LOG_JSON")
            .envs(env.iter().map(|(k, v)| (k, v)))
            // The host's LiveKit settings come from the test's config only.
            .env_remove("LIVEKIT_API_KEY")
            .env_remove("LIVEKIT_API_SECRET")
            // livekit-signaling sends even loopback WebSockets through a proxy variable's
            // proxy (it reads no NO_PROXY): tests talk to their own double directly.
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot run framehost serve")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            dir,
            metrics_port,
        })
    }

    /// The port of its `/metrics`, `/healthz` and `/readyz`, on 127.0.0.1.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// `GET path` on its metrics endpoint.
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        scrape::get(self.metrics_port, path).await
    }

    /// Its metrics now.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        let answer = self.get("/metrics").await?;
        if answer.status != 200 {
            bail!("GET /metrics answered {}: {}", answer.status, answer.body);
        }
        Scrape::parse(&answer.body)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The host name it reports in status messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("framehost.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("host.log")
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// Waits until the host has loaded its plugins and pulls jobs (it logs "Serving jobs"),
    /// or fails if it exits first or takes longer than `limit`.
    pub async fn wait_serving(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.log().contains("Serving jobs") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "host {} exited before serving ({status}); its log:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            if started.elapsed() > limit {
                bail!(
                    "host {} did not start serving within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills it at once (SIGKILL), as an OOM kill or a node failure would, and reaps it.
    pub async fn kill9(&mut self) {
        self.child.start_kill().ok();
        self.child.wait().await.ok();
    }

    /// Asks it to shut down gracefully (SIGTERM), as Kubernetes does.
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid this struct owns (not yet reaped, so not reused) and
            // a valid signal number has no memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The directory holding its config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
