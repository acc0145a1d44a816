//! `framehost bench`: the measurements behind BENCHMARKS.md.
//!
//! Three subcommands, each printing one JSON line on stdout (progress goes to stderr), which
//! `scripts/bench` runs and turns into the report:
//!
//! - `path`: frames/s and decoded MiB/s through the whole frame path, capture to plugin;
//! - `start`: how long a job's plugin instance takes to start (instantiate and `init`);
//! - `jobs`: the host's resident memory and memory mappings over many sequential jobs.
//!
//! Jobs run through [`job::run`], as `replay` and the service run them: a capture read as
//! fast as the plugin takes frames (none dropped), one plugin instance per job, dropped at
//! its end. The engine is sized from the configuration as `serve` sizes it. Speed and memory
//! are measured here and only here; tests assert behaviour, not timings.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Limits};
use crate::job::{self, JobReport, JobSettings, JobSpec};
use crate::sandbox::{JobInfo, Plugin, Sandbox};
use crate::source::SourceSpec;
use crate::telemetry;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Frames/s and decoded MiB/s through the whole path (capture, data streams, assembly,
    /// decode, plugin), repeated; the median run is the result.
    Path(PathArgs),
    /// Job start time: instantiate the plugin and call its `init`, many times, one instance
    /// at a time; percentiles in microseconds.
    Start(StartArgs),
    /// Host RSS and memory mappings over many sequential jobs in one process, each with its
    /// own plugin instance; growth after warm-up is the result.
    Jobs(JobsArgs),
}

/// What every subcommand runs: a plugin, its job config, the host configuration.
#[derive(clap::Args)]
pub struct PluginArgs {
    /// The plugin component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    /// The job's config object, as JSON, handed to the plugin.
    #[arg(long, default_value = "{}")]
    job_config: String,
    /// Configuration file (TOML) for the engine and the path's bounds; defaults without one.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PathArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// The capture to push through the path.
    #[arg(long)]
    capture: PathBuf,
    /// Measured runs.
    #[arg(long, default_value_t = 5)]
    repeat: u32,
    /// Unmeasured runs first (they warm the page cache and the allocator).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
}

#[derive(clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// Instances to start (each dropped before the next).
    #[arg(long, default_value_t = 1000)]
    count: u32,
}

#[derive(clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// The capture every job replays; keep it small (about 10 frames).
    #[arg(long)]
    capture: PathBuf,
    /// Sequential jobs to run.
    #[arg(long, default_value_t = 10_000)]
    jobs: u32,
    /// Read RSS and the mapping count after every this many jobs.
    #[arg(long, default_value_t = 100)]
    sample_every: u32,
    /// Jobs that count as warm-up, after which RSS must stay flat (default: the first 10%).
    #[arg(long)]
    warmup_jobs: Option<u32>,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    let line = match command {
        BenchCommand::Path(args) => path(args).await?,
        BenchCommand::Start(args) => start(args).await?,
        BenchCommand::Jobs(args) => jobs(args).await?,
    };
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

async fn path(args: PathArgs) -> anyhow::Result<serde_json::Value> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let bench = Bench::load(&args.plugin)?;
    require_file(&args.capture)?;

    for n in 0..args.warmup {
        eprintln!("path: warm-up run {}/{}", n + 1, args.warmup);
        bench.run_job(&args.capture, "bench-path-warmup").await?;
    }

    let mut runs = Vec::new();
    let mut last = JobReport::default();
    for n in 0..args.repeat {
        let rss_before = telemetry::rss_bytes().unwrap_or(0);
        let report = bench.run_job(&args.capture, "bench-path").await?;
        let rss_after = telemetry::rss_bytes().unwrap_or(0);
        eprintln!(
            "path: run {}/{}: {} frames in {:.3} s, {:.1} frames/s, {:.1} MiB/s",
            n + 1,
            args.repeat,
            report.frames_processed,
            report.elapsed_secs,
            report.frames_per_sec,
            report.decoded_mib_per_sec
        );
        runs.push(json!({
            "elapsed_secs": round(report.elapsed_secs, 4),
            "frames_per_sec": round(report.frames_per_sec, 1),
            "decoded_mib_per_sec": round(report.decoded_mib_per_sec, 1),
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
        }));
        last = report;
    }

    let field = |name: &str| -> Vec<f64> {
        runs.iter()
            .map(|run| run[name].as_f64().unwrap_or(0.0))
            .collect()
    };
    Ok(json!({
        "bench": "path",
        "plugin": last.plugin,
        "plugin_digest": last.plugin_digest,
        "job_config": bench.job_config,
        "capture": args.capture.display().to_string(),
        "frames": last.frames_processed,
        "packets": last.packets_in,
        "image_bytes": last.image_bytes,
        "mean_image_bytes": last.image_bytes / last.frames_processed.max(1),
        "repeat": args.repeat,
        "warmup": args.warmup,
        "frames_per_sec": round(median(&field("frames_per_sec")), 1),
        "decoded_mib_per_sec": round(median(&field("decoded_mib_per_sec")), 1),
        "elapsed_secs": round(median(&field("elapsed_secs")), 4),
        "peak_rss_bytes": telemetry::peak_rss_bytes().unwrap_or(0),
        "plugin_memory_peak_bytes": last.plugin_memory_peak_bytes,
        "runs": runs,
    }))
}

