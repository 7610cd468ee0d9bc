//! Backing stores: where Nexus keeps everything that outlives a process.
//!
//! # Security contract
//! A store only ever sees what Nexus has already sealed (DESIGN.md §4): it must never be handed
//! a plaintext secret value or key. It is trusted for availability and for the atomicity of
//! its conditional writes, not for confidentiality or integrity — a row that was tampered with
//! or copied elsewhere fails to open in [`crate::crypto`].
//!
//! # Consistency contract
//! Nexus keeps no cache: every request reads and writes the store, so any number of Nexus
//! instances on one store agree. The store's own conditional writes arbitrate between them:
//! [`Store::create_verifier`] is create-if-absent, so when several instances start on an empty
//! store exactly one root key wins. A write returns only once the store says it is durable.
//!
//! Every backend implements [`Store`]; [`AnyStore`] picks one at run time, and the conformance
//! suite in `tests/` runs the same checks against each.

pub mod memory;
pub mod sqlite;

use std::future::Future;

use crate::config::Backend;
use crate::crypto::Verifier;

/// Why a store operation failed. Reasons name the backend and never carry secret values or
/// connection credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store cannot be reached or refused to work; retrying later may succeed.
    #[error("{backend} store unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    /// The store answered with data that does not have the expected shape.
    #[error("{backend} store holds malformed data: {reason}")]
    Corrupt {
        backend: &'static str,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The operations Nexus needs from a backing store.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and `/health` (`sqlite`, `memory`, ...).
    fn backend(&self) -> &'static str;

    /// Succeeds when the store answers; used by `/health` and the watchdog.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// The root-key verifier, if a root key was ever created for this store.
    fn verifier(&self) -> impl Future<Output = Result<Option<Verifier>>> + Send;

    /// Stores `verifier` only if the store has none yet. Returns `true` when this call created
    /// it and `false` when another writer got there first (the existing one is left untouched).
    fn create_verifier(&self, verifier: &Verifier) -> impl Future<Output = Result<bool>> + Send;
}

/// The store chosen by configuration.
pub enum AnyStore {
    Memory(memory::MemoryStore),
    Sqlite(sqlite::SqliteStore),
}

impl AnyStore {
    /// Opens the backend named by `SPIKE_NEXUS_BACKEND_STORE`.
    pub async fn open(backend: &Backend) -> Result<AnyStore> {
        Ok(match backend {
            Backend::Memory => AnyStore::Memory(memory::MemoryStore::default()),
            Backend::Sqlite { data_dir } => {
                AnyStore::Sqlite(sqlite::SqliteStore::open(data_dir).await?)
            }
        })
    }
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Memory($store) => $call,
            AnyStore::Sqlite($store) => $call,
        }
    };
}

impl Store for AnyStore {
    fn backend(&self) -> &'static str {
        delegate!(self, s => s.backend())
    }

    async fn ping(&self) -> Result<()> {
        delegate!(self, s => s.ping().await)
    }

    async fn verifier(&self) -> Result<Option<Verifier>> {
        delegate!(self, s => s.verifier().await)
    }

    async fn create_verifier(&self, verifier: &Verifier) -> Result<bool> {
        delegate!(self, s => s.create_verifier(verifier).await)
    }
}
