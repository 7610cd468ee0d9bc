//! Keeper synchronisation: rebuild (or, once per deployment, create) the root key, then keep
//! every Keeper filled.
//!
//! Each recovery attempt asks every Keeper for its shard at once and reads the verifier:
//!
//! | store verifier | shards in hand | what happens |
//! |---|---|---|
//! | present | ≥ threshold | try threshold-sized combinations until one opens the verifier; Keepers whose shard differs from the key's are reported and refilled |
//! | present | < threshold, every Keeper answered | `awaiting_restore`: the key is gone from the Keepers; never create one |
//! | present | < threshold, some Keeper silent | `awaiting_keepers` |
//! | absent | none, ≥ threshold Keepers answered empty | new deployment: create a key, write its verifier create-if-absent; the loser of a race discards its key and recovers from the Keepers |
//! | absent | ≥ threshold, all consistent | adopt the Keepers' key (a SPIKE deployment has no verifier) and write its verifier |
//! | any, with the restore marker | any | `restore_incomplete`: a `spike backup restore` has not finished; never create or load a key |
//!
//! Attempts repeat with capped exponential backoff until the key is loaded. From then on the
//! shards are pushed at once and every `SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL`.
//!
//! [`deployment_key`] is the first row alone, once, for a tool that works beside a running
//! deployment (`spike migrate from-spike`): it never creates, adopts or pushes a key.
//!
//! **The combination search** ([`search`]) is shared with restore ([`super::recovery`]). With
//! `n` distinct indices and threshold `t` there are C(n, t) index sets — one set when
//! `n == t`, but C(255, 128) ≈ 10^75 at the limit — times the product of the candidates per
//! index, and each try interpolates `t` shards (a field inversion each) and derives the key
//! id (the AEAD open of the verifier runs only when the 64-bit key id matches). So the search
//! is bounded in work, [`MAX_SEARCH_TERMS`] interpolated shards per search, not in
//! combinations, and runs on the blocking pool: it never occupies an executor thread, so
//! `/health` and every other request keep being answered while it runs.

use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;

use super::{Nexus, NexusConfig, Phase};
use crate::client::keeper::{KeeperClient, ShardAnswer};
use crate::crypto::{RootKey, Share, Verifier};
use crate::platform::jitter;
use crate::store::{Namespace, RESTORE_MARKER_KEY, Store};
use crate::transport::{HttpsClient, Timeouts};

/// Longest wait between two looks at the store for a rekey ([`super::rekey::tend`]) once the
/// key is loaded; Keepers are refilled every `SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL`.
const REKEY_CHECK: Duration = Duration::from_secs(2);

/// First wait between two recovery attempts.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Most shards interpolated in one search (a combination of `t` shards costs `t`): measured
/// at 0.16 s of one core in a release build at threshold 6, 0.4 s at 64, 1.1 s at 255 (the
/// interpolation of one shard is an inversion plus `t` multiplications). It covers every
/// combination for the usual parameters (C(13, 5) = 1287 sets of 5 at 5 per set; C(28, 3) at
/// threshold 3); beyond that, the first combinations in the search's order are tried.
pub const MAX_SEARCH_TERMS: usize = 10_000;

/// Owns the background task; stops it on drop.
pub struct SyncGuard(tokio::task::JoinHandle<()>);

impl Drop for SyncGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the Keeper task: recover or create the root key, then refill every Keeper each
/// `SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL`.
pub fn spawn(nexus: Arc<Nexus>, tls: Arc<rustls::ClientConfig>) -> SyncGuard {
    let client = keeper_client(&nexus.config, tls);
    // The restore route pushes shards with the same client.
    let _ = nexus.keeper_client.set(client.clone());
    SyncGuard(tokio::spawn(run(nexus, client)))
}

/// The client Nexus talks to Keepers with: `tls` presents its SVID and expects Keeper IDs;
/// every request bounded by `SPIKE_NEXUS_KEEPER_TIMEOUT`.
pub fn keeper_client(config: &NexusConfig, tls: Arc<rustls::ClientConfig>) -> KeeperClient {
    KeeperClient::new(HttpsClient::new(
        tls,
        Timeouts {
            connect: config.keeper_timeout,
            handshake: config.keeper_timeout,
            request: config.keeper_timeout,
            max_response: crate::client::keeper::MAX_RESPONSE,
        },
    ))
}

