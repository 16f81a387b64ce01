//! Envoy's JSON resources (what `origin-policy bundle` writes) as protobuf
//! `Any`s, checked against Envoy's own schema.

use std::fmt;
use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, Value};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// The type URL of a cluster (CDS).
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// The type URL of an extension configuration (ECDS), such as the filter's.
pub const EXTENSION_CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// Envoy's API (the descriptor set `envoy-types` was generated from, without
/// comments): every message a resource may hold, nested `Any`s included.
const ENVOY_API: &[u8] = include_bytes!("../envoy-api.binpb");

/// Why resources cannot be served, or why the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdsError {
    /// A resource Envoy would refuse.
    Resource {
        /// `cluster` or `extension config`.
        kind: &'static str,
        /// Its place in the list it was given in.
        index: usize,
        /// Its `name`, when it has one.
        name: Option<String>,
        /// Where in the resource, as a JSON pointer (`""`: the resource itself).
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// The embedded descriptor set cannot be read (a broken build).
    Schema(String),
    /// The server could not serve (its listener failed).
    Serve(String),
}

impl fmt::Display for XdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XdsError::Resource {
                kind,
                index,
                name,
                path,
                message,
            } => {
                match name {
                    Some(name) => write!(f, "{kind} `{name}` (#{index})")?,
                    None => write!(f, "{kind} #{index}")?,
                }
                if !path.is_empty() {
                    write!(f, " at {path}")?;
                }
                write!(f, ": {message}")
            }
            XdsError::Schema(message) => write!(f, "Envoy's API descriptors: {message}"),
            XdsError::Serve(message) => write!(f, "ADS server: {message}"),
        }
    }
}

impl std::error::Error for XdsError {}

fn envoy_api() -> Result<&'static DescriptorPool, XdsError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(ENVOY_API).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| XdsError::Schema(e.clone()))
}

/// One named resource, encoded once.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resource {
    pub(crate) name: String,
    pub(crate) any: Any,
}

/// The resources of one type URL and their version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TypeResources {
    pub(crate) type_url: &'static str,
    /// A hash of the content: the same resources always have the same version.
    pub(crate) version: String,
    /// Sorted by name.
    pub(crate) resources: Vec<Resource>,
}

/// What a node is to run: its clusters and extension configurations, each
/// type with the version ADS sends for it.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsResources {
    clusters: TypeResources,
    /// `None`: not sent (the node keeps what it has, or waits for them).
    extension_configs: Option<TypeResources>,
}

impl XdsResources {
    /// Checks and encodes `envoy.config.cluster.v3.Cluster` and
    /// `envoy.config.core.v3.TypedExtensionConfig` resources in Envoy's JSON
    /// (proto or JSON field names; nested `Any`s by `@type`; a top-level
    /// `@type`, if any, must be the resource's type). An unknown field or
    /// type, a value of the wrong kind, a missing or repeated name is refused.
    pub fn from_json(clusters: &[Json], extension_configs: &[Json]) -> Result<Self, XdsError> {
        Ok(XdsResources {
            clusters: TypeResources::from_json(CLUSTER_TYPE, "cluster", clusters)?,
            extension_configs: Some(TypeResources::from_json(
                EXTENSION_CONFIG_TYPE,
                "extension config",
                extension_configs,
            )?),
        })
    }

    /// The same clusters, and no extension configurations: a node given
    /// this is sent none (a new Envoy then keeps its listeners warming).
    pub fn without_extension_configs(&self) -> Self {
        XdsResources {
            clusters: self.clusters.clone(),
            extension_configs: None,
        }
    }

    /// The version of a type's resources (`None` for a type not served).
    pub fn version(&self, type_url: &str) -> Option<&str> {
        self.of_type(type_url).map(|t| t.version.as_str())
    }

