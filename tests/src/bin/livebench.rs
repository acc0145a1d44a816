//! `livebench`: the live-path measurements of BENCHMARKS.md.
//!
//! Everything runs on loopback, as in the end-to-end tests: a `nats-server` the harness
//! starts, `framehost serve` as its own process (the binary `$FRAMEHOST_BIN` names, the
//! release build when `scripts/bench-live` runs it), the LiveKit protocol double, and the
//! stream generator playing the vision service in this process. The host's CPU time and
//! memory are read from `/proc/<pid>`, so the double's and the generator's work is not
//! counted against it. One JSON line goes to stdout; progress to stderr.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use framehost::intake::JobState;
use framehost::job::JobReport;
use framehost_tests::livekit::generator::{StreamGenerator, StreamOptions, StreamReport};
use framehost_tests::livekit::{DoubleOptions, LiveKitDouble};
use framehost_tests::{Cluster, artifacts};
use serde_json::json;

const SOURCE: &str = "vision-service";

#[derive(Parser)]
#[command(about = "Live-path benchmarks: framehost serve joining rooms on the LiveKit double")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Rooms that all run at once for a fixed time: frames/s, decoded MiB/s, host CPU per
    /// room, frames dropped.
    Rooms(RoomsArgs),
    /// Rooms joining and leaving for a long time, a few at once: host RSS, memory mappings
    /// and threads sampled throughout, and their trend after warm-up.
    Churn(ChurnArgs),
}

#[derive(Args)]
struct RoomsArgs {
    /// Rooms at once, each with its own job and publisher.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Frames per second each publisher sends.
    #[arg(long, default_value_t = 30.0)]
    fps: f64,
    /// JPEG size target, in KiB.
    #[arg(long, default_value_t = 300)]
    image_kib: u32,
    /// App-level parts per frame.
    #[arg(long, default_value_t = 4)]
    parts: u32,
    /// How long the publishers send.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Frames each publisher sends, instead of fps x seconds: with a high --fps (at most
    /// 1000), a run that measures how fast the path goes.
    #[arg(long)]
    frames: Option<u64>,
}

#[derive(Args)]
struct ChurnArgs {
    /// How long the rooms come and go.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// Rooms at once.
    #[arg(long, default_value_t = 4)]
    concurrent: usize,
    /// Seconds each publisher sends before it leaves (which ends its job).
    #[arg(long, default_value_t = 30)]
    job_secs: u64,
    #[arg(long, default_value_t = 5.0)]
    fps: f64,
    #[arg(long, default_value_t = 100)]
    image_kib: u32,
    /// Seconds between two samples of the host's memory.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Samples in the first this many minutes are warm-up, left out of the trend.
    #[arg(long, default_value_t = 10)]
    warmup_minutes: u64,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let line = match cli.scenario {
        Scenario::Rooms(args) => rooms(args).await,
        Scenario::Churn(args) => churn(args).await,
    };
    println!("{line}");
}

/// A cluster with one host serving `track` (the tracker) and knowing the double.
async fn setup(max_jobs: usize) -> (Cluster, LiveKitDouble, u32) {
    let double = LiveKitDouble::start(DoubleOptions {
        ping_interval_secs: 5,
        ping_timeout_secs: 15,
        ..Default::default()
    })
    .await
    .expect("the LiveKit double starts");
    let mut c = Cluster::start().await;
    c.serve_job_type("track", artifacts::tracker());
    c.config.host.max_jobs = max_jobs;
    c.use_livekit(&double);
    c.config.livekit.source_grace_ms = 200;
    let host = c.start_host("bench").await;
    let pid = c.host(host).pid().expect("the host runs");
    (c, double, pid)
}

