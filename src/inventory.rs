//! The inventory reservation core: products, stock counts, reservations, per-user limits,
//! expiry and reserve idempotency, all in memory, lock-sharded by SKU.
//!
//! It owns the answer to "may this unit be sold?" and nothing else. It must not do I/O, read
//! a clock (every call takes `now`, unix ms), await, spawn, log, or know about Redis or the
//! wire format. Every state change is two-phase (`reserve` then `confirm_reserve` or
//! `abort_reserve`, `begin_*` then `finish_*`) so the gateway can write the change durably
//! before it tells a client, and undo it when the write fails, without ever overselling.
//! Each SKU lives in one shard (a mutex on the core's own lock, `lock.rs`, held for a few
//! hundred nanoseconds, never across an `.await`; the exceptions are the doubling of a
//! shard's idempotency table, a copy as long as its records, a handful of times while it
//! fills, and the sweeps); only checkout and batch finishes lock several shards, always in
//! ascending index order. See docs/inventory.md for the contract and invariants.

mod counted;
mod filter;
mod idem;
mod keyhash;
mod lock;
mod prefetch;
mod resmap;
mod shard;
mod types;
mod wheel;

#[cfg(test)]
mod tests;

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use foldhash::quality::FoldHasher;
use foldhash::SharedSeed;
use lock::{ShardGuard as MutexGuard, ShardMutex as Mutex};

use rustc_hash::{FxBuildHasher, FxHasher};

use idem::FilterHint;
use shard::{Entry, IdemKey, IdemRec, Product, Shard, State, UserUnits};

pub use types::{
    InvError, InventoryConfig, ParseResIdError, ProductCounts, ProductSpec, ResHandle, ResId,
    Reservation, ReserveOutcome, ReserveRequest, RestoreState, RestoreSummary, RestoredIdem,
    RestoredProduct, Text, COUNTER_BITS, EPOCH_MASK,
};

/// Most shards an `Inventory` uses (more would only cost memory).
pub const MAX_SHARDS: usize = 4096;

/// Cache lines at the start of a `Padded` shard that a reserve writes (see `Shard`).
const WRITTEN_LINES: usize = 3;

/// Entries of the product hint table (`Inventory::product_hints`).
const PRODUCT_HINTS: usize = 1 << 14;

/// The hint table entry of a SKU hash (bits neither the shard nor the product table uses
/// first).
fn hint_slot(sku_hash: u64) -> usize {
    // Masked to the table's size, so the cast loses nothing that is used.
    ((sku_hash >> 20) as usize) & (PRODUCT_HINTS - 1)
}

/// One shard on its own cache lines, so two cores locking neighbouring shards do not
/// contend on the same line. `repr(C)`: the lock, then the shard's fields (those a reserve
/// writes first, see `Shard`). Its idempotency filter's hint is not here but in
/// `Inventory::filter_hints` (see `FilterHint`).
#[repr(C, align(128))]
struct Padded(Mutex<Shard>);

impl Padded {
    /// Hints that this shard's lock and fields (a few cache lines) will be used soon: the
    /// first `WRITTEN_LINES` (lock and the fields every reserve writes, `Shard`) for
    /// writing, the rest (read only) for reading, so they stay shared between the cores.
    fn prefetch(&self) {
        let at = (self as *const Padded).cast::<u8>();
        for line in 0..std::mem::size_of::<Padded>().div_ceil(64) {
            if line < WRITTEN_LINES {
                prefetch::prefetch_write(at.wrapping_add(line * 64));
            } else {
                prefetch::prefetch(at.wrapping_add(line * 64));
            }
        }
    }
}

