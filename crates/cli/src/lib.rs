//! The `origin-policy` command line's library half: policy files on disk.
//! Everything about what a policy means lives in `origin_policy_engine`.

pub mod args;
pub mod certs;
pub mod files;
pub mod mirror;
mod text;

pub use text::explain_text;