async fn rooms(args: RoomsArgs) -> serde_json::Value {
    let frames = args
        .frames
        .unwrap_or((args.fps * args.seconds as f64).round() as u64);
    eprintln!("livebench: rendering frames (~{} KiB)", args.image_kib);
    let generator = StreamGenerator::new(StreamOptions {
        fps: args.fps,
        image_kib: args.image_kib,
        parts: args.parts,
        frames: Some(frames),
        leave_at_end: false,
        ..Default::default()
    })
    .expect("frames render");
    let (c, double, pid) = setup(args.rooms).await;
    let limit = Duration::from_secs(args.seconds.max(frames / 10) * 3 + 120);

    let mut watches = Vec::new();
    for i in 0..args.rooms {
        let spec = c.room_job(
            &format!("bench-{i}"),
            "track",
            &format!("bench-{i}"),
            SOURCE,
        );
        watches.push(c.watch(&spec.id).await);
        c.submit(&spec).await;
    }
    for i in 0..args.rooms {
        let room = format!("bench-{i}");
        c.within(
            limit,
            "the host joining",
            double.wait_subscribers(&room, 1, limit),
        )
        .await;
    }
    eprintln!(
        "livebench: {} room(s) joined; sending {frames} frames each at {} fps",
        args.rooms, args.fps
    );

    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let publishers: Vec<_> = (0..args.rooms)
        .map(|i| double.publisher(&format!("bench-{i}"), SOURCE))
        .collect();
    let sent: Vec<StreamReport> =
        futures::future::join_all(publishers.iter().map(|p| generator.run(p))).await;
    let sending = started.elapsed();
    // Data and signalling travel apart, as with a LiveKit server: a publisher that left
    // at once would be announced before its last frames arrived. Leave once the double has
    // handed every packet to the host's connection.
    for (publisher, sent) in publishers.iter().zip(&sent) {
        c.within(limit, "the double to forward every packet", async {
            while double.stats(publisher.room()).packets_forwarded < sent.packets {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    let forwarded = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for publisher in &publishers {
        publisher.leave();
    }
    let mut reports = Vec::new();
    for watch in &mut watches {
        let last = c
            .within(limit, "a job's final status", watch.until_final())
            .await
            .expect("status subscription");
        if last.state != JobState::Finished {
            c.fail(format!("a benchmark job did not finish: {last:?}"));
        }
        reports.push(last.report.expect("a final status has a report"));
    }
    let wall = started.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;

    let processed: u64 = reports.iter().map(|r| r.frames_processed).sum();
    let dropped: u64 = reports.iter().map(|r| r.frames_dropped).sum();
    let rejected: u64 = reports
        .iter()
        .map(|r| r.frames_rejected.values().sum::<u64>())
        .sum();
    let image_bytes: u64 = reports.iter().map(|r| r.image_bytes).sum();
    let sent_frames: u64 = sent.iter().map(|s| s.frames).sum();
    let late: u64 = sent.iter().map(|s| s.late_frames).sum();
    let wire_bytes: u64 = sent.iter().map(|s| s.bytes).sum();
    // Rates are over the time until the double had forwarded every packet: a paced run's
    // sending time, or, for a run that goes as fast as it can, until the host took it all.
    let secs = forwarded.as_secs_f64();
    json!({
        "scenario": "rooms",
        "rooms": args.rooms,
        "fps_per_room": args.fps,
        "image_kib_target": args.image_kib,
        "parts": args.parts,
        "frame_size": generator.frame_size(),
        "frames_sent": sent_frames,
        "frames_processed": processed,
        "frames_dropped": dropped,
        "frames_rejected": rejected,
        "frames_sent_late": late,
        "mean_image_bytes": image_bytes.checked_div(processed).unwrap_or(0),
        "sending_secs": round(sending.as_secs_f64(), 2),
        "forwarded_secs": round(secs, 2),
        "wall_secs": round(wall.as_secs_f64(), 2),
        "frames_per_sec": round(processed as f64 / secs, 1),
        "decoded_mib_per_sec": round(image_bytes as f64 / secs / (1 << 20) as f64, 1),
        "wire_mib_per_sec": round(wire_bytes as f64 / secs / (1 << 20) as f64, 1),
        "host_cpu_secs": round(cpu, 2),
        "host_cpu_percent": round(cpu / wall.as_secs_f64() * 100.0, 1),
        "host_cpu_ms_per_frame": round(cpu * 1000.0 / processed.max(1) as f64, 2),
        "host_cpu_percent_per_room": round(cpu / wall.as_secs_f64() * 100.0 / args.rooms as f64, 2),
        "host_rss_end_bytes": status_kib(pid, "VmRSS:") * 1024,
        "host_rss_peak_bytes": status_kib(pid, "VmHWM:") * 1024,
        "livekit": reports.iter().map(|r: &JobReport| r.livekit.clone()).collect::<Vec<_>>(),
    })
}

async fn churn(args: ChurnArgs) -> serde_json::Value {
    let frames = (args.fps * args.job_secs as f64).round() as u64;
    let generator = StreamGenerator::new(StreamOptions {
        fps: args.fps,
        image_kib: args.image_kib,
        frames: Some(frames),
        ..Default::default()
    })
    .expect("frames render");
    let (c, double, pid) = setup(args.concurrent).await;
    let c = Arc::new(c);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.minutes * 60);
    let jobs_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let frames_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let next_room = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let mut slots = Vec::new();
    for _ in 0..args.concurrent {
        let (c, double, generator) = (c.clone(), double.clone(), generator.clone());
        let (jobs_done, frames_done, next_room) =
            (jobs_done.clone(), frames_done.clone(), next_room.clone());
        slots.push(tokio::spawn(async move {
            let limit = Duration::from_secs(300);
            while Instant::now() < deadline {
                let n = next_room.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let room = format!("churn-{n}");
                let spec = c.room_job(&room, "track", &room, SOURCE);
                let mut watch = c.watch(&spec.id).await;
                c.submit(&spec).await;
                c.within(
                    limit,
                    "the host joining",
                    double.wait_subscribers(&room, 1, limit),
                )
                .await;
                let _: StreamReport = generator.run(&double.publisher(&room, SOURCE)).await;
                let last = c
                    .within(limit, "a job's final status", watch.until_final())
                    .await
                    .expect("status subscription");
                if last.state != JobState::Finished {
                    c.fail(format!("a churn job did not finish: {last:?}"));
                }
                let report = last.report.expect("a final status has a report");
                frames_done.fetch_add(
                    report.frames_processed,
                    std::sync::atomic::Ordering::Relaxed,
                );
                jobs_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }

    // (seconds, RSS KiB, mappings, threads, jobs done)
    let mut series: Vec<(u64, u64, usize, u64, u64)> = Vec::new();
    loop {
        let elapsed = started.elapsed().as_secs();
        let jobs = jobs_done.load(std::sync::atomic::Ordering::Relaxed);
        series.push((
            elapsed,
            status_kib(pid, "VmRSS:"),
            mappings(pid),
            status_kib(pid, "Threads:"),
            jobs,
        ));
        eprintln!(
            "livebench: {:>5} s  {jobs} jobs  RSS {:.1} MiB",
            elapsed,
            series.last().map(|s| s.1).unwrap_or(0) as f64 / 1024.0
        );
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(args.sample_secs)).await;
    }
    for slot in slots {
        slot.await.expect("a churn slot panicked");
    }
    let final_sample = (
        started.elapsed().as_secs(),
        status_kib(pid, "VmRSS:"),
        mappings(pid),
        status_kib(pid, "Threads:"),
        jobs_done.load(std::sync::atomic::Ordering::Relaxed),
    );
    series.push(final_sample);

    let warm: Vec<_> = series
        .iter()
        .filter(|s| s.0 >= args.warmup_minutes * 60)
        .collect();
    let points: Vec<(f64, f64)> = warm.iter().map(|s| (s.0 as f64, s.1 as f64)).collect();
    let slope_kib_per_sec = slope(&points);
    let span = warm
        .last()
        .zip(warm.first())
        .map(|(l, f)| l.0 - f.0)
        .unwrap_or(0);
    let rss = |s: &&(u64, u64, usize, u64, u64)| s.1;
    json!({
        "scenario": "churn",
        "minutes": args.minutes,
        "concurrent": args.concurrent,
        "job_secs": args.job_secs,
        "fps": args.fps,
        "image_kib_target": args.image_kib,
        "jobs": final_sample.4,
        "frames_processed": frames_done.load(std::sync::atomic::Ordering::Relaxed),
        "warmup_minutes": args.warmup_minutes,
        "rss_start_kib": series.first().map(|s| s.1),
        "rss_warm_kib": warm.first().map(|s| s.1),
        "rss_end_kib": final_sample.1,
        "rss_min_after_warmup_kib": warm.iter().map(rss).min(),
        "rss_max_after_warmup_kib": warm.iter().map(rss).max(),
        "rss_trend_kib_per_hour": slope_kib_per_sec.map(|b| round(b * 3600.0, 0)),
        "rss_trend_growth_after_warmup_kib": slope_kib_per_sec.map(|b| round(b * span as f64, 0)),
        "mappings_warm": warm.first().map(|s| s.2),
        "mappings_end": final_sample.2,
        "mappings_min_after_warmup": warm.iter().map(|s| s.2).min(),
        "mappings_max_after_warmup": warm.iter().map(|s| s.2).max(),
        "threads_warm": warm.first().map(|s| s.3),
        "threads_end": final_sample.3,
        "host_cpu_secs": round(cpu_seconds(pid), 1),
        "series": series,
    })
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no memory effects.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_sec
}

/// A `kB` (or count) line of `/proc/<pid>/status`.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|maps| maps.lines().count())
        .unwrap_or(0)
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let var: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let cov: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (var > 0.0).then(|| cov / var)
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}
