//! A shard's idempotency records: a FIFO ring of records in the order they were made, and
//! a small open-addressing index from the record's key (a keyed 64-bit hash of
//! (user, req, sku), see `shard::IdemKey`) to its place in the ring.
//!
//! Built for the reserve hot path over a window of many records: a new record is written
//! at the ring's head (sequential memory), the oldest is dropped from its tail, and the
//! index costs 8 bytes per slot (kept at most half full, linear probing with backward-shift
//! deletion, no tombstones), so a reserve touches about two random cache lines of the
//! window instead of four. Same policy as a map plus a FIFO: records live until the TTL
//! prune or until `cap` newer ones were made (the oldest go first), a key made again
//! replaces the older record, and `remove` forgets one at once (an aborted reserve).

use std::collections::VecDeque;

use super::shard::IdemRec;
use super::types::ResId;

/// One record in the ring.
struct Slot {
    key: u64,
    at: u64,
    rec: IdemRec,
    /// False once removed (or replaced by a newer record of the same key): the slot only
    /// waits to leave the ring.
    live: bool,
}

pub(crate) struct IdemTable {
    /// Oldest first. `ring[i]` has sequence number `base + i`.
    ring: VecDeque<Slot>,
    base: u64,
    /// 0 = empty; else the key's high 32 bits (forced non-zero) above the low 32 bits of
    /// the record's sequence number. An entry's home slot is `(tag >> 1) & mask`.
    index: Vec<u64>,
}

const MIN_INDEX: usize = 16;

fn tag(key: u64) -> u64 {
    (key >> 32) | 1
}

impl IdemTable {
    pub(crate) fn new() -> IdemTable {
        IdemTable {
            ring: VecDeque::new(),
            base: 0,
            index: vec![0; MIN_INDEX],
        }
    }

    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    /// Where an index entry (or a key's tag) starts probing.
    fn home(&self, tag: u64) -> usize {
        // Bit 0 of a tag is forced to 1: start above it. Masked to the index length, so the
        // cast cannot lose anything that is used.
        ((tag >> 1) as usize) & self.mask()
    }

    /// Ring position of the record an index entry points to.
    fn ring_pos(&self, entry: u64) -> usize {
        // Sequence numbers are compared in their low 32 bits: the ring is far shorter.
        ((entry as u32).wrapping_sub(self.base as u32)) as usize
    }

    /// Index slot of `key`'s entry, if it has one.
    fn find(&self, key: u64) -> Option<usize> {
        let t = tag(key);
        let mut i = self.home(t);
        loop {
            let e = self.index[i];
            if e == 0 {
                return None;
            }
            if e >> 32 == t {
                let p = self.ring_pos(e);
                if self.ring.get(p).is_some_and(|s| s.key == key) {
                    return Some(i);
                }
            }
            i = (i + 1) & self.mask();
        }
    }

    /// The live record of `key`.
    pub(crate) fn get(&self, key: u64) -> Option<&IdemRec> {
        let i = self.find(key)?;
        let p = self.ring_pos(self.index[i]);
        self.ring.get(p).map(|s| &s.rec)
    }

    /// The live record of `key`, to change.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut IdemRec> {
        let i = self.find(key)?;
        let p = self.ring_pos(self.index[i]);
        self.ring.get_mut(p).map(|s| &mut s.rec)
    }

    /// Adds a record made at `at` (replacing one of the same key), then drops the oldest
    /// while more than `cap` are in the ring.
    pub(crate) fn insert(&mut self, key: u64, rec: IdemRec, at: u64, cap: usize) {
        while self.ring.len() >= cap.max(1) {
            self.pop();
        }
        if (self.ring.len() + 1) * 2 > self.index.len() {
            self.grow();
        }
        let seq = self.base + self.ring.len() as u64;
        let entry = (tag(key) << 32) | (seq & 0xffff_ffff);
        match self.find(key) {
            Some(i) => {
                let old = self.ring_pos(self.index[i]);
                if let Some(s) = self.ring.get_mut(old) {
                    s.live = false;
                }
                self.index[i] = entry;
            }
            None => {
                let mut i = self.home(tag(key));
                while self.index[i] != 0 {
                    i = (i + 1) & self.mask();
                }
                self.index[i] = entry;
            }
        }
        self.ring.push_back(Slot {
            key,
            at,
            rec,
            live: true,
        });
    }

    /// Adds a record made at `at` for a `key` that has none (the caller just saw `get`
    /// answer `None` under the same lock): like `insert`, without looking for an old one.
    pub(crate) fn insert_new(&mut self, key: u64, rec: IdemRec, at: u64, cap: usize) {
        while self.ring.len() >= cap.max(1) {
            self.pop();
        }
        if (self.ring.len() + 1) * 2 > self.index.len() {
            self.grow();
        }
        let seq = self.base + self.ring.len() as u64;
        let t = tag(key);
        let mut i = self.home(t);
        while self.index[i] != 0 {
            i = (i + 1) & self.mask();
        }
        self.index[i] = (t << 32) | (seq & 0xffff_ffff);
        self.ring.push_back(Slot {
            key,
            at,
            rec,
            live: true,
        });
    }

    /// Forgets `key`'s record if it is the one of reservation `id`.
    pub(crate) fn remove(&mut self, key: u64, id: ResId) {
        let Some(i) = self.find(key) else {
            return;
        };
        let p = self.ring_pos(self.index[i]);
        if let Some(s) = self.ring.get_mut(p) {
            if s.rec.id != id {
                return;
            }
            s.live = false;
        }
        self.delete_at(i);
    }

    /// Drops the oldest record.
    fn pop(&mut self) {
        let Some(s) = self.ring.front() else {
            return;
        };
        if s.live {
            if let Some(i) = self.find(s.key) {
                if self.ring_pos(self.index[i]) == 0 {
                    self.delete_at(i);
                }
            }
        }
        self.ring.pop_front();
        self.base += 1;
    }

    /// Drops records made at or before `now - ttl`.
    pub(crate) fn prune(&mut self, now: u64, ttl: u64) {
        while let Some(s) = self.ring.front() {
            if s.at.saturating_add(ttl) > now {
                break;
            }
            self.pop();
        }
    }

    /// Live records, oldest first.
    pub(crate) fn records(&self) -> impl Iterator<Item = &IdemRec> {
        self.ring.iter().filter(|s| s.live).map(|s| &s.rec)
    }

    /// Empties index slot `i`, shifting later entries of the probe run back (no tombstones).
    fn delete_at(&mut self, mut i: usize) {
        let mask = self.mask();
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.index[j];
            if e == 0 {
                break;
            }
            let h = self.home(e >> 32);
            // Move `e` back into `i` unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < h && h <= j
            } else {
                i < h || h <= j
            };
            if !stays {
                self.index[i] = e;
                i = j;
            }
        }
        self.index[i] = 0;
    }

    /// Doubles the index and re-enters every live record.
    fn grow(&mut self) {
        let len = (self.index.len() * 2).max(MIN_INDEX);
        self.index = vec![0; len];
        let mask = self.mask();
        for (p, s) in self.ring.iter().enumerate() {
            if !s.live {
                continue;
            }
            let t = tag(s.key);
            let mut i = ((t >> 1) as usize) & mask;
            while self.index[i] != 0 {
                i = (i + 1) & mask;
            }
            self.index[i] = (t << 32) | ((self.base + p as u64) & 0xffff_ffff);
        }
    }
}
