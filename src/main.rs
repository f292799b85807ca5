//! The `sluice` command line: parses arguments and wires the connector registry into the
//! engine. No pipeline logic lives here.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use datafusion::execution::context::SQLOptions;
use sluice_engine::batch::{maintain, reconcile};
use sluice_engine::log::table::CommittedTable;
use sluice_engine::quality::report;
use sluice_engine::server::runtime::{self, ServerConfig};
use sluice_sql::PipelineText;

#[cfg(feature = "cluster")]
mod cluster;

/// Sluice: SQL-defined micro-batch pipelines on Arrow and DataFusion.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the micro-batch server for every pipeline in the files.
    Run {
        /// Pipeline files (*.sql).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Address of the HTTP listener (ingest, metrics, health). Port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: SocketAddr,
        /// Directory for local state (the HTTP sources' ingest logs). Default: `.sluice` beside
        /// the first pipeline file, whatever the working directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Start even when an HTTP source's ingest log is not the one its sink's commits came
        /// from (the original state directory is lost): the log is read from its beginning, and
        /// records the old log acknowledged but had not committed are lost.
        #[arg(long)]
        adopt_ingest_log: bool,
        /// Bytes all pipelines together may buffer before sources are pushed back, by priority.
        #[arg(long, default_value_t = sluice_engine::budget::DEFAULT_SERVER_BUDGET)]
        max_buffer_bytes: u64,
        /// This server's name when several servers run the same pipelines (one Kafka consumer
        /// group): letters, digits, '-' and '_', stable across its restarts. Each pipeline then
        /// writes to its sink as `<pipeline>.<instance>`.
        #[arg(long, env = "SLUICE_INSTANCE", value_parser = parse_instance)]
        instance: Option<String>,
        #[command(flatten)]
        security: SecurityArgs,
    },
    /// Bearer tokens for `--auth-tokens` files.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Parse, resolve and plan every statement without touching data; print each pipeline's plan.
    Validate {
        /// Pipeline files (*.sql).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check a sink table against its commit log: every committed file exists with its recorded
    /// size, and no uncommitted file sits where plain readers would read it. Exit 0 when all is
    /// well, 1 when something is wrong (each problem printed), 2 on error.
    Check {
        /// The sink's LOCATION.
        sink: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recompute a pipeline over a range of its raw archive, in batch, with the SQL and static
    /// tables as they are now; compare with what the stream committed, partition by partition.
    /// Exit 0 when equal, 1 when differences were found (with --repair: found and repaired),
    /// 2 on error. With a changed SQL file this is the backfill.
    Reconcile(ReconcileArgs),
    /// Merge each partition's small files into files of about the target size, one commit per
    /// partition; the rows are unchanged. Safe while `sluice run` writes the table.
    Compact {
        /// The sink's LOCATION.
        sink: String,
        /// The size merged files aim at (files this large or larger are left alone).
        #[arg(long, default_value = "128MB", value_parser = parse_size)]
        target_file_size: u64,
        /// Only this partition (KEY=VALUE, repeatable).
        #[arg(long = "partition", value_parser = parse_table_arg)]
        partition: Vec<(String, String)>,
    },
    /// Delete what no live commit needs: files removed by commits older than the retention,
    /// staging orphans of writers not running, and (with --archive-retention) old raw-archive
    /// files. Safe while `sluice run` writes the table.
    Vacuum {
        /// The sink's LOCATION.
        sink: String,
        /// Keep files removed by commits younger than this (e.g. 7d, 12h).
        #[arg(long, default_value = "7d", value_parser = parse_retention)]
        retention: std::time::Duration,
        /// Also delete raw-archive files of commits older than this (e.g. 30d, the sink's
        /// archive.retention); reconcile cannot recompute those commits afterwards.
        #[arg(long, value_parser = parse_retention)]
        archive_retention: Option<std::time::Duration>,
        /// Delete commit-log entries and checkpoints older than this and older than the newest
        /// checkpoint (which keeps what readers, recovery and reconcile need of them).
        #[arg(long, default_value = "30d", value_parser = parse_retention)]
        log_retention: std::time::Duration,
    },
    /// Run an Apache Ballista scheduler (built with Sluice's DataFusion) for `reconcile --cluster`.
    /// Ballista has no authentication: keep the scheduler and executors on loopback (the
    /// default) or on a private network only they and the reconcile job reach.
    #[cfg(feature = "cluster")]
    Scheduler {
        /// Address of its gRPC service.
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: SocketAddr,
    },
    /// Run an Apache Ballista executor that registers with a scheduler (no authentication:
    /// loopback by default; bind it only on a private network).
    #[cfg(feature = "cluster")]
    Executor {
        /// The scheduler's address.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: SocketAddr,
        /// Address of its Arrow Flight service (where results are fetched).
        #[arg(long, default_value = "127.0.0.1:50051")]
        bind: SocketAddr,
        /// Port of its gRPC service.
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// Directory for shuffle files.
        #[arg(long, default_value = ".sluice-executor")]
        work_dir: PathBuf,
    },
    /// Data quality of a sink table, from the profiles committed with its epochs.
    Quality {
        #[command(subcommand)]
        command: QualityCommand,
    },
    /// Run a read-only SQL query over committed sink tables.
    Query {
        /// The query (SELECT / EXPLAIN only).
        sql: String,
        /// A table to query, as NAME=LOCATION (the sink's LOCATION). Repeatable.
        #[arg(long = "table", value_parser = parse_table_arg)]
        tables: Vec<(String, String)>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Read a token from standard input and print its `sha256:<hex>` for a token file line
    /// (`NAME sha256:<hex> sources=a,b [admin]`); the token itself is never stored.
    Hash,
}

/// `sluice run`'s network-security flags: tokens, TLS and the limits hostile clients meet.
#[derive(clap::Args)]
struct SecurityArgs {
    /// Token file: one `NAME sha256:<hex> sources=a,b|* [admin]` per line. With it, ingest needs
    /// a token allowed on the source, and /metrics and /v1/pipelines an admin token. Re-read on
    /// SIGHUP.
    #[arg(long)]
    auth_tokens: Option<PathBuf>,
    /// Listen on a non-loopback address without a token file (anyone who reaches the port may
    /// send and read the management endpoints).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Serve HTTPS with this certificate chain (PEM); reloaded on SIGHUP.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM); a client's subject is its
    /// principal when it sends no token.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = sluice_engine::server::edge::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Connections one client address may hold at once (0: no cap; behind a proxy every
    /// connection comes from its address); more are closed at once.
    #[arg(long, default_value_t = sluice_engine::server::edge::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,
    /// Time a client has to send a request's headers (and to finish a TLS handshake, and to
    /// start its next request on a kept-alive connection), e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_retention)]
    header_read_timeout: std::time::Duration,
    /// Longest wait for the next piece of a request body, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_retention)]
    body_read_timeout: std::time::Duration,
    /// Bytes per second a body must average once the read timeout has passed.
    #[arg(long, default_value_t = sluice_connectors::http::intake::DEFAULT_MIN_BODY_RATE)]
    min_body_rate: u64,
    /// Most bad records (dead letters) one request may hold before it is refused whole.
    #[arg(long, default_value_t = sluice_connectors::http::body::DEFAULT_MAX_BAD_RECORDS)]
    max_bad_records: usize,
    /// Most bytes of bad records one request may hold before it is refused whole.
    #[arg(long, default_value = "4MB", value_parser = parse_size)]
    max_bad_bytes: u64,
}

#[derive(Subcommand)]
enum QualityCommand {
    /// Merge every committed epoch's profile and print one row per column (source and sink);
    /// with `--partition`, the partition's rows, nulls, min and max from its files' footers.
    Profile {
        /// The sink's LOCATION.
        sink: String,
        /// Only the committed files of this partition (KEY=VALUE, repeatable), from their footers.
        #[arg(long = "partition", value_parser = parse_table_arg)]
        partition: Vec<(String, String)>,
        /// Print the profile as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per column: current value and baseline of each metric, violations per expectation,
    /// anomaly episodes; `--html` writes one self-contained page with charts.
    Report {
        /// The sink's LOCATION.
        sink: String,
        /// Only commits at or after this instant (RFC 3339, or a date: YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// Only commits before this instant (RFC 3339, or a date).
        #[arg(long)]
        until: Option<String>,
        /// Also write the report as an HTML file here.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Print the report as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print CREATE EXPECTATION statements the data committed so far satisfies (from the profiles).
    Suggest {
        /// The sink's LOCATION.
        sink: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per row.
    Json,
}

fn parse_size(s: &str) -> Result<u64, String> {
    sluice_sql::parse_bytes(s)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("expected a size such as 128MB, got '{s}'"))
}

fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    match s.trim() {
        "0" => Ok(std::time::Duration::ZERO),
        t => sluice_sql::parse_duration(t).ok_or_else(|| format!("expected a duration such as 7d or 12h, got '{s}'")),
    }
}

fn parse_table_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, l)) if !n.is_empty() && !l.is_empty() => Ok((n.to_string(), l.to_string())),
        _ => Err(format!("expected NAME=LOCATION, got '{s}'")),
    }
}

