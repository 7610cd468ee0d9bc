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
//!
//! Attempts repeat with capped exponential backoff until the key is loaded. From then on the
//! shards are pushed at once and every `SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Nexus, Phase};
use crate::client::keeper::{KeeperClient, ShardAnswer};
use crate::crypto::{RootKey, Share, Verifier};
use crate::platform::jitter;
use crate::store::Store;
use crate::transport::{HttpsClient, Timeouts};

/// First wait between two recovery attempts.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Most key combinations tried against the verifier in one attempt.
const MAX_COMBINATIONS: usize = 10_000;

/// Owns the background task; stops it on drop.
pub struct SyncGuard(tokio::task::JoinHandle<()>);

impl Drop for SyncGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn spawn(nexus: Arc<Nexus>, tls: Arc<rustls::ClientConfig>) -> SyncGuard {
    let client = KeeperClient::new(HttpsClient::new(
        tls,
        Timeouts {
            connect: nexus.config.keeper_timeout,
            handshake: nexus.config.keeper_timeout,
            request: nexus.config.keeper_timeout,
            max_response: crate::client::keeper::MAX_RESPONSE,
        },
    ));
    // The restore route pushes shards with the same client.
    let _ = nexus.keeper_client.set(client.clone());
    SyncGuard(tokio::spawn(run(nexus, client)))
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
    loop {
        push_all(&nexus, &client).await;
        tokio::time::sleep(nexus.config.keeper_update_interval).await;
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
struct Round {
    shards: Vec<(String, Share)>,
    answered: usize,
}

/// Asks every Keeper for its shard, all at once.
async fn gather(nexus: &Nexus, client: &KeeperClient) -> Round {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, url) in nexus.peers().iter().enumerate() {
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
    };
    while let Some(joined) = tasks.join_next().await {
        // A task only ends early if it panicked; that Keeper counts as unreachable.
        let Ok((url, position, answer)) = joined else {
            continue;
        };
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
    let Round { shards, answered } = gather(nexus, client).await;
    let verifier = match nexus.store.verifier().await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(backend = nexus.store.backend(), error = %e, "cannot read the root-key verifier");
            nexus.set_phase(Phase::StoreUnavailable);
            return Outcome::Retry;
        }
    };
    match verifier {
        Some(verifier) => recover(nexus, client, &shards, answered, &verifier).await,
        None if shards.is_empty() => create_new(nexus, client, answered).await,
        None => adopt(nexus, client, &shards).await,
    }
}

/// The store has a verifier: find the combination of shards that opens it.
async fn recover(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    shards: &[(String, Share)],
    answered: usize,
    verifier: &Verifier,
) -> Outcome {
    let threshold = usize::from(nexus.config.threshold);
    if let Some(key) = find_key(shards, threshold, |k| k.opens(verifier)) {
        return load(
            nexus,
            client,
            key,
            shards,
            "recovered the root key from Keepers",
        )
        .await;
    }
    if shards.len() >= threshold {
        tracing::error!(
            shards = shards.len(),
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
    let Some(key) = find_key(shards, threshold, |_| true) else {
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
        Ok(true) => load(nexus, client, key, shards, what).await,
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

async fn load(
    nexus: &Arc<Nexus>,
    client: &KeeperClient,
    key: RootKey,
    shards: &[(String, Share)],
    what: &str,
) -> Outcome {
    let observed: Vec<Share> = shards.iter().map(|(_, s)| s.clone()).collect();
    let derivation = nexus.derivation_of(&key, &observed);
    let keys = match nexus.install(key, derivation) {
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
    push_all(nexus, client).await;
    Outcome::Loaded
}

/// Tries threshold-sized combinations of shards with distinct indices (in a stable order)
/// and returns the first key that `accept` takes.
pub(super) fn find_key(
    shards: &[(String, Share)],
    threshold: usize,
    accept: impl Fn(&RootKey) -> bool,
) -> Option<RootKey> {
    // One candidate list per index, so a combination never uses one index twice.
    let mut by_index: BTreeMap<u8, Vec<&Share>> = BTreeMap::new();
    for (_, s) in shards {
        let list = by_index.entry(s.index).or_default();
        if !list.iter().any(|o| o.ct_eq(s)) {
            list.push(s);
        }
    }
    let indices: Vec<u8> = by_index.keys().copied().collect();
    if indices.len() < threshold || threshold == 0 {
        return None;
    }
    let mut tried = 0;
    let mut found = None;
    for_each_combination(indices.len(), threshold, &mut |chosen| {
        // Each chosen index may have several candidate values; walk their product.
        let lists: Vec<&Vec<&Share>> = chosen.iter().map(|&i| &by_index[&indices[i]]).collect();
        let mut pick = vec![0usize; lists.len()];
        loop {
            if tried >= MAX_COMBINATIONS {
                return true;
            }
            tried += 1;
            let subset: Vec<Share> = lists
                .iter()
                .zip(&pick)
                .map(|(l, &p)| l[p].clone())
                .collect();
            if let Ok(key) = crate::crypto::combine(&subset)
                && accept(&key)
            {
                found = Some(key);
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
    found
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
    for (url, share) in nexus.peers().iter().zip(keys.shards.iter()) {
        let client = client.clone();
        let url = url.clone();
        let share = share.clone();
        tasks.spawn(async move {
            match client.contribute(&url, &share).await {
                Ok(()) => tracing::debug!(keeper = %url, "shard sent"),
                Err(e) => tracing::warn!(keeper = %url, error = %e, "cannot send shard to keeper"),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::for_each_combination;

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
