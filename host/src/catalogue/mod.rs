//! Catalogue: which plugin version, with which limits, serves each job type — changed
//! while the host runs.
//!
//! Sources say what they want ([`RouteSpec`]): the `[job_types]` files of the
//! configuration and the watched catalogue directory ([`dir`]), and the routes published in
//! NATS ([`nats`]). For one job type the highest [`Origin`] wins: a route pushed to the
//! cluster overrides a local file until it is deleted.
//!
//! A wanted version is fetched, digest-checked, compiled (or loaded from the on-disk
//! [`cache`]), linked against the world and instantiated once on trial ([`load`]); only then
//! is it swapped in. A version that fails any step is refused with its step and reason, and
//! the version before it keeps serving. A job takes an `Arc<Route>` when it starts and
//! keeps it to the end, so a swap never changes a running job's plugin: the old compiled
//! code is freed when its last job ends.

pub mod cache;
pub mod dir;
pub mod load;
pub mod nats;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, Limits};
use crate::sandbox::{Plugin, Sandbox, WeakPlugin};
pub use load::{CompileCounts, Compiler, Refusal, Step};

/// Where a route comes from. For one job type, the greatest present wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `[job_types.T] plugin = PATH` in the configuration.
    Config,
    /// `<T>.wasm` in the catalogue directory.
    Dir,
    /// `route.<T>` in the NATS routes bucket.
    Nats,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Dir => "dir",
            Self::Nats => "nats",
        }
    }
}

/// Where a version's bytes are read from.
#[derive(Clone)]
pub enum Fetch {
    File(PathBuf),
    Object(Box<async_nats::jetstream::object_store::ObjectStore>),
}

/// What a source wants for a job type.
#[derive(Clone)]
pub struct RouteSpec {
    pub job_type: String,
    /// A name for logs and reports: the file's stem.
    pub name: String,
    /// `sha256:<hex>` of the component's bytes.
    pub digest: String,
    pub limits: Limits,
    pub origin: Origin,
    /// The routes bucket's revision, for a route from NATS.
    pub revision: Option<u64>,
    pub fetch: Fetch,
    /// Set when the source already knows the version cannot serve (its file cannot be
    /// read, its limits file or route document is broken): it is refused with this, and
    /// the version before it keeps serving.
    pub unusable: Option<Refusal>,
    /// Set when this is an earlier version standing in for a refused one: the refusal
    /// stays on show while it serves.
    pub stands_in_for: Option<RefusedVersion>,
}

impl RouteSpec {
    fn same_version(&self, route: &Route) -> bool {
        self.digest == route.plugin.digest() && self.limits == route.limits
    }
}

/// A job type's loaded version. Jobs hold one from start to end.
pub struct Route {
    pub job_type: String,
    pub plugin: Plugin,
    pub limits: Limits,
    pub origin: Origin,
    pub revision: Option<u64>,
}

/// What `plugin list` and the replicas bucket show of one job type on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// `serving`, `loading` (a version is being loaded; the previous one, if any, serves)
    /// or `refused` (the wanted version was refused; the previous one, if any, serves).
    pub state: String,
    /// The version jobs start on now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<Serving>,
    /// The version the winning source wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusedVersion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Serving {
    pub digest: String,
    pub name: String,
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedVersion {
    pub digest: String,
    pub step: Step,
    pub reason: String,
}

/// The whole catalogue of one host, as published in the replicas bucket. Fields a replica
/// of another version leaves out read as their defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CatalogueStatus {
    #[serde(flatten)]
    pub counts: CompileCounts,
    /// Versions refused since the host started.
    pub refusals: u64,
    /// Compiled plugins in the on-disk cache, and their bytes (the cache is never pruned
    /// of versions; entries of another engine are removed at start).
    pub cache_entries: usize,
    pub cache_bytes: u64,
    pub routes: BTreeMap<String, RouteStatus>,
}

