//! A shard's lock: a one-byte test-and-set lock whose release is a plain store.
//!
//! It owns mutual exclusion for one shard and nothing else; it must not be held across an
//! `.await` or any blocking call (no code of the core does either). Why not `parking_lot`:
//! its release is a compare-and-swap (it must learn whether a waiter parked), and on x86 a
//! locked instruction waits for every store the critical section made to reach the cache,
//! most of them to lines the other core wrote last. A release by plain store lets the core
//! go on while those stores drain. The price is that a waiter never sleeps on a futex: it
//! spins a few microseconds, trying less and less often, then sleeps for short, growing
//! intervals (bounded), re-trying the lock each time. Nothing has to wake it, so no wake-up
//! can be lost, and a holder preempted by the OS costs the waiters short sleeps, not a busy
//! core. It does not yield: with as many busy threads as cores a yield returns at once, and
//! a waiter that yielded instead of sleeping kept taking the lock's lines from the holder
//! (one hot SKU on two threads ran at a third of the speed, docs/inventory.md).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use thread_local::ThreadLocal;

/// One thread's count of waits, alone on its lines: only that thread writes it.
#[derive(Default)]
#[repr(align(128))]
struct WaitCount(AtomicU64);

/// Times any shard lock of this process was found taken (its taker had to wait), for the
/// operators' metric `livegate_inventory_lock_waits_total`: per thread, so a wait does not
/// also take a process-wide counter's line from the other core (one more cross-core
/// transfer per wait, when this was one shared atomic, until the sixteenth round). A
/// thread's count outlives the thread (`ThreadLocal` keeps it for the next thread of the
/// same id), so the sum never goes back.
static WAITS: ThreadLocal<WaitCount> = ThreadLocal::new();

/// How many times a shard lock was found taken since the process started (all
/// `Inventory`s of the process together).
pub(crate) fn waits() -> u64 {
    WAITS
        .iter()
        .map(|c| c.0.load(Ordering::Relaxed))
        .fold(0, u64::wrapping_add)
}

/// Counts one wait of the calling thread: a load and a store (the thread is its count's
/// only writer), no locked instruction.
fn count_wait() {
    let c = &WAITS.get_or_default().0;
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Tries by spinning before the first sleep.
const SPINS: u32 = 12;
/// The pause between two spinning tries doubles this many times (from 2 spin-loop hints to
/// 64): about 450 hints in all before the first sleep, 7-9 µs here (measured: 15-19 ns a
/// hint), the first tries within a microsecond.
const BACKOFF_DOUBLINGS: u32 = 6;
/// Longest sleep between two tries once spinning did not help.
const MAX_SLEEP: Duration = Duration::from_micros(200);

/// The raw lock (`lock_api::RawMutex`); `ShardMutex<T>` is the mutex built on it.
pub(crate) struct RawShardLock {
    locked: AtomicU8,
}

impl RawShardLock {
    #[cold]
    #[inline(never)]
    fn lock_slow(&self) {
        count_wait();
        let mut tries = 0u32;
        let mut sleep = Duration::from_micros(1);
        loop {
            // Test before test-and-set: waiting reads a shared line, it does not take it
            // from the holder on every try.
            if self.locked.load(Ordering::Relaxed) == 0 && self.try_take() {
                return;
            }
            tries = tries.saturating_add(1);
            if tries < SPINS {
                // 2, 4, 8 ... 64 (1 << BACKOFF_DOUBLINGS) spin-loop hints between two
                // tries: every try asks the holder's core for the lock's line.
                for _ in 0..1u32 << tries.min(BACKOFF_DOUBLINGS) {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(MAX_SLEEP);
            }
        }
    }

    #[inline]
    fn try_take(&self) -> bool {
        self.locked
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
}

// SAFETY: `lock` and `try_lock` return only after this thread changed `locked` from 0 to 1
// with an acquire compare-and-swap, so at most one holder exists; `unlock` (called only by
// the holder, as lock_api requires) stores 0 with release ordering, so the next holder's
// acquire sees every write the critical section made.
unsafe impl lock_api::RawMutex for RawShardLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawShardLock = RawShardLock {
        locked: AtomicU8::new(0),
    };
    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        if !self.try_take() {
            self.lock_slow();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.locked.store(0, Ordering::Release);
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed) != 0
    }
}

/// A mutex over a shard's data on `RawShardLock`.
pub(crate) type ShardMutex<T> = lock_api::Mutex<RawShardLock, T>;
/// Its guard.
pub(crate) type ShardGuard<'a, T> = lock_api::MutexGuard<'a, RawShardLock, T>;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::{waits, ShardMutex};

    /// Holders never overlap (each checks, inside, that nobody else is), and no increment
    /// made under the lock is lost, with more threads than cores so holders get preempted
    /// and waiters reach every phase of the slow path.
    #[test]
    fn holders_never_overlap_and_lose_no_update() {
        const THREADS: usize = 4;
        const ROUNDS: u64 = 20_000;
        let m = Arc::new(ShardMutex::new(0u64));
        let inside = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (m, inside) = (Arc::clone(&m), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        let mut g = m.lock();
                        assert!(!inside.swap(true, Ordering::Relaxed), "two holders at once");
                        *g += 1;
                        inside.store(false, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok(), "a locking thread panicked");
        }
        assert_eq!(*m.lock(), THREADS as u64 * ROUNDS);
    }

    /// A waiter that runs out of spins goes to sleep, is woken by nobody, and
    /// still takes the lock once it is free, seeing what the holder wrote; the wait is
    /// counted; `try_lock` fails while the lock is held.
    #[test]
    fn a_sleeping_waiter_takes_the_lock_once_it_is_free() {
        let m = Arc::new(ShardMutex::new(0u64));
        let before = waits();
        let mut g = m.lock();
        assert!(m.try_lock().is_none(), "try_lock while held");
        let waiter = {
            let m = Arc::clone(&m);
            std::thread::spawn(move || *m.lock())
        };
        // Long enough for the waiter to pass its spins (under 10 µs) and sleep.
        std::thread::sleep(Duration::from_millis(50));
        *g = 7;
        drop(g);
        assert_eq!(
            waiter.join().ok(),
            Some(7),
            "the waiter saw the holder's write"
        );
        assert!(waits() > before, "the wait was counted");
        assert!(m.try_lock().is_some(), "try_lock once free");
    }
}
