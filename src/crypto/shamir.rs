//! Shamir secret sharing of the root key over the P-256 scalar field,
//! byte-compatible with both generations of SPIKE.
//!
//! SPIKE (spike-sdk-go `crypto.ComputeShares`, Cloudflare circl
//! `secretsharing.New` over `group.P256`) builds
//! `f(x) = c0 + c1 x + ... + c_{t-1} x^{t-1} mod n` with `c0` = root key and
//! draws `c1..c_{t-1}` in order with circl's `RandomScalar` from a
//! deterministic reader whose stream is `B0 || B1 || ...`,
//! `B0 = SHA-256(root key)`, `B(i+1) = SHA-256(Bi)`. Shard `i` (1-based) is
//! `f(i)` as 32 big-endian bytes. What `RandomScalar` does with the stream
//! changed between circl releases, so SPIKE's shards for one key come in two
//! generations ([`ShardDerivation`]):
//!
//! - circl v1.6.1 (SPIKE releases up to v0.8.0), [`ShardDerivation::HashToScalar`]:
//!   each coefficient takes one 32-byte block `Bj` and is
//!   `OS2IP(expand_message_xmd(SHA-256, Bj, DST = "", 48 bytes)) mod n`
//!   (RFC 9380 `hash_to_field`, circl `HashToScalar(Bj, nil)`).
//! - circl >= v1.6.2 (SPIKE main), [`ShardDerivation::RejectionSampling`]:
//!   Go's `crypto/rand.Int(reader, n)`: one 32-byte block read big-endian,
//!   accepted if `< n`, otherwise the next block.
//!
//! With threshold 1 there are no coefficients and both give `f(i) = key`.
//! Both generations refuse a root key that is zero or not below n, as
//! [`RootKey`] does. [`combine`] does not care which generation made a set of
//! shards; [`identify_derivation`] tells them apart given the key.
//!
//! [`split_recovery`] uses rejection sampling with
//! `B0 = SHA-256("spike/recovery-shards/v1" || root key)`, so its shards lie on
//! a different polynomial through the same secret (SPIKE's own recovery shards
//! are its Keeper shards).

use std::fmt;

use p256::Scalar;
use ring::digest::{SHA256, digest};
use zeroize::{Zeroize, Zeroizing};

use super::key::{KEY_LEN, RootKey, ct_eq_bytes, scalar_from_bytes};
use super::{Error, Result};

/// Seed prefix of the recovery-shard polynomial's coefficient stream.
const RECOVERY_SEED_PREFIX: &[u8] = b"spike/recovery-shards/v1";

/// How the Keeper polynomial's coefficients are drawn from SPIKE's SHA-256
/// block stream: the two generations of SPIKE shards (module docs).
///
/// A deployment keeps the generation its Keepers already hold, so shards
/// pushed by `spike` are the ones SPIKE pushed and never change behind the
/// operator's back. New deployments use the default, [`RejectionSampling`].
///
/// [`RejectionSampling`]: ShardDerivation::RejectionSampling
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ShardDerivation {
    /// circl v1.6.1, SPIKE <= v0.8.0: each coefficient is the RFC 9380
    /// hash-to-scalar (expand_message_xmd SHA-256, empty DST, 48 bytes, mod n)
    /// of one 32-byte block.
    HashToScalar,
    /// circl >= v1.6.2, SPIKE main: each coefficient is the first 32-byte
    /// block, read big-endian, that is below n.
    #[default]
    RejectionSampling,
}

impl ShardDerivation {
    /// Every derivation, the default first: [`identify_derivation`] prefers
    /// the earlier one when a set of shards fits both (threshold 1).
    pub const ALL: [ShardDerivation; 2] = [
        ShardDerivation::RejectionSampling,
        ShardDerivation::HashToScalar,
    ];

