//! `CREATE EXPECTATION` statements: parsed here (they are not SQL DataFusion knows), checked
//! against the table they name, and planned once.
//!
//! ```sql
//! CREATE EXPECTATION positive_amount ON orders CHECK (amount > 0) ON VIOLATION DEAD_LETTER;
//! CREATE EXPECTATION enough_rows ON orders_usd CHECK (count(*) >= 10) ON VIOLATION FAIL;
//! ```
//!
//! A CHECK without aggregate functions is **row-level**: a boolean per row, evaluated on the
//! batch; a row fails when the CHECK is FALSE (NULL passes, as in SQL CHECK constraints). A
//! CHECK with aggregate functions is **batch-level**: one boolean per micro-batch. The table is
//! a pipeline's source (checked on the decoded records, before the SQL) or its sink (checked on
//! the rows the SQL produced, before the commit).

use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{DataFusionError, SchemaError};
use datafusion::datasource::empty::EmptyTable;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Span, Token};

use crate::error::{SourceLocation, SqlError, nearest};
use crate::text::{PipelineText, StatementTokens, strip_position};

/// The table name a batch-level check's plan scans; the engine binds it to each micro-batch.
pub const EXPECTATION_INPUT: &str = "__sluice_expectation_input";

/// Deepest nesting of parentheses accepted in a CHECK (the parser recurses).
const MAX_CHECK_DEPTH: usize = 32;

/// Most operators accepted in a CHECK: a chain of operators parses in a loop but builds a tree
/// as deep as the chain is long, which later passes walk recursively.
const MAX_CHECK_OPERATORS: usize = 64;

/// Whether a CHECK looks at one row or at the whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// No aggregate functions: one result per row.
    Row,
    /// Aggregate functions: one result per micro-batch.
    Batch,
}

/// What happens to what fails a CHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Row-level: failing rows go to dead letters (stage `expectation`); the rest goes on.
    DeadLetter,
    /// Row-level: failing rows are removed and counted.
    Drop,
    /// Either level: kept, counted, logged once per batch.
    Warn,
    /// Batch-level: the whole batch goes to dead letters; the source position advances.
    Quarantine,
    /// Batch-level: the pipeline stops before the commit; nothing of the batch is lost.
    Fail,
}

impl Action {
    /// The name written in pipeline files, metrics and commit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::DeadLetter => "DEAD_LETTER",
            Action::Drop => "DROP",
            Action::Warn => "WARN",
            Action::Quarantine => "QUARANTINE",
            Action::Fail => "FAIL",
        }
    }

    const ALL: [Action; 5] = [
        Action::DeadLetter,
        Action::Drop,
        Action::Warn,
        Action::Quarantine,
        Action::Fail,
    ];

    /// The actions a check of `level` takes.
    pub fn allowed(level: Level) -> &'static [Action] {
        match level {
            Level::Row => &[Action::DeadLetter, Action::Drop, Action::Warn],
            Level::Batch => &[Action::Warn, Action::Quarantine, Action::Fail],
        }
    }
}

/// One `CREATE EXPECTATION`, checked and planned.
#[derive(Debug, Clone)]
pub struct ExpectationDef {
    /// Its name (unique across the files).
    pub name: String,
    /// The source or sink it checks.
    pub table: String,
    /// The CHECK condition as written.
    pub check: String,
    /// Row or batch.
    pub level: Level,
    /// What a violation does.
    pub action: Action,
    /// The columns it sees (the table's).
    pub schema: SchemaRef,
    /// Row-level: the boolean expression over the columns, qualified by [`EXPECTATION_INPUT`].
    pub expr: Expr,
    /// Batch-level: `SELECT (check) FROM` [`EXPECTATION_INPUT`], one boolean row per batch.
    pub plan: Option<LogicalPlan>,
    /// Where it is defined.
    pub defined_at: Option<SourceLocation>,
}

/// A `CREATE EXPECTATION` as written, before the tables are known.
#[derive(Debug, Clone)]
pub(crate) struct Written<'a> {
    text: &'a PipelineText,
    tokens: StatementTokens<'a>,
    name: String,
    name_span: Span,
    table: String,
    table_span: Span,
    check: String,
    check_span: Span,
    action: String,
    action_span: Span,
}

/// True when a statement starts with `CREATE EXPECTATION`.
pub(crate) fn is_expectation(tokens: &StatementTokens<'_>) -> bool {
    matches!(tokens.tokens, [a, b, ..]
        if matches!(&a.token, Token::Word(w) if w.keyword == Keyword::CREATE)
        && matches!(&b.token, Token::Word(w) if w.value.eq_ignore_ascii_case("EXPECTATION")))
}

