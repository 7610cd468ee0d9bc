//! X.509 SVIDs and where the current one comes from: files on disk (as
//! spiffe-helper writes them, reloaded on rotation) or the SPIFFE Workload API
//! (streamed, see `workload.rs`). [`SvidSource::current`] is the one place
//! the TLS resolvers and verifiers read from, whichever the source.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    TrustAnchor,
};
use rustls::sign::CertifiedKey;
use zeroize::Zeroizing;

use super::spiffe::SpiffeId;
use super::tls::{check_signing_cert, peer_spiffe_id_in};
use super::workload::{AgentProblem, Running};
use super::{Error, Result};

const CERT_WHAT: &str = "SVID certificate";
const KEY_WHAT: &str = "SVID key";
const BUNDLE_WHAT: &str = "SVID trust bundle";

/// Where the three SVID files live.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// The CA certificates peers are verified against.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Trust {
    /// One set of CAs for every configured trust domain: SVID files and fixed
    /// bundles, where nothing says which CA belongs to which trust domain
    /// (spiffe-helper appends federated CAs to the same file).
    Shared(Vec<TrustAnchor<'static>>),
    /// Each trust domain's own bundle (Workload API), already limited to the
    /// configured trust domains: a peer's chain is checked only against the
    /// bundle of the trust domain in its SPIFFE ID.
    PerDomain(BTreeMap<String, Vec<TrustAnchor<'static>>>),
}

impl Trust {
    /// The CAs that may sign an SVID of `trust_domain` (empty: none).
    pub(super) fn anchors_for(&self, trust_domain: &str) -> &[TrustAnchor<'static>] {
        match self {
            Trust::Shared(all) => all,
            Trust::PerDomain(map) => map.get(trust_domain).map_or(&[], Vec::as_slice),
        }
    }

    /// The trust domains with a bundle of their own (`None`: shared CAs).
    pub(super) fn domains(&self) -> Option<Vec<&str>> {
        match self {
            Trust::Shared(_) => None,
            Trust::PerDomain(map) => Some(map.keys().map(String::as_str).collect()),
        }
    }
}

/// CA certificates as webpki trust anchors; `context` names them in errors.
pub(super) fn anchors(
    certs: &[CertificateDer<'_>],
    context: &str,
) -> Result<Vec<TrustAnchor<'static>>> {
    certs
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| Error::BadCertificate {
                    context: context.to_string(),
                    reason: format!("not usable as a trust anchor: {e}"),
                })
        })
        .collect()
}

/// Loaded SVID material: certificate chain, private key (inside a rustls
/// `CertifiedKey`, never printed), trust bundles and the SVID's own SPIFFE ID.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    /// The bundle of the SVID's own trust domain (files: the whole bundle file).
    bundle: Vec<CertificateDer<'static>>,
    trust: Trust,
    certified_key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("chain_len", &self.chain.len())
            .field("bundle_len", &self.bundle.len())
            .field("bundle_domains", &self.trust.domains())
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

pub(super) fn cert_not_after(der: &CertificateDer<'_>, context: &str) -> Result<SystemTime> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| Error::BadCertificate {
            context: context.to_string(),
            reason: e.to_string(),
        })?;
    let ts = cert.validity().not_after.timestamp();
    Ok(if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    })
}

/// Why a private key could not be paired with its certificate chain.
pub(super) enum KeyProblem {
    /// ring cannot use the key (type or encoding).
    Unsupported(String),
    /// The key is not the leaf certificate's.
    Mismatch,
    /// The leaf's public key could not be read.
    Other(String),
}

/// Pairs `key` (borrowed, so the caller's zeroized buffer is the only copy of
/// the DER) with `chain` as rustls wants it, checking they belong together.
pub(super) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> std::result::Result<CertifiedKey, KeyProblem> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| KeyProblem::Unsupported(e.to_string()))?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    match certified_key.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            // The key type cannot report its public key; nothing to compare.
        }
        Err(rustls::Error::InconsistentKeys(_)) => return Err(KeyProblem::Mismatch),
        Err(e) => return Err(KeyProblem::Other(e.to_string())),
    }
    Ok(certified_key)
}

