//! The plugin catalogue: versions published with `framehost plugin push` (or dropped into a
//! watched directory) reach every replica without a restart; running jobs finish on the
//! version they started with; a bad version is refused and the previous one keeps serving;
//! compiled code survives a restart.
//!
//! Versions are real plugins built from the repo; "v2" of a plugin is the same component
//! with a custom section appended, so it has its own digest and behaves the same.

use std::time::Duration;

use framehost::catalogue::Step;
use framehost::catalogue::nats::ReplicaStatus;
use framehost::intake::{JobState, JobStatus};
use framehost::job::FailureKind;
use framehost_tests::catalogue::{serving, variant};
use framehost_tests::{Cluster, artifacts, captures, within};

/// Bound on a job's run, from submission to its final status.
const JOB: Duration = Duration::from_secs(150);

/// The digest a finished job ran on; fails the test unless it finished with every frame.
fn finished_on(c: &Cluster, status: &JobStatus, frames: u64) -> String {
    let report = status
        .report
        .as_ref()
        .unwrap_or_else(|| c.fail(format!("no report: {status:?}")));
    c.check(
        status.state == JobState::Finished && report.frames_processed == frames,
        format!("expected Finished with {frames} frames processed, got {status:?}"),
    );
    report.plugin_digest.clone()
}

/// Under load: two jobs run on v1 while v2 is pushed; they finish on v1, the jobs after the
/// push run on v2, and no job fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_under_load_swaps_new_jobs_and_lets_running_ones_finish() {
    let mut c = Cluster::start().await;
    c.config.host.max_jobs = 4;
    c.start_host("host-a").await;
    let v1 = c.push_plugin("track", &artifacts::tracker(), &[]).await;
    let v2_file = variant(&artifacts::tracker(), c.scratch.path(), "v2");

    // 60 frames at 12 fps, read at that pace: about 5 s per job.
    let capture = c.capture("paced", &captures::options(60, 8, 2, 12.0));
    let mut early = Vec::new();
    for n in 0..2 {
        let spec = c.job(&format!("early-{n}"), "track", &capture, true);
        let mut watch = c.watch(&spec.id).await;
        c.submit(&spec).await;
        let started = c
            .until(&mut watch, JobState::Started, "an early job to start")
            .await;
        c.check(
            started.plugin_digest.as_deref() == Some(&v1),
            format!("the started status names the version: {started:?}"),
        );
        early.push((spec.id, watch));
    }

    let v2 = c.push_plugin("track", &v2_file, &[]).await;
    c.check(v1 != v2, "the variant must have its own digest");
    let mut late = Vec::new();
    for n in 0..2 {
        let spec = c.job(&format!("late-{n}"), "track", &capture, true);
        let watch = c.watch(&spec.id).await;
        c.submit(&spec).await;
        late.push((spec.id, watch));
    }

    for (id, watch) in &mut early {
        let status = c
            .until_final(watch, format!("the final status of {id}"))
            .await;
        let digest = finished_on(&c, &status, 60);
        c.check(
            digest == v1,
            format!("{id} started before the push: expected {v1}, ran on {digest}"),
        );
    }
    for (id, watch) in &mut late {
        let status = c
            .until_final(watch, format!("the final status of {id}"))
            .await;
        let digest = finished_on(&c, &status, 60);
        c.check(
            digest == v2,
            format!("{id} started after the push: expected {v2}, ran on {digest}"),
        );
    }
    let status = c.replica("host-a").await.expect("host-a is live");
    c.check(
        status.catalogue.refusals == 0,
        format!("no version should be refused: {status:?}"),
    );
}