/// The inventory core. `Send + Sync`: share it behind an `Arc`.
pub struct Inventory {
    shards: Box<[Padded]>,
    /// `shards.len() - 1`: the count is a power of two, so the shard of a hash or an id
    /// counter is a mask, not a 64-bit division, on the hot path.
    shard_mask: u64,
    epoch: u32,
    idem_ttl_ms: u64,
    idem_cap: usize,
    /// Keys of the idempotency hash (foldhash, keyed): drawn per `Inventory` from the OS
    /// random source, so a client choosing `req` cannot aim collisions at the index.
    idem_seed: u64,
    idem_shared: SharedSeed,
    /// Seeds of the idempotency key of short parts (`keyhash.rs`), also per `Inventory`.
    idem_short: keyhash::ShortKeys,
    /// Current-epoch ids with a counter >= this were issued by this process since the last
    /// restore, so their shard is `counter % shards`; other ids need a scan.
    fresh_floor: AtomicU64,
    /// Whether a restore brought in reservations (only then can a scan find anything).
    restored_any: AtomicBool,
    /// Where the next `take_due` sweep starts, so a small `max` does not starve late shards.
    sweep_cursor: AtomicUsize,
    /// Set while a sweep counts the idempotency records, so two overlapping sweeps do not
    /// both trim the same excess.
    trimming: AtomicBool,
    /// Where the product of a SKU hash probably is (by `hint_slot`), so that `reserve` can
    /// start loading its line before it takes the lock and looks it up: a signed distance
    /// in cache lines from `hint_base` (32 bits, so the table is 64 KiB, not 128, and more
    /// of it stays in cache; 0 = unknown, a product too far away is not noted). Only ever
    /// prefetched, never dereferenced: an entry that is stale (its shard's product list grew
    /// and moved) or belongs to another SKU of the same slot wastes one fetch. Written when
    /// products are added (rare), read on every reserve: shared by both cores' caches.
    product_hints: Box<[AtomicU32]>,
    /// Shard `i`'s idempotency filter hint (`FilterHint`, one line each): an array of its
    /// own, away from the lines a reserve takes for writing.
    filter_hints: Box<[FilterHint]>,
    /// The address the hints count from (the shard array's; any fixed address would do).
    hint_base: usize,
}

/// Writes each part as a length byte and its bytes; `None` if a part is over 64 bytes.
fn pack<'a, const N: usize>(buf: &'a mut [u8; N], parts: [&str; 3]) -> Option<&'a [u8]> {
    let mut at = 0;
    for p in parts {
        let len = u8::try_from(p.len()).ok().filter(|&l| l <= 64)?;
        let end = at + 1 + p.len();
        let dst = buf.get_mut(at..end)?;
        dst[0] = len;
        dst[1..].copy_from_slice(p.as_bytes());
        at = end;
    }
    buf.get(..at)
}

/// How many of its oldest records each shard drops so that `lens` (records per shard) sum
/// to at most `cap`: each shard's share of the excess in proportion to its records,
/// rounded down; the remainder (fewer than the shard count) from the largest shards.
/// Empty when the sum is within the cap.
fn proportional_trims(lens: &[usize], cap: usize) -> Vec<usize> {
    let total = lens.iter().fold(0usize, |a, &l| a.saturating_add(l));
    let excess = total.saturating_sub(cap);
    if excess == 0 {
        return Vec::new();
    }
    let mut trims: Vec<usize> = lens
        .iter()
        .map(|&l| {
            let share = l as u128 * excess as u128 / total as u128;
            usize::try_from(share).unwrap_or(l).min(l)
        })
        .collect();
    let mut left = excess.saturating_sub(trims.iter().sum());
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_unstable_by_key(|&i| std::cmp::Reverse(lens[i]));
    for i in order {
        if left == 0 {
            break;
        }
        let more = (lens[i] - trims[i]).min(left);
        trims[i] += more;
        left -= more;
    }
    trims
}

/// A locked shard and its index.
type Locked<'a> = (usize, MutexGuard<'a, Shard>);

/// Locks a shard. The lock (`lock.rs`) does not poison (no code in a critical section
/// panics on input, and refusing service after a panic would repair nothing) and releases
/// with a plain store, not a locked instruction (measured 1.05-1.13x the cycles per second
/// of `parking_lot`'s, docs/inventory.md, tenth round).
fn lock(m: &Padded) -> MutexGuard<'_, Shard> {
    m.0.lock()
}