/// The first private key in a PEM file, decoded into a buffer wiped on drop.
fn pem_private_key(path: &Path, bytes: &[u8]) -> Result<(SectionKind, Zeroizing<Vec<u8>>)> {
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| Error::BadPem {
            path: path.to_path_buf(),
            reason: pem_reason(&e),
        })?;
        let der = Zeroizing::new(der);
        if matches!(
            kind,
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey
        ) {
            return Ok((kind, der));
        }
    }
    Err(Error::NoPrivateKey {
        path: path.to_path_buf(),
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
        let cert_context = paths.cert.display().to_string();
        let id = peer_spiffe_id_in(leaf, &cert_context)?;
        for ca in &chain[1..] {
            check_signing_cert(ca, &format!("{cert_context} (intermediate)"))?;
        }
        let not_after = cert_not_after(leaf, &cert_context)?;

        let (kind, der) = pem_private_key(&paths.key, &files.key)?;
        let key = match kind {
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(&der[..])),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(&der[..])),
            _ => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&der[..])),
        };
        let certified_key = certified_key(chain.clone(), &key).map_err(|p| match p {
            KeyProblem::Unsupported(reason) => Error::UnsupportedKey {
                path: paths.key.clone(),
                reason,
            },
            KeyProblem::Mismatch => Error::KeyMismatch {
                key: paths.key.clone(),
                cert: paths.cert.clone(),
            },
            KeyProblem::Other(reason) => Error::BadCertificate {
                context: cert_context.clone(),
                reason,
            },
        })?;

        let bundle = match parse_certs(BUNDLE_WHAT, &paths.bundle, &files.bundle) {
            Err(Error::NoCertificates { path, .. }) => return Err(Error::EmptyBundle { path }),
            other => other?,
        };
        let roots = anchors(&bundle, &paths.bundle.display().to_string())?;

        Ok(Svid {
            id,
            chain,
            bundle,
            trust: Trust::Shared(roots),
            certified_key: Arc::new(certified_key),
            not_after,
        })
    }

    /// An SVID whose parts have been checked by the caller (`workload.rs`).
    pub(super) fn from_parts(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        bundle: Vec<CertificateDer<'static>>,
        trust: Trust,
        certified_key: CertifiedKey,
        not_after: SystemTime,
    ) -> Svid {
        Svid {
            id,
            chain,
            bundle,
            trust,
            certified_key: Arc::new(certified_key),
            not_after,
        }
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

    /// The trust bundle (CA certificates) of the SVID's own trust domain; for
    /// SVID files, the whole bundle file.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The trust domains with a bundle of their own (Workload API), or `None`
    /// when one set of CAs serves every configured trust domain (files).
    pub fn bundle_domains(&self) -> Option<Vec<&str>> {
        self.trust.domains()
    }

    /// True if `other` trusts exactly the CAs this SVID trusts.
    pub(super) fn same_trust(&self, other: &Svid) -> bool {
        self.trust == other.trust
    }

    pub(super) fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The CAs that may sign an SVID of `trust_domain`.
    pub(super) fn trust_anchors_for(&self, trust_domain: &str) -> &[TrustAnchor<'static>] {
        self.trust.anchors_for(trust_domain)
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

/// Whether this process has an identity it can present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityState {
    /// No SVID yet: the Workload API has not delivered one (agent away, no
    /// registration entry, bundles missing).
    WaitingForAgent,
    /// An SVID valid until `not_after` is in use.
    Ready {
        /// When it expires.
        not_after: SystemTime,
    },
    /// The SVID in use expired at `not_after` and nothing has replaced it:
    /// peers will refuse it.
    Expired {
        /// When it expired.
        not_after: SystemTime,
    },
}

impl IdentityState {
    /// The state of an SVID expiring at `not_after`, seen at `now`.
    pub fn of(not_after: SystemTime, now: SystemTime) -> IdentityState {
        if now >= not_after {
            IdentityState::Expired { not_after }
        } else {
            IdentityState::Ready { not_after }
        }
    }

    /// When the SVID in use expires; `None` while waiting for the first.
    pub fn not_after(&self) -> Option<SystemTime> {
        match self {
            IdentityState::WaitingForAgent => None,
            IdentityState::Ready { not_after } | IdentityState::Expired { not_after } => {
                Some(*not_after)
            }
        }
    }

    /// A stable short name for health reports: `waiting_for_agent`, `ready`,
    /// `svid_expired`.
    pub fn name(&self) -> &'static str {
        match self {
            IdentityState::WaitingForAgent => "waiting_for_agent",
            IdentityState::Ready { .. } => "ready",
            IdentityState::Expired { .. } => "svid_expired",
        }
    }

    /// True while an unexpired SVID is in use.
    pub fn is_ready(&self) -> bool {
        matches!(self, IdentityState::Ready { .. })
    }
}

impl fmt::Display for IdentityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityState::WaitingForAgent => f.write_str("waiting for an SVID"),
            IdentityState::Ready { not_after } => {
                write!(f, "SVID valid until {}", format_utc(*not_after))
            }
            IdentityState::Expired { not_after } => write!(
                f,
                "SVID expired at {} and nothing replaced it",
                format_utc(*not_after)
            ),
        }
    }
}

struct State {
    svid: Arc<Svid>,
    fingerprint: [u8; 32],
}

/// Where the current SVID comes from.
enum Kind {
    /// SVID files, re-read by [`SvidSource::reload_if_changed`].
    Files {
        paths: SvidPaths,
        state: RwLock<State>,
    },
    /// The SPIFFE Workload API, streamed by a task that lives as long as this.
    WorkloadApi(Running),
}

/// The current SVID, from files (reloaded when they change) or from the
/// SPIFFE Workload API (replaced as the agent rotates it). TLS configurations
/// read [`current`](Self::current) at each handshake.
pub struct SvidSource {
    kind: Kind,
}

