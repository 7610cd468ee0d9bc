//! Root key, derived AEAD keys, key fingerprint and key verifier.
//!
//! The root key is 32 bytes that, read big-endian, form a nonzero P-256
//! scalar below the group order n (SPIKE's requirement, since the key is the
//! constant term of the Shamir polynomial). Purpose-bound AES-256-GCM keys
//! are derived from it with HKDF-SHA256 (salt `spike/v1`, info = label), and
//! purpose-bound HMAC-SHA256 keys the same way with info = [`MAC_INFO_PREFIX`] ‖ label,
//! so no MAC key ever equals an AEAD key, whatever the labels.

use p256::Scalar;
use p256::elliptic_curve::ff::PrimeField;
use p256::elliptic_curve::subtle::ConstantTimeEq;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use zeroize::{Zeroize, Zeroizing};

use super::locked::Locked;
use super::{Error, Result};

/// Length in bytes of a root key (and of a shard value).
pub const KEY_LEN: usize = 32;

/// HKDF salt for every key derived from the root key.
const HKDF_SALT: &[u8] = b"spike/v1";
/// HKDF label of the public key fingerprint.
const KEY_ID_LABEL: &str = "spike/key-id";
/// Number of HKDF output bytes used for the fingerprint (16 hex chars).
const KEY_ID_LEN: usize = 8;
/// HKDF label of the verifier's AEAD key.
const VERIFIER_LABEL: &str = "spike/verifier";
/// Fixed plaintext sealed in a [`Verifier`].
const VERIFIER_PLAINTEXT: &[u8] = b"spike root key verifier v1";
/// Prefix of the HKDF info of every [`MacKey`], before its label.
const MAC_INFO_PREFIX: &[u8] = b"spike/hmac-sha256\0";
/// Length in bytes of a [`MacKey`] tag (HMAC-SHA256, untruncated).
pub const MAC_LEN: usize = 32;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;
/// How many times [`RootKey::generate`] retries before giving up. A draw is
/// rejected with probability about 2^-32, so reaching this means the RNG is broken.
const GENERATE_ATTEMPTS: usize = 64;

/// Parses 32 big-endian bytes as a P-256 scalar, `None` if the value is not below n.
pub(super) fn scalar_from_bytes(bytes: &[u8; KEY_LEN]) -> Option<Scalar> {
    Option::from(Scalar::from_repr((*bytes).into()))
}

/// Writes `scalar` as 32 big-endian bytes into `out`, zeroizing the temporary.
pub(super) fn scalar_to_bytes(scalar: &Scalar, out: &mut [u8; KEY_LEN]) {
    let mut repr = scalar.to_bytes();
    out.copy_from_slice(repr.as_slice());
    repr.as_mut_slice().zeroize();
}