    /// Stable lowercase name for health output, logs and configuration:
    /// `hash_to_scalar` or `rejection_sampling`.
    pub const fn name(self) -> &'static str {
        match self {
            ShardDerivation::HashToScalar => "hash_to_scalar",
            ShardDerivation::RejectionSampling => "rejection_sampling",
        }
    }

    /// Whether this derivation gives every one of `observed` for `key` with
    /// this `threshold` (`false` for an empty set).
    pub fn produced(self, key: &RootKey, threshold: u8, observed: &[Share]) -> Result<bool> {
        if threshold == 0 {
            return Err(Error::InvalidShamirParams {
                threshold,
                shares: 0,
            });
        }
        if observed.is_empty() {
            return Ok(false);
        }
        let coeffs = polynomial(key, threshold, sha256(&[key.as_bytes()]), self)?;
        let mut all = true;
        for s in observed {
            let expected = evaluate(&coeffs, s.index)?;
            // Keep comparing after a mismatch: the loop's length is public,
            // which shard differs is not worth leaking through timing.
            all &= expected.ct_eq(s);
        }
        Ok(all)
    }
}

impl fmt::Display for ShardDerivation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ShardDerivation {
    type Err = Error;

    fn from_str(s: &str) -> Result<ShardDerivation> {
        ShardDerivation::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| Error::UnknownShardDerivation { name: s.to_owned() })
    }
}

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

/// circl v1.6.1's `group.P256.HashToScalar(block, nil)`: RFC 9380
/// `hash_to_field` with `expand_message_xmd(SHA-256)`, an empty DST and
/// L = 48, i.e. 48 pseudo-random bytes read as a big-endian integer mod n.
fn hash_to_scalar(block: &[u8; 32]) -> Scalar {
    /// Output length L for P-256 (ceil((256 + 128) / 8)).
    const LEN: u16 = 48;
    /// DST' = DST || I2OSP(len(DST), 1) with DST = "".
    const DST_PRIME: &[u8] = &[0];
    let b0 = sha256(&[
        &[0u8; 64], // Z_pad: one SHA-256 input block of zeros
        block,
        &LEN.to_be_bytes(),
        &[0],
        DST_PRIME,
    ]);
    let b1 = sha256(&[b0.as_ref(), &[1], DST_PRIME]);
    let mut mixed = Zeroizing::new([0u8; 32]);
    for ((m, x), y) in mixed.iter_mut().zip(b0.iter()).zip(b1.iter()) {
        *m = x ^ y;
    }
    let b2 = sha256(&[mixed.as_ref(), &[2], DST_PRIME]);
    let mut uniform = Zeroizing::new([0u8; 48]);
    uniform[..32].copy_from_slice(b1.as_ref());
    uniform[32..].copy_from_slice(&b2[..16]);
    reduce_be(uniform.as_ref())
}

/// A big-endian integer of any length, mod n: Horner over 64-bit limbs with
/// scalar arithmetic, so no secret-dependent branch or big-integer library.
fn reduce_be(bytes: &[u8]) -> Scalar {
    let radix = Scalar::from(u64::MAX) + Scalar::ONE; // 2^64
    let mut acc = Scalar::ZERO;
    for chunk in bytes.chunks(8) {
        let mut limb = [0u8; 8];
        limb[8 - chunk.len()..].copy_from_slice(chunk);
        acc = acc * radix + Scalar::from(u64::from_be_bytes(limb));
        limb.zeroize();
    }
    acc
}

/// Draws the `count` non-constant coefficients from the stream starting at `b0`.
fn draw_coefficients(
    b0: Zeroizing<[u8; 32]>,
    count: usize,
    derivation: ShardDerivation,
) -> Zeroizing<Vec<Scalar>> {
    let mut stream = BlockStream::new(b0);
    let mut coeffs = Zeroizing::new(Vec::with_capacity(count));
    for _ in 0..count {
        coeffs.push(match derivation {
            ShardDerivation::RejectionSampling => stream.draw_scalar(),
            ShardDerivation::HashToScalar => hash_to_scalar(&stream.next_block()),
        });
    }
    coeffs
}

