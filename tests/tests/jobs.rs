//! Jobs over NATS: a real nats-server, the `framehost serve` binary, real plugins.
//!
//! Each test starts its own server and hosts, so tests run in parallel without sharing state.

use std::collections::BTreeSet;
use std::time::Duration;

use framehost::intake::{JobState, JobStatus, REASON_HEADER};
use framehost::job::{FailureKind, JobSpec};
use framehost_tests::{Cluster, artifacts, captures};
use futures::StreamExt as _;

/// Bound on a job's run, from submission to its final status: generous, since a debug host
/// on a busy two-core machine is slow, and a hang is what it catches.
const JOB: Duration = Duration::from_secs(120);
/// Bound on a command-line call.
const COMMAND: Duration = Duration::from_secs(120);

/// A tracker job on a small capture: it starts, finishes with every frame processed, its
/// results carry stable track ids, and it leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_to_success_and_is_acked() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    let capture = c.capture("small", &captures::options(30, 20, 3, 10.0));
    c.start_host("host-a").await;

    let spec = c.job("job-ok", "track", &capture, false);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;

    let first = c
        .within(JOB, "the first status (Started)", watch.next_status())
        .await;
    let first = first.unwrap_or_else(|| c.fail("status subscription ended"));
    c.check(
        first.state == JobState::Started && first.host == "host-a" && first.delivery == 1,
        format!("expected Started on host-a, delivery 1; got {first:?}"),
    );
    let last = c.until_final(&mut watch, "a final status").await;
    c.check(
        last.state == JobState::Finished,
        format!("expected Finished, got {last:?}"),
    );
    let report = last.report.clone().unwrap_or_else(|| c.fail("no report"));
    c.check(
        report.frames_in == 30
            && report.frames_processed == 30
            && report.frames_dropped == 0
            && report.frames_rejected.is_empty()
            && report.results == 30,
        format!(
            "expected 30 frames in and processed, none dropped or rejected, 30 results; got {report:?}"
        ),
    );
    c.check(
        report.summary["tracks_confirmed"] == 4,
        format!(
            "expected the tracker to confirm the 4 moving objects; summary {}",
            report.summary
        ),
    );

    // Results are published before the final status on the same connection, so all 30 are
    // here or on their way.
    let mut frames = Vec::new();
    let mut ids = BTreeSet::new();
    for n in 0..30 {
        let result = c
            .within(JOB, format!("result {} of 30", n + 1), watch.next_result())
            .await
            .unwrap_or_else(|| c.fail("results subscription ended"));
        let frame = result
            .frame
            .unwrap_or_else(|| c.fail(format!("result without a frame header: {result:?}")));
        c.check(
            result.body["frame"] == frame
                && result.content_type.as_deref() == Some("application/json"),
            format!("result for frame {frame} disagrees with its header or type: {result:?}"),
        );
        let tracks = result.body["tracks"]
            .as_array()
            .unwrap_or_else(|| c.fail(format!("result without tracks: {}", result.body)));
        let frame_ids: BTreeSet<u64> = tracks.iter().filter_map(|t| t["id"].as_u64()).collect();
        // A track is confirmed after 3 matched frames (min_hits), then all four objects are
        // followed, each under the same id, in every frame.
        if frame >= 2 {
            c.check(
                frame_ids == BTreeSet::from([1, 2, 3, 4]),
                format!("frame {frame}: expected tracks 1-4, got {}", result.body),
            );
        }
        ids.extend(frame_ids);
        frames.push(frame);
    }
    frames.sort_unstable();
    c.check(
        frames == (0..30).collect::<Vec<_>>(),
        format!("expected one result per frame 0..30, got frames {frames:?}"),
    );
    c.check(watch.buffered_results().is_empty(), "more than 30 results");
    c.check(
        ids.len() == 4,
        format!("expected 4 track ids in all, got {ids:?}"),
    );

    c.wait_queue_empty("a finished job is acked").await;
}

