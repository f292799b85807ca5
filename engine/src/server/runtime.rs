//! The micro-batch server: compiles pipeline files, binds the HTTP listener (management
//! endpoints plus connector routes) at once, then brings every pipeline up concurrently — take
//! its writer lease, recover its sink, start its source and batch loop. `/healthz` answers from
//! the bind; `/readyz` answers 503 naming each pipeline not up yet (waiting for its lease, and
//! for how long) until [`Server::ready`]. Shutdown stops intake, lets every pipeline flush and
//! commit, then returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::prelude::SessionContext;
use sluice_sql::{PipelineText, Program};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::budget::{Budget, BufferPolicy, DEFAULT_SERVER_BUDGET, ServerBudget};
use crate::error::{EngineError, Result};
use crate::event_time::EventTime;
use crate::event_time::state::StreamState;
use crate::log::commit::{CommitLog, TableSchema, writer_name};
use crate::store::lease::WriterLease;
use crate::pipeline::batcher::BatchPolicy;
use crate::plan::BatchPlan;
use crate::pipeline::task::Windowed;
use crate::pipeline::{PipelineState, PipelineStatus, PipelineTask, StatusHandle, update};
use crate::server::api::{self, ApiState};
use crate::connector::auth::Auth;
use crate::server::edge::{self, EdgeLimits, Tls};
use crate::connector::registry::Registry;
use crate::server::telemetry;
use crate::connector::source::{Health, SourceContext};

/// Chunks a pipeline's channel holds; memory is bounded by the byte budget, this only bounds
/// the count of tiny chunks.
pub const CHUNK_CHANNEL_CAPACITY: usize = 4096;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The HTTP listener's address (port 0 picks one).
    pub listen: SocketAddr,
    /// Bytes all pipelines together may buffer.
    pub max_buffer_bytes: u64,
    /// This server's name among several running the same pipelines (Kafka consumer groups):
    /// each pipeline then writes as `<pipeline>.<instance>` ([`writer_name`]). Stable across
    /// restarts of the same server; `None` for a single server.
    pub instance: Option<String>,
    /// Connection and header limits of the listener.
    pub limits: EdgeLimits,
    /// Serve HTTPS with this configuration (plain HTTP when `None`).
    pub tls: Option<Arc<Tls>>,
    /// The token file's tokens (management endpoints need `admin` when it is configured).
    pub auth: Arc<Auth>,
}

impl ServerConfig {
    /// Defaults for a listener address.
    pub fn new(listen: SocketAddr) -> Self {
        ServerConfig {
            listen,
            max_buffer_bytes: DEFAULT_SERVER_BUDGET,
            instance: None,
            limits: EdgeLimits::default(),
            tls: None,
            auth: Auth::none(),
        }
    }
}

/// Compiles pipeline files against the registry's connectors.
pub async fn compile(files: &[PipelineText], registry: &Registry) -> Result<(SessionContext, Program)> {
    let ctx = sluice_sql::session();
    let program = sluice_sql::compile(&ctx, &registry.catalog(), files).await?;
    Ok((ctx, program))
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shutdown: Arc<watch::Sender<bool>>,
    tasks: JoinSet<(String, Result<()>)>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    /// One per pipeline: resolved once it is up (or failed to come up).
    up: Vec<oneshot::Receiver<Result<()>>>,
    ready: Arc<AtomicBool>,
}

/// Asks a running server to stop (cloneable, for signal handlers).
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<watch::Sender<bool>>);

