//! Sandbox: runs one job's plugin, a WebAssembly component of the `frame-processor` world.
//!
//! A [`Sandbox`] owns the wasmtime engine that every job shares: its pooling allocator (sized
//! from [`SandboxConfig`]), and a thread that ticks the engine's epoch so that calls can be
//! interrupted. A [`Plugin`] is a component compiled once per content digest and linked
//! ahead of time; a [`Processor`] is one job's instance of it, in a `Store` of its own that is
//! dropped, with every byte the plugin allocated, when the job ends.
//!
//! What a plugin can reach: the two host functions of the WIT `host` interface, a clock and
//! random numbers. It gets no preopened directories, no environment, no arguments and no
//! network (every socket address is refused and name lookup is off). Its stdout and stderr
//! become log lines tagged with the job id, within a byte budget.
//!
//! Bounds per job: linear memory ([`PluginLimits::memory_bytes`], trapping on growth past
//! it), a wall-clock deadline per call ([`PluginLimits::call_deadline`], checked on every
//! epoch tick, during which the call also yields so it never starves other jobs), a wasm
//! stack size, results per call and bytes per result, and log bytes per job.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, PoolingAllocationConfig, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::decode;
use crate::metrics::GaugeShare;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "frame-processor",
    exports: { default: async },
});

use self::framehost::plugin::host::LogLevel;
use self::framehost::plugin::types as wit;

/// How often the engine's epoch advances; the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Longest plugin output line kept; the rest of the line is cut.
const MAX_LOG_LINE_BYTES: usize = 4 * 1024;
/// Longest content type accepted from `emit`.
const MAX_CONTENT_TYPE_BYTES: usize = 256;

/// Engine-wide settings, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Plugin instances that can be live at once: the pooling allocator's slot count. Size it
    /// to `max_jobs` plus headroom for re-instantiation. Defaults to 16.
    pub max_instances: u32,
    /// The largest linear memory any job type may be given, in bytes: each pool slot
    /// reserves this much address space (not resident memory). Defaults to 256 MiB.
    pub max_memory_bytes: u64,
    /// Wasm stack per call; a deeper recursion traps as a stack overflow. Defaults to 1 MiB.
    pub max_wasm_stack_bytes: usize,
    /// Results a plugin may emit per call; more are dropped and counted. Defaults to 64.
    pub max_results_per_call: usize,
    /// Largest single result, in bytes; larger ones are dropped and counted. Defaults to 1 MiB.
    pub max_result_bytes: usize,
    /// Plugin output (stdout, stderr, `log`) logged per job, in bytes; the rest is dropped
    /// and counted. Defaults to 1 MiB.
    pub max_log_bytes_per_job: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            max_instances: 16,
            max_memory_bytes: 256 << 20,
            max_wasm_stack_bytes: 1 << 20,
            max_results_per_call: 64,
            max_result_bytes: 1 << 20,
            max_log_bytes_per_job: 1 << 20,
        }
    }
}

/// Limits for one job's instance, set per job type.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// Linear memory the plugin may grow to, in bytes. Defaults to 64 MiB; capped by
    /// [`SandboxConfig::max_memory_bytes`].
    pub memory_bytes: u64,
    /// Wall-clock time one call (`init`, `process` or `finish`) may take. Defaults to 5 s.
    pub call_deadline: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_deadline: Duration::from_secs(5),
        }
    }
}

/// What the job knows about itself, as the plugin sees it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub job_id: String,
    pub job_type: String,
    pub room: String,
    pub config_json: String,
}

/// One result a plugin emitted.
#[derive(Debug, Clone)]
pub struct PluginResult {
    pub content_type: String,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "cannot compile: not a valid WebAssembly component (truncated, corrupt, or using features this host does not enable): {0:#}"
    )]
    Compile(wasmtime::Error),
    #[error("component does not fit the frame-processor world: {0:#}")]
    World(wasmtime::Error),
    #[error("cannot read plugin {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

/// A failed plugin call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin returned an error value: the frame (or init, or finish) failed, the
    /// instance is still usable.
    #[error("plugin returned an error: {0}")]
    Returned(String),
    #[error("plugin exceeded its memory limit of {limit} bytes (asked for {requested})")]
    OutOfMemory { limit: u64, requested: u64 },
    #[error("plugin call overran its deadline of {0:?}")]
    Deadline(Duration),
    #[error("plugin panicked: {0}")]
    Panic(String),
    #[error("plugin overflowed its stack")]
    StackOverflow,
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin instance could not be created: {0}")]
    Instantiate(String),
}

