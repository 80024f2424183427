//! A cache prefetch hint for the reserve hot path: asks the CPU to start loading a line the
//! next few hundred instructions will need, so its miss overlaps other work instead of
//! stalling it. Owns nothing; must stay a hint: it never reads, writes or faults, and a
//! wrong or stale address only wastes a memory fetch.
//!
//! Why it exists (measured, docs/inventory.md "Benchmarks"): over a large idempotency
//! window the index slot of a new key and the ring's next slot are usually out of cache;
//! `perf` put a third of a reserve-release cycle on those two misses.

/// Hints that the cache line holding `p` will be used soon.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is an SSE instruction (every x86_64 CPU has SSE) and a pure hint:
    // it does not dereference `p` in the language's sense, cannot fault, and has no effect
    // on memory contents, so any address, valid or not, is fine.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
