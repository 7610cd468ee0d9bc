//! `spike nexus`: the secrets API server.
//!
//! Nexus is stateless. It starts without a key, answers `503` until [`keepers`] has rebuilt the
//! root key from Keeper shards (or created it, exactly once, for a new deployment), and then
//! serves every request from the backing store. Its in-memory state is [`Nexus`]: the key
//! material, the lifecycle phase that `/health` reports, and the decoded policy book, which a
//! request uses only after checking its revision against the store ([`book`]).
//!
//! - [`keepers`]: collect shards, check them against the store's verifier, create the first
//!   key, push shards back to Keepers periodically.
//! - [`routes`]: the HTTP surface (SPIKE's routes, `/health`), identity and policy checks,
//!   audit lines.
//! - [`secrets`], [`policy`], [`cipher`]: what the routes do, on the store and the keys.
//! - [`book`]: every policy in one sealed record, and this instance's validated copy.

pub mod authz;
pub mod book;
pub mod cipher;
pub mod config;
pub mod keepers;
pub mod policy;
pub mod recovery;
pub mod routes;
pub mod secrets;
pub mod writers;

use std::sync::{Arc, RwLock};

use hyper::Uri;

use crate::crypto::{AeadKey, RootKey, Share};
use crate::identity::{ClientAuth, ExpectedPeer, Role};
use crate::protocol::nexus::ErrorCode;
use crate::store::{AnyStore, Store};
use crate::transport;
pub use config::NexusConfig;

/// Why Nexus could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Start(#[from] transport::StartError),
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
    #[error("cannot open the backing store: {0}")]
    Store(#[from] crate::store::Error),
}

/// Why an API request failed. The message goes to the log; the caller sees only [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not authorised")]
    Unauthorized,
    #[error("not found")]
    NotFound,
    #[error("check-and-set failed: expected version {expected}, current is {current}")]
    CasMismatch { expected: u64, current: u64 },
    #[error("request body over the limit")]
    TooLarge,
    #[error("root key not loaded")]
    NotReady,
    #[error("gave up after too many concurrent writers")]
    Contended,
    #[error("{0}")]
    Store(#[from] crate::store::Error),
    #[error("crypto: {0}")]
    Crypto(#[from] crate::crypto::Error),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest(_) => ErrorCode::ApiBadRequest,
            ApiError::Unauthorized => ErrorCode::AccessUnauthorized,
            ApiError::NotFound => ErrorCode::ApiNotFound,
            ApiError::CasMismatch { .. } => ErrorCode::ApiConflict,
            ApiError::TooLarge => ErrorCode::ApiRequestTooLarge,
            ApiError::NotReady => ErrorCode::StateNotReady,
            ApiError::Contended => ErrorCode::StoreUnavailable,
            ApiError::Store(crate::store::Error::Unavailable { .. }) => ErrorCode::StoreUnavailable,
            ApiError::Store(_) | ApiError::Crypto(_) | ApiError::Internal(_) => {
                ErrorCode::ApiInternalError
            }
        }
    }
}

/// Where Nexus is in the root-key lifecycle (DESIGN.md §1.4). `/health` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Fewer than `threshold` Keepers have answered with a shard so far.
    AwaitingKeepers { have: usize, need: usize },
    /// A root key exists (the store holds its verifier) but the Keepers no longer hold enough
    /// of it: an operator must restore from recovery shards. Nexus never creates a key here.
    AwaitingRestore,
    /// The store could not be read while looking for the verifier.
    StoreUnavailable,
    /// The root key is loaded.
    Ready,
}

impl Phase {
    /// A line for `systemctl status`.
    pub fn describe(&self) -> String {
        match self {
            Phase::AwaitingKeepers { have, need } => {
                format!("awaiting keepers ({have}/{need} shards)")
            }
            Phase::AwaitingRestore => "awaiting restore from recovery shards".into(),
            Phase::StoreUnavailable => "store unavailable".into(),
            Phase::Ready => "ready".into(),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::AwaitingKeepers { .. } => "awaiting_keepers",
            Phase::AwaitingRestore => "awaiting_restore",
            Phase::StoreUnavailable => "store_unavailable",
            Phase::Ready => "ready",
        }
    }
}

/// Key material derived once when the root key is loaded.
pub struct Keys {
    /// The root key itself; zeroized on drop.
    pub root: RootKey,
    /// Public fingerprint of the root key, for logs and `/health`.
    pub key_id: String,
    /// The Keeper shards of this key, index order (`shards[i]` has index `i + 1`). Shares are a
    /// pure function of the key, so computing them once is not a cache of state.
    pub shards: Vec<Share>,
    /// Seals secret versions at rest.
    pub secrets: Arc<AeadKey>,
    /// Seals policies at rest.
    pub policies: AeadKey,
    /// The cipher API's key.
    pub cipher: AeadKey,
}