/// Constant-time equality of two byte slices (the lengths are not secret).
pub(super) fn ct_eq_bytes(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// Checks that `bytes` is a nonzero scalar below n.
fn validate_key_bytes(bytes: &[u8; KEY_LEN]) -> Result<()> {
    if ct_eq_bytes(bytes, &[0u8; KEY_LEN]) {
        return Err(Error::KeyZero);
    }
    match scalar_from_bytes(bytes) {
        Some(mut s) => {
            s.zeroize();
            Ok(())
        }
        None => Err(Error::KeyOutOfRange),
    }
}

/// The 32-byte root key, in locked pages of its own (see [`super::locked`]). Deliberately has
/// no `Debug` impl; zeroized on drop.
pub struct RootKey(Locked<[u8; KEY_LEN]>);

impl Clone for RootKey {
    fn clone(&self) -> RootKey {
        let mut bytes = Locked::<[u8; KEY_LEN]>::new("root key");
        bytes.copy_from_slice(self.as_bytes());
        RootKey(bytes)
    }
}

impl RootKey {
    /// Generates a fresh root key from the system RNG, rejection-sampling until
    /// the bytes form a nonzero P-256 scalar below the group order n.
    pub fn generate() -> Result<RootKey> {
        let rng = SystemRandom::new();
        let mut bytes = Locked::<[u8; KEY_LEN]>::new("root key");
        for _ in 0..GENERATE_ATTEMPTS {
            rng.fill(&mut *bytes).map_err(|_| Error::Random)?;
            if validate_key_bytes(&bytes).is_ok() {
                return Ok(RootKey(bytes));
            }
        }
        Err(Error::Random)
    }

    /// Wraps existing key bytes, rejecting zero and values `>= n`.
    /// The caller's copy passed in by value is zeroized.
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Result<RootKey> {
        let checked = validate_key_bytes(&bytes).map(|()| {
            let mut locked = Locked::new("root key");
            *locked = bytes;
            RootKey(locked)
        });
        bytes.zeroize();
        checked
    }

    /// Builds a root key from a scalar (used by Shamir interpolation).
    pub(super) fn from_scalar(scalar: &Scalar) -> Result<RootKey> {
        let mut bytes = Locked::<[u8; KEY_LEN]>::new("root key");
        scalar_to_bytes(scalar, &mut bytes);
        validate_key_bytes(&bytes)?;
        Ok(RootKey(bytes))
    }

    /// The key as a P-256 scalar. Always succeeds because construction validated it.
    pub(super) fn scalar(&self) -> Result<Scalar> {
        scalar_from_bytes(self.as_bytes()).ok_or(Error::KeyOutOfRange)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// True if the key's pages are locked in memory (false when `mlock` failed).
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }

    /// Address and length of the key's bytes, for tests that inspect the pages.
    #[cfg(test)]
    pub(crate) fn span(&self) -> (usize, usize) {
        self.0.span()
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &RootKey) -> bool {
        ct_eq_bytes(self.as_bytes(), other.as_bytes())
    }

    /// HKDF-Extract step shared by [`derive`](Self::derive) and [`key_id`](Self::key_id).
    fn prk(&self) -> hkdf::Prk {
        prk(self.as_bytes())
    }

    /// Derives the AES-256-GCM key for `label` with HKDF-SHA256
    /// (salt `spike/v1`, info = label bytes).
    pub fn derive(&self, label: &str) -> AeadKey {
        derive_aead(&self.prk(), label)
    }

    /// Derives the HMAC-SHA256 key for `label` with HKDF-SHA256 (salt `spike/v1`,
    /// info = `spike/hmac-sha256\0` ‖ label bytes).
    pub fn derive_mac(&self, label: &str) -> MacKey {
        derive_hmac(&self.prk(), label)
    }

    /// SPIKE's at-rest key: the root key's own 32 bytes as the AES-256-GCM key, with no
    /// derivation (SPIKE Nexus seals every value of its SQLite store this way, with no
    /// associated data; `tests/fixtures/spike-main/README.md`). Only for reading a SPIKE
    /// store (`spike migrate from-spike`); nothing of ours is ever sealed under it, since one
    /// key shared by every purpose is what decision 9 avoids.
    pub fn spike_store_key(&self) -> AeadKey {
        let mut key = Locked::<LessSafeKey>::new("AEAD key");
        *key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, self.as_bytes())
                // AES-256-GCM takes exactly KEY_LEN (32) bytes, which a root key always is.
                .expect("a 32-byte root key is an AES-256 key"),
        );
        AeadKey { key }
    }

    /// Public fingerprint of the key: 16 lowercase hex characters, the first
    /// 8 bytes of HKDF-SHA256 with label `spike/key-id`. Safe to log.
    pub fn key_id(&self) -> String {
        struct Len8;
        impl hkdf::KeyType for Len8 {
            fn len(&self) -> usize {
                KEY_ID_LEN
            }
        }
        let info = [KEY_ID_LABEL.as_bytes()];
        let mut out = [0u8; KEY_ID_LEN];
        self.prk()
            .expand(&info, Len8)
            .and_then(|okm| okm.fill(&mut out))
            // ring only refuses outputs longer than 255 * 32 bytes; we ask for 8.
            .expect("HKDF-SHA256 can always produce 8 bytes");
        let mut s = String::with_capacity(2 * KEY_ID_LEN);
        for b in out {
            s.push(char::from(HEX_LOWER[usize::from(b >> 4)]));
            s.push(char::from(HEX_LOWER[usize::from(b & 0x0f)]));
        }
        s
    }

    /// Seals the fixed verifier plaintext under `derive("spike/verifier")` with
    /// the key id as associated data.
    pub fn make_verifier(&self) -> Result<Verifier> {
        let key_id = self.key_id();
        let sealed = self
            .derive(VERIFIER_LABEL)
            .seal(key_id.as_bytes(), VERIFIER_PLAINTEXT)?;
        Ok(Verifier { key_id, sealed })
    }

    /// True iff `v` was made by this key: the key ids match and the sealed value
    /// opens to the fixed verifier plaintext.
    pub fn opens(&self, v: &Verifier) -> bool {
        let key_id = self.key_id();
        if key_id != v.key_id {
            return false;
        }
        match self
            .derive(VERIFIER_LABEL)
            .open(key_id.as_bytes(), &v.sealed)
        {
            Ok(plain) => ct_eq_bytes(&plain, VERIFIER_PLAINTEXT),
            Err(_) => false,
        }
    }
}

