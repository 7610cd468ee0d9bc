//! `spike operator rekey`: a new root key, the keyring re-wrapped under it, new Keeper shards,
//! optionally a new threshold and Keeper list, while every instance keeps serving (decision 34
//! in `docs/decisions.md`).
//!
//! # Records (all in [`Namespace::System`])
//! - [`REKEY_KEY`], the journal of a rekey under way, created with create-if-absent (so of two
//!   rekeys started at once exactly one proceeds) and removed when it is done. It holds the new
//!   key's id, verifier and sharing, the old key sealed under the new one (whoever holds the
//!   new key can re-wrap the keyring), and once committed a MAC under the new key. It never
//!   holds the new key in a form the old one opens: whoever kept the old key (old recovery
//!   shards, a removed Keeper set) and reads the store learns nothing of the new one.
//! - [`ROOT_KEY_RECORD`], the deployment's sharing since its last rekey: the key id, the
//!   threshold, the Keeper list and the ids of the keys it replaced, MACed under the key. Absent
//!   until the first rekey; the configuration (`SPIKE_NEXUS_SHAMIR_*`, `SPIKE_NEXUS_KEEPER_PEERS`)
//!   applies until then, and is only a default after it.
//! - [`RECOVERY_EXPORT_KEY`]: which key's recovery shards were last exported, MACed; `/health`
//!   and the metrics say when the current key's have not been.
//!
//! # The steps
//! 1. **prepare**: write the journal; check that the verifier still names the old key (a
//!    rekey that finished meanwhile makes this one withdraw); wait out any Keeper refill that
//!    began before the journal existed (instances refill only while there is none).
//! 2. **push**: send the new shards to the new Keepers and read each back. Fewer than the new
//!    threshold confirmed: undo (remove the journal, give the old shards back) and say which
//!    Keepers failed. Nothing of the old key has changed yet.
//! 3. **commit**: the journal gets a MAC under the new key (compare-and-set: an undo by another
//!    instance and the commit cannot both happen), then [`finish`]: the keyring is re-wrapped
//!    (the legacy data key 0 keeps opening what the old root key sealed), the root-key record
//!    written, the verifier replaced, the new key installed, its shards pushed again, the
//!    journal removed. Every step is idempotent.
//!
//! **Whoever is left.** A journal without a commit MAC whose initiator went quiet (the same
//! revision seen for twenty Keeper timeouts on this instance's clock) is undone by any instance
//! holding the old key. A committed one is finished by any instance: one holding the old key
//! first learns the new one from the Keepers (at least the threshold confirmed it before the
//! commit), as a restart would. An instance that still holds the old key after the commit
//! notices at its next request (the keyring no longer opens under it) or Keeper round (the
//! verifier changed) and [`follow`]s the same way.

use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use serde::{Deserialize, Serialize};

use super::{ApiError, Keys, Nexus};
use crate::client::keeper::{KeeperClient, ShardAnswer};
use crate::crypto::{KEY_LEN, RootKey, Share, Verifier};
use crate::protocol::nexus::{b64, now_nanos, rfc3339};
use crate::store::{Expect, Namespace, Revision, Store, VERIFIER_KEY, Written};

/// The journal of a rekey under way.
pub const REKEY_KEY: &str = "rekey";
/// The deployment's root key and its sharing since the last rekey.
pub const ROOT_KEY_RECORD: &str = "root-key";
/// Whose recovery shards were last exported.
pub const RECOVERY_EXPORT_KEY: &str = "recovery-export";
/// HKDF label of the key each root key seals the other under in the journal.
const REKEY_LABEL: &str = "spike/rekey/v1";
/// HKDF label of the MAC key of [`ROOT_KEY_RECORD`] and [`RECOVERY_EXPORT_KEY`].
const RECORD_MAC_LABEL: &str = "spike/root-key/v1";
/// Compare-and-set attempts on one record before giving up.
const ATTEMPTS: usize = 50;

/// How a root key is shared among Keepers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharing {
    /// Shards that rebuild the key.
    pub threshold: u8,
    /// The Keepers, in Shamir index order: Keeper `i` (0-based) holds index `i + 1`.
    pub peers: Vec<Uri>,
}

impl Sharing {
    /// The sharing the configuration describes.
    pub fn of_config(config: &super::NexusConfig) -> Sharing {
        Sharing {
            threshold: config.threshold,
            peers: config.keeper_peers.clone(),
        }
    }