/// Nexus's in-memory state, shared by the routes and the Keeper task.
pub struct Nexus {
    /// The store every request reads and writes.
    pub store: AnyStore,
    /// Queues of this instance's secret writes to the store.
    pub writers: secrets::Writers,
    /// This instance's copy of the policy book, checked against the store on every use.
    pub policies: Arc<book::Policies>,
    /// Validated configuration.
    pub config: NexusConfig,
    /// The loaded key, once there is one.
    keys: RwLock<Option<Arc<Keys>>>,
    /// Lifecycle phase while there is no key.
    phase: RwLock<Phase>,
    /// Keepers whose shard did not match the loaded key at recovery (URL list), for `/health`.
    inconsistent: RwLock<Vec<String>>,
    /// The client that talks to Keepers, set when the Keeper task starts.
    keeper_client: std::sync::OnceLock<crate::client::keeper::KeeperClient>,
    /// Recovery shards submitted by operators, until `threshold` of them rebuild the key.
    pending_restore: std::sync::Mutex<Vec<Share>>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Values behind these locks are replaced whole, so a poisoned lock still holds a
    // consistent value.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Nexus {
    pub fn new(config: NexusConfig, store: AnyStore) -> Nexus {
        let need = usize::from(config.threshold);
        Nexus {
            store,
            writers: secrets::Writers::default(),
            policies: Arc::default(),
            config,
            keys: RwLock::new(None),
            phase: RwLock::new(Phase::AwaitingKeepers { have: 0, need }),
            inconsistent: RwLock::new(Vec::new()),
            keeper_client: std::sync::OnceLock::new(),
            pending_restore: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The loaded key material, if any.
    pub fn keys(&self) -> Option<Arc<Keys>> {
        read(&self.keys).clone()
    }

    pub fn phase(&self) -> Phase {
        read(&self.phase).clone()
    }

    fn set_phase(&self, phase: Phase) {
        let mut current = write(&self.phase);
        if *current != phase {
            tracing::info!(status = phase.as_str(), detail = ?phase, "nexus status changed");
            crate::platform::systemd::status(&phase.describe());
            *current = phase;
        }
    }

    /// Installs the root key and derives its sub-keys. If a key is already loaded, that one is
    /// kept and returned, so two paths racing to load it cannot replace each other's.
    fn install(&self, root: RootKey) -> Result<Arc<Keys>, crate::crypto::Error> {
        let shards = crate::crypto::split(&root, self.config.threshold, self.config.shares)?;
        let key_id = root.key_id();
        let keys = Arc::new(Keys {
            secrets: Arc::new(root.derive("spike/secrets/v1")),
            policies: root.derive("spike/policies/v1"),
            cipher: root.derive("spike/cipher/v1"),
            root,
            key_id,
            shards,
        });
        let mut slot = write(&self.keys);
        if let Some(existing) = slot.as_ref() {
            return Ok(Arc::clone(existing));
        }
        crate::platform::hardening::lock(&*keys, "root key");
        crate::platform::hardening::lock_slice(&keys.shards, "keeper shards");
        *slot = Some(Arc::clone(&keys));
        drop(slot);
        self.set_phase(Phase::Ready);
        self.start_policies(&keys);
        Ok(keys)
    }

    /// Once the key is loaded: creates the policy book, or moves an earlier version's per-name
    /// policy rows into it, and removes rows left over ([`book::Policies::start`]). In the
    /// background, retried until it succeeds; requests that need the book before then create
    /// it themselves.
    fn start_policies(&self, keys: &Arc<Keys>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, keys, policies) = (
            self.store.clone(),
            Arc::clone(keys),
            Arc::clone(&self.policies),
        );
        runtime.spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                match policies.start(&store, &keys.policies).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot set up the policy book yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                    }
                }
            }
        });
    }

    pub fn inconsistent_keepers(&self) -> Vec<String> {
        read(&self.inconsistent).clone()
    }

    fn set_inconsistent(&self, urls: Vec<String>) {
        *write(&self.inconsistent) = urls;
    }

    /// The Keeper URLs, in Shamir index order.
    pub fn peers(&self) -> &[Uri] {
        &self.config.keeper_peers
    }
}

/// Runs Nexus until `shutdown` completes.
pub async fn run(
    config: NexusConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    crate::platform::hardening::harden_process();
    let td = config.identity.trust_domain.clone();
    let own = transport::OwnIdentity::load(&config.identity, Role::Nexus)?;
    let server_tls = crate::identity::server_config(&own.source, &td, ClientAuth::Optional)?;
    let keeper_tls = crate::identity::client_config(
        Some(&own.source),
        None,
        &td,
        ExpectedPeer::Role(Role::Keeper),
    )?;
    let store = AnyStore::open(&config.backend).await?;
    let (listener, addr) = transport::bind(config.listen).await?;
    let nexus = Arc::new(Nexus::new(config, store));
    tracing::info!(
        %addr,
        id = %own.id,
        backend = nexus.store.backend(),
        keepers = nexus.peers().len(),
        threshold = nexus.config.threshold,
        "nexus listening on {addr}"
    );
    crate::platform::systemd::ready(&nexus.phase().describe());
    let watchdog = {
        let nexus = Arc::clone(&nexus);
        crate::platform::systemd::spawn_watchdog(move || {
            let nexus = Arc::clone(&nexus);
            async move {
                match nexus.store.ping().await {
                    Ok(()) => {
                        if nexus.keys().is_some() {
                            crate::platform::systemd::status("ready");
                        }
                        true
                    }
                    Err(e) => {
                        crate::platform::systemd::status(&format!("store unavailable: {e}"));
                        false
                    }
                }
            }
        })
    };
    let sync = keepers::spawn(Arc::clone(&nexus), keeper_tls);
    let handler = Arc::new(routes::Api::new(Arc::clone(&nexus)));
    transport::serve(
        listener,
        server_tls,
        handler,
        nexus.config.server.clone(),
        shutdown,
    )
    .await;
    drop(sync);
    drop(watchdog);
    tracing::info!("nexus stopped");
    Ok(())
}
