//! Encryption as a service (SPIKE's cipher API): AES-256-GCM under a key derived from the root
//! key, so callers can keep ciphertext anywhere and only Nexus can open it.
//!
//! Stream mode (request `Content-Type: application/octet-stream`): the body is the plaintext and
//! the answer `0x01 ‖ nonce(12) ‖ ciphertext ‖ tag`, and the reverse for decryption. JSON mode:
//! [`crate::protocol::nexus::EncryptRequest`] / [`crate::protocol::nexus::DecryptRequest`] with base64 fields. Both
//! modes produce the same ciphertext format, so either can open the other's output.

use zeroize::Zeroizing;

use super::ApiError;
use crate::crypto::AeadKey;
use crate::protocol::nexus::CIPHER_VERSION;

/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;

/// Seals `plaintext`; returns (nonce, ciphertext‖tag).
pub fn encrypt(
    key: &AeadKey,
    plaintext: &[u8],
    limit: usize,
) -> Result<([u8; NONCE_LEN], Vec<u8>), ApiError> {
    if plaintext.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "plaintext is {} bytes; the limit is {limit}",
            plaintext.len()
        )));
    }
    let nonce = AeadKey::random_nonce()?;
    let ciphertext = key.seal_with_nonce(nonce, b"", plaintext)?;
    Ok((nonce, ciphertext))
}

/// Opens ciphertext‖tag sealed by [`encrypt`].
pub fn decrypt(
    key: &AeadKey,
    version: u8,
    nonce: &[u8],
    ciphertext: &[u8],
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    if version != CIPHER_VERSION {
        return Err(ApiError::BadRequest(format!(
            "unsupported cipher version {version}"
        )));
    }
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| ApiError::BadRequest(format!("nonce must be {NONCE_LEN} bytes")))?;
    if ciphertext.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "ciphertext is {} bytes; the limit is {limit}",
            ciphertext.len()
        )));
    }
    key.open_with_nonce(nonce, b"", ciphertext)
        .map_err(|_| ApiError::BadRequest("decryption failed".into()))
}

/// Stream framing: `0x01 ‖ nonce ‖ ciphertext‖tag`.
pub fn frame(nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(CIPHER_VERSION);
    out.extend_from_slice(nonce);
    out.extend_from_slice(ciphertext);
    out
}

/// Splits a stream frame into (version, nonce, ciphertext‖tag).
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
mod tests {
    use super::*;
    use crate::crypto::RootKey;

    #[test]
    fn round_trip_and_refusals() {
        let key = RootKey::generate().unwrap().derive("cipher");
        let (nonce, ct) = encrypt(&key, b"hello", 100).unwrap();
        let framed = frame(&nonce, &ct);
        let (v, n, c) = unframe(&framed).unwrap();
        assert_eq!(&decrypt(&key, v, n, c, 100).unwrap()[..], b"hello");
        assert!(encrypt(&key, &[0; 101], 100).is_err());
        assert!(decrypt(&key, 2, n, c, 100).is_err());
        assert!(decrypt(&key, 1, &n[..11], c, 100).is_err());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(decrypt(&key, 1, n, &bad, 100).is_err());
        assert!(unframe(&[1, 2, 3]).is_err());
        assert!(unframe(&[]).is_err());
    }
}
