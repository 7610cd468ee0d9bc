//! Recovery shards (DESIGN.md §1.5): the operators' copy of the root key, for the day every
//! Keeper is lost.
//!
//! `export` hands a recover-role operator the shards of a second polynomial (seeded with a
//! domain-separation label), so a recovery shard plus a Keeper shard never reach the threshold
//! together. `restore` collects shards from a restore-role operator in this instance's memory;
//! once `threshold` of them are in, it rebuilds the key, accepts it only if it opens the
//! store's verifier (trying other combinations when more shards than needed were given),
//! installs it, and refills every Keeper, after which the other Nexus instances recover from
//! the Keepers on their own. Any consistent set restores: our recovery shards, or SPIKE's
//! (which are Keeper-polynomial shards). Restore is refused once the key is loaded.
//!
//! **Shards from before a rekey** rebuild a key the store's root-key record lists as replaced:
//! they are refused with a message that says so, and every pending shard is dropped (they can
//! never help), so the operator starts again with the shards exported since.
//!
//! **Pending shards: one per index, the newest wins.** An index must lie in `1..=shares`
//! (400 otherwise), and a shard for an index already held replaces it, so an instance never
//! holds more than `shares` shards however many are sent. Newest-wins because the operator
//! must be able to correct a wrong shard by sending the right one for its index; with
//! first-wins a mistyped or hostile shard would block that index until the instance restarts.
//! A caller with the restore role can always send garbage (overwrite under newest-wins, squat
//! under first-wins): the role is trusted with availability either way, and newest-wins is the
//! rule under which the honest operator can repair. A set that does not rebuild the key is
//! refused (400) but stays pending: the next shard, a replacement or another index, tries
//! again, and the operator never has to start over.
//!
//! **The search never blocks the server.** Each shard accepted once `threshold` are held starts
//! an attempt in its own task (so a client that disconnects does not abandon a key found for
//! it). Attempts run one at a time; a request that arrives during one waits on an async lock,
//! parked, not on an executor thread, and if a search that began after its shard arrived found
//! nothing, it takes that answer instead of searching again, so a flood of shards costs about
//! one search per search's duration, not one per shard. The search itself is
//! [`keepers::search`]: bounded work on the blocking pool, with the newest shards first, so the
//! first combination tried is the `threshold` most recent shards. `/health` takes none of
//! these locks.
//!
//! **Pending shards are key material.** Their values are held in locked pages of their own
//! ([`Locked`]), overwritten when replaced and wiped when cleared; the copies a search works on are wiped when
//! it ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{ApiError, Keys, Nexus, keepers};
use crate::crypto::locked::Locked;
use crate::crypto::{KEY_LEN, Share};
use crate::protocol::nexus::{ErrorCode, RecoverResponse, RestoreRequest, RestoreResponse};
use crate::store::Store;

/// The recovery shards of the loaded key, shared as the key is; the store records that this
/// key's shards were exported (`/health` says when they have not been since a rekey).
pub async fn export(nexus: &Nexus, keys: &Keys) -> Result<RecoverResponse, ApiError> {
    if let Some(j) = super::rekey::journal(&nexus.store).await? {
        // Shards exported now would be voided by the rekey's commit in a moment.
        return Err(ApiError::operator(
            ErrorCode::ApiConflict,
            format!(
                "a rekey from key {} to key {} is under way: export once it has finished",
                j.from(),
                j.to()
            ),
        ));
    }
    let shards =
        crate::crypto::split_recovery(&keys.root, keys.sharing.threshold, keys.sharing.shares())?;
    super::rekey::record_export(&nexus.store, &keys.root).await?;
    nexus.metrics.recovery_exported(true);
    Ok(RecoverResponse {
        shards: shards
            .iter()
            .map(|s| (s.index.to_string(), *s.value()))
            .collect(),
    })
}

/// Restore shards held by this instance until they rebuild the key.
#[derive(Default)]
pub struct Pending {
    /// Locked only to add, copy or clear; never across an await or a search.
    held: Mutex<Held>,
    /// One attempt at a time. Holds the generation of the last set searched in vain: a
    /// request whose shard arrived at or before it needs no search of its own.
    attempt: tokio::sync::Mutex<u64>,
}

#[derive(Default)]
struct Held {
    /// Index → the generation its shard arrived in.
    arrived: BTreeMap<u8, u64>,
    /// The shard values, the one for index `i` at `i - 1`, in locked pages of their own
    /// (allocated with the first shard, wiped and unlocked when cleared).
    values: Option<Locked<[[u8; KEY_LEN]; 255]>>,
    /// Bumped by every accepted shard and by every clear.
    generation: u64,
}

