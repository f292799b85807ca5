//! A sink table's state on its object store: where it lives ([`store`], [`local`]), its commit
//! log ([`commit`]: the atomic record of which files make up the table; [`checkpoint`]: the log
//! folded every hundred epochs, so readers need not read it all), the one-writer lease
//! ([`lease`]), checking the files against the log ([`check`]), and reading it back as a
//! DataFusion table through that log ([`table`]).

pub mod check;
pub mod checkpoint;
pub mod commit;
pub mod lease;
pub mod local;
pub mod store;
pub mod table;