async fn start(args: StartArgs) -> anyhow::Result<serde_json::Value> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let bench = Bench::load(&args.plugin)?;
    let settings = bench.settings();
    let info = JobInfo {
        job_id: "bench-start".into(),
        job_type: "bench".into(),
        room: "bench".into(),
        config_json: bench.job_config.to_string(),
    };

    let mut start_us = Vec::with_capacity(args.count as usize);
    let mut drop_us = Vec::with_capacity(args.count as usize);
    let every = (args.count / 10).max(1);
    for n in 0..args.count {
        let started = Instant::now();
        let processor = bench
            .plugin
            .instantiate(&info, settings.plugin)
            .await
            .with_context(|| format!("instance {n} did not start"))?;
        start_us.push(micros(started.elapsed()));

        let dropped = Instant::now();
        drop(processor);
        drop_us.push(micros(dropped.elapsed()));

        if (n + 1) % every == 0 {
            eprintln!("start: {}/{} instances", n + 1, args.count);
        }
    }

    let first_us = start_us[0];
    Ok(json!({
        "bench": "start",
        "plugin": bench.plugin.name(),
        "plugin_digest": bench.plugin.digest(),
        "plugin_bytes": bench.plugin.size(),
        "job_config": bench.job_config,
        "count": args.count,
        "compile_ms": round(bench.compile.as_secs_f64() * 1e3, 1),
        "first_us": first_us,
        "instantiate_us": percentiles(start_us),
        "drop_us": percentiles(drop_us),
    }))
}

