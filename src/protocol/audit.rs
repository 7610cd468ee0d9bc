//! The audit trail's format, shared by the Nexus that writes it and `spike audit verify`.
//!
//! One JSON object per line. Every line names the SHA-256 of the line before it (`prev`, so a
//! line cannot be removed, reordered or changed without breaking the next one) and, once the
//! root key is loaded, ends with an HMAC-SHA256 of everything before it (`mac`) under a key
//! derived from the root key ([`KEY_LABEL`]): whoever can edit the file but does not hold the
//! root key cannot repair the chain. Lines written before the key was loaded (a restore) carry
//! `"mac":null`; an edit among them is found at the next line that has a MAC. Since anyone can
//! write such a line, the verifier accepts one only where Nexus writes one: an `open`, a `gap`
//! or a restore request before any line with a MAC, or the `open` of a start (which is how a
//! restarted Nexus continues a file); and a walk must begin with an `open` record.
//!
//! What a chain cannot show: records cut from the end of the newest file (nothing follows them
//! to notice). Each file starts with an `open` record and Nexus writes one at every start and
//! every reopen (SIGHUP), so an operator who keeps the rotated files can check that each one
//! continues the last.

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::crypto::MacKey;

/// HKDF label of the audit MAC key.
pub const KEY_LABEL: &str = "spike/audit/v1";

/// `prev` of the first record of a trail: no line came before it.
pub const GENESIS: [u8; 32] = [0; 32];

/// The one request Nexus carries out (and records) before its root key is loaded. The only
/// `request` records that may lack a MAC are of it, or of requests refused with
/// [`KEYLESS_STATUS`] (no root key yet).
pub const KEYLESS_ACTION: &str = "operator.restore";

/// The status of a request refused because the root key was not loaded (`state_not_ready`).
pub const KEYLESS_STATUS: u16 = 503;

/// `detail` of the `open` record Nexus writes when it starts (its first record has no MAC).
pub const OPEN_START: &str = "start";

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One API request.
    Request,
    /// Nexus opened the file (at start, or after SIGHUP).
    Open,
    /// Records that could not be written while the sink failed (best-effort mode only).
    Gap,
}

/// One audit record, as written (without its `mac`). Never holds a secret value: `resource` is
/// a path or a policy name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// What the record is about.
    pub kind: Kind,
    /// Position in this Nexus's trail: one more than the record before.
    pub seq: u64,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// The Nexus instance that wrote it (host name and port).
    pub instance: String,
    /// The request's id (also sent back in `X-Request-Id`); empty for other kinds.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// The caller's SPIFFE ID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caller: String,
    /// The operation, e.g. `secret.get`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
    /// The path or policy name the request named (never a value).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
    /// HTTP status of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How long the request took, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micros: Option<u64>,
    /// `open`: why the file was opened; `gap`: how many records were lost.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Fingerprint of the root key whose audit key made `mac` (absent when there is no MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Lowercase hex SHA-256 of the previous line, without its newline.
    pub prev: String,
}

/// Text that ends every line: `,"mac":` then a quoted hex MAC or `null`, then `}`.
const MAC_FIELD: &str = ",\"mac\":";

/// The line for `record` (no newline), with the MAC of `key` if there is one.
pub fn line(record: &Record, key: Option<&MacKey>) -> String {
    // Serializing a struct of strings and numbers cannot fail.
    let body = serde_json::to_string(record).unwrap_or_default();
    let open = body.strip_suffix('}').unwrap_or(&body);
    match key {
        Some(key) => format!("{open}{MAC_FIELD}\"{}\"}}", hex(&key.sign(body.as_bytes()))),
        None => format!("{open}{MAC_FIELD}null}}"),
    }
}

/// SHA-256 of `line` (its bytes as written, without the newline).
pub fn digest_of(line: &str) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, line.as_bytes()).as_ref());
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Why a line does not verify.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// Not a record of this format.
    #[error("not an audit record ({0})")]
    Malformed(String),
    /// `prev` is not the previous line's digest: a line was removed, added or reordered
    /// before this one, or the previous line was changed.
    #[error(
        "does not follow the line before it (a record before it was removed, reordered or changed)"
    )]
    Chain,
    /// `seq` does not follow the previous record's.
    #[error("sequence number {found} does not follow {expected}")]
    Sequence {
        /// What the previous record implies.
        expected: u64,
        /// What this one says.
        found: u64,
    },
    /// The MAC does not match: the record was changed.
    #[error("its MAC does not match: the record was changed")]
    Mac,
    /// A record without a MAC where Nexus always writes one: every record after the root key
    /// is loaded has one, until Nexus starts again (an `open` record); before, only `open`,
    /// `gap` and restore requests are written.
    #[error(
        "it has no MAC where Nexus writes one (records were changed, removed or added by someone without the root key)"
    )]
    Unauthenticated,
    /// The first line given is not an `open` record: every file Nexus writes starts with one.
    #[error(
        "the first record is not an open record, where every audit file starts: records before it were removed"
    )]
    Start,
    /// The record names another root key than the one given.
    #[error("it was written under root key {found}; the recovery shards given rebuild {given}")]
    OtherKey {
        /// The record's key id.
        found: String,
        /// The key id of the key given.
        given: String,
    },
}

