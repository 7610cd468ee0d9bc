//! Reading a SPIKE Nexus SQLite store, as SPIKE main (0.8.2, commit 42547a7e) writes it.
//!
//! The format (`tests/fixtures/spike-main/README.md` describes it in full, with the store a real
//! SPIKE Nexus wrote):
//!
//! - `secrets(path, version, nonce, encrypted_data, created_time, deleted_time)`: one row per
//!   version; `encrypted_data` is AES-256-GCM under the root key itself (no KDF), the row's
//!   12-byte `nonce`, no associated data, of Go's JSON of the version's `map[string]string`.
//!   The times are plain text as go-sqlite3 writes a `time.Time`
//!   (`2026-11-29 20:16:31.67768105+00:00`); `deleted_time` is NULL unless soft-deleted.
//! - `secret_metadata(path, nonce, encrypted_current_version, encrypted_oldest_version,
//!   encrypted_created_time, encrypted_updated_time, encrypted_max_versions)`: one row per
//!   path; each field is sealed under the row's nonce XORed with a 12-byte salt of its own, and
//!   holds decimal text (times in Unix seconds).
//! - `policies(name, nonce, encrypted_spiffe_id_pattern, encrypted_path_pattern,
//!   encrypted_permissions, created_time, updated_time)`: the three fields sealed under one
//!   nonce; permissions comma-joined; times Unix seconds in the clear.
//!
//! SPIKE keeps no verifier, so a key is accepted when it opens the first sealed value
//! ([`SpikeDb::opens`]); then every value must open under it, or the database is refused as
//! damaged. Nothing here writes: the file is opened read-only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use zeroize::Zeroizing;

use crate::crypto::{AeadKey, RootKey};
use crate::nexus::secrets::{Import, ImportVersion};

/// GCM nonce length in SPIKE's rows.
const NONCE_LEN: usize = 12;
/// The salts SPIKE XORs into a metadata row's nonce, one per field (`persist/field_nonce.go`).
const CURRENT_SALT: &[u8; 12] = b"current_ver_";
const OLDEST_SALT: &[u8; 12] = b"oldest_ver__";
const CREATED_SALT: &[u8; 12] = b"created_tim_";
const UPDATED_SALT: &[u8; 12] = b"updated_tim_";
const MAX_SALT: &[u8; 12] = b"max_versions";

/// Why a SPIKE database cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is missing, unreadable, or not an intact SQLite database.
    #[error("{path}: {why}")]
    Unreadable {
        /// The database file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A SQLite database without SPIKE's tables and columns.
    #[error("{path} is not a SPIKE Nexus database: {why}")]
    NotSpike {
        /// The database file.
        path: String,
        /// What is missing.
        why: String,
    },
    /// A row that the key opening the rest does not open, or that is malformed.
    #[error("{path} is damaged: {why}")]
    Damaged {
        /// The database file.
        path: String,
        /// Which row, and what is wrong with it (never a value).
        why: String,
    },
}

/// A sealed value of the database: the first one found, to test a candidate key against.
pub struct Probe {
    nonce: [u8; NONCE_LEN],
    sealed: Vec<u8>,
}

/// A SPIKE policy as stored, decrypted.
pub struct SpikePolicy {
    /// Its name.
    pub name: String,
    /// SPIFFE-ID pattern.
    pub spiffeid_pattern: String,
    /// Path pattern.
    pub path_pattern: String,
    /// Permissions, as SPIKE joined them with commas.
    pub permissions: Vec<String>,
    /// Creation time, Unix seconds.
    pub created: i64,
    /// Last update, Unix seconds.
    pub updated: i64,
}

/// Everything a SPIKE store holds, decrypted.
pub struct Contents {
    /// Every secret path with its versions, as an import into our store.
    pub secrets: BTreeMap<String, Import>,
    /// Every policy, by name.
    pub policies: Vec<SpikePolicy>,
}

/// An open SPIKE database (read-only).
pub struct SpikeDb {
    conn: Connection,
    path: PathBuf,
}

