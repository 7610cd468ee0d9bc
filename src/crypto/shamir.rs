//! Shamir secret sharing of the root key over the P-256 scalar field,
//! byte-compatible with SPIKE.
//!
//! SPIKE (spike-sdk-go `crypto.ComputeShares`, circl `secretsharing.New` over
//! `group.P256`, circl >= v1.6.2) builds `f(x) = c0 + c1 x + ... + c_{t-1} x^{t-1} mod n`
//! with `c0` = root key and draws `c1..c_{t-1}` in order with Go's
//! `crypto/rand.Int(reader, n)` from a deterministic reader whose stream is
//! `B0 || B1 || ...`, `B0 = SHA-256(root key)`, `B(i+1) = SHA-256(Bi)`. Each draw
//! takes one 32-byte block, reads it big-endian and accepts it if `< n`,
//! otherwise takes the next block. Shard `i` (1-based) is `f(i)` as 32
//! big-endian bytes.
//!
//! [`split_recovery`] uses the same construction with
//! `B0 = SHA-256("spike/recovery-shards/v1" || root key)`, so its shards lie on
//! a different polynomial through the same secret.

use std::fmt;

use p256::Scalar;
use ring::digest::{SHA256, digest};
use zeroize::{Zeroize, Zeroizing};

use super::key::{KEY_LEN, RootKey, ct_eq_bytes, scalar_from_bytes};
use super::{Error, Result};

/// Seed prefix of the recovery-shard polynomial's coefficient stream.
const RECOVERY_SEED_PREFIX: &[u8] = b"spike/recovery-shards/v1";

/// One shard: an x-coordinate (`index`, 1..=255) and `f(index)` as a 32-byte
/// big-endian P-256 scalar. The value is zeroized on drop and never printed.
#[derive(Clone)]
pub struct Share {
    /// The shard's x-coordinate, 1..=255. Public.
    pub index: u8,
    value: [u8; KEY_LEN],
}

impl Drop for Share {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Share {
    /// Builds a shard, checking `index` is in 1..=255 and `value` is a nonzero
    /// scalar below n. The caller's copy passed in by value is zeroized.
    pub fn new(index: u8, mut value: [u8; KEY_LEN]) -> Result<Share> {
        let checked = check_share(index, &value).map(|()| Share { index, value });
        value.zeroize();
        checked
    }

    /// The shard value (32 big-endian bytes).
    pub fn value(&self) -> &[u8; KEY_LEN] {
        &self.value
    }

    /// Constant-time comparison of the value (and comparison of the public index).
    pub fn ct_eq(&self, other: &Share) -> bool {
        let same_value = ct_eq_bytes(&self.value, &other.value);
        same_value & (self.index == other.index)
    }
}

fn check_share(index: u8, value: &[u8; KEY_LEN]) -> Result<()> {
    if index == 0 {
        return Err(Error::ShareIndexOutOfRange { index });
    }
    if ct_eq_bytes(value, &[0u8; KEY_LEN]) {
        return Err(Error::ShareValueZero { index });
    }
    match scalar_from_bytes(value) {
        Some(mut s) => {
            s.zeroize();
            Ok(())
        }
        None => Err(Error::ShareValueOutOfRange { index }),
    }
}

fn check_params(threshold: u8, shares: u8) -> Result<()> {
    if threshold == 0 || threshold > shares {
        return Err(Error::InvalidShamirParams { threshold, shares });
    }
    Ok(())
}

/// SHA-256 of the concatenation of `parts`, into a zeroizing buffer.
fn sha256(parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&SHA256);
    for p in parts {
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(d.as_ref());
    out
}

/// SPIKE's deterministic reader, in 32-byte blocks: `B0` first, then
/// `B(i+1) = SHA-256(Bi)`.
struct BlockStream {
    next: Zeroizing<[u8; 32]>,
}

impl BlockStream {
    fn new(b0: Zeroizing<[u8; 32]>) -> Self {
        BlockStream { next: b0 }
    }

