//! A shard's idempotency records: a FIFO ring of records in the order they were made, and
//! a small open-addressing index from the record's key (a keyed 64-bit hash of
//! (user, req, sku), see `shard::IdemKey`) to its place in the ring, behind a cache-resident
//! filter (`filter.rs`) and a short list of records staged for the index.
//!
//! Built for the reserve hot path over a window of many records: a new record is written
//! at the ring's head (sequential memory), the oldest is dropped from its tail, and the
//! index costs 8 bytes per slot (linear probing). Over a large window the index is mostly
//! out of cache, so the reserve path does not touch it: a lookup asks the filter first (a
//! new key, nearly every reserve, is answered there), and a new record's index entry is
//! *staged* in a short list that a lookup also reads; every `STAGE` records the list is
//! merged into the index with all its slots prefetched at once, so their misses overlap
//! instead of stalling one reserve each. Dropping the oldest record does not touch
//! the index: its entry goes *stale* (it points below the ring's tail, which a lookup sees
//! from the entry alone) and is reused by a later insert that probes past it, or cleared by
//! a sweep or a rebuild. Same policy as a map plus a FIFO: records live until the TTL prune or
//! until `cap` newer ones were made (the oldest go first), a key made again replaces the
//! older record, and `remove` forgets one at once (an aborted reserve, backward-shift
//! deletion).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::filter::{self, Filter, MAX_GENS};
use super::prefetch::{prefetch, prefetch_write};
use super::resmap::stays_in_run;
use super::shard::IdemRec;
use super::types::ResId;

/// One record in the ring: 32 bytes, aligned to 32, so two share a cache line and none
/// straddles two (48 bytes until the fourteenth round: every other push wrote two lines).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Slot {
    key: u64,
    check: u64,
    id: ResId,
    /// When it was made (unix ms, at most `AT_MAX`) above two flags: `ENDED` (the
    /// reservation has ended) and `LIVE` (false once removed or replaced by a newer record
    /// of the same key: the slot only waits to leave the ring).
    stamp: u64,
}

// Two records per cache line, none across two.
const _: () = assert!(std::mem::size_of::<Slot>() == 32 && std::mem::align_of::<Slot>() == 32);

const LIVE: u64 = 1;
const ENDED: u64 = 2;
/// Latest creation time a slot keeps (2^62 ms, millions of years); later ones count as it.
const AT_MAX: u64 = u64::MAX >> 2;

impl Slot {
    /// Filler for ring positions not in use.
    const VACANT: Slot = Slot {
        key: 0,
        check: 0,
        id: ResId(0),
        stamp: 0,
    };

    fn new(key: u64, rec: IdemRec, at: u64) -> Slot {
        let ended = if rec.ended { ENDED } else { 0 };
        Slot {
            key,
            check: rec.check,
            id: rec.id,
            stamp: (at.min(AT_MAX) << 2) | ended | LIVE,
        }
    }

    fn live(&self) -> bool {
        self.stamp & LIVE != 0
    }

    fn at(&self) -> u64 {
        self.stamp >> 2
    }

    fn rec(&self) -> IdemRec {
        IdemRec {
            id: self.id,
            check: self.check,
            ended: self.stamp & ENDED != 0,
        }
    }

    fn kill(&mut self) {
        self.stamp &= !LIVE;
    }

    fn end(&mut self) {
        self.stamp |= ENDED;
    }
}

/// `repr(C)`, fields a reserve writes first (see `Shard`).
#[repr(C)]
pub(crate) struct IdemTable {
    /// Oldest first. `ring[i]` has sequence number `base + i`.
    ring: Ring,
    base: u64,
    /// Inserts since the last `clean_pending`.
    unswept: usize,
    /// Entries (same form as the index's) of records not yet in the index, oldest first, at
    /// most `STAGE`; an entry whose record left the ring is skipped when they are merged.
    staged: Vec<u64>,
    /// Says "no record" for nearly every key that has none, without the index.
    filter: Filter,
    /// Non-zero entries of `index` (live and stale).
    used: usize,
    /// Where `clean_some` looks next.
    clean_at: usize,
    /// 0 = empty; else the key's high 32 bits (forced non-zero) above the low 32 bits of
    /// the record's sequence number. An entry's home slot is `(tag >> 1) & mask`. An entry
    /// whose record has left the ring is stale: skipped by lookups, reusable by inserts.
    index: Vec<u64>,
}