impl ShutdownTrigger {
    /// Starts the drain: stop intake, flush, commit, exit.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Server {
    /// The address the listener is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that stops the server.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(self.shutdown.clone())
    }

    /// Waits until every pipeline is up (its lease taken, its sink recovered, its source
    /// taking input); `/readyz` then answers 200. The first pipeline that failed to come up
    /// is the error (the server should then be stopped). Returns early, `Ok`, when the server
    /// is stopping.
    pub async fn ready(&mut self) -> Result<()> {
        let stopping = self.shutdown.subscribe();
        // All at once: the first pipeline that fails to come up is the answer.
        let ups = std::mem::take(&mut self.up).into_iter().map(|up| {
            let stopping = stopping.clone();
            async move {
                match up.await {
                    Ok(r) => r,
                    // It ended before it was up without saying why: a shutdown, or a panic.
                    Err(_) if *stopping.borrow() => Ok(()),
                    Err(_) => Err(EngineError::Internal("a pipeline's task ended before it was up".into())),
                }
            }
        });
        futures::future::try_join_all(ups).await?;
        self.ready.store(true, Ordering::Release);
        tracing::info!(addr = %self.addr, pipelines = self.tasks.len(), "sluice is running");
        Ok(())
    }

    /// Waits until every pipeline has drained and the listener has closed. Returns the first
    /// pipeline error, if any (the others are logged).
    pub async fn wait(mut self) -> Result<()> {
        let mut first: Option<EngineError> = None;
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => {
                    tracing::error!(pipeline = %name, error = %e, "pipeline stopped with an error");
                    first.get_or_insert(e);
                }
                Err(e) => {
                    first.get_or_insert(EngineError::Internal(format!("pipeline task panicked: {e}")));
                }
            }
        }
        // Every pipeline is done: make sure the listener stops even if no signal came.
        let _ = self.shutdown.send(true);
        match self.http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first.get_or_insert(EngineError::io("serving HTTP")(e));
            }
            Err(e) => {
                first.get_or_insert(EngineError::Internal(format!("HTTP task panicked: {e}")));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Compiles `files`, binds the listener and serves HTTP, and brings every pipeline up in the
/// background (await [`Server::ready`]).
pub async fn start(files: &[PipelineText], registry: &Registry, config: ServerConfig) -> Result<Server> {
    let server_budget = ServerBudget::new(config.max_buffer_bytes);
    let metrics = telemetry::prometheus();
    let (ctx, program) = compile(files, registry).await?;
    if program.pipelines.is_empty() {
        return Err(EngineError::config(
            "the pipeline files define no pipeline",
            Some("add an INSERT INTO <sink> SELECT ... FROM <source> statement".to_string()),
        ));
    }
    let program = Arc::new(program);
    let prepared = program
        .pipelines
        .iter()
        .map(|def| prepare(&program, def, registry, &config, &server_budget))
        .collect::<Result<Vec<_>>>()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown = Arc::new(shutdown_tx);
    let ready = Arc::new(AtomicBool::new(false));
    let (addr, http) = serve(
        registry,
        &config,
        ApiState {
            statuses: Arc::new(prepared.iter().map(|p| p.status.clone()).collect()),
            healths: Arc::new(prepared.iter().map(|p| p.health.clone()).collect()),
            stopping: shutdown_rx.clone(),
            ready: ready.clone(),
            metrics,
            auth: config.auth.clone(),
        },
        shutdown_rx.clone(),
    )
    .await?;
    tracing::info!(%addr, pipelines = prepared.len(), "listening; bringing pipelines up");
    let mut tasks = JoinSet::new();
    let mut up = Vec::new();
    let shared = Shared {
        ctx: ctx.clone(),
        program: program.clone(),
        instance: config.instance.clone(),
        shutdown: shutdown_rx.clone(),
        gates: Arc::default(),
    };
    for p in prepared {
        let (up_tx, up_rx) = oneshot::channel();
        up.push(up_rx);
        tasks.spawn(launch(p, shared.clone(), up_tx));
    }
    Ok(Server {
        addr,
        shutdown,
        tasks,
        http,
        up,
        ready,
    })
}

/// Binds the listener and serves the management endpoints and the connectors' routes.
async fn serve(
    registry: &Registry,
    config: &ServerConfig,
    api: ApiState,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let mut app = api::router(api);
    for f in registry.sources() {
        if let Some(r) = f.routes() {
            app = app.merge(r);
        }
    }
    let app = app.layer(axum::Extension(config.auth.clone()));
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(EngineError::io(format!("binding {listen}")))?;
    let addr = listener
        .local_addr()
        .map_err(EngineError::io("reading the bound address"))?;
    let http = tokio::spawn(edge::serve(
        listener,
        app,
        config.limits.clone(),
        config.tls.clone(),
        shutdown,
    ));
    Ok((addr, http))
}

/// What every pipeline's bring-up shares.
#[derive(Clone)]
struct Shared {
    ctx: SessionContext,
    program: Arc<Program>,
    instance: Option<String>,
    shutdown: watch::Receiver<bool>,
    /// One lock per sink location, for the steps of bring-up one table takes one at a time.
    gates: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Shared {
    /// The lock of the table at `location`.
    fn table_gate(&self, location: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.entry(location.to_string()).or_default().clone()
    }
}

/// A pipeline checked and built before the listener binds (no I/O on its sink): a bad
/// definition, a source that cannot be shared under `--instance`, or an ingest log another
/// process holds stops the server before it serves anything.
struct Prepared {
    def: sluice_sql::PipelineDef,
    source_def: sluice_sql::SourceDef,
    sink_def: sluice_sql::SinkDef,
    status: StatusHandle,
    health: Health,
    sink: Arc<dyn crate::connector::sink::Sink>,
    source: Box<dyn crate::connector::source::Source>,
    policy: BatchPolicy,
    budget: Arc<Budget>,
}

fn prepare(
    program: &Program,
    def: &sluice_sql::PipelineDef,
    registry: &Registry,
    config: &ServerConfig,
    server_budget: &Arc<ServerBudget>,
) -> Result<Prepared> {
    let (source_def, sink_def) = match (program.sources.get(&def.source), program.sinks.get(&def.name)) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            return Err(EngineError::Internal(format!(
                "pipeline {} lost its source or sink",
                def.name
            )));
        }
    };
    let sink_factory = registry
        .sink(&sink_def.connector)
        .ok_or_else(|| EngineError::Internal(format!("no sink factory for {}", sink_def.connector)))?;
    let source_factory = registry
        .source(&source_def.connector)
        .ok_or_else(|| EngineError::Internal(format!("no source factory for {}", source_def.connector)))?;
    if let Some(instance) = &config.instance
        && !source_factory.shared_by_instances()
    {
        return Err(EngineError::config(
            format!(
                "--instance {instance}: pipeline {} reads {} source {}, which one server owns; under an instance name it would be a new writer with no position and read its input again",
                def.name, source_def.connector, def.source
            ),
            Some(
                "--instance (SLUICE_INSTANCE) is for sources several servers share (Kafka consumer groups): run this pipeline without it"
                    .to_string(),
            ),
        ));
    }
    let status: StatusHandle = Arc::new(std::sync::Mutex::new(PipelineStatus {
        name: def.name.clone(),
        source: def.source.clone(),
        sink_location: sink_def.location.clone(),
        ..Default::default()
    }));
    let policy =
        BatchPolicy::from_options(&source_def.options).map_err(|e| EngineError::config(e.message, None::<String>))?;
    let buffer =
        BufferPolicy::from_options(&source_def.options).map_err(|e| EngineError::config(e.message, None::<String>))?;
    Ok(Prepared {
        def: def.clone(),
        source_def: source_def.clone(),
        sink_def: sink_def.clone(),
        status,
        health: Health::default(),
        sink: sink_factory.create(sink_def)?,
        source: source_factory.create(source_def, &def.name)?,
        policy,
        budget: Budget::new(&def.name, buffer, server_budget.clone()),
    })
}