/// The polynomial's coefficients: `[key, c1, .., c_{t-1}]`.
fn polynomial(
    key: &RootKey,
    threshold: u8,
    b0: Zeroizing<[u8; 32]>,
    derivation: ShardDerivation,
) -> Result<Zeroizing<Vec<Scalar>>> {
    let mut coeffs: Zeroizing<Vec<Scalar>> =
        Zeroizing::new(Vec::with_capacity(usize::from(threshold)));
    coeffs.push(key.scalar()?);
    coeffs.extend_from_slice(&draw_coefficients(
        b0,
        usize::from(threshold).saturating_sub(1),
        derivation,
    ));
    Ok(coeffs)
}

/// The shard at x = `index`.
fn evaluate(coeffs: &[Scalar], index: u8) -> Result<Share> {
    let x = Scalar::from(u64::from(index));
    // Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + c0.
    let mut acc = Scalar::ZERO;
    for c in coeffs.iter().rev() {
        acc = acc * x + c;
    }
    let mut value = [0u8; KEY_LEN];
    super::key::scalar_to_bytes(&acc, &mut value);
    acc.zeroize();
    Share::new(index, value)
}

fn split_with_b0(
    key: &RootKey,
    threshold: u8,
    shares: u8,
    b0: Zeroizing<[u8; 32]>,
    derivation: ShardDerivation,
) -> Result<Vec<Share>> {
    check_params(threshold, shares)?;
    let coeffs = polynomial(key, threshold, b0, derivation)?;
    (1..=shares).map(|index| evaluate(&coeffs, index)).collect()
}

/// Splits `key` into `shares` Keeper shards, any `threshold` of which rebuild
/// it, with SPIKE main's [`ShardDerivation::RejectionSampling`]. Identical,
/// byte for byte, to SPIKE main's shards for the same key and parameters.
/// Requires `1 <= threshold <= shares <= 255`.
pub fn split(key: &RootKey, threshold: u8, shares: u8) -> Result<Vec<Share>> {
    split_with(key, threshold, shares, ShardDerivation::default())
}

/// Splits `key` into Keeper shards as the given generation of SPIKE does.
/// Requires `1 <= threshold <= shares <= 255`.
pub fn split_with(
    key: &RootKey,
    threshold: u8,
    shares: u8,
    derivation: ShardDerivation,
) -> Result<Vec<Share>> {
    split_with_b0(
        key,
        threshold,
        shares,
        sha256(&[key.as_bytes()]),
        derivation,
    )
}

