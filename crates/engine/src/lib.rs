//! The origin-policy engine: pure, no proxy-wasm, no I/O. It runs in the
//! filter, the CLI, the benchmarks and the JavaScript package alike.
//!
//! - [`policy`] the model, parsed by `parse` with a field reader that reports
//!   every finding at once, and checked across fields by `checks`;
//! - [`PolicySet`] the compiled set: settings plus a [`DomainIndex`];
//! - [`OriginDecision`] what one request gets, and [`Exchange`] the per-request
//!   state that the filter's phases ask, with the typed [`OriginError`].

mod checks;
pub mod clusters;
mod compiled;
mod decision;
mod diagnostic;
pub mod direct;
mod direct_route;
pub mod documents;
mod exchange;
pub mod feed;
mod fetch;
pub mod host;
mod index;
mod json;
pub mod last_good;
pub mod networks;
mod networks_rbac;
mod origin_error;
mod parse;
pub mod policy;
mod reader;
pub mod report;
mod settings;

pub use compiled::{CacheControl, CacheOverride, CompiledPolicy, OriginEndpoint, TlsName};
pub use decision::{
    scheme_from_text, viewer_scheme, DomainMatch, Failover, FailoverPlan, FailoverSkip,
    OriginDecision, OriginTarget, Outcome, OwnedViewerRequest, Refusal, ViewerRequest,
    ViewerSchemeSource,
};
pub use diagnostic::{Diagnostics, PolicyDiagnostic, Severity};
pub use exchange::{
    Exchange, ResponseVerdict, UpstreamReport, DECISION_HEADER, ORIGIN_ERROR_HEADER,
    PER_TRY_TIMEOUT_HEADER, RETRIABLE_STATUSES_HEADER, RETRY_ON_HEADER, ROUTER_CONTROL_HEADERS,
    TIMEOUT_HEADER,
};
pub use fetch::FetchFailure;
pub use index::{
    CompiledSet, ConfigError, Delivery, DomainIndex, MatchKind, PolicySet, PolicySource,
    MAX_POLICIES,
};
pub use json::{fingerprint, parse_json, JsonError, MAX_JSON_BYTES};
pub use networks::{check_policy_origins, OriginNetworks};
pub use origin_error::{FailoverOutcome, OriginError, PrimaryFailure, SecondaryFailure};
pub use parse::parse_policy;
pub use policy::{
    DomainPattern, FailoverRule, Origin, OriginHost, OriginSni, Policy, ProtocolPolicy, Scheme,
    Tier,
};
pub use settings::{parse_settings, OriginHealth, Settings, UnknownDomain};
