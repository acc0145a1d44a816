//! A `nats-server` with JetStream, private to one test.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

/// How long a starting server may take to accept connections and serve JetStream.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// The system's own server, which tests never touch.
const SYSTEM_PORT: u16 = 4222;

/// A `nats-server -js` on 127.0.0.1 and a free port, storing into its own temporary
/// directory. Dropping it kills the server and removes the directory.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    binary: PathBuf,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections and answers JetStream.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("framehost-nats-")
            .tempdir()
            .context("cannot create the server's storage directory")?;
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            binary,
        };
        // Another process may take the port between picking it and the server binding it:
        // pick again.
        let mut last_error = None;
        for _ in 0..3 {
            server.port = free_port()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(error) => {
                    server.kill();
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Kills the server if it runs, and starts it again on the same port and storage: what
    /// JetStream had persisted is back.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let store = self.dir.path().join("jetstream");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("cannot open the server's log")?;
        let child = Command::new(&self.binary)
            .args(["-js", "-sd"])
            .arg(&store)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "nats-server on port {} exited at start ({status}); its log:\n{}",
                    self.port,
                    self.log_tail(20)
                );
            }
            if jetstream_answers(&self.url()).await {
                return Ok(());
            }
            if started.elapsed() > READY_WITHIN {
                bail!(
                    "nats-server on port {} did not serve JetStream within {READY_WITHIN:?}; \
                     its log:\n{}",
                    self.port,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn jetstream_answers(url: &str) -> bool {
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(url);
    let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
        return false;
    };
    // The raw account-info request: the client's typed one does not parse every server
    // version's answer. JetStream is up when it answers without an error.
    let request = client.request("$JS.API.INFO", "".into());
    let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), request).await else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .is_ok_and(|answer| answer.get("error").is_none() && answer.get("limits").is_some())
}

pub(crate) fn find_binary() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|path| path.is_file())
        .context("nats-server not found: run scripts/test, which installs it")
}

/// A port nothing listens on now: bound on port 0, then released for the server.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot bind a local port to pick a free one")?;
        let port = listener.local_addr()?.port();
        if port != SYSTEM_PORT {
            return Ok(port);
        }
    }
}

/// The last `lines` lines of a text file, or a note that it cannot be read.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}
