//! The embedded default store: one SQLite file, `SPIKE_NEXUS_DATA_DIR/spike.db`.
//!
//! The file is created with mode 0600 in a 0700 directory, runs in WAL mode with
//! `synchronous=FULL` (a commit is on disk before it is acknowledged) and a busy timeout, so
//! several Nexus processes on one machine can share it.
//!
//! Writes run on tokio's blocking pool on the one writer connection (SQLite allows one writer
//! at a time anyway). Reads first run where the request is, on a connection owned by the
//! current thread, with no busy timeout: in WAL mode a read never waits for a writer, and a
//! read of hot pages takes microseconds — less than handing the call to another thread and
//! back, which was a fifth of all CPU time in a profile of secret reads. A read that would
//! have to wait for a lock (a checkpoint or recovery in another process) is not waited for
//! there: it is redone on the blocking pool with the full busy timeout. A read that has to go
//! to a slow disk does block its worker thread for that long; Nexus's own files are expected
//! on local storage (see README).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use super::{
    Consistency, Entry, Error, Expect, Namespace, Result, Revision, Snapshot, Store, Written,
};

const BACKEND: &str = "sqlite";
/// The schema this code writes; `PRAGMA user_version` records what a file holds.
const SCHEMA_VERSION: i64 = 2;
/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle reader connections kept open for reads that had to wait for a lock.
const MAX_IDLE_READERS: usize = 8;
/// Stores a thread keeps a connection to at most (more only in tests, which open many).
const MAX_LOCAL_READERS: usize = 8;

/// One table of sealed values. `revision` comes from `sequence`, so a revision is never
/// reused, even for a key that was deleted and created again.
///
/// Values can be large (the policy book holds every policy: 1.7 MB for 10 000), so `kv` is an
/// ordinary rowid table with `(ns, key)` in its own index, and `revision` comes before `value`.
/// Schema 1 was `WITHOUT ROWID` with `value` first: there the whole row is the b-tree key, and
/// a lookup that compares against a row whose payload overflows reads all of it, so every read
/// that passed the policy book in the b-tree — its own revision, a secret stored next to it —
/// cost 0.4 ms at 10 000 policies instead of 4 µs; and a column stored after a large value is
/// reached only by walking the value's overflow pages.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    ns       TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    revision INTEGER NOT NULL,
    value    BLOB    NOT NULL,
    PRIMARY KEY (ns, key)
);
CREATE TABLE IF NOT EXISTS sequence (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO sequence (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
";

/// Schema 1 to 2: the same rows in a rowid table, `revision` before `value` (see [`SCHEMA`]).
const UPGRADE_FROM_1: &str = "
CREATE TABLE kv_2 (
    ns       TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    revision INTEGER NOT NULL,
    value    BLOB    NOT NULL,
    PRIMARY KEY (ns, key)
);
INSERT INTO kv_2 (ns, key, revision, value) SELECT ns, key, revision, value FROM kv;
DROP TABLE kv;
ALTER TABLE kv_2 RENAME TO kv;
";

/// The SQLite backend: one file, WAL, `synchronous=FULL`.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Names this store among the connections a thread keeps ([`LOCAL_READERS`]).
    id: u64,
    /// The database file, for opening more reader connections.
    path: PathBuf,
    /// The one connection that writes.
    writer: Mutex<Connection>,
    /// Idle read-only connections.
    readers: Mutex<Vec<Connection>>,
}

/// Store ids: one per [`SqliteStore::open`] in this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Each thread's own read connection to each store it has read, by store id.
    static LOCAL_READERS: RefCell<HashMap<u64, Connection>> = RefCell::new(HashMap::new());
}

