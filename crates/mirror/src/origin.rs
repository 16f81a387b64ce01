//! Reaching the primary origin exactly as the edge does: the policy's address
//! and port, its scheme, the Host it writes, the SNI it sends and the name it
//! checks the certificate against (or only the chain, where the edge sends no
//! name), with the policy's connect and response timeouts.

use crate::error::ResourceFailure;
use crate::store::USER_AGENT_VALUE;
use origin_policy_engine::{OriginTarget, Scheme, Settings};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, HOST};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// One origin as the edge reaches it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryOrigin {
    pub scheme: Scheme,
    pub address: String,
    pub port: u16,
    /// The Host header.
    pub authority: String,
    /// Sent in the handshake and checked against the certificate; `None`:
    /// no name is sent and only the certificate chain is checked, as Envoy does.
    pub sni: Option<String>,
    pub connect_timeout: Duration,
    /// Until the response headers, and between two reads of the body.
    pub response_timeout: Duration,
}

impl PrimaryOrigin {
    pub fn from_target(t: &OriginTarget<'_>) -> Self {
        PrimaryOrigin {
            scheme: t.scheme,
            address: t.address.to_owned(),
            port: t.port,
            authority: t.authority.clone().into_owned(),
            sni: t.sni.as_ref().map(|s| s.clone().into_owned()),
            connect_timeout: Duration::from_millis(u64::from(t.connect_timeout_ms)),
            response_timeout: Duration::from_millis(u64::from(t.response_timeout_ms)),
        }
    }

    /// `https://origin.example.net:443 (Host shop.example.com, SNI …)`.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "{}://{}:{} (Host {}",
            self.scheme.as_str(),
            self.address,
            self.port,
            self.authority
        );
        if let Some(sni) = &self.sni {
            out.push_str(&format!(", SNI {sni}"));
        }
        out.push(')');
        out
    }
}

/// An HTTP client bound to one origin endpoint.
#[derive(Debug, Clone)]
pub struct OriginClient {
    pub endpoint: PrimaryOrigin,
    client: reqwest::Client,
    /// `scheme://name-or-ip:port`: the name is the SNI, resolved to the
    /// origin's address by the client, never by DNS.
    base: String,
}

impl OriginClient {
    /// Resolves the origin's address (the settings' `resolve` table first,
    /// then the system's resolver) and builds the client.
    pub async fn connect(endpoint: PrimaryOrigin, settings: &Settings) -> Result<Self, String> {
        let addrs = resolve(&endpoint.address, endpoint.port, settings).await?;
        // The copy is served to every viewer, whatever it accepts: the body
        // as the origin sends it unencoded. A body the origin encodes anyway
        // is kept with its `content-encoding`, as any viewer would get it.
        let mut defaults = HeaderMap::new();
        defaults.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        install_tls_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT_VALUE)
            .default_headers(defaults)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(endpoint.connect_timeout)
            .read_timeout(endpoint.response_timeout)
            .no_proxy()
            .pool_max_idle_per_host(8);
        let url_host = match (&endpoint.scheme, &endpoint.sni) {
            (Scheme::Https, Some(name)) => name.clone(),
            // No name in the handshake: the URL names the address itself.
            (Scheme::Https, None) => match addrs.first() {
                Some(SocketAddr::V6(a)) => format!("[{}]", a.ip()),
                Some(a) => a.ip().to_string(),
                None => return Err(format!("{}: no address", endpoint.address)),
            },
            (Scheme::Http, _) => "origin.mirror.invalid".to_owned(),
        };
        if !url_host.starts_with('[') && url_host.parse::<IpAddr>().is_err() {
            builder = builder.resolve_to_addrs(&url_host, &addrs);
        }
        if endpoint.scheme == Scheme::Https {
            let tls = tls_config(&settings.origin_ca_file, endpoint.sni.is_some())?;
            builder = builder.tls_backend_preconfigured(tls);
        }
        let client = builder.build().map_err(|e| format!("HTTP client: {e}"))?;
        let base = format!(
            "{}://{url_host}:{}",
            endpoint.scheme.as_str(),
            endpoint.port
        );
        Ok(OriginClient {
            endpoint,
            client,
            base,
        })
    }

    /// Sends `GET path` with the edge's Host and the given extra headers;
    /// returns once the response headers are in.
    pub async fn get(
        &self,
        path: &str,
        extra: HeaderMap,
    ) -> Result<reqwest::Response, ResourceFailure> {
        let mut headers = extra;
        let host = HeaderValue::from_str(&self.endpoint.authority)
            .map_err(|_| ResourceFailure::Http("the Host is not a header value".to_owned()))?;
        headers.insert(HOST, host);
        let send = self
            .client
            .get(format!("{}{path}", self.base))
            .headers(headers)
            .send();
        match tokio::time::timeout(self.endpoint.response_timeout, send).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(ResourceFailure::Timeout(format!(
                "no response headers within {} ms (the policy's response_timeout_ms)",
                self.endpoint.response_timeout.as_millis()
            ))),
        }
    }
}

async fn resolve(address: &str, port: u16, settings: &Settings) -> Result<Vec<SocketAddr>, String> {
    let bare = address.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if let Some(fixed) = settings.resolve.get(address) {
        let ip: IpAddr = fixed
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("settings.resolve gives {address} the address `{fixed}`"))?;
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host((address, port))
        .await
        .map_err(|e| format!("{address}: no address ({e})"))?
        .collect();
    if found.is_empty() {
        return Err(format!("{address}: no address"));
    }
    Ok(found)
}

/// Names the failure by the first cause a reader can act on.
pub(crate) fn classify(e: &reqwest::Error) -> ResourceFailure {
    let mut chain = String::new();
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    let mut tls = None;
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            tls = Some(r.to_string());
        }
        // An I/O error's `source` skips the error it wraps: look inside.
        let mut io = c.downcast_ref::<std::io::Error>();
        while let Some(inner) = io.and_then(std::io::Error::get_ref) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                tls = Some(r.to_string());
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        chain = c.to_string();
        cause = c.source();
    }
    if let Some(why) = tls {
        return ResourceFailure::Tls(why);
    }
    if e.is_timeout() {
        return ResourceFailure::Timeout(chain);
    }
    if e.is_connect() {
        return ResourceFailure::Unreachable(chain);
    }
    ResourceFailure::Http(chain)
}

/// Installs ring as rustls' process-wide provider, which reqwest (built
/// without one of its own) reads when it builds a client, ours and the S3
/// store's. Installing it again changes nothing.
pub(crate) fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn tls_config(ca_file: &str, check_name: bool) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("origin_ca_file {ca_file}: {e}"))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("origin_ca_file {ca_file}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("origin_ca_file {ca_file}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("origin_ca_file {ca_file}: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if check_name {
        verifier
    } else {
        Arc::new(ChainOnly(verifier))
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(config)
}

/// Checks the chain, signatures and validity like the name-checking verifier,
/// but not the name: what Envoy checks when its cluster has no name to check
/// (an origin reached by IP address with no SNI).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
