//! `origin-policy certs`: the certificates of a fleet's mTLS (docs/api.md).
//!
//! - `init DIR`: a CA (`ca.pem`, `ca-key.pem`) and an empty CRL (`crl.pem`).
//! - `issue DIR --node ID | --server NAME [--ip A] [--dns N] | --operator NAME`:
//!   `NAME.pem` and `NAME-key.pem`, signed by the CA, the identity as the
//!   SAN URI `spiffe://origin-policy/{node,server,operator}/NAME`.
//! - `revoke DIR --node ID | ... | --serial HEX`: the certificate's serial
//!   added to `crl.pem`, which `serve --tls-crl` reads again at once.
//!
//! Keys are ECDSA P-256, written with mode 0600.

use origin_policy_control::tls::{valid_name, Identity};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CRL_FILE: &str = "crl.pem";

/// How long a CRL says it is good for (the server does not enforce it: a
/// new one is written on every revocation).
const CRL_DAYS: i64 = 365;

fn io(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Written whole (a temporary file renamed over it): `serve` may read it at
/// any moment. `private`: mode 0600.
fn write_file(path: &Path, text: &str, private: bool) -> Result<(), String> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(|e| io(&tmp, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

fn rcgen_error(what: &str, e: rcgen::Error) -> String {
    format!("{what}: {e}")
}

fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    // An hour back: a clock slightly behind still takes it at once.
    (
        now - Duration::hours(1),
        now + Duration::days(i64::from(days)),
    )
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "origin-policy");
    name.push(DnType::CommonName, common_name);
    name
}

/// A new CA in `dir`; refuses to replace one.
pub fn init(dir: &Path, days: u32) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let ca_path = dir.join(CA_FILE);
    if ca_path.exists() {
        return Err(format!(
            "{} exists: a new CA would orphan every certificate it issued",
            ca_path.display()
        ));
    }
    let key = KeyPair::generate().map_err(|e| rcgen_error("a key", e))?;
    let mut params = CertificateParams::default();
    // Named with the time it was made: two CAs never share a name, so a
    // certificate of the other one is an unknown issuer, not a bad signature.
    let made = OffsetDateTime::now_utc();
    params.distinguished_name = name(&format!("origin-policy CA {}", made.unix_timestamp_nanos()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days);
    let cert = params
        .self_signed(&key)
        .map_err(|e| rcgen_error("the CA", e))?;
    let key_path = dir.join(CA_KEY_FILE);
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&ca_path, &cert.pem(), false)?;
    let issuer = Issuer::new(params, key);
    let crl_path = dir.join(CRL_FILE);
    write_file(&crl_path, &crl(&issuer, Vec::new())?, false)?;
    Ok(vec![ca_path, key_path, crl_path])
}

fn issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, String> {
    let ca_path = dir.join(CA_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| io(&key_path, e))?;
    Issuer::from_ca_cert_pem(&read(&ca_path)?, key).map_err(|e| io(&ca_path, e))
}

