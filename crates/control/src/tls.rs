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
//! every request and open connection is checked again (a connection whose
//! certificate is revoked, or whose node is removed, is closed with its ADS
//! stream or its feed poll: its client connects again, with the certificate
//! it has now, and a revoked one is refused in the handshake).

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
    /// Bumped every time the files are taken again.
    reloads: tokio::sync::watch::Sender<u64>,
}

impl Admission {
    pub fn load(files: TlsFiles) -> Result<Admission, ControlError> {
        let stamp = stamp(&files);
        let loaded = load(&files)?;
        Ok(Admission {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
            stamp: RwLock::new(stamp),
            reloads: tokio::sync::watch::Sender::new(0),
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

    /// Completes, with why, once a connection with these client
    /// certificates is no longer admitted (its certificate revoked, its node
    /// removed from the nodes file): the connection is then closed, so that
    /// neither a request in flight (a feed long poll) nor a stream on it gets
    /// anything more, and its client connects again, with the certificate it
    /// has now. Checked every time the files are read again.
    pub fn refused(
        self: Arc<Self>,
        certs: Option<Vec<CertificateDer<'static>>>,
    ) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut reloads = self.reloads.subscribe();
        async move {
            loop {
                if reloads.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if let Err(why) = self.admit(certs.as_deref()) {
                    return why;
                }
            }
        }
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
                self.reloads.send_modify(|n| *n += 1);
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
        // Another CA with the same name as ours: its signature does not verify.
        rustls::Error::InvalidCertificate(
            reason @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
        ) => format!("a client certificate not issued by the CA (--tls-ca): {reason:?}"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::string::Ia5String;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SanType, SerialNumber,
    };

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn new_ca() -> Result<Ca, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A certificate with these SAN URIs and serial: its PEM, its key's PEM, its DER.
    fn issue(
        ca: &Ca,
        uris: &[&str],
        serial: u64,
    ) -> Result<(String, String, Vec<u8>), Box<dyn std::error::Error>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(Ia5String::try_from(*uri)?));
        }
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca.issuer)?;
        Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
    }

    fn crl(ca: &Ca, serials: &[u64]) -> Result<String, rcgen::Error> {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.issuer)?
        .pem()
    }

    fn der(pem: &str) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
    }

    #[test]
    fn the_identity_is_the_one_san_uri_under_the_prefix() -> TestResult {
        let ca = new_ca()?;
        let of = |uris: &[&str]| -> Result<Result<Identity, String>, Box<dyn std::error::Error>> {
            Ok(Identity::of_certificate(&issue(&ca, uris, 1)?.2))
        };
        assert_eq!(
            of(&["spiffe://origin-policy/node/edge-7"])?,
            Ok(Identity::Node("edge-7".into()))
        );
        assert_eq!(
            of(&[
                "https://example.com/",
                "spiffe://origin-policy/operator/ops"
            ])?,
            Ok(Identity::Operator("ops".into()))
        );
        assert_eq!(
            of(&["spiffe://origin-policy/server/a"])?,
            Ok(Identity::Server("a".into()))
        );
        assert!(of(&[])?.is_err_and(|e| e.contains("no identity")));
        assert!(of(&["spiffe://origin-policy/root/x"])?.is_err());
        assert!(of(&["spiffe://origin-policy/node/a/b"])?.is_err());
        assert!(of(&[
            "spiffe://origin-policy/node/a",
            "spiffe://origin-policy/operator/b"
        ])?
        .is_err_and(|e| e.contains("several")));
        Ok(())
    }

    #[test]
    fn a_node_may_poll_and_check_health_only_an_operator_anything() {
        use hyper::Method;
        let node = Identity::Node("n".into());
        let server = Identity::Server("s".into());
        let operator = Identity::Operator("o".into());
        assert!(node.may_request(&Method::GET, "/changes"));
        assert!(node.may_request(&Method::GET, "/healthz"));
        for (method, path) in [
            (Method::GET, "/status"),
            (Method::GET, "/v1/domains"),
            (Method::PUT, "/v1/domains/a.example"),
            (Method::POST, "/changes"),
            (Method::POST, "/v1/rollout/promote"),
        ] {
            assert!(!node.may_request(&method, path), "{method} {path}");
        }
        assert!(server.may_request(&Method::GET, "/status"));
        assert!(!server.may_request(&Method::GET, "/changes"));
        assert!(!server.may_request(&Method::PUT, "/v1/domains/a.example"));
        assert!(operator.may_request(&Method::PUT, "/v1/domains/a.example"));
        assert!(operator.may_request(&Method::GET, "/status"));
    }

    struct Files {
        _dir: tempfile::TempDir,
        files: TlsFiles,
    }

    fn files(ca: &Ca, crl_pem: &str, nodes: &str) -> Result<Files, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (cert, key, _) = issue(ca, &["spiffe://origin-policy/server/s"], 99)?;
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), &ca.pem)?;
        std::fs::write(path("s.pem"), cert)?;
        std::fs::write(path("s-key.pem"), key)?;
        std::fs::write(path("crl.pem"), crl_pem)?;
        std::fs::write(path("nodes"), nodes)?;
        let files = TlsFiles {
            ca: path("ca.pem"),
            cert: path("s.pem"),
            key: path("s-key.pem"),
            crl: Some(path("crl.pem")),
            nodes: Some(path("nodes")),
        };
        Ok(Files { _dir: dir, files })
    }

    #[test]
    fn a_revoked_a_foreign_and_an_unlisted_certificate_are_refused() -> TestResult {
        let ca = new_ca()?;
        let other = new_ca()?;
        let node = |ca: &Ca, id: &str, serial| {
            issue(ca, &[&format!("{NODE_PREFIX}{id}")], serial).map(|(pem, _, _)| pem)
        };
        let good = der(&node(&ca, "edge-1", 10)?)?;
        let revoked = der(&node(&ca, "edge-2", 11)?)?;
        let unlisted = der(&node(&ca, "edge-3", 12)?)?;
        let foreign = der(&node(&other, "edge-1", 10)?)?;
        let operator = der(&issue(&ca, &[&format!("{OPERATOR_PREFIX}ops")], 13)?.0)?;
        let files = files(
            &ca,
            &crl(&ca, &[11])?,
            "# the fleet\nedge-1\nedge-2 # revoked\n",
        )?;
        let admission = Admission::load(files.files.clone())?;

        assert_eq!(
            admission.admit(Some(&good)),
            Ok(Identity::Node("edge-1".into()))
        );
        assert_eq!(
            admission.admit(Some(&operator)),
            Ok(Identity::Operator("ops".into()))
        );
        let refused = |certs: &[CertificateDer<'static>]| admission.admit(Some(certs)).err();
        assert!(refused(&revoked).is_some_and(|e| e.contains("revoked")));
        assert!(refused(&foreign).is_some_and(|e| e.contains("not issued by the CA")));
        assert!(refused(&unlisted).is_some_and(|e| e.contains("not an admitted node")));
        assert_eq!(
            admission.admit(None),
            Err("no client certificate".to_owned())
        );

        // The files change: edge-1 revoked, edge-3 listed.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(
            files.files.crl.as_deref().ok_or("crl")?,
            crl(&ca, &[10, 11])?,
        )?;
        std::fs::write(
            files.files.nodes.as_deref().ok_or("nodes")?,
            "edge-1\nedge-3\n",
        )?;
        assert!(admission.reload());
        assert!(!admission.reload());
        assert!(refused(&good).is_some_and(|e| e.contains("revoked")));
        assert_eq!(
            admission.admit(Some(&unlisted)),
            Ok(Identity::Node("edge-3".into()))
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_open_connection_is_refused_once_its_certificate_is_revoked() -> TestResult {
        let ca = new_ca()?;
        let node = |id: &str, serial| -> Result<_, Box<dyn std::error::Error>> {
            Ok(der(
                &issue(&ca, &[&format!("{NODE_PREFIX}{id}")], serial)?.0
            )?)
        };
        let (old, new) = (node("edge-1", 10)?, node("edge-1", 20)?);
        let files = files(&ca, &crl(&ca, &[])?, "edge-1\n")?;
        let admission = Arc::new(Admission::load(files.files.clone())?);
        let mut old_refused = Box::pin(admission.clone().refused(Some(old)));
        let mut new_refused = Box::pin(admission.clone().refused(Some(new)));
        let pending = Duration::from_millis(100);
        assert!(tokio::time::timeout(pending, &mut old_refused)
            .await
            .is_err());

        // A change that keeps both admitted completes neither.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(
            files.files.nodes.as_deref().ok_or("nodes")?,
            "edge-1\nedge-2\n",
        )?;
        assert!(admission.reload());
        assert!(tokio::time::timeout(pending, &mut old_refused)
            .await
            .is_err());

        // The old serial revoked (the certificate rotated): the connection
        // made with it is refused, the one made with the new one is not.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(files.files.crl.as_deref().ok_or("crl")?, crl(&ca, &[10])?)?;
        assert!(admission.reload());
        let why = tokio::time::timeout(Duration::from_secs(10), &mut old_refused).await?;
        assert!(why.contains("revoked by the CRL"), "{why}");
        assert!(tokio::time::timeout(pending, &mut new_refused)
            .await
            .is_err());
        Ok(())
    }

    #[tokio::test]
    async fn the_handshake_refuses_a_revoked_client_certificate() -> TestResult {
        let ca = new_ca()?;
        let (good_pem, good_key, _) = issue(&ca, &[&format!("{NODE_PREFIX}edge-1")], 10)?;
        let (revoked_pem, revoked_key, _) = issue(&ca, &[&format!("{NODE_PREFIX}edge-2")], 11)?;
        let files = files(&ca, &crl(&ca, &[11])?, "edge-1\nedge-2\n")?;
        let refusals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let admission = Arc::new(Admission::load(files.files.clone())?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = admission.clone();
        let refused = refusals.clone();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                match server.acceptor().accept(stream).await {
                    Ok(mut tls) => {
                        let certs = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                        if server.admit(certs.as_deref()).is_ok() {
                            use tokio::io::AsyncWriteExt;
                            let _ = tls.write_all(b"y").await;
                            let _ = tls.flush().await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    Err(e) => {
                        if let (Some(why), Ok(mut list)) =
                            (Admission::handshake_refusal(peer, &e), refused.lock())
                        {
                            list.push(why);
                        }
                    }
                }
            }
        });
        let connect = |cert: String, key: String| {
            let ca_pem = ca.pem.clone();
            async move {
                let mut roots = RootCertStore::empty();
                for c in der(&ca_pem)? {
                    roots.add(c)?;
                }
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    der(&cert)?,
                    PrivateKeyDer::from_pem_slice(key.as_bytes())?,
                )?;
                let stream = tokio::net::TcpStream::connect(address).await?;
                let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect("127.0.0.1".try_into()?, stream)
                    .await?;
                // TLS 1.3: a refused client certificate shows on the first read.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                tls.write_all(b"x").await?;
                let mut byte = [0u8; 1];
                let read =
                    tokio::time::timeout(Duration::from_millis(500), tls.read(&mut byte)).await;
                Ok::<bool, Box<dyn std::error::Error>>(matches!(read, Ok(Ok(1))))
            }
        };
        assert!(connect(good_pem, good_key).await?);
        assert!(!connect(revoked_pem, revoked_key).await?);
        let refusals = refusals.lock().map_err(|e| e.to_string())?.clone();
        assert_eq!(
            refusals,
            vec!["127.0.0.1: TLS refused: a client certificate revoked by the CRL (--tls-crl)"]
        );
        Ok(())
    }

    #[test]
    fn the_nodes_file_is_one_id_a_line_with_comments() {
        let nodes = parse_nodes("# fleet\n edge-1 \n\nedge-2 # canary\n#edge-3\n");
        assert_eq!(
            nodes.into_iter().collect::<Vec<_>>(),
            vec!["edge-1".to_owned(), "edge-2".to_owned()]
        );
    }

    #[test]
    fn only_loopback_addresses_are_loopback() {
        assert!(is_loopback("127.0.0.41:18700"));
        assert!(is_loopback("[::1]:18700"));
        assert!(!is_loopback("0.0.0.0:18700"));
        assert!(!is_loopback("192.0.2.1:18700"));
        assert!(!is_loopback("not an address"));
    }
}
