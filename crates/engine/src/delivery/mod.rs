//! Policies one domain at a time: the feed and a policy directory in memory.
//! Imports [`crate::policy`] and `compile`.

pub mod documents;
pub mod feed;