fn unavailable(reason: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned mutex means a blocking task panicked mid-call; the connection itself is still
    // usable (SQLite rolls back an unfinished transaction), so keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/spike.db` and brings its schema up to date.
    pub async fn open(data_dir: &Path) -> Result<SqliteStore> {
        let data_dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir))
            .await
            .map_err(unavailable)?
    }

    fn open_blocking(data_dir: &Path) -> Result<SqliteStore> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("spike.db");
        // Create the file ourselves so it is 0600 from its first byte.
        crate::platform::fs::create_if_missing(&path, crate::platform::fs::PRIVATE)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        let writer = open_connection(&path)?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        migrate(&writer)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                path,
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `f` on this thread's own reader connection without waiting for any lock, or, when
    /// it would have to wait, on the blocking pool with the busy timeout (module docs).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        if let Some(out) = self.read_here(&f) {
            return out;
        }
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = match lock(&inner.readers).pop() {
                Some(conn) => conn,
                None => open_connection(&inner.path)?,
            };
            let out = f(&conn).map_err(unavailable);
            let mut idle = lock(&inner.readers);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(unavailable)?
    }

    /// Runs `f` on the calling thread's connection. `None` when it would have to wait for a
    /// lock held by another connection.
    fn read_here<T>(&self, f: &impl Fn(&Connection) -> rusqlite::Result<T>) -> Option<Result<T>> {
        LOCAL_READERS.with(|local| {
            // Only a read nested inside another on this thread finds it borrowed; it takes
            // the pool instead.
            let mut local = local.try_borrow_mut().ok()?;
            if !local.contains_key(&self.inner.id) {
                if local.len() >= MAX_LOCAL_READERS {
                    local.clear();
                }
                let conn = match open_connection(&self.inner.path).and_then(|c| {
                    c.busy_timeout(Duration::ZERO)
                        .map(|()| c)
                        .map_err(unavailable)
                }) {
                    Ok(conn) => conn,
                    Err(e) => return Some(Err(e)),
                };
                local.insert(self.inner.id, conn);
            }
            let conn = local.get(&self.inner.id)?;
            match f(conn) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
                {
                    None
                }
                out => Some(out.map_err(unavailable)),
            }
        })
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction on the writer connection; the
    /// transaction commits only if `f` succeeds.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&inner.writer);
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let out = f(&tx).map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
        .map_err(unavailable)?
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unavailable)?;
    Ok(conn)
}

/// Creates or upgrades the schema. Runs in an immediate transaction, so two processes opening
/// a new file at once take turns and the second finds the work done.
fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(unavailable)?;
    let result = (|| -> rusqlite::Result<Option<i64>> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Ok(Some(version));
        }
        if version == 1 {
            conn.execute_batch(UPGRADE_FROM_1)?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(None)
    })();
    match result {
        Ok(None) => conn.execute_batch("COMMIT").map_err(unavailable),
        Ok(Some(version)) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(Error::Corrupt {
                backend: BACKEND,
                reason: format!(
                    "database schema version {version} is newer than this spike understands ({SCHEMA_VERSION}); upgrade spike"
                ),
            })
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(unavailable(e))
        }
    }
}