    /// Checks `threshold` and `keepers` (URLs) with the rules of the configuration.
    pub fn parse(threshold: u8, keepers: &[String]) -> Result<Sharing, String> {
        let mut peers: Vec<Uri> = Vec::with_capacity(keepers.len());
        for k in keepers {
            let uri = crate::platform::env::parse_https_url(k.trim())?;
            if peers.contains(&uri) {
                return Err(format!("Keeper {k:?} is listed twice"));
            }
            peers.push(uri);
        }
        crate::protocol::nexus::check_sharing(threshold, peers.len())?;
        Ok(Sharing { threshold, peers })
    }

    /// Shards in all: one per Keeper (at most 255, checked by [`Sharing::parse`]).
    pub fn shares(&self) -> u8 {
        u8::try_from(self.peers.len()).unwrap_or(u8::MAX)
    }

    fn urls(&self) -> Vec<String> {
        self.peers.iter().map(ToString::to_string).collect()
    }
}

/// A key id replaced by a rekey.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// The old key's public id.
    pub key_id: String,
    /// When the rekey replaced it (RFC 3339).
    pub replaced: String,
    /// The threshold of its shards (so restore can tell an old set of recovery shards).
    pub threshold: u8,
}

/// [`ROOT_KEY_RECORD`]'s content (the MAC is over its JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The root key's public id.
    pub key_id: String,
    /// The threshold of its Keeper shards.
    pub threshold: u8,
    /// Its Keepers, in index order.
    pub keepers: Vec<String>,
    /// When it became the root key (RFC 3339).
    pub since: String,
    /// The keys it replaced, oldest first.
    pub previous: Vec<Replaced>,
}

#[derive(Serialize, Deserialize)]
struct Maced<T> {
    #[serde(flatten)]
    body: T,
    mac: String,
}

impl Deployment {
    /// Its sharing, if the record holds a valid one.
    pub fn sharing(&self) -> Option<Sharing> {
        Sharing::parse(self.threshold, &self.keepers).ok()
    }
}

fn mac_input<T: Serialize>(kind: &str, body: &T) -> Vec<u8> {
    let mut input = format!("{kind}\0").into_bytes();
    input.extend_from_slice(&serde_json::to_vec(body).unwrap_or_default());
    input
}

fn seal_record<T: Serialize>(root: &RootKey, kind: &str, body: T) -> Vec<u8> {
    let tag = root
        .derive_mac(RECORD_MAC_LABEL)
        .sign(&mac_input(kind, &body));
    let mac = crate::protocol::audit::hex(&tag);
    serde_json::to_vec(&Maced { body, mac }).unwrap_or_default()
}

/// Decodes a MACed record without checking the MAC (what an instance without the key can do).
fn peek<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Option<T> {
    serde_json::from_slice::<Maced<T>>(value)
        .ok()
        .map(|m| m.body)
}

/// Decodes a MACed record and checks its MAC under `root`.
fn open_record<T: Serialize + for<'de> Deserialize<'de>>(
    root: &RootKey,
    kind: &str,
    value: &[u8],
) -> Option<T> {
    let m: Maced<T> = serde_json::from_slice(value).ok()?;
    let tag = crate::protocol::audit::unhex(&m.mac)?;
    root.derive_mac(RECORD_MAC_LABEL)
        .verify(&mac_input(kind, &m.body), &tag)
        .ok()?;
    Some(m.body)
}

/// The store's root-key record, unauthenticated, when it names the key `verifier` names: what
/// an instance without a key may use to know which Keepers to ask (a forged one only makes it
/// ask the wrong ones; the shards are accepted only if they open the verifier, and nothing is
/// sent to a Keeper before the record is checked under the key). A record of another key is
/// left out, so the verifier's key is never taken for one a rekey replaced.
pub async fn peek_deployment(
    store: &impl Store,
    verifier: &Verifier,
) -> Result<Option<Deployment>, crate::store::Error> {
    Ok(peek_any_deployment(store)
        .await?
        .filter(|d| d.key_id == verifier.key_id))
}

