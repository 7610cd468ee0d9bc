//! Secrets: paths holding versions of a string→string map (DESIGN.md §4).
//!
//! One record per path, stored in [`Namespace::Secrets`]. The record's bookkeeping (version
//! numbers, times) is plain; each version's data is sealed separately with AES-256-GCM under
//! the secrets key, with the path and version number as associated data, so a version copied to
//! another path or version number fails to open instead of leaking. A read opens exactly one
//! version.
//!
//! The bookkeeping is in the clear, but not trusted: everything in the record that decides what
//! a reader sees — which versions exist, their times and deleted markers, `current`, `oldest`,
//! `last`, the record's times, `max_versions`, the remembered request ids, a change counter, and
//! the SHA-256 of each version's sealed bytes — is authenticated with HMAC-SHA256 under a key
//! derived from the root key, together with the path ([`authenticated`]). A record that was
//! edited, that holds another version's or another path's sealed value, that lost a version, that
//! was moved from another path, or whose MAC was removed, is refused on read and on write (500,
//! and an error line naming the path): it is never served and never "repaired" by a write. An
//! older copy of the same record still opens — nothing outside the store remembers how far a
//! record had got — which SECURITY.md states as what it is: that record restored from a backup.
//!
//! Every change is a read-modify-write of the record finished with a compare-and-set on the
//! record's store revision; a lost race is retried from a fresh read, so concurrent writers
//! through any number of Nexus instances never produce the same version twice and never lose
//! an acknowledged write. `cas` (check-and-set) is evaluated against each fresh read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::ApiError;
use super::authz::{Grant, Listing};
pub use super::writers::Writers;
use super::writers::{Applies, Change, queue_put};
use crate::crypto::{AeadKey, DataKey, MacKey, RootKey};
use crate::protocol::nexus::{self as wire, SecretMetadata, SecretMetadataResponse, VersionInfo};
use crate::protocol::policy::Permission;
use crate::protocol::secret as rules;
use crate::store::{Entry, Expect, Namespace, Store, Written};

/// Attempts at a read-modify-write before giving up under contention.
const MAX_ATTEMPTS: u32 = 200;
/// Request ids of puts remembered per record, with the version each made.
pub const REMEMBERED_REQUESTS: usize = 16;
/// Longest `request_id` accepted.
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// HKDF label of the key that seals version values (unchanged since the first release).
const VALUES_LABEL: &str = "spike/secrets/v1";
/// HKDF label of the key that authenticates records.
const RECORDS_LABEL: &str = "spike/secret-records/v1";
/// The first bytes of every record MAC's input: what it is, and the version of its layout.
const RECORD_MAC_DOMAIN: &[u8] = b"spike/secret-record/v1\0";
/// The same for a record that names data keys (decision 33): the ids are in the MAC's input.
const RECORD_MAC_DOMAIN_KEYED: &[u8] = b"spike/secret-record/v2\0";

/// The secret-record keys derived from one data key of the keyring ([`super::keyring`]).
pub struct KeySet {
    /// Seals each version's values (AES-256-GCM).
    values: AeadKey,
    /// Authenticates each record (HMAC-SHA256).
    records: MacKey,
}

impl KeySet {
    /// The legacy set (data key 0): derived from the root key directly.
    pub fn legacy(root: &RootKey) -> KeySet {
        KeySet {
            values: root.derive(VALUES_LABEL),
            records: root.derive_mac(RECORDS_LABEL),
        }
    }

    /// The set of a real data key: the same labels, derived from `key`.
    pub fn of(key: &DataKey) -> KeySet {
        KeySet {
            values: key.derive(VALUES_LABEL),
            records: key.derive_mac(RECORDS_LABEL),
        }
    }
}

/// The keys of secret records: one [`KeySet`] per data key of the keyring, by id, and the id
/// new versions and record MACs are made under. Each version names the data key that sealed
/// it, each record the one that authenticated it; a name the keyring lacks is refused (500).
pub struct SecretKeys {
    /// The sets, by data key id.
    sets: BTreeMap<u32, Arc<KeySet>>,
    /// The id of the set that seals and authenticates what is written now.
    current: u32,
    /// `SPIKE_NEXUS_UPGRADE_SECRET_RECORDS`: a record without MAC, as written before records
    /// were authenticated, is accepted as stored and gets its MAC on its next write ([`upgrade`]).
    /// Off, such a record is refused like a tampered one.
    upgrade: bool,
}

impl SecretKeys {
    /// The legacy keys alone, under `root` (what every release before the keyring used, and
    /// what tools holding only the root key write with); `upgrade` accepts records without MAC.
    pub fn derive(root: &RootKey, upgrade: bool) -> SecretKeys {
        SecretKeys::new(
            BTreeMap::from([(0, Arc::new(KeySet::legacy(root)))]),
            0,
            upgrade,
        )
    }

    /// The keys of a keyring: `sets` by id, writing under `current`.
    pub fn new(sets: BTreeMap<u32, Arc<KeySet>>, current: u32, upgrade: bool) -> SecretKeys {
        SecretKeys {
            sets,
            current,
            upgrade,
        }
    }

    /// The set of data key `id`; a record naming one the keyring lacks is refused.
    fn set(&self, id: u32, path: &str) -> Result<&KeySet, ApiError> {
        self.sets.get(&id).map(|s| &**s).ok_or_else(|| {
            ApiError::Internal(format!(
                "secret record at {path:?} names data key {id}, which the keyring has not:                  refused"
            ))
        })
    }

    /// The id and set that seal and authenticate what is written now.
    fn sealing(&self, path: &str) -> Result<(u32, &KeySet), ApiError> {
        Ok((self.current, self.set(self.current, path)?))
    }

    /// Address and length of each key's locked pages, for the test that inspects them.
    #[cfg(test)]
    pub(crate) fn spans(&self) -> [(usize, usize); 2] {
        let set = &self.sets[&self.current];
        [set.values.span(), set.records.span()]
    }

    /// Whether records without MAC are accepted ([`SecretKeys::derive`]).
    pub fn upgrading(&self) -> bool {
        self.upgrade
    }
}

/// A secret as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// The version `get` returns by default; 0 when every version is deleted.
    pub current: u64,
    /// The lowest live version; 0 when none is live.
    pub oldest: u64,
    /// The highest version ever written, so numbers are never reused after pruning.
    pub last: u64,
    /// First write (Unix nanoseconds).
    pub created: i64,
    /// Last write (Unix nanoseconds).
    pub updated: i64,
    /// Versions kept.
    pub max_versions: u32,
    /// The versions kept, by number.
    pub versions: BTreeMap<u64, Version>,
    /// The last [`REMEMBERED_REQUESTS`] puts that carried a `request_id`, oldest first: a put
    /// replaying one of them returns its version instead of writing again. Kept in the record
    /// so the check and the write are one compare-and-set, whichever instance takes the replay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<Applied>,
    /// How many times the record was written: each write adds one, so no two states of a record
    /// share a number and a newer state always has the larger one. Authenticated like the rest;
    /// 0 in a record written before records were authenticated.
    #[serde(default)]
    pub seq: u64,
    /// The data key whose MAC key made [`Record::mac`]; 0 (absent) for the legacy key.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mac_key: u32,
    /// HMAC-SHA256 of the path and every other field ([`authenticated`]), set by each write.
    /// Absent only in a record written before records were authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "mac_b64")]
    pub mac: Option<Vec<u8>>,
}

/// `Option<Vec<u8>>` as base64; a record without the field has none, and `null` is malformed.
mod mac_b64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(bytes) => crate::protocol::nexus::b64::serialize(bytes, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        crate::protocol::nexus::b64::deserialize(d).map(Some)
    }
}

/// A put that carried a request id, and the version it made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The caller's `request_id`.
    pub id: String,
    /// The version that put made.
    pub version: u64,
}

impl Record {
    /// The version a put with request id `id` made, if it is still remembered.
    pub fn applied(&self, id: &str) -> Option<u64> {
        self.requests.iter().find(|a| a.id == id).map(|a| a.version)
    }

    /// Remembers that the put with request id `id` made `version`, forgetting the oldest
    /// beyond [`REMEMBERED_REQUESTS`].
    pub fn remember(&mut self, id: &str, version: u64) {
        self.requests.push(Applied {
            id: id.to_string(),
            version,
        });
        let excess = self.requests.len().saturating_sub(REMEMBERED_REQUESTS);
        self.requests.drain(..excess);
    }
}

/// Checks a put's request id: 1 to 64 letters, digits, '-' or '_'.
pub fn validate_request_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_REQUEST_ID_LEN
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(ApiError::BadRequest(
            "invalid request_id: 1 to 64 letters, digits, '-' or '_'".into(),
        ));
    }
    Ok(())
}

