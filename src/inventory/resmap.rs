//! A shard's live reservations by id: an open-addressing table with linear probing over
//! 32-byte slots (the raw id and its `Entry`), at most half full, with backward-shift
//! deletion, so a lookup stops at the first empty slot and no tombstones pile up.
//!
//! It owns nothing but the slots; it must not know what an `Entry` means (the shard keeps
//! the counts, the expiry index and the states) and must not allocate on a lookup or a
//! removal (only an insert that doubles the table does). It replaced a
//! `FxHashMap<u64, Entry>` (thirteenth round): a reserve, a release's two lookups and its
//! removal went through hashbrown's group probe and growth checks, ~160 instructions a
//! cycle in callgrind; a slot here is found with one multiply, a shift and a compare.
//!
//! Ids are made by the shard's counter, not chosen by clients (a client can only look
//! one up), so the table needs no keyed hash: Fibonacci hashing (the id times 2^64/phi,
//! top bits) spreads consecutive counters over the table, so short- and long-lived
//! reservations mixed keep the probe runs of a random table (about 1.5 slots per lookup at
//! half full) instead of the long runs a dense block of consecutive ids would make.

use super::prefetch::prefetch_write;
use super::shard::Entry;

/// 2^64 / phi, odd: multiplying by it and keeping the top bits is Fibonacci hashing.
const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

/// Smallest table (slots).
const MIN_SLOTS: usize = 16;

struct Slot {
    id: u64,
    /// `None` = empty (an id alone cannot say it: every `u64` may be a restored id).
    entry: Option<Entry>,
}

impl Slot {
    const EMPTY: Slot = Slot { id: 0, entry: None };
}

/// For backward-shift deletion in a linear-probing table (here and the idempotency index,
/// `idem.rs`): whether the entry at `at`, whose probe starts at `home`, must stay where it
/// is after `hole` was emptied, i.e. its home lies cyclically in `(hole, at]` (moving it
/// back would put it before its home, where no probe for it starts).
#[inline]
pub(crate) fn stays_in_run(hole: usize, home: usize, at: usize) -> bool {
    if hole <= at {
        hole < home && home <= at
    } else {
        hole < home || home <= at
    }
}

/// Live reservations by raw id (`ResId::0`).
pub(crate) struct ResMap {
    slots: Box<[Slot]>,
    len: usize,
    /// `64 - log2(slots.len())`: the home slot of an id is the top bits of `id * PHI`.
    shift: u32,
}

impl Default for ResMap {
    fn default() -> ResMap {
        ResMap::with_slots(MIN_SLOTS)
    }
}