impl Inventory {
    /// An empty inventory.
    pub fn new(cfg: InventoryConfig) -> Inventory {
        // MAX_SHARDS is a power of two, so rounding up stays within it.
        let n = cfg.shards.clamp(1, MAX_SHARDS).next_power_of_two();
        let shards: Box<[Padded]> = (0..n)
            .map(|i| Padded(Mutex::new(Shard::new(i, n))))
            .collect();
        let hint_base = shards.as_ptr() as usize;
        Inventory {
            shards,
            shard_mask: n as u64 - 1,
            epoch: cfg.epoch & EPOCH_MASK,
            idem_ttl_ms: cfg.idempotency_ttl_ms,
            // The record ring addresses records by 32-bit sequence numbers.
            idem_cap: cfg.idempotency_cap.clamp(1, 1 << 31),
            idem_seed: rand::random(),
            idem_shared: SharedSeed::from_u64(rand::random()),
            idem_short: keyhash::ShortKeys::random(),
            fresh_floor: AtomicU64::new(0),
            restored_any: AtomicBool::new(false),
            sweep_cursor: AtomicUsize::new(0),
            trimming: AtomicBool::new(false),
            product_hints: (0..PRODUCT_HINTS).map(|_| AtomicU32::new(0)).collect(),
            filter_hints: (0..n).map(|_| FilterHint::default()).collect(),
            hint_base,
        }
    }

    /// Records where shard `i`'s product index is, for `reserve`'s pre-lock prefetch.
    fn note_index(&self, i: usize, s: &Shard) {
        if let Some(h) = self.filter_hints.get(i) {
            let (addr, mask) = s.products.index_layout();
            h.note_index(addr, mask);
        }
    }

    /// Records where each of a shard's products is (after a restore).
    fn note_products(&self, s: &Shard) {
        for (hash, addr) in s.products.places() {
            self.note_product(hash, addr);
        }
    }

    fn note_product(&self, hash: u64, addr: usize) {
        if let Some(h) = self.product_hints.get(hint_slot(hash)) {
            let lines = ((addr >> 6) as isize).wrapping_sub((self.hint_base >> 6) as isize);
            // Two's complement: the distance's 32 bits, read back as an `i32` by `hinted`.
            h.store(
                i32::try_from(lines).map_or(0, |d| d as u32),
                Ordering::Relaxed,
            );
        }
    }

    /// The address a hint entry points at (the base's own line for an unknown one).
    #[inline]
    fn hinted(&self, hint: u32) -> usize {
        // Two's complement: the entry is an `i32` distance in lines (see `note_product`).
        let lines = ((self.hint_base >> 6) as isize).wrapping_add(hint as i32 as isize);
        (lines as usize) << 6
    }

    /// The epoch new ids are issued in (the configured one modulo 2^24).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// How many times a shard lock was found taken, so its taker waited (spinning, then
    /// sleeping), since the process started; process-wide (all
    /// `Inventory`s together). Exported as `livegate_inventory_lock_waits_total`.
    pub fn lock_waits(&self) -> u64 {
        lock::waits()
    }

    /// Number of lock shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Which lock shard `sku` lives in (`0..shards`): for benchmarks that place threads on
    /// shards of their own, and for diagnostics. Stable for the life of the `Inventory`.
    pub fn shard_of_sku(&self, sku: &str) -> usize {
        self.shard_of(sku)
    }

    fn shard_of(&self, sku: &str) -> usize {
        // rustc-hash's finish rotates the well-mixed high bits of its product down, so the
        // low bits are good for the shard mask.
        self.shard_index(shard::sku_hash(sku))
    }

    /// The shard of a SKU hash or of a fresh id's counter (`x % shards`, as a mask).
    #[inline]
    fn shard_index(&self, x: u64) -> usize {
        // Masked to the shard count (at most MAX_SHARDS): the cast is lossless.
        (x & self.shard_mask) as usize
    }

