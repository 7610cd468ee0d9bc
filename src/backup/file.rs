//! The backup file: one logical format for every backend, JSON lines.
//!
//! 1. A header: `{"format":"spike-backup","version":2,"created":…,"backend":…,
//!    "consistency":"store"|"record","key_id":…,"records":N,"secrets":…,"policies":…,"system":…}`.
//! 2. One line per record, sorted by namespace then key: `{"ns":…,"key":…,"value":BASE64}`. The
//!    value is the store's bytes as they are — sealed values, MACed records, the sealed policy
//!    book, the root-key verifier — never opened to write the backup.
//! 3. A trailer: `{"end":"spike-backup","records":N,"sha256":HEX,"key_id":ID,"mac":HEX}`:
//!    the SHA-256 over every byte before it (header and record lines, in order), and an
//!    HMAC-SHA256 under a key derived from the deployment's root key ([`MAC_LABEL`]) over that
//!    SHA-256, the record count and the key id ([`mac_message`]).
//!
//! [`decode`] checks the structure only: complete, well-formed, counts agree, the SHA-256
//! matches (so truncation and damage are named precisely). That proves nothing against a
//! deliberate edit — whoever edits the file can recompute a hash. [`Backup::authenticate`]
//! checks the MAC with the root key: only a holder of the root key can produce a file it
//! accepts, whatever was dropped, reordered, duplicated, changed, cut or spliced.
//!
//! Version 1 (before the MAC) had the same lines and a trailer without `key_id` and `mac`. It is
//! still read, as [`Seal::Unauthenticated`], so the commands can refuse it by name and accept
//! it only when told.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{MAC_LEN, MacKey, Verifier};
use crate::protocol::audit::hex;
use crate::store::{Namespace, RESTORE_MARKER_KEY, VERIFIER_KEY};

/// The header's `format`.
pub const FORMAT: &str = "spike-backup";
/// The version of the format this code writes: 2, with a keyed MAC in the trailer.
pub const VERSION: u32 = 2;
/// The version written before the MAC (an unkeyed SHA-256 only): read, never written.
pub const UNAUTHENTICATED_VERSION: u32 = 1;
/// The label under which the backup MAC key is derived from the root key
/// (`root.derive_mac(MAC_LABEL)`, HKDF then HMAC-SHA256). Used for backups only, so no other
/// MAC made under the root key (audit records, secret records) verifies as a backup's. The
/// `v1` names the key derivation, not the file format.
pub const MAC_LABEL: &str = "spike/backup/v1";
/// What a MAC message starts with: the format and its version, so a tag of this format can
/// never be read as one of another.
const MAC_DOMAIN: &[u8] = b"spike-backup/2/mac\0";

/// What a backup says it contains.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] (or [`UNAUTHENTICATED_VERSION`] in an old file).
    pub version: u32,
    /// When the snapshot began (RFC 3339, UTC).
    pub created: String,
    /// The backend it was read from.
    pub backend: String,
    /// `store` (one instant) or `record` (each record as of its own read).
    pub consistency: String,
    /// The id of the root key its values are sealed under (from the stored verifier).
    pub key_id: String,
    /// Records in the file.
    pub records: u64,
    /// Of which secret records.
    pub secrets: u64,
    /// Of which per-name policy rows (the layout before the policy book).
    pub policies: u64,
    /// Of which deployment-wide records (the verifier, the policy book).
    pub system: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    ns: String,
    key: String,
    #[serde(with = "crate::protocol::nexus::b64")]
    value: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    end: String,
    records: u64,
    sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

/// How a backup is authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seal {
    /// A MAC under the root key whose id is given ([`VERSION`]).
    Mac {
        /// [`crate::crypto::RootKey::key_id`] of the key the MAC was made under.
        key_id: String,
        /// The HMAC-SHA256 tag.
        tag: [u8; MAC_LEN],
    },
    /// No MAC: a file of [`UNAUTHENTICATED_VERSION`]; anyone could have written it.
    Unauthenticated,
}

/// A backup read whole and checked for structure: its header and records.
#[derive(Debug)]
pub struct Backup {
    /// The header.
    pub header: Header,
    /// `(namespace, key, value)`, sorted.
    pub records: Vec<(Namespace, String, Vec<u8>)>,
    /// The SHA-256 of the header and records, hex: names this backup.
    pub sha256: String,
    /// The trailer's MAC, or none in an old file.
    pub seal: Seal,
    digest: [u8; 32],
}

