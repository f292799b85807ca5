//! Compiles pipeline files into a [`Program`]: sources, sinks, static tables and one logical plan
//! per pipeline, every error located in its file.
//!
//! The passes:
//! 1. tokenize and parse every file with DataFusion's `DFParser` (spans are file-absolute);
//! 2. classify statements: `CREATE UNBOUNDED EXTERNAL TABLE` = source, `CREATE EXTERNAL TABLE`
//!    named by an `INSERT INTO` = sink, any other `CREATE EXTERNAL TABLE` = static table,
//!    `INSERT INTO sink SELECT ...` = pipeline; anything else is rejected;
//! 3. check each source and sink against the [`ConnectorCatalog`] (name, option keys, values);
//! 4. register static tables (DataFusion's own formats) and sources (schema only) in the session;
//! 5. plan each pipeline's SELECT once with DataFusion, check it reads exactly one source and
//!    only stateless operators over it, and cast its output to the sink's declared columns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::Distinct;
use datafusion::optimizer::replace_distinct_aggregate::ReplaceDistinctWithAggregate;
use datafusion::optimizer::{OptimizerContext, OptimizerRule};
use datafusion::common::{Column, DataFusionError, SchemaError};
use datafusion::datasource::empty::EmptyTable;
use datafusion::logical_expr::{DdlStatement, Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{CreateExternalTable, DFParser, Statement as DFStatement};
use datafusion::sql::planner::object_name_to_table_reference;
use datafusion::sql::sqlparser::ast::{ObjectName, SetExpr, Statement as SQLStatement, TableObject, Value};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Location, Span};

use crate::catalog::{ConnectorCatalog, Options, Role};
use crate::error::{SourceLocation, SqlError, nearest};
use crate::event_time::EventTimeDef;
use crate::window::{WINDOW_TABLE, WindowDef};
use crate::expect::{ExpectationDef, Written, is_expectation};
use crate::text::{PipelineText, StatementTokens, strip_position};

/// An unbounded source table.
#[derive(Clone)]
pub struct SourceDef {
    /// Table name (normalized: lower case unless quoted).
    pub name: String,
    /// `STORED AS` connector name, upper case.
    pub connector: String,
    /// LOCATION, after `${NAME}` substitution.
    pub location: String,
    /// The declared columns.
    pub schema: SchemaRef,
    /// OPTIONS, after `${NAME}` substitution.
    pub options: Options,
    /// Event time, watermark, late rows and dedup, when `'event_time'` is given.
    pub event_time: Option<EventTimeDef>,
    /// Where the table is defined.
    pub defined_at: Option<SourceLocation>,
}

/// A sink table: where a pipeline's output is committed.
#[derive(Clone)]
pub struct SinkDef {
    /// Table name.
    pub name: String,
    /// `STORED AS` connector name, upper case.
    pub connector: String,
    /// LOCATION, after `${NAME}` substitution.
    pub location: String,
    /// `PARTITIONED BY` columns, in order.
    pub partition_by: Vec<String>,
    /// The columns written: the declared ones, or the pipeline's SELECT output.
    pub schema: SchemaRef,
    /// OPTIONS, after `${NAME}` substitution.
    pub options: Options,
    /// Where the table is defined.
    pub defined_at: Option<SourceLocation>,
}

/// OPTIONS for Debug output: their keys only (values may be credentials, e.g.
/// `s3.secret_access_key`).
struct OptionKeys<'a>(&'a Options);

impl std::fmt::Debug for OptionKeys<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl std::fmt::Debug for SourceDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDef")
            .field("name", &self.name)
            .field("connector", &self.connector)
            .field("location", &self.location)
            .field("schema", &self.schema)
            .field("options", &OptionKeys(&self.options))
            .field("event_time", &self.event_time)
            .field("defined_at", &self.defined_at)
            .finish()
    }
}

impl std::fmt::Debug for SinkDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkDef")
            .field("name", &self.name)
            .field("connector", &self.connector)
            .field("location", &self.location)
            .field("partition_by", &self.partition_by)
            .field("schema", &self.schema)
            .field("options", &OptionKeys(&self.options))
            .field("defined_at", &self.defined_at)
            .finish()
    }
}

/// One pipeline: `INSERT INTO sink SELECT ... FROM source ...`, named after its sink.
#[derive(Debug, Clone)]
pub struct PipelineDef {
    /// The pipeline's name (its sink's name).
    pub name: String,
    /// The one unbounded source it reads.
    pub source: String,
    /// The logical plan of the SELECT, with the output cast to the sink's columns. The source
    /// appears as a `TableScan` named after it; the engine binds it to each micro-batch.
    pub plan: LogicalPlan,
    /// The same plan split at its windowed aggregate, when it has one.
    pub window: Option<WindowDef>,
    /// Where the INSERT is.
    pub defined_at: Option<SourceLocation>,
}