impl Pending {
    fn held(&self) -> MutexGuard<'_, Held> {
        // Every change leaves the map consistent, so a poisoned lock is still usable.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `share`, replacing any shard of its index; returns how many are held and the
    /// generation that took it. `share` itself is wiped when it is dropped here.
    fn add(&self, share: Share) -> (usize, u64) {
        let mut held = self.held();
        held.generation += 1;
        let generation = held.generation;
        let values = held
            .values
            .get_or_insert_with(|| Locked::new("pending restore shards"));
        // Share indices are 1..=255 (Share::new refuses 0).
        values[usize::from(share.index) - 1].copy_from_slice(share.value());
        held.arrived.insert(share.index, generation);
        (held.arrived.len(), generation)
    }

    /// Copies of the held shards, newest first, and the generation they make up. The copies
    /// live only for one search (and are wiped when dropped).
    fn newest_first(&self) -> (Vec<Share>, u64) {
        let held = self.held();
        let mut order: Vec<(u64, u8)> = held.arrived.iter().map(|(&i, &g)| (g, i)).collect();
        order.sort_by_key(|&(g, _)| std::cmp::Reverse(g));
        let shards = match &held.values {
            Some(values) => order
                .into_iter()
                .filter_map(|(_, i)| Share::new(i, values[usize::from(i) - 1]).ok())
                .collect(),
            None => Vec::new(),
        };
        (shards, held.generation)
    }

    fn clear(&self) {
        let mut held = self.held();
        held.arrived.clear();
        // Wiped, then unlocked, on drop.
        held.values = None;
        held.generation += 1;
    }

    /// Whether the held shard values are in locked pages, checked in the process's memory
    /// map too (tests).
    #[cfg(test)]
    fn is_locked(&self) -> Option<bool> {
        self.held().values.as_ref().map(|v| {
            let (addr, len) = v.span();
            v.is_locked() && crate::platform::hardening::pages_locked(addr, len)
        })
    }
}

fn progress(held: usize, threshold: usize) -> RestoreResponse {
    RestoreResponse {
        collected: held,
        remaining: threshold.saturating_sub(held),
        restored: false,
    }
}

/// Takes one shard towards a restore.
pub async fn restore(
    nexus: &Arc<Nexus>,
    req: &RestoreRequest,
) -> Result<RestoreResponse, ApiError> {
    if nexus.keys().is_some() {
        return Err(ApiError::BadRequest(
            "this Nexus already has its root key; restore is only for an instance reporting awaiting_restore".into(),
        ));
    }
    let sharing = nexus.sharing();
    let shares = sharing.shares();
    let index = u8::try_from(req.id)
        .ok()
        .filter(|i| (1..=shares).contains(i))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "shard index {} is out of range 1..={shares} (the deployment's Keeper count)",
                req.id
            ))
        })?;
    let value = req
        .shard
        .ok_or_else(|| ApiError::BadRequest("the request carries no shard".into()))?;
    let share = Share::new(index, value).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let threshold = usize::from(sharing.threshold);
    let (held, generation) = nexus.pending_restore.add(share);
    if held < threshold {
        // Shards of a key a rekey replaced may be fewer than today's threshold: say so now
        // rather than after the operator has typed in more of them.
        let (shards, _) = nexus.pending_restore.newest_first();
        if let Some(why) = predate(nexus, &shards).await {
            nexus.pending_restore.clear();
            // The restore operator is told why (key ids and times only).
            return Err(ApiError::operator(ErrorCode::ApiBadRequest, why));
        }
        return Ok(progress(held, threshold));
    }
    let nexus = Arc::clone(nexus);
    tokio::spawn(async move { attempt(&nexus, generation).await })
        .await
        .map_err(|e| ApiError::Internal(format!("the restore attempt failed: {e}")))?
}

