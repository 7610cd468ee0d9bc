//! `spike backup create | verify | restore`: online backups of the store, in one logical
//! format for every backend ([`mod@file`]), so a backup restores into any backend.
//!
//! The commands run with a Nexus's settings (`SPIKE_NEXUS_BACKEND_STORE` and the chosen
//! backend's variables, [`Backend::from_source`]). A backup is the store's sealed bytes, never
//! opened, authenticated as a whole by a MAC under a key derived from the deployment's root key
//! ([`file::MAC_LABEL`]), so no one without the root key can make a file that `verify` or
//! `restore` accepts. The root key ([`KeySource`]) comes from the Keepers, asked with the Nexus
//! identity as a Nexus asks them and accepted only if it opens the verifier
//! ([`keepers::deployment_key`]), or from recovery shards (`--recover-dir`); it is held only
//! in this process, in locked memory, and dropped as soon as the MAC key and data keys are
//! derived.
//!
//! - **create** reads every record with [`Store::snapshot`] while Nexus serves: SQLite and
//!   PostgreSQL in one statement (the whole store as of one instant), S3 one object at a time
//!   (each record consistent, the whole not: the header says `"consistency":"record"`). The
//!   file is written 0600 under a temporary name and renamed into place, only once the key is
//!   in hand.
//! - **verify** reads the whole file and checks its structure; with the key it checks the MAC,
//!   that the key opens the verifier, that every secret record's MAC verifies and that the
//!   policy book opens. `--structure-only` skips the key and says that it proved nothing
//!   against tampering. It writes nothing.
//! - **restore** checks the whole file, MAC included, first, then writes into an empty store
//!   only: a marker ([`RESTORE_MARKER_KEY`]) first, then the verifier, then every record,
//!   create-if-absent, and removes the marker last. While the marker is there a Nexus reports
//!   `restore_incomplete` and neither creates nor loads a root key, so a store left half
//!   written by a failure is never served and never becomes a new deployment; running the same
//!   restore again resumes it (records already written with the same bytes are skipped).
//!   The verifier goes first so that a Nexus that raced the restore on the empty store and won
//!   is noticed before any record is written (the restore then stops and removes its marker).
//!
//! A file of the format before the MAC ([`file::UNAUTHENTICATED_VERSION`]) is refused unless
//! `--accept-unauthenticated` is given; then a warning is logged and the records are still
//! checked one by one under the key.

pub mod file;

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use crate::crypto::{RootKey, shamir};
use crate::nexus::secrets;
use crate::nexus::{NexusConfig, book, keepers};
use crate::platform::CommandError;
use crate::platform::env::ProcessEnv;
use crate::protocol::nexus::{now_nanos, rfc3339};
use crate::store::memory::MemoryStore;
use crate::store::{
    AnyStore, Backend, Expect, Namespace, RESTORE_MARKER_KEY, Store, VERIFIER_KEY, Written,
};
use file::{AuthError, Backup, FORMAT, Header, MAC_LABEL, Seal, VERSION};

/// A failure, with its exit status: 2 for bad input or configuration, 1 otherwise.
type Result<T> = std::result::Result<T, CommandError>;

fn usage(e: impl std::fmt::Display) -> CommandError {
    CommandError::usage(e)
}

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::failed(e)
}

/// The file names `create --dir` writes: `spike-backup-<UTC time to the millisecond>.jsonl`,
/// so names sort in time order.
const DIR_PREFIX: &str = "spike-backup-";
const DIR_SUFFIX: &str = ".jsonl";

/// Where the root key comes from.
pub enum KeySource {
    /// The deployment's Keepers (`SPIKE_NEXUS_KEEPER_PEERS`, `SPIKE_NEXUS_SHAMIR_THRESHOLD`),
    /// asked with this process's Nexus identity (the same settings as `spike nexus`).
    Keepers,
    /// A directory of recovery shard files (`--recover-dir`), at least the threshold.
    RecoverDir(PathBuf),
}

impl KeySource {
    fn describe(&self) -> String {
        match self {
            KeySource::Keepers => "the Keepers' shards".into(),
            KeySource::RecoverDir(dir) => format!("the recovery shards in {}", dir.display()),
        }
    }
}

