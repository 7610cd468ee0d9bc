//! X.509 SVIDs on disk (as spiffe-helper writes them), loading, and reloading
//! on rotation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;
use zeroize::Zeroizing;

use super::spiffe::SpiffeId;
use super::tls::{check_signing_cert, peer_spiffe_id_in, provider};
use super::{Error, Result};

const CERT_WHAT: &str = "SVID certificate";
const KEY_WHAT: &str = "SVID key";
const BUNDLE_WHAT: &str = "SVID trust bundle";

/// Where the three SVID files live.
#[derive(Clone, Debug)]
pub struct SvidPaths {
    /// Leaf certificate first, then intermediates (`svid.pem`).
    pub cert: PathBuf,
    /// Private key of the leaf (`svid_key.pem`): PKCS#8, SEC1 or PKCS#1 PEM.
    pub key: PathBuf,
    /// Trust bundle: one or more CA certificates (`svid_bundle.pem`).
    pub bundle: PathBuf,
}

impl SvidPaths {
    /// `dir` gives `dir/svid.pem`, `dir/svid_key.pem` and `dir/svid_bundle.pem`;
    /// each `Some(override)` replaces its file. Errors (naming the setting to
    /// fix) if a file has neither a directory nor an override.
    pub fn resolve(
        dir: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        bundle: Option<PathBuf>,
    ) -> Result<SvidPaths> {
        let pick = |over: Option<PathBuf>,
                    file: &str,
                    what: &'static str,
                    env: &'static str|
         -> Result<PathBuf> {
            match (over, &dir) {
                (Some(p), _) => Ok(p),
                (None, Some(d)) => Ok(d.join(file)),
                (None, None) => Err(Error::MissingSvidPath { what, env }),
            }
        };
        Ok(SvidPaths {
            cert: pick(cert, "svid.pem", CERT_WHAT, "SPIKE_SVID_CERT")?,
            key: pick(key, "svid_key.pem", KEY_WHAT, "SPIKE_SVID_KEY")?,
            bundle: pick(bundle, "svid_bundle.pem", BUNDLE_WHAT, "SPIKE_SVID_BUNDLE")?,
        })
    }
}

/// Loaded SVID material: certificate chain, private key (inside a rustls
/// `CertifiedKey`, never printed), trust bundle and the SVID's own SPIFFE ID.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
    roots: Vec<TrustAnchor<'static>>,
    certified_key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("chain_len", &self.chain.len())
            .field("bundle_len", &self.bundle.len())
            .field("not_after", &format_utc(self.not_after))
            .field("key", &"<redacted>")
            .finish()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "malformed BEGIN line".into(),
        pem::Error::Base64Decode(_) => "invalid base64 in a PEM section".into(),
        pem::Error::SectionTooLarge => "PEM section too large".into(),
        other => other.to_string(),
    }
}

fn parse_certs(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::BadPem {
            path: path.to_path_buf(),
            reason: pem_reason(&e),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificates {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn cert_not_after(der: &CertificateDer<'_>, context: &Path) -> Result<SystemTime> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| Error::BadCertificate {
            context: context.display().to_string(),
            reason: e.to_string(),
        })?;
    let ts = cert.validity().not_after.timestamp();
    Ok(if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    })
}

impl Svid {
    /// Reads and validates the three SVID files.
    pub fn load(paths: &SvidPaths) -> Result<Svid> {
        let files = read_all(paths)?;
        Svid::from_pem(paths, &files)
    }

