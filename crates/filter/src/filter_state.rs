//! Envoy filter-state writes through the `set_envoy_filter_state` foreign
//! function: the per-request SNI, certificate name and dynamic-proxy target.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

pub const UPSTREAM_SERVER_NAME: &str = "envoy.network.upstream_server_name";
pub const UPSTREAM_SUBJECT_ALT_NAMES: &str = "envoy.network.upstream_subject_alt_names";
pub const DYNAMIC_HOST: &str = "envoy.upstream.dynamic_host";
pub const DYNAMIC_PORT: &str = "envoy.upstream.dynamic_port";

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `SetEnvoyFilterStateArguments { path = 1; value = 2; span = 3 }`. The span is
/// left at its default (FilterChain), which is what per-request state needs.
pub fn encode_arguments(path: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + value.len() + 6);
    out.push(0x0a);
    put_varint(&mut out, path.len());
    out.extend_from_slice(path.as_bytes());
    out.push(0x12);
    put_varint(&mut out, value.len());
    out.extend_from_slice(value.as_bytes());
    out
}

pub fn set_filter_state(path: &str, value: &str) -> Result<(), String> {
    hostcalls::call_foreign_function(
        "set_envoy_filter_state",
        Some(&encode_arguments(path, value)),
    )
    .map(|_| ())
    .map_err(|e: Status| format!("could not set filter state {path}: {e:?}"))
}