async fn jobs(args: JobsArgs) -> anyhow::Result<serde_json::Value> {
    if args.jobs == 0 || args.sample_every == 0 {
        bail!("--jobs and --sample-every must be at least 1");
    }
    let warmup = args.warmup_jobs.unwrap_or(args.jobs / 10).min(args.jobs);
    let bench = Bench::load(&args.plugin)?;
    require_file(&args.capture)?;

    // One sample: [jobs done, RSS in KiB, memory mappings, threads].
    let sample = |done: u32| -> [u64; 4] {
        [
            done as u64,
            telemetry::rss_bytes().unwrap_or(0) >> 10,
            telemetry::memory_mappings().unwrap_or(0) as u64,
            thread_count().unwrap_or(0),
        ]
    };
    let mut series = vec![sample(0)];
    // The mappings after warm-up, to name any that appear later.
    let mut maps_warm = read_maps();
    let mut job_us = Vec::with_capacity(args.jobs as usize);
    let (mut frames, mut plugin_memory_peak) = (0u64, 0u64);
    let started = Instant::now();

    for n in 1..=args.jobs {
        let job_started = Instant::now();
        let report = bench
            .run_job(&args.capture, &format!("bench-job-{n}"))
            .await?;
        job_us.push(micros(job_started.elapsed()));
        frames += report.frames_processed;
        plugin_memory_peak = plugin_memory_peak.max(report.plugin_memory_peak_bytes);

        if n % args.sample_every == 0 || n == warmup || n == args.jobs {
            let s = sample(n);
            if n == warmup {
                maps_warm = read_maps();
            }
            if n % (args.sample_every * 10) == 0 || n == warmup || n == args.jobs {
                eprintln!(
                    "jobs: {n}/{}: RSS {:.1} MiB, {} mappings",
                    args.jobs,
                    s[1] as f64 / 1024.0,
                    s[2]
                );
            }
            series.push(s);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (maps_new, maps_gone) = maps_diff(&maps_warm, &read_maps());

    let at = |done: u32| {
        series
            .iter()
            .find(|s| s[0] == done as u64)
            .copied()
            .unwrap_or(series[0])
    };
    let (first, warm, end) = (series[0], at(warmup), at(args.jobs));
    let after: Vec<[u64; 4]> = series
        .iter()
        .filter(|s| s[0] >= warmup as u64)
        .copied()
        .collect();
    let min_of = |i: usize| after.iter().map(|s| s[i]).min().unwrap_or(0);
    let max_of = |i: usize| after.iter().map(|s| s[i]).max().unwrap_or(0);
    let kib = |v: u64| v * 1024;
    // The end-minus-warm-up difference is two single readings, and RSS wanders by a few
    // MiB as the allocator keeps and returns freed pages; a line fitted through every sample
    // after warm-up shows whether there is a trend under the wander.
    let points: Vec<(f64, f64)> = after
        .iter()
        .map(|s| (s[0] as f64, kib(s[1]) as f64))
        .collect();
    let slope = slope(&points);
    let trend_growth = slope.map(|b| (b * (args.jobs - warmup) as f64).round());

    Ok(json!({
        "bench": "jobs",
        "plugin": bench.plugin.name(),
        "plugin_digest": bench.plugin.digest(),
        "job_config": bench.job_config,
        "capture": args.capture.display().to_string(),
        "jobs": args.jobs,
        "frames": frames,
        "warmup_jobs": warmup,
        "sample_every": args.sample_every,
        "elapsed_secs": round(elapsed, 2),
        "jobs_per_sec": round(args.jobs as f64 / elapsed, 1),
        "job_us": percentiles(job_us),
        "plugin_memory_peak_bytes": plugin_memory_peak,
        "rss_start_bytes": kib(first[1]),
        "rss_warm_bytes": kib(warm[1]),
        "rss_end_bytes": kib(end[1]),
        "rss_growth_after_warmup_bytes": kib(end[1]) as i64 - kib(warm[1]) as i64,
        "rss_growth_total_bytes": kib(end[1]) as i64 - kib(first[1]) as i64,
        "rss_trend_bytes_per_1000_jobs": slope.map(|b| (b * 1000.0).round()),
        "rss_trend_growth_after_warmup_bytes": trend_growth,
        "rss_min_after_warmup_bytes": kib(min_of(1)),
        "rss_max_after_warmup_bytes": kib(max_of(1)),
        "peak_rss_bytes": telemetry::peak_rss_bytes().unwrap_or(0),
        "mappings_start": first[2],
        "mappings_warm": warm[2],
        "mappings_end": end[2],
        "mappings_min_after_warmup": min_of(2),
        "mappings_max_after_warmup": max_of(2),
        "mappings_new_after_warmup": maps_new,
        "mappings_gone_after_warmup": maps_gone,
        "threads_warm": warm[3],
        "threads_end": end[3],
        "threads_max_after_warmup": max_of(3),
        "series_fields": ["jobs", "rss_kib", "mappings", "threads"],
        "series": series,
    }))
}

/// A loaded plugin and everything needed to run jobs with it.
struct Bench {
    config: Config,
    limits: Limits,
    job_config: serde_json::Value,
    plugin: Plugin,
    /// Time to compile and link the component.
    compile: Duration,
}

impl Bench {
    fn load(args: &PluginArgs) -> anyhow::Result<Self> {
        let config = Config::load_or_env(args.config.as_deref())?;
        let job_config: serde_json::Value =
            serde_json::from_str(&args.job_config).context("--job-config is not valid JSON")?;
        let sandbox = Sandbox::new(config.sandbox_config())?;

        let compiled = Instant::now();
        let plugin = sandbox
            .load_file(&args.plugin)
            .with_context(|| format!("cannot load plugin {}", args.plugin.display()))?;
        let compile = compiled.elapsed();

        Ok(Self {
            limits: config.catalogue.defaults,
            config,
            job_config,
            plugin,
            compile,
        })
    }

    fn settings(&self) -> JobSettings {
        JobSettings::new(&self.config, &self.limits)
    }

    /// Runs one job over `capture` and checks that every frame reached the plugin: a run
    /// that lost frames measures something else.
    async fn run_job(&self, capture: &Path, id: &str) -> anyhow::Result<JobReport> {
        let spec = JobSpec {
            id: id.to_owned(),
            job_type: "bench".into(),
            source: SourceSpec::Capture {
                path: capture.to_owned(),
                realtime: false,
            },
            config: self.job_config.clone(),
        };
        spec.validate()?;

        // Results are received and discarded, as `replay` does without `--results`.
        let (events, mut received) = mpsc::channel(256);
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let outcome = job::run(
            &spec,
            &self.plugin,
            &self.settings(),
            events,
            CancellationToken::new(),
        )
        .await;
        drain.await.ok();

        let report = outcome.map_err(|error| {
            anyhow::anyhow!("job {id} failed ({}): {}", error.reason, error.message)
        })?;
        let rejected: u64 = report.frames_rejected.values().sum();
        if report.frames_processed == 0
            || report.frames_processed != report.frames_in
            || report.frames_dropped > 0
            || rejected > 0
        {
            bail!(
                "job {id} lost frames: {} in, {} processed, {} dropped, rejected {:?}",
                report.frames_in,
                report.frames_processed,
                report.frames_dropped,
                report.frames_rejected
            );
        }
        Ok(report)
    }
}

fn require_file(path: &Path) -> anyhow::Result<()> {
    if !path.is_file() {
        bail!("capture {} does not exist", path.display());
    }
    Ok(())
}

/// The least-squares slope of `y` over `x`; `None` with fewer than two distinct `x`.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (x, y) in points {
        covariance += (x - mean_x) * (y - mean_y);
        variance += (x - mean_x) * (x - mean_x);
    }
    (variance > 0.0).then(|| covariance / variance)
}

