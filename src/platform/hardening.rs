//! Process hardening for the processes that hold key material (Nexus, Keeper).
//!
//! - The process is marked non-dumpable (`PR_SET_DUMPABLE=0`: no core dump, no ptrace attach
//!   by other users) and its core size limit is set to 0, so a crash never writes the root key
//!   or a shard to disk.
//! - The pages holding key material are locked in memory (`mlock`) so they are never swapped
//!   out. Only those pages: locking the whole process (`mlockall` with `MCL_FUTURE`, as SPIKE
//!   does) makes every later allocation fail once `RLIMIT_MEMLOCK` is reached, which would
//!   turn a busy day into an outage.
//! - Nexus's keys each live in pages of their own (`crypto::locked`): [`lock_exclusive`] locks
//!   them before the key is written and unlocks them after it is wiped. [`lock`] locks a value
//!   for the life of the process (the Keeper's shard, inline in its state).
//!
//! When `mlock` fails (`RLIMIT_MEMLOCK` too low and no `CAP_IPC_LOCK`), the process goes on
//! with the key in ordinary, swappable memory: refusing to start would turn a small limit
//! into an outage, and the systemd units add `MemorySwapMax=0` and `LimitCORE=0` on top. The
//! first failure in a process is logged as a warning naming the limit to raise; later ones at
//! debug level only, so a low limit does not flood the log. [`lock_failures`] counts them.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Non-dumpable, no core files. Call once at start.
pub fn harden_process() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the process non-dumpable");
    }
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!(error = %e, "cannot disable core dumps");
    }
}

/// Locks the memory of `value` (which must stay where it is, e.g. inside an `Arc`, for the
/// rest of the process) so it is never swapped out.
pub fn lock<T>(value: &T, what: &str) {
    lock_range(
        std::ptr::from_ref(value).cast::<u8>(),
        std::mem::size_of::<T>(),
        what,
    );
}

/// Locks the elements of `slice` (a buffer that is never reallocated).
pub fn lock_slice<T>(slice: &[T], what: &str) {
    lock_range(
        slice.as_ptr().cast::<u8>(),
        std::mem::size_of_val(slice),
        what,
    );
}

fn lock_range(ptr: *const u8, len: usize, what: &str) {
    if len == 0 {
        return;
    }
    // The memory stays locked for the life of the process: key material is loaded once and
    // lives until exit, where it is zeroized by its own types' Drop. (Unlocking could unlock
    // a neighbour sharing the page.)
    if let Some(guard) = lock_or_report(ptr, len, what) {
        std::mem::forget(guard);
    }
}

/// How many times locking key material failed in this process.
static LOCK_FAILURES: AtomicUsize = AtomicUsize::new(0);

/// The number of failed attempts to lock key material so far (see the module docs).
pub fn lock_failures() -> usize {
    LOCK_FAILURES.load(Ordering::Relaxed)
}

fn lock_or_report(ptr: *const u8, len: usize, what: &str) -> Option<region::LockGuard> {
    match region::lock(ptr, len) {
        Ok(guard) => Some(guard),
        Err(e) => {
            if LOCK_FAILURES.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    error = %e,
                    what,
                    "cannot lock key material in memory, so it could be swapped out: raise \
                     RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=) or grant CAP_IPC_LOCK; later \
                     failures are logged at debug level"
                );
            } else {
                tracing::debug!(error = %e, what, "cannot lock key material in memory");
            }
            None
        }
    }
}

/// A lock on pages that one allocation owns alone, released when dropped.
#[must_use = "the pages are unlocked when the lock is dropped"]
pub struct PageLock(Lock);

enum Lock {
    /// Locked; unlocked on drop.
    Held { _guard: region::LockGuard },
    /// Locked for the life of the process: the pages may be shared.
    Permanent,
    /// Locking failed.
    Failed,
}

impl PageLock {
    /// True if the pages were locked.
    pub fn is_locked(&self) -> bool {
        !matches!(self.0, Lock::Failed)
    }
}

impl std::fmt::Debug for PageLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Lock::Held { .. } => "PageLock(held)",
            Lock::Permanent => "PageLock(permanent)",
            Lock::Failed => "PageLock(failed)",
        })
    }
}

/// Locks `[ptr, ptr + len)`, which must be whole pages of `align` bytes that one allocation
/// owns alone (aligned to `align` and a multiple of it long), so unlocking them when the
/// returned lock is dropped cannot unlock anyone else's memory. If the system's pages are
/// larger than `align`, the allocation shares its page with others: it is locked but never
/// unlocked. A failure is reported as the module docs say and gives a `PageLock` that holds
/// nothing.
pub fn lock_exclusive(ptr: *const u8, len: usize, align: usize, what: &str) -> PageLock {
    if len == 0 {
        return PageLock(Lock::Failed);
    }
    PageLock(match lock_or_report(ptr, len, what) {
        None => Lock::Failed,
        Some(guard) if region::page::size() > align => {
            std::mem::forget(guard);
            Lock::Permanent
        }
        Some(guard) => Lock::Held { _guard: guard },
    })
}

/// True if every page of `[addr, addr + len)` is in a locked mapping (`VmFlags` has `lo` in
/// `/proc/self/smaps`). For tests of the locking above.
#[cfg(test)]
pub(crate) fn pages_locked(addr: usize, len: usize) -> bool {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    // (start, end, locked) of every mapping.
    let mut maps: Vec<(usize, usize, bool)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            maps.push((start, end, false));
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && let Some(last) = maps.last_mut()
        {
            last.2 = flags.split_whitespace().any(|f| f == "lo");
        }
    }
    let page = region::page::size();
    let first = addr - addr % page;
    let last = addr + len.max(1) - 1;
    (first..=last).step_by(page).all(|p| {
        maps.iter()
            .any(|&(start, end, locked)| start <= p && p < end && locked)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    #[test]
    fn lock_exclusive_locks_and_unlocks_the_pages() {
        let page = Box::new(Page([1; 4096]));
        let addr = std::ptr::from_ref(&*page) as usize;
        assert!(!pages_locked(addr, 4096), "a fresh page is not locked");
        let lock = lock_exclusive(std::ptr::from_ref(&*page).cast(), 4096, 4096, "test page");
        assert!(lock.is_locked(), "mlock failed: is RLIMIT_MEMLOCK too low?");
        assert!(pages_locked(addr, 4096));
        drop(lock);
        if region::page::size() <= 4096 {
            assert!(
                !pages_locked(addr, 4096),
                "unlocked when the lock is dropped"
            );
        }
        assert_eq!(page.0[0], 1);
    }
}
