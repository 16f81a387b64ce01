//! The origin-policy proxy-wasm filter: a thin adapter between Envoy's host
//! calls and the engine (`origin_policy_engine`), where all policy logic lives.
//!
//! - `root`: parses, compiles and swaps the policies (`on_configure`);
//! - `http`: one HTTP context per stream, mapping host calls to and from the
//!   request's [`origin_policy_engine::Exchange`];
//! - `metrics`: the counters, from one name table.
// Host calls exist only in the proxy-wasm build; natively this crate is empty.
#![cfg(all(target_arch = "wasm32", target_os = "wasi"))]

mod http;
mod metrics;
mod root;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::OriginPolicyRoot::default()) });
}}
