//! What Envoy needs, derived from a compiled set and the settings. Imports
//! [`crate::policy`] and `compile`.

pub(crate) mod cluster_parts;
pub mod clusters;
pub mod direct;
pub mod networks;
