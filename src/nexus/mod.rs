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
//! - [`keyring`]: the data keys, sealed under the root key in the store (decision 33).
//! - [`audit`]: the audit file, one chained and MACed record per request.
//! - [`rekey`]: a new root key and Keeper sharing while every instance serves (decision 34).

pub mod audit;
pub mod authz;
pub mod book;
pub mod cipher;
pub mod config;
pub mod keepers;
pub mod keyring;
pub mod policy;
pub mod recovery;
pub mod rekey;
pub mod routes;
pub mod secrets;
pub mod writers;

use std::sync::{Arc, RwLock};

use hyper::Uri;

use crate::crypto::shamir::ShardDerivation;
use crate::crypto::{AeadKey, LockedShares, RootKey, Share};
use crate::identity::{ClientAuth, ExpectedPeer, Role};
use crate::platform::metrics::{KeyState, NexusMetrics};
use crate::protocol::nexus::ErrorCode;
use crate::store::{AnyStore, Measured, Store};
use crate::transport;
pub use config::NexusConfig;

/// Why Nexus could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listener or this instance's identity could not be set up.
    #[error("{0}")]
    Start(#[from] transport::StartError),
    /// This instance's SVID could not be loaded.
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
    /// The backing store could not be opened.
    #[error("cannot open the backing store: {0}")]
    Store(#[from] crate::store::Error),
    /// `SPIKE_NEXUS_AUDIT_FILE` could not be opened.
    #[error("cannot open the audit file {path}: {error}")]
    Audit {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
}

/// Why an API request failed. The message goes to the log; the caller sees only [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Malformed or invalid input (400); the reason goes to the log only.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller may not do this (401).
    #[error("not authorised")]
    Unauthorized,
    /// No such secret, version or policy (404).
    #[error("not found")]
    NotFound,
    /// `cas` did not match (409).
    #[error("check-and-set failed: expected version {expected}, current is {current}")]
    CasMismatch {
        /// The version the caller expected.
        expected: u64,
        /// The version that is current.
        current: u64,
    },
    /// The body is over the limit (413).
    #[error("request body over the limit")]
    TooLarge,
    /// The root key is not loaded (503).
    #[error("root key not loaded")]
    NotReady,
    /// Too many concurrent writers of one path (500).
    #[error("gave up after too many concurrent writers")]
    Contended,
    /// The store failed (503 or 500).
    #[error("{0}")]
    Store(#[from] crate::store::Error),
    /// Sealing or opening failed (500).
    #[error("crypto: {0}")]
    Crypto(#[from] crate::crypto::Error),
    /// Anything else (500); the message goes to the log only.
    #[error("{0}")]
    Internal(String),
    /// The request's audit record could not be written (fail-closed): 503.
    #[error("{0}")]
    Audit(#[from] audit::Unavailable),
    /// An operator route refused or failed, with a reason for the operator (superuser routes
    /// only: the reason names keys by id and Keepers by URL, never anything secret).
    #[error("{reason}")]
    Operator {
        /// The error code (and so the status).
        code: ErrorCode,
        /// What the operator is told.
        reason: String,
    },
}

impl Error {
    /// True when the SPIFFE agent gave Nexus no identity before the deadline.
    pub fn is_agent_unavailable(&self) -> bool {
        match self {
            Error::Start(e) => e.is_agent_unavailable(),
            Error::Identity(e) => e.is_agent_unavailable(),
            _ => false,
        }
    }

    /// True when the configuration cannot work and waiting will not change that: a store
    /// proven unsafe to use (an S3 server that ignores conditional writes) or settings that
    /// cannot work (a malformed database URL). Exit status 2.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Error::Store(
                crate::store::Error::Incompatible { .. } | crate::store::Error::Config { .. }
            )
        )
    }
}

impl ApiError {
    /// An [`ApiError::Operator`]: `code`, with `reason` told to the operator.
    pub fn operator(code: ErrorCode, reason: impl Into<String>) -> ApiError {
        ApiError::Operator {
            code,
            reason: reason.into(),
        }
    }

    /// The code (and status) the caller is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest(_) => ErrorCode::ApiBadRequest,
            ApiError::Unauthorized => ErrorCode::AccessUnauthorized,
            ApiError::NotFound => ErrorCode::ApiNotFound,
            ApiError::CasMismatch { .. } => ErrorCode::ApiConflict,
            ApiError::TooLarge => ErrorCode::ApiRequestTooLarge,
            ApiError::NotReady => ErrorCode::StateNotReady,
            ApiError::Contended => ErrorCode::StoreUnavailable,
            ApiError::Audit(_) => ErrorCode::AuditUnavailable,
            ApiError::Operator { code, .. } => *code,
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
    AwaitingKeepers {
        /// Shards in hand.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// A root key exists (the store holds its verifier) but the Keepers no longer hold enough
    /// of it: an operator must restore from recovery shards. Nexus never creates a key here.
    AwaitingRestore,
    /// The store could not be read while looking for the verifier.
    StoreUnavailable,
    /// The store holds a `spike backup restore` that has not finished (its marker is there):
    /// Nexus neither creates a key nor serves until the restore is run to its end.
    RestoreIncomplete,
    /// The root key is loaded but the store's keyring does not open under it (edited, or
    /// another deployment's): Nexus neither replaces it nor serves.
    KeyringRefused,
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
            Phase::RestoreIncomplete => {
                "store holds an unfinished backup restore: run spike backup restore again".into()
            }
            Phase::KeyringRefused => {
                "the store's keyring does not open under the root key: restore it from a backup"
                    .into()
            }
            Phase::Ready => "ready".into(),
        }
    }

    /// The phase's name on `/health`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::AwaitingKeepers { .. } => "awaiting_keepers",
            Phase::AwaitingRestore => "awaiting_restore",
            Phase::StoreUnavailable => "store_unavailable",
            Phase::RestoreIncomplete => "restore_incomplete",
            Phase::KeyringRefused => "keyring_refused",
            Phase::Ready => "ready",
        }
    }

    /// The phase as the `spike_nexus_root_key_state` metric names it.
    pub fn key_state(&self) -> KeyState {
        match self {
            Phase::AwaitingKeepers { .. } => KeyState::AwaitingKeepers,
            Phase::AwaitingRestore => KeyState::AwaitingRestore,
            Phase::StoreUnavailable => KeyState::StoreUnavailable,
            Phase::RestoreIncomplete => KeyState::RestoreIncomplete,
            Phase::KeyringRefused => KeyState::KeyringRefused,
            Phase::Ready => KeyState::Ready,
        }
    }
}