fn read_files(files: &[PathBuf]) -> Result<Vec<PipelineText>> {
    files
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("cannot read pipeline file {}", p.display()))?;
            Ok(PipelineText::new(p.display().to_string(), text)?)
        })
        .collect()
}

async fn validate(files: &[PathBuf]) -> Result<()> {
    let texts = read_files(files)?;
    let registry = sluice_connectors::registry();
    let (ctx, program) = runtime::compile(&texts, &registry).await?;
    let mut out = std::io::stdout().lock();
    for p in &program.pipelines {
        let sink = &program.sinks[&p.name];
        writeln!(
            out,
            "pipeline {}: {} -> {} ({}, {})",
            p.name, p.source, p.name, sink.connector, sink.location
        )?;
        if !sink.partition_by.is_empty() {
            writeln!(out, "  partitioned by: {}", sink.partition_by.join(", "))?;
        }
        if let Some(w) = &p.window {
            writeln!(
                out,
                "  window: {}, each written once the watermark passes its end",
                w.describe()
            )?;
        }
        writeln!(out, "{}", indent(&program.explain(&ctx, p)?))?;
    }
    writeln!(
        out,
        "ok: {} pipeline(s), {} source(s), {} static table(s)",
        program.pipelines.len(),
        program.sources.len(),
        program.static_tables.len()
    )?;
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

async fn query(sql: &str, tables: &[(String, String)], format: OutputFormat) -> Result<()> {
    let ctx = sluice_sql::session();
    for (name, location) in tables {
        let t = CommittedTable::open(&ctx, location)
            .await
            .with_context(|| format!("opening table {name} at {location}"))?;
        ctx.register_table(name.as_str(), Arc::new(t))?;
    }
    let opts = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let batches = ctx.sql_with_options(sql, opts).await?.collect().await?;
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Table => writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&batches)?)?,
        OutputFormat::Csv => {
            let mut w = arrow::csv::Writer::new(&mut out);
            for b in &batches {
                w.write(b)?;
            }
        }
        OutputFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(())
}

