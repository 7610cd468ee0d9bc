//! Secrets: paths holding versions of a string→string map (DESIGN.md §4).
//!
//! One record per path, stored in [`Namespace::Secrets`]. The record's bookkeeping (version
//! numbers, times) is plain; each version's data is sealed separately with AES-256-GCM under
//! the secrets key, with the path and version number as associated data, so a version copied to
//! another path or version number fails to open instead of leaking. A read opens exactly one
//! version.
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
use crate::crypto::AeadKey;
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

/// A secret as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// The version `get` returns by default; 0 when every version is deleted.
    pub current: u64,
    /// The lowest live version; 0 when none is live.
    pub oldest: u64,
    /// The highest version ever written, so numbers are never reused after pruning.
    pub last: u64,
    pub created: i64,
    pub updated: i64,
    pub max_versions: u32,
    pub versions: BTreeMap<u64, Version>,
    /// The last [`REMEMBERED_REQUESTS`] puts that carried a `request_id`, oldest first: a put
    /// replaying one of them returns its version instead of writing again. Kept in the record
    /// so the check and the write are one compare-and-set, whichever instance takes the replay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<Applied>,
}

/// A put that carried a request id, and the version it made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub id: String,
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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    pub created: i64,
    pub deleted: Option<i64>,
    /// nonce ‖ ciphertext ‖ tag of the JSON map.
    #[serde(with = "crate::protocol::nexus::b64")]
    pub sealed: Vec<u8>,
}

