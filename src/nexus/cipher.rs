//! Encryption as a service (SPIKE's cipher API): AES-256-GCM under the cipher key of a data
//! key of the keyring ([`super::keyring`]), so callers can keep ciphertext anywhere and only
//! Nexus can open it.
//!
//! Stream mode (request `Content-Type: application/octet-stream`): the body is the plaintext and
//! the answer `version ‖ nonce(12) ‖ ciphertext field`, and the reverse for decryption. JSON
//! mode: [`crate::protocol::nexus::EncryptRequest`] / [`crate::protocol::nexus::DecryptRequest`]
//! with base64 fields. Both modes carry the same three parts, so either can open the other's
//! output.
//!
//! Versions: [`CIPHER_VERSION`] (2), written since the keyring: the ciphertext field is the data
//! key's id (4 bytes, big endian) ‖ ciphertext ‖ tag, sealed with associated data
//! `spike/cipher/v2\0` ‖ id. [`CIPHER_VERSION_LEGACY`] (1), written before: the ciphertext field
//! is ciphertext ‖ tag under the legacy key 0, no associated data; still opened.

use zeroize::Zeroizing;

use super::ApiError;
use super::keyring::{Keyring, LEGACY};
use crate::crypto::AeadKey;
use crate::protocol::nexus::{CIPHER_VERSION, CIPHER_VERSION_LEGACY};

/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// Length of the data key id at the start of a version 2 ciphertext field.
const ID_LEN: usize = 4;

fn aad(id: u32) -> Vec<u8> {
    let mut aad = b"spike/cipher/v2\0".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad
}

/// Seals `plaintext` under the keyring's current data key; returns (nonce, ciphertext field)
/// of a [`CIPHER_VERSION`] ciphertext.
pub fn encrypt(
    ring: &Keyring,
    plaintext: &[u8],
    limit: usize,
) -> Result<([u8; NONCE_LEN], Vec<u8>), ApiError> {
    if plaintext.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "plaintext is {} bytes; the limit is {limit}",
            plaintext.len()
        )));
    }
    let id = ring.current();
    let key = ring
        .get(id)
        .ok_or_else(|| ApiError::Internal(format!("the keyring has no data key {id}")))?;
    let nonce = AeadKey::random_nonce()?;
    let sealed = key.cipher.seal_with_nonce(nonce, &aad(id), plaintext)?;
    let mut field = Vec::with_capacity(ID_LEN + sealed.len());
    field.extend_from_slice(&id.to_be_bytes());
    field.extend_from_slice(&sealed);
    Ok((nonce, field))
}

/// Opens the ciphertext field of a `version` ciphertext ([`encrypt`], or a version 1 one
/// written before the keyring). Whatever is wrong with it — version, nonce, size, unknown data
/// key, tag — is the caller's input: 400.
pub fn decrypt(
    ring: &Keyring,
    version: u8,
    nonce: &[u8],
    ciphertext: &[u8],
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| ApiError::BadRequest(format!("nonce must be {NONCE_LEN} bytes")))?;
    if ciphertext.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "ciphertext is {} bytes; the limit is {limit}",
            ciphertext.len()
        )));
    }
    let (id, aad, sealed) = match version {
        CIPHER_VERSION_LEGACY => (LEGACY, Vec::new(), ciphertext),
        CIPHER_VERSION if ciphertext.len() >= ID_LEN => {
            let (id, sealed) = ciphertext.split_at(ID_LEN);
            let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            (id, aad(id), sealed)
        }
        CIPHER_VERSION => {
            return Err(ApiError::BadRequest(
                "ciphertext too short to hold a data key id".into(),
            ));
        }
        _ => {
            return Err(ApiError::BadRequest(format!(
                "unsupported cipher version {version}"
            )));
        }
    };
    let key = ring.get(id).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "ciphertext names data key {id}, which the keyring has not"
        ))
    })?;
    key.cipher
        .open_with_nonce(nonce, &aad, sealed)
        .map_err(|_| ApiError::BadRequest("decryption failed".into()))
}

/// Stream framing of a [`CIPHER_VERSION`] ciphertext: `version ‖ nonce ‖ ciphertext field`.
pub fn frame(nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(CIPHER_VERSION);
    out.extend_from_slice(nonce);
    out.extend_from_slice(ciphertext);
    out
}

/// Splits a stream frame into (version, nonce, ciphertext field).
pub fn unframe(body: &[u8]) -> Result<(u8, &[u8], &[u8]), ApiError> {
    let (&version, rest) = body
        .split_first()
        .ok_or_else(|| ApiError::BadRequest("empty ciphertext".into()))?;
    if rest.len() < NONCE_LEN {
        return Err(ApiError::BadRequest(
            "ciphertext too short to hold a nonce".into(),
        ));
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    Ok((version, nonce, ciphertext))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use crate::crypto::RootKey;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn round_trip_and_refusals() {
        let root = RootKey::generate().unwrap();
        let ring = super::super::keyring::ensure(&MemoryStore::default(), &root, false)
            .await
            .unwrap();
        let (nonce, ct) = encrypt(&ring, b"hello", 100).unwrap();
        assert_eq!(&ct[..4], &[0, 0, 0, 1], "sealed under data key 1");
        let framed = frame(&nonce, &ct);
        let (v, n, c) = unframe(&framed).unwrap();
        assert_eq!(v, 2);
        assert_eq!(&decrypt(&ring, v, n, c, 100).unwrap()[..], b"hello");
        assert!(encrypt(&ring, &[0; 101], 100).is_err());
        assert!(decrypt(&ring, 3, n, c, 100).is_err());
        assert!(
            decrypt(&ring, 1, n, c, 100).is_err(),
            "not a legacy ciphertext"
        );
        assert!(decrypt(&ring, 2, &n[..11], c, 100).is_err());
        assert!(decrypt(&ring, 2, n, &c[..3], 100).is_err());
        let mut bad = ct.clone();
        bad[5] ^= 1;
        assert!(decrypt(&ring, 2, n, &bad, 100).is_err());
        // Another id, or id 0 in front of a key 1 ciphertext, does not open.
        for id in [0u8, 2, 9] {
            let mut other = ct.clone();
            other[3] = id;
            assert!(decrypt(&ring, 2, n, &other, 100).is_err(), "id {id}");
        }
        assert!(unframe(&[1, 2, 3]).is_err());
        assert!(unframe(&[]).is_err());
        // A version 1 ciphertext of an earlier release opens with the legacy key.
        let legacy = root.derive("spike/cipher/v1");
        let old = legacy.seal_with_nonce(nonce, b"", b"old").unwrap();
        assert_eq!(&decrypt(&ring, 1, &nonce, &old, 100).unwrap()[..], b"old");
    }
}