fn nonce(bytes: &[u8]) -> Option<[u8; NONCE_LEN]> {
    bytes.try_into().ok()
}

fn xor(nonce: &[u8; NONCE_LEN], salt: &[u8; 12]) -> [u8; NONCE_LEN] {
    let mut out = *nonce;
    for (o, s) in out.iter_mut().zip(salt) {
        *o ^= s;
    }
    out
}

/// Parses a time as go-sqlite3 writes a Go `time.Time`: `YYYY-MM-DD HH:MM:SS[.fraction]±HH:MM`
/// (a `T` or a `Z` accepted too); Unix nanoseconds.
pub fn parse_go_time(text: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    // The go-sqlite3 layout is RFC 3339 with a space for the `T`.
    let text = text.trim();
    let rfc = match text.get(10..11) {
        Some(" ") => format!("{}T{}", &text[..10], &text[11..]),
        _ => text.to_string(),
    };
    let t = time::OffsetDateTime::parse(&rfc, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

fn seconds_to_nanos(s: i64) -> Option<i64> {
    s.checked_mul(1_000_000_000)
}

impl SpikeDb {
    /// Opens `path` read-only and checks that it is an intact SQLite database with SPIKE's
    /// three tables.
    pub fn open(path: &Path) -> Result<SpikeDb, Error> {
        let shown = path.display().to_string();
        let unreadable = |why: String| Error::Unreadable {
            path: shown.clone(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
        if !meta.is_file() {
            return Err(unreadable("not a file".into()));
        }
        if meta.len() == 0 {
            return Err(Error::NotSpike {
                path: shown,
                why: "the file is empty".into(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| unreadable(format!("cannot open as SQLite: {e}")))?;
        // A truncated or damaged file: SQLite's own check of every page.
        let check: Vec<String> = conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(|e| unreadable(format!("not an intact SQLite database ({e})")))?;
        if check != ["ok"] {
            let first = check
                .first()
                .cloned()
                .unwrap_or_default()
                .replace('\n', " ");
            return Err(unreadable(format!(
                "not an intact SQLite database (truncated or damaged: {first})"
            )));
        }
        let db = SpikeDb {
            conn,
            path: path.to_path_buf(),
        };
        for (table, columns) in [
            (
                "secrets",
                "path, version, nonce, encrypted_data, created_time, deleted_time",
            ),
            (
                "secret_metadata",
                "path, nonce, encrypted_current_version, encrypted_oldest_version, \
                 encrypted_created_time, encrypted_updated_time, encrypted_max_versions",
            ),
            (
                "policies",
                "name, nonce, encrypted_spiffe_id_pattern, encrypted_path_pattern, \
                 encrypted_permissions, created_time, updated_time",
            ),
        ] {
            // A table, not a view: a view is a query the file's author wrote, which may never
            // end (a recursive one) or cost anything.
            let kind: Option<String> = db
                .conn
                .query_row(
                    "SELECT type FROM sqlite_master WHERE name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .ok();
            if kind.as_deref() != Some("table") {
                return Err(Error::NotSpike {
                    path: shown.clone(),
                    why: format!(
                        "{table} is not a table (SPIKE's schema has a table {table}; found {})",
                        kind.as_deref().unwrap_or("nothing of that name")
                    ),
                });
            }
            db.conn
                .prepare(&format!("SELECT {columns} FROM {table} LIMIT 0"))
                .map_err(|e| Error::NotSpike {
                    path: shown.clone(),
                    why: format!("no table {table} with SPIKE's columns ({e})"),
                })?;
        }
        Ok(db)
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn damaged(&self, why: String) -> Error {
        Error::Damaged {
            path: self.shown(),
            why,
        }
    }

    fn sql(&self, e: rusqlite::Error) -> Error {
        Error::Unreadable {
            path: self.shown(),
            why: format!("cannot read: {e}"),
        }
    }

    /// The first sealed value of the database (a version's data, else a metadata field, else a
    /// policy field); `None` when it holds nothing sealed, so nothing at all.
    pub fn probe(&self) -> Result<Option<Probe>, Error> {
        for query in [
            "SELECT nonce, encrypted_data FROM secrets ORDER BY path, version LIMIT 1",
            "SELECT nonce, encrypted_current_version FROM secret_metadata ORDER BY path LIMIT 1",
            "SELECT nonce, encrypted_permissions FROM policies ORDER BY name LIMIT 1",
        ] {
            let row = self
                .conn
                .prepare(query)
                .and_then(|mut s| {
                    let mut rows = s.query_map([], |r| {
                        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })?;
                    rows.next().transpose()
                })
                .map_err(|e| self.sql(e))?;
            if let Some((n, sealed)) = row {
                let nonce = nonce(&n)
                    .ok_or_else(|| self.damaged(format!("a nonce of {} bytes", n.len())))?;
                let nonce = if query.contains("secret_metadata") {
                    xor(&nonce, CURRENT_SALT)
                } else {
                    nonce
                };
                return Ok(Some(Probe { nonce, sealed }));
            }
        }
        Ok(None)
    }

    /// Whether `key` opens `probe`: the check a candidate root key must pass (SPIKE keeps no
    /// verifier).
    pub fn opens(probe: &Probe, key: &RootKey) -> bool {
        key.spike_store_key()
            .open_with_nonce(probe.nonce, &[], &probe.sealed)
            .is_ok()
    }

    /// Decrypts every row under `key` and checks that the rows agree with each other.
    pub fn read(&self, key: &RootKey) -> Result<Contents, Error> {
        let aead = key.spike_store_key();
        Ok(Contents {
            secrets: self.secrets(&aead)?,
            policies: self.policies(&aead)?,
        })
    }

    fn open_text(
        &self,
        aead: &AeadKey,
        nonce: [u8; NONCE_LEN],
        sealed: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<Zeroizing<String>, Error> {
        let plain = aead.open_with_nonce(nonce, &[], sealed).map_err(|_| {
            self.damaged(format!(
                "{} does not open under the key that opens the rest (a damaged row, or rows \
                 sealed under another key)",
                what()
            ))
        })?;
        let text = std::str::from_utf8(&plain)
            .map_err(|_| self.damaged(format!("{} is not UTF-8 text", what())))?;
        Ok(Zeroizing::new(text.to_string()))
    }

    fn secrets(&self, aead: &AeadKey) -> Result<BTreeMap<String, Import>, Error> {
        let mut out: BTreeMap<String, Import> = BTreeMap::new();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, nonce, encrypted_current_version, encrypted_oldest_version, \
                 encrypted_created_time, encrypted_updated_time, encrypted_max_versions \
                 FROM secret_metadata ORDER BY path",
            )
            .map_err(|e| self.sql(e))?;
        type MetaRow = (String, Vec<u8>, [Vec<u8>; 5]);
        let rows: Vec<MetaRow> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?],
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.sql(e))?;
        for (path, n, [current, oldest, created, updated, max]) in rows {
            let base = nonce(&n).ok_or_else(|| {
                self.damaged(format!(
                    "metadata of {path:?} has a nonce of {} bytes",
                    n.len()
                ))
            })?;
            let field = |salt: &[u8; 12], sealed: &[u8], name: &str| -> Result<i64, Error> {
                let what = || format!("metadata field {name} of {path:?}");
                let text = self.open_text(aead, xor(&base, salt), sealed, &what)?;
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| self.damaged(format!("{} is not a number", what())))
            };
            let current = field(CURRENT_SALT, &current, "current_version")?;
            let created = field(CREATED_SALT, &created, "created_time")?;
            let updated = field(UPDATED_SALT, &updated, "updated_time")?;
            // oldest_version and max_versions are opened to check them, not kept: ours follow
            // from the versions and from SPIKE_NEXUS_MAX_SECRET_VERSIONS.
            field(OLDEST_SALT, &oldest, "oldest_version")?;
            field(MAX_SALT, &max, "max_versions")?;
            let current = u64::try_from(current)
                .map_err(|_| self.damaged(format!("metadata of {path:?}: negative version")))?;
            let (Some(created), Some(updated)) =
                (seconds_to_nanos(created), seconds_to_nanos(updated))
            else {
                return Err(self.damaged(format!("metadata of {path:?}: time out of range")));
            };
            out.insert(
                path,
                Import {
                    versions: BTreeMap::new(),
                    current,
                    created,
                    updated,
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, version, nonce, encrypted_data, created_time, deleted_time \
                 FROM secrets ORDER BY path, version",
            )
            .map_err(|e| self.sql(e))?;
        type VersionRow = (String, i64, Vec<u8>, Vec<u8>, String, Option<String>);
        let rows: Vec<VersionRow> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.sql(e))?;
        for (path, version, n, sealed, created, deleted) in rows {
            let what = || format!("{path:?} version {version}");
            let Some(secret) = out.get_mut(&path) else {
                return Err(self.damaged(format!("{} has no metadata row", what())));
            };
            let number = u64::try_from(version)
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| self.damaged(format!("{}: not a version number", what())))?;
            let nonce = nonce(&n).ok_or_else(|| {
                self.damaged(format!("{} has a nonce of {} bytes", what(), n.len()))
            })?;
            let text = self.open_text(aead, nonce, &sealed, &what)?;
            let values: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|_| {
                self.damaged(format!("{} does not hold a JSON object of strings", what()))
            })?;
            let created = parse_go_time(&created)
                .ok_or_else(|| self.damaged(format!("{}: created_time {created:?}", what())))?;
            let deleted = match deleted {
                None => None,
                Some(t) => Some(
                    parse_go_time(&t)
                        .ok_or_else(|| self.damaged(format!("{}: deleted_time {t:?}", what())))?,
                ),
            };
            secret.versions.insert(
                number,
                ImportVersion {
                    created,
                    deleted,
                    values,
                },
            );
        }
        if let Some(path) = out
            .iter()
            .find(|(_, s)| s.versions.is_empty())
            .map(|(p, _)| p)
        {
            return Err(self.damaged(format!("{path:?} has metadata but no version row")));
        }
        Ok(out)
    }

    fn policies(&self, aead: &AeadKey) -> Result<Vec<SpikePolicy>, Error> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, nonce, encrypted_spiffe_id_pattern, encrypted_path_pattern, \
                 encrypted_permissions, created_time, updated_time FROM policies ORDER BY name",
            )
            .map_err(|e| self.sql(e))?;
        type PolicyRow = (String, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, i64, i64);
        let rows: Vec<PolicyRow> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, n, id, path, perms, created, updated) in rows {
            let nonce = nonce(&n).ok_or_else(|| {
                self.damaged(format!("policy {name:?} has a nonce of {} bytes", n.len()))
            })?;
            let open = |sealed: &[u8], field: &str| {
                self.open_text(aead, nonce, sealed, &|| {
                    format!("policy {name:?} field {field}")
                })
            };
            let spiffeid_pattern = open(&id, "spiffe_id_pattern")?.to_string();
            let path_pattern = open(&path, "path_pattern")?.to_string();
            let permissions = open(&perms, "permissions")?
                .split(',')
                .map(str::to_string)
                .collect();
            out.push(SpikePolicy {
                name,
                spiffeid_pattern,
                path_pattern,
                permissions,
                created,
                updated,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::parse_go_time;

    #[test]
    fn go_sqlite3_times() {
        assert_eq!(
            parse_go_time("2026-11-29 20:16:31.67768105+00:00"),
            Some(1_795_983_391_677_681_050)
        );
        assert_eq!(
            parse_go_time("2026-11-29 21:16:31+01:00"),
            Some(1_795_983_391_000_000_000)
        );
        assert_eq!(
            parse_go_time("2026-11-29T20:16:31Z"),
            Some(1_795_983_391_000_000_000)
        );
        for bad in ["", "yesterday", "2026-11-29", "2026-13-29 20:16:31+00:00"] {
            assert_eq!(parse_go_time(bad), None, "{bad}");
        }
    }
}
