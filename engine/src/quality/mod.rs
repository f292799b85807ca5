//! Data quality on the Arrow columns each micro-batch already holds: mergeable column
//! [`profile`]s and the [`sketch`]es in them, the profile files committed with each epoch
//! ([`store`]), and expectations ([`expect`]).

pub mod expect;
pub mod profile;
pub mod sketch;
pub mod store;