/// `plan` with every scan of `table` reading `source` instead: how the engine binds a
/// pipeline's source (or an expectation's input) to the batch at hand.
pub fn bind_scan(
    plan: &LogicalPlan,
    table: &str,
    source: &Arc<dyn datafusion::logical_expr::TableSource>,
) -> Result<LogicalPlan, DataFusionError> {
    use datafusion::common::tree_node::Transformed;
    Ok(plan
        .clone()
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(mut scan) if scan.table_name.table() == table => {
                scan.source = source.clone();
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data)
}

/// Everything a set of pipeline files defines.
#[derive(Debug, Clone, Default)]
pub struct Program {
    /// Sources by name.
    pub sources: BTreeMap<String, SourceDef>,
    /// Sinks by name.
    pub sinks: BTreeMap<String, SinkDef>,
    /// Static tables registered in the session, by name.
    pub static_tables: Vec<String>,
    /// Pipelines in file order.
    pub pipelines: Vec<PipelineDef>,
    /// `CREATE EXPECTATION`s in file order.
    pub expectations: Vec<ExpectationDef>,
}

impl Program {
    /// The optimized plan of a pipeline in `EXPLAIN` form.
    pub fn explain(&self, ctx: &SessionContext, pipeline: &PipelineDef) -> Result<String, SqlError> {
        let optimized = ctx
            .state()
            .optimize(&pipeline.plan)
            .map_err(|e| SqlError::Internal(format!("optimizing pipeline {}: {e}", pipeline.name)))?;
        Ok(optimized.display_indent().to_string())
    }
}

/// Compiles pipeline files against a session and a connector catalog. Static tables and sources
/// are registered in `ctx` (sources as schema-only tables).
pub async fn compile(
    ctx: &SessionContext,
    catalog: &ConnectorCatalog,
    files: &[PipelineText],
) -> Result<Program, SqlError> {
    let mut stmts = Vec::new();
    let mut expectations = Vec::new();
    for text in files {
        let (s, e) = parse_file(text)?;
        stmts.extend(s);
        expectations.extend(e);
    }
    Compiler {
        ctx,
        catalog,
        program: Program::default(),
        defined: BTreeMap::new(),
    }
    .run(stmts, expectations)
    .await
}

/// A parsed statement with the file and tokens it came from.
struct Parsed<'a> {
    text: &'a PipelineText,
    tokens: StatementTokens<'a>,
    stmt: DFStatement,
}

/// Parses a file: its `CREATE EXPECTATION`s by [`crate::expect`], the rest by DataFusion's
/// parser (which sees the expectations blanked out, so every span stays file-absolute).
fn parse_file(text: &PipelineText) -> Result<(Vec<Parsed<'_>>, Vec<Written<'_>>), SqlError> {
    let mut expectations = Vec::new();
    let mut tokens = Vec::new();
    let mut sql = text.text.clone();
    let statements = text.statements();
    // Blanked from the last to the first, so the byte offsets of those before stay valid.
    for st in statements.iter().rev().filter(|st| is_expectation(st)) {
        blank(&mut sql, text, st);
    }
    for st in statements {
        if is_expectation(&st) {
            expectations.push(crate::expect::parse(text, st)?);
        } else {
            tokens.push(st);
        }
    }
    let statements = DFParser::parse_sql_with_dialect(&sql, &GenericDialect {}).map_err(|e| {
        let msg = strip_position(
            &e.strip_backtrace()
                .replace("SQL error: ParserError(\"", "")
                .replace("sql parser error: ", ""),
        );
        let at = e
            .diagnostic()
            .and_then(|d| d.span)
            .and_then(|s| text.locate(to_sp(s)))
            .or_else(|| text.locate_message(&e.to_string()));
        let hint = msg
            .strip_prefix("Expected: ")
            .map(|rest| format!("expected {}", rest.split(", found").next().unwrap_or(rest)));
        SqlError::invalid(msg.clone(), at, hint)
    })?;
    if tokens.len() != statements.len() {
        return Err(SqlError::Internal(format!(
            "{}: {} statements parsed but {} found by the tokenizer",
            text.file,
            statements.len(),
            tokens.len()
        )));
    }
    let parsed = statements
        .into_iter()
        .zip(tokens)
        .map(|(stmt, tokens)| Parsed { text, tokens, stmt })
        .collect();
    Ok((parsed, expectations))
}

/// Replaces a statement's text by spaces (newlines kept, so line and column positions of the
/// rest do not move).
fn blank(sql: &mut String, text: &PipelineText, st: &StatementTokens<'_>) {
    let (Some(first), Some(last)) = (st.tokens.first(), st.tokens.last()) else {
        return;
    };
    let (Some(start), Some(end)) = (text.offset(first.span.start), text.offset(last.span.end)) else {
        return;
    };
    // One space per character (DataFusion counts columns in characters), newlines kept.
    let spaces: String = sql[start..end]
        .chars()
        .map(|c| if c == '\n' { '\n' } else { ' ' })
        .collect();
    sql.replace_range(start..end, &spaces);
}

fn to_sp(s: datafusion::common::Span) -> Span {
    Span::new(
        Location::new(s.start.line, s.start.column),
        Location::new(s.end.line, s.end.column),
    )
}

struct Compiler<'a> {
    ctx: &'a SessionContext,
    catalog: &'a ConnectorCatalog,
    program: Program,
    /// Every table name defined so far, with where.
    defined: BTreeMap<String, Option<SourceLocation>>,
}

fn err_at(p: &Parsed<'_>, span: Option<Span>, message: impl Into<String>, hint: Option<String>) -> SqlError {
    let at = span
        .and_then(|s| p.text.locate(s))
        .or_else(|| p.text.locate(p.tokens.first_span()));
    SqlError::invalid(message, at, hint)
}

