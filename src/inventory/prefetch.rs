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

/// Hints that the cache line holding `p` will be written soon: with `PREFETCHW` (where the
/// CPU has it) the line comes in exclusive, so the write that follows does not ask the
/// other core for it a second time (a line the other core wrote last would otherwise come
/// in shared first). Elsewhere, a plain `prefetch`.
#[inline(always)]
pub(crate) fn prefetch_write<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_prefetchw() {
            // SAFETY: PREFETCHW exists on this CPU (checked just above) and is a pure hint:
            // it cannot fault and changes no register, flag or memory contents, so any
            // address is fine. Declared `readonly` (it may be taken to read memory) rather
            // than `nomem`, which only keeps the compiler from moving it past earlier stores.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) p,
                    options(nostack, readonly, preserves_flags)
                );
            }
            return;
        }
    }
    prefetch(p);
}

/// Whether the CPU has `PREFETCHW` (CPUID 8000_0001h, ECX bit 8), asked once.
#[cfg(target_arch = "x86_64")]
fn has_prefetchw() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0 = not asked yet, 1 = no, 2 = yes.
    static HAS: AtomicU8 = AtomicU8::new(0);
    match HAS.load(Ordering::Relaxed) {
        2 => true,
        1 => false,
        _ => {
            let ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
            let yes =
                ext >= 0x8000_0001 && (std::arch::x86_64::__cpuid(0x8000_0001).ecx >> 8) & 1 == 1;
            HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}
