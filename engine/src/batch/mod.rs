//! The batch half of the hybrid design: the raw archive every epoch commits ([`archive`]) and
//! the reconciliation that recomputes a range of it with the pipeline's SQL, compares the
//! result with what the stream committed, and repairs the differences in one commit
//! ([`reconcile`], comparing with [`digest`]), and the table's upkeep: compaction and vacuum
//! ([`maintain`]).

pub mod archive;
pub mod digest;
pub mod maintain;
pub mod reconcile;