/// The associated data binding a sealed version to its place.
fn aad(path: &str, version: u64) -> Vec<u8> {
    format!("spike/secret/v1\0{path}\0{version}").into_bytes()
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

/// Reads the record at `path` with its revision.
async fn load(
    store: &impl Store,
    path: &str,
) -> Result<Option<(Record, crate::store::Revision)>, ApiError> {
    let Some(entry) = store.get(Namespace::Secrets, path).await? else {
        return Ok(None);
    };
    Ok(Some((decode(path, &entry.value)?, entry.revision)))
}

fn decode(path: &str, stored: &[u8]) -> Result<Record, ApiError> {
    serde_json::from_slice(stored)
        .map_err(|e| ApiError::Internal(format!("secret record at {path:?} is malformed: {e}")))
}

/// [`read_modify_write`] of the record at `path`, in the path's turn.
async fn update<T>(
    store: &impl Store,
    writers: &Writers,
    path: &str,
    change: impl FnMut(Option<Record>) -> Result<(Option<Record>, T), ApiError>,
) -> Result<T, ApiError> {
    // Writers of one path inside this instance take turns, so they do not spend store round
    // trips losing compare-and-set races to each other. This is only a queue: other instances
    // still race, and the compare-and-set is what keeps every write honest.
    let _turn = writers.stripe(path).turn.lock().await;
    read_modify_write(store, path, change).await
}

/// Reads the record at `path`, gives it to `change`, and writes the record `change` returns
/// with compare-and-set (nothing when it returns none), retrying from a fresh read when
/// another writer got in between. Callers hold the path's turn.
pub(super) async fn read_modify_write<T>(
    store: &impl Store,
    path: &str,
    mut change: impl FnMut(Option<Record>) -> Result<(Option<Record>, T), ApiError>,
) -> Result<T, ApiError> {
    for attempt in 0..MAX_ATTEMPTS {
        let (record, expect) = match load(store, path).await? {
            Some((record, rev)) => (Some(record), Expect::Revision(rev)),
            None => (None, Expect::Absent),
        };
        let (record, out) = change(record)?;
        let Some(record) = record else {
            return Ok(out);
        };
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| ApiError::Internal(format!("cannot encode secret record: {e}")))?;
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
    key: &Arc<AeadKey>,
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
    let key = Arc::clone(key);
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
        let sealed = key.seal(&aad(&owned_path, version), &plaintext)?;
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
    queue_put(store, writers, path, change).await
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
    key: &AeadKey,
    path: &str,
    entry: Option<&Entry>,
    version: Option<u64>,
) -> Result<(BTreeMap<String, String>, u64), ApiError> {
    let record = decode(path, &entry.ok_or(ApiError::NotFound)?.value)?;
    let wanted = match version {
        None | Some(0) => record.current,
        Some(v) => v,
    };
    let entry = record
        .versions
        .get(&wanted)
        .filter(|v| v.deleted.is_none())
        .ok_or(ApiError::NotFound)?;
    let plaintext = key.open(&aad(path, wanted), &entry.sealed).map_err(|_| {
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
    path: &str,
    versions: &[u64],
) -> Result<(), ApiError> {
    validate_path(path)?;
    update(store, writers, path, |record| {
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
    path: &str,
    versions: &[u64],
) -> Result<(), ApiError> {
    validate_path(path)?;
    update(store, writers, path, |record| {
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
    path: &str,
    version: Option<u64>,
) -> Result<SecretMetadataResponse, ApiError> {
    validate_path(path)?;
    let (record, _) = load(store, path).await?.ok_or(ApiError::NotFound)?;
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

/// Every secret path starting with `prefix`, sorted.
/// The secret paths under `prefix` that `listing` lets the caller see.
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
    key: &Arc<AeadKey>,
    grant: &Grant,
    values: &BTreeMap<String, String>,
    opts: PutOptions<'_>,
) -> Result<u64, ApiError> {
    let path = grant.resource(Permission::Write)?;
    put_at(store, writers, key, path, values, opts).await
}

/// Reads a version of the granted path: the record is read only now that the caller may.
pub async fn read(
    store: &impl Store,
    key: &AeadKey,
    grant: &Grant,
    version: Option<u64>,
) -> Result<(BTreeMap<String, String>, u64), ApiError> {
    let path = grant.resource(Permission::Read)?;
    validate_path(path)?;
    let entry = store.get(Namespace::Secrets, path).await?;
    open_version(key, path, entry.as_ref(), version)
}

/// Soft-deletes versions of the granted path ([`delete_at`]).
pub async fn delete(
    store: &impl Store,
    writers: &Writers,
    grant: &Grant,
    versions: &[u64],
) -> Result<(), ApiError> {
    delete_at(store, writers, grant.resource(Permission::Write)?, versions).await
}

/// Restores soft-deleted versions of the granted path ([`undelete_at`]).
pub async fn undelete(
    store: &impl Store,
    writers: &Writers,
    grant: &Grant,
    versions: &[u64],
) -> Result<(), ApiError> {
    undelete_at(store, writers, grant.resource(Permission::Write)?, versions).await
}

/// The metadata of the granted path ([`metadata_at`]).
pub async fn metadata(
    store: &impl Store,
    grant: &Grant,
    version: Option<u64>,
) -> Result<SecretMetadataResponse, ApiError> {
    metadata_at(store, grant.resource(Permission::Read)?, version).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RootKey;
    use crate::store::memory::MemoryStore;

    fn key() -> Arc<AeadKey> {
        Arc::new(RootKey::generate().unwrap().derive("test"))
    }

    /// A read as Nexus serves it to a superuser: the record, then the version opened.
    async fn get(
        store: &impl Store,
        key: &AeadKey,
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
        let m = metadata_at(&*s, "p", None).await.unwrap();
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
        delete_at(&s, &w, "p", &[]).await.unwrap();
        assert_eq!(get(&s, &k, "p", None).await.unwrap().1, 2);
        assert!(matches!(
            get(&s, &k, "p", Some(3)).await,
            Err(ApiError::NotFound)
        ));
        delete_at(&s, &w, "p", &[1, 2]).await.unwrap();
        assert!(matches!(
            get(&s, &k, "p", None).await,
            Err(ApiError::NotFound)
        ));
        let m = metadata_at(&s, "p", None).await.unwrap();
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (0, 0)
        );
        undelete_at(&s, &w, "p", &[]).await.unwrap();
        assert_eq!(get(&s, &k, "p", None).await.unwrap().1, 3);
        undelete_at(&s, &w, "p", &[1]).await.unwrap();
        let m = metadata_at(&s, "p", None).await.unwrap();
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (3, 1)
        );
        assert!(m.versions["2"].deleted_time.is_some());
        assert!(matches!(
            undelete_at(&s, &w, "p", &[3]).await,
            Err(ApiError::NotFound)
        ));
        // Pruning keeps the newest max_versions and never reuses numbers.
        for _ in 0..5 {
            put_at(&s, &w, &k, "p", &vals("x"), opts(None, 2))
                .await
                .unwrap();
        }
        let m = metadata_at(&s, "p", None).await.unwrap();
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

    #[tokio::test]
    async fn a_version_moved_to_another_path_does_not_open() {
        let s = MemoryStore::default();
        let k = key();
        let w = Writers::default();
        put_at(&s, &w, &k, "a", &vals("secret-a"), opts(None, 10))
            .await
            .unwrap();
        put_at(&s, &w, &k, "b", &vals("secret-b"), opts(None, 10))
            .await
            .unwrap();
        let a = s.get(Namespace::Secrets, "a").await.unwrap().unwrap();
        let b = s.get(Namespace::Secrets, "b").await.unwrap().unwrap();
        s.put(
            Namespace::Secrets,
            "b",
            a.value,
            Expect::Revision(b.revision),
        )
        .await
        .unwrap();
        assert!(matches!(
            get(&s, &k, "b", None).await,
            Err(ApiError::Internal(_))
        ));
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
}
