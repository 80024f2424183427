//! A shard's "is this idempotency key new?" filter: a small, cache-resident Bloom filter in
//! front of the idempotency index (`idem.rs`), so the reserve of a new key (nearly every
//! reserve) answers "no record" without touching the index, whose line is usually a DRAM
//! access over a large window.
//!
//! Owns only bits: it may say "maybe" for a key it never saw (3-4 % per generation at 8
//! bits per record; with up to `MAX_GENS` generations probed, 3-10 % of new keys in the
//! unit test), and it must never say "no" for a key whose record is still in the ring. Records leave the ring oldest first, and a Bloom filter cannot forget a key, so the
//! filter is cut into *generations* by ring sequence number: a generation holds the keys of
//! the records pushed while it was the newest, and is dropped whole once every record of it
//! has left the ring. A removed or replaced record's bits stay until then (a "maybe", never
//! a wrong answer). Each key sets 3 bits of one 64-bit word (a blocked filter: one load per
//! generation). No allocation except when a generation opens (every few thousand records
//! of a busy shard) and no I/O.

use std::sync::atomic::{AtomicU32, Ordering};

/// Filter bits per record a generation is sized for (rounded up to a power of two words).
const BITS_PER_RECORD: usize = 8;
/// Records of the smallest generation.
const MIN_GEN: usize = 64;
/// Generations kept before they are merged into one (so a lookup loads at most this many
/// words). A generation holds at least half as many records as the ring held when it
/// opened, so while the ring grows generations pile up; a merge re-adds the live records
/// (a sequential read of the ring) into one generation twice their count.
pub(crate) const MAX_GENS: usize = 4;

/// The word and bit mask of a key.
#[derive(Clone, Copy)]
struct Probe {
    hash: u64,
    bits: u64,
}

impl Probe {
    fn of(key: u64) -> Probe {
        // The production key is already a keyed hash; tests use structured keys: mix.
        let h = (key ^ (key >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let bits = (1u64 << (h >> 58)) | (1u64 << ((h >> 52) & 63)) | (1u64 << ((h >> 46) & 63));
        Probe { hash: h, bits }
    }

    /// The key's word in a generation of `mask + 1` words.
    fn slot(self, mask: usize) -> usize {
        // Masked, so the cast keeps every bit that is used.
        (self.hash as usize) & mask
    }
}

struct Gen {
    /// Sequence number of the first record pushed while this generation was the newest.
    start: u64,
    words: Box<[u64]>,
}

impl Gen {
    /// A generation for `records` records (at least `MIN_GEN`), and how many that is.
    fn new(start: u64, records: usize) -> (Gen, usize) {
        let records = records.max(MIN_GEN);
        let words = (records * BITS_PER_RECORD).div_ceil(64).next_power_of_two();
        let g = Gen {
            start,
            words: vec![0u64; words].into_boxed_slice(),
        };
        (g, records)
    }

    fn slot(&self, p: Probe) -> usize {
        // The word count is a power of two.
        p.slot(self.words.len() - 1)
    }

    fn has(&self, p: Probe) -> bool {
        self.words
            .get(self.slot(p))
            .is_some_and(|w| w & p.bits == p.bits)
    }

    fn add(&mut self, p: Probe) {
        let i = self.slot(p);
        if let Some(w) = self.words.get_mut(i) {
            *w |= p.bits;
        }
    }
}

/// Source of layout stamps: every change to any filter's generations takes the next one.
static LAYOUTS: AtomicU32 = AtomicU32::new(1);

/// The generations, oldest first; the last one takes new keys.
#[derive(Default)]
#[repr(C)]
pub(crate) struct Filter {
    /// Records the newest generation may still take before a new one opens (kept here,
    /// beside the shard's other fields, not in the generations' buffer: one line fewer
    /// written per reserve).
    room: usize,
    /// Changes whenever the generations do (0: none yet), so `idem::FilterHint` can tell
    /// in one compare whether its copy of `layout` is current. Stamps are process-wide, so
    /// a table made anew (a restore) does not repeat an old one's; after 2^32 changes they
    /// wrap, and a hint could then miss one change until the next (it is only a prefetch
    /// address).
    stamp: u32,
    gens: Vec<Gen>,
}

impl Filter {
    /// False only if no record still in the ring has `key`.
    pub(crate) fn may_contain(&self, key: u64) -> bool {
        let p = Probe::of(key);
        self.gens.iter().any(|g| g.has(p))
    }

    /// Whether the newest generation is full (or there is none): the caller then opens one
    /// with `open`, or, when `MAX_GENS` are live, `clear`s and refills it from the ring.
    pub(crate) fn full(&self) -> bool {
        self.room == 0
    }

    pub(crate) fn gens(&self) -> usize {
        self.gens.len()
    }

    /// Opens a new generation for records from sequence number `seq` on, sized for
    /// `records` of them.
    pub(crate) fn open(&mut self, seq: u64, records: usize) {
        let (g, room) = Gen::new(seq, records);
        self.gens.push(g);
        self.room = room;
        self.restamp();
    }

    fn restamp(&mut self) {
        self.stamp = LAYOUTS.fetch_add(1, Ordering::Relaxed);
    }

    /// The layout's stamp (see `stamp`).
    pub(crate) fn stamp(&self) -> u32 {
        self.stamp
    }

    /// Adds the key of the record with the newest sequence number so far.
    pub(crate) fn add(&mut self, key: u64) {
        if let Some(g) = self.gens.last_mut() {
            g.add(Probe::of(key));
            self.room = self.room.saturating_sub(1);
        }
    }

    /// Drops the generations all of whose records have left the ring (whose successor
    /// starts at or below `base`, the ring's oldest sequence number).
    pub(crate) fn retire(&mut self, base: u64) {
        // At most `MAX_GENS`: shifting the rest down is a few moves, done once a generation.
        while self.gens.get(1).is_some_and(|g| g.start <= base) {
            self.gens.remove(0);
            self.restamp();
        }
    }

    /// Forgets everything: the caller adds the live records again (into a generation it
    /// opens at the ring's oldest sequence number; that `open` takes the new stamp).
    pub(crate) fn clear(&mut self) {
        self.gens.clear();
        self.room = 0;
    }

    /// Each generation's words (address, mask; (0, 0) past the last), for `FilterHint`.
    pub(crate) fn layout(&self) -> [(usize, usize); MAX_GENS] {
        let mut out = [(0, 0); MAX_GENS];
        for (o, g) in out.iter_mut().zip(&self.gens) {
            *o = (g.words.as_ptr() as usize, g.words.len() - 1);
        }
        out
    }

    /// Words held in all generations, for tests.
    #[cfg(test)]
    pub(crate) fn words(&self) -> usize {
        self.gens.iter().map(|g| g.words.len()).sum()
    }
}

/// The word of `key` in a generation laid out as `layout` says (`hash & mask`).
pub(crate) fn word_of(addr: usize, mask: usize, key: u64) -> usize {
    addr.wrapping_add(Probe::of(key).slot(mask).wrapping_mul(8))
}
