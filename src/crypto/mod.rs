//! Cryptographic primitives for spike: the bottom layer of the crate.
//!
//! Nothing in this module depends on the rest of the crate. Everything above
//! it (Nexus, Keepers, the operator CLI) codes against the names re-exported
//! here.
//!
//! # Submodules
//!
//! - [`key`]: the 32-byte root key ([`RootKey`]), HKDF-SHA256 derivation of
//!   purpose-bound AES-256-GCM keys ([`AeadKey`]), the public key fingerprint
//!   ([`RootKey::key_id`]) and the sealed [`Verifier`] that lets a process check
//!   a candidate root key without storing it; HMAC-SHA256 keys ([`MacKey`]) that
//!   authenticate data kept in the clear.
//! - [`shamir`]: Shamir secret sharing of the root key over the P-256 scalar
//!   field. [`split`] is byte-for-byte compatible with SPIKE (spike-sdk-go
//!   `crypto.ComputeShares` on Cloudflare circl `secretsharing` over
//!   `group.P256`): the polynomial coefficients come from a SHA-256 chain seeded
//!   with the root key, so the same key always yields the same Keeper shards.
//!   SPIKE's two shard generations (circl v1.6.1 for releases up to v0.8.0,
//!   circl >= v1.6.2 for SPIKE main) are [`ShardDerivation`]s: [`split_with`]
//!   makes either, [`identify_derivation`] says which one a set of Keeper
//!   shards came from.
//!   [`split_recovery`] builds a second, independent polynomial (different
//!   seed, same constant term) for the operator's recovery shards. [`combine`]
//!   interpolates any set of shards back to the key.
//! - [`recovery`]: SPIKE's recovery-shard text format, `spike:<index>:<64 hex>`.
//! - [`locked`]: key material in locked pages of its own: the root key, ring's AEAD key
//!   objects and [`LockedShares`] each live in a page-aligned allocation that is `mlock`ed
//!   before the key is written and wiped before it is unlocked and freed.
//!
//! # Security contract
//!
//! - All randomness comes from `ring::rand::SystemRandom`; all AEAD, HKDF and
//!   hashing goes through `ring`. Scalar arithmetic uses `p256::Scalar`.
//! - Root keys and shard values are valid, nonzero P-256 scalars (big-endian,
//!   below the group order n); constructors reject anything else.
//! - Secret material never appears in `Debug`/`Display` output or in error
//!   messages. [`RootKey`] and [`AeadKey`] have no `Debug` impl at all;
//!   [`Share`]'s `Debug` prints only the (public) index.
//! - Key material and intermediate secret buffers (hash blocks, scalars,
//!   coefficient vectors, decoded hex) are zeroized when dropped. Long-lived
//!   keys ([`RootKey`], [`AeadKey`], [`LockedShares`]) live in locked pages of
//!   their own; ring's AES key schedule inside an [`AeadKey`] is overwritten
//!   in place on drop. Transient copies ring makes on the stack (HKDF output,
//!   `Digest` values) are outside our control.
//! - Comparisons of secret bytes are constant time.
//! - Decryption failures are reported as a single [`Error::Decrypt`] with no
//!   detail about why, so callers cannot become a padding/tag oracle.

pub mod key;
pub mod locked;
pub mod recovery;
pub mod shamir;

pub use key::{AeadKey, DataKey, KEY_LEN, MAC_LEN, MacKey, RootKey, Verifier};
pub use locked::LockedShares;
pub use recovery::{RECOVERY_SHARD_MAX_LEN, decode_recovery_shard, encode_recovery_shard};
pub use shamir::{
    ShardDerivation, Share, combine, identify_derivation, split, split_recovery, split_with,
};