/// Brings one pipeline up — takes its lease, recovers its sink, starts its source — then runs
/// it until shutdown. `up` is resolved once it takes input (or with the error that stopped it
/// first); a shutdown while it waits for its lease ends it at once.
async fn launch(p: Prepared, shared: Shared, up: oneshot::Sender<Result<()>>) -> (String, Result<()>) {
    let name = p.def.name.clone();
    let status = p.status.clone();
    let writer = writer_name(&name, shared.instance.as_deref());
    update(&status, |s| {
        s.state = PipelineState::WaitingForLease;
        s.waiting_since = Some(std::time::Instant::now());
    });
    let mut stop = shared.shutdown.clone();
    // One writer per pipeline instance and sink, checked before recovery touches anything.
    let lease = tokio::select! {
        lease = WriterLease::acquire(p.sink.table(), &writer) => lease,
        _ = stop.wait_for(|s| *s) => {
            update(&status, |s| s.state = PipelineState::Stopped);
            return (name, Ok(()));
        }
    };
    update(&status, |s| {
        s.state = PipelineState::Starting;
        s.waiting_since = None;
    });
    let result = match lease {
        Ok(lease) => {
            let fence = lease.fence();
            let result = bring_up(p, &shared, &writer, fence, up).await;
            // The pipeline writes no more: its lease goes now (on an object store, before
            // the process exits, so a restart need not wait it out).
            lease.release().await;
            result
        }
        Err(e) => Err(came_down(&name, e, up)),
    };
    if let Err(e) = &result {
        update(&status, |s| {
            if !matches!(s.state, PipelineState::Failed) {
                s.state = PipelineState::Failed;
                s.last_error = Some(e.to_string());
            }
        });
    }
    (name, result)
}

