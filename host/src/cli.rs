//! The command line: `serve`, `replay`, `capture synth|info`, `job submit|stop`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::capture::synth::{self, SynthOptions};
use crate::capture::{CaptureMeta, CaptureReader, CaptureWriter};
use crate::catalogue::Catalogue;
use crate::catalogue::dir::DirSource;
use crate::config::{Config, Limits};
use crate::intake::{self, JobState};
use crate::job::{self, JobEvent, JobReport, JobSettings, JobSpec};
use crate::livekit::{self, LiveKitSource, LiveKitStats, PacketQueue, Secret, SessionEnd};
use crate::ops::{self, Readiness};
use crate::sandbox::Sandbox;
use crate::source::SourceSpec;
use crate::telemetry::{self, JobCounters};

mod plugin;

#[derive(Parser)]
#[command(
    name = "framehost",
    version,
    about = "Runs sandboxed WebAssembly video-analytics plugins over LiveKit text streams",
    long_about = "Runs sandboxed WebAssembly video-analytics plugins over LiveKit text streams.\n\n\
        Jobs arrive on NATS JetStream (`serve`); each job's frames are reassembled from data \
        streams, decoded, and handed to the job type's plugin, a WebAssembly component with \
        its own memory and time limits. A job's frames come from a LiveKit room (joined as a \
        hidden, data-only participant) or a capture file. `replay` runs the same path offline \
        over a capture file; `capture record` records a room into one; `capture synth` makes \
        a synthetic one.",
    after_help = "Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=framehost=debug) for more."
)]
struct Cli {
    /// Log as JSON lines (for log collectors) instead of text. A job's lines carry its
    /// `job_id` and `job_type` in their `span` fields.
    #[arg(
        long,
        global = true,
        env = "FRAMEHOST_LOG_JSON",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Take jobs from NATS JetStream and run them until SIGTERM or Ctrl-C.
    Serve(ServeArgs),
    /// Run a plugin over a capture file offline, through the same path as a live job.
    Replay(ReplayArgs),
    /// Make or inspect capture files.
    #[command(subcommand)]
    Capture(CaptureCommand),
    /// Submit or stop jobs on NATS.
    #[command(subcommand)]
    Job(JobCommand),
    /// Check a configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check plugins, and publish, list and roll back the versions a cluster serves.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Measure throughput, job start time and memory over many jobs (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (with the environment overrides `serve` applies) and
    /// print the effective configuration, every default filled in and secrets redacted.
    /// Exits 1 with the reason if it is invalid.
    Check {
        /// The configuration file (TOML).
        #[arg(env = "FRAMEHOST_CONFIG")]
        config: PathBuf,
        /// NATS server URL, overriding `nats.url`, as for `serve`.
        #[arg(long, env = "FRAMEHOST_NATS_URL")]
        nats: Option<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML). Job types and their plugins are listed under [job_types].
    #[arg(long, short, env = "FRAMEHOST_CONFIG")]
    config: PathBuf,
    /// NATS server URL, overriding `nats.url`.
    #[arg(long, env = "FRAMEHOST_NATS_URL")]
    nats: Option<String>,
}

