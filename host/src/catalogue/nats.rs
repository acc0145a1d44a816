//! The cluster source: plugin bytes in a JetStream object store, routes in a key-value
//! bucket that every replica watches, and each replica's view of them in a second bucket.
//!
//! - Objects are named by digest (`sha256-<hex>`), so an object never changes once
//!   written; `plugin push` uploads one only when it is missing.
//! - Routes are keys `route.<job type>` whose value is a [`RouteDoc`]. Every push records
//!   the revision it replaced, so `plugin rollback` walks back down the chain (as deep as
//!   the bucket's history, [`ROUTE_HISTORY`] writes per job type) instead of flipping
//!   between two versions. Writes compare and set, so two pushes at once cannot both claim
//!   the same previous version.
//! - Each replica writes its [`ReplicaStatus`] under its host name on every change and
//!   every [`HEARTBEAT`]; the bucket forgets a replica [`REPLICA_TTL`] after its last word,
//!   so a dead one drops out of `plugin list` on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{Catalogue, CatalogueStatus, Fetch, Origin, Refusal, RouteSpec, Step, check_job_type};
use crate::config::{CatalogueConfig, Limits, LimitsPatch};

/// Writes kept per job type in the routes bucket: how far rollback can go. The most the
/// server allows.
pub const ROUTE_HISTORY: i64 = 64;
/// How often a replica repeats its status when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a replica's status outlives its last write.
pub const REPLICA_TTL: Duration = Duration::from_secs(30);
/// Longest a plugin download may take (64 MiB at a modest 5 MiB/s is 13 s). Routes wait
/// for it, so an object whose chunks never come must not hold them for long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A route as stored in the routes bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteDoc {
    /// `sha256:<hex>` of the component.
    pub digest: String,
    /// The file name it was pushed from, without extension.
    pub name: String,
    pub size: u64,
    pub limits: Limits,
    /// The revision this write replaced, for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    /// Unix seconds.
    pub pushed_at: u64,
    /// `user@host` of whoever pushed or rolled back.
    pub pushed_by: String,
    /// Set by `plugin rollback`: the digest it rolled back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
}

/// One replica's catalogue, as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub host: String,
    /// framehost's version.
    pub version: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix milliseconds of this report.
    pub updated_ms: u64,
    #[serde(flatten)]
    pub catalogue: CatalogueStatus,
}

/// The three buckets.
#[derive(Clone)]
pub struct Buckets {
    pub routes: kv::Store,
    pub objects: ObjectStore,
    pub replicas: kv::Store,
    routes_stream: String,
    routes_bucket: String,
}

impl Buckets {
    /// Opens the buckets, creating any that is missing with `replicas` JetStream replicas
    /// (`nats.replicas`); existing ones keep theirs.
    pub async fn open(
        js: &jetstream::Context,
        config: &CatalogueConfig,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let routes = open_kv(
            js,
            &config.routes_bucket,
            "framehost: plugin version and limits per job type",
            ROUTE_HISTORY,
            Duration::ZERO,
            replicas,
        )
        .await?;
        let objects = match js.get_object_store(&config.objects_bucket).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(jetstream::object_store::Config {
                    bucket: config.objects_bucket.clone(),
                    description: Some("framehost: plugin components by digest".into()),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("cannot create object store {}", config.objects_bucket))?,
        };
        let replicas = open_kv(
            js,
            &config.replicas_bucket,
            "framehost: what each host replica serves",
            1,
            REPLICA_TTL,
            replicas,
        )
        .await?;
        Ok(Self {
            routes,
            objects,
            replicas,
            routes_stream: format!("KV_{}", config.routes_bucket),
            routes_bucket: config.routes_bucket.clone(),
        })
    }

    /// Whether the routes bucket holds no route key (deleted ones count: they leave a
    /// marker), asked of the server now. False when it cannot tell.
    async fn routes_empty(&self, js: &jetstream::Context) -> bool {
        let Ok(stream) = js.get_stream(&self.routes_stream).await else {
            return false;
        };
        match stream
            .info_with_subjects(format!("$KV.{}.route.>", self.routes_bucket))
            .await
        {
            Ok(mut subjects) => subjects.next().await.is_none(),
            Err(_) => false,
        }
    }
}