/// Key material derived once when the root key is loaded. Each key lives in locked pages of its
/// own (`crypto::locked`), wherever this struct and its `Arc`s are: the struct itself holds no
/// key bytes, only the boxes that do.
pub struct Keys {
    /// The root key itself; zeroized on drop.
    pub root: RootKey,
    /// Public fingerprint of the root key, for logs and `/health`.
    pub key_id: String,
    /// The Keeper shards of this key, index order (`shards.get(i)` has index `i + 1`). Shares
    /// are a pure function of the key and the derivation, so computing them once is not a
    /// cache of state.
    pub shards: LockedShares,
    /// How the key is shared: its threshold and Keepers (the store's root-key record since a
    /// rekey, the configuration before the first).
    pub sharing: rekey::Sharing,
    /// How the shards' polynomial is drawn from the key: the one the Keepers were found
    /// holding (a deployment is never re-sharded behind its operator's back), the current one
    /// for a new deployment.
    pub derivation: ShardDerivation,
    /// Seals secret versions and authenticates secret records at rest: the keyring's keys as
    /// loaded (requests use the keyring checked against the store, [`Nexus::keyring`]).
    pub secrets: Arc<secrets::SecretKeys>,
    /// Seals policies at rest.
    pub policies: AeadKey,
    /// Authenticates the audit trail's records.
    pub audit: crate::crypto::MacKey,
    /// The data keys ([`keyring`]): the store's keyring once loaded, the legacy entry alone
    /// for tools that open a store with the root key only; checked against the store before
    /// each use ([`Nexus::keyring`]).
    pub keyring: keyring::Current,
}

/// HKDF label of the key that seals policies at rest ([`Keys::policies`]).
pub const POLICIES_LABEL: &str = "spike/policies/v1";

impl Keys {
    /// Derives the sub-keys of `root` and its Keeper shards under `derivation`, one per Keeper
    /// of `sharing` (any threshold of them rebuild it).
    pub fn new(
        root: RootKey,
        sharing: rekey::Sharing,
        derivation: ShardDerivation,
        upgrade_secret_records: bool,
    ) -> Result<Keys, crate::crypto::Error> {
        let shards = LockedShares::new(&crate::crypto::shamir::split_with(
            &root,
            sharing.threshold,
            sharing.shares(),
            derivation,
        )?);
        Ok(Keys {
            sharing,
            derivation,
            key_id: root.key_id(),
            secrets: Arc::new(secrets::SecretKeys::derive(&root, upgrade_secret_records)),
            policies: root.derive(POLICIES_LABEL),
            audit: root.derive_mac(crate::protocol::audit::KEY_LABEL),
            keyring: keyring::Current::new(keyring::Keyring::legacy(&root, upgrade_secret_records)),
            root,
            shards,
        })
    }

