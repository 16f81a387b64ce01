//! The candidate per-domain delivery path, reduced to what its costs depend
//! on, for `bench/delivery_bench.py`:
//!
//! - `source` (a bootstrap wasm service, `singleton: true`, on Envoy's main
//!   thread): pages through the policy source's change feed (`GET
//!   /changes?since=V` on the `policy_source` cluster, long-polled once it
//!   is in sync) and writes one shared-data entry per domain, `p/<domain>`,
//!   then `ready` = the version it is in sync with.
//! - `reader` (the HTTP filter, same `vm_id`, so the same shared data): per
//!   request, reads the entry for the request's Host (the exact name, then
//!   the wildcard of its parent) and says what it found in
//!   `x-delivery-entry` on the response.
//! - `passthrough`: the same filter reading nothing, the baseline.
//!
//! It does not parse or compile the policies: that cost is the engine's
//! (criterion), the same whichever way an entry arrives.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod probe {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};
    use std::time::{Duration, SystemTime};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
    }}

    const SOURCE_CLUSTER: &str = "policy_source";
    const READY_KEY: &str = "ready";
    const ENTRY_HEADER: &str = "x-delivery-entry";
    /// The source holds a long poll for 20 s; this only bounds a lost one.
    const CALL_TIMEOUT: Duration = Duration::from_secs(60);
    const RETRY_PERIOD: Duration = Duration::from_secs(1);

    #[derive(Clone, Copy, Default, PartialEq)]
    enum Role {
        #[default]
        Passthrough,
        Reader,
        Source,
    }

    #[derive(Default)]
    struct ProbeRoot {
        role: Role,
        /// The feed's version this VM's writes have reached, and the feed's
        /// epoch it counts in (a new epoch: the source lost its versions).
        version: u64,
        epoch: String,
        in_sync: bool,
        sync_started: Option<SystemTime>,
        entries_written: u64,
        bytes_read: u64,
        retry: bool,
    }

    impl Context for ProbeRoot {
        fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
            let status = self
                .get_http_call_response_header(":status")
                .unwrap_or_default();
            let more = self.get_http_call_response_header("x-more").is_some();
            let next = self
                .get_http_call_response_header("x-version")
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(epoch) = self.get_http_call_response_header("x-epoch") {
                self.epoch = epoch;
            }
            if status == "200" && self.get_http_call_response_header("x-reset").is_some() {
                // The source lost its versions: page through everything again,
                // serving the entries already here meanwhile.
                log::info!("delivery-probe: source reset; full re-sync");
                self.version = 0;
                self.in_sync = false;
                self.entries_written = 0;
                self.bytes_read = 0;
                self.sync_started = Some(self.get_current_time());
                self.poll();
                return;
            }
            match (status.as_str(), next) {
                ("200", Some(next)) => {
                    let body = self
                        .get_http_call_response_body(0, body_size)
                        .unwrap_or_default();
                    self.bytes_read += body.len() as u64;
                    self.apply(&body);
                    self.version = next;
                    if !more && !self.in_sync {
                        self.in_sync = true;
                        let took = self
                            .sync_started
                            .and_then(|t| self.get_current_time().duration_since(t).ok())
                            .unwrap_or_default();
                        log::info!(
                            "delivery-probe: in sync at version {next}: {} entries, {} bytes read in {} ms",
                            self.entries_written,
                            self.bytes_read,
                            took.as_millis()
                        );
                    }
                    if self.in_sync {
                        let _ = self.set_shared_data(
                            READY_KEY,
                            Some(next.to_string().as_bytes()),
                            None,
                        );
                    }
                    self.poll();
                }
                // Nothing new within the long poll.
                ("204", _) => self.poll(),
                _ => {
                    log::warn!("delivery-probe: source answered {status:?}; again in 1 s");
                    self.retry = true;
                }
            }
        }
    }

    impl ProbeRoot {
        /// `domain \t policy` lines; an empty policy is a removal (a tombstone:
        /// shared data has no delete).
        fn apply(&mut self, body: &[u8]) {
            for line in body.split(|b| *b == b'\n') {
                let Some(tab) = line.iter().position(|b| *b == b'\t') else {
                    continue;
                };
                let (domain, policy) = (&line[..tab], &line[tab + 1..]);
                let Ok(domain) = std::str::from_utf8(domain) else {
                    continue;
                };
                if self
                    .set_shared_data(&format!("p/{domain}"), Some(policy), None)
                    .is_ok()
                {
                    self.entries_written += 1;
                }
            }
        }

        fn poll(&mut self) {
            let path = format!("/changes?since={}&epoch={}", self.version, self.epoch);
            let call = self.dispatch_http_call(
                SOURCE_CLUSTER,
                vec![
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", "policy-source"),
                ],
                None,
                vec![],
                CALL_TIMEOUT,
            );
            if call.is_err() {
                self.retry = true;
            }
        }
    }

    impl RootContext for ProbeRoot {
        fn on_configure(&mut self, _: usize) -> bool {
            let config = self
                .get_plugin_configuration()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            self.role = match config.trim() {
                "source" => Role::Source,
                "reader" => Role::Reader,
                "passthrough" | "" => Role::Passthrough,
                _ => return false,
            };
            if self.role == Role::Source {
                self.sync_started = Some(self.get_current_time());
                self.set_tick_period(RETRY_PERIOD);
                self.poll();
            }
            true
        }

        fn on_tick(&mut self) {
            if std::mem::take(&mut self.retry) {
                self.poll();
            }
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(ProbeRequest {
                role: self.role,
                found: None,
            }))
        }
    }

    struct ProbeRequest {
        role: Role,
        found: Option<String>,
    }

    impl Context for ProbeRequest {}

    impl ProbeRequest {
        /// The entry for `host`: the exact name, then `*.` + its parent.
        fn entry(&self, host: &str) -> Option<(Vec<u8>, u32)> {
            let exact = self.get_shared_data(&format!("p/{host}"));
            if let (Some(v), Some(cas)) = exact {
                return Some((v, cas));
            }
            let parent = host.split_once('.')?.1;
            match self.get_shared_data(&format!("p/*.{parent}")) {
                (Some(v), Some(cas)) => Some((v, cas)),
                _ => None,
            }
        }
    }

    /// The `origin_host` value of a policy, as the benchmark's pushes change it.
    fn origin_host_value(policy: &[u8]) -> &str {
        let text = std::str::from_utf8(policy).unwrap_or_default();
        text.split_once("\"value\":\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("", |(value, _)| value)
    }

    impl HttpContext for ProbeRequest {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            if self.role != Role::Reader {
                return Action::Continue;
            }
            let host = self
                .get_http_request_header(":authority")
                .unwrap_or_default();
            self.found = Some(match self.entry(&host) {
                Some((policy, cas)) if !policy.is_empty() => {
                    format!(
                        "bytes={}; cas={cas}; host={}",
                        policy.len(),
                        origin_host_value(&policy)
                    )
                }
                Some(_) => "removed".to_owned(),
                None if self.get_shared_data(READY_KEY).0.is_none() => "not ready".to_owned(),
                None => "none".to_owned(),
            });
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            if let Some(found) = self.found.take() {
                self.set_http_response_header(ENTRY_HEADER, Some(&found));
            }
            Action::Continue
        }
    }
}
