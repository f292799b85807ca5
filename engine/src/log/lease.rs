//! Writer leases: one writer per pipeline and sink. A second instance of a pipeline must not
//! run recovery on a table another instance writes (it would delete the staged files of the
//! running writer, and both would commit the same source positions).
//!
//! On local disk the lease is an exclusive OS lock (`flock`) on
//! `<sink>/_sluice/lock/<writer>.lock`, taken before recovery touches anything and held for
//! the life of the pipeline. The kernel releases it when the holder exits in any way (kill -9
//! included), so there is no expiry to tune and no stale lease to clean up. Not valid on
//! network filesystems without working `flock` (NFS before v4). Stores that are not local
//! disk have no lease yet (a create-if-absent lease object with renewal comes with S3).

use std::fs::File;

use crate::durability;
use crate::error::{EngineError, Result};
use crate::log::store::TableStore;

/// A held writer lease; dropping it releases it.
#[derive(Debug)]
pub struct WriterLease {
    _file: Option<File>,
}

impl WriterLease {
    /// Takes the lease of `writer` on `table`, or fails with an error naming the holder's lock
    /// when another process holds it.
    pub fn acquire(table: &TableStore, writer: &str) -> Result<Self> {
        let Some(dir) = &table.local_dir else {
            return Ok(WriterLease { _file: None });
        };
        let lock_dir = dir.join("_sluice").join("lock");
        durability::create_dir_all(&lock_dir).map_err(EngineError::io(format!("creating {}", lock_dir.display())))?;
        let path = lock_dir.join(format!("{writer}.lock"));
        match durability::lock_file(&path).map_err(EngineError::io(format!("locking {}", path.display())))? {
            Some(file) => Ok(WriterLease { _file: Some(file) }),
            None => Err(EngineError::config(
                format!(
                    "pipeline {writer} on {} is already running in another process (it holds {})",
                    table.location,
                    path.display()
                ),
                Some(
                    "stop the other instance first; two writers of one pipeline would damage each other's commits"
                        .to_string(),
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableStore::open(dir.path().to_str().unwrap()).unwrap();
        let lease = WriterLease::acquire(&table, "p").unwrap();
        let err = WriterLease::acquire(&table, "p").unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        // Another pipeline on the same table is another writer.
        let _other = WriterLease::acquire(&table, "q").unwrap();
        drop(lease);
        WriterLease::acquire(&table, "p").unwrap();
    }
}
