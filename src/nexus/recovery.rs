//! Recovery shards (DESIGN.md §1.5): the operators' copy of the root key, for the day every
//! Keeper is lost.
//!
//! `export` hands a recover-role operator the shards of a second polynomial (seeded with a
//! domain-separation label), so a recovery shard plus a Keeper shard never reach the threshold
//! together. `restore` collects shards from a restore-role operator in this instance's memory;
//! once `threshold` distinct indices are in, it rebuilds the key, accepts it only if it opens
//! the store's verifier (trying other combinations when more shards than needed were given),
//! installs it, and refills every Keeper, after which the other Nexus instances recover from
//! the Keepers on their own. Any consistent set restores: our recovery shards, or SPIKE's
//! (which are Keeper-polynomial shards). Restore is refused once the key is loaded.

use std::sync::Arc;

use super::{ApiError, Keys, Nexus, keepers};
use crate::crypto::Share;
use crate::protocol::nexus::{RecoverResponse, RestoreRequest, RestoreResponse};
use crate::store::Store;

/// The recovery shards of the loaded key.
pub fn export(nexus: &Nexus, keys: &Keys) -> Result<RecoverResponse, ApiError> {
    let shards =
        crate::crypto::split_recovery(&keys.root, nexus.config.threshold, nexus.config.shares)?;
    Ok(RecoverResponse {
        shards: shards
            .iter()
            .map(|s| (s.index.to_string(), *s.value()))
            .collect(),
    })
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
    let threshold = usize::from(nexus.config.threshold);
    let index = u8::try_from(req.id)
        .ok()
        .filter(|i| *i >= 1)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("shard index {} is out of range 1..=255", req.id))
        })?;
    let value = req
        .shard
        .ok_or_else(|| ApiError::BadRequest("the request carries no shard".into()))?;
    let share = Share::new(index, value).map_err(|e| ApiError::BadRequest(e.to_string()))?;

    let pending: Vec<Share> = {
        let mut pending = nexus
            .pending_restore
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !pending.iter().any(|p| p.ct_eq(&share)) {
            pending.push(share);
        }
        pending.clone()
    };
    let distinct = pending
        .iter()
        .map(|s| s.index)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if distinct < threshold {
        return Ok(RestoreResponse {
            collected: distinct,
            remaining: threshold - distinct,
            restored: false,
        });
    }
    let drop_pending = || {
        nexus
            .pending_restore
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    };
    let Some(verifier) = nexus.store.verifier().await? else {
        drop_pending();
        return Err(ApiError::BadRequest(
            "the store holds no root-key verifier, so there is no key to restore (a new deployment creates its key by itself)".into(),
        ));
    };
    let labelled: Vec<(String, Share)> = pending
        .iter()
        .cloned()
        .map(|s| ("restore".to_string(), s))
        .collect();
    let Some(key) = keepers::find_key(&labelled, threshold, |k| k.opens(&verifier)) else {
        drop_pending();
        tracing::error!(
            "restore: the submitted shards do not rebuild this deployment's root key; pending shards dropped"
        );
        return Err(ApiError::BadRequest(
            "these shards do not rebuild this deployment's root key; all pending shards were dropped, start again".into(),
        ));
    };
    // Recovery shards are the Keeper shards: their derivation is the deployment's.
    let derivation = nexus.derivation_of(&key, &pending);
    let keys = nexus.install(key, derivation)?;
    drop_pending();
    tracing::info!(key_id = %keys.key_id, shard_derivation = %keys.derivation, "restored the root key from recovery shards; refilling Keepers");
    if let Some(client) = nexus.keeper_client.get() {
        keepers::push_all(nexus, client).await;
    }
    Ok(RestoreResponse {
        collected: distinct,
        remaining: 0,
        restored: true,
    })
}