impl CallError {
    /// Whether the instance is unusable after this error (a trap), as opposed to an error
    /// value the plugin returned.
    pub fn is_trap(&self) -> bool {
        !matches!(self, Self::Returned(_))
    }

    /// Short label for counters and failure reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Returned(_) => "plugin_error",
            Self::OutOfMemory { .. } => "plugin_out_of_memory",
            Self::Deadline(_) => "plugin_deadline",
            Self::Panic(_) => "plugin_panic",
            Self::StackOverflow => "plugin_stack_overflow",
            Self::Trap(_) => "plugin_trap",
            Self::Instantiate(_) => "plugin_instantiate",
        }
    }
}

/// The shared engine. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<PluginState>>,
    config: Arc<SandboxConfig>,
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> anyhow::Result<Self> {
        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack_bytes)
            .async_stack_size(config.max_wasm_stack_bytes + (512 << 10))
            // A bounded reservation instead of 4 GiB per memory: explicit bounds checks cost a
            // little speed, and buy a pool whose address space is proportional to its limits.
            .memory_reservation(config.max_memory_bytes)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .memory_may_move(false);

        let slots = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            // Components made by the Rust toolchain hold a handful of core instances (the
            // program and adapter shims), one or two memories and a few tables.
            .max_core_instances_per_component(32)
            .total_core_instances(slots * 32)
            .max_memories_per_component(4)
            .total_memories(slots * 2)
            .max_tables_per_component(8)
            .total_tables(slots * 8)
            .total_stacks(slots)
            .max_memory_size(config.max_memory_bytes as usize)
            // Freed slots give their pages back to the kernel: a finished job leaves no RSS.
            .linear_memory_keep_resident(0)
            .table_keep_resident(0);
        wasm.allocation_strategy(pool);

        let engine = Engine::new(&wasm)?;
        spawn_epoch_ticker(&engine);

        let mut linker = Linker::<PluginState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        FrameProcessor::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)?;

        Ok(Self {
            engine,
            linker: Arc::new(linker),
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component (seconds for a large plugin) and checks it against the world.
    /// Load a version once, then instantiate it per job.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<Plugin, LoadError> {
        let component = self.compile(bytes)?;
        self.link(name, &digest_of(bytes), bytes.len(), &component)
    }

    /// Compiles a component's bytes to machine code for this engine.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        Component::from_binary(&self.engine, bytes).map_err(LoadError::Compile)
    }

    /// Loads machine code [`Component::serialize`] produced for an engine with this one's
    /// settings; code for another engine or wasmtime version is refused with an error.
    ///
    /// # Safety
    ///
    /// `code` must be bytes `Component::serialize` wrote, unchanged: wasmtime runs them as
    /// machine code, so anything else is arbitrary code execution.
    pub unsafe fn deserialize(&self, code: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: forwarded to the caller.
        unsafe { Component::deserialize(&self.engine, code) }
    }

    /// Checks a compiled component's imports against what the host provides and looks up
    /// the world's exports; the result is ready to instantiate.
    pub fn link(
        &self,
        name: &str,
        digest: &str,
        size: usize,
        component: &Component,
    ) -> Result<Plugin, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(LoadError::World)?;
        let pre = FrameProcessorPre::new(pre).map_err(LoadError::World)?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: name.to_owned(),
                digest: digest.to_owned(),
                size,
                pre,
                sandbox: self.clone(),
            }),
        })
    }

    pub fn load_file(&self, path: &std::path::Path) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|error| LoadError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        self.load(name, &bytes)
    }
}

