//! `framehost replay`: a plugin over a capture file, offline, through the job path.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use framehost::capture::CaptureReader;
use framehost::config::{Config, Limits};
use framehost::decode::{Frame, ImageFormat};
use framehost::job::{self, JobSettings};
use framehost::telemetry::JobCounters;
use framehost_tests::{artifacts, captures, within};
use serde_json::Value;

const COMMAND: Duration = Duration::from_secs(120);

fn capture_30() -> PathBuf {
    captures::shared(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "replay-30-frames",
        &captures::options(30, 20, 3, 10.0),
    )
}

async fn replay(args: &[&std::ffi::OsStr]) -> Output {
    let mut command = tokio::process::Command::new(artifacts::framehost_bin());
    command.arg("replay").args(args).env("NO_COLOR", "1");
    within(
        COMMAND,
        format!("framehost replay {args:?}"),
        String::new,
        command.output(),
    )
    .await
    .expect("framehost runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The one JSON line of `--json`.
fn json_line(output: &Output) -> Value {
    let stdout = text(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one JSON line on stdout, got:\n{stdout}\nstderr:\n{}",
        text(&output.stderr)
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", lines[0]))
}

#[tokio::test]
async fn json_summary_is_one_consistent_line() {
    let capture = capture_30();
    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::tracker().as_os_str(),
        capture.as_os_str(),
        "--json".as_ref(),
    ])
    .await;
    assert!(
        output.status.success(),
        "replay failed: {}",
        text(&output.stderr)
    );
    let report = json_line(&output);

    for field in [
        "frames_in",
        "frames_processed",
        "frames_dropped",
        "frames_rejected",
        "results",
        "frames_per_sec",
        "peak_rss_bytes",
        "summary",
    ] {
        assert!(report.get(field).is_some(), "no {field} in {report}");
    }
    // 30 frames of 3 parts, each part one small text stream.
    assert_eq!(report["frames_in"], 30, "{report}");
    assert_eq!(report["frames_processed"], 30, "{report}");
    assert_eq!(report["frames_dropped"], 0, "{report}");
    assert_eq!(report["frames_rejected"], serde_json::json!({}), "{report}");
    assert_eq!(report["results"], 30, "{report}");
    assert_eq!(report["streams_completed"], 90, "{report}");
    assert!(
        report["frames_per_sec"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    assert!(
        report["peak_rss_bytes"].as_u64().is_some_and(|v| v > 0),
        "{report}"
    );
    assert_eq!(report["summary"]["frames"], 30, "{report}");
    assert_eq!(report["summary"]["tracks_confirmed"], 4, "{report}");
}

#[tokio::test]
async fn results_file_has_one_line_per_result() {
    let capture = capture_30();
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::tracker().as_os_str(),
        capture.as_os_str(),
        "--results".as_ref(),
        results.as_os_str(),
    ])
    .await;
    assert!(
        output.status.success(),
        "replay failed: {}",
        text(&output.stderr)
    );

    let written = std::fs::read_to_string(&results).expect("results file written");
    let lines: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 30, "expected 30 result lines, got:\n{written}");
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line["frame"], index, "{line}");
        assert_eq!(line["content_type"], "application/json", "{line}");
        assert_eq!(line["data"]["frame"], index, "{line}");
        assert!(line["data"]["tracks"].is_array(), "{line}");
    }
    // The human summary went to stdout instead of the JSON line.
    assert!(
        text(&output.stdout).contains("30 in, 30 processed"),
        "{}",
        text(&output.stdout)
    );
}