/// Each kind of bad version is refused at its step, with v1 still serving jobs; `plugin
/// push` refuses the same files before they reach the cluster, and `plugin list` shows the
/// host's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_versions_are_refused_and_the_previous_one_keeps_serving() {
    let mut c = Cluster::start().await;
    c.start_host("host-a").await;
    let v1 = c.push_plugin("track", &artifacts::tracker(), &[]).await;
    let capture = c.capture("small", &captures::options(10, 4, 2, 10.0));

    let tracker = std::fs::read(artifacts::tracker()).unwrap();
    let truncated = tracker[..tracker.len() / 2].to_vec();
    // The smallest core module: magic and version 1.
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let other_world = std::fs::read(artifacts::other_world()).unwrap();
    let bad_signature = std::fs::read(artifacts::bad_signature()).unwrap();
    let cases = [
        ("truncated", truncated, Step::Compile),
        ("core-module", core_module, Step::NotComponent),
        ("other-world", other_world, Step::World),
        ("bad-signature", bad_signature, Step::Instantiate),
    ];

    for (n, (name, bytes, step)) in cases.iter().enumerate() {
        // The command line refuses it before publishing anything.
        let file = c.scratch.path().join(format!("{name}.wasm"));
        std::fs::write(&file, bytes).unwrap();
        let out = c
            .plugin_cli(&["push", "--job-type", "track", file.to_str().unwrap()])
            .await;
        c.check(
            !out.success
                && out
                    .text()
                    .contains(&format!("refused at step {}", step.as_str())),
            format!(
                "push of {name} should be refused at {step:?}:\n{}",
                out.text()
            ),
        );

        // Published behind its back, every replica refuses it too.
        let digest = framehost::sandbox::digest_of(bytes);
        c.write_route_unchecked("track", &digest, bytes).await;
        let status = c
            .wait_replica("host-a", &format!("refusing {name}"), |s| {
                s.catalogue.routes["track"]
                    .refused
                    .as_ref()
                    .is_some_and(|r| r.digest == digest)
            })
            .await;
        let route = &status.catalogue.routes["track"];
        let refused = route.refused.as_ref().unwrap();
        c.check(
            refused.step == *step && serving(&status, "track").as_deref() == Some(&v1),
            format!("{name}: expected a refusal at {step:?} with v1 serving, got {route:?}"),
        );
        c.check(
            status.catalogue.refusals == n as u64 + 1,
            format!("{name}: refusals should count {}, got {status:?}", n + 1),
        );
        // An operator sees it on the dashboard too.
        let scrape = c
            .host(0)
            .scrape()
            .await
            .unwrap_or_else(|e| c.fail(format!("cannot scrape host-a: {e:#}")));
        let refused = scrape.value(
            "framehost_plugin_versions_refused",
            &[
                ("job_type", "track"),
                ("digest", &digest),
                ("step", step.as_str()),
            ],
        );
        c.check(
            refused == Some(1.0),
            format!("{name}: expected the refusal in /metrics, got {refused:?}"),
        );

        let spec = c.job(&format!("after-{name}"), "track", &capture, false);
        let status = c.run(&spec).await;
        let ran_on = finished_on(&c, &status, 10);
        c.check(
            ran_on == v1,
            format!("after {name}: expected v1, ran on {ran_on}"),
        );
    }

    // A route naming one digest whose object holds other bytes.
    let v2 = variant(&artifacts::tracker(), c.scratch.path(), "v2");
    let claimed = framehost::sandbox::digest_of(&std::fs::read(&v2).unwrap());
    c.write_route_unchecked("track", &claimed, &tracker).await;
    let status = c
        .wait_replica("host-a", "refusing the mismatched digest", |s| {
            s.catalogue.routes["track"]
                .refused
                .as_ref()
                .is_some_and(|r| r.digest == claimed)
        })
        .await;
    let refused = status.catalogue.routes["track"].refused.clone().unwrap();
    c.check(
        refused.step == Step::Digest && serving(&status, "track").as_deref() == Some(&v1),
        format!("expected a digest refusal with v1 serving, got {refused:?}"),
    );

    let list = c.plugin_cli(&["list"]).await;
    c.check(
        list.success && list.stdout.contains("refused") && list.stdout.contains("step digest"),
        format!("plugin list should show the refusal:\n{}", list.text()),
    );

    // A job type whose only version was refused is not unknown: its jobs are handed back
    // for another replica (transient), not dead-lettered.
    let other_world = std::fs::read(artifacts::other_world()).unwrap();
    c.write_route_unchecked(
        "fresh",
        &framehost::sandbox::digest_of(&other_world),
        &other_world,
    )
    .await;
    c.wait_replica("host-a", "refusing fresh", |s| {
        s.catalogue
            .routes
            .get("fresh")
            .is_some_and(|r| r.refused.is_some())
    })
    .await;
    // A replica started now has no v1 in memory: it walks the route's history back past
    // the refused versions and serves v1 too, the refusal still on show.
    let a = 0;
    c.host(a).terminate();
    let log = c.logs();
    within(JOB, "host-a to stop", || log, c.host(a).wait())
        .await
        .ok();
    c.start_host("host-a").await;
    let status = c
        .wait_replica("host-a", "serving v1 after the restart", |s| {
            serving(s, "track").as_deref() == Some(&v1)
        })
        .await;
    let route = &status.catalogue.routes["track"];
    c.check(
        route.refused.as_ref().is_some_and(|r| r.digest == claimed),
        format!("the refusal of the routed version stays on show: {route:?}"),
    );

    // A route that is not a route document: refused like a bad version, v1 serves on, and
    // the operator's tools still work and can replace it.
    let buckets = c.buckets().await;
    buckets
        .routes
        .put("route.track", "{not json".into())
        .await
        .unwrap();
    let status = c
        .wait_replica("host-a", "refusing the unreadable route", |s| {
            s.catalogue.routes["track"]
                .refused
                .as_ref()
                .is_some_and(|r| r.reason.contains("not a route document"))
        })
        .await;
    c.check(
        serving(&status, "track").as_deref() == Some(&v1),
        format!("v1 keeps serving: {status:?}"),
    );
    let list = c.plugin_cli(&["list"]).await;
    c.check(
        list.success && list.stdout.contains("is not a route document"),
        format!(
            "plugin list should name the unreadable route:\n{}",
            list.text()
        ),
    );
    c.push_plugin("track", &artifacts::tracker(), &[]).await;

    let spec = c.job("fresh-1", "fresh", &capture, false);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    let status = c
        .until(&mut watch, JobState::Failed, "the first failure of fresh-1")
        .await;
    c.check(
        status.kind == Some(FailureKind::Transient)
            && status.reason.as_deref() == Some("plugin_not_loaded"),
        format!("expected a transient plugin_not_loaded failure, got {status:?}"),
    );
}