/// The store's root-key record, unauthenticated, whichever key it names: only for a rekey's
/// finish, which asks whether the record of the new key is written yet.
async fn peek_any_deployment(
    store: &impl Store,
) -> Result<Option<Deployment>, crate::store::Error> {
    Ok(store
        .get(Namespace::System, ROOT_KEY_RECORD)
        .await?
        .and_then(|e| peek(&e.value)))
}

/// The store's root-key record for `root`: `Ok(None)` when there is none or it describes
/// another key; an error when it is there for this key but does not verify.
pub async fn deployment(
    store: &impl Store,
    root: &RootKey,
) -> Result<Option<Deployment>, ApiError> {
    let Some(entry) = store.get(Namespace::System, ROOT_KEY_RECORD).await? else {
        return Ok(None);
    };
    let key_id = root.key_id();
    match peek::<Deployment>(&entry.value) {
        Some(d) if d.key_id == key_id => {}
        _ => return Ok(None),
    }
    open_record::<Deployment>(root, ROOT_KEY_RECORD, &entry.value)
        .map(Some)
        .ok_or_else(|| {
            ApiError::Internal(
                "the store's root-key record names this key but its MAC does not verify: refused"
                    .into(),
            )
        })
}

/// The sharing of `root`, whose keyring is `ring`: its root-key record's when there is one,
/// else the configuration's — but only for a key no rekey made (the keyring says so: a rekey
/// gives data key 0 the old root key's bytes). A rekeyed deployment without its record is
/// refused rather than shared as the configuration says, which may still list Keepers a rekey
/// removed.
pub async fn sharing_of(
    nexus: &Nexus,
    root: &RootKey,
    ring: &super::keyring::Keyring,
) -> Result<Sharing, ApiError> {
    match deployment(&nexus.store, root).await? {
        Some(d) => d.sharing().ok_or_else(|| {
            ApiError::Internal("the store's root-key record holds an invalid sharing".into())
        }),
        None if ring.rekeyed() => Err(ApiError::Internal(
            "this root key was made by a rekey but the store has no root-key record for it \
             (removed or replaced): refusing to fall back to the configuration's Keepers"
                .into(),
        )),
        None => Ok(Sharing::of_config(&nexus.config)),
    }
}

/// [`RECOVERY_EXPORT_KEY`]'s content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Export {
    key_id: String,
    exported: String,
}

/// Records that the recovery shards of `root` were exported now.
pub async fn record_export(store: &impl Store, root: &RootKey) -> Result<(), ApiError> {
    let value = seal_record(
        root,
        RECOVERY_EXPORT_KEY,
        Export {
            key_id: root.key_id(),
            exported: rfc3339(now_nanos()),
        },
    );
    for _ in 0..ATTEMPTS {
        let expect = match store
            .revision(Namespace::System, RECOVERY_EXPORT_KEY)
            .await?
        {
            Some(r) => Expect::Revision(r),
            None => Expect::Absent,
        };
        if let Written::Done(_) = store
            .put(
                Namespace::System,
                RECOVERY_EXPORT_KEY,
                value.clone(),
                expect,
            )
            .await?
        {
            return Ok(());
        }
    }
    Err(ApiError::Contended)
}

/// Whether the recovery shards of `root` have been exported (a MAC-checked record says so).
pub async fn exported(store: &impl Store, root: &RootKey) -> Result<bool, crate::store::Error> {
    let Some(entry) = store.get(Namespace::System, RECOVERY_EXPORT_KEY).await? else {
        return Ok(false);
    };
    Ok(
        open_record::<Export>(root, RECOVERY_EXPORT_KEY, &entry.value)
            .is_some_and(|e| e.key_id == root.key_id()),
    )
}

/// A rekey's journal, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Bound {
    from: String,
    to: String,
    threshold: u8,
    keepers: Vec<String>,
    /// Unix seconds, for people reading the record (staleness is measured locally).
    started: u64,
    /// The new key's verifier.
    to_key_id: String,
    #[serde(with = "b64")]
    to_verifier: Vec<u8>,
}

#[derive(Clone, Serialize, Deserialize)]
struct JournalWire {
    #[serde(flatten)]
    bound: Bound,
    /// The old key, sealed under the new one (associated data: everything in `bound`).
    #[serde(with = "b64")]
    from_under_to: Vec<u8>,
    /// Set at the commit: HMAC-SHA256 under the new key over `bound`. Only a holder of the new
    /// key can make or check it, so the store cannot commit (or un-commit) a rekey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    commit: Option<String>,
}

