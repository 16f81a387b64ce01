//! The origin-policy engine: pure, no proxy-wasm, no I/O. It runs in the
//! filter, the CLI, the benchmarks and the JavaScript package alike.
//!
//! Its folders follow a policy's way to a request, each stage importing only
//! the stages above it in this list:
//!
//! 1. [`policy`]: what a tenant's policy and the edge's settings say. The
//!    model, the JSON reader that reports every finding at once (with domain
//!    and JSON pointer), the parsers, the cross-field checks, host names and
//!    origin addresses, the settings and the origin networks they allow.
//! 2. `compile`: policies made ready for lookups, once per load. A compiled
//!    policy (its origins per scheme, with the clusters that reach them), the
//!    domain index and [`PolicySet`], the incremental compile, and the last
//!    good documents kept across VMs.
//! 3. `envoy`: what Envoy needs, derived from a compiled set and the
//!    settings. The origin clusters and failover chains, the forward-proxy
//!    shards of `direct_origins`, and the origin networks' upstream RBAC.
//! 4. `request`: one request's way. The [`OriginDecision`], the per-request
//!    [`Exchange`] that the filter's phases ask, a shard's route, Envoy's
//!    response details and the typed [`OriginError`] (`x-origin-error`).
//! 5. `delivery`: how policies reach a filter one domain at a time. The feed's
//!    pages, shared-data entries and their per-worker compile, and a policy
//!    directory held in memory.
//!
//! [`report`] renders decisions and findings as the JSON the CLI, the golden
//! cases and the JavaScript package share; it may import every stage.

pub mod policy;

mod compile;
mod delivery;
mod envoy;
mod request;

pub mod report;

// The crate's public paths, kept as they were before the stages.
pub use compile::last_good;
pub use delivery::{documents, feed};
pub use envoy::clusters;
pub use policy::host;

/// Forward-proxy shards (`settings.direct_origins`): the setting, the shard
/// clusters, and one request's route through them.
pub mod direct {
    pub use crate::envoy::direct::*;
    pub use crate::request::direct_route::DirectRoute;
}

/// Which networks an origin may be in (`settings.origin_networks`), and the
/// upstream RBAC filter that applies them in Envoy.
pub mod networks {
    pub use crate::envoy::networks::*;
    pub use crate::policy::networks::*;
}

pub use compile::compiled::{CacheControl, CacheOverride, CompiledPolicy, OriginEndpoint, TlsName};
pub use compile::index::{
    CompiledSet, ConfigError, Delivery, DomainIndex, MatchKind, PolicySet, PolicySource,
    MAX_POLICIES,
};
pub use policy::admission::check_policy_origins;
pub use policy::diagnostic::{Diagnostics, PolicyDiagnostic, Severity};
pub use policy::json::{fingerprint, parse_json, JsonError, MAX_JSON_BYTES};
pub use policy::networks::OriginNetworks;
pub use policy::parse::parse_policy;
pub use policy::settings::{parse_settings, OriginHealth, Settings, UnknownDomain};
pub use policy::{
    DomainPattern, FailoverRule, Origin, OriginHost, OriginSni, Policy, ProtocolPolicy, Scheme,
    Tier,
};
pub use request::decision::{
    scheme_from_text, viewer_scheme, DomainMatch, Failover, FailoverPlan, FailoverSkip,
    OriginDecision, OriginTarget, Outcome, OwnedViewerRequest, Refusal, ViewerRequest,
    ViewerSchemeSource,
};
pub use request::exchange::{
    Exchange, ResponseVerdict, UpstreamReport, DECISION_HEADER, ORIGIN_ERROR_HEADER,
    PER_TRY_TIMEOUT_HEADER, RETRIABLE_STATUSES_HEADER, RETRY_ON_HEADER, ROUTER_CONTROL_HEADERS,
    TIMEOUT_HEADER,
};
pub use request::fetch::FetchFailure;
pub use request::origin_error::{FailoverOutcome, OriginError, PrimaryFailure, SecondaryFailure};