/// frame-stats decodes every frame inside the sandbox, and the colour it measures in a box
/// is the colour the host measures in the same box of the same JPEG: the image bytes cross
/// the path and the sandbox boundary intact.
#[tokio::test]
async fn frame_stats_sees_the_image_bytes_intact() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("stats.cap");
    captures::make(&capture, &captures::options(12, 20, 3, 10.0));
    let results = dir.path().join("results.jsonl");
    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::frame_stats().as_os_str(),
        capture.as_os_str(),
        "--json".as_ref(),
        "--results".as_ref(),
        results.as_os_str(),
    ])
    .await;
    assert!(
        output.status.success(),
        "replay failed: {}",
        text(&output.stderr)
    );
    let report = json_line(&output);
    assert_eq!(report["frames_processed"], 12, "{report}");
    assert_eq!(report["frames_rejected"], serde_json::json!({}), "{report}");
    assert_eq!(report["summary"]["frames_decoded"], 12, "{report}");
    assert_eq!(report["summary"]["decode_failures"], 0, "{report}");

    let written = std::fs::read_to_string(&results).expect("results file written");
    let results: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(results.len(), 12, "{written}");

    // The same frame, taken off the capture by the library's path and decoded here.
    let frames = frames_of(&capture);
    assert_eq!(frames.len(), 12);
    let index = 5;
    let frame = &frames[index];
    let image = frame.image.as_ref().expect("frame 5 has an image");
    assert_eq!(image.format, ImageFormat::Jpeg);
    let rgb = image::load_from_memory(&image.data)
        .expect("the host decodes frame 5")
        .into_rgb8();

    let measured = &results[index]["data"];
    assert_eq!(measured["frame"], index, "{measured}");
    assert_eq!(measured["format"], "jpeg", "{measured}");
    assert_eq!(measured["width"], rgb.width(), "{measured}");
    assert_eq!(measured["height"], rgb.height(), "{measured}");
    let objects = measured["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), frame.detections.len(), "{measured}");
    assert!(!objects.is_empty(), "frame 5 has detections");

    for (object, detection) in objects.iter().zip(&frame.detections) {
        let b = detection.bbox;
        let (mean, pixels) = box_mean(&rgb, b.left, b.top, b.width, b.height);
        assert_eq!(object["pixels"], pixels, "{object} vs {detection:?}");
        let plugin: Vec<f64> = object["mean_rgb"]
            .as_array()
            .expect("mean_rgb")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        for channel in 0..3 {
            // Decoders may round differently (SIMD here, scalar in wasm): within one level.
            assert!(
                (plugin[channel] - mean[channel]).abs() < 1.0,
                "plugin mean {plugin:?} vs host mean {mean:?} for {detection:?}"
            );
        }
    }
}

#[tokio::test]
async fn truncated_capture_fails_with_bad_capture() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(capture_30()).unwrap();
    let truncated = dir.path().join("truncated.cap");
    std::fs::write(&truncated, &whole[..whole.len() * 2 / 3]).unwrap();

    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::tracker().as_os_str(),
        truncated.as_os_str(),
        "--json".as_ref(),
    ])
    .await;
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "replay of a truncated capture succeeded"
    );
    assert!(stderr.contains("bad_capture"), "{stderr}");
    let line = json_line(&output);
    assert_eq!(line["reason"], "bad_capture", "{line}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cut short") && error.contains("truncated.cap"),
        "the error should say the file is cut short, and which: {error}"
    );
    // What came before the cut was processed.
    assert!(
        line["frames_processed"]
            .as_u64()
            .is_some_and(|n| n > 0 && n < 30),
        "{line}"
    );

    // Not a capture at all.
    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::tracker().as_os_str(),
        artifacts::tracker().as_os_str(),
    ])
    .await;
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bad_capture") && stderr.contains("not a framehost capture file"),
        "{stderr}"
    );
}

/// Every frame of a capture, through the library's own sans-IO path.
fn frames_of(capture: &Path) -> Vec<Frame> {
    let settings = JobSettings::new(&Config::default(), &Limits::default());
    let start = Instant::now();
    let counters = Arc::new(JobCounters::default());
    let mut path = job::Path::new("check".into(), &settings, counters, start);
    let reader = CaptureReader::open(capture).expect("capture opens");
    let mut frames = Vec::new();
    let mut end = start;
    for record in reader {
        let record = record.expect("capture reads");
        end = end.max(start + record.at);
        path.packet(record.packet, start + record.at, &mut frames);
    }
    path.finish(end, &mut frames);
    frames
        .iter()
        .map(|message| message.decode(&settings.decode).expect("frame decodes"))
        .collect()
}

/// Mean RGB and pixel count of the pixels whose centres lie in a normalized box.
fn box_mean(
    image: &image::RgbImage,
    left: f32,
    top: f32,
    width: f32,
    height: f32,
) -> ([f64; 3], u64) {
    let (w, h) = (f64::from(image.width()), f64::from(image.height()));
    let inside = |centre: f64, size: f64, start: f32, len: f32| {
        let at = centre / size;
        at >= f64::from(start) && at < f64::from(start) + f64::from(len)
    };
    let mut sums = [0u64; 3];
    let mut pixels = 0u64;
    for (x, y, pixel) in image.enumerate_pixels() {
        if inside(f64::from(x) + 0.5, w, left, width) && inside(f64::from(y) + 0.5, h, top, height)
        {
            pixels += 1;
            for (sum, value) in sums.iter_mut().zip(pixel.0) {
                *sum += u64::from(value);
            }
        }
    }
    let n = pixels.max(1) as f64;
    (sums.map(|s| s as f64 / n), pixels)
}

/// A sender on another topic is not an empty stream: nothing reaches the plugin, and the
/// report says how many streams were passed over and why.
#[tokio::test]
async fn streams_on_another_topic_are_reported_as_ignored() {
    let options = framehost::capture::synth::SynthOptions {
        topic: "someOtherTopic".into(),
        ..captures::options(5, 8, 2, 10.0)
    };
    let capture = captures::shared(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "other-topic",
        &options,
    );
    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::tracker().as_os_str(),
        capture.as_os_str(),
        "--json".as_ref(),
    ])
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let line = json_line(&output);
    assert_eq!(line["frames_in"], 0, "{line}");
    // Five frames in two parts: ten streams, each opened by a header on the other topic.
    assert_eq!(line["packets_ignored"]["other_topic"], 10, "{line}");
    assert!(
        text(&output.stderr).contains("No stream arrived on the job's topic"),
        "{}",
        text(&output.stderr)
    );
}

