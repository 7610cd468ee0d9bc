//! Process hardening for the processes that hold key material (Nexus, Keeper).
//!
//! - The process is marked non-dumpable (`PR_SET_DUMPABLE=0`: no core dump, no ptrace attach
//!   by other users) and its core size limit is set to 0, so a crash never writes the root key
//!   or a shard to disk.
//! - The pages holding key material are locked in memory (`mlock`) so they are never swapped
//!   out. Only those pages: locking the whole process (`mlockall` with `MCL_FUTURE`, as SPIKE
//!   does) makes every later allocation fail once `RLIMIT_MEMLOCK` is reached, which would
//!   turn a busy day into an outage.
//!
//! Failures are logged and not fatal: an unprivileged test run may not lock memory, and the
//! systemd units add `MemorySwapMax=0` and `LimitCORE=0` on top.

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
    match region::lock(ptr, len) {
        // The memory stays locked for the life of the process: key material is loaded once
        // and lives until exit, where it is zeroized by its own types' Drop.
        Ok(guard) => std::mem::forget(guard),
        Err(e) => tracing::warn!(
            error = %e,
            what,
            "cannot lock key material in memory (raise LimitMEMLOCK); it could be swapped out"
        ),
    }
}