/// The state directory: as given, or `.sluice` beside the first pipeline file.
fn state_dir_for(files: &[PathBuf], given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let beside = files
            .first()
            .and_then(|f| f.parent())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        beside.join(sluice_connectors::DEFAULT_STATE_DIR)
    })
}

/// `sluice check`: prints the report; true when nothing is wrong.
async fn check(sink: &str, json: bool) -> Result<bool> {
    let table = open_table(sink)?;
    let report = sluice_engine::log::check::check_table(&table).await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            out,
            "{sink}: {} commit entries, {} live files ({} bytes), {} dead-letter files",
            report.entries, report.files, report.bytes, report.dead_letter_files
        )?;
        for p in &report.problems {
            writeln!(out, "  {:?}: {} ({})", p.kind, p.path, p.detail)?;
        }
        writeln!(
            out,
            "{}",
            if report.problems.is_empty() {
                "ok".to_string()
            } else {
                format!("{} problem(s)", report.problems.len())
            }
        )?;
    }
    Ok(report.problems.is_empty())
}

/// The sink table at `sink` (a path or URL); a missing local directory is an error.
fn open_table(sink: &str) -> Result<sluice_engine::store::TableStore> {
    let local = sink.strip_prefix("file://").unwrap_or(sink);
    if !local.contains("://") && !Path::new(local).is_dir() {
        bail!("no table at {sink}: the directory does not exist");
    }
    // The maintenance lease's TTL (the sink's `lease.ttl` is in its pipeline file, which these
    // commands do not read): `SLUICE_LEASE_TTL`, else 30s.
    let mut settings = sluice_engine::store::StoreSettings::default();
    if let Ok(ttl) = std::env::var("SLUICE_LEASE_TTL") {
        settings.lease_ttl = sluice_sql::parse_duration(&ttl)
            .filter(|t| *t >= std::time::Duration::from_secs(1))
            .ok_or_else(|| anyhow::anyhow!("SLUICE_LEASE_TTL={ttl}: expected a duration of at least 1s, such as 30s"))?;
    }
    Ok(sluice_engine::store::TableStore::open_with(sink, &settings)?)
}