#[derive(Default)]
struct State {
    /// What each source wants, per job type.
    wanted: BTreeMap<String, BTreeMap<Origin, RouteSpec>>,
    /// Job types with a load under way.
    loading: BTreeMap<String, String>,
    /// The last refused version per job type, until a version of it loads.
    refused: BTreeMap<String, RefusedVersion>,
    refusals: u64,
    /// Compiled versions still alive (in a route or a running job), by digest: a rollback
    /// or a limits change reuses them.
    plugins: HashMap<String, WeakPlugin>,
}

pub struct Catalogue {
    compiler: Arc<Compiler>,
    max_plugin_bytes: u64,
    max_memory_mib: u64,
    routes: RwLock<BTreeMap<String, Arc<Route>>>,
    state: Mutex<State>,
    /// Bumped on every change of what [`Catalogue::status`] shows.
    changes: watch::Sender<u64>,
    /// Sources that have not yet delivered their first complete view.
    pending_sources: watch::Sender<usize>,
    /// The job types other replicas serve, by replica, with when that was last heard.
    peers: Mutex<HashMap<String, (Instant, BTreeSet<String>)>>,
}

impl Catalogue {
    /// An empty catalogue whose compiled code goes to the configured cache.
    pub fn new(sandbox: Sandbox, config: &Config) -> Arc<Self> {
        let cache = config.catalogue.cache_dir().and_then(|dir| {
            match cache::ArtifactCache::open(&dir, sandbox.engine()) {
                Ok(cache) => Some(cache),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), error = %error, "Compiled plugins will not be cached");
                    None
                }
            }
        });
        if let Some(cache) = &cache {
            tracing::info!(dir = %cache.dir().display(), "Caching compiled plugins");
        }
        Arc::new(Self {
            compiler: Arc::new(Compiler::new(sandbox, cache)),
            max_plugin_bytes: config.catalogue.max_plugin_mib << 20,
            max_memory_mib: config.sandbox.max_memory_mib,
            routes: RwLock::new(BTreeMap::new()),
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
            pending_sources: watch::Sender::new(0),
            peers: Mutex::new(HashMap::new()),
        })
    }

    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    pub fn max_plugin_bytes(&self) -> u64 {
        self.max_plugin_bytes
    }

    /// The version a job of `job_type` starting now runs on.
    pub fn route(&self, job_type: &str) -> Option<Arc<Route>> {
        self.routes
            .read()
            .expect("routes lock")
            .get(job_type)
            .cloned()
    }

    /// Whether some source routes `job_type`, loaded here or not.
    pub fn is_wanted(&self, job_type: &str) -> bool {
        self.state().wanted.contains_key(job_type)
    }

    /// What replica `host` serves, as it last said; `None` when it has gone.
    pub fn set_peer(&self, host: &str, job_types: Option<BTreeSet<String>>) {
        let mut peers = self.peers.lock().expect("peers lock");
        // Replicas that went quiet long ago (pods of earlier rollouts) are forgotten, so
        // the map holds about as many entries as there are live replicas.
        peers.retain(|_, (heard, _)| heard.elapsed() < FORGET_PEERS_AFTER);
        match job_types {
            Some(types) => {
                peers.insert(host.to_owned(), (Instant::now(), types));
            }
            None => {
                peers.remove(host);
            }
        }
    }

    /// Other live replicas that serve `job_type` (heard from within `fresh`).
    pub fn served_elsewhere(&self, job_type: &str, fresh: Duration) -> Vec<String> {
        let peers = self.peers.lock().expect("peers lock");
        peers
            .iter()
            .filter(|(_, (heard, types))| heard.elapsed() < fresh && types.contains(job_type))
            .map(|(host, _)| host.clone())
            .collect()
    }

    pub fn job_types(&self) -> Vec<String> {
        self.routes
            .read()
            .expect("routes lock")
            .keys()
            .cloned()
            .collect()
    }

    /// The version new jobs of each routed type start on: (job type, digest). Cheaper than
    /// [`Catalogue::status`], which also reads the compile cache's directory.
    pub fn serving(&self) -> Vec<(String, String)> {
        let routes = self.routes.read().expect("routes lock");
        routes
            .iter()
            .map(|(job_type, route)| (job_type.clone(), route.plugin.digest().to_owned()))
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("catalogue state lock")
    }

    /// A source that will deliver a first view; [`Catalogue::ready`] waits for it.
    pub fn add_source(&self) {
        self.pending_sources.send_modify(|n| *n += 1);
    }

    /// The source added with [`Catalogue::add_source`] has offered all it had at start.
    pub fn source_ready(&self) {
        self.pending_sources
            .send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Waits until every source has delivered its first view and those versions are
    /// loaded or refused.
    pub async fn ready(&self) {
        let mut pending = self.pending_sources.subscribe();
        pending.wait_for(|n| *n == 0).await.ok();
    }

    /// A receiver that changes whenever the status does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A source wants `spec`. Loads it if it is the winning source's version and differs
    /// from what serves; returns when it serves or was refused.
    pub async fn offer(&self, spec: RouteSpec) {
        let winning = {
            let mut state = self.state();
            let wanted = state.wanted.entry(spec.job_type.clone()).or_default();
            wanted.insert(spec.origin, spec.clone());
            wanted.last_key_value().map(|(_, s)| s.clone())
        };
        match winning {
            Some(winning) if winning.origin == spec.origin => self.apply(winning).await,
            Some(winning) => {
                tracing::info!(
                    job_type = %spec.job_type,
                    digest = %spec.digest,
                    origin = ?spec.origin,
                    winning = ?winning.origin,
                    "Plugin version noted; a route from another source wins for this job type"
                );
                self.changed();
            }
            None => {}
        }
    }

    /// A source no longer routes `job_type`. Another source's route takes over, or the job
    /// type is no longer served; running jobs finish on what they have.
    pub async fn withdraw(&self, job_type: &str, origin: Origin) {
        let next = {
            let mut state = self.state();
            let Some(wanted) = state.wanted.get_mut(job_type) else {
                return;
            };
            if wanted.remove(&origin).is_none() {
                return;
            }
            let next = wanted.last_key_value().map(|(_, s)| s.clone());
            if next.is_none() {
                state.wanted.remove(job_type);
                state.refused.remove(job_type);
            }
            next
        };
        match next {
            Some(next) => self.apply(next).await,
            None => {
                let removed = self.routes.write().expect("routes lock").remove(job_type);
                if let Some(route) = removed {
                    tracing::info!(
                        job_type,
                        digest = route.plugin.digest(),
                        origin = ?origin,
                        "Job type no longer routed; new jobs of it fail as unknown_job_type"
                    );
                }
                self.changed();
            }
        }
    }

    /// Loads `spec` and swaps it in, unless it is what already serves.
    async fn apply(&self, spec: RouteSpec) {
        let current = self.route(&spec.job_type);
        if let Some(current) = &current
            && spec.unusable.is_none()
            && spec.same_version(current)
        {
            if current.origin != spec.origin || current.revision != spec.revision {
                self.swap(&spec, current.plugin.clone());
            }
            self.note_loaded(&spec);
            self.changed();
            return;
        }
        self.state()
            .loading
            .insert(spec.job_type.clone(), spec.digest.clone());
        self.changed();
        let outcome = self.load(&spec).await;
        let still_wanted = {
            let mut state = self.state();
            state.loading.remove(&spec.job_type);
            let winning = state
                .wanted
                .get(&spec.job_type)
                .and_then(|w| w.last_key_value())
                .map(|(_, s)| (s.origin, s.digest.clone(), s.limits));
            winning == Some((spec.origin, spec.digest.clone(), spec.limits))
        };
        if !still_wanted {
            // Another version was offered while this one loaded; that offer applies it.
            self.changed();
            return;
        }
        match outcome {
            Ok(plugin) => {
                self.note_loaded(&spec);
                self.swap(&spec, plugin);
                tracing::info!(
                    job_type = %spec.job_type,
                    digest = %spec.digest,
                    previous = current.as_ref().map(|r| r.plugin.digest()).unwrap_or("none"),
                    origin = ?spec.origin,
                    revision = spec.revision,
                    memory_mib = spec.limits.memory_mib,
                    "Plugin version serving"
                );
            }
            Err(refusal) => {
                let message = if current.is_some() {
                    "Plugin version refused; the previous version keeps serving"
                } else {
                    "Plugin version refused; nothing serves this job type here"
                };
                tracing::warn!(
                    job_type = %spec.job_type,
                    digest = %spec.digest,
                    origin = ?spec.origin,
                    step = refusal.step.as_str(),
                    reason = %refusal.reason,
                    serving = current.as_ref().map(|r| r.plugin.digest()).unwrap_or("nothing"),
                    "{message}"
                );
                let mut state = self.state();
                state.refusals += 1;
                state.refused.insert(
                    spec.job_type.clone(),
                    RefusedVersion {
                        digest: spec.digest.clone(),
                        step: refusal.step,
                        reason: refusal.reason,
                    },
                );
            }
        }
        self.changed();
    }

    /// A version of the job type serves: its last refusal is over, unless this version
    /// stands in for the refused one.
    fn note_loaded(&self, spec: &RouteSpec) {
        let mut state = self.state();
        match &spec.stands_in_for {
            Some(refused) => state.refused.insert(spec.job_type.clone(), refused.clone()),
            None => state.refused.remove(&spec.job_type),
        };
    }

    /// Every job type's last refused version, while no later one has loaded.
    pub fn refusals(&self) -> Vec<(String, RefusedVersion)> {
        let state = self.state();
        state
            .refused
            .iter()
            .map(|(job_type, refused)| (job_type.clone(), refused.clone()))
            .collect()
    }

    /// The last version of `job_type` refused here, while no later one has loaded.
    pub fn refused(&self, job_type: &str) -> Option<RefusedVersion> {
        self.state().refused.get(job_type).cloned()
    }

    fn swap(&self, spec: &RouteSpec, plugin: Plugin) {
        let route = Arc::new(Route {
            job_type: spec.job_type.clone(),
            plugin,
            limits: spec.limits,
            origin: spec.origin,
            revision: spec.revision,
        });
        self.routes
            .write()
            .expect("routes lock")
            .insert(spec.job_type.clone(), route);
    }

    /// Fetches, checks, compiles and tries a version.
    async fn load(&self, spec: &RouteSpec) -> Result<Plugin, Refusal> {
        if let Some(refusal) = &spec.unusable {
            return Err(refusal.clone());
        }
        spec.limits
            .check(self.max_memory_mib)
            .map_err(|reason| Refusal::new(Step::Limits, reason))?;
        let alive = {
            let mut state = self.state();
            state.plugins.retain(|_, weak| weak.upgrade().is_some());
            state
                .plugins
                .get(&spec.digest)
                .and_then(WeakPlugin::upgrade)
        };
        let plugin = match alive {
            Some(plugin) => plugin,
            None => {
                let bytes = self.fetch(spec).await?;
                let compiler = self.compiler.clone();
                let (name, digest) = (spec.name.clone(), spec.digest.clone());
                let plugin =
                    tokio::task::spawn_blocking(move || compiler.load(&name, &digest, &bytes))
                        .await
                        .map_err(|e| {
                            Refusal::new(Step::Compile, format!("compiler panicked: {e}"))
                        })??;
                self.state()
                    .plugins
                    .insert(spec.digest.clone(), plugin.downgrade());
                plugin
            }
        };
        trial(&plugin, &spec.limits).await?;
        Ok(plugin)
    }

    async fn fetch(&self, spec: &RouteSpec) -> Result<Vec<u8>, Refusal> {
        match &spec.fetch {
            Fetch::File(path) => dir::read_plugin(path, self.max_plugin_bytes).await,
            Fetch::Object(store) => nats::fetch(store, &spec.digest, self.max_plugin_bytes).await,
        }
    }

    /// What this host serves, loads and refused, and what it compiled.
    pub fn status(&self) -> CatalogueStatus {
        let routes = self.routes.read().expect("routes lock").clone();
        let state = self.state();
        let (cache_entries, cache_bytes) =
            self.compiler.cache().map(|c| c.usage()).unwrap_or_default();
        let mut out = CatalogueStatus {
            counts: self.compiler.counts(),
            refusals: state.refusals,
            cache_entries,
            cache_bytes,
            routes: BTreeMap::new(),
        };
        let job_types = routes.keys().chain(state.wanted.keys());
        for job_type in job_types {
            if out.routes.contains_key(job_type) {
                continue;
            }
            let serving = routes.get(job_type).map(|r| Serving {
                digest: r.plugin.digest().to_owned(),
                name: r.plugin.name().to_owned(),
                origin: r.origin,
                revision: r.revision,
                limits: r.limits,
            });
            let wanted = state
                .wanted
                .get(job_type)
                .and_then(|w| w.last_key_value())
                .map(|(_, s)| s.digest.clone());
            let refused = state.refused.get(job_type).cloned();
            let state_name = if state.loading.contains_key(job_type) {
                "loading"
            } else if refused.is_some() {
                "refused"
            } else {
                "serving"
            };
            out.routes.insert(
                job_type.clone(),
                RouteStatus {
                    state: state_name.into(),
                    serving,
                    wanted,
                    refused,
                },
            );
        }
        out
    }
}