/// A journal read from the store.
pub struct Journal {
    wire: JournalWire,
    /// The revision it was read at.
    pub revision: Revision,
}

impl Journal {
    /// The old key's id.
    pub fn from(&self) -> &str {
        &self.wire.bound.from
    }

    /// The new key's id.
    pub fn to(&self) -> &str {
        &self.wire.bound.to
    }

    /// The new key's verifier.
    pub fn to_verifier(&self) -> Verifier {
        Verifier {
            key_id: self.wire.bound.to_key_id.clone(),
            sealed: self.wire.bound.to_verifier.clone(),
        }
    }

    /// The new sharing.
    pub fn sharing(&self) -> Option<Sharing> {
        Sharing::parse(self.wire.bound.threshold, &self.wire.bound.keepers).ok()
    }

    /// Whether the journal carries a commit MAC at all (only [`Journal::committed`] says
    /// whether it is genuine).
    pub fn claims_commit(&self) -> bool {
        self.wire.commit.is_some()
    }

    /// Whether `to` (the new key) made the commit MAC.
    pub fn committed(&self, to: &RootKey) -> bool {
        let Some(tag) = self
            .wire
            .commit
            .as_deref()
            .and_then(crate::protocol::audit::unhex)
        else {
            return false;
        };
        to.key_id() == self.wire.bound.to
            && to
                .derive_mac(REKEY_LABEL)
                .verify(&aad(&self.wire.bound, "commit"), &tag)
                .is_ok()
    }

    /// The new key, if `key` is it (it opens the journal's verifier).
    pub fn is_to(&self, key: &RootKey) -> bool {
        key.key_id() == self.wire.bound.to && key.opens(&self.to_verifier())
    }

    /// The old key, opened with the new one.
    pub fn from_key(&self, to: &RootKey) -> Option<RootKey> {
        if !self.is_to(to) {
            return None;
        }
        let plain = to
            .derive(REKEY_LABEL)
            .open(&aad(&self.wire.bound, "from"), &self.wire.from_under_to)
            .ok()?;
        if plain.len() != KEY_LEN {
            return None;
        }
        let mut bytes = zeroize::Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&plain);
        let from = RootKey::from_bytes(*bytes).ok()?;
        (from.key_id() == self.wire.bound.from).then_some(from)
    }
}

