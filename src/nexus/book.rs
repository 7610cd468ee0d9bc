//! The policy book: every policy in one sealed store record, and each Nexus instance's
//! validated copy of it (decision 13 in `docs/decisions.md`).
//!
//! # The record
//! [`Namespace::System`] key [`BOOK_KEY`]: an 8-byte magic, the generation (8 bytes, big
//! endian), then nonce ‖ AES-256-GCM of the JSON `{"generation", "policies": [...]}` under the
//! policy key, with associated data `spike/policy-book/v1\0policy-book\0<generation>`. Under a
//! data key of the keyring other than the legacy key 0 ([`super::keyring`]) the magic is
//! `spkbook2`, the data key's id (4 bytes, big endian) follows the generation, and the
//! associated data is `spike/policy-book/v2\0policy-book\0<generation>\0<id>`. Every
//! change — put or delete of any policy — rewrites the whole book at the next generation with
//! compare-and-set on the store revision it was read at, so generations never repeat and
//! writers through any number of instances never lose each other's changes.
//!
//! What that binds: a policy's whole content, its name and times included, and the generation
//! of the set it belongs to. A store administrator who edits the record, or swaps the clear
//! generation in front of it, makes it fail to open: workload requests and policy routes
//! answer 500 and log why. There are no per-policy rows, so no single policy can be put back
//! after it was deleted or changed. What the store's writer can still do is put back a whole
//! earlier book — a rollback of the entire policy set, like restoring a backup of the store.
//! An instance that has seen a later generation refuses an earlier one (500 and a log line)
//! until the later book is back or the instance restarts; an instance started after the
//! rollback cannot tell (nothing outside the store remembers the generation). An edit made by
//! hand that keeps the record's revision (possible in a SQL store) is not seen by an instance
//! whose copy carries that revision: it goes on deciding with the genuine book it decoded, and
//! the edited record fails to open at the next change or start.
//!
//! # Per request
//! [`Policies::current`] reads the book's revision alone ([`Store::revision`]: one indexed
//! `SELECT`, or an S3 `HEAD`). Equal to the revision of the book this instance decoded last,
//! that copy is the store's book now and serves the request; otherwise the book is read,
//! opened, checked against the highest generation seen, decoded and swapped in (one loader at a
//! time; the others wait for it and use its result). A policy written through any instance is
//! in force for the next request on every instance, and nothing is used without that check.
//!
//! A decoded [`Book`] holds each policy as a [`Rule`] whose patterns are matched as plain text
//! where they are plain text and otherwise compiled when first needed; a rule whose policy is
//! unchanged moves to the next generation's book as it is. Which policies name a caller is
//! looked up once per caller and book — through an index of the exact-ID patterns, then the
//! others — and remembered in a bounded map that evicts single entries (second chance), so a
//! request costs the same whatever the number of policies that do not name its caller, granted
//! or refused.
//!
//! # Migration
//! Before the book, each policy was its own row in [`Namespace::Policies`] (associated data
//! `spike/policy/v1\0<name>`). Rows are imported only when an operator sets
//! `SPIKE_NEXUS_UPGRADE_POLICY_ROWS=true` for one start (decision 13): a store administrator
//! can delete the book and put back a row kept from before the upgrade, and nothing in the
//! store can tell that row from a legitimate one, so only the operator's setting — outside the
//! store — decides. With the setting, the first reader or writer that finds no book — normally
//! the start task [`Policies::start`], right after the root key is loaded — moves every row
//! that opens into a new book with create-if-absent, so when several instances start together
//! exactly one book is created and the others use it; rows found while a book exists are added
//! to it when it holds no policy of that name; the rows are then deleted. A policy put or
//! delete through this version always goes through the book, so a change racing the migration
//! is either in the rows the book is made of or applied to the book after it. Without the
//! setting, a missing book is created empty, and rows in the store are left there, not in
//! force: each start logs a warning with their number and names the setting.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::ApiError;
use super::policy::{Rule, StoredPolicy};
use crate::crypto::AeadKey;
use crate::identity::SpiffeId;
use crate::store::{Entry, Expect, Namespace, Revision, Store, Written};

/// The policy book's key in [`Namespace::System`].
pub const BOOK_KEY: &str = "policy-book";
/// The first bytes of a stored book.
const MAGIC: &[u8; 8] = b"spkbook1";
/// The first bytes of a book sealed under a data key of the keyring (decision 33): the header
/// is followed by the key's id (4 bytes, big endian).
const MAGIC_KEYED: &[u8; 8] = b"spkbook2";
const HEADER_LEN: usize = MAGIC.len() + 8;

/// The keys the policy book is sealed and opened with: a keyring (sealing under its current
/// data key, opening under the one a book names), or one legacy key alone (tools and tests
/// that hold only the root key; per-name rows were always sealed under it).
pub trait BookKey: Send + Sync {
    /// The id and key a book is sealed under now; id 0 writes the layout of earlier releases.
    fn sealing(&self) -> Result<(u32, &AeadKey), ApiError>;
    /// The key of data key `id`, if known.
    fn opening(&self, id: u32) -> Option<&AeadKey>;
}

impl BookKey for AeadKey {
    fn sealing(&self) -> Result<(u32, &AeadKey), ApiError> {
        Ok((0, self))
    }

    fn opening(&self, id: u32) -> Option<&AeadKey> {
        (id == 0).then_some(self)
    }
}

impl BookKey for super::keyring::Keyring {
    fn sealing(&self) -> Result<(u32, &AeadKey), ApiError> {
        let id = self.current();
        self.get(id)
            .map(|k| (id, &k.policies))
            .ok_or_else(|| ApiError::Internal(format!("the keyring has no data key {id}")))
    }

    fn opening(&self, id: u32) -> Option<&AeadKey> {
        self.get(id).map(|k| &k.policies)
    }
}

