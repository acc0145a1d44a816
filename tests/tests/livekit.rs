//! Jobs whose source is a LiveKit room: a real nats-server, the `framehost serve` binary, the
//! tracker plugin, and the LiveKit protocol double with the stream generator playing the
//! upstream vision service.
//!
//! The host is a separate process; it joins the double over loopback exactly as it would
//! join a LiveKit server (WebSocket signal, str0m peer, DTLS/SCTP data channel).

use std::time::Duration;

use framehost::intake::{JobState, JobStatus};
use framehost::job::{FailureKind, JobReport, JobSpec};
use framehost::livekit::Secret;
use framehost::source::SourceSpec;
use framehost_tests::livekit::generator::{Fault, StreamGenerator, StreamOptions};
use framehost_tests::livekit::{DisconnectReason, DoubleOptions, LeaveAction, LiveKitDouble};
use framehost_tests::{Cluster, JobWatch, artifacts};

/// From submission to the final status: generous for a debug host on a busy two-core
/// machine; a hang is what it catches.
const JOB: Duration = Duration::from_secs(120);
/// For the host to join the room and open the data channel.
const JOIN: Duration = Duration::from_secs(60);
const SOURCE: &str = "vision-service";

/// A cluster whose hosts serve `track` with the tracker and know the double.
async fn cluster(double: &LiveKitDouble) -> Cluster {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    c.use_livekit(double);
    let lk = &mut c.config.livekit;
    // A publisher that left is gone for good in these tests.
    lk.source_grace_ms = 300;
    lk.retry_initial_delay_ms = 100;
    lk.retry_max_delay_ms = 1_000;
    c
}

fn frames(n: u64, fps: f64) -> StreamOptions {
    StreamOptions {
        fps,
        frames: Some(n),
        image_kib: 30,
        ..Default::default()
    }
}

/// Subscribes to the job's statuses, submits it, and returns once the host has joined its
/// room (only then does the double forward what a publisher sends).
async fn submit_and_join(c: &Cluster, double: &LiveKitDouble, spec: &JobSpec) -> JobWatch {
    let watch = c.watch(&spec.id).await;
    c.submit(spec).await;
    let SourceSpec::LiveKit(source) = &spec.source else {
        panic!("{} is not a room job", spec.id);
    };
    c.within(
        JOIN,
        format!("the host to join {}", source.room),
        double.wait_subscribers(&source.room, 1, JOIN),
    )
    .await;
    watch
}

fn report(c: &Cluster, status: &JobStatus) -> JobReport {
    status
        .report
        .clone()
        .unwrap_or_else(|| c.fail(format!("no report in {status:?}")))
}