/// How long a replica not heard from is remembered at all.
const FORGET_PEERS_AFTER: Duration = Duration::from_secs(600);

/// Longest a trial instantiation may run: start-up code is no place for long work, and a
/// source waits for it.
const TRIAL_DEADLINE: Duration = Duration::from_secs(2);
/// How long a trial waits for a free instance slot when every slot is taken by jobs.
const TRIAL_SLOT_WAIT: Duration = Duration::from_secs(30);

/// Instantiates `plugin` once under `limits` (its deadline capped at [`TRIAL_DEADLINE`]).
/// A pool with no free slot is waited on, not taken for a refusal.
pub async fn trial(plugin: &Plugin, limits: &Limits) -> Result<(), Refusal> {
    let mut limits = limits.plugin_limits();
    limits.call_deadline = limits.call_deadline.min(TRIAL_DEADLINE);
    let started = Instant::now();
    loop {
        match plugin.trial(limits).await {
            Ok(()) => return Ok(()),
            Err(error) if is_pool_full(&error) && started.elapsed() < TRIAL_SLOT_WAIT => {
                tracing::info!(
                    digest = plugin.digest(),
                    "Every plugin slot is in use; the trial waits for one"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(trial_refusal(error)),
        }
    }
}

/// Whether an instantiation failed only because the pooling allocator had no free slot.
fn is_pool_full(error: &crate::sandbox::CallError) -> bool {
    let text = error.to_string();
    text.contains("maximum concurrent") && text.contains("limit")
}

/// Why a trial instantiation failed, in words that point at the cause.
pub fn trial_refusal(error: crate::sandbox::CallError) -> Refusal {
    let text = error.to_string();
    let reason = if text.contains("type mismatch") {
        format!(
            "an export of framehost:plugin/processor (init, process or finish) does not have \
             the world's type; rebuild against wit/frame-processor.wit ({text})"
        )
    } else {
        text
    };
    Refusal::new(Step::Instantiate, reason)
}

/// Job types are NATS subject tokens and key-value keys: 1 to 64 characters of
/// `A-Z a-z 0-9 - _`.
pub fn check_job_type(name: &str) -> Result<(), String> {
    if crate::config::is_name(name, 64) {
        Ok(())
    } else {
        Err(format!(
            "job type {name:?} must be 1-64 characters of A-Z a-z 0-9 - _"
        ))
    }
}
