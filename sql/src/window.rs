//! Windowed aggregation (DESIGN §3): a pipeline whose SELECT groups its source by
//! `date_bin(<width>, <event_time>)` is split at its aggregate into the per-row part below it
//! (run on every micro-batch), the aggregate (kept as partial state per open window by the
//! engine) and the part above it (run over the windows the watermark closes, reading
//! [`WINDOW_TABLE`]). Everything here is planning; the engine owns the state.

use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::provider_as_source;
use datafusion::error::DataFusionError;
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};

/// The table the part of a windowed pipeline above its aggregate reads: the closed windows.
pub const WINDOW_TABLE: &str = "__sluice_windows";

/// The most windows one row may count in (hopping width / slide).
pub const MAX_HOPS: i64 = 1000;

/// A windowed pipeline, split at its aggregate.
#[derive(Debug, Clone)]
pub struct WindowDef {
    /// The per-row part: the aggregate's input, reading the source.
    pub input: LogicalPlan,
    /// GROUP BY expressions over `input`'s schema; one of them is the window.
    pub group_by: Vec<Expr>,
    /// Aggregate expressions over `input`'s schema.
    pub aggregates: Vec<Expr>,
    /// Which of `group_by` is the window start (`date_bin(width, event_time)`).
    pub window: usize,
    /// The window width in nanoseconds.
    pub width_ns: i64,
    /// For hopping windows (`hop(slide, width, event_time)`), how far apart windows start
    /// (nanoseconds; divides the width); `None` for tumbling windows.
    pub slide_ns: Option<i64>,
    /// What the aggregate emits per closed group: the GROUP BY values, then each aggregate's
    /// value (columns named `c0`, `c1`, ...), as [`WINDOW_TABLE`] has them.
    pub emitted: SchemaRef,
    /// The part above the aggregate, reading [`WINDOW_TABLE`].
    pub output: LogicalPlan,
}

/// One aggregate lowered to its physical form.
#[derive(Debug, Clone)]
pub struct LoweredAggregate {
    /// The aggregate function with its arguments.
    pub function: Arc<AggregateFunctionExpr>,
    /// What its accumulator is fed: the arguments, then any ORDER BY expressions.
    pub inputs: Vec<Arc<dyn PhysicalExpr>>,
    /// Its `FILTER (WHERE ...)`, if any.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// The physical expressions of a [`WindowDef`], over `input`'s output.
#[derive(Debug, Clone)]
pub struct Lowered {
    /// The GROUP BY expressions.
    pub group_by: Vec<Arc<dyn PhysicalExpr>>,
    /// The aggregates.
    pub aggregates: Vec<LoweredAggregate>,
}

/// A duration in nanoseconds as people write it (`90s`, `5m`, `1h`).
fn human(ns: i64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        _ if ns % 1_000_000_000 != 0 => format!("{}ms", ns / 1_000_000),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

impl WindowDef {
    /// One line saying what the window is (`tumbling 1m`, `hopping 5m every 1m`).
    pub fn describe(&self) -> String {
        match self.slide_ns {
            None => format!("tumbling {}", human(self.width_ns)),
            Some(slide) => format!("hopping {} every {}", human(self.width_ns), human(slide)),
        }
    }

    /// Lowers the GROUP BY and aggregate expressions to physical ones.
    pub fn lower(&self, props: &ExecutionProps) -> Result<Lowered, DataFusionError> {
        let schema = self.input.schema();
        let arrow_schema = schema.as_arrow();
        let ctx = PhysicalPlanningContext::default();
        let group_by = self
            .group_by
            .iter()
            .map(|e| create_physical_expr(e, schema, props, &ctx))
            .collect::<Result<Vec<_>, DataFusionError>>()?;
        let aggregates = self
            .aggregates
            .iter()
            .map(|e| lower_aggregate(e, schema, arrow_schema, props, &ctx))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Lowered { group_by, aggregates })
    }
}

fn lower_aggregate(
    e: &Expr,
    schema: &DFSchema,
    arrow_schema: &Schema,
    props: &ExecutionProps,
    ctx: &PhysicalPlanningContext,
) -> Result<LoweredAggregate, DataFusionError> {
    let lowered = LoweredAggregateBuilder::new(e, schema, arrow_schema, props, ctx).build()?;
    let mut inputs = lowered.aggregate.expressions();
    inputs.extend(lowered.order_bys.iter().map(|s| s.expr.clone()));
    Ok(LoweredAggregate {
        function: lowered.aggregate,
        inputs,
        filter: lowered.filter,
    })
}

/// Aggregates whose result depends on the order of their input unless they are given one
/// (which they keep in their partial state, so it merges across micro-batches).
const ORDER_DEPENDENT: [&str; 3] = ["first_value", "last_value", "array_agg"];

/// Aggregates that depend on input order and cannot keep it in their state: unordered they
/// depend on arrival, ordered they need their input sorted.
const NEVER_IN_ORDER: [&str; 2] = ["nth_value", "string_agg"];

/// Why a pipeline's aggregate cannot run as a streaming window: the message, the SQL keyword
/// to point at and a hint.
#[derive(Debug, Clone)]
pub struct WindowError {
    /// What is wrong.
    pub message: String,
    /// The keyword of the clause at fault (`GROUP`, `ORDER`, ...).
    pub keyword: datafusion::sql::sqlparser::keywords::Keyword,
    /// How to fix it.
    pub hint: Option<String>,
}

fn refuse(
    keyword: datafusion::sql::sqlparser::keywords::Keyword,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> WindowError {
    WindowError {
        message: message.into(),
        keyword,
        hint: Some(hint.into()),
    }
}

/// A constant interval in nanoseconds (no months: their length varies).
fn interval_ns(e: &Expr) -> Option<i64> {
    let mut e = e;
    while let Expr::Cast(c) = e {
        e = &c.expr;
    }
    let ns = match e {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) if v.months == 0 => {
            (v.days as i64).checked_mul(86_400_000_000_000)?.checked_add(v.nanoseconds)?
        }
        Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _) => {
            (v.days as i64)
                .checked_mul(86_400_000)?
                .checked_add(v.milliseconds as i64)?
                .checked_mul(1_000_000)?
        }
        _ => return None,
    };
    (ns > 0).then_some(ns)
}