    fn next_block(&mut self) -> Zeroizing<[u8; 32]> {
        let following = {
            let d = digest(&SHA256, self.next.as_ref());
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(d.as_ref());
            out
        };
        std::mem::replace(&mut self.next, following)
    }

    /// Go's `crypto/rand.Int(reader, n)` for the 256-bit P-256 order: take
    /// 32-byte blocks until one, read big-endian, is below n.
    fn draw_scalar(&mut self) -> Scalar {
        loop {
            let block = self.next_block();
            if let Some(s) = scalar_from_bytes(&block) {
                return s;
            }
        }
    }
}

/// Draws the `count` non-constant coefficients from the stream starting at `b0`.
fn draw_coefficients(b0: Zeroizing<[u8; 32]>, count: usize) -> Zeroizing<Vec<Scalar>> {
    let mut stream = BlockStream::new(b0);
    let mut coeffs = Zeroizing::new(Vec::with_capacity(count));
    for _ in 0..count {
        coeffs.push(stream.draw_scalar());
    }
    coeffs
}

fn split_with_b0(
    key: &RootKey,
    threshold: u8,
    shares: u8,
    b0: Zeroizing<[u8; 32]>,
) -> Result<Vec<Share>> {
    check_params(threshold, shares)?;
    // coeffs[0] = secret, coeffs[1..t] drawn from the stream.
    let mut coeffs: Zeroizing<Vec<Scalar>> =
        Zeroizing::new(Vec::with_capacity(usize::from(threshold)));
    coeffs.push(key.scalar()?);
    coeffs.extend_from_slice(&draw_coefficients(b0, usize::from(threshold) - 1));

    let mut out = Vec::with_capacity(usize::from(shares));
    for index in 1..=shares {
        let x = Scalar::from(u64::from(index));
        // Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + c0.
        let mut acc = Scalar::ZERO;
        for c in coeffs.iter().rev() {
            acc = acc * x + c;
        }
        let mut value = [0u8; KEY_LEN];
        super::key::scalar_to_bytes(&acc, &mut value);
        acc.zeroize();
        out.push(Share::new(index, value)?);
    }
    Ok(out)
}

/// Splits `key` into `shares` Keeper shards, any `threshold` of which rebuild
/// it. Identical, byte for byte, to SPIKE's shards for the same key and
/// parameters. Requires `1 <= threshold <= shares <= 255`.
pub fn split(key: &RootKey, threshold: u8, shares: u8) -> Result<Vec<Share>> {
    split_with_b0(key, threshold, shares, sha256(&[key.as_bytes()]))
}

/// Splits `key` into operator recovery shards on a second polynomial
/// (seed `SHA-256("spike/recovery-shards/v1" || key)`). Any `threshold` of
/// these rebuild the key; mixing them with Keeper shards does not.
pub fn split_recovery(key: &RootKey, threshold: u8, shares: u8) -> Result<Vec<Share>> {
    split_with_b0(
        key,
        threshold,
        shares,
        sha256(&[RECOVERY_SEED_PREFIX, key.as_bytes()]),
    )
}

/// Lagrange-interpolates all given shards at x = 0. The caller passes exactly
/// the subset it wants; below-threshold sets give an unrelated value (or an
/// error if that value is zero), not the key.
pub fn combine(shares: &[Share]) -> Result<RootKey> {
    if shares.is_empty() {
        return Err(Error::NoShares);
    }
    let mut seen = [false; 256];
    let mut values: Zeroizing<Vec<Scalar>> = Zeroizing::new(Vec::with_capacity(shares.len()));
    for s in shares {
        check_share(s.index, &s.value)?;
        let slot = &mut seen[usize::from(s.index)];
        if *slot {
            return Err(Error::DuplicateShareIndex { index: s.index });
        }
        *slot = true;
        values.push(
            scalar_from_bytes(&s.value).ok_or(Error::ShareValueOutOfRange { index: s.index })?,
        );
    }

    let mut secret = Scalar::ZERO;
    for (j, sj) in shares.iter().enumerate() {
        let xj = Scalar::from(u64::from(sj.index));
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for (m, sm) in shares.iter().enumerate() {
            if m == j {
                continue;
            }
            let xm = Scalar::from(u64::from(sm.index));
            num *= xm;
            den *= xm - xj;
        }
        // Indices are distinct and below n, so den is nonzero and invertible.
        let inv = Option::<Scalar>::from(den.invert()).ok_or(Error::CombinedKeyInvalid)?;
        let mut term = values[j] * num * inv;
        secret += term;
        term.zeroize();
    }
    let key = RootKey::from_scalar(&secret).map_err(|_| Error::CombinedKeyInvalid);
    secret.zeroize();
    key
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2));
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    fn arr(s: &str) -> [u8; 32] {
        unhex(s).try_into().unwrap()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const VECTORS: &str = include_str!("../../tests/vectors/shamir.json");

    fn check_set(got: &[Share], want: &serde_json::Value, what: &str) {
        for w in want.as_array().unwrap() {
            let idx = w["index"].as_u64().unwrap() as usize;
            let s = &got[idx - 1];
            assert_eq!(usize::from(s.index), idx);
            assert_eq!(
                hex(s.value()),
                w["value"].as_str().unwrap(),
                "{what} shard {idx}"
            );
        }
    }

    #[test]
    fn matches_spike_vectors() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let key = RootKey::from_bytes(arr(c["key"].as_str().unwrap())).unwrap();
            let t = u8::try_from(c["threshold"].as_u64().unwrap()).unwrap();
            let n = u8::try_from(c["shares"].as_u64().unwrap()).unwrap();
            let keeper = split(&key, t, n).unwrap();
            let recovery = split_recovery(&key, t, n).unwrap();
            assert_eq!(keeper.len(), usize::from(n));
            assert_eq!(recovery.len(), usize::from(n));
            check_set(&keeper, &c["keeper"], &format!("{name} keeper"));
            check_set(&recovery, &c["recovery"], &format!("{name} recovery"));
        }
    }

    #[test]
    fn stream_rejection_sampling_matches_vectors() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        for c in v["stream_cases"].as_array().unwrap() {
            let b0 = Zeroizing::new(arr(c["b0"].as_str().unwrap()));
            let want = c["coefficients"].as_array().unwrap();
            let got = draw_coefficients(b0, want.len());
            for (g, w) in got.iter().zip(want) {
                assert_eq!(hex(&g.to_bytes()), w.as_str().unwrap());
            }
        }
    }

    fn test_key() -> RootKey {
        let d = digest(&SHA256, b"spike test key 1");
        RootKey::from_bytes(d.as_ref().try_into().unwrap()).unwrap()
    }

    #[test]
    fn deterministic() {
        let k = test_key();
        let a = split(&k, 3, 5).unwrap();
        let b = split(&k, 3, 5).unwrap();
        let c = split(&k.clone(), 3, 5).unwrap();
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert!(x.ct_eq(y) && x.ct_eq(z));
        }
        let r1 = split_recovery(&k, 3, 5).unwrap();
        let r2 = split_recovery(&k, 3, 5).unwrap();
        assert!(r1.iter().zip(&r2).all(|(x, y)| x.ct_eq(y)));
        // Different polynomials.
        assert!(a.iter().zip(&r1).all(|(x, y)| !x.ct_eq(y)));
    }

    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize == k {
                out.push((0..n).filter(|i| mask & (1 << i) != 0).collect());
            }
        }
        out
    }

    fn pick(shares: &[Share], idx: &[usize]) -> Vec<Share> {
        idx.iter().map(|&i| shares[i].clone()).collect()
    }

    #[test]
    fn threshold_subsets_rebuild() {
        let k = test_key();
        for (t, n) in [(1u8, 1u8), (1, 3), (2, 3), (3, 5), (5, 5)] {
            for set in [split(&k, t, n).unwrap(), split_recovery(&k, t, n).unwrap()] {
                for size in usize::from(t)..=usize::from(n) {
                    for sub in subsets(usize::from(n), size) {
                        let got = combine(&pick(&set, &sub)).unwrap();
                        assert!(got.ct_eq(&k), "t={t} n={n} subset {sub:?}");
                    }
                }
                if t > 1 {
                    for sub in subsets(usize::from(n), usize::from(t) - 1) {
                        match combine(&pick(&set, &sub)) {
                            Ok(got) => assert!(!got.ct_eq(&k), "below threshold {sub:?}"),
                            Err(e) => assert_eq!(e, Error::CombinedKeyInvalid),
                        }
                    }
                }
            }
        }
        // Order of shards does not matter.
        let s = split(&k, 3, 5).unwrap();
        let rev = pick(&s, &[4, 0, 2]);
        assert!(combine(&rev).unwrap().ct_eq(&k));
    }

    #[test]
    fn mixed_keeper_and_recovery_do_not_rebuild() {
        let k = test_key();
        for (t, n) in [(2u8, 3u8), (3, 5)] {
            let keeper = split(&k, t, n).unwrap();
            let recovery = split_recovery(&k, t, n).unwrap();
            // Take the first t-1 from one set and a distinct-index one from the other.
            for split_at in 1..usize::from(t) {
                let mut mixed: Vec<Share> = keeper[..split_at].to_vec();
                mixed.extend_from_slice(&recovery[split_at..usize::from(t)]);
                if let Ok(got) = combine(&mixed) {
                    assert!(!got.ct_eq(&k));
                }
                let mut mixed: Vec<Share> = recovery[..split_at].to_vec();
                mixed.extend_from_slice(&keeper[split_at..usize::from(t)]);
                if let Ok(got) = combine(&mixed) {
                    assert!(!got.ct_eq(&k));
                }
            }
        }
    }

    #[test]
    fn parameter_validation() {
        let k = test_key();
        for (t, n) in [(0u8, 0u8), (0, 3), (4, 3), (2, 1), (255, 254)] {
            assert_eq!(
                split(&k, t, n).err(),
                Some(Error::InvalidShamirParams {
                    threshold: t,
                    shares: n
                })
            );
            assert!(split_recovery(&k, t, n).is_err());
        }
        let msg = Error::InvalidShamirParams {
            threshold: 4,
            shares: 3,
        }
        .to_string();
        assert!(
            msg.contains("threshold=4") && msg.contains("shares=3"),
            "{msg}"
        );
        assert_eq!(split(&k, 255, 255).unwrap().len(), 255);
    }

    #[test]
    fn combine_errors() {
        assert_eq!(combine(&[]).err(), Some(Error::NoShares));
        let k = test_key();
        let s = split(&k, 2, 3).unwrap();
        let dup = vec![s[0].clone(), s[1].clone(), s[0].clone()];
        assert_eq!(
            combine(&dup).err(),
            Some(Error::DuplicateShareIndex { index: 1 })
        );
    }

    #[test]
    fn share_new_validation_and_debug() {
        let n = arr("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
        let mut one = [0u8; 32];
        one[31] = 1;
        assert_eq!(
            Share::new(0, one).err(),
            Some(Error::ShareIndexOutOfRange { index: 0 })
        );
        assert_eq!(
            Share::new(3, [0; 32]).err(),
            Some(Error::ShareValueZero { index: 3 })
        );
        assert_eq!(
            Share::new(3, n).err(),
            Some(Error::ShareValueOutOfRange { index: 3 })
        );
        assert_eq!(
            Share::new(3, [0xff; 32]).err(),
            Some(Error::ShareValueOutOfRange { index: 3 })
        );
        let s = Share::new(2, [0xab; 32]).unwrap();
        assert_eq!(format!("{s:?}"), "Share { index: 2, .. }");
        assert_eq!(s.value(), &[0xab; 32]);
        assert!(s.ct_eq(&s.clone()));
        assert!(!s.ct_eq(&Share::new(3, [0xab; 32]).unwrap()));
        assert!(!s.ct_eq(&Share::new(2, [0xac; 32]).unwrap()));
        assert_eq!(
            Error::ShareIndexOutOfRange { index: 0 }.to_string(),
            "shard index 0 is out of range 1..=255"
        );
    }
}