/// A plugin that panics fails its job permanently: the job is copied to the dead-letter
/// stream with the reason, removed from the queue, and not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_is_dead_lettered_and_not_redelivered() {
    let mut c = Cluster::start().await;
    c.serve_job_type("misbehave", artifacts::misbehave());
    let capture = c.capture("small", &captures::options(10, 8, 2, 10.0));
    c.start_host("host-a").await;

    let mut spec = c.job("job-panics", "misbehave", &capture, false);
    spec.config = serde_json::json!({"mode": "panic"});
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;

    let last = c.until_final(&mut watch, "a final status").await;
    c.check(
        last.state == JobState::Failed
            && last.kind == Some(FailureKind::Permanent)
            && last.reason.as_deref() == Some("plugin_panic"),
        format!("expected Failed, permanent, plugin_panic; got {last:?}"),
    );
    let error = last.error.clone().unwrap_or_default();
    c.check(
        error.contains("panicking at frame 0"),
        format!("expected the plugin's panic message in the error, got {error:?}"),
    );

    let dead = c.wait_dead_letter(&spec.id).await;
    let reason = dead
        .headers
        .get(REASON_HEADER)
        .map(|v| v.as_str().to_owned());
    c.check(
        reason.as_deref() == Some("plugin_panic"),
        format!("expected {REASON_HEADER}: plugin_panic on the dead letter, got {reason:?}"),
    );
    let kept: JobSpec = serde_json::from_slice(&dead.payload)
        .unwrap_or_else(|e| c.fail(format!("dead letter is not the job ({e})")));
    c.check(
        kept == spec,
        format!("dead letter {kept:?} is not the job {spec:?}"),
    );

    c.wait_queue_empty("a failed job is terminated").await;
    let consumer = c.consumer_info().await;
    c.check(
        consumer.num_ack_pending == 0 && consumer.num_pending == 0 && consumer.num_redelivered == 0,
        format!("expected nothing pending or redelivered, got {consumer:?}"),
    );
    let later = watch.buffered_statuses();
    c.check(
        later.is_empty(),
        format!("statuses after the failure: {later:?}"),
    );
}

/// A job whose every delivery dies with its host reaches `max_deliver` without any host
/// seeing a last delivery. JetStream's advisory makes a surviving host dead-letter it with
/// reason `max_deliveries` and take it out of the queue, instead of it sitting there unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_that_kills_every_host_is_dead_lettered() {
    let mut c = Cluster::start().await;
    c.config.nats.ack_wait_secs = 3;
    c.config.nats.max_deliver = 2;
    c.serve_job_type("track", artifacts::tracker());
    let capture = c.capture("paced", &captures::options(60, 8, 2, 10.0));
    let spec = c.job("job-deadly", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;

    let first = c.start_host("host-a").await;
    c.submit(&spec).await;
    for (host, name) in [(first, "host-a"), (usize::MAX, "host-b")] {
        let host = if host == usize::MAX {
            c.start_host(name).await
        } else {
            host
        };
        let started = c
            .until(&mut watch, JobState::Started, format!("Started on {name}"))
            .await;
        c.check(
            started.host == name,
            format!("expected Started on {name}, got {started:?}"),
        );
        c.host(host).kill9().await;
    }

    // A host that never ran the job hears that JetStream gave up on it.
    c.start_host("host-c").await;
    let last = c.until_final(&mut watch, "Failed (max_deliveries)").await;
    c.check(
        last.state == JobState::Failed
            && last.reason.as_deref() == Some("max_deliveries")
            && last.kind == Some(FailureKind::Permanent),
        format!("expected Failed, permanent, max_deliveries; got {last:?}"),
    );
    let dead = c.wait_dead_letter(&spec.id).await;
    let reason = dead
        .headers
        .get(REASON_HEADER)
        .map(|v| v.as_str().to_owned());
    c.check(
        reason.as_deref() == Some("max_deliveries"),
        format!("expected {REASON_HEADER}: max_deliveries on the dead letter, got {reason:?}"),
    );
    let kept: JobSpec = serde_json::from_slice(&dead.payload).expect("the job as submitted");
    c.check(
        kept == spec,
        format!("dead letter holds {kept:?}, not the job"),
    );
    c.wait_queue_empty("the job given up on leaves the queue")
        .await;
}