/// The window of `e`: (width, slide) when it is `date_bin(<interval>, <event_time>[, origin])`
/// (tumbling) or `hop(<slide>, <width>, <event_time>)` (hopping).
fn window_of(e: &Expr, event_time: &str) -> Option<(i64, Option<i64>)> {
    let Expr::ScalarFunction(f) = e.clone().unalias_nested().data else {
        return None;
    };
    // The event-time column itself, at most cast to another timestamp type.
    let on_event_time = |arg: &Expr| {
        let mut arg = arg;
        while let Expr::Cast(c) = arg {
            if !matches!(c.field.data_type(), arrow::datatypes::DataType::Timestamp(_, _)) {
                return false;
            }
            arg = &c.expr;
        }
        matches!(arg, Expr::Column(Column { name, .. }) if name == event_time)
    };
    match (f.func.name(), f.args.as_slice()) {
        ("date_bin", [width, ts, ..]) if on_event_time(ts) => Some((interval_ns(width)?, None)),
        ("hop", [slide, width, ts]) if on_event_time(ts) => {
            let (slide, width) = (interval_ns(slide)?, interval_ns(width)?);
            (width % slide == 0).then_some((width, Some(slide)))
        }
        _ => None,
    }
}

/// `e`, or, when it is a column the projection just below defines (`SELECT DISTINCT date_bin(..)
/// AS w, ...` becomes a GROUP BY on `w`), that column's expression.
fn defined(e: &Expr, input: &LogicalPlan) -> Expr {
    if let (Expr::Column(c), LogicalPlan::Projection(p)) = (e, input)
        && let Some(def) = p
            .expr
            .iter()
            .enumerate()
            .find_map(|(i, x)| (Column::from(p.schema.qualified_field(i)) == *c).then_some(x))
    {
        return def.clone().unalias_nested().data;
    }
    e.clone()
}