/// HKDF-Extract of `ikm` with the salt `spike/v1`, shared by root and data keys.
fn prk(ikm: &[u8; KEY_LEN]) -> hkdf::Prk {
    hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(ikm)
}

/// The AES-256-GCM key for `label` (info = label bytes) from `prk`.
fn derive_aead(prk: &hkdf::Prk, label: &str) -> AeadKey {
    let info = [label.as_bytes()];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        // ring only refuses outputs longer than 255 * 32 bytes; we ask for 32.
        .expect("HKDF-SHA256 can always produce a 32-byte key");
    // Lock the pages first, then put the key schedule in them.
    let mut key = Locked::<LessSafeKey>::new("AEAD key");
    *key = LessSafeKey::new(UnboundKey::from(okm));
    AeadKey { key }
}

/// The HMAC-SHA256 key for `label` (info = `spike/hmac-sha256\0` ‖ label bytes) from `prk`.
fn derive_hmac(prk: &hkdf::Prk, label: &str) -> MacKey {
    let info = [MAC_INFO_PREFIX, label.as_bytes()];
    let okm = prk
        .expand(&info, hmac::HMAC_SHA256)
        // ring only refuses outputs longer than 255 * 32 bytes; we ask for 32.
        .expect("HKDF-SHA256 can always produce a 32-byte key");
    // Lock the pages first, then put the key in them.
    let mut key = Locked::<hmac::Key>::new("HMAC key");
    *key = hmac::Key::from(okm);
    MacKey { key }
}

/// A data key of the keyring (decision 33): 32 random bytes, in locked pages of its own,
/// from which the purpose keys that seal secrets, policies and cipher output are derived
/// exactly as they are from a root key (same salt, same labels). Unlike a root key it is never
/// split into shards: it is stored in the store, sealed under a key derived from the root key.
/// No `Debug` impl; zeroized on drop.
pub struct DataKey(Locked<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh data key from the system RNG.
    pub fn generate() -> Result<DataKey> {
        let mut bytes = Locked::<[u8; KEY_LEN]>::new("data key");
        SystemRandom::new()
            .fill(&mut *bytes)
            .map_err(|_| Error::Random)?;
        Ok(DataKey(bytes))
    }

    /// The data key whose bytes are `bytes` (exactly [`KEY_LEN`] of them, else `None`).
    pub fn from_slice(bytes: &[u8]) -> Option<DataKey> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut locked = Locked::<[u8; KEY_LEN]>::new("data key");
        locked.copy_from_slice(bytes);
        Some(DataKey(locked))
    }

    /// The raw key bytes, to seal the keyring.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Derives the AES-256-GCM key for `label`, as [`RootKey::derive`] does.
    pub fn derive(&self, label: &str) -> AeadKey {
        derive_aead(&prk(&self.0), label)
    }

    /// Derives the HMAC-SHA256 key for `label`, as [`RootKey::derive_mac`] does.
    pub fn derive_mac(&self, label: &str) -> MacKey {
        derive_hmac(&prk(&self.0), label)
    }
}