/// A host killed mid-job (SIGKILL) stops sending in-progress acks; after `ack_wait` the job
/// is redelivered to a second host, which runs it to the end. It finishes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_of_a_killed_host_is_finished_by_another() {
    let mut c = Cluster::start().await;
    c.config.nats.ack_wait_secs = 3;
    c.config.host.progress_interval_secs = 1;
    c.serve_job_type("track", artifacts::tracker());
    // Realtime at 10 fps: the job runs for 6 s, long enough to be killed in the middle.
    let capture = c.capture("paced", &captures::options(60, 8, 2, 10.0));
    let a = c.start_host("host-a").await;

    let spec = c.job("job-survives", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    let started = c
        .until(&mut watch, JobState::Started, "Started on host-a")
        .await;
    c.check(
        started.host == "host-a" && started.delivery == 1,
        format!("expected host-a, delivery 1; got {started:?}"),
    );
    // Mid-job: the host has reported progress (and sent in-progress acks) before it dies.
    let progress = c
        .until(&mut watch, JobState::Progress, "Progress from host-a")
        .await;
    c.check(
        progress.host == "host-a",
        format!("expected progress from host-a, got {progress:?}"),
    );
    c.host(a).kill9().await;

    c.start_host("host-b").await;
    let restarted = c
        .until(
            &mut watch,
            JobState::Started,
            "the job redelivered to host-b",
        )
        .await;
    // The job was not published again: host-b runs the one message host-a held. (Its
    // `delivery` is what the server counts; nats-server 2.9 does not count a delivery to a
    // puller whose connection died, so it may still say 1.)
    c.check(
        restarted.host == "host-b",
        format!("expected Started on host-b; got {restarted:?}"),
    );
    let stream = c.jobs_stream_state().await;
    c.check(
        stream.last_sequence == 1,
        format!("expected the one job message redelivered, not a new one; stream {stream:?}"),
    );
    let last = c
        .until_final(&mut watch, "a final status from host-b")
        .await;
    let report = last.report.clone().unwrap_or_default();
    c.check(
        last.state == JobState::Finished
            && last.host == "host-b"
            && report.frames_in == 60
            && report.frames_processed == 60,
        format!("expected Finished on host-b with 60 frames processed, got {last:?}"),
    );

    c.wait_queue_empty("the redelivered job is acked").await;
    watch.buffered_statuses();
    let finished: Vec<&JobStatus> = watch
        .seen
        .iter()
        .filter(|s| s.state == JobState::Finished)
        .collect();
    c.check(
        finished.len() == 1,
        format!("expected one Finished status, got {finished:?}"),
    );
}

/// A job of a type no host serves, and a message that is not a job at all, are both
/// dead-lettered with their reason; the host goes on to run the next good job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_and_malformed_job_are_dead_lettered() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    let capture = c.capture("small", &captures::options(10, 8, 2, 10.0));
    c.start_host("host-a").await;

    let spec = c.job("job-unknown", "no-such-type", &capture, false);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    let last = c.until_final(&mut watch, "a final status").await;
    c.check(
        last.state == JobState::Failed
            && last.kind == Some(FailureKind::Permanent)
            && last.reason.as_deref() == Some("unknown_job_type"),
        format!("expected Failed, permanent, unknown_job_type; got {last:?}"),
    );
    let dead = c.wait_dead_letter(&spec.id).await;
    let reason = dead
        .headers
        .get(REASON_HEADER)
        .map(|v| v.as_str().to_owned());
    c.check(
        reason.as_deref() == Some("unknown_job_type"),
        format!("expected {REASON_HEADER}: unknown_job_type, got {reason:?}"),
    );

    // Not JSON at all: it has no id, so it is kept under its stream sequence.
    let garbage: &[u8] = b"{\"id\": \"half a job\"";
    let ack =
        c.js.publish(c.nats_config().jobs_subject("x"), garbage.into())
            .await
            .unwrap_or_else(|e| c.fail(format!("cannot publish: {e}")))
            .await
            .unwrap_or_else(|e| c.fail(format!("the jobs stream did not store it: {e}")));
    let dead = c.wait_dead_letter(&format!("seq-{}", ack.sequence)).await;
    let reason = dead
        .headers
        .get(REASON_HEADER)
        .map(|v| v.as_str().to_owned());
    c.check(
        reason.as_deref() == Some("bad_job") && dead.payload.as_ref() == garbage,
        format!(
            "expected the malformed job kept as sent with reason bad_job; got {reason:?}, {:?}",
            String::from_utf8_lossy(&dead.payload)
        ),
    );

    let good = c.job("job-after", "track", &capture, false);
    let mut watch = c.watch(&good.id).await;
    c.submit(&good).await;
    let last = c
        .until_final(&mut watch, "the good job after the bad ones")
        .await;
    c.check(
        last.state == JobState::Finished
            && last
                .report
                .as_ref()
                .is_some_and(|r| r.frames_processed == 10),
        format!("expected the next job to finish with 10 frames, got {last:?}"),
    );
    c.wait_queue_empty("bad jobs are terminated, the good one acked")
        .await;
}