/// A compiled plugin version, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    name: String,
    digest: String,
    size: usize,
    pre: FrameProcessorPre<PluginState>,
    sandbox: Sandbox,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `sha256:<hex>` of the component's bytes.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// The compiled component, to serialize into a cache.
    pub fn component(&self) -> &Component {
        self.inner.pre.instance_pre().component()
    }

    /// A handle that does not keep the compiled code alive.
    pub fn downgrade(&self) -> WeakPlugin {
        WeakPlugin(Arc::downgrade(&self.inner))
    }

    /// Instantiates the plugin once without calling it, then drops the instance. This
    /// checks what linking cannot: the types of the exported functions (the bindings look
    /// them up with their types on instantiation), and that the component's start-up code
    /// runs within `limits`. Takes a pool slot for the moment.
    pub async fn trial(&self, limits: PluginLimits) -> Result<(), CallError> {
        let job = JobInfo {
            job_id: "trial".into(),
            job_type: String::new(),
            room: String::new(),
            config_json: "{}".into(),
        };
        let mut store = self.store(&job, limits);
        self.instantiate_in(&mut store).await.map(drop)
    }

    /// Creates the job's instance and calls its `init`.
    pub async fn instantiate(
        &self,
        job: &JobInfo,
        limits: PluginLimits,
    ) -> Result<Processor, CallError> {
        let mut store = self.store(job, limits);
        let bindings = self.instantiate_in(&mut store).await?;
        let mut processor = Processor {
            store,
            bindings,
            plugin: self.clone(),
        };
        let info = wit::JobInfo {
            job_id: job.job_id.clone(),
            job_type: job.job_type.clone(),
            room: job.room.clone(),
            config_json: job.config_json.clone(),
        };
        processor
            .call(|bindings, store| {
                Box::pin(async move {
                    bindings
                        .framehost_plugin_processor()
                        .call_init(store, &info)
                        .await
                })
            })
            .await?;
        Ok(processor)
    }

    /// A store for one instance: its WASI context (no files, network or environment), its
    /// output capture and its limits.
    fn store(&self, job: &JobInfo, limits: PluginLimits) -> Store<PluginState> {
        let sandbox = &self.inner.sandbox;
        let config = &sandbox.config;
        let memory_limit = limits.memory_bytes.min(config.max_memory_bytes);
        let job_id: Arc<str> = job.job_id.as_str().into();
        let output = Arc::new(Mutex::new(OutputState::new(config.max_log_bytes_per_job)));

        let mut wasi = WasiCtx::builder();
        let stream = |name| PluginOutput {
            job_id: job_id.clone(),
            stream: name,
            state: output.clone(),
        };
        wasi.stdout(stream("stdout"))
            .stderr(stream("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));

        // A trial instance (no job type) is not a running job's memory.
        let memory_gauge = if job.job_type.is_empty() {
            Default::default()
        } else {
            crate::metrics::metrics().plugin_memory(&job.job_type)
        };
        let state = PluginState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            job_id: job_id.clone(),
            output,
            memory_limit,
            memory_peak: 0,
            memory_bytes: 0,
            memory: GaugeShare::new(memory_gauge),
            memory_refused: None,
            call_started: Instant::now(),
            call_deadline: limits.call_deadline,
            deadline_hit: false,
            results: Vec::new(),
            results_dropped: 0,
            max_results_per_call: config.max_results_per_call,
            max_result_bytes: config.max_result_bytes,
        };
        let mut store = Store::new(&sandbox.engine, state);
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.call_started.elapsed() >= state.call_deadline {
                state.deadline_hit = true;
                return Err(wasmtime::Error::msg("call deadline exceeded"));
            }
            // Yield on every tick so that a busy plugin shares its worker thread.
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }

    /// Instantiates the component in `store`, under the store's call deadline.
    async fn instantiate_in(
        &self,
        store: &mut Store<PluginState>,
    ) -> Result<FrameProcessor, CallError> {
        store.data_mut().start_call();
        store.set_epoch_deadline(1);
        match self.inner.pre.instantiate_async(&mut *store).await {
            Ok(bindings) => Ok(bindings),
            Err(error) => Err(match classify(store.data(), error) {
                CallError::Trap(message) => CallError::Instantiate(message),
                other => other,
            }),
        }
    }
}

/// A [`Plugin`] that may have been dropped: see [`Plugin::downgrade`].
#[derive(Clone)]
pub struct WeakPlugin(std::sync::Weak<PluginInner>);

impl WeakPlugin {
    pub fn upgrade(&self) -> Option<Plugin> {
        self.0.upgrade().map(|inner| Plugin { inner })
    }
}

/// One job's live plugin instance. Dropping it frees the instance and all its memory.
pub struct Processor {
    store: Store<PluginState>,
    bindings: FrameProcessor,
    plugin: Plugin,
}

type CallFuture<'a, T> =
    Pin<Box<dyn Future<Output = wasmtime::Result<Result<T, String>>> + Send + 'a>>;