/// The legacy key of `key`, which per-name rows are sealed under.
fn row_key(key: &dyn BookKey) -> Result<&AeadKey, String> {
    key.opening(0)
        .ok_or_else(|| "no legacy key to open per-name policy rows".to_string())
}
/// Compare-and-set attempts for one change before giving up with 503.
const CHANGE_ATTEMPTS: usize = 50;
/// Callers whose policies one book remembers at most.
const MAX_CALLERS: usize = 4096;

fn aad(generation: u64) -> Vec<u8> {
    format!("spike/policy-book/v1\0{BOOK_KEY}\0{generation}").into_bytes()
}

fn aad_keyed(generation: u64, id: u32) -> Vec<u8> {
    format!("spike/policy-book/v2\0{BOOK_KEY}\0{generation}\0{id}").into_bytes()
}

#[derive(Serialize)]
struct ContentsRef<'a> {
    generation: u64,
    policies: &'a [StoredPolicy],
}

#[derive(Deserialize)]
struct Contents {
    generation: u64,
    policies: Vec<StoredPolicy>,
}

/// Seals a book of `policies` (sorted by name) at `generation`.
pub fn seal(
    key: &dyn BookKey,
    generation: u64,
    policies: &[StoredPolicy],
) -> Result<Vec<u8>, ApiError> {
    let plain = zeroize::Zeroizing::new(
        serde_json::to_vec(&ContentsRef {
            generation,
            policies,
        })
        .map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    let (id, key) = key.sealing()?;
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + plain.len() + 28);
    if id == 0 {
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&generation.to_be_bytes());
        out.extend_from_slice(&key.seal(&aad(generation), &plain)?);
    } else {
        out.extend_from_slice(MAGIC_KEYED);
        out.extend_from_slice(&generation.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&key.seal(&aad_keyed(generation, id), &plain)?);
    }
    Ok(out)
}

/// The data key a stored book names (0 for `spkbook1`), without opening it; `None` when it is
/// not a book.
pub fn key_id(value: &[u8]) -> Option<u32> {
    match value.get(..MAGIC.len())? {
        m if m == MAGIC => Some(0),
        m if m == MAGIC_KEYED => {
            let id = value.get(HEADER_LEN..HEADER_LEN + 4)?;
            Some(u32::from_be_bytes([id[0], id[1], id[2], id[3]]))
        }
        _ => None,
    }
}

/// Opens a stored book: its generation and policies, or an error saying why it is not one.
pub fn open(key: &dyn BookKey, value: &[u8]) -> Result<(u64, Vec<StoredPolicy>), ApiError> {
    let corrupt = |why: &str| ApiError::Internal(format!("the policy book {why}"));
    let (magic, rest) = value
        .split_at_checked(MAGIC.len())
        .ok_or_else(|| corrupt("is truncated"))?;
    let (generation, sealed) = rest
        .split_at_checked(8)
        .ok_or_else(|| corrupt("is truncated"))?;
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(generation);
    let generation = u64::from_be_bytes(bytes);
    let (id, aad, sealed) = if magic == MAGIC {
        (0, aad(generation), sealed)
    } else if magic == MAGIC_KEYED {
        let (id, sealed) = sealed
            .split_at_checked(4)
            .ok_or_else(|| corrupt("is truncated"))?;
        let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        (id, aad_keyed(generation, id), sealed)
    } else {
        return Err(corrupt("is not a policy book"));
    };
    let key = key.opening(id).ok_or_else(|| {
        corrupt(&format!(
            "(generation {generation}) names data key {id}, which the keyring has not"
        ))
    })?;
    let plain = key.open(&aad, sealed).map_err(|_| {
        corrupt(&format!(
            "(generation {generation}) does not open under this root key: it was edited, or its generation changed, outside spike"
        ))
    })?;
    let contents: Contents =
        serde_json::from_slice(&plain).map_err(|e| corrupt(&format!("is malformed: {e}")))?;
    if contents.generation != generation
        || !contents.policies.windows(2).all(|w| w[0].name < w[1].name)
    {
        return Err(corrupt("is inconsistent"));
    }
    Ok((generation, contents.policies))
}

/// One decoded generation of the policy book, as the store held it at `revision`.
pub struct Book {
    revision: Revision,
    generation: u64,
    /// Sorted by name.
    rules: Vec<Arc<Rule>>,
    /// The policies whose SPIFFE-ID pattern matches exactly one ID, by that ID.
    exact: HashMap<String, Vec<usize>>,
    /// The policies whose SPIFFE-ID pattern is anything else.
    others: Vec<usize>,
    /// Which policies name a caller, by caller.
    callers: Callers,
}

impl Book {
    /// Builds a book; rules for policies unchanged since `previous` are taken over from it.
    fn build(
        revision: Revision,
        generation: u64,
        policies: Vec<StoredPolicy>,
        previous: Option<&Book>,
    ) -> Book {
        let rules: Vec<Arc<Rule>> = policies
            .into_iter()
            .map(|p| {
                previous
                    .and_then(|b| b.position(&p.name).map(|i| &b.rules[i]))
                    .filter(|r| r.policy == p)
                    .map_or_else(|| Arc::new(Rule::new(p)), Arc::clone)
            })
            .collect();
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut others = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match rule.id_pattern().exact() {
                Some(id) => exact.entry(id.to_string()).or_default().push(i),
                None => others.push(i),
            }
        }
        Book {
            revision,
            generation,
            rules,
            exact,
            others,
            callers: Callers::new(MAX_CALLERS),
        }
    }

    /// A book of `policies` that stands for no stored record (benchmarks, tests).
    pub fn detached(mut policies: Vec<StoredPolicy>) -> Book {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        policies.dedup_by(|a, b| a.name == b.name);
        Book::build(Revision(String::new()), 0, policies, None)
    }

    /// The book's generation: raised by one with every policy write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every policy, sorted by name.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.rules
            .binary_search_by(|r| r.policy.name.as_str().cmp(name))
            .ok()
    }

    /// The policy named `name`.
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.position(name).map(|i| &*self.rules[i])
    }

    /// The policy at `index` (an index from [`Book::naming`]).
    pub fn rule(&self, index: usize) -> Option<&Rule> {
        self.rules.get(index).map(|r| &**r)
    }

    /// The indices of the policies whose SPIFFE-ID pattern matches `caller`, ascending.
    /// Remembered per caller for this book.
    pub fn naming(&self, caller: &SpiffeId) -> Arc<[usize]> {
        self.callers.get_or_insert_with(caller.as_str(), || {
            let mut found: Vec<usize> =
                self.exact.get(caller.as_str()).cloned().unwrap_or_default();
            found.extend(
                self.others
                    .iter()
                    .copied()
                    .filter(|&i| self.rules[i].names(caller)),
            );
            found.sort_unstable();
            found.into()
        })
    }

    /// How many callers this book remembers (tests).
    pub fn callers_remembered(&self) -> usize {
        self.callers.len()
    }
}

