//! Edge-wide settings that travel with the policies in the plugin configuration.

use crate::diagnostic::PolicyDiagnostic;
use crate::parse::cluster_name;
use crate::reader::{header_safe, integer_in, FieldReader, Findings};
use serde_json::Value;

pub const DEFAULT_CLUSTER_HEADER: &str = "x-origin-cluster";
pub const DEFAULT_DFP_HTTP_CLUSTER: &str = "origin_dfp_http";
pub const DEFAULT_DFP_HTTPS_CLUSTER: &str = "origin_dfp_https";
pub const DEFAULT_MAX_REPLAY_BODY_BYTES: u32 = 1024 * 1024;
pub const MAX_REPLAY_BODY_BYTES: u32 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_SECONDARY_RESPONSE_BYTES: u32 = 8 * 1024 * 1024;
pub const MAX_SECONDARY_RESPONSE_BYTES: u32 = 64 * 1024 * 1024;

/// What the filter does with a Host that no policy covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownDomain {
    /// Leave the request untouched; the route decides.
    PassThrough,
    /// Answer locally, without contacting any origin.
    LocalReply { status: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Request header the route's `cluster_header` reads.
    pub cluster_header: String,
    pub dfp_http_cluster: String,
    pub dfp_https_cluster: String,
    pub unknown_domain: UnknownDomain,
    /// Take the viewer scheme from `x-forwarded-proto` before `:scheme`; only safe
    /// behind a TLS-terminating proxy that sets (and overwrites) that header.
    pub trust_x_forwarded_proto: bool,
    /// Add `x-origin-decision` to responses, naming origin, scheme, port, Host and SNI.
    pub decision_header: bool,
    /// Largest request body kept for a failover replay; larger bodies are not failed over.
    pub max_replay_body_bytes: u32,
    /// Largest secondary-origin response body relayed; a failover answer is
    /// copied whole into the filter, so larger ones become a 502.
    pub max_secondary_response_bytes: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_header: DEFAULT_CLUSTER_HEADER.to_owned(),
            dfp_http_cluster: DEFAULT_DFP_HTTP_CLUSTER.to_owned(),
            dfp_https_cluster: DEFAULT_DFP_HTTPS_CLUSTER.to_owned(),
            unknown_domain: UnknownDomain::PassThrough,
            trust_x_forwarded_proto: false,
            decision_header: false,
            max_replay_body_bytes: DEFAULT_MAX_REPLAY_BODY_BYTES,
            max_secondary_response_bytes: DEFAULT_MAX_SECONDARY_RESPONSE_BYTES,
        }
    }
}

fn boolean(f: &mut Findings, value: &Value, path: &str) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        _ => {
            f.error(path, "expected true or false");
            None
        }
    }
}

/// Parses the `settings` object; absent fields take their defaults.
pub fn parse_settings(
    source: &str,
    value: Option<&Value>,
) -> Result<Settings, Vec<PolicyDiagnostic>> {
    let mut settings = Settings::default();
    let Some(value) = value else {
        return Ok(settings);
    };
    let mut f = Findings::new(source);
    if let Some(mut r) = FieldReader::open(&mut f, value, "/settings") {
        if let Some((v, p)) = r.field("cluster_header") {
            match v.as_str() {
                Some(h)
                    if header_safe(&mut f, h, &p, "cluster header")
                        && h.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
                {
                    settings.cluster_header = h.to_owned();
                }
                Some(h) if !h.is_empty() => f.error(
                    &p,
                    format!(
                        "cluster header `{}` must be a lower-case header name",
                        h.escape_debug()
                    ),
                ),
                Some(_) => {}
                None => f.error(&p, "expected a header name"),
            }
        }
        if let Some((v, p)) = r.field("dynamic_forward_proxy") {
            if let Some(mut dfp) = FieldReader::open(&mut f, v, &p) {
                if let Some((v, p)) = dfp.field("http") {
                    settings.dfp_http_cluster = cluster_name(&mut f, v, &p).unwrap_or_default();
                }
                if let Some((v, p)) = dfp.field("https") {
                    settings.dfp_https_cluster = cluster_name(&mut f, v, &p).unwrap_or_default();
                }
                dfp.finish(&mut f);
            }
        }
        if let Some((v, p)) = r.field("unknown_domain") {
            if let Some(mut u) = FieldReader::open(&mut f, v, &p) {
                let action = u.field("action");
                let status = u.field("status");
                match action.as_ref().map(|(v, p)| (v.as_str(), p)) {
                    Some((Some("pass_through"), _)) => {
                        if let Some((_, sp)) = &status {
                            f.error(sp, "`status` only applies to the `local_reply` action");
                        }
                        settings.unknown_domain = UnknownDomain::PassThrough;
                    }
                    Some((Some("local_reply"), _)) => {
                        let code = match &status {
                            Some((v, sp)) => integer_in(&mut f, v, sp, 200, 599, "status"),
                            None => Some(404),
                        };
                        settings.unknown_domain = UnknownDomain::LocalReply {
                            status: code.and_then(|c| u16::try_from(c).ok()).unwrap_or(404),
                        };
                    }
                    Some((_, ap)) => {
                        let ap = ap.clone();
                        f.error(&ap, "expected `pass_through` or `local_reply`");
                    }
                    None => f.error(
                        &p,
                        "missing field `action` (`pass_through` or `local_reply`)",
                    ),
                }
                u.finish(&mut f);
            }
        }
        if let Some((v, p)) = r.field("trust_x_forwarded_proto") {
            settings.trust_x_forwarded_proto = boolean(&mut f, v, &p).unwrap_or(false);
        }
        if let Some((v, p)) = r.field("decision_header") {
            settings.decision_header = boolean(&mut f, v, &p).unwrap_or(false);
        }
        if let Some((v, p)) = r.field("max_replay_body_bytes") {
            if let Some(n) = integer_in(
                &mut f,
                v,
                &p,
                0,
                u64::from(MAX_REPLAY_BODY_BYTES),
                "max_replay_body_bytes",
            ) {
                settings.max_replay_body_bytes =
                    u32::try_from(n).unwrap_or(DEFAULT_MAX_REPLAY_BODY_BYTES);
            }
        }
        if let Some((v, p)) = r.field("max_secondary_response_bytes") {
            if let Some(n) = integer_in(
                &mut f,
                v,
                &p,
                0,
                u64::from(MAX_SECONDARY_RESPONSE_BYTES),
                "max_secondary_response_bytes",
            ) {
                settings.max_secondary_response_bytes =
                    u32::try_from(n).unwrap_or(DEFAULT_MAX_SECONDARY_RESPONSE_BYTES);
            }
        }
        r.finish(&mut f);
    }
    let list = f.into_list();
    if list.is_empty() {
        Ok(settings)
    } else {
        Err(list)
    }
}