impl Processor {
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Hands one frame to the plugin. The frame's buffers move into the call; nothing is
    /// copied on the host side.
    pub async fn process(&mut self, frame: decode::Frame) -> Result<(), CallError> {
        let frame = to_wit(frame);
        self.call(|bindings, store| {
            Box::pin(async move {
                bindings
                    .framehost_plugin_processor()
                    .call_process(store, &frame)
                    .await
            })
        })
        .await
    }

    /// Ends the job's use of the plugin and returns its summary (JSON text).
    pub async fn finish(&mut self) -> Result<String, CallError> {
        self.call(|bindings, store| {
            Box::pin(async move {
                bindings
                    .framehost_plugin_processor()
                    .call_finish(store)
                    .await
            })
        })
        .await
    }

    /// Results emitted since the last call to this.
    pub fn take_results(&mut self) -> Vec<PluginResult> {
        std::mem::take(&mut self.store.data_mut().results)
    }

    /// Results refused (over the per-call count or size bound) so far in this instance.
    pub fn results_dropped(&self) -> u64 {
        self.store.data().results_dropped
    }

    /// Plugin output bytes dropped past the log budget so far.
    pub fn log_bytes_dropped(&self) -> u64 {
        self.store
            .data()
            .output
            .lock()
            .expect("output lock")
            .dropped_bytes
    }

    /// Largest linear memory the instance has grown to, in bytes.
    pub fn memory_peak(&self) -> u64 {
        self.store.data().memory_peak
    }

    async fn call<T>(
        &mut self,
        f: impl for<'a> FnOnce(&'a FrameProcessor, &'a mut Store<PluginState>) -> CallFuture<'a, T>,
    ) -> Result<T, CallError> {
        self.store.data_mut().start_call();
        self.store.set_epoch_deadline(1);
        let outcome = f(&self.bindings, &mut self.store).await;
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(CallError::Returned(message)),
            Err(error) => Err(classify(self.store.data(), error)),
        }
    }
}

/// Turns a trap into the reason an operator can act on.
fn classify(state: &PluginState, error: wasmtime::Error) -> CallError {
    if state.deadline_hit {
        return CallError::Deadline(state.call_deadline);
    }
    if let Some(requested) = state.memory_refused {
        return CallError::OutOfMemory {
            limit: state.memory_limit,
            requested,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => CallError::StackOverflow,
        Some(Trap::UnreachableCodeReached) => {
            // Rust plugins abort through `unreachable` after printing the panic: a line
            // "thread '..' panicked at FILE:LINE:COL:" and then the message itself, on the
            // lines up to the "note: run with `RUST_BACKTRACE=1`" hint.
            let output = state.output.lock().expect("output lock");
            let message = match output.recent.iter().rposition(|l| l.contains("panicked")) {
                Some(at) => output
                    .recent
                    .iter()
                    .skip(at)
                    .take_while(|line| !line.starts_with("note:"))
                    .map(|line| line.trim())
                    .collect::<Vec<_>>()
                    .join(" "),
                None => "unreachable code reached (no panic message)".to_owned(),
            };
            CallError::Panic(message)
        }
        // Rust (and C) plugins keep their call stack in linear memory, placed below the data:
        // overflowing it runs off the bottom of memory and traps here.
        Some(Trap::MemoryOutOfBounds) => CallError::Trap(
            "out of bounds memory access (a plugin overflowing its own stack traps this way)"
                .to_owned(),
        ),
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Trap(format!("{error:#}")),
    }
}

/// Everything a job's store holds.
struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    job_id: Arc<str>,
    output: Arc<Mutex<OutputState>>,
    memory_limit: u64,
    memory_peak: u64,
    /// Linear memory of all the instance's memories.
    memory_bytes: u64,
    /// This instance's part of `framehost_plugin_memory_bytes`, given back when the store
    /// is dropped.
    memory: GaugeShare,
    /// Set when a growth past the limit was refused: the size asked for.
    memory_refused: Option<u64>,
    call_started: Instant,
    call_deadline: Duration,
    deadline_hit: bool,
    results: Vec<PluginResult>,
    results_dropped: u64,
    max_results_per_call: usize,
    max_result_bytes: usize,
}

