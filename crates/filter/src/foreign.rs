//! Envoy's own functions a wasm filter may call (`proxy_call_foreign_function`).

use proxy_wasm::hostcalls;

/// Sets a filter-state object Envoy knows by name (its object factory reads
/// `value`), for this request: how the filter hands a forward-proxy shard its
/// origin's host, port, SNI and the name to check.
pub(crate) fn set_filter_state(name: &str, value: &str) -> Result<(), String> {
    hostcalls::call_foreign_function(
        "set_envoy_filter_state",
        Some(&filter_state_arguments(name, value)),
    )
    .map(|_| ())
    .map_err(|e| format!("could not set filter state {name}: {e:?}"))
}

/// Makes Envoy match the route again, now that the cluster header names a
/// forward-proxy shard: those have a route of their own.
pub(crate) fn clear_route_cache() -> Result<(), String> {
    hostcalls::call_foreign_function("clear_route_cache", None)
        .map(|_| ())
        .map_err(|e| format!("could not clear the route cache: {e:?}"))
}

/// `envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments` in
/// protobuf's wire format: `path` (1) and `value` (2) as length-delimited
/// strings; `span` (3) left at its default, the filter chain.
fn filter_state_arguments(path: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + value.len() + 8);
    for (tag, field) in [(0x0a, path), (0x12, value)] {
        out.push(tag);
        let mut len = field.len();
        while len >= 0x80 {
            out.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(field.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::filter_state_arguments;

    #[test]
    fn arguments_are_protobuf_length_delimited_fields() {
        assert_eq!(
            filter_state_arguments("a.b", "xy"),
            [0x0a, 3, b'a', b'.', b'b', 0x12, 2, b'x', b'y']
        );
        // A length of 300 takes two bytes: 0xac 0x02.
        let long = "h".repeat(300);
        let bytes = filter_state_arguments("k", &long);
        assert_eq!(&bytes[3..6], &[0x12, 0xac, 0x02]);
        assert_eq!(bytes.len(), 3 + 3 + 300);
    }
}
