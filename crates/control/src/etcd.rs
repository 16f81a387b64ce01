//! etcd as the replicas' store (`serve --etcd`): its keys, their values, and
//! a client over every member that moves on from one that fails or has no
//! leader.
//!
//! Keys:
//! - `/origin-policy/domains/<domain>`: the domain's current revision,
//!   [`DomainValue`]; a removal keeps the key with an empty document, so that
//!   revisions keep counting. The key's mod_revision is the feed version.
//! - `/origin-policy/epoch`: the feed epoch, created once, shared by every
//!   replica.
//! - `/origin-policy/replicas/<name>`: a live replica, [`ReplicaValue`], under
//!   a lease it keeps alive.
//!
//! With [`EtcdTls`] (`--etcd-ca`, `--etcd-cert`, `--etcd-key`) every
//! connection is TLS (rustls): the members' certificates are checked against
//! the CA, and the replica presents its own.

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const DOMAINS: &str = "/origin-policy/domains/";
pub const EPOCH_KEY: &str = "/origin-policy/epoch";
pub const REPLICAS: &str = "/origin-policy/replicas/";

/// How long one request to one member may take before the next is tried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);

/// Why etcd could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No member answered (down, cut off, or without a leader): why, from
    /// the last one tried.
    Unreachable(String),
    /// A request went out and no answer came: it may have been applied.
    Unanswered(String),
    /// The watch's start revision was compacted away: a full resync is needed.
    Compacted(i64),
    /// A value that is not ours.
    Invalid(String),
    /// The endpoints or the TLS files cannot be used: which flag, which file.
    Config(String),
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::Unreachable(why) => write!(f, "etcd unreachable: {why}"),
            EtcdError::Unanswered(why) => write!(f, "etcd did not answer: {why}"),
            EtcdError::Compacted(revision) => {
                write!(f, "etcd compacted the history up to revision {revision}")
            }
            EtcdError::Invalid(why) => write!(f, "etcd: {why}"),
            EtcdError::Config(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for EtcdError {}

/// One revision of a domain, as kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainValue {
    pub revision: u64,
    pub at_ms: u64,
    /// Who wrote it: `api`, `import`, `watch:FILE`, `rollback:N`.
    pub source: String,
    /// Empty: the policy was removed.
    pub document: String,
    /// The replica and the write that put it: a writer whose commit went
    /// unanswered knows it landed when it finds its own token.
    pub writer: String,
}

impl DomainValue {
    pub fn encode(&self) -> Vec<u8> {
        json!({
            "revision": self.revision,
            "at_ms": self.at_ms,
            "source": self.source,
            "document": self.document,
            "writer": self.writer,
        })
        .to_string()
        .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<DomainValue, EtcdError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| EtcdError::Invalid(format!("a domain's value is not JSON: {e}")))?;
        let text = |name: &str| value[name].as_str().map(str::to_owned);
        let (Some(revision), Some(document)) = (value["revision"].as_u64(), text("document"))
        else {
            return Err(EtcdError::Invalid(
                "a domain's value has no `revision` or `document`".to_owned(),
            ));
        };
        Ok(DomainValue {
            revision,
            at_ms: value["at_ms"].as_u64().unwrap_or(0),
            source: text("source").unwrap_or_default(),
            document,
            writer: text("writer").unwrap_or_default(),
        })
    }
}

/// A live replica, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaValue {
    /// Its HTTP listener (API, feed, status).
    pub api: String,
    /// Its ADS listener, with `--ads`.
    pub ads: Option<String>,
}

impl ReplicaValue {
    pub fn encode(&self) -> Vec<u8> {
        json!({"api": self.api, "ads": self.ads})
            .to_string()
            .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<ReplicaValue> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        Some(ReplicaValue {
            api: value["api"].as_str()?.to_owned(),
            ads: value["ads"].as_str().map(str::to_owned),
        })
    }
}

pub fn domain_key(domain: &str) -> String {
    format!("{DOMAINS}{domain}")
}