/// Tries the held shards against the verifier, one attempt at a time, for a request whose
/// shard arrived in `generation`.
async fn attempt(nexus: &Arc<Nexus>, generation: u64) -> Result<RestoreResponse, ApiError> {
    let threshold = usize::from(nexus.sharing().threshold);
    let mut searched_in_vain = nexus.pending_restore.attempt.lock().await;
    if nexus.keys().is_some() {
        // An attempt this one waited behind (or the Keepers) loaded the key.
        return Ok(RestoreResponse {
            collected: threshold,
            remaining: 0,
            restored: true,
        });
    }
    let (shards, current) = nexus.pending_restore.newest_first();
    let held = shards.len();
    if held < threshold {
        // Cleared while this request waited.
        return Ok(progress(held, threshold));
    }
    let not_rebuilt = |tried: &str| {
        ApiError::BadRequest(format!(
            "the {held} pending shards do not rebuild this deployment's root key ({tried}); they stay pending: send the right shard for an index again (the newest wins) or shards of other indices"
        ))
    };
    if generation <= *searched_in_vain {
        // A search that waited for this request's shard, or began after it, found nothing.
        return Err(not_rebuilt("tried together with later shards"));
    }
    let Some(verifier) = nexus.store.verifier().await? else {
        nexus.pending_restore.clear();
        return Err(ApiError::BadRequest(
            "the store holds no root-key verifier, so there is no key to restore (a new deployment creates its key by itself); pending shards dropped".into(),
        ));
    };
    let found = keepers::search(shards.clone(), threshold, Some(verifier)).await;
    let Some(key) = found.key else {
        *searched_in_vain = current;
        if let Some(why) = predate(nexus, &shards).await {
            tracing::warn!(held, "restore: {why}");
            nexus.pending_restore.clear();
            // The restore operator is told why (key ids and times only).
            return Err(ApiError::operator(ErrorCode::ApiBadRequest, why));
        }
        tracing::warn!(
            held,
            tried = found.tried,
            complete = found.complete,
            "restore: the pending shards do not rebuild this deployment's root key; they stay pending"
        );
        return Err(not_rebuilt(&if found.complete {
            format!("all {} combinations tried", found.tried)
        } else {
            format!(
                "the first {} combinations tried, newest shards first, before the work bound",
                found.tried
            )
        }));
    };
    // Recovery files of SPIKE's Pilot are Keeper shards: their derivation is the deployment's
    // (ours come from a second polynomial and match neither; the current one is used).
    let Some(keyring) = nexus.open_keyring(&key).await else {
        return Err(ApiError::Internal(
            "the root key is rebuilt but the store's keyring cannot be read or is refused".into(),
        ));
    };
    let sharing = super::rekey::sharing_of(nexus, &key, &keyring).await?;
    let derivation = nexus.derivation_of_sharing(&key, &sharing, &shards);
    let keys = nexus.install(key, sharing, derivation, keyring)?;
    nexus.pending_restore.clear();
    drop(searched_in_vain);
    tracing::info!(key_id = %keys.key_id, shard_derivation = %keys.derivation, "restored the root key from recovery shards; refilling Keepers");
    if let Some(client) = nexus.keeper_client.get() {
        keepers::refill_if_current(nexus, client).await;
    }
    Ok(RestoreResponse {
        collected: held,
        remaining: 0,
        restored: true,
    })
}

/// Why `shards` are refused, when they rebuild a root key that a rekey replaced: the store's
/// root-key record lists the ids (and thresholds) of the keys it replaced. Key ids are
/// one-way fingerprints, so the shards are only combined and compared, never used.
async fn predate(nexus: &Nexus, shards: &[Share]) -> Option<String> {
    // The record is not authenticated here (no key yet): peek_deployment keeps it only when
    // it names the key the verifier names, and that key is never called replaced.
    let verifier = nexus.store.verifier().await.ok()??;
    let deployment = super::rekey::peek_deployment(&nexus.store, &verifier)
        .await
        .ok()??;
    let current = verifier.key_id;
    let mut thresholds: Vec<u8> = deployment.previous.iter().map(|p| p.threshold).collect();
    thresholds.sort_unstable();
    thresholds.dedup();
    for t in thresholds {
        if usize::from(t) > shards.len() {
            continue;
        }
        let previous = deployment.previous.clone();
        let current = current.clone();
        let found = keepers::search_by(shards.to_vec(), usize::from(t), move |k| {
            let id = k.key_id();
            id != current && previous.iter().any(|p| p.key_id == id)
        })
        .await;
        if let Some(key) = found.key {
            let id = key.key_id();
            let when = deployment
                .previous
                .iter()
                .find(|p| p.key_id == id)
                .map(|p| p.replaced.clone())
                .unwrap_or_default();
            return Some(format!(
                "these recovery shards rebuild root key {id}, which a rekey replaced at {when}: \
                 they predate the rekey and restore nothing, so the pending shards were dropped; \
                 send the shards exported since (spike recover export), of key {}",
                deployment.key_id
            ));
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    #[test]
    fn pending_shards_live_in_locked_pages_one_per_index_newest_first() {
        let p = Pending::default();
        assert_eq!(p.is_locked(), None, "nothing allocated before a shard");
        p.add(Share::new(2, [2; 32]).unwrap());
        p.add(Share::new(1, [1; 32]).unwrap());
        let (held, _) = p.add(Share::new(2, [3; 32]).unwrap());
        assert_eq!(held, 2, "one per index");
        assert_eq!(
            p.is_locked(),
            Some(true),
            "mlock failed: is RLIMIT_MEMLOCK too low?"
        );
        let (shards, _) = p.newest_first();
        let order: Vec<u8> = shards.iter().map(|s| s.index).collect();
        assert_eq!(order, [2, 1]);
        assert_eq!(shards[0].value(), &[3; 32], "the newest wins");
        p.clear();
        assert_eq!(p.is_locked(), None, "wiped and released");
        assert!(p.newest_first().0.is_empty());
    }
}