/// A bounded map from caller to the policies naming it. A full map evicts one entry, the first
/// in insertion order that was not used since the hand last passed it (second chance), never
/// the whole map.
struct Callers {
    capacity: usize,
    memo: RwLock<Memo>,
}

#[derive(Default)]
struct Memo {
    map: HashMap<Arc<str>, Slot>,
    order: VecDeque<Arc<str>>,
}

struct Slot {
    policies: Arc<[usize]>,
    used: AtomicBool,
}

impl Callers {
    fn new(capacity: usize) -> Callers {
        Callers {
            capacity: capacity.max(1),
            memo: RwLock::new(Memo::default()),
        }
    }

    fn len(&self) -> usize {
        read(&self.memo).map.len()
    }

    fn get_or_insert_with(
        &self,
        caller: &str,
        find: impl FnOnce() -> Arc<[usize]>,
    ) -> Arc<[usize]> {
        if let Some(slot) = read(&self.memo).map.get(caller) {
            slot.used.store(true, Ordering::Relaxed);
            return Arc::clone(&slot.policies);
        }
        let policies = find();
        let mut memo = write(&self.memo);
        if let Some(slot) = memo.map.get(caller) {
            return Arc::clone(&slot.policies);
        }
        while memo.map.len() >= self.capacity {
            let Some(oldest) = memo.order.pop_front() else {
                break;
            };
            let used = memo
                .map
                .get(&oldest)
                .is_some_and(|s| s.used.swap(false, Ordering::Relaxed));
            if used {
                memo.order.push_back(oldest);
            } else {
                memo.map.remove(&oldest);
            }
        }
        let caller: Arc<str> = Arc::from(caller);
        memo.order.push_back(Arc::clone(&caller));
        memo.map.insert(
            caller,
            Slot {
                policies: Arc::clone(&policies),
                used: AtomicBool::new(false),
            },
        );
        policies
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every value behind these locks is replaced or changed in one step.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// One Nexus instance's copy of the policy book, used only after checking it against the
/// store's revision in the same request (module docs).
#[derive(Default)]
pub struct Policies {
    /// The book decoded last.
    current: RwLock<Option<Arc<Book>>>,
    /// Held while a book is read and decoded, or a new one installed: one loader at a time.
    loading: tokio::sync::Mutex<()>,
    /// Held through a whole change: this instance's policy writes take turns instead of racing
    /// each other's compare-and-set, each loser resealing the whole book.
    writing: tokio::sync::Mutex<()>,
    /// The highest generation this instance has seen: an earlier one is a rollback.
    highest: AtomicU64,
    /// `SPIKE_NEXUS_UPGRADE_POLICY_ROWS`: import per-name rows of earlier versions.
    upgrade_rows: bool,
}

impl Policies {
    /// An instance's policies, with no book read yet; `upgrade_rows` imports the per-name rows
    /// of releases before the book (`SPIKE_NEXUS_UPGRADE_POLICY_ROWS`, module docs).
    pub fn new(upgrade_rows: bool) -> Policies {
        Policies {
            upgrade_rows,
            ..Policies::default()
        }
    }

    fn cached(&self) -> Option<Arc<Book>> {
        read(&self.current).clone()
    }

    /// The policy book as the store holds it now: one revision read, and a read and decode of
    /// the book only when it changed since this instance last decoded it. Creates the book if
    /// there is none yet and this instance has not seen one (from the per-name rows only when
    /// the operator asked for it).
    pub async fn current(
        &self,
        store: &impl Store,
        key: &dyn BookKey,
    ) -> Result<Arc<Book>, ApiError> {
        if let Some(revision) = store.revision(Namespace::System, BOOK_KEY).await?
            && let Some(book) = self.cached().filter(|b| b.revision == revision)
        {
            return Ok(book);
        }
        self.reload(store, key).await
    }

    async fn reload(&self, store: &impl Store, key: &dyn BookKey) -> Result<Arc<Book>, ApiError> {
        let _loading = self.loading.lock().await;
        for _ in 0..3 {
            if let Some(entry) = store.get(Namespace::System, BOOK_KEY).await? {
                return self.adopt(key, entry);
            }
            let seen = self.highest.load(Ordering::Acquire);
            if seen > 0 {
                tracing::error!(
                    seen,
                    "the policy book is gone from the store after this instance saw generation {seen}: refusing every policy decision until it is back (restore it from a backup; a restarted Nexus starts from an empty policy set)"
                );
                return Err(ApiError::Internal(format!(
                    "the policy book is missing; generation {seen} was seen before"
                )));
            }
            if self.upgrade_rows {
                migrate(store, key).await?;
            } else {
                create_empty(store, key).await?;
            }
        }
        Err(ApiError::Internal(
            "the policy book was created but cannot be read back".into(),
        ))
    }

    /// Takes `entry` (the stored book) as the current book, unless it is the one already held.
    /// Called with `loading` held.
    fn adopt(&self, key: &dyn BookKey, entry: Entry) -> Result<Arc<Book>, ApiError> {
        let previous = self.cached();
        if let Some(book) = previous.as_ref().filter(|b| b.revision == entry.revision) {
            return Ok(Arc::clone(book));
        }
        let (generation, policies) = open(key, &entry.value).inspect_err(|e| {
            tracing::error!(error = %e, "refusing the policy book");
        })?;
        let seen = self.highest.load(Ordering::Acquire);
        if generation < seen {
            tracing::error!(
                generation,
                seen,
                "the policy book went back from generation {seen} to {generation}: someone with write access to the store put back an older copy; refusing every policy decision until a generation of at least {seen} is back"
            );
            return Err(ApiError::Internal(format!(
                "the policy book was rolled back from generation {seen} to {generation}"
            )));
        }
        let book = Arc::new(Book::build(
            entry.revision,
            generation,
            policies,
            previous.as_deref(),
        ));
        self.install(&book);
        Ok(book)
    }

    /// Makes `book` the current one unless a later generation is already there. Called with
    /// `loading` held, so a loader never compares a book it read before a write with the
    /// generation that write installed.
    fn install(&self, book: &Arc<Book>) {
        let mut current = write(&self.current);
        if current
            .as_ref()
            .is_none_or(|c| c.generation <= book.generation)
        {
            *current = Some(Arc::clone(book));
        }
        self.highest.fetch_max(book.generation, Ordering::AcqRel);
    }

    /// Applies `edit` to the policy set and writes the result as the next generation, with
    /// compare-and-set on the book it was read from; retried from a fresh read when another
    /// writer got there first. `edit` may refuse (its error is returned, nothing written).
    pub async fn change(
        &self,
        store: &impl Store,
        key: &dyn BookKey,
        mut edit: impl FnMut(&mut Vec<StoredPolicy>) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let _writing = self.writing.lock().await;
        for _ in 0..CHANGE_ATTEMPTS {
            let book = self.current(store, key).await?;
            let mut policies: Vec<StoredPolicy> =
                book.rules.iter().map(|r| r.policy.clone()).collect();
            edit(&mut policies)?;
            let generation = book.generation + 1;
            let value = seal(key, generation, &policies)?;
            let expect = Expect::Revision(book.revision.clone());
            match store
                .put(Namespace::System, BOOK_KEY, value, expect)
                .await?
            {
                Written::Done(revision) => {
                    let _loading = self.loading.lock().await;
                    let next = Book::build(revision, generation, policies, Some(&book));
                    self.install(&Arc::new(next));
                    return Ok(());
                }
                Written::Conflict => {
                    tracing::debug!("policy book write conflict; retrying from a fresh read")
                }
            }
        }
        Err(ApiError::Contended)
    }

    /// At start, once the root key is loaded: creates the book if there is none. With
    /// `SPIKE_NEXUS_UPGRADE_POLICY_ROWS`, moves the per-name rows of earlier versions into it
    /// and removes them; without, leaves them and warns (module docs).
    pub async fn start(&self, store: &impl Store, key: &dyn BookKey) -> Result<(), ApiError> {
        let book = self.current(store, key).await?;
        let names = store.list(Namespace::Policies, "").await?;
        if !self.upgrade_rows {
            if !names.is_empty() {
                tracing::warn!(
                    rows = names.len(),
                    "per-name policy rows of a release before the policy book are in the store; they are not in force and were not imported. If this deployment was just upgraded from such a release, start one instance with {UPGRADE_ROWS}=true to move them into the policy book (a store administrator can also put rows there: only do it if you trust every row), then unset it"
                );
            }
            return Ok(());
        }
        tracing::warn!(
            "{UPGRADE_ROWS} is set: per-name policy rows in the store are moved into the policy book; unset it once this start has logged that the rows are gone"
        );
        let mut rows = Vec::new();
        for name in names {
            if let Some(entry) = store.get(Namespace::Policies, &name).await? {
                rows.push((name, entry));
            }
        }
        let missing: Vec<StoredPolicy> = rows
            .iter()
            .filter(|(name, _)| book.get(name).is_none())
            .filter_map(|(name, entry)| open_row(key, name, &entry.value).ok())
            .collect();
        let book = if missing.is_empty() {
            book
        } else {
            let mut added = 0;
            let changed = self
                .change(store, key, |policies| {
                    added = 0;
                    for row in &missing {
                        if !policies.iter().any(|p| p.name == row.name) {
                            policies.push(row.clone());
                            added += 1;
                        }
                    }
                    if added == 0 {
                        // Another instance moved them first: nothing to write.
                        return Err(ApiError::NotFound);
                    }
                    policies.sort_by(|a, b| a.name.cmp(&b.name));
                    Ok(())
                })
                .await;
            match changed {
                Ok(()) => tracing::info!(
                    policies = added,
                    "moved the per-name policy rows of an earlier version into the policy book"
                ),
                Err(ApiError::NotFound) => {}
                Err(e) => return Err(e),
            }
            self.current(store, key).await?
        };
        for (name, entry) in rows {
            remove_row(store, key, &name, entry, |n| book.get(n).map(|r| &r.policy)).await?;
        }
        tracing::info!("no per-name policy rows are left in the store");
        Ok(())
    }

    /// The generation of the book this instance holds (tests, logs).
    pub fn generation(&self) -> Option<u64> {
        self.cached().map(|b| b.generation)
    }
}

/// The associated data of a per-name policy row (the layout before the book).
fn row_aad(name: &str) -> Vec<u8> {
    format!("spike/policy/v1\0{name}").into_bytes()
}

fn open_row(key: &dyn BookKey, name: &str, value: &[u8]) -> Result<StoredPolicy, String> {
    let plain = row_key(key)?
        .open(&row_aad(name), value)
        .map_err(|_| "it does not open under this root key".to_string())?;
    let policy: StoredPolicy =
        serde_json::from_slice(&plain).map_err(|e| format!("it is malformed: {e}"))?;
    if policy.name != name {
        return Err("it names another policy".into());
    }
    Ok(policy)
}

/// The operator's setting that imports per-name rows.
const UPGRADE_ROWS: &str = "SPIKE_NEXUS_UPGRADE_POLICY_ROWS";

/// Creates an empty policy book, create-if-absent; per-name rows are not read.
async fn create_empty(store: &impl Store, key: &dyn BookKey) -> Result<(), ApiError> {
    let value = seal(key, 1, &[])?;
    match store
        .put(Namespace::System, BOOK_KEY, value, Expect::Absent)
        .await?
    {
        Written::Conflict => tracing::info!("another Nexus instance created the policy book first"),
        Written::Done(_) => tracing::info!("created the policy book (no policies yet)"),
    }
    Ok(())
}

/// Checks that a per-name policy row of the layout before the book opens under `key` and names
/// `name`: for `spike backup verify`.
pub fn check_row(key: &dyn BookKey, name: &str, value: &[u8]) -> Result<(), String> {
    open_row(key, name, value).map(drop)
}

/// Creates the policy book from the per-name rows, create-if-absent, then deletes the rows.
async fn migrate(store: &impl Store, key: &dyn BookKey) -> Result<(), ApiError> {
    let mut rows = Vec::new();
    for name in store.list(Namespace::Policies, "").await? {
        if let Some(entry) = store.get(Namespace::Policies, &name).await? {
            rows.push((name, entry));
        }
    }
    let mut policies: Vec<StoredPolicy> = rows
        .iter()
        .filter_map(|(name, entry)| open_row(key, name, &entry.value).ok())
        .collect();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    let value = seal(key, 1, &policies)?;
    match store
        .put(Namespace::System, BOOK_KEY, value, Expect::Absent)
        .await?
    {
        Written::Conflict => {
            tracing::info!("another Nexus instance created the policy book first");
            return Ok(());
        }
        Written::Done(_) if rows.is_empty() => {
            tracing::info!("created the policy book (no policies yet)");
        }
        Written::Done(_) => {
            tracing::info!(
                policies = policies.len(),
                rows = rows.len(),
                "moved the per-name policy rows of an earlier version into the policy book"
            );
        }
    }
    let lookup = |name: &str| {
        policies
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .map(|i| &policies[i])
    };
    for (name, entry) in rows {
        remove_row(store, key, &name, entry, lookup).await?;
    }
    Ok(())
}

/// Deletes one per-name row, saying in the log whether the book holds the same policy.
/// A row that changed meanwhile is looked at again (a few times).
async fn remove_row<'a>(
    store: &impl Store,
    key: &dyn BookKey,
    name: &str,
    mut entry: Entry,
    in_book: impl Fn(&str) -> Option<&'a StoredPolicy>,
) -> Result<(), ApiError> {
    for _ in 0..3 {
        match open_row(key, name, &entry.value) {
            Ok(row) if in_book(name) == Some(&row) => {
                tracing::debug!(policy = %name, "removing a per-name policy row the policy book holds")
            }
            Ok(_) => tracing::warn!(
                policy = %name,
                "removing a per-name policy row that differs from the policy book (written by an older spike still running, or by hand): it is not in force; apply the policy again if it is wanted"
            ),
            Err(why) => tracing::warn!(
                policy = %name,
                "removing a per-name policy row that was never in force: {why}"
            ),
        }
        if store
            .delete(Namespace::Policies, name, &entry.revision)
            .await?
        {
            return Ok(());
        }
        match store.get(Namespace::Policies, name).await? {
            Some(changed) => entry = changed,
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::crypto::RootKey;
    use crate::protocol::policy::Permission;
    use crate::store::memory::MemoryStore;

    /// A memory store that counts full reads, revision reads and writes, and lets other tasks
    /// run after every read and before every write, as a store across a network would: what was
    /// read may be stale by the time the reader's write lands.
    #[derive(Clone, Default)]
    struct Counting {
        inner: MemoryStore,
        gets: Arc<AtomicUsize>,
        revisions: Arc<AtomicUsize>,
        puts: Arc<AtomicUsize>,
    }

    impl Store for Counting {
        fn backend(&self) -> &'static str {
            "counting"
        }
        async fn ping(&self) -> crate::store::Result<()> {
            Ok(())
        }
        async fn get(&self, ns: Namespace, key: &str) -> crate::store::Result<Option<Entry>> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let found = self.inner.get(ns, key).await;
            tokio::task::yield_now().await;
            found
        }
        async fn revision(
            &self,
            ns: Namespace,
            key: &str,
        ) -> crate::store::Result<Option<Revision>> {
            self.revisions.fetch_add(1, Ordering::SeqCst);
            let found = self.inner.revision(ns, key).await;
            tokio::task::yield_now().await;
            found
        }
        async fn put(
            &self,
            ns: Namespace,
            key: &str,
            value: Vec<u8>,
            expect: Expect,
        ) -> crate::store::Result<Written> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
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

    fn key() -> AeadKey {
        RootKey::generate().unwrap().derive("spike/policies/v1")
    }

    fn policy(name: &str, id: &str, path: &str) -> StoredPolicy {
        StoredPolicy {
            name: name.into(),
            spiffeid_pattern: id.into(),
            path_pattern: path.into(),
            permissions: vec![Permission::Read],
            created: 1,
            updated: 2,
        }
    }

    fn caller(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    async fn put(p: &Policies, s: &impl Store, k: &AeadKey, new: StoredPolicy) {
        p.change(s, k, |set| {
            set.retain(|x| x.name != new.name);
            set.push(new.clone());
            set.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(())
        })
        .await
        .unwrap();
    }

    async fn remove(p: &Policies, s: &impl Store, k: &AeadKey, name: &str) {
        p.change(s, k, |set| {
            set.retain(|x| x.name != name);
            Ok(())
        })
        .await
        .unwrap();
    }

    /// Who the book says `id` may read `path` as.
    async fn may_read(p: &Policies, s: &impl Store, k: &AeadKey, id: &str, path: &str) -> bool {
        let book = p.current(s, k).await.unwrap();
        let who = caller(id);
        book.naming(&who).iter().any(|&i| {
            book.rule(i)
                .is_some_and(|r| r.grants(&[Permission::Read]) && r.reaches(path))
        })
    }

    fn seal_row(k: &AeadKey, p: &StoredPolicy) -> Vec<u8> {
        k.seal(&row_aad(&p.name), &serde_json::to_vec(p).unwrap())
            .unwrap()
    }

    async fn stored_book(s: &impl Store) -> Entry {
        s.get(Namespace::System, BOOK_KEY).await.unwrap().unwrap()
    }

    const W: &str = "spiffe://spike.ist/app/w";

    /// A policy letting [`W`] read `db/...`.
    fn grants_w() -> StoredPolicy {
        policy("w", "^spiffe://spike\\.ist/app/w$", "^db/")
    }

    #[tokio::test]
    async fn a_change_through_one_instance_is_in_force_for_the_next_request_on_another() {
        let (s, k) = (MemoryStore::default(), key());
        let (a, b) = (Policies::default(), Policies::default());
        assert!(!may_read(&b, &s, &k, W, "db/x").await);
        put(&a, &s, &k, grants_w()).await;
        assert!(may_read(&b, &s, &k, W, "db/x").await);
        remove(&b, &s, &k, "w").await;
        assert!(!may_read(&a, &s, &k, W, "db/x").await);
        // A regex pattern, changed in place: the next request sees the new one.
        put(
            &a,
            &s,
            &k,
            policy("w", "^spiffe://spike.ist/app/.+$", "^db/"),
        )
        .await;
        assert!(may_read(&b, &s, &k, W, "db/x").await);
        put(
            &a,
            &s,
            &k,
            policy("w", "^spiffe://spike.ist/other/.+$", "^db/"),
        )
        .await;
        assert!(!may_read(&b, &s, &k, W, "db/x").await);
        assert_eq!(a.generation(), b.generation());
    }

    #[tokio::test]
    async fn an_unchanged_book_costs_one_revision_read_and_no_decoding() {
        let (s, k) = (Counting::default(), key());
        let p = Policies::default();
        put(&p, &s, &k, grants_w()).await;
        let first = p.current(&s, &k).await.unwrap();
        let (gets, revisions) = (
            s.gets.load(Ordering::SeqCst),
            s.revisions.load(Ordering::SeqCst),
        );
        for _ in 0..10 {
            let again = p.current(&s, &k).await.unwrap();
            assert!(Arc::ptr_eq(&first, &again));
        }
        assert_eq!(
            s.gets.load(Ordering::SeqCst),
            gets,
            "the book was read again"
        );
        assert_eq!(s.revisions.load(Ordering::SeqCst), revisions + 10);
    }

    #[tokio::test]
    async fn changes_through_one_instance_take_turns_instead_of_racing() {
        let (s, k) = (Counting::default(), Arc::new(key()));
        let p = Arc::new(Policies::default());
        p.current(&s, &*k).await.unwrap();
        let before = s.puts.load(Ordering::SeqCst);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16 {
            let (s, k, p) = (s.clone(), Arc::clone(&k), Arc::clone(&p));
            tasks.spawn(async move {
                let id = format!("^spiffe://spike\\.ist/app/w{i}$");
                put(&p, &s, &k, policy(&format!("p{i:02}"), &id, "^db/")).await;
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let writes = s.puts.load(Ordering::SeqCst) - before;
        assert_eq!(writes, 16, "changes lost compare-and-sets to each other");
        assert_eq!(p.current(&s, &*k).await.unwrap().rules().len(), 16);
    }

    #[tokio::test]
    async fn an_older_book_put_back_is_refused_until_a_later_one_is_back() {
        let (s, k) = (MemoryStore::default(), key());
        let p = Policies::default();
        put(&p, &s, &k, grants_w()).await;
        let granting = stored_book(&s).await;
        remove(&p, &s, &k, "w").await;
        let revoked = stored_book(&s).await;
        assert!(!may_read(&p, &s, &k, W, "db/x").await);
        // The store's writer puts the book that granted access back.
        let replay = |value: Vec<u8>| {
            let s = s.clone();
            async move {
                let now = stored_book(&s).await.revision;
                s.put(Namespace::System, BOOK_KEY, value, Expect::Revision(now))
                    .await
                    .unwrap();
            }
        };
        replay(granting.value.clone()).await;
        let err = p.current(&s, &k).await.err().unwrap();
        assert!(
            matches!(&err, ApiError::Internal(m) if m.contains("rolled back")),
            "{err}"
        );
        // Refused for as long as it is there...
        assert!(p.current(&s, &k).await.is_err());
        // ...and served again once the later book is back.
        replay(revoked.value.clone()).await;
        assert!(!may_read(&p, &s, &k, W, "db/x").await);
        // The limit (module docs): an instance that never saw the later generation cannot tell.
        replay(granting.value).await;
        assert!(may_read(&Policies::default(), &s, &k, W, "db/x").await);
    }

    /// Under a keyring the book is sealed under the current data key and names it; a book of
    /// an earlier release (legacy key, `spkbook1`) still opens; the id cannot be changed.
    #[tokio::test]
    async fn a_book_names_the_data_key_that_sealed_it() {
        let root = crate::crypto::RootKey::generate().unwrap();
        let ring = super::super::keyring::ensure(&MemoryStore::default(), &root, false)
            .await
            .unwrap();
        let p = [policy("a", "^spiffe://x/y$", "^a/")];
        let sealed = seal(&ring, 4, &p).unwrap();
        assert_eq!(&sealed[..8], MAGIC_KEYED);
        assert_eq!(&sealed[16..20], &[0, 0, 0, 1]);
        assert_eq!(open(&ring, &sealed).unwrap().0, 4);
        let legacy = root.derive(crate::nexus::POLICIES_LABEL);
        assert!(
            open(&legacy, &sealed).is_err(),
            "the legacy key alone cannot open it"
        );
        let old = seal(&legacy, 3, &p).unwrap();
        assert_eq!(&old[..8], MAGIC);
        assert_eq!(open(&ring, &old).unwrap().0, 3);
        for id in [0u8, 2] {
            let mut edited = sealed.clone();
            edited[19] = id;
            assert!(open(&ring, &edited).is_err(), "id {id}");
        }
        let mut downgraded = sealed.clone();
        downgraded[..8].copy_from_slice(MAGIC);
        assert!(open(&ring, &downgraded).is_err());
    }

    #[tokio::test]
    async fn an_edited_book_does_not_open() {
        let (s, k) = (MemoryStore::default(), key());
        let p = Policies::default();
        put(&p, &s, &k, grants_w()).await;
        let good = stored_book(&s).await.value;
        let generation = u64::from_be_bytes(good[8..16].try_into().unwrap());
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut later = good.clone();
        later[8..16].copy_from_slice(&(generation + 5).to_be_bytes());
        let mut earlier = good.clone();
        earlier[8..16].copy_from_slice(&(generation - 1).to_be_bytes());
        let mut magic = good.clone();
        magic[0] ^= 1;
        for (what, value, why) in [
            ("a flipped bit", flipped, "does not open"),
            ("a later generation", later, "does not open"),
            ("an earlier generation", earlier, "does not open"),
            ("another magic", magic, "is not a policy book"),
            ("a truncated record", good[..12].to_vec(), "is truncated"),
            (
                "a record under another key",
                seal(&key(), generation + 1, &[]).unwrap(),
                "does not open",
            ),
        ] {
            // A new instance each time: nothing to compare with but the key.
            let fresh = Policies::default();
            let now = stored_book(&s).await.revision;
            s.put(Namespace::System, BOOK_KEY, value, Expect::Revision(now))
                .await
                .unwrap();
            let err = fresh.current(&s, &k).await.err();
            assert!(
                matches!(&err, Some(ApiError::Internal(m)) if m.contains(why)),
                "{what}: {err:?}"
            );
        }
        assert_eq!(open(&k, &good).unwrap().0, generation);
    }

    #[tokio::test]
    async fn a_book_removed_after_it_was_seen_is_refused() {
        let (s, k) = (MemoryStore::default(), key());
        let p = Policies::default();
        put(&p, &s, &k, grants_w()).await;
        let book = stored_book(&s).await;
        assert!(
            s.delete(Namespace::System, BOOK_KEY, &book.revision)
                .await
                .unwrap()
        );
        assert!(p.current(&s, &k).await.is_err());
        assert!(s.get(Namespace::System, BOOK_KEY).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn per_name_rows_move_into_one_book_once_when_instances_start_together() {
        let (s, k) = (MemoryStore::default(), key());
        let rows = [
            policy("a", "^spiffe://spike\\.ist/app/w$", "^a/"),
            policy("b", "^spiffe://spike.ist/app/.+$", "^b/"),
            policy("c", "spiffe://spike.ist/x", "^c/"),
        ];
        for p in &rows {
            s.put(
                Namespace::Policies,
                &p.name,
                seal_row(&k, p),
                Expect::Absent,
            )
            .await
            .unwrap();
        }
        // A row that does not open (copied from another policy) was never in force.
        s.put(
            Namespace::Policies,
            "d",
            seal_row(&k, &rows[0]),
            Expect::Absent,
        )
        .await
        .unwrap();
        let instances: Vec<Arc<Policies>> = (0..4).map(|_| Arc::new(Policies::new(true))).collect();
        let shared = Arc::new(k);
        let mut tasks = tokio::task::JoinSet::new();
        for p in &instances {
            let (p, s, k) = (Arc::clone(p), s.clone(), Arc::clone(&shared));
            tasks.spawn(async move { p.start(&s, &*k).await });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        let k = &*shared;
        let (generation, policies) = open(k, &stored_book(&s).await.value).unwrap();
        assert_eq!(generation, 1, "the book was created more than once");
        assert_eq!(policies, rows.to_vec(), "times and contents kept");
        assert!(s.list(Namespace::Policies, "").await.unwrap().is_empty());
        for p in &instances {
            assert!(may_read(p, &s, k, W, "a/1").await);
            assert!(may_read(p, &s, k, W, "b/1").await);
            assert!(!may_read(p, &s, k, W, "c/1").await);
        }
    }

    #[tokio::test]
    async fn a_change_before_the_migration_keeps_the_rows_and_the_change() {
        let (s, k) = (MemoryStore::default(), key());
        let old = policy("old", "^spiffe://spike\\.ist/app/w$", "^old/");
        s.put(
            Namespace::Policies,
            "old",
            seal_row(&k, &old),
            Expect::Absent,
        )
        .await
        .unwrap();
        // A write reaches one instance before any start task has run.
        let (a, b) = (Policies::new(true), Policies::new(true));
        put(
            &b,
            &s,
            &k,
            policy("new", "^spiffe://spike\\.ist/app/w$", "^new/"),
        )
        .await;
        a.start(&s, &k).await.unwrap();
        assert!(may_read(&a, &s, &k, W, "old/1").await);
        assert!(may_read(&a, &s, &k, W, "new/1").await);
        assert!(s.list(Namespace::Policies, "").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn rows_are_never_imported_without_the_operators_setting() {
        let (s, k) = (MemoryStore::default(), key());
        let row = |name: &str| {
            let p = policy(name, "^spiffe://spike\\.ist/app/w$", &format!("^{name}/"));
            let s = s.clone();
            let value = seal_row(&k, &p);
            async move {
                s.put(Namespace::Policies, &p.name, value, Expect::Absent)
                    .await
                    .unwrap();
            }
        };
        // No book and a row (a store as a release before the book left it, or a deleted book
        // and a replayed row): the book is created empty, the row stays out of force.
        row("early").await;
        let p = Policies::default();
        p.start(&s, &k).await.unwrap();
        assert!(!may_read(&p, &s, &k, W, "early/1").await);
        assert!(open(&k, &stored_book(&s).await.value).unwrap().1.is_empty());
        // A row written once the book exists (an older instance still running, or a replayed
        // row): neither in force nor imported by a restart.
        row("late").await;
        assert!(!may_read(&p, &s, &k, W, "late/1").await);
        let restarted = Policies::default();
        restarted.start(&s, &k).await.unwrap();
        assert!(!may_read(&restarted, &s, &k, W, "early/1").await);
        assert!(!may_read(&restarted, &s, &k, W, "late/1").await);
        assert_eq!(s.list(Namespace::Policies, "").await.unwrap().len(), 2);
        // The operator's setting, for one start, moves both into the existing book.
        let upgrading = Policies::new(true);
        upgrading.start(&s, &k).await.unwrap();
        assert!(may_read(&upgrading, &s, &k, W, "early/1").await);
        assert!(may_read(&restarted, &s, &k, W, "late/1").await);
        assert!(s.list(Namespace::Policies, "").await.unwrap().is_empty());
    }

    #[test]
    fn callers_are_remembered_in_a_bounded_map_that_evicts_one_at_a_time() {
        let callers = Callers::new(3);
        let found = |n: usize| -> Arc<[usize]> { vec![n].into() };
        for (i, c) in ["a", "b", "c"].into_iter().enumerate() {
            callers.get_or_insert_with(c, || found(i));
        }
        // `a` is used again; the next newcomer evicts `b`, the oldest unused.
        assert_eq!(&*callers.get_or_insert_with("a", || found(99)), &[0]);
        callers.get_or_insert_with("d", || found(3));
        assert_eq!(callers.len(), 3);
        assert_eq!(&*callers.get_or_insert_with("a", || found(99)), &[0]);
        assert_eq!(&*callers.get_or_insert_with("c", || found(99)), &[2]);
        assert_eq!(&*callers.get_or_insert_with("d", || found(99)), &[3]);
        assert_eq!(callers.len(), 3);
        assert_eq!(&*callers.get_or_insert_with("b", || found(1)), &[1]);
        assert_eq!(callers.len(), 3);
    }

    #[test]
    fn a_callers_policies_are_found_once_per_book_among_many() {
        let mut policies: Vec<StoredPolicy> = (0..2000)
            .map(|i| {
                let id = if i % 2 == 0 {
                    format!("^spiffe://spike\\.ist/app/other-{i}$")
                } else {
                    format!("^spiffe://spike\\.ist/team-{i}/[a-z]+$")
                };
                policy(&format!("p{i:05}"), &id, &format!("^other-{i}/"))
            })
            .collect();
        policies.push(policy("w-exact", "^spiffe://spike\\.ist/app/w$", "^db/"));
        policies.push(policy(
            "w-regex",
            "^spiffe://spike\\.ist/app/[w]$",
            "^logs/",
        ));
        let book = Book::detached(policies);
        let w = caller(W);
        let first = book.naming(&w);
        let names: Vec<&str> = first
            .iter()
            .map(|&i| book.rule(i).unwrap().policy.name.as_str())
            .collect();
        assert_eq!(names, ["w-exact", "w-regex"]);
        assert!(Arc::ptr_eq(&first, &book.naming(&w)), "found again");
        // A caller no policy names is remembered too, so a refusal costs no more.
        let nobody = caller("spiffe://spike.ist/nobody");
        let none = book.naming(&nobody);
        assert!(none.is_empty());
        assert!(Arc::ptr_eq(&none, &book.naming(&nobody)));
        assert_eq!(book.callers_remembered(), 2);
        let team = book.naming(&caller("spiffe://spike.ist/team-7/x"));
        assert_eq!(team.len(), 1);
    }

    #[tokio::test]
    async fn unchanged_policies_keep_their_compiled_rules_across_generations() {
        let (s, k) = (MemoryStore::default(), key());
        let p = Policies::default();
        put(
            &p,
            &s,
            &k,
            policy("a", "^spiffe://spike.ist/app/.+$", "^a/"),
        )
        .await;
        put(
            &p,
            &s,
            &k,
            policy("b", "^spiffe://spike.ist/app/.+$", "^b/"),
        )
        .await;
        let before = p.current(&s, &k).await.unwrap();
        put(
            &p,
            &s,
            &k,
            policy("b", "^spiffe://spike.ist/app/.+$", "^bb/"),
        )
        .await;
        let after = p.current(&s, &k).await.unwrap();
        assert_eq!(after.generation(), before.generation() + 1);
        assert!(Arc::ptr_eq(&before.rules()[0], &after.rules()[0]));
        assert!(!Arc::ptr_eq(&before.rules()[1], &after.rules()[1]));
        // Another instance decodes each new book from the store, on top of its own copy.
        let other = Policies::default();
        let mine = other.current(&s, &k).await.unwrap();
        put(
            &p,
            &s,
            &k,
            policy("c", "^spiffe://spike.ist/app/.+$", "^c/"),
        )
        .await;
        let next = other.current(&s, &k).await.unwrap();
        assert_eq!(next.generation(), p.generation().unwrap());
        assert_eq!(next.rules().len(), 3);
        assert!(Arc::ptr_eq(&mine.rules()[0], &next.rules()[0]));
        assert!(Arc::ptr_eq(&mine.rules()[1], &next.rules()[1]));
    }
}