/// Whether `plan` scans `table`.
pub(crate) fn reads(plan: &LogicalPlan, table: &str) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|n| {
        if matches!(n, LogicalPlan::TableScan(s) if s.table_name.table() == table) {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Splits `plan` (analyzed: types coerced) at its aggregate over `source`, whose event time is
/// `event_time`. `Ok(None)` when no aggregate reads the source. The caller checks that the
/// parts below and above the aggregate are stateless.
pub fn split(plan: &LogicalPlan, source: &str, event_time: Option<&str>) -> Result<Option<WindowDef>, WindowError> {
    use datafusion::sql::sqlparser::keywords::Keyword;
    let mut aggregates = Vec::new();
    let _ = plan.apply_with_subqueries(|n| {
        if let LogicalPlan::Aggregate(a) = n
            && reads(&a.input, source)
        {
            aggregates.push(a.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let agg = match aggregates.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        _ => {
            return Err(refuse(
                Keyword::GROUP,
                format!("the pipeline aggregates the unbounded source \"{source}\" more than once"),
                "one windowed GROUP BY per pipeline: aggregate further downstream, in a second pipeline reading the first one's sink",
            ));
        }
    };
    let Some(event_time) = event_time else {
        return Err(refuse(
            Keyword::GROUP,
            format!("GROUP BY over the unbounded source \"{source}\" needs event time, and \"{source}\" declares none"),
            "add OPTIONS ('event_time' '<timestamp column>', 'watermark.delay' '10s') to the source and GROUP BY date_bin(INTERVAL '1 minute', <that column>), ...",
        ));
    };
    if agg.group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
        return Err(refuse(
            Keyword::GROUP,
            "GROUPING SETS, ROLLUP and CUBE are not supported over an unbounded source",
            "group by the window and plain columns",
        ));
    }
    let window = agg
        .group_expr
        .iter()
        .enumerate()
        .find_map(|(i, e)| window_of(&defined(e, &agg.input), event_time).map(|w| (i, w)));
    let Some((window, (width_ns, slide_ns))) = window else {
        return Err(refuse(
            Keyword::GROUP,
            format!("GROUP BY over the unbounded source \"{source}\" has no window"),
            format!(
                "group by date_bin(INTERVAL '1 minute', {event_time}) (tumbling) or hop(INTERVAL '1 minute', INTERVAL '5 minutes', {event_time}) (hopping; the width a multiple of the slide): a window closes once the watermark passes its end"
            ),
        ));
    };
    if let Some(slide) = slide_ns
        && width_ns / slide > MAX_HOPS
    {
        return Err(refuse(
            Keyword::GROUP,
            format!(
                "a hopping window {} wide every {} puts each row in {} windows (at most {MAX_HOPS})",
                human(width_ns),
                human(slide),
                width_ns / slide
            ),
            "use a wider slide, or a tumbling window",
        ));
    }
    // Every aggregate must have a mergeable partial form that does not depend on row order.
    let props = ExecutionProps::new();
    let input_schema = agg.input.schema();
    let ctx = PhysicalPlanningContext::default();
    for e in &agg.aggr_expr {
        let name = match e.clone().unalias_nested().data {
            Expr::AggregateFunction(AggregateFunction { func, .. }) => func.name().to_string(),
            other => other.schema_name().to_string(),
        };
        let lowered = lower_aggregate(e, input_schema, input_schema.as_arrow(), &props, &ctx).map_err(|err| {
            refuse(
                Keyword::SELECT,
                format!("aggregate {name} cannot be planned: {}", err.strip_backtrace()),
                "use an aggregate with a partial form: count, sum, min, max, avg, approx_distinct, approx_percentile_cont, ...",
            )
        })?;
        // WITHIN GROUP (ORDER BY x) names the input of an ordered-set aggregate
        // (approx_percentile_cont): its result does not depend on arrival order.
        if lowered.function.order_sensitivity() == AggregateOrderSensitivity::HardRequirement
            && !lowered.function.fun().supports_within_group_clause()
        {
            return Err(refuse(
                Keyword::SELECT,
                format!("aggregate {name} needs its input sorted, which a stream cannot give it across micro-batches"),
                "use an aggregate that keeps its own order (first_value, last_value, array_agg with ORDER BY) or an order-insensitive one",
            ));
        }
        if NEVER_IN_ORDER.contains(&name.as_str()) {
            return Err(refuse(
                Keyword::SELECT,
                format!("aggregate {name} depends on the order of its input, which a stream cut into micro-batches cannot keep for it"),
                format!("use first_value, last_value or array_agg(... ORDER BY {event_time}), which keep their order in their state"),
            ));
        }
        if ORDER_DEPENDENT.contains(&name.as_str()) && lowered.function.order_bys().is_empty() {
            return Err(refuse(
                Keyword::SELECT,
                format!("aggregate {name} without ORDER BY depends on the order rows reach it, which differs with how the stream is cut into micro-batches"),
                format!("give it an order: {name}(... ORDER BY {event_time})"),
            ));
        }
        lowered.function.state_fields().map_err(|err| {
            refuse(
                Keyword::SELECT,
                format!("aggregate {name} has no partial state: {}", err.strip_backtrace()),
                "use an aggregate with a partial form: count, sum, min, max, avg, approx_distinct, ...",
            )
        })?;
    }
    // The part above reads the emitted windows: a scan of WINDOW_TABLE (columns c0, c1, ...)
    // renamed back to the aggregate's qualified output columns.
    let out = agg.schema.clone();
    let emitted: SchemaRef = Arc::new(Schema::new(
        out.fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), f.is_nullable()))
            .collect::<Vec<_>>(),
    ));
    let internal = |e: DataFusionError| refuse(Keyword::GROUP, format!("planning the window: {e}"), "");
    let scan = LogicalPlanBuilder::scan(
        WINDOW_TABLE,
        provider_as_source(Arc::new(EmptyTable::new(emitted.clone()))),
        None,
    )
    .and_then(|b| {
        b.project((0..out.fields().len()).map(|i| {
            let (q, f) = out.qualified_field(i);
            Expr::Column(Column::new_unqualified(format!("c{i}"))).alias_qualified(q.cloned(), f.name())
        }))
    })
    .and_then(|b| b.build())
    .map_err(internal)?;
    let output = plan
        .clone()
        .transform_up_with_subqueries(|n| match n {
            LogicalPlan::Aggregate(a) if a == agg => Ok(Transformed::yes(scan.clone())),
            other => Ok(Transformed::no(other)),
        })
        .map_err(internal)?
        .data;
    // The rebuilt nodes above keep their schemas: the renaming projection matches the
    // aggregate's output exactly.
    let output = output.recompute_schema().map_err(internal)?;
    if reads(&output, source) {
        return Err(refuse(
            Keyword::FROM,
            format!("the pipeline reads the unbounded source \"{source}\" outside its windowed GROUP BY too"),
            "read the source once, under the GROUP BY; join the windows only with static tables",
        ));
    }
    Ok(Some(WindowDef {
        input: agg.input.as_ref().clone(),
        group_by: agg.group_expr.clone(),
        aggregates: agg.aggr_expr.clone(),
        window,
        width_ns,
        slide_ns,
        emitted,
        output,
    }))
}

/// `hop(slide, width, ts)`: the GROUP BY key of hopping windows. A row belongs to every window
/// `[start, start + width)` whose start is a multiple of `slide` (from the Unix epoch) and
/// that contains `ts`; the engine counts it in each. Evaluated as a plain function (outside a
/// streaming GROUP BY) it gives the newest of those starts, `date_bin(slide, ts)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    signature: datafusion::logical_expr::Signature,
}

