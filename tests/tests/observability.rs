//! What an operator watches: `/metrics`, `/healthz` and `/readyz` of real hosts running real
//! jobs, and JSON logs whose lines say which job they are about.

use std::time::{Duration, Instant};

use framehost::intake::JobState;
use framehost::job::JobReport;
use framehost_tests::scrape::Scrape;
use framehost_tests::{Cluster, artifacts, captures};

/// The message of a JSON log line.
fn message(line: &serde_json::Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// Scrapes host `index`, failing the test with the logs if it cannot.
async fn scrape(c: &mut Cluster, index: usize) -> Scrape {
    match c.host(index).scrape().await {
        Ok(scrape) => scrape,
        Err(error) => c.fail(format!("cannot scrape host {index}: {error:#}")),
    }
}

/// GETs `path` on host `index` and returns the status and body.
async fn get(c: &mut Cluster, index: usize, path: &str) -> (u16, String) {
    match c.host(index).get(path).await {
        Ok(answer) => (answer.status, answer.body),
        Err(error) => c.fail(format!("cannot GET {path} on host {index}: {error:#}")),
    }
}

/// Two hosts, each with its own metrics port. A tracker job counts on the host that ran it
/// (finished, frames, plugin calls) and nowhere else, and the version gauge names the
/// digest it ran on; failed jobs and refused frames count under their reason; buffers and
/// plugin memory go back to zero when jobs end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_jobs_frames_and_failures_by_reason() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    c.serve_job_type("misbehave", artifacts::misbehave());
    let capture = c.capture("small", &captures::options(30, 8, 2, 10.0));
    let a = c.start_host("host-a").await;
    let b = c.start_host("host-b").await;
    let ports = (c.host(a).metrics_port(), c.host(b).metrics_port());
    c.check(
        ports.0 != ports.1,
        "the two hosts were given the same metrics port",
    );
    for index in [a, b] {
        let (status, body) = get(&mut c, index, "/healthz").await;
        c.check(status == 200, format!("/healthz answered {status}: {body}"));
        let (status, body) = get(&mut c, index, "/readyz").await;
        c.check(
            status == 200,
            format!("/readyz of a serving host answered {status}: {body}"),
        );
    }
    // The endpoint only reads: anything else is refused, saying what is allowed.
    let port = c.host(a).metrics_port();
    let refused = framehost_tests::scrape::request(port, "POST", "/metrics")
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot POST /metrics: {e:#}")));
    c.check(
        refused.status == 405
            && refused
                .head
                .to_ascii_lowercase()
                .contains("allow: get, head"),
        format!(
            "POST /metrics answered {}:\n{}",
            refused.status, refused.head
        ),
    );

    let spec = c.job("counted", "track", &capture, false);
    let last = c.run(&spec).await;
    c.check(
        last.state == JobState::Finished,
        format!("expected Finished, got {last:?}"),
    );
    let report: JobReport = last.report.clone().unwrap_or_default();
    let (ran, idle) = if last.host == "host-a" {
        (a, b)
    } else {
        (b, a)
    };

    // The host publishes the final status, then acks the job: it counts as running until
    // then.
    let track = [("job_type", "track")];
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&mut c, ran).await;
        if m.value("framehost_jobs_running", &track) == Some(0.0) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expect = |what: &str, got: Option<f64>, want: f64| {
        c.check(
            got == Some(want),
            format!("{what}: expected {want}, got {got:?}; scrape:\n{m:#?}"),
        );
    };
    expect(
        "jobs started",
        m.value("framehost_jobs_started_total", &track),
        1.0,
    );
    expect(
        "jobs finished",
        m.value("framehost_jobs_finished_total", &track),
        1.0,
    );
    expect(
        "jobs running",
        m.value("framehost_jobs_running", &track),
        0.0,
    );
    expect(
        "frames received",
        m.value("framehost_frames_received_total", &track),
        report.frames_in as f64,
    );
    expect(
        "frames processed",
        m.value("framehost_frames_processed_total", &track),
        report.frames_processed as f64,
    );
    c.check(
        report.frames_processed == 30,
        format!(
            "the job processed {} frames, not 30",
            report.frames_processed
        ),
    );
    let calls = [("job_type", "track"), ("stage", "plugin_call")];
    expect(
        "plugin calls observed",
        m.value("framehost_stage_duration_seconds_count", &calls),
        30.0,
    );
    for stage in ["assembly", "decode"] {
        let labels = [("job_type", "track"), ("stage", stage)];
        expect(
            &format!("{stage} observations"),
            m.value("framehost_stage_duration_seconds_count", &labels),
            30.0,
        );
    }
    expect(
        "the version gauge of the digest the job ran on",
        m.value(
            "framehost_plugin_versions_loaded",
            &[("job_type", "track"), ("digest", &report.plugin_digest)],
        ),
        1.0,
    );
    // The job's buffers and its plugin instance were freed with it.
    for stage in ["data_stream", "assembly"] {
        expect(
            &format!("{stage} bytes held after the job"),
            m.value("framehost_stage_bytes_held", &[("stage", stage)]),
            0.0,
        );
    }
    expect(
        "plugin memory after the job",
        m.value("framehost_plugin_memory_bytes", &track),
        0.0,
    );
    expect(
        "plugin memory peaks observed",
        m.value("framehost_plugin_memory_peak_bytes_count", &track),
        1.0,
    );
    let rss = m.value("framehost_process_rss_bytes", &[]).unwrap_or(0.0);
    c.check(rss > 1e6, format!("process RSS {rss} is implausible"));

    // The other host ran nothing, but serves the same version.
    let other = scrape(&mut c, idle).await;
    c.check(
        other.sum("framehost_jobs_started_total", &[]) == 0.0
            && other.value(
                "framehost_plugin_versions_loaded",
                &[("job_type", "track"), ("digest", &report.plugin_digest)],
            ) == Some(1.0),
        format!("the idle host counts another's job or lacks the version: {other:#?}"),
    );

    // A plugin that panics fails its job as plugin_panic; a job type nobody routes fails as
    // unknown_job_type under the `unrouted` label, not under the type a submitter made up.
    let mut panics = c.job("panics", "misbehave", &capture, false);
    panics.config = serde_json::json!({"mode": "panic"});
    let last = c.run(&panics).await;
    c.check(
        last.reason.as_deref() == Some("plugin_panic"),
        format!("expected plugin_panic, got {last:?}"),
    );
    // A plugin that refuses frames: the job goes on, each refusal counted by reason.
    let mut refuses = c.job("refuses", "misbehave", &capture, false);
    refuses.config = serde_json::json!({"mode": "error", "after": 25});
    let last = c.run(&refuses).await;
    c.check(
        last.state == JobState::Finished
            && last
                .report
                .as_ref()
                .is_some_and(|r| r.frames_rejected.get("plugin_error") == Some(&5)),
        format!("expected the job to finish with 5 frames refused, got {last:?}"),
    );
    let unknown = c.job("unknown", "no-such-type", &capture, false);
    let last = c.run(&unknown).await;
    c.check(
        last.reason.as_deref() == Some("unknown_job_type"),
        format!("expected unknown_job_type, got {last:?}"),
    );
    let (ma, mb) = (scrape(&mut c, a).await, scrape(&mut c, b).await);
    let failed = |job_type: &str, reason: &str| {
        let labels = [("job_type", job_type), ("reason", reason)];
        ma.sum("framehost_jobs_failed_total", &labels)
            + mb.sum("framehost_jobs_failed_total", &labels)
    };
    c.check(
        failed("misbehave", "plugin_panic") == 1.0
            && failed("unrouted", "unknown_job_type") == 1.0
            && failed("no-such-type", "unknown_job_type") == 0.0,
        format!("failures by reason are wrong:\nhost-a {ma:#?}\nhost-b {mb:#?}"),
    );
    let rejected = |reason: &str| {
        let labels = [("job_type", "misbehave"), ("reason", reason)];
        ma.sum("framehost_frames_rejected_total", &labels)
            + mb.sum("framehost_frames_rejected_total", &labels)
    };
    c.check(
        rejected("plugin_panic") == 1.0 && rejected("plugin_error") == 5.0,
        format!(
            "expected 1 frame rejected as plugin_panic and 5 as plugin_error, got {} and {}",
            rejected("plugin_panic"),
            rejected("plugin_error")
        ),
    );
}

