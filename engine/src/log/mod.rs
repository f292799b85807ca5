//! A sink table's state on its object store: where it lives ([`store`]), its commit log
//! ([`commit`]: the atomic record of which files make up the table), and reading it back as a
//! DataFusion table through that log ([`table`]).

pub mod commit;
pub mod local;
pub mod store;
pub mod table;
