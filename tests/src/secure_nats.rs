//! A `nats-server` locked down as in production: TLS only, client certificates verified
//! against a throwaway CA made for the test, and a token.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use framehost::config::NatsConfig;
use framehost::intake::{FirstConnect, connect};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::nats_server::{find_binary, free_port, tail};

/// How long the server may take to serve JetStream over TLS.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// The server, its CA, a client certificate it accepts, and its token, all in one
/// temporary directory. Dropping it kills the server.
pub struct SecureNats {
    child: Child,
    port: u16,
    dir: TempDir,
    token: String,
}

impl SecureNats {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("framehost-secure-nats-")
            .tempdir()?;
        write_certificates(&dir)?;
        let token = format!("token-{}", std::process::id());
        std::fs::write(dir.path().join("token"), format!("{token}\n"))?;
        let port = free_port()?;
        let path = |name: &str| dir.path().join(name).display().to_string();
        let conf = format!(
            "listen: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             authorization {{ token: \"{token}\" }}\n\
             tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  ca_file: \"{ca}\"\n  \
             verify: true\n  timeout: 5\n}}\n",
            store = path("jetstream"),
            cert = path("server.pem"),
            key = path("server-key.pem"),
            ca = path("ca.pem"),
        );
        std::fs::write(dir.path().join("nats.conf"), conf)?;
        let log = std::fs::File::create(dir.path().join("nats-server.log"))?;
        let child = Command::new(find_binary()?)
            .arg("-c")
            .arg(dir.path().join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot run nats-server")?;
        let mut server = Self {
            child,
            port,
            dir,
            token,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// The token the server demands; tests check it never shows in output.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A `[nats]` section that reaches the server: `tls://` URL, CA, client certificate,
    /// and the token from a file, as an operator would mount them.
    pub fn nats_config(&self) -> NatsConfig {
        let mut nats = NatsConfig {
            url: format!("tls://127.0.0.1:{}", self.port),
            token_file: Some(self.file("token")),
            ..NatsConfig::default()
        };
        nats.tls.ca_file = Some(self.file("ca.pem"));
        nats.tls.cert_file = Some(self.file("client.pem"));
        nats.tls.key_file = Some(self.file("client-key.pem"));
        nats
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.file("nats-server.log"), lines)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let config = self.nats_config();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}); its log:\n{}",
                    self.log_tail(20)
                );
            }
            if let Ok(client) = connect(&config, FirstConnect::FailFast).await
                && let Ok(reply) = client.request("$JS.API.INFO", "".into()).await
                && serde_json::from_slice::<serde_json::Value>(&reply.payload)
                    .is_ok_and(|answer| answer.get("error").is_none())
            {
                return Ok(());
            }
            if started.elapsed() > READY_WITHIN {
                bail!(
                    "nats-server did not serve JetStream over TLS within {READY_WITHIN:?}; \
                     its log:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
fn write_certificates(dir: &TempDir) -> anyhow::Result<()> {
    let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    write("ca.pem", ca_params.self_signed(&ca_key)?.pem())?;
    let ca = Issuer::new(ca_params, ca_key);

    for (name, names, usage) in [
        (
            "server",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client",
            vec!["framehost".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let mut params = CertificateParams::new(names)?;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        write(&format!("{name}.pem"), params.signed_by(&key, &ca)?.pem())?;
        write(&format!("{name}-key.pem"), key.serialize_pem())?;
    }
    Ok(())
}