impl<'a> Compiler<'a> {
    async fn run(mut self, stmts: Vec<Parsed<'_>>, expectations: Vec<Written<'_>>) -> Result<Program, SqlError> {
        // Pass 1: which tables are INSERT targets.
        let mut sink_names = BTreeSet::new();
        for p in &stmts {
            if let Some((name, _)) = insert_target(p)? {
                sink_names.insert(name);
            }
        }
        // Pass 2: tables, in file order.
        let mut inserts = Vec::new();
        for p in &stmts {
            match &p.stmt {
                DFStatement::CreateExternalTable(c) => {
                    let name = self.table_name(p, &c.name)?;
                    if let Some(prev) = self.defined.get(&name) {
                        let hint = prev.as_ref().map(|l| format!("\"{name}\" is first defined at {l}"));
                        return Err(err_at(
                            p,
                            p.tokens.after_keyword(Keyword::TABLE),
                            format!("table \"{name}\" is defined twice"),
                            hint,
                        ));
                    }
                    let at = p
                        .text
                        .locate(p.tokens.after_keyword(Keyword::TABLE).unwrap_or(p.tokens.first_span()));
                    if c.unbounded {
                        self.source(p, c, &name).await?;
                    } else if sink_names.contains(&name) {
                        self.sink(p, c, &name).await?;
                    } else {
                        self.static_table(p, c, &name).await?;
                    }
                    self.defined.insert(name, at);
                }
                DFStatement::Statement(s) if matches!(**s, SQLStatement::Insert(_)) => inserts.push(p),
                _ => {
                    return Err(err_at(
                        p,
                        None,
                        "this statement is not allowed in a pipeline file",
                        Some("a pipeline file holds CREATE [UNBOUNDED] EXTERNAL TABLE and INSERT INTO <sink> SELECT ... statements".into()),
                    ));
                }
            }
        }
        // Pass 3: pipelines.
        for p in inserts {
            self.pipeline(p).await?;
        }
        // Pass 4: expectations, against the sources' and sinks' final columns.
        for e in expectations {
            self.expectation(e).await?;
        }
        Ok(self.program)
    }

    async fn expectation(&mut self, e: Written<'_>) -> Result<(), SqlError> {
        if let Some(prev) = self.program.expectations.iter().find(|x| x.name == e.name()) {
            return Err(e.error_at_name(
                format!("expectation \"{}\" is defined twice", e.name()),
                prev.defined_at
                    .as_ref()
                    .map(|l| format!("\"{}\" is first defined at {l}", prev.name)),
            ));
        }
        let schema = if let Some(s) = self.program.sources.get(e.table()) {
            s.schema.clone()
        } else if let Some(s) = self.program.sinks.get(e.table()) {
            s.schema.clone()
        } else {
            let names: Vec<&str> = self
                .program
                .sources
                .keys()
                .chain(self.program.sinks.keys())
                .map(String::as_str)
                .collect();
            let hint = if self.defined.contains_key(e.table()) {
                format!(
                    "\"{}\" is a static table; an expectation checks a pipeline's source or sink",
                    e.table()
                )
            } else {
                match nearest(e.table(), names.iter().copied()) {
                    Some(n) => format!("did you mean \"{n}\"?"),
                    None => format!(
                        "an expectation checks a pipeline's source or sink: {}",
                        names.join(", ")
                    ),
                }
            };
            return Err(e.error_at_table(format!("unknown table \"{}\"", e.table()), Some(hint)));
        };
        let def = e.plan(schema).await?;
        self.program.expectations.push(def);
        Ok(())
    }

    fn table_name(&self, p: &Parsed<'_>, name: &ObjectName) -> Result<String, SqlError> {
        let r = object_name_to_table_reference(name.clone(), true)
            .map_err(|e| err_at(p, None, e.strip_backtrace(), None))?;
        if r.schema().is_some() {
            return Err(err_at(
                p,
                None,
                format!("table name \"{r}\" must not be qualified"),
                Some(format!("write just \"{}\"", r.table())),
            ));
        }
        let table = r.table();
        if let Some(why) = unsafe_name(table) {
            return Err(err_at(
                p,
                None,
                format!("table name \"{}\" {why}", table.escape_debug()),
                Some("a table's name becomes a file and URL path segment (state directories, leases, pipeline names): use letters, digits, '_', '-' and '.'".to_string()),
            ));
        }
        Ok(table.to_string())
    }

    /// Converts OPTIONS to strings, substituting `${NAME}`, and checks keys against the connector.
    fn options(&self, p: &Parsed<'_>, c: &CreateExternalTable) -> Result<Options, SqlError> {
        let mut out = Options::new();
        for (k, v) in &c.options {
            let raw = match v.clone() {
                Value::Number(n, _) => n.to_string(),
                Value::Boolean(b) => b.to_string(),
                other => other.clone().into_string().unwrap_or_else(|| other.to_string()),
            };
            let value = substitute_env(&raw).map_err(|m| {
                err_at(
                    p,
                    p.tokens.option_value(k),
                    m,
                    Some("export the variable before starting sluice".into()),
                )
            })?;
            if out.insert(k.clone(), value).is_some() {
                return Err(err_at(
                    p,
                    p.tokens.option_key(k),
                    format!("option '{k}' is given twice"),
                    None,
                ));
            }
        }
        Ok(out)
    }

