//! `catbench`: the plugin catalogue's measurements in BENCHMARKS.md.
//!
//! - `swap`: replicas of `framehost serve` (the binary `$FRAMEHOST_BIN` names) against a
//!   `nats-server` the harness starts, fed a steady stream of small jobs. Each round pushes
//!   a new version with `framehost plugin push` (as an operator would, its local check
//!   included) and times, per replica, when its published status says it serves the version
//!   and when its first job starts on it. Then the same for a rollback, whose version every
//!   replica has compiled before and loads from its cache.
//! - `compile`: in this process, the time to compile each example plugin against the
//!   time to load its cached machine code, with the host's own engine settings.
//!
//! One JSON line per measurement goes to stdout; progress to stderr.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use framehost::catalogue::Compiler;
use framehost::catalogue::cache::ArtifactCache;
use framehost::config::Config;
use framehost::intake::{JobState, JobStatus};
use framehost::job::JobSpec;
use framehost::sandbox::{Sandbox, digest_of};
use framehost::source::SourceSpec;
use framehost_tests::catalogue::{serving, variant};
use framehost_tests::{Cluster, artifacts, captures};
use futures::StreamExt;
use serde_json::json;

#[derive(Parser)]
#[command(
    about = "Plugin catalogue benchmarks: push to first job per replica, compile vs cached load"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Push new versions to running replicas under a steady job load.
    Swap(SwapArgs),
    /// Compile each example plugin, then load it from the cache.
    Compile(CompileArgs),
}

#[derive(Args)]
struct SwapArgs {
    /// Replicas of `framehost serve`.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Pushes of a new version (each followed by a rollback).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Jobs submitted per second while the rounds run.
    #[arg(long, default_value_t = 20.0)]
    jobs_per_sec: f64,
    /// The plugin pushed (its variants): tracker, frame_stats or plugin_template.
    #[arg(long, default_value = "tracker")]
    plugin: String,
}