fn aad(bound: &Bound, what: &str) -> Vec<u8> {
    let mut aad = format!("{REKEY_LABEL}\0{what}\0").into_bytes();
    aad.extend_from_slice(&serde_json::to_vec(bound).unwrap_or_default());
    aad
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The journal in the store, if a rekey is under way. One that does not parse is reported as
/// a store corruption (it is never guessed at or removed).
pub async fn journal(store: &impl Store) -> Result<Option<Journal>, crate::store::Error> {
    let Some(entry) = store.get(Namespace::System, REKEY_KEY).await? else {
        return Ok(None);
    };
    let wire: JournalWire =
        serde_json::from_slice(&entry.value).map_err(|e| crate::store::Error::Corrupt {
            backend: store.backend(),
            reason: format!("rekey journal: {e}"),
        })?;
    Ok(Some(Journal {
        wire,
        revision: entry.revision,
    }))
}

/// A journal without a commit that this instance has seen unchanged for this long is taken
/// for abandoned (its initiator died) and undone: twice the longest an initiator can take
/// before its commit (the wait for refills in flight, three Keeper timeouts; then a push and
/// a read-back, three each).
pub fn stale_after(nexus: &Nexus) -> Duration {
    (nexus.config.keeper_timeout * 20).max(Duration::from_secs(10))
}

/// The longest a Keeper refill that passed its check can still be sending: connect, handshake
/// and request, each bounded by `SPIKE_NEXUS_KEEPER_TIMEOUT`, and a margin.
fn refill_bound(nexus: &Nexus) -> Duration {
    nexus.config.keeper_timeout * 3 + Duration::from_millis(500)
}

/// What a rekey did.
pub struct Done {
    /// The new key's material, now installed on this instance.
    pub keys: Arc<Keys>,
    /// Keepers that did not confirm their new shard (URLs); they are refilled later.
    pub unconfirmed: Vec<String>,
}

/// Runs a rekey through this instance, which holds `keys`: to `sharing` (the current one
/// when the caller gave none).
pub async fn rekey(
    nexus: &Arc<Nexus>,
    keys: &Arc<Keys>,
    sharing: Sharing,
) -> Result<Done, ApiError> {
    use crate::protocol::nexus::ErrorCode;
    let store = &nexus.store;
    if let Some(j) = journal(store).await? {
        return Err(ApiError::operator(
            ErrorCode::ApiConflict,
            format!(
                "a rekey from key {} to key {} is already under way ({}); nothing was done: \
                 run this again once it has finished",
                j.from(),
                j.to(),
                if j.claims_commit() {
                    "committing"
                } else {
                    "pushing its shards"
                }
            ),
        ));
    }
    let names_ours = |v: Option<Verifier>| v.is_some_and(|v| v.key_id == keys.key_id);
    if !names_ours(store.verifier().await?) {
        return Err(ApiError::operator(
            ErrorCode::ApiConflict,
            "the root key changed since this instance loaded it (another rekey finished): \
             nothing was done; run this again",
        ));
    }
    let client = nexus.keeper_client()?;
    let to = RootKey::generate()?;
    let to_verifier = to.make_verifier()?;
    let bound = Bound {
        from: keys.key_id.clone(),
        to: to.key_id(),
        threshold: sharing.threshold,
        keepers: sharing.urls(),
        started: now_secs(),
        to_key_id: to_verifier.key_id.clone(),
        to_verifier: to_verifier.sealed.clone(),
    };
    let wire = JournalWire {
        from_under_to: to
            .derive(REKEY_LABEL)
            .seal(&aad(&bound, "from"), keys.root.as_bytes())?,
        bound,
        commit: None,
    };
    let value = serde_json::to_vec(&wire).map_err(|e| ApiError::Internal(e.to_string()))?;
    let revision = match store
        .put(Namespace::System, REKEY_KEY, value, Expect::Absent)
        .await?
    {
        Written::Done(r) => r,
        Written::Conflict => {
            return Err(ApiError::operator(
                ErrorCode::ApiConflict,
                "another rekey started at the same moment through another instance; nothing \
                 was done here: run this again once it has finished",
            ));
        }
    };
    let j = Journal { wire, revision };
    // A rekey that finished between the checks above and the journal: withdraw.
    if !names_ours(store.verifier().await?) {
        let _ = store
            .delete(Namespace::System, REKEY_KEY, &j.revision)
            .await;
        return Err(ApiError::operator(
            ErrorCode::ApiConflict,
            "another rekey finished while this one started: nothing was done; run this again",
        ));
    }
    let wait = refill_bound(nexus);
    tracing::info!(from = %j.from(), to = %j.to(), threshold = sharing.threshold, keepers = sharing.peers.len(), "rekey: journal written; waiting {wait:?} for Keeper refills already under way, then pushing the new key's shards");
    tokio::time::sleep(wait).await;
    let pending = stale_after(nexus).as_secs();
    advance(nexus, &client, j, &keys.root, to)
        .await
        .map_err(|e| match e {
            // The journal is written: say that the rekey is not lost, so the operator checks
            // before starting another (which would also void shards exported meanwhile).
            ApiError::Store(e) => ApiError::operator(
                ErrorCode::StoreUnavailable,
                format!(
                    "the store failed during the rekey ({e}); it is recorded, and an instance \
                     finishes or undoes it once the store is back (within about {pending} s): \
                     check the key_id on /health before running it again"
                ),
            ),
            e => e,
        })
}

/// The initiator's steps after the journal: push and confirm the new shards, then commit; or,
/// with fewer than the new threshold confirmed, undo.
async fn advance(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    j: Journal,
    from: &RootKey,
    to: RootKey,
) -> Result<Done, ApiError> {
    use crate::protocol::nexus::ErrorCode;
    let sharing = j
        .sharing()
        .ok_or_else(|| ApiError::Internal("the rekey journal holds an invalid sharing".into()))?;
    let shards = crate::crypto::shamir::split_with(
        &to,
        sharing.threshold,
        sharing.shares(),
        crate::crypto::shamir::ShardDerivation::default(),
    )?;
    let (confirmed, failed) = push_and_confirm(client, &sharing.peers, &shards).await;
    if confirmed < usize::from(sharing.threshold) {
        undo(nexus, client, &j, from, false).await?;
        let reason = format!(
            "only {confirmed} of the {} Keepers confirmed their new shard, and {} are needed \
             (no answer or a wrong shard from: {}); nothing changed: key {} is still the root \
             key",
            sharing.peers.len(),
            sharing.threshold,
            failed.join(", "),
            j.from(),
        );
        tracing::error!("rekey undone: {reason}");
        return Err(ApiError::operator(ErrorCode::ApiInternalError, reason));
    }
    let mut wire = j.wire.clone();
    let tag = to.derive_mac(REKEY_LABEL).sign(&aad(&wire.bound, "commit"));
    wire.commit = Some(crate::protocol::audit::hex(&tag));
    let value = serde_json::to_vec(&wire).map_err(|e| ApiError::Internal(e.to_string()))?;
    match nexus
        .store
        .put(
            Namespace::System,
            REKEY_KEY,
            value,
            Expect::Revision(j.revision.clone()),
        )
        .await?
    {
        Written::Done(revision) => {
            let j = Journal { wire, revision };
            let keys = finish(nexus, client, &j, from, &to).await?;
            Ok(Done {
                keys,
                unconfirmed: failed,
            })
        }
        Written::Conflict => Err(ApiError::operator(
            ErrorCode::ApiConflict,
            "another instance undid this rekey (it had been idle too long); nothing changed: \
             see /health for the root key",
        )),
    }
}

/// Removes an uncommitted journal (compare-and-set on the revision read) and gives the Keepers
/// the old key's shards back, if the store still names it. `wait`: let pushes of the new key
/// that may still be in flight (a quiet initiator's) end first.
async fn undo(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    j: &Journal,
    from: &RootKey,
    wait: bool,
) -> Result<(), ApiError> {
    if !nexus
        .store
        .delete(Namespace::System, REKEY_KEY, &j.revision)
        .await?
    {
        return Ok(());
    }
    if wait {
        tokio::time::sleep(refill_bound(nexus)).await;
    }
    let still = nexus.store.verifier().await?;
    if still.is_some_and(|v| v.key_id == from.key_id())
        && nexus.keys().is_some_and(|k| k.key_id == from.key_id())
    {
        nexus.refill(client).await;
    }
    Ok(())
}

/// Sends `shards[i]` to `peers[i]` and reads each back: how many Keepers hold their new
/// shard, and the URLs of those that do not.
async fn push_and_confirm(
    client: &KeeperClient,
    peers: &[Uri],
    shards: &[Share],
) -> (usize, Vec<String>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (url, share) in peers.iter().zip(shards) {
        let (client, url, share) = (client.clone(), url.clone(), share.clone());
        tasks.spawn(async move {
            let held = match client.contribute(&url, &share).await {
                Ok(()) => matches!(
                    client.shard(&url, share.index).await,
                    Ok(ShardAnswer::Shard(back)) if back.ct_eq(&share)
                ),
                Err(e) => {
                    tracing::warn!(keeper = %url, error = %e, "rekey: cannot send the new shard");
                    false
                }
            };
            (url, held)
        });
    }
    let (mut confirmed, mut failed) = (0, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, true)) => confirmed += 1,
            Ok((url, false)) => failed.push(url.to_string()),
            Err(_) => {}
        }
    }
    failed.sort();
    (confirmed, failed)
}

