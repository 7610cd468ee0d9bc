//! The keyring: the data keys that seal what Nexus stores, kept in the store and sealed under
//! a key derived from the root key (decision 33 in `docs/decisions.md`).
//!
//! # Two levels
//! The root key — the one the Keepers and the recovery shards hold — seals only the keyring.
//! The keyring lists data keys by a small numeric id; the purpose keys that seal secrets,
//! policies and cipher output are derived from a data key with the same HKDF labels that derive
//! them from the root key, so each sealed value names the data key it needs by id.
//!
//! Id `0` is the **legacy** data key: its purpose keys are derived from the root key directly,
//! exactly as every release before the keyring did. Everything written before the keyring
//! existed is therefore sealed under data key 0 without saying so, and stays readable with no
//! rewrite. Ids from 1 are real data keys: 32 random bytes each.
//!
//! # The record
//! [`Namespace::System`] key [`KEYRING_KEY`]: the 8-byte magic `spkring1`, the generation
//! (8 bytes, big endian), then nonce ‖ AES-256-GCM under `root.derive("spike/keyring/v1")` of
//! the entries, with associated data `spike/keyring/v1\0keyring\0<generation>`. Each entry is
//! its id (4 bytes), creation time (Unix seconds, 8 bytes), state (1 byte: active, retired),
//! and for ids other than 0 the key's 32 bytes — for id 0 too after a rekey ([`rewrap`]): the
//! bytes of the root key that derived it; the plaintext lives only in zeroized buffers.
//! A record that does not open — edited, truncated, swapped generation, another root key's —
//! is refused (the instance logs it and does not load the key, or answers 500), never replaced.
//!
//! # Upgrade in place
//! When the root key is loaded, [`ensure`] reads the keyring; when there is none (a new
//! deployment, or a store written before the keyring) it writes one with create-if-absent
//! holding the legacy entry 0 and a first data key 1. Several instances starting at once each
//! try; exactly one write succeeds and every instance then reads and uses that one record.

use std::collections::BTreeMap;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::secrets::{KeySet, SecretKeys};
use crate::crypto::{AeadKey, DataKey, KEY_LEN, RootKey};
use crate::store::{Expect, Namespace, Revision, Store, Written};

/// The keyring's key in [`Namespace::System`].
pub const KEYRING_KEY: &str = "keyring";
/// HKDF label (from the root key) of the key that seals the keyring.
pub const KEYRING_LABEL: &str = "spike/keyring/v1";
/// The first bytes of a stored keyring.
const MAGIC: &[u8; 8] = b"spkring1";
const HEADER_LEN: usize = MAGIC.len() + 8;
/// The id of the legacy data key: purpose keys derived from the root key directly.
pub const LEGACY: u32 = 0;
/// Bytes of an entry before its key: id, created, state, has-key flag.
const ENTRY_HEAD: usize = 4 + 8 + 1 + 1;
/// Reads of the keyring after a lost create race before giving up.
const ENSURE_ATTEMPTS: usize = 5;
/// Compare-and-set attempts of one rotation before giving up.
const ROTATE_ATTEMPTS: usize = 50;

/// Whether a data key seals new values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Opens what it sealed; the newest active key seals every new value.
    Active,
    /// No value in the store is sealed under it any more; it is kept as a record only.
    Retired,
}

impl State {
    fn byte(self) -> u8 {
        match self {
            State::Active => 0,
            State::Retired => 1,
        }
    }

    fn from_byte(b: u8) -> Option<State> {
        match b {
            0 => Some(State::Active),
            1 => Some(State::Retired),
            _ => None,
        }
    }

    /// The state's name in logs and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Retired => "retired",
        }
    }
}

/// One data key's public description (nothing secret: `Debug` is fine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The id sealed values carry; [`LEGACY`] for the root-derived keys.
    pub id: u32,
    /// When it was added (Unix seconds; 0 for the legacy entry of an upgraded store).
    pub created: u64,
    /// Whether it is in use.
    pub state: State,
}