#[derive(Args)]
struct ReplayArgs {
    /// The plugin component (.wasm) to run.
    #[arg(long)]
    plugin: PathBuf,
    /// The capture file to replay.
    capture: PathBuf,
    /// Configuration file (TOML) for the path's bounds; defaults apply without one.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The job's config object, as JSON, handed to the plugin.
    #[arg(long, default_value = "{}")]
    job_config: String,
    /// Plugin memory limit in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Deadline of one plugin call, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    deadline_ms: u64,
    /// Replay at the recorded pace, dropping frames the plugin cannot keep up with, as in a
    /// live room. By default frames are fed as fast as the plugin takes them, none dropped.
    #[arg(long)]
    realtime: bool,
    /// Write every plugin result as a JSON line to this file (`-` for stdout).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Print one JSON summary line on stdout instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CaptureCommand {
    /// Make a synthetic capture: real photographs with moving objects, sent the way the
    /// upstream vision service sends frames.
    Synth(SynthArgs),
    /// Join a LiveKit room as a hidden participant and write every data packet that arrives
    /// to a capture file, for replaying a real session offline. Ends when the source leaves,
    /// the room closes, on Ctrl-C, or at --max-duration-secs / --idle-timeout-secs (idle =
    /// no packet).
    Record(RecordArgs),
    /// Print a capture's metadata and what it holds.
    Info {
        /// The capture file.
        capture: PathBuf,
    },
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    room: RoomArgs,
    /// Replace --out if it exists (by default an existing file is never touched).
    #[arg(long)]
    force: bool,
    /// Configuration file whose [livekit] section gives the server, API key and secret
    /// (LIVEKIT_API_KEY / LIVEKIT_API_SECRET work too) and whose [streams] topic is noted.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Output capture file. It is written as OUT.partial and renamed when the recording
    /// ends; a recording that got nothing leaves no file.
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Args)]
struct SynthArgs {
    /// Frames to make (with --detections, at most the file's frames).
    #[arg(long, default_value_t = 100)]
    frames: u32,
    /// Approximate encoded size of each JPEG, in KiB; the resolution and quality are picked
    /// to reach it.
    #[arg(long, default_value_t = 60)]
    image_kib: u32,
    /// App-level parts each frame's message is split into.
    #[arg(long, default_value_t = 4)]
    parts: u32,
    /// Frame rate: sets the recorded arrival times and timestamps.
    #[arg(long, default_value_t = 10.0)]
    fps: f64,
    /// Take the objects from a MOTChallenge file (frame,id,left,top,width,height,...; the
    /// ids are dropped) instead of synthetic moving boxes.
    #[arg(long)]
    detections: Option<PathBuf>,
    /// Frame size, WIDTHxHEIGHT (default: from --image-kib; 640x480 with --detections).
    #[arg(long, value_parser = parse_size)]
    size: Option<(u32, u32)>,
    /// Synthetic objects per frame.
    #[arg(long, default_value_t = 4)]
    objects: u32,
    /// Seed of the synthetic motion.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Compress streams with raw deflate, as LiveKit senders do for receivers that
    /// advertise it.
    #[arg(long)]
    deflate: bool,
    /// Data-stream topic.
    #[arg(long, default_value = "agentChat")]
    topic: String,
    /// Output capture file.
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum JobCommand {
    /// Publish a job; with --wait, follow its status until it ends (exit 0 if it finished or
    /// was stopped on request).
    Submit(Box<SubmitArgs>),
    /// Ask the host running a job to stop it early (it finishes its plugin and is acked); exits
    /// 1 if no host answers that it runs the job.
    Stop {
        /// The job's id.
        id: String,
        #[command(flatten)]
        nats: NatsArgs,
    },
}

#[derive(Args)]
struct NatsArgs {
    /// NATS server URL [default: the config's nats.url, else nats://127.0.0.1:4222].
    #[arg(long, env = "FRAMEHOST_NATS_URL")]
    nats: Option<String>,
    /// Configuration file whose [nats] section names the server, stream and subjects (and,
    /// for `plugin` commands, whose [catalogue] and [sandbox] sections name the buckets and
    /// the limits to check against); defaults otherwise.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["capture", "room"]))]
struct SubmitArgs {
    /// The job type (selects the plugin on the hosts).
    #[arg(long = "type")]
    job_type: String,
    /// Capture file to process, as seen by the host (made absolute here).
    #[arg(long)]
    capture: Option<PathBuf>,
    /// Read the capture at its recorded pace, as a live room.
    #[arg(long, requires = "capture")]
    realtime: bool,
    #[command(flatten)]
    room: RoomArgs,
    /// Job id (default: a new UUID).
    #[arg(long)]
    id: Option<String>,
    /// The job's config object, as JSON, handed to the plugin.
    #[arg(long = "job-config", default_value = "{}")]
    job_config: String,
    /// Follow the job's status until it ends.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Print status messages as JSON lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// A LiveKit room: a job's source (`job submit`) or what `capture record` records.
#[derive(Args)]
struct RoomArgs {
    /// LiveKit room to join (for `job submit`, instead of --capture). It must be the room
    /// the token grants.
    #[arg(long)]
    room: Option<String>,
    /// LiveKit server URL, ws:// or wss:// [default: livekit.url of the configuration: the
    /// host's for `job submit`, --config's for `capture record`].
    #[arg(long = "livekit-url", requires = "room")]
    livekit_url: Option<String>,
    /// Token to join with [default: one minted from livekit.api_key/api_secret (or
    /// LIVEKIT_API_KEY/LIVEKIT_API_SECRET): the host's for `job submit`, this command's for
    /// `capture record`]. It needs roomJoin for the room and canSubscribe; a hidden,
    /// subscribe-only grant is best. Prefer the environment variable: a command line is
    /// visible to other users.
    #[arg(
        long,
        env = "FRAMEHOST_LIVEKIT_TOKEN",
        hide_env_values = true,
        requires = "room"
    )]
    token: Option<String>,
    /// Identity of the participant publishing the frames: the job or recording ends when it
    /// leaves [default: when the last other participant leaves].
    #[arg(long = "source-identity", requires = "room")]
    source_identity: Option<String>,
    /// End after this many seconds in the room, at least 1 [default:
    /// livekit.max_duration_secs, 4 hours].
    #[arg(long = "max-duration-secs", requires = "room")]
    max_duration_secs: Option<u64>,
    /// End after this many seconds without a frame (`capture record`: without a packet), at
    /// least 1 [default: livekit.idle_timeout_secs, 120].
    #[arg(long = "idle-timeout-secs", requires = "room")]
    idle_timeout_secs: Option<u64>,
}

impl RoomArgs {
    fn source(&self) -> Option<LiveKitSource> {
        Some(LiveKitSource {
            room: self.room.clone()?,
            url: self.livekit_url.clone(),
            token: self.token.clone().map(Secret::new),
            source_identity: self.source_identity.clone(),
            max_duration_secs: self.max_duration_secs,
            idle_timeout_secs: self.idle_timeout_secs,
        })
    }
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or("expected WIDTHxHEIGHT, e.g. 640x480")?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} is not a number"))
    };
    Ok((parse(w)?, parse(h)?))
}

