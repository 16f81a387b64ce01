//! A proxy-wasm HTTP filter that lets every request and response through
//! untouched. Envoy still creates a context per stream and calls into the VM
//! for each callback, which is the fixed price of any wasm filter; the
//! benchmark subtracts it to see what origin-policy's own work costs.
//!
//! Given a plugin configuration naming one host call (`HostCall::NAMES`), it
//! makes exactly that call once per request: the calibration variants of
//! `bench/envoy_bench.py --calibrate`, each measured against the plain no-op.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(NoopRoot { call: None, metric: 0 })
        });
    }}

    /// The one host call a calibration variant makes per request.
    #[derive(Clone, Copy)]
    enum HostCall {
        RequestHeaderMap,
        RequestHeader,
        SetRequestHeader,
        RemoveRequestHeader,
        TlsVersion,
        AttemptCount,
        HostMetadata,
        CodeDetails,
        IncrementMetric,
        SetFilterState,
        SharedDataGet,
    }

    impl HostCall {
        fn from_name(name: &str) -> Option<Self> {
            Some(match name {
                "request_header_map" => HostCall::RequestHeaderMap,
                "request_header" => HostCall::RequestHeader,
                "set_request_header" => HostCall::SetRequestHeader,
                "remove_request_header" => HostCall::RemoveRequestHeader,
                "property_tls_version" => HostCall::TlsVersion,
                "property_attempt_count" => HostCall::AttemptCount,
                "property_host_metadata" => HostCall::HostMetadata,
                "property_code_details" => HostCall::CodeDetails,
                "increment_metric" => HostCall::IncrementMetric,
                "set_filter_state" => HostCall::SetFilterState,
                "shared_data_get_200b" => HostCall::SharedDataGet,
                _ => return None,
            })
        }

        /// Upstream facts exist only once the answer is in.
        fn on_response(self) -> bool {
            matches!(
                self,
                HostCall::AttemptCount | HostCall::HostMetadata | HostCall::CodeDetails
            )
        }
    }

    const SHARED_KEY: &str = "calibration.200b";

    /// `SetEnvoyFilterStateArguments {path: 1, value: 2}`, protobuf-encoded.
    fn filter_state_arguments(path: &str, value: &str) -> Vec<u8> {
        let mut out = vec![0x0a, path.len() as u8];
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&[0x12, value.len() as u8]);
        out.extend_from_slice(value.as_bytes());
        out
    }

    fn make(call: HostCall, metric: u32) {
        let _ = match call {
            HostCall::RequestHeaderMap => {
                hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map(drop)
            }
            HostCall::RequestHeader => {
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":authority").map(drop)
            }
            HostCall::SetRequestHeader => {
                hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-calibration", Some("1"))
            }
            HostCall::RemoveRequestHeader => {
                hostcalls::set_map_value(MapType::HttpRequestHeaders, "user-agent", None)
            }
            HostCall::TlsVersion => {
                hostcalls::get_property(vec!["connection", "tls_version"]).map(drop)
            }
            HostCall::AttemptCount => {
                hostcalls::get_property(vec!["upstream", "request_attempt_count"]).map(drop)
            }
            HostCall::HostMetadata => {
                hostcalls::get_property(vec!["xds", "upstream_host_metadata"]).map(drop)
            }
            HostCall::CodeDetails => {
                hostcalls::get_property(vec!["response", "code_details"]).map(drop)
            }
            HostCall::IncrementMetric => hostcalls::increment_metric(metric, 1),
            HostCall::SetFilterState => hostcalls::call_foreign_function(
                "set_envoy_filter_state",
                Some(&filter_state_arguments(
                    "envoy.network.upstream_server_name",
                    "origin.example.net",
                )),
            )
            .map(drop),
            HostCall::SharedDataGet => hostcalls::get_shared_data(SHARED_KEY).map(drop),
        };
    }

    struct NoopRoot {
        call: Option<HostCall>,
        metric: u32,
    }

    impl Context for NoopRoot {}

    impl RootContext for NoopRoot {
        fn on_configure(&mut self, _size: usize) -> bool {
            let name = self
                .get_plugin_configuration()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let call = HostCall::from_name(name.trim());
            if call.is_none() && !name.trim().is_empty() {
                return false;
            }
            self.call = call;
            if let Some(HostCall::IncrementMetric) = call {
                self.metric = hostcalls::define_metric(MetricType::Counter, "calibration.requests")
                    .unwrap_or_default();
            }
            if let Some(HostCall::SharedDataGet) = call {
                let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&[b'x'; 200]), None);
            }
            true
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop {
                call: self.call,
                metric: self.metric,
            }))
        }
    }

    struct Noop {
        call: Option<HostCall>,
        metric: u32,
    }

    impl Context for Noop {}

    impl HttpContext for Noop {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            if let Some(call) = self.call.filter(|c| !c.on_response()) {
                make(call, self.metric);
            }
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            if let Some(call) = self.call.filter(|c| c.on_response()) {
                make(call, self.metric);
            }
            Action::Continue
        }
    }
}