/// The whole story: a job on NATS joins the room as a hidden subscriber that advertises
/// what the path supports, tracks every frame the publisher sends, publishes results, ends
/// when the publisher leaves, and leaves the room itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_job_runs_until_the_publisher_leaves() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(frames(40, 10.0)).unwrap();

    let spec = c.room_job("room-ok", "track", "cam-1", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    let sent = generator.run(&double.publisher("cam-1", SOURCE)).await;

    let last = c.until_final(&mut watch, "the job's final status").await;
    c.check(
        last.state == JobState::Finished,
        format!("expected Finished, got {last:?}"),
    );
    let r = report(&c, &last);
    c.check(
        sent.frames == 40
            && r.frames_in == 40
            && r.frames_processed == 40
            && r.frames_rejected.is_empty()
            && r.results == 40
            && r.ended_by == "source_left",
        format!("expected all 40 frames tracked and source_left; sent {sent:?}, report {r:?}"),
    );
    c.check(
        r.summary["tracks_confirmed"].as_u64().unwrap_or(0) > 0,
        format!("the tracker confirmed no track: {}", r.summary),
    );
    let lk = r.livekit.clone().unwrap_or_default();
    c.check(
        lk.packets == sent.packets && lk.duplicates == 0 && lk.queue_full == 0,
        format!("every packet sent should arrive once; sent {sent:?}, livekit {lk:?}"),
    );
    let tracked = watch
        .buffered_results()
        .iter()
        .filter(|r| r.frame.is_some())
        .count();
    c.check(
        tracked == 40,
        format!("expected 40 per-frame results on NATS, got {tracked}"),
    );

    let joins = double.joins();
    let join = joins
        .iter()
        .find(|j| j.room == "cam-1")
        .unwrap_or_else(|| c.fail("the double saw no join"));
    c.check(
        join.identity == "framehost-room-ok"
            && join.grants.hidden
            && join.grants.can_subscribe == Some(true)
            && join.grants.can_publish == Some(false)
            && join.grants.can_publish_data == Some(false),
        format!("the host should join hidden, subscribe-only: {join:?}"),
    );
    c.check(
        join.param("client_protocol") == Some("2")
            && join.param("capabilities") == Some("CAP_COMPRESSION_DEFLATE_RAW")
            && join.param("auto_subscribe") == Some("0"),
        format!("the host should advertise data streams v2 and deflate only: {join:?}"),
    );
    c.within(Duration::from_secs(10), "the host's leave", async {
        while double.leaves_received("cam-1") == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    c.wait_queue_empty("the job is acked").await;
}

/// The signal connection drops twice mid-job (a clean close, then an abrupt one): the host
/// resumes each time, the data channel carries on, and no frame is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_signal_connection_is_resumed_without_losing_the_job() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(frames(60, 10.0)).unwrap();

    let spec = c.room_job("room-resume", "track", "cam-2", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    let running = generator.spawn(double.publisher("cam-2", SOURCE));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    double.close_signal("cam-2");
    c.within(JOIN, "the first resume", async {
        while double.resumes("cam-2") < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    double.drop_signal("cam-2");
    let sent = running.finish().await;

    let last = c.until_final(&mut watch, "the job's final status").await;
    let r = report(&c, &last);
    let lk = r.livekit.clone().unwrap_or_default();
    c.check(
        last.state == JobState::Finished
            && r.ended_by == "source_left"
            && r.frames_processed == sent.frames
            && lk.resumes >= 2
            && lk.rejoins == 0,
        format!(
            "expected every frame processed across two resumes and no rejoin; sent {sent:?}, status {last:?}"
        ),
    );
    c.check(
        double.resumes("cam-2") >= 2 && !double.sync_states("cam-2").is_empty(),
        "the double should have seen two resumes with a sync_state",
    );
}

/// The server stops answering pings: the host's ping timeout closes the signal and it
/// resumes; the job goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_detected_by_ping_timeout_and_resumed() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(frames(60, 10.0)).unwrap();

    let spec = c.room_job("room-pings", "track", "cam-3", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    let running = generator.spawn(double.publisher("cam-3", SOURCE));
    double.stop_pongs("cam-3", true);
    c.within(JOIN, "a resume after the ping timeout", async {
        while double.resumes("cam-3") < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    double.stop_pongs("cam-3", false);
    let sent = running.finish().await;

    let last = c.until_final(&mut watch, "the job's final status").await;
    let r = report(&c, &last);
    c.check(
        last.state == JobState::Finished && r.frames_processed == sent.frames,
        format!("expected every frame processed; sent {sent:?}, status {last:?}"),
    );
}

/// A chunk that never arrives, a stream that never ends and two chunks swapped in flight
/// are counted by reason; a packet the server delivers twice is dropped as a duplicate; the
/// frames around them are processed and the job finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_gap_and_a_missing_trailer_are_counted_and_the_job_goes_on() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    // Unfinished streams are given up on after a second rather than ten.
    c.config.streams.idle_timeout_ms = 1_000;
    c.start_host("host-a").await;
    // Images big enough that every part is chunked, so there are chunks to lose.
    let generator = StreamGenerator::new(StreamOptions {
        image_kib: 60,
        faults: vec![
            Fault::DropChunk(5),
            Fault::NoTrailer(12),
            Fault::Reorder(20),
        ],
        leave_at_end: false,
        ..frames(30, 10.0)
    })
    .unwrap();

    let spec = c.room_job("room-faults", "track", "cam-4", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    let publisher = double.publisher("cam-4", SOURCE);
    let sent = generator.run(&publisher).await;
    // A replay of an early packet, as a server's room cache replay would send it: the
    // sequence says the host has had it.
    publisher.send_with_sequence(Default::default(), 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.leave();

    let last = c.until_final(&mut watch, "the job's final status").await;
    let r = report(&c, &last);
    c.check(
        last.state == JobState::Finished && sent.withheld > 0,
        format!("expected Finished; sent {sent:?}, status {last:?}"),
    );
    c.check(
        r.frames_rejected.get("chunk_gap").copied().unwrap_or(0) >= 2
            && r.frames_rejected.get("idle_timeout").copied().unwrap_or(0) >= 1,
        format!(
            "expected chunk_gaps (the lost and the swapped chunk) and an idle_timeout (the \
             missing trailer); got {r:?}"
        ),
    );
    c.check(
        r.frames_processed == 27,
        format!("the 27 intact frames should be processed; got {r:?}"),
    );
    let lk = r.livekit.clone().unwrap_or_default();
    c.check(
        lk.duplicates == 1,
        format!("the replayed packet should be dropped as a duplicate; got {lk:?}"),
    );
}

/// Ten rooms at once on one host, each with its own publisher: every job tracks its own
/// room's frames and ends when its publisher leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rooms_at_once_on_one_host() {
    const ROOMS: usize = 10;
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.config.host.max_jobs = ROOMS;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(StreamOptions {
        image_kib: 20,
        ..frames(20, 4.0)
    })
    .unwrap();

    let mut watches = Vec::new();
    for i in 0..ROOMS {
        let spec = c.room_job(
            &format!("room-many-{i}"),
            "track",
            &format!("many-{i}"),
            SOURCE,
        );
        watches.push(c.watch(&spec.id).await);
        c.submit(&spec).await;
    }
    let mut running = Vec::new();
    for i in 0..ROOMS {
        let room = format!("many-{i}");
        c.within(
            JOIN,
            format!("the host to join {room}"),
            double.wait_subscribers(&room, 1, JOIN),
        )
        .await;
        running.push(generator.spawn(double.publisher(&room, SOURCE)));
    }
    for run in running {
        let sent = run.finish().await;
        assert_eq!(sent.frames, 20);
    }
    for (i, watch) in watches.iter_mut().enumerate() {
        let last = c.until_final(watch, "the job's final status").await;
        let r = report(&c, &last);
        c.check(
            last.state == JobState::Finished
                && r.frames_processed == 20
                && r.ended_by == "source_left",
            format!("room {i}: expected 20 frames and source_left, got {last:?}"),
        );
    }
}

/// The server refuses a token. One the host minted with a wrong secret is the host's
/// mistake: the job fails as transient, saying what to check, and stays queued for a host
/// configured right. One the job brought is the job's: it fails permanently and is
/// dead-lettered. Either way the server's reason is in the error and no secret is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_fails_the_job_with_that_reason() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.config.livekit.api_secret = Some(Secret::new("not-the-secret"));
    c.config.nats.nak_delay_secs = 60;
    c.start_host("host-a").await;

    let minted = c.room_job("room-refused", "track", "cam-5", SOURCE);
    let mut watch = c.watch(&minted.id).await;
    c.submit(&minted).await;
    let last = c.until_final(&mut watch, "the job's final status").await;
    c.check(
        last.state == JobState::Failed
            && last.reason.as_deref() == Some("livekit_token_refused")
            && last.kind == Some(FailureKind::Transient)
            && last
                .error
                .as_deref()
                .is_some_and(|e| e.contains("401") && e.contains("api_secret")),
        format!("expected a transient livekit_token_refused with the 401 and a hint, got {last:?}"),
    );
    c.check(
        !double.refusals().is_empty() && double.subscribers("cam-5") == 0,
        "the double should have refused the token",
    );

    let forged = livekit_api::access_token::AccessToken::with_api_key("devkey", "forged")
        .with_identity("intruder")
        .with_grants(livekit_api::access_token::VideoGrants {
            room_join: true,
            room: "cam-5".into(),
            ..Default::default()
        })
        .to_jwt()
        .unwrap();
    let mut own = c.room_job("room-refused-own", "track", "cam-5", SOURCE);
    if let SourceSpec::LiveKit(room) = &mut own.source {
        room.token = Some(Secret::new(forged.clone()));
    }
    let last = c.run(&own).await;
    c.check(
        last.state == JobState::Failed
            && last.reason.as_deref() == Some("livekit_token_refused")
            && last.kind == Some(FailureKind::Permanent),
        format!("expected a permanent livekit_token_refused for the job's token, got {last:?}"),
    );
    c.wait_dead_letter("room-refused-own").await;
    c.check(
        c.dead_letter("room-refused").await.is_none(),
        "the host's mistake must not dead-letter the job",
    );
    let logs = c.logs();
    c.check(
        !logs.contains("not-the-secret") && !logs.contains(&forged),
        "no secret or token may appear in the host's log",
    );
}

/// The server closes the room: the job ends at once, as finished, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_closing_ends_the_job() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(StreamOptions {
        leave_at_end: false,
        ..frames(10, 10.0)
    })
    .unwrap();

    let spec = c.room_job("room-closed", "track", "cam-6", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    let publisher = double.publisher("cam-6", SOURCE);
    generator.run(&publisher).await;
    // Let the last frame reach the host before the room goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    double.send_leave(
        "cam-6",
        LeaveAction::Disconnect,
        DisconnectReason::RoomDeleted,
    );

    let last = c.until_final(&mut watch, "the job's final status").await;
    let r = report(&c, &last);
    c.check(
        last.state == JobState::Finished
            && r.ended_by == "server_leave"
            && r.frames_processed == 10,
        format!("expected Finished by server_leave with 10 frames, got {last:?}"),
    );
}

/// A room where nothing is ever published ends at the job's idle timeout; a stop request
/// ends another at once. Both leave the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rooms_time_out_and_stop_requests_end_room_jobs() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;

    let mut idle = c.room_job("room-idle", "track", "cam-7", SOURCE);
    if let SourceSpec::LiveKit(room) = &mut idle.source {
        room.idle_timeout_secs = Some(2);
    }
    let stopped = c.room_job("room-stopped", "track", "cam-8", SOURCE);
    let mut idle_watch = c.watch(&idle.id).await;
    let mut stop_watch = c.watch(&stopped.id).await;
    c.submit(&idle).await;
    c.submit(&stopped).await;
    c.within(
        JOIN,
        "the host to join cam-8",
        double.wait_subscribers("cam-8", 1, JOIN),
    )
    .await;
    c.client
        .request(
            c.nats_config().control_subject("room-stopped"),
            "stop".into(),
        )
        .await
        .unwrap_or_else(|e| c.fail(format!("stop request: {e}")));

    let last = c
        .until_final(&mut stop_watch, "the job's final status")
        .await;
    c.check(
        last.state == JobState::Stopped && report(&c, &last).ended_by == "stopped",
        format!("expected Stopped, got {last:?}"),
    );
    let last = c
        .until_final(&mut idle_watch, "the job's final status")
        .await;
    c.check(
        last.state == JobState::Finished && report(&c, &last).ended_by == "idle_timeout",
        format!("expected Finished by idle_timeout, got {last:?}"),
    );
    c.check(
        double.leaves_received("cam-7") == 1 && double.leaves_received("cam-8") == 1,
        "both jobs should have left their rooms",
    );
}

/// No server at the URL: the job fails as transient after its retry budget and is
/// redelivered, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_the_job_as_transient() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.config.livekit.url = Some(format!("ws://127.0.0.1:{port}"));
    c.config.livekit.retry_attempts = 2;
    c.config.nats.nak_delay_secs = 60;
    c.start_host("host-a").await;

    let spec = c.room_job("room-unreachable", "track", "cam-9", SOURCE);
    let last = c.run(&spec).await;
    c.check(
        last.state == JobState::Failed
            && last.reason.as_deref() == Some("livekit_unreachable")
            && last.kind == Some(FailureKind::Transient),
        format!("expected a transient livekit_unreachable, got {last:?}"),
    );
    c.check(
        c.jobs_in_queue().await == 1 && c.dead_letter("room-unreachable").await.is_none(),
        "a transient failure stays in the queue for redelivery",
    );
}

