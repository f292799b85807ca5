//! Static tables as the planner sees them: read whole at each scan and handed over as
//! in-memory batches, so every plan knows their exact size.
//!
//! A static table is small by contract (an enrichment table joined to a stream). Read through
//! its own format it has no statistics (a CSV file has no row count), so DataFusion's join
//! selection cannot tell it from the stream: it would build the hash table on the stream's
//! micro-batch and hash-repartition every event to probe it with a few rows. With exact sizes
//! the small table becomes the build side, collected once per plan, and the stream's
//! partitions flow through the join as they are. The table is still read at every scan, so a
//! change to its file is seen by the next micro-batch, as before.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::{ExecutionPlan, collect};

/// A static table read whole at each scan into memory (see the module docs).
#[derive(Debug)]
pub struct StaticTable {
    inner: Arc<dyn TableProvider>,
    /// The table's name and its LOCATION when that is a local path, checked at each scan.
    local: Option<(String, std::path::PathBuf)>,
}

impl StaticTable {
    /// Wraps the provider DataFusion made for the table's format.
    pub fn new(inner: Arc<dyn TableProvider>) -> Self {
        StaticTable { inner, local: None }
    }

    /// The provider DataFusion made for the table's format (a listing table: what a remote
    /// engine such as Ballista can serialise and read).
    pub fn inner(&self) -> &Arc<dyn TableProvider> {
        &self.inner
    }

    /// Checks at each scan that a local LOCATION still exists. Without the check a missing
    /// file reads as an empty table (DataFusion lists no files), and a join with it silently
    /// drops every row; with it, the scan fails, which the engine retries as an environment
    /// failure.
    pub fn with_location(mut self, name: &str, location: &str) -> Self {
        let path = location.strip_prefix("file://").unwrap_or(location);
        if !path.contains("://") {
            self.local = Some((name.to_string(), std::path::PathBuf::from(path)));
        }
        self
    }
}

#[async_trait::async_trait]
impl TableProvider for StaticTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some((name, path)) = &self.local
            && !path.exists()
        {
            return Err(datafusion::error::DataFusionError::Execution(format!(
                "static table {name}: its LOCATION {} does not exist",
                path.display()
            )));
        }
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        let schema = plan.schema();
        let batches = collect(plan, state.task_ctx()).await?;
        let exec: Arc<dyn ExecutionPlan> = MemorySourceConfig::try_new_exec(&[batches], schema, None)?;
        Ok(exec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::{CsvReadOptions, SessionContext};

    /// The plan of a stream-sized table joined to a 3-row CSV table, with the CSV table
    /// registered as DataFusion reads it or wrapped as a [`StaticTable`].
    async fn join_plan(dir: &std::path::Path, wrapped: bool) -> String {
        let csv = dir.join("fx.csv");
        std::fs::write(&csv, "currency,rate\nEUR,1.1\nGBP,1.3\nUSD,1.0\n").unwrap();
        let ctx = SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(2));
        ctx.register_csv("fx", csv.to_str().unwrap(), CsvReadOptions::new())
            .await
            .unwrap();
        if wrapped {
            let inner = ctx.table_provider("fx").await.unwrap();
            ctx.deregister_table("fx").unwrap();
            ctx.register_table("fx", Arc::new(StaticTable::new(inner))).unwrap();
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("currency", DataType::Utf8, true),
        ]));
        let n = 50_000;
        let part = |k: i64| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values((0..n).map(|i| i * 2 + k))),
                    Arc::new(StringArray::from_iter_values(
                        (0..n).map(|i| ["EUR", "GBP", "USD"][i as usize % 3]),
                    )),
                ],
            )
            .unwrap()
        };
        let orders = MemTable::try_new(schema.clone(), vec![vec![part(0)], vec![part(1)]]).unwrap();
        ctx.register_table("orders", Arc::new(orders)).unwrap();
        let df = ctx
            .sql("SELECT o.id, fx.rate FROM orders o JOIN fx ON o.currency = fx.currency")
            .await
            .unwrap();
        let rows: usize = df.clone().collect().await.unwrap().iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 2 * n as usize, "every order finds its rate");
        let plan = df.create_physical_plan().await.unwrap();
        displayable(plan.as_ref()).indent(true).to_string()
    }

    #[tokio::test]
    async fn the_static_table_is_the_build_side_and_the_stream_is_not_repartitioned() {
        let dir = tempfile::tempdir().unwrap();
        let bare = join_plan(dir.path(), false).await;
        assert!(
            bare.contains("RepartitionExec: partitioning=Hash"),
            "without sizes DataFusion hash-repartitions the stream:\n{bare}"
        );
        let plan = join_plan(dir.path(), true).await;
        assert!(plan.contains("HashJoinExec: mode=CollectLeft"), "{plan}");
        assert!(
            !plan.contains("RepartitionExec"),
            "the stream's partitions flow through:\n{plan}"
        );
        let build = plan
            .lines()
            .skip_while(|l| !l.contains("HashJoinExec"))
            .nth(1)
            .unwrap_or_default();
        assert!(
            build.contains("DataSourceExec: partitions=1"),
            "the first child (build side) is the static table:\n{plan}"
        );
    }
}
