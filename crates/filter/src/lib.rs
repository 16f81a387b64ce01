//! The origin-policy proxy-wasm filter: a thin adapter between Envoy's host
//! calls and the engine (`origin_policy_engine`), where all policy logic lives.
//!
//! - `root`: parses, compiles and swaps the policies (`on_configure`);
//! - `http`: one HTTP context per stream, mapping host calls to and from the
//!   request's [`origin_policy_engine::Exchange`];
//! - `feed`: the bootstrap singleton that keeps the per-domain entries of
//!   `"delivery": "feed"` in shared data;
//! - `metrics`: the counters, from one name table.
// Host calls exist only in the proxy-wasm build; natively this crate is empty.
#![cfg(all(target_arch = "wasm32", target_os = "wasi"))]

mod feed;
mod foreign;
mod http;
mod metrics;
mod root;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

/// The root id of the feed singleton (`envoy.bootstrap.wasm`); any other
/// root id is the HTTP filter.
const FEED_ROOT_ID: &str = "origin-policy-feed";

/// Envoy creates every root context alike; its root id, known from its first
/// configuration on, says which one it is.
enum Root {
    Unconfigured,
    Filter(root::OriginPolicyRoot),
    Feed(Box<feed::FeedRoot>),
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        if let Root::Feed(feed) = self {
            feed.on_http_call_response(token, headers, body, trailers);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        if matches!(self, Root::Unconfigured) {
            *self = if root::plugin_root_id() == FEED_ROOT_ID {
                Root::Feed(Box::new(feed::FeedRoot::new()))
            } else {
                Root::Filter(root::OriginPolicyRoot::default())
            };
        }
        match self {
            Root::Filter(r) => r.on_configure(size),
            Root::Feed(r) => r.on_configure(size),
            Root::Unconfigured => false,
        }
    }

    fn on_tick(&mut self) {
        match self {
            Root::Filter(r) => r.on_tick(),
            Root::Feed(r) => r.on_tick(),
            Root::Unconfigured => {}
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Root::Filter(r) = self {
            r.on_queue_ready(queue_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        match self {
            Root::Filter(r) => r.create_http_context(context_id),
            Root::Feed(_) | Root::Unconfigured => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        match self {
            Root::Filter(_) => Some(ContextType::HttpContext),
            Root::Feed(_) | Root::Unconfigured => None,
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::Unconfigured) });
}}