async fn run(nexus: Arc<Nexus>, client: KeeperClient) {
    let mut backoff = INITIAL_BACKOFF;
    while nexus.keys().is_none() {
        match attempt(&nexus, &client).await {
            Outcome::Loaded => break,
            Outcome::Retry => {
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(nexus.config.recovery_max_interval);
            }
            Outcome::RetrySoon => tokio::time::sleep(jitter(INITIAL_BACKOFF)).await,
        }
    }
    let interval = nexus.config.keeper_update_interval;
    let mut pushed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(interval.min(REKEY_CHECK)).await;
        // A rekey finished elsewhere is followed, one under way is tended, and Keepers are
        // refilled only with the store's current key.
        let current = super::rekey::tend(&nexus, &client).await;
        if current && pushed.elapsed() >= interval {
            push_all(&nexus, &client).await;
            pushed = tokio::time::Instant::now();
        }
    }
}

/// Refills every Keeper now, unless a rekey is under way or this instance's key is no longer
/// the store's ([`super::rekey::tend`] says which).
pub(super) async fn refill_if_current(nexus: &Arc<Nexus>, client: &KeeperClient) {
    if super::rekey::tend(nexus, client).await {
        push_all(nexus, client).await;
    }
}

enum Outcome {
    Loaded,
    Retry,
    /// Another instance just created the key: its shards are on their way.
    RetrySoon,
}

/// What the Keepers said in one round: the shards they hold (with the URL of each) and how
/// many answered at all (an empty Keeper answers too).
pub struct Round {
    /// The shards, each with the URL of the Keeper that held it.
    pub shards: Vec<(String, Share)>,
    /// Keepers that answered, with a shard or empty.
    pub answered: usize,
    /// Each Keeper's position and whether it answered at all.
    pub reachable: Vec<(u8, bool)>,
}

/// Asks every Keeper for its shard, all at once, and counts which answered.
async fn gather(nexus: &Nexus, client: &KeeperClient) -> Round {
    let round = gather_from(&nexus.peers(), client).await;
    for (position, up) in &round.reachable {
        nexus.metrics.keeper_reachable(*position, *up);
    }
    round
}

/// Asks every Keeper of `peers` for its shard, all at once; position i (1-based) in `peers`
/// is the index a Keeper is expected to hold.
pub async fn gather_from(peers: &[Uri], client: &KeeperClient) -> Round {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, url) in peers.iter().enumerate() {
        let client = client.clone();
        let url = url.clone();
        // Peer count is validated to be at most 255 (one per share).
        let position = u8::try_from(i + 1).unwrap_or(u8::MAX);
        tasks.spawn(async move {
            let answer = client.shard(&url, position).await;
            (url, position, answer)
        });
    }
    let mut round = Round {
        shards: Vec::new(),
        answered: 0,
        reachable: Vec::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        // A task only ends early if it panicked; that Keeper counts as unreachable.
        let Ok((url, position, answer)) = joined else {
            continue;
        };
        round.reachable.push((position, answer.is_ok()));
        match answer {
            Ok(ShardAnswer::Shard(share)) => {
                if share.index != position {
                    tracing::warn!(keeper = %url, position, index = share.index, "keeper holds the shard of another index (was SPIKE_NEXUS_KEEPER_PEERS reordered?); using the index it holds");
                }
                round.answered += 1;
                round.shards.push((url.to_string(), share));
            }
            Ok(ShardAnswer::Empty) => round.answered += 1,
            Err(e) => tracing::warn!(keeper = %url, error = %e, "no shard from keeper"),
        }
    }
    round
}