    /// The keyring checked against `store` now ([`keyring::Current::validated`]): a keyring
    /// that does not open, or that went back in time, is a 500 and a log line.
    pub async fn keyring(&self, store: &impl Store) -> Result<Arc<keyring::Keyring>, ApiError> {
        self.keyring
            .validated(store, &self.root)
            .await
            .map_err(keyring_error)
    }

    /// The same keys, with the store's keyring.
    pub fn with_keyring(mut self, keyring: keyring::Keyring) -> Keys {
        self.secrets = Arc::clone(keyring.secrets());
        self.keyring = keyring::Current::new(keyring);
        self
    }
}

/// Nexus's in-memory state, shared by the routes and the Keeper task.
pub struct Nexus {
    /// The store every request reads and writes, measured.
    pub store: Measured<AnyStore>,
    /// Queues of this instance's secret writes to the store.
    pub writers: secrets::Writers,
    /// This instance's copy of the policy book, checked against the store on every use.
    pub policies: Arc<book::Policies>,
    /// Validated configuration.
    pub config: NexusConfig,
    /// What `SPIKE_NEXUS_METRICS_ADDR` serves.
    pub metrics: Arc<NexusMetrics>,
    /// The loaded key, once there is one.
    keys: RwLock<Option<Arc<Keys>>>,
    /// Lifecycle phase while there is no key.
    phase: RwLock<Phase>,
    /// Keepers whose shard did not match the loaded key at recovery (URL list), for `/health`.
    inconsistent: RwLock<Vec<String>>,
    /// The client that talks to Keepers, set when the Keeper task starts.
    keeper_client: std::sync::OnceLock<crate::client::keeper::KeeperClient>,
    /// Recovery shards submitted by operators, until they rebuild the key (one per index).
    pending_restore: recovery::Pending,
    /// Where every request's audit record goes.
    pub audit: Arc<audit::Trail>,
    /// The sharing to recover with while no key is loaded: the store's root-key record's once
    /// read, the configuration's before.
    awaiting: RwLock<rekey::Sharing>,
    /// One [`rekey::follow`] at a time.
    following: tokio::sync::Mutex<()>,
    /// The rekey journal revision this instance saw last and when it first saw it: a journal's
    /// age on this instance's own clock.
    journal_seen: std::sync::Mutex<Option<(crate::store::Revision, std::time::Instant)>>,
}