impl PluginState {
    fn start_call(&mut self) {
        self.call_started = Instant::now();
        self.deadline_hit = false;
        self.results.clear();
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for PluginState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.memory_limit {
            self.memory_refused = Some(desired);
            // An error traps the guest: a plugin that cannot get memory cannot go on, and a
            // trap names the cause where a refused `memory.grow` would surface as an abort.
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes exceeded",
                self.memory_limit
            )));
        }
        self.memory_peak = self.memory_peak.max(desired);
        // Called for every memory of the instance: for a new one with `current` 0. A
        // component may have several (its adapters' among them), so the instance's memory
        // is the sum of their growths.
        self.memory_bytes += desired.saturating_sub(current as u64);
        self.memory.set(self.memory_bytes);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl self::framehost::plugin::host::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        let job_id = &*self.job_id;
        let Some(message) = self.output.lock().expect("output lock").admit(message) else {
            return;
        };
        match level {
            LogLevel::Trace => tracing::trace!(target: "plugin", job_id, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "plugin", job_id, "{message}"),
            LogLevel::Info => tracing::info!(target: "plugin", job_id, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "plugin", job_id, "{message}"),
            LogLevel::Error => tracing::error!(target: "plugin", job_id, "{message}"),
        }
    }

    fn emit(&mut self, content_type: String, data: Vec<u8>) -> bool {
        if self.results.len() >= self.max_results_per_call
            || data.len() > self.max_result_bytes
            || content_type.len() > MAX_CONTENT_TYPE_BYTES
        {
            self.results_dropped += 1;
            return false;
        }
        self.results.push(PluginResult { content_type, data });
        true
    }
}

impl self::framehost::plugin::types::Host for PluginState {}

/// Captured plugin output, shared by its stdout and stderr streams.
struct OutputState {
    budget: usize,
    used: usize,
    dropped_bytes: u64,
    partial: Vec<u8>,
    /// The last few lines, to explain a trap (a panic message is printed before the abort).
    recent: std::collections::VecDeque<String>,
}

impl OutputState {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            dropped_bytes: 0,
            partial: Vec::new(),
            recent: Default::default(),
        }
    }

    /// Charges a line against the budget; `None` when it is spent.
    fn admit(&mut self, mut line: String) -> Option<String> {
        if line.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        if self.recent.len() == 8 {
            self.recent.pop_front();
        }
        self.recent.push_back(line.clone());
        if self.used + line.len() > self.budget {
            self.dropped_bytes += line.len() as u64;
            return None;
        }
        self.used += line.len();
        Some(line)
    }
}

/// One of the plugin's standard streams: whole lines become log events with the job id.
#[derive(Clone)]
struct PluginOutput {
    job_id: Arc<str>,
    stream: &'static str,
    state: Arc<Mutex<OutputState>>,
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for PluginOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut state = self.state.lock().expect("output lock");
        for &byte in buf {
            if byte == b'\n' {
                let line =
                    String::from_utf8_lossy(&std::mem::take(&mut state.partial)).into_owned();
                if let Some(line) = state.admit(line) {
                    // stderr is where a plugin reports trouble (a panic message, for one).
                    if self.stream == "stderr" {
                        tracing::warn!(target: "plugin", job_id = &*self.job_id, stream = self.stream, "{line}");
                    } else {
                        tracing::info!(target: "plugin", job_id = &*self.job_id, stream = self.stream, "{line}");
                    }
                }
            } else if state.partial.len() < MAX_LOG_LINE_BYTES {
                state.partial.push(byte);
            }
        }
        // Never block or fail the plugin's writes: output past the bounds is dropped.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn to_wit(frame: decode::Frame) -> wit::Frame {
    wit::Frame {
        index: frame.index,
        timestamp: frame.timestamp,
        received_ms: frame.received_ms,
        width: frame.width,
        height: frame.height,
        detections: frame
            .detections
            .into_iter()
            .map(|d| wit::Detection {
                label: d.label,
                confidence: d.confidence,
                bbox: wit::Bbox {
                    left: d.bbox.left,
                    top: d.bbox.top,
                    width: d.bbox.width,
                    height: d.bbox.height,
                },
                object_id: d.object_id,
            })
            .collect(),
        image: frame.image.map(|image| wit::Image {
            format: match image.format {
                decode::ImageFormat::Jpeg => wit::ImageFormat::Jpeg,
                decode::ImageFormat::Png => wit::ImageFormat::Png,
                decode::ImageFormat::Other => wit::ImageFormat::Other,
            },
            data: image.data,
        }),
        extra_json: frame.extra_json,
    }
}

/// Advances the engine's epoch every tick until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawn the epoch thread");
}

/// The content digest plugins are known by: `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + hash.len() * 2);
    out.push_str("sha256:");
    for b in hash {
        let _ = write!(out, "{b:02x}");
    }
    out
}