/// Two hosts on one server: one push reaches both, each runs a job on it; one rollback
/// brings both back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_reaches_every_replica_and_rollback_undoes_it() {
    let mut c = Cluster::start().await;
    c.config.host.max_jobs = 1;
    c.start_host("host-a").await;
    c.start_host("host-b").await;
    let v1 = c.push_plugin("track", &artifacts::tracker(), &[]).await;
    let v2_file = variant(&artifacts::tracker(), c.scratch.path(), "v2");
    let v2 = c
        .push_plugin("track", &v2_file, &["--memory-mib", "48"])
        .await;
    for host in ["host-a", "host-b"] {
        let status = c.replica(host).await.expect("live replica");
        let route = &status.catalogue.routes["track"];
        c.check(
            serving(&status, "track").as_deref() == Some(&v2)
                && route.serving.as_ref().unwrap().limits.memory_mib == 48,
            format!("{host} should serve v2 with 48 MiB: {route:?}"),
        );
    }

    // One job per host (each runs one at a time): both on v2.
    let capture = c.capture("paced", &captures::options(30, 4, 2, 10.0));
    let mut watches = Vec::new();
    for n in 0..2 {
        let spec = c.job(&format!("job-{n}"), "track", &capture, true);
        let watch = c.watch(&spec.id).await;
        c.submit(&spec).await;
        watches.push((spec.id, watch));
    }
    let mut hosts = Vec::new();
    for (id, watch) in &mut watches {
        let status = c
            .until_final(watch, format!("the final status of {id}"))
            .await;
        let digest = finished_on(&c, &status, 30);
        c.check(
            digest == v2,
            format!("{id} on {}: expected v2, ran on {digest}", status.host),
        );
        hosts.push(status.host);
    }
    hosts.sort();
    c.check(
        hosts == ["host-a", "host-b"],
        format!("expected one job on each host, got {hosts:?}"),
    );

    // Pushing what is already routed writes nothing, so rollback still goes back to v1.
    let out = c
        .plugin_cli(&[
            "push",
            "--job-type",
            "track",
            v2_file.to_str().unwrap(),
            "--memory-mib",
            "48",
        ])
        .await;
    c.check(
        out.success && out.stdout.contains("nothing written"),
        format!("a second push of v2 should change nothing:\n{}", out.text()),
    );
    let out = c
        .plugin_cli(&["rollback", "--job-type", "track", "--wait", "150"])
        .await;
    c.check(out.success, format!("rollback failed:\n{}", out.text()));
    for host in ["host-a", "host-b"] {
        let status = c.replica(host).await.expect("live replica");
        c.check(
            serving(&status, "track").as_deref() == Some(&v1),
            format!("{host} should serve v1 again: {status:?}"),
        );
    }
    // v1 was the first version: nothing before it.
    let out = c.plugin_cli(&["rollback", "--job-type", "track"]).await;
    c.check(
        !out.success && out.text().contains("no version before"),
        format!(
            "a second rollback should have nowhere to go:\n{}",
            out.text()
        ),
    );
}