    /// The names of a type's resources, sorted.
    pub fn names(&self, type_url: &str) -> Vec<&str> {
        self.of_type(type_url)
            .map(|t| t.resources.iter().map(|r| r.name.as_str()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn of_type(&self, type_url: &str) -> Option<&TypeResources> {
        self.types().into_iter().find(|t| t.type_url == type_url)
    }

    pub(crate) fn types(&self) -> Vec<&TypeResources> {
        std::iter::once(&self.clusters)
            .chain(self.extension_configs.as_ref())
            .collect()
    }
}

impl TypeResources {
    fn from_json(
        type_url: &'static str,
        kind: &'static str,
        values: &[Json],
    ) -> Result<Self, XdsError> {
        let full_name = type_url.trim_start_matches(TYPE_PREFIX);
        let descriptor = envoy_api()?
            .get_message_by_name(full_name)
            .ok_or_else(|| XdsError::Schema(format!("no message {full_name}")))?;
        let mut resources = Vec::with_capacity(values.len());
        let mut hashed = Vec::with_capacity(values.len());
        for (index, value) in values.iter().enumerate() {
            let refuse = |path: String, message: String| XdsError::Resource {
                kind,
                index,
                name: value.get("name").and_then(Json::as_str).map(str::to_owned),
                path,
                message,
            };
            let any = encode(&descriptor, type_url, value).map_err(|(p, m)| refuse(p, m))?;
            let name = any.1;
            if name.is_empty() {
                return Err(refuse("/name".into(), "a resource needs a name".into()));
            }
            let mut canonical = Vec::new();
            write_canonical(value, &mut canonical);
            hashed.push((name.clone(), canonical));
            resources.push(Resource { name, any: any.0 });
        }
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = resources
            .windows(2)
            .find(|pair| pair[0].name == pair[1].name)
        {
            let name = pair[0].name.clone();
            let index = values
                .iter()
                .rposition(|v| v.get("name").and_then(Json::as_str) == Some(name.as_str()))
                .unwrap_or_default();
            return Err(XdsError::Resource {
                kind,
                index,
                name: Some(name),
                path: "/name".into(),
                message: "another resource of this type has this name".into(),
            });
        }
        hashed.sort();
        let mut hash = Sha256::new();
        hash.update(type_url.as_bytes());
        for (name, canonical) in &hashed {
            hash.update([0]);
            hash.update(name.as_bytes());
            hash.update([0]);
            hash.update(canonical);
        }
        let digest = hash.finalize();
        let version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(TypeResources {
            type_url,
            version,
            resources,
        })
    }
}

/// A resource as an `Any` and its name, or where and why it is refused.
fn encode(
    descriptor: &MessageDescriptor,
    type_url: &str,
    value: &Json,
) -> Result<(Any, String), (String, String)> {
    let Json::Object(fields) = value else {
        return Err((String::new(), "a resource is a JSON object".into()));
    };
    let stripped;
    let message_json = match fields.get("@type") {
        None => value,
        Some(Json::String(url)) if url == type_url => {
            let mut without = fields.clone();
            without.remove("@type");
            stripped = Json::Object(without);
            &stripped
        }
        Some(other) => {
            return Err((
                "/@type".into(),
                format!("is {other}, expected \"{type_url}\""),
            ))
        }
    };
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(message_json, &mut track);
    let message = DynamicMessage::deserialize_with_options(
        descriptor.clone(),
        deserializer,
        &DeserializeOptions::new(),
    )
    .map_err(|e| (json_pointer(&track.path()), e.to_string()))?;
    let name = match message.get_field_by_name("name").as_deref() {
        Some(Value::String(name)) => name.clone(),
        _ => String::new(),
    };
    let any = Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    };
    Ok((any, name))
}

fn json_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        pointer.push('/');
        match segment {
            Segment::Seq { index } => pointer.push_str(&index.to_string()),
            Segment::Map { key } => pointer.push_str(&key.replace('~', "~0").replace('/', "~1")),
            Segment::Enum { variant } => pointer.push_str(variant),
            Segment::Unknown => pointer.push('?'),
        }
    }
    pointer
}

/// JSON with object keys sorted, so that the version does not depend on the
/// order a writer put them in.
fn write_canonical(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Json::String(key.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(name: &str) -> Json {
        json!({
            "@type": CLUSTER_TYPE,
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}}
                }
            },
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}
            ]}]}
        })
    }

    #[test]
    fn the_same_content_has_the_same_version_in_any_order() -> Result<(), XdsError> {
        let a = XdsResources::from_json(&[cluster("a"), cluster("b")], &[])?;
        let b = XdsResources::from_json(&[cluster("b"), cluster("a")], &[])?;
        let c = XdsResources::from_json(&[cluster("a")], &[])?;
        assert_eq!(a.version(CLUSTER_TYPE), b.version(CLUSTER_TYPE));
        assert_ne!(a.version(CLUSTER_TYPE), c.version(CLUSTER_TYPE));
        assert_eq!(a.names(CLUSTER_TYPE), ["a", "b"]);
        assert_eq!(
            a.version(EXTENSION_CONFIG_TYPE),
            c.version(EXTENSION_CONFIG_TYPE)
        );
        Ok(())
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_path() {
        let mut bad = cluster("bad");
        bad["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["adress"] = json!({});
        let error = XdsResources::from_json(&[cluster("good"), bad], &[]).err();
        let Some(XdsError::Resource {
            index, name, path, ..
        }) = &error
        else {
            unreachable!("{error:?}")
        };
        assert_eq!((*index, name.as_deref()), (1, Some("bad")));
        assert_eq!(path, "/load_assignment/endpoints/0/lb_endpoints/0/endpoint");
        let shown = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(shown.contains("adress"), "{shown}");
    }

    #[test]
    fn an_unknown_nested_type_is_refused() {
        let mut bad = cluster("bad");
        bad["typed_extension_protocol_options"]["x"] =
            json!({"@type": "type.googleapis.com/envoy.NoSuchThing"});
        let error = XdsResources::from_json(&[bad], &[]).err();
        let shown = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(shown.contains("envoy.NoSuchThing"), "{shown}");
    }

    #[test]
    fn a_wrong_type_a_missing_name_and_a_repeated_name_are_refused() {
        let mut other = cluster("x");
        other["@type"] = json!(EXTENSION_CONFIG_TYPE);
        let nameless = json!({"type": "STATIC"});
        for (clusters, expected) in [
            (vec![other], "/@type"),
            (vec![nameless], "/name"),
            (vec![cluster("a"), cluster("a")], "/name"),
        ] {
            match XdsResources::from_json(&clusters, &[]) {
                Err(XdsError::Resource { path, .. }) => assert_eq!(path, expected),
                other => unreachable!("{other:?}"),
            }
        }
    }

    #[test]
    fn an_extension_config_carries_its_filter() -> Result<(), XdsError> {
        let config = json!({
            "name": "origin-networks",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"action": "ALLOW", "policies": {}}
            }
        });
        let resources = XdsResources::from_json(&[], &[config])?;
        assert_eq!(resources.names(EXTENSION_CONFIG_TYPE), ["origin-networks"]);
        Ok(())
    }
}
