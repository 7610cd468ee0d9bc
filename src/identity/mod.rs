//! SPIFFE identities for SPIKE: SPIFFE IDs and roles, the trust domains each
//! role may come from, this process's X.509 SVID from files on disk or from the
//! SPIFFE Workload API (replaced when it rotates), mutual-TLS configurations
//! that verify peers by trust bundle + SPIFFE ID, and a small development PKI.
//!
//! Certificates may carry only a URI SAN (no DNS name), so peer verification is
//! "chains to the bundle of the peer's trust domain" + "SPIFFE ID check", never
//! a hostname check.
//!
//! Map: `spiffe.rs` IDs and roles; `trust.rs` the `SPIKE_TRUST_ROOT*` lists;
//! `svid.rs` the SVID and [`SvidSource`] (files); `workload.rs` the Workload API
//! stream; `select.rs` which of the two the environment asks for; `tls.rs`
//! rustls resolvers and verifiers; `pki.rs` the development CA.

pub mod config;
pub mod pki;
mod select;
mod spiffe;
mod svid;
mod tls;
mod trust;
mod workload;

pub use config::SVID_RELOAD_INTERVAL;
pub use select::{IdentityConfig, SourceConfig};
pub use spiffe::{Role, SpiffeId};
pub use svid::{IdentityState, ReloaderGuard, Svid, SvidPaths, SvidSource};
pub use tls::{
    ClientAuth, ExpectedPeer, client_config, client_config_for, peer_spiffe_id, server_config,
    server_config_for,
};
pub use trust::{
    DEFAULT_TRUST_DOMAIN, TRUST_ROOT, TRUST_ROOT_KEEPER, TRUST_ROOT_LITE_WORKLOAD,
    TRUST_ROOT_NEXUS, TRUST_ROOT_PILOT, TrustRoots,
};
pub use workload::{
    AgentProblem, Backoff, DEFAULT_ENDPOINT, DEFAULT_FIRST_SVID_TIMEOUT, ENDPOINT_SOCKET,
    PendingIdentity, SOURCE_TIMEOUT, WorkloadApiConfig, parse_endpoint,
    start as start_workload_api,
};

use std::path::PathBuf;
use std::time::Duration;

