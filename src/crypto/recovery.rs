//! SPIKE's recovery-shard text format: `spike:<index>:<64 lowercase hex>`.
//!
//! This is what `spike operator recover` writes to each `spike.recovery.<i>.txt`
//! file (no trailing newline) and what `spike operator restore` reads back.
//! Parsing errors say what is wrong without ever echoing the hex value.
//!
//! SPIKE's Pilot writes `fmt.Sprintf("spike:%d:%s", id, hex.EncodeToString(shard))`
//! (`app/spike/internal/cmd/operator/recover.go`), and SPIKE's recovery shards
//! are its Keeper shards (the same `crypto.ComputeShares`), so a set of SPIKE
//! files combines with [`combine`](super::combine) whichever circl generation
//! made them (`tests/fixtures/spike-main/` holds files written by SPIKE's own
//! Pilot). SPIKE allows up to 1000 shards; indices above 255 are refused here.

use zeroize::{Zeroize, Zeroizing};

use super::key::{HEX_LOWER, KEY_LEN};
use super::shamir::Share;
use super::{Error, Result};

/// Required first field.
const PREFIX: &str = "spike";
/// Length of the hex field.
const HEX_LEN: usize = 2 * KEY_LEN;

/// The longest text [`encode_recovery_shard`] makes: `spike:` + up to 3 digits + `:` + 64 hex.
/// A buffer that collects shard texts reserves from it, so it never reallocates and leaves
/// copies behind.
pub const RECOVERY_SHARD_MAX_LEN: usize = PREFIX.len() + 5 + HEX_LEN;

/// Encodes a shard as `spike:<index>:<64 lowercase hex>`, no trailing newline.
pub fn encode_recovery_shard(share: &Share) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(RECOVERY_SHARD_MAX_LEN));
    out.push_str(PREFIX);
    out.push(':');
    out.push_str(&share.index.to_string());
    out.push(':');
    for b in share.value() {
        out.push(char::from(HEX_LOWER[usize::from(b >> 4)]));
        out.push(char::from(HEX_LOWER[usize::from(b & 0x0f)]));
    }
    out
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn parse_index(text: &str) -> Result<u8> {
    if text.is_empty() || !text.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Error::RecoveryShardIndexNotDecimal);
    }
    let value = text.bytes().fold(0u64, |acc, c| {
        acc.saturating_mul(10).saturating_add(u64::from(c - b'0'))
    });
    match u8::try_from(value) {
        Ok(index) if index >= 1 => Ok(index),
        _ => Err(Error::RecoveryShardIndexOutOfRange { index: value }),
    }
}