/// Threads of this process (Linux; `None` elsewhere).
fn thread_count() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

fn read_maps() -> String {
    std::fs::read_to_string("/proc/self/maps").unwrap_or_default()
}

/// Mappings of `after` that `before` did not have, as `"<KiB> <perms> <path>"` (at most 32),
/// and the number of `before`'s mappings that are gone.
fn maps_diff(before: &str, after: &str) -> (Vec<String>, usize) {
    // A mapping is its address range, permissions and file; offsets and inodes add nothing.
    let key = |line: &str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let path = fields.get(5..).map(|p| p.join(" ")).unwrap_or_default();
        (
            fields.first().copied().unwrap_or("").to_owned(),
            fields.get(1).copied().unwrap_or("").to_owned(),
            path,
        )
    };
    let before: std::collections::HashSet<_> = before.lines().map(key).collect();
    let after: std::collections::HashSet<_> = after.lines().map(key).collect();
    let size_kib = |range: &str| {
        let (start, end) = range.split_once('-').unwrap_or(("0", "0"));
        let parse = |hex| u64::from_str_radix(hex, 16).unwrap_or(0);
        parse(end).saturating_sub(parse(start)) >> 10
    };
    let mut new: Vec<_> = after.difference(&before).collect();
    new.sort();
    let described = new
        .iter()
        .take(32)
        .map(|(range, perms, path)| {
            let path = if path.is_empty() { "[anonymous]" } else { path };
            format!("{} KiB {perms} {path}", size_kib(range))
        })
        .collect();
    (described, before.difference(&after).count())
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros() as u64
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentiles of a sample, plus its mean.
fn percentiles(mut values: Vec<u64>) -> serde_json::Value {
    values.sort_unstable();
    let rank = |p: f64| {
        let index = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[index.clamp(1, values.len()) - 1]
    };
    let mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
    json!({
        "p50": rank(50.0),
        "p90": rank(90.0),
        "p99": rank(99.0),
        "max": values[values.len() - 1],
        "mean": round(mean, 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=100).collect());
        assert_eq!(p["p50"], 50);
        assert_eq!(p["p90"], 90);
        assert_eq!(p["p99"], 99);
        assert_eq!(p["max"], 100);
        let one = percentiles(vec![7]);
        assert_eq!(one["p50"], 7);
        assert_eq!(one["p99"], 7);
    }

    #[test]
    fn new_mappings_are_named_with_their_size() {
        let before = "7f00-7f10 r--p 0 00:00 0 /lib/a.so\n\
                      8000-9000 rw-p 0 00:00 0\n";
        let after = "7f00-7f10 r--p 0 00:00 0 /lib/a.so\n\
                     a000-a800 rw-p 0 00:00 0\n\
                     b000-c000 rw-p 0 00:00 0 [stack]\n";
        let (new, gone) = maps_diff(before, after);
        assert_eq!(new, ["2 KiB rw-p [anonymous]", "4 KiB rw-p [stack]"]);
        assert_eq!(gone, 1);
    }

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<_> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat = [
            (0.0, 5.0),
            (1.0, 7.0),
            (2.0, 5.0),
            (3.0, 7.0),
            (4.0, 5.0),
            (5.0, 7.0),
        ];
        assert!(slope(&flat).unwrap().abs() < 0.2);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