/// Opens a key-value bucket, creating its stream when missing. The stream is made here, as
/// the client's `create_key_value` would make it, because that call first asks for account
/// details that servers before 2.10 answer in a shape the client cannot read.
async fn open_kv(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    history: i64,
    max_age: Duration,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create key-value bucket {bucket}"))?;
    js.get_key_value(bucket)
        .await
        .with_context(|| format!("cannot open key-value bucket {bucket}"))
}

pub fn route_key(job_type: &str) -> String {
    format!("route.{job_type}")
}

/// Object names cannot hold `:`; `sha256:<hex>` is stored as `sha256-<hex>`.
pub fn object_name(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Follows the routes bucket until `stop`: offers every route to the catalogue, withdraws
/// deleted ones. Ready once the routes present at start are loaded or refused. Watches
/// again after a lost connection, and reconciles with what the bucket then holds.
pub fn spawn_follow(
    catalogue: Arc<Catalogue>,
    js: jetstream::Context,
    buckets: Buckets,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    catalogue.add_source();
    tokio::spawn(async move {
        let mut ready = false;
        // Job types this source routes, for reconciling after a new watch.
        let mut routed: BTreeSet<String> = BTreeSet::new();
        loop {
            let watch = tokio::select! {
                _ = stop.cancelled() => return,
                watch = buckets.routes.watch_with_history("route.>") => watch,
            };
            match watch {
                Ok(mut watch) => {
                    // Job types seen in this watch; `current` once it has delivered every
                    // route there was when it started.
                    let mut seen = BTreeSet::new();
                    let mut current = buckets.routes_empty(&js).await;
                    if current {
                        reconcile(&catalogue, &mut routed, &seen).await;
                    }
                    loop {
                        if current && !ready {
                            ready = true;
                            catalogue.source_ready();
                        }
                        let entry = tokio::select! {
                            _ = stop.cancelled() => return,
                            entry = watch.next() => entry,
                            // A watch over no routes delivers nothing that says it is
                            // current: look at the bucket again now and then.
                            _ = tokio::time::sleep(Duration::from_secs(2)), if !current => {
                                if buckets.routes_empty(&js).await {
                                    current = true;
                                    reconcile(&catalogue, &mut routed, &seen).await;
                                }
                                continue;
                            }
                        };
                        let entry = match entry {
                            Some(Ok(entry)) => entry,
                            Some(Err(error)) => {
                                tracing::warn!(error = %error, "Route watch failed; watching again");
                                break;
                            }
                            None => {
                                tracing::warn!("Route watch ended; watching again");
                                break;
                            }
                        };
                        // Entries already delivered behind this one: of a burst of pushes,
                        // only each job type's last is loaded.
                        let mut batch = vec![entry];
                        let mut ended = false;
                        while batch.len() < MAX_BATCH {
                            match watch.next().now_or_never() {
                                Some(Some(Ok(entry))) => batch.push(entry),
                                Some(_) => {
                                    ended = true;
                                    break;
                                }
                                None => break,
                            }
                        }
                        let at_present = batch.iter().any(|e| e.delta == 0);
                        for entry in latest_per_key(batch) {
                            if let Some(job_type) = handle(&catalogue, &buckets, entry).await {
                                seen.insert(job_type.clone());
                                routed.insert(job_type);
                            }
                        }
                        if at_present && !current {
                            current = true;
                            reconcile(&catalogue, &mut routed, &seen).await;
                        }
                        if ended {
                            tracing::warn!("Route watch ended; watching again");
                            break;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        error = %error,
                        bucket = %buckets.routes_bucket,
                        "Cannot watch the plugin routes; retrying (no job is pulled until they are read)"
                    );
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// Route entries taken from the watch at once, at most.
const MAX_BATCH: usize = 1024;

/// The last entry of each key, in the order those last entries came.
fn latest_per_key(batch: Vec<kv::Entry>) -> Vec<kv::Entry> {
    let mut latest: Vec<kv::Entry> = Vec::with_capacity(batch.len());
    for entry in batch {
        latest.retain(|kept| kept.key != entry.key);
        latest.push(entry);
    }
    latest
}

/// Withdraws the job types this source routed that a new watch, now current, did not
/// deliver: routes deleted (or purged without a marker) while this replica was not
/// watching.
async fn reconcile(catalogue: &Catalogue, routed: &mut BTreeSet<String>, seen: &BTreeSet<String>) {
    for job_type in routed.difference(seen).cloned().collect::<Vec<_>>() {
        routed.remove(&job_type);
        catalogue.withdraw(&job_type, Origin::Nats).await;
    }
}

/// Applies one entry of the routes bucket; returns the job type it routes, if any.
async fn handle(catalogue: &Catalogue, buckets: &Buckets, entry: kv::Entry) -> Option<String> {
    let job_type = entry.key.strip_prefix("route.")?.to_owned();
    if let Err(error) = check_job_type(&job_type) {
        tracing::warn!(key = %entry.key, "Ignoring a route: {error}");
        return None;
    }
    match entry.operation {
        kv::Operation::Delete | kv::Operation::Purge => {
            catalogue.withdraw(&job_type, Origin::Nats).await;
            None
        }
        kv::Operation::Put => {
            let fetch = Fetch::Object(Box::new(buckets.objects.clone()));
            let doc = serde_json::from_slice::<RouteDoc>(&entry.value);
            let previous = doc.as_ref().ok().and_then(|d| d.previous);
            let spec = match doc {
                Ok(doc) => doc_spec(&job_type, doc, entry.revision, buckets),
                // Refused like a bad version: the one before keeps serving, and the job
                // type stays routed.
                Err(error) => RouteSpec {
                    job_type: job_type.clone(),
                    name: String::new(),
                    digest: String::new(),
                    limits: Limits::default(),
                    origin: Origin::Nats,
                    revision: Some(entry.revision),
                    fetch,
                    unusable: Some(Refusal::new(
                        Step::Fetch,
                        format!(
                            "revision {} of {} is not a route document: {error}",
                            entry.revision, entry.key
                        ),
                    )),
                    stands_in_for: None,
                },
            };
            catalogue.offer(spec).await;
            if catalogue.route(&job_type).is_none()
                && let Some(refused) = catalogue.refused(&job_type)
            {
                stand_in(catalogue, buckets, &job_type, previous, refused).await;
            }
            Some(job_type)
        }
    }
}

fn doc_spec(job_type: &str, doc: RouteDoc, revision: u64, buckets: &Buckets) -> RouteSpec {
    RouteSpec {
        job_type: job_type.to_owned(),
        name: doc.name,
        digest: doc.digest,
        limits: doc.limits,
        origin: Origin::Nats,
        revision: Some(revision),
        fetch: Fetch::Object(Box::new(buckets.objects.clone())),
        unusable: None,
        stands_in_for: None,
    }
}

/// Earlier versions tried, at most, when the routed one is refused and nothing serves.
const STAND_IN_DEPTH: usize = 10;

/// The routed version of `job_type` was refused and this replica serves nothing for it (it
/// started after the bad push, so it has no previous version in memory): serves the latest
/// earlier version in the route's history that loads, as replicas that were running keep
/// theirs. The refusal stays on show.
async fn stand_in(
    catalogue: &Catalogue,
    buckets: &Buckets,
    job_type: &str,
    mut previous: Option<u64>,
    refused: super::RefusedVersion,
) {
    let key = route_key(job_type);
    for _ in 0..STAND_IN_DEPTH {
        let Some(revision) = previous else {
            return;
        };
        let Ok(Some(entry)) = buckets.routes.entry_for_revision(&key, revision).await else {
            return;
        };
        let Ok(doc) = serde_json::from_slice::<RouteDoc>(&entry.value) else {
            return;
        };
        previous = doc.previous;
        let mut spec = doc_spec(job_type, doc, revision, buckets);
        spec.stands_in_for = Some(refused.clone());
        let digest = spec.digest.clone();
        catalogue.offer(spec).await;
        if catalogue.route(job_type).is_some() {
            tracing::warn!(
                job_type,
                digest,
                revision,
                refused = %refused.digest,
                "Serving an earlier version of the job type while its routed version is refused"
            );
            return;
        }
    }
}

/// Downloads the object of `digest`, refusing one larger than `max_bytes` before reading.
/// The object store checks the bytes against the digest it recorded on upload; the
/// catalogue checks them against the route's. A download that fails for want of a server
/// (a timeout, a stream between leaders) is tried again, [`FETCH_ATTEMPTS`] times in all,
/// before the version is refused: one NATS hiccup must not leave a replica without the
/// version every other replica serves.
pub async fn fetch(store: &ObjectStore, digest: &str, max_bytes: u64) -> Result<Vec<u8>, Refusal> {
    let mut pause = Duration::from_secs(2);
    let mut attempt = 1;
    loop {
        match fetch_once(store, digest, max_bytes).await {
            Ok(bytes) => return Ok(bytes),
            Err((refusal, true)) if attempt < FETCH_ATTEMPTS => {
                tracing::warn!(
                    digest,
                    attempt,
                    error = %refusal,
                    "Plugin download failed; trying again in {pause:?}"
                );
                tokio::time::sleep(pause).await;
                pause *= 4;
                attempt += 1;
            }
            Err((refusal, _)) => return Err(refusal),
        }
    }
}

/// Downloads attempted before a version whose download keeps failing is refused.
const FETCH_ATTEMPTS: u32 = 3;

/// One download; a failure says whether another attempt may succeed.
async fn fetch_once(
    store: &ObjectStore,
    digest: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, (Refusal, bool)> {
    use jetstream::object_store::{GetErrorKind, InfoErrorKind};
    let name = object_name(digest);
    let fail = |what: &str, e: &dyn std::fmt::Display, transient: bool| {
        let refusal = Refusal::new(Step::Fetch, format!("{what} object {name}: {e}"));
        (refusal, transient)
    };
    let download = async {
        let info = store.info(&name).await.map_err(|e| {
            let transient = !matches!(
                e.kind(),
                InfoErrorKind::NotFound | InfoErrorKind::InvalidName
            );
            fail("no", &e, transient)
        })?;
        if info.size as u64 > max_bytes {
            let refusal = Refusal::new(
                Step::Fetch,
                format!(
                    "object {name} is {} bytes, over catalogue.max_plugin_mib ({max_bytes} bytes)",
                    info.size
                ),
            );
            return Err((refusal, false));
        }
        let object = store.get(&name).await.map_err(|e| {
            let transient = !matches!(e.kind(), GetErrorKind::NotFound | GetErrorKind::InvalidName);
            fail("cannot open", &e, transient)
        })?;
        let mut bytes = Vec::with_capacity(info.size);
        object
            .take(max_bytes + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| fail("cannot read", &e, true))?;
        if bytes.len() as u64 > max_bytes {
            let refusal = Refusal::new(
                Step::Fetch,
                format!("object {name} grew past {max_bytes} bytes while read"),
            );
            return Err((refusal, false));
        }
        Ok(bytes)
    };
    tokio::time::timeout(FETCH_TIMEOUT, download)
        .await
        .unwrap_or_else(|_| {
            let refusal = Refusal::new(
                Step::Fetch,
                format!("object {name}: download took over {FETCH_TIMEOUT:?}"),
            );
            Err((refusal, true))
        })
}

/// A host name as a key: `A-Z a-z 0-9 - _`, anything else as `_`.
pub fn replica_key(host: &str) -> String {
    let key: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if key.is_empty() { "host".into() } else { key }
}

/// Publishes this replica's status on every change and heartbeat until `stop`, then
/// removes it.
pub fn spawn_status(
    catalogue: Arc<Catalogue>,
    replicas: kv::Store,
    host: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let key = replica_key(&host);
        let started_at = unix_now().as_secs();
        let mut changes = catalogue.subscribe();
        let mut failing = false;
        loop {
            changes.borrow_and_update();
            let status = ReplicaStatus {
                host: host.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                started_at,
                updated_ms: unix_now().as_millis() as u64,
                catalogue: catalogue.status(),
            };
            let body = serde_json::to_vec(&status).expect("status serializes");
            match replicas.put(&key, body.into()).await {
                Ok(_) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(error = %error, "Cannot publish this replica's plugin status");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
        replicas.delete(&key).await.ok();
    })
}

/// Follows the other replicas' statuses until `stop`, so that this host can tell a job type
/// nobody serves from one that other replicas serve and it does not.
pub fn spawn_peers(
    catalogue: Arc<Catalogue>,
    replicas: kv::Store,
    host: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let own = replica_key(&host);
        loop {
            let watch = tokio::select! {
                _ = stop.cancelled() => return,
                watch = replicas.watch_with_history(">") => watch,
            };
            if let Ok(mut watch) = watch {
                loop {
                    let entry = tokio::select! {
                        _ = stop.cancelled() => return,
                        entry = watch.next() => entry,
                    };
                    let Some(Ok(entry)) = entry else {
                        break;
                    };
                    if entry.key == own {
                        continue;
                    }
                    let served = (entry.operation == kv::Operation::Put)
                        .then(|| serde_json::from_slice::<ReplicaStatus>(&entry.value).ok())
                        .flatten()
                        .map(|status| {
                            status
                                .catalogue
                                .routes
                                .into_iter()
                                .filter(|(_, route)| route.serving.is_some())
                                .map(|(job_type, _)| job_type)
                                .collect()
                        });
                    catalogue.set_peer(&entry.key, served);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// What `plugin push` did.
#[derive(Debug)]
pub struct Pushed {
    pub revision: u64,
    pub doc: RouteDoc,
    /// The route it replaced.
    pub replaced: Option<RouteDoc>,
    /// False when the object was already stored.
    pub uploaded: bool,
    /// The job type already had this version and these limits: nothing was written.
    pub unchanged: bool,
}

/// Uploads `bytes` (unless stored already) and routes `job_type` to them, with `patch`
/// over the current route's limits (or `defaults` for a new job type).
pub async fn push(
    buckets: &Buckets,
    job_type: &str,
    name: &str,
    bytes: &[u8],
    patch: &LimitsPatch,
    defaults: &Limits,
    pushed_by: &str,
) -> anyhow::Result<Pushed> {
    check_job_type(job_type).map_err(anyhow::Error::msg)?;
    let digest = crate::sandbox::digest_of(bytes);
    let object = object_name(&digest);
    let uploaded = match buckets.objects.info(&object).await {
        Ok(info) if info.size == bytes.len() => false,
        _ => {
            let meta = jetstream::object_store::ObjectMetadata {
                name: object.clone(),
                description: Some(format!("{name}.wasm")),
                ..Default::default()
            };
            buckets
                .objects
                .put(meta, &mut &bytes[..])
                .await
                .with_context(|| format!("cannot upload {object}"))?;
            true
        }
    };
    let key = route_key(job_type);
    for _ in 0..8 {
        let (current, expected) = match current_entry(buckets, &key).await? {
            Some((revision, Some(doc))) => (Some((revision, doc)), Some(revision)),
            // An unreadable route is replaced; there is nothing to roll back to in it.
            Some((revision, None)) => (None, Some(revision)),
            None => (None, None),
        };
        let base = current
            .as_ref()
            .map(|(_, doc)| doc.limits)
            .unwrap_or(*defaults);
        if let Some((revision, doc)) = &current
            && doc.digest == digest
            && doc.limits == patch.apply(&base)
        {
            // Nothing to change: a new revision would only make rollback a no-op.
            return Ok(Pushed {
                revision: *revision,
                doc: doc.clone(),
                replaced: None,
                uploaded,
                unchanged: true,
            });
        }
        let doc = RouteDoc {
            digest: digest.clone(),
            name: name.to_owned(),
            size: bytes.len() as u64,
            limits: patch.apply(&base),
            previous: current.as_ref().map(|(revision, _)| *revision),
            pushed_at: unix_now().as_secs(),
            pushed_by: pushed_by.to_owned(),
            rolled_back_from: None,
        };
        if let Some(revision) = write_route(buckets, &key, &doc, expected).await? {
            return Ok(Pushed {
                revision,
                doc,
                replaced: current.map(|(_, doc)| doc),
                uploaded,
                unchanged: false,
            });
        }
    }
    bail!("the route of {job_type} kept changing under this push; try again")
}

/// Routes `job_type` back to the version before its current one.
pub async fn rollback(
    buckets: &Buckets,
    job_type: &str,
    pushed_by: &str,
) -> anyhow::Result<(RouteDoc, u64, RouteDoc)> {
    let key = route_key(job_type);
    for _ in 0..8 {
        let Some((revision, current)) = current_route(buckets, &key).await? else {
            bail!(
                "job type {job_type} has no route in bucket {} (nothing was pushed for it)",
                buckets.routes_bucket
            );
        };
        let Some(previous) = current.previous else {
            bail!(
                "job type {job_type} has no version before its current one ({}, revision \
                 {revision})",
                current.digest
            );
        };
        let earlier = buckets
            .routes
            .entry_for_revision(&key, previous)
            .await
            .with_context(|| format!("cannot read revision {previous} of {key}"))?
            .filter(|e| e.operation == kv::Operation::Put)
            .with_context(|| {
                format!(
                    "the version before (revision {previous}) is no longer kept: the bucket \
                     keeps the last {ROUTE_HISTORY} writes per job type"
                )
            })?;
        let earlier: RouteDoc = serde_json::from_slice(&earlier.value)
            .with_context(|| format!("revision {previous} of {key} is not a route document"))?;
        let doc = RouteDoc {
            pushed_at: unix_now().as_secs(),
            pushed_by: pushed_by.to_owned(),
            rolled_back_from: Some(current.digest.clone()),
            ..earlier
        };
        if let Some(written) = write_route(buckets, &key, &doc, Some(revision)).await? {
            return Ok((current, written, doc));
        }
    }
    bail!("the route of {job_type} kept changing under this rollback; try again")
}

/// The live route under `key`, with its revision; the document is `None` when it cannot
/// be read (written by hand, or by a newer framehost).
async fn current_entry(
    buckets: &Buckets,
    key: &str,
) -> anyhow::Result<Option<(u64, Option<RouteDoc>)>> {
    let entry = buckets
        .routes
        .entry(key)
        .await
        .with_context(|| format!("cannot read {key}"))?;
    Ok(match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            Some((entry.revision, serde_json::from_slice(&entry.value).ok()))
        }
        _ => None,
    })
}

/// The live, readable route under `key`, with its revision.
async fn current_route(buckets: &Buckets, key: &str) -> anyhow::Result<Option<(u64, RouteDoc)>> {
    match current_entry(buckets, key).await? {
        Some((revision, Some(doc))) => Ok(Some((revision, doc))),
        Some((revision, None)) => bail!(
            "{key} (revision {revision}) is not a route document; push a version to replace it"
        ),
        None => Ok(None),
    }
}

/// Writes `doc` if the key's last revision is still `expected`; `None` if someone wrote
/// in between.
async fn write_route(
    buckets: &Buckets,
    key: &str,
    doc: &RouteDoc,
    expected: Option<u64>,
) -> anyhow::Result<Option<u64>> {
    let body = bytes::Bytes::from(serde_json::to_vec(doc).expect("route serializes"));
    let written = match expected {
        Some(revision) => buckets
            .routes
            .update(key, body, revision)
            .await
            .map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    anyhow::Error::new(e),
                )
            }),
        None => buckets.routes.create(key, body).await.map_err(|e| {
            (
                e.kind() == kv::CreateErrorKind::AlreadyExists,
                anyhow::Error::new(e),
            )
        }),
    };
    match written {
        Ok(revision) => Ok(Some(revision)),
        Err((true, _)) => Ok(None),
        Err((false, error)) => Err(error.context(format!("cannot write {key}"))),
    }
}

/// What the buckets hold: `plugin list`.
pub struct Listing {
    /// Job type → (revision, route).
    pub routes: BTreeMap<String, (u64, RouteDoc)>,
    /// Job types whose route is not a readable document, with its revision.
    pub unreadable: Vec<(String, u64)>,
    /// Every live replica's status, by host name.
    pub replicas: Vec<ReplicaStatus>,
}

/// The live keys of a bucket.
async fn keys(store: &kv::Store) -> anyhow::Result<Vec<String>> {
    Ok(store
        .keys()
        .await?
        .filter_map(|k| async { k.ok() })
        .collect()
        .await)
}

/// Every route, with its revision, and every live replica's status.
pub async fn list(buckets: &Buckets) -> anyhow::Result<Listing> {
    let mut routes = BTreeMap::new();
    let mut unreadable = Vec::new();
    for key in keys(&buckets.routes).await? {
        let Some(job_type) = key.strip_prefix("route.") else {
            continue;
        };
        match current_entry(buckets, &key).await? {
            Some((revision, Some(doc))) => {
                routes.insert(job_type.to_owned(), (revision, doc));
            }
            Some((revision, None)) => unreadable.push((job_type.to_owned(), revision)),
            None => {}
        }
    }
    let mut replicas = Vec::new();
    for key in keys(&buckets.replicas).await? {
        if let Some(value) = buckets.replicas.get(&key).await?
            && let Ok(status) = serde_json::from_slice::<ReplicaStatus>(&value)
        {
            replicas.push(status);
        }
    }
    replicas.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(Listing {
        routes,
        unreadable,
        replicas,
    })
}