    fn location(&self, p: &Parsed<'_>, c: &CreateExternalTable) -> Result<String, SqlError> {
        let span = p.tokens.after_keyword(Keyword::LOCATION);
        if c.locations.len() != 1 {
            return Err(err_at(p, span, "a source or sink takes exactly one LOCATION", None));
        }
        let location = substitute_env(&c.locations[0])
            .map_err(|m| err_at(p, span, m, Some("export the variable before starting sluice".into())))?;
        if has_credentials(&location) {
            // The value is not quoted: it holds a credential.
            return Err(err_at(
                p,
                span,
                "a LOCATION must not hold credentials (user:password@): locations are printed in logs, status and paths",
                Some("put credentials in OPTIONS ('s3.access_key_id', 's3.secret_access_key', 'kafka.sasl.password', ...), whose values are never printed".into()),
            ));
        }
        Ok(location)
    }

    /// Validates the connector name, option keys and option values for a source or sink.
    fn check_connector(
        &self,
        p: &Parsed<'_>,
        c: &CreateExternalTable,
        role: Role,
        options: &Options,
        location: &str,
    ) -> Result<String, SqlError> {
        let stored = p.tokens.after_keyword(Keyword::STORED).and_then(|_| {
            // the token after STORED AS
            let i = p
                .tokens
                .tokens
                .iter()
                .position(|t| t.span == p.tokens.after_keyword(Keyword::STORED).unwrap_or(Span::empty()))?;
            p.tokens.tokens.get(i + 1).map(|t| t.span)
        });
        let what = if role == Role::Source { "source" } else { "sink" };
        let Some(spec) = self.catalog.get(role, &c.file_type) else {
            let names = self.catalog.names(role);
            let mut hint = format!("known {what} connectors: {}", names.join(", "));
            if let Some(n) = nearest(&c.file_type, names.iter().copied()) {
                hint = format!("did you mean {n}? ({hint})");
            }
            if role == Role::Source && self.catalog.get(Role::Sink, &c.file_type).is_some() {
                hint = format!(
                    "{} is a sink format; a source needs an unbounded connector ({})",
                    c.file_type,
                    names.join(", ")
                );
            }
            if role == Role::Sink && self.catalog.get(Role::Source, &c.file_type).is_some() {
                hint = format!(
                    "{} is a source connector; pipelines write to {}",
                    c.file_type,
                    names.join(", ")
                );
            }
            return Err(err_at(
                p,
                stored,
                format!("unknown {what} connector \"{}\"", c.file_type),
                Some(hint),
            ));
        };
        for key in options.keys() {
            if !spec.options.iter().any(|o| o.accepts(key)) {
                let keys: Vec<&str> = spec.options.iter().map(|o| o.key).collect();
                let hint = match nearest(key, keys.iter().copied()) {
                    Some(n) => format!("did you mean '{n}'?"),
                    None => format!("{} accepts: {}", spec.name, keys.join(", ")),
                };
                return Err(err_at(
                    p,
                    p.tokens.option_key(key),
                    format!("unknown option '{key}' for {} {what}", spec.name),
                    Some(hint),
                ));
            }
        }
        if let Some(check) = &spec.check {
            check(options, location).map_err(|e| {
                let span = if e.key == "LOCATION" {
                    p.tokens.after_keyword(Keyword::LOCATION)
                } else {
                    p.tokens.option_value(&e.key)
                };
                err_at(p, span, e.message, None)
            })?;
        }
        Ok(spec.name.clone())
    }

