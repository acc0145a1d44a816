//! A `nats-server` locked down as in production: TLS only, client certificates verified
//! against a throwaway CA made for the test, and a token, a password or an nkey.

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

/// How clients prove who they are, besides their certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Token,
    UserPassword,
    Nkey,
    /// A `.creds` file: a user JWT signed by an account the server's operator trusts, and
    /// the user's nkey seed (the server runs in operator mode).
    Credentials,
}

/// The server, its CA, a client certificate it accepts, and the client's secret, all in
/// one temporary directory. Dropping it kills the server.
pub struct SecureNats {
    child: Child,
    port: u16,
    dir: TempDir,
    auth: Auth,
    secret: String,
}

impl SecureNats {
    pub async fn start(auth: Auth) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("framehost-secure-nats-")
            .tempdir()?;
        write_certificates(&dir)?;
        let (secret, secret_file, authorization) = match auth {
            Auth::Token => {
                let token = format!("token-{}", std::process::id());
                let block = format!("authorization {{ token: \"{token}\" }}");
                (token.clone(), token, block)
            }
            Auth::UserPassword => {
                let password = format!("password-{}", std::process::id());
                let block = format!(
                    "authorization {{ users = [ {{ user: \"framehost\", password: \"{password}\" }} ] }}"
                );
                (password.clone(), password, block)
            }
            Auth::Nkey => {
                let key = nkeys::KeyPair::new_user();
                let block = format!(
                    "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
                    key.public_key()
                );
                let seed = key.seed()?;
                (seed.clone(), seed, block)
            }
            Auth::Credentials => operator_mode()?,
        };
        // As a mounted Secret would hold it, with a final newline.
        std::fs::write(dir.path().join("secret"), format!("{secret_file}\n"))?;
        let port = free_port()?;
        let path = |name: &str| dir.path().join(name).display().to_string();
        let conf = format!(
            "listen: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             {authorization}\n\
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
            auth,
            secret,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// The client's token, password or nkey seed; tests check it never shows in output.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A `[nats]` section that reaches the server: `tls://` URL, CA, client certificate,
    /// and the secret from a file, as an operator would mount them.
    pub fn nats_config(&self) -> NatsConfig {
        let secret = Some(self.file("secret"));
        let mut nats = NatsConfig {
            url: format!("tls://127.0.0.1:{}", self.port),
            ..NatsConfig::default()
        };
        match self.auth {
            Auth::Token => nats.token_file = secret,
            Auth::UserPassword => {
                nats.user = Some("framehost".into());
                nats.password_file = secret;
            }
            Auth::Nkey => nats.nkey_seed_file = secret,
            Auth::Credentials => nats.credentials_file = secret,
        }
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

/// An operator trusting a system account and an account with JetStream, and a user of that
/// account: the user's seed, its `.creds` file, and the server's configuration lines.
fn operator_mode() -> anyhow::Result<(String, String, String)> {
    use nkeys::KeyPair;
    use serde_json::json;
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    let mut with_jetstream = unlimited.clone();
    for limit in ["mem_storage", "disk_storage", "streams", "consumer"] {
        with_jetstream[limit] = json!(-1);
    }
    let (operator, system, account, user) = (
        KeyPair::new_operator(),
        KeyPair::new_account(),
        KeyPair::new_account(),
        KeyPair::new_user(),
    );
    let operator_jwt = jwt(&operator, &operator, json!({"type": "operator"}))?;
    let system_jwt = jwt(
        &operator,
        &system,
        json!({"type": "account", "limits": unlimited}),
    )?;
    let account_jwt = jwt(
        &operator,
        &account,
        json!({"type": "account", "limits": with_jetstream}),
    )?;
    let user_jwt = jwt(
        &account,
        &user,
        json!({"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    )?;
    let seed = user.seed()?;
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let (system, account) = (system.public_key(), account.public_key());
    let conf = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {system}: \"{system_jwt}\"\n  {account}: \"{account_jwt}\"\n}}"
    );
    Ok((seed, creds, conf))
}

/// A NATS JWT (version 2) about `subject`, signed by `issuer`.
fn jwt(
    issuer: &nkeys::KeyPair,
    subject: &nkeys::KeyPair,
    mut nats: serde_json::Value,
) -> anyhow::Result<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    nats["version"] = 2.into();
    let sub = subject.public_key();
    let claims = serde_json::json!({
        "jti": format!("{:X}", sub.len() as u64 ^ u64::from(std::process::id())),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": "framehost-test",
        "sub": sub,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes())?);
    Ok(format!("{signed}.{signature}"))
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
