//! A small development/test PKI (ECDSA P-256, rcgen): a self-signed CA for a
//! trust domain and X.509 SVIDs issued by it, written in the spiffe-helper
//! layout (`svid.pem`, `svid_key.pem`, `svid_bundle.pem`).

use std::fs::DirBuilder;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use zeroize::Zeroizing;

use super::spiffe::{SpiffeId, validate_trust_domain};
use super::tls::ca_spiffe_id;
#[cfg(test)]
use super::tls::peer_spiffe_id_in;
use super::{Error, Result};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const BACKDATE: Duration = Duration::from_secs(5 * 60);

fn gen_err(e: rcgen::Error) -> Error {
    Error::CertGen(e.to_string())
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::CertGen("the system random number generator failed".into()))?;
    // Positive, and the leading byte is non-zero so the length stays 16.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn create_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::WriteFile {
            path: dir.to_path_buf(),
            source,
        })
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::WriteFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` (which must not exist) with `mode` from the start and writes
/// `data` to it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    crate::platform::fs::write_new(path, data, mode).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            Error::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            Error::WriteFile {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// A temporary file next to its final path, renamed into place by `commit`
/// and removed if dropped uncommitted.
struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl PendingFile {
    fn write(dest: &Path, data: &[u8], mode: u32) -> Result<PendingFile> {
        let mut suffix = [0u8; 8];
        ring::rand::SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| Error::CertGen("the system random number generator failed".into()))?;
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{name}.tmp-{}-{suffix}", std::process::id()));
        let pending = PendingFile {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        };
        write_new(&pending.tmp, data, mode)?;
        Ok(pending)
    }

    fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dest).map_err(write_err(&self.dest))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Creates a development CA for `trust_domain` in `dir`: `ca.pem` and `ca.key`
/// (mode 0600 from creation). Creates `dir` (0700) if missing; refuses to
/// overwrite an existing CA.
pub fn init(dir: &Path, trust_domain: &str) -> Result<()> {
    validate_trust_domain(trust_domain)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&key_path, &cert_path] {
        if p.exists() {
            return Err(Error::AlreadyExists { path: p.clone() });
        }
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("spike dev CA {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(gen_err)?,
    )];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(gen_err)?;

    create_dir(dir)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    write_new(&key_path, key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, cert.pem().as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(())
}

/// Issues an X.509 SVID for `spiffe_id` (valid from 5 minutes ago for one
/// year) with the CA in `ca_dir`, into `out_dir`.
pub fn issue(
    ca_dir: &Path,
    spiffe_id: &SpiffeId,
    out_dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<()> {
    let now = SystemTime::now();
    issue_with_validity(
        ca_dir,
        spiffe_id,
        out_dir,
        dns,
        ips,
        now - BACKDATE,
        now + LEAF_VALIDITY,
    )
}

/// Copies the CA subject so the leaf's issuer name matches it byte for byte.
fn issuer_name(
    ca: &x509_parser::certificate::X509Certificate<'_>,
    ca_dir: &Path,
) -> Result<DistinguishedName> {
    use x509_parser::der_parser::asn1_rs::{Tag, oid};
    let bad = |reason: String| Error::BadCa {
        dir: ca_dir.to_path_buf(),
        reason,
    };
    let mut dn = DistinguishedName::new();
    for attr in ca.subject().iter_attributes() {
        let oid = attr.attr_type();
        let ty = if *oid == oid!(2.5.4.3) {
            DnType::CommonName
        } else if *oid == oid!(2.5.4.10) {
            DnType::OrganizationName
        } else if *oid == oid!(2.5.4.11) {
            DnType::OrganizationalUnitName
        } else if *oid == oid!(2.5.4.6) {
            DnType::CountryName
        } else if *oid == oid!(2.5.4.7) {
            DnType::LocalityName
        } else if *oid == oid!(2.5.4.8) {
            DnType::StateOrProvinceName
        } else {
            return Err(bad(format!(
                "unsupported attribute {oid} in the CA subject"
            )));
        };
        let text = attr
            .as_str()
            .map_err(|e| bad(format!("unreadable CA subject attribute: {e}")))?
            .to_string();
        let value = match attr.attr_value().tag() {
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|e: rcgen::Error| bad(e.to_string()))?,
            ),
            Tag::Utf8String => DnValue::Utf8String(text),
            other => {
                return Err(bad(format!(
                    "unsupported string type {other} in the CA subject"
                )));
            }
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

/// Like [`issue`] with an explicit validity period (tests use it to mint
/// expired certificates). Files are replaced atomically.
pub fn issue_with_validity(
    ca_dir: &Path,
    spiffe_id: &SpiffeId,
    out_dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<()> {
    if spiffe_id.path().is_empty() {
        return Err(Error::InvalidSpiffeId {
            id: spiffe_id.to_string(),
            reason: "an SVID's SPIFFE ID needs a path (e.g. /spike/nexus); one without names a \
                     trust domain, not a workload"
                .into(),
        });
    }
    if not_after <= not_before {
        return Err(Error::CertGen(
            "not_after must be later than not_before".into(),
        ));
    }
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| Error::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let ca_pem = read("CA certificate", &cert_path)?;
    let ca_key_pem = Zeroizing::new(read("CA key", &key_path)?);

    let ca_der = CertificateDer::from_pem_slice(&ca_pem).map_err(|e| Error::BadCa {
        dir: ca_dir.to_path_buf(),
        reason: format!("cannot parse {}: {e}", cert_path.display()),
    })?;
    let ca_id = ca_spiffe_id(&ca_der, &cert_path.display().to_string())?;
    if ca_id.trust_domain() != spiffe_id.trust_domain() {
        return Err(Error::ForeignTrustDomain {
            id: spiffe_id.to_string(),
            expected: format!(
                "{} (the trust domain of the CA in {})",
                ca_id.trust_domain(),
                ca_dir.display()
            ),
        });
    }
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| Error::BadCa {
        dir: ca_dir.to_path_buf(),
        reason: format!("cannot parse {}: {e}", cert_path.display()),
    })?;

    let key_text = std::str::from_utf8(&ca_key_pem).map_err(|_| Error::BadCa {
        dir: ca_dir.to_path_buf(),
        reason: format!("{} is not a PEM file", key_path.display()),
    })?;
    let ca_key = KeyPair::from_pem(key_text).map_err(|e| Error::BadCa {
        dir: ca_dir.to_path_buf(),
        reason: format!("cannot load the key in {}: {e}", key_path.display()),
    })?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = issuer_name(&ca_cert, ca_dir)?;
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "SPIKE");
    let mut sans = vec![SanType::URI(
        spiffe_id.as_str().to_string().try_into().map_err(gen_err)?,
    )];
    for name in dns {
        sans.push(SanType::DnsName(name.clone().try_into().map_err(
            |e: rcgen::Error| Error::CertGen(format!("bad DNS name {name:?}: {e}")),
        )?));
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    // X509-SVID §4.3: a leaf has digitalSignature and never keyCertSign or cRLSign. Nothing
    // else: keyEncipherment is for RSA keys, and RFC 5480 rules it out for EC keys like this.
    // rcgen marks the extension critical, as §4.3 asks.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial()?);
    let leaf = params.signed_by(&leaf_key, &issuer).map_err(gen_err)?;

    create_dir(out_dir)?;
    let leaf_key_pem = Zeroizing::new(leaf_key.serialize_pem());
    // Write everything to temp files first, then rename in quick succession.
    let bundle = PendingFile::write(&out_dir.join("svid_bundle.pem"), &ca_pem, 0o644)?;
    let key = PendingFile::write(
        &out_dir.join("svid_key.pem"),
        leaf_key_pem.as_bytes(),
        0o600,
    )?;
    let cert = PendingFile::write(&out_dir.join("svid.pem"), leaf.pem().as_bytes(), 0o644)?;
    bundle.commit()?;
    key.commit()?;
    cert.commit()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_ca_and_refuses_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("a/ca");
        init(&ca, "spike.ist").unwrap();
        assert_eq!(mode(&ca), 0o700);
        assert_eq!(mode(&ca.join("ca.key")), 0o600);
        assert!(ca.join("ca.pem").is_file());

        let pem = std::fs::read(ca.join("ca.pem")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        assert_eq!(cert.subject().to_string(), "CN=spike dev CA spike.ist");
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let id = ca_spiffe_id(&der, "ca").unwrap();
        assert_eq!(id.as_str(), "spiffe://spike.ist");

        let e = init(&ca, "spike.ist").unwrap_err();
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
        assert!(e.to_string().contains("ca.key"), "{e}");
        std::fs::remove_file(ca.join("ca.key")).unwrap();
        let e = init(&ca, "spike.ist").unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
        assert!(!ca.join("ca.key").exists());

        assert!(init(&tmp.path().join("x"), "Bad.TD").is_err());
    }

    #[test]
    fn issue_writes_svid() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init(&ca, "spike.ist").unwrap();
        let out = tmp.path().join("out/svid");
        let id = SpiffeId::parse("spiffe://spike.ist/spike/nexus").unwrap();
        issue(
            &ca,
            &id,
            &out,
            &["nexus.local".to_string()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("svid_key.pem")), 0o600);
        assert!(out.join("svid.pem").is_file());
        assert_eq!(
            std::fs::read(out.join("svid_bundle.pem")).unwrap(),
            std::fs::read(ca.join("ca.pem")).unwrap()
        );
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let pem = std::fs::read(out.join("svid.pem")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // X509-SVID §4.3: critical, digitalSignature, no signing; nothing RFC 5480 forbids.
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert_eq!(ku.value.flags, 1, "digitalSignature only: {}", ku.value);
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 3);
        assert_eq!(peer_spiffe_id_in(&der, "leaf").unwrap(), id);
        let serial1 = cert.raw_serial().to_vec();

        // Re-issuing overwrites in place, keeping modes.
        issue(&ca, &id, &out, &[], &[]).unwrap();
        assert_eq!(mode(&out.join("svid_key.pem")), 0o600);
        let pem = std::fs::read(out.join("svid.pem")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_ne!(cert.raw_serial(), &serial1[..]);
    }

    #[test]
    fn issue_refuses_an_id_without_path() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init(&ca, "spike.ist").unwrap();
        let id = SpiffeId::parse("spiffe://spike.ist").unwrap();
        let e = issue(&ca, &id, &tmp.path().join("out"), &[], &[]).unwrap_err();
        assert!(matches!(e, Error::InvalidSpiffeId { .. }), "{e}");
        assert!(e.to_string().contains("needs a path"), "{e}");
        assert!(!tmp.path().join("out").exists());
    }

    #[test]
    fn issue_refuses_foreign_trust_domain() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init(&ca, "spike.ist").unwrap();
        let id = SpiffeId::parse("spiffe://other.org/spike/nexus").unwrap();
        let e = issue(&ca, &id, &tmp.path().join("out"), &[], &[]).unwrap_err();
        assert!(matches!(e, Error::ForeignTrustDomain { .. }), "{e}");
        assert!(e.to_string().contains("spike.ist"), "{e}");
        assert!(!tmp.path().join("out").exists());
    }

    #[test]
    fn issue_without_ca_names_file() {
        let tmp = tempfile::tempdir().unwrap();
        let id = SpiffeId::parse("spiffe://spike.ist/x").unwrap();
        let e = issue(tmp.path(), &id, &tmp.path().join("out"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read CA certificate file") && e.contains("ca.pem"),
            "{e}"
        );
    }
}
