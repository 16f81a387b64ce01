//! Checks across fields: known misconfigurations from the CDN FAQ are warned about.

use crate::policy::host::{is_ip_literal, strip_port};
use crate::policy::reader::Findings;
use crate::policy::*;

impl Policy {
    /// Schemes this policy can use towards `origin`, for any viewer.
    pub fn schemes_for(&self, origin: &Origin) -> Vec<Scheme> {
        match self.protocol {
            ProtocolPolicy::Off if origin.port == 443 => vec![Scheme::Https],
            ProtocolPolicy::Off | ProtocolPolicy::Http => vec![Scheme::Http],
            ProtocolPolicy::Https => vec![Scheme::Https],
            ProtocolPolicy::Follow => vec![Scheme::Http, Scheme::Https],
        }
    }
}

/// The port and scheme the protocol policy gives an origin.
pub(crate) fn port_for(policy: &Policy, origin: &Origin, scheme: Scheme) -> u16 {
    match policy.protocol {
        ProtocolPolicy::Off => origin.port,
        _ => match scheme {
            Scheme::Http => policy.http_port,
            Scheme::Https => policy.https_port,
        },
    }
}

/// Known misconfigurations from the CDN FAQ: legal, but likely to fail.
pub(crate) fn lint(f: &mut Findings, policy: Option<&Policy>) {
    let Some(p) = policy else { return };
    if p.protocol == ProtocolPolicy::Https && p.https_port == 80 {
        f.warn(
            "/protocol/https_port",
            "HTTPS to port 80: origins almost never speak TLS there, expect 502s",
            "use `http` with port 80, or the origin's real HTTPS port",
        );
    }
    if p.protocol == ProtocolPolicy::Http && p.http_port == 443 {
        f.warn(
            "/protocol/http_port",
            "plain HTTP to port 443: the origin will expect a TLS handshake, expect 502s",
            "use `https` with port 443, or the origin's real HTTP port",
        );
    }
    if let OriginSni::Custom(sni) = &p.origin_sni {
        let host = match &p.origin_host {
            OriginHost::Custom(h) => Some(strip_port(h).to_owned()),
            OriginHost::OriginDomain => p.first_primary().map(|o| o.address.clone()),
            OriginHost::AccelerationDomain => match &p.domain {
                DomainPattern::Exact(d) => Some(d.clone()),
                DomainPattern::Wildcard(_) => None,
            },
        };
        if host.as_deref() != Some(sni.as_str()) {
            f.warn(
                "/origin_sni/value",
                format!("SNI `{sni}` differs from the Host sent to origin ({})", host.unwrap_or_else(|| "the viewer's host".to_owned())),
                "make sure the origin's certificate covers the SNI and that it serves the Host on that certificate's site; otherwise set both to the same name",
            );
        }
    }
    if p.origin_sni == OriginSni::OriginHost && p.origin_host == OriginHost::OriginDomain {
        for o in &p.origins {
            if is_ip_literal(&o.address) && p.schemes_for(o).contains(&Scheme::Https) {
                f.warn(
                    "/origin_sni",
                    format!("the origin Host is the IP address {}, so no SNI is sent and the certificate cannot be checked against a name", o.address),
                    "set `origin_sni` to the name on the origin's certificate",
                );
            }
        }
    }
}