/// The server refuses the resume (it lost our session): the host joins again from scratch,
/// keeps the job, and still sees the publisher leave on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resume_falls_back_to_a_full_rejoin() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(frames(60, 10.0)).unwrap();

    let spec = c.room_job("room-rejoin", "track", "cam-10", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    double.refuse_resume(true);
    let running = generator.spawn(double.publisher("cam-10", SOURCE));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    double.close_signal("cam-10");
    let sent = running.finish().await;

    let last = c.until_final(&mut watch, "the job's final status").await;
    let r = report(&c, &last);
    let lk = r.livekit.clone().unwrap_or_default();
    let joins = double
        .joins()
        .iter()
        .filter(|j| j.room == "cam-10" && j.kind == framehost_tests::livekit::JoinKind::Join)
        .count();
    c.check(
        last.state == JobState::Finished
            && r.ended_by == "source_left"
            && lk.rejoins >= 1
            && joins >= 2
            && r.frames_processed > 0
            && r.frames_processed <= sent.frames,
        format!(
            "expected a rejoin ({joins} joins seen) and the job to run on to source_left; \
             sent {sent:?}, status {last:?}"
        ),
    );
}

/// The publisher leaves in the middle of a frame (its last streams never end): the job
/// ends with what was whole, counts the torn frame, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_leaving_mid_stream_ends_the_job_cleanly() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(StreamOptions {
        image_kib: 60,
        faults: vec![Fault::NoTrailer(19)],
        ..frames(20, 10.0)
    })
    .unwrap();

    let spec = c.room_job("room-torn", "track", "cam-11", SOURCE);
    let mut watch = submit_and_join(&c, &double, &spec).await;
    generator.run(&double.publisher("cam-11", SOURCE)).await;

    let last = c.until_final(&mut watch, "the job's final status").await;
    let r = report(&c, &last);
    let rejected: u64 = r.frames_rejected.values().sum();
    c.check(
        last.state == JobState::Finished
            && r.ended_by == "source_left"
            && r.frames_processed == 19
            && rejected >= 1,
        format!("expected 19 whole frames and the torn one counted; got {last:?}"),
    );
}