/// The purpose keys derived from one data key.
pub struct PurposeKeys {
    /// Seals secret versions and authenticates secret records.
    pub secrets: Arc<KeySet>,
    /// Seals the policy book.
    pub policies: AeadKey,
    /// The cipher API's key.
    pub cipher: AeadKey,
}

/// HKDF label of the cipher key (unchanged since the first release).
pub const CIPHER_LABEL: &str = "spike/cipher/v1";

impl PurposeKeys {
    /// The legacy purpose keys: derived from `root` directly.
    pub fn legacy(root: &RootKey) -> PurposeKeys {
        PurposeKeys {
            secrets: Arc::new(KeySet::legacy(root)),
            policies: root.derive(super::POLICIES_LABEL),
            cipher: root.derive(CIPHER_LABEL),
        }
    }

    /// The purpose keys of a real data key: same labels, derived from `key`.
    fn of(key: &DataKey) -> PurposeKeys {
        PurposeKeys {
            secrets: Arc::new(KeySet::of(key)),
            policies: key.derive(super::POLICIES_LABEL),
            cipher: key.derive(CIPHER_LABEL),
        }
    }
}

/// A decoded keyring: its entries and the purpose keys of each, in locked pages.
pub struct Keyring {
    /// The record's generation (0 for a keyring that is not in the store).
    pub generation: u64,
    /// The store revision it was read at, `None` for one that is not in the store.
    pub revision: Option<Revision>,
    entries: Vec<Entry>,
    keys: BTreeMap<u32, Arc<PurposeKeys>>,
    secrets: Arc<SecretKeys>,
    /// A rekey made this keyring's root key: data key 0 carries the bytes of an earlier one.
    rekeyed: bool,
}

impl Keyring {
    /// A keyring of the legacy entry only, not stored: what tools that open a store with the
    /// root key alone (migrate, backup verify) use, and what every value written before the
    /// keyring needs.
    pub fn legacy(root: &RootKey, upgrade_secret_records: bool) -> Keyring {
        Keyring::of(
            0,
            None,
            vec![Entry {
                id: LEGACY,
                created: 0,
                state: State::Active,
            }],
            BTreeMap::from([(LEGACY, Arc::new(PurposeKeys::legacy(root)))]),
            upgrade_secret_records,
        )
    }

    fn of(
        generation: u64,
        revision: Option<Revision>,
        entries: Vec<Entry>,
        keys: BTreeMap<u32, Arc<PurposeKeys>>,
        upgrade_secret_records: bool,
    ) -> Keyring {
        let current = entries
            .iter()
            .filter(|e| e.state == State::Active)
            .map(|e| e.id)
            .max()
            .unwrap_or(LEGACY);
        let sets = keys
            .iter()
            .map(|(id, k)| (*id, Arc::clone(&k.secrets)))
            .collect();
        Keyring {
            generation,
            revision,
            entries,
            keys,
            secrets: Arc::new(SecretKeys::new(sets, current, upgrade_secret_records)),
            rekeyed: false,
        }
    }

    /// The secret-record keys of every data key, sealing under the current one.
    pub fn secrets(&self) -> &Arc<SecretKeys> {
        &self.secrets
    }

    /// Every entry, by id.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The id new values are sealed under: the newest active data key.
    pub fn current(&self) -> u32 {
        self.entries
            .iter()
            .filter(|e| e.state == State::Active)
            .map(|e| e.id)
            .max()
            .unwrap_or(LEGACY)
    }

    /// Whether a rekey made the root key this keyring is sealed under (data key 0 carries the
    /// bytes of an earlier root key).
    pub fn rekeyed(&self) -> bool {
        self.rekeyed
    }

    /// The purpose keys of the data key `id`, if the keyring has it.
    pub fn get(&self, id: u32) -> Option<&Arc<PurposeKeys>> {
        self.keys.get(&id)
    }
}

