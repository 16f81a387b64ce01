//! origin-policy: a CDN origin-fetch policy engine and the proxy-wasm filter
//! that applies it inside Envoy.

pub mod engine;
pub mod report;

pub mod bundle;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter;
