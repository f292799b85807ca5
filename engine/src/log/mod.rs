//! A sink table's commit log ([`entry`]: its records; [`transaction`]: building one entry and
//! checking it against the log; [`commit`]: the protocol that writes entries atomically and
//! recovers; [`checkpoint`]: the log folded every hundred epochs, so readers need not read it all),
//! checking the files against the log ([`check`]), and reading the table back as a DataFusion
//! table through that log ([`table`]). Where the table lives and who may write it is
//! [`crate::store`].

pub mod check;
pub mod checkpoint;
pub mod commit;
pub mod entry;
pub mod table;
pub mod transaction;