/// With `max_jobs = 1` a host runs one job at a time: the second starts only after the first
/// has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_jobs_is_respected() {
    let mut c = Cluster::start().await;
    c.config.host.max_jobs = 1;
    c.serve_job_type("track", artifacts::tracker());
    // Realtime, 2 s each: two jobs run together would overlap for sure.
    let capture = c.capture("paced", &captures::options(20, 8, 2, 10.0));
    c.start_host("host-a").await;

    let mut statuses = c
        .client
        .subscribe(format!("{}.status.*", c.nats_config().subject_prefix))
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot subscribe: {e}")));
    c.client.flush().await.ok();
    for id in ["job-1", "job-2"] {
        c.submit(&c.job(id, "track", &capture, true)).await;
    }

    // One host publishes every status on one connection: they arrive in the order it sent them.
    let mut events = Vec::new();
    let collect = async {
        let mut finished = 0;
        while finished < 2 {
            let Some(message) = statuses.next().await else {
                break;
            };
            let status: JobStatus = serde_json::from_slice(&message.payload)
                .unwrap_or_else(|e| panic!("bad status message: {e}"));
            if status.state == JobState::Progress {
                continue;
            }
            if status.state.is_final() {
                finished += 1;
            }
            events.push((status.job_id, status.state));
        }
    };
    c.within(JOB, "both jobs to end", collect).await;

    let states: Vec<JobState> = events.iter().map(|(_, s)| *s).collect();
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    c.check(
        states
            == [
                JobState::Started,
                JobState::Finished,
                JobState::Started,
                JobState::Finished,
            ]
            && ids[0] == ids[1]
            && ids[2] == ids[3]
            && ids[0] != ids[2],
        format!("expected one job to start and finish before the other starts; got {events:?}"),
    );
    c.wait_queue_empty("both jobs are acked").await;
}

/// `framehost job stop ID` ends a running job early: status Stopped, acked, not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_request_ends_a_running_job() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    // Realtime, 10 s: it cannot end by itself before the stop.
    let capture = c.capture("paced", &captures::options(60, 8, 2, 6.0));
    c.start_host("host-a").await;

    let spec = c.job("job-stopped", "track", &capture, true);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    c.until(&mut watch, JobState::Started, "Started").await;

    let output = c
        .within(
            COMMAND,
            "framehost job stop",
            tokio::process::Command::new(artifacts::framehost_bin())
                .args(["job", "stop", &spec.id, "--nats", &c.nats.url()])
                .env("NO_COLOR", "1")
                .output(),
        )
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot run framehost job stop: {e}")));
    c.check(
        output.status.success(),
        format!(
            "framehost job stop failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    );

    let last = c
        .until_final(&mut watch, "a final status after the stop")
        .await;
    let report = last.report.clone().unwrap_or_default();
    c.check(
        last.state == JobState::Stopped && report.stopped && report.frames_in < 60,
        format!("expected Stopped before the end of the capture, got {last:?}"),
    );
    c.wait_queue_empty("a stopped job is acked").await;
    let consumer = c.consumer_info().await;
    c.check(
        consumer.num_ack_pending == 0 && consumer.num_redelivered == 0,
        format!("expected nothing pending or redelivered, got {consumer:?}"),
    );
}

/// `framehost job submit --wait` follows the job: it prints the summary and exits 0 when the
/// job finishes, and exits non-zero with the reason when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_reports_the_outcome() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    c.serve_job_type("misbehave", artifacts::misbehave());
    let capture = c.capture("small", &captures::options(30, 8, 2, 10.0));
    let host = c.start_host("host-a").await;
    let config = c.host(host).config_path();

    let submit = |id: &str, job_type: &str, job_config: &str| {
        tokio::process::Command::new(artifacts::framehost_bin())
            .args(["job", "submit", "--wait", "--timeout", "110"])
            .args(["--type", job_type, "--id", id, "--job-config", job_config])
            .arg("--capture")
            .arg(&capture)
            .arg("--config")
            .arg(&config)
            .args(["--nats", &c.nats.url()])
            .env("NO_COLOR", "1")
            .output()
    };

    let ok = c
        .within(
            COMMAND,
            "job submit --wait (good job)",
            submit("cli-ok", "track", "{}"),
        )
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot run framehost job submit: {e}")));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    let stderr = String::from_utf8_lossy(&ok.stderr);
    c.check(
        ok.status.success() && stdout.contains("30 in, 30 processed"),
        format!(
            "expected exit 0 and a summary of 30 processed frames; got {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            ok.status
        ),
    );
    c.check(
        stderr.contains("started on host-a"),
        format!("expected the host named on stderr, got:\n{stderr}"),
    );

    let bad = c
        .within(
            COMMAND,
            "job submit --wait (failing job)",
            submit("cli-bad", "misbehave", r#"{"mode":"panic"}"#),
        )
        .await
        .unwrap_or_else(|e| c.fail(format!("cannot run framehost job submit: {e}")));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    c.check(
        !bad.status.success() && stderr.contains("plugin_panic"),
        format!(
            "expected a non-zero exit naming plugin_panic; got {}\nstderr:\n{stderr}",
            bad.status
        ),
    );
}
