//! `spike migrate from-spike`: every secret and policy of a SPIKE Nexus SQLite store, written
//! into this deployment's store.
//!
//! It runs with a Nexus's environment — the same `SPIKE_NEXUS_*` store settings, the same Nexus
//! SVID, the same Keeper peers — and gets the target's root key the way a Nexus does at start
//! ([`keepers::deployment_key`]: the Keepers' shards, accepted only if they open the store's
//! verifier). A target without a verifier is a new deployment: it stops and says to start a
//! Nexus first. The source key comes from SPIKE Pilot recovery files (`--recover-dir`) or from
//! SPIKE Keepers (`--keepers`, asked as a Nexus asks them); it is accepted only if it opens the
//! SPIKE database (SPIKE keeps no verifier).
//!
//! Three phases:
//! 1. **Read**: the whole SPIKE database is decrypted and checked — every row must open under
//!    the key, every path, value key and policy must pass the rules a put obeys. Any problem
//!    refuses the migration with the list; nothing is written.
//! 2. **Preflight** against the target: a path or policy name that exists there with other
//!    content is a conflict, and the migration is refused with the list, nothing written; one
//!    with the same content is skipped, so a rerun writes nothing.
//! 3. **Write**: the policies in one change of the policy book, then each secret as one
//!    record, create-if-absent, through [`secrets::import`] and [`policy::import`] — the modules
//!    every Nexus write goes through — so Nexus instances may serve meanwhile. A store failure
//!    here leaves the secrets written so far; a rerun skips them and completes the rest.

pub mod spike_db;

use std::path::PathBuf;

use crate::crypto::shamir::ShardDerivation;
use crate::crypto::{RootKey, Share};
use crate::nexus::keepers::{self, MAX_SEARCH_TERMS};
use crate::nexus::policy::{self, PolicyImport, StoredPolicy};
use crate::nexus::secrets::{self, Import, Imported};
use crate::nexus::{Keys, NexusConfig, book};
use crate::platform::CommandError;
use crate::platform::env::ProcessEnv;
use crate::protocol::nexus::PolicyPutRequest;
use crate::store::AnyStore;
use spike_db::{Contents, SpikeDb};

/// Where the source deployment's root key comes from.
pub enum SourceKey {
    /// A directory of SPIKE Pilot recovery files (`spike.recovery.<i>.txt`).
    RecoverDir(PathBuf),
    /// SPIKE Keeper URLs, in index order.
    Keepers(Vec<String>),
}

/// What `spike migrate from-spike` was asked.
pub struct FromSpike {
    /// The SPIKE Nexus SQLite file.
    pub db: PathBuf,
    /// The source root key.
    pub key: SourceKey,
    /// Stop after the preflight: say what would be written.
    pub dry_run: bool,
}

/// A failure, with its exit status: 2 for bad input or configuration, 1 otherwise.
type Result<T> = std::result::Result<T, CommandError>;

fn usage(e: impl std::fmt::Display) -> CommandError {
    CommandError::usage(e)
}

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::failed(e)
}

