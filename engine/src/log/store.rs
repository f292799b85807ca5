//! Where a table lives: an object store and the table's root inside it, plus the fixed layout
//! of DESIGN §4 (`_sluice/log`, `_sluice/staging`, `_sluice/dead_letter`).

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path;

use super::local::DurableLocalStore;
use crate::error::{EngineError, Result};

/// A table's object store and root path.
#[derive(Debug, Clone)]
pub struct TableStore {
    /// The store holding the table.
    pub store: Arc<dyn ObjectStore>,
    /// The table's root inside the store (empty for a store rooted at the table).
    pub root: Path,
    /// The LOCATION the table was opened from, for messages.
    pub location: String,
    /// The table's directory when it is on local disk (writer leases are OS locks there).
    pub local_dir: Option<std::path::PathBuf>,
}

impl TableStore {
    /// Opens the table at `location`: a local path (absolute or relative to the working
    /// directory) or a `file://` URL. The directory is created when missing. Writes through
    /// the store are durable when they return ([`DurableLocalStore`]).
    pub fn open(location: &str) -> Result<Self> {
        let local = if let Some(rest) = location.strip_prefix("file://") {
            rest.to_string()
        } else if location.contains("://") {
            let scheme = location.split("://").next().unwrap_or_default();
            return Err(EngineError::config(
                format!("unsupported location scheme \"{scheme}://\" in '{location}'"),
                Some("use a local path or a file:// URL".to_string()),
            ));
        } else {
            location.to_string()
        };
        crate::durability::create_dir_all(std::path::Path::new(&local))
            .map_err(EngineError::io(format!("creating table directory {local}")))?;
        let store = DurableLocalStore::new(std::path::Path::new(&local))
            .map_err(EngineError::store(format!("opening {local}")))?;
        Ok(TableStore {
            store: Arc::new(store),
            root: Path::default(),
            location: location.to_string(),
            local_dir: Some(std::path::PathBuf::from(local)),
        })
    }

    /// A store already built (tests, custom stores), rooted at `root`.
    pub fn from_store(store: Arc<dyn ObjectStore>, root: Path, location: impl Into<String>) -> Self {
        TableStore {
            store,
            root,
            location: location.into(),
            local_dir: None,
        }
    }

    /// The same table seen through another store (a wrapper of this one's, in tests): keeps
    /// the local directory, so writer leases still apply.
    pub fn wrapped(&self, store: Arc<dyn ObjectStore>) -> Self {
        TableStore { store, ..self.clone() }
    }

    /// The absolute path of a table-relative path (`a/b/c`).
    pub fn path(&self, relative: &str) -> Path {
        relative
            .split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    /// The table-relative form of an absolute path.
    pub fn relative(&self, path: &Path) -> String {
        match path.prefix_match(&self.root) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => path.to_string(),
        }
    }

    /// `_sluice/log/`.
    pub fn log_dir(&self) -> Path {
        self.path("_sluice/log")
    }
}