impl ResMap {
    fn with_slots(n: usize) -> ResMap {
        ResMap {
            slots: (0..n).map(|_| Slot::EMPTY).collect(),
            len: 0,
            shift: 64 - n.trailing_zeros(),
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot an id's probe starts at.
    #[inline]
    fn home(&self, id: u64) -> usize {
        // The top `log2(len)` bits of the product: always < the slot count.
        (id.wrapping_mul(PHI) >> self.shift) as usize
    }

    /// Where `id` is, if it is here.
    #[inline]
    fn find(&self, id: u64) -> Option<usize> {
        let mask = self.mask();
        let mut at = self.home(id);
        loop {
            let slot = self.slots.get(at)?;
            slot.entry.as_ref()?;
            if slot.id == id {
                return Some(at);
            }
            at = (at + 1) & mask;
        }
    }

    /// Hints that the home slot of `id` will be written soon (an insert of `id` writes it,
    /// or probes on from it).
    #[inline]
    pub(crate) fn prefetch_home(&self, id: u64) {
        prefetch_write(self.slots.as_ptr().wrapping_add(self.home(id)));
    }

    /// `get_mut` for an entry whose removal will follow (a release, checkout or expiry
    /// beginning, `Shard::begin`):
    /// also asks for the slot after it, which the removal reads (is the run over, or does an
    /// entry move back?). That slot is on the next cache line for every other slot, often
    /// last written by another core (fifteenth round, docs/inventory.md); asked for now, it
    /// has arrived when the removal comes.
    #[inline]
    pub(crate) fn get_mut_to_remove(&mut self, id: &u64) -> Option<&mut Entry> {
        let at = self.find(*id)?;
        let next = (at + 1) & self.mask();
        prefetch_write(self.slots.as_ptr().wrapping_add(next));
        self.slots.get_mut(at)?.entry.as_mut()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains_key(&self, id: &u64) -> bool {
        self.find(*id).is_some()
    }

    #[inline]
    pub(crate) fn get(&self, id: &u64) -> Option<&Entry> {
        let at = self.find(*id)?;
        self.slots.get(at)?.entry.as_ref()
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: &u64) -> Option<&mut Entry> {
        let at = self.find(*id)?;
        self.slots.get_mut(at)?.entry.as_mut()
    }

    /// Inserts `e` under `id`, returning the entry it replaces, if any. Always inlined: with
    /// the handle on `Counted` the build left it out of line otherwise (+34 instructions a
    /// reserve-release cycle, sixteenth round).
    #[inline(always)]
    pub(crate) fn insert(&mut self, id: u64, e: Entry) -> Option<Entry> {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut at = self.home(id);
        // At most half full: the probe meets an empty slot.
        while let Some(slot) = self.slots.get_mut(at) {
            match slot.entry {
                None => {
                    slot.id = id;
                    slot.entry = Some(e);
                    self.len += 1;
                    return None;
                }
                Some(_) if slot.id == id => return slot.entry.replace(e),
                Some(_) => at = (at + 1) & mask,
            }
        }
        None
    }

    /// Doubles the table and puts every entry back.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let old = std::mem::replace(self, ResMap::with_slots(self.slots.len() * 2));
        for s in old.slots.into_vec() {
            if let Some(e) = s.entry {
                self.insert(s.id, e);
            }
        }
    }

    /// Removes `id`, returning its entry. The entries after it in its probe run that may
    /// move back (whose home is not between the hole and themselves) are shifted into the
    /// hole, so every entry stays reachable from its home without tombstones.
    #[inline]
    pub(crate) fn remove(&mut self, id: &u64) -> Option<Entry> {
        let mut hole = self.find(*id)?;
        let out = self.slots.get_mut(hole)?.entry.take();
        self.len -= 1;
        let mask = self.mask();
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let Some(next) = self.slots.get(at) else {
                break;
            };
            if next.entry.is_none() {
                break;
            }
            if stays_in_run(hole, self.home(next.id), at) {
                continue;
            }
            let moved = self.slots.get_mut(at).map(|s| (s.id, s.entry.take()));
            if let (Some((mid, me)), Some(h)) = (moved, self.slots.get_mut(hole)) {
                h.id = mid;
                h.entry = me;
            }
            hole = at;
        }
        out
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().filter_map(|s| s.entry.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::inventory::types::{ResHandle, ResId, Reservation, Text};

    /// An entry whose `product` field carries `v`, to tell entries apart.
    fn entry(id: u64, v: u32) -> Entry {
        let res = Reservation {
            id: ResId(id),
            user: Text::from("u"),
            req: Text::from("r"),
            room: Text::from("room"),
            referrer: None,
            sku: Text::from("s"),
            qty: 1,
            price_cents: 1,
            expires_at: 0,
        };
        Entry {
            res: ResHandle::new(res, 0, 0, 0),
            product: v,
            wheel: None,
        }
    }

    /// Random inserts, replacements, lookups and removals against `HashMap`, over id sets
    /// that collide in different ways (a small range, consecutive counters of one shard of
    /// 64, multiples of a large power of two, anything): the same answers throughout, and
    /// after each step every id the model holds is found and the table is at most half full.
    /// A slot is 32 bytes (the id and an `Entry`, whose `Option` costs nothing: the handle
    /// is never null), so two share a cache line and none straddles two.
    #[test]
    fn a_slot_is_half_a_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[test]
    fn res_map_matches_a_hash_map() {
        let mut next = crate::inventory::tests::xorshift(0x2545_f491_4f6c_dd1d_u64);
        let pools: [fn(u64) -> u64; 4] = [
            |r| r % 40,
            |r| (1 << 40) | ((r % 300) * 64 + 5),
            |r| (r % 50) << 32,
            |r| r,
        ];
        for pool in pools {
            let mut map = ResMap::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut ids: Vec<u64> = Vec::new();
            for step in 0..20_000u32 {
                let r = next();
                let id = if r % 3 == 0 && !ids.is_empty() {
                    ids[(r as usize / 3) % ids.len()]
                } else {
                    pool(next())
                };
                match r % 7 {
                    0..=2 => {
                        let old = map.insert(id, entry(id, step)).map(|e| e.product);
                        assert_eq!(old, model.insert(id, step), "insert {id}");
                        ids.push(id);
                    }
                    3 | 4 => {
                        let old = map.remove(&id).map(|e| e.product);
                        assert_eq!(old, model.remove(&id), "remove {id}");
                    }
                    5 => {
                        assert_eq!(map.get(&id).map(|e| e.product), model.get(&id).copied());
                        assert_eq!(map.contains_key(&id), model.contains_key(&id));
                    }
                    _ => {
                        if let Some(e) = map.get_mut(&id) {
                            e.product = e.product.wrapping_add(1);
                        }
                        if let Some(v) = model.get_mut(&id) {
                            *v = v.wrapping_add(1);
                        }
                    }
                }
                assert_eq!(map.len(), model.len());
                assert!(map.len() * 2 <= map.slots.len(), "at most half full");
                if step % 1000 == 0 {
                    for (k, v) in &model {
                        assert_eq!(map.get(k).map(|e| e.product), Some(*v), "id {k}");
                    }
                    assert_eq!(map.values().count(), model.len());
                }
            }
            // Emptied, it answers nothing and takes entries again.
            for k in model.keys() {
                assert!(map.remove(k).is_some());
            }
            assert_eq!(map.len(), 0);
            assert_eq!(map.values().count(), 0);
            assert!(map.insert(7, entry(7, 1)).is_none());
            assert_eq!(map.get(&7).map(|e| e.product), Some(1));
        }
    }
}