/// Carries a committed journal to its end; idempotent, so any instance holding both keys may
/// run it, and several at once converge: the keyring re-wrapped under the new key, the
/// root-key record written, the verifier replaced, the new key installed here and its shards
/// pushed, the journal removed.
pub async fn finish(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    j: &Journal,
    from: &RootKey,
    to: &RootKey,
) -> Result<Arc<Keys>, ApiError> {
    if !j.committed(to) || from.key_id() != j.from() {
        return Err(ApiError::Internal(
            "the rekey journal's commit does not verify under its new key: refused".into(),
        ));
    }
    let store = &nexus.store;
    let sharing = j
        .sharing()
        .ok_or_else(|| ApiError::Internal("the rekey journal holds an invalid sharing".into()))?;
    let upgrade = nexus.config.upgrade_secret_records;
    let ring = super::keyring::rewrap(store, from, to, upgrade)
        .await
        .map_err(super::keyring_error)?;
    // The root-key record, then the verifier: an instance that recovers in between finds the
    // journal and finishes it too. What the record keeps of the keys before is taken from a
    // record this key pair can vouch for only.
    let current = peek_any_deployment(store).await?;
    if current.as_ref().map(|d| d.key_id.as_str()) != Some(j.to()) {
        let (mut previous, old_threshold) = match deployment(store, from).await? {
            Some(d) => (d.previous, d.threshold),
            None => (Vec::new(), nexus.config.threshold),
        };
        previous.push(Replaced {
            key_id: j.from().to_string(),
            replaced: rfc3339(now_nanos()),
            threshold: old_threshold,
        });
        let record = seal_record(
            to,
            ROOT_KEY_RECORD,
            Deployment {
                key_id: j.to().to_string(),
                threshold: sharing.threshold,
                keepers: sharing.urls(),
                since: rfc3339(now_nanos()),
                previous,
            },
        );
        put_over(store, ROOT_KEY_RECORD, record).await?;
    }
    let verifier = to.make_verifier()?;
    if store.verifier().await?.map(|v| v.key_id) != Some(verifier.key_id.clone()) {
        let value = crate::store::encode_verifier(&verifier);
        put_over(store, VERIFIER_KEY, value).await?;
    }
    let derivation = crate::crypto::shamir::ShardDerivation::default();
    let keys = nexus.replace(to.clone(), sharing.clone(), derivation, ring)?;
    let shards: Vec<Share> = keys.shards.iter().collect();
    let (confirmed, failed) = push_and_confirm(client, &sharing.peers, &shards).await;
    let _ = store
        .delete(Namespace::System, REKEY_KEY, &j.revision)
        .await?;
    nexus.metrics.rekeyed();
    tracing::info!(
        from = %j.from(),
        to = %j.to(),
        threshold = sharing.threshold,
        keepers = sharing.peers.len(),
        confirmed,
        unconfirmed = ?failed,
        "rekey finished: key {} is the root key; recovery shards exported before now no longer \
         restore it (spike recover export)",
        j.to()
    );
    Ok(keys)
}

