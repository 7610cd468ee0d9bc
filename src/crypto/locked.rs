//! Key material in locked pages of its own.
//!
//! A `Locked` value lives in a heap allocation aligned to, and padded to, whole 4 KiB pages,
//! so no other value shares those pages. The pages are locked in memory (`mlock`, see
//! `platform::hardening`) before the key is written into them, and when the value is dropped
//! it is wiped first and the pages unlocked after. Because the key lives in its own boxed
//! allocation, the pages that hold it are locked whatever holds the `Locked` (an `Arc`, a
//! struct, a `Vec`): locking the holder is neither needed nor enough.
//!
//! What is outside our control: the transient copies ring and the compiler make on the stack
//! while a key is computed (HKDF output, a `LessSafeKey` before it is moved into place).
//!
//! [`LockedShares`] keeps a set of Shamir shards (Nexus's Keeper shards) the same way.

use std::ops::{Deref, DerefMut};

use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use zeroize::Zeroize;

use super::key::KEY_LEN;
use super::shamir::Share;

/// The alignment of every [`Locked`] allocation: the page size on the systems SPIKE runs on.
/// Where pages are larger, the pages are locked for the life of the process instead of
/// unlocked on drop (see `platform::hardening::lock_exclusive`).
const PAGE: usize = 4096;

/// The value padded to whole pages: the alignment rounds the size up to a multiple of it.
#[repr(C, align(4096))]
struct Pages<T>(T);

/// Secret values a [`Locked`] can hold.
pub(crate) trait Secret {
    /// A value holding nothing secret, to start from.
    fn blank() -> Self;
    /// Overwrites the secret in place.
    fn wipe(&mut self);
}

impl<const N: usize> Secret for [u8; N] {
    fn blank() -> Self {
        [0; N]
    }

    fn wipe(&mut self) {
        self.zeroize();
    }
}

impl<const N: usize, const M: usize> Secret for [[u8; N]; M] {
    fn blank() -> Self {
        [[0; N]; M]
    }

    fn wipe(&mut self) {
        self.zeroize();
    }
}

impl Secret for ring::hmac::Key {
    fn blank() -> Self {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[0; 32])
    }

    /// ring's key has no zeroize: overwrite it in place with the all-zero key's state.
    fn wipe(&mut self) {
        *self = ring::hmac::Key::blank();
        std::hint::black_box(&*self);
    }
}

impl Secret for LessSafeKey {
    fn blank() -> Self {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &[0; 32]).expect("AES-256-GCM takes a 32-byte key"),
        )
    }

    /// ring's key has no zeroize: overwrite it in place with the key schedule of the all-zero
    /// key (same variant, same layout), and keep the compiler from dropping the dead store.
    fn wipe(&mut self) {
        *self = LessSafeKey::blank();
        std::hint::black_box(&*self);
    }
}

/// A secret in locked pages of its own; wiped, then unlocked, on drop. No `Debug`.
pub(crate) struct Locked<T: Secret> {
    // Declared first so it is dropped (pages unlocked) before the box is freed.
    lock: crate::platform::hardening::PageLock,
    pages: Box<Pages<T>>,
}

impl<T: Secret> Locked<T> {
    /// A blank value in freshly locked pages; write the secret into it afterwards, so it is
    /// never in unlocked memory of ours. `what` names it if locking fails.
    pub(crate) fn new(what: &str) -> Locked<T> {
        let pages = Box::new(Pages(T::blank()));
        let lock = crate::platform::hardening::lock_exclusive(
            std::ptr::from_ref(&*pages).cast::<u8>(),
            std::mem::size_of::<Pages<T>>(),
            PAGE,
            what,
        );
        Locked { lock, pages }
    }

    /// True if the pages are locked (false when `mlock` failed).
    pub(crate) fn is_locked(&self) -> bool {
        self.lock.is_locked()
    }

    /// Address and length of the secret's bytes, for tests that inspect the pages.
    #[cfg(test)]
    pub(crate) fn span(&self) -> (usize, usize) {
        (
            std::ptr::from_ref(&self.pages.0) as usize,
            std::mem::size_of::<T>(),
        )
    }
}

impl<T: Secret> Deref for Locked<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.pages.0
    }
}

impl<T: Secret> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.pages.0
    }
}

impl<T: Secret> Drop for Locked<T> {
    fn drop(&mut self) {
        self.pages.0.wipe();
    }
}

/// Most shards a key is ever split into (Shamir indices are 1..=255).
const MAX_SHARES: usize = 255;