fn parse_error(text: &PipelineText, tokens: &StatementTokens<'_>, e: ParserError) -> SqlError {
    let message = strip_position(&e.to_string().replace("sql parser error: ", ""));
    let at = text
        .locate_message(&e.to_string())
        .or_else(|| text.locate(tokens.first_span()));
    let hint = Some(
        "write CREATE EXPECTATION <name> ON <table> CHECK (<condition>) ON VIOLATION <DEAD_LETTER | DROP | WARN | QUARANTINE | FAIL>"
            .to_string(),
    );
    SqlError::invalid(message, at, hint)
}

/// Parses one `CREATE EXPECTATION` statement.
pub(crate) fn parse<'a>(text: &'a PipelineText, tokens: StatementTokens<'a>) -> Result<Written<'a>, SqlError> {
    let err = |e| parse_error(text, &tokens, e);
    let operators = tokens
        .tokens
        .iter()
        .filter(|t| match &t.token {
            Token::Word(w) => matches!(w.keyword, Keyword::AND | Keyword::OR | Keyword::NOT | Keyword::IS | Keyword::LIKE | Keyword::BETWEEN),
            Token::Eq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::Mod
            | Token::StringConcat
            | Token::Ampersand
            | Token::Pipe
            | Token::Caret => true,
            _ => false,
        })
        .count();
    if operators > MAX_CHECK_OPERATORS {
        return Err(SqlError::invalid(
            format!("this CHECK has {operators} operators; at most {MAX_CHECK_OPERATORS} are accepted"),
            text.locate(tokens.first_span()),
            Some("split it into several expectations, or use IN (...) for a list of values".into()),
        ));
    }
    let mut p = Parser::new(&GenericDialect {})
        .with_recursion_limit(MAX_CHECK_DEPTH)
        .with_tokens_with_locations(tokens.tokens.to_vec());
    p.expect_keyword_is(Keyword::CREATE).map_err(err)?;
    p.next_token(); // EXPECTATION
    let name_span = p.peek_token().span;
    let name = p.parse_identifier().map_err(err)?.value;
    p.expect_keyword_is(Keyword::ON).map_err(err)?;
    let table_span = p.peek_token().span;
    let table = p.parse_identifier().map_err(err)?.value.to_lowercase();
    p.expect_keyword_is(Keyword::CHECK).map_err(err)?;
    let open = p.expect_token(&Token::LParen).map_err(err)?;
    let expr = p.parse_expr().map_err(err)?;
    let close = p.expect_token(&Token::RParen).map_err(err)?;
    p.expect_keyword_is(Keyword::ON).map_err(err)?;
    let violation = p.next_token();
    if !matches!(&violation.token, Token::Word(w) if w.value.eq_ignore_ascii_case("VIOLATION")) {
        return Err(SqlError::invalid(
            format!("expected VIOLATION, found {}", violation.token),
            text.locate(violation.span),
            Some("write ON VIOLATION <action> after the CHECK".into()),
        ));
    }
    let action_span = p.peek_token().span;
    let action = p.parse_identifier().map_err(err)?.value;
    let rest = p.next_token();
    if rest.token != Token::EOF {
        return Err(SqlError::invalid(
            format!("unexpected {} after the action", rest.token),
            text.locate(rest.span),
            Some("end the statement with ;".into()),
        ));
    }
    Ok(Written {
        text,
        tokens,
        name,
        name_span,
        table,
        table_span,
        check: expr.to_string(),
        check_span: Span::new(open.span.end, close.span.start),
        action,
        action_span,
    })
}