/// After SIGTERM, with a job still finishing, `/readyz` says the host is draining while
/// `/healthz` and `/metrics` keep answering; the job finishes and the host exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_draining_after_sigterm_while_a_job_finishes() {
    let mut c = Cluster::start().await;
    c.config.host.shutdown_grace_secs = 60;
    c.serve_job_type("track", artifacts::tracker());
    // 8 s at 10 fps: SIGTERM falls well inside it.
    let capture = c.capture("paced", &captures::options(80, 4, 2, 10.0));
    let a = c.start_host("host-a").await;
    let (status, body) = get(&mut c, a, "/readyz").await;
    c.check(status == 200, format!("/readyz answered {status}: {body}"));

    let spec = c.job("draining", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    c.until(&mut watch, JobState::Started, "the job to start")
        .await;
    c.host(a).terminate();

    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = get(&mut c, a, "/readyz").await;
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.check(
        status == 503 && body.contains("draining"),
        format!("/readyz after SIGTERM answered {status}: {body}"),
    );
    let (status, _) = get(&mut c, a, "/healthz").await;
    c.check(
        status == 200,
        format!("/healthz while draining answered {status}"),
    );
    let m = scrape(&mut c, a).await;
    c.check(
        m.value("framehost_jobs_running", &[("job_type", "track")]) == Some(1.0),
        format!("expected the finishing job counted as running: {m:#?}"),
    );
    let memory = m.value("framehost_plugin_memory_bytes", &[("job_type", "track")]);
    c.check(
        memory.is_some_and(|bytes| bytes > 0.0),
        format!("expected the running job's plugin memory counted, got {memory:?}"),
    );

    let last = c.until_final(&mut watch, "the job's final status").await;
    c.check(
        last.state == JobState::Finished,
        format!("expected the job to finish while draining, got {last:?}"),
    );
    let log = c.logs();
    let exit = framehost_tests::within(Duration::from_secs(60), "host-a to exit", || log, async {
        c.host(a).wait().await
    })
    .await
    .unwrap_or_else(|e| panic!("cannot wait for host-a: {e}"));
    c.check(exit.success(), format!("host-a should exit 0, got {exit}"));
}