/// An instant given as RFC 3339 or as a date (midnight UTC), in ms since the Unix epoch.
fn parse_instant(s: &str) -> Result<i64> {
    Ok(reconcile::parse_instant(s)?.div_euclid(1000))
}

/// Keys of one kind printed per partition (the JSON report has all of them).
const KEYS_PRINTED: usize = 10;

/// `sluice reconcile`'s arguments.
#[derive(clap::Args)]
struct ReconcileArgs {
    /// Pipeline files (*.sql).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The pipeline (its sink's name).
    #[arg(long)]
    pipeline: String,
    /// Events committed at or after this instant (RFC 3339, or a date: YYYY-MM-DD).
    #[arg(long)]
    from: Option<String>,
    /// Events committed before this instant (RFC 3339, or a date).
    #[arg(long)]
    to: Option<String>,
    /// Replace every differing partition with the batch result, in one commit.
    #[arg(long)]
    repair: bool,
    /// Also write the whole report (every differing key) as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Run on an Apache Ballista cluster (df://HOST:PORT) instead of in process. Ballista has no
    /// authentication: the scheduler and executors must sit on loopback or a private network
    /// (README, "Security").
    #[arg(long)]
    cluster: Option<String>,
}

/// Runs `sluice reconcile`; true when everything was equal.
async fn reconcile_cmd(a: ReconcileArgs) -> Result<bool> {
    let exec = match &a.cluster {
        None => None,
        #[cfg(feature = "cluster")]
        Some(url) => Some(cluster::remote_context(url).await?),
        #[cfg(not(feature = "cluster"))]
        Some(url) => {
            bail!("--cluster {url}: this sluice was built without Apache Ballista; build it with `--features cluster`")
        }
    };
    let texts = read_files(&a.files)?;
    let registry = sluice_connectors::registry();
    let (ctx, program) = runtime::compile(&texts, &registry).await?;
    let (_, sink_def) = reconcile::pipeline_and_sink(&program, &a.pipeline)?;
    let factory = registry
        .sink(&sink_def.connector)
        .with_context(|| format!("no sink connector {}", sink_def.connector))?;
    let sink = factory.create(sink_def)?;
    let scratch = sluice_engine::store::TableStore::from_store(
        Arc::new(object_store::memory::InMemory::new()),
        object_store::path::Path::default(),
        "memory://reconcile",
    );
    let shadow = factory.create_on(scratch, sink_def)?;
    let opts = reconcile::ReconcileOptions {
        range: reconcile::TimeRange {
            from_us: a.from.as_deref().map(reconcile::parse_instant).transpose()?,
            to_us: a.to.as_deref().map(reconcile::parse_instant).transpose()?,
        },
        repair: a.repair,
        exec,
    };
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let progress = |step: &str, done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_message(step.to_string());
            b.set_length(total);
            b.set_position(done);
        }
    };
    let report = reconcile::reconcile(&ctx, &program, &a.pipeline, sink, shadow, &opts, &progress).await?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} archive file(s), {} event(s), epochs {}",
        report.pipeline,
        report.archive_files,
        report.archive_events,
        report.epochs.map_or("none".to_string(), |[a, b]| format!("{a}..={b}"))
    )?;
    let header = [
        "partition",
        "stream rows",
        "batch rows",
        "columns that differ",
        "verdict",
    ];
    let rows: Vec<Vec<String>> = report
        .partitions
        .iter()
        .map(|p| {
            vec![
                if p.partition.is_empty() {
                    "(table)".to_string()
                } else {
                    p.partition.trim_end_matches('/').to_string()
                },
                p.stream_rows.to_string(),
                p.batch_rows.to_string(),
                p.columns.join(", "),
                match p.verdict {
                    reconcile::Verdict::Equal => "equal".to_string(),
                    reconcile::Verdict::Differs => "DIFFERS".to_string(),
                },
            ]
        })
        .collect();
    print_table(&mut out, &header, &rows)?;
    for p in report
        .partitions
        .iter()
        .filter(|p| p.verdict == reconcile::Verdict::Differs)
    {
        for f in &p.missing_files {
            writeln!(out, "{}: committed file missing: {f}", p.partition)?;
        }
        for f in &p.stray_files {
            writeln!(out, "{}: file no commit names: {f}", p.partition)?;
        }
        if let Some(k) = &p.keys {
            for (what, keys) in [
                ("missing from the stream", &k.missing),
                ("extra in the stream", &k.extra),
                ("changed", &k.changed),
            ] {
                if !keys.is_empty() {
                    let shown: Vec<&str> = keys.iter().take(KEYS_PRINTED).map(String::as_str).collect();
                    let more = keys.len().saturating_sub(KEYS_PRINTED);
                    writeln!(
                        out,
                        "{}: {} key(s) {what}: {}{}",
                        p.partition,
                        keys.len(),
                        shown.join(" "),
                        if more > 0 {
                            format!(" (and {more} more)")
                        } else {
                            String::new()
                        }
                    )?;
                }
            }
        }
    }
    if !report.late_partitions.is_empty() {
        writeln!(
            out,
            "late rows (left out by the stream, in the batch result) fell in: {}",
            report.late_partitions.join(" ")
        )?;
    }
    for w in &report.warnings {
        writeln!(out, "warning: {w}")?;
    }
    match (&report.repair, report.differing) {
        (_, 0) => writeln!(out, "equal: {} partition(s)", report.partitions.len())?,
        (Some(r), n) => writeln!(
            out,
            "repaired {n} partition(s) in commit {}: {} file(s) removed, {} added",
            r.epoch,
            r.removed.len(),
            r.added.len()
        )?,
        (None, n) => writeln!(
            out,
            "{n} partition(s) differ; --repair replaces them with the batch result"
        )?,
    }
    Ok(report.differing == 0)
}