/// A keyring failure as an answer: the store's own errors as they are, a refused keyring as a
/// 500 and a log line (nothing is sealed or opened with it).
pub(crate) fn keyring_error(e: keyring::Error) -> ApiError {
    match e {
        keyring::Error::Store(e) => ApiError::Store(e),
        keyring::Error::Contended => ApiError::Contended,
        e => {
            tracing::error!(error = %e, "the store's keyring is refused; nothing is sealed or opened with it");
            ApiError::Internal(e.to_string())
        }
    }
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
    /// A Nexus on `store`, with no key yet, counting into `metrics`.
    pub fn new(config: NexusConfig, store: AnyStore, metrics: Arc<NexusMetrics>) -> Nexus {
        let need = usize::from(config.threshold);
        let phase = Phase::AwaitingKeepers { have: 0, need };
        let awaiting = RwLock::new(rekey::Sharing::of_config(&config));
        metrics.key_state(phase.key_state());
        Nexus {
            store: Measured::new(store, metrics.store.clone()),
            writers: secrets::Writers::measured(metrics.batches.clone()),
            policies: Arc::new(book::Policies::new(config.upgrade_policy_rows)),
            config,
            metrics,
            keys: RwLock::new(None),
            phase: RwLock::new(phase),
            inconsistent: RwLock::new(Vec::new()),
            keeper_client: std::sync::OnceLock::new(),
            pending_restore: recovery::Pending::default(),
            audit: Arc::new(audit::Trail::off()),
            awaiting,
            following: tokio::sync::Mutex::new(()),
            journal_seen: std::sync::Mutex::new(None),
        }
    }

    /// The same Nexus, writing its audit records to `trail`.
    pub fn with_audit(mut self, trail: Arc<audit::Trail>) -> Nexus {
        self.audit = trail;
        self
    }

    /// The store's keyring, checked against the store now ([`keyring::Current::validated`]).
    /// A keyring that no longer opens under `keys` because a rekey replaced the root key is
    /// followed ([`rekey::follow`]) and read under the new key; any other keyring that does not
    /// open, or that went back in time, is a 500 and a log line.
    pub async fn keyring(self: &Arc<Self>, keys: &Keys) -> Result<Arc<keyring::Keyring>, ApiError> {
        let ring = match keys.keyring.validated(&self.store, &keys.root).await {
            Ok(ring) => ring,
            Err(keyring::Error::Refused(why)) => match rekey::follow(self, keys).await {
                Ok(current) => current.keyring(&self.store).await?,
                Err(e) => {
                    tracing::error!(error = %e, refused = %why, "the store's keyring is refused; nothing is sealed or opened with it");
                    return Err(e);
                }
            },
            Err(e) => return Err(keyring_error(e)),
        };
        self.metrics.data_key(ring.current());
        Ok(ring)
    }

    /// The key material to change keys with: `keys`, or the key that replaced it when a rekey
    /// happened through another instance (the keyring is checked first, which follows it).
    pub(crate) async fn current(self: &Arc<Self>, keys: &Arc<Keys>) -> Result<Arc<Keys>, ApiError> {
        self.keyring(keys).await?;
        Ok(self.keys().unwrap_or_else(|| Arc::clone(keys)))
    }

    /// Runs the keyring change `edit` under `keys`' root key and answers the keyring after it.
    /// A rekey that lands between the check and the write re-wraps the keyring under a key
    /// `keys` does not open (`edit` fails with an error `rekeyed` recognises): it is followed
    /// once and `edit` runs again under the new key. Other errors go through `refused`.
    async fn edit_keyring<E, Fut>(
        self: &Arc<Self>,
        keys: Arc<Keys>,
        edit: impl Fn(Arc<Keys>) -> Fut,
        rekeyed: impl Fn(&E) -> bool,
        refused: impl Fn(E) -> ApiError,
    ) -> Result<Arc<keyring::Keyring>, ApiError>
    where
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let mut keys = keys;
        let mut followed = false;
        loop {
            match edit(Arc::clone(&keys)).await {
                Ok(()) => return self.keyring(&keys).await,
                Err(e) if !followed && rekeyed(&e) => {
                    followed = true;
                    keys = self.current(&keys).await?;
                }
                Err(e) => return Err(refused(e)),
            }
        }
    }

    /// Adds a data key to the keyring ([`keyring::rotate`]); this instance uses it at once,
    /// the others at their next check.
    pub async fn rotate(
        self: &Arc<Self>,
        keys: &Arc<Keys>,
    ) -> Result<Arc<keyring::Keyring>, ApiError> {
        let keys = self.current(keys).await?;
        let (store, upgrade) = (&self.store, self.config.upgrade_secret_records);
        self.edit_keyring(
            keys,
            |k| async move { keyring::rotate(store, &k.root, upgrade).await.map(drop) },
            |e| matches!(e, keyring::Error::Refused(_)),
            keyring_error,
        )
        .await
    }

    /// Starts a re-encryption pass in the background: every secret record and the policy
    /// book that name a data key other than the current one are rewritten under it
    /// ([`secrets::reencrypt`]). Resumable: a pass started again does only what is left.
    pub async fn reencrypt(self: &Arc<Self>, keys: &Keys) -> Result<(), ApiError> {
        let ring = self.keyring(keys).await?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(ApiError::Internal("no runtime to run the pass on".into()));
        };
        let (store, writers, policies, metrics) = (
            self.store.clone(),
            self.writers.clone(),
            Arc::clone(&self.policies),
            Arc::clone(&self.metrics),
        );
        runtime.spawn(async move {
            let current = ring.current();
            tracing::info!(data_key = current, "re-encryption started");
            let done = secrets::reencrypt(&store, &writers, ring.secrets(), &metrics).await;
            let book = match store.get(crate::store::Namespace::System, book::BOOK_KEY).await {
                Ok(Some(entry)) if book::key_id(&entry.value) != Some(current) => {
                    match policies.change(&store, &*ring, |_| Ok(())).await {
                        Ok(()) => "rewritten",
                        Err(e) => {
                            tracing::error!(error = %e, "re-encryption: the policy book was not rewritten");
                            "failed"
                        }
                    }
                }
                Ok(_) => "current",
                Err(e) => {
                    tracing::error!(error = %e, "re-encryption: cannot read the policy book");
                    "failed"
                }
            };
            if done.failed == 0 && book != "failed" {
                tracing::info!(
                    data_key = current,
                    rewritten = done.rewritten,
                    already = done.current,
                    policy_book = book,
                    "re-encryption finished: every record is under data key {current}; older \
                     data keys can be retired (spike operator retire ID)"
                );
            } else {
                tracing::error!(
                    data_key = current,
                    rewritten = done.rewritten,
                    already = done.current,
                    failed = done.failed,
                    policy_book = book,
                    "re-encryption incomplete: the records named above were not rewritten; \
                     run it again (spike operator reencrypt)"
                );
            }
        });
        Ok(())
    }

    /// Retires data key `id` once no record in the store names it (secret records, the
    /// policy book); cipher output outside the store may still name it, and a retired key
    /// keeps opening it.
    pub async fn retire(
        self: &Arc<Self>,
        keys: &Arc<Keys>,
        id: u32,
    ) -> Result<Arc<keyring::Keyring>, ApiError> {
        let keys = &self.current(keys).await?;
        let ring = self.keyring(keys).await?;
        let refused = |e: keyring::RetireError| {
            tracing::warn!(error = %e, "data key not retired");
            ApiError::BadRequest(e.to_string())
        };
        if id == ring.current() {
            return Err(refused(keyring::RetireError::Current(id)));
        }
        let mut count = 0;
        for path in self
            .store
            .list(crate::store::Namespace::Secrets, "")
            .await?
        {
            if let Some(entry) = self
                .store
                .get(crate::store::Namespace::Secrets, &path)
                .await?
                && secrets::names_key(&entry.value, id)
            {
                count += 1;
            }
        }
        if let Some(entry) = self
            .store
            .get(crate::store::Namespace::System, book::BOOK_KEY)
            .await?
            && book::key_id(&entry.value).is_none_or(|k| k == id)
        {
            count += 1;
        }
        if count > 0 {
            return Err(refused(keyring::RetireError::InUse { id, count }));
        }
        let (store, upgrade) = (&self.store, self.config.upgrade_secret_records);
        self.edit_keyring(
            Arc::clone(keys),
            |k| async move { keyring::retire(store, &k.root, id, upgrade).await.map(drop) },
            |e| matches!(e, keyring::RetireError::Keyring(keyring::Error::Refused(_))),
            |e| match e {
                keyring::RetireError::Keyring(e) => keyring_error(e),
                e => refused(e),
            },
        )
        .await
    }

    /// The loaded key material, if any.
    pub fn keys(&self) -> Option<Arc<Keys>> {
        read(&self.keys).clone()
    }

    /// Where the root-key lifecycle is.
    pub fn phase(&self) -> Phase {
        read(&self.phase).clone()
    }

    fn set_phase(&self, phase: Phase) {
        let mut current = write(&self.phase);
        if *current != phase {
            tracing::info!(status = phase.as_str(), detail = ?phase, "nexus status changed");
            crate::platform::systemd::status(&phase.describe());
            self.metrics.key_state(phase.key_state());
            *current = phase;
        }
    }

    /// Reads the store's keyring under `root`, creating it when the store has none
    /// ([`keyring::ensure`]). A store failure sets `store_unavailable`, a keyring that does
    /// not open `keyring_refused`; either way the key is not loaded and the caller retries.
    async fn open_keyring(&self, root: &RootKey) -> Option<keyring::Keyring> {
        match keyring::ensure(&self.store, root, self.config.upgrade_secret_records).await {
            Ok(ring) => Some(ring),
            Err(keyring::Error::Store(e)) => {
                tracing::error!(backend = self.store.backend(), error = %e, "cannot read or create the keyring");
                self.set_phase(Phase::StoreUnavailable);
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "the root key is right (it opens the verifier) but the store's keyring is refused; it is left as it is");
                self.set_phase(Phase::KeyringRefused);
                None
            }
        }
    }

    /// Installs the root key, derives its sub-keys and takes `keyring` as its data keys. If a
    /// key is already loaded, that one is kept and returned, so two paths racing to load it
    /// cannot replace each other's.
    fn install(
        &self,
        root: RootKey,
        sharing: rekey::Sharing,
        derivation: ShardDerivation,
        keyring: keyring::Keyring,
    ) -> Result<Arc<Keys>, crate::crypto::Error> {
        let keys = self.derive(root, sharing, derivation, keyring)?;
        let mut slot = write(&self.keys);
        if let Some(existing) = slot.as_ref() {
            return Ok(Arc::clone(existing));
        }
        *slot = Some(Arc::clone(&keys));
        drop(slot);
        self.metrics.data_key(keys.keyring.loaded().current());
        self.set_phase(Phase::Ready);
        if keys.secrets.upgrading() {
            self.upgrade_secret_records(&keys);
        }
        self.start_policies(&keys);
        Ok(keys)
    }

    /// Replaces the loaded key with `root` after a rekey (shared as `sharing`, its keyring
    /// `keyring`); a key already replaced by the same one is kept.
    pub fn replace(
        &self,
        root: RootKey,
        sharing: rekey::Sharing,
        derivation: ShardDerivation,
        keyring: keyring::Keyring,
    ) -> Result<Arc<Keys>, ApiError> {
        let key_id = root.key_id();
        if let Some(now) = self.keys()
            && now.key_id == key_id
        {
            return Ok(now);
        }
        let keys = self.derive(root, sharing, derivation, keyring)?;
        let old = write(&self.keys).replace(Arc::clone(&keys));
        // Not exported for this key yet, as far as this instance knows (/health checks).
        self.metrics.recovery_exported(false);
        tracing::info!(
            key_id = %keys.key_id,
            previous = ?old.map(|k| k.key_id.clone()),
            "now using root key {}",
            keys.key_id
        );
        self.metrics.data_key(keys.keyring.loaded().current());
        self.set_phase(Phase::Ready);
        Ok(keys)
    }

    /// The key material of `root`, shared as `sharing`, with `keyring` as its data keys.
    fn derive(
        &self,
        root: RootKey,
        sharing: rekey::Sharing,
        derivation: ShardDerivation,
        keyring: keyring::Keyring,
    ) -> Result<Arc<Keys>, crate::crypto::Error> {
        self.note_sharing(&sharing);
        let upgrade = self.config.upgrade_secret_records;
        Ok(Arc::new(
            Keys::new(root, sharing, derivation, upgrade)?.with_keyring(keyring),
        ))
    }

    /// Says when the deployment's sharing (since a rekey) is not this instance's configuration.
    fn note_sharing(&self, sharing: &rekey::Sharing) {
        if sharing.peers != self.config.keeper_peers || sharing.threshold != self.config.threshold {
            tracing::warn!(
                threshold = sharing.threshold,
                keepers = %sharing.peers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                "the deployment's sharing differs from this instance's SPIKE_NEXUS_SHAMIR_* and \
                 SPIKE_NEXUS_KEEPER_PEERS: the deployment's is used; update the configuration"
            );
        }
    }

    /// How the key is shared now: the loaded key's sharing, or the one recovery uses while
    /// there is no key.
    pub fn sharing(&self) -> rekey::Sharing {
        match self.keys() {
            Some(keys) => keys.sharing.clone(),
            None => read(&self.awaiting).clone(),
        }
    }

    /// Recover with `sharing` from now on (the store's root-key record was read).
    fn set_awaiting(&self, sharing: rekey::Sharing) {
        *write(&self.awaiting) = sharing;
    }

    /// How long this instance has seen the rekey journal at `revision` unchanged.
    pub fn journal_age(&self, revision: &crate::store::Revision) -> std::time::Duration {
        let mut seen = self.journal_seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.as_ref() {
            Some((r, since)) if r == revision => since.elapsed(),
            _ => {
                *seen = Some((revision.clone(), std::time::Instant::now()));
                std::time::Duration::ZERO
            }
        }
    }

    /// The client that talks to Keepers (set when the Keeper task starts).
    pub fn keeper_client(&self) -> Result<crate::client::keeper::KeeperClient, ApiError> {
        self.keeper_client
            .get()
            .cloned()
            .ok_or_else(|| ApiError::Internal("the Keeper task has not started".into()))
    }

    /// Gives every Keeper its shard of the loaded key now.
    pub async fn refill(self: &Arc<Self>, client: &crate::client::keeper::KeeperClient) {
        keepers::push_all(self, client).await;
    }

    /// `SPIKE_NEXUS_UPGRADE_SECRET_RECORDS`: gives every secret record without a MAC its MAC,
    /// in the background, and says when the setting can go.
    fn upgrade_secret_records(&self, keys: &Arc<Keys>) {
        tracing::warn!(
            "SPIKE_NEXUS_UPGRADE_SECRET_RECORDS is set: secret records without a MAC are \
             accepted as stored while it is; authenticating every such record now"
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, writers, keys) = (
            self.store.clone(),
            self.writers.clone(),
            Arc::clone(&keys.secrets),
        );
        runtime.spawn(async move {
            let found = secrets::upgrade(&store, &writers, &keys).await;
            if found.refused == 0 && found.failed == 0 {
                tracing::info!(
                    authenticated = found.authenticated,
                    already = found.already,
                    "every secret record carries a MAC: unset SPIKE_NEXUS_UPGRADE_SECRET_RECORDS \
                     and restart, so that a record without one is refused again"
                );
            } else {
                tracing::error!(
                    authenticated = found.authenticated,
                    already = found.already,
                    refused = found.refused,
                    failed = found.failed,
                    "secret record upgrade incomplete: the records named above were not \
                     authenticated (refused ones fail their MAC; failed ones are retried at the \
                     next start)"
                );
            }
        });
    }

    /// Once the key is loaded: creates the policy book and, when the operator asked for it,
    /// moves an earlier version's per-name policy rows into it ([`book::Policies::start`]). In the
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
                match policies.start(&store, &*keys.keyring.loaded()).await {
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

    /// Keepers found holding a shard that does not match the key (URLs).
    pub fn inconsistent_keepers(&self) -> Vec<String> {
        read(&self.inconsistent).clone()
    }

    fn set_inconsistent(&self, urls: Vec<String>) {
        *write(&self.inconsistent) = urls;
    }

    /// The derivation that explains the most of `observed` (shards of `key` read from Keepers
    /// or sent by operators): all of them when the deployment is consistent; a mix means some
    /// shards are stale and will be refilled. The current derivation when none are known.
    pub fn derivation_of(&self, key: &RootKey, observed: &[Share]) -> ShardDerivation {
        self.derivation_of_sharing(key, &self.sharing(), observed)
    }

    /// [`Nexus::derivation_of`] for a key shared as `sharing`.
    pub fn derivation_of_sharing(
        &self,
        key: &RootKey,
        sharing: &rekey::Sharing,
        observed: &[Share],
    ) -> ShardDerivation {
        let (t, n) = (sharing.threshold, sharing.shares());
        if let Ok(Some(d)) = crate::crypto::shamir::identify_derivation(key, t, observed) {
            return d;
        }
        let explained = |d: ShardDerivation| {
            crate::crypto::shamir::split_with(key, t, n, d)
                .map(|expected| {
                    observed
                        .iter()
                        .filter(|s| {
                            expected
                                .get(usize::from(s.index).wrapping_sub(1))
                                .is_some_and(|e| e.ct_eq(s))
                        })
                        .count()
                })
                .unwrap_or(0)
        };
        ShardDerivation::ALL
            .into_iter()
            .max_by_key(|d| (explained(*d), *d == ShardDerivation::default()))
            .unwrap_or_default()
    }

    /// The Keeper URLs, in Shamir index order.
    pub fn peers(&self) -> Vec<Uri> {
        self.sharing().peers
    }
}