/// Runs `spike migrate from-spike`.
pub async fn from_spike(args: FromSpike) -> Result<()> {
    let config = NexusConfig::from_source(&ProcessEnv).map_err(usage)?;
    // Phase 1 needs nothing of the target: a bad source is refused before anything connects.
    let db = SpikeDb::open(&args.db).map_err(usage)?;
    let probe = db.probe().map_err(usage)?;

    let (_own, tls) =
        crate::client::keeper::tls_as_nexus(&config.identity, "the migration runs as a Nexus")
            .await?;
    let keeper_client = keepers::keeper_client(&config, tls);

    let contents = match &probe {
        None => Contents {
            secrets: Default::default(),
            policies: Vec::new(),
        },
        Some(probe) => {
            let shares = match &args.key {
                SourceKey::RecoverDir(dir) => {
                    crate::client::recover::read_dir(dir).map_err(usage)?
                }
                SourceKey::Keepers(urls) => source_shards(urls, &keeper_client).await?,
            };
            let key = source_key(&shares, |k| SpikeDb::opens(probe, k)).ok_or_else(|| {
                usage(format!(
                    "the key rebuilt from the {} shard(s) given (indices {}) does not open {}: \
                     they are another deployment's, or fewer than its threshold; refused, \
                     nothing written",
                    shares.len(),
                    shares
                        .iter()
                        .map(|s| s.index.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    args.db.display()
                ))
            })?;
            db.read(&key).map_err(usage)?
        }
    };
    let plan = validate(contents)?;
    eprintln!(
        "read {}: {} secret(s) with {} version(s), {} policy(ies); every row opens and passes the rules",
        args.db.display(),
        plan.secrets.len(),
        plan.secrets
            .iter()
            .map(|(_, s)| s.versions.len())
            .sum::<usize>(),
        plan.policies.len()
    );

    let store = AnyStore::open(&config.backend)
        .await
        .map_err(|e| failed(format!("cannot open the target store: {e}")))?;
    let root = keepers::deployment_key(&config, &keeper_client, &store)
        .await
        .map_err(|e| failed(format!("target: {e}")))?;
    let keys = Keys::new(
        root,
        crate::nexus::rekey::Sharing::of_config(&config),
        ShardDerivation::default(),
        config.upgrade_secret_records,
    )
    .map_err(failed)?;
    // The target's data keys: what migrated values are sealed under and what existing ones
    // are compared with (created as a Nexus start creates it, if the store has none yet).
    let ring = crate::nexus::keyring::ensure(&store, &keys.root, config.upgrade_secret_records)
        .await
        .map_err(|e| failed(format!("target: {e}")))?;
    let keys = keys.with_keyring(ring);
    let target = Target {
        store,
        keys,
        max_versions: config.max_secret_versions,
        policies: book::Policies::default(),
        writers: secrets::Writers::default(),
    };
    target.migrate(&plan, args.dry_run).await
}

/// Asks the SPIKE Keepers at `urls` for their shards, as a Nexus asks them.
async fn source_shards(
    urls: &[String],
    client: &crate::client::keeper::KeeperClient,
) -> Result<Vec<Share>> {
    let peers = urls
        .iter()
        .map(|u| crate::platform::env::parse_https_url(u.trim()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| usage(format!("--keepers: {e}")))?;
    let round = keepers::gather_from(&peers, client).await;
    if round.shards.is_empty() {
        return Err(failed(format!(
            "no shard from the {} SPIKE Keeper(s) given ({} answered empty, the others not at all): nothing to rebuild the source key from",
            peers.len(),
            round.answered
        )));
    }
    Ok(round.shards.into_iter().map(|(_, s)| s).collect())
}

/// The key that `opens` accepts, from `shares` of a deployment whose threshold is unknown:
/// all of them first (a consistent set of any size above the threshold interpolates to the
/// key), then smaller combinations, so a shard of another deployment among enough good ones
/// is left out. Bounded in work like a Nexus's search.
fn source_key(shares: &[Share], opens: impl Fn(&RootKey) -> bool) -> Option<RootKey> {
    (1..=shares.len())
        .rev()
        .find_map(|t| keepers::find_key(shares, t, MAX_SEARCH_TERMS, &opens).key)
}

/// What phase 1 accepted, in our terms.
struct Plan {
    secrets: Vec<(String, Import)>,
    policies: Vec<StoredPolicy>,
}

/// Phase 1's checks: every secret and policy must be one our Nexus would accept.
fn validate(contents: Contents) -> Result<Plan> {
    let mut problems = Vec::new();
    let mut secrets = Vec::with_capacity(contents.secrets.len());
    for (path, secret) in contents.secrets {
        match secrets::validate_import(&path, &secret) {
            Ok(()) => secrets.push((path, secret)),
            Err(why) => problems.push(format!("secret {path:?}: {why}")),
        }
    }
    let mut policies = Vec::with_capacity(contents.policies.len());
    for p in contents.policies {
        let req = PolicyPutRequest {
            name: p.name.clone(),
            spiffeid_pattern: p.spiffeid_pattern,
            path_pattern: p.path_pattern,
            permissions: p.permissions,
        };
        match (
            policy::validate(&req),
            p.created.checked_mul(1_000_000_000),
            p.updated.checked_mul(1_000_000_000),
        ) {
            (Ok(mut stored), Some(created), Some(updated)) => {
                stored.created = created;
                stored.updated = updated;
                policies.push(stored);
            }
            (Err(crate::nexus::ApiError::BadRequest(why)), _, _) => {
                problems.push(format!("policy {:?}: {why}", p.name))
            }
            (Err(e), _, _) => problems.push(format!("policy {:?}: {e}", p.name)),
            _ => problems.push(format!("policy {:?}: time out of range", p.name)),
        }
    }
    if !problems.is_empty() {
        return Err(usage(format!(
            "refused, nothing written: {} item(s) of the SPIKE store would not be accepted by \
             spike (docs/decisions.md, decision 20 for paths): {}",
            problems.len(),
            problems.join("; ")
        )));
    }
    Ok(Plan { secrets, policies })
}

/// The deployment written into.
struct Target {
    store: AnyStore,
    keys: Keys,
    max_versions: u32,
    policies: book::Policies,
    writers: secrets::Writers,
}

impl Target {
    async fn migrate(&self, plan: &Plan, dry_run: bool) -> Result<()> {
        // Phase 2: preflight.
        let mut conflicts = Vec::new();
        let mut to_write: Vec<&(String, Import)> = Vec::new();
        let mut skipped = 0usize;
        for item in &plan.secrets {
            let (path, secret) = item;
            match secrets::compare_import(&self.store, &self.keys.secrets, path, secret)
                .await
                .map_err(|e| failed(format!("target: secret {path:?}: {e}")))?
            {
                None => to_write.push(item),
                Some(Imported::Same) => skipped += 1,
                Some(Imported::Different(why)) => {
                    conflicts.push(format!("secret {path:?} ({why})"))
                }
                Some(Imported::Written) => {}
            }
        }
        let policy_plan = policy::import(
            &self.store,
            &self.policies,
            &*self.keys.keyring.loaded(),
            &plan.policies,
            true,
        )
        .await
        .map_err(|e| failed(format!("target: policies: {e}")))?;
        let (new_policies, same_policies) = match policy_plan {
            PolicyImport::Done { written, same } => (written, same),
            PolicyImport::Conflicts(names) => {
                conflicts.extend(
                    names
                        .into_iter()
                        .map(|n| format!("policy {n:?} (another grant)")),
                );
                (0, 0)
            }
        };
        if !conflicts.is_empty() {
            return Err(failed(format!(
                "refused, nothing written: {} item(s) exist in the target with other content: {}",
                conflicts.len(),
                conflicts.join("; ")
            )));
        }
        let versions: usize = to_write.iter().map(|(_, s)| s.versions.len()).sum();
        if to_write.is_empty() && new_policies == 0 {
            println!(
                "nothing to do: the target already holds every secret ({skipped}) and policy ({same_policies})"
            );
            return Ok(());
        }
        if dry_run {
            println!(
                "dry run: would write {} secret(s) with {versions} version(s) and {new_policies} policy(ies); {skipped} secret(s) and {same_policies} policy(ies) already there",
                to_write.len()
            );
            return Ok(());
        }

        // Phase 3: write.
        let partial = |done: usize, e: &dyn std::fmt::Display| {
            failed(format!(
                "{e}; the migration is incomplete ({done} of {} secret(s) written): run it again to complete it",
                to_write.len()
            ))
        };
        let mut policies_written = 0;
        if new_policies > 0 {
            match policy::import(
                &self.store,
                &self.policies,
                &*self.keys.keyring.loaded(),
                &plan.policies,
                false,
            )
            .await
            .map_err(|e| partial(0, &format!("target: policies: {e}")))?
            {
                PolicyImport::Done { written, .. } => policies_written = written,
                PolicyImport::Conflicts(names) => {
                    return Err(failed(format!(
                        "refused, nothing written: policies {} were changed in the target meanwhile",
                        names.join(", ")
                    )));
                }
            }
        }
        let (mut written, mut raced) = (0usize, Vec::new());
        let mut written_versions = 0usize;
        for (path, secret) in &to_write {
            match secrets::import(
                &self.store,
                &self.writers,
                &self.keys.secrets,
                path,
                secret,
                self.max_versions,
            )
            .await
            .map_err(|e| partial(written, &format!("target: secret {path:?}: {e}")))?
            {
                Imported::Written => {
                    written += 1;
                    written_versions += secret.versions.len();
                }
                Imported::Same => skipped += 1,
                Imported::Different(why) => raced.push(format!("{path:?} ({why})")),
            }
        }
        println!(
            "migrated from SPIKE: {written} secret(s) with {written_versions} version(s) and {policies_written} policy(ies) written; {skipped} secret(s) and {same_policies} policy(ies) already there"
        );
        if !raced.is_empty() {
            return Err(failed(format!(
                "{} secret(s) were written in the target by someone else during the migration and differ, left as they are: {}",
                raced.len(),
                raced.join("; ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::source_key;
    use crate::crypto::{RootKey, split};

    #[test]
    fn the_source_key_is_found_whatever_the_threshold_and_a_foreign_shard_is_left_out() {
        let key = RootKey::generate().unwrap();
        let other = RootKey::generate().unwrap();
        let is_key = |k: &RootKey| k.ct_eq(&key);
        for (t, n) in [(1, 1), (2, 3), (3, 5)] {
            let shares = split(&key, t, n).unwrap();
            assert!(source_key(&shares, is_key).is_some_and(|k| k.ct_eq(&key)));
            // Exactly the threshold.
            assert!(source_key(&shares[..usize::from(t)], is_key).is_some());
        }
        // One foreign shard among enough good ones.
        let mut shares = split(&key, 2, 3).unwrap();
        shares[1] = split(&other, 2, 3).unwrap().remove(1);
        assert!(source_key(&shares, is_key).is_some_and(|k| k.ct_eq(&key)));
        // Below the threshold, or another deployment's: nothing.
        let shares = split(&key, 3, 5).unwrap();
        assert!(source_key(&shares[..2], is_key).is_none());
        assert!(source_key(&split(&other, 2, 3).unwrap(), is_key).is_none());
    }
}