/// A capture path that is not a regular file (here a FIFO nobody writes to, which would
/// block an open for ever) is refused at once.
#[tokio::test]
async fn a_fifo_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let fifo = dir.path().join("capture.fhcap");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let output = replay(&[
        "--plugin".as_ref(),
        artifacts::tracker().as_os_str(),
        fifo.as_os_str(),
    ])
    .await;
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

/// `config check` prints the effective configuration (defaults filled in) with the LiveKit
/// secret redacted, and exits 1 naming an unknown key.
#[tokio::test]
async fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[livekit]\napi_key = \"key\"\napi_secret = \"s3cr3t-value\"\n[host]\nmax_jobs = 2\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[host]\nmax_job = 2\n").unwrap();
    let check = |path: std::path::PathBuf| async move { config_check(&path, Vec::new()).await };

    let out = check(good).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let printed: framehost::config::Config =
        toml::from_str(&stdout).expect("the output is a configuration");
    assert_eq!(printed.host.max_jobs, 2);
    assert_eq!(printed.host.queue_depth, 8, "defaults are filled in");
    assert!(
        !stdout.contains("s3cr3t-value"),
        "the secret leaked:\n{stdout}"
    );
    assert!(stdout.contains("<redacted>"), "{stdout}");

    let out = check(bad).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("max_job"),
        "{}",
        text(&out.stderr)
    );
}

/// Runs `framehost config check FILE` with `env` added and no LiveKit key from the caller.
async fn config_check(
    file: &std::path::Path,
    env: Vec<(&'static str, String)>,
) -> std::process::Output {
    let mut command = tokio::process::Command::new(artifacts::framehost_bin());
    command
        .args(["config", "check"])
        .arg(file)
        .env_remove("LIVEKIT_API_SECRET")
        .env_remove("LIVEKIT_API_KEY")
        .envs(env);
    within(
        COMMAND,
        "framehost config check",
        String::new,
        command.output(),
    )
    .await
    .expect("framehost runs")
}

/// What a Kubernetes pod does: the file from a ConfigMap, a few options and the secrets'
/// file paths from the environment.
#[tokio::test]
async fn config_check_applies_environment_overrides_and_reads_secret_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("framehost.toml");
    std::fs::write(&file, "[host]\nmax_jobs = 2\n").unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "pa55-word\n").unwrap();
    let check = |env: Vec<(&'static str, String)>| config_check(&file, env);

    let out = check(vec![
        ("FRAMEHOST_HOST__MAX_JOBS", "3".into()),
        ("FRAMEHOST_NATS__USER", "framehost".into()),
        (
            "FRAMEHOST_NATS__PASSWORD_FILE",
            password.display().to_string(),
        ),
        ("FRAMEHOST_CATALOGUE__DEFAULTS__MEMORY_MIB", "32".into()),
    ])
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let printed: framehost::config::Config =
        toml::from_str(&stdout).expect("the output is a configuration");
    assert_eq!(
        printed.host.max_jobs, 3,
        "the environment wins over the file"
    );
    assert_eq!(printed.catalogue.defaults.memory_mib, 32);
    assert_eq!(printed.nats.user.as_deref(), Some("framehost"));
    assert!(
        !stdout.contains("pa55-word"),
        "the password leaked:\n{stdout}"
    );
    // The budget printed is the one the library computes for the same configuration.
    let budget = printed.memory_budget();
    let line = format!(
        "memory budget (worst case resident): {} MiB",
        budget.total().div_ceil(1 << 20)
    );
    assert!(stdout.contains(&line), "{line:?} not in:\n{stdout}");
    assert!(stdout.contains("3 jobs x"), "{stdout}");

    // The environment may complete the file: a job type whose plugin path the pod sets.
    std::fs::write(&file, "[job_types.track]\nmemory_mib = 32\n").unwrap();
    let out = check(vec![(
        "FRAMEHOST_JOB_TYPES__TRACK__PLUGIN",
        "/plugins/tracker.wasm".into(),
    )])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("/plugins/tracker.wasm"));
    std::fs::write(&file, "[host]\nmax_jobs = 2\n").unwrap();

    let out = check(vec![("FRAMEHOST_HOST__MAX_JOB", "3".into())]).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("FRAMEHOST_HOST__MAX_JOB") && stderr.contains("max_jobs"),
        "the error names the variable and what it could be:\n{stderr}"
    );
}