/// Writes `value` at `key` whatever is there (compare-and-set from a fresh read each time).
async fn put_over(store: &impl Store, key: &str, value: Vec<u8>) -> Result<(), ApiError> {
    for _ in 0..ATTEMPTS {
        let expect = match store.revision(Namespace::System, key).await? {
            Some(r) => Expect::Revision(r),
            None => Expect::Absent,
        };
        if let Written::Done(_) = store
            .put(Namespace::System, key, value.clone(), expect)
            .await?
        {
            return Ok(());
        }
    }
    Err(ApiError::Contended)
}

/// The new key of `j`, learned from the Keepers of its sharing: at least its threshold held
/// their shard before the journal could be committed.
async fn learn_to(client: &KeeperClient, j: &Journal) -> Option<RootKey> {
    let sharing = j.sharing()?;
    let (key, _) = super::keepers::key_held_by(&sharing, client, j.to_verifier()).await;
    if key.is_none() {
        tracing::warn!(to = %j.to(), "the Keepers do not hold enough of the rekey's new key yet");
    }
    key.filter(|k| j.is_to(k))
}

/// Takes a journal found in the store one step on, from an instance holding `held`:
/// - committed (a commit MAC, or the verifier already naming the new key): finish it, learning
///   the new key from the Keepers if this instance holds the old one;
/// - not committed, and unchanged for [`stale_after`] on this instance: undo it, if this
///   instance holds the old key;
/// - naming neither the store's key nor the one it would become: it is left from a rekey that
///   can never finish (put back, or forged): removed.
///
/// Returns the new key when this instance now holds it.
async fn resolve(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    j: &Journal,
    held: &Keys,
) -> Result<Option<Arc<Keys>>, ApiError> {
    let store = &nexus.store;
    let verifier = store.verifier().await?.map(|v| v.key_id);
    let names = |id: &str| verifier.as_deref() == Some(id);
    if !names(j.from()) && !names(j.to()) {
        tracing::warn!(from = %j.from(), to = %j.to(), "removing a rekey journal that names neither the store's root key nor a successor: it can never finish");
        let _ = store
            .delete(Namespace::System, REKEY_KEY, &j.revision)
            .await?;
        return Ok(None);
    }
    let (from, to) = if held.key_id == j.to() {
        let from = j.from_key(&held.root).ok_or_else(|| {
            ApiError::Internal("the rekey journal's old key does not open".into())
        })?;
        (from, Some(held.root.clone()))
    } else if held.key_id == j.from() {
        (held.root.clone(), None)
    } else {
        return Ok(None);
    };
    let committed_looking = j.claims_commit() || names(j.to());
    if committed_looking {
        let to = match to {
            Some(to) => to,
            None => learn_to(client, j).await.ok_or(ApiError::NotReady)?,
        };
        if j.committed(&to) {
            return finish(nexus, client, j, &from, &to).await.map(Some);
        }
        if names(j.to()) {
            // Only a commit swaps the verifier, and then the MAC was there: it was removed.
            tracing::error!(to = %j.to(), "the store names the rekey's new key but the journal's commit MAC is missing: the journal was edited; left as it is");
        }
        return Ok(None);
    }
    if held.key_id == j.from() && nexus.journal_age(&j.revision) >= stale_after(nexus) {
        tracing::warn!(from = %j.from(), to = %j.to(), "undoing a rekey whose initiator went quiet: nothing of it was committed");
        undo(nexus, client, j, &from, true).await?;
    }
    Ok(None)
}

