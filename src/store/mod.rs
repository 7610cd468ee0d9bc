//! Backing stores: where Nexus keeps everything that outlives a process.
//!
//! # Security contract
//! A store only ever sees what Nexus has already sealed (DESIGN.md §4): it must never be handed
//! a plaintext secret value or key. It is trusted for availability and for the atomicity of
//! its conditional writes, not for confidentiality or integrity — a row that was tampered with
//! or copied elsewhere fails to open in [`crate::crypto`].
//!
//! # Consistency contract
//! Nexus uses nothing it read earlier without checking it against the store in the same
//! request: secrets are read on every request, and the decoded policy book only after
//! [`Store::revision`] says it is still the stored one. So any number of Nexus instances on
//! one store agree. The store's own conditional writes arbitrate between them: every
//! [`Store::put`] is create-if-absent or compare-and-set on a [`Revision`], so two writers
//! never both succeed from the same starting point, and the root-key verifier is
//! create-if-absent, so when several instances start on an empty store exactly one key wins.
//! A write returns only once the store says it is durable.
//!
//! Every backend implements [`Store`]; [`AnyStore`] picks one at run time, and the conformance
//! suite in `tests/` runs the same checks against each.

pub mod config;
pub mod memory;
pub mod postgres;
pub mod s3;
pub mod sqlite;

use std::future::Future;

use crate::crypto::Verifier;
use crate::platform::metrics::{StoreOp, StoreOps, StoreResult};
pub use config::{Backend, S3Config, S3Credentials, SecretUrl};

/// Why a store operation failed. Reasons name the backend and never carry secret values or
/// connection credentials.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store cannot be reached or refused to work; retrying later may succeed.
    #[error("{backend} store unavailable: {reason}")]
    Unavailable {
        /// The backend's name.
        backend: &'static str,
        /// What went wrong (no secrets, no credentials).
        reason: String,
    },
    /// The store cannot give the guarantees Nexus relies on (an S3 server that ignores
    /// conditional writes): a configuration error, which waiting does not fix. Nexus refuses to
    /// use such a store rather than lose updates.
    #[error("{backend} store refused: {reason}")]
    Incompatible {
        /// The backend's name.
        backend: &'static str,
        /// What the store failed to do, and what to do about it.
        reason: String,
    },
    /// The store's settings cannot work (a malformed database URL): a configuration error,
    /// not an outage, so Nexus stops at start instead of waiting.
    #[error("{backend} store settings: {reason}")]
    Config {
        /// The backend's name.
        backend: &'static str,
        /// What is wrong with them (never a credential).
        reason: String,
    },
    /// The store answered with data that does not have the expected shape.
    #[error("{backend} store holds malformed data: {reason}")]
    Corrupt {
        /// The backend's name.
        backend: &'static str,
        /// What is malformed.
        reason: String,
    },
}

/// Result of a store operation.
pub type Result<T> = std::result::Result<T, Error>;

/// A store's namespaces: one key space each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    /// Secret records, keyed by secret path.
    Secrets,
    /// Per-name policy rows of versions before the policy book; read only to move them into
    /// it, then emptied.
    Policies,
    /// Deployment-wide records: the root-key verifier, the policy book.
    System,
}

impl Namespace {
    /// The namespace's name in the store (table value, key prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Secrets => "secrets",
            Namespace::Policies => "policies",
            Namespace::System => "system",
        }
    }

    /// Every namespace, in the order a snapshot lists them.
    pub const ALL: [Namespace; 3] = [Namespace::Secrets, Namespace::Policies, Namespace::System];

    /// The namespace named `name` ([`Namespace::as_str`]).
    pub fn parse(name: &str) -> Option<Namespace> {
        Namespace::ALL.into_iter().find(|ns| ns.as_str() == name)
    }
}

/// How consistent a [`Snapshot`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// The whole store as of one instant (one SQL statement or transaction).
    Store,
    /// Each record as of its own read: a write that lands during the export may be in it for
    /// some records and not others (object stores).
    Record,
}