/// The domain a key under [`DOMAINS`] names.
pub fn domain_of(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(DOMAINS)
        .filter(|d| !d.is_empty())
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// TLS to etcd's members: the CA their certificates are checked against,
/// and the certificate and key this replica presents (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdTls {
    /// The files, read and checked: the client's options, and the same as a
    /// rustls configuration of its own (for [`Etcd::tls_failure`]).
    fn load(&self) -> Result<(TlsOptions, Arc<rustls::ClientConfig>), EtcdError> {
        let config = |flag: &str, path: &Path, why: String| {
            EtcdError::Config(format!("{flag} {}: {why}", path.display()))
        };
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|e| config(flag, path, e.to_string()))
        };
        let certificates = |flag: &str, path: &Path, pem: &[u8]| {
            let certificates = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| config(flag, path, format!("not PEM certificates: {e}")))?;
            if certificates.is_empty() {
                return Err(config(flag, path, "no PEM certificate in it".to_owned()));
            }
            Ok(certificates)
        };
        let ca = read("--etcd-ca", &self.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in certificates("--etcd-ca", &self.ca, &ca)? {
            roots
                .add(certificate)
                .map_err(|e| config("--etcd-ca", &self.ca, e.to_string()))?;
        }
        let cert = read("--etcd-cert", &self.cert)?;
        let key = read("--etcd-key", &self.key)?;
        let chain = certificates("--etcd-cert", &self.cert, &cert)?;
        let private = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| config("--etcd-key", &self.key, format!("no PEM private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config("--etcd-ca", &self.ca, e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| {
                config(
                    "--etcd-cert",
                    &self.cert,
                    format!("with --etcd-key {}: {e}", self.key.display()),
                )
            })?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        let options = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        Ok((options, Arc::new(client)))
    }
}

/// Every endpoint is `https://` with TLS and none is without: a mix would
/// leave some connections in plain text, or fail on every request.
pub fn check_endpoints(endpoints: &[String], tls: bool) -> Result<(), EtcdError> {
    for endpoint in endpoints {
        let https = endpoint.starts_with("https://");
        if https && !tls {
            return Err(EtcdError::Config(format!(
                "--etcd {endpoint}: an https endpoint needs --etcd-ca, --etcd-cert and --etcd-key"
            )));
        }
        if tls && !https {
            return Err(EtcdError::Config(format!(
                "--etcd {endpoint}: with --etcd-ca, --etcd-cert and --etcd-key every endpoint is https://"
            )));
        }
    }
    Ok(())
}

/// One client per member, the one that last answered first: a request that
/// fails or times out on a member is tried on the next. Each member gets its
/// own connection, so a member that is down or without a leader costs one
/// timeout, not a stuck balancer.
pub struct Etcd {
    pub endpoints: Vec<String>,
    clients: Vec<Client>,
    current: AtomicUsize,
    /// With TLS: the same configuration as the clients', for a handshake of
    /// its own when a member cannot be reached.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Etcd {
    /// Connections are made lazily: this succeeds with every member down
    /// (or refusing this replica's certificate).
    pub async fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Etcd, EtcdError> {
        check_endpoints(endpoints, tls.is_some())?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            // HTTP/2 pings: a member cut off without a reset (a partition)
            // ends its watch within two seconds.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true)
            // A member without a leader refuses at once rather than hang,
            // and cancels its watches.
            .with_require_leader(true);
        let mut handshake = None;
        if let Some(tls) = tls {
            let (tls, config) = tls.load()?;
            options = options.with_tls(tls);
            handshake = Some(config);
        }
        let mut clients = Vec::new();
        for endpoint in endpoints {
            let client = Client::connect([endpoint.as_str()], Some(options.clone()))
                .await
                .map_err(|e| match tls {
                    // The key or a certificate rustls cannot take.
                    Some(tls) => EtcdError::Config(format!(
                        "--etcd {endpoint} with --etcd-ca {}, --etcd-cert {}, --etcd-key {}: {}",
                        tls.ca.display(),
                        tls.cert.display(),
                        tls.key.display(),
                        brief(&e)
                    )),
                    None => EtcdError::Unreachable(format!("{endpoint}: {}", brief(&e))),
                })?;
            clients.push(client);
        }
        if clients.is_empty() {
            return Err(EtcdError::Unreachable("no endpoint given".to_owned()));
        }
        Ok(Etcd {
            endpoints: endpoints.to_vec(),
            clients,
            current: AtomicUsize::new(0),
            tls: handshake,
        })
    }