/// One recovery attempt: gather the Keepers' shards, read the verifier, then recover, create
/// or adopt the key, or wait.
async fn attempt(nexus: &Arc<Nexus>, client: &KeeperClient) -> Outcome {
    // The sharing since the last rekey, and a rekey under way: both say which Keepers to ask.
    // The record is not checked yet (no key): it is used only to choose whom to ask.
    let read = async {
        let (verifier, journal) =
            tokio::try_join!(nexus.store.verifier(), super::rekey::journal(&nexus.store))?;
        let deployment = match &verifier {
            Some(v) => super::rekey::peek_deployment(&nexus.store, v).await?,
            None => None,
        };
        Ok::<_, crate::store::Error>((verifier, deployment, journal))
    };
    let (verifier, deployment, journal) = match read.await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(backend = nexus.store.backend(), error = %e, "cannot read the root-key verifier, its record or the rekey journal");
            nexus.set_phase(Phase::StoreUnavailable);
            return Outcome::Retry;
        }
    };
    if let Some(sharing) = deployment.and_then(|d| d.sharing()) {
        nexus.set_awaiting(sharing);
    }
    let Round {
        mut shards,
        answered,
        ..
    } = gather(nexus, client).await;
    if let Some(next) = journal.as_ref().and_then(super::rekey::Journal::sharing) {
        let known = nexus.peers();
        let more: Vec<Uri> = next
            .peers
            .into_iter()
            .filter(|p| !known.contains(p))
            .collect();
        shards.extend(gather_from(&more, client).await.shards);
    }
    // Read after the verifier: a restore writes its marker, then the verifier, then the
    // records, and removes the marker last; so a verifier seen before an absent marker is a
    // finished restore's (or no restore's), and a missing one is never mistaken for a new
    // deployment while a restore is under way.
    match nexus
        .store
        .revision(Namespace::System, RESTORE_MARKER_KEY)
        .await
    {
        Ok(None) => {}
        Ok(Some(_)) => {
            if nexus.phase() != Phase::RestoreIncomplete {
                tracing::error!(
                    backend = nexus.store.backend(),
                    "the store holds an unfinished backup restore (its marker is there): not creating or loading a root key, not serving; run spike backup restore again to finish it"
                );
            }
            nexus.set_phase(Phase::RestoreIncomplete);
            return Outcome::Retry;
        }
        Err(e) => {
            tracing::error!(backend = nexus.store.backend(), error = %e, "cannot read the store's restore marker");
            nexus.set_phase(Phase::StoreUnavailable);
            return Outcome::Retry;
        }
    }
    match verifier {
        Some(verifier) => {
            recover(
                nexus,
                client,
                &shards,
                answered,
                &verifier,
                journal.as_ref(),
            )
            .await
        }
        None if shards.is_empty() => create_new(nexus, client, answered).await,
        None => adopt(nexus, client, &shards).await,
    }
}

/// The store has a verifier: find the combination of shards that opens it. During a rekey
/// the Keepers may hold shards of the new key instead: a committed rekey's new key is loaded
/// (the keyring re-wrapped first, idempotently; the Keeper round right after finishes the
/// rest), an uncommitted one's gives the old key (the journal's `from`, sealed under it),
/// which the store still names.
async fn recover(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    shards: &[(String, Share)],
    answered: usize,
    verifier: &Verifier,
    journal: Option<&super::rekey::Journal>,
) -> Outcome {
    let threshold = usize::from(nexus.sharing().threshold);
    let found = search(by_index(shards), threshold, Some(verifier.clone())).await;
    let new_key = match journal.and_then(|j| Some((j, j.sharing()?))) {
        Some((j, next)) => {
            let to = j.to_verifier();
            search(by_index(shards), usize::from(next.threshold), Some(to))
                .await
                .key
                .map(|k| (j, k))
        }
        None => None,
    };
    let chosen = match (new_key, found.key) {
        (Some((j, to)), _) if j.committed(&to) => {
            let Some(from) = j.from_key(&to) else {
                return Outcome::Retry;
            };
            let upgrade = nexus.config.upgrade_secret_records;
            if let Err(e) = super::keyring::rewrap(&nexus.store, &from, &to, upgrade).await {
                tracing::error!(error = %e, "cannot re-wrap the keyring for the committed rekey");
                return Outcome::Retry;
            }
            Some((
                to,
                j.sharing(),
                "recovered the root key from Keepers during a committed rekey: using the new key",
            ))
        }
        (_, Some(key)) => Some((key, None, "recovered the root key from Keepers")),
        (Some((j, to)), None) => j.from_key(&to).filter(|from| from.opens(verifier)).map(|from| {
            (
                from,
                None,
                "recovered the root key from Keepers during a rekey that has not committed: using the current key",
            )
        }),
        (None, None) => None,
    };
    if let Some((key, sharing, what)) = chosen {
        return load(nexus, client, key, sharing, shards, what).await;
    }
    if shards.len() >= threshold {
        tracing::error!(
            shards = shards.len(),
            tried = found.tried,
            complete = found.complete,
            "no combination of Keeper shards opens the store's verifier: Keepers hold shards of another key"
        );
    }
    nexus.set_phase(if answered == nexus.peers().len() {
        Phase::AwaitingRestore
    } else {
        Phase::AwaitingKeepers {
            have: shards.len(),
            need: threshold,
        }
    });
    Outcome::Retry
}