/// Why [`Backup::authenticate`] refused a backup.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The file has no MAC (format version 1).
    Unauthenticated,
    /// The MAC was made under another root key than the one given.
    OtherKey {
        /// The key id the trailer names.
        made_under: String,
    },
    /// The MAC does not verify: the file was changed by someone without the root key.
    Forged,
}

impl Backup {
    /// The root-key verifier it holds.
    pub fn verifier(&self) -> Result<Verifier, String> {
        let value = self
            .value(Namespace::System, VERIFIER_KEY)
            .ok_or("it holds no root-key verifier")?;
        crate::store::parse_verifier(value)
    }

    /// The value of one record.
    pub fn value(&self, ns: Namespace, key: &str) -> Option<&[u8]> {
        self.records
            .binary_search_by(|(n, k, _)| (*n, k.as_str()).cmp(&(ns, key)))
            .ok()
            .map(|i| self.records[i].2.as_slice())
    }

    /// The id of the root key this backup says it was made under: the trailer's (the header's
    /// in an old file, which has none in its trailer).
    pub fn key_id(&self) -> &str {
        match &self.seal {
            Seal::Mac { key_id, .. } => key_id,
            Seal::Unauthenticated => &self.header.key_id,
        }
    }

    /// Checks the MAC under `key`, the backup MAC key ([`MAC_LABEL`]) of the root key whose id
    /// is `key_id`. Constant time in the tag.
    pub fn authenticate(&self, key: &MacKey, key_id: &str) -> Result<(), AuthError> {
        let Seal::Mac {
            key_id: made_under,
            tag,
        } = &self.seal
        else {
            return Err(AuthError::Unauthenticated);
        };
        if made_under != key_id {
            return Err(AuthError::OtherKey {
                made_under: made_under.clone(),
            });
        }
        let message = mac_message(&self.digest, self.records.len() as u64, made_under);
        key.verify(&message, tag).map_err(|_| AuthError::Forged)
    }
}