impl Default for Hop {
    fn default() -> Self {
        Hop {
            signature: datafusion::logical_expr::Signature::any(3, datafusion::logical_expr::Volatility::Immutable),
        }
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for Hop {
    fn name(&self) -> &str {
        "hop"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, args: &[arrow::datatypes::DataType]) -> Result<arrow::datatypes::DataType, DataFusionError> {
        match args {
            [_, _, t @ arrow::datatypes::DataType::Timestamp(_, _)] => Ok(t.clone()),
            _ => Err(DataFusionError::Plan(
                "hop(slide INTERVAL, width INTERVAL, event_time TIMESTAMP) takes two constant intervals and a timestamp"
                    .into(),
            )),
        }
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<datafusion::logical_expr::ColumnarValue, DataFusionError> {
        use arrow::array::AsArray;
        use datafusion::logical_expr::ColumnarValue;
        let slide = match &args.args[0] {
            ColumnarValue::Scalar(v) => interval_ns(&Expr::Literal(v.clone(), None)),
            ColumnarValue::Array(_) => None,
        }
        .ok_or_else(|| DataFusionError::Execution("hop: the slide must be a constant interval".into()))?;
        let ts = args.args[2].to_array(args.number_rows)?;
        let ty = ts.data_type().clone();
        let ns = arrow::compute::cast(&ts, &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None))?;
        let starts: arrow::array::TimestampNanosecondArray = ns
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>()
            .unary(|t| t.saturating_sub(t.rem_euclid(slide)));
        Ok(ColumnarValue::Array(arrow::compute::cast(&starts, &ty)?))
    }
}

/// Registers Sluice's window functions (`hop`) in `ctx`.
pub fn register_functions(ctx: &datafusion::prelude::SessionContext) {
    ctx.register_udf(datafusion::logical_expr::ScalarUDF::new_from_impl(Hop::default()));
}
