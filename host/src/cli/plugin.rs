//! `framehost plugin …`: check a component, and publish, inspect and roll back the
//! versions a cluster serves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use clap::{Args, Subcommand};
use wasmtime::component::types::{ComponentItem, Type};

use super::NatsArgs;
use crate::catalogue::load::check_bytes;
use crate::catalogue::nats::{self, Buckets, ReplicaStatus, RouteDoc};
use crate::catalogue::{Refusal, Step};
use crate::config::{Config, LimitsPatch, TrapPolicy};
use crate::intake;
use crate::sandbox::{Plugin, Sandbox, digest_of};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Check a component as a host does before serving it: a WebAssembly component, that
    /// compiles, links against the frame-processor world and instantiates. Prints its size,
    /// digest, imports and exports. Offline; exits 1 with the failing step if refused.
    Check(CheckArgs),
    /// Publish a component as the version of a job type, for every replica. It is checked
    /// here first; each replica checks it again, swaps it in for new jobs, and lets running
    /// jobs finish on the version they started with. Limits not given are kept from the
    /// current version, else taken from [catalogue.defaults].
    Push(PushArgs),
    /// Show each job type's version and limits, and which replicas serve it or refused it.
    List(ListArgs),
    /// Route a job type back to the version before its current one. Repeat to go further
    /// back (as far as the last 64 writes of the job type, pushes and rollbacks).
    Rollback(RollbackArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The component (.wasm).
    file: PathBuf,
    /// Configuration whose [sandbox] and [catalogue.defaults] limits to check under.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Args)]
pub struct PushArgs {
    /// The job type this version serves (1-64 of A-Z a-z 0-9 - _).
    #[arg(long = "job-type")]
    job_type: String,
    /// The component (.wasm).
    file: PathBuf,
    /// Linear memory per job, in MiB.
    #[arg(long = "memory-mib")]
    memory_mib: Option<u64>,
    /// Milliseconds one plugin call may run.
    #[arg(long = "deadline-ms")]
    deadline_ms: Option<u64>,
    /// What a trap does: fail the job, or restart the plugin and drop the frame.
    #[arg(long = "on-trap", value_enum)]
    on_trap: Option<TrapArg>,
    /// Restarts allowed per job with --on-trap restart.
    #[arg(long = "max-restarts")]
    max_restarts: Option<u32>,
    /// Decoded frames waiting for the plugin, per job.
    #[arg(long = "queue-depth")]
    queue_depth: Option<usize>,
    /// Wait until every live replica serves (or refused) the new version, at most this
    /// many seconds [default when given without a value: 60].
    #[arg(long, num_args = 0..=1, default_missing_value = "60", value_name = "SECS")]
    wait: Option<u64>,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TrapArg {
    Fail,
    Restart,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print one JSON object: {"routes": {...}, "replicas": [...]}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The job type to roll back.
    #[arg(long = "job-type")]
    job_type: String,
    /// Wait until every live replica serves (or refused) the restored version, at most
    /// this many seconds [default when given without a value: 60].
    #[arg(long, num_args = 0..=1, default_missing_value = "60", value_name = "SECS")]
    wait: Option<u64>,
    #[command(flatten)]
    nats: NatsArgs,
}

pub async fn run(command: PluginCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginCommand::Check(args) => check(args).await,
        PluginCommand::Push(args) => push(args).await,
        PluginCommand::List(args) => list(args).await,
        PluginCommand::Rollback(args) => rollback(args).await,
    }
}

/// Runs the host's loading steps on `bytes`; the refusal names the step.
async fn verify(config: &Config, name: &str, bytes: &[u8]) -> Result<Plugin, Refusal> {
    check_bytes(bytes, None)?;
    let mut sandbox_config = config.sandbox_config();
    sandbox_config.max_instances = 1;
    let sandbox = Sandbox::new(sandbox_config)
        .map_err(|e| Refusal::new(Step::Compile, format!("cannot start wasmtime: {e:#}")))?;
    let plugin = sandbox.load(name, bytes)?;
    let limits = config.catalogue.defaults;
    limits
        .check(config.sandbox.max_memory_mib)
        .map_err(|reason| {
            Refusal::new(
                Step::Limits,
                format!(
                    "{reason} (checked against this command's configuration; pass --config with \
                 the hosts' file to check against theirs)"
                ),
            )
        })?;
    crate::catalogue::trial(&plugin, &limits).await?;
    Ok(plugin)
}

/// Reads a component as a host would: a regular file, at most `max_bytes`.
async fn read(file: &Path, max_bytes: u64) -> anyhow::Result<(String, Vec<u8>)> {
    let bytes = crate::catalogue::dir::read_plugin(file, max_bytes)
        .await
        .map_err(|refusal| anyhow::anyhow!("cannot read {}", refusal.reason))?;
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    Ok((name, bytes))
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_env(args.config.as_deref())?;
    let (name, bytes) = read(&args.file, config.catalogue.max_plugin_mib << 20).await?;
    println!("file      {}", args.file.display());
    println!("size      {} bytes", bytes.len());
    println!("digest    {}", digest_of(&bytes));
    let started = Instant::now();
    match verify(&config, &name, &bytes).await {
        Ok(plugin) => {
            let ty = plugin.component().component_type();
            let engine = plugin.component().engine();
            println!("imports");
            for (import, _) in ty.imports(engine) {
                println!("  {import}");
            }
            println!("exports");
            for (export, item) in ty.exports(engine) {
                println!("  {export}");
                if let ComponentItem::ComponentInstance(instance) = item.ty {
                    for (func, item) in instance.exports(engine) {
                        if let ComponentItem::ComponentFunc(f) = item.ty {
                            let params: Vec<_> = f
                                .params()
                                .map(|(p, t)| format!("{p}: {}", type_name(&t)))
                                .collect();
                            let results: Vec<_> = f.results().map(|t| type_name(&t)).collect();
                            let arrow = if results.is_empty() {
                                String::new()
                            } else {
                                format!(" -> {}", results.join(", "))
                            };
                            println!("    {func}: func({}){arrow}", params.join(", "));
                        }
                    }
                }
            }
            println!(
                "ok        implements the frame-processor world (checked in {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(refusal) => {
            println!(
                "refused   at step {}: {}",
                refusal.step.as_str(),
                refusal.reason
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A WIT-like name for an interface type.
fn type_name(ty: &Type) -> String {
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(list) => format!("list<{}>", type_name(&list.ty())),
        Type::Option(option) => format!("option<{}>", type_name(&option.ty())),
        Type::Result(result) => {
            let side = |t: Option<Type>| t.map(|t| type_name(&t)).unwrap_or_else(|| "_".into());
            format!("result<{}, {}>", side(result.ok()), side(result.err()))
        }
        Type::Record(record) => {
            let fields: Vec<_> = record.fields().map(|f| f.name).collect();
            format!("record {{ {} }}", fields.join(", "))
        }
        Type::Tuple(tuple) => {
            let types: Vec<_> = tuple.types().map(|t| type_name(&t)).collect();
            format!("tuple<{}>", types.join(", "))
        }
        Type::Enum(e) => {
            let names: Vec<_> = e.names().collect();
            format!("enum {{ {} }}", names.join(", "))
        }
        Type::Variant(_) => "variant".into(),
        Type::Flags(_) => "flags".into(),
        other => format!("{other:?}")
            .split(['(', ' '])
            .next()
            .unwrap_or("type")
            .to_lowercase(),
    }
}

/// `user@host`, for the record of who pushed.
fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", intake::hostname())
}

async fn connect(args: &NatsArgs) -> anyhow::Result<(Config, Buckets)> {
    let mut config = Config::load_or_env(args.config.as_deref())?;
    if let Some(url) = &args.nats {
        config.nats.url = url.clone();
    }
    let client = intake::connect(&config.nats, intake::FirstConnect::FailFast).await?;
    let js = jetstream::new(client);
    let buckets = Buckets::open(&js, &config.catalogue, config.nats.replicas).await?;
    Ok((config, buckets))
}

fn short(digest: &str) -> &str {
    if digest.is_empty() {
        return "(unreadable)";
    }
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

async fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load_or_env(args.nats.config.as_deref())?;
    let (name, bytes) = read(&args.file, config.catalogue.max_plugin_mib << 20).await?;
    let patch = LimitsPatch {
        memory_mib: args.memory_mib,
        call_deadline_ms: args.deadline_ms,
        on_trap: args.on_trap.map(|t| match t {
            TrapArg::Fail => TrapPolicy::Fail,
            TrapArg::Restart => TrapPolicy::Restart,
        }),
        max_restarts: args.max_restarts,
        queue_depth: args.queue_depth,
    };
    // Check with the limits it asks for, so that a memory limit the component's own
    // start-up exceeds is caught here and not on every replica.
    config.catalogue.defaults = patch.apply(&config.catalogue.defaults);
    if let Err(refusal) = verify(&config, &name, &bytes).await {
        eprintln!(
            "{}: refused at step {}: {}",
            args.file.display(),
            refusal.step.as_str(),
            refusal.reason
        );
        return Ok(ExitCode::FAILURE);
    }
    let (config, buckets) = connect(&args.nats).await?;
    let pushed = nats::push(
        &buckets,
        &args.job_type,
        &name,
        &bytes,
        &patch,
        &config.catalogue.defaults,
        &whoami(),
    )
    .await?;
    if pushed.unchanged {
        println!(
            "{}: already routed to {} with these limits (revision {}); nothing written",
            args.job_type, pushed.doc.digest, pushed.revision
        );
        println!("limits: {}", limits_text(&pushed.doc));
        return match args.wait {
            Some(secs) => wait_for(&buckets, &args.job_type, &pushed.doc.digest, secs).await,
            None => Ok(ExitCode::SUCCESS),
        };
    }
    let from = pushed
        .replaced
        .as_ref()
        .map(|d| short(&d.digest).to_owned())
        .unwrap_or_else(|| "nothing".into());
    println!(
        "{}: {} → {} ({}, revision {}, {})",
        args.job_type,
        from,
        short(&pushed.doc.digest),
        pushed.doc.digest,
        pushed.revision,
        if pushed.uploaded {
            "uploaded"
        } else {
            "already stored"
        }
    );
    println!("limits: {}", limits_text(&pushed.doc));
    match args.wait {
        Some(secs) => wait_for(&buckets, &args.job_type, &pushed.doc.digest, secs).await,
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let (_, buckets) = connect(&args.nats).await?;
    let (from, revision, to) = nats::rollback(&buckets, &args.job_type, &whoami()).await?;
    println!(
        "{}: {} → {} ({}, revision {})",
        args.job_type,
        short(&from.digest),
        short(&to.digest),
        to.digest,
        revision
    );
    println!("limits: {}", limits_text(&to));
    match args.wait {
        Some(secs) => wait_for(&buckets, &args.job_type, &to.digest, secs).await,
        None => Ok(ExitCode::SUCCESS),
    }
}

fn limits_text(doc: &RouteDoc) -> String {
    let l = &doc.limits;
    let queue = l
        .queue_depth
        .map(|q| q.to_string())
        .unwrap_or_else(|| "host default".into());
    let on_trap = match l.on_trap {
        TrapPolicy::Fail => "fail",
        TrapPolicy::Restart => "restart",
    };
    format!(
        "memory {} MiB, deadline {} ms, on trap {on_trap} (max {} restarts), queue {queue}",
        l.memory_mib, l.call_deadline_ms, l.max_restarts
    )
}

/// Waits until every live replica serves or refused `digest` for `job_type`.
async fn wait_for(
    buckets: &Buckets,
    job_type: &str,
    digest: &str,
    secs: u64,
) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut printed = std::collections::BTreeSet::new();
    let mut next_progress = Instant::now() + Duration::from_secs(5);
    loop {
        let mut replicas = nats::list(buckets).await?.replicas;
        // A replica that stopped without saying so stays in the bucket until it expires;
        // one silent for over a heartbeat and a margin is not waited for.
        let now_ms = nats::unix_now().as_millis() as u64;
        let stale_after = (nats::HEARTBEAT + Duration::from_secs(5)).as_millis() as u64;
        replicas.retain(|r| {
            let silent = now_ms.saturating_sub(r.updated_ms);
            let stale = silent > stale_after;
            if stale && printed.insert(r.host.clone()) {
                println!(
                    "  {}: not heard from for {} s (stopped?); not waited for",
                    r.host,
                    silent / 1000
                );
            }
            !stale
        });
        if replicas.is_empty() {
            eprintln!("no replica is running: nothing to wait for");
            return Ok(ExitCode::SUCCESS);
        }
        let mut settled = 0;
        let mut refused = 0;
        for replica in &replicas {
            let route = replica.catalogue.routes.get(job_type);
            let serving = route
                .and_then(|r| r.serving.as_ref())
                .is_some_and(|s| s.digest == digest);
            let refusal = route
                .and_then(|r| r.refused.as_ref())
                .filter(|r| r.digest == digest);
            if serving || refusal.is_some() {
                settled += 1;
                if refusal.is_some() {
                    refused += 1;
                }
                if printed.insert(replica.host.clone()) {
                    match refusal {
                        Some(r) => println!(
                            "  {}: refused at step {}: {}",
                            replica.host,
                            r.step.as_str(),
                            r.reason
                        ),
                        None => println!("  {}: serving", replica.host),
                    }
                }
            }
        }
        if settled == replicas.len() {
            return Ok(if refused == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(5);
            let waiting: Vec<_> = replicas
                .iter()
                .filter(|r| !printed.contains(&r.host))
                .map(|r| r.host.as_str())
                .collect();
            eprintln!("  waiting for {}", waiting.join(", "));
        }
        if Instant::now() >= deadline {
            for replica in replicas.iter().filter(|r| !printed.contains(&r.host)) {
                println!("  {}: not serving it yet", replica.host);
            }
            eprintln!("gave up waiting after {secs} s");
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (_, buckets) = connect(&args.nats).await?;
    let nats::Listing {
        routes,
        unreadable,
        replicas,
    } = nats::list(&buckets).await?;
    if args.json {
        let routes: serde_json::Map<_, _> = routes
            .iter()
            .map(|(t, (revision, doc))| {
                let mut value = serde_json::to_value(doc).expect("route serializes");
                value["revision"] = (*revision).into();
                (t.clone(), value)
            })
            .collect();
        let unreadable: serde_json::Map<_, _> = unreadable
            .iter()
            .map(|(t, revision)| (t.clone(), (*revision).into()))
            .collect();
        let out = serde_json::json!({
            "routes": routes,
            "unreadable_routes": unreadable,
            "replicas": replicas,
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    if routes.is_empty() && unreadable.is_empty() {
        println!("no job type is routed in NATS (push one with `framehost plugin push`)");
    }
    for (job_type, revision) in &unreadable {
        println!(
            "{job_type}  route revision {revision} is not a route document (replicas refuse it; \
             push a version to replace it)"
        );
    }
    for (job_type, (revision, doc)) in &routes {
        println!(
            "{job_type}  {}  {}  {} bytes  revision {revision}  pushed by {}{}",
            short(&doc.digest),
            doc.name,
            doc.size,
            doc.pushed_by,
            doc.rolled_back_from
                .as_deref()
                .map(|d| format!(" (rollback from {})", short(d)))
                .unwrap_or_default()
        );
        println!("    limits: {}", limits_text(doc));
        for replica in &replicas {
            println!("    {}", replica_line(replica, job_type, &doc.digest));
        }
    }
    // Job types some replica serves from its own files, not from NATS.
    let local: std::collections::BTreeSet<_> = replicas
        .iter()
        .flat_map(|r| r.catalogue.routes.keys())
        .filter(|t| !routes.contains_key(*t))
        .collect();
    for job_type in local {
        println!("{job_type}  (local files of some replicas)");
        for replica in &replicas {
            println!("    {}", replica_line(replica, job_type, ""));
        }
    }
    println!();
    if replicas.is_empty() {
        println!("no replica is running");
    }
    for r in &replicas {
        let c = &r.catalogue;
        println!(
            "replica {}  framehost {}  compiled {}  from cache {}  cache entries refused {}  versions refused {}",
            r.host,
            r.version,
            c.counts.compiles,
            c.counts.cache_hits,
            c.counts.cache_invalid,
            c.refusals
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What one replica does for a job type whose routed digest is `routed`.
fn replica_line(replica: &ReplicaStatus, job_type: &str, routed: &str) -> String {
    let Some(route) = replica.catalogue.routes.get(job_type) else {
        return format!("{}: not routed", replica.host);
    };
    let mut line = format!("{}: ", replica.host);
    match &route.serving {
        Some(serving) => line.push_str(&format!(
            "serving {} ({}{})",
            short(&serving.digest),
            serving.origin.as_str(),
            if !routed.is_empty() && serving.digest != routed {
                ", not the routed version"
            } else {
                ""
            }
        )),
        None => line.push_str("serving nothing"),
    }
    if let Some(serving) = &route.serving
        && serving.origin != crate::catalogue::Origin::Nats
    {
        line.push_str(&format!(
            ", memory {} MiB, deadline {} ms",
            serving.limits.memory_mib, serving.limits.call_deadline_ms
        ));
    }
    if route.state == "loading"
        && let Some(wanted) = &route.wanted
    {
        line.push_str(&format!("; loading {}", short(wanted)));
    }
    if let Some(refused) = &route.refused {
        line.push_str(&format!(
            "; refused {} at step {}: {}",
            short(&refused.digest),
            refused.step.as_str(),
            refused.reason
        ));
    }
    line
}
