//! mTLS on the HTTP listener (API, feed, status) and the ADS listener
//! (`serve --tls-ca --tls-cert --tls-key [--tls-crl] [--tls-nodes]`).
//!
//! A client must present a certificate that chains to the CA and that the
//! CRL does not revoke (rustls' WebPKI verifier). Who it is comes from the
//! certificate's SAN URI, never from what the client says:
//!
//! - `spiffe://origin-policy/node/ID`: an Envoy; it must also be listed in
//!   the nodes file (when one is given). It may poll the feed as node ID and
//!   read `/healthz`, and over ADS it gets the xDS of node ID only.
//! - `spiffe://origin-policy/operator/NAME`: the API (`/v1/*`) and `/status`.
//! - `spiffe://origin-policy/server/NAME`: a replica; `/healthz` and `/status`.
//!
//! The CRL, the nodes file and the server's own certificate are read again
//! when their files change: a new connection is checked against them, and
//! every request and open ADS stream is checked again (a node revoked or
//! removed loses its stream and its next poll is refused).

use crate::error::ControlError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// Every identity's URI starts with this.
pub const IDENTITY_PREFIX: &str = "spiffe://origin-policy/";
pub const NODE_PREFIX: &str = "spiffe://origin-policy/node/";
pub const SERVER_PREFIX: &str = "spiffe://origin-policy/server/";
pub const OPERATOR_PREFIX: &str = "spiffe://origin-policy/operator/";

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are looked at for a change.
const RELOAD_EVERY: Duration = Duration::from_millis(300);

/// Who a client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Node(String),
    Server(String),
    Operator(String),
}

impl Identity {
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let named = |prefix: &str| {
            uri.strip_prefix(prefix)
                .filter(|name| valid_name(name))
                .map(str::to_owned)
        };
        named(NODE_PREFIX)
            .map(Identity::Node)
            .or_else(|| named(SERVER_PREFIX).map(Identity::Server))
            .or_else(|| named(OPERATOR_PREFIX).map(Identity::Operator))
    }

    pub fn uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{NODE_PREFIX}{id}"),
            Identity::Server(name) => format!("{SERVER_PREFIX}{name}"),
            Identity::Operator(name) => format!("{OPERATOR_PREFIX}{name}"),
        }
    }

    /// The identity of a certificate (DER): its one SAN URI under
    /// [`IDENTITY_PREFIX`].
    pub fn of_certificate(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("the certificate cannot be read: {e}"))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|e| format!("the certificate's names cannot be read: {e}"))?;
        let uris: Vec<&str> = names
            .iter()
            .flat_map(|san| san.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| uri.starts_with(IDENTITY_PREFIX))
            .collect();
        match uris.as_slice() {
            [uri] => Identity::from_uri(uri)
                .ok_or_else(|| format!("{uri} is not a node, server or operator identity")),
            [] => Err(format!(
                "the certificate has no identity (a SAN URI {IDENTITY_PREFIX}...)"
            )),
            _ => Err(format!(
                "the certificate has several identities ({})",
                uris.join(", ")
            )),
        }
    }

    /// Whether this identity may send `method path` to the HTTP listener.
    pub fn may_request(&self, method: &hyper::Method, path: &str) -> bool {
        let get = method == hyper::Method::GET;
        match self {
            Identity::Operator(_) => true,
            Identity::Node(_) => get && matches!(path, "/changes" | "/healthz"),
            Identity::Server(_) => get && matches!(path, "/healthz" | "/status"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// A name in an identity: letters, digits, `.`, `_` and `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A listener without TLS (a loopback address only): anyone on the host.
    Local,
    /// A client certificate that chains to the CA and is not revoked.
    Certified(Identity),
}

/// The files of `serve --tls-*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: Option<PathBuf>,
    /// The admitted node ids, one a line (`#` comments). Without it, every
    /// node certificate of the CA is admitted.
    pub nodes: Option<PathBuf>,
}

impl TlsFiles {
    fn all(&self) -> Vec<&Path> {
        let mut files = vec![self.ca.as_path(), &self.cert, &self.key];
        files.extend(self.crl.as_deref());
        files.extend(self.nodes.as_deref());
        files
    }
}

/// The files as read once.
struct Loaded {
    config: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    nodes: Option<BTreeSet<String>>,
}

type Stamp = Vec<Option<(u64, Option<SystemTime>)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    files
        .all()
        .iter()
        .map(|path| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        })
        .collect()
}

fn tls_error(path: &Path, why: impl fmt::Display) -> ControlError {
    ControlError::Tls(format!("{}: {why}", path.display()))
}

