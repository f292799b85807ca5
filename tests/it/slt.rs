//! Runs the `.slt` files under `tests/slt/` with sqllogictest-rs against the pipeline front end.
//!
//! Each record is one pipeline-file fragment named `input.sql`; the records accepted before it
//! are passed as earlier files, so later records can use the tables they define. Error records
//! assert the message and its `input.sql:LINE:COLUMN` position. `SHOW PIPELINES` (a test-only
//! command) lists each pipeline's source and output columns.

use sluice_sql::{PipelineText, compile, session};
use sqllogictest::{DBOutput, DefaultColumnType};

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

#[derive(Default)]
struct FrontEnd {
    accepted: Vec<String>,
}

impl FrontEnd {
    async fn program(&self, extra: Option<&str>) -> Result<sluice_sql::Program, SltError> {
        let mut texts = Vec::new();
        for (i, s) in self.accepted.iter().enumerate() {
            texts.push(PipelineText::new(format!("prior-{i}.sql"), s.clone()).map_err(|e| SltError(e.to_string()))?);
        }
        if let Some(sql) = extra {
            texts.push(PipelineText::new("input.sql", sql).map_err(|e| SltError(e.to_string()))?);
        }
        let catalog = sluice_connectors::registry().catalog();
        compile(&session(), &catalog, &texts)
            .await
            .map_err(|e| SltError(e.to_string()))
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for FrontEnd {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        if sql.trim().eq_ignore_ascii_case("SHOW PIPELINES") {
            let program = self.program(None).await?;
            let rows = program
                .pipelines
                .iter()
                .map(|p| {
                    let cols = program.sinks[&p.name]
                        .schema
                        .fields()
                        .iter()
                        .map(|f| format!("{}:{}", f.name(), f.data_type()))
                        .collect::<Vec<_>>()
                        .join(",");
                    vec![p.name.clone(), p.source.clone(), cols]
                })
                .collect();
            return Ok(DBOutput::Rows {
                types: vec![DefaultColumnType::Text; 3],
                rows,
            });
        }
        self.program(Some(sql)).await?;
        self.accepted.push(sql.to_string());
        Ok(DBOutput::StatementComplete(0))
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "sluice-sql"
    }
}

#[tokio::test]
async fn slt_files() {
    let dir = crate::harness::repo_root().join("tests/slt");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    for f in files {
        let mut runner = sqllogictest::Runner::new(|| async { Ok(FrontEnd::default()) });
        if let Err(e) = runner.run_file_async(&f).await {
            panic!("{}: {}", f.display(), e.display(true));
        }
    }
}
