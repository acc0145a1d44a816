//! The NATS service of one test: a `nats-server` with JetStream, or a cluster of them.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long a starting server may take to accept connections and serve JetStream; for a
/// cluster, to elect its JetStream meta leader and place replicated streams.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// The system's own server, which tests never touch.
const SYSTEM_PORT: u16 = 4222;
/// Name of the test clusters' route mesh.
const CLUSTER_NAME: &str = "framehost-test";
/// A stream the cluster harness creates and deletes to learn that JetStream can place a
/// replicated stream.
const PROBE_STREAM: &str = "HARNESS_PROBE";

/// `nats-server`s with JetStream on 127.0.0.1 and free ports, each storing into its own
/// directory under one temporary directory: a single server ([`NatsServer::start`]) or a
/// cluster ([`NatsServer::start_cluster`]). Dropping it kills every server and removes the
/// directory.
pub struct NatsServer {
    nodes: Vec<Node>,
    dir: TempDir,
    binary: PathBuf,
    /// Whether the servers form a cluster (routes, a JetStream meta group).
    clustered: bool,
}

/// One server of the service.
struct Node {
    /// Its `server_name`, which JetStream reports as a stream's leader: `n1`, `n2`, ...
    name: String,
    client_port: u16,
    /// Cluster nodes only: the route port and the monitoring (HTTP) port.
    cluster_port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections and answers JetStream.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_nodes(1, false).await
    }

    /// Starts `size` servers routed into one cluster with JetStream, and waits until they
    /// have elected a meta leader and a stream with `size` replicas can be placed.
    ///
    /// nats-server 2.9 answers JetStream requests with "temporarily unavailable" until the
    /// meta leader is elected, and refuses replicated streams ("insufficient resources")
    /// until the leader has heard from every peer, hence the probe stream.
    pub async fn start_cluster(size: usize) -> anyhow::Result<Self> {
        Self::start_nodes(size, true).await
    }

    async fn start_nodes(size: usize, clustered: bool) -> anyhow::Result<Self> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("framehost-nats-")
            .tempdir()
            .context("cannot create the servers' storage directory")?;
        let nodes = (1..=size)
            .map(|n| Node {
                name: format!("n{n}"),
                client_port: 0,
                cluster_port: 0,
                monitor_port: 0,
                child: None,
            })
            .collect();
        let mut server = Self {
            nodes,
            dir,
            binary,
            clustered,
        };
        // Another process may take a port between picking it and a server binding it: pick
        // again.
        let mut last_error = None;
        for _ in 0..3 {
            let ports = free_ports(size * 3)?;
            for (node, ports) in server.nodes.iter_mut().zip(ports.chunks(3)) {
                node.client_port = ports[0];
                node.cluster_port = ports[1];
                node.monitor_port = ports[2];
            }
            let started = async {
                for index in 0..size {
                    server.spawn(index)?;
                }
                server.wait_ready().await
            };
            match started.await {
                Ok(()) => return Ok(server),
                Err(error) => {
                    server.kill();
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Every server's client URL, comma separated (`nats.url` takes such a list):
    /// `nats://127.0.0.1:<port>` for a single server.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.node_url(i)).collect()
    }

    /// The client URL of server `index` alone.
    pub fn node_url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[index].client_port)
    }

    /// The `server_name` of server `index`, as JetStream names leaders.
    pub fn node_name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }

    /// The index of the server called `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kills every server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_node(index);
        }
    }

    /// Kills server `index` at once (SIGKILL), as a crash or a lost node would.
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Kills every server that runs, and starts them again on the same ports and storage:
    /// what JetStream had persisted is back.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        for index in 0..self.nodes.len() {
            self.spawn(index)?;
        }
        self.wait_ready().await
    }

    /// Starts server `index` again (killing it first if it runs) on its ports and storage,
    /// and waits until it serves JetStream again: for a cluster, until it follows a meta
    /// leader.
    pub async fn restart_node(&mut self, index: usize) -> anyhow::Result<()> {
        self.kill_node(index);
        self.spawn(index)?;
        self.wait_node_ready(index, Instant::now()).await
    }

    /// Connections server `index` holds whose client gave `name` as its connection name,
    /// from its monitoring endpoint. Cluster servers only.
    pub async fn connections_named(&self, index: usize, name: &str) -> anyhow::Result<usize> {
        let connz = self.monitor(index, "/connz?limit=4096").await?;
        let connections = connz["connections"].as_array().cloned().unwrap_or_default();
        Ok(connections
            .iter()
            .filter(|c| c["name"].as_str() == Some(name))
            .count())
    }

    /// The JetStream meta leader as server `index` sees it, if it knows one. Cluster
    /// servers only.
    pub async fn meta_leader(&self, index: usize) -> anyhow::Result<Option<String>> {
        let jsz = self.monitor(index, "/jsz").await?;
        Ok(jsz["meta_cluster"]["leader"]
            .as_str()
            .filter(|leader| !leader.is_empty())
            .map(str::to_owned))
    }

    /// The last `lines` lines of each server's log, headed by its name.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "----- log of nats-server {} (port {}, last {lines} lines) -----\n{}\n",
                node.name,
                node.client_port,
                tail(&self.log_path(node), lines)
            ));
        }
        out
    }

    fn node_dir(&self, node: &Node) -> PathBuf {
        self.dir.path().join(&node.name)
    }

    fn log_path(&self, node: &Node) -> PathBuf {
        self.node_dir(node).join("nats-server.log")
    }

    /// Writes server `index`'s configuration file and starts it, without waiting.
    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &self.nodes[index];
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let config_path = dir.join("nats-server.conf");
        std::fs::write(&config_path, self.config_file(node))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(node))
            .context("cannot open the server's log")?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        self.nodes[index].child = Some(child);
        Ok(())
    }

    /// A server's configuration: loopback only, its own storage; for a cluster, routes to
    /// every server (a server ignores the route to itself) and a monitoring port.
    fn config_file(&self, node: &Node) -> String {
        let store = self.node_dir(node).join("jetstream");
        let mut config = format!(
            "server_name: {name}\n\
             listen: \"127.0.0.1:{port}\"\n\
             jetstream {{\n  store_dir: {store:?}\n}}\n",
            name = node.name,
            port = node.client_port,
        );
        if self.clustered {
            let routes: Vec<String> = self
                .nodes
                .iter()
                .map(|n| format!("\"nats-route://127.0.0.1:{}\"", n.cluster_port))
                .collect();
            config.push_str(&format!(
                "http: \"127.0.0.1:{monitor}\"\n\
                 cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{cluster}\"\n  \
                 routes: [{routes}]\n}}\n",
                monitor = node.monitor_port,
                cluster = node.cluster_port,
                routes = routes.join(", "),
            ));
        }
        config
    }

    /// Waits until every server is ready, and for a cluster until it can place a stream
    /// replicated on every server.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        for index in 0..self.nodes.len() {
            self.wait_node_ready(index, started).await?;
        }
        if self.clustered {
            self.wait_placement(started).await?;
        }
        Ok(())
    }

    /// Waits until server `index` answers JetStream; a cluster server also until it
    /// follows a meta leader. Fails if it exits or `READY_WITHIN` after `started`.
    async fn wait_node_ready(&mut self, index: usize, started: Instant) -> anyhow::Result<()> {
        loop {
            self.check_running(index)?;
            let url = self.node_url(index);
            let ready = if self.clustered {
                matches!(self.meta_leader(index).await, Ok(Some(_)))
                    && jetstream_answers(&url).await
            } else {
                jetstream_answers(&url).await
            };
            if ready {
                return Ok(());
            }
            if started.elapsed() > READY_WITHIN {
                bail!(
                    "nats-server {} did not serve JetStream within {READY_WITHIN:?}\n{}",
                    self.nodes[index].name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates and deletes a stream with a replica on every server, retrying until the
    /// meta leader places it.
    async fn wait_placement(&mut self, started: Instant) -> anyhow::Result<()> {
        let client = async_nats::connect(self.urls())
            .await
            .context("cannot connect to the cluster")?;
        let js = async_nats::jetstream::new(client);
        loop {
            for index in 0..self.nodes.len() {
                self.check_running(index)?;
            }
            let created = js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: PROBE_STREAM.into(),
                    subjects: vec!["harness.probe".into()],
                    num_replicas: self.nodes.len(),
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => {
                    js.delete_stream(PROBE_STREAM)
                        .await
                        .context("cannot delete the probe stream")?;
                    return Ok(());
                }
                Err(error) if started.elapsed() > READY_WITHIN => bail!(
                    "the cluster could not place a stream on {} servers within \
                     {READY_WITHIN:?} ({error})\n{}",
                    self.nodes.len(),
                    self.log_tail(20)
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    fn check_running(&mut self, index: usize) -> anyhow::Result<()> {
        let exited = self.nodes[index]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        match exited {
            Some(status) => bail!(
                "nats-server {} exited at start ({status})\n{}",
                self.nodes[index].name,
                self.log_tail(20)
            ),
            None if self.nodes[index].child.is_none() => {
                bail!("nats-server {} is not running", self.nodes[index].name)
            }
            None => Ok(()),
        }
    }

    /// A monitoring endpoint of server `index`, as JSON.
    async fn monitor(&self, index: usize, path: &str) -> anyhow::Result<Value> {
        let port = self.nodes[index].monitor_port;
        let body = tokio::time::timeout(Duration::from_secs(2), http_get(port, path))
            .await
            .with_context(|| format!("{path} on port {port} did not answer"))??;
        serde_json::from_slice(&body).with_context(|| format!("{path} is not JSON"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of `GET path` from a server's monitoring port: HTTP/1.0, which the server
/// answers and then closes.
async fn http_get(port: u16, path: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    if !response.starts_with(b"HTTP/1.0 200") && !response.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&response[..start])
        );
    }
    Ok(response[start + 4..].to_vec())
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
    serde_json::from_slice::<Value>(&reply.payload)
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
    Ok(free_ports(1)?[0])
}

/// `count` distinct ports nothing listens on now: bound on port 0 together, then released
/// for the servers.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let mut listeners = Vec::new();
    while listeners.len() < count {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot bind a local port to pick a free one")?;
        if listener.local_addr()?.port() != SYSTEM_PORT {
            listeners.push(listener);
        }
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
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
