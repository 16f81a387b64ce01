//! One request's way: decision, exchange, response details, `x-origin-error`.
//! Imports [`crate::policy`], `compile` and `envoy` (cluster and filter-state names).

pub(crate) mod decision;
pub(crate) mod direct_route;
pub(crate) mod exchange;
pub(crate) mod fetch;
pub(crate) mod origin_error;