fn parse_revision(rev: &Revision) -> Option<i64> {
    rev.0.parse().ok()
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ping(&self) -> Result<()> {
        // Touch the file (a constant SELECT would not), so a locked or vanished database shows.
        self.read(|c| {
            c.prepare_cached("SELECT value FROM sequence WHERE id = 1")?
                .query_row([], |_| Ok(()))
        })
        .await
    }

    async fn get(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        let key = key.to_string();
        self.read(move |c| get_entry(c, ns, &key)).await
    }

    fn consistency(&self) -> Consistency {
        Consistency::Store
    }

    /// One `SELECT` of every row, on its own connection on the blocking pool: in WAL mode one
    /// statement reads one snapshot of the file while writers go on.
    async fn snapshot(&self) -> Result<Snapshot> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = open_connection(&path)?;
            let mut stmt = conn
                .prepare("SELECT ns, key, value FROM kv ORDER BY ns, key")
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })
                .map_err(unavailable)?;
            let mut records = Vec::new();
            for row in rows {
                let (ns, key, value) = row.map_err(unavailable)?;
                let ns = Namespace::parse(&ns).ok_or_else(|| Error::Corrupt {
                    backend: BACKEND,
                    reason: format!("a row in an unknown namespace {ns:?}"),
                })?;
                records.push((ns, key, value));
            }
            Ok(super::sorted(records))
        })
        .await
        .map_err(unavailable)?
    }

    async fn revision(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        let key = key.to_string();
        self.read(move |c| {
            // The namespace is in the text, not bound: SQLite re-plans a statement on every new
            // binding of a parameter that constrains part of an index (STAT4), and this read
            // runs on every workload request.
            c.prepare_cached(&format!(
                "SELECT revision FROM kv WHERE ns = '{}' AND key = ?1",
                ns.as_str()
            ))?
            .query_row(params![key], |r| {
                Ok(Revision(r.get::<_, i64>(0)?.to_string()))
            })
            .optional()
        })
        .await
    }

    async fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Written> {
        let key = key.to_string();
        let expected = match &expect {
            Expect::Absent => None,
            Expect::Revision(rev) => match parse_revision(rev) {
                Some(n) => Some(n),
                // Not a revision this store ever handed out: the condition cannot hold.
                None => return Ok(Written::Conflict),
            },
        };
        self.write(move |tx| {
            let next: i64 = tx
                .prepare_cached(
                    "UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value",
                )?
                .query_row([], |r| r.get(0))?;
            let changed = match expected {
                None => tx
                    .prepare_cached(
                        "INSERT INTO kv (ns, key, value, revision) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (ns, key) DO NOTHING",
                    )?
                    .execute(params![ns.as_str(), key, value, next])?,
                Some(rev) => tx
                    .prepare_cached(
                        "UPDATE kv SET value = ?3, revision = ?4
                         WHERE ns = ?1 AND key = ?2 AND revision = ?5",
                    )?
                    .execute(params![ns.as_str(), key, value, next, rev])?,
            };
            Ok(if changed == 1 {
                Written::Done(Revision(next.to_string()))
            } else {
                Written::Conflict
            })
        })
        .await
    }

    async fn delete(&self, ns: Namespace, key: &str, revision: &Revision) -> Result<bool> {
        let Some(rev) = parse_revision(revision) else {
            return Ok(false);
        };
        let key = key.to_string();
        self.write(move |tx| {
            let n = tx
                .prepare_cached("DELETE FROM kv WHERE ns = ?1 AND key = ?2 AND revision = ?3")?
                .execute(params![ns.as_str(), key, rev])?;
            Ok(n == 1)
        })
        .await
    }

    async fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.to_string();
        self.read(move |c| {
            // Range scan on the primary key; `substr` keeps LIKE's wildcards out of it.
            let mut stmt = c.prepare_cached(&format!(
                "SELECT key FROM kv WHERE ns = '{}' AND key >= ?1 AND substr(key, 1, length(?1)) = ?1
                 ORDER BY key",
                ns.as_str()
            ))?;
            let rows = stmt.query_map(params![prefix], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }
}

fn get_entry(c: &Connection, ns: Namespace, key: &str) -> rusqlite::Result<Option<Entry>> {
    c.prepare_cached("SELECT value, revision FROM kv WHERE ns = ?1 AND key = ?2")?
        .query_row(params![ns.as_str(), key], |r| {
            Ok(Entry {
                value: r.get(0)?,
                revision: Revision(r.get::<_, i64>(1)?.to_string()),
            })
        })
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema version, whether `kv` is a rowid table, and its columns in order.
    fn schema(path: &Path) -> (i64, bool, Vec<String>) {
        let c = Connection::open(path).unwrap();
        let version = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        let sql: String = c
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'kv'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let mut stmt = c
            .prepare("SELECT name FROM pragma_table_info('kv')")
            .unwrap();
        let names = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<Vec<String>>>()
            .unwrap();
        (version, !sql.contains("WITHOUT ROWID"), names)
    }

    fn current() -> (i64, bool, Vec<String>) {
        let names = ["ns", "key", "revision", "value"];
        (2, true, names.map(String::from).to_vec())
    }

    #[tokio::test]
    async fn kv_is_a_rowid_table_with_the_revision_before_the_value() {
        let dir = tempfile::tempdir().unwrap();
        SqliteStore::open(dir.path()).await.unwrap();
        assert_eq!(schema(&dir.path().join("spike.db")), current());
    }

    #[tokio::test]
    async fn a_schema_1_file_is_upgraded_keeping_rows_and_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spike.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE kv (ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                 revision INTEGER NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID;
             CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
             INSERT INTO sequence (id, value) VALUES (1, 7);
             INSERT INTO kv (ns, key, value, revision) VALUES
                 ('secrets', 'a', x'0102', 5), ('system', 'policy-book', x'03', 7);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(old);
        for _ in 0..2 {
            let s = SqliteStore::open(dir.path()).await.unwrap();
            let a = s.get(Namespace::Secrets, "a").await.unwrap().unwrap();
            assert_eq!((a.value, a.revision), (vec![1, 2], Revision("5".into())));
            assert_eq!(
                s.revision(Namespace::System, "policy-book").await.unwrap(),
                Some(Revision("7".into()))
            );
            assert_eq!(schema(&path), current());
        }
        // The sequence carried over: the next write gets a revision never handed out.
        let s = SqliteStore::open(dir.path()).await.unwrap();
        let rev = Revision("5".into());
        assert_eq!(
            s.put(Namespace::Secrets, "a", vec![9], Expect::Revision(rev))
                .await
                .unwrap(),
            Written::Done(Revision("8".into()))
        );
    }
}