/// Where a key's entry is.
#[derive(Clone, Copy)]
enum Found {
    Index(usize),
    Staged(usize),
}

/// Records staged before they are merged into the index together (their index lines are
/// fetched in parallel; a lookup that passes the filter reads this list too).
const STAGE: usize = 64;

/// The sequence number of a record whose place is not known (`end` then looks it up).
pub(crate) const UNKNOWN_SEQ: u64 = u64::MAX;

/// Index slots `clean_pending` looks at per insert since the last sweep.
const CLEAN_PER_INSERT: usize = 4;

const MIN_INDEX: usize = 16;

fn tag(key: u64) -> u64 {
    (key >> 32) | 1
}

impl IdemTable {
    /// Bytes at the start of the table that a reserve writes (the fields before `used`).
    #[cfg(test)]
    pub(crate) const WRITTEN_BYTES: usize = std::mem::offset_of!(IdemTable, used);

    pub(crate) fn new() -> IdemTable {
        IdemTable {
            ring: Ring::default(),
            base: 0,
            index: vec![0; MIN_INDEX],
            used: 0,
            clean_at: 0,
            unswept: 0,
            staged: Vec::with_capacity(STAGE),
            filter: Filter::default(),
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

    /// Where the filter's generations are (address and mask), for `FilterHint`.
    pub(crate) fn layout(&self) -> [(usize, usize); MAX_GENS] {
        self.filter.layout()
    }

    /// Whether entry `e` (tag already matched) points to the live record of `key`.
    fn holds(&self, e: u64, key: u64) -> bool {
        self.ring
            .get(self.ring_pos(e))
            .is_some_and(|s| s.live() && s.key == key)
    }

    /// Index slot of `key`'s entry, if the index has one.
    fn find(&self, key: u64) -> Option<usize> {
        let t = tag(key);
        let mut i = self.home(t);
        loop {
            let e = self.index[i];
            if e == 0 {
                return None;
            }
            if e >> 32 == t && self.holds(e, key) {
                return Some(i);
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Where `key`'s entry is: nowhere if the filter says so, else staged or in the index.
    fn lookup(&self, key: u64) -> Option<Found> {
        if !self.filter.may_contain(key) {
            return None;
        }
        let t = tag(key);
        if let Some(j) = self
            .staged
            .iter()
            .position(|&e| e >> 32 == t && self.holds(e, key))
        {
            return Some(Found::Staged(j));
        }
        self.find(key).map(Found::Index)
    }

    fn entry_at(&self, f: Found) -> u64 {
        match f {
            Found::Index(i) => self.index[i],
            Found::Staged(j) => self.staged.get(j).copied().unwrap_or(0),
        }
    }

    /// The live record of `key`.
    pub(crate) fn get(&self, key: u64) -> Option<IdemRec> {
        let f = self.lookup(key)?;
        self.ring
            .get(self.ring_pos(self.entry_at(f)))
            .map(Slot::rec)
    }

    /// Marks the live record of `key` ended (only if it is `id`'s, when `id` is given);
    /// whether there was one to mark.
    pub(crate) fn mark_ended(&mut self, key: u64, id: Option<ResId>) -> bool {
        let Some(f) = self.lookup(key) else {
            return false;
        };
        let p = self.ring_pos(self.entry_at(f));
        match self.ring.get_mut(p) {
            Some(s) if id.is_none_or(|id| s.id == id) => {
                s.end();
                true
            }
            _ => false,
        }
    }

    /// Adds a record made at `at` (replacing one of the same key), then drops the oldest
    /// while more than `cap` are in the ring.
    pub(crate) fn insert(&mut self, key: u64, rec: IdemRec, at: u64, cap: usize) {
        self.make_room(cap);
        let entry = self.entry_for(key);
        match self.lookup(key) {
            Some(f) => {
                let old = self.ring_pos(self.entry_at(f));
                if let Some(s) = self.ring.get_mut(old) {
                    s.kill();
                }
                match f {
                    Found::Index(i) => self.index[i] = entry,
                    Found::Staged(j) => {
                        if let Some(e) = self.staged.get_mut(j) {
                            *e = entry;
                        }
                    }
                }
            }
            None => self.stage(entry),
        }
        self.push(key, rec, at);
    }

    /// The sequence number the next insert's record gets (dropping the oldest records to
    /// make room does not change it).
    pub(crate) fn next_seq(&self) -> u64 {
        self.base + self.ring.len() as u64
    }

    /// Adds a record made at `at` for a `key` that has none (the caller just saw `get`
    /// answer `None` under the same lock): like `insert`, without looking for an old one.
    /// Returns the record's sequence number, for `end`.
    pub(crate) fn insert_new(&mut self, key: u64, rec: IdemRec, at: u64, cap: usize) -> u64 {
        self.make_room(cap);
        let entry = self.entry_for(key);
        let seq = self.next_seq();
        self.stage(entry);
        self.push(key, rec, at);
        seq
    }

    /// Hints that the next insert's ring slot and staged entry will be written soon
    /// (`Shard::prefetch_appends`).
    #[inline]
    pub(crate) fn prefetch_appends(&self) {
        prefetch_write(self.staged.as_ptr().wrapping_add(self.staged.len()));
        // A slot is half a line, aligned: one line.
        prefetch_write(
            self.ring
                .buf
                .as_ptr()
                .wrapping_add(self.ring.at(self.ring.len)),
        );
    }

    /// Marks the live record of `key` ended if it is reservation `id`'s. `seq` is where
    /// `insert_new` put it (`UNKNOWN_SEQ` if not known: a restored reservation): the record
    /// is then read straight from the ring, with no lookup. A record that left the ring or
    /// was replaced is not `id`'s live record any more, so there is nothing to mark.
    pub(crate) fn end(&mut self, seq: u64, key: u64, id: ResId) {
        if seq == UNKNOWN_SEQ {
            self.mark_ended(key, Some(id));
            return;
        }
        let Some(p) = seq
            .checked_sub(self.base)
            .and_then(|p| usize::try_from(p).ok())
        else {
            return;
        };
        if let Some(s) = self.ring.get_mut(p) {
            if s.live() && s.key == key && s.id == id {
                s.end();
            }
        }
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
        } else if (self.used + self.staged.len() + 1) * 4 > self.index.len() * 3 {
            self.rebuild(self.index.len());
        }
    }

    /// Stages a new record's index entry, first merging the staged ones if `STAGE` are.
    fn stage(&mut self, entry: u64) {
        if self.staged.len() >= STAGE {
            self.merge_staged();
        }
        self.staged.push(entry);
    }

    /// Puts the staged entries into the index: first asks for every home slot's line, then
    /// places them (so the misses overlap). Entries whose record left the ring are dropped.
    fn merge_staged(&mut self) {
        let index = self.index.as_ptr();
        for &e in &self.staged {
            prefetch(index.wrapping_add(self.home(e >> 32)));
        }
        let staged = std::mem::take(&mut self.staged);
        for &e in &staged {
            if !self.stale(e) {
                self.place(e);
            }
        }
        self.staged = staged;
        self.staged.clear();
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
        if self.filter.full() {
            self.open_generation();
        }
        self.filter.add(key);
        self.ring.push_back(Slot::new(key, rec, at));
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

    /// Opens the filter generation the next record goes into, sized for half the records
    /// in the ring; with `MAX_GENS` live, starts over with one generation holding the live
    /// records, sized for twice their count.
    fn open_generation(&mut self) {
        let next = self.base + self.ring.len() as u64;
        if self.filter.gens() < MAX_GENS {
            self.filter.open(next, self.ring.len() / 2);
            return;
        }
        self.refill_filter(self.ring.len() * 2);
    }

    /// One filter generation from the ring's oldest record on, holding the live records.
    fn refill_filter(&mut self, records: usize) {
        self.filter.clear();
        self.filter.open(self.base, records);
        for s in self.ring.iter().filter(|s| s.live()) {
            self.filter.add(s.key);
        }
    }

    /// Forgets `key`'s record if it is the one of reservation `id`.
    pub(crate) fn remove(&mut self, key: u64, id: ResId) {
        let Some(f) = self.lookup(key) else {
            return;
        };
        let p = self.ring_pos(self.entry_at(f));
        if let Some(s) = self.ring.get_mut(p) {
            if s.id != id {
                return;
            }
            s.kill();
        }
        match f {
            Found::Index(i) => self.delete_at(i),
            Found::Staged(j) => {
                self.staged.swap_remove(j);
            }
        }
    }

    /// Drops the oldest record. Its index or staged entry (if any) is stale from now on,
    /// and a filter generation none of whose records is left goes.
    fn pop(&mut self) {
        if self.ring.drop_front() {
            self.base += 1;
            self.filter.retire(self.base);
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
            if s.at().saturating_add(ttl) > now {
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
        self.refill_filter(len * 2);
    }

    /// Live records, oldest first.
    pub(crate) fn records(&self) -> impl Iterator<Item = IdemRec> + '_ {
        self.ring.iter().filter(|s| s.live()).map(Slot::rec)
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
            // Move `e` back into `i` unless its home lies cyclically in (i, j].
            if !stays_in_run(i, self.home(e >> 32), j) {
                self.index[i] = e;
                i = j;
            }
        }
        self.index[i] = 0;
        self.used -= 1;
    }

    /// Makes an index of `len` slots holding exactly the live records (no stale entries,
    /// nothing staged).
    fn rebuild(&mut self, len: usize) {
        self.staged.clear();
        let len = len.max(MIN_INDEX);
        if self.index.len() == len {
            self.index.fill(0);
        } else {
            self.index = vec![0; len];
        }
        let mask = len - 1;
        let mut used = 0;
        for (p, s) in self.ring.iter().enumerate() {
            if !s.live() {
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
#[repr(C)]
struct Ring {
    len: usize,
    /// Position of the oldest slot in `buf`.
    head: usize,
    buf: Vec<Slot>,
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

/// Where a shard's filter generations were when its lock was last released, so `reserve`
/// can start loading the filter words of its key *before* taking the lock (the newest
/// generation's word was usually last written by whichever core served the shard before;
/// the older ones are out of L1). Read without the lock, so it may be stale (a generation
/// opened meanwhile): a prefetch of a stale address only wastes one memory fetch, it is
/// never dereferenced.
///
/// One cache line, kept in an array of its own (`Inventory::filter_hints`), not beside the
/// shard's lock: a core taking a shard's lines for writing made the hint's line miss on the
/// other core when it sat a few lines after them, although nothing wrote it (fifteenth
/// round, docs/inventory.md). Written only when a generation opens or goes, or the shard's
/// product index is rebuilt (it holds that index's place too, `note_index`).
#[derive(Default)]
#[repr(C, align(64))]
pub(crate) struct FilterHint {
    /// Each generation's words' address (0: no such generation, or no hint).
    addrs: [AtomicUsize; MAX_GENS],
    /// The shard's product index (`shard::Products`): its entries' address (0: no hint),
    /// so `reserve` can start loading a SKU's index entry before the lock too (sixteenth
    /// round: that load, under the lock, was the largest single cost of sharing the shards
    /// between the cores). Written when the index is rebuilt (a product added that grows
    /// it, a restore), which the hot path never does.
    index_addr: AtomicUsize,
    /// Each generation's word mask (a word count less one; a power of two).
    masks: [AtomicU32; MAX_GENS],
    /// The stamp of the layout held (`Filter::stamp`).
    stamp: AtomicU32,
    /// The product index's entry count less one (a power of two less one).
    index_mask: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<FilterHint>() == 64);

/// Stores a hinted place (an address and a mask) into `addr` and `mask`, (0, 0) when the
/// mask does not fit 32 bits (the prefetch then stops at the address of 0), and only if it
/// changed: the hint's line stays shared between the cores unless a place moved.
fn store_place(addr: &AtomicUsize, mask: &AtomicU32, a: usize, m: usize) {
    let (a, m) = match u32::try_from(m) {
        Ok(m) => (a, m),
        Err(_) => (0, 0),
    };
    if addr.load(Ordering::Relaxed) != a || mask.load(Ordering::Relaxed) != m {
        addr.store(a, Ordering::Relaxed);
        mask.store(m, Ordering::Relaxed);
    }
}

impl FilterHint {
    /// Records `t`'s layout (call with the shard locked, after changing it). One compare
    /// when it has not changed (nearly every reserve).
    #[inline]
    pub(crate) fn note(&self, t: &IdemTable) {
        let stamp = t.filter.stamp();
        if self.stamp.load(Ordering::Relaxed) != stamp {
            self.renote(t, stamp);
        }
    }

    #[cold]
    fn renote(&self, t: &IdemTable, stamp: u32) {
        self.stamp.store(stamp, Ordering::Relaxed);
        for ((addr, mask), (a, m)) in self.addrs.iter().zip(&self.masks).zip(t.layout()) {
            // A mask past 32 bits (a generation of 2^32 words, 32 GiB) is not hinted: the
            // prefetch stops at an address of 0.
            store_place(addr, mask, a, m);
        }
    }

    /// Records where the shard's product index is (`addr` of its entries, `mask` their
    /// count less one; call with the shard locked, after a product was added or restored).
    /// An index past 2^32 entries is not hinted.
    pub(crate) fn note_index(&self, addr: usize, mask: usize) {
        store_place(&self.index_addr, &self.index_mask, addr, mask);
    }

    /// Starts loading the product index entry a lookup of a SKU whose `table_hash` is `th`
    /// reads first (its home entry, where nearly every lookup ends). A stale hint (the index
    /// was rebuilt since) only wastes the fetch: the address is never dereferenced.
    #[inline]
    pub(crate) fn prefetch_index(&self, th: u64) {
        let addr = self.index_addr.load(Ordering::Relaxed);
        if addr == 0 {
            return;
        }
        let home = (th as usize) & self.index_mask.load(Ordering::Relaxed) as usize;
        prefetch(addr.wrapping_add(home.wrapping_mul(8)) as *const u8);
    }

    /// The index hint held, `(addr, mask)` (tests).
    #[cfg(test)]
    pub(crate) fn index_hint(&self) -> (usize, usize) {
        (
            self.index_addr.load(Ordering::Relaxed),
            self.index_mask.load(Ordering::Relaxed) as usize,
        )
    }

    /// Starts loading the filter words a lookup of `key` reads (the newest one to write).
    pub(crate) fn prefetch(&self, key: u64) {
        for (i, (addr, mask)) in self.addrs.iter().zip(&self.masks).enumerate() {
            let addr = addr.load(Ordering::Relaxed);
            if addr == 0 {
                return;
            }
            let mask = mask.load(Ordering::Relaxed) as usize;
            let word = filter::word_of(addr, mask, key) as *const u64;
            let newest = self
                .addrs
                .get(i + 1)
                .is_none_or(|a| a.load(Ordering::Relaxed) == 0);
            if newest {
                prefetch_write(word);
            } else {
                prefetch(word);
            }
        }
    }
}

#[cfg(test)]
impl FilterHint {
    /// Whether the hint holds `t`'s current layout.
    pub(crate) fn matches(&self, t: &IdemTable) -> bool {
        self.addrs
            .iter()
            .zip(&self.masks)
            .zip(t.layout())
            .all(|((a, m), (ta, tm))| {
                a.load(Ordering::Relaxed) == ta && m.load(Ordering::Relaxed) as usize == tm
            })
    }
}

#[cfg(test)]
impl IdemTable {
    /// (ring slots, index slots, non-zero index entries), for tests.
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.ring.capacity(), self.index.len(), self.used)
    }

    /// Filter generations live.
    pub(crate) fn filter_gens(&self) -> usize {
        self.filter.gens()
    }

    /// Words in all filter generations.
    pub(crate) fn filter_words(&self) -> usize {
        self.filter.words()
    }

    /// Whether the filter lets a lookup of `key` through to the staged list and the index.
    pub(crate) fn filter_passes(&self, key: u64) -> bool {
        self.filter.may_contain(key)
    }

    /// Merges the staged entries, then walks the whole index once, as `clean_pending` does
    /// past its threshold.
    pub(crate) fn clean_all(&mut self) {
        self.merge_staged();
        self.clean_some(self.index.len());
    }
}