/// Runs Nexus on `config.listen` until `shutdown` completes. The port is bound once the
/// identity and the store are ready, so clients are refused (and fail over) until then.
pub async fn run(
    config: NexusConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let listen = transport::Listen::Bind(config.listen);
    run_with(config, listen, shutdown).await
}

/// Runs Nexus on a listener the caller bound (`config.listen` is not used) until `shutdown`
/// completes: a test binds `127.0.0.1:0` and knows the address before Nexus starts.
pub async fn run_on(
    config: NexusConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    run_with(config, transport::Listen::Bound(listener), shutdown).await
}

async fn run_with(
    config: NexusConfig,
    listen: transport::Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    crate::platform::hardening::harden_process();
    let metrics = Arc::new(NexusMetrics::new(
        ShardDerivation::default().name(),
        config.keeper_peers.len(),
    ));
    // Bound before anything else, so a busy address is the first thing said; it answers from
    // now on, while the store opens and the root key is awaited.
    let _metrics_server = match config.metrics {
        None => None,
        Some(addr) => {
            let (listener, addr) = crate::platform::metrics::bind("SPIKE_NEXUS_METRICS_ADDR", addr)
                .await
                .map_err(transport::StartError::from)?;
            tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
            Some(crate::platform::metrics::serve(
                listener,
                metrics.registry(),
            ))
        }
    };
    let own =
        transport::OwnIdentity::load(&config.identity, Role::Nexus, Some(&metrics.svid)).await?;
    let trust = &config.identity.trust;
    let server_tls = crate::identity::server_config_for(&own.source, trust, ClientAuth::Optional)?;
    let keeper_tls = crate::identity::client_config_for(
        Some(&own.source),
        None,
        trust,
        ExpectedPeer::Role(Role::Keeper),
    )?;
    let (listener, addr) = listen.open().await?;
    let trail = Arc::new(
        audit::Trail::open(config.audit.clone(), instance_name(addr)).map_err(|error| {
            Error::Audit {
                path: config
                    .audit
                    .file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                error,
            }
        })?,
    );
    let _reopen = reopen_on_hangup(Arc::clone(&trail));
    tracing::info!(
        %addr,
        id = %own.id,
        backend = config.backend.name(),
        keepers = config.keeper_peers.len(),
        threshold = config.threshold,
        "nexus listening on {addr}"
    );
    // Serve from now on: until the store is open the gate answers /health and every route
    // with store_unavailable, so a database outage at start is a Nexus that waits, not one
    // that exits (under systemd, a restart loop of every instance).
    let gate = Arc::new(routes::Gate::new(
        config.backend.name(),
        config.threshold,
        Arc::clone(&metrics),
    ));
    let limits = config.server.clone();
    let serve = transport::serve(listener, server_tls, Arc::clone(&gate), limits, shutdown);
    tokio::pin!(serve);
    let running = tokio::select! {
        () = &mut serve => {
            tracing::info!("nexus stopped before its store answered");
            return Ok(());
        }
        running = start_on_store(config, &own, keeper_tls, &gate, trail, metrics) => running?,
    };
    serve.await;
    drop(running);
    tracing::info!("nexus stopped");
    Ok(())
}