/// Lowercase hex digits.
pub(super) const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// Proof that a root key is known, without containing it: the key id plus an
/// AEAD-sealed fixed plaintext. Contains nothing secret, so `Debug` is fine.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Verifier {
    /// [`RootKey::key_id`] of the key that made this verifier.
    pub key_id: String,
    /// nonce || ciphertext || tag of the fixed verifier plaintext.
    pub sealed: Vec<u8>,
}

/// An HMAC-SHA256 key derived from the root key, to authenticate data that is stored in the
/// clear. No `Debug` impl; the raw key bytes are never held outside `ring`, and ring's key
/// object lives in locked pages of its own, overwritten on drop.
pub struct MacKey {
    key: Locked<hmac::Key>,
}

impl MacKey {
    /// Address and length of ring's key object, for tests that inspect the pages.
    #[cfg(test)]
    pub(crate) fn span(&self) -> (usize, usize) {
        self.key.span()
    }

    /// The [`MAC_LEN`]-byte tag of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(hmac::sign(&self.key, message).as_ref());
        out
    }

    /// Checks `tag` against `message` in constant time ([`ring::hmac::verify`]). Any failure —
    /// a wrong tag, a tag of the wrong length, another key — is the one [`Error::Forged`].
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> Result<()> {
        hmac::verify(&self.key, message, tag).map_err(|_| Error::Forged)
    }
}

/// An AES-256-GCM key derived from the root key. No `Debug` impl; the raw key
/// bytes are never held outside `ring`, and ring's key object lives in locked pages of its
/// own (see [`super::locked`]), overwritten on drop.
pub struct AeadKey {
    key: Locked<LessSafeKey>,
}

impl AeadKey {
    /// True if the key's pages are locked in memory (false when `mlock` failed).
    pub fn is_locked(&self) -> bool {
        self.key.is_locked()
    }

    /// Address and length of ring's key object, for tests that inspect the pages.
    #[cfg(test)]
    pub(crate) fn span(&self) -> (usize, usize) {
        self.key.span()
    }

