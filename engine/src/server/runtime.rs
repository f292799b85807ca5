//! The micro-batch server: compiles pipeline files, recovers each pipeline's sink, starts its
//! source and batch loop, and serves the HTTP listener (management endpoints plus connector
//! routes). Shutdown stops intake, lets every pipeline flush and commit, then returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::prelude::SessionContext;
use sluice_sql::{PipelineText, Program};
use tokio::sync::{mpsc, watch};
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
use crate::server::auth::Auth;
use crate::server::edge::{self, EdgeLimits, Tls};
use crate::server::registry::Registry;
use crate::server::telemetry;
use crate::source::{Health, SourceContext};

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

/// Compiles `files`, recovers and starts every pipeline, and serves HTTP.
pub async fn start(files: &[PipelineText], registry: &Registry, config: ServerConfig) -> Result<Server> {
    let listen = config.listen;
    let server_budget = ServerBudget::new(config.max_buffer_bytes);
    let metrics = telemetry::prometheus();
    let (ctx, program) = compile(files, registry).await?;
    if program.pipelines.is_empty() {
        return Err(EngineError::config(
            "the pipeline files define no pipeline",
            Some("add an INSERT INTO <sink> SELECT ... FROM <source> statement".to_string()),
        ));
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown = Arc::new(shutdown_tx);
    let ready = Arc::new(AtomicBool::new(false));
    let mut statuses: Vec<StatusHandle> = Vec::new();
    let mut healths: Vec<Health> = Vec::new();
    let mut tasks = JoinSet::new();
    let mut started = Vec::new();

    for def in &program.pipelines {
        let (source_def, sink_def) = match (program.sources.get(&def.source), program.sinks.get(&def.name)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(EngineError::Internal(format!(
                    "pipeline {} lost its source or sink",
                    def.name
                )));
            }
        };
        let status: StatusHandle = Arc::new(std::sync::Mutex::new(PipelineStatus {
            name: def.name.clone(),
            source: def.source.clone(),
            sink_location: sink_def.location.clone(),
            ..Default::default()
        }));
        statuses.push(status.clone());

        let sink_factory = registry
            .sink(&sink_def.connector)
            .ok_or_else(|| EngineError::Internal(format!("no sink factory for {}", sink_def.connector)))?;
        let source_factory = registry
            .source(&source_def.connector)
            .ok_or_else(|| EngineError::Internal(format!("no source factory for {}", source_def.connector)))?;
        let sink = sink_factory.create(sink_def)?;
        // One writer per pipeline instance and sink, checked before recovery touches anything.
        let writer = writer_name(&def.name, config.instance.as_deref());
        let lease = WriterLease::acquire(sink.table(), &writer).await?;
        let log = CommitLog::new(sink.table().clone(), &writer).with_fence(lease.fence());
        let recovered = log.recover().await?;
        // A repair killed after its entry was written: its files move into place before the
        // stream goes on (plain readers would see both versions of a partition meanwhile).
        crate::batch::reconcile::finish_interrupted_maintenance(sink.table()).await?;
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
        // A windowed pipeline runs its part below the aggregate per micro-batch.
        let plan = match &def.window {
            Some(w) => BatchPlan::bind(&ctx, &w.input, &def.source, source_def.schema.clone())?,
            None => BatchPlan::new(&ctx, def, source_def.schema.clone())?,
        };
        let windowed = match &def.window {
            Some(w) => Some(Windowed {
                def: w.clone(),
                output: BatchPlan::bind(&ctx, &w.output, sluice_sql::WINDOW_TABLE, w.emitted.clone())?,
            }),
            None => None,
        };
        let state = match &source_def.event_time {
            Some(et) => {
                let event_time = EventTime::new(et.clone(), &source_def.schema)?;
                let mut st = StreamState::new(event_time, None);
                let last = recovered.last.as_ref().and_then(|e| e.state.as_ref());
                st.restore(&log, last, || windowed.as_ref().map(|w| w.state()).transpose())
                    .await?;
                // Best effort: what a crash left is only garbage, swept again at the next start.
                let swept = st.sweep(&log).await.unwrap_or_else(|e| {
                    tracing::warn!(pipeline = %def.name, error = %e, "state files not swept");
                    0
                });
                if let Some(s) = last {
                    update(&status, |status| {
                        status.watermark = s.watermark.clone();
                        status.state_bytes = s.state_bytes;
                        status.open_windows = s.windows.len() as u64;
                    });
                }
                tracing::info!(pipeline = %def.name, watermark = ?last.and_then(|s| s.watermark.clone()), swept, "event-time state restored");
                Some(st)
            }
            None => None,
        };
        let policy = BatchPolicy::from_options(&source_def.options)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let schema = TableSchema::of(&sink.stored_schema(), &sink_def.partition_by);
        let buffer = BufferPolicy::from_options(&source_def.options)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let budget = Budget::new(&def.name, buffer, server_budget.clone());
        let (committed_tx, committed_rx) = watch::channel(positions.get(&def.source).cloned());
        let (tx, rx) = mpsc::channel(CHUNK_CHANNEL_CAPACITY);
        let health = Health::default();
        healths.push(health.clone());
        let source = source_factory.create(source_def, &def.name)?;
        source.check_start(&def.name, positions.get(&def.source))?;
        let lag = status.lock().map(|s| s.source_lag.clone()).unwrap_or_default();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        started.push(started_rx);
        let sctx = SourceContext {
            pipeline: def.name.clone(),
            source: def.source.clone(),
            start: positions.get(&def.source).cloned(),
            tx,
            shutdown: shutdown_rx.clone(),
            started: Some(started_tx),
            budget: budget.clone(),
            committed: committed_rx,
            health: health.clone(),
            log_positions: crate::source::LogPositions::new(log.clone(), &def.source),
            lag,
        };
        let source_status = status.clone();
        let source_name = def.name.clone();
        let source_health = health.clone();
        let source_task = tokio::spawn(async move {
            let result = source.run(sctx).await;
            if let Err(e) = &result {
                tracing::error!(pipeline = %source_name, error = %e, "source stopped with an error");
                source_health.fail(format!("the source stopped: {e}"));
                update(&source_status, |s| {
                    s.state = PipelineState::Failed;
                    s.last_error = Some(e.to_string());
                });
            }
            result
        });
        let mut quality =
            crate::quality::Quality::new(&ctx, &program.expectations, &def.source, &def.name, &sink_def.options)
                .await?;
        if quality.profile {
            // The drift baselines and open anomaly episodes, from the newest commits.
            let epochs = log.epochs().await?;
            let mut recent = Vec::new();
            for &epoch in epochs
                .iter()
                .rev()
                .take(crate::quality::drift::MAX_BASELINE_BATCHES)
                .rev()
            {
                let entry = log.read(epoch).await?;
                if entry.pipeline == def.name {
                    recent.push(entry);
                }
            }
            quality.drift.restore(&recent);
        }
        let task = PipelineTask {
            name: def.name.clone(),
            source: def.source.clone(),
            plan,
            sink,
            log,
            instance: config.instance.clone(),
            policy,
            next_epoch: recovered.next_epoch(),
            positions,
            schema,
            status,
            budget,
            committed: committed_tx,
            shutdown: shutdown_rx.clone(),
            retry: crate::retry::RetryPolicy::default(),
            health,
            quality,
            archive: crate::batch::archive::enabled(&sink_def.options)?,
            state,
            windowed,
        };
        let name = def.name.clone();
        // A pipeline whose source failed ends with the source's error (the pipeline itself
        // commits what it had first), so the server never exits 0 after a source error.
        tasks.spawn(async move {
            let result = match task.run(rx).await {
                Ok(()) => match source_task.await {
                    Ok(r) => r,
                    Err(e) => Err(EngineError::Internal(format!("source task panicked: {e}"))),
                },
                Err(e) => Err(e),
            };
            // The pipeline writes no more: its lease goes now (on an object store, before
            // the process exits, so a restart need not wait it out).
            lease.release().await;
            (name, result)
        });
    }

    let mut app = api::router(ApiState {
        statuses: Arc::new(statuses),
        healths: Arc::new(healths),
        stopping: shutdown_rx.clone(),
        ready: ready.clone(),
        metrics,
        auth: config.auth.clone(),
    });
    for f in registry.sources() {
        if let Some(r) = f.routes() {
            app = app.merge(r);
        }
    }
    let app = app.layer(axum::Extension(config.auth.clone()));
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
        shutdown_rx.clone(),
    ));
    for s in started {
        // A source that failed to start drops its sender; its error is in the pipeline status.
        let _ = s.await;
    }
    ready.store(true, Ordering::Release);
    tracing::info!(%addr, pipelines = program.pipelines.len(), "sluice is running");
    Ok(Server {
        addr,
        shutdown,
        tasks,
        http,
    })
}