impl fmt::Debug for SvidSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidSource")
            .field("from", &self.describe())
            .field("current", &self.current())
            .finish()
    }
}

impl SvidSource {
    /// Loads the SVID files once; errors if they cannot be loaded.
    pub fn load(paths: SvidPaths) -> Result<Arc<SvidSource>> {
        let files = read_all(&paths)?;
        let svid = Svid::from_pem(&paths, &files)?;
        Ok(Arc::new(SvidSource {
            kind: Kind::Files {
                state: RwLock::new(State {
                    svid: Arc::new(svid),
                    fingerprint: files.fingerprint(),
                }),
                paths,
            },
        }))
    }

    pub(super) fn from_workload_api(running: Running) -> Arc<SvidSource> {
        Arc::new(SvidSource {
            kind: Kind::WorkloadApi(running),
        })
    }

    /// The paths this source reads; `None` for the Workload API.
    pub fn paths(&self) -> Option<&SvidPaths> {
        match &self.kind {
            Kind::Files { paths, .. } => Some(paths),
            Kind::WorkloadApi(_) => None,
        }
    }

    /// Where the SVID comes from, for logs: `SVID files <cert path>` or
    /// `SPIFFE Workload API <endpoint>`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Files { paths, .. } => format!("SVID files {}", paths.cert.display()),
            Kind::WorkloadApi(r) => format!("SPIFFE Workload API {}", r.endpoint()),
        }
    }

    /// The SVID currently in use.
    pub fn current(&self) -> Arc<Svid> {
        match &self.kind {
            Kind::Files { state, .. } => {
                let state = state.read().unwrap_or_else(|e| e.into_inner());
                Arc::clone(&state.svid)
            }
            Kind::WorkloadApi(r) => r.current(),
        }
    }

    /// Ready or Expired, by the current SVID's expiry (a source only exists
    /// once it has an SVID).
    pub fn state(&self) -> IdentityState {
        IdentityState::of(self.current().not_after(), SystemTime::now())
    }

    /// Why the Workload API stream is down or its last update was not used,
    /// while that lasts (the SVID in use stays in use until it expires);
    /// `None` for files and for a healthy stream. For health details and logs.
    pub fn agent_problem(&self) -> Option<AgentProblem> {
        match &self.kind {
            Kind::Files { .. } => None,
            Kind::WorkloadApi(r) => r.problem(),
        }
    }

    /// Re-reads the files; if their contents changed since the last successful
    /// load, loads and swaps in the new SVID and returns `Ok(true)`. On error the
    /// old SVID stays in use and the error is returned. The Workload API source
    /// has nothing to re-read: `Ok(false)`.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let Kind::Files { paths, state } = &self.kind else {
            return Ok(false);
        };
        let files = read_all(paths)?;
        let fingerprint = files.fingerprint();
        {
            let state = state.read().unwrap_or_else(|e| e.into_inner());
            if state.fingerprint == fingerprint {
                return Ok(false);
            }
        }
        let svid = Arc::new(Svid::from_pem(paths, &files)?);
        let mut state = state.write().unwrap_or_else(|e| e.into_inner());
        state.svid = svid;
        state.fingerprint = fingerprint;
        Ok(true)
    }

    /// Spawns a tokio task (must be called inside a tokio runtime) that calls
    /// [`reload_if_changed`](Self::reload_if_changed) every `every`, logging
    /// each reload or failure. Dropping the guard stops the task. The Workload
    /// API source streams its updates on its own: no task is started.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> ReloaderGuard {
        if matches!(self.kind, Kind::WorkloadApi(_)) {
            return ReloaderGuard { handle: None };
        }
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
        ReloaderGuard {
            handle: Some(handle),
        }
    }
}

/// Stops the reloader task when dropped.
#[must_use = "the reloader stops when the guard is dropped"]
#[derive(Debug)]
pub struct ReloaderGuard {
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ReloaderGuard {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
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
    fn identity_state_follows_expiry() {
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let before = t - Duration::from_secs(1);
        assert_eq!(
            IdentityState::of(t, before),
            IdentityState::Ready { not_after: t }
        );
        assert!(IdentityState::of(t, before).is_ready());
        assert_eq!(
            IdentityState::of(t, t),
            IdentityState::Expired { not_after: t }
        );
        assert_eq!(
            IdentityState::of(t, t + Duration::from_secs(5)).name(),
            "svid_expired"
        );
        assert_eq!(IdentityState::WaitingForAgent.name(), "waiting_for_agent");
        assert!(!IdentityState::WaitingForAgent.is_ready());
        assert_eq!(
            IdentityState::of(t, before).to_string(),
            "SVID valid until 1970-01-12T13:46:40Z"
        );
        assert!(
            IdentityState::of(t, t)
                .to_string()
                .contains("expired at 1970-01-12T13:46:40Z")
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
        assert_eq!(source.paths(), Some(&paths));
        assert!(source.state().is_ready());
        assert!(source.agent_problem().is_none());
        assert!(source.current().bundle_domains().is_none());
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