    /// The Arrow schema of declared columns, as DataFusion maps SQL types.
    async fn declared_schema(&self, p: &Parsed<'_>, c: &CreateExternalTable) -> Result<SchemaRef, SqlError> {
        let mut c = c.clone();
        c.options.clear();
        let plan = self
            .ctx
            .state()
            .statement_to_plan(DFStatement::CreateExternalTable(c))
            .await
            .map_err(|e| self.df_error(p, e))?;
        match plan {
            LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) => Ok(Arc::new(cmd.schema.as_arrow().clone())),
            other => Err(SqlError::Internal(format!(
                "CREATE EXTERNAL TABLE planned as {}",
                other.display()
            ))),
        }
    }

    async fn source(&mut self, p: &Parsed<'_>, c: &CreateExternalTable, name: &str) -> Result<(), SqlError> {
        let options = self.options(p, c)?;
        let location = self.location(p, c)?;
        let connector = self.check_connector(p, c, Role::Source, &options, &location)?;
        // Two source tables on one LOCATION would split (or silently lose) one input: the
        // second HTTP endpoint of a path is never served. Pipelines share a source by reading
        // the same table.
        if let Some(other) = self
            .program
            .sources
            .values()
            .find(|s| s.connector == connector && s.location == location)
        {
            let at = other
                .defined_at
                .as_ref()
                .map(|l| format!(" (defined at {}:{})", l.file, l.line))
                .unwrap_or_default();
            return Err(err_at(
                p,
                p.tokens.after_keyword(Keyword::LOCATION),
                format!(
                    "source \"{}\"{at} already reads {connector} LOCATION '{location}'",
                    other.name
                ),
                Some(format!(
                    "read \"{}\" from every pipeline that needs it instead of declaring a second source",
                    other.name
                )),
            ));
        }
        if c.columns.is_empty() {
            return Err(err_at(
                p,
                p.tokens.after_keyword(Keyword::TABLE),
                format!("source \"{name}\" declares no columns"),
                Some("list the columns and their types: CREATE UNBOUNDED EXTERNAL TABLE name (col TYPE, ...)".into()),
            ));
        }
        if !c.table_partition_cols.is_empty() {
            return Err(err_at(
                p,
                p.tokens.keyword(Keyword::PARTITIONED),
                "PARTITIONED BY is for sinks, not sources",
                None,
            ));
        }
        let schema = self.declared_schema(p, c).await?;
        let event_time = crate::event_time::from_options(&options, &schema)
            .map_err(|e| err_at(p, p.tokens.option_value(&e.key), e.message, None))?;
        let provider: Arc<dyn TableProvider> = Arc::new(EmptyTable::new(schema.clone()));
        self.ctx
            .register_table(name, provider)
            .map_err(|e| self.df_error(p, e))?;
        let defined_at = p
            .text
            .locate(p.tokens.after_keyword(Keyword::TABLE).unwrap_or(p.tokens.first_span()));
        self.program.sources.insert(
            name.to_string(),
            SourceDef {
                name: name.into(),
                connector,
                location,
                schema,
                options,
                event_time,
                defined_at,
            },
        );
        Ok(())
    }

    async fn sink(&mut self, p: &Parsed<'_>, c: &CreateExternalTable, name: &str) -> Result<(), SqlError> {
        let options = self.options(p, c)?;
        let location = self.location(p, c)?;
        let connector = self.check_connector(p, c, Role::Sink, &options, &location)?;
        let schema = if c.columns.is_empty() {
            Arc::new(Schema::empty())
        } else {
            self.declared_schema(p, c).await?
        };
        let defined_at = p
            .text
            .locate(p.tokens.after_keyword(Keyword::TABLE).unwrap_or(p.tokens.first_span()));
        let partition_by = c
            .table_partition_cols
            .iter()
            .map(|s| s.trim_matches('"').to_string())
            .collect();
        self.program.sinks.insert(
            name.to_string(),
            SinkDef {
                name: name.into(),
                connector,
                location,
                partition_by,
                schema,
                options,
                defined_at,
            },
        );
        Ok(())
    }

    async fn static_table(&mut self, p: &Parsed<'_>, c: &CreateExternalTable, name: &str) -> Result<(), SqlError> {
        let df_format = self.ctx.state().table_factories().contains_key(&c.file_type);
        if !df_format && self.catalog.get(Role::Source, &c.file_type).is_some() {
            return Err(err_at(
                p,
                p.tokens.keyword(Keyword::EXTERNAL),
                format!("{} is an unbounded source connector", c.file_type),
                Some("write CREATE UNBOUNDED EXTERNAL TABLE for a source".into()),
            ));
        }
        let mut c = c.clone();
        let location = self.location(p, &c)?;
        c.locations = vec![location.clone()];
        for (k, v) in c.options.iter_mut() {
            if let Some(s) = v.clone().into_string() {
                let sub = substitute_env(&s).map_err(|m| err_at(p, p.tokens.option_value(k), m, None))?;
                *v = Value::SingleQuotedString(sub);
            }
        }
        let plan = self
            .ctx
            .state()
            .statement_to_plan(DFStatement::CreateExternalTable(c))
            .await
            .map_err(|e| self.df_error(p, e))?;
        self.ctx.execute_logical_plan(plan).await.map_err(|e| {
            let mut err = self.df_error(p, e);
            if let SqlError::Invalid { at, .. } = &mut err {
                *at = p.text.locate(
                    p.tokens
                        .after_keyword(Keyword::LOCATION)
                        .unwrap_or(p.tokens.first_span()),
                );
            }
            err
        })?;
        // Planned with exact sizes (see `StaticTable`): the small side of a join is its build side.
        let provider = self.ctx.table_provider(name).await.map_err(|e| self.df_error(p, e))?;
        self.ctx.deregister_table(name).map_err(|e| self.df_error(p, e))?;
        self.ctx
            .register_table(
                name,
                Arc::new(crate::StaticTable::new(provider).with_location(name, &location)),
            )
            .map_err(|e| self.df_error(p, e))?;
        self.program.static_tables.push(name.to_string());
        Ok(())
    }

    async fn pipeline(&mut self, p: &Parsed<'_>) -> Result<(), SqlError> {
        let Some((sink_name, insert)) = insert_target(p)? else {
            return Err(SqlError::Internal("pipeline statement is not an INSERT".into()));
        };
        let target_span = p.tokens.after_keyword(Keyword::INTO);
        let Some(sink) = self.program.sinks.get(&sink_name).cloned() else {
            let hint = if self.program.sources.contains_key(&sink_name) {
                Some(format!(
                    "\"{sink_name}\" is a source; INSERT INTO a sink declared with CREATE EXTERNAL TABLE ... STORED AS PARQUET"
                ))
            } else {
                let names: Vec<&str> = self.program.sinks.keys().map(String::as_str).collect();
                Some(match nearest(&sink_name, names.iter().copied()) {
                    Some(n) => format!("did you mean \"{n}\"?"),
                    None => {
                        format!("declare it first: CREATE EXTERNAL TABLE {sink_name} STORED AS PARQUET LOCATION '...'")
                    }
                })
            };
            return Err(err_at(
                p,
                target_span,
                format!("unknown sink table \"{sink_name}\""),
                hint,
            ));
        };
        if let Some(prev) = self.program.pipelines.iter().find(|q| q.name == sink_name) {
            let hint = prev
                .defined_at
                .as_ref()
                .map(|l| format!("the first INSERT INTO {sink_name} is at {l}; one pipeline per sink"));
            return Err(err_at(
                p,
                target_span,
                format!("sink \"{sink_name}\" already has a pipeline"),
                hint,
            ));
        }
        if !insert.columns.is_empty() {
            return Err(err_at(
                p,
                target_span,
                "INSERT column lists are not supported",
                Some("alias the SELECT's columns to the sink's column names instead".into()),
            ));
        }
        let Some(query) = insert.source.clone() else {
            return Err(err_at(
                p,
                None,
                "INSERT without a SELECT",
                Some("write INSERT INTO sink SELECT ... FROM source".into()),
            ));
        };
        if matches!(*query.body, SetExpr::Values(_)) {
            return Err(err_at(
                p,
                p.tokens.keyword(Keyword::VALUES),
                "INSERT ... VALUES is not a pipeline",
                Some("a pipeline reads a source: INSERT INTO sink SELECT ... FROM source".into()),
            ));
        }
        let plan = self
            .ctx
            .state()
            .statement_to_plan(DFStatement::Statement(Box::new(SQLStatement::Query(query))))
            .await
            .map_err(|e| self.df_error(p, e))?;

        // Exactly one scan of exactly one source.
        let mut scans = Vec::new();
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                scans.push(scan.table_name.table().to_string());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|e| SqlError::Internal(e.to_string()))?;
        let source_scans: Vec<&String> = scans.iter().filter(|s| self.program.sources.contains_key(*s)).collect();
        let source = match source_scans.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(err_at(
                    p,
                    p.tokens.keyword(Keyword::FROM),
                    format!("pipeline \"{sink_name}\" reads no unbounded source"),
                    Some("a pipeline's FROM names a table declared with CREATE UNBOUNDED EXTERNAL TABLE".into()),
                ));
            }
            many => {
                let names: BTreeSet<&str> = many.iter().map(|s| s.as_str()).collect();
                return Err(err_at(
                    p,
                    p.tokens.keyword(Keyword::FROM),
                    format!(
                        "pipeline \"{sink_name}\" reads unbounded sources more than once ({})",
                        names.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                    Some("join a source only with static tables; stream-stream joins are not supported".into()),
                ));
            }
        };
        let plan = self.fit_to_sink(p, plan, &sink)?;
        let window = self.window(p, &plan, &source)?;

        // A sink without declared columns takes the SELECT's output schema.
        let out_schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        for col in &sink.partition_by {
            if out_schema.field_with_name(col).is_err() {
                let names: Vec<&str> = out_schema.fields().iter().map(|f| f.name().as_str()).collect();
                let hint = match nearest(col, names.iter().copied()) {
                    Some(n) => format!("did you mean \"{n}\"?"),
                    None => format!("the pipeline's columns are: {}", names.join(", ")),
                };
                return Err(err_at(
                    p,
                    target_span,
                    format!("partition column \"{col}\" of sink \"{sink_name}\" is not in the pipeline's output"),
                    Some(hint),
                ));
            }
        }
        if sink.partition_by.len() == out_schema.fields().len() {
            return Err(err_at(
                p,
                target_span,
                format!("every column of sink \"{sink_name}\" is a partition column"),
                Some("a Parquet file needs at least one data column".into()),
            ));
        }
        if let Some(s) = self.program.sinks.get_mut(&sink_name) {
            s.schema = out_schema;
        }
        let defined_at = p.text.locate(target_span.unwrap_or(p.tokens.first_span()));
        self.program.pipelines.push(PipelineDef {
            name: sink_name,
            source,
            plan,
            window,
            defined_at,
        });
        Ok(())
    }

    /// Splits a pipeline at its windowed aggregate, if it has one, and checks that the rest
    /// keeps no state across micro-batches.
    fn window(&self, p: &Parsed<'_>, plan: &LogicalPlan, source: &str) -> Result<Option<WindowDef>, SqlError> {
        let state = self.ctx.state();
        let analyzed = state
            .analyzer()
            .execute_and_check(plan.clone(), state.config_options(), |_, _| {})
            .map_err(|e| self.df_error(p, e))?;
        // SELECT DISTINCT over the source is a GROUP BY without aggregates: windowed like one.
        let mut distinct = false;
        let analyzed = analyzed
            .transform_up(|n| match n {
                LogicalPlan::Distinct(Distinct::All(ref input)) if crate::window::reads(input, source) => {
                    distinct = true;
                    ReplaceDistinctWithAggregate::new().rewrite(n, &OptimizerContext::new())
                }
                other => Ok(Transformed::no(other)),
            })
            .map_err(|e| self.df_error(p, e))?
            .data;
        let event_time = self
            .program
            .sources
            .get(source)
            .and_then(|s| s.event_time.as_ref())
            .map(|e| e.column.as_str());
        let window = crate::window::split(&analyzed, source, event_time).map_err(|e| {
            let keyword = if distinct && e.keyword == Keyword::GROUP { Keyword::DISTINCT } else { e.keyword };
            let message = if distinct { e.message.replace("GROUP BY", "GROUP BY (or DISTINCT)") } else { e.message };
            err_at(p, p.tokens.keyword(keyword), message, e.hint)
        })?;
        match &window {
            None => self.check_stateless(p, plan, source, &format!("the unbounded source \"{source}\""))?,
            Some(w) => {
                self.check_stateless(p, &w.input, source, &format!("the unbounded source \"{source}\""))?;
                self.check_stateless(p, &w.output, WINDOW_TABLE, &format!("the windows of \"{source}\""))?;
            }
        }
        Ok(window)
    }

    /// Rejects operators that need state across micro-batches when they apply to the source.
    fn check_stateless(&self, p: &Parsed<'_>, plan: &LogicalPlan, source: &str, what_reads: &str) -> Result<(), SqlError> {
        let mut bad: Option<(&'static str, Keyword)> = None;
        plan.apply_with_subqueries(|node| {
            let what = match node {
                LogicalPlan::Aggregate(_) => Some(("GROUP BY / aggregate", Keyword::GROUP)),
                LogicalPlan::Window(_) => Some(("window function", Keyword::OVER)),
                LogicalPlan::Sort(_) => Some(("ORDER BY", Keyword::ORDER)),
                LogicalPlan::Limit(_) => Some(("LIMIT", Keyword::LIMIT)),
                LogicalPlan::Distinct(_) => Some(("DISTINCT", Keyword::DISTINCT)),
                _ => None,
            };
            if let Some(w) = what
                && crate::window::reads(node, source)
            {
                bad = Some(w);
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|e| SqlError::Internal(e.to_string()))?;
        match bad {
            None => Ok(()),
            Some((what, kw)) => Err(err_at(
                p,
                p.tokens.keyword(kw),
                format!("{what} over {what_reads} needs state across micro-batches"),
                Some(
                    "state is kept for windows only: GROUP BY date_bin(INTERVAL '1 minute', <event_time>), ... over a source with 'event_time'; drop repeats with the source's 'dedup.key'"
                        .into(),
                ),
            )),
        }
    }

    /// Casts the SELECT's output to the sink's declared columns (by position, like INSERT).
    fn fit_to_sink(&self, p: &Parsed<'_>, plan: LogicalPlan, sink: &SinkDef) -> Result<LogicalPlan, SqlError> {
        if sink.schema.fields().is_empty() {
            return Ok(plan);
        }
        let out = plan.schema().clone();
        let target = &sink.schema;
        let select_span = p.tokens.keyword(Keyword::SELECT);
        if out.fields().len() != target.fields().len() {
            return Err(err_at(
                p,
                select_span,
                format!(
                    "the SELECT gives {} columns but sink \"{}\" declares {}",
                    out.fields().len(),
                    sink.name,
                    target.fields().len()
                ),
                Some(format!(
                    "sink columns: {}",
                    target
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ));
        }
        let mut exprs = Vec::with_capacity(target.fields().len());
        for (i, tf) in target.fields().iter().enumerate() {
            let (q, f) = out.qualified_field(i);
            let col = Expr::Column(Column::new(q.cloned(), f.name()));
            if !arrow::compute::can_cast_types(f.data_type(), tf.data_type()) {
                return Err(err_at(
                    p,
                    select_span,
                    format!(
                        "column {} (\"{}\", {}) cannot be written to sink column \"{}\" ({})",
                        i + 1,
                        f.name(),
                        f.data_type(),
                        tf.name(),
                        tf.data_type()
                    ),
                    Some("CAST the expression in the SELECT".into()),
                ));
            }
            let e = if f.data_type() == tf.data_type() {
                col
            } else {
                datafusion::logical_expr::cast(col, tf.data_type().clone())
            };
            exprs.push(e.alias(tf.name()));
        }
        LogicalPlanBuilder::from(plan)
            .project(exprs)
            .and_then(|b| b.build())
            .map_err(|e| self.df_error(p, e))
    }

    /// Turns a DataFusion error into a located SQL error with a hint where one is possible.
    fn df_error(&self, p: &Parsed<'_>, e: DataFusionError) -> SqlError {
        let diag = e.diagnostic().cloned();
        let span = diag.as_ref().and_then(|d| d.span).map(to_sp);
        let mut hint = diag.as_ref().and_then(|d| d.helps.first().map(|h| h.message.clone()));
        let root = e.find_root();
        if let DataFusionError::SchemaError(err, _) = root
            && let SchemaError::FieldNotFound { field, valid_fields } = err.as_ref()
        {
            let names: Vec<&str> = valid_fields.iter().map(|c| c.name.as_str()).collect();
            hint = Some(match nearest(&field.name, names.iter().copied()) {
                Some(n) => format!("did you mean \"{n}\"?"),
                None => format!("available columns: {}", names.join(", ")),
            });
        }
        let message = match &diag {
            Some(d) => d.message.clone(),
            None => clean_message(&root.to_string()),
        };
        if hint.is_none()
            && let Some(rest) = message.strip_prefix("table '")
        {
            let missing = rest.split('\'').next().unwrap_or_default();
            let names: Vec<&str> = self.defined.keys().map(String::as_str).collect();
            hint = Some(match nearest(missing, names.iter().copied()) {
                Some(n) => format!("did you mean \"{n}\"?"),
                None => format!("declare it with CREATE [UNBOUNDED] EXTERNAL TABLE {missing} ... before the INSERT"),
            });
        }
        let span = span.or_else(|| p.text.locate_message(&root.to_string()).map(|_| Span::empty()));
        let at = match span {
            Some(s) if s != Span::empty() => p.text.locate(s),
            _ => p.text.locate_message(&root.to_string()),
        }
        .or_else(|| p.text.locate(p.tokens.first_span()));
        SqlError::invalid(message, at, hint)
    }
}

fn clean_message(m: &str) -> String {
    let mut m = m.to_string();
    for prefix in [
        "Error during planning: ",
        "Schema error: ",
        "SQL error: ",
        "Invalid or Unsupported Configuration: ",
        "Execution error: ",
    ] {
        if let Some(rest) = m.strip_prefix(prefix) {
            m = rest.to_string();
        }
    }
    strip_position(&m)
}

/// The INSERT target of a statement, if it is an INSERT.
fn insert_target<'s>(
    p: &'s Parsed<'_>,
) -> Result<Option<(String, &'s datafusion::sql::sqlparser::ast::Insert)>, SqlError> {
    let DFStatement::Statement(s) = &p.stmt else {
        return Ok(None);
    };
    let SQLStatement::Insert(insert) = s.as_ref() else {
        return Ok(None);
    };
    let TableObject::TableName(name) = &insert.table else {
        return Err(err_at(
            p,
            p.tokens.after_keyword(Keyword::INTO),
            "INSERT INTO must name a sink table",
            None,
        ));
    };
    let r =
        object_name_to_table_reference(name.clone(), true).map_err(|e| err_at(p, None, e.strip_backtrace(), None))?;
    Ok(Some((r.table().to_string(), insert)))
}

/// Replaces `${NAME}` with the environment variable `NAME`; a missing variable is an error.
pub fn substitute_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated ${{...}} in '{value}'"));
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("'${{{name}}}' is not a valid environment variable reference"));
        }
        match std::env::var(name) {
            Ok(v) => out.push_str(&v),
            Err(_) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// True when a URL-shaped LOCATION carries user information (`scheme://user[:password]@host`).
fn has_credentials(location: &str) -> bool {
    let Some((_, rest)) = location.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@')
}

/// Longest table name accepted (it becomes a file name).
pub const MAX_NAME_BYTES: usize = 128;

/// Why `name` is not a safe path segment (`None` when it is): empty or too long, a path
/// separator, `..`, a leading `.`, a control character.
pub fn unsafe_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("is longer than 128 bytes")
    } else if name.contains(['/', '\\']) {
        Some("holds a path separator ('/' or '\\')")
    } else if name.contains("..") {
        Some("holds '..'")
    } else if name.starts_with('.') {
        Some("starts with '.'")
    } else if name.chars().any(|c| c.is_control()) {
        Some("holds a control character")
    } else if name.contains(':') {
        Some("holds ':'")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_with_credentials_are_recognised() {
        assert!(has_credentials("kafka://user:pw@127.0.0.1:9092/t"));
        assert!(has_credentials("s3://AKIA:secret@bucket/x/"));
        assert!(!has_credentials("s3://bucket/a@b/"));
        assert!(!has_credentials("/var/lib/sluice/in/"));
    }

    #[test]
    fn names_that_are_not_path_segments_are_refused() {
        for bad in ["../../escape", "a/b", "a\\b", "..", ".hidden", "tab\there", "", "c:x"] {
            assert!(unsafe_name(bad).is_some(), "{bad:?}");
        }
        for good in ["orders", "orders_usd", "clicks-2", "v1.events", "Orders"] {
            assert_eq!(unsafe_name(good), None, "{good}");
        }
    }

    #[test]
    fn debug_output_names_options_but_never_shows_their_values() {
        let options: Options = [("s3.secret_access_key".to_string(), "hunter2-secret".to_string())].into();
        let sink = SinkDef {
            name: "out".into(),
            connector: "PARQUET".into(),
            location: "s3://bucket/out/".into(),
            partition_by: vec![],
            schema: Arc::new(Schema::empty()),
            options: options.clone(),
            defined_at: None,
        };
        let source = SourceDef {
            name: "ev".into(),
            connector: "KAFKA".into(),
            location: "127.0.0.1:9092".into(),
            schema: Arc::new(Schema::empty()),
            options,
            event_time: None,
            defined_at: None,
        };
        for text in [format!("{sink:?}"), format!("{source:?}")] {
            assert!(text.contains("s3.secret_access_key"), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
    }

    #[test]
    fn env_substitution() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("SLUICE_TEST_ENV_X", "v") };
        assert_eq!(substitute_env("a/${SLUICE_TEST_ENV_X}/b").unwrap(), "a/v/b");
        assert!(
            substitute_env("${SLUICE_TEST_ENV_MISSING_Y}")
                .unwrap_err()
                .contains("not set")
        );
        assert!(substitute_env("${oops").is_err());
    }
}