/// A plugin author records a room with `framehost capture record` and replays it offline:
/// the replay sees every frame the room carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_room_replays_offline() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("cam-12.fhcap");
    let token = double.subscriber_token("cam-12", "recorder");
    let recorder = tokio::process::Command::new(artifacts::framehost_bin())
        .args(["capture", "record", "--room", "cam-12", "--livekit-url"])
        .arg(double.url())
        .args(["--source-identity", SOURCE, "--out"])
        .arg(&out)
        .env("FRAMEHOST_LIVEKIT_TOKEN", &token)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    double.wait_subscribers("cam-12", 1, JOIN).await;
    let generator = StreamGenerator::new(frames(25, 10.0)).unwrap();
    generator.run(&double.publisher("cam-12", SOURCE)).await;

    let recorded = tokio::time::timeout(JOB, recorder.wait_with_output())
        .await
        .expect("capture record ends when the publisher leaves")
        .unwrap();
    let said = String::from_utf8_lossy(&recorded.stdout);
    assert!(
        recorded.status.success() && said.contains("ended by source_left"),
        "capture record failed: {said}\n{}",
        String::from_utf8_lossy(&recorded.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&recorded.stderr).contains(&token),
        "the token must not be printed"
    );

    let replayed = tokio::process::Command::new(artifacts::framehost_bin())
        .args(["replay", "--json", "--plugin"])
        .arg(artifacts::tracker())
        .arg(&out)
        .output()
        .await
        .unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&replayed.stdout).unwrap_or_else(|e| {
        panic!(
            "replay printed no JSON ({e}): {}",
            String::from_utf8_lossy(&replayed.stderr)
        )
    });
    assert_eq!(summary["frames_processed"], 25, "{summary}");
    assert_eq!(summary["ended_by"], "end_of_capture", "{summary}");
}