/// One parsed line: the record, its MAC (if any) and the line's digest.
#[derive(Debug)]
pub struct Parsed {
    /// The record.
    pub record: Record,
    /// The MAC, decoded.
    pub mac: Option<Vec<u8>>,
    /// The text the MAC covers: the record's JSON without the MAC.
    signed: String,
}

/// Splits and checks the shape of one line.
pub fn parse(line: &str) -> Result<Parsed, Broken> {
    let at = line
        .rfind(MAC_FIELD)
        .ok_or_else(|| Broken::Malformed("no mac field at its end".into()))?;
    let (open, tail) = line.split_at(at);
    let value = tail[MAC_FIELD.len()..]
        .strip_suffix('}')
        .ok_or_else(|| Broken::Malformed("does not end with }".into()))?;
    let mac = match value {
        "null" => None,
        quoted => {
            let text = quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .ok_or_else(|| Broken::Malformed("mac is not a string or null".into()))?;
            Some(unhex(text).ok_or_else(|| Broken::Malformed("mac is not hex".into()))?)
        }
    };
    let signed = format!("{open}}}");
    let record: Record =
        serde_json::from_str(&signed).map_err(|e| Broken::Malformed(e.to_string()))?;
    // What was signed is exactly what this code writes for that record: no second spelling of
    // one record (whitespace, field order, escapes) verifies.
    if serde_json::to_string(&record).ok().as_deref() != Some(signed.as_str()) {
        return Err(Broken::Malformed(
            "not in the canonical form Nexus writes".into(),
        ));
    }
    Ok(Parsed {
        record,
        mac,
        signed,
    })
}

/// The bytes of lowercase or uppercase hex `text`, if it is hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Walks a trail line by line: each call checks one line against the ones before it.
pub struct Verifier<'k> {
    /// The audit keys given, by root key id: a trail that spans a rekey has records of each.
    keys: Vec<(String, &'k MacKey)>,
    /// Digest and seq of the last line seen.
    last: Option<([u8; 32], u64)>,
    /// Lines that verified.
    pub verified: u64,
    /// Lines written before the root key was loaded (no MAC): chained, not authenticated on
    /// their own.
    pub unauthenticated: u64,
    /// Lines since the last one with a MAC: only a later MAC vouches for them.
    pub pending: u64,
    /// Whether a record with a MAC came since Nexus last started: from then on every record
    /// has one.
    keyed: bool,
}