/// No verifier and no shards: a new deployment, once enough Keepers answer (empty).
async fn create_new(nexus: &Arc<Nexus>, client: &KeeperClient, answered: usize) -> Outcome {
    // A new deployment: the configuration's sharing, whatever a record says.
    let threshold = usize::from(nexus.config.threshold);
    if answered < threshold {
        nexus.set_phase(Phase::AwaitingKeepers {
            have: 0,
            need: threshold,
        });
        return Outcome::Retry;
    }
    let key = match RootKey::generate() {
        Ok(key) => key,
        Err(e) => {
            tracing::error!(error = %e, "cannot generate a root key");
            return Outcome::Retry;
        }
    };
    create(
        nexus,
        client,
        key,
        &[],
        "created a new root key for a new deployment",
    )
    .await
}

/// Shards but no verifier: a deployment whose store never had one (SPIKE's) or one whose store
/// was replaced. Adopt the Keepers' key only if every shard agrees.
async fn adopt(nexus: &Arc<Nexus>, client: &KeeperClient, shards: &[(String, Share)]) -> Outcome {
    let threshold = usize::from(nexus.config.threshold);
    let Some(key) = search(by_index(shards), threshold, None).await.key else {
        nexus.set_phase(Phase::AwaitingKeepers {
            have: shards.len(),
            need: threshold,
        });
        return Outcome::Retry;
    };
    // Every shard must come from one polynomial of this key, under either SPIKE derivation.
    let observed: Vec<Share> = shards.iter().map(|(_, s)| s.clone()).collect();
    let all_agree = matches!(
        crate::crypto::shamir::identify_derivation(&key, nexus.config.threshold, &observed),
        Ok(Some(_))
    );
    if !all_agree {
        tracing::error!(
            "Keepers hold shards that do not agree and the store has no verifier: refusing to guess the root key"
        );
        nexus.set_phase(Phase::AwaitingRestore);
        return Outcome::Retry;
    }
    create(
        nexus,
        client,
        key,
        shards,
        "adopted the Keepers' root key and recorded its verifier",
    )
    .await
}

/// Writes the verifier for `key` if none exists, then loads the key; if another instance won,
/// drops `key` and asks for a prompt retry.
async fn create(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    key: RootKey,
    shards: &[(String, Share)],
    what: &str,
) -> Outcome {
    let verifier: Verifier = match key.make_verifier() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot seal the root-key verifier");
            return Outcome::Retry;
        }
    };
    match nexus.store.create_verifier(&verifier).await {
        Ok(true) => load(nexus, client, key, None, shards, what).await,
        Ok(false) => {
            tracing::info!(
                "another Nexus instance created the root key first; recovering it from the Keepers"
            );
            Outcome::RetrySoon
        }
        Err(e) => {
            tracing::error!(backend = nexus.store.backend(), error = %e, "cannot write the root-key verifier");
            nexus.set_phase(Phase::StoreUnavailable);
            Outcome::Retry
        }
    }
}