/// GETs `/readyz` on host `index` until it answers `status`, for at most 20 s, and
/// returns the last body.
async fn readyz_until(c: &mut Cluster, index: usize, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = get(c, index, "/readyz").await;
        if got == status {
            return body;
        }
        if Instant::now() > deadline {
            c.fail(format!(
                "/readyz answered {got} ({body}), not {status}, for 20 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While the NATS server is down the host is alive but not ready, and says why; once the
/// server is back the host is ready again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_nats_connection() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    let a = c.start_host("host-a").await;
    readyz_until(&mut c, a, 200).await;

    c.nats.kill();
    let body = readyz_until(&mut c, a, 503).await;
    c.check(
        body.contains("NATS is not connected"),
        format!("/readyz without NATS said {body:?}"),
    );
    let (status, _) = get(&mut c, a, "/healthz").await;
    c.check(
        status == 200,
        format!("/healthz without NATS answered {status}"),
    );

    if let Err(error) = c.nats.restart().await {
        c.fail(format!("cannot restart nats-server: {error:#}"));
    }
    readyz_until(&mut c, a, 200).await;
}

/// With `FRAMEHOST_LOG_JSON=1`, every line is JSON, and the lines logged inside a job —
/// the intake's, and the plugin's own through the sandbox — carry the job's id and type in
/// their span fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_job_span() {
    let mut c = Cluster::start().await;
    c.host_env
        .push(("FRAMEHOST_LOG_JSON".to_owned(), "1".to_owned()));
    c.serve_job_type("track", artifacts::tracker());
    let capture = c.capture("small", &captures::options(10, 8, 2, 10.0));
    let a = c.start_host("host-a").await;

    let spec = c.job("logged", "track", &capture, false);
    let last = c.run(&spec).await;
    c.check(
        last.state == JobState::Finished,
        format!("expected Finished, got {last:?}"),
    );

    let log = c.host(a).log();
    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(value) => lines.push(value),
            Err(error) => c.fail(format!("a log line is not JSON ({error}): {line}")),
        }
    }
    let in_job = |line: &serde_json::Value| {
        line["span"]["job_id"] == spec.id.as_str() && line["span"]["job_type"] == "track"
    };
    let from_plugin = lines.iter().find(|line| {
        line["target"] == "plugin" && message(line).contains("tracker ready") && in_job(line)
    });
    c.check(
        from_plugin.is_some(),
        format!("no plugin log line carries the job's span; the log:\n{log}"),
    );
    let finished = lines
        .iter()
        .find(|line| message(line) == "Job finished" && in_job(line));
    c.check(
        finished.is_some(),
        format!("the job's end is not logged in its span; the log:\n{log}"),
    );
}

/// A metrics address that is taken fails `serve` at start, naming the address, before it
/// ever pulls a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_fails_at_start_when_the_metrics_port_is_taken() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind a local port");
    let address = taken.local_addr().expect("a bound address");
    c.config.metrics.listen = address;
    let config = c.scratch.path().join("taken.toml");
    let toml = toml::to_string(&c.config).expect("the config serializes");
    std::fs::write(&config, toml).expect("cannot write the config");

    let run = tokio::process::Command::new(artifacts::framehost_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("FRAMEHOST_NATS_URL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = c
        .within(Duration::from_secs(60), "serve to give up", run)
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot run framehost serve: {e}")));
    let stderr = String::from_utf8_lossy(&output.stderr);
    c.check(
        !output.status.success()
            && stderr.contains(&format!(
                "cannot listen for metrics and probes on {address}"
            )),
        format!(
            "expected serve to fail naming {address}; it exited {} with:\n{stderr}",
            output.status
        ),
    );
    drop(taken);
}