/// Recovers the sink, starts the source and runs the batch loop (the part of [`launch`] under
/// the lease). A failure before the source takes input resolves `up` with it.
async fn bring_up(
    p: Prepared,
    shared: &Shared,
    writer: &str,
    fence: crate::store::lease::Fence,
    up: oneshot::Sender<Result<()>>,
) -> Result<()> {
    let (task, rx, source_task, started) = match build(p, shared, writer, fence).await {
        Ok(built) => built,
        Err(e) => return Err(came_down(writer, e, up)),
    };
    // The batch loop runs in this future (so it ends, and stops writing, with the lease's
    // owner); it is up once its source takes input. A source that failed to start drops its
    // sender: its error is in the pipeline's status and health (`/readyz`), and the server
    // goes on with its other pipelines.
    let mut run = std::pin::pin!(task.run(rx));
    let ran = tokio::select! {
        r = &mut run => Some(r),
        _ = started => None,
    };
    let _ = up.send(Ok(()));
    let ran = match ran {
        Some(r) => r,
        None => run.await,
    };
    // A pipeline whose source failed ends with the source's error (the pipeline itself
    // commits what it had first), so the server never exits 0 after a source error.
    match ran {
        Ok(()) => match source_task.await {
            Ok(r) => r,
            Err(e) => Err(EngineError::Internal(format!("source task panicked: {e}"))),
        },
        Err(e) => Err(e),
    }
}

/// Hands `e` (the error that kept a pipeline from coming up) to [`Server::ready`], and returns
/// its text as the pipeline's own result.
fn came_down(name: &str, e: EngineError, up: oneshot::Sender<Result<()>>) -> EngineError {
    let message = e.to_string();
    let _ = up.send(Err(e));
    EngineError::NotUp {
        pipeline: name.to_string(),
        message,
    }
}

/// What [`build`] starts: the batch loop (not yet running), its input, the source's task and
/// the signal that the source takes input.
type Built = (
    PipelineTask,
    mpsc::Receiver<crate::connector::source::Message>,
    tokio::task::JoinHandle<Result<()>>,
    oneshot::Receiver<()>,
);