    fn sku_shard(&self, sku: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_of(sku)])
    }

    /// The idempotency key of (user, req, sku) packed by `pack`.
    fn packed_key(&self, bytes: &[u8]) -> IdemKey {
        let mut keyed = self.idem_hasher();
        keyed.write(bytes);
        let mut fx = FxHasher::default();
        fx.write(bytes);
        IdemKey {
            key: keyed.finish(),
            check: fx.finish(),
        }
    }

    /// A keyed hasher for idempotency keys.
    fn idem_hasher(&self) -> FoldHasher<'_> {
        FoldHasher::with_seed(self.idem_seed, &self.idem_shared)
    }

    fn idem_key(&self, user: &str, req: &str, sku: &str) -> IdemKey {
        // Parts of at most 16 bytes each (the usual ids): hashed from the strings, no buffer.
        if let Some(k) = self.idem_short.key(user, req, sku) {
            return k;
        }
        // Longer parts: one contiguous, length-prefixed write when they fit (protocol ids
        // are at most 64 chars): the hashers pay per write call.
        // The check hash reads the same bytes. Usual keys fit a 64-byte buffer, which is
        // cheaper to clear than the 195 bytes the longest need; the bytes hashed are the
        // same in either.
        if 3 + user.len() + req.len() + sku.len() <= 64 {
            if let Some(bytes) = pack(&mut [0u8; 64], [user, req, sku]) {
                return self.packed_key(bytes);
            }
        }
        match pack(&mut [0u8; 3 * (64 + 1)], [user, req, sku]) {
            Some(bytes) => self.packed_key(bytes),
            None => {
                let mut keyed = self.idem_hasher();
                (user, req, sku).hash(&mut keyed);
                IdemKey {
                    key: keyed.finish(),
                    check: FxBuildHasher.hash_one((user, req, sku)),
                }
            }
        }
    }

    /// The shard holding reservation `id`, if any. Ids this process issued map directly;
    /// restored ones (older epoch, or restored into the same epoch) need a scan, which only
    /// happens when a restore brought reservations in.
    #[inline]
    fn locate(&self, id: ResId) -> Option<usize> {
        if id.epoch() == self.epoch && id.counter() >= self.fresh_floor.load(Ordering::Acquire) {
            // A fresh id's counter is k * shards + index.
            return Some(self.shard_index(id.counter()));
        }
        self.locate_restored(id)
    }

    /// `locate` of an id not issued since the last restore: a scan of the shards, kept out
    /// of line so the fresh path above stays a few instructions.
    #[cold]
    #[inline(never)]
    fn locate_restored(&self, id: ResId) -> Option<usize> {
        if !self.restored_any.load(Ordering::Acquire) {
            return None;
        }
        self.shards
            .iter()
            .position(|s| lock(s).reservations.contains_key(&id.0))
    }

    fn res_shard(&self, id: ResId) -> Result<MutexGuard<'_, Shard>, InvError> {
        let i = self.locate(id).ok_or(InvError::NotFound)?;
        Ok(lock(&self.shards[i]))
    }

    /// Phase one of `add_to_cart`: takes `qty` units now (Pending), or returns the earlier
    /// reservation of the same (user, req, sku) while it is Held. Same (user, req) with a
    /// different SKU is a different request. Errors: `InvalidQty`, `UnknownSku`, `InFlight`
    /// (the earlier one is not Held yet, or is mid-release/checkout/expiry), `Ended`,
    /// `LimitExceeded`, `SoldOut`.
    pub fn reserve(&self, r: ReserveRequest) -> Result<ReserveOutcome, InvError> {
        if !(1..=99).contains(&r.qty) {
            return Err(InvError::InvalidQty);
        }
        let hash = shard::sku_hash(&r.sku);
        if let Some(h) = self.product_hints.get(hint_slot(hash)) {
            prefetch::prefetch_write(self.hinted(h.load(Ordering::Relaxed)) as *const u8);
        }
        let i = self.shard_index(hash);
        let slot = &self.shards[i];
        // The shard's lock and fields were last touched by whichever core served this shard
        // before: start fetching them, then hash the key while they travel.
        slot.prefetch();
        let key = self.idem_key(&r.user, &r.req, &r.sku);
        // The key's word in the idempotency filter was likely last written by the other
        // core: start loading it before the lock, so it overlaps the lock and the product.
        let filter_hint = self.filter_hints.get(i);
        if let Some(h) = filter_hint {
            h.prefetch(key.key);
            // And the product's index entry, which the lookup under the lock reads first.
            h.prefetch_index(shard::table_hash(hash));
        }
        let mut g = lock(slot);
        let out = g.reserve(r, hash, key, self.epoch, self.idem_cap);
        if let Some(h) = filter_hint {
            h.note(&g.idem);
        }
        out
    }

    /// The durable write of a reserve succeeded: Pending -> Held, on the handle `reserve`
    /// returned, without taking the shard lock (one compare-and-swap). `Conflict` if it is
    /// not Pending (already confirmed, aborted or ended).
    pub fn confirm(&self, res: &ResHandle) -> Result<(), InvError> {
        shard::State::confirm(res)
    }

    /// `confirm` by id, for a caller that kept only the id (it takes the shard lock to find
    /// the reservation).
    pub fn confirm_reserve(&self, id: ResId) -> Result<(), InvError> {
        self.res_shard(id)?.confirm(id)
    }

    /// The durable write of a reserve failed: the units go back and the reservation and its
    /// idempotency record are forgotten (a retry with the same req reserves anew).
    pub fn abort_reserve(&self, id: ResId) -> Result<(), InvError> {
        self.res_shard(id)?.abort(id)
    }

    /// Phase one of `release`: `user`'s Held reservation becomes Releasing (nothing else may
    /// touch it). Another user's reservation is `NotFound`.
    pub fn begin_release(&self, user: &str, id: ResId) -> Result<ResHandle, InvError> {
        self.res_shard(id)?.begin(Some(user), id, State::Releasing)
    }

    /// Phase two of `release`: committed -> the units go back and the reservation ends;
    /// not committed -> Held again.
    pub fn finish_release(&self, id: ResId, committed: bool) -> Result<(), InvError> {
        self.res_shard(id)?
            .finish(id, State::Releasing, committed, false)
    }

    /// Looks up a live reservation (any state), e.g. to answer a status query.
    pub fn reservation(&self, id: ResId) -> Option<ResHandle> {
        let s = self.res_shard(id).ok()?;
        s.reservations.get(&id.0).map(|e| e.res.clone())
    }

    /// Resolves and locks the shards of `ids` in ascending index order. Returns the guards
    /// (sorted by shard index) and, for each id, the position of its guard.
    fn lock_many(&self, ids: &[ResId]) -> Result<(Vec<Locked<'_>>, Vec<usize>), InvError> {
        if ids.is_empty() {
            return Err(InvError::Invalid("no reservation ids"));
        }
        let mut sorted: Vec<u64> = ids.iter().map(|i| i.0).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(InvError::Invalid("duplicate reservation id"));
        }
        let mut where_: Vec<usize> = Vec::with_capacity(ids.len());
        for &id in ids {
            where_.push(self.locate(id).ok_or(InvError::NotFound)?);
        }
        let mut order = where_.clone();
        order.sort_unstable();
        order.dedup();
        let guards: Vec<Locked<'_>> = order.iter().map(|&i| (i, lock(&self.shards[i]))).collect();
        let pos = where_
            .iter()
            .map(|i| order.binary_search(i).unwrap_or(0))
            .collect();
        Ok((guards, pos))
    }

    /// Phase one of `checkout`, all or none: every id must exist, belong to `user`, be Held
    /// and not be expired (`expires_at > now`); then all become CheckingOut. Returns them in
    /// the order given. Errors: `NotFound`, `Conflict` (wrong state), `Expired { id }`,
    /// `Invalid` (empty list or a repeated id).
    pub fn begin_checkout(
        &self,
        user: &str,
        ids: &[ResId],
        now: u64,
    ) -> Result<Vec<ResHandle>, InvError> {
        let (mut guards, pos) = self.lock_many(ids)?;
        // Unknown (or another user's) anywhere in the list wins over state errors.
        for (&id, &p) in ids.iter().zip(&pos) {
            guards[p].1.check_owner(Some(user), id)?;
        }
        for (&id, &p) in ids.iter().zip(&pos) {
            guards[p].1.check_checkout(user, id, now)?;
        }
        let mut out = Vec::with_capacity(ids.len());
        for (&id, &p) in ids.iter().zip(&pos) {
            out.push(guards[p].1.begin(Some(user), id, State::CheckingOut)?);
        }
        Ok(out)
    }

    fn finish_many(
        &self,
        ids: &[ResId],
        from: State,
        committed: bool,
        sold: bool,
    ) -> Result<(), InvError> {
        let (mut guards, pos) = self.lock_many(ids)?;
        for (&id, &p) in ids.iter().zip(&pos) {
            guards[p].1.check_owner(None, id)?;
        }
        for (&id, &p) in ids.iter().zip(&pos) {
            guards[p].1.check(id, from)?;
        }
        for (&id, &p) in ids.iter().zip(&pos) {
            guards[p].1.finish(id, from, committed, sold)?;
        }
        Ok(())
    }

    /// Phase two of `checkout`, all or none (every id must be CheckingOut): committed ->
    /// units move from reserved to sold and count toward the user's bought units; not
    /// committed -> Held again.
    pub fn finish_checkout(&self, ids: &[ResId], committed: bool) -> Result<(), InvError> {
        self.finish_many(ids, State::CheckingOut, committed, true)
    }

    /// Phase one of expiry: up to `max` Held reservations with `expires_at <= now` become
    /// Expiring and are returned. Also drops idempotency records older than the TTL and,
    /// when this sweep counts more records than the cap in all shards, every shard's
    /// oldest in proportion to its share of them. Cost grows with what is due and what is
    /// dropped (and the shard count), not with what is held.
    pub fn take_due(&self, now: u64, max: usize) -> Vec<ResHandle> {
        let mut out = Vec::new();
        let n = self.shards.len();
        let start = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % n;
        // Another sweep counting and trimming the same excess would trim it twice.
        let trimmer = !self.trimming.swap(true, Ordering::Acquire);
        let trims = if trimmer {
            self.idem_trims(now)
        } else {
            Vec::new()
        };
        for k in 0..n {
            let i = (start + k) % n;
            let mut s = lock(&self.shards[i]);
            if let Some(&t) = trims.get(i).filter(|&&t| t > 0) {
                s.prune_idem(now, self.idem_ttl_ms, t);
            }
            s.take_due(now, max, &mut out);
        }
        if trimmer {
            self.trimming.store(false, Ordering::Release);
        }
        out
    }

    /// Drops idempotency records past the TTL in every shard, then says how many of its
    /// oldest each shard must drop to bring all shards together back to the cap: its share
    /// of the excess in proportion to its records, rounded down, the remainder (fewer than
    /// the shard count) from the shards with the most. Rounding every share up would take
    /// a record from every shard at every sweep over the cap: during a rush on one SKU, a
    /// quiet SKU's records would then live less than a sweep. Empty when nothing is to be
    /// trimmed.
    fn idem_trims(&self, now: u64) -> Vec<usize> {
        // The reserve path keeps no global count (a shared counter would be one more cache
        // line bouncing between cores on every reserve): count here.
        let lens: Vec<usize> = self
            .shards
            .iter()
            .map(|s| lock(s).prune_idem(now, self.idem_ttl_ms, 0))
            .collect();
        proportional_trims(&lens, self.idem_cap)
    }

    /// Phase two of expiry, all or none (every id must be Expiring): committed -> units go
    /// back and the reservations end; not committed -> Held again (a later sweep retries).
    pub fn finish_expire(&self, ids: &[ResId], committed: bool) -> Result<(), InvError> {
        self.finish_many(ids, State::Expiring, committed, false)
    }

    /// Creates a product with `initial_stock` (None = 0) or updates the spec of an existing
    /// one (`Some(stock)` for an existing SKU is a `Conflict`: stock changes go through
    /// `restock`). Returns whether it was created, and its counts. Existing reservations keep
    /// their price and expiry; a lowered limit applies to later reserves only.
    pub fn upsert(
        &self,
        sku: &str,
        spec: ProductSpec,
        initial_stock: Option<u64>,
    ) -> Result<(bool, ProductCounts), InvError> {
        if spec.price_cents < 0 {
            return Err(InvError::Invalid("negative price"));
        }
        if spec.ttl_s == 0 {
            return Err(InvError::Invalid("ttl_s must be at least 1"));
        }
        let i = self.shard_of(sku);
        let mut s = lock(&self.shards[i]);
        if s.products.contains_key(sku) {
            if initial_stock.is_some() {
                return Err(InvError::Conflict(
                    "stock is set only when a product is created; use restock".into(),
                ));
            }
            let counts = s.set_spec(sku, spec).ok_or(InvError::UnknownSku)?;
            return Ok((false, counts));
        }
        let p = Product::new(spec, initial_stock.unwrap_or(0));
        let counts = p.counts();
        let moved = s.products.insert(Arc::from(sku), p).1;
        self.note_index(i, &s);
        // Only the new product, unless adding it moved them all (the list grew): a catalog
        // loaded one product at a time costs O(products), not O(products^2) under the lock.
        if moved {
            self.note_products(&s);
        } else if let Some((hash, addr)) = s.products.last_place() {
            self.note_product(hash, addr);
        }
        Ok((true, counts))
    }

    /// Adds (`delta > 0`) or removes (`delta < 0`) stock at once. A removal can take at most
    /// the units available now (else `Conflict`). Contract: the gateway applies a negative
    /// delta before its durable write and a positive one after it, so `undo_restock` only
    /// ever has to give units back and can never oversell.
    pub fn restock(&self, sku: &str, delta: i64) -> Result<ProductCounts, InvError> {
        let mut s = self.sku_shard(sku);
        let p = s.products.get_mut(sku).ok_or(InvError::UnknownSku)?;
        if delta >= 0 {
            p.add_stock(delta.unsigned_abs())
        } else {
            p.remove_stock(delta.unsigned_abs())
        }
    }

    /// Reverses `restock(sku, delta)` whose durable write failed (`restock(sku, -delta)`).
    /// Undoing a negative delta always succeeds; undoing a positive one is a removal and may
    /// fail with `Conflict` if the units are gone (which the contract above avoids).
    pub fn undo_restock(&self, sku: &str, delta: i64) -> Result<ProductCounts, InvError> {
        let mut s = self.sku_shard(sku);
        let p = s.products.get_mut(sku).ok_or(InvError::UnknownSku)?;
        if delta >= 0 {
            p.remove_stock(delta.unsigned_abs())
        } else {
            p.add_stock(delta.unsigned_abs())
        }
    }

    /// The counts of a SKU.
    pub fn counts(&self, sku: &str) -> Option<ProductCounts> {
        self.sku_shard(sku).products.get(sku).map(Product::counts)
    }

    /// The spec and counts of a SKU.
    pub fn product(&self, sku: &str) -> Option<(ProductSpec, ProductCounts)> {
        self.sku_shard(sku)
            .products
            .get(sku)
            .map(|p| (p.spec, p.counts()))
    }

    /// Units available now (one short lock; read by room ticks).
    pub fn available(&self, sku: &str) -> Option<u64> {
        self.sku_shard(sku).products.get(sku).map(|p| p.available)
    }

    fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(lock).collect()
    }

    /// Replaces everything with `state` (startup, before serving). Reservations come back
    /// Held; `available = stocked - sold - held`, clamped at 0 with the shortfall reported
    /// in the summary (and paid off by the first units that come back). New ids never
    /// collide with restored ones: same-epoch ids raise the counter floor. Idempotency
    /// records count as created at `now`.
    pub fn restore(&self, state: RestoreState, now: u64) -> RestoreSummary {
        let mut sum = RestoreSummary::default();
        let mut guards = self.lock_all();
        let n = guards.len();
        for (i, g) in guards.iter_mut().enumerate() {
            **g = Shard::new(i, n);
        }
        for rp in state.products {
            let g = &mut guards[self.shard_of(&rp.sku)];
            let mut p = Product::new(rp.spec, rp.stocked);
            p.cold.sold = rp.sold;
            if g.products.insert(rp.sku, p).0.is_some() {
                sum.duplicate_products += 1;
            } else {
                sum.products += 1;
            }
        }
        for (sku, user, units) in state.bought {
            let g = &mut guards[self.shard_of(&sku)];
            match g.products.get_mut(&sku) {
                Some(p) => {
                    let u = p.cold.users.entry(user).or_default();
                    u.bought = u.bought.saturating_add(units);
                }
                None => sum.skipped_rows += 1,
            }
        }
        let mut floor = 0u64;
        for res in state.reservations {
            let g = &mut guards[self.shard_of(&res.sku)];
            let qty = u64::from(res.qty);
            let known = g.products.index_of(&res.sku);
            let Some(product) =
                known.filter(|_| qty > 0 && !g.reservations.contains_key(&res.id.0))
            else {
                sum.skipped_reservations += 1;
                continue;
            };
            if let Some(p) = g.products.at_mut(product) {
                p.reserved = p.reserved.saturating_add(qty);
                if p.tracks_held() {
                    let u: &mut UserUnits = p
                        .cold
                        .users
                        .entry(Arc::from(res.user.as_str()))
                        .or_default();
                    u.held = u.held.saturating_add(qty);
                }
            }
            if res.id.epoch() == self.epoch {
                floor = floor.max(res.id.counter().saturating_add(1));
            }
            let wheel = Some(g.wheel.insert(res.expires_at, res.id.0));
            let idem = self.idem_key(&res.user, &res.req, &res.sku);
            g.reservations.insert(
                res.id.0,
                Entry {
                    res: ResHandle::new(res, State::Held as u8, idem.key, idem::UNKNOWN_SEQ),
                    product,
                    wheel,
                },
            );
            sum.reservations += 1;
        }
        for g in guards.iter_mut() {
            for (sku, p) in g.products.iter_mut() {
                let used = p.cold.sold.saturating_add(p.reserved);
                if used > p.cold.stocked {
                    p.available = 0;
                    p.deficit = used - p.cold.stocked;
                    sum.deficits.push((Arc::clone(sku), p.deficit));
                } else {
                    p.available = p.cold.stocked - used;
                }
            }
        }
        for (user, req, sku, id, ended) in state.idempotency {
            if id.epoch() == self.epoch {
                floor = floor.max(id.counter().saturating_add(1));
            }
            let key = self.idem_key(&user, &req, &sku);
            let g = &mut guards[self.shard_of(&sku)];
            if !g.products.contains_key(&sku) {
                sum.skipped_rows += 1;
                continue;
            }
            // A record whose reservation is not live any more has ended.
            let rec = IdemRec {
                id,
                check: key.check,
                ended: ended || !g.reservations.contains_key(&id.0),
            };
            g.insert_idem(key.key, rec, now, self.idem_cap);
            sum.idempotency += 1;
        }
        for (i, g) in guards.iter_mut().enumerate() {
            g.raise_floor(floor);
            self.note_products(g);
            self.note_index(i, g);
        }
        self.fresh_floor.store(floor, Ordering::Release);
        self.restored_any
            .store(sum.reservations > 0, Ordering::Release);
        sum
    }

    /// Everything, in the shape `restore` takes (all shards locked at once, so it is a
    /// consistent cut). Live reservations in any state are listed (a restore makes them
    /// Held); products are sorted by SKU and reservations by id. Idempotency records are
    /// listed for live reservations only: an ended one keeps no strings (the durable copy
    /// of those is in Redis, with its TTL).
    pub fn snapshot(&self) -> RestoreState {
        let guards = self.lock_all();
        let mut st = RestoreState::default();
        for g in &guards {
            for (sku, p) in g.products.iter() {
                st.products.push(RestoredProduct {
                    sku: Arc::clone(sku),
                    spec: p.spec,
                    stocked: p.cold.stocked,
                    sold: p.cold.sold,
                });
                for (user, u) in &p.cold.users {
                    if u.bought > 0 {
                        st.bought
                            .push((Arc::clone(sku), Arc::clone(user), u.bought));
                    }
                }
            }
            st.reservations
                .extend(g.reservations.values().map(|e| Reservation::clone(&e.res)));
            // Records keep no strings: only those of live reservations can be listed.
            for rec in g.idem.records().filter(|r| !r.ended) {
                if let Some(e) = g.reservations.get(&rec.id.0) {
                    st.idempotency.push(e.res.live_idem());
                }
            }
        }
        drop(guards);
        st.products.sort_by(|a, b| a.sku.cmp(&b.sku));
        st.bought.sort();
        st.reservations.sort_by_key(|r| r.id);
        st.idempotency.sort_by_key(|i| i.3);
        st
    }
}