/// Where `spike backup create` writes.
pub enum Destination {
    /// This file (`--out`); replaced only with `force`.
    File {
        /// The path.
        path: PathBuf,
        /// `--force`: replace an existing file.
        force: bool,
    },
    /// A new timestamped file in this directory (`--dir`), keeping the newest `keep`.
    Dir {
        /// The directory (created 0700 if missing).
        dir: PathBuf,
        /// `--keep`: backups kept in `dir`, this one included; older ones are removed.
        keep: Option<usize>,
    },
}

/// Opens the store the environment names. `existing`: a SQLite file must be there already
/// (a backup of a directory that holds none would create an empty store there).
async fn open_store(existing: bool) -> Result<AnyStore> {
    let backend = Backend::from_source(&ProcessEnv).map_err(usage)?;
    if let Backend::Sqlite { data_dir } = &backend
        && existing
        && !data_dir.join("spike.db").exists()
    {
        return Err(usage(format!(
            "there is no SQLite store in {} (SPIKE_NEXUS_DATA_DIR)",
            data_dir.display()
        )));
    }
    AnyStore::open(&backend)
        .await
        .map_err(|e| failed(format!("cannot open the store: {e}")))
}

/// The root key from the Keepers, found as a Nexus finds it ([`keepers::deployment_key`]):
/// a threshold of their shards that opens the verifier `store` holds. `what` names the command
/// in errors.
async fn key_from_keepers(store: &impl Store, what: &str) -> Result<RootKey> {
    // A settings problem (none given, or wrong) says both ways to get the key.
    let needs_key = |e: &dyn std::fmt::Display| {
        usage(format!(
            "{what} needs the root key: it asks the Keepers for it as a Nexus does, with a Nexus's settings (its SVID files or SPIFFE_ENDPOINT_SOCKET, SPIKE_NEXUS_KEEPER_PEERS, SPIKE_NEXUS_SHAMIR_THRESHOLD; /etc/spike/nexus.env), or rebuilds it from recovery shards with --recover-dir DIR{}: {e}",
            if what.ends_with("verify") {
                " (--structure-only checks the file without the key, which proves nothing against tampering)"
            } else {
                ""
            }
        ))
    };
    let config = NexusConfig::from_source(&ProcessEnv).map_err(|e| needs_key(&e))?;
    let (_own, tls) = crate::client::keeper::tls_as_nexus(
        &config.identity,
        &format!("{what} asks the Keepers for the root key as a Nexus"),
    )
    .await
    .map_err(|e| match e {
        CommandError::Usage(m) => needs_key(&m),
        other => other,
    })?;
    let client = keepers::keeper_client(&config, tls);
    keepers::deployment_key(&config, &client, store)
        .await
        .map_err(|e| {
            failed(format!(
                "{what}: cannot get the root key from the Keepers: {e}"
            ))
        })
}

/// The root key rebuilt from the recovery shards in `dir`, in this process.
fn key_from_shards(dir: &Path) -> Result<RootKey> {
    let shares = crate::client::recover::read_dir(dir)?;
    shamir::combine(&shares).map_err(|e| {
        usage(format!(
            "the recovery shards in {} do not combine: {e}",
            dir.display()
        ))
    })
}

