//! NATS as production runs it: TLS only, client certificates, a token read from a file.
//! The host serves jobs through it; a client missing a piece is refused with an error that
//! says why, and the token shows nowhere.

use std::path::Path;
use std::time::Duration;

use framehost::config::{Config, JobTypeConfig};
use framehost::intake::{JobState, submit};
use framehost::job::JobSpec;
use framehost::source::SourceSpec;
use framehost_tests::{HostProcess, SecureNats, artifacts, captures, within};

const JOB: Duration = Duration::from_secs(150);

fn host_config(nats: &SecureNats, scratch: &Path) -> Config {
    let mut config = Config {
        nats: nats.nats_config(),
        ..Config::default()
    };
    config.catalogue.cache_dir = Some(scratch.join("compiled"));
    config
        .job_types
        .insert("track".into(), JobTypeConfig::new(artifacts::tracker()));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_serves_jobs_over_tls_with_a_client_certificate_and_a_token() {
    let nats = SecureNats::start().await.expect("the TLS server starts");
    let scratch = tempfile::tempdir().unwrap();
    let config = host_config(&nats, scratch.path());
    let mut host = HostProcess::start("secure-host", &config).expect("the host starts");
    host.wait_serving(Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nserver log:\n{}", nats.log_tail(20)));

    let capture = scratch.path().join("short.cap");
    captures::make(&capture, &captures::options(12, 4, 2, 30.0));
    let spec = JobSpec {
        id: "over-tls".into(),
        job_type: "track".into(),
        source: SourceSpec::Capture {
            path: capture,
            realtime: false,
        },
        config: serde_json::json!({}),
    };
    let log = || host.log_tail(30);
    let last = within(
        JOB,
        "the job's final status",
        log,
        submit(&config.nats, &spec, Some(JOB), |_| {}),
    )
    .await
    .expect("the submitter reaches the server")
    .expect("a final status arrives");
    assert_eq!(last.state, JobState::Finished, "{last:?}");
    assert_eq!(last.report.map(|r| r.frames_processed), Some(12));
    assert!(
        !host.log().contains(nats.token()),
        "the token is in the host's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_missing_the_token_or_the_ca_is_refused_and_told_why() {
    let nats = SecureNats::start().await.expect("the TLS server starts");
    let scratch = tempfile::tempdir().unwrap();
    let capture = scratch.path().join("c.cap");
    captures::make(&capture, &captures::options(2, 4, 1, 30.0));

    let complete = host_config(&nats, scratch.path()).nats;
    let mut no_token = complete.clone();
    no_token.token_file = None;
    let mut no_ca = complete.clone();
    no_ca.tls.ca_file = None;
    let mut no_client_cert = complete.clone();
    no_client_cert.tls.cert_file = None;
    no_client_cert.tls.key_file = None;

    for (what, nats_section, expected) in [
        ("without the token", no_token, "authorization"),
        ("without the CA", no_ca, "unknownissuer"),
        (
            "without a client certificate",
            no_client_cert,
            "badcertificate",
        ),
        ("with everything", complete, ""),
    ] {
        let config = Config {
            nats: nats_section,
            ..Config::default()
        };
        let file = scratch.path().join("submit.toml");
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        let mut command = tokio::process::Command::new(artifacts::framehost_bin());
        command
            .args(["job", "submit", "--type", "track", "--capture"])
            .arg(&capture)
            .arg("--config")
            .arg(&file)
            .env_remove("FRAMEHOST_NATS_URL");
        let out = within(
            Duration::from_secs(60),
            format!("job submit {what}"),
            String::new,
            command.output(),
        )
        .await
        .expect("framehost runs");
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!stderr.contains(nats.token()), "{what}: the token leaked");
        if expected.is_empty() {
            assert!(out.status.success(), "{what}: {stderr}");
        } else {
            assert!(!out.status.success(), "{what}: the server let it in");
            assert!(
                stderr.contains(expected),
                "{what}: expected {expected:?} in the error:\n{stderr}"
            );
        }
    }
}