#[derive(Args)]
struct CompileArgs {
    /// Measurements per plugin and kind; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

#[tokio::main]
async fn main() {
    match Cli::parse().scenario {
        Scenario::Swap(args) => swap(args).await,
        Scenario::Compile(args) => compile(args),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn compile(args: CompileArgs) {
    let config = Config::default();
    for name in ["tracker", "frame_stats", "plugin_template"] {
        let path = artifacts::plugin(name);
        let bytes = std::fs::read(&path).expect("plugin");
        let digest = digest_of(&bytes);
        let (mut compiled, mut cached) = (Vec::new(), Vec::new());
        let mut entry_bytes = 0;
        for _ in 0..args.repeats {
            let dir = tempfile::tempdir().expect("scratch dir");
            let sandbox = Sandbox::new(config.sandbox_config()).expect("engine");
            let open = || ArtifactCache::open(dir.path(), sandbox.engine()).expect("cache");
            let cold = Compiler::new(sandbox.clone(), Some(open()));
            let started = Instant::now();
            cold.load(name, &digest, &bytes).expect("compiles");
            compiled.push(started.elapsed().as_secs_f64() * 1e3);
            entry_bytes = open().usage().1;

            let warm = Compiler::new(sandbox.clone(), Some(open()));
            let started = Instant::now();
            warm.load(name, &digest, &bytes)
                .expect("loads from the cache");
            cached.push(started.elapsed().as_secs_f64() * 1e3);
            assert_eq!(
                warm.counts().cache_hits,
                1,
                "the second load must come from the cache"
            );
        }
        let line = json!({
            "scenario": "compile",
            "plugin": name,
            "component_bytes": bytes.len(),
            "cache_entry_bytes": entry_bytes,
            "repeats": args.repeats,
            "compile_ms": median(compiled),
            "cached_load_ms": median(cached),
        });
        eprintln!("catbench: {line}");
        println!("{line}");
    }
}

/// Started statuses seen, per host: (time, digest).
type Starts = Arc<Mutex<BTreeMap<String, Vec<(Instant, String)>>>>;

async fn swap(args: SwapArgs) {
    let mut c = Cluster::start().await;
    c.config.host.max_jobs = 4;
    let hosts: Vec<String> = (0..args.replicas).map(|n| format!("replica-{n}")).collect();
    for host in &hosts {
        c.start_host(host).await;
    }
    let plugin = artifacts::plugin(&args.plugin);
    eprintln!("catbench: pushing the first version");
    c.push_plugin("bench", &plugin, &[]).await;

    // Every job's Started status, by host.
    let starts: Starts = Arc::default();
    let mut statuses = c
        .client
        .subscribe(format!("{}.status.>", c.nats_config().subject_prefix))
        .await
        .expect("subscribe to statuses");
    let recorder = {
        let starts = starts.clone();
        tokio::spawn(async move {
            while let Some(message) = statuses.next().await {
                let Ok(status) = serde_json::from_slice::<JobStatus>(&message.payload) else {
                    continue;
                };
                if status.state == JobState::Started
                    && let Some(digest) = status.plugin_digest
                {
                    let now = Instant::now();
                    starts
                        .lock()
                        .unwrap()
                        .entry(status.host)
                        .or_default()
                        .push((now, digest));
                }
            }
        })
    };
    let capture = c.capture("tiny", &captures::options(3, 4, 2, 30.0));
    let feeder = {
        let client = c.js.clone();
        let subject = c.nats_config().jobs_subject("bench");
        let capture = capture.clone();
        let every = Duration::from_secs_f64(1.0 / args.jobs_per_sec);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for n in 0.. {
                tick.tick().await;
                let spec = JobSpec {
                    id: format!("bench-{n}"),
                    job_type: "bench".into(),
                    source: SourceSpec::Capture {
                        path: capture.clone(),
                        realtime: false,
                    },
                    config: json!({}),
                };
                let body = serde_json::to_vec(&spec).unwrap();
                if let Ok(ack) = client.publish(subject.clone(), body.into()).await {
                    ack.await.ok();
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut rows = Vec::new();
    for round in 0..args.rounds {
        let file = variant(&plugin, c.scratch.path(), &format!("round{round}"));
        let digest = digest_of(&std::fs::read(&file).unwrap());
        let started = Instant::now();
        let out = c
            .plugin_cli(&["push", "--job-type", "bench", file.to_str().unwrap()])
            .await;
        assert!(out.success, "push failed: {}", out.text());
        let command = started.elapsed();
        rows.push(
            measure(
                &c, &hosts, &starts, "push", round, &digest, started, command,
            )
            .await,
        );

        let previous = c
            .replica(&hosts[0])
            .await
            .and_then(|s| s.catalogue.routes["bench"].serving.clone());
        let started = Instant::now();
        let out = c.plugin_cli(&["rollback", "--job-type", "bench"]).await;
        assert!(out.success, "rollback failed: {}", out.text());
        let command = started.elapsed();
        let back = out
            .stdout
            .split_whitespace()
            .find_map(|w| {
                w.trim_start_matches('(')
                    .strip_suffix(',')
                    .filter(|w| w.starts_with("sha256:"))
            })
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("rollback printed no digest: {}", out.stdout));
        assert!(previous.is_some_and(|p| p.digest == digest));
        rows.push(
            measure(
                &c, &hosts, &starts, "rollback", round, &back, started, command,
            )
            .await,
        );
    }
    feeder.abort();
    recorder.abort();

    for kind in ["push", "rollback"] {
        let of = |key: &str| -> Vec<f64> {
            rows.iter()
                .filter(|r| r["kind"] == kind)
                .flat_map(|r| {
                    r["replicas"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x[key].as_f64().unwrap())
                })
                .collect()
        };
        let commands: Vec<f64> = rows
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r["command_ms"].as_f64().unwrap())
            .collect();
        let serving = of("serving_ms");
        let first_job = of("first_job_ms");
        let all_replicas: Vec<f64> = rows
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r["all_replicas_first_job_ms"].as_f64().unwrap())
            .collect();
        let line = json!({
            "scenario": "swap",
            "summary": kind,
            "plugin": args.plugin,
            "replicas": args.replicas,
            "rounds": args.rounds,
            "jobs_per_sec": args.jobs_per_sec,
            "command_ms_median": median(commands),
            "serving_ms_median": median(serving.clone()),
            "serving_ms_max": serving.iter().cloned().fold(0.0, f64::max),
            "first_job_ms_median": median(first_job.clone()),
            "first_job_ms_max": first_job.iter().cloned().fold(0.0, f64::max),
            "all_replicas_first_job_ms_median": median(all_replicas.clone()),
            "all_replicas_first_job_ms_max": all_replicas.iter().cloned().fold(0.0, f64::max),
        });
        eprintln!("catbench: {line}");
        println!("{line}");
    }
}

/// Waits until every replica serves `digest` and has started a job on it; times both from
/// `started`.
#[allow(clippy::too_many_arguments)]
async fn measure(
    c: &Cluster,
    hosts: &[String],
    starts: &Starts,
    kind: &str,
    round: usize,
    digest: &str,
    started: Instant,
    command: Duration,
) -> serde_json::Value {
    let mut serving_at: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut job_at: BTreeMap<&str, Duration> = BTreeMap::new();
    let limit = Duration::from_secs(120);
    while serving_at.len() < hosts.len() || job_at.len() < hosts.len() {
        assert!(
            started.elapsed() < limit,
            "round {round} ({kind}): replicas did not all serve {digest}\n{}",
            c.logs()
        );
        for host in hosts {
            if !serving_at.contains_key(host.as_str())
                && let Some(status) = c.replica(host).await
                && serving(&status, "bench").as_deref() == Some(digest)
            {
                serving_at.insert(host, started.elapsed());
            }
            if !job_at.contains_key(host.as_str())
                && let Some((at, _)) = starts
                    .lock()
                    .unwrap()
                    .get(host)
                    .and_then(|s| s.iter().find(|(at, d)| d == digest && *at >= started))
            {
                job_at.insert(host, at.duration_since(started));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let replicas: Vec<_> = hosts
        .iter()
        .map(|h| json!({"host": h, "serving_ms": ms(&serving_at[h.as_str()]), "first_job_ms": ms(&job_at[h.as_str()])}))
        .collect();
    let line = json!({
        "scenario": "swap",
        "kind": kind,
        "round": round,
        "digest": digest,
        "command_ms": ms(&command),
        "all_replicas_first_job_ms": job_at.values().map(ms).fold(0.0, f64::max),
        "replicas": replicas,
    });
    eprintln!("catbench: {line}");
    line
}