/// Runs `spike backup create`: the MAC is made under the root key from `key`, which must open
/// the store's verifier.
pub async fn create(to: Destination, key: KeySource) -> Result<()> {
    // Refuse a bad destination before reading the whole store.
    let path = match &to {
        Destination::File { path, force } => {
            if !force && path.exists() {
                return Err(usage(format!(
                    "{} exists; refusing to overwrite it (--force replaces it)",
                    path.display()
                )));
            }
            path.clone()
        }
        Destination::Dir { dir, keep } => {
            if *keep == Some(0) {
                return Err(usage("--keep must be at least 1"));
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| usage(format!("cannot create {}: {e}", dir.display())))?;
            let t = time::OffsetDateTime::now_utc();
            let stamp = format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            );
            dir.join(format!("{DIR_PREFIX}{stamp}{DIR_SUFFIX}"))
        }
    };
    let store = open_store(true).await?;
    let consistency = store.consistency();
    let began = rfc3339(now_nanos());
    let snapshot = store
        .snapshot()
        .await
        .map_err(|e| failed(format!("cannot read the store: {e}")))?;
    let records = snapshot.records;
    if records
        .iter()
        .any(|(ns, k, _)| *ns == Namespace::System && k == RESTORE_MARKER_KEY)
    {
        return Err(failed(
            "the store holds an unfinished backup restore: finish it (spike backup restore) before taking a backup",
        ));
    }
    let Some((_, _, verifier)) = records
        .iter()
        .find(|(ns, k, _)| *ns == Namespace::System && k == VERIFIER_KEY)
    else {
        return Err(failed(
            "the store has no root-key verifier: no Nexus has created a key on it, so there is nothing to back up",
        ));
    };
    let verifier = crate::store::parse_verifier(verifier).map_err(failed)?;
    let root = match &key {
        KeySource::Keepers => key_from_keepers(&store, "spike backup create").await?,
        KeySource::RecoverDir(dir) => key_from_shards(dir)?,
    };
    let key_id = root.key_id();
    if key_id != verifier.key_id || !root.opens(&verifier) {
        return Err(failed(format!(
            "{} rebuild root key {key_id}, which does not open the store's verifier (root key {}): they are another deployment's, or fewer than its threshold; nothing written",
            key.describe(),
            verifier.key_id
        )));
    }
    let mac = root.derive_mac(MAC_LABEL);
    drop(root);
    let per_ns = file::counts(&records);
    let count = |ns| per_ns.get(&ns).copied().unwrap_or(0);
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        created: began,
        backend: store.backend().into(),
        consistency: consistency.as_str().into(),
        key_id: verifier.key_id,
        records: records.len() as u64,
        secrets: count(Namespace::Secrets),
        policies: count(Namespace::Policies),
        system: count(Namespace::System),
    };
    let bytes = file::encode(&header, &records, &mac, &key_id);
    drop(mac);
    if matches!(to, Destination::Dir { .. }) && path.exists() {
        return Err(failed(format!(
            "{} exists already (two backups in one millisecond?)",
            path.display()
        )));
    }
    crate::platform::fs::replace(&path, &bytes, crate::platform::fs::PRIVATE)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    eprintln!(
        "backed up {} record(s) ({} secret(s)) of the {} store, authenticated under root key {}, consistent per {}, {} bytes",
        header.records,
        header.secrets,
        header.backend,
        header.key_id,
        header.consistency,
        bytes.len()
    );
    println!("{}", path.display());
    if let Destination::Dir {
        dir,
        keep: Some(keep),
    } = &to
    {
        prune(dir, *keep)?;
    }
    Ok(())
}

/// Removes the oldest `spike-backup-*.jsonl` files of `dir` beyond the newest `keep`.
fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| failed(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(DIR_PREFIX) && n.ends_with(DIR_SUFFIX))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for name in &names[..excess] {
        let old = dir.join(name);
        std::fs::remove_file(&old)
            .map_err(|e| failed(format!("cannot remove {}: {e}", old.display())))?;
        eprintln!("removed the old backup {}", old.display());
    }
    Ok(())
}