    fn from_pem(paths: &SvidPaths, files: &Files) -> Result<Svid> {
        let chain = parse_certs(CERT_WHAT, &paths.cert, &files.cert)?;
        let leaf = &chain[0];
        // Our own SVID follows the same X509-SVID rules we hold peers to: refuse to start with
        // one that peers would (or should) refuse.
        let context = paths.cert.display().to_string();
        let id = peer_spiffe_id_in(leaf, &context)?;
        for ca in &chain[1..] {
            check_signing_cert(ca, &format!("{context} (intermediate)"))?;
        }
        let not_after = cert_not_after(leaf, &paths.cert)?;

        let key = match PrivateKeyDer::from_pem_slice(&files.key) {
            Ok(k) => k,
            Err(pem::Error::NoItemsFound) => {
                return Err(Error::NoPrivateKey {
                    path: paths.key.clone(),
                });
            }
            Err(e) => {
                return Err(Error::BadPem {
                    path: paths.key.clone(),
                    reason: pem_reason(&e),
                });
            }
        };
        let signing_key =
            provider()
                .key_provider
                .load_private_key(key)
                .map_err(|e| Error::UnsupportedKey {
                    path: paths.key.clone(),
                    reason: e.to_string(),
                })?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        match certified_key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                // The key type cannot report its public key; nothing to compare.
            }
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(Error::KeyMismatch {
                    key: paths.key.clone(),
                    cert: paths.cert.clone(),
                });
            }
            Err(e) => {
                return Err(Error::BadCertificate {
                    context: paths.cert.display().to_string(),
                    reason: e.to_string(),
                });
            }
        }

        let bundle = match parse_certs(BUNDLE_WHAT, &paths.bundle, &files.bundle) {
            Err(Error::NoCertificates { path, .. }) => return Err(Error::EmptyBundle { path }),
            other => other?,
        };
        let roots = bundle
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| Error::BadCertificate {
                        context: paths.bundle.display().to_string(),
                        reason: format!("not usable as a trust anchor: {e}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(Svid {
            id,
            chain,
            bundle,
            roots,
            certified_key: Arc::new(certified_key),
            not_after,
        })
    }

    /// The SVID's own SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Expiry of the leaf certificate.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trust bundle (CA certificates).
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    pub(super) fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    pub(super) fn trust_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.roots
    }
}

/// Raw file contents; the key bytes are wiped on drop.
struct Files {
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
    bundle: Vec<u8>,
}

impl Files {
    fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&self.cert[..], &self.key[..], &self.bundle[..]] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

fn read_all(paths: &SvidPaths) -> Result<Files> {
    Ok(Files {
        cert: read_file(CERT_WHAT, &paths.cert)?,
        key: Zeroizing::new(read_file(KEY_WHAT, &paths.key)?),
        bundle: read_file(BUNDLE_WHAT, &paths.bundle)?,
    })
}

struct State {
    svid: Arc<Svid>,
    fingerprint: [u8; 32],
}

/// The current SVID, reloaded from disk when its files change.
pub struct SvidSource {
    paths: SvidPaths,
    state: RwLock<State>,
}

impl fmt::Debug for SvidSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidSource")
            .field("paths", &self.paths)
            .field("current", &self.current())
            .finish()
    }
}

impl SvidSource {
    /// Loads the SVID once; errors if it cannot be loaded.
    pub fn load(paths: SvidPaths) -> Result<Arc<SvidSource>> {
        let files = read_all(&paths)?;
        let svid = Svid::from_pem(&paths, &files)?;
        Ok(Arc::new(SvidSource {
            state: RwLock::new(State {
                svid: Arc::new(svid),
                fingerprint: files.fingerprint(),
            }),
            paths,
        }))
    }

    /// The paths this source reads.
    pub fn paths(&self) -> &SvidPaths {
        &self.paths
    }

