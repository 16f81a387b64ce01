//! A fleet's Envoys over ADS (`serve --ads`): the clusters as CDS, the
//! filter and the origin networks' RBAC as the two ECDS resources
//! [`EnvoyFiles`](crate::envoy::EnvoyFiles) writes as files for one edge.
//!
//! - **The module** is copied into a content-addressed store
//!   (`STORE/modules/<sha256>.wasm`) and the filter names that copy, so a
//!   version always means the same bytes whatever is built over the source
//!   later. A node whose metadata has `module_dir` reads
//!   `<module_dir>/<sha256>.wasm` instead.
//! - **A new Envoy gets the filter only once its feed has every policy**: its
//!   listeners warm until the filter arrives (`initial_fetch_timeout: 0s`), so
//!   its first answer already has the current policies, never the feed's
//!   "not received yet" 503. A node that runs a filter already is not held.
//! - **Each call returns once every connected node has ACKed** what it was
//!   given, NACKed it (logged with Envoy's message, and in `/status`), or
//!   after the ACK timeout: one broken node does not stop the others.

use crate::envoy::{ecds_resource, EnvoyConfig};
use crate::error::ControlError;
use crate::rollout::Fleet;
use crate::validate::EdgeSettings;
use origin_policy_xds::{
    AdsServer, NodeInfo, NodeSelector, NodeStatus, XdsResources, CLUSTER_TYPE,
    EXTENSION_CONFIG_TYPE,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The node metadata field naming a node's own module directory.
pub const MODULE_DIR: &str = "module_dir";

pub struct EnvoyAds {
    pub ads: AdsServer,
    fleet: Arc<Fleet>,
    /// The module's source file, read again on every filter change.
    wasm: PathBuf,
    /// The content-addressed module store.
    modules: PathBuf,
    ack_timeout: Duration,
    current: Mutex<Current>,
}

#[derive(Default, Clone)]
struct Current {
    clusters: Vec<Value>,
    /// The filter's plugin configuration, the networks' ECDS resource and
    /// the module's sha256, once the settings are known.
    filter: Option<(String, Value, String)>,
}

impl EnvoyAds {
    pub fn new(
        ads: AdsServer,
        fleet: Arc<Fleet>,
        wasm: PathBuf,
        modules: PathBuf,
        ack_timeout: Duration,
    ) -> Self {
        EnvoyAds {
            ads,
            fleet,
            wasm,
            modules,
            ack_timeout,
            current: Mutex::new(Current::default()),
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives the nodes `current`: checked against Envoy's schema first (a
    /// resource Envoy would refuse is an error here, and nothing is sent).
    fn publish(&self, current: Current) -> Result<(), ControlError> {
        let variants = Arc::new(Variants {
            current,
            modules: self.modules.clone(),
            built: Mutex::new(HashMap::new()),
        });
        variants.build(None).map_err(ControlError::Envoy)?;
        let fleet = self.fleet.clone();
        self.ads.set_target_fn(
            NodeSelector::All,
            Arc::new(move |node: &NodeInfo| {
                let dir = node.metadata.get(MODULE_DIR).map(String::as_str);
                let full = match variants.build(dir) {
                    Ok(full) => full,
                    Err(why) => {
                        eprintln!("serve: {}: {why}", node.id);
                        return None;
                    }
                };
                let runs_filter = node
                    .acked
                    .get(EXTENSION_CONFIG_TYPE)
                    .is_some_and(Option::is_some);
                if runs_filter || fleet.feed_complete(&node.id) {
                    Some(full)
                } else {
                    Some(Arc::new(full.without_extension_configs()))
                }
            }),
        );
        Ok(())
    }

    /// Waits until every connected node has ACKed or NACKed its target of
    /// `type_url`, or the ACK timeout.
    fn wait(&self, type_url: &str) {
        let started = Instant::now();
        loop {
            let status = self.ads.status();
            let waiting: Vec<&NodeStatus> = status
                .iter()
                .filter(|n| n.connected && !settled(n, type_url))
                .collect();
            if waiting.is_empty() {
                for node in &status {
                    let Some(t) = node.types.get(type_url) else {
                        continue;
                    };
                    if let Some(nack) = t
                        .nack
                        .as_ref()
                        .filter(|n| Some(&n.version) == t.target.as_ref())
                    {
                        eprintln!(
                            "serve: {} NACKed {} {}: {}",
                            node.id,
                            short_type(type_url),
                            nack.version,
                            nack.message
                        );
                    }
                }
                return;
            }
            if started.elapsed() > self.ack_timeout {
                let ids: Vec<&str> = waiting.iter().map(|n| n.id.as_str()).collect();
                eprintln!(
                    "serve: {} not ACKed by {} within {} s; going on without them",
                    short_type(type_url),
                    ids.join(", "),
                    self.ack_timeout.as_secs_f64()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The module copied into the store (once); its sha256.
    fn store_module(&self) -> Result<String, ControlError> {
        let bytes = std::fs::read(&self.wasm)
            .map_err(|e| ControlError::Io(format!("{}: {e}", self.wasm.display())))?;
        let sha = hex(&Sha256::digest(&bytes));
        let path = module_path(&self.modules, &sha);
        if !path.exists() {
            std::fs::create_dir_all(&self.modules)
                .map_err(|e| ControlError::Io(format!("{}: {e}", self.modules.display())))?;
            crate::envoy::write_atomically(&path, &bytes)
                .map_err(|e| ControlError::Io(format!("{}: {e}", path.display())))?;
        }
        Ok(sha)
    }

    /// The module's source changed: the filter with the new module, to every
    /// node (not staged through the canaries).
    pub fn module_changed(&self) -> Result<bool, ControlError> {
        let sha = self.store_module()?;
        let mut current = self.current().clone();
        let Some(filter) = current.filter.as_mut() else {
            return Ok(false);
        };
        if filter.2 == sha {
            return Ok(false);
        }
        filter.2 = sha;
        self.publish(current.clone())?;
        *self.current() = current;
        self.wait(EXTENSION_CONFIG_TYPE);
        Ok(true)
    }
}

/// Whether a node has ACKed its target of `type_url`, NACKed it, or has no
/// target of it (a new Envoy whose feed is not complete yet).
fn settled(node: &NodeStatus, type_url: &str) -> bool {
    let Some(t) = node.types.get(type_url) else {
        return true;
    };
    t.target.is_none()
        || t.acked == t.target
        || t.nack.as_ref().map(|n| &n.version) == t.target.as_ref()
}

pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn module_path(dir: &Path, sha: &str) -> PathBuf {
    dir.join(format!("{sha}.wasm"))
}

/// One published configuration, as each module directory sees it.
struct Variants {
    current: Current,
    modules: PathBuf,
    built: Mutex<HashMap<Option<String>, Arc<XdsResources>>>,
}

impl Variants {
    fn build(&self, module_dir: Option<&str>) -> Result<Arc<XdsResources>, String> {
        let key = module_dir.map(str::to_owned);
        let mut built = self
            .built
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(resources) = built.get(&key) {
            return Ok(resources.clone());
        }
        let resources = match &self.current.filter {
            Some((config, networks, sha)) => {
                let dir = module_dir.map_or(self.modules.clone(), PathBuf::from);
                let module = module_path(&dir, sha).to_string_lossy().into_owned();
                let filter = ecds_resource(config, &module)["resources"][0].clone();
                let configs = vec![networks.clone(), filter];
                XdsResources::from_json(&self.current.clusters, &configs)
            }
            None => XdsResources::from_json(&self.current.clusters, &[])
                .map(|r| r.without_extension_configs()),
        }
        .map_err(|e| e.to_string())?;
        let resources = Arc::new(resources);
        built.insert(key, resources.clone());
        Ok(resources)
    }
}

impl EnvoyConfig for EnvoyAds {
    fn clusters(&self, clusters: &[Arc<str>]) -> Result<(), ControlError> {
        let parsed = clusters
            .iter()
            .map(|c| serde_json::from_str(c))
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| ControlError::Envoy(format!("a derived cluster: {e}")))?;
        let mut current = self.current().clone();
        current.clusters = parsed;
        self.publish(current.clone())?;
        *self.current() = current;
        self.wait(CLUSTER_TYPE);
        Ok(())
    }

    fn filter(&self, settings: &EdgeSettings) -> Result<(), ControlError> {
        let networks = settings.settings.origin_networks.ecds_resource()["resources"][0].clone();
        let config = json!({"settings": settings.document, "delivery": "feed"}).to_string();
        let sha = self.store_module()?;
        let mut current = self.current().clone();
        current.filter = Some((config, networks, sha));
        self.publish(current.clone())?;
        *self.current() = current;
        self.wait(EXTENSION_CONFIG_TYPE);
        Ok(())
    }
}
