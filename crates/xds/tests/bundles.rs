//! Real bundles (`origin-policy bundle --delivery feed`) of the e2e policies
//! (`feed/`) and of direct origins (`direct/`: dynamic forward proxy shards,
//! c-ares resolver, TLS) are taken whole: Envoy's API has every type they use.

use origin_policy_xds::{XdsResources, CLUSTER_TYPE, EXTENSION_CONFIG_TYPE};
use serde_json::Value;

fn resources(dir: &str, file: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let path = format!("{}/tests/bundles/{dir}/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut bundle: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    match bundle["resources"].take() {
        Value::Array(resources) => Ok(resources),
        _ => Err(format!("{dir}/{file} has no resources").into()),
    }
}

#[test]
fn every_resource_of_a_bundle_is_accepted() -> Result<(), Box<dyn std::error::Error>> {
    for (dir, clusters) in [("feed", 22), ("direct", 8)] {
        let mut configs = resources(dir, "origin-policy.ecds.json")?;
        configs.extend(resources(dir, "origin-policy.networks.ecds.json")?);
        let xds = XdsResources::from_json(&resources(dir, "origin-policy.cds.json")?, &configs)?;
        assert_eq!(xds.names(CLUSTER_TYPE).len(), clusters, "{dir}");
        assert_eq!(
            xds.names(EXTENSION_CONFIG_TYPE),
            ["origin-networks", "origin-policy"],
            "{dir}"
        );
    }
    Ok(())
}