    /// Encrypts with a fresh random nonce. Output: nonce(12) || ciphertext || tag(16).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let nonce = Self::random_nonce()?;
        // Exact capacity so the buffer never reallocates and leaves plaintext behind.
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let sealed = self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(out)
            }
            Err(_) => {
                out.zeroize();
                Err(Error::Encrypt)
            }
        }
    }

    /// Decrypts nonce(12) || ciphertext || tag(16) as produced by [`seal`](Self::seal).
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::Decrypt);
        }
        let (nonce_bytes, rest) = sealed.split_at(NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(nonce_bytes);
        self.open_with_nonce(nonce, aad, rest)
    }

    /// Encrypts with a caller-supplied nonce. Output: ciphertext || tag(16).
    /// The caller must never reuse a nonce with the same key.
    pub fn seal_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        let sealed = self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out,
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(out)
            }
            Err(_) => {
                out.zeroize();
                Err(Error::Encrypt)
            }
        }
    }

    /// Decrypts ciphertext || tag(16) with the given nonce.
    pub fn open_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        if ciphertext_and_tag.len() < TAG_LEN {
            return Err(Error::Decrypt);
        }
        let mut buf = Zeroizing::new(ciphertext_and_tag.to_vec());
        let plain_len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                buf.as_mut_slice(),
            )
            .map_err(|_| Error::Decrypt)?
            .len();
        // Truncation keeps the capacity; Zeroizing<Vec> wipes it all on drop.
        buf.truncate(plain_len);
        Ok(buf)
    }

    /// A fresh 12-byte nonce from the system RNG.
    pub fn random_nonce() -> Result<[u8; NONCE_LEN]> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Random)?;
        Ok(nonce)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    const N_HEX: &str = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    fn key(byte: u8) -> RootKey {
        RootKey::from_bytes([byte; 32]).unwrap()
    }

    #[test]
    fn from_bytes_rejects_zero_and_out_of_range() {
        assert_eq!(RootKey::from_bytes([0; 32]).err(), Some(Error::KeyZero));
        let n = hex32(N_HEX);
        assert_eq!(RootKey::from_bytes(n).err(), Some(Error::KeyOutOfRange));
        let mut n_plus_1 = n;
        n_plus_1[31] += 1;
        assert_eq!(
            RootKey::from_bytes(n_plus_1).err(),
            Some(Error::KeyOutOfRange)
        );
        assert_eq!(
            RootKey::from_bytes([0xff; 32]).err(),
            Some(Error::KeyOutOfRange)
        );
        let mut n_minus_1 = n;
        n_minus_1[31] -= 1;
        assert_eq!(
            RootKey::from_bytes(n_minus_1).unwrap().as_bytes(),
            &n_minus_1
        );
        let mut one = [0u8; 32];
        one[31] = 1;
        assert!(RootKey::from_bytes(one).is_ok());
    }

    #[test]
    fn generate_gives_distinct_valid_keys() {
        let a = RootKey::generate().unwrap();
        let b = RootKey::generate().unwrap();
        assert!(!a.ct_eq(&b));
        assert!(a.ct_eq(&a.clone()));
        assert!(RootKey::from_bytes(*a.as_bytes()).is_ok());
    }

    #[test]
    fn key_id_format_and_stability() {
        let k = key(7);
        let id = k.key_id();
        assert_eq!(id.len(), 16);
        assert!(
            id.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_eq!(id, key(7).key_id());
        assert_ne!(id, key(8).key_id());
    }

    #[test]
    fn aead_round_trip_and_failures() {
        let k = key(1).derive("spike/test");
        let sealed = k.seal(b"aad", b"hello secret").unwrap();
        assert_eq!(sealed.len(), 12 + 12 + 16);
        assert_eq!(k.open(b"aad", &sealed).unwrap().as_slice(), b"hello secret");
        // Wrong AAD.
        assert_eq!(k.open(b"aaD", &sealed).err(), Some(Error::Decrypt));
        // Every flipped bit fails.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(k.open(b"aad", &t).err(), Some(Error::Decrypt), "byte {i}");
        }
        // Truncated at every length fails.
        for len in 0..sealed.len() {
            assert_eq!(k.open(b"aad", &sealed[..len]).err(), Some(Error::Decrypt));
        }
        // Fresh nonce per seal.
        let again = k.seal(b"aad", b"hello secret").unwrap();
        assert_ne!(sealed, again);
        assert_ne!(sealed[..12], again[..12]);
        // Empty plaintext works.
        let e = k.seal(b"", b"").unwrap();
        assert!(k.open(b"", &e).unwrap().is_empty());
    }

    #[test]
    fn aead_with_nonce() {
        let k = key(2).derive("spike/cipher");
        let nonce = AeadKey::random_nonce().unwrap();
        let ct = k.seal_with_nonce(nonce, b"a", b"payload").unwrap();
        assert_eq!(ct.len(), 7 + 16);
        assert_eq!(
            k.open_with_nonce(nonce, b"a", &ct).unwrap().as_slice(),
            b"payload"
        );
        let mut other = nonce;
        other[0] ^= 1;
        assert_eq!(
            k.open_with_nonce(other, b"a", &ct).err(),
            Some(Error::Decrypt)
        );
        assert_eq!(
            k.open_with_nonce(nonce, b"a", &ct[..15]).err(),
            Some(Error::Decrypt)
        );
        // seal == nonce || seal_with_nonce
        let mut joined = nonce.to_vec();
        joined.extend_from_slice(&ct);
        assert_eq!(k.open(b"a", &joined).unwrap().as_slice(), b"payload");
    }

    #[test]
    fn derive_labels_and_keys_separate() {
        let root = key(3);
        let a = root.derive("spike/a");
        let b = root.derive("spike/b");
        let sealed = a.seal(b"", b"x").unwrap();
        assert_eq!(b.open(b"", &sealed).err(), Some(Error::Decrypt));
        assert_eq!(
            root.derive("spike/a")
                .open(b"", &sealed)
                .unwrap()
                .as_slice(),
            b"x"
        );
        assert_eq!(
            key(4).derive("spike/a").open(b"", &sealed).err(),
            Some(Error::Decrypt)
        );
    }

    #[test]
    fn mac_keys_sign_verify_and_separate() {
        let root = key(9);
        let k = root.derive_mac("spike/test-mac");
        let tag = k.sign(b"message");
        assert_eq!(tag.len(), MAC_LEN);
        assert!(k.verify(b"message", &tag).is_ok());
        assert_eq!(root.derive_mac("spike/test-mac").sign(b"message"), tag);
        // Another message, another tag, a truncated or extended tag, another label or root.
        assert_eq!(k.verify(b"messagE", &tag).err(), Some(Error::Forged));
        for i in 0..MAC_LEN {
            let mut t = tag;
            t[i] ^= 0x01;
            assert_eq!(
                k.verify(b"message", &t).err(),
                Some(Error::Forged),
                "byte {i}"
            );
        }
        assert_eq!(k.verify(b"message", &tag[..31]).err(), Some(Error::Forged));
        assert_eq!(k.verify(b"message", &[]).err(), Some(Error::Forged));
        let mut long = tag.to_vec();
        long.push(0);
        assert_eq!(k.verify(b"message", &long).err(), Some(Error::Forged));
        let other = root.derive_mac("spike/other-mac");
        assert_eq!(other.verify(b"message", &tag).err(), Some(Error::Forged));
        assert_eq!(
            key(10)
                .derive_mac("spike/test-mac")
                .verify(b"message", &tag)
                .err(),
            Some(Error::Forged)
        );
        // The MAC key of a label is not the AEAD key of that label: a value sealed under the
        // AEAD key does not open under an AES key made from the MAC key's HKDF output, and the
        // MAC key's tag differs from one made with the AEAD label's HKDF output.
        let aead_bytes = {
            let mut out = [0u8; 32];
            root.prk()
                .expand(&[b"spike/test-mac".as_slice()], hmac::HMAC_SHA256)
                .unwrap()
                .fill(&mut out)
                .unwrap();
            out
        };
        let same_label_as_aead = hmac::Key::new(hmac::HMAC_SHA256, &aead_bytes);
        assert_ne!(
            hmac::sign(&same_label_as_aead, b"message").as_ref(),
            tag.as_slice()
        );
    }

    #[test]
    fn verifier() {
        let k = key(5);
        let v = k.make_verifier().unwrap();
        assert_eq!(v.key_id, k.key_id());
        assert!(k.opens(&v));
        assert!(k.clone().opens(&v));
        assert!(!key(6).opens(&v));
        // Another key with a forged key id still fails.
        let mut forged = key(6).make_verifier().unwrap();
        forged.key_id = k.key_id();
        assert!(!k.opens(&forged));
        // Tampering.
        for i in 0..v.sealed.len() {
            let mut t = v.clone();
            t.sealed[i] ^= 0x80;
            assert!(!k.opens(&t));
        }
        let mut t = v.clone();
        t.sealed.truncate(20);
        assert!(!k.opens(&t));
        let mut t = v.clone();
        t.key_id = "0000000000000000".into();
        assert!(!k.opens(&t));
        // Debug of the verifier does not reveal the key.
        let dbg = format!("{v:?}");
        assert!(!dbg.contains("0505050505"));
    }
}