/// A certificate for `identity` in `dir` (`NAME.pem`, `NAME-key.pem`),
/// signed by the CA there. A server's also names its addresses (`ips`,
/// `dns`) for clients that check them.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    ips: &[IpAddr],
    dns: &[String],
    days: u32,
) -> Result<Vec<PathBuf>, String> {
    let (Identity::Node(name_) | Identity::Server(name_) | Identity::Operator(name_)) = identity;
    if !valid_name(name_) {
        return Err(format!(
            "{name_:?}: a name is letters, digits, '.', '_' and '-'"
        ));
    }
    let issuer = issuer(dir)?;
    let ia5 =
        |text: String| Ia5String::try_from(text.clone()).map_err(|e| format!("{text:?}: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = name(name_);
    params.subject_alt_names = vec![SanType::URI(ia5(identity.uri())?)];
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    for name in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(ia5(name.clone())?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        // A replica's certificate is also a client's (to another replica).
        Identity::Server(_) => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Identity::Node(_) | Identity::Operator(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate().map_err(|e| rcgen_error("a key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rcgen_error(&identity.uri(), e))?;
    let cert_path = dir.join(format!("{name_}.pem"));
    let key_path = dir.join(format!("{name_}-key.pem"));
    if let Ok(serial) = serial_of(&cert_path) {
        eprintln!(
            "certs: replacing {} (serial {serial}); once the new one is in place, revoke the old one: origin-policy certs revoke {} --serial {serial}",
            cert_path.display(),
            dir.display()
        );
    }
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(vec![cert_path, key_path])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim().trim_start_matches("0x").replace(':', "");
    if text.is_empty() || text.len() % 2 != 0 {
        return Err(format!("{text:?} is not a serial in hex"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|_| format!("{text:?} is not a serial in hex"))
        })
        .collect()
}

/// The serial of the certificate in `path`, in hex.
pub fn serial_of(path: &Path) -> Result<String, String> {
    let text = std::fs::read(path).map_err(|e| io(path, e))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).map_err(|e| io(path, e))?;
    let cert = pem.parse_x509().map_err(|e| io(path, e))?;
    Ok(hex(cert.raw_serial()))
}

/// The CRL, signed by `issuer`, listing `revoked`.
fn crl(issuer: &Issuer<'_, KeyPair>, revoked: Vec<RevokedCertParams>) -> Result<String, String> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_DAYS),
        // Each new list has a larger number than the one before.
        crl_number: SerialNumber::from(now.unix_timestamp_nanos() as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params
        .signed_by(issuer)
        .and_then(|crl| crl.pem())
        .map_err(|e| rcgen_error("the CRL", e))
}

/// Adds the serial (hex) to `dir`'s CRL; whether it was not there yet.
pub fn revoke(dir: &Path, serial: &str) -> Result<bool, String> {
    let serial = unhex(serial)?;
    let issuer = issuer(dir)?;
    let crl_path = dir.join(CRL_FILE);
    let mut revoked = Vec::new();
    if crl_path.exists() {
        let text = std::fs::read(&crl_path).map_err(|e| io(&crl_path, e))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&text).map_err(|e| io(&crl_path, e))?;
        let (_, list) = x509_parser::parse_x509_crl(&pem.contents).map_err(|e| io(&crl_path, e))?;
        for entry in list.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.raw_serial()),
                revocation_time: entry.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let serial = SerialNumber::from_slice(&serial);
    if revoked.iter().any(|r| r.serial_number == serial) {
        return Ok(false);
    }
    revoked.push(RevokedCertParams {
        serial_number: serial,
        revocation_time: OffsetDateTime::now_utc(),
        reason_code: None,
        invalidity_date: None,
    });
    write_file(&crl_path, &crl(&issuer, revoked)?, false)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn revoked_serials(dir: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let text = std::fs::read(dir.join(CRL_FILE))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&text)?;
        let (_, list) = x509_parser::parse_x509_crl(&pem.contents)?;
        Ok(list
            .iter_revoked_certificates()
            .map(|r| hex(r.raw_serial()))
            .collect())
    }

    #[test]
    fn a_ca_issues_identities_and_revokes_them_into_its_crl() -> TestResult {
        let dir = tempfile::tempdir()?;
        let pki = dir.path();
        init(pki, 30)?;
        assert!(init(pki, 30).is_err_and(|e| e.contains("exists")));
        let node = Identity::Node("edge-1".into());
        issue(pki, &node, &[], &[], 1)?;
        let server = Identity::Server("cp-1".into());
        issue(
            pki,
            &server,
            &["127.0.0.41".parse()?],
            &["cp-1.example".into()],
            1,
        )?;
        assert!(issue(pki, &Identity::Node("a/b".into()), &[], &[], 1).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [CA_KEY_FILE, "edge-1-key.pem", "cp-1-key.pem"] {
                let mode = std::fs::metadata(pki.join(key))?.permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }
        let text = std::fs::read(pki.join("cp-1.pem"))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&text)?;
        let cert = pem.parse_x509()?;
        let names = format!("{:?}", cert.subject_alternative_name()?);
        assert!(
            names.contains("spiffe://origin-policy/server/cp-1"),
            "{names}"
        );
        assert!(names.contains("cp-1.example"), "{names}");
        assert_eq!(Identity::of_certificate(&pem.contents), Ok(server.clone()));

        assert_eq!(revoked_serials(pki)?, Vec::<String>::new());
        let first = serial_of(&pki.join("edge-1.pem"))?;
        assert!(revoke(pki, &first)?);
        assert!(!revoke(pki, &first)?);
        // Re-issued: a new serial; revoking it keeps the first revoked.
        issue(pki, &node, &[], &[], 1)?;
        let second = serial_of(&pki.join("edge-1.pem"))?;
        assert_ne!(first, second);
        assert!(revoke(pki, &second)?);
        assert_eq!(revoked_serials(pki)?, vec![first, second]);
        Ok(())
    }
}
