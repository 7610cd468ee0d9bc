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
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::ApiError;
use crate::api::{self, SecretMetadata, SecretMetadataResponse, VersionInfo};
use crate::crypto::AeadKey;
use crate::store::{Expect, Namespace, Store, Written};

/// Longest secret path accepted (SPIKE's limit).
pub const MAX_PATH_LEN: usize = 500;
/// Longest key name inside a secret.
pub const MAX_KEY_LEN: usize = 250;
/// Paths under this prefix name authorisation pseudo-resources, never secrets.
pub const RESERVED_PREFIX: &str = "spike/system/";
/// Attempts at a read-modify-write before giving up under contention.
const MAX_ATTEMPTS: u32 = 200;

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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    pub created: i64,
    pub deleted: Option<i64>,
    /// nonce ‖ ciphertext ‖ tag of the JSON map.
    #[serde(with = "crate::api::b64")]
    pub sealed: Vec<u8>,
}

/// The associated data binding a sealed version to its place.
fn aad(path: &str, version: u64) -> Vec<u8> {
    format!("spike/secret/v1\0{path}\0{version}").into_bytes()
}

/// Checks a secret path: SPIKE's character set and length, no empty, `.` or `..` segment, and
/// nothing under the reserved `spike/system/` prefix.
pub fn validate_path(path: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::BadRequest(format!("invalid secret path: {why}")));
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return bad("must be 1 to 500 characters");
    }
    if !path.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '.' | '_'
                    | '-'
                    | '/'
                    | '('
                    | ')'
                    | '?'
                    | '+'
                    | '*'
                    | '|'
                    | '['
                    | ']'
                    | '{'
                    | '}'
                    | '\\'
            )
    }) {
        return bad("allowed characters are letters, digits and ._-/()?+*|[]{}\\");
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("no empty, '.' or '..' segments (and no leading or trailing '/')");
    }
    if path.starts_with(RESERVED_PREFIX) || path == "spike/system" {
        return bad("paths under spike/system/ are reserved");
    }
    Ok(())
}

fn validate_values(values: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for key in values.keys() {
        if key.is_empty()
            || key.len() > MAX_KEY_LEN
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ' ' | '.'))
        {
            return Err(ApiError::BadRequest(
                "invalid key name: 1 to 250 letters, digits, '-', '_', '.' or spaces".into(),
            ));
        }
    }
    Ok(())
}

/// Reads the record at `path` with its revision.
async fn load(
    store: &impl Store,
    path: &str,
) -> Result<Option<(Record, crate::store::Revision)>, ApiError> {
    let Some(entry) = store.get(Namespace::Secrets, path).await? else {
        return Ok(None);
    };
    let record: Record = serde_json::from_slice(&entry.value)
        .map_err(|e| ApiError::Internal(format!("secret record at {path:?} is malformed: {e}")))?;
    Ok(Some((record, entry.revision)))
}

/// Applies `change` to the record at `path` (or `None`) and writes the result with
/// compare-and-set, retrying from a fresh read when another writer got in between.
async fn update<T>(
    store: &impl Store,
    path: &str,
    mut change: impl FnMut(Option<Record>) -> Result<(Record, T), ApiError>,
) -> Result<T, ApiError> {
    for attempt in 0..MAX_ATTEMPTS {
        let (record, expect) = match load(store, path).await? {
            Some((record, rev)) => (Some(record), Expect::Revision(rev)),
            None => (None, Expect::Absent),
        };
        let (record, out) = change(record)?;
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| ApiError::Internal(format!("cannot encode secret record: {e}")))?;
        match store.put(Namespace::Secrets, path, bytes, expect).await? {
            Written::Done(_) => return Ok(out),
            Written::Conflict => {
                tracing::debug!(path, attempt, "secret write conflict; retrying");
                // Someone else wrote first; back off a little (more on each retry) and redo
                // the change on what they wrote.
                let spread = u64::from(attempt.min(20)) * 250 + 50;
                let jitter = u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0),
                ) % spread;
                tokio::time::sleep(Duration::from_micros(jitter)).await;
            }
        }
    }
    Err(ApiError::Contended)
}