/// Why the keyring could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed.
    #[error("{0}")]
    Store(#[from] crate::store::Error),
    /// The record does not open under this root key, or its content is malformed: it was
    /// edited, or belongs to another key. It is never replaced.
    #[error("the keyring record in the store is refused: {0}")]
    Refused(String),
    /// Sealing or key generation failed.
    #[error("crypto: {0}")]
    Crypto(#[from] crate::crypto::Error),
    /// Lost the create race and then found no keyring, repeatedly.
    #[error("the keyring was created by another instance but cannot be read back")]
    Vanished,
    /// Too many concurrent changes of the keyring.
    #[error("gave up after too many concurrent keyring changes")]
    Contended,
}

fn aad(generation: u64) -> Vec<u8> {
    format!("{KEYRING_LABEL}\0{KEYRING_KEY}\0{generation}").into_bytes()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seals `entries` (with the key bytes of every id but [`LEGACY`]) at `generation`.
fn seal(
    wrap: &AeadKey,
    generation: u64,
    entries: &[(Entry, Option<&DataKey>)],
) -> Result<Vec<u8>, Error> {
    let mut plain = Zeroizing::new(Vec::with_capacity(
        4 + entries.len() * (ENTRY_HEAD + KEY_LEN),
    ));
    let count =
        u32::try_from(entries.len()).map_err(|_| Error::Refused("too many data keys".into()))?;
    plain.extend_from_slice(&count.to_be_bytes());
    for (entry, key) in entries {
        plain.extend_from_slice(&entry.id.to_be_bytes());
        plain.extend_from_slice(&entry.created.to_be_bytes());
        plain.push(entry.state.byte());
        match key {
            Some(key) => {
                plain.push(1);
                plain.extend_from_slice(key.as_bytes());
            }
            None => plain.push(0),
        }
    }
    let sealed = wrap.seal(&aad(generation), &plain)?;
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a stored keyring: its generation and entries with their keys.
#[allow(clippy::type_complexity)]
fn open(wrap: &AeadKey, stored: &[u8]) -> Result<(u64, Vec<(Entry, Option<DataKey>)>), Error> {
    let refused = |why: &str| Error::Refused(why.to_string());
    if stored.len() < HEADER_LEN || &stored[..MAGIC.len()] != MAGIC {
        return Err(refused("not a keyring record"));
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&stored[MAGIC.len()..HEADER_LEN]);
    let generation = u64::from_be_bytes(generation);
    let plain = wrap
        .open(&aad(generation), &stored[HEADER_LEN..])
        .map_err(|_| refused("it does not open under this root key (edited, or another key's)"))?;
    let mut rest: &[u8] = &plain;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        if rest.len() < n {
            return Err(refused("truncated entry list"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let count = be32(take(4)?);
    let mut entries = Vec::new();
    for _ in 0..count {
        let id = be32(take(4)?);
        let mut created = [0u8; 8];
        created.copy_from_slice(take(8)?);
        let state = State::from_byte(take(1)?[0]).ok_or_else(|| refused("unknown key state"))?;
        // The legacy entry has no bytes until a rekey gives it the old root key's.
        let key = match take(1)?[0] {
            0 if id == LEGACY => None,
            1 => {
                Some(DataKey::from_slice(take(KEY_LEN)?).ok_or_else(|| refused("short data key"))?)
            }
            _ => return Err(refused("key bytes do not match the entry's id")),
        };
        if entries.iter().any(|(e, _): &(Entry, _)| e.id == id) {
            return Err(refused("an id appears twice"));
        }
        let created = u64::from_be_bytes(created);
        entries.push((Entry { id, created, state }, key));
    }
    if !rest.is_empty() {
        return Err(refused("trailing bytes after the entries"));
    }
    if !entries.iter().any(|(e, _)| e.id == LEGACY) {
        return Err(refused("no legacy entry"));
    }
    Ok((generation, entries))
}

/// Decodes `stored` into a usable keyring.
fn decode(
    root: &RootKey,
    stored: &[u8],
    revision: Revision,
    upgrade_secret_records: bool,
) -> Result<Keyring, Error> {
    let (generation, opened) = open(&root.derive(KEYRING_LABEL), stored)?;
    let rekeyed = opened.iter().any(|(e, k)| e.id == LEGACY && k.is_some());
    let mut entries = Vec::with_capacity(opened.len());
    let mut keys = BTreeMap::new();
    for (entry, key) in opened {
        let purpose = match key {
            None => PurposeKeys::legacy(root),
            Some(key) => PurposeKeys::of(&key),
        };
        keys.insert(entry.id, Arc::new(purpose));
        entries.push(entry);
    }
    entries.sort_by_key(|e| e.id);
    let mut ring = Keyring::of(
        generation,
        Some(revision),
        entries,
        keys,
        upgrade_secret_records,
    );
    ring.rekeyed = rekeyed;
    Ok(ring)
}

/// Opens a keyring record read from a store or a backup (`spike backup verify`), without
/// checking it against anything else.
pub fn open_stored(
    root: &RootKey,
    stored: &[u8],
    upgrade_secret_records: bool,
) -> Result<Keyring, Error> {
    decode(
        root,
        stored,
        Revision(String::new()),
        upgrade_secret_records,
    )
}

/// Reads the store's keyring, creating it first when the store has none (a new deployment,
/// or one that predates the keyring): the legacy entry and a first data key, written with
/// create-if-absent, so that of instances starting together exactly one creates it and all
/// use it. A keyring that does not open under `root` is refused, never replaced.
pub async fn ensure(
    store: &impl Store,
    root: &RootKey,
    upgrade_secret_records: bool,
) -> Result<Keyring, Error> {
    for _ in 0..ENSURE_ATTEMPTS {
        if let Some(entry) = store.get(Namespace::System, KEYRING_KEY).await? {
            return decode(root, &entry.value, entry.revision, upgrade_secret_records);
        }
        let first = DataKey::generate()?;
        let created = now();
        let entries = [
            (
                Entry {
                    id: LEGACY,
                    created: 0,
                    state: State::Active,
                },
                None,
            ),
            (
                Entry {
                    id: 1,
                    created,
                    state: State::Active,
                },
                Some(&first),
            ),
        ];
        let value = seal(&root.derive(KEYRING_LABEL), 1, &entries)?;
        match store
            .put(
                Namespace::System,
                KEYRING_KEY,
                value.clone(),
                Expect::Absent,
            )
            .await?
        {
            Written::Done(revision) => {
                tracing::info!(
                    data_key = 1,
                    "created the keyring: data key 1 is added beside the legacy key 0 (values \
                     written before it stay readable under key 0)"
                );
                return decode(root, &value, revision, upgrade_secret_records);
            }
            Written::Conflict => {
                tracing::info!("another Nexus instance created the keyring first; reading it");
            }
        }
    }
    Err(Error::Vanished)
}

/// Whether an edit of the keyring's entries changed them.
enum Edit {
    /// Seal and write them at the next generation.
    Changed,
    /// Nothing to write: the keyring is returned as it is.
    Unchanged,
}

/// Reads the store's keyring, opens it under `from`, lets `edit` change its entries, seals
/// them under `to` at the next generation and writes them with compare-and-set; a lost race
/// starts again from a fresh read (so two changes at once both land). Returns the keyring as
/// written, decoded under `to`.
async fn change<E: From<Error>>(
    store: &impl Store,
    from: &RootKey,
    to: &RootKey,
    upgrade_secret_records: bool,
    mut edit: impl FnMut(&mut Vec<(Entry, Option<DataKey>)>) -> Result<Edit, E>,
) -> Result<Keyring, E> {
    let wrap = from.derive(KEYRING_LABEL);
    for _ in 0..ROTATE_ATTEMPTS {
        let Some(stored) = store
            .get(Namespace::System, KEYRING_KEY)
            .await
            .map_err(Error::from)?
        else {
            return Err(Error::Refused(
                "the store has no keyring any more (it was removed)".into(),
            )
            .into());
        };
        let (generation, mut opened) = open(&wrap, &stored.value)?;
        if let Edit::Unchanged = edit(&mut opened)? {
            return Ok(decode(
                from,
                &stored.value,
                stored.revision,
                upgrade_secret_records,
            )?);
        }
        let next = generation
            .checked_add(1)
            .ok_or_else(|| Error::Refused("generation at its limit".into()))?;
        let entries: Vec<(Entry, Option<&DataKey>)> =
            opened.iter().map(|(e, k)| (*e, k.as_ref())).collect();
        let value = seal(&to.derive(KEYRING_LABEL), next, &entries)?;
        match store
            .put(
                Namespace::System,
                KEYRING_KEY,
                value.clone(),
                Expect::Revision(stored.revision),
            )
            .await
            .map_err(Error::from)?
        {
            Written::Done(revision) => {
                return Ok(decode(to, &value, revision, upgrade_secret_records)?);
            }
            Written::Conflict => continue,
        }
    }
    Err(Error::Contended.into())
}

/// Adds a data key to the store's keyring, at the next generation, with compare-and-set (a
/// lost race is retried from a fresh read, so two rotations at once add two keys). Returns the
/// keyring as written: its newest key is the current one.
pub async fn rotate(
    store: &impl Store,
    root: &RootKey,
    upgrade_secret_records: bool,
) -> Result<Keyring, Error> {
    let ring = change(store, root, root, upgrade_secret_records, |entries| {
        let id = entries
            .iter()
            .map(|(e, _)| e.id)
            .max()
            .unwrap_or(LEGACY)
            .checked_add(1)
            .ok_or_else(|| Error::Refused("no data key id left".into()))?;
        let added = Entry {
            id,
            created: now(),
            state: State::Active,
        };
        entries.push((added, Some(DataKey::generate()?)));
        Ok::<_, Error>(Edit::Changed)
    })
    .await?;
    let id = ring.current();
    tracing::info!(
        data_key = id,
        generation = ring.generation,
        "added data key {id} to the keyring: new values are sealed under it"
    );
    Ok(ring)
}

/// Re-wraps the store's keyring from root key `from` to `to` (a rekey), at the next
/// generation, with compare-and-set. The legacy entry 0, whose purpose keys `from` derived,
/// takes `from`'s bytes as its key, so what `from` sealed before the keyring stays readable
/// under `to`. A keyring already under `to` is returned as it is (the step is idempotent).
pub async fn rewrap(
    store: &impl Store,
    from: &RootKey,
    to: &RootKey,
    upgrade_secret_records: bool,
) -> Result<Keyring, Error> {
    if let Some(stored) = store.get(Namespace::System, KEYRING_KEY).await?
        && open(&to.derive(KEYRING_LABEL), &stored.value).is_ok()
    {
        return decode(to, &stored.value, stored.revision, upgrade_secret_records);
    }
    let ring = change(store, from, to, upgrade_secret_records, |entries| {
        for (entry, key) in entries.iter_mut() {
            if entry.id == LEGACY && key.is_none() {
                *key = DataKey::from_slice(from.as_bytes());
            }
        }
        Ok::<_, Error>(Edit::Changed)
    })
    .await;
    match ring {
        Ok(ring) => {
            tracing::info!(
                generation = ring.generation,
                "re-wrapped the keyring under the new root key"
            );
            Ok(ring)
        }
        // Re-wrapped by another instance between the check and the write.
        Err(Error::Refused(_)) => {
            let stored = store
                .get(Namespace::System, KEYRING_KEY)
                .await?
                .ok_or_else(|| Error::Refused("the keyring was removed".into()))?;
            decode(to, &stored.value, stored.revision, upgrade_secret_records)
        }
        Err(e) => Err(e),
    }
}

/// Marks data key `id` retired, with compare-and-set (the caller has checked that no record
/// names it). The current key, the legacy key of a keyring without another, or an id the
/// keyring has not, is refused; retiring a retired key changes nothing.
pub async fn retire(
    store: &impl Store,
    root: &RootKey,
    id: u32,
    upgrade_secret_records: bool,
) -> Result<Keyring, RetireError> {
    let ring = change(store, root, root, upgrade_secret_records, |entries| {
        let current = entries
            .iter()
            .filter(|(e, _)| e.state == State::Active)
            .map(|(e, _)| e.id)
            .max();
        let Some((entry, _)) = entries.iter_mut().find(|(e, _)| e.id == id) else {
            return Err(RetireError::Unknown(id));
        };
        if Some(id) == current {
            return Err(RetireError::Current(id));
        }
        if entry.state == State::Retired {
            return Ok(Edit::Unchanged);
        }
        entry.state = State::Retired;
        Ok(Edit::Changed)
    })
    .await?;
    tracing::info!(
        data_key = id,
        generation = ring.generation,
        "retired data key {id}: no record in the store names it"
    );
    Ok(ring)
}

/// Why a data key was not retired.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetireError {
    /// The keyring could not be read or written.
    #[error("{0}")]
    Keyring(#[from] Error),
    /// No such data key.
    #[error("the keyring has no data key {0}")]
    Unknown(u32),
    /// It seals new values: rotate first.
    #[error("data key {0} is the current one: rotate first")]
    Current(u32),
    /// Records still name it.
    #[error("{count} record(s) still name data key {id}: run a re-encryption pass first")]
    InUse {
        /// The key.
        id: u32,
        /// How many records name it.
        count: usize,
    },
}

/// This instance's copy of the keyring, checked against the store before each use the way
/// the policy book is ([`super::book`]): one revision read; when it differs, the record is read,
/// opened and swapped in, so a key added through any instance seals the next value written
/// through every instance.
pub struct Current {
    ring: std::sync::RwLock<Arc<Keyring>>,
}

impl Current {
    /// Starts from `ring`.
    pub fn new(ring: Keyring) -> Current {
        Current {
            ring: std::sync::RwLock::new(Arc::new(ring)),
        }
    }

    /// The copy in hand, unchecked.
    pub fn loaded(&self) -> Arc<Keyring> {
        Arc::clone(&self.ring.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The store's keyring now. A record that does not open, that went missing, or whose
    /// generation is below the one in hand (put back from before a rotation) is refused.
    pub async fn validated(
        &self,
        store: &impl Store,
        root: &RootKey,
    ) -> Result<Arc<Keyring>, Error> {
        let loaded = self.loaded();
        let upgrade_secret_records = loaded.secrets().upgrading();
        let Some(_) = loaded.revision else {
            // A keyring that is not in the store (tools, tests): nothing to check against.
            return Ok(loaded);
        };
        let revision = store.revision(Namespace::System, KEYRING_KEY).await?;
        if revision.is_some() && revision == loaded.revision {
            return Ok(loaded);
        }
        let Some(stored) = store.get(Namespace::System, KEYRING_KEY).await? else {
            return Err(Error::Refused("the keyring record was removed".into()));
        };
        let ring = decode(root, &stored.value, stored.revision, upgrade_secret_records)?;
        if ring.generation < loaded.generation {
            return Err(Error::Refused(format!(
                "generation {} is below {} seen before: an earlier keyring was put back",
                ring.generation, loaded.generation
            )));
        }
        let ring = Arc::new(ring);
        let mut slot = self.ring.write().unwrap_or_else(|e| e.into_inner());
        if slot.generation <= ring.generation {
            *slot = Arc::clone(&ring);
        }
        Ok(ring)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// [`ensure`] by three callers at once, as three instances starting together.
    async fn three_at_once(store: &impl Store, root: &RootKey) -> [Keyring; 3] {
        let (a, b, c) = tokio::join!(
            ensure(store, root, false),
            ensure(store, root, false),
            ensure(store, root, false)
        );
        [a.unwrap(), b.unwrap(), c.unwrap()]
    }

    #[tokio::test]
    async fn created_once_and_read_back_by_every_instance() {
        let store = MemoryStore::default();
        let root = RootKey::generate().unwrap();
        let [a, b, c] = three_at_once(&store, &root).await;
        assert_eq!(a.revision, b.revision);
        assert_eq!(b.revision, c.revision);
        assert_eq!(a.current(), 1);
        assert_eq!(
            a.entries().iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![0, 1]
        );
        // Every instance holds the same data key 1: what one seals the others open.
        let sealed = a.get(1).unwrap().cipher.seal(b"x", b"hello").unwrap();
        assert_eq!(
            &c.get(1).unwrap().cipher.open(b"x", &sealed).unwrap()[..],
            b"hello"
        );
        // Key 0 is the root-derived one of every earlier release.
        let legacy = root.derive(CIPHER_LABEL).seal(b"", b"old").unwrap();
        assert_eq!(
            &b.get(LEGACY).unwrap().cipher.open(b"", &legacy).unwrap()[..],
            b"old"
        );
        // Data key 1 is not the legacy key.
        assert!(a.get(LEGACY).unwrap().cipher.open(b"x", &sealed).is_err());
    }

    /// A store on which the first `readers` reads of the keyring each return only once all of
    /// them have read it: every caller sees no keyring, so they all try to create one.
    struct ReadTogether {
        inner: MemoryStore,
        readers: usize,
        first_reads: std::sync::atomic::AtomicUsize,
        barrier: tokio::sync::Barrier,
    }

    impl ReadTogether {
        fn new(readers: usize) -> ReadTogether {
            ReadTogether {
                inner: MemoryStore::default(),
                readers,
                first_reads: std::sync::atomic::AtomicUsize::new(0),
                barrier: tokio::sync::Barrier::new(readers),
            }
        }
    }

    impl Store for ReadTogether {
        fn backend(&self) -> &'static str {
            "memory"
        }

        async fn ping(&self) -> crate::store::Result<()> {
            self.inner.ping().await
        }

        async fn get(
            &self,
            ns: Namespace,
            key: &str,
        ) -> crate::store::Result<Option<crate::store::Entry>> {
            let read = self.inner.get(ns, key).await;
            let nth = self
                .first_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if key == KEYRING_KEY && nth < self.readers {
                self.barrier.wait().await;
            }
            read
        }

        async fn revision(
            &self,
            ns: Namespace,
            key: &str,
        ) -> crate::store::Result<Option<Revision>> {
            self.inner.revision(ns, key).await
        }

        async fn put(
            &self,
            ns: Namespace,
            key: &str,
            value: Vec<u8>,
            expect: Expect,
        ) -> crate::store::Result<Written> {
            self.inner.put(ns, key, value, expect).await
        }

        async fn delete(
            &self,
            ns: Namespace,
            key: &str,
            revision: &Revision,
        ) -> crate::store::Result<bool> {
            self.inner.delete(ns, key, revision).await
        }

        async fn list(&self, ns: Namespace, prefix: &str) -> crate::store::Result<Vec<String>> {
            self.inner.list(ns, prefix).await
        }
    }

    /// Instances that all read "no keyring" before any writes one (a store written before the
    /// keyring, several instances getting the root key at once): one create wins, the others
    /// lose it and use the winner's record — never a keyring of their own.
    #[tokio::test]
    async fn a_lost_create_race_uses_the_winners_keyring() {
        let store = ReadTogether::new(3);
        let root = RootKey::generate().unwrap();
        let [a, b, c] = three_at_once(&store, &root).await;
        let stored = store
            .get(Namespace::System, KEYRING_KEY)
            .await
            .unwrap()
            .unwrap();
        for ring in [&a, &b, &c] {
            assert_eq!(ring.revision.as_ref(), Some(&stored.revision));
        }
        let sealed = b.get(1).unwrap().cipher.seal(b"x", b"hello").unwrap();
        for ring in [&a, &c] {
            assert_eq!(
                &ring.get(1).unwrap().cipher.open(b"x", &sealed).unwrap()[..],
                b"hello"
            );
        }
    }

    #[tokio::test]
    async fn an_edited_or_foreign_keyring_is_refused_and_kept() {
        let store = MemoryStore::default();
        let root = RootKey::generate().unwrap();
        ensure(&store, &root, false).await.unwrap();
        let stored = store
            .get(Namespace::System, KEYRING_KEY)
            .await
            .unwrap()
            .unwrap();
        // Another root key cannot open it, and does not replace it.
        let other = RootKey::generate().unwrap();
        assert!(matches!(
            ensure(&store, &other, false).await,
            Err(Error::Refused(_))
        ));
        // Every single-byte edit is refused (the generation in the header included).
        for i in [0, 9, HEADER_LEN + 3, stored.value.len() - 1] {
            let mut edited = stored.value.clone();
            edited[i] ^= 1;
            store
                .put(
                    Namespace::System,
                    KEYRING_KEY,
                    edited.clone(),
                    Expect::Revision(
                        store
                            .revision(Namespace::System, KEYRING_KEY)
                            .await
                            .unwrap()
                            .unwrap(),
                    ),
                )
                .await
                .unwrap();
            assert!(
                matches!(ensure(&store, &root, false).await, Err(Error::Refused(_))),
                "byte {i}"
            );
            let now = store.get(Namespace::System, KEYRING_KEY).await.unwrap();
            assert_eq!(now.unwrap().value, edited, "refused, not replaced");
        }
    }

    #[tokio::test]
    async fn rotation_adds_a_key_that_every_copy_sees_at_its_next_check() {
        let store = MemoryStore::default();
        let root = RootKey::generate().unwrap();
        let other = Current::new(ensure(&store, &root, false).await.unwrap());
        let (a, b) = tokio::join!(rotate(&store, &root, false), rotate(&store, &root, false));
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut currents = [a.current(), b.current()];
        currents.sort_unstable();
        assert_eq!(currents, [2, 3], "two rotations at once add two keys");
        let seen = other.validated(&store, &root).await.unwrap();
        assert_eq!(seen.current(), 3);
        assert_eq!(seen.generation, 3);
        assert!(seen.get(1).is_some() && seen.get(LEGACY).is_some());
        // An earlier keyring put back is refused by a copy that saw a later one.
        let old = seal(
            &root.derive(KEYRING_LABEL),
            1,
            &[(
                Entry {
                    id: 0,
                    created: 0,
                    state: State::Active,
                },
                None,
            )],
        )
        .unwrap();
        let rev = store
            .revision(Namespace::System, KEYRING_KEY)
            .await
            .unwrap();
        store
            .put(
                Namespace::System,
                KEYRING_KEY,
                old,
                Expect::Revision(rev.unwrap()),
            )
            .await
            .unwrap();
        assert!(matches!(
            other.validated(&store, &root).await,
            Err(Error::Refused(_))
        ));
    }

    /// The purpose keys of a real data key live in locked pages of their own, like those of
    /// the root key (the data key's own bytes are dropped, zeroized, once they are derived).
    #[tokio::test]
    async fn data_key_purpose_keys_live_in_locked_pages() {
        use crate::platform::hardening::pages_locked;
        let ring = ensure(
            &MemoryStore::default(),
            &RootKey::generate().unwrap(),
            false,
        )
        .await
        .unwrap();
        let keys = ring.get(1).unwrap();
        for (name, (addr, len)) in [
            ("policies", keys.policies.span()),
            ("cipher", keys.cipher.span()),
            ("secrets", ring.secrets().spans()[0]),
            ("secret records MAC", ring.secrets().spans()[1]),
        ] {
            assert!(len > 0 && pages_locked(addr, len), "{name}");
        }
    }

    #[test]
    fn the_current_key_is_the_newest_active_one() {
        let root = RootKey::generate().unwrap();
        let wrap = root.derive(KEYRING_LABEL);
        let (k1, k2) = (DataKey::generate().unwrap(), DataKey::generate().unwrap());
        let e = |id, state| Entry {
            id,
            created: 7,
            state,
        };
        let sealed = seal(
            &wrap,
            3,
            &[
                (e(0, State::Retired), None),
                (e(1, State::Active), Some(&k1)),
                (e(2, State::Retired), Some(&k2)),
            ],
        )
        .unwrap();
        let ring = decode(&root, &sealed, Revision("r".into()), false).unwrap();
        assert_eq!(ring.generation, 3);
        assert_eq!(ring.current(), 1);
        assert_eq!(ring.entries()[2], e(2, State::Retired));
        // A real entry without key bytes is malformed.
        let bad = seal(
            &wrap,
            1,
            &[(e(0, State::Active), None), (e(1, State::Active), None)],
        )
        .unwrap();
        assert!(decode(&root, &bad, Revision("r".into()), false).is_err());
    }
}