/// What the MAC covers: the domain `spike-backup/2/mac\0`, the SHA-256 of the header and every
/// record line in order (so their content, order and number, and the header with its time and
/// counts), the record count and the root key's id, each of fixed length or last.
pub fn mac_message(body_sha256: &[u8; 32], records: u64, key_id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(MAC_DOMAIN.len() + 32 + 8 + key_id.len());
    m.extend_from_slice(MAC_DOMAIN);
    m.extend_from_slice(body_sha256);
    m.extend_from_slice(&records.to_be_bytes());
    m.extend_from_slice(key_id.as_bytes());
    m
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn json_line(out: &mut Vec<u8>, value: &impl Serialize) {
    // Serialising these plain structs cannot fail.
    if serde_json::to_writer(&mut *out, value).is_ok() {
        out.push(b'\n');
    }
}

/// Counts per namespace of `records`.
pub fn counts(records: &[(Namespace, String, Vec<u8>)]) -> BTreeMap<Namespace, u64> {
    let mut counts = BTreeMap::new();
    for (ns, _, _) in records {
        *counts.entry(*ns).or_insert(0) += 1;
    }
    counts
}

/// The header and record lines of `header` and `records` (sorted), without the trailer.
fn encode_body(header: &Header, records: &[(Namespace, String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    json_line(&mut out, header);
    for (ns, key, value) in records {
        json_line(
            &mut out,
            &Line {
                ns: ns.as_str().into(),
                key: key.clone(),
                value: value.clone(),
            },
        );
    }
    out
}

/// The file's bytes for `header` and `records` (sorted), with a trailer that carries the MAC
/// under `key`, the backup MAC key ([`MAC_LABEL`]) of the root key whose id is `key_id`.
pub fn encode(
    header: &Header,
    records: &[(Namespace, String, Vec<u8>)],
    key: &MacKey,
    key_id: &str,
) -> Vec<u8> {
    let mut out = encode_body(header, records);
    let digest = sha256(&out);
    let tag = key.sign(&mac_message(&digest, records.len() as u64, key_id));
    let trailer = Trailer {
        end: FORMAT.into(),
        records: records.len() as u64,
        sha256: hex(&digest),
        key_id: Some(key_id.into()),
        mac: Some(hex(&tag)),
    };
    json_line(&mut out, &trailer);
    out
}

/// A file of the old format ([`UNAUTHENTICATED_VERSION`], no MAC), as spike wrote it before the
/// MAC: for tests and fuzzing only.
#[doc(hidden)]
pub fn encode_unauthenticated(
    header: &Header,
    records: &[(Namespace, String, Vec<u8>)],
) -> Vec<u8> {
    let mut out = encode_body(header, records);
    let trailer = Trailer {
        end: FORMAT.into(),
        records: records.len() as u64,
        sha256: hex(&sha256(&out)),
        key_id: None,
        mac: None,
    };
    json_line(&mut out, &trailer);
    out
}

fn unhex_tag(text: &str) -> Option<[u8; MAC_LEN]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * MAC_LEN {
        return None;
    }
    let mut out = [0u8; MAC_LEN];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Reads a whole backup and checks its structure: complete (the trailer is there, counts
/// agree), undamaged (the SHA-256), every line well-formed, records sorted and unique, a
/// verifier whose key id is the header's and the trailer's. The error says what is wrong and
/// where. This is not authentication: see [`Backup::authenticate`].
pub fn decode(bytes: &[u8]) -> Result<Backup, String> {
    if bytes.is_empty() {
        return Err("the file is empty: not a backup, or truncated to nothing".into());
    }
    if bytes.last() != Some(&b'\n') {
        return Err(format!(
            "truncated: the file ends in the middle of a line (after {} bytes); a complete backup ends with its trailer line",
            bytes.len()
        ));
    }
    let text = &bytes[..bytes.len() - 1];
    let (body_len, last) = match text.iter().rposition(|b| *b == b'\n') {
        Some(i) => (i + 1, &text[i + 1..]),
        None => (0, text),
    };
    let body = &bytes[..body_len];
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let trailer: Trailer = match serde_json::from_slice(last) {
        Ok(t) => t,
        Err(_) if body_len == 0 => {
            return Err("truncated or not a backup: one line and no trailer".into());
        }
        Err(_) => {
            return Err(format!(
                "truncated: the last line (line {}) is not the trailer; the file was cut short or is not a spike backup",
                lines.len() + 1
            ));
        }
    };
    if trailer.end != FORMAT {
        return Err(format!("the trailer names {:?}, not {FORMAT}", trailer.end));
    }
    let Some((first, record_lines)) = lines.split_first() else {
        return Err("truncated: a trailer and no header".into());
    };
    if record_lines.len() as u64 != trailer.records {
        return Err(format!(
            "the trailer counts {} record(s) but the file holds {}: records were removed or added after it was written",
            trailer.records,
            record_lines.len()
        ));
    }
    let digest = sha256(body);
    let got = hex(&digest);
    if got != trailer.sha256 {
        return Err(format!(
            "the SHA-256 of the header and records ({got}) is not the one in the trailer ({}): the file was edited or damaged after it was written",
            trailer.sha256
        ));
    }
    let header: Header = serde_json::from_slice(first)
        .map_err(|e| format!("line 1 is not a spike backup header: {e}"))?;
    if header.format != FORMAT {
        return Err(format!(
            "line 1 names format {:?}, not {FORMAT}",
            header.format
        ));
    }
    let seal = match (header.version, trailer.key_id, trailer.mac) {
        (VERSION, Some(key_id), Some(mac)) => {
            let tag = unhex_tag(&mac).ok_or("the trailer's MAC is not 64 lowercase hex digits")?;
            if key_id != header.key_id {
                return Err(format!(
                    "the trailer names root key {key_id} but the header names {}",
                    header.key_id
                ));
            }
            Seal::Mac { key_id, tag }
        }
        (VERSION, _, _) => {
            return Err(format!(
                "the trailer of a version {VERSION} backup has no MAC or no key id: the file was cut or edited"
            ));
        }
        (UNAUTHENTICATED_VERSION, None, None) => Seal::Unauthenticated,
        (UNAUTHENTICATED_VERSION, _, _) => {
            return Err(format!(
                "a version {UNAUTHENTICATED_VERSION} backup with a MAC in its trailer: the file was edited"
            ));
        }
        (other, _, _) => {
            return Err(format!(
                "format version {other} is not one this spike reads ({UNAUTHENTICATED_VERSION} or {VERSION}); use the spike that wrote it"
            ));
        }
    };
    let mut records: Vec<(Namespace, String, Vec<u8>)> = Vec::with_capacity(record_lines.len());
    for (i, line) in record_lines.iter().enumerate() {
        let n = i + 2;
        let line: Line =
            serde_json::from_slice(line).map_err(|e| format!("line {n} is not a record: {e}"))?;
        let ns = Namespace::parse(&line.ns)
            .ok_or_else(|| format!("line {n} names an unknown namespace {:?}", line.ns))?;
        if let Some((pns, pkey, _)) = records.last()
            && (*pns, pkey.as_str()) >= (ns, line.key.as_str())
        {
            return Err(format!(
                "line {n} ({}/{:?}) is out of order or repeated",
                ns.as_str(),
                line.key
            ));
        }
        // What no store holds (PostgreSQL text cannot take a NUL): refused here, before a
        // restore writes its marker and stops half-way on it for good.
        if line.key.is_empty() || line.key.contains('\0') {
            return Err(format!(
                "line {n} has an empty key or one with a NUL character, which no store holds: the file was crafted or damaged"
            ));
        }
        if ns == Namespace::System && line.key == RESTORE_MARKER_KEY {
            return Err(format!(
                "line {n} is a restore marker: this was taken from a store in the middle of a restore"
            ));
        }
        records.push((ns, line.key, line.value));
    }
    let per_ns = counts(&records);
    let count = |ns| per_ns.get(&ns).copied().unwrap_or(0);
    if header.records != trailer.records
        || header.secrets != count(Namespace::Secrets)
        || header.policies != count(Namespace::Policies)
        || header.system != count(Namespace::System)
    {
        return Err("the header's record counts do not match the records in the file".into());
    }
    let backup = Backup {
        header,
        records,
        sha256: got,
        seal,
        digest,
    };
    let verifier = backup.verifier()?;
    if verifier.key_id != backup.header.key_id {
        return Err(format!(
            "the header names root key {} but the verifier in the file is of key {}",
            backup.header.key_id, verifier.key_id
        ));
    }
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RootKey;

    fn sample(root: &RootKey) -> (Header, Vec<(Namespace, String, Vec<u8>)>) {
        let v = root.make_verifier().unwrap();
        let mut s = crate::store::Snapshot::default();
        s.records
            .push((Namespace::Secrets, "a".into(), b"one".to_vec()));
        s.records
            .push((Namespace::Secrets, "b\n\"".into(), vec![0, 255]));
        s.records.push((
            Namespace::System,
            VERIFIER_KEY.into(),
            format!(
                r#"{{"key_id":"{}","sealed":"{}"}}"#,
                v.key_id,
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &v.sealed)
            )
            .into_bytes(),
        ));
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            created: "2026-01-01T00:00:00Z".into(),
            backend: "memory".into(),
            consistency: "store".into(),
            key_id: v.key_id,
            records: 3,
            secrets: 2,
            policies: 0,
            system: 1,
        };
        (header, s.records)
    }

    fn make(root: &RootKey, header: &Header, records: &[(Namespace, String, Vec<u8>)]) -> Vec<u8> {
        encode(header, records, &root.derive_mac(MAC_LABEL), &root.key_id())
    }

    /// What an editor without the root key can do: new header and record lines, the SHA-256
    /// and count recomputed, the MAC and key id kept from `trailer_of`.
    fn reseal(lines: &[&str], trailer_of: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(trailer_of).unwrap();
        let mut trailer: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let body = lines.join("\n") + "\n";
        trailer["sha256"] = hex(&sha256(body.as_bytes())).into();
        trailer["records"] = (lines.len() - 1).into();
        format!("{body}{trailer}\n").into_bytes()
    }

    fn authentic(root: &RootKey, bytes: &[u8]) -> Result<(), AuthError> {
        decode(bytes)
            .unwrap()
            .authenticate(&root.derive_mac(MAC_LABEL), &root.key_id())
    }

    #[test]
    fn round_trip_and_every_damage_is_named() {
        let root = RootKey::generate().unwrap();
        let (header, records) = sample(&root);
        let bytes = make(&root, &header, &records);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(back.records, records);
        assert_eq!(back.value(Namespace::Secrets, "a"), Some(&b"one"[..]));
        assert_eq!(back.key_id(), root.key_id());
        assert_eq!(authentic(&root, &bytes), Ok(()));

        let cut = decode(&bytes[..bytes.len() - 10]).unwrap_err();
        assert!(cut.contains("truncated"), "{cut}");
        let text = String::from_utf8(bytes.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let whole_lines = lines[..3].join("\n") + "\n";
        assert!(
            decode(whole_lines.as_bytes())
                .unwrap_err()
                .contains("truncated")
        );
        let removed = [lines[0], lines[2], lines[3], lines[4]].join("\n") + "\n";
        let e = decode(removed.as_bytes()).unwrap_err();
        assert!(e.contains("removed or added"), "{e}");
        let mut edited = bytes.clone();
        let at = text.find("\"key\":\"a\"").unwrap() + 8;
        edited[at] = b'c';
        let e = decode(&edited).unwrap_err();
        assert!(e.contains("SHA-256"), "{e}");
        assert!(decode(b"").unwrap_err().contains("empty"));
        // A version 2 trailer without its MAC.
        let mut trailer: serde_json::Value = serde_json::from_str(lines[4]).unwrap();
        trailer.as_object_mut().unwrap().remove("mac");
        let stripped = format!("{}\n{trailer}\n", lines[..4].join("\n"));
        let e = decode(stripped.as_bytes()).unwrap_err();
        assert!(e.contains("no MAC"), "{e}");
    }

    #[test]
    fn the_mac_catches_every_edit_made_without_the_root_key() {
        let root = RootKey::generate().unwrap();
        let (header, records) = sample(&root);
        let bytes = make(&root, &header, &records);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let (head, recs) = (lines[0], &lines[1..4]);

        // A record dropped (header counts edited to match).
        let fewer_header = head
            .replace(r#""records":3"#, r#""records":2"#)
            .replace(r#""secrets":2"#, r#""secrets":1"#);
        let dropped = reseal(&[&fewer_header, recs[1], recs[2]], &bytes);
        assert_eq!(authentic(&root, &dropped), Err(AuthError::Forged));
        // The header changed (another time).
        let later = head.replace("2026-01-01", "2027-01-01");
        let changed = reseal(&[&later, recs[0], recs[1], recs[2]], &bytes);
        assert_eq!(authentic(&root, &changed), Err(AuthError::Forged));
        // A record's value changed.
        let other = recs[0].replace(r#""value":"b25l""#, r#""value":"dHdv""#);
        assert_ne!(other, recs[0]);
        let changed = reseal(&[head, &other, recs[1], recs[2]], &bytes);
        assert_eq!(authentic(&root, &changed), Err(AuthError::Forged));
        // Reordered and duplicated lines are refused before the MAC.
        let reordered = reseal(&[head, recs[1], recs[0], recs[2]], &bytes);
        assert!(decode(&reordered).unwrap_err().contains("out of order"));
        let twice = head
            .replace(r#""records":3"#, r#""records":4"#)
            .replace(r#""secrets":2"#, r#""secrets":3"#);
        let duplicated = reseal(&[&twice, recs[0], recs[0], recs[1], recs[2]], &bytes);
        assert!(decode(&duplicated).unwrap_err().contains("repeated"));
        // An older backup's trailer on a newer body of the same deployment.
        let mut newer = records.clone();
        newer.insert(1, (Namespace::Secrets, "a2".into(), b"new".to_vec()));
        let newer_header = Header {
            records: 4,
            secrets: 3,
            ..header.clone()
        };
        let newer_bytes = make(&root, &newer_header, &newer);
        let newer_text = String::from_utf8(newer_bytes).unwrap();
        let newer_lines: Vec<&str> = newer_text.lines().collect();
        let replayed = reseal(&newer_lines[..5], &bytes);
        assert_eq!(authentic(&root, &replayed), Err(AuthError::Forged));
        // The key id in the trailer changed: named as another key, or (made to match the
        // checker's key) forged.
        let other_root = RootKey::generate().unwrap();
        assert_eq!(
            decode(&bytes)
                .unwrap()
                .authenticate(&other_root.derive_mac(MAC_LABEL), &other_root.key_id()),
            Err(AuthError::OtherKey {
                made_under: root.key_id()
            })
        );
        assert_eq!(
            decode(&bytes)
                .unwrap()
                .authenticate(&other_root.derive_mac(MAC_LABEL), &root.key_id()),
            Err(AuthError::Forged)
        );
        // The old format: readable, never authentic.
        let old_header = Header {
            version: UNAUTHENTICATED_VERSION,
            ..header.clone()
        };
        let old = encode_unauthenticated(&old_header, &records);
        let back = decode(&old).unwrap();
        assert_eq!(back.seal, Seal::Unauthenticated);
        assert_eq!(authentic(&root, &old), Err(AuthError::Unauthenticated));
        // A version 1 header put on a version 2 file to dodge the MAC.
        let downgraded = reseal(
            &[
                &head.replace(r#""version":2"#, r#""version":1"#),
                recs[0],
                recs[1],
                recs[2],
            ],
            &bytes,
        );
        assert!(decode(&downgraded).unwrap_err().contains("edited"));
    }
}