    /// The SVID currently in use.
    pub fn current(&self) -> Arc<Svid> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&state.svid)
    }

    /// Re-reads the files; if their contents changed since the last successful
    /// load, loads and swaps in the new SVID and returns `Ok(true)`. On error the
    /// old SVID stays in use and the error is returned.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let files = read_all(&self.paths)?;
        let fingerprint = files.fingerprint();
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            if state.fingerprint == fingerprint {
                return Ok(false);
            }
        }
        let svid = Arc::new(Svid::from_pem(&self.paths, &files)?);
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.svid = svid;
        state.fingerprint = fingerprint;
        Ok(true)
    }

    /// Spawns a tokio task (must be called inside a tokio runtime) that calls
    /// [`reload_if_changed`](Self::reload_if_changed) every `every`, logging
    /// each reload or failure. Dropping the guard stops the task.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> ReloaderGuard {
        let weak: Weak<SvidSource> = Arc::downgrade(self);
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick fires immediately
            loop {
                tick.tick().await;
                let Some(source) = weak.upgrade() else {
                    return;
                };
                let result = tokio::task::spawn_blocking(move || {
                    let r = source.reload_if_changed();
                    (r, source)
                })
                .await;
                match result {
                    Ok((Ok(true), source)) => {
                        let svid = source.current();
                        tracing::info!(
                            "reloaded SVID {}, expires {}",
                            svid.id(),
                            format_utc(svid.not_after())
                        );
                    }
                    Ok((Ok(false), _)) => {}
                    Ok((Err(e), source)) => {
                        tracing::warn!(
                            "cannot reload SVID, still using {}: {e}",
                            source.current().id()
                        );
                    }
                    Err(e) => tracing::warn!("SVID reload task failed: {e}"),
                }
            }
        });
        ReloaderGuard { handle }
    }
}