/// Prints an aligned text table.
fn print_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.iter().map(|h| h.to_string()).collect()))?;
    for r in rows {
        writeln!(out, "{}", line(r.clone()))?;
    }
    Ok(())
}

async fn quality_report(
    sink: &str,
    since: Option<&str>,
    until: Option<&str>,
    html: Option<&Path>,
    json: bool,
) -> Result<()> {
    let table = open_table(sink)?;
    let since = since.map(parse_instant).transpose()?;
    let until = until.map(parse_instant).transpose()?;
    let report = sluice_engine::quality::health::build(&table, since, until).await?;
    if let Some(path) = html {
        std::fs::write(path, sluice_engine::quality::health::to_html(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", sluice_engine::quality::health::to_text(&report))?;
        if let Some(path) = html {
            writeln!(out, "\nreport: {}", path.display())?;
        }
    }
    Ok(())
}

async fn quality_profile(sink: &str, partition: &[(String, String)], json: bool) -> Result<()> {
    let table = open_table(sink)?;
    let profile = if partition.is_empty() {
        report::table_profile(&table).await?
    } else {
        report::partition_profile(&table, partition).await?
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&profile)?)?;
        return Ok(());
    }
    if partition.is_empty() {
        writeln!(out, "{sink}: profiles of {} epochs", profile.epochs)?;
    } else {
        writeln!(
            out,
            "{sink}: footers of {} committed files in the partition",
            profile.epochs
        )?;
    }
    let header = [
        "side", "table", "column", "type", "rows", "null %", "distinct", "min", "max", "mean", "p50", "p99",
    ];
    let rows: Vec<Vec<String>> = profile
        .columns
        .iter()
        .map(|c| {
            vec![
                c.side.clone(),
                c.table.clone(),
                c.column.clone(),
                c.data_type.clone(),
                c.rows.to_string(),
                format!("{:.2}", 100.0 * c.null_fraction),
                c.distinct.to_string(),
                c.min.clone().unwrap_or_default(),
                c.max.clone().unwrap_or_default(),
                c.mean.map(|v| report::figure(&c.data_type, v)).unwrap_or_default(),
                c.p50.map(|v| report::figure(&c.data_type, v)).unwrap_or_default(),
                c.p99.map(|v| report::figure(&c.data_type, v)).unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&mut out, &header, &rows)
}

/// The server configuration from `sluice run`'s flags: refuses a non-loopback listener without
/// tokens (unless allowed), loads the token file and TLS files.
fn server_config(
    listen: SocketAddr,
    max_buffer_bytes: u64,
    instance: Option<String>,
    sec: &SecurityArgs,
) -> Result<ServerConfig> {
    use sluice_engine::{connector::auth::Auth, server::edge};
    if !listen.ip().is_loopback() && sec.auth_tokens.is_none() && !sec.allow_unauthenticated {
        bail!(
            "--listen {listen} is not a loopback address and no --auth-tokens file is given: anyone who reaches the port could send events and read /metrics\nhelp: give --auth-tokens FILE (see `sluice token hash`), or --allow-unauthenticated on a trusted network"
        );
    }
    let auth = match &sec.auth_tokens {
        Some(path) => Auth::from_file(path)?,
        None => Auth::none(),
    };
    let tls = match (&sec.tls_cert, &sec.tls_key) {
        (Some(cert), Some(key)) => Some(edge::Tls::load(edge::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: sec.tls_client_ca.clone(),
        })?),
        _ => None,
    };
    Ok(ServerConfig {
        listen,
        max_buffer_bytes,
        instance,
        limits: edge::EdgeLimits {
            max_connections: sec.max_connections.max(1),
            max_connections_per_address: sec.max_connections_per_address,
            header_read_timeout: sec.header_read_timeout,
            ..Default::default()
        },
        tls,
        auth,
    })
}

async fn run(
    files: &[PathBuf],
    config: ServerConfig,
    state_dir: &Path,
    adopt_ingest_log: bool,
    sec: &SecurityArgs,
) -> Result<()> {
    let texts = read_files(files)?;
    // Handlers go in before the server can report ready: a SIGTERM right after start (a
    // supervisor, a test) must be a graceful stop, not the default kill.
    let signal = shutdown_signal();
    reload_on_hangup(config.auth.clone(), config.tls.clone());
    let http = sluice_connectors::http::HttpSourceFactory::new(state_dir)
        .with_adopt_logs(adopt_ingest_log)
        .with_body_budget(config.max_buffer_bytes)
        .with_body_limits(sluice_connectors::http::intake::BodyLimits {
            read_timeout: sec.body_read_timeout,
            min_rate: sec.min_body_rate.max(1),
        })
        .with_bad_records(sluice_connectors::http::body::BadRecords {
            records: sec.max_bad_records,
            bytes: usize::try_from(sec.max_bad_bytes).unwrap_or(usize::MAX),
        });
    let registry = sluice_connectors::registry_for_run(http);
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    // The listener binds at once (`/healthz` answers while pipelines wait for their leases);
    // the line below is printed once every pipeline takes input.
    let mut server = runtime::start(&texts, &registry, config).await?;
    let trigger = server.shutdown_trigger();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down: draining pipelines");
        trigger.trigger();
    });
    if let Err(e) = server.ready().await {
        // A pipeline could not come up: the others drain and stop, and the run fails.
        server.shutdown_trigger().trigger();
        let _ = server.wait().await;
        return Err(e.into());
    }
    // Whoever reads stdout may be gone; never fail (or panic) for that.
    let _ = writeln!(std::io::stdout(), "sluice listening on {scheme}://{}", server.addr());
    let _ = std::io::stdout().flush();
    server.wait().await?;
    let _ = writeln!(std::io::stdout(), "sluice stopped");
    Ok(())
}

