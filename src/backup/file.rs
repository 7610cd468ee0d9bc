//! The backup file: one logical format for every backend, JSON lines.
//!
//! 1. A header: `{"format":"spike-backup","version":1,"created":…,"backend":…,
//!    "consistency":"store"|"record","key_id":…,"records":N,"secrets":…,"policies":…,"system":…}`.
//! 2. One line per record, sorted by namespace then key: `{"ns":…,"key":…,"value":BASE64}`. The
//!    value is the store's bytes as they are — sealed values, MACed records, the sealed policy
//!    book, the root-key verifier — never opened to write the backup.
//! 3. A trailer: `{"end":"spike-backup","records":N,"sha256":HEX}`, the SHA-256 over every
//!    byte before it.
//!
//! The trailer makes a truncated or damaged file fail to read; it is not a MAC (whoever edits
//! the file can recompute it). What a backup holds is authenticated the way the store is:
//! every secret record by its MAC, the policy book and the verifier by AEAD under the root key
//! (`spike backup verify --recover-dir`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::Verifier;
use crate::protocol::audit::hex;
use crate::store::{Namespace, RESTORE_MARKER_KEY, VERIFIER_KEY};

/// The header's `format`.
pub const FORMAT: &str = "spike-backup";
/// The version of the format this code writes and reads.
pub const VERSION: u32 = 1;

/// What a backup says it contains.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
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
}

/// A backup read whole and checked: its header and records.
#[derive(Debug)]
pub struct Backup {
    /// The header.
    pub header: Header,
    /// `(namespace, key, value)`, sorted.
    pub records: Vec<(Namespace, String, Vec<u8>)>,
    /// The SHA-256 in the trailer: names this backup.
    pub sha256: String,
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
}

fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
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

/// The file's bytes for `header` and `records` (sorted).
pub fn encode(header: &Header, records: &[(Namespace, String, Vec<u8>)]) -> Vec<u8> {
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
    let trailer = Trailer {
        end: FORMAT.into(),
        records: records.len() as u64,
        sha256: sha256(&out),
    };
    json_line(&mut out, &trailer);
    out
}

/// Reads and checks a whole backup: complete (the trailer is there, counts agree), unchanged
/// since written (the SHA-256), every line well-formed, records sorted and unique, a verifier
/// whose key id is the header's. The error says what is wrong and where.
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
    let got = sha256(body);
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
    if header.version != VERSION {
        return Err(format!(
            "format version {} is not one this spike reads ({VERSION}); use the spike that wrote it",
            header.version
        ));
    }
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
        sha256: trailer.sha256,
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

    fn sample() -> (Header, Vec<(Namespace, String, Vec<u8>)>) {
        let key = RootKey::generate().unwrap();
        let v = key.make_verifier().unwrap();
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

    #[test]
    fn round_trip_and_every_damage_is_named() {
        let (header, records) = sample();
        let bytes = encode(&header, &records);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(back.records, records);
        assert_eq!(back.value(Namespace::Secrets, "a"), Some(&b"one"[..]));

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
    }
}
