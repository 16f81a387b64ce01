//! The control plane, `origin-policy serve`: every domain's policy in a
//! durable store with its history, changed one domain at a time through an
//! HTTP API (or a watched directory), checked by the engine in-process, and
//! delivered to Envoys over the policy feed; the clusters and the filter
//! configuration the policies need go to Envoy first.
//!
//! - [`store`]: the redb file; a write is acknowledged once committed.
//! - [`table`]: the domains in memory and the feed's pages.
//! - [`writer`]: the one writer, committing queued writes together.
//! - [`validate`]: one policy checked under the edge's settings.
//! - [`api`], [`feed`]: the HTTP server.
//! - [`envoy`]: the clusters and filter configuration, to Envoy.
//! - [`watch`]: a policy directory as a source.
//! - [`ads`], [`rollout`]: a fleet over ADS, and the canary rollout.
//! - [`replica`], [`etcd`]: replicas over one etcd cluster (`serve --etcd`).
//! - [`events`]: what happened, for `/status`.
//! - [`tls`]: mTLS on both listeners, identities from certificates.
//! - [`serve`]: the command.

pub mod admin;
pub mod ads;
pub mod api;
pub mod envoy;
pub mod error;
pub mod etcd;
pub mod events;
pub mod feed;
pub mod replica;
pub mod rollout;
pub mod serve;
pub mod store;
pub mod table;
pub mod tls;
pub mod validate;
pub mod watch;
pub mod writer;

pub use error::ControlError;
pub use origin_policy_xds::AdsServer;
pub use serve::{serve, FleetServe, ServeConfig, Server};