/// Which generation of SPIKE made `observed` (shards of `key` collected from
/// Keepers, any indices) with this `threshold`, so the same shards can keep
/// being pushed. `None` when no single derivation explains every shard: an
/// empty set, a different key or threshold, or Keepers holding a mix. When
/// both fit (threshold 1, where they coincide) the default is returned.
pub fn identify_derivation(
    key: &RootKey,
    threshold: u8,
    observed: &[Share],
) -> Result<Option<ShardDerivation>> {
    for d in ShardDerivation::ALL {
        if d.produced(key, threshold, observed)? {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// Splits `key` into operator recovery shards on a second polynomial
/// (seed `SHA-256("spike/recovery-shards/v1" || key)`, rejection sampling).
/// Any `threshold` of these rebuild the key; mixing them with Keeper shards
/// does not.
pub fn split_recovery(key: &RootKey, threshold: u8, shares: u8) -> Result<Vec<Share>> {
    split_with_b0(
        key,
        threshold,
        shares,
        sha256(&[RECOVERY_SEED_PREFIX, key.as_bytes()]),
        ShardDerivation::RejectionSampling,
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
            let got = draw_coefficients(b0, want.len(), ShardDerivation::RejectionSampling);
            for (g, w) in got.iter().zip(want) {
                assert_eq!(hex(&g.to_bytes()), w.as_str().unwrap());
            }
        }
    }

    const CIRCL_V1_6_1: &str = include_str!("../../tests/vectors/shamir-circl-v1.6.1.json");
    const CIRCL_V1_6_3: &str = include_str!("../../tests/vectors/shamir-circl-v1.6.3.json");

    /// Checks one file written by tests/go/circl-*: every shard, every
    /// refused key and every raw coefficient draw, byte for byte.
    fn check_circl_vectors(text: &str, circl: &str, derivation: ShardDerivation) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["circl"], circl);
        let named: ShardDerivation = v["derivation"].as_str().unwrap().parse().unwrap();
        assert_eq!(named, derivation);
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 70);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let key = RootKey::from_bytes(arr(c["key"].as_str().unwrap())).unwrap();
            let t = u8::try_from(c["threshold"].as_u64().unwrap()).unwrap();
            let n = u8::try_from(c["shares"].as_u64().unwrap()).unwrap();
            let want = c["shards"].as_array().unwrap();
            assert_eq!(want.len(), usize::from(n), "{name}");
            let got = split_with(&key, t, n, derivation).unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(u64::from(g.index), w["index"].as_u64().unwrap(), "{name}");
                assert_eq!(
                    hex(g.value()),
                    w["value"].as_str().unwrap(),
                    "{name} shard {}",
                    g.index
                );
            }
            // The Keepers' shards say which generation made them.
            let expect = if t == 1 {
                ShardDerivation::default()
            } else {
                derivation
            };
            assert_eq!(
                identify_derivation(&key, t, &got).unwrap(),
                Some(expect),
                "{name}"
            );
            let last = &got[got.len() - 1..];
            assert_eq!(
                identify_derivation(&key, t, last).unwrap(),
                Some(expect),
                "{name}"
            );
            // Any threshold of them rebuild the key, whatever the generation.
            assert!(
                combine(&got[got.len() - usize::from(t)..])
                    .unwrap()
                    .ct_eq(&key)
            );
        }
        let refused = v["rejected_keys"].as_array().unwrap();
        assert_eq!(refused.len(), 4);
        for r in refused {
            assert!(RootKey::from_bytes(arr(r["key"].as_str().unwrap())).is_err());
        }
        let streams = v["stream_cases"].as_array().unwrap();
        assert_eq!(streams.len(), 5);
        for c in streams {
            let b0 = Zeroizing::new(arr(c["b0"].as_str().unwrap()));
            let want = c["coefficients"].as_array().unwrap();
            let got = draw_coefficients(b0, want.len(), derivation);
            for (g, w) in got.iter().zip(want) {
                assert_eq!(hex(&g.to_bytes()), w.as_str().unwrap());
            }
        }
    }

    #[test]
    fn matches_circl_v1_6_1_hash_to_scalar() {
        check_circl_vectors(CIRCL_V1_6_1, "v1.6.1", ShardDerivation::HashToScalar);
    }

    #[test]
    fn matches_circl_v1_6_3_rejection_sampling() {
        check_circl_vectors(CIRCL_V1_6_3, "v1.6.3", ShardDerivation::RejectionSampling);
    }

    #[test]
    fn python_hash_to_scalar_vectors() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        for c in v["cases"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            let key = RootKey::from_bytes(arr(c["key"].as_str().unwrap())).unwrap();
            let t = u8::try_from(c["threshold"].as_u64().unwrap()).unwrap();
            let n = u8::try_from(c["shares"].as_u64().unwrap()).unwrap();
            let got = split_with(&key, t, n, ShardDerivation::HashToScalar).unwrap();
            check_set(&got, &c["keeper_hash_to_scalar"], &format!("{name} h2s"));
        }
        for c in v["stream_cases"].as_array().unwrap() {
            let b0 = Zeroizing::new(arr(c["b0"].as_str().unwrap()));
            let want = c["hash_to_scalar"].as_array().unwrap();
            let got = draw_coefficients(b0, want.len(), ShardDerivation::HashToScalar);
            for (g, w) in got.iter().zip(want) {
                assert_eq!(hex(&g.to_bytes()), w.as_str().unwrap());
            }
        }
    }

    #[test]
    fn derivation_names() {
        for d in ShardDerivation::ALL {
            assert_eq!(d.to_string().parse::<ShardDerivation>().unwrap(), d);
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(ShardDerivation::HashToScalar.name(), "hash_to_scalar");
        assert_eq!(
            ShardDerivation::RejectionSampling.name(),
            "rejection_sampling"
        );
        assert_eq!(
            ShardDerivation::default(),
            ShardDerivation::RejectionSampling
        );
        assert_eq!(ShardDerivation::ALL[0], ShardDerivation::default());
        let e = "Hash_To_Scalar".parse::<ShardDerivation>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown shard derivation \"Hash_To_Scalar\"; expected hash_to_scalar or rejection_sampling"
        );
    }

    #[test]
    fn identify_needs_one_consistent_generation() {
        let k = test_key();
        let rs = split_with(&k, 3, 5, ShardDerivation::RejectionSampling).unwrap();
        let hs = split_with(&k, 3, 5, ShardDerivation::HashToScalar).unwrap();
        // Same key, different polynomials: no shard in common.
        assert!(rs.iter().zip(&hs).all(|(a, b)| !a.ct_eq(b)));
        assert_eq!(split(&k, 3, 5).unwrap()[2].value(), rs[2].value());
        assert_eq!(
            identify_derivation(&k, 3, &hs[1..4]).unwrap(),
            Some(ShardDerivation::HashToScalar)
        );
        assert_eq!(
            identify_derivation(&k, 3, &rs[3..]).unwrap(),
            Some(ShardDerivation::RejectionSampling)
        );
        // Keepers holding a mix, the wrong threshold, another key, no shards.
        let mixed = vec![rs[0].clone(), hs[1].clone()];
        assert_eq!(identify_derivation(&k, 3, &mixed).unwrap(), None);
        assert!(
            !ShardDerivation::HashToScalar
                .produced(&k, 3, &mixed)
                .unwrap()
        );
        assert!(
            ShardDerivation::HashToScalar
                .produced(&k, 3, &mixed[1..])
                .unwrap()
        );
        assert_eq!(identify_derivation(&k, 2, &hs).unwrap(), None);
        assert_eq!(identify_derivation(&k, 4, &rs).unwrap(), None);
        let other = RootKey::from_bytes([7; 32]).unwrap();
        assert_eq!(identify_derivation(&other, 3, &rs).unwrap(), None);
        assert_eq!(identify_derivation(&k, 3, &[]).unwrap(), None);
        assert!(identify_derivation(&k, 0, &rs).is_err());
        // Both generations rebuild the key; a mix of them does not.
        assert!(combine(&hs[..3]).unwrap().ct_eq(&k));
        let mix3 = vec![rs[0].clone(), hs[1].clone(), hs[2].clone()];
        assert!(combine(&mix3).map_or(true, |got| !got.ct_eq(&k)));
        // Shards at indices beyond the configured count are still judged.
        let wide = split_with(&k, 3, 9, ShardDerivation::HashToScalar).unwrap();
        assert_eq!(
            identify_derivation(&k, 3, &wide[7..]).unwrap(),
            Some(ShardDerivation::HashToScalar)
        );
    }

    #[test]
    fn reduce_be_is_mod_n() {
        let n = arr("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
        assert_eq!(reduce_be(&n), Scalar::ZERO);
        assert_eq!(reduce_be(&[0u8; 48]), Scalar::ZERO);
        let mut n_plus_5 = [0u8; 48];
        n_plus_5[16..].copy_from_slice(&n);
        n_plus_5[47] += 5;
        assert_eq!(reduce_be(&n_plus_5), Scalar::from(5u64));
        let mut one = [0u8; 48];
        one[47] = 1;
        assert_eq!(reduce_be(&one), Scalar::ONE);
        // 2^256 mod n = 2^256 - n.
        let mut two256 = [0u8; 48];
        two256[15] = 1;
        let want = arr("00000000ffffffff00000000000000004319055258e8617b0c46353d039cdaaf");
        assert_eq!(hex(&reduce_be(&two256).to_bytes()), hex(&want));
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
