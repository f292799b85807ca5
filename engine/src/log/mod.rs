//! A sink table's state on its object store: where it lives ([`store`]: local disk through
//! [`local`], S3 through `s3`, [`single_writer`] for stores without conditional PUT), its
//! commit log ([`commit`]: the atomic record of which files make up the table; [`checkpoint`]:
//! the log folded every hundred epochs, so readers need not read it all), large staged files as
//! recorded multipart uploads ([`upload`]), the one-writer lease ([`lease`]), checking the
//! files against the log ([`check`]), and reading it back as a DataFusion table through that
//! log ([`table`]).

pub mod check;
pub mod checkpoint;
pub mod commit;
pub mod lease;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
pub mod single_writer;
pub mod store;
pub mod table;
pub mod upload;