impl Consistency {
    /// The name written in a backup's header.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Store => "store",
            Consistency::Record => "record",
        }
    }
}

/// Every record of a store, read for a backup: sealed values as stored, sorted by namespace
/// ([`Namespace::ALL`] order) then key.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `(namespace, key, value)`.
    pub records: Vec<(Namespace, String, Vec<u8>)>,
}

/// Sorts `records` into a snapshot's order.
fn sorted(mut records: Vec<(Namespace, String, Vec<u8>)>) -> Snapshot {
    records.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Snapshot { records }
}

/// An opaque token naming one stored version of a value: a counter in SQL stores, an ETag in
/// object stores. Two reads return equal revisions only if nothing was written in between
/// (for an ETag: or the same bytes were written again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision(pub String);

/// A stored value and its revision.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The sealed value.
    pub value: Vec<u8>,
    /// Its revision, for a later compare-and-set.
    pub revision: Revision,
}

/// The condition a conditional write must meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist (create-if-absent).
    Absent,
    /// The key must still be at this revision (compare-and-set).
    Revision(Revision),
}

/// What a conditional write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// The value is durably stored at this new revision.
    Done(Revision),
    /// The condition did not hold: someone else wrote first. Nothing changed.
    Conflict,
}

/// The key of the root-key verifier in [`Namespace::System`].
pub const VERIFIER_KEY: &str = "root-key-verifier";

/// The key in [`Namespace::System`] that `spike backup restore` writes first and removes last:
/// while it exists the store holds part of a restore, and Nexus must neither create a root key
/// nor serve (`restore_incomplete`).
pub const RESTORE_MARKER_KEY: &str = "restore-in-progress";

/// The operations Nexus needs from a backing store: a small key-value interface whose writes
/// are conditional, so that concurrent writers — in one process or many — never lose updates.
///
/// # Security rules for implementations
/// - A store is handed only sealed values and never a key: it must not try to interpret,
///   cache or log values, and its errors carry no value and no credential (connection URLs
///   and S3 secrets stay out of every message).
/// - A store is trusted for availability and for the atomicity of its conditional writes only.
///   Nexus authenticates what it reads (AEAD with associated data, record MACs), so a store
///   must never "repair" or rewrite a value on its own: that would look like tampering.
/// - [`Store::put`] and [`Store::delete`] must be linearisable per key across every Nexus
///   instance on the store: two writers from the same revision never both succeed, and a write
///   is acknowledged only once it is durable. A store that cannot promise this (an S3 server
///   that ignores conditional headers) must refuse to open, with [`Error::Incompatible`],
///   rather than lose updates.
/// - Reads never return data older than an acknowledged write (no stale replicas).
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and `/health` (`sqlite`, `memory`, ...).
    fn backend(&self) -> &'static str;

    /// Succeeds when the store answers; used by `/health` and the watchdog.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// The value at `key`, with its revision.
    fn get(&self, ns: Namespace, key: &str) -> impl Future<Output = Result<Option<Entry>>> + Send;

    /// The revision of the value at `key`, without the value: the cheapest read that tells
    /// whether a value changed since it was read (an indexed `SELECT` of one integer, an S3
    /// `HEAD`). Nexus reads the policy book's revision on every workload request.
    fn revision(
        &self,
        ns: Namespace,
        key: &str,
    ) -> impl Future<Output = Result<Option<Revision>>> + Send;

    /// Writes `value` at `key` only if `expect` holds; returns once the write is durable.
    /// [`Written::Conflict`] (and nothing changed) whenever another write got in first.
    fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> impl Future<Output = Result<Written>> + Send;

    /// Removes `key` if it is still at `revision`. `Ok(false)` when it is gone or changed.
    fn delete(
        &self,
        ns: Namespace,
        key: &str,
        revision: &Revision,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The keys of `ns` that start with `prefix`, sorted.
    fn list(&self, ns: Namespace, prefix: &str)
    -> impl Future<Output = Result<Vec<String>>> + Send;

    /// How consistent [`Store::snapshot`] is for this backend.
    fn consistency(&self) -> Consistency {
        Consistency::Record
    }

    /// Every record of the store, for a backup. This default reads each key of each
    /// namespace in turn, so it is consistent per record only ([`Consistency::Record`]); SQL
    /// backends read the whole store in one statement instead. A key deleted between the
    /// listing and its read is left out.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot>> + Send {
        async move {
            let mut records = Vec::new();
            for ns in Namespace::ALL {
                for key in self.list(ns, "").await? {
                    if let Some(entry) = self.get(ns, &key).await? {
                        records.push((ns, key, entry.value));
                    }
                }
            }
            Ok(sorted(records))
        }
    }

    /// The root-key verifier, if a root key was ever created for this store.
    fn verifier(&self) -> impl Future<Output = Result<Option<Verifier>>> + Send {
        async move {
            let Some(entry) = self.get(Namespace::System, VERIFIER_KEY).await? else {
                return Ok(None);
            };
            parse_verifier(&entry.value)
                .map(Some)
                .map_err(|reason| Error::Corrupt {
                    backend: self.backend(),
                    reason,
                })
        }
    }

    /// Stores `verifier` only if the store has none yet. Returns `true` when this call created
    /// it and `false` when another writer got there first (the existing one is left untouched).
    fn create_verifier(&self, verifier: &Verifier) -> impl Future<Output = Result<bool>> + Send {
        let value = encode_verifier(verifier);
        async move {
            let written = self
                .put(Namespace::System, VERIFIER_KEY, value, Expect::Absent)
                .await?;
            Ok(matches!(written, Written::Done(_)))
        }
    }
}

