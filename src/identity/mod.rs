//! SPIFFE identities for SPIKE: SPIFFE IDs and roles, X.509 SVIDs loaded from
//! disk (and reloaded when they rotate), mutual-TLS configurations that verify
//! peers by trust bundle + SPIFFE ID, and a small development PKI.
//!
//! Certificates may carry only a URI SAN (no DNS name), so peer verification is
//! "chains to the trust bundle" + "SPIFFE ID check", never a hostname check.

pub mod config;
pub mod pki;
mod spiffe;
mod svid;
mod tls;

pub use config::{DEFAULT_TRUST_DOMAIN, IdentityConfig, SVID_RELOAD_INTERVAL};
pub use spiffe::{Role, SpiffeId};
pub use svid::{ReloaderGuard, Svid, SvidPaths, SvidSource};
pub use tls::{ClientAuth, ExpectedPeer, client_config, peer_spiffe_id, server_config};

use std::path::PathBuf;

/// Result type of the identity module.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the identity module. Messages name the file
/// or setting involved; private key material is never included.
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
}