impl Written<'_> {
    fn at(&self, span: Span) -> Option<SourceLocation> {
        self.text
            .locate(span)
            .or_else(|| self.text.locate(self.tokens.first_span()))
    }

    /// Where the expectation is defined (its name).
    pub(crate) fn defined_at(&self) -> Option<SourceLocation> {
        self.at(self.name_span)
    }

    /// Its name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// An error at the expectation's name.
    pub(crate) fn error_at_name(&self, message: String, hint: Option<String>) -> SqlError {
        SqlError::invalid(message, self.at(self.name_span), hint)
    }

    /// Its table.
    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// An error at the table name.
    pub(crate) fn error_at_table(&self, message: String, hint: Option<String>) -> SqlError {
        SqlError::invalid(message, self.at(self.table_span), hint)
    }

    /// Checks and plans the expectation against the columns of its table.
    pub(crate) async fn plan(&self, schema: SchemaRef) -> Result<ExpectationDef, SqlError> {
        let ctx = crate::session();
        ctx.register_table(EXPECTATION_INPUT, Arc::new(EmptyTable::new(schema.clone())))
            .map_err(|e| SqlError::Internal(format!("registering an expectation's input: {e}")))?;
        let sql = format!("SELECT ({}) AS ok FROM {EXPECTATION_INPUT}", self.check);
        let plan = match ctx.sql(&sql).await {
            Ok(df) => df.into_unoptimized_plan(),
            Err(e) => return Err(self.check_error(e)),
        };
        if let Some(what) = unsupported(&plan) {
            return Err(SqlError::invalid(
                format!("expectation \"{}\": a CHECK cannot hold {what}", self.name),
                self.at(self.check_span),
                Some("a CHECK reads the columns of one batch: per row, or through aggregate functions".into()),
            ));
        }
        let level = if has_aggregate(&plan) { Level::Batch } else { Level::Row };
        let out = plan.schema().field(0).data_type().clone();
        if out != DataType::Boolean && out != DataType::Null {
            return Err(SqlError::invalid(
                format!("the CHECK of expectation \"{}\" is {out}, not a boolean condition", self.name),
                self.at(self.check_span),
                Some("write a condition, e.g. CHECK (amount > 0)".into()),
            ));
        }
        let action = self.action(level)?;
        let expr = match &plan {
            LogicalPlan::Projection(p) => p.expr[0].clone().unalias(),
            _ => return Err(SqlError::Internal("an expectation's plan is not a projection".into())),
        };
        Ok(ExpectationDef {
            name: self.name.clone(),
            table: self.table.clone(),
            check: self.check.clone(),
            level,
            action,
            schema,
            expr,
            plan: (level == Level::Batch).then_some(plan),
            defined_at: self.defined_at(),
        })
    }

    fn action(&self, level: Level) -> Result<Action, SqlError> {
        let upper = self.action.to_uppercase();
        let Some(action) = Action::ALL.iter().copied().find(|a| a.as_str() == upper) else {
            let names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
            let hint = match nearest(&upper, names.iter().copied()) {
                Some(n) => format!("did you mean {n}?"),
                None => format!("the actions are {}", names.join(", ")),
            };
            return Err(SqlError::invalid(
                format!("unknown action {}", self.action),
                self.at(self.action_span),
                Some(hint),
            ));
        };
        if !Action::allowed(level).contains(&action) {
            let allowed: Vec<&str> = Action::allowed(level).iter().map(|a| a.as_str()).collect();
            let (what, other) = match level {
                Level::Row => (
                    "a row-level CHECK (no aggregate functions)",
                    "over the whole batch (with aggregate functions)",
                ),
                Level::Batch => ("a batch-level CHECK (aggregate functions)", "per row"),
            };
            return Err(SqlError::invalid(
                format!("{} does not fit {what}", action.as_str()),
                self.at(self.action_span),
                Some(format!(
                    "{what} takes {}; {} is for a check {other}",
                    allowed.join(", "),
                    action.as_str()
                )),
            ));
        }
        Ok(action)
    }

    fn check_error(&self, e: DataFusionError) -> SqlError {
        let root = e.find_root();
        let mut hint = Some(
            "a CHECK is either per row (no aggregate functions) or over the whole batch (every column inside an aggregate function)"
                .to_string(),
        );
        if let DataFusionError::SchemaError(err, _) = root
            && let SchemaError::FieldNotFound { field, valid_fields } = err.as_ref()
        {
            let names: Vec<&str> = valid_fields.iter().map(|c| c.name.as_str()).collect();
            hint = Some(match nearest(&field.name, names.iter().copied()) {
                Some(n) => format!("did you mean \"{n}\"?"),
                None => format!("the columns of \"{}\" are {}", self.table, names.join(", ")),
            });
            return SqlError::invalid(
                format!("expectation \"{}\": table \"{}\" has no column \"{}\"", self.name, self.table, field.name),
                self.at(self.check_span),
                hint,
            );
        }
        let message = strip_position(&root.to_string())
            .replace(&format!("{EXPECTATION_INPUT}."), "")
            .replace(EXPECTATION_INPUT, &self.table);
        let message = message
            .strip_prefix("Error during planning: ")
            .unwrap_or(&message)
            .to_string();
        SqlError::invalid(
            format!("expectation \"{}\": {message}", self.name),
            self.at(self.check_span),
            hint,
        )
    }
}

/// What a CHECK's plan holds that expectations do not run: a subquery or a window function.
fn unsupported(plan: &LogicalPlan) -> Option<&'static str> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        found = match node {
            LogicalPlan::Projection(_) | LogicalPlan::Aggregate(_) | LogicalPlan::TableScan(_) => None,
            LogicalPlan::Window(_) => Some("a window function"),
            _ => Some("a subquery"),
        };
        Ok(if found.is_some() { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    if found.is_none() {
        let _ = plan.apply_expressions(|e| {
            if e.exists(|x| Ok(matches!(x, Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_))))
                .unwrap_or(false)
            {
                found = Some("a subquery");
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    found
}

fn has_aggregate(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Aggregate(_) => true,
        other => other.inputs().iter().any(|p| has_aggregate(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_fit_their_level() {
        assert!(Action::allowed(Level::Row).contains(&Action::DeadLetter));
        assert!(!Action::allowed(Level::Row).contains(&Action::Quarantine));
        assert!(Action::allowed(Level::Batch).contains(&Action::Fail));
    }
}
