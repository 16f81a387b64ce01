//! The secondary-origin mirror: fetches a domain's resources from its primary
//! origin exactly as the edge would (the policy's address, port, scheme, Host,
//! SNI and certificate name, timeouts) and keeps a copy of each in an object
//! store, which then serves as the domain's secondary origin.
//!
//! A run is incremental (conditional requests against the stored validators),
//! bounded (concurrency, bandwidth, object and store size, time per object)
//! and never leaves a torn object: every object is written whole or not at all.

mod error;
mod job;
mod origin;
mod resources;
mod serve;
mod store;
mod units;

pub use error::{MirrorError, ResourceFailure, StoreError};
pub use job::{unix_now, Limits, MirrorJob, Progress, RunSummary, Sources, StopReason};
pub use origin::PrimaryOrigin;
pub use resources::ResourcePath;
pub use serve::serve_stores;
pub use store::{MirrorStore, KEPT_HEADERS, USER_AGENT_VALUE};
/// Stops a run cleanly ([`MirrorJob::run`]).
pub use tokio_util::sync::CancellationToken;
pub use units::{parse_bytes, parse_duration};