/// On SIGHUP, reads the token file and the TLS files again; a bad file keeps what was loaded
/// and says why in the log.
fn reload_on_hangup(
    auth: Arc<sluice_engine::connector::auth::Auth>,
    tls: Option<Arc<sluice_engine::server::edge::Tls>>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: tokens and certificates reload only on restart");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if auth.has_file() {
                    match auth.reload() {
                        Ok(n) => tracing::info!(tokens = n, "token file reloaded"),
                        Err(e) => tracing::error!(error = %e, "token file not reloaded; the previous tokens stay"),
                    }
                }
                if let Some(tls) = &tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("TLS certificate reloaded"),
                        Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays"),
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (auth, tls);
}

/// SIGTERM or SIGINT (Ctrl-C elsewhere); the handlers are installed when this is called, not
/// when the future is first polled.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        async move {
            match streams {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// An instance name: 1 to 64 of letters, digits, `-` and `_` (it goes into file names).
fn parse_instance(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an instance name: use 1 to 64 letters, digits, '-' and '_'"
        ))
    }
}

/// glibc malloc arenas: one per core is enough for this server's threads.
const MALLOC_ARENAS: i32 = 2;
/// Allocations of this size and more are mapped and unmapped on their own (glibc malloc).
const MMAP_THRESHOLD: i32 = 2 << 20;