/// One version of a secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    /// When it was written (Unix nanoseconds).
    pub created: i64,
    /// When it was soft-deleted, if it was.
    pub deleted: Option<i64>,
    /// nonce ‖ ciphertext ‖ tag of the JSON map.
    #[serde(with = "crate::protocol::nexus::b64")]
    pub sealed: Vec<u8>,
    /// The data key that sealed it; 0 (absent) for the legacy key.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key: u32,
}

fn is_zero(id: &u32) -> bool {
    *id == 0
}

/// The associated data binding a sealed version to its place.
fn aad(path: &str, version: u64) -> Vec<u8> {
    format!("spike/secret/v1\0{path}\0{version}").into_bytes()
}

/// What the record MAC covers: [`RECORD_MAC_DOMAIN`], the path, and every field of the record
/// but the MAC itself, each fixed-width or length-prefixed so that no two records share an
/// encoding. A version's sealed value enters as its SHA-256, which binds exactly those bytes:
/// another version's value, an older value of the same version number (from before the record
/// was removed and written again), or another path's does not match.
///
/// The fields are taken apart without `..`: a field added to [`Record`] or [`Version`] does not
/// compile until it is added here (or deliberately left out, with the reason).
fn authenticated(path: &str, record: &Record) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    }
    let Record {
        current,
        oldest,
        last,
        created,
        updated,
        max_versions,
        versions,
        requests,
        seq,
        mac_key,
        mac: _,
    } = record;
    // A record whose every key is the legacy one keeps the layout of earlier releases, so it
    // verifies as stored; any other names its keys (layout v2), so no id can be changed.
    let keyed = *mac_key != 0 || versions.values().any(|v| v.key != 0);
    let mut out = Vec::with_capacity(136 + path.len() + versions.len() * 61 + requests.len() * 80);
    if keyed {
        out.extend_from_slice(RECORD_MAC_DOMAIN_KEYED);
    } else {
        out.extend_from_slice(RECORD_MAC_DOMAIN);
    }
    bytes(&mut out, path.as_bytes());
    if keyed {
        out.extend_from_slice(&mac_key.to_be_bytes());
    }
    for n in [current, oldest, last, seq] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&created.to_be_bytes());
    out.extend_from_slice(&updated.to_be_bytes());
    out.extend_from_slice(&max_versions.to_be_bytes());
    out.extend_from_slice(&(versions.len() as u64).to_be_bytes());
    for (number, version) in versions {
        let Version {
            created,
            deleted,
            sealed,
            key,
        } = version;
        out.extend_from_slice(&number.to_be_bytes());
        out.extend_from_slice(&created.to_be_bytes());
        match deleted {
            None => out.push(0),
            Some(at) => {
                out.push(1);
                out.extend_from_slice(&at.to_be_bytes());
            }
        }
        out.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, sealed).as_ref());
        if keyed {
            out.extend_from_slice(&key.to_be_bytes());
        }
    }
    out.extend_from_slice(&(requests.len() as u64).to_be_bytes());
    for Applied { id, version } in requests {
        bytes(&mut out, id.as_bytes());
        out.extend_from_slice(&version.to_be_bytes());
    }
    out
}

/// Checks a secret path ([`rules::validate_path`]); 400 when it breaks a rule.
pub fn validate_path(path: &str) -> Result<(), ApiError> {
    rules::validate_path(path).map_err(ApiError::BadRequest)
}

fn validate_values(values: &BTreeMap<String, String>) -> Result<(), ApiError> {
    rules::validate_values(values).map_err(ApiError::BadRequest)
}

/// After a lost compare-and-set: wait a little (more on each retry), with jitter, so the
/// writers of several instances spread out.
async fn backoff(attempt: u32) {
    let spread = u64::from(attempt.min(20)) * 250 + 50;
    tokio::time::sleep(crate::platform::up_to(Duration::from_micros(spread))).await;
}

/// Reads the record at `path` ([`open_record`]) with its revision.
async fn load(
    store: &impl Store,
    keys: &SecretKeys,
    path: &str,
) -> Result<Option<(Record, crate::store::Revision)>, ApiError> {
    let Some(entry) = store.get(Namespace::Secrets, path).await? else {
        return Ok(None);
    };
    Ok(Some((
        open_record(keys, path, &entry.value)?,
        entry.revision,
    )))
}

