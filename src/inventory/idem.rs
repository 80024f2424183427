//! A shard's idempotency records: a FIFO ring of records in the order they were made, and
//! a small open-addressing index from the record's key (a keyed 64-bit hash of
//! (user, req, sku), see `shard::IdemKey`) to its place in the ring.
//!
//! Built for the reserve hot path over a window of many records: a new record is written
//! at the ring's head (sequential memory), the oldest is dropped from its tail, and the
//! index costs 8 bytes per slot (linear probing). Dropping the oldest record does not touch
//! the index: its entry goes *stale* (it points below the ring's tail, which a lookup sees
//! from the entry alone) and is reused by a later insert that probes past it, or cleared by
//! a rebuild when live and stale entries fill three quarters of the index. So a reserve
//! touches one random cache line of the window (the lookup; the insert probes the same run)
//! instead of two. Same policy as a map plus a FIFO: records live until the TTL prune or
//! until `cap` newer ones were made (the oldest go first), a key made again replaces the
//! older record, and `remove` forgets one at once (an aborted reserve, backward-shift
//! deletion).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::prefetch::prefetch;
use super::shard::IdemRec;
use super::types::ResId;

/// One record in the ring.
#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    at: u64,
    rec: IdemRec,
    /// False once removed (or replaced by a newer record of the same key): the slot only
    /// waits to leave the ring.
    live: bool,
}

impl Slot {
    /// Filler for ring positions not in use.
    const VACANT: Slot = Slot {
        key: 0,
        at: 0,
        rec: IdemRec {
            id: ResId(0),
            check: 0,
            ended: false,
        },
        live: false,
    };
}

pub(crate) struct IdemTable {
    /// Oldest first. `ring[i]` has sequence number `base + i`.
    ring: Ring,
    base: u64,
    /// 0 = empty; else the key's high 32 bits (forced non-zero) above the low 32 bits of
    /// the record's sequence number. An entry's home slot is `(tag >> 1) & mask`. An entry
    /// whose record has left the ring is stale: skipped by lookups, reusable by inserts.
    index: Vec<u64>,
    /// Non-zero entries of `index` (live and stale).
    used: usize,
    /// Where `clean_some` looks next.
    clean_at: usize,
    /// Inserts since the last `clean_pending`.
    unswept: usize,
}

/// Index slots `clean_pending` looks at per insert since the last sweep.
const CLEAN_PER_INSERT: usize = 4;

const MIN_INDEX: usize = 16;

fn tag(key: u64) -> u64 {
    (key >> 32) | 1
}