/// Stops the reloader task when dropped.
#[must_use = "the reloader stops when the guard is dropped"]
#[derive(Debug)]
pub struct ReloaderGuard {
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for ReloaderGuard {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for logs.
pub(super) fn format_utc(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::super::pki;
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn utc_format() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_utc(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn resolve_paths() {
        let p = SvidPaths::resolve(Some("/d".into()), None, None, None).unwrap();
        assert_eq!(p.cert, Path::new("/d/svid.pem"));
        assert_eq!(p.key, Path::new("/d/svid_key.pem"));
        assert_eq!(p.bundle, Path::new("/d/svid_bundle.pem"));

        let p = SvidPaths::resolve(Some("/d".into()), None, Some("/k.pem".into()), None).unwrap();
        assert_eq!(p.key, Path::new("/k.pem"));
        assert_eq!(p.cert, Path::new("/d/svid.pem"));

        let p = SvidPaths::resolve(
            None,
            Some("/c".into()),
            Some("/k".into()),
            Some("/b".into()),
        )
        .unwrap();
        assert_eq!(p.bundle, Path::new("/b"));

        let e = SvidPaths::resolve(None, None, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SPIKE_SVID_DIR") && e.contains("SPIKE_SVID_CERT"),
            "{e}"
        );
        let e = SvidPaths::resolve(None, Some("/c".into()), None, Some("/b".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SPIKE_SVID_KEY"), "{e}");
        let e = SvidPaths::resolve(None, Some("/c".into()), Some("/k".into()), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SPIKE_SVID_BUNDLE"), "{e}");
    }

    fn setup(spiffe: &str) -> (tempfile::TempDir, PathBuf, SvidPaths) {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        pki::init(&ca, "spike.ist").unwrap();
        let out = tmp.path().join("svid");
        pki::issue(&ca, &id(spiffe), &out, &[], &[]).unwrap();
        let paths = SvidPaths::resolve(Some(out), None, None, None).unwrap();
        (tmp, ca, paths)
    }

    #[test]
    fn load_ok_and_debug_hides_key() {
        let (_tmp, _ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let svid = Svid::load(&paths).unwrap();
        assert_eq!(svid.id().as_str(), "spiffe://spike.ist/spike/nexus");
        assert_eq!(svid.cert_chain().len(), 1);
        assert_eq!(svid.bundle().len(), 1);
        let left = svid.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(364 * 86_400), "{left:?}");
        let dbg = format!("{svid:?}");
        assert!(
            dbg.contains("redacted") && !dbg.contains("PRIVATE"),
            "{dbg}"
        );
    }

    #[test]
    fn load_missing_file_names_path() {
        let (_tmp, _ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        std::fs::remove_file(&paths.key).unwrap();
        let e = Svid::load(&paths).unwrap_err().to_string();
        assert!(e.starts_with("cannot read SVID key file "), "{e}");
        assert!(e.contains(&paths.key.display().to_string()), "{e}");
    }

    #[test]
    fn load_key_mismatch() {
        let (tmp, ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let other = tmp.path().join("other");
        pki::issue(&ca, &id("spiffe://spike.ist/app"), &other, &[], &[]).unwrap();
        let mixed = SvidPaths {
            key: other.join("svid_key.pem"),
            ..paths
        };
        let e = Svid::load(&mixed).unwrap_err();
        assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn load_cert_without_uri_san() {
        let (_tmp, _ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(&paths.cert, cert.pem()).unwrap();
        std::fs::write(&paths.key, key.serialize_pem()).unwrap();
        let e = Svid::load(&paths).unwrap_err();
        assert!(matches!(e, Error::CertificateIdentity { .. }), "{e}");
        assert!(e.to_string().contains("no spiffe:// URI SAN"), "{e}");
    }

    #[test]
    fn load_two_spiffe_ids() {
        let (_tmp, _ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        for u in ["spiffe://spike.ist/a", "spiffe://spike.ist/b"] {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(u.try_into().unwrap()));
        }
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(&paths.cert, cert.pem()).unwrap();
        std::fs::write(&paths.key, key.serialize_pem()).unwrap();
        let e = Svid::load(&paths).unwrap_err().to_string();
        assert!(e.contains("2 URI SANs"), "{e}");
    }

    #[test]
    fn load_empty_files() {
        let (_tmp, _ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        std::fs::write(&paths.bundle, "").unwrap();
        let e = Svid::load(&paths).unwrap_err();
        assert!(matches!(e, Error::EmptyBundle { .. }), "{e}");

        let (_tmp, _ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let cert = std::fs::read(&paths.cert).unwrap();
        std::fs::write(&paths.key, &cert).unwrap();
        let e = Svid::load(&paths).unwrap_err();
        assert!(matches!(e, Error::NoPrivateKey { .. }), "{e}");

        std::fs::write(&paths.cert, "garbage").unwrap();
        let e = Svid::load(&paths).unwrap_err();
        assert!(matches!(e, Error::NoCertificates { .. }), "{e}");
    }

    #[test]
    fn reload() {
        let (_tmp, ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let source = SvidSource::load(paths.clone()).unwrap();
        assert_eq!(
            source.current().id().as_str(),
            "spiffe://spike.ist/spike/nexus"
        );
        assert!(!source.reload_if_changed().unwrap());

        let dir = paths.cert.parent().unwrap();
        pki::issue(&ca, &id("spiffe://spike.ist/spike/keeper/1"), dir, &[], &[]).unwrap();
        assert!(source.reload_if_changed().unwrap());
        assert_eq!(
            source.current().id().as_str(),
            "spiffe://spike.ist/spike/keeper/1"
        );
        assert!(!source.reload_if_changed().unwrap());

        std::fs::write(&paths.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        assert!(source.reload_if_changed().is_err());
        assert_eq!(
            source.current().id().as_str(),
            "spiffe://spike.ist/spike/keeper/1"
        );

        std::fs::remove_file(&paths.bundle).unwrap();
        let e = source.reload_if_changed().unwrap_err().to_string();
        assert!(e.contains("svid_bundle.pem"), "{e}");
        assert_eq!(
            source.current().id().as_str(),
            "spiffe://spike.ist/spike/keeper/1"
        );
    }

    #[tokio::test]
    async fn reloader_task_picks_up_rotation() {
        let (_tmp, ca, paths) = setup("spiffe://spike.ist/spike/nexus");
        let source = SvidSource::load(paths.clone()).unwrap();
        let guard = source.spawn_reloader(Duration::from_millis(20));
        let dir = paths.cert.parent().unwrap().to_path_buf();
        pki::issue(&ca, &id("spiffe://spike.ist/app/new"), &dir, &[], &[]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while source.current().id().as_str() != "spiffe://spike.ist/app/new" {
            assert!(
                std::time::Instant::now() < deadline,
                "reloader did not reload"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(guard);
    }
}