/// Decodes the record stored at `path` and checks its MAC. A record whose MAC does not verify
/// (edited, holding another version's or path's value, moved from another path) is refused;
/// so is one without MAC unless [`SecretKeys::upgrading`]. Refusals are `Internal`: 500 for
/// the caller and an error line naming the path for the operator.
fn open_record(keys: &SecretKeys, path: &str, stored: &[u8]) -> Result<Record, ApiError> {
    // Says where, never serde's own message: it quotes what the store holds.
    let record: Record = serde_json::from_slice(stored).map_err(|e| {
        ApiError::Internal(format!(
            "secret record at {path:?} is malformed ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    match &record.mac {
        Some(tag) => keys
            .set(record.mac_key, path)?
            .records
            .verify(&authenticated(path, &record), tag)
            .map_err(|_| {
                ApiError::Internal(format!(
                    "secret record at {path:?} fails authentication under this root key: it was \
                     edited, holds a value that is not its own, or was moved from another path; \
                     refused"
                ))
            })?,
        None if keys.upgrade => {}
        None => {
            return Err(ApiError::Internal(format!(
                "secret record at {path:?} carries no MAC: it was written before records were \
                 authenticated, or its MAC was removed; refused (to upgrade a deployment's \
                 records once, see SPIKE_NEXUS_UPGRADE_SECRET_RECORDS in docs/decisions.md)"
            )));
        }
    }
    Ok(record)
}

/// Checks the record stored at `path` as every read does — it decodes and its MAC verifies
/// under `keys` — without opening any value: for `spike backup verify`.
pub fn check_stored(keys: &SecretKeys, path: &str, stored: &[u8]) -> Result<(), ApiError> {
    open_record(keys, path, stored).map(drop)
}

/// Encodes `record` for the store at `path`: one more write counted, and its MAC.
fn seal_record(keys: &SecretKeys, path: &str, record: &mut Record) -> Result<Vec<u8>, ApiError> {
    record.seq = record.seq.checked_add(1).ok_or_else(|| {
        ApiError::Internal(format!(
            "secret record at {path:?} has no write number left"
        ))
    })?;
    let (id, set) = keys.sealing(path)?;
    record.mac_key = id;
    record.mac = Some(set.records.sign(&authenticated(path, record)).to_vec());
    serde_json::to_vec(record)
        .map_err(|e| ApiError::Internal(format!("cannot encode secret record: {e}")))
}

/// [`read_modify_write`] of the record at `path`, in the path's turn.
async fn update<T>(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    path: &str,
    change: impl FnMut(Option<Record>) -> Result<(Option<Record>, T), ApiError>,
) -> Result<T, ApiError> {
    // Writers of one path inside this instance take turns, so they do not spend store round
    // trips losing compare-and-set races to each other. This is only a queue: other instances
    // still race, and the compare-and-set is what keeps every write honest.
    let _turn = writers.stripe(path).turn.lock().await;
    read_modify_write(store, keys, path, change).await
}

/// Reads the record at `path`, gives it to `change`, and writes the record `change` returns
/// with compare-and-set (nothing when it returns none), retrying from a fresh read when
/// another writer got in between. Callers hold the path's turn. A record that fails its check
/// ([`open_record`]) is refused before `change` sees it: a write never launders it.
pub(super) async fn read_modify_write<T>(
    store: &impl Store,
    keys: &SecretKeys,
    path: &str,
    mut change: impl FnMut(Option<Record>) -> Result<(Option<Record>, T), ApiError>,
) -> Result<T, ApiError> {
    for attempt in 0..MAX_ATTEMPTS {
        let (record, expect) = match load(store, keys, path).await? {
            Some((record, rev)) => (Some(record), Expect::Revision(rev)),
            None => (None, Expect::Absent),
        };
        let (record, out) = change(record)?;
        let Some(mut record) = record else {
            return Ok(out);
        };
        let bytes = seal_record(keys, path, &mut record)?;
        match store.put(Namespace::Secrets, path, bytes, expect).await? {
            Written::Done(_) => return Ok(out),
            Written::Conflict => {
                tracing::debug!(path, attempt, "secret write conflict; retrying");
                backoff(attempt).await;
            }
        }
    }
    Err(ApiError::Contended)
}

/// What a put asks for besides the path and the values.
#[derive(Clone, Copy, Debug, Default)]
pub struct PutOptions<'a> {
    /// Check-and-set: the version that must be current.
    pub cas: Option<u64>,
    /// Idempotency key: a put with an id already applied to the record returns that version.
    pub request_id: Option<&'a str>,
    /// Versions kept.
    pub max_versions: u32,
}

/// Writes a new version; returns its number. A put whose `request_id` the record remembers
/// writes nothing and returns the version the first one made (before `cas` is checked: the
/// first one passed it). Concurrent puts of one path are committed together ([`super::writers`]).
async fn put_at<S: Store + Clone>(
    store: &S,
    writers: &Writers,
    keys: &Arc<SecretKeys>,
    path: &str,
    values: &BTreeMap<String, String>,
    opts: PutOptions<'_>,
) -> Result<u64, ApiError> {
    let PutOptions {
        cas,
        request_id,
        max_versions,
    } = opts;
    validate_path(path)?;
    validate_values(values)?;
    if let Some(id) = request_id {
        validate_request_id(id)?;
    }
    let plaintext = Zeroizing::new(
        serde_json::to_vec(values)
            .map_err(|e| ApiError::Internal(format!("cannot encode values: {e}")))?,
    );
    let sealer = Arc::clone(keys);
    let owned_path = path.to_string();
    let request_id = request_id.map(str::to_string);
    let change: Change = Box::new(move |record: &mut Option<Record>| {
        if let Some(version) = request_id
            .as_deref()
            .and_then(|id| record.as_ref()?.applied(id))
        {
            return Ok(Applies::Replayed(version));
        }
        let current = record.as_ref().map_or(0, |r| r.current);
        if let Some(expected) = cas
            && expected != current
        {
            return Err(ApiError::CasMismatch { expected, current });
        }
        let version = record.as_ref().map_or(0, |r| r.last) + 1;
        // The only step that can fail once the checks pass, done before the record changes.
        let (key, set) = sealer.sealing(&owned_path)?;
        let sealed = set.values.seal(&aad(&owned_path, version), &plaintext)?;
        let now = wire::now_nanos();
        let record = record.get_or_insert_with(|| Record {
            created: now,
            ..Record::default()
        });
        record.versions.insert(
            version,
            Version {
                created: now,
                deleted: None,
                sealed,
                key,
            },
        );
        record.last = version;
        record.current = version;
        record.updated = now;
        record.max_versions = max_versions;
        while record.versions.len() > max_versions as usize {
            record.versions.pop_first();
        }
        record.oldest = lowest_live(record);
        if let Some(id) = &request_id {
            record.remember(id, version);
        }
        Ok(Applies::Wrote(version))
    });
    queue_put(store, writers, keys, path, change).await
}

fn lowest_live(record: &Record) -> u64 {
    record
        .versions
        .iter()
        .find(|(_, v)| v.deleted.is_none())
        .map(|(n, _)| *n)
        .unwrap_or(0)
}

fn highest_live(record: &Record) -> u64 {
    record
        .versions
        .iter()
        .rev()
        .find(|(_, v)| v.deleted.is_none())
        .map(|(n, _)| *n)
        .unwrap_or(0)
}

/// Opens a version (0 or `None`: the current one) of the record `entry` read from `path`.
fn open_version(
    keys: &SecretKeys,
    path: &str,
    entry: Option<&Entry>,
    version: Option<u64>,
) -> Result<(BTreeMap<String, String>, u64), ApiError> {
    let record = open_record(keys, path, &entry.ok_or(ApiError::NotFound)?.value)?;
    let wanted = match version {
        None | Some(0) => record.current,
        Some(v) => v,
    };
    let entry = record
        .versions
        .get(&wanted)
        .filter(|v| v.deleted.is_none())
        .ok_or(ApiError::NotFound)?;
    let plaintext = keys
        .set(entry.key, path)?
        .values
        .open(&aad(path, wanted), &entry.sealed).map_err(|_| {
        ApiError::Internal(format!(
            "secret {path:?} version {wanted} does not open under this root key (tampered or moved)"
        ))
    })?;
    let data = serde_json::from_slice(&plaintext).map_err(|e| {
        ApiError::Internal(format!(
            "secret {path:?} version {wanted} is malformed: {e}"
        ))
    })?;
    Ok((data, wanted))
}

/// Soft-deletes versions (empty or `0`: the current one).
async fn delete_at(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    path: &str,
    versions: &[u64],
) -> Result<(), ApiError> {
    validate_path(path)?;
    update(store, writers, keys, path, |record| {
        let mut record = record.ok_or(ApiError::NotFound)?;
        let now = wire::now_nanos();
        let targets: Vec<u64> = if versions.is_empty() {
            vec![record.current]
        } else {
            versions
                .iter()
                .map(|&v| if v == 0 { record.current } else { v })
                .collect()
        };
        for v in targets {
            if let Some(entry) = record.versions.get_mut(&v)
                && entry.deleted.is_none()
            {
                entry.deleted = Some(now);
            }
        }
        if record
            .versions
            .get(&record.current)
            .is_none_or(|v| v.deleted.is_some())
        {
            record.current = highest_live(&record);
        }
        record.oldest = lowest_live(&record);
        record.updated = now;
        Ok((Some(record), ()))
    })
    .await
}

/// Restores soft-deleted versions (empty: the current one, or the highest deleted one when no
/// version is current). `NotFound` when nothing was restored.
async fn undelete_at(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    path: &str,
    versions: &[u64],
) -> Result<(), ApiError> {
    validate_path(path)?;
    update(store, writers, keys, path, |record| {
        let mut record = record.ok_or(ApiError::NotFound)?;
        let targets: Vec<u64> = if versions.is_empty() || versions == [0] {
            if record.current != 0 {
                vec![record.current]
            } else {
                record
                    .versions
                    .iter()
                    .rev()
                    .find(|(_, v)| v.deleted.is_some())
                    .map(|(n, _)| vec![*n])
                    .unwrap_or_default()
            }
        } else {
            versions.to_vec()
        };
        let mut restored = false;
        for v in targets {
            if let Some(entry) = record.versions.get_mut(&v)
                && entry.deleted.is_some()
            {
                entry.deleted = None;
                restored = true;
                if v > record.current {
                    record.current = v;
                }
            }
        }
        if !restored {
            return Err(ApiError::NotFound);
        }
        record.oldest = lowest_live(&record);
        record.updated = wire::now_nanos();
        Ok((Some(record), ()))
    })
    .await
}

/// Version metadata. With `version`, only that version is listed.
async fn metadata_at(
    store: &impl Store,
    keys: &SecretKeys,
    path: &str,
    version: Option<u64>,
) -> Result<SecretMetadataResponse, ApiError> {
    validate_path(path)?;
    let (record, _) = load(store, keys, path).await?.ok_or(ApiError::NotFound)?;
    let versions = record
        .versions
        .iter()
        .filter(|(n, _)| version.is_none_or(|v| v == 0 || v == **n))
        .map(|(n, v)| {
            (
                n.to_string(),
                VersionInfo {
                    created_time: wire::rfc3339(v.created),
                    version: *n,
                    deleted_time: v.deleted.map(wire::rfc3339),
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    if versions.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(SecretMetadataResponse {
        versions,
        metadata: SecretMetadata {
            current_version: record.current,
            oldest_version: record.oldest,
            created_time: wire::rfc3339(record.created),
            updated_time: wire::rfc3339(record.updated),
            max_versions: record.max_versions,
        },
    })
}

/// The secret paths under `prefix` that `listing` lets the caller see, sorted. Only the store's
/// keys are read, not the records: a row a store administrator added is listed (and refused
/// when read), one removed is not.
pub async fn list(
    store: &impl Store,
    listing: &Listing<'_>,
    prefix: &str,
) -> Result<Vec<String>, ApiError> {
    let mut paths = store.list(Namespace::Secrets, prefix).await?;
    paths.retain(|path| listing.keep(path));
    Ok(paths)
}

/// Writes a new version of the granted path ([`put_at`]).
pub async fn put<S: Store + Clone>(
    store: &S,
    writers: &Writers,
    keys: &Arc<SecretKeys>,
    grant: &Grant,
    values: &BTreeMap<String, String>,
    opts: PutOptions<'_>,
) -> Result<u64, ApiError> {
    let path = grant.resource(Permission::Write)?;
    put_at(store, writers, keys, path, values, opts).await
}

/// Reads a version of the granted path: the record is read only now that the caller may.
pub async fn read(
    store: &impl Store,
    keys: &SecretKeys,
    grant: &Grant,
    version: Option<u64>,
) -> Result<(BTreeMap<String, String>, u64), ApiError> {
    let path = grant.resource(Permission::Read)?;
    validate_path(path)?;
    let entry = store.get(Namespace::Secrets, path).await?;
    open_version(keys, path, entry.as_ref(), version)
}

/// Soft-deletes versions of the granted path ([`delete_at`]).
pub async fn delete(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    grant: &Grant,
    versions: &[u64],
) -> Result<(), ApiError> {
    let path = grant.resource(Permission::Write)?;
    delete_at(store, writers, keys, path, versions).await
}

/// Restores soft-deleted versions of the granted path ([`undelete_at`]).
pub async fn undelete(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    grant: &Grant,
    versions: &[u64],
) -> Result<(), ApiError> {
    let path = grant.resource(Permission::Write)?;
    undelete_at(store, writers, keys, path, versions).await
}

/// The metadata of the granted path ([`metadata_at`]).
pub async fn metadata(
    store: &impl Store,
    keys: &SecretKeys,
    grant: &Grant,
    version: Option<u64>,
) -> Result<SecretMetadataResponse, ApiError> {
    metadata_at(store, keys, grant.resource(Permission::Read)?, version).await
}

/// A secret brought whole from another store ([`import`], `spike migrate from-spike`): every
/// version with its times and deleted marker, and which version is current. No `Debug`: it
/// holds values.
pub struct Import {
    /// The versions, by number; at least one.
    pub versions: BTreeMap<u64, ImportVersion>,
    /// The version `get` returns by default: 0, or a version that is not deleted.
    pub current: u64,
    /// First write (Unix nanoseconds).
    pub created: i64,
    /// Last write (Unix nanoseconds).
    pub updated: i64,
}

/// One version of an [`Import`].
pub struct ImportVersion {
    /// When it was written (Unix nanoseconds).
    pub created: i64,
    /// When it was soft-deleted, if it was.
    pub deleted: Option<i64>,
    /// Its values; wiped on drop.
    pub values: BTreeMap<String, String>,
}

impl Drop for ImportVersion {
    fn drop(&mut self) {
        for value in self.values.values_mut() {
            zeroize::Zeroize::zeroize(value);
        }
    }
}

/// What [`import`] or [`compare_import`] found at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Imported {
    /// The path was empty and now holds the secret.
    Written,
    /// The path already holds the same secret (same versions, values, deleted markers and
    /// current version): nothing to write.
    Same,
    /// The path holds another secret; the reason names versions, never values.
    Different(String),
}

/// Checks an [`Import`] against the rules every put obeys (path, key names) and its own
/// consistency; the reason names the version, never a value.
pub fn validate_import(path: &str, secret: &Import) -> Result<(), String> {
    rules::validate_path(path)?;
    if secret.versions.is_empty() {
        return Err("no version".into());
    }
    if secret.versions.contains_key(&0) {
        return Err("a version numbered 0".into());
    }
    for (n, v) in &secret.versions {
        rules::validate_values(&v.values).map_err(|e| format!("version {n}: {e}"))?;
    }
    if secret.current != 0
        && secret
            .versions
            .get(&secret.current)
            .is_none_or(|v| v.deleted.is_some())
    {
        return Err(format!(
            "its current version {} is missing or deleted",
            secret.current
        ));
    }
    Ok(())
}

/// Compares the record at `path` with `secret` ([`Imported::Same`] or
/// [`Imported::Different`]), opening each version of the record.
fn compare(
    keys: &SecretKeys,
    path: &str,
    record: &Record,
    secret: &Import,
) -> Result<Imported, ApiError> {
    fn numbers<'a>(it: impl Iterator<Item = &'a u64>) -> String {
        it.map(u64::to_string).collect::<Vec<_>>().join(",")
    }
    if !record.versions.keys().eq(secret.versions.keys()) {
        return Ok(Imported::Different(format!(
            "versions {} here, {} in the source",
            numbers(record.versions.keys()),
            numbers(secret.versions.keys())
        )));
    }
    for ((n, ours), theirs) in record.versions.iter().zip(secret.versions.values()) {
        if ours.deleted.is_some() != theirs.deleted.is_some() {
            return Ok(Imported::Different(format!(
                "version {n} is deleted on one side only"
            )));
        }
        let plaintext = keys.set(ours.key, path)?.values.open(&aad(path, *n), &ours.sealed).map_err(|_| {
            ApiError::Internal(format!(
                "secret {path:?} version {n} does not open under this root key (tampered or moved)"
            ))
        })?;
        let values: BTreeMap<String, String> = serde_json::from_slice(&plaintext).map_err(|e| {
            ApiError::Internal(format!("secret {path:?} version {n} is malformed: {e}"))
        })?;
        if values != theirs.values {
            return Ok(Imported::Different(format!(
                "version {n} holds other values"
            )));
        }
    }
    if record.current != secret.current {
        return Ok(Imported::Different(format!(
            "current version {} here, {} in the source",
            record.current, secret.current
        )));
    }
    Ok(Imported::Same)
}

/// What the record at `path` holds compared with `secret`: `None` when there is no record.
/// Reads only.
pub async fn compare_import(
    store: &impl Store,
    keys: &SecretKeys,
    path: &str,
    secret: &Import,
) -> Result<Option<Imported>, ApiError> {
    validate_path(path)?;
    match load(store, keys, path).await? {
        None => Ok(None),
        Some((record, _)) => compare(keys, path, &record, secret).map(Some),
    }
}

/// Writes `secret` at `path` as one record — each version sealed as a put seals it, times,
/// deleted markers and version numbers as given, `max_versions` as a put would set it — if
/// the path holds nothing (create-if-absent, in the path's turn like any write); otherwise
/// compares ([`Imported::Same`] or [`Imported::Different`]) and writes nothing. A record with
/// more versions than `max_versions` keeps them until its next put prunes it.
pub async fn import(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    path: &str,
    secret: &Import,
    max_versions: u32,
) -> Result<Imported, ApiError> {
    validate_import(path, secret).map_err(ApiError::BadRequest)?;
    update(store, writers, keys, path, |record| {
        if let Some(record) = record {
            return Ok((None, compare(keys, path, &record, secret)?));
        }
        let mut versions = BTreeMap::new();
        for (n, v) in &secret.versions {
            let plaintext = Zeroizing::new(
                serde_json::to_vec(&v.values)
                    .map_err(|e| ApiError::Internal(format!("cannot encode values: {e}")))?,
            );
            versions.insert(
                *n,
                Version {
                    created: v.created,
                    deleted: v.deleted,
                    sealed: keys
                        .sealing(path)?
                        .1
                        .values
                        .seal(&aad(path, *n), &plaintext)?,
                    key: keys.current,
                },
            );
        }
        let mut record = Record {
            current: secret.current,
            oldest: 0,
            last: versions.keys().next_back().copied().unwrap_or(0),
            created: secret.created,
            updated: secret.updated,
            max_versions,
            versions,
            requests: Vec::new(),
            seq: 0,
            mac_key: 0,
            mac: None,
        };
        record.oldest = lowest_live(&record);
        Ok((Some(record), Imported::Written))
    })
    .await
}

/// Whether the record stored at `path` names data key `id` — a version sealed under it, or its
/// MAC made with it. A record that does not decode counts as naming it (nothing is retired on
/// a guess).
pub fn names_key(stored: &[u8], id: u32) -> bool {
    serde_json::from_slice::<Record>(stored).map_or(true, |r| {
        r.mac_key == id || r.versions.values().any(|v| v.key == id)
    })
}

/// What [`reencrypt`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reencrypted {
    /// Records rewritten under the current data key.
    pub rewritten: usize,
    /// Records already wholly under it.
    pub current: usize,
    /// Records that could not be rewritten (named in an error line each); a later pass
    /// retries them.
    pub failed: usize,
}

/// Rewrites every secret record that names a data key other than `keys`' current one: each
/// such version opened and sealed again under the current key, the record authenticated with
/// it — one compare-and-set per record, in the path's turn like any write, so concurrent
/// writes are neither lost nor blocked for long. Idempotent: a second pass, or one resumed
/// after a stop, finds only what is still left. Logs its progress every 100 records.
pub async fn reencrypt(
    store: &impl Store,
    writers: &Writers,
    keys: &SecretKeys,
    metrics: &crate::platform::metrics::NexusMetrics,
) -> Reencrypted {
    use crate::platform::metrics::Reencryption;
    let mut done = Reencrypted::default();
    let paths = match store.list(Namespace::Secrets, "").await {
        Ok(paths) => paths,
        Err(e) => {
            tracing::error!(error = %e, "re-encryption: cannot list secret records");
            done.failed += 1;
            return done;
        }
    };
    let total = paths.len();
    let current = keys.current;
    for (i, path) in paths.iter().enumerate() {
        let outcome = update(store, writers, keys, path, |record| {
            let Some(mut record) = record else {
                return Ok((None, false));
            };
            if record.mac_key == current && record.versions.values().all(|v| v.key == current) {
                return Ok((None, false));
            }
            let (_, sealer) = keys.sealing(path)?;
            for (n, version) in record.versions.iter_mut() {
                if version.key == current {
                    continue;
                }
                let plain = keys
                    .set(version.key, path)?
                    .values
                    .open(&aad(path, *n), &version.sealed)
                    .map_err(|_| {
                        ApiError::Internal(format!(
                            "secret {path:?} version {n} does not open under data key {}",
                            version.key
                        ))
                    })?;
                version.sealed = sealer.values.seal(&aad(path, *n), &plain)?;
                version.key = current;
            }
            Ok((Some(record), true))
        })
        .await;
        match outcome {
            Ok(true) => {
                done.rewritten += 1;
                metrics.reencrypted(Reencryption::Rewritten);
            }
            Ok(false) => {
                done.current += 1;
                metrics.reencrypted(Reencryption::Current);
            }
            Err(e) => {
                tracing::error!(path = ?path, error = %e, "re-encryption: record not rewritten");
                done.failed += 1;
                metrics.reencrypted(Reencryption::Failed);
            }
        }
        if (i + 1) % 100 == 0 {
            tracing::info!(
                done = i + 1,
                total,
                rewritten = done.rewritten,
                failed = done.failed,
                data_key = current,
                "re-encryption in progress"
            );
        }
    }
    done
}

/// What [`upgrade`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upgraded {
    /// Records that had no MAC and now have one.
    pub authenticated: usize,
    /// Records that already had a valid MAC.
    pub already: usize,
    /// Records refused: a MAC that does not verify, malformed, or no MAC while not upgrading.
    pub refused: usize,
    /// Records that could not be read or written (store unavailable, contention).
    pub failed: usize,
}

/// Gives every record without a MAC its MAC, under the path's turn and by compare-and-set like
/// any write; run once at start when [`SecretKeys::upgrading`]. A record whose MAC does not
/// verify is left as it is and counted, with an error line naming it: upgrading accepts a
/// missing MAC, never a wrong one.
pub async fn upgrade(store: &impl Store, writers: &Writers, keys: &SecretKeys) -> Upgraded {
    let mut found = Upgraded::default();
    let paths = match store.list(Namespace::Secrets, "").await {
        Ok(paths) => paths,
        Err(e) => {
            tracing::error!(error = %e, "cannot list secret records to upgrade them");
            found.failed += 1;
            return found;
        }
    };
    for path in paths {
        let outcome = update(store, writers, keys, &path, |record| {
            Ok(match record {
                Some(record) if record.mac.is_none() => (Some(record), Some(true)),
                Some(_) => (None, Some(false)),
                None => (None, None),
            })
        })
        .await;
        match outcome {
            Ok(Some(true)) => found.authenticated += 1,
            Ok(Some(false)) => found.already += 1,
            Ok(None) => {}
            Err(e @ ApiError::Internal(_)) => {
                tracing::error!(error = %e, "secret record not upgraded");
                found.refused += 1;
            }
            Err(e) => {
                tracing::error!(path = ?path, error = %e, "secret record not upgraded");
                found.failed += 1;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn key() -> Arc<SecretKeys> {
        Arc::new(SecretKeys::derive(&RootKey::generate().unwrap(), false))
    }

    /// A read as Nexus serves it to a superuser: the record, then the version opened.
    async fn get(
        store: &impl Store,
        key: &SecretKeys,
        path: &str,
        version: Option<u64>,
    ) -> Result<(BTreeMap<String, String>, u64), ApiError> {
        validate_path(path)?;
        let entry = store.get(Namespace::Secrets, path).await?;
        open_version(key, path, entry.as_ref(), version)
    }

    fn vals(v: &str) -> BTreeMap<String, String> {
        [("k".to_string(), v.to_string())].into()
    }

    fn opts(cas: Option<u64>, max_versions: u32) -> PutOptions<'static> {
        PutOptions {
            cas,
            request_id: None,
            max_versions,
        }
    }

    fn with_id(id: &str) -> PutOptions<'_> {
        PutOptions {
            cas: None,
            request_id: Some(id),
            max_versions: 10,
        }
    }

    /// Records name the data keys that sealed them: a record of an earlier release (legacy
    /// key, no ids) reads under a keyring; a put after a rotation seals its version and the
    /// record's MAC under the new key and keeps every older version as it was; changing any id
    /// in the store — to another key, or back to the legacy layout — is refused.
    #[tokio::test]
    async fn versions_and_records_name_their_data_key() {
        use crate::crypto::DataKey;
        let root = RootKey::generate().unwrap();
        let (d1, d2) = (DataKey::generate().unwrap(), DataKey::generate().unwrap());
        let sets = |ids: &[u32]| -> BTreeMap<u32, Arc<KeySet>> {
            ids.iter()
                .map(|id| {
                    let set = match id {
                        0 => KeySet::legacy(&root),
                        1 => KeySet::of(&d1),
                        _ => KeySet::of(&d2),
                    };
                    (*id, Arc::new(set))
                })
                .collect()
        };
        let legacy = Arc::new(SecretKeys::derive(&root, false));
        let ring1 = Arc::new(SecretKeys::new(sets(&[0, 1]), 1, false));
        let ring2 = Arc::new(SecretKeys::new(sets(&[0, 1, 2]), 2, false));
        let (s, w) = (MemoryStore::default(), Writers::default());
        put_at(&s, &w, &legacy, "p", &vals("v1"), opts(None, 10))
            .await
            .unwrap();
        let stored = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        let text = String::from_utf8(stored.value.clone()).unwrap();
        assert!(
            !text.contains("\"key\"") && !text.contains("mac_key"),
            "{text}"
        );
        assert_eq!(get(&s, &ring2, "p", None).await.unwrap().0, vals("v1"));
        put_at(&s, &w, &ring1, "p", &vals("v2"), opts(None, 10))
            .await
            .unwrap();
        put_at(&s, &w, &ring2, "p", &vals("v3"), opts(None, 10))
            .await
            .unwrap();
        let stored = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        let record: Record = serde_json::from_slice(&stored.value).unwrap();
        let ids: Vec<u32> = record.versions.values().map(|v| v.key).collect();
        assert_eq!((ids, record.mac_key), (vec![0, 1, 2], 2));
        for (n, want) in [(1, "v1"), (2, "v2"), (3, "v3")] {
            assert_eq!(get(&s, &ring2, "p", Some(n)).await.unwrap().0, vals(want));
        }
        // A keyring without key 2 (an instance that has not seen the rotation yet would have
        // read the keyring again first) refuses the record rather than guessing.
        assert!(get(&s, &ring1, "p", Some(1)).await.is_err());
        // Any id changed in the store is refused.
        let edit = |f: &dyn Fn(&mut Record)| {
            let mut r = record.clone();
            f(&mut r);
            serde_json::to_vec(&r).unwrap()
        };
        for edited in [
            edit(&|r| r.mac_key = 1),
            edit(&|r| r.mac_key = 0),
            edit(&|r| r.versions.get_mut(&2).unwrap().key = 2),
            edit(&|r| {
                r.mac_key = 0;
                r.versions.values_mut().for_each(|v| v.key = 0);
            }),
        ] {
            assert!(open_record(&ring2, "p", &edited).is_err());
        }
        assert!(open_record(&ring2, "p", &stored.value).is_ok());
    }

    #[tokio::test]
    async fn a_replayed_request_id_returns_the_first_version_and_writes_nothing() {
        let s = MemoryStore::default();
        let k = key();
        let w = Writers::default();
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("a"), with_id("r1"))
                .await
                .unwrap(),
            1
        );
        let before = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        // The replay carries the same values; even different ones would not be written.
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("a"), with_id("r1"))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("zz"), with_id("r1"))
                .await
                .unwrap(),
            1
        );
        let after = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        assert_eq!(before.revision, after.revision, "a replay wrote the record");
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("a"), 1));
        // Another id, or no id, is a new write.
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("b"), with_id("r2"))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("c"), opts(None, 10))
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("b"), with_id("r2"))
                .await
                .unwrap(),
            2
        );
        // A replay is answered before check-and-set: the first attempt passed it.
        let cas = PutOptions {
            cas: Some(3),
            request_id: Some("r3"),
            max_versions: 10,
        };
        assert_eq!(put_at(&s, &w, &k, "p", &vals("d"), cas).await.unwrap(), 4);
        assert_eq!(put_at(&s, &w, &k, "p", &vals("d"), cas).await.unwrap(), 4);
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("d"), 4));
    }

    #[test]
    fn a_record_remembers_the_last_sixteen_request_ids() {
        let mut r = Record::default();
        for v in 1..=20u64 {
            r.remember(&format!("id{v}"), v);
        }
        assert_eq!(r.requests.len(), REMEMBERED_REQUESTS);
        assert_eq!(r.applied("id4"), None);
        assert_eq!(r.applied("id5"), Some(5));
        assert_eq!(r.applied("id20"), Some(20));
        // Old records without the field still load, and records without ids do not grow it.
        let old: Record = serde_json::from_str(
            r#"{"current":1,"oldest":1,"last":1,"created":0,"updated":0,"max_versions":10,"versions":{}}"#,
        )
        .unwrap();
        assert!(old.requests.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("requests"));
    }

    #[tokio::test]
    async fn request_ids_are_checked() {
        let s = MemoryStore::default();
        let k = key();
        let w = Writers::default();
        for bad in ["", "a b", "é", &"a".repeat(65)] {
            assert!(
                matches!(
                    put_at(&s, &w, &k, "p", &vals("a"), with_id(bad)).await,
                    Err(ApiError::BadRequest(_))
                ),
                "{bad:?}"
            );
        }
        let hex = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("a"), with_id(hex))
                .await
                .unwrap(),
            1
        );
    }

    #[tokio::test]
    async fn concurrent_replays_of_one_request_make_one_version() {
        let s = std::sync::Arc::new(MemoryStore::default());
        let k = key();
        let w = Writers::default();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (s, k, w) = (s.clone(), k.clone(), w.clone());
            tasks.spawn(async move {
                put_at(&*s, &w, &k, "p", &vals("x"), with_id("same"))
                    .await
                    .unwrap()
            });
        }
        while let Some(v) = tasks.join_next().await {
            assert_eq!(v.unwrap(), 1);
        }
        let m = metadata_at(&*s, &k, "p", None).await.unwrap();
        assert_eq!(m.versions.len(), 1);
    }

    #[test]
    fn paths() {
        for ok in ["a", "secrets/db/creds", "a.b/c-d_e", "x/(y)|z"] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "..",
            "./a",
            "a b",
            "a\0b",
            "spike/system/acl",
            "spike/system/x/y",
            "é",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_path(&"a".repeat(500)).is_ok());
        assert!(validate_path(&"a".repeat(501)).is_err());
    }

    #[tokio::test]
    async fn versions_delete_undelete_prune() {
        let s = MemoryStore::default();
        let k = key();
        let w = Writers::default();
        for i in 1..=3 {
            assert_eq!(
                put_at(&s, &w, &k, "p", &vals(&i.to_string()), opts(None, 10))
                    .await
                    .unwrap(),
                i
            );
        }
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("3"), 3));
        assert_eq!(get(&s, &k, "p", Some(1)).await.unwrap(), (vals("1"), 1));
        delete_at(&s, &w, &k, "p", &[]).await.unwrap();
        assert_eq!(get(&s, &k, "p", None).await.unwrap().1, 2);
        assert!(matches!(
            get(&s, &k, "p", Some(3)).await,
            Err(ApiError::NotFound)
        ));
        delete_at(&s, &w, &k, "p", &[1, 2]).await.unwrap();
        assert!(matches!(
            get(&s, &k, "p", None).await,
            Err(ApiError::NotFound)
        ));
        let m = metadata_at(&s, &k, "p", None).await.unwrap();
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (0, 0)
        );
        undelete_at(&s, &w, &k, "p", &[]).await.unwrap();
        assert_eq!(get(&s, &k, "p", None).await.unwrap().1, 3);
        undelete_at(&s, &w, &k, "p", &[1]).await.unwrap();
        let m = metadata_at(&s, &k, "p", None).await.unwrap();
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (3, 1)
        );
        assert!(m.versions["2"].deleted_time.is_some());
        assert!(matches!(
            undelete_at(&s, &w, &k, "p", &[3]).await,
            Err(ApiError::NotFound)
        ));
        // Pruning keeps the newest max_versions and never reuses numbers.
        for _ in 0..5 {
            put_at(&s, &w, &k, "p", &vals("x"), opts(None, 2))
                .await
                .unwrap();
        }
        let m = metadata_at(&s, &k, "p", None).await.unwrap();
        assert_eq!(
            m.versions.keys().cloned().collect::<Vec<_>>(),
            vec!["7", "8"]
        );
        assert_eq!(m.metadata.oldest_version, 7);
        assert!(matches!(
            get(&s, &k, "p", Some(1)).await,
            Err(ApiError::NotFound)
        ));
    }

    #[tokio::test]
    async fn check_and_set() {
        let s = MemoryStore::default();
        let k = key();
        let w = Writers::default();
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("a"), opts(Some(0), 10))
                .await
                .unwrap(),
            1
        );
        assert!(matches!(
            put_at(&s, &w, &k, "p", &vals("b"), opts(Some(0), 10)).await,
            Err(ApiError::CasMismatch {
                expected: 0,
                current: 1
            })
        ));
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("b"), opts(Some(1), 10))
                .await
                .unwrap(),
            2
        );
        assert_eq!(get(&s, &k, "p", None).await.unwrap().0, vals("b"));
    }

    /// The stored record at `path` as JSON, and its revision.
    async fn stored(s: &MemoryStore, path: &str) -> (serde_json::Value, crate::store::Revision) {
        let e = s.get(Namespace::Secrets, path).await.unwrap().unwrap();
        (serde_json::from_slice(&e.value).unwrap(), e.revision)
    }

    /// Edits the record at `path` in the store as a store administrator would: its JSON, with
    /// no key.
    async fn tamper(s: &MemoryStore, path: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        let (mut v, rev) = stored(s, path).await;
        edit(&mut v);
        let bytes = serde_json::to_vec(&v).unwrap();
        let w = s.put(Namespace::Secrets, path, bytes, Expect::Revision(rev));
        assert!(matches!(w.await.unwrap(), Written::Done(_)));
    }

    /// The refusal of a record whose MAC does not verify.
    #[track_caller]
    fn forged<T: std::fmt::Debug>(out: Result<T, ApiError>) {
        match out {
            Err(ApiError::Internal(m)) if m.contains("fails authentication") => {}
            other => panic!("expected the record to fail authentication, got {other:?}"),
        }
    }

    /// Three versions at "p", the first put with a request id, the third deleted, so version 2
    /// is current.
    async fn three_versions(s: &MemoryStore, w: &Writers, k: &Arc<SecretKeys>) {
        for i in 1..=3 {
            let opts = if i == 1 {
                with_id("req-1")
            } else {
                opts(None, 10)
            };
            put_at(s, w, k, "p", &vals(&format!("v{i}")), opts)
                .await
                .unwrap();
        }
        delete_at(s, w, k, "p", &[3]).await.unwrap();
        assert_eq!(get(s, k, "p", None).await.unwrap(), (vals("v2"), 2));
    }

    /// Every reader and writer of `path` refuses the record, and no write changes it.
    async fn refused_everywhere(s: &MemoryStore, w: &Writers, k: &Arc<SecretKeys>, path: &str) {
        let before = s.get(Namespace::Secrets, path).await.unwrap().unwrap();
        for v in [None, Some(1), Some(2), Some(3)] {
            forged(get(s, k, path, v).await);
        }
        forged(metadata_at(s, k, path, None).await);
        forged(put_at(s, w, k, path, &vals("new"), opts(None, 10)).await);
        forged(delete_at(s, w, k, path, &[1]).await);
        forged(undelete_at(s, w, k, path, &[3]).await);
        let after = s.get(Namespace::Secrets, path).await.unwrap().unwrap();
        assert_eq!(
            before.value, after.value,
            "a write repaired a tampered record"
        );
        assert_eq!(before.revision, after.revision);
    }

    #[tokio::test]
    async fn a_deleted_version_brought_back_by_editing_its_marker_is_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        tamper(&s, "p", |r| {
            r["versions"]["3"]["deleted"] = serde_json::Value::Null
        })
        .await;
        refused_everywhere(&s, &w, &k, "p").await;
        // And with the current-version pointer moved to it as well.
        tamper(&s, "p", |r| r["current"] = 3.into()).await;
        refused_everywhere(&s, &w, &k, "p").await;
    }

    #[tokio::test]
    async fn a_changed_current_version_is_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        tamper(&s, "p", |r| r["current"] = 1.into()).await;
        refused_everywhere(&s, &w, &k, "p").await;
    }

    #[tokio::test]
    async fn a_dropped_version_is_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        // Version 1 is not the one read by default: the record as a whole is refused anyway.
        tamper(&s, "p", |r| {
            r["versions"].as_object_mut().unwrap().remove("1");
        })
        .await;
        refused_everywhere(&s, &w, &k, "p").await;
    }

    #[tokio::test]
    async fn swapped_sealed_values_are_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        tamper(&s, "p", |r| {
            let one = r["versions"]["1"]["sealed"].take();
            let two = std::mem::replace(&mut r["versions"]["2"]["sealed"], one);
            r["versions"]["1"]["sealed"] = two;
        })
        .await;
        refused_everywhere(&s, &w, &k, "p").await;
    }

    /// The sealed value of a version number this path had before its record was removed and
    /// written again opens under its associated data (same path, same number): only the record
    /// MAC, which binds each version's sealed bytes, tells it from the value written since.
    #[tokio::test]
    async fn an_earlier_value_of_the_same_version_number_is_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        put_at(&s, &w, &k, "p", &vals("old"), opts(None, 10))
            .await
            .unwrap();
        let (old, rev) = stored(&s, "p").await;
        assert!(s.delete(Namespace::Secrets, "p", &rev).await.unwrap());
        put_at(&s, &w, &k, "p", &vals("new"), opts(None, 10))
            .await
            .unwrap();
        tamper(&s, "p", |r| {
            r["versions"]["1"]["sealed"] = old["versions"]["1"]["sealed"].clone()
        })
        .await;
        forged(get(&s, &k, "p", Some(1)).await);
    }

    #[tokio::test]
    async fn a_record_moved_to_another_path_is_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        put_at(&s, &w, &k, "a", &vals("secret-a"), opts(None, 10))
            .await
            .unwrap();
        put_at(&s, &w, &k, "b", &vals("secret-b"), opts(None, 10))
            .await
            .unwrap();
        let (a, _) = stored(&s, "a").await;
        tamper(&s, "b", |r| *r = a).await;
        forged(get(&s, &k, "b", None).await);
        forged(metadata_at(&s, &k, "b", None).await);
        forged(put_at(&s, &w, &k, "b", &vals("x"), opts(None, 10)).await);
    }

    /// The class: every value in the stored record, at any depth, and every version number,
    /// once changed, makes the record fail to open. The walk reads the stored JSON, so a
    /// field added to the record later is covered without naming it here.
    #[tokio::test]
    async fn every_stored_field_is_authenticated() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        let (original, _) = stored(&s, "p").await;
        fn leaves(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            match v {
                serde_json::Value::Object(m) => m.iter().for_each(|(key, v)| {
                    at.push(key.clone());
                    leaves(v, at, out);
                    at.pop();
                }),
                serde_json::Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| {
                    at.push(i.to_string());
                    leaves(v, at, out);
                    at.pop();
                }),
                _ => out.push(at.clone()),
            }
        }
        let mut all = Vec::new();
        leaves(&original, &mut Vec::new(), &mut all);
        let pointer = |at: &[String]| format!("/{}", at.join("/"));
        for field in [
            "deleted",
            "sealed",
            "id",
            "seq",
            "mac",
            "max_versions",
            "requests",
        ] {
            assert!(
                all.iter().any(|at| at.iter().any(|p| p == field)),
                "the walk never reached {field}: {original}"
            );
        }
        for at in &all {
            tamper(&s, "p", |r| {
                *r = original.clone();
                let leaf = r.pointer_mut(&pointer(at)).unwrap();
                *leaf = match leaf.take() {
                    serde_json::Value::Number(n) => (n.as_i64().unwrap() + 1).into(),
                    serde_json::Value::Null => 1_000_000.into(),
                    serde_json::Value::String(text) => {
                        use base64::Engine;
                        let b64 = base64::engine::general_purpose::STANDARD;
                        match b64.decode(&text) {
                            Ok(mut bytes) if at.last().is_some_and(|l| l != "id") => {
                                bytes[0] ^= 1;
                                b64.encode(bytes).into()
                            }
                            _ => format!("{text}x").into(),
                        }
                    }
                    other => panic!("unexpected leaf {other} at {at:?}"),
                };
            })
            .await;
            forged(get(&s, &k, "p", Some(1)).await);
        }
        // Version numbers are keys, not leaves: renumber one, out of order and in order.
        for (from, to) in [("1", "4"), ("3", "5")] {
            tamper(&s, "p", |r| {
                *r = original.clone();
                let versions = r["versions"].as_object_mut().unwrap();
                let moved = versions.remove(from).unwrap();
                versions.insert(to.into(), moved);
            })
            .await;
            forged(get(&s, &k, "p", Some(2)).await);
        }
        // The untouched record still opens: the refusals above were the edits'.
        tamper(&s, "p", |r| *r = original.clone()).await;
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("v2"), 2));
    }

    #[tokio::test]
    async fn a_malformed_record_is_refused_without_quoting_it() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        tamper(&s, "p", |r| r["current"] = "STORE-TEXT".into()).await;
        match get(&s, &k, "p", None).await {
            Err(ApiError::Internal(m)) => {
                assert!(m.contains("malformed") && m.contains("\"p\""), "{m}");
                assert!(!m.contains("STORE-TEXT"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_edited_request_id_answer_is_refused() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        put_at(&s, &w, &k, "p", &vals("a"), with_id("r1"))
            .await
            .unwrap();
        put_at(&s, &w, &k, "p", &vals("b"), opts(None, 10))
            .await
            .unwrap();
        // Edited so that a replay of r1 would be answered with version 2, or forgotten so
        // that it would be written again.
        tamper(&s, "p", |r| r["requests"][0]["version"] = 2.into()).await;
        forged(put_at(&s, &w, &k, "p", &vals("a"), with_id("r1")).await);
        tamper(&s, "p", |r| {
            r["requests"][0]["version"] = 1.into();
            r.as_object_mut().unwrap().remove("requests");
        })
        .await;
        forged(put_at(&s, &w, &k, "p", &vals("a"), with_id("r1")).await);
    }

    /// A record without MAC — as written before records were authenticated, or with its MAC
    /// removed to pass edits off as such a record — is refused unless the deployment is being
    /// upgraded; upgrading authenticates it, and afterwards removing the MAC is refused again.
    #[tokio::test]
    async fn a_record_without_mac_is_refused_unless_upgrading() {
        let root = RootKey::generate().unwrap();
        let k = Arc::new(SecretKeys::derive(&root, false));
        let up = Arc::new(SecretKeys::derive(&root, true));
        let (s, w) = (MemoryStore::default(), Writers::default());
        three_versions(&s, &w, &k).await;
        put_at(&s, &w, &k, "other", &vals("o"), opts(None, 10))
            .await
            .unwrap();
        // As an earlier release wrote it: no MAC, no write counter.
        let strip = |r: &mut serde_json::Value| {
            let r = r.as_object_mut().unwrap();
            r.remove("mac");
            r.remove("seq");
        };
        tamper(&s, "p", strip).await;
        let before = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        let no_mac = |out: Result<_, ApiError>| {
            assert!(
                matches!(&out, Err(ApiError::Internal(m)) if m.contains("carries no MAC")),
                "{out:?}"
            )
        };
        no_mac(get(&s, &k, "p", None).await.map(|_| ()));
        no_mac(metadata_at(&s, &k, "p", None).await.map(|_| ()));
        no_mac(
            put_at(&s, &w, &k, "p", &vals("x"), opts(None, 10))
                .await
                .map(|_| ()),
        );
        no_mac(delete_at(&s, &w, &k, "p", &[1]).await);
        assert_eq!(
            s.get(Namespace::Secrets, "p").await.unwrap().unwrap().value,
            before.value
        );
        // While upgrading it is read as stored.
        assert_eq!(get(&s, &up, "p", None).await.unwrap(), (vals("v2"), 2));
        // An edited record with its MAC left in place is refused even while upgrading.
        tamper(&s, "other", |r| r["current"] = 0.into()).await;
        let found = upgrade(&s, &w, &up).await;
        assert_eq!(
            found,
            Upgraded {
                authenticated: 1,
                already: 0,
                refused: 1,
                failed: 0
            }
        );
        // Authenticated now: it opens without upgrading, unchanged...
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("v2"), 2));
        assert_eq!(get(&s, &k, "p", Some(1)).await.unwrap(), (vals("v1"), 1));
        assert!(matches!(
            get(&s, &k, "p", Some(3)).await,
            Err(ApiError::NotFound)
        ));
        // ...a second pass finds nothing to do...
        let again = upgrade(&s, &w, &up).await;
        assert_eq!((again.authenticated, again.already), (0, 1));
        // ...and removing its MAC again is refused.
        tamper(&s, "p", strip).await;
        no_mac(get(&s, &k, "p", None).await.map(|_| ()));
        forged(get(&s, &k, "other", None).await);
    }

    /// Each write adds one to the record's counter. Nothing outside the store remembers it, so
    /// an older copy of the record, put back whole, still opens: what SECURITY.md states as a
    /// per-record rollback, indistinguishable from restoring that record from a backup.
    #[tokio::test]
    async fn each_write_counts_and_an_older_copy_is_a_rollback() {
        let (s, k, w) = (MemoryStore::default(), key(), Writers::default());
        three_versions(&s, &w, &k).await;
        let (copy, _) = stored(&s, "p").await;
        assert_eq!(copy["seq"], 4, "three puts and a delete");
        undelete_at(&s, &w, &k, "p", &[3]).await.unwrap();
        assert_eq!(stored(&s, "p").await.0["seq"], 5);
        tamper(&s, "p", |r| *r = copy).await;
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("v2"), 2));
    }

    #[tokio::test]
    async fn a_tampered_record_refuses_a_batch_of_concurrent_puts() {
        let s = MemoryStore::default();
        let (k, w) = (key(), Writers::default());
        three_versions(&s, &w, &k).await;
        tamper(&s, "p", |r| r["max_versions"] = 1.into()).await;
        let before = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16 {
            let (s, k, w) = (s.clone(), k.clone(), w.clone());
            tasks.spawn(async move {
                put_at(&s, &w, &k, "p", &vals(&i.to_string()), opts(None, 10)).await
            });
        }
        while let Some(out) = tasks.join_next().await {
            forged(out.unwrap());
        }
        let after = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        assert_eq!(before.value, after.value);
    }

    /// A store that counts the writes that reach it.
    #[derive(Clone, Default)]
    struct Counting {
        inner: MemoryStore,
        puts: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Store for Counting {
        fn backend(&self) -> &'static str {
            "counting"
        }
        async fn ping(&self) -> crate::store::Result<()> {
            self.inner.ping().await
        }
        async fn get(
            &self,
            ns: Namespace,
            key: &str,
        ) -> crate::store::Result<Option<crate::store::Entry>> {
            self.inner.get(ns, key).await
        }
        async fn put(
            &self,
            ns: Namespace,
            key: &str,
            value: Vec<u8>,
            expect: Expect,
        ) -> crate::store::Result<Written> {
            self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.put(ns, key, value, expect).await
        }
        async fn delete(
            &self,
            ns: Namespace,
            key: &str,
            revision: &crate::store::Revision,
        ) -> crate::store::Result<bool> {
            self.inner.delete(ns, key, revision).await
        }
        async fn list(&self, ns: Namespace, prefix: &str) -> crate::store::Result<Vec<String>> {
            self.inner.list(ns, prefix).await
        }
        async fn revision(
            &self,
            ns: Namespace,
            key: &str,
        ) -> crate::store::Result<Option<crate::store::Revision>> {
            self.inner.revision(ns, key).await
        }
    }

    #[tokio::test]
    async fn concurrent_puts_of_one_path_commit_together_and_each_keeps_its_own_version() {
        let s = Counting::default();
        let k = key();
        let w = Writers::default();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let (s, k, w) = (s.clone(), k.clone(), w.clone());
            tasks.spawn(async move {
                // Every fourth put carries a check-and-set that only version 0 passes: exactly
                // one of them (whichever comes first) may succeed, inside a batch or not.
                let cas = (i % 4 == 0).then_some(0);
                let out = put_at(&s, &w, &k, "p", &vals(&i.to_string()), opts(cas, 100)).await;
                (i, out)
            });
        }
        let mut versions = std::collections::BTreeMap::new();
        let mut cas_ok = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, out) = joined.unwrap();
            match out {
                Ok(v) => {
                    cas_ok += usize::from(i % 4 == 0);
                    assert!(versions.insert(v, i).is_none(), "version {v} given twice");
                }
                Err(ApiError::CasMismatch { expected: 0, .. }) => assert_eq!(i % 4, 0),
                Err(e) => panic!("put {i}: {e}"),
            }
        }
        assert_eq!(cas_ok, 1, "exactly one check-and-set on version 0 succeeds");
        assert_eq!(versions.len(), 64 - 16 + 1);
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions.keys().copied().collect::<Vec<_>>(), expected);
        // Every version holds the value of the put that was told that version.
        for (v, i) in &versions {
            assert_eq!(
                get(&s, &k, "p", Some(*v)).await.unwrap().0,
                vals(&i.to_string())
            );
        }
        let writes = s.puts.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            writes < versions.len(),
            "{writes} store writes for {} versions: puts were not committed together",
            versions.len()
        );
    }

    #[tokio::test]
    async fn concurrent_writers_never_share_a_version() {
        let s = std::sync::Arc::new(MemoryStore::default());
        let k = key();
        let w = Writers::default();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (s, k, w) = (s.clone(), k.clone(), w.clone());
            tasks.spawn(async move {
                put_at(&*s, &w, &k, "p", &vals(&i.to_string()), opts(None, 100))
                    .await
                    .unwrap()
            });
        }
        let mut seen = Vec::new();
        while let Some(v) = tasks.join_next().await {
            seen.push(v.unwrap());
        }
        seen.sort();
        assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    }

    fn imported(versions: &[(u64, &str, bool)], current: u64) -> Import {
        Import {
            versions: versions
                .iter()
                .map(|&(n, v, deleted)| {
                    let version = ImportVersion {
                        created: 1_000 + n as i64,
                        deleted: deleted.then_some(2_000 + n as i64),
                        values: vals(v),
                    };
                    (n, version)
                })
                .collect(),
            current,
            created: 5,
            updated: 6,
        }
    }

    #[tokio::test]
    async fn an_import_is_a_record_as_nexus_writes_it_and_written_once() {
        let s = MemoryStore::default();
        let k = key();
        let w = Writers::default();
        let secret = imported(&[(2, "a", true), (3, "b", false), (5, "c", false)], 3);
        assert_eq!(
            import(&s, &w, &k, "p", &secret, 2).await.unwrap(),
            Imported::Written
        );
        // Read back as any record: versions, values, markers and times as given, all kept
        // although max_versions is 2.
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("b"), 3));
        assert_eq!(get(&s, &k, "p", Some(5)).await.unwrap(), (vals("c"), 5));
        assert!(matches!(
            get(&s, &k, "p", Some(2)).await,
            Err(ApiError::NotFound)
        ));
        let m = metadata_at(&s, &k, "p", None).await.unwrap();
        assert_eq!(m.versions.len(), 3);
        assert_eq!(m.versions["2"].deleted_time, Some(wire::rfc3339(2_002)));
        assert_eq!(m.versions["5"].created_time, wire::rfc3339(1_005));
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (3, 3)
        );
        assert_eq!(m.metadata.created_time, wire::rfc3339(5));
        // Again: the same, nothing written.
        let before = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        assert_eq!(
            import(&s, &w, &k, "p", &secret, 2).await.unwrap(),
            Imported::Same
        );
        assert_eq!(
            compare_import(&s, &k, "p", &secret).await.unwrap(),
            Some(Imported::Same)
        );
        // Anything a reader would see differently is a difference, and nothing is written.
        for (other, why) in [
            (imported(&[(2, "a", true), (3, "b", false)], 3), "versions"),
            (
                imported(&[(2, "a", false), (3, "b", false), (5, "c", false)], 3),
                "deleted",
            ),
            (
                imported(&[(2, "a", true), (3, "x", false), (5, "c", false)], 3),
                "other values",
            ),
            (
                imported(&[(2, "a", true), (3, "b", false), (5, "c", false)], 5),
                "current",
            ),
        ] {
            match import(&s, &w, &k, "p", &other, 2).await.unwrap() {
                Imported::Different(reason) => {
                    assert!(reason.contains(why), "{reason}");
                    assert!(!reason.contains('x'), "a value in {reason}");
                }
                got => panic!("{why}: {got:?}"),
            }
        }
        let after = s.get(Namespace::Secrets, "p").await.unwrap().unwrap();
        assert_eq!(before.revision, after.revision);
        assert_eq!(compare_import(&s, &k, "q", &secret).await.unwrap(), None);
        // The next put continues after the highest version and prunes to max_versions.
        assert_eq!(
            put_at(&s, &w, &k, "p", &vals("d"), opts(None, 2))
                .await
                .unwrap(),
            6
        );
        assert_eq!(
            metadata_at(&s, &k, "p", None).await.unwrap().versions.len(),
            2
        );
    }

    #[test]
    fn imports_are_checked_like_puts() {
        assert!(validate_import("p", &imported(&[(1, "a", false)], 1)).is_ok());
        assert!(validate_import("p", &imported(&[(1, "a", true)], 0)).is_ok());
        for (path, secret) in [
            ("/p", imported(&[(1, "a", false)], 1)),
            ("p", imported(&[], 0)),
            ("p", imported(&[(0, "a", false)], 0)),
            ("p", imported(&[(1, "a", true)], 1)),
            ("p", imported(&[(1, "a", false)], 2)),
        ] {
            assert!(validate_import(path, &secret).is_err(), "{path}");
        }
        let mut empty_key = imported(&[(1, "a", false)], 1);
        empty_key
            .versions
            .get_mut(&1)
            .unwrap()
            .values
            .insert(String::new(), "v".into());
        assert!(validate_import("p", &empty_key).is_err());
    }
}
