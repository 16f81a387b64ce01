//! Policies made ready for lookups, once per load. Imports [`crate::policy`].

pub(crate) mod compiled;
pub(crate) mod index;
pub mod last_good;
