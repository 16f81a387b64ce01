//! What the fuzz targets share: the example policies, loaded once.

use origin_policy_engine::documents::PolicyDocuments;
use origin_policy_engine::PolicySet;
use std::sync::OnceLock;

/// `policies/` compiled as `origin-policy bundle` would ship it. Read here
/// rather than through the CLI crate, whose mirror would put an HTTP and S3
/// stack under the sanitizers for nothing.
pub fn example_policies() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .expect("example policies")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut documents = PolicyDocuments::default();
        for path in paths {
            let bytes = std::fs::read(&path).expect("an example policy");
            documents.add_bytes(path.display().to_string(), &bytes);
        }
        let config = documents.plugin_config().to_string();
        PolicySet::from_plugin_config(config.as_bytes(), None)
            .expect("example policies load")
            .set
    })
}
