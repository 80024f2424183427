//! `Counted<T>`: the reference-counted allocation behind a reservation handle (`ResHandle`),
//! shared by the shard's map entry and the callers. It owns the count and the free, and
//! nothing else; it must not grow a weak count or any way to reach the data other than
//! through a handle, because the two shortcuts below rely on a handle being the only way in.
//!
//! What `triomphe::Arc` (which this replaced in the sixteenth round) does, plus two things
//! its API cannot do, each one locked instruction fewer per reservation:
//! - `pair` makes the two handles a reserve needs (the map's and the caller's) with the
//!   count stored as 2 before anyone else can see it, not stored as 1 and then incremented;
//! - the last handle frees without decrementing: a handle that reads the count as 1
//!   (acquire) is the only one left, and since it is being dropped nobody can clone it, so
//!   nothing can change the count any more.

use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicUsize, Ordering};

/// Past this many handles a clone aborts the process (as `std::sync::Arc` does) rather
/// than let the count wrap and free an allocation still in use. No caller comes near it.
const MAX_COUNT: usize = isize::MAX as usize;

struct Inner<T> {
    count: AtomicUsize,
    data: T,
}

/// A handle to a shared, immutable `T` (interior mutability inside `T` is the owner's
/// business, as with `Arc`).
pub(crate) struct Counted<T> {
    ptr: NonNull<Inner<T>>,
    /// Owns an `Inner<T>` for the drop checker.
    _owns: PhantomData<Inner<T>>,
}

// SAFETY: as for `Arc<T>`: a handle gives shared access to `T` from any thread (so `T:
// Sync`) and the last handle, on whatever thread, drops `T` (so `T: Send`).
unsafe impl<T: Send + Sync> Send for Counted<T> {}
// SAFETY: as above; `&Counted<T>` only gives `&T` and clones.
unsafe impl<T: Send + Sync> Sync for Counted<T> {}

impl<T> Counted<T> {
    #[inline(always)]
    fn with_count(data: T, count: usize) -> Counted<T> {
        let inner = Box::new(Inner {
            count: AtomicUsize::new(count),
            data,
        });
        Counted {
            ptr: NonNull::from(Box::leak(inner)),
            _owns: PhantomData,
        }
    }

    /// One handle to `data`.
    pub(crate) fn new(data: T) -> Counted<T> {
        Counted::with_count(data, 1)
    }

    /// Two handles to `data`, with no atomic read-modify-write: the count is born 2.
    #[inline(always)]
    pub(crate) fn pair(data: T) -> (Counted<T>, Counted<T>) {
        let first = Counted::with_count(data, 2);
        let second = Counted {
            ptr: first.ptr,
            _owns: PhantomData,
        };
        (first, second)
    }

    #[inline(always)]
    fn inner(&self) -> &Inner<T> {
        // SAFETY: the allocation lives while any handle does (it is freed only by the last
        // handle's drop), and this handle is alive for the borrow.
        unsafe { self.ptr.as_ref() }
    }

    /// How many handles exist (for tests; another thread may change it at once).
    #[cfg(test)]
    pub(crate) fn count(this: &Counted<T>) -> usize {
        this.inner().count.load(Ordering::Acquire)
    }

    /// Frees the allocation: called by the last handle only.
    #[inline(never)]
    fn free(&mut self) {
        // SAFETY: the caller is the last handle, the pointer came from `Box::leak` in
        // `with_count`, and no handle is left to use it.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

impl<T> Clone for Counted<T> {
    #[inline(always)]
    fn clone(&self) -> Counted<T> {
        // Relaxed, as in `Arc`: a new handle is made from an existing one, which keeps the
        // allocation alive; no other memory needs ordering here.
        let old = self.inner().count.fetch_add(1, Ordering::Relaxed);
        if old > MAX_COUNT {
            std::process::abort();
        }
        Counted {
            ptr: self.ptr,
            _owns: PhantomData,
        }
    }
}

impl<T> Deref for Counted<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.inner().data
    }
}

impl<T> Drop for Counted<T> {
    #[inline(always)]
    fn drop(&mut self) {
        let count = &self.inner().count;
        // The last handle: the acquire load sees every other handle's release decrement, so
        // their uses of the data happened before the free below; no new handle can appear
        // (handles come only from clones of handles, and this one is being dropped).
        if count.load(Ordering::Acquire) != 1 {
            if count.fetch_sub(1, Ordering::Release) != 1 {
                return;
            }
            // Another handle's drop made this the last one between the load and the
            // decrement: order its uses before the free, as `Arc` does.
            fence(Ordering::Acquire);
        }
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::Counted;

    /// Counts its drops.
    struct Probe(Arc<AtomicUsize>);

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pair_counts_two_and_the_last_drop_frees_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (a, b) = Counted::pair(Probe(drops.clone()));
        assert_eq!(Counted::count(&a), 2);
        let c = b.clone();
        assert_eq!(Counted::count(&a), 3);
        drop(b);
        drop(a);
        assert_eq!(drops.load(Ordering::SeqCst), 0, "a handle is still alive");
        assert_eq!(Counted::count(&c), 1);
        drop(c);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "freed exactly once");
        let one = Counted::new(Probe(drops.clone()));
        assert_eq!(Counted::count(&one), 1);
        drop(one);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }

    /// Two threads clone and drop handles of the same allocation in every order the
    /// scheduler gives: each allocation is dropped exactly once, after its last handle, and
    /// its data is intact whenever a handle reads it (a premature free would corrupt it,
    /// and a sanitizer or Miri would report the access).
    #[test]
    fn concurrent_clones_and_drops_free_each_allocation_once() {
        const ROUNDS: usize = 500;
        let drops = Arc::new(AtomicUsize::new(0));
        for round in 0..ROUNDS {
            let (a, b) = Counted::pair((round, Probe(drops.clone())));
            let threads: Vec<_> = [a, b]
                .into_iter()
                .map(|h| {
                    std::thread::spawn(move || {
                        let mut held = vec![h];
                        for _ in 0..8 {
                            let next = held.last().cloned();
                            held.extend(next);
                        }
                        assert!(held.iter().all(|h| h.0 == round), "data intact");
                        // Dropped in an order unlike the clones' (first, then last).
                        while !held.is_empty() {
                            let h = held.swap_remove(0);
                            assert_eq!(h.0, round, "data intact until the handle goes");
                        }
                        true
                    })
                })
                .collect();
            for t in threads {
                assert_eq!(t.join().ok(), Some(true));
            }
            assert_eq!(
                drops.load(Ordering::SeqCst),
                round + 1,
                "freed once, at the end"
            );
        }
    }
}