/// A set of Shamir shards kept for the life of a key (Nexus's Keeper shards), their values
/// in locked pages (8 KiB for up to 255 shards). Hands out [`Share`] copies for sending.
pub struct LockedShares {
    /// The public indices, in order.
    indices: Vec<u8>,
    /// `values[i]` belongs to `indices[i]`.
    values: Locked<[[u8; KEY_LEN]; MAX_SHARES]>,
}

impl LockedShares {
    /// Copies `shares` (at most 255) into locked memory, in order.
    pub fn new(shares: &[Share]) -> LockedShares {
        let mut values = Locked::<[[u8; KEY_LEN]; MAX_SHARES]>::new("Keeper shards");
        let shares = &shares[..shares.len().min(MAX_SHARES)];
        for (slot, share) in values.iter_mut().zip(shares) {
            slot.copy_from_slice(share.value());
        }
        LockedShares {
            indices: shares.iter().map(|s| s.index).collect(),
            values,
        }
    }

    /// The number of shards.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// A copy of the `i`-th shard (0-based position, not Shamir index).
    pub fn get(&self, i: usize) -> Option<Share> {
        let index = *self.indices.get(i)?;
        // The value was a valid shard when it came in, so this cannot fail.
        Share::new(index, self.values[i]).ok()
    }

    /// Copies of the shards, in order.
    pub fn iter(&self) -> impl Iterator<Item = Share> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// True if the values are in locked pages.
    pub fn is_locked(&self) -> bool {
        self.values.is_locked()
    }

    /// Address and length of the shard values, for tests that inspect the pages.
    #[cfg(test)]
    pub(crate) fn span(&self) -> (usize, usize) {
        let (addr, _) = self.values.span();
        (addr, self.len() * KEY_LEN)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use crate::platform::hardening::pages_locked;
    use ring::aead::{Aad, Nonce};

    #[test]
    fn pages_are_exclusive_and_locked() {
        let a = Locked::<[u8; 32]>::new("test key");
        let b = Locked::<[u8; 32]>::new("test key");
        let (pa, la) = a.span();
        let (pb, _) = b.span();
        assert_eq!(pa % PAGE, 0, "page-aligned");
        assert_eq!(
            std::mem::size_of::<Pages<[u8; 32]>>(),
            PAGE,
            "padded to a page"
        );
        assert!(pa.abs_diff(pb) >= PAGE, "no two secrets share a page");
        assert!(a.is_locked(), "mlock failed: is RLIMIT_MEMLOCK too low?");
        assert!(pages_locked(pa, la));
        assert!(pages_locked(pb, 32));
        assert_eq!(
            std::mem::size_of::<Pages<[[u8; 32]; MAX_SHARES]>>(),
            2 * PAGE
        );
    }

    #[test]
    fn wipe_overwrites_arrays_and_ring_keys() {
        let mut bytes = [0xa5u8; 32];
        bytes.wipe();
        assert_eq!(bytes, [0; 32]);
        let mut table = [[7u8; 32]; 3];
        table.wipe();
        assert_eq!(table, [[0; 32]; 3]);

        // A wiped ring key seals like the all-zero key, not like the key it held.
        let seal = |k: &LessSafeKey| {
            let mut buf = b"x".to_vec();
            k.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut buf,
            )
            .unwrap();
            buf
        };
        let mut k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9; 32]).unwrap());
        let before = seal(&k);
        k.wipe();
        assert_ne!(seal(&k), before);
        assert_eq!(seal(&k), seal(&LessSafeKey::blank()));
    }

    #[test]
    fn drop_wipes_before_freeing() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static WIPED: AtomicUsize = AtomicUsize::new(0);
        struct Probe(u8);
        impl Secret for Probe {
            fn blank() -> Self {
                Probe(0)
            }
            fn wipe(&mut self) {
                assert_eq!(self.0, 42, "wiped once, holding the secret");
                self.0 = 0;
                WIPED.fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut probe = Locked::<Probe>::new("probe");
        probe.0 = 42;
        drop(probe);
        assert_eq!(WIPED.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn locked_shares_round_trip() {
        let shares: Vec<Share> = (1..=3u8).map(|i| Share::new(i, [i; 32]).unwrap()).collect();
        let locked = LockedShares::new(&shares);
        assert_eq!(locked.len(), 3);
        assert!(!locked.is_empty());
        for (a, b) in locked.iter().zip(&shares) {
            assert!(a.ct_eq(b));
        }
        assert!(locked.get(1).unwrap().ct_eq(&shares[1]));
        assert!(locked.get(3).is_none());
        let (addr, len) = locked.span();
        assert_eq!(len, 96);
        assert!(locked.is_locked() && pages_locked(addr, len));
    }
}
