//! The sandbox, through the library's job path: misbehaving plugins fail their own job and
//! never the job running beside them on the same engine, as in the host.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use framehost::config::{Config, Limits, TrapPolicy};
use framehost::job::{self, FailureKind, JobError, JobEvent, JobReport, JobSettings, JobSpec};
use framehost::sandbox::{LoadError, Plugin, Sandbox, SandboxConfig};
use framehost::source::SourceSpec;
use framehost_tests::{artifacts, captures, within};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Frames in the shared capture: more than `leak` needs to pass a 32 MiB limit at 1 MiB a
/// frame.
const FRAMES: u64 = 48;
const JOB: Duration = Duration::from_secs(120);

/// One engine for every test in this binary, as one host has one for all its jobs, with
/// the plugins compiled once (compiling is slow in a debug build).
struct Engine {
    sandbox: Sandbox,
    tracker: Plugin,
    misbehave: Plugin,
    escape: Plugin,
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let sandbox = Sandbox::new(SandboxConfig {
            max_instances: 32,
            ..Default::default()
        })
        .expect("the sandbox starts");
        let load = |path: PathBuf| {
            sandbox
                .load_file(&path)
                .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
        };
        Engine {
            tracker: load(artifacts::tracker()),
            misbehave: load(artifacts::misbehave()),
            escape: load(artifacts::escape()),
            sandbox,
        }
    })
}

fn capture() -> PathBuf {
    captures::shared(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "sandbox-48-frames",
        &captures::options(FRAMES as u32, 4, 2, 10.0),
    )
}

fn spec(id: &str, config: serde_json::Value) -> JobSpec {
    JobSpec {
        id: id.to_owned(),
        job_type: "test".into(),
        source: SourceSpec::Capture {
            path: capture(),
            realtime: false,
        },
        config,
    }
}

/// Runs a job on its own task, as the host does, draining its events.
fn spawn_job(
    spec: JobSpec,
    plugin: &Plugin,
    limits: Limits,
) -> tokio::task::JoinHandle<Result<JobReport, JobError>> {
    let plugin = plugin.clone();
    let settings = JobSettings::new(&Config::default(), &limits);
    tokio::spawn(async move {
        let (events, mut received) = mpsc::channel(16);
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let outcome = job::run(&spec, &plugin, &settings, events, CancellationToken::new()).await;
        drain.await.ok();
        outcome
    })
}

fn misbehave_type(configure: impl FnOnce(&mut Limits)) -> Limits {
    let mut limits = Limits::default();
    configure(&mut limits);
    limits
}