/// Errors produced by the crypto module.
///
/// Messages are meant for operators: they say what was wrong and what range
/// was expected, and never contain key, shard or plaintext bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system random number generator failed.
    #[error("the system random number generator failed; cannot generate keys or nonces")]
    Random,

    /// A root key was all zero bytes.
    #[error("root key is zero; a root key must be a nonzero P-256 scalar")]
    KeyZero,

    /// A root key was not below the P-256 group order n.
    #[error("root key is not below the P-256 group order n; it is not a valid SPIKE root key")]
    KeyOutOfRange,

    /// Sealing failed (ring only refuses plaintexts beyond AES-GCM's size limit).
    #[error("encryption failed: the plaintext is too large for AES-256-GCM")]
    Encrypt,

    /// Opening failed: wrong key, wrong associated data, truncated or tampered input.
    #[error(
        "decryption failed: wrong key or associated data, or the data is truncated or tampered with"
    )]
    Decrypt,

    /// A MAC did not verify: the data or its tag was altered, or they were made under another
    /// key or for another place.
    #[error(
        "authentication failed: the data was altered, or was not made by this key for this place"
    )]
    Forged,

    /// Threshold / share count outside `1 <= threshold <= shares <= 255`.
    #[error(
        "invalid Shamir parameters threshold={threshold} shares={shares}: need 1 <= threshold <= shares <= 255"
    )]
    InvalidShamirParams {
        /// Requested threshold.
        threshold: u8,
        /// Requested number of shares.
        shares: u8,
    },

    /// A shard index of 0 (only `1..=255` are valid x-coordinates).
    #[error("shard index {index} is out of range 1..=255")]
    ShareIndexOutOfRange {
        /// The rejected index.
        index: u8,
    },

    /// A shard value of zero.
    #[error("shard {index} has a zero value, which no valid shard has; the shard is corrupt")]
    ShareValueZero {
        /// Index of the offending shard.
        index: u8,
    },

    /// A shard value not below the P-256 group order n.
    #[error(
        "shard {index} value is not below the P-256 group order n; the shard is corrupt or was not produced by SPIKE"
    )]
    ShareValueOutOfRange {
        /// Index of the offending shard.
        index: u8,
    },

    /// [`combine`] was given no shards.
    #[error("cannot combine an empty set of shards; provide at least the threshold number")]
    NoShares,

    /// [`combine`] was given two shards with the same index.
    #[error("shard index {index} was given more than once; pass each shard exactly once")]
    DuplicateShareIndex {
        /// The repeated index.
        index: u8,
    },

    /// The interpolated secret is not a valid root key.
    #[error(
        "the shards combined to an invalid (zero) root key; they do not belong to the same key"
    )]
    CombinedKeyInvalid,

    /// A shard derivation name that is neither `hash_to_scalar` nor `rejection_sampling`.
    #[error("unknown shard derivation {name:?}; expected hash_to_scalar or rejection_sampling")]
    UnknownShardDerivation {
        /// The name given.
        name: String,
    },

    /// Recovery shard text did not have exactly three `:`-separated parts.
    #[error(
        "recovery shard must have exactly 3 ':'-separated parts (spike:<index>:<64 hex chars>), found {parts}"
    )]
    RecoveryShardFormat {
        /// Number of parts found.
        parts: usize,
    },

    /// Recovery shard text did not start with `spike:`.
    #[error("recovery shard must start with \"spike:\" (format spike:<index>:<64 hex chars>)")]
    RecoveryShardPrefix,

    /// The index part is not a plain decimal integer.
    #[error("recovery shard index is not a decimal integer; expected a number in 1..=255")]
    RecoveryShardIndexNotDecimal,

    /// The index part is a decimal integer outside `1..=255`.
    #[error("recovery shard index {index} is out of range 1..=255")]
    RecoveryShardIndexOutOfRange {
        /// The parsed index (saturated at `u64::MAX` if larger).
        index: u64,
    },

    /// The value part is not exactly 64 characters long.
    #[error(
        "recovery shard value must be exactly 64 hex characters (32 bytes), found {len} characters"
    )]
    RecoveryShardHexLength {
        /// Number of characters found.
        len: usize,
    },

    /// The value part contains a non-hexadecimal character.
    #[error("recovery shard value contains a character that is not hexadecimal (0-9, a-f)")]
    RecoveryShardNotHex,
}

/// Result type of the crypto module.
pub type Result<T> = std::result::Result<T, Error>;