/// A job whose own token grants another room: the host notices the room it was put in is
/// not the job's and fails the job for what it is, instead of waiting for frames that
/// never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_room_fails_the_job() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;

    let mut spec = c.room_job("room-wrong-token", "track", "cam-13", SOURCE);
    if let SourceSpec::LiveKit(room) = &mut spec.source {
        room.token = Some(Secret::new(double.subscriber_token("elsewhere", "viewer")));
    }
    let last = c.run(&spec).await;
    c.check(
        last.state == JobState::Failed
            && last.reason.as_deref() == Some("bad_job")
            && last.kind == Some(FailureKind::Permanent)
            && last
                .error
                .as_deref()
                .is_some_and(|e| e.contains("\"elsewhere\"") && e.contains("\"cam-13\"")),
        format!("expected a permanent bad_job naming both rooms, got {last:?}"),
    );
}

/// A publisher that never stops: the job ends at its maximum duration, as finished, with
/// the frames it got, and leaves the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ends_at_its_maximum_duration() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut c = cluster(&double).await;
    c.start_host("host-a").await;
    let generator = StreamGenerator::new(StreamOptions {
        frames: None,
        ..frames(0, 10.0)
    })
    .unwrap();

    let mut spec = c.room_job("room-max", "track", "cam-14", SOURCE);
    if let SourceSpec::LiveKit(room) = &mut spec.source {
        room.max_duration_secs = Some(3);
    }
    let mut watch = submit_and_join(&c, &double, &spec).await;
    let running = generator.spawn(double.publisher("cam-14", SOURCE));

    let last = c.until_final(&mut watch, "the job's final status").await;
    running.stop();
    let sent = running.finish().await;
    let r = report(&c, &last);
    c.check(
        last.state == JobState::Finished
            && r.ended_by == "max_duration"
            && r.frames_processed > 0
            && r.frames_processed <= sent.frames,
        format!("expected Finished by max_duration with some frames; sent {sent:?}, got {last:?}"),
    );
    c.within(Duration::from_secs(10), "the host's leave", async {
        while double.leaves_received("cam-14") == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// `capture record` never touches an existing file unless told to, and a recording that
/// fails before anything arrived leaves no file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_recording_leaves_existing_files_alone() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let record = |out: &std::path::Path, token: &str, extra: &[&str]| {
        let mut command = tokio::process::Command::new(artifacts::framehost_bin());
        command
            .args(["capture", "record", "--room", "cam-15", "--livekit-url"])
            .arg(double.url())
            .args(["--idle-timeout-secs", "2", "--out"])
            .arg(out)
            .args(extra)
            .env("FRAMEHOST_LIVEKIT_TOKEN", token)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY");
        command.output()
    };

    let existing = scratch.path().join("kept.fhcap");
    std::fs::write(&existing, b"an earlier recording").unwrap();
    let good = double.subscriber_token("cam-15", "recorder");
    let refused = record(&existing, &good, &[]).await.unwrap();
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "an existing --out must be refused: {}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let forged = livekit_api::access_token::AccessToken::with_api_key("devkey", "forged")
        .with_grants(livekit_api::access_token::VideoGrants {
            room_join: true,
            room: "cam-15".into(),
            ..Default::default()
        })
        .with_identity("recorder")
        .to_jwt()
        .unwrap();
    let failed = record(&existing, &forged, &["--force"]).await.unwrap();
    assert!(
        !failed.status.success()
            && String::from_utf8_lossy(&failed.stderr).contains("refused the token"),
        "a refused token must fail the recording: {}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert_eq!(
        std::fs::read(&existing).unwrap(),
        b"an earlier recording",
        "a failed recording must leave the earlier file as it was"
    );
    let fresh = scratch.path().join("fresh.fhcap");
    let failed = record(&fresh, &forged, &[]).await.unwrap();
    assert!(!failed.status.success());
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["kept.fhcap"], "no partial or empty file may be left");
}