/// Parses the command line and runs it; the exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(
        cli.log_json,
        "info,wasmtime=warn,cranelift=warn,async_nats=warn",
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Replay(args) => replay(args).await,
        Command::Capture(CaptureCommand::Synth(args)) => capture_synth(args),
        Command::Capture(CaptureCommand::Info { capture }) => capture_info(&capture),
        Command::Capture(CaptureCommand::Record(args)) => capture_record(args).await,
        Command::Job(JobCommand::Submit(args)) => submit(*args).await,
        Command::Job(JobCommand::Stop { id, nats }) => stop(&id, nats).await,
        Command::Config(ConfigCommand::Check { config, nats }) => config_check(&config, nats),
        Command::Plugin(command) => plugin::run(command).await,
        Command::Bench(command) => crate::bench::run(command).await,
    }
}

fn config_check(path: &Path, nats: Option<String>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(path)?;
    if let Some(url) = nats {
        config.nats.url = url;
        config.validate()?;
    }
    let text = toml::to_string(&config.redacted()).context("cannot print the configuration")?;
    println!(
        "# {} is valid; the effective configuration:\n",
        path.display()
    );
    print!("{text}");
    match config.catalogue.cache_dir() {
        Some(dir) => println!("\n# compiled plugins are cached in {}", dir.display()),
        None => println!("\n# compiled plugins are not cached"),
    }
    let budget = config.memory_budget();
    let mib = |bytes: u64| bytes.div_ceil(1 << 20);
    println!(
        "# memory budget (worst case resident): {} MiB = {} MiB base + {} jobs x {} MiB",
        mib(budget.total()),
        mib(budget.base),
        budget.jobs,
        mib(budget.per_job_total())
    );
    for (what, bytes) in &budget.per_job {
        println!("#   per job: {:>6} MiB  {what}", mib(*bytes));
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(&args.config)?;
    if let Some(url) = args.nats {
        config.nats.url = url;
    }
    if config.job_types.is_empty() && config.catalogue.dir.is_none() && !config.catalogue.nats {
        bail!(
            "{} lists no [job_types], no catalogue.dir, and catalogue.nats is off: this host \
             would serve nothing",
            args.config.display()
        );
    }
    // Bound before anything slow, so that a taken port fails the start at once.
    let endpoint = match config.metrics.enabled {
        true => Some(ops::bind(config.metrics.listen).await?),
        false => None,
    };
    let sandbox = Sandbox::new(config.sandbox_config())?;
    let catalogue = Catalogue::new(sandbox, &config);
    let lk = &config.livekit;
    let can_mint = lk.api_key.is_some() && lk.api_secret.is_some();
    if lk.url.is_none() || !can_mint {
        tracing::warn!(
            url_set = lk.url.is_some(),
            api_key_and_secret_set = can_mint,
            "LiveKit is not fully configured: room jobs must bring their own url and token, or \
             fail as livekit_not_configured (set livekit.url and livekit.api_key/api_secret, \
             or LIVEKIT_API_KEY/LIVEKIT_API_SECRET)"
        );
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    // Draining from the first signal; the endpoint answers until the process exits.
    let readiness = Readiness::new(shutdown.clone());
    if let Some(listener) = endpoint {
        tracing::info!(address = %config.metrics.listen, "Serving /metrics, /healthz and /readyz");
        tokio::spawn(ops::serve(listener, readiness.clone(), catalogue.clone()));
    }
    let files = DirSource::new(catalogue.clone(), &config).spawn(shutdown.child_token());
    intake::serve(Arc::new(config), catalogue, shutdown, readiness).await?;
    files.abort();
    tracing::info!("Stopped");
    Ok(ExitCode::SUCCESS)
}

/// First SIGTERM or Ctrl-C: graceful shutdown. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    let Ok(mut int) = signal(SignalKind::interrupt()) else {
        return;
    };
    for n in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n > 0 {
            tracing::warn!("Second signal: exiting now");
            std::process::exit(1);
        }
        tracing::info!("Signal received: finishing running jobs, pulling no more");
        shutdown.cancel();
    }
}

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_env(args.config.as_deref())?;
    let job_config: serde_json::Value =
        serde_json::from_str(&args.job_config).context("--job-config is not valid JSON")?;
    match std::fs::metadata(&args.capture) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => bail!("capture {} is not a regular file", args.capture.display()),
        Err(error) => bail!("cannot read capture {}: {error}", args.capture.display()),
    }

    let mut sandbox_config = config.sandbox_config();
    sandbox_config.max_instances = 2;
    sandbox_config.max_memory_bytes = sandbox_config.max_memory_bytes.max(args.memory_mib << 20);
    let sandbox = Sandbox::new(sandbox_config)?;
    let plugin = sandbox
        .load_file(&args.plugin)
        .with_context(|| format!("cannot load plugin {}", args.plugin.display()))?;

    let spec = JobSpec {
        id: format!("replay-{}", std::process::id()),
        job_type: "replay".into(),
        source: SourceSpec::Capture {
            path: args.capture.clone(),
            realtime: args.realtime,
        },
        config: job_config,
    };
    spec.validate()?;
    let limits = Limits {
        memory_mib: args.memory_mib,
        call_deadline_ms: args.deadline_ms,
        ..config.catalogue.defaults
    };
    let mut settings = JobSettings::new(&config, &limits);
    settings.progress_interval = Duration::from_millis(200);

    let results_on_stdout = args.results.as_deref() == Some(Path::new("-"));
    let mut results_out: Option<Box<dyn Write + Send>> = match &args.results {
        Some(path) if path == Path::new("-") => Some(Box::new(std::io::stdout())),
        Some(path) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ))),
        None => None,
    };
    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });

    let (events_tx, mut events_rx) = mpsc::channel(256);
    let consumer = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while let Some(event) = events_rx.recv().await {
                match event {
                    JobEvent::Progress(report) => {
                        if let Some(bar) = &bar {
                            bar.set_message(progress_line(&report));
                        }
                    }
                    JobEvent::Result { frame, result } => {
                        if let Some(out) = results_out.as_mut() {
                            let line = result_line(frame, &result.content_type, &result.data);
                            if writeln!(out, "{line}").is_err() {
                                results_out = None;
                            }
                        }
                    }
                }
            }
            if let Some(mut out) = results_out {
                out.flush().ok();
            }
        })
    };

    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.cancel();
            }
        });
    }
    let span = tracing::info_span!("job", job_id = %spec.id, job_type = %spec.job_type);
    let outcome =
        tracing::Instrument::instrument(job::run(&spec, &plugin, &settings, events_tx, stop), span)
            .await;
    consumer.await.ok();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // With the results on stdout, the human summary goes to stderr so stdout stays JSON lines.
    let mut summary_out: Box<dyn Write> = if results_on_stdout {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    match outcome {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_summary(&mut *summary_out, &report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            if args.json {
                let mut line =
                    serde_json::to_value(error.report.as_deref().cloned().unwrap_or_default())?;
                line["error"] = error.message.clone().into();
                line["reason"] = error.reason.into();
                println!("{line}");
            } else if let Some(report) = error.report.as_deref() {
                print_summary(&mut *summary_out, report);
            }
            eprintln!("error: job failed ({}): {}", error.reason, error.message);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn progress_line(report: &JobReport) -> String {
    format!(
        "{} frames processed, {} dropped, {} rejected, {:.1} frames/s",
        report.frames_processed,
        report.frames_dropped,
        report.frames_rejected.values().sum::<u64>(),
        report.frames_per_sec
    )
}

/// A result as one JSON line: JSON results inline, others base64.
fn result_line(frame: u64, content_type: &str, data: &[u8]) -> String {
    use base64::Engine as _;
    let frame = (frame != u64::MAX).then_some(frame);
    let value = if content_type.starts_with("application/json") {
        serde_json::from_slice::<serde_json::Value>(data).ok()
    } else {
        None
    };
    let line = match value {
        Some(value) => {
            serde_json::json!({"frame": frame, "content_type": content_type, "data": value})
        }
        None => serde_json::json!({
            "frame": frame,
            "content_type": content_type,
            "data_base64": base64::engine::general_purpose::STANDARD.encode(data),
        }),
    };
    line.to_string()
}

fn print_summary(out: &mut dyn Write, report: &JobReport) {
    let rejected: u64 = report.frames_rejected.values().sum();
    let _ = writeln!(
        out,
        "plugin      {} ({})",
        report.plugin, report.plugin_digest
    );
    let _ = writeln!(
        out,
        "frames      {} in, {} processed, {} dropped, {} rejected",
        report.frames_in, report.frames_processed, report.frames_dropped, rejected
    );
    for (reason, count) in &report.frames_rejected {
        let _ = writeln!(out, "  rejected  {count} {reason}");
    }
    let _ = writeln!(
        out,
        "results     {} ({} dropped)",
        report.results, report.results_dropped
    );
    let _ = writeln!(
        out,
        "speed       {:.1} frames/s, {:.1} MiB/s of images, {:.2} s",
        report.frames_per_sec, report.decoded_mib_per_sec, report.elapsed_secs
    );
    let _ = writeln!(
        out,
        "memory      plugin peak {:.1} MiB, host peak RSS {:.1} MiB",
        report.plugin_memory_peak_bytes as f64 / (1 << 20) as f64,
        report.peak_rss_bytes as f64 / (1 << 20) as f64
    );
    if !report.ended_by.is_empty() {
        let _ = writeln!(out, "ended by    {}", report.ended_by);
    }
    if let Some(lk) = &report.livekit {
        let _ = writeln!(
            out,
            "livekit     {} packets, {} duplicates, {} dropped (queue full), {} resumes, {} rejoins",
            lk.packets, lk.duplicates, lk.queue_full, lk.resumes, lk.rejoins
        );
    }
    let summary = serde_json::to_string_pretty(&report.summary).unwrap_or_default();
    let _ = writeln!(
        out,
        "summary     {}",
        summary.replace('\n', "\n            ")
    );
}

fn capture_synth(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let options = SynthOptions {
        frames: args.frames,
        image_kib: args.image_kib,
        parts: args.parts,
        fps: args.fps,
        detections: args.detections,
        size: args.size,
        objects: args.objects,
        seed: args.seed,
        topic: args.topic,
        deflate: args.deflate,
        ..SynthOptions::default()
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(options.frames as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} frames {eta}")
                .expect("valid template"),
        );
        bar
    });
    let report = synth::synth(&options, &args.out, |done| {
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "wrote {}: {} frames of {}x{} (JPEG quality {}, {:.1} KiB each on average), {} packets, {:.1} MiB",
        args.out.display(),
        report.frames,
        report.width,
        report.height,
        report.jpeg_quality,
        report.mean_image_bytes as f64 / 1024.0,
        report.packets,
        report.bytes_written as f64 / (1 << 20) as f64
    );
    Ok(ExitCode::SUCCESS)
}

fn capture_info(path: &Path) -> anyhow::Result<ExitCode> {
    let mut reader =
        CaptureReader::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = reader.meta().clone();
    let (mut records, mut bytes, mut last) = (0u64, 0u64, Duration::ZERO);
    let mut senders = std::collections::BTreeSet::new();
    for record in reader.by_ref() {
        let record = record.with_context(|| format!("{}", path.display()))?;
        records += 1;
        bytes += prost::Message::encoded_len(&record.packet) as u64;
        last = last.max(record.at);
        senders.insert(record.packet.participant_identity);
    }
    println!("source      {}", meta.source);
    println!("topic       {}", meta.topic);
    println!("note        {}", meta.note);
    println!(
        "packets     {records} ({:.1} MiB)",
        bytes as f64 / (1 << 20) as f64
    );
    println!("duration    {:.2} s", last.as_secs_f64());
    println!(
        "senders     {}",
        senders.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn nats_config(args: &NatsArgs) -> anyhow::Result<crate::config::NatsConfig> {
    let mut nats = Config::load_or_env(args.config.as_deref())?.nats;
    if let Some(url) = &args.nats {
        nats.url = url.clone();
    }
    Ok(nats)
}

async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let nats = nats_config(&args.nats)?;
    // Not the token: it may come from the environment, set for other commands.
    let room_options = args.room.livekit_url.is_some()
        || args.room.source_identity.is_some()
        || args.room.max_duration_secs.is_some()
        || args.room.idle_timeout_secs.is_some();
    if args.capture.is_some() && room_options {
        bail!(
            "--livekit-url, --source-identity, --max-duration-secs and --idle-timeout-secs \
             are for --room jobs, not --capture"
        );
    }
    if args.room.room.is_some() && args.realtime {
        bail!("--realtime is for --capture jobs: a room is always live");
    }
    let source = match (&args.capture, args.room.source()) {
        (Some(capture), _) => SourceSpec::Capture {
            path: std::path::absolute(capture)
                .with_context(|| format!("cannot resolve {}", capture.display()))?,
            realtime: args.realtime,
        },
        (None, Some(room)) => SourceSpec::LiveKit(room),
        (None, None) => bail!("give --capture or --room"),
    };
    let spec = JobSpec {
        id: args.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        job_type: args.job_type,
        source,
        config: serde_json::from_str(&args.job_config).context("--job-config is not valid JSON")?,
    };
    spec.validate()?;

    let json = args.json;
    let wait = args.wait.then(|| Duration::from_secs(args.timeout));
    if wait.is_some() && !json {
        eprintln!("job {}", spec.id);
    }
    let submitted = intake::submit(&nats, &spec, wait, |status| {
        if json {
            println!("{}", serde_json::to_string(status).unwrap_or_default());
            return;
        }
        match status.state {
            JobState::Started => {
                eprintln!("started on {} (delivery {})", status.host, status.delivery)
            }
            JobState::Progress => {
                if let Some(report) = &status.report {
                    eprintln!("progress: {}", progress_line(report));
                }
            }
            // Not final: the job comes back for another delivery.
            JobState::Failed if status.kind == Some(job::FailureKind::Transient) => eprintln!(
                "delivery {} on {} failed: {} ({}); it will be delivered again",
                status.delivery,
                status.host,
                status.error.as_deref().unwrap_or("no reason given"),
                status.reason.as_deref().unwrap_or("-"),
            ),
            JobState::Requeued => eprintln!(
                "delivery {} on {} was handed back (host shutting down); it will be delivered again",
                status.delivery, status.host,
            ),
            _ => {}
        }
    });
    let last = tokio::select! {
        last = submitted => last?,
        _ = tokio::signal::ctrl_c(), if wait.is_some() => {
            eprintln!(
                "job {id} keeps running without you; stop it with `framehost job stop {id}`",
                id = spec.id
            );
            return Ok(ExitCode::from(130));
        }
    };

    let Some(last) = last else {
        println!("{}", spec.id);
        return Ok(ExitCode::SUCCESS);
    };
    if !json {
        match (&last.state, &last.report) {
            (JobState::Finished | JobState::Stopped, Some(report)) => {
                print_summary(&mut std::io::stdout(), report)
            }
            _ => eprintln!(
                "job {} {}: {} ({})",
                spec.id,
                format!("{:?}", last.state).to_lowercase(),
                last.error.as_deref().unwrap_or("no reason given"),
                last.reason.as_deref().unwrap_or("-")
            ),
        }
    }
    Ok(
        if matches!(last.state, JobState::Finished | JobState::Stopped) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

async fn capture_record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load_or_env(args.config.as_deref())?;
    config.livekit.apply_env();
    let source = args.room.source().context("--room is required")?;
    let job_id = format!("record-{}", std::process::id());
    let job = config
        .livekit
        .job(&job_id, &source)
        .map_err(|message| anyhow::anyhow!(message))?;
    if !args.force && args.out.exists() {
        bail!(
            "{} exists; give another --out, or --force to replace it",
            args.out.display()
        );
    }
    // Written beside the target and renamed at the end: a recording that fails leaves any
    // earlier file as it was.
    let mut partial = args.out.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let meta = CaptureMeta {
        source: source.room.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        topic: config.streams.topic.clone(),
        note: format!(
            "recorded by framehost {} from a LiveKit room",
            env!("CARGO_PKG_VERSION")
        ),
    };
    let mut writer = CaptureWriter::create(&partial, &meta)
        .with_context(|| format!("cannot create {}", partial.display()))?;

    let (packets, mut arrivals) = PacketQueue::new(job.packet_queue_len, job.packet_queue_bytes);
    let stats = Arc::new(LiveKitStats::default());
    let counters = Arc::new(JobCounters::default());
    let stop = CancellationToken::new();
    let session = {
        let (stats, counters, stop) = (stats.clone(), counters.clone(), stop.clone());
        let config = job.session.clone();
        tokio::spawn(async move {
            livekit::session::run(&config, &packets, &stats, &counters, &stop).await
        })
    };
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping: leaving the room (Ctrl-C again to quit at once)");
                stop.cancel();
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        })
    };

    let started = std::time::Instant::now();
    let mut last_packet = started;
    let mut ended_by = None;
    let mut bytes = 0u64;
    let mut flushed = started;
    let terminal = std::io::stderr().is_terminal();
    let mut stopping_since: Option<std::time::Instant> = None;
    let abort = session.abort_handle();
    loop {
        if stop.is_cancelled() {
            let since = *stopping_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > livekit::SESSION_EXIT_WAIT {
                eprintln!("the session did not leave the room in time; dropping it");
                abort.abort();
                break;
            }
        }
        let arrived = tokio::select! {
            arrived = arrivals.recv() => match arrived {
                Some(arrived) => Some(arrived),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(250)) => None,
        };
        let now = std::time::Instant::now();
        if let Some(arrived) = arrived {
            last_packet = now;
            bytes += prost::Message::encoded_len(&arrived.packet) as u64;
            writer.write(
                arrived.at.saturating_duration_since(started),
                &arrived.packet,
            )?;
        }
        if now.duration_since(flushed) >= Duration::from_secs(1) {
            writer.flush()?;
            flushed = now;
            if terminal {
                eprint!(
                    "\r{:>6.1} s  {} packets  {:.1} MiB  ",
                    now.duration_since(started).as_secs_f64(),
                    writer.records(),
                    bytes as f64 / (1 << 20) as f64
                );
            }
        }
        if ended_by.is_none() && !stop.is_cancelled() {
            if now.duration_since(started) >= job.max_duration {
                ended_by = Some("max_duration");
                stop.cancel();
            } else if now.duration_since(last_packet) >= job.idle_timeout {
                ended_by = Some("idle_timeout");
                stop.cancel();
            }
        }
    }
    ctrl_c.abort();
    if terminal {
        eprintln!();
    }
    let records = writer.records();
    writer.finish()?;
    let end = match session.await {
        // Dropped above: it ended by the stop we asked for.
        Err(error) if error.is_cancelled() => Ok(SessionEnd::Stopped),
        Err(error) => return Err(anyhow::anyhow!("the LiveKit session task failed: {error}")),
        Ok(end) => end,
    };
    let end = match end {
        Ok(end) => end,
        Err(error) if records == 0 => {
            let _ = std::fs::remove_file(&partial);
            return Err(error.into());
        }
        Err(error) => {
            std::fs::rename(&partial, &args.out)?;
            eprintln!(
                "the recording ended early; {} holds the {records} packets it got",
                args.out.display()
            );
            return Err(error.into());
        }
    };
    let report = stats.report();
    if records == 0 {
        let _ = std::fs::remove_file(&partial);
        println!(
            "no packet arrived from room {:?} (ended by {}); nothing written{}",
            source.room,
            ended_by.unwrap_or(end.label()),
            if report.encrypted + report.undecodable > 0 {
                format!(
                    " ({} end-to-end encrypted and {} undecodable packets were dropped)",
                    report.encrypted, report.undecodable
                )
            } else {
                String::new()
            }
        );
        return Ok(ExitCode::FAILURE);
    }
    std::fs::rename(&partial, &args.out).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            args.out.display()
        )
    })?;
    println!(
        "{}: {records} packets, {:.1} MiB from room {:?}; ended by {}",
        args.out.display(),
        bytes as f64 / (1 << 20) as f64,
        source.room,
        ended_by.unwrap_or(end.label()),
    );
    println!(
        "livekit: {}",
        serde_json::to_string(&report).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

async fn stop(id: &str, args: NatsArgs) -> anyhow::Result<ExitCode> {
    JobSpec::validate_id(id)?;
    let nats = nats_config(&args)?;
    let client = intake::connect(&nats, intake::FirstConnect::FailFast).await?;
    let request = client.request(nats.control_subject(id), "stop".into());
    match tokio::time::timeout(Duration::from_secs(5), request).await {
        Ok(Ok(answer)) => {
            eprintln!("job {id}: {}", String::from_utf8_lossy(&answer.payload));
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("job {id}: no host answered that it runs this job");
            Ok(ExitCode::FAILURE)
        }
    }
}