impl<'k> Verifier<'k> {
    /// A verifier with the audit key of the root key whose id is `key_id`.
    pub fn new(key: &'k MacKey, key_id: String) -> Verifier<'k> {
        Verifier {
            keys: vec![(key_id, key)],
            last: None,
            verified: 0,
            unauthenticated: 0,
            pending: 0,
            keyed: false,
        }
    }

    /// The same verifier, also holding the audit key of root key `key_id` (a trail that spans
    /// a rekey: each record names the key it was written under).
    pub fn also(mut self, key: &'k MacKey, key_id: String) -> Verifier<'k> {
        self.keys.push((key_id, key));
        self
    }

    /// Checks the next line. The first line of a walk is taken as where the trail starts (its
    /// `prev` is not known); every other line must follow the one before it.
    pub fn check(&mut self, line: &str) -> Result<Record, Broken> {
        let parsed = parse(line)?;
        if self.last.is_none() && parsed.record.kind != Kind::Open {
            return Err(Broken::Start);
        }
        // Nexus starts a new trail (from GENESIS, seq 1) when it starts on a new file.
        let restart = parsed.record.kind == Kind::Open
            && parsed.record.seq == 1
            && parsed.record.prev == hex(&GENESIS);
        if let Some((digest, seq)) = self.last
            && !restart
        {
            if parsed.record.prev != hex(&digest) {
                return Err(Broken::Chain);
            }
            let expected = seq.wrapping_add(1);
            if parsed.record.seq != expected {
                return Err(Broken::Sequence {
                    expected,
                    found: parsed.record.seq,
                });
            }
        }
        match &parsed.mac {
            Some(mac) => {
                let key = match &parsed.record.key_id {
                    Some(found) => self
                        .keys
                        .iter()
                        .find(|(id, _)| id == found)
                        .map(|(_, k)| *k)
                        .ok_or_else(|| Broken::OtherKey {
                            found: found.clone(),
                            given: self
                                .keys
                                .iter()
                                .map(|(id, _)| id.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        })?,
                    None => self.keys[0].1,
                };
                key.verify(parsed.signed.as_bytes(), mac)
                    .map_err(|_| Broken::Mac)?;
                self.pending = 0;
                self.keyed = true;
            }
            None => {
                // Without the root key anyone can write such a line, so only the lines Nexus
                // itself writes without a MAC pass: before the key is loaded, and the `open`
                // of a start.
                let record = &parsed.record;
                let keyless = match record.kind {
                    Kind::Open => !self.keyed || record.detail == OPEN_START,
                    Kind::Gap => !self.keyed,
                    Kind::Request => {
                        !self.keyed
                            && (record.action == KEYLESS_ACTION
                                || record.status == Some(KEYLESS_STATUS))
                    }
                };
                if !keyless {
                    return Err(Broken::Unauthenticated);
                }
                if record.kind == Kind::Open {
                    self.keyed = false;
                }
                self.unauthenticated += 1;
                self.pending += 1;
            }
        }
        self.last = Some((digest_of(line), parsed.record.seq));
        self.verified += 1;
        Ok(parsed.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RootKey;

    fn record(seq: u64, prev: &[u8; 32], kind: Kind) -> Record {
        Record {
            kind,
            seq,
            time: "2026-11-29T00:00:00Z".into(),
            instance: "host:8553".into(),
            request_id: format!("r-{seq}"),
            caller: "spiffe://spike.ist/app/x".into(),
            action: "secret.get".into(),
            resource: "apps/\"quoted\"\n".into(),
            status: Some(200),
            micros: Some(7),
            detail: String::new(),
            key_id: Some("k".into()),
            prev: hex(prev),
        }
    }

    /// Three lines chained from GENESIS, MACed with `key`.
    fn trail(key: &MacKey) -> Vec<String> {
        let mut prev = GENESIS;
        let mut out = Vec::new();
        for seq in 1..=3 {
            let kind = if seq == 1 { Kind::Open } else { Kind::Request };
            let l = line(&record(seq, &prev, kind), Some(key));
            prev = digest_of(&l);
            out.push(l);
        }
        out
    }

    #[test]
    fn a_trail_verifies_and_every_edit_breaks_it() {
        let root = RootKey::generate().unwrap();
        let key = root.derive_mac(KEY_LABEL);
        let lines = trail(&key);
        let mut v = Verifier::new(&key, "k".into());
        for l in &lines {
            v.check(l).unwrap();
        }
        assert_eq!((v.verified, v.unauthenticated), (3, 0));

        let check_all = |lines: &[String]| -> Result<(), Broken> {
            let mut v = Verifier::new(&key, "k".into());
            lines.iter().try_for_each(|l| v.check(l).map(|_| ()))
        };
        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"status\":200", "\"status\":404");
        assert_eq!(check_all(&edited), Err(Broken::Mac));
        let mut spaced = lines.clone();
        spaced[1] = spaced[1].replacen(",", ", ", 1);
        assert!(matches!(check_all(&spaced), Err(Broken::Malformed(_))));
        assert_eq!(
            check_all(&[lines[0].clone(), lines[2].clone()]),
            Err(Broken::Chain)
        );
        let other = RootKey::generate().unwrap().derive_mac(KEY_LABEL);
        assert_eq!(
            Verifier::new(&other, "k".into()).check(&lines[0]).err(),
            Some(Broken::Mac)
        );
        assert!(matches!(
            Verifier::new(&key, "other".into()).check(&lines[0]),
            Err(Broken::OtherKey { .. })
        ));
        // A trail that starts again (a new file at a start) follows anything.
        let mut twice = lines.clone();
        twice.extend(trail(&key));
        check_all(&twice).unwrap();
    }

    #[test]
    fn lines_without_a_mac_are_chained_and_counted() {
        let root = RootKey::generate().unwrap();
        let key = root.derive_mac(KEY_LABEL);
        let first = line(&record(1, &GENESIS, Kind::Open), None);
        let second = line(&record(2, &digest_of(&first), Kind::Request), Some(&key));
        let mut v = Verifier::new(&key, "k".into());
        v.check(&first).unwrap();
        v.check(&second).unwrap();
        assert_eq!((v.unauthenticated, v.pending), (1, 0));
        // Once a record had a MAC, one without passes only as the `open` of a new start.
        let third = line(&record(3, &digest_of(&second), Kind::Request), None);
        assert_eq!(v.check(&third).err(), Some(Broken::Unauthenticated));
        let mut start = record(3, &digest_of(&second), Kind::Open);
        start.detail = OPEN_START.into();
        let start = line(&start, None);
        v.check(&start).unwrap();
        let mut restore = record(4, &digest_of(&start), Kind::Request);
        restore.action = KEYLESS_ACTION.into();
        let restore = line(&restore, None);
        v.check(&restore).unwrap();
        // Before the key: a refusal for want of it passes without a MAC, a served read does not.
        let mut served = record(5, &digest_of(&restore), Kind::Request);
        assert_eq!(
            v.check(&line(&served, None)).err(),
            Some(Broken::Unauthenticated)
        );
        served.status = Some(KEYLESS_STATUS);
        v.check(&line(&served, None)).unwrap();
        // A walk starts at an `open` record.
        assert_eq!(
            Verifier::new(&key, "k".into()).check(&second).err(),
            Some(Broken::Start)
        );
        assert!(parse("{\"kind\":\"open\"}").is_err());
        assert!(parse("").is_err());
        assert!(parse(&first.replace("null", "\"zz\"")).is_err());
    }
}
