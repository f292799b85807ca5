//! Reading a sink table through its commit log: [`CommittedTable`] is a DataFusion table whose
//! files are exactly the committed ones (added and not removed), never staged or orphaned files.
//! Partition columns come from the log, after the data columns (as Hive readers order them).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema as DfTableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use url::Url;

use crate::error::{EngineError, Result};
use crate::log::commit::{CommitLog, FileAction};
use crate::store::TableStore;

static NEXT_STORE: AtomicUsize = AtomicUsize::new(0);

/// A committed sink table, readable with SQL.
#[derive(Debug)]
pub struct CommittedTable {
    url: ObjectStoreUrl,
    table: TableStore,
    file_schema: SchemaRef,
    partition_fields: Vec<FieldRef>,
    schema: SchemaRef,
    files: Vec<FileAction>,
}

impl CommittedTable {
    /// Reads the log of the table at `location` and registers its store with `ctx`.
    pub async fn open(ctx: &SessionContext, location: &str) -> Result<Self> {
        let table = TableStore::open(location)?;
        let (files, schema) = CommitLog::new(table.clone(), "sluice-query").committed_files().await?;
        let schema = schema.ok_or_else(|| {
            EngineError::config(
                format!("no committed data at '{location}'"),
                Some("the table has no commit yet: check the LOCATION, or wait for the first batch".to_string()),
            )
        })?;
        let mut data = Vec::new();
        let mut parts = Vec::new();
        for c in &schema.columns {
            let dt = DataType::from_str(&c.data_type).map_err(|e| EngineError::CommitLog {
                path: location.to_string(),
                message: format!("column {} has unknown type {}: {e}", c.name, c.data_type),
            })?;
            let f = Arc::new(Field::new(&c.name, dt, c.nullable));
            if schema.partition_by.contains(&c.name) {
                parts.push(f);
            } else {
                data.push(f);
            }
        }
        // Partition columns in PARTITIONED BY order.
        parts.sort_by_key(|f| schema.partition_by.iter().position(|p| p == f.name()));
        let file_schema = Arc::new(Schema::new(data));
        let full = Arc::new(Schema::new(
            file_schema
                .fields()
                .iter()
                .cloned()
                .chain(parts.iter().cloned())
                .collect::<Vec<_>>(),
        ));
        let id = NEXT_STORE.fetch_add(1, Ordering::Relaxed);
        let raw = format!("sluice-table-{id}://store/");
        let url = ObjectStoreUrl::parse(&raw)?;
        let parsed = Url::parse(&raw).map_err(|e| EngineError::Internal(format!("store url {raw}: {e}")))?;
        ctx.register_object_store(&parsed, table.store.clone());
        Ok(CommittedTable {
            url,
            table,
            file_schema,
            partition_fields: parts,
            schema: full,
            files,
        })
    }

    /// The committed files.
    pub fn files(&self) -> &[FileAction] {
        &self.files
    }

    fn partition_values(&self, f: &FileAction) -> datafusion::error::Result<Vec<ScalarValue>> {
        self.partition_fields
            .iter()
            .map(|field| {
                let v = f
                    .partition
                    .iter()
                    .find(|(k, _)| k == field.name())
                    .and_then(|(_, v)| v.clone());
                match v {
                    Some(s) => ScalarValue::try_from_string(s, field.data_type()),
                    None => ScalarValue::try_from(field.data_type()),
                }
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl TableProvider for CommittedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let files = self
            .files
            .iter()
            .map(|f| {
                Ok(PartitionedFile::new(self.table.path(&f.path).to_string(), f.bytes)
                    .with_partition_values(self.partition_values(f)?))
            })
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let n = state.config().target_partitions().max(1);
        let groups = FileGroup::new(files).split_files(n);
        let source = Arc::new(ParquetSource::new(
            DfTableSchema::builder(self.file_schema.clone())
                .with_table_partition_cols(self.partition_fields.clone())
                .build(),
        ));
        let config = FileScanConfigBuilder::new(self.url.clone(), source)
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}