/// The value stored at [`VERIFIER_KEY`] for `verifier`.
pub fn encode_verifier(verifier: &Verifier) -> Vec<u8> {
    serde_json::to_vec(&StoredVerifier::from(verifier.clone())).unwrap_or_default()
}

/// Decodes the value stored at [`VERIFIER_KEY`].
pub fn parse_verifier(value: &[u8]) -> std::result::Result<Verifier, String> {
    serde_json::from_slice::<StoredVerifier>(value)
        .map(Verifier::from)
        .map_err(|e| format!("root-key verifier: {e}"))
}

/// The verifier as stored: JSON with the sealed value in base64.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredVerifier {
    key_id: String,
    #[serde(with = "crate::protocol::nexus::b64")]
    sealed: Vec<u8>,
}

impl From<Verifier> for StoredVerifier {
    fn from(v: Verifier) -> Self {
        StoredVerifier {
            key_id: v.key_id,
            sealed: v.sealed,
        }
    }
}

impl From<StoredVerifier> for Verifier {
    fn from(v: StoredVerifier) -> Self {
        Verifier {
            key_id: v.key_id,
            sealed: v.sealed,
        }
    }
}

/// The store chosen by configuration. Clones share one store (connections, pools).
#[derive(Clone)]
pub enum AnyStore {
    /// In memory.
    Memory(memory::MemoryStore),
    /// SQLite.
    Sqlite(sqlite::SqliteStore),
    /// S3-compatible object storage.
    S3(s3::S3Store),
    /// PostgreSQL.
    Postgres(postgres::PostgresStore),
}

impl AnyStore {
    /// Opens the backend named by `SPIKE_NEXUS_BACKEND_STORE`.
    pub async fn open(backend: &Backend) -> Result<AnyStore> {
        Ok(match backend {
            Backend::Memory => AnyStore::Memory(memory::MemoryStore::default()),
            Backend::Sqlite { data_dir } => {
                AnyStore::Sqlite(sqlite::SqliteStore::open(data_dir).await?)
            }
            Backend::S3(cfg) => {
                let store = s3::S3Store::open(cfg)?;
                // Proven before anything is written: a server that ignores conditional
                // writes is refused here, not found out by a lost update.
                store.check_conditional_writes().await?;
                AnyStore::S3(store)
            }
            Backend::Postgres { url } => {
                AnyStore::Postgres(postgres::PostgresStore::open(url.expose()).await?)
            }
        })
    }
}

