//! What the fuzz targets share: the example policies, loaded once.

use origin_policy_engine::PolicySet;
use std::sync::OnceLock;

/// `policies/` compiled as `origin-policy bundle` would ship it.
pub fn example_policies() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
        let config = origin_policy_cli::files::read_dir(std::path::Path::new(dir))
            .expect("example policies")
            .plugin_config()
            .to_string();
        PolicySet::from_plugin_config(config.as_bytes(), None)
            .expect("example policies load")
            .set
    })
}
