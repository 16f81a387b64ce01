//! Shared helpers: the example policies as a plugin configuration, and requests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use host_test::{Filter, Vm};
use origin_policy_cli::files::read_dir;
use std::path::{Path, PathBuf};

pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// `policies/` bundled exactly as `origin-policy bundle` does.
pub fn example_config() -> String {
    read_dir(&policies_dir())
        .unwrap()
        .plugin_config()
        .to_string()
}

pub fn example_vm() -> Vm {
    Filter::shared().unwrap().start(&example_config()).unwrap()
}

/// `policies/` with `settings.direct_origins`: origins without a chain go
/// through forward-proxy shards.
pub fn direct_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&example_config()).unwrap();
    config["settings"]["direct_origins"] = serde_json::json!({"shards": 64});
    config.to_string()
}

pub fn direct_vm() -> Vm {
    Filter::shared().unwrap().start(&direct_config()).unwrap()
}

/// Request headers of a plain `GET /` for `host` over `scheme`.
pub const fn get<'a>(host: &'a str, scheme: &'a str) -> [(&'static str, &'a str); 4] {
    [
        (":authority", host),
        (":scheme", scheme),
        (":method", "GET"),
        (":path", "/"),
    ]
}

/// What the native engine names for a GET of `host` over `scheme` with the
/// example policies: the cluster header's value, then the first origin's
/// cluster and those of its chain, in order.
pub fn example_clusters(host: &str, scheme: origin_policy_engine::Scheme) -> Vec<String> {
    let set =
        origin_policy_engine::PolicySet::from_plugin_config(example_config().as_bytes(), None)
            .unwrap()
            .set;
    let request = origin_policy_engine::ViewerRequest {
        authority: host,
        connection: Some(scheme),
        method: "GET",
        ..Default::default()
    };
    let found = set.lookup(host).unwrap();
    let exchange = origin_policy_engine::Exchange::begin(found, &request, &set.settings).unwrap();
    let d = exchange.decision().unwrap();
    [d.route_cluster, d.target.cluster]
        .into_iter()
        .chain(d.chain.iter().map(|t| t.cluster))
        .map(str::to_owned)
        .collect()
}

/// One Envoy process with feed delivery, as the feed singleton leaves it:
/// every example policy in shared data as its domain's entry, the first sync
/// complete and the change count at 1.
pub struct FeedProcess {
    pub process: host_test::Process<'static>,
    pub config: String,
}

impl FeedProcess {
    pub fn new() -> Self {
        Self::counting(true)
    }

    /// `counting: false`: a singleton that keeps no change count (an older
    /// module).
    pub fn counting(counting: bool) -> Self {
        use origin_policy_engine::feed::{entry_key, CHANGES_KEY, FEED_STATE_KEY, READY_STATE};
        let feed = read_dir(&policies_dir()).unwrap().feed_documents().unwrap();
        let config =
            serde_json::json!({"settings": feed.settings_document, "delivery": "feed"}).to_string();
        let fed = FeedProcess {
            process: Filter::shared().unwrap().process(),
            config,
        };
        for (domain, document) in &feed.accepted {
            fed.write(&entry_key(domain), document.as_bytes());
        }
        fed.write(FEED_STATE_KEY, READY_STATE.as_bytes());
        if counting {
            fed.write(CHANGES_KEY, b"1");
        }
        fed
    }

    /// A write into the process's shared data, as the singleton makes it.
    pub fn write(&self, key: &str, value: &[u8]) {
        self.process
            .shared_data()
            .set(self.process.vm_id(), key, value, 0)
            .unwrap();
    }

    /// A worker configured with the filter's settings, after its first tick.
    pub fn worker(&self) -> Vm {
        let mut vm = self.process.start(&self.config).unwrap();
        vm.tick().unwrap();
        vm
    }
}