/// Loads `key`, shared as `sharing` (during a rekey: the journal's) or as its root-key record
/// says, then refills the Keepers unless a rekey is under way.
async fn load(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    key: RootKey,
    sharing: Option<super::rekey::Sharing>,
    shards: &[(String, Share)],
    what: &str,
) -> Outcome {
    let Some(keyring) = nexus.open_keyring(&key).await else {
        return Outcome::Retry;
    };
    let sharing = match sharing {
        Some(sharing) => sharing,
        None => match super::rekey::sharing_of(nexus, &key, &keyring).await {
            Ok(sharing) => sharing,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the deployment's sharing");
                return Outcome::Retry;
            }
        },
    };
    let observed: Vec<Share> = shards.iter().map(|(_, s)| s.clone()).collect();
    let derivation = nexus.derivation_of_sharing(&key, &sharing, &observed);
    let keys = match nexus.install(key, sharing, derivation, keyring) {
        Ok(keys) => keys,
        Err(e) => {
            tracing::error!(error = %e, "cannot split the root key with the configured Shamir parameters");
            return Outcome::Retry;
        }
    };
    let inconsistent: Vec<String> = shards
        .iter()
        .filter(|(_, s)| {
            !keys
                .shards
                .get(usize::from(s.index) - 1)
                .is_some_and(|e| e.ct_eq(s))
        })
        .map(|(url, _)| url.clone())
        .collect();
    for url in &inconsistent {
        tracing::error!(keeper = %url, "keeper held a shard inconsistent with the root key; it is being refilled");
    }
    nexus.set_inconsistent(inconsistent);
    tracing::info!(key_id = %keys.key_id, shard_derivation = %keys.derivation, "{what}");
    refill_if_current(nexus, client).await;
    Outcome::Loaded
}

/// Why [`deployment_key`] found no key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The store holds no verifier: no Nexus has started on it yet.
    #[error(
        "the target store has no root key yet (no root-key verifier): it is a new deployment; start a Nexus on it first (it creates the key and fills the Keepers), then run this again"
    )]
    NewDeployment,
    /// The verifier could not be read.
    #[error("cannot read the root-key verifier: {0}")]
    Store(#[from] crate::store::Error),
    /// Fewer than threshold Keepers gave a shard.
    #[error(
        "only {have} of the {need} Keeper shards needed answered (SPIKE_NEXUS_KEEPER_PEERS); are the Keepers up, and is this a Nexus identity?"
    )]
    TooFewShards {
        /// Shards in hand.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// No combination of the shards opens the verifier.
    #[error(
        "no combination of the Keepers' shards opens the store's root-key verifier: the Keepers hold another deployment's key (or await a restore)"
    )]
    NoKey,
}

/// The root key of the deployment `config` describes, found as a Nexus finds it at start: every
/// Keeper of `SPIKE_NEXUS_KEEPER_PEERS` asked once, and a threshold-sized combination of their
/// shards accepted only if it opens the store's verifier. Never creates or adopts a key, and
/// writes nothing: for tools that work on a running deployment's store beside its Nexus
/// instances (`spike migrate from-spike`).
pub async fn deployment_key(
    config: &NexusConfig,
    client: &KeeperClient,
    store: &impl Store,
) -> Result<RootKey, KeyError> {
    let verifier = store.verifier().await?.ok_or(KeyError::NewDeployment)?;
    // Since a rekey the store's record says which Keepers hold the key, and how many rebuild it.
    let sharing = super::rekey::peek_deployment(store, &verifier)
        .await?
        .and_then(|d| d.sharing())
        .unwrap_or_else(|| super::rekey::Sharing::of_config(config));
    let (key, have) = key_held_by(&sharing, client, verifier).await;
    let need = usize::from(sharing.threshold);
    match key {
        Some(key) => Ok(key),
        None if have < need => Err(KeyError::TooFewShards { have, need }),
        None => Err(KeyError::NoKey),
    }
}

