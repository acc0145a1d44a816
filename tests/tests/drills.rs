//! Failure drills from production: the NATS server restarting under a running job, and
//! SIGTERM with jobs running (finished within the grace period, or handed back after it).

use std::time::Duration;

use framehost::intake::JobState;
use framehost_tests::{Cluster, artifacts, captures, within};

/// Bound on a job's run, from submission to its final status.
const JOB: Duration = Duration::from_secs(150);

/// The server dies and comes back (same port and storage) while a job runs: the host
/// reconnects, the job finishes, its ack lands, and it is not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_job_loses_nothing() {
    let mut c = Cluster::start().await;
    c.config.host.progress_interval_secs = 1;
    c.serve_job_type("track", artifacts::tracker());
    // 10 s at 10 fps: the restart falls in the middle.
    let capture = c.capture("paced", &captures::options(100, 4, 2, 10.0));
    c.start_host("host-a").await;

    let spec = c.job("through-restart", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    c.until(&mut watch, JobState::Progress, "progress from host-a")
        .await;

    c.nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Err(error) = c.nats.restart().await {
        c.fail(format!("cannot restart nats-server: {error:#}"));
    }

    let last = c
        .until(&mut watch, JobState::Finished, "the job's final status")
        .await;
    let report = last.report.clone().unwrap_or_default();
    c.check(
        last.host == "host-a" && report.frames_processed == 100,
        format!("expected all 100 frames processed on host-a, got {last:?}"),
    );
    c.wait_queue_empty("the job is acked after the restart")
        .await;
    let stream = c.jobs_stream_state().await;
    c.check(
        stream.last_sequence == 1,
        format!("the job was not published again: {stream:?}"),
    );
}

/// SIGTERM with a short job running: the host takes no new job, lets it finish within the
/// grace period, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_job_finish_within_the_grace_period() {
    let mut c = Cluster::start().await;
    c.config.host.shutdown_grace_secs = 60;
    c.serve_job_type("track", artifacts::tracker());
    let capture = c.capture("paced", &captures::options(30, 4, 2, 10.0));
    let a = c.start_host("host-a").await;

    let spec = c.job("finishes", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    c.until(&mut watch, JobState::Started, "the job to start")
        .await;
    c.host(a).terminate();

    let last = c.until_final(&mut watch, "the job's final status").await;
    c.check(
        last.state == JobState::Finished
            && last
                .report
                .as_ref()
                .is_some_and(|r| r.frames_processed == 30),
        format!("expected the job to finish all 30 frames, got {last:?}"),
    );
    let log = c.logs();
    let status = within(JOB, "host-a to exit", || log, c.host(a).wait())
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot wait for host-a: {e}")));
    c.check(
        status.success(),
        format!("host-a should exit 0, got {status}"),
    );
    c.wait_queue_empty("the finished job is acked").await;
}

/// SIGTERM with a job longer than the grace period: the job is stopped and handed back
/// (`requeued`), the host exits 0, and another host runs the job to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_a_job_that_outlasts_the_grace_period() {
    let mut c = Cluster::start().await;
    c.config.host.shutdown_grace_secs = 1;
    c.config.nats.nak_delay_secs = 1;
    c.serve_job_type("track", artifacts::tracker());
    // 30 s at 10 fps: far longer than the grace period.
    let capture = c.capture("long", &captures::options(300, 4, 2, 10.0));
    let a = c.start_host("host-a").await;

    let spec = c.job("handed-back", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    c.until(&mut watch, JobState::Started, "the job to start")
        .await;
    c.host(a).terminate();

    let requeued = c
        .until(&mut watch, JobState::Requeued, "the job to be handed back")
        .await;
    c.check(
        requeued.host == "host-a",
        format!("expected host-a to hand the job back, got {requeued:?}"),
    );
    let log = c.logs();
    let status = within(JOB, "host-a to exit", || log, c.host(a).wait())
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot wait for host-a: {e}")));
    c.check(
        status.success(),
        format!("host-a should exit 0, got {status}"),
    );

    c.start_host("host-b").await;
    let started = c
        .until(&mut watch, JobState::Started, "the job to start on host-b")
        .await;
    c.check(
        started.host == "host-b",
        format!("expected host-b to take the job, got {started:?}"),
    );
    // host-b need not replay all 30 s: a stop request ends it, and it is acked.
    c.client
        .request(c.nats_config().control_subject(&spec.id), "stop".into())
        .await
        .unwrap_or_else(|e| c.fail(format!("stop request failed: {e}")));
    let last = c
        .until_final(&mut watch, "the job's final status on host-b")
        .await;
    c.check(
        last.state == JobState::Stopped && last.host == "host-b",
        format!("expected the job stopped on host-b, got {last:?}"),
    );
    c.wait_queue_empty("the job is acked by host-b").await;
}

/// A second SIGTERM (an impatient operator, or a runtime escalating) ends the host at once,
/// even with a long grace period left; the job it held is redelivered, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_and_the_job_comes_back() {
    let mut c = Cluster::start().await;
    c.config.host.shutdown_grace_secs = 600;
    c.config.nats.ack_wait_secs = 3;
    c.serve_job_type("track", artifacts::tracker());
    let capture = c.capture("long", &captures::options(300, 4, 2, 10.0));
    let a = c.start_host("host-a").await;

    let spec = c.job("impatient", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    c.until(&mut watch, JobState::Started, "the job to start")
        .await;
    c.host(a).terminate();
    // Two signals sent back to back may arrive as one: wait for the first to be taken.
    let log_a = c.host(a).log_path();
    let draining = async {
        while !std::fs::read_to_string(&log_a).is_ok_and(|log| log.contains("Signal received")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    c.within(
        Duration::from_secs(30),
        "host-a to take the first SIGTERM",
        draining,
    )
    .await;
    c.host(a).terminate();
    let log = c.logs();
    let status = within(
        Duration::from_secs(30),
        "host-a to exit on the second SIGTERM",
        || log,
        c.host(a).wait(),
    )
    .await
    .unwrap_or_else(|e| c.fail(format!("cannot wait for host-a: {e}")));
    c.check(
        status.code() == Some(1),
        format!("host-a should exit 1 at once, not drain for 600 s: {status}"),
    );

    c.start_host("host-b").await;
    let started = c
        .until(
            &mut watch,
            JobState::Started,
            "the job to come back on host-b",
        )
        .await;
    c.check(
        started.host == "host-b",
        format!("expected host-b to take the job, got {started:?}"),
    );
    c.client
        .request(c.nats_config().control_subject(&spec.id), "stop".into())
        .await
        .unwrap_or_else(|e| c.fail(format!("stop request failed: {e}")));
    let last = c.until_final(&mut watch, "the job's final status").await;
    c.check(
        last.state == JobState::Stopped && last.host == "host-b",
        format!("expected the job stopped on host-b, got {last:?}"),
    );
    c.wait_queue_empty("the job is acked by host-b").await;
}