/// The Keeper round's look at rekeys, on an instance with a key: takes a journal on
/// ([`resolve`]) and follows a rekey finished elsewhere. Returns whether this instance may
/// refill Keepers now (no journal, and its key is the verifier's).
pub async fn tend(nexus: &Arc<Nexus>, client: &KeeperClient) -> bool {
    let Some(keys) = nexus.keys() else {
        return false;
    };
    let store = &nexus.store;
    let j = match journal(store).await {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the rekey journal; not refilling Keepers this round");
            return false;
        }
    };
    if let Some(j) = j {
        if let Err(e) = resolve(nexus, client, &j, &keys).await {
            tracing::warn!(error = %e, "rekey: not taken further this round; retrying at the next");
        }
        return false;
    }
    match store.verifier().await {
        Ok(Some(v)) if v.key_id == keys.key_id => true,
        Ok(_) => {
            let _ = follow(nexus, &keys).await;
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the root-key verifier; not refilling Keepers this round");
            false
        }
    }
}

/// This instance holds `stale`, which no longer opens the store's keyring or verifier: learn
/// the key that does — by finishing a committed rekey, or from the Keepers as a restart would —
/// and install it. One at a time; a caller that finds the key already replaced takes the new
/// one.
pub async fn follow(nexus: &Arc<Nexus>, stale: &Keys) -> Result<Arc<Keys>, ApiError> {
    let _one = nexus.following.lock().await;
    if let Some(now) = nexus.keys()
        && now.key_id != stale.key_id
    {
        return Ok(now);
    }
    let client = nexus.keeper_client()?;
    if let Some(j) = journal(&nexus.store).await?
        && let Some(now) = resolve(nexus, &client, &j, stale).await?
    {
        return Ok(now);
    }
    let Some(verifier) = nexus.store.verifier().await? else {
        return Err(ApiError::Internal(
            "the store's root-key verifier is gone".into(),
        ));
    };
    if verifier.key_id == stale.key_id {
        return Err(ApiError::Internal(
            "the store's keyring does not open under the root key, which the verifier still \
             names: the keyring was edited or replaced"
                .into(),
        ));
    }
    tracing::info!(held = %stale.key_id, store = %verifier.key_id, "the root key was replaced by a rekey through another instance; learning it from the Keepers");
    let sharing = peek_deployment(&nexus.store, &verifier)
        .await?
        .and_then(|d| d.sharing())
        .unwrap_or_else(|| stale.sharing.clone());
    let (found, _) = super::keepers::key_held_by(&sharing, &client, verifier).await;
    let Some(key) = found else {
        tracing::warn!(
            "the root key was replaced by a rekey and the Keepers do not hold enough of the new one yet"
        );
        return Err(ApiError::NotReady);
    };
    let ring = super::keyring::ensure(&nexus.store, &key, nexus.config.upgrade_secret_records)
        .await
        .map_err(super::keyring_error)?;
    let sharing = sharing_of(nexus, &key, &ring).await?;
    let derivation = nexus.derivation_of_sharing(&key, &sharing, &[]);
    nexus.replace(key, sharing, derivation, ring)
}