/// Recovers the sink table, restores event-time state and quality baselines, and spawns the
/// source from the recovered positions.
async fn build(p: Prepared, shared: &Shared, writer: &str, fence: crate::store::lease::Fence) -> Result<Built> {
    let Prepared {
        def,
        source_def,
        sink_def,
        status,
        health,
        sink,
        source,
        policy,
        budget,
    } = p;
    let log = CommitLog::new(sink.table().clone(), writer).with_fence(fence);
    let recovered = log.recover().await?;
    // A repair killed after its entry was written: its files move into place before the
    // stream goes on (plain readers would see both versions of a partition meanwhile).
    // Pipelines writing one table finish it one at a time (only one can hold the maintenance
    // lease; the others would go on before the moves are done).
    {
        let gate = shared.table_gate(&sink.table().location);
        let _one_at_a_time = gate.lock().await;
        crate::batch::reconcile::finish_interrupted_maintenance(sink.table()).await?;
    }
    if recovered.orphans_removed + recovered.moves_completed > 0 {
        tracing::info!(pipeline = %def.name, orphans = recovered.orphans_removed, finished = recovered.moves_completed, "recovered sink table");
    }
    let positions = recovered.last.as_ref().map(|e| e.sources.clone()).unwrap_or_default();
    if let Some(last) = &recovered.last {
        update(&status, |s| {
            s.last_epoch = Some(last.epoch);
            s.last_commit_at = Some(last.committed_at.clone());
        });
    }
    let ctx = &shared.ctx;
    // A windowed pipeline runs its part below the aggregate per micro-batch.
    let plan = match &def.window {
        Some(w) => BatchPlan::bind(ctx, &w.input, &def.source, source_def.schema.clone())?,
        None => BatchPlan::new(ctx, &def, source_def.schema.clone())?,
    };
    let windowed = match &def.window {
        Some(w) => Some(Windowed {
            def: w.clone(),
            output: BatchPlan::bind(ctx, &w.output, sluice_sql::WINDOW_TABLE, w.emitted.clone())?,
        }),
        None => None,
    };
    let state = restore_state(&def.name, &source_def, &log, &recovered, windowed.as_ref(), &status).await?;
    let schema = TableSchema::of(&sink.stored_schema(), &sink_def.partition_by);
    let (committed_tx, committed_rx) = watch::channel(positions.get(&def.source).cloned());
    let (tx, rx) = mpsc::channel(CHUNK_CHANNEL_CAPACITY);
    source.check_start(&def.name, positions.get(&def.source))?;
    let lag = status.lock().map(|s| s.source_lag.clone()).unwrap_or_default();
    let (started_tx, started_rx) = oneshot::channel();
    let sctx = SourceContext {
        pipeline: def.name.clone(),
        source: def.source.clone(),
        start: positions.get(&def.source).cloned(),
        tx,
        shutdown: shared.shutdown.clone(),
        started: Some(started_tx),
        budget: budget.clone(),
        committed: committed_rx,
        health: health.clone(),
        log_positions: crate::connector::source::LogPositions::new(log.clone(), &def.source),
        lag,
    };
    let mut quality =
        crate::quality::Quality::new(ctx, &shared.program.expectations, &def.source, &def.name, &sink_def.options)
            .await?;
    if quality.profile {
        // The drift baselines and open anomaly episodes, from the newest commits.
        let recent = log
            .recent_entries(crate::quality::drift::MAX_BASELINE_BATCHES)
            .await?
            .into_iter()
            .filter(|e| e.pipeline == def.name)
            .collect::<Vec<_>>();
        quality.drift.restore(&recent);
    }
    let source_task = spawn_source(source, sctx, status.clone(), health.clone(), def.name.clone());
    let task = PipelineTask {
        name: def.name.clone(),
        source: def.source.clone(),
        plan,
        sink: sink.clone(),
        log,
        instance: shared.instance.clone(),
        policy,
        next_epoch: recovered.next_epoch(),
        positions,
        schema,
        status,
        budget,
        committed: committed_tx,
        shutdown: shared.shutdown.clone(),
        retry: crate::retry::RetryPolicy::default(),
        health,
        quality,
        archive: crate::batch::archive::enabled(&sink_def.options)?,
        state,
        windowed,
    };
    Ok((task, rx, source_task, started_rx))
}

/// Restores a pipeline's event-time state (watermark, open windows, dedup keys) from its newest
/// commit, when its source has event time.
async fn restore_state(
    name: &str,
    source_def: &sluice_sql::SourceDef,
    log: &CommitLog,
    recovered: &crate::log::commit::Recovered,
    windowed: Option<&Windowed>,
    status: &StatusHandle,
) -> Result<Option<StreamState>> {
    let Some(et) = &source_def.event_time else {
        return Ok(None);
    };
    let event_time = EventTime::new(et.clone(), &source_def.schema)?;
    let mut st = StreamState::new(event_time, None);
    let last = recovered.last.as_ref().and_then(|e| e.state.as_ref());
    st.restore(log, last, || windowed.map(|w| w.state()).transpose()).await?;
    // Best effort: what a crash left is only garbage, swept again at the next start.
    let swept = st.sweep(log).await.unwrap_or_else(|e| {
        tracing::warn!(pipeline = %name, error = %e, "state files not swept");
        0
    });
    if let Some(s) = last {
        update(status, |status| {
            status.watermark = s.watermark.clone();
            status.state_bytes = s.state_bytes;
            status.open_windows = s.windows.len() as u64;
        });
    }
    tracing::info!(pipeline = %name, watermark = ?last.and_then(|s| s.watermark.clone()), swept, "event-time state restored");
    Ok(Some(st))
}

/// Runs a source; its error fails the pipeline's health and status (intake answers 503).
fn spawn_source(
    source: Box<dyn crate::connector::source::Source>,
    sctx: SourceContext,
    status: StatusHandle,
    health: Health,
    name: String,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let result = source.run(sctx).await;
        if let Err(e) = &result {
            tracing::error!(pipeline = %name, error = %e, "source stopped with an error");
            health.fail(format!("the source stopped: {e}"));
            update(&status, |s| {
                s.state = PipelineState::Failed;
                s.last_error = Some(e.to_string());
            });
        }
        result
    })
}