fn both_serving(status: &ReplicaStatus) -> bool {
    let routes = &status.catalogue.routes;
    routes.len() == 2 && routes.values().all(|r| r.state == "serving")
}

/// A restarted host loads its compiled plugins from the on-disk cache: the counters it
/// publishes say nothing was compiled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_loads_compiled_plugins_without_compiling() {
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    c.serve_job_type("stats", artifacts::frame_stats());
    // A key that is no route must not keep the host waiting for routes.
    c.buckets()
        .await
        .routes
        .put("stray", "not a route".into())
        .await
        .unwrap();
    let first = c.start_host("host-a").await;
    let status = c
        .wait_replica("host-a", "serving both plugins", both_serving)
        .await;
    c.check(
        status.catalogue.counts.compiles == 2 && status.catalogue.counts.cache_hits == 0,
        format!(
            "a first start compiles both plugins: {:?}",
            status.catalogue.counts
        ),
    );
    c.host(first).terminate();
    let log = c.logs();
    within(JOB, "host-a to stop", || log, c.host(first).wait())
        .await
        .ok();

    c.start_host("host-a").await;
    let status = c
        .wait_replica(
            "host-a",
            "serving both plugins after the restart",
            both_serving,
        )
        .await;
    c.check(
        status.catalogue.counts.compiles == 0 && status.catalogue.counts.cache_hits == 2,
        format!(
            "a restart loads both from the cache: {:?}",
            status.catalogue.counts
        ),
    );
    let capture = c.capture("small", &captures::options(10, 4, 2, 10.0));
    let spec = c.job("after-restart", "track", &capture, false);
    let status = c.run(&spec).await;
    finished_on(&c, &status, 10);
}