/// Reads a whole backup file and checks its structure. A file without a MAC is refused here,
/// before any key is asked for, unless `accept_unauthenticated`.
fn read(path: &Path, accept_unauthenticated: bool) -> Result<Backup> {
    let bytes =
        std::fs::read(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
    let backup = file::decode(&bytes).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    if backup.seal == Seal::Unauthenticated && !accept_unauthenticated {
        return Err(failed(format!(
            "{}: format version {}, written before backups carried a MAC: it is unauthenticated (anyone who could edit the file could have dropped or changed records unnoticed); refused, nothing written. --accept-unauthenticated accepts it anyway (its records are still checked one by one under the root key)",
            path.display(),
            file::UNAUTHENTICATED_VERSION
        )));
    }
    Ok(backup)
}

/// The root key `backup` was made under, from `key`: the Keepers are asked to open the
/// backup's own verifier (the deployment's store may be gone, empty or another's).
async fn backup_key(backup: &Backup, path: &Path, key: &KeySource, what: &str) -> Result<RootKey> {
    match key {
        KeySource::RecoverDir(dir) => key_from_shards(dir),
        KeySource::Keepers => {
            let verifier = backup
                .value(Namespace::System, VERIFIER_KEY)
                .ok_or_else(|| failed("the backup holds no verifier"))?;
            let own = MemoryStore::default();
            own.put(
                Namespace::System,
                VERIFIER_KEY,
                verifier.to_vec(),
                Expect::Absent,
            )
            .await
            .map_err(failed)?;
            // Since a rekey, the backup's root-key record says which Keepers hold its key.
            if let Some(record) =
                backup.value(Namespace::System, crate::nexus::rekey::ROOT_KEY_RECORD)
            {
                own.put(
                    Namespace::System,
                    crate::nexus::rekey::ROOT_KEY_RECORD,
                    record.to_vec(),
                    Expect::Absent,
                )
                .await
                .map_err(failed)?;
            }
            key_from_keepers(&own, what).await.map_err(|e| match e {
                CommandError::Failed(why) => failed(format!(
                    "{}: this backup was made under root key {}; {why} (after a rekey, or for another deployment's backup, give that key's recovery shards with --recover-dir)",
                    path.display(),
                    backup.key_id()
                )),
                other => other,
            })
        }
    }
}

/// Checks everything in `backup` with `root`, the key from `source`: the MAC (unless the file
/// has none and that was accepted), then that the key opens the verifier, every secret record
/// and the policy book. Writes nothing.
fn check_with_key(backup: &Backup, path: &Path, root: RootKey, source: &KeySource) -> Result<()> {
    let rebuilt = root.key_id();
    if rebuilt != backup.key_id() {
        return Err(failed(format!(
            "{}: this backup was made under root key {}; {} rebuild {}: they are another deployment's (or of another era of its root key, or fewer than its threshold)",
            path.display(),
            backup.key_id(),
            source.describe(),
            rebuilt
        )));
    }
    match backup.authenticate(&root.derive_mac(MAC_LABEL), &rebuilt) {
        Ok(()) => {}
        Err(AuthError::Unauthenticated) => tracing::warn!(
            file = %path.display(),
            "accepting a backup without a MAC (format version {}) as told by --accept-unauthenticated: nothing proves it was not edited; its records are checked one by one",
            file::UNAUTHENTICATED_VERSION
        ),
        Err(AuthError::OtherKey { made_under }) => {
            return Err(failed(format!(
                "{}: this backup was made under root key {made_under}; {} rebuild {rebuilt}",
                path.display(),
                source.describe()
            )));
        }
        Err(AuthError::Forged) => {
            return Err(failed(format!(
                "{}: the backup's MAC does not verify under root key {rebuilt}: the file was changed by someone without the root key (records dropped, added, changed or reordered, the header edited, parts of backups spliced or a trailer replayed); refused, nothing written",
                path.display()
            )));
        }
    }
    let verifier = backup.verifier().map_err(failed)?;
    if !root.opens(&verifier) {
        return Err(failed(format!(
            "{}: the root-key verifier does not open under the key {} rebuild (its id matches): the verifier was altered",
            path.display(),
            source.describe()
        )));
    }
    // The data keys: the backup's keyring (refused like any record that does not open), or
    // the legacy key alone for a backup of a store from before the keyring.
    let mut problems = Vec::new();
    let ring = match backup
        .records
        .iter()
        .find(|(ns, k, _)| *ns == Namespace::System && k == crate::nexus::keyring::KEYRING_KEY)
    {
        Some((_, _, value)) => crate::nexus::keyring::open_stored(&root, value, false)
            .inspect_err(|e| problems.push(e.to_string()))
            .ok(),
        None => None,
    };
    let ring = ring.unwrap_or_else(|| crate::nexus::keyring::Keyring::legacy(&root, false));
    let secret_keys = std::sync::Arc::clone(ring.secrets());
    let policy_key: &dyn book::BookKey = &ring;
    drop(root);
    for (ns, key, value) in &backup.records {
        let problem = match ns {
            Namespace::Secrets => secrets::check_stored(&secret_keys, key, value)
                .err()
                .map(|e| e.to_string()),
            Namespace::Policies => book::check_row(policy_key, key, value)
                .err()
                .map(|e| format!("policy row {key:?}: {e}")),
            Namespace::System if key == book::BOOK_KEY => {
                book::open(policy_key, value).err().map(|e| e.to_string())
            }
            Namespace::System => None,
        };
        problems.extend(problem);
    }
    if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
        return Err(failed(format!(
            "{}: {} record(s) do not open under root key {}: {}{}",
            path.display(),
            problems.len(),
            backup.key_id(),
            shown.join("; "),
            if problems.len() > shown.len() {
                "; …"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

fn describe(backup: &Backup) -> String {
    let h = &backup.header;
    format!(
        "{} record(s): {} secret(s), {} policy row(s), {} system record(s); root key {}; taken {} from {} (consistent per {})",
        h.records, h.secrets, h.policies, h.system, h.key_id, h.created, h.backend, h.consistency
    )
}

/// What `spike backup verify` checks.
pub enum Check {
    /// The structure alone (`--structure-only`): no key, so nothing against tampering.
    StructureOnly,
    /// Everything, with the root key from here.
    Full(KeySource),
}

/// Runs `spike backup verify`.
pub async fn verify(path: &Path, check: Check, accept_unauthenticated: bool) -> Result<()> {
    match check {
        Check::StructureOnly => {
            // The structure of an old file is checked too: nothing is accepted here.
            let backup = read(path, true)?;
            let seal = match &backup.seal {
                Seal::Mac { key_id, .. } => {
                    format!("it carries a MAC under root key {key_id}, NOT checked")
                }
                Seal::Unauthenticated => format!(
                    "format version {}: it carries no MAC at all",
                    file::UNAUTHENTICATED_VERSION
                ),
            };
            println!(
                "{}: structure only: complete, well-formed, undamaged; {}; {seal}. Authenticity was NOT checked: this proves nothing against tampering (anyone can write a file that passes); verify with the Keepers or --recover-dir to check its MAC",
                path.display(),
                describe(&backup)
            );
        }
        Check::Full(key) => {
            let backup = read(path, accept_unauthenticated)?;
            let root = backup_key(&backup, path, &key, "spike backup verify").await?;
            check_with_key(&backup, path, root, &key)?;
            let mac = match backup.seal {
                Seal::Mac { .. } => "its MAC verifies under the root key",
                Seal::Unauthenticated => "it has NO MAC (accepted by --accept-unauthenticated)",
            };
            println!(
                "{}: complete, {mac}, and the root key from {} opens its verifier, every secret record and the policy book; {}",
                path.display(),
                key.describe(),
                describe(&backup)
            );
        }
    }
    Ok(())
}

/// The value of the restore marker: which backup is being restored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    backup_sha256: String,
    key_id: String,
    started: String,
}

/// Runs `spike backup restore`: the whole backup, MAC included, is checked with the root key
/// from `key` before anything is written.
pub async fn restore(path: &Path, key: KeySource, accept_unauthenticated: bool) -> Result<()> {
    let backup = read(path, accept_unauthenticated)?;
    let root = backup_key(&backup, path, &key, "spike backup restore").await?;
    check_with_key(&backup, path, root, &key)?;
    let store = open_store(false).await?;
    let target = store
        .snapshot()
        .await
        .map_err(|e| failed(format!("cannot read the target store: {e}")))?;
    let marker = target
        .records
        .iter()
        .find(|(ns, k, _)| *ns == Namespace::System && k == RESTORE_MARKER_KEY);
    let resuming = match marker {
        None if target.records.is_empty() => false,
        None => return Err(not_empty(store.backend(), &target.records)),
        Some((_, _, value)) => {
            let theirs: Option<Marker> = serde_json::from_slice(value).ok();
            match theirs {
                Some(m) if m.backup_sha256 == backup.sha256 => true,
                Some(m) => {
                    return Err(failed(format!(
                        "the target {} store holds an unfinished restore of another backup (sha256 {}, root key {}): finish that one, or empty the store",
                        store.backend(),
                        m.backup_sha256,
                        m.key_id
                    )));
                }
                None => return Err(failed("the target store's restore marker is malformed")),
            }
        }
    };
    if resuming {
        // Everything already there must be this backup's.
        let foreign: Vec<(Namespace, String, Vec<u8>)> = target
            .records
            .iter()
            .filter(|(ns, k, v)| {
                !(*ns == Namespace::System && k == RESTORE_MARKER_KEY)
                    && backup.value(*ns, k) != Some(v.as_slice())
            })
            .cloned()
            .collect();
        if !foreign.is_empty() {
            return Err(not_empty(store.backend(), &foreign));
        }
        eprintln!("resuming the unfinished restore of this backup");
    } else {
        let marker = Marker {
            backup_sha256: backup.sha256.clone(),
            key_id: backup.header.key_id.clone(),
            started: rfc3339(now_nanos()),
        };
        let value = serde_json::to_vec(&marker).map_err(failed)?;
        match store
            .put(Namespace::System, RESTORE_MARKER_KEY, value, Expect::Absent)
            .await
            .map_err(|e| failed(format!("cannot write the restore marker: {e}")))?
        {
            Written::Done(_) => {}
            Written::Conflict => {
                return Err(failed(
                    "another restore began on the target store at the same time; nothing written",
                ));
            }
        }
    }
    // The verifier first: a Nexus that created a key on the empty store meanwhile shows here.
    let verifier = backup
        .value(Namespace::System, VERIFIER_KEY)
        .ok_or_else(|| failed("the backup holds no verifier"))?;
    let mut order: Vec<&(Namespace, String, Vec<u8>)> = Vec::with_capacity(backup.records.len());
    order.extend(
        backup
            .records
            .iter()
            .filter(|(ns, k, _)| *ns == Namespace::System && k == VERIFIER_KEY),
    );
    order.extend(
        backup
            .records
            .iter()
            .filter(|(ns, k, _)| !(*ns == Namespace::System && k == VERIFIER_KEY)),
    );
    let mut written = 0u64;
    for (ns, key, value) in order {
        let put = store
            .put(*ns, key, value.clone(), Expect::Absent)
            .await
            .map_err(|e| interrupted(e, written))?;
        match put {
            Written::Done(_) => written += 1,
            Written::Conflict => {
                let now = store
                    .get(*ns, key)
                    .await
                    .map_err(|e| interrupted(e, written))?;
                if now.as_ref().map(|e| e.value.as_slice()) == Some(value.as_slice()) {
                    continue;
                }
                if written == 0 && !resuming && value.as_slice() == verifier {
                    // A Nexus won the race on the empty store: it owns it now.
                    let _ = remove_marker(&store).await;
                    return Err(failed(
                        "a Nexus created a new root key on the target store while the restore began; the store is not empty any more: nothing restored (stop every Nexus on the target, empty it and run the restore again)",
                    ));
                }
                return Err(failed(format!(
                    "{}/{key:?} was written by someone else during the restore; the restore marker stays, so no Nexus serves this store: stop every writer and empty the store",
                    ns.as_str()
                )));
            }
        }
    }
    remove_marker(&store)
        .await
        .map_err(|e| interrupted(e, written))?;
    eprintln!(
        "restored {} ({} record(s) written now) into the {} store. Start Nexus on it; if the Keepers are new (empty), it reports awaiting_restore: bring the root key back with spike recover restore and a threshold of recovery shards",
        describe(&backup),
        written,
        store.backend()
    );
    Ok(())
}

async fn remove_marker(store: &AnyStore) -> crate::store::Result<()> {
    if let Some(entry) = store.get(Namespace::System, RESTORE_MARKER_KEY).await? {
        store
            .delete(Namespace::System, RESTORE_MARKER_KEY, &entry.revision)
            .await?;
    }
    Ok(())
}

fn interrupted(e: crate::store::Error, written: u64) -> CommandError {
    failed(format!(
        "the restore stopped after writing {written} record(s): {e}. The store keeps the restore marker, so no Nexus will serve it or create a key on it; run the same restore again to finish it"
    ))
}

fn not_empty(backend: &str, records: &[(Namespace, String, Vec<u8>)]) -> CommandError {
    let per_ns = file::counts(records);
    let counts: Vec<String> = per_ns
        .iter()
        .map(|(ns, n)| format!("{n} in {}", ns.as_str()))
        .collect();
    let examples: Vec<String> = records
        .iter()
        .take(5)
        .map(|(ns, k, _)| format!("{}/{k:?}", ns.as_str()))
        .collect();
    failed(format!(
        "the target {backend} store is not empty ({}: {}{}); a backup restores only into an empty store; nothing written",
        counts.join(", "),
        examples.join(", "),
        if records.len() > examples.len() {
            ", …"
        } else {
            ""
        }
    ))
}
