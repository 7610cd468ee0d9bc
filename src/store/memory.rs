//! An in-process store with the same semantics as the durable ones, for tests and ephemeral
//! development clusters. Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{Consistency, Entry, Expect, Namespace, Result, Revision, Snapshot, Store, Written};

/// Clones share one map.
#[derive(Clone, Default)]
pub struct MemoryStore {
    /// (namespace, key) → (value, revision counter). One lock: the store is for tests.
    data: Arc<Mutex<Data>>,
}

#[derive(Default)]
struct Data {
    entries: BTreeMap<(Namespace, String), (Vec<u8>, u64)>,
    /// Revisions are never reused, even across delete and re-create.
    last_revision: u64,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        // Every mutation below is a single map operation, so a poisoned lock still guards a
        // consistent map.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn revision(n: u64) -> Revision {
    Revision(n.to_string())
}

impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn consistency(&self) -> Consistency {
        Consistency::Store
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let records = self
            .lock()
            .entries
            .iter()
            .map(|((ns, key), (value, _))| (*ns, key.clone(), value.clone()))
            .collect();
        Ok(super::sorted(records))
    }

    async fn get(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        Ok(self
            .lock()
            .entries
            .get(&(ns, key.to_string()))
            .map(|(value, rev)| Entry {
                value: value.clone(),
                revision: revision(*rev),
            }))
    }

    async fn revision(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        Ok(self
            .lock()
            .entries
            .get(&(ns, key.to_string()))
            .map(|(_, rev)| revision(*rev)))
    }

    async fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Written> {
        let mut data = self.lock();
        let current = data
            .entries
            .get(&(ns, key.to_string()))
            .map(|(_, r)| revision(*r));
        let holds = match (&expect, &current) {
            (Expect::Absent, None) => true,
            (Expect::Revision(want), Some(have)) => want == have,
            _ => false,
        };
        if !holds {
            return Ok(Written::Conflict);
        }
        data.last_revision += 1;
        let rev = data.last_revision;
        data.entries.insert((ns, key.to_string()), (value, rev));
        Ok(Written::Done(revision(rev)))
    }

    async fn delete(&self, ns: Namespace, key: &str, rev: &Revision) -> Result<bool> {
        let mut data = self.lock();
        let k = (ns, key.to_string());
        match data.entries.get(&k) {
            Some((_, have)) if revision(*have) == *rev => {
                data.entries.remove(&k);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .entries
            .keys()
            .filter(|(n, k)| *n == ns && k.starts_with(prefix))
            .map(|(_, k)| k.clone())
            .collect())
    }
}