/// The watched directory: a plugin dropped in starts serving its job type, a changed one
/// (with new limits beside it) replaces it, a broken one is refused, and a removed one
/// stops serving, all without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_directory_adds_replaces_refuses_and_removes() {
    let mut c = Cluster::start().await;
    let dir = c.scratch.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    c.config.catalogue.dir = Some(dir.clone());
    c.config.catalogue.poll_interval_ms = 200;
    c.start_host("host-a").await;
    let capture = c.capture("small", &captures::options(10, 4, 2, 10.0));
    let run = |id: &'static str| {
        let c = &c;
        let capture = capture.clone();
        async move { c.run(&c.job(id, "track", &capture, false)).await }
    };

    std::fs::copy(artifacts::tracker(), dir.join("track.wasm")).unwrap();
    let v1 = framehost::sandbox::digest_of(&std::fs::read(artifacts::tracker()).unwrap());
    c.wait_replica("host-a", "serving the dropped-in plugin", |s| {
        serving(s, "track").as_deref() == Some(&v1)
    })
    .await;
    let status = run("dropped-in").await;
    c.check(
        finished_on(&c, &status, 10) == v1,
        "ran on the dropped-in version",
    );

    // Replaced the way deployments do it: write beside, rename over.
    let v2_file = variant(&artifacts::tracker(), c.scratch.path(), "v2");
    let v2 = framehost::sandbox::digest_of(&std::fs::read(&v2_file).unwrap());
    std::fs::write(dir.join("track.toml"), "memory_mib = 40\n").unwrap();
    std::fs::copy(&v2_file, dir.join(".track.wasm.new")).unwrap();
    std::fs::rename(dir.join(".track.wasm.new"), dir.join("track.wasm")).unwrap();
    let status = c
        .wait_replica("host-a", "serving the replaced plugin", |s| {
            serving(s, "track").as_deref() == Some(&v2)
        })
        .await;
    let limits = status.catalogue.routes["track"]
        .serving
        .as_ref()
        .unwrap()
        .limits;
    c.check(
        limits.memory_mib == 40,
        format!("limits from track.toml: {limits:?}"),
    );
    let status = run("replaced").await;
    c.check(
        finished_on(&c, &status, 10) == v2,
        "ran on the replaced version",
    );

    // A broken limits file is refused (and shown) like a broken plugin; fixed, it clears.
    std::fs::write(dir.join("track.toml"), "memory_mib = \"lots\"\n").unwrap();
    let status = c
        .wait_replica("host-a", "refusing the broken limits file", |s| {
            s.catalogue.routes["track"]
                .refused
                .as_ref()
                .is_some_and(|r| r.step == Step::Limits)
        })
        .await;
    c.check(
        serving(&status, "track").as_deref() == Some(&v2),
        format!("v2 keeps serving: {status:?}"),
    );
    std::fs::write(dir.join("track.toml"), "memory_mib = 40\n").unwrap();
    c.wait_replica(
        "host-a",
        "clearing the refusal once the file is fixed",
        |s| s.catalogue.routes["track"].refused.is_none(),
    )
    .await;

    std::fs::write(dir.join("track.wasm"), b"not a plugin").unwrap();
    let status = c
        .wait_replica("host-a", "refusing the broken file", |s| {
            s.catalogue.routes["track"].refused.is_some()
        })
        .await;
    c.check(
        serving(&status, "track").as_deref() == Some(&v2),
        format!("v2 keeps serving: {status:?}"),
    );
    let status = run("after-broken").await;
    c.check(
        finished_on(&c, &status, 10) == v2,
        "ran on v2 after the broken file",
    );

    std::fs::remove_file(dir.join("track.wasm")).unwrap();
    c.wait_replica("host-a", "dropping the removed job type", |s| {
        !s.catalogue.routes.contains_key("track")
    })
    .await;
    let status = run("after-removal").await;
    c.check(
        status.state == JobState::Failed
            && status.reason.as_deref() == Some("unknown_job_type")
            && status.kind == Some(FailureKind::Permanent),
        format!("expected unknown_job_type once the file is gone, got {status:?}"),
    );
}