impl IdemTable {
    pub(crate) fn new() -> IdemTable {
        IdemTable {
            ring: Ring::default(),
            base: 0,
            index: vec![0; MIN_INDEX],
            used: 0,
            clean_at: 0,
            unswept: 0,
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

    /// Where the index is (address and mask), for `IndexHint`.
    pub(crate) fn layout(&self) -> (usize, usize) {
        (self.index.as_ptr() as usize, self.mask())
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
                if self.ring.get(p).is_some_and(|s| s.live && s.key == key) {
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
        self.make_room(cap);
        let entry = self.entry_for(key);
        match self.find(key) {
            Some(i) => {
                let old = self.ring_pos(self.index[i]);
                if let Some(s) = self.ring.get_mut(old) {
                    s.live = false;
                }
                self.index[i] = entry;
            }
            None => self.place(entry),
        }
        self.push(key, rec, at);
    }

    /// Adds a record made at `at` for a `key` that has none (the caller just saw `get`
    /// answer `None` under the same lock): like `insert`, without looking for an old one.
    pub(crate) fn insert_new(&mut self, key: u64, rec: IdemRec, at: u64, cap: usize) {
        self.make_room(cap);
        let entry = self.entry_for(key);
        self.place(entry);
        self.push(key, rec, at);
    }

    /// Before an insert: drops the oldest records down to `cap - 1`, then grows the index
    /// (records in the ring at most a quarter of it). Stale entries are cleared by the
    /// sweeps (`clean_pending`), so live and stale stay well under three quarters of the
    /// index; the full rebuild there is only a backstop for a table nobody sweeps. A
    /// rebuild reads the whole ring under the shard lock (milliseconds for a million
    /// records), so only the index's growth, a handful of times while a shard fills up,
    /// pays it on a reserve.
    fn make_room(&mut self, cap: usize) {
        while self.ring.len() >= cap.max(1) {
            self.pop();
        }
        if (self.ring.len() + 1) * 4 > self.index.len() {
            self.rebuild(self.index.len() * 2);
        } else if (self.used + 1) * 4 > self.index.len() * 3 {
            self.rebuild(self.index.len());
        }
    }

    /// The index entry of a record of `key` about to be pushed at the ring's head.
    fn entry_for(&self, key: u64) -> u64 {
        let seq = self.base + self.ring.len() as u64;
        (tag(key) << 32) | (seq & 0xffff_ffff)
    }

    /// Whether an index entry's record has left the ring (or is the one about to be pushed,
    /// which is never in the index yet).
    fn stale(&self, entry: u64) -> bool {
        self.ring_pos(entry) >= self.ring.len()
    }

    /// Puts `entry` in the first empty or stale slot of its probe run. Every entry between
    /// its home and that slot is non-empty, so lookups still reach it and everything after.
    fn place(&mut self, entry: u64) {
        let mut i = self.home(entry >> 32);
        loop {
            let e = self.index[i];
            if e == 0 {
                self.used += 1;
                break;
            }
            if self.stale(e) {
                break;
            }
            i = (i + 1) & self.mask();
        }
        self.index[i] = entry;
    }

    fn push(&mut self, key: u64, rec: IdemRec, at: u64) {
        self.ring.push_back(Slot {
            key,
            at,
            rec,
            live: true,
        });
        self.unswept = self.unswept.saturating_add(1);
    }

    /// For a sweep: walks `CLEAN_PER_INSERT` index slots per insert since the last sweep
    /// (at most the whole index) from a cursor, deleting the stale entries it meets. One
    /// insert makes at most one entry stale (the evicted record's) and the cursor passes the
    /// whole index every `index.len() / CLEAN_PER_INSERT` inserts, so stale entries stay
    /// under about a quarter of it. Sequential memory, in one go under the lock (about
    /// 180 KB for a shard taking 28,000 reserves a second, swept every 200 ms), instead of
    /// a cold line on every reserve (measured: +0.7 simulated last-level misses per cycle
    /// when done on each insert).
    pub(crate) fn clean_pending(&mut self) {
        let budget = self
            .unswept
            .saturating_mul(CLEAN_PER_INSERT)
            .min(self.index.len());
        self.unswept = 0;
        // Inserts reuse the stale slots they probe past, which holds the index near half
        // used by itself: walk it only past that.
        if self.used * 16 > self.index.len() * 9 {
            self.clean_some(budget);
        }
    }

    /// Moves the cleaning cursor `budget` slots on, deleting the stale entries it meets
    /// (backward shift, so the slot is looked at again before the cursor moves; deletions
    /// are bounded by the entries in use). During one call nothing goes stale, and a shift
    /// only moves entries into slots at or after the cursor, or between slots already
    /// passed (which held no stale entry), so a walk of the whole index misses none.
    fn clean_some(&mut self, budget: usize) {
        let mask = self.mask();
        let mut moved = 0;
        while moved < budget {
            let i = self.clean_at & mask;
            let e = self.index[i];
            if e != 0 && self.stale(e) {
                self.delete_at(i);
            } else {
                self.clean_at = (i + 1) & mask;
                moved += 1;
            }
        }
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

    /// Drops the oldest record. Its index entry (if any) is stale from now on.
    fn pop(&mut self) {
        if self.ring.drop_front() {
            self.base += 1;
        }
    }

    /// Records in the ring (live ones and those removed or replaced, until they leave).
    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }

    /// Drops the `n` oldest records (all, if there are fewer).
    pub(crate) fn drop_oldest(&mut self, n: usize) {
        for _ in 0..n.min(self.ring.len()) {
            self.pop();
        }
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

    /// Gives memory back once the records are far fewer than the ring and index were grown
    /// for (a shard that held a rush's window and went quiet): ring at least 8 times and
    /// index at least 32 times the records. The copy is as long as what is left. Called from
    /// the sweeps (after their prune and trim), not from `reserve`.
    pub(crate) fn shrink_if_sparse(&mut self) {
        let len = self.ring.len();
        let ring_sparse = self.ring.capacity() >= 1024 && len * 8 <= self.ring.capacity();
        let index_sparse = self.index.len() >= 4096 && (len + 1) * 32 <= self.index.len();
        if !ring_sparse && !index_sparse {
            return;
        }
        if ring_sparse {
            self.ring.reshape((len * 2).next_power_of_two().max(16));
        }
        self.rebuild(((len + 1) * 4).next_power_of_two().max(MIN_INDEX));
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
        self.used -= 1;
    }

    /// Makes an index of `len` slots holding exactly the live records (no stale entries).
    fn rebuild(&mut self, len: usize) {
        let len = len.max(MIN_INDEX);
        if self.index.len() == len {
            self.index.fill(0);
        } else {
            self.index = vec![0; len];
        }
        let mask = len - 1;
        let mut used = 0;
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
            used += 1;
        }
        self.used = used;
        self.clean_at = 0;
    }
}

/// A FIFO of slots in one power-of-two buffer. Unlike `VecDeque::pop_front`, dropping the
/// oldest slot does not read it: its cache line was written a whole window ago and is
/// usually out of cache, and nothing of it is needed (the index entry goes stale).
#[derive(Default)]
struct Ring {
    buf: Vec<Slot>,
    /// Position of the oldest slot in `buf`.
    head: usize,
    len: usize,
}

impl Ring {
    fn len(&self) -> usize {
        self.len
    }

    fn at(&self, p: usize) -> usize {
        // `buf.len()` is zero or a power of two.
        (self.head + p) & self.buf.len().wrapping_sub(1)
    }

    fn get(&self, p: usize) -> Option<&Slot> {
        if p >= self.len {
            return None;
        }
        self.buf.get(self.at(p))
    }

    fn get_mut(&mut self, p: usize) -> Option<&mut Slot> {
        if p >= self.len {
            return None;
        }
        let i = self.at(p);
        self.buf.get_mut(i)
    }

    fn front(&self) -> Option<&Slot> {
        self.get(0)
    }

    /// Forgets the oldest slot without reading it; false if the ring is empty.
    fn drop_front(&mut self) -> bool {
        if self.len == 0 {
            return false;
        }
        self.head = self.at(1);
        self.len -= 1;
        true
    }

    fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Moves the slots, oldest first from position 0, into a buffer of `cap` slots (a power
    /// of two, at least `len`).
    fn reshape(&mut self, cap: usize) {
        let mut buf: Vec<Slot> = Vec::with_capacity(cap);
        buf.extend((0..self.len).filter_map(|p| self.get(p)).copied());
        buf.resize(cap, Slot::VACANT);
        self.buf = buf;
        self.head = 0;
    }

    fn push_back(&mut self, s: Slot) {
        if self.len == self.buf.len() {
            // Full (or never allocated): double.
            self.reshape((self.buf.len() * 2).max(16));
        }
        let i = self.at(self.len);
        if let Some(slot) = self.buf.get_mut(i) {
            *slot = s;
            self.len += 1;
        }
        // The slots ahead were last written a whole window ago: start fetching the line
        // after the next one now, long before a push writes it.
        prefetch(self.buf.as_ptr().wrapping_add(self.at(self.len + 3)));
    }

    fn iter(&self) -> impl Iterator<Item = &Slot> {
        (0..self.len).filter_map(move |p| self.get(p))
    }
}

/// Where a shard's idempotency index was when its lock was last released, kept beside the
/// lock so `reserve` can start loading the index slot of its key *before* taking the lock:
/// the miss then overlaps the lock and the product lookup. Read without the lock, so it may
/// be stale (the index grew or was rebuilt meanwhile): a prefetch of a stale address only
/// wastes one memory fetch, it is never dereferenced.
#[derive(Default)]
pub(crate) struct IndexHint {
    addr: AtomicUsize,
    mask: AtomicUsize,
}

impl IndexHint {
    /// Records `t`'s layout (call with the shard locked, after changing it).
    pub(crate) fn note(&self, t: &IdemTable) {
        let (addr, mask) = t.layout();
        if self.addr.load(Ordering::Relaxed) != addr || self.mask.load(Ordering::Relaxed) != mask {
            self.addr.store(addr, Ordering::Relaxed);
            self.mask.store(mask, Ordering::Relaxed);
        }
    }

    /// Starts loading the index slot where a lookup of `key` begins.
    pub(crate) fn prefetch(&self, key: u64) {
        let addr = self.addr.load(Ordering::Relaxed);
        if addr == 0 {
            return;
        }
        let home = ((tag(key) >> 1) as usize) & self.mask.load(Ordering::Relaxed);
        prefetch(addr.wrapping_add(home.wrapping_mul(8)) as *const u64);
    }
}

#[cfg(test)]
impl IdemTable {
    /// (ring slots, index slots, non-zero index entries), for tests.
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.ring.capacity(), self.index.len(), self.used)
    }

    /// Walks the whole index once, as `clean_pending` does past its threshold.
    pub(crate) fn clean_all(&mut self) {
        self.clean_some(self.index.len());
    }
}