/// Parses `spike:<index>:<64 hex>` (surrounding whitespace ignored; upper-case
/// hex accepted) into a validated [`Share`].
pub fn decode_recovery_shard(text: &str) -> Result<Share> {
    let text = text.trim();
    let parts = text.split(':').count();
    if parts != 3 {
        return Err(Error::RecoveryShardFormat { parts });
    }
    let mut fields = text.splitn(3, ':');
    let (Some(prefix), Some(index), Some(hex)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(Error::RecoveryShardFormat { parts });
    };
    if prefix != PREFIX {
        return Err(Error::RecoveryShardPrefix);
    }
    let index = parse_index(index)?;
    if hex.len() != HEX_LEN {
        return Err(Error::RecoveryShardHexLength {
            len: hex.chars().count(),
        });
    }
    let mut value = Zeroizing::new([0u8; KEY_LEN]);
    for (out, pair) in value.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        match (hex_nibble(pair[0]), hex_nibble(pair[1])) {
            (Some(hi), Some(lo)) => *out = (hi << 4) | lo,
            _ => return Err(Error::RecoveryShardNotHex),
        }
    }
    let mut copy = *value;
    let share = Share::new(index, copy);
    copy.zeroize();
    share
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    const N_HEX: &str = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";
    const GOOD_HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip() {
        let s = Share::new(7, [0xab; 32]).unwrap();
        let text = encode_recovery_shard(&s);
        assert_eq!(text.as_str(), format!("spike:7:{}", "ab".repeat(32)));
        let back = decode_recovery_shard(&text).unwrap();
        assert!(back.ct_eq(&s));
        // Surrounding whitespace and newline, upper-case hex.
        let back = decode_recovery_shard(&format!("  spike:7:{}\r\n", "AB".repeat(32))).unwrap();
        assert!(back.ct_eq(&s));
        for idx in [1u8, 10, 100, 255] {
            let s = Share::new(idx, [0x11; 32]).unwrap();
            let t = encode_recovery_shard(&s);
            assert!(!t.ends_with('\n'));
            assert_eq!(decode_recovery_shard(&t).unwrap().index, idx);
        }
        // Leading zeros in the index are still a decimal integer.
        assert_eq!(
            decode_recovery_shard(&format!("spike:007:{GOOD_HEX}"))
                .unwrap()
                .index,
            7
        );
    }

    /// Recovery files written by SPIKE main's own Pilot (`spike operator
    /// recover`), and what they combine to; see tests/fixtures/spike-main/README.md.
    const SPIKE_FILES: [(&str, &[u8]); 3] = [
        (
            "spike.recovery.1.txt",
            include_bytes!("../../tests/fixtures/spike-main/recover/spike.recovery.1.txt"),
        ),
        (
            "spike.recovery.2.txt",
            include_bytes!("../../tests/fixtures/spike-main/recover/spike.recovery.2.txt"),
        ),
        (
            "spike.recovery.3.txt",
            include_bytes!("../../tests/fixtures/spike-main/recover/spike.recovery.3.txt"),
        ),
    ];
    const SPIKE_EXPECTED: &str = include_str!("../../tests/fixtures/spike-main/expected.json");

    fn unhex32(s: &str) -> [u8; 32] {
        let v: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    #[test]
    fn spike_pilot_files_restore() {
        use crate::crypto::{RootKey, ShardDerivation, combine, identify_derivation, split_with};
        let expected: serde_json::Value = serde_json::from_str(SPIKE_EXPECTED).unwrap();
        let root = RootKey::from_bytes(unhex32(expected["root_key"].as_str().unwrap())).unwrap();
        assert_eq!(expected["shamir"]["derivation"], "rejection_sampling");

        let mut shards = Vec::new();
        for (name, bytes) in SPIKE_FILES {
            let text = std::str::from_utf8(bytes).unwrap();
            assert_eq!(expected["recovery_files"][name], text);
            assert!(!text.ends_with('\n'));
            let share = decode_recovery_shard(text).unwrap();
            assert_eq!(name, format!("spike.recovery.{}.txt", share.index));
            // What we would write for this shard is SPIKE's file, byte for byte.
            assert_eq!(encode_recovery_shard(&share).as_bytes(), bytes);
            shards.push(share);
        }
        // Any threshold (2) of them, in any order, and all three, give the key.
        for pair in [[0, 1], [0, 2], [1, 2], [2, 0], [1, 0]] {
            let set: Vec<Share> = pair.iter().map(|&i| shards[i].clone()).collect();
            assert!(combine(&set).unwrap().ct_eq(&root), "{pair:?}");
        }
        assert!(combine(&shards).unwrap().ct_eq(&root));
        // One file alone is not the key.
        assert!(combine(&shards[..1]).map_or(true, |k| !k.ct_eq(&root)));
        // They are SPIKE main's Keeper shards of that key.
        assert_eq!(
            identify_derivation(&root, 2, &shards).unwrap(),
            Some(ShardDerivation::RejectionSampling)
        );
        let keeper = split_with(&root, 2, 3, ShardDerivation::RejectionSampling).unwrap();
        assert!(keeper.iter().zip(&shards).all(|(a, b)| a.ct_eq(b)));
    }

    #[test]
    fn released_spike_files_restore() {
        // SPIKE <= v0.8.0 writes the same text for circl v1.6.1 shards.
        use crate::crypto::{RootKey, combine};
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/vectors/shamir-circl-v1.6.1.json"))
                .unwrap();
        let mut checked = 0;
        for c in v["cases"].as_array().unwrap() {
            if c["threshold"] != 2 || c["shares"] != 3 {
                continue;
            }
            let root = RootKey::from_bytes(unhex32(c["key"].as_str().unwrap())).unwrap();
            let files: Vec<String> = c["shards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| format!("spike:{}:{}", s["index"], s["value"].as_str().unwrap()))
                .collect();
            let shards: Vec<Share> = files
                .iter()
                .map(|f| decode_recovery_shard(f).unwrap())
                .collect();
            for (f, s) in files.iter().zip(&shards) {
                assert_eq!(encode_recovery_shard(s).as_str(), f);
            }
            for pair in [[0, 1], [0, 2], [1, 2]] {
                let set: Vec<Share> = pair.iter().map(|&i| shards[i].clone()).collect();
                assert!(combine(&set).unwrap().ct_eq(&root));
            }
            checked += 1;
        }
        assert_eq!(checked, 10);
    }

    fn err(text: &str) -> Error {
        let e = decode_recovery_shard(text).unwrap_err();
        let msg = e.to_string();
        // The message never contains the hex value (or a big chunk of it).
        for hex in [GOOD_HEX, N_HEX] {
            assert!(!msg.to_lowercase().contains(&hex[..16]), "{msg}");
        }
        assert!(
            !msg.contains("0123456789") && !msg.contains("ffffffff"),
            "{msg}"
        );
        e
    }

    #[test]
    fn malformed() {
        assert_eq!(
            err(&format!("spoke:1:{GOOD_HEX}")),
            Error::RecoveryShardPrefix
        );
        assert_eq!(
            err(&format!("SPIKE:1:{GOOD_HEX}")),
            Error::RecoveryShardPrefix
        );
        assert_eq!(err(&format!(":1:{GOOD_HEX}")), Error::RecoveryShardPrefix);
        assert_eq!(err(GOOD_HEX), Error::RecoveryShardFormat { parts: 1 });
        assert_eq!(
            err(&format!("spike:{GOOD_HEX}")),
            Error::RecoveryShardFormat { parts: 2 }
        );
        assert_eq!(
            err(&format!("spike:1:{GOOD_HEX}:")),
            Error::RecoveryShardFormat { parts: 4 }
        );
        assert_eq!(err(""), Error::RecoveryShardFormat { parts: 1 });
        assert_eq!(
            err(&format!("spike:0:{GOOD_HEX}")),
            Error::RecoveryShardIndexOutOfRange { index: 0 }
        );
        assert_eq!(
            err(&format!("spike:256:{GOOD_HEX}")),
            Error::RecoveryShardIndexOutOfRange { index: 256 }
        );
        assert_eq!(
            err(&format!("spike:99999999999999999999999:{GOOD_HEX}")),
            Error::RecoveryShardIndexOutOfRange { index: u64::MAX }
        );
        for bad in ["x", "", "-1", "+1", " 1", "1a", "0x1"] {
            assert_eq!(
                err(&format!("spike:{bad}:{GOOD_HEX}")),
                Error::RecoveryShardIndexNotDecimal,
                "{bad:?}"
            );
        }
        assert_eq!(
            err(&format!("spike:1:{}", &GOOD_HEX[..62])),
            Error::RecoveryShardHexLength { len: 62 }
        );
        assert_eq!(
            err(&format!("spike:1:{GOOD_HEX}00")),
            Error::RecoveryShardHexLength { len: 66 }
        );
        assert_eq!(err("spike:1:"), Error::RecoveryShardHexLength { len: 0 });
        let mut non_hex = GOOD_HEX.to_string();
        non_hex.replace_range(10..11, "g");
        assert_eq!(
            err(&format!("spike:1:{non_hex}")),
            Error::RecoveryShardNotHex
        );
        let mut spaced = GOOD_HEX.to_string();
        spaced.replace_range(30..31, " ");
        assert_eq!(
            err(&format!("spike:1:{spaced}")),
            Error::RecoveryShardNotHex
        );
        assert_eq!(
            err(&format!("spike:1:{N_HEX}")),
            Error::ShareValueOutOfRange { index: 1 }
        );
        assert_eq!(
            err(&format!("spike:1:{}", "f".repeat(64))),
            Error::ShareValueOutOfRange { index: 1 }
        );
        let mut n_plus_1 = N_HEX.to_string();
        n_plus_1.replace_range(63..64, "2");
        assert_eq!(
            err(&format!("spike:2:{n_plus_1}")),
            Error::ShareValueOutOfRange { index: 2 }
        );
        assert_eq!(
            err(&format!("spike:4:{}", "0".repeat(64))),
            Error::ShareValueZero { index: 4 }
        );
        assert_eq!(
            Error::RecoveryShardIndexOutOfRange { index: 0 }.to_string(),
            "recovery shard index 0 is out of range 1..=255"
        );
    }
}