/// Runs a misbehaving job next to a tracker job on the shared engine; checks that the
/// tracker job processed every frame and returns the misbehaving job's error.
async fn fails_beside_a_good_job(mode: serde_json::Value, limits: Limits) -> JobError {
    let engine = engine();
    let good = spawn_job(
        spec("good", serde_json::json!({})),
        &engine.tracker,
        Limits::default(),
    );
    let bad = spawn_job(spec("bad", mode.clone()), &engine.misbehave, limits);
    let (good, bad) = within(JOB, "both jobs to end", String::new, async {
        (
            good.await.expect("good job task"),
            bad.await.expect("bad job task"),
        )
    })
    .await;

    let report = good.unwrap_or_else(|e| panic!("the good job failed beside {mode}: {e}"));
    assert!(
        report.frames_in == FRAMES
            && report.frames_processed == FRAMES
            && report.frames_dropped == 0
            && report.frames_rejected.is_empty(),
        "the good job beside {mode} did not process every frame: {report:?}"
    );
    match bad {
        Ok(report) => panic!("the {mode} job succeeded: {report:?}"),
        Err(error) => {
            assert_eq!(error.kind, FailureKind::Permanent, "{error}");
            assert!(error.report.is_some(), "a failed job reports what it did");
            error
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_hits_the_memory_limit() {
    let error = fails_beside_a_good_job(
        serde_json::json!({"mode": "leak"}),
        misbehave_type(|t| t.memory_mib = 32),
    )
    .await;
    assert_eq!(error.reason, "plugin_out_of_memory", "{error}");
    assert!(
        error.message.contains(&(32u64 << 20).to_string()),
        "the error should name the 32 MiB limit: {error}"
    );
    let report = error.report.expect("report");
    assert!(
        report.plugin_memory_peak_bytes <= 32 << 20 && report.frames_processed > 20,
        "the plugin should have grown to near the limit and no further: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_hits_the_call_deadline() {
    let error = fails_beside_a_good_job(
        serde_json::json!({"mode": "spin"}),
        misbehave_type(|t| t.call_deadline_ms = 300),
    )
    .await;
    assert_eq!(error.reason, "plugin_deadline", "{error}");
    assert!(error.message.contains("300ms"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_fails_with_the_panic_message() {
    let error = fails_beside_a_good_job(
        serde_json::json!({"mode": "panic", "after": 5}),
        misbehave_type(|_| {}),
    )
    .await;
    assert_eq!(error.reason, "plugin_panic", "{error}");
    // The plugin's own words, from its stderr.
    assert!(
        error
            .message
            .contains("misbehave: panicking at frame 5, as configured"),
        "{error}"
    );
    assert_eq!(error.report.expect("report").frames_processed, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_overflow_traps() {
    let error =
        fails_beside_a_good_job(serde_json::json!({"mode": "stack"}), misbehave_type(|_| {})).await;
    assert!(
        matches!(error.reason, "plugin_trap" | "plugin_stack_overflow"),
        "{error}"
    );
    assert!(error.message.contains("stack"), "{error}");
}

/// With `on_trap = restart`, each trap costs one frame and one restart; a fresh instance
/// starts over (its `after` count too). Past `max_restarts`, the next trap fails the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_are_counted_and_bounded() {
    let engine = engine();
    let restart_twice = || {
        misbehave_type(|t| {
            t.on_trap = TrapPolicy::Restart;
            t.max_restarts = 2;
        })
    };

    // Panics at the 21st frame of each instance: frames 20 and 41 are lost, two restarts,
    // and the third instance reaches the end of the capture (6 frames later).
    let within_budget = spawn_job(
        spec(
            "restart-ok",
            serde_json::json!({"mode": "panic", "after": 20}),
        ),
        &engine.misbehave,
        restart_twice(),
    );
    // Panics at the 3rd frame of each instance: frames 2, 5 and 8 trap; the third trap is
    // one past the budget.
    let over_budget = spawn_job(
        spec(
            "restart-over",
            serde_json::json!({"mode": "panic", "after": 2}),
        ),
        &engine.misbehave,
        restart_twice(),
    );
    let (within_budget, over_budget) = within(JOB, "both jobs to end", String::new, async {
        (within_budget.await.unwrap(), over_budget.await.unwrap())
    })
    .await;

    let report = within_budget.unwrap_or_else(|e| panic!("job within its restarts failed: {e}"));
    assert_eq!(report.plugin_restarts, 2, "{report:?}");
    assert_eq!(report.frames_processed, FRAMES - 2, "{report:?}");
    assert_eq!(
        report.frames_rejected.get("plugin_panic"),
        Some(&2),
        "{report:?}"
    );
    // The summary comes from the last instance: it saw only the frames after frame 41.
    assert_eq!(report.summary["frames"], FRAMES - 42, "{report:?}");

    let error = match over_budget {
        Ok(report) => panic!("job past its restarts succeeded: {report:?}"),
        Err(error) => error,
    };
    assert_eq!(error.reason, "plugin_panic", "{error}");
    assert!(error.message.starts_with("frame 8:"), "{error}");
    let report = error.report.expect("report");
    assert_eq!(report.plugin_restarts, 2, "{report:?}");
    assert_eq!(report.frames_processed, 6, "{report:?}");
    // Every frame lost to a trap is counted, the one whose trap failed the job included.
    assert_eq!(
        report.frames_rejected.get("plugin_panic"),
        Some(&3),
        "{report:?}"
    );
}

/// An error value rejects the frame, counted under `plugin_error`; the job goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_values_reject_frames_and_the_job_finishes() {
    let engine = engine();
    let job = spawn_job(
        spec("errors", serde_json::json!({"mode": "error", "after": 3})),
        &engine.misbehave,
        misbehave_type(|_| {}),
    );
    let outcome = within(JOB, "the job to end", String::new, job)
        .await
        .unwrap();
    let report = outcome.unwrap_or_else(|e| panic!("the job failed: {e}"));
    assert_eq!(report.frames_processed, 3, "{report:?}");
    assert_eq!(
        report.frames_rejected.get("plugin_error"),
        Some(&(FRAMES - 3)),
        "{report:?}"
    );
    assert_eq!(report.plugin_restarts, 0, "{report:?}");
    assert_eq!(report.summary["frames"], FRAMES, "{report:?}");
}

/// What is not a frame-processor component is refused when loaded, with the reason.
#[test]
fn non_components_are_refused() {
    let sandbox = &engine().sandbox;

    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let error = sandbox.load("junk", &junk).err().expect("junk is refused");
    assert!(matches!(error, LoadError::Compile(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains("not a valid WebAssembly component"),
        "{error}"
    );

    // A valid core module (magic, version 1): WebAssembly, but not a component.
    let core_module = b"\0asm\x01\0\0\0";
    let error = sandbox
        .load("core", core_module)
        .err()
        .expect("a core module is refused");
    assert!(matches!(error, LoadError::Compile(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains("not a valid WebAssembly component"),
        "{error}"
    );

    // A valid, empty component: it exports nothing of the frame-processor world.
    let empty_component = b"\0asm\x0d\0\x01\0";
    let error = sandbox
        .load("empty", empty_component)
        .err()
        .expect("an empty component is refused");
    assert!(matches!(error, LoadError::World(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains("does not fit the frame-processor world"),
        "{error}"
    );
}

/// A stop reaches a realtime source even while it waits out a long recorded gap (an hour
/// here): the job ends promptly, reported stopped, instead of holding its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_a_realtime_job_waiting_out_a_long_gap() {
    use framehost::capture::{CaptureMeta, CaptureReader, CaptureWriter};

    // The shared capture, with its second half moved an hour later.
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-hour-gap.fhcap");
    let records: Vec<_> = CaptureReader::open(&capture())
        .expect("capture opens")
        .map(|r| r.expect("capture reads"))
        .collect();
    let mut writer = CaptureWriter::create(&path, &CaptureMeta::default()).expect("create");
    let half = records.len() / 2;
    for (n, record) in records.iter().enumerate() {
        let at = if n < half {
            record.at
        } else {
            record.at + Duration::from_secs(3600)
        };
        writer.write(at, &record.packet).expect("write");
    }
    writer.finish().expect("flush");

    let engine = engine();
    let mut job = spec("hour-gap", serde_json::json!({}));
    job.source = SourceSpec::Capture {
        path,
        realtime: true,
    };
    let settings = JobSettings::new(&Config::default(), &Limits::default());
    let stop = CancellationToken::new();
    let run = {
        let plugin = engine.tracker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (events, mut received) = mpsc::channel(16);
            let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
            let outcome = job::run(&job, &plugin, &settings, events, stop).await;
            drain.await.ok();
            outcome
        })
    };
    // Well into the gap: the first half (about 2.4 s at 10 fps) has been played.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    // Under the 10 s a job's end waits for a stuck source: the source itself saw the stop.
    let report = within(
        Duration::from_secs(8),
        "the stopped job to end",
        String::new,
        run,
    )
    .await
    .expect("job task")
    .expect("a stopped job is not a failure");
    assert!(report.stopped, "{report:?}");
    assert!(report.frames_processed < FRAMES, "{report:?}");
}

/// Where the escape plugin tries to write.
const ESCAPE_WRITE_PATH: &str = "/tmp/escape-was-here";
/// Every attempt the escape plugin must report, besides those named after the test's own
/// port and files.
const ESCAPE_ATTEMPTS: &[&str] = &[
    "fs_read:/etc/passwd",
    "fs_read:/proc/self/environ",
    "fs_read:Cargo.toml",
    "fs_read_dir:.",
    "fs_read_dir:/",
    "fs_metadata:/",
    "fs_write:/tmp/escape-was-here",
    "env_vars",
    "env_args",
    "env_current_dir",
    "tcp_bind:127.0.0.1:0",
    "udp_bind:127.0.0.1:0",
    "dns_lookup:localhost",
];

/// A plugin that tries every way out a WASI program has, with plain std calls, gets
/// nothing: no file read or written, an empty environment and argument list, no TCP
/// connection (and the port it aims at sees none), no socket bound, no name resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reaches_no_files_environment_or_network() {
    const SECRET_NAME: &str = "FRAMEHOST_ESCAPE_TEST_TOKEN";
    const SECRET: &str = "sk-escape-3f9a1c7e5b2d4086";

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener binds");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().unwrap().port();
    // SAFETY: this binary's other tests only read the environment through std, which
    // serialises every access with its own lock; nothing here calls libc's getenv.
    unsafe { std::env::set_var(SECRET_NAME, SECRET) };
    // Files the test process can read: the workspace manifest, and one holding the secret.
    let manifest = artifacts::workspace_root().join("Cargo.toml");
    let secret_file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("escape-secret.txt");
    std::fs::write(&secret_file, SECRET).expect("write the secret file");
    // A file left by an earlier run would read as an escape that did not happen now.
    std::fs::remove_file(ESCAPE_WRITE_PATH).ok();

    let config = serde_json::json!({
        "tcp_port": port,
        "env_name": SECRET_NAME,
        "read_paths": [manifest.display().to_string(), secret_file.display().to_string()],
        "write_path": ESCAPE_WRITE_PATH,
    });
    let (outcome, results) = run_collecting(spec("escape", config), &engine().escape).await;
    let report = outcome.unwrap_or_else(|e| panic!("the escape job failed: {e}"));
    assert_eq!(report.frames_processed, FRAMES, "{report:?}");
    assert_eq!(
        results.len() as u64,
        FRAMES,
        "one result per frame: {report:?}"
    );

    // The secret must not surface anywhere the plugin could put it.
    let summary = report.summary.to_string();
    for text in results.iter().map(|r| r.as_str()).chain([summary.as_str()]) {
        assert!(!text.contains(SECRET), "the secret leaked into {text}");
    }

    let mut expected: Vec<String> = ESCAPE_ATTEMPTS.iter().map(|a| a.to_string()).collect();
    expected.push(format!("fs_read:{}", manifest.display()));
    expected.push(format!("fs_read:{}", secret_file.display()));
    expected.push(format!("env_var:{SECRET_NAME}"));
    expected.push(format!("tcp_connect:127.0.0.1:{port}"));

    let host_cwd = std::env::current_dir().unwrap().display().to_string();
    let mut rounds: Vec<(String, serde_json::Value)> = vec![
        ("init".into(), report.summary["init"].clone()),
        ("last frame".into(), report.summary["last_frame"].clone()),
    ];
    for text in &results {
        let value: serde_json::Value = serde_json::from_str(text).expect("a result is JSON");
        rounds.push((
            format!("frame {}", value["frame"]),
            value["attempts"].clone(),
        ));
    }
    for (round, attempts) in &rounds {
        let attempts = attempts
            .as_array()
            .unwrap_or_else(|| panic!("{round}: {attempts}"));
        for name in &expected {
            let attempt = attempts
                .iter()
                .find(|a| a["attempt"] == name.as_str())
                .unwrap_or_else(|| panic!("{round}: no {name} attempt in {attempts:?}"));
            let detail = attempt["detail"].as_str().unwrap_or("");
            if name == "env_current_dir" {
                // WASI keeps a working directory of its own ("/"); it must not be the host's.
                assert!(
                    host_cwd == "/" || !detail.contains(&host_cwd),
                    "{round}: the plugin saw the host's working directory: {attempt}"
                );
                continue;
            }
            assert_eq!(
                attempt["ok"].as_bool(),
                Some(false),
                "{round}: {name} got through: {attempt}"
            );
            if name == "env_vars" || name == "env_args" {
                assert_eq!(detail, "empty", "{round}: {attempt}");
            }
        }
    }
    let ever_ok = &report.summary["ever_ok"];
    assert!(
        ever_ok
            .as_array()
            .is_some_and(|a| a.iter().all(|n| n == "env_current_dir")),
        "attempts that succeeded at some point: {ever_ok}"
    );

    // Nothing reached the port or the filesystem, whatever the plugin believed.
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, from)) => panic!("the plugin connected to the test's listener from {from}"),
        Err(e) => panic!("accept failed: {e}"),
    }
    assert!(
        !Path::new(ESCAPE_WRITE_PATH).exists(),
        "{ESCAPE_WRITE_PATH} exists after the job"
    );
}

/// Runs a job to its end on the default limits, keeping the results it published, as text.
async fn run_collecting(
    spec: JobSpec,
    plugin: &Plugin,
) -> (Result<JobReport, JobError>, Vec<String>) {
    let plugin = plugin.clone();
    let settings = JobSettings::new(&Config::default(), &Limits::default());
    let run = tokio::spawn(async move {
        let (events, mut received) = mpsc::channel(16);
        let collect = tokio::spawn(async move {
            let mut results = Vec::new();
            while let Some(event) = received.recv().await {
                if let JobEvent::Result { result, .. } = event {
                    results.push(String::from_utf8_lossy(&result.data).into_owned());
                }
            }
            results
        });
        let outcome = job::run(&spec, &plugin, &settings, events, CancellationToken::new()).await;
        (outcome, collect.await.expect("collector task"))
    });
    within(JOB, "the job to end", String::new, run)
        .await
        .expect("job task")
}
