//! The policy engine: pure, no proxy-wasm, no I/O. It runs in the filter, the
//! CLI, the benchmarks and the JavaScript package alike.

mod decision;
mod diagnostic;
pub mod documents;
mod fetch;
pub mod host;
mod index;
mod json;
mod policy;
pub mod report;
mod settings;

pub use decision::{
    viewer_scheme, CacheOverride, CompiledPolicy, Failover, FailoverAction, FailoverPlan,
    MatchKind, OriginDecision, OriginRole, OriginTarget, Outcome, OwnedViewerRequest, ResponsePlan,
    ViewerRequest, ViewerSchemeSource,
};
pub use diagnostic::{Diagnostics, PolicyDiagnostic, Severity};
pub use fetch::FetchFailure;
pub use index::{CompiledSet, ConfigError, DomainIndex, PolicySet, PolicySource, MAX_POLICIES};
pub use json::{parse_json, JsonError, MAX_JSON_BYTES};
pub use policy::{
    parse_policy, DomainPattern, FailoverRule, Origin, OriginHost, OriginSni, Policy,
    ProtocolPolicy, Reach, Scheme,
};
pub use settings::{parse_settings, Settings, UnknownDomain};