/// Writes a new version; returns its number.
pub async fn put(
    store: &impl Store,
    key: &AeadKey,
    path: &str,
    values: &BTreeMap<String, String>,
    cas: Option<u64>,
    max_versions: u32,
) -> Result<u64, ApiError> {
    validate_path(path)?;
    validate_values(values)?;
    let plaintext = Zeroizing::new(
        serde_json::to_vec(values)
            .map_err(|e| ApiError::Internal(format!("cannot encode values: {e}")))?,
    );
    update(store, path, |record| {
        let now = api::now_nanos();
        let mut record = record.unwrap_or_else(|| Record {
            created: now,
            ..Record::default()
        });
        if let Some(expected) = cas
            && expected != record.current
        {
            return Err(ApiError::CasMismatch {
                expected,
                current: record.current,
            });
        }
        let version = record.last + 1;
        let sealed = key.seal(&aad(path, version), &plaintext)?;
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
        record.oldest = lowest_live(&record);
        Ok((record, version))
    })
    .await
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

/// Reads a version (0 or `None`: the current one); returns its data and number.
pub async fn get(
    store: &impl Store,
    key: &AeadKey,
    path: &str,
    version: Option<u64>,
) -> Result<(BTreeMap<String, String>, u64), ApiError> {
    validate_path(path)?;
    let (record, _) = load(store, path).await?.ok_or(ApiError::NotFound)?;
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
pub async fn delete(store: &impl Store, path: &str, versions: &[u64]) -> Result<(), ApiError> {
    validate_path(path)?;
    update(store, path, |record| {
        let mut record = record.ok_or(ApiError::NotFound)?;
        let now = api::now_nanos();
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
        Ok((record, ()))
    })
    .await
}

/// Restores soft-deleted versions (empty: the current one, or the highest deleted one when no
/// version is current). `NotFound` when nothing was restored.
pub async fn undelete(store: &impl Store, path: &str, versions: &[u64]) -> Result<(), ApiError> {
    validate_path(path)?;
    update(store, path, |record| {
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
        record.updated = api::now_nanos();
        Ok((record, ()))
    })
    .await
}

/// Version metadata. With `version`, only that version is listed.
pub async fn metadata(
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
                    created_time: api::rfc3339(v.created),
                    version: *n,
                    deleted_time: v.deleted.map(api::rfc3339),
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
            created_time: api::rfc3339(record.created),
            updated_time: api::rfc3339(record.updated),
            max_versions: record.max_versions,
        },
    })
}

/// Every secret path starting with `prefix`, sorted.
pub async fn list(store: &impl Store, prefix: &str) -> Result<Vec<String>, ApiError> {
    Ok(store.list(Namespace::Secrets, prefix).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RootKey;
    use crate::store::memory::MemoryStore;

    fn key() -> AeadKey {
        RootKey::generate().unwrap().derive("test")
    }

    fn vals(v: &str) -> BTreeMap<String, String> {
        [("k".to_string(), v.to_string())].into()
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
        for i in 1..=3 {
            assert_eq!(
                put(&s, &k, "p", &vals(&i.to_string()), None, 10)
                    .await
                    .unwrap(),
                i
            );
        }
        assert_eq!(get(&s, &k, "p", None).await.unwrap(), (vals("3"), 3));
        assert_eq!(get(&s, &k, "p", Some(1)).await.unwrap(), (vals("1"), 1));
        delete(&s, "p", &[]).await.unwrap();
        assert_eq!(get(&s, &k, "p", None).await.unwrap().1, 2);
        assert!(matches!(
            get(&s, &k, "p", Some(3)).await,
            Err(ApiError::NotFound)
        ));
        delete(&s, "p", &[1, 2]).await.unwrap();
        assert!(matches!(
            get(&s, &k, "p", None).await,
            Err(ApiError::NotFound)
        ));
        let m = metadata(&s, "p", None).await.unwrap();
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (0, 0)
        );
        undelete(&s, "p", &[]).await.unwrap();
        assert_eq!(get(&s, &k, "p", None).await.unwrap().1, 3);
        undelete(&s, "p", &[1]).await.unwrap();
        let m = metadata(&s, "p", None).await.unwrap();
        assert_eq!(
            (m.metadata.current_version, m.metadata.oldest_version),
            (3, 1)
        );
        assert!(m.versions["2"].deleted_time.is_some());
        assert!(matches!(
            undelete(&s, "p", &[3]).await,
            Err(ApiError::NotFound)
        ));
        // Pruning keeps the newest max_versions and never reuses numbers.
        for _ in 0..5 {
            put(&s, &k, "p", &vals("x"), None, 2).await.unwrap();
        }
        let m = metadata(&s, "p", None).await.unwrap();
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
        assert_eq!(put(&s, &k, "p", &vals("a"), Some(0), 10).await.unwrap(), 1);
        assert!(matches!(
            put(&s, &k, "p", &vals("b"), Some(0), 10).await,
            Err(ApiError::CasMismatch {
                expected: 0,
                current: 1
            })
        ));
        assert_eq!(put(&s, &k, "p", &vals("b"), Some(1), 10).await.unwrap(), 2);
        assert_eq!(get(&s, &k, "p", None).await.unwrap().0, vals("b"));
    }

    #[tokio::test]
    async fn a_version_moved_to_another_path_does_not_open() {
        let s = MemoryStore::default();
        let k = key();
        put(&s, &k, "a", &vals("secret-a"), None, 10).await.unwrap();
        put(&s, &k, "b", &vals("secret-b"), None, 10).await.unwrap();
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

    #[tokio::test]
    async fn concurrent_writers_never_share_a_version() {
        let s = std::sync::Arc::new(MemoryStore::default());
        let k = std::sync::Arc::new(key());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (s, k) = (s.clone(), k.clone());
            tasks.spawn(async move {
                put(&*s, &k, "p", &vals(&i.to_string()), None, 100)
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