/// Awaits the same call on whichever backend this is. The network backends' futures are
/// boxed: an aws-sdk-s3 call's state runs to kilobytes, and an unboxed one would make every
/// request's future that size (and copy it) whatever the backend.
macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Memory($store) => $call.await,
            AnyStore::Sqlite($store) => $call.await,
            AnyStore::S3($store) => Box::pin($call).await,
            AnyStore::Postgres($store) => Box::pin($call).await,
        }
    };
}

impl Store for AnyStore {
    fn backend(&self) -> &'static str {
        match self {
            AnyStore::Memory(s) => s.backend(),
            AnyStore::Sqlite(s) => s.backend(),
            AnyStore::S3(s) => s.backend(),
            AnyStore::Postgres(s) => s.backend(),
        }
    }

    async fn ping(&self) -> Result<()> {
        delegate!(self, s => s.ping())
    }

    async fn get(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        delegate!(self, s => s.get(ns, key))
    }

    async fn revision(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        delegate!(self, s => s.revision(ns, key))
    }

    async fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Written> {
        delegate!(self, s => s.put(ns, key, value, expect))
    }

    async fn delete(&self, ns: Namespace, key: &str, revision: &Revision) -> Result<bool> {
        delegate!(self, s => s.delete(ns, key, revision))
    }

    async fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        delegate!(self, s => s.list(ns, prefix))
    }

    fn consistency(&self) -> Consistency {
        match self {
            AnyStore::Memory(s) => s.consistency(),
            AnyStore::Sqlite(s) => s.consistency(),
            AnyStore::S3(s) => s.consistency(),
            AnyStore::Postgres(s) => s.consistency(),
        }
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        delegate!(self, s => s.snapshot())
    }
}

/// A store whose every operation is counted and timed by backend, operation and result
/// (`spike_store_*`, [`StoreOps`]); otherwise exactly the store it wraps. Nexus serves from
/// one of these, so every backend is measured at the same boundary.
#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    ops: StoreOps,
}

impl<S: Store> Measured<S> {
    /// `inner`, measured into `ops`.
    pub fn new(inner: S, ops: StoreOps) -> Measured<S> {
        Measured { inner, ops }
    }

    /// Runs one operation of the inner store and records how it ended; `conflict` says when an
    /// answer means another writer got in first.
    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T>>,
        conflict: impl FnOnce(&T) -> bool,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let result = call.await;
        let outcome = match &result {
            Ok(v) if conflict(v) => StoreResult::Conflict,
            Ok(_) => StoreResult::Ok,
            Err(Error::Unavailable { .. }) => StoreResult::Unavailable,
            Err(Error::Corrupt { .. }) => StoreResult::Corrupt,
            Err(Error::Incompatible { .. } | Error::Config { .. }) => StoreResult::Incompatible,
        };
        self.ops
            .record(self.inner.backend(), op, outcome, started.elapsed());
        result
    }
}

impl<S: Store> Store for Measured<S> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<()> {
        self.timed(StoreOp::Ping, self.inner.ping(), |_| false)
            .await
    }

    async fn get(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        self.timed(StoreOp::Get, self.inner.get(ns, key), |_| false)
            .await
    }

    async fn revision(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        self.timed(StoreOp::Revision, self.inner.revision(ns, key), |_| false)
            .await
    }

    async fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Written> {
        self.timed(StoreOp::Put, self.inner.put(ns, key, value, expect), |w| {
            *w == Written::Conflict
        })
        .await
    }

    async fn delete(&self, ns: Namespace, key: &str, revision: &Revision) -> Result<bool> {
        self.timed(
            StoreOp::Delete,
            self.inner.delete(ns, key, revision),
            |deleted| !deleted,
        )
        .await
    }

    async fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        self.timed(StoreOp::List, self.inner.list(ns, prefix), |_| false)
            .await
    }

    fn consistency(&self) -> Consistency {
        self.inner.consistency()
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        self.inner.snapshot().await
    }
}