/// The key that `sharing`'s Keepers hold, each asked once: a threshold of their shards that
/// opens `verifier`, if there is one; and how many shards they gave.
pub async fn key_held_by(
    sharing: &super::rekey::Sharing,
    client: &KeeperClient,
    verifier: crate::crypto::Verifier,
) -> (Option<RootKey>, usize) {
    let Round { shards, .. } = gather_from(&sharing.peers, client).await;
    let threshold = usize::from(sharing.threshold);
    let key = search(by_index(&shards), threshold, Some(verifier))
        .await
        .key;
    (key, shards.len())
}

/// The Keepers' shards in index order (arrival order within an index), for [`search`].
fn by_index(shards: &[(String, Share)]) -> Vec<Share> {
    let mut only: Vec<Share> = shards.iter().map(|(_, s)| s.clone()).collect();
    only.sort_by_key(|s| s.index);
    only
}

/// What one bounded search found.
pub struct Search {
    /// The first key the search accepted.
    pub key: Option<RootKey>,
    /// Combinations interpolated.
    pub tried: usize,
    /// The work bound was not reached: with no key found, every combination was tried.
    pub complete: bool,
}

/// [`find_key`] on the blocking pool, accepting a key that opens `verifier` (any key when
/// there is none). The caller awaits without holding an executor thread or any lock that
/// `/health` takes.
pub(super) async fn search(
    shards: Vec<Share>,
    threshold: usize,
    verifier: Option<Verifier>,
) -> Search {
    search_by(shards, threshold, move |k| {
        verifier.as_ref().is_none_or(|v| k.opens(v))
    })
    .await
}

/// [`find_key`] on the blocking pool, accepting a key that `accept` takes.
pub(super) async fn search_by(
    shards: Vec<Share>,
    threshold: usize,
    accept: impl Fn(&RootKey) -> bool + Send + 'static,
) -> Search {
    let joined =
        tokio::task::spawn_blocking(move || find_key(&shards, threshold, MAX_SEARCH_TERMS, accept))
            .await;
    // The search only ends early if it panicked: nothing was found.
    joined.unwrap_or(Search {
        key: None,
        tried: 0,
        complete: false,
    })
}

/// Tries threshold-sized combinations of shards with distinct indices and returns the first
/// key that `accept` takes, interpolating at most `max_terms` shards (always at least one
/// combination). Indices are ordered by their first appearance in `shards` and the
/// combinations of the earliest indices come first, so the caller decides what is tried
/// first (Keepers: index order; restore: the newest shards). CPU-bound: call it through
/// [`search`] from async code.
pub fn find_key(
    shards: &[Share],
    threshold: usize,
    max_terms: usize,
    accept: impl Fn(&RootKey) -> bool,
) -> Search {
    let mut result = Search {
        key: None,
        tried: 0,
        complete: false,
    };
    // One candidate list per index, so a combination never uses one index twice.
    let mut by_index: Vec<(u8, Vec<&Share>)> = Vec::new();
    for s in shards {
        match by_index.iter_mut().find(|(i, _)| *i == s.index) {
            Some((_, list)) => {
                if !list.iter().any(|o| o.ct_eq(s)) {
                    list.push(s);
                }
            }
            None => by_index.push((s.index, vec![s])),
        }
    }
    if by_index.len() < threshold || threshold == 0 {
        result.complete = true;
        return result;
    }
    let max_tries = (max_terms / threshold).max(1);
    let mut capped = false;
    for_each_combination(by_index.len(), threshold, &mut |chosen| {
        // Each chosen index may have several candidate values; walk their product.
        let lists: Vec<&Vec<&Share>> = chosen.iter().map(|&i| &by_index[i].1).collect();
        let mut pick = vec![0usize; lists.len()];
        loop {
            if result.tried >= max_tries {
                capped = true;
                return true;
            }
            result.tried += 1;
            let subset: Vec<Share> = lists
                .iter()
                .zip(&pick)
                .map(|(l, &p)| l[p].clone())
                .collect();
            if let Ok(key) = crate::crypto::combine(&subset)
                && accept(&key)
            {
                result.key = Some(key);
                return true;
            }
            // Next element of the product.
            let mut pos = 0;
            loop {
                if pos == pick.len() {
                    return false;
                }
                pick[pos] += 1;
                if pick[pos] < lists[pos].len() {
                    break;
                }
                pick[pos] = 0;
                pos += 1;
            }
        }
    });
    result.complete = !capped;
    result
}