    /// Why TLS with the member at `index` fails, if it does: a handshake of
    /// our own, then a read, since with TLS 1.3 a member refuses a client
    /// certificate only after the handshake, with an alert (the gRPC
    /// client says no more than "connection closed").
    pub async fn tls_failure(&self, index: usize) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let config = self.tls.clone()?;
        let endpoint = self.endpoints.get(index)?;
        let authority = endpoint.strip_prefix("https://")?.split('/').next()?;
        let (host, _) = authority.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).ok()?;
        let within = Duration::from_millis(500);
        let tcp = tokio::time::timeout(within, tokio::net::TcpStream::connect(authority))
            .await
            .ok()?
            .ok()?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut stream = match tokio::time::timeout(within, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Some(format!("TLS: {e}")),
            Err(_) => return None,
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(within, stream.read(&mut byte)).await {
            Ok(Err(e)) => Some(format!("TLS: {e}")),
            _ => None,
        }
    }

    /// The member requests go to now, and its client.
    pub fn current(&self) -> (usize, Client) {
        let index = self.current.load(Ordering::Relaxed) % self.clients.len();
        (index, self.clients[index].clone())
    }

    /// The member at `index` failed: the next one is tried from now on.
    pub fn failed(&self, index: usize) {
        let next = (index + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// `request` on the current member, then on each of the others, each
    /// within [`REQUEST_TIMEOUT`].
    pub async fn run<T, F, Fut>(&self, request: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut why = String::new();
        let mut unanswered = false;
        for _ in 0..self.clients.len() {
            let (index, client) = self.current();
            match tokio::time::timeout(REQUEST_TIMEOUT, request(client)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => why = format!("{}: {}", self.endpoints[index], brief(&e)),
                Err(_) => {
                    unanswered = true;
                    why = format!(
                        "{}: no answer within {} ms",
                        self.endpoints[index],
                        REQUEST_TIMEOUT.as_millis()
                    )
                }
            }
            self.failed(index);
        }
        if unanswered {
            return Err(EtcdError::Unanswered(why));
        }
        Err(EtcdError::Unreachable(why))
    }
}

/// An etcd client error in one line: a gRPC status as its message, and
/// the errors under it (a TLS failure is a transport error's cause).
pub fn brief(e: &etcd_client::Error) -> String {
    let (mut line, mut source) = match e {
        etcd_client::Error::GRpcStatus(status) => (
            format!("{:?}: {}", status.code(), status.message()),
            std::error::Error::source(status),
        ),
        other => (other.to_string(), std::error::Error::source(other)),
    };
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_value_round_trips_and_a_foreign_one_is_refused() {
        let value = DomainValue {
            revision: 7,
            at_ms: 1_754_000_000_000,
            source: "watch:a.example.json".to_owned(),
            document: "{\"domain\":\"a.example\",\"note\":\"tab\\there\"}".to_owned(),
            writer: "r1/42".to_owned(),
        };
        assert_eq!(DomainValue::decode(&value.encode()), Ok(value.clone()));
        let removed = DomainValue {
            document: String::new(),
            ..value
        };
        assert_eq!(DomainValue::decode(&removed.encode()), Ok(removed));
        assert!(DomainValue::decode(b"not json").is_err());
        assert!(DomainValue::decode(b"{\"document\": \"{}\"}").is_err());
    }

    #[test]
    fn https_endpoints_go_with_the_tls_files_and_a_missing_file_is_named() {
        let http = vec!["http://127.0.0.11:2379".to_owned()];
        let https = vec!["https://127.0.0.11:2379".to_owned()];
        assert!(check_endpoints(&http, false).is_ok());
        assert!(check_endpoints(&https, true).is_ok());
        let without = check_endpoints(&https, false).map_err(|e| e.to_string());
        assert!(without.is_err_and(|e| e.contains("--etcd https://") && e.contains("--etcd-ca")));
        let plain = check_endpoints(&http, true).map_err(|e| e.to_string());
        assert!(plain.is_err_and(|e| e.contains("--etcd http://") && e.contains("https://")));
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let (ca, cert) = (dir.path().join("ca.pem"), dir.path().join("r1.pem"));
        std::fs::write(&ca, "not a certificate").unwrap_or_else(|e| unreachable!("{e}"));
        let tls = EtcdTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: dir.path().join("r1.key"),
        };
        let why = |tls: &EtcdTls| tls.load().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(why(&tls).starts_with(&format!("--etcd-ca {}: no PEM", ca.display())));
        let tls = EtcdTls {
            ca: PathBuf::from("/nonexistent/ca.pem"),
            ..tls
        };
        assert!(why(&tls).starts_with("--etcd-ca /nonexistent/ca.pem: "));
    }

    #[test]
    fn keys_name_their_domain_and_a_prefix_ends_after_its_keys() {
        let key = domain_key("*.shop.example");
        assert_eq!(domain_of(key.as_bytes()), Some("*.shop.example"));
        assert_eq!(domain_of(b"/origin-policy/epoch"), None);
        assert_eq!(domain_of(DOMAINS.as_bytes()), None);
        let end = prefix_end(DOMAINS);
        assert!(key.as_bytes() < end.as_slice());
        assert_eq!(end, b"/origin-policy/domains0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        let replica = ReplicaValue {
            api: "http://127.0.0.21:18700".to_owned(),
            ads: Some("127.0.0.21:18701".to_owned()),
        };
        assert_eq!(ReplicaValue::decode(&replica.encode()), Some(replica));
    }
}