/// In process, no server: for one job type a directory route wins over a `[job_types]`
/// one, and withdrawing it brings the configured version back from the cache, not the
/// compiler; a job holding the old route can still instantiate it after the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_winning_source_serves_and_a_withdrawn_route_falls_back() {
    use framehost::catalogue::dir::DirSource;
    use framehost::catalogue::{Catalogue, Fetch, Origin, RouteSpec};
    use framehost::config::{Config, JobTypeConfig, Limits};
    use framehost::sandbox::{JobInfo, Sandbox, digest_of};

    let scratch = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.catalogue.cache_dir = Some(scratch.path().join("compiled"));
    let sandbox = Sandbox::new(config.sandbox_config()).unwrap();
    let catalogue = Catalogue::new(sandbox, &config);
    let spec = |path: std::path::PathBuf, origin| RouteSpec {
        job_type: "track".into(),
        name: "tracker".into(),
        digest: digest_of(&std::fs::read(&path).unwrap()),
        limits: Limits::default(),
        origin,
        revision: None,
        fetch: Fetch::File(path),
        unusable: None,
        stands_in_for: None,
    };
    let configured = spec(artifacts::tracker(), Origin::Config);
    let dropped_in = spec(
        variant(&artifacts::tracker(), scratch.path(), "dir"),
        Origin::Dir,
    );

    catalogue.offer(configured.clone()).await;
    let held = catalogue.route("track").expect("configured route serves");
    assert_eq!(held.plugin.digest(), configured.digest);

    catalogue.offer(dropped_in.clone()).await;
    assert_eq!(
        catalogue.route("track").unwrap().plugin.digest(),
        dropped_in.digest,
        "the directory's route wins over the configuration's"
    );
    // A configured version offered again while the directory's wins changes nothing.
    catalogue.offer(configured.clone()).await;
    assert_eq!(
        catalogue.route("track").unwrap().plugin.digest(),
        dropped_in.digest
    );

    // The job that took the first route still runs it.
    let job = JobInfo {
        job_id: "held".into(),
        job_type: "track".into(),
        room: "r".into(),
        config_json: "{}".into(),
    };
    let mut processor = held
        .plugin
        .instantiate(&job, held.limits.plugin_limits())
        .await
        .expect("the held version instantiates after the swap");
    processor.finish().await.expect("and finishes");
    drop((processor, held));

    catalogue.withdraw("track", Origin::Dir).await;
    assert_eq!(
        catalogue.route("track").unwrap().plugin.digest(),
        configured.digest,
        "the configured version serves again"
    );
    let counts = catalogue.compiler().counts();
    assert_eq!(
        (counts.compiles, counts.cache_hits),
        (2, 1),
        "two versions compiled once each; the fallback came from the cache"
    );
    catalogue.withdraw("track", Origin::Config).await;
    assert!(catalogue.route("track").is_none());
    assert!(!catalogue.is_wanted("track"));

    // A configured plugin file that is missing is refused at the fetch step, not ignored:
    // its job type is still wanted, so its jobs wait for a replica that has it.
    let mut config = config.clone();
    config.job_types.insert(
        "typo".into(),
        JobTypeConfig::new(scratch.path().join("nope.wasm")),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    DirSource::new(catalogue.clone(), &config).spawn(stop.clone());
    catalogue.ready().await;
    stop.cancel();
    let status = catalogue.status();
    let refused = status.routes["typo"].refused.as_ref().expect("refused");
    assert_eq!(refused.step, framehost::catalogue::Step::Fetch);
    assert!(refused.reason.contains("nope.wasm"), "{refused:?}");
    assert!(catalogue.is_wanted("typo") && catalogue.route("typo").is_none());
}

/// Replicas whose catalogues differ: a replica without a job type that another live replica
/// serves hands its jobs back (transient) instead of dead-lettering them, and the replica
/// that has it runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_type_only_some_replicas_serve_is_handed_back_not_dead_lettered() {
    let mut c = Cluster::start().await;
    c.config.nats.nak_delay_secs = 1;
    // host-a hands the job back every second until host-b is back: room for that.
    c.config.nats.max_deliver = 100;
    c.start_host("host-a").await;
    let dir = c.scratch.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(artifacts::tracker(), dir.join("solo.wasm")).unwrap();
    c.config.catalogue.dir = Some(dir);
    let b = c.start_host("host-b").await;
    c.wait_replica("host-b", "serving solo", |s| serving(s, "solo").is_some())
        .await;

    // host-b dies without a word: its status stays fresh for a while, so host-a, the only
    // one pulling, knows solo is served elsewhere.
    c.host(b).kill9().await;
    let capture = c.capture("small", &captures::options(10, 4, 2, 10.0));
    let spec = c.job("solo-1", "solo", &capture, false);
    let mut watch = c.watch(&spec.id).await;
    c.submit(&spec).await;
    let failed = c
        .until(&mut watch, JobState::Failed, "host-a handing solo-1 back")
        .await;
    c.check(
        failed.host == "host-a"
            && failed.reason.as_deref() == Some("job_type_elsewhere")
            && failed.kind == Some(FailureKind::Transient),
        format!("expected host-a to hand the job back as job_type_elsewhere, got {failed:?}"),
    );

    // host-b comes back and runs it on a later delivery.
    c.start_host("host-b").await;
    let status = c
        .until(&mut watch, JobState::Finished, "solo-1 to finish")
        .await;
    finished_on(&c, &status, 10);
    c.check(
        status.host == "host-b",
        format!("expected host-b to run it: {status:?}"),
    );
}