/// Calls `f` with every `k`-subset of `0..n` in lexicographic order until it returns `true`.
fn for_each_combination(n: usize, k: usize, f: &mut dyn FnMut(&[usize]) -> bool) {
    let mut idx: Vec<usize> = (0..k).collect();
    loop {
        if f(&idx) {
            return;
        }
        let Some(i) = (0..k).rev().find(|&i| idx[i] != i + n - k) else {
            return;
        };
        idx[i] += 1;
        for j in i + 1..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

/// Sends every Keeper its shard, all at once.
pub(super) async fn push_all(nexus: &Arc<Nexus>, client: &KeeperClient) {
    let Some(keys) = nexus.keys() else { return };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (url, share)) in keys
        .sharing
        .peers
        .iter()
        .zip(keys.shards.iter())
        .enumerate()
    {
        let client = client.clone();
        let url = url.clone();
        let share = share.clone();
        let nexus = Arc::clone(nexus);
        // Peer count is validated to be at most 255 (one per share).
        let position = u8::try_from(i + 1).unwrap_or(u8::MAX);
        tasks.spawn(async move {
            let sent = client.contribute(&url, &share).await;
            nexus.metrics.shard_push(position, sent.is_ok());
            match sent {
                Ok(()) => tracing::debug!(keeper = %url, "shard sent"),
                Err(e) => tracing::warn!(keeper = %url, error = %e, "cannot send shard to keeper"),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::{find_key, for_each_combination};
    use crate::crypto::{RootKey, Share, split};

    fn wrong(index: u8) -> Share {
        let mut value = [0u8; 32];
        value[31] = index;
        value[0] = 7;
        Share::new(index, value).unwrap()
    }

    #[test]
    fn the_search_stops_at_its_work_bound() {
        // 12 wrong shards, threshold 3: C(12, 3) = 220 combinations; 30 terms allow 10.
        let shards: Vec<Share> = (1..=12).map(wrong).collect();
        let found = find_key(&shards, 3, 30, |_| true);
        assert!(found.key.is_some());
        let found = find_key(&shards, 3, 30, |_| false);
        assert!(found.key.is_none());
        assert_eq!((found.tried, found.complete), (10, false));
        let found = find_key(&shards, 3, 3 * 220, |_| false);
        assert_eq!((found.tried, found.complete), (220, true));
        // At least one combination, whatever the bound.
        assert_eq!(find_key(&shards, 3, 0, |_| false).tried, 1);
    }

    #[test]
    fn the_search_tries_the_first_indices_first() {
        let key = RootKey::generate().unwrap();
        let good = split(&key, 3, 12).unwrap();
        // Wrong shards at 1..=9, then the good ones of 10..=12 first in the list.
        let mut shards: Vec<Share> = good[9..].to_vec();
        shards.extend((1..=9).map(wrong));
        let found = find_key(&shards, 3, 30, |k| k.ct_eq(&key));
        assert!(found.key.is_some_and(|k| k.ct_eq(&key)));
        assert_eq!(found.tried, 1);
        // In index order the good set is the last of 220: beyond a bound of 10.
        shards.sort_by_key(|s| s.index);
        assert!(find_key(&shards, 3, 30, |k| k.ct_eq(&key)).key.is_none());
    }

    #[test]
    fn combinations_are_complete_and_ordered() {
        let mut seen = Vec::new();
        for_each_combination(4, 2, &mut |c| {
            seen.push(c.to_vec());
            false
        });
        assert_eq!(
            seen,
            vec![
                vec![0, 1],
                vec![0, 2],
                vec![0, 3],
                vec![1, 2],
                vec![1, 3],
                vec![2, 3]
            ]
        );
        let mut count = 0;
        for_each_combination(3, 3, &mut |_| {
            count += 1;
            false
        });
        assert_eq!(count, 1);
    }
}