/// This instance's name in audit records: the host name and the port it serves on.
fn instance_name(addr: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = if host.is_empty() { "localhost" } else { host };
    format!("{host}:{}", addr.port())
}

/// Reopens the audit file at every SIGHUP (logrotate's signal), until dropped.
fn reopen_on_hangup(trail: Arc<audit::Trail>) -> Option<crate::platform::AbortOnDrop> {
    let mut hangups = match crate::platform::hangups() {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the audit file will not be reopened");
            return None;
        }
    };
    Some(crate::platform::AbortOnDrop(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reopening the audit file");
            trail.reopen();
        }
    })))
}

/// What runs beside the server once the store is open; stopped on drop.
struct Running {
    _sync: keepers::SyncGuard,
    _watchdog: crate::platform::systemd::WatchdogGuard,
}

/// Opens the store — retrying while it is unavailable, with sd_notify STATUS and the gate's
/// `/health` saying so — then starts the Keeper task and the watchdog and opens the gate.
async fn start_on_store(
    config: NexusConfig,
    own: &transport::OwnIdentity,
    keeper_tls: Arc<rustls::ClientConfig>,
    gate: &routes::Gate,
    trail: Arc<audit::Trail>,
    metrics: Arc<NexusMetrics>,
) -> Result<Running, Error> {
    crate::platform::systemd::ready("opening the backing store");
    let waiting = crate::platform::systemd::spawn_watchdog(|| async { true });
    let mut delay = std::time::Duration::from_millis(200);
    let store = loop {
        match AnyStore::open(&config.backend).await {
            Ok(store) => break store,
            Err(e @ crate::store::Error::Unavailable { .. }) => {
                tracing::warn!(backend = config.backend.name(), error = %e, "the backing store is unavailable; Nexus waits for it (retrying in {delay:?})");
                crate::platform::systemd::status(&format!("store unavailable: {e}"));
                gate.set_reason(e.to_string());
                tokio::time::sleep(crate::platform::jitter(delay)).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(10));
            }
            // A store proven unsafe (Incompatible) or misconfigured: stop, do not wait.
            Err(e) => return Err(e.into()),
        }
    };
    drop(waiting);
    let nexus = Arc::new(Nexus::new(config, store, metrics).with_audit(trail));
    tracing::info!(backend = nexus.store.backend(), "backing store open");
    crate::platform::systemd::status(&nexus.phase().describe());
    let watchdog = {
        let nexus = Arc::clone(&nexus);
        let identity = Arc::clone(&own.source);
        crate::platform::systemd::spawn_watchdog(move || {
            let nexus = Arc::clone(&nexus);
            let identity = Arc::clone(&identity);
            async move {
                // A dead SVID is said, not hidden: peers refuse it, and /health reports it.
                if let crate::identity::IdentityState::Expired { .. } = identity.state() {
                    let why = identity
                        .agent_problem()
                        .map(|p| format!(": {p}"))
                        .unwrap_or_default();
                    crate::platform::systemd::status(&format!("SVID expired{why}"));
                    return true;
                }
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
    gate.open(routes::Api::new(
        Arc::clone(&nexus),
        Arc::clone(&own.source),
    ));
    Ok(Running {
        _sync: sync,
        _watchdog: watchdog,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use crate::platform::hardening::pages_locked;

    /// Every key in `Keys` has the pages holding its bytes locked, not just the struct: the
    /// root key, the three AEAD keys (one behind its own `Arc`) and the Keeper shards.
    #[test]
    fn every_key_lives_in_locked_pages() {
        let keys = Arc::new(
            Keys::new(
                RootKey::generate().unwrap(),
                rekey::Sharing::parse(
                    2,
                    &[
                        "https://127.0.0.1:1".into(),
                        "https://127.0.0.1:2".into(),
                        "https://127.0.0.1:3".into(),
                    ],
                )
                .unwrap(),
                ShardDerivation::default(),
                false,
            )
            .unwrap(),
        );
        assert_eq!(keys.shards.len(), 3);
        let spans = [
            ("root", keys.root.span()),
            ("secrets", keys.secrets.spans()[0]),
            ("secret records MAC", keys.secrets.spans()[1]),
            ("policies", keys.policies.span()),
            (
                "cipher",
                keys.keyring.loaded().get(0).unwrap().cipher.span(),
            ),
            ("shards", keys.shards.span()),
        ];
        let failures = crate::platform::hardening::lock_failures();
        for (name, (addr, len)) in spans {
            assert!(len > 0, "{name}");
            assert!(
                pages_locked(addr, len),
                "the pages holding the {name} key are not locked (mlock failures so far: \
                 {failures}; is RLIMIT_MEMLOCK too low?)"
            );
        }
        // The key bytes are not inside the Keys allocation (so locking it would not help).
        let outer = std::ptr::from_ref(&*keys) as usize;
        let outer_end = outer + std::mem::size_of::<Keys>();
        for (name, (addr, _)) in spans {
            assert!(addr < outer || addr >= outer_end, "{name}");
        }
    }
}
