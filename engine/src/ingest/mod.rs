//! Ingest-side durability for sources that cannot replay by themselves: the ingest log
//! ([`wal`]), fsynced before a producer is acknowledged.

pub mod wal;
