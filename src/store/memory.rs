//! An in-process store with the same semantics as the durable ones, for tests and ephemeral
//! development clusters. Nothing survives the process.

use std::sync::Mutex;

use super::{Result, Store};
use crate::crypto::Verifier;

#[derive(Default)]
pub struct MemoryStore {
    /// The root-key verifier; set at most once.
    verifier: Mutex<Option<Verifier>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Verifier>> {
        // A poisoned lock only means another thread panicked while holding it; the data (a
        // plain Option) cannot be left half-written, so carry on with it.
        self.verifier.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn verifier(&self) -> Result<Option<Verifier>> {
        Ok(self.lock().clone())
    }

    async fn create_verifier(&self, verifier: &Verifier) -> Result<bool> {
        let mut slot = self.lock();
        if slot.is_some() {
            return Ok(false);
        }
        *slot = Some(verifier.clone());
        Ok(true)
    }
}