/// The ids of a nodes file: one a line, `#` starts a comment.
pub fn parse_nodes(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

fn load(files: &TlsFiles) -> Result<Loaded, ControlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = |path: &Path| {
        CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| tls_error(path, e))
            .and_then(|certs| {
                if certs.is_empty() {
                    Err(tls_error(path, "no certificate in it"))
                } else {
                    Ok(certs)
                }
            })
    };
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca).map_err(|e| tls_error(&files.ca, e))?;
    }
    let crls = match &files.crl {
        Some(path) => CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| tls_error(path, e))?,
        None => Vec::new(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| tls_error(&files.ca, e))?;
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| tls_error(&files.key, e))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(&files.cert, e))?;
    let nodes = match &files.nodes {
        Some(path) => Some(parse_nodes(
            &std::fs::read_to_string(path).map_err(|e| tls_error(path, e))?,
        )),
        None => None,
    };
    Ok(Loaded {
        config: Arc::new(config),
        verifier,
        nodes,
    })
}

/// Who may connect and what as: the TLS configuration of both listeners,
/// the verifier with the CRL, the admitted nodes. Read again when a file
/// changes ([`Admission::follow`]).
pub struct Admission {
    files: TlsFiles,
    loaded: RwLock<Arc<Loaded>>,
    stamp: RwLock<Stamp>,
}

impl Admission {
    pub fn load(files: TlsFiles) -> Result<Admission, ControlError> {
        let stamp = stamp(&files);
        let loaded = load(&files)?;
        Ok(Admission {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
            stamp: RwLock::new(stamp),
        })
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .map_or_else(|p| p.into_inner().clone(), |l| l.clone())
    }

    /// The acceptor for a new connection, with the files as last read.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.loaded().config.clone())
    }

    /// The identity of a connection's client certificates, checked again
    /// against the CA and the CRL as they are now, and, for a node, the
    /// nodes file.
    pub fn admit(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<Identity, String> {
        let Some((end_entity, intermediates)) = certs.and_then(|c| c.split_first()) else {
            return Err("no client certificate".to_owned());
        };
        let loaded = self.loaded();
        loaded
            .verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| certificate_refused(&e))?;
        let identity = Identity::of_certificate(end_entity)?;
        if let (Identity::Node(id), Some(nodes)) = (&identity, &loaded.nodes) {
            if !nodes.contains(id) {
                return Err(format!(
                    "{identity} is not an admitted node (not in {})",
                    self.files
                        .nodes
                        .as_deref()
                        .map_or_else(String::new, |p| p.display().to_string())
                ));
            }
        }
        Ok(identity)
    }

    /// Why a TLS handshake failed, for an event; `None` when the peer just
    /// went away.
    pub fn handshake_refusal(peer: SocketAddr, error: &std::io::Error) -> Option<String> {
        use std::io::ErrorKind;
        if matches!(
            error.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ) {
            return None;
        }
        let why = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map_or_else(|| error.to_string(), certificate_refused);
        Some(format!("{}: TLS refused: {why}", peer.ip()))
    }

    /// Reads the files again if one changed; whether it did and they were
    /// taken. Files that do not load are logged and the last good ones kept.
    pub fn reload(&self) -> bool {
        let now = stamp(&self.files);
        if self.stamp.read().is_ok_and(|s| *s == now) {
            return false;
        }
        if let Ok(mut s) = self.stamp.write() {
            *s = now;
        }
        match load(&self.files) {
            Ok(loaded) => {
                if let Ok(mut l) = self.loaded.write() {
                    *l = Arc::new(loaded);
                }
                eprintln!("serve: the TLS files changed: read again");
                true
            }
            Err(e) => {
                eprintln!("serve: {e}; the TLS files as last read are kept");
                false
            }
        }
    }

    /// Looks at the files every 300 ms; `changed` is called after they were
    /// read again (say, to check the open ADS streams again).
    pub fn follow(self: Arc<Self>, changed: impl Fn() + Send + 'static) {
        std::thread::spawn(move || loop {
            std::thread::sleep(RELOAD_EVERY);
            if self.reload() {
                changed();
            }
        });
    }
}

/// Why a client certificate was refused, in an operator's words.
fn certificate_refused(error: &rustls::Error) -> String {
    use rustls::CertificateError;
    match error {
        rustls::Error::NoCertificatesPresented => "no client certificate".to_owned(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "a client certificate not issued by the CA (--tls-ca): unknown issuer".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            "a client certificate revoked by the CRL (--tls-crl)".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "an expired client certificate".to_owned()
        }
        other => format!("client certificate refused: {other}"),
    }
}

/// Whether every address `address` names is a loopback address.
pub fn is_loopback(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    match address.to_socket_addrs() {
        Ok(addresses) => {
            let addresses: Vec<SocketAddr> = addresses.collect();
            !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}