/// Result type of the identity module.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the identity module. Messages name the file
/// or setting involved; private key material is never included.
// Each variant's fields are named in its message.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: String },

    /// A trust domain name is not valid.
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        trust_domain: String,
        reason: String,
    },

    /// One of the SVID files has neither a directory nor an explicit path.
    #[error(
        "no path for the {what}: set SPIKE_SVID_DIR (a directory holding svid.pem, svid_key.pem \
         and svid_bundle.pem) or {env}"
    )]
    MissingSvidPath {
        what: &'static str,
        env: &'static str,
    },

    /// A file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file or directory could not be written or created.
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists and SPIKE refuses to overwrite it.
    #[error("{} already exists; refusing to overwrite it (move it away first if you really want a new one)", path.display())]
    AlreadyExists { path: PathBuf },

    /// A PEM file holds no certificate.
    #[error("no CERTIFICATE found in {what} file {}", path.display())]
    NoCertificates { what: &'static str, path: PathBuf },

    /// A PEM file holds no usable private key.
    #[error(
        "no private key found in {} (expected a PEM \"PRIVATE KEY\", \"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\" block)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },

    /// A PEM file could not be parsed.
    #[error("cannot parse PEM in {}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },

    /// The private key is of a type or format that cannot be used.
    #[error("unusable private key in {}: {reason}", path.display())]
    UnsupportedKey { path: PathBuf, reason: String },

    /// The private key does not belong to the leaf certificate.
    #[error(
        "the private key in {} does not match the leaf certificate in {} (files from different rotations?)",
        key.display(),
        cert.display()
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    /// A certificate could not be parsed or is unusable.
    #[error("bad certificate in {context}: {reason}")]
    BadCertificate { context: String, reason: String },

    /// A certificate does not carry exactly one valid SPIFFE ID.
    #[error("certificate in {context} has no usable SPIFFE ID: {reason}")]
    CertificateIdentity { context: String, reason: String },

    /// The trust bundle holds no CA certificate.
    #[error("trust bundle {} holds no CA certificate", path.display())]
    EmptyBundle { path: PathBuf },

    /// A client configuration was requested without any trust bundle.
    #[error("no trust bundle to verify the server with: give an SVID source or a bundle")]
    NoTrustBundle,

    /// No bundle is held for a peer's trust domain.
    #[error(
        "no trust bundle for trust domain {trust_domain} (peer {id}): it is in none of the \
         SPIKE_TRUST_ROOT* lists, or the Workload API sent no bundle for it"
    )]
    NoBundleFor { id: String, trust_domain: String },

    /// A SPIFFE ID belongs to another trust domain than the one required.
    #[error("{id} is not in trust domain {expected}")]
    ForeignTrustDomain { id: String, expected: String },

    /// A peer's SPIFFE ID is not allowed by the policy.
    #[error("peer {id} is not allowed: {reason}")]
    PeerNotAllowed { id: String, reason: String },

    /// A CA directory does not hold a usable CA.
    #[error("bad CA in {}: {reason}", dir.display())]
    BadCa { dir: PathBuf, reason: String },

    /// Building a TLS configuration failed.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),

    /// Generating a certificate or key failed.
    #[error("certificate generation failed: {0}")]
    CertGen(String),

    /// A `SPIKE_TRUST_ROOT*` variable does not hold a list of trust domains.
    #[error("{var}={value:?} is not a comma-separated list of trust domains: {reason}")]
    InvalidTrustRoot {
        var: &'static str,
        value: String,
        reason: String,
    },

    /// Both the Workload API and SVID files are configured.
    #[error(
        "both SPIFFE_ENDPOINT_SOCKET and {files_var} are set: choose one identity source \
         (unset SPIFFE_ENDPOINT_SOCKET to use SVID files, or the SPIKE_SVID_* variables to use \
         the SPIFFE Workload API)"
    )]
    BothIdentitySources { files_var: &'static str },

    /// Neither `SPIFFE_ENDPOINT_SOCKET` nor SVID files are set, and nothing
    /// is at SPIRE's default socket ([`AgentProblem::NothingConfigured`]).
    #[error("{problem}")]
    NoIdentitySource { problem: AgentProblem },

    /// `SPIFFE_ENDPOINT_SOCKET` is not a usable endpoint.
    #[error("SPIFFE_ENDPOINT_SOCKET={value:?}: {reason}")]
    BadEndpoint { value: String, reason: String },

    /// The Workload API cannot give an SVID, and retrying will not help.
    #[error("SPIFFE Workload API {endpoint} (SPIFFE_ENDPOINT_SOCKET): {problem}")]
    WorkloadApi {
        endpoint: String,
        problem: AgentProblem,
    },

    /// No usable SVID from the Workload API within the start-up deadline.
    #[error(
        "no usable SVID from the SPIFFE Workload API {endpoint} (SPIFFE_ENDPOINT_SOCKET) within \
         {} (SPIKE_SPIFFE_SOURCE_TIMEOUT){}",
        humantime(*waited),
        problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default()
    )]
    AgentTimeout {
        endpoint: String,
        waited: Duration,
        problem: Option<AgentProblem>,
    },
}

impl Error {
    /// True for the errors that mean "the SPIFFE agent did not give this
    /// process an identity" (so a caller can exit with a status of its own).
    pub fn is_agent_unavailable(&self) -> bool {
        matches!(
            self,
            Error::AgentTimeout { .. } | Error::WorkloadApi { .. } | Error::NoIdentitySource { .. }
        )
    }
}

/// `30s`, `1.5s`, `250ms`: a duration for messages.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