/// Caps glibc's malloc arenas. By default each of up to 8 × cores arenas keeps the large blocks
/// freed in it (request bodies, decode buffers, after glibc's mmap threshold rose to their size)
/// resident: a burst of large bodies decoded on many blocking threads (a flood of garbage,
/// measured by `security::hostile_load_keeps_every_acknowledged_event_exactly_once`) then leaves
/// the process hundreds of MiB above its budgets. A fixed mmap threshold (1 MiB) bounded it too,
/// but cost the directory pipeline a third more CPU (every large batch buffer mapped afresh).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; called once, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a log file or collector gets plain `key=value`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<ExitCode> = rt.block_on(async {
        match cli.command {
            Command::Run {
                files,
                listen,
                state_dir,
                adopt_ingest_log,
                max_buffer_bytes,
                instance,
                security,
            } => {
                let config = server_config(listen, max_buffer_bytes, instance, &security)?;
                let state_dir = state_dir_for(&files, state_dir);
                run(&files, config, &state_dir, adopt_ingest_log, &security).await
            }
            Command::Token {
                command: TokenCommand::Hash,
            } => {
                let mut token = String::new();
                std::io::stdin().read_line(&mut token).context("reading the token from standard input")?;
                let token = token.trim_end_matches(['\r', '\n']);
                if token.is_empty() {
                    bail!("no token on standard input");
                }
                println!("{}", sluice_engine::connector::auth::token_file_hash(token));
                Ok(())
            }
            Command::Validate { files } => validate(&files).await,
            Command::Compact {
                sink,
                target_file_size,
                partition,
            } => {
                let report = maintain::compact(&open_table(&sink)?, target_file_size, &partition).await?;
                let mut out = std::io::stdout().lock();
                for p in &report.partitions {
                    writeln!(
                        out,
                        "{}: {} files -> {} ({} rows), commit {}",
                        p.partition.trim_end_matches('/'),
                        p.files_before,
                        p.files_after,
                        p.rows,
                        p.epoch
                    )?;
                }
                writeln!(out, "compacted {} partition(s)", report.partitions.len())?;
                Ok(())
            }
            Command::Vacuum {
                sink,
                retention,
                archive_retention,
                log_retention,
            } => {
                let keep = maintain::Retention {
                    removed: retention,
                    archive: archive_retention,
                    log: log_retention,
                };
                let report = maintain::vacuum(&open_table(&sink)?, keep).await?;
                println!(
                    "deleted {} removed file(s), {} staging orphan(s), {} archive file(s), {} expired log entries, {} expired checkpoints",
                    report.removed_files.len(),
                    report.staging_orphans,
                    report.archive_files.len(),
                    report.log_entries,
                    report.checkpoints
                );
                Ok(())
            }
            #[cfg(feature = "cluster")]
            Command::Scheduler { bind } => cluster::scheduler(bind).await,
            #[cfg(feature = "cluster")]
            Command::Executor {
                scheduler,
                bind,
                grpc_port,
                work_dir,
            } => cluster::executor(scheduler, bind, grpc_port, work_dir).await,
            Command::Reconcile(args) => {
                return Ok(if reconcile_cmd(args).await? {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            Command::Check { sink, json } => match check(&sink, json).await {
                Ok(true) => Ok(()),
                Ok(false) => return Ok(ExitCode::from(1)),
                Err(e) => return Err(e),
            },
            Command::Quality {
                command: QualityCommand::Profile { sink, partition, json },
            } => quality_profile(&sink, &partition, json).await,
            Command::Quality {
                command:
                    QualityCommand::Report {
                        sink,
                        since,
                        until,
                        html,
                        json,
                    },
            } => quality_report(&sink, since.as_deref(), until.as_deref(), html.as_deref(), json).await,
            Command::Quality {
                command: QualityCommand::Suggest { sink },
            } => {
                let profile = report::table_profile(&open_table(&sink)?).await?;
                print!("{}", sluice_engine::quality::suggest::suggest(&profile));
                Ok(())
            }
            Command::Query { sql, tables, format } => {
                if tables.is_empty() {
                    bail!("name at least one table: --table NAME=LOCATION");
                }
                query(&sql, &tables, format).await
            }
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::from(2)
        }
    }
}
