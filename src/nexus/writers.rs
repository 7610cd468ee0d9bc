//! The group-commit queue of secret writes: writers of one path inside this instance take
//! turns through a fixed set of stripes, and concurrent puts of one path are applied to one read
//! of the record and written with one compare-and-set. The record model and what a put does to
//! it are in [`super::secrets`]; this module only orders and batches.

use std::sync::Arc;

use super::ApiError;
use super::secrets::{Record, SecretKeys, read_modify_write};
use crate::platform::metrics::BatchSizes;
use crate::store::Store;

/// Writers of one path inside this instance take turns through one of a fixed set of
/// stripes, chosen by the path's hash.
///
/// Puts go further: they queue in the stripe, and one task applies every queued put of a path
/// to one read of the record, in arrival order, and writes the result with one compare-and-set
/// — a group commit. Each put still gets its own version, its own check-and-set and request-id
/// check, and its answer only once the write holding it is durable; a record that would have
/// taken `n` store round trips (and `n` fsyncs) takes one. Between instances nothing changes:
/// the compare-and-set is what keeps every write honest.
pub(super) struct Stripe {
    /// Held while a record of this stripe's paths is being changed: by a batch of puts, or by
    /// one delete or undelete.
    pub(super) turn: tokio::sync::Mutex<()>,
    queue: std::sync::Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    puts: Vec<QueuedPut>,
    /// Whether a task is applying this queue; the put that finds none starts one.
    flushing: bool,
}

/// Applies one put to the record (created when `None`); leaves it untouched on error.
pub(super) type Change = Box<dyn FnMut(&mut Option<Record>) -> Result<Applies, ApiError> + Send>;

/// What a put did to the record.
pub(super) enum Applies {
    /// Wrote this new version.
    Wrote(u64),
    /// Replayed a remembered request id: the version it made, nothing written.
    Replayed(u64),
}

struct QueuedPut {
    path: String,
    /// The keys the record is checked and authenticated with (one Nexus has one set).
    keys: Arc<SecretKeys>,
    change: Change,
    done: tokio::sync::oneshot::Sender<Result<u64, ApiError>>,
}

/// Puts of one path applied together at most (each still a version of its own).
const MAX_BATCH: usize = 128;

/// Stripes per [`Writers`].
const STRIPES: usize = 256;

/// The write queues of one store ([`Stripe`]s). Each Nexus has its own, so puts are only ever
/// committed together with puts to the same store.
#[derive(Clone)]
pub struct Writers {
    stripes: Arc<[Stripe]>,
    /// Where the size of every written batch is recorded.
    batches: BatchSizes,
}

impl Default for Writers {
    fn default() -> Writers {
        Writers::measured(BatchSizes::default())
    }
}

impl Writers {
    /// Write queues that record each batch's size in `batches`.
    pub fn measured(batches: BatchSizes) -> Writers {
        Writers {
            stripes: (0..STRIPES)
                .map(|_| Stripe {
                    turn: tokio::sync::Mutex::new(()),
                    queue: std::sync::Mutex::new(Queue::default()),
                })
                .collect(),
            batches,
        }
    }

    /// The index of the stripe `path` belongs to.
    fn stripe_of(&self, path: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        path.hash(&mut h);
        (h.finish() as usize) % self.stripes.len()
    }

    pub(super) fn stripe(&self, path: &str) -> &Stripe {
        &self.stripes[self.stripe_of(path)]
    }
}

fn lock_queue(stripe: &Stripe) -> std::sync::MutexGuard<'_, Queue> {
    // Every change under this lock is a single push, drain or flag flip: a poisoned lock still
    // guards a consistent queue.
    stripe.queue.lock().unwrap_or_else(|e| e.into_inner())
}

/// Queues a put and waits for its answer. The batch runs in a task of its own, so a caller
/// that goes away (a client hanging up) never cuts short a write that holds other callers'
/// puts.
pub(super) async fn queue_put<S: Store + Clone>(
    store: &S,
    writers: &Writers,
    keys: &Arc<SecretKeys>,
    path: &str,
    change: Change,
) -> Result<u64, ApiError> {
    let index = writers.stripe_of(path);
    let stripe = &writers.stripes[index];
    let (done, answer) = tokio::sync::oneshot::channel();
    let start = {
        let mut queue = lock_queue(stripe);
        queue.puts.push(QueuedPut {
            path: path.to_string(),
            keys: Arc::clone(keys),
            change,
            done,
        });
        !std::mem::replace(&mut queue.flushing, true)
    };
    if start {
        tokio::spawn(flush(writers.clone(), index, store.clone()));
    }
    answer.await.unwrap_or_else(|_| {
        Err(ApiError::Internal(
            "a queued secret write was dropped".into(),
        ))
    })
}

/// Applies a stripe's queued puts, a path's batch at a time, until the queue is empty.
async fn flush<S: Store>(writers: Writers, index: usize, store: S) {
    /// Should this task end any other way than by emptying the queue (a panic, or its runtime
    /// shutting down), the stripe must not be left marked as flushing with nobody flushing it:
    /// the queued callers get an error and the next put starts a new task.
    struct Finish<'a> {
        stripe: &'a Stripe,
        emptied: bool,
    }
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            if !self.emptied {
                let mut queue = lock_queue(self.stripe);
                queue.flushing = false;
                queue.puts.clear();
            }
        }
    }
    let stripe = &writers.stripes[index];
    let mut finish = Finish {
        stripe,
        emptied: false,
    };
    loop {
        let turn = stripe.turn.lock().await;
        let batch: Vec<QueuedPut> = {
            let mut queue = lock_queue(stripe);
            let Some(first) = queue.puts.first() else {
                queue.flushing = false;
                finish.emptied = true;
                return;
            };
            let path = first.path.clone();
            let mut batch = Vec::new();
            let mut rest = Vec::new();
            for put in queue.puts.drain(..) {
                if put.path == path && batch.len() < MAX_BATCH {
                    batch.push(put);
                } else {
                    rest.push(put);
                }
            }
            queue.puts = rest;
            batch
        };
        writers.batches.observe(batch.len());
        apply_batch(&store, batch).await;
        drop(turn);
    }
}

/// Applies `batch` (puts of one path, in order) to one read of the record and writes it with
/// one compare-and-set, retrying from a fresh read when another writer got in between; then
/// answers every put.
async fn apply_batch<S: Store>(store: &S, mut batch: Vec<QueuedPut>) {
    let path = batch[0].path.clone();
    let keys = Arc::clone(&batch[0].keys);
    let outcome = read_modify_write(store, &keys, &path, |mut record| {
        let mut wrote = false;
        let answers: Vec<Result<u64, ApiError>> = batch
            .iter_mut()
            .map(|put| match (put.change)(&mut record) {
                Ok(Applies::Wrote(v)) => {
                    wrote = true;
                    Ok(v)
                }
                Ok(Applies::Replayed(v)) => Ok(v),
                Err(e) => Err(e),
            })
            .collect();
        Ok((record.filter(|_| wrote), answers))
    })
    .await;
    match outcome {
        Ok(answers) => {
            for (put, answer) in batch.into_iter().zip(answers) {
                let _ = put.done.send(answer);
            }
        }
        Err(e) => {
            for put in batch {
                let _ = put.done.send(Err(match &e {
                    ApiError::Store(e) => ApiError::Store(e.clone()),
                    ApiError::Contended => ApiError::Contended,
                    other => ApiError::Internal(other.to_string()),
                }));
            }
        }
    }
}
