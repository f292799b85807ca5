//! Apache Ballista in the `sluice` binary (cargo feature `cluster`): `sluice scheduler` and
//! `sluice executor` run Ballista's own scheduler and executor, built against the same
//! DataFusion as Sluice (stock Ballista binaries of another DataFusion release could not
//! decode Sluice's plans), and [`remote_context`] connects `sluice reconcile --cluster` to one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use ballista::prelude::SessionContextExt;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::prelude::SessionContext;

/// Runs a Ballista scheduler on `bind` until the process is stopped.
pub async fn scheduler(bind: SocketAddr) -> Result<()> {
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        bind_port: bind.port(),
        external_host: bind.ip().to_string(),
        ..Default::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .context("starting the Ballista cluster state")?;
    println!("sluice scheduler listening on {bind}");
    start_server(cluster, bind, Arc::new(config))
        .await
        .context("running the Ballista scheduler")
}

/// Runs a Ballista executor that serves Arrow Flight on `bind`, its gRPC service on
/// `grpc_port`, and registers with the scheduler at `scheduler`.
pub async fn executor(scheduler: SocketAddr, bind: SocketAddr, grpc_port: u16, work_dir: PathBuf) -> Result<()> {
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let config = ExecutorProcessConfig {
        bind_host: bind.ip().to_string(),
        external_host: Some(bind.ip().to_string()),
        port: bind.port(),
        grpc_port,
        scheduler_host: scheduler.ip().to_string(),
        scheduler_port: scheduler.port(),
        scheduler_connect_timeout_seconds: 30,
        work_dir: Some(work_dir.display().to_string()),
        executor_heartbeat_interval_seconds: 5,
        ..Default::default()
    };
    println!("sluice executor serving on {bind}, scheduler {scheduler}");
    start_executor_process(Arc::new(config))
        .await
        .context("running the Ballista executor")
}

/// A session whose queries run on the Ballista cluster at `url` (`df://HOST:PORT`).
pub async fn remote_context(url: &str) -> Result<SessionContext> {
    SessionContext::remote(url)
        .await
        .with_context(|| format!("connecting to the Ballista scheduler at {url}"))
}
