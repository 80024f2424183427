//! One lock shard of the inventory: the products whose SKU hashes here, their reservations,
//! the expiry index (a timing wheel, `wheel.rs`, fed from a list of the reservations made
//! since the last sweep) and the idempotency records of reserves on those products (a ring
//! with an index, `idem.rs`).
//!
//! Everything here runs with the shard's lock held, so it must stay short: no I/O, no clock,
//! no allocation beyond growing its maps, wheel buckets and record ring, no call back into
//! the `Inventory`, and no panics (counts use saturating arithmetic; the invariants are
//! checked by the tests).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::hash::BuildHasher;

use rustc_hash::{FxBuildHasher, FxHashMap};

use super::idem::IdemTable;
use super::keyhash::same_bytes;
use super::prefetch::prefetch_write;
use super::resmap::ResMap;
use super::types::{
    InvError, ProductCounts, ProductSpec, ResHandle, ResId, Reservation, ReserveOutcome,
    ReserveRequest, COUNTER_MASK,
};
use super::wheel::{Pos, Wheel};

/// Where a reservation is in its two-phase life (kept in its `ResHandle` as a `u8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum State {
    /// Units taken, durable write in flight (`confirm` / `abort_reserve`).
    Pending,
    /// Durable; may be released, bought or expire.
    Held,
    /// `begin_release` done, waiting for `finish_release`.
    Releasing,
    /// `begin_checkout` done, waiting for `finish_checkout`.
    CheckingOut,
    /// Handed out by `take_due`, waiting for `finish_expire`.
    Expiring,
    /// No longer in the shard (committed end, or aborted): a handle still held by a caller
    /// shows this, so a late `confirm` fails.
    Ended,
}

impl State {
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Held => "held",
            State::Releasing => "releasing",
            State::CheckingOut => "checking out",
            State::Expiring => "expiring",
            State::Ended => "ended",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Pending,
            1 => State::Held,
            2 => State::Releasing,
            3 => State::CheckingOut,
            4 => State::Expiring,
            _ => State::Ended,
        }
    }

    /// Pending -> Held on `h`, without the shard lock (the only transition made without it).
    pub(crate) fn confirm(h: &ResHandle) -> Result<(), InvError> {
        claim(h, State::Pending, State::Held)
    }
}

/// `from` -> `to` on `h`'s state by compare-and-swap, the way every transition that may race
/// the lock-free confirm is made; `Conflict` naming the state found otherwise.
fn claim(h: &ResHandle, from: State, to: State) -> Result<(), InvError> {
    h.0.state
        .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
        .map(|_| ())
        .map_err(|now| wrong_state(h.id, State::from_u8(now), from.name()))
}

pub(crate) fn wrong_state(id: ResId, s: State, wanted: &str) -> InvError {
    InvError::Conflict(format!("reservation {id} is {}, not {wanted}", s.name()))
}

/// A live reservation in its shard.
pub(crate) struct Entry {
    /// Shared with the callers it was handed to (handing it out is one reference count, not
    /// one per string); holds the state.
    /// It also holds the key and place of the reservation's idempotency record (`Live`).
    pub res: ResHandle,
    /// Its product's index in the shard's `Products`.
    pub product: u32,
    /// Its place in the expiry index: `Some` exactly while Pending or Held. A position
    /// whose slot is `FRESH` is an index into the shard's `fresh` list (made since the last
    /// sweep), any other a place in the wheel.
    pub wheel: Option<Pos>,
}

impl Entry {
    pub(crate) fn state(&self) -> State {
        State::from_u8(self.res.0.state.load(Ordering::Acquire))
    }

    /// Sets the state (with the shard locked).
    pub(crate) fn set_state(&self, s: State) {
        self.res.0.state.store(s as u8, Ordering::Release);
    }
}

/// Units of one SKU that one user holds (any live state) and has bought.
#[derive(Default, Clone, Copy)]
pub(crate) struct UserUnits {
    pub held: u64,
    pub bought: u64,
}

/// A product's counts and spec, and a pointer to the rest. `repr(C)`: with the inline SKU
/// before it (`ProductSlot`), one cache line.
#[repr(C)]
pub(crate) struct Product {
    pub available: u64,
    pub reserved: u64,
    /// Units owed after a restore found `stocked - sold - held < 0` (normally 0); units that
    /// come back pay this off before they become available.
    pub deficit: u64,
    pub spec: ProductSpec,
    /// What a reserve and a release do not read, out of the product's line.
    pub cold: Box<ProductCold>,
}

/// The part of a product a reserve and a release do not read, kept out of its slot so
/// that a shard's products are one cache line each (`ProductSlot`).
#[derive(Default)]
pub(crate) struct ProductCold {
    pub stocked: u64,
    pub sold: u64,
    pub users: FxHashMap<Arc<str>, UserUnits>,
}

impl Product {
    pub(crate) fn new(spec: ProductSpec, stock: u64) -> Product {
        Product {
            spec,
            available: stock,
            reserved: 0,
            deficit: 0,
            cold: Box::new(ProductCold {
                stocked: stock,
                sold: 0,
                users: FxHashMap::default(),
            }),
        }
    }

    pub(crate) fn counts(&self) -> ProductCounts {
        ProductCounts {
            stocked: self.cold.stocked,
            available: self.available,
            reserved: self.reserved,
            sold: self.cold.sold,
        }
    }

    /// Units enter `available` (a release, an expiry, an abort or a restock), paying any
    /// deficit first.
    fn add_available(&mut self, qty: u64) {
        let pay = qty.min(self.deficit);
        self.deficit -= pay;
        self.available = self.available.saturating_add(qty - pay);
    }

    /// Whether per-user held units are tracked: only while there is a limit, so the hot
    /// path of an unlimited product never touches the users map. Bought units are always
    /// tracked (a limit set later must count them); held ones are recounted from the
    /// reservations when a limit is set (`Shard::set_spec`).
    pub(crate) fn tracks_held(&self) -> bool {
        self.spec.limit_per_user > 0
    }

    /// A reservation's units go back to available.
    fn give_back(&mut self, user: &str, qty: u64) {
        self.reserved = self.reserved.saturating_sub(qty);
        self.add_available(qty);
        if self.tracks_held() {
            if let Some(u) = self.cold.users.get_mut(user) {
                u.held = u.held.saturating_sub(qty);
                if u.held == 0 && u.bought == 0 {
                    self.cold.users.remove(user);
                }
            }
        }
    }

    /// A reservation's units are bought.
    fn sell(&mut self, user: &str, qty: u64) {
        self.reserved = self.reserved.saturating_sub(qty);
        self.cold.sold = self.cold.sold.saturating_add(qty);
        let track = self.tracks_held();
        let u = match self.cold.users.get_mut(user) {
            Some(u) => u,
            None => self.cold.users.entry(Arc::from(user)).or_default(),
        };
        if track {
            u.held = u.held.saturating_sub(qty);
        }
        u.bought = u.bought.saturating_add(qty);
    }

    /// Adds `delta` units of stock (restock or undo of a negative restock).
    pub(crate) fn add_stock(&mut self, delta: u64) -> Result<ProductCounts, InvError> {
        let stocked = self
            .cold
            .stocked
            .checked_add(delta)
            .ok_or_else(|| InvError::Conflict("stock would overflow".into()))?;
        self.cold.stocked = stocked;
        self.add_available(delta);
        Ok(self.counts())
    }

    /// Removes `delta` units of stock; only units still available can be removed.
    pub(crate) fn remove_stock(&mut self, delta: u64) -> Result<ProductCounts, InvError> {
        if delta > self.available {
            return Err(InvError::Conflict(format!(
                "cannot remove {delta} units: only {} available",
                self.available
            )));
        }
        self.available -= delta;
        self.cold.stocked = self.cold.stocked.saturating_sub(delta);
        Ok(self.counts())
    }
}

/// The hash of a SKU: picks its shard and its slot in the shard's product table, so the
/// reserve path hashes the SKU once.
pub(crate) fn sku_hash(sku: &str) -> u64 {
    FxBuildHasher.hash_one(sku)
}

/// The hash a product table probes with: the SKU hash with its halves swapped. The shard
/// was picked by the hash's low bits, so every SKU of a shard shares them; the table takes
/// its bucket from the low bits and its tag from the top ones.
pub(crate) fn table_hash(sku_hash: u64) -> u64 {
    sku_hash.rotate_left(32)
}

/// Longest SKU kept inline in its product's first cache line.
const INLINE_SKU: usize = 15;

/// A SKU's bytes inline when it is at most `INLINE_SKU` long (`len` is then its length, the
/// rest zero); else `len` is `u8::MAX` and the lookup compares the hash and the `Arc`'s bytes
/// (its `ProductKey`, one more cache line). 15 bytes since the tenth round (23 before), so
/// that the whole slot is one line.
#[derive(Clone, Copy)]
#[repr(C)]
struct InlineSku {
    len: u8,
    bytes: [u8; INLINE_SKU],
}

impl InlineSku {
    /// Whether this inline SKU is `sku` (false for a long one, `len == u8::MAX`). Compares
    /// two overlapping words of each side (`same_bytes`: the first and the last 8, or 4,
    /// bytes), which cover every byte of a SKU of 4 to 15 bytes: a few instructions, where a
    /// slice comparison called `memcmp` (~37 instructions a reserve in callgrind, thirteenth
    /// round).
    #[inline]
    fn matches(&self, sku: &[u8]) -> bool {
        // A long SKU's `len` (u8::MAX) is past the inline bytes: `get` says `None`.
        self.bytes
            .get(..usize::from(self.len))
            .is_some_and(|own| same_bytes(own, sku))
    }

    fn of(sku: &str) -> InlineSku {
        let mut bytes = [0u8; INLINE_SKU];
        match bytes.get_mut(..sku.len()) {
            Some(dst) => {
                dst.copy_from_slice(sku.as_bytes());
                // At most INLINE_SKU (15), so it fits a u8.
                InlineSku {
                    len: sku.len() as u8,
                    bytes,
                }
            }
            None => InlineSku {
                len: u8::MAX,
                bytes,
            },
        }
    }
}

/// A product and what finds it: exactly one cache line (`repr(C, align(64))`, 64 bytes: the
/// inline SKU, the counts and spec a reserve and a release read, and the pointer to the
/// rest, `ProductCold`), so finding a product and taking units from it is one line (over
/// many SKUs usually a miss, and often a line the other core wrote last), and a shard's
/// products are a dense array of such lines. Until the tenth round the slot also held the
/// stock and sold counts, the per-user map, the SKU's hash and `Arc`: 192 bytes, two thirds
/// of them never read by a reserve (1.03-1.04x in paired runs without them).
#[repr(C, align(64))]
pub(crate) struct ProductSlot {
    inline: InlineSku,
    product: Product,
}

/// A product's SKU and `sku_hash`, beside its slot (same index in `Products::keys`): read
/// only when the SKU is too long to be inline, and by the sweeps and snapshots.
struct ProductKey {
    hash: u64,
    sku: Arc<str>,
}

impl ProductSlot {
    /// Whether this is the product of `sku`, whose `sku_hash` is `hash` (`key` is its
    /// `ProductKey`, read only for a SKU too long to be inline).
    fn is(&self, key: Option<&ProductKey>, hash: u64, sku: &str) -> bool {
        if usize::from(self.inline.len) <= INLINE_SKU {
            return self.inline.matches(sku.as_bytes());
        }
        key.is_some_and(|k| k.hash == hash && *k.sku == *sku)
    }
}

/// A shard's products: a `Vec` (so a reservation can name its product by index and the
/// `finish_*` calls need no SKU lookup) and a table of indices into it, probed with the SKU
/// hash the caller already computed for the shard. Products are never removed one by one
/// (only a restore resets the whole shard), so an index stays valid for the life of the
/// shard.
///
/// The table is open addressing with linear probing over `u64` entries (0 = empty, else the
/// high 32 bits of `table_hash` above the product's index + 1), at most half full, so a
/// probe ends at an empty entry. Products are only ever added, so it needs no deletion.
/// It replaced a `hashbrown::HashTable<u32>` (thirteenth round): a lookup went from ~100
/// instructions (group probe, tag match, closure, `memcmp`) to a few dozen.
#[derive(Default)]
pub(crate) struct Products {
    index: Vec<u64>,
    list: Vec<ProductSlot>,
    keys: Vec<ProductKey>,
}

/// Smallest product table (entries).
const MIN_PRODUCT_INDEX: usize = 16;

/// The table entry of the product at `i` whose SKU's `table_hash` is `th`.
fn product_entry(th: u64, i: u32) -> u64 {
    (th & !u64::from(u32::MAX)) | (u64::from(i) + 1)
}

impl Products {
    /// The index of `sku`, whose `sku_hash` is `hash`.
    #[inline]
    pub(crate) fn index_hashed(&self, hash: u64, sku: &str) -> Option<u32> {
        let th = table_hash(hash);
        let mask = self.index.len().checked_sub(1)?;
        // The low bits of `table_hash` pick the home entry (they are the SKU hash's high
        // bits; its low ones picked the shard), the high 32 bits are the entry's tag.
        let mut at = th as usize & mask;
        loop {
            let e = *self.index.get(at)?;
            let i = e as u32;
            if i == 0 {
                return None;
            }
            if (e ^ th) >> 32 == 0 {
                let i = i - 1;
                let (slot, key) = (self.list.get(i as usize), self.keys.get(i as usize));
                if slot.is_some_and(|s| s.is(key, hash, sku)) {
                    return Some(i);
                }
            }
            at = (at + 1) & mask;
        }
    }

    /// Puts entry `e` (of `table_hash` `th`) in the first empty place from its home.
    fn place(index: &mut [u64], th: u64, e: u64) {
        let mask = index.len() - 1;
        let mut at = th as usize & mask;
        // The table is at most half full: an empty entry is found.
        while let Some(slot) = index.get_mut(at) {
            if *slot == 0 {
                *slot = e;
                return;
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds product `i` (whose SKU's `sku_hash` is `hash`) to the table, doubling it first
    /// when it would be more than half full.
    fn index_new(&mut self, hash: u64, i: u32) {
        let want = (self.keys.len() + 1) * 2;
        if self.index.len() < want {
            let len = want.next_power_of_two().max(MIN_PRODUCT_INDEX);
            let mut index = vec![0u64; len];
            for (j, k) in self.keys.iter().enumerate() {
                // Fewer than 2^32 products (`insert`).
                let th = table_hash(k.hash);
                Self::place(&mut index, th, product_entry(th, j as u32));
            }
            self.index = index;
        }
        let th = table_hash(hash);
        Self::place(&mut self.index, th, product_entry(th, i));
    }

    /// Where the index's entries are and their count less one (0, 0 when it has none),
    /// for the pre-lock hint (`FilterHint::note_index`).
    pub(crate) fn index_layout(&self) -> (usize, usize) {
        match self.index.len().checked_sub(1) {
            Some(mask) => (self.index.as_ptr() as usize, mask),
            None => (0, 0),
        }
    }

    pub(crate) fn index_of(&self, sku: &str) -> Option<u32> {
        self.index_hashed(sku_hash(sku), sku)
    }

    pub(crate) fn get(&self, sku: &str) -> Option<&Product> {
        let i = self.index_of(sku)?;
        self.list.get(i as usize).map(|s| &s.product)
    }

    pub(crate) fn get_mut(&mut self, sku: &str) -> Option<&mut Product> {
        let i = self.index_of(sku)?;
        self.at_mut(i)
    }

    /// The product at `index` (from `index_of` or a reservation's `Entry::product`).
    pub(crate) fn at_mut(&mut self, index: u32) -> Option<&mut Product> {
        self.list.get_mut(index as usize).map(|s| &mut s.product)
    }

    /// The index and product of `sku`, whose `sku_hash` is `hash`.
    pub(crate) fn find_mut(&mut self, hash: u64, sku: &str) -> Option<(u32, &mut Product)> {
        let i = self.index_hashed(hash, sku)?;
        self.at_mut(i).map(|p| (i, p))
    }

    pub(crate) fn contains_key(&self, sku: &str) -> bool {
        self.index_of(sku).is_some()
    }

    /// Adds `sku`, or replaces its product (keeping its index) and returns the old one;
    /// also says whether the products moved in memory (the list grew into a new buffer).
    pub(crate) fn insert(&mut self, sku: Arc<str>, p: Product) -> (Option<Product>, bool) {
        let hash = sku_hash(&sku);
        if let Some(i) = self.index_hashed(hash, &sku) {
            let old = self
                .list
                .get_mut(i as usize)
                .map(|slot| std::mem::replace(&mut slot.product, p));
            return (old, false);
        }
        let before = self.list.as_ptr();
        // At most one product per upsert; 2^32 products in one shard is far beyond memory.
        let i = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        self.index_new(hash, i);
        self.list.push(ProductSlot {
            inline: InlineSku::of(&sku),
            product: p,
        });
        self.keys.push(ProductKey { hash, sku });
        (None, self.list.as_ptr() != before)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Product)> {
        self.keys
            .iter()
            .zip(&self.list)
            .map(|(k, s)| (&k.sku, &s.product))
    }

    /// The SKU hash and slot address of the product added last (for prefetch hints only).
    pub(crate) fn last_place(&self) -> Option<(u64, usize)> {
        self.keys
            .last()
            .zip(self.list.last())
            .map(|(k, s)| (k.hash, s as *const ProductSlot as usize))
    }

    /// Each product's SKU hash and the address of its slot (for prefetch hints only).
    pub(crate) fn places(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.keys
            .iter()
            .zip(&self.list)
            .map(|(k, s)| (k.hash, s as *const ProductSlot as usize))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&Arc<str>, &mut Product)> {
        self.keys
            .iter()
            .zip(self.list.iter_mut())
            .map(|(k, s)| (&k.sku, &mut s.product))
    }
}

/// An idempotency key: two independent 64-bit hashes of (user, req, sku). `key` is keyed
/// foldhash with seeds from the OS random source (the table key: a client that does not
/// know the seeds cannot aim collisions at it); `check` is a second hash
/// (rustc-hash) stored in the record. A record keeps no strings, so evicting it touches
/// nothing else; a false match needs both to collide (about N^2 / 2^129).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdemKey {
    pub key: u64,
    pub check: u64,
}

#[derive(Clone, Copy)]
pub(crate) struct IdemRec {
    pub id: ResId,
    pub check: u64,
    /// The reservation has ended (released, bought or expired).
    pub ended: bool,
}

/// `Pos::slot` of a reservation that waits in the shard's `fresh` list (no wheel slot is
/// this large).
pub(crate) const FRESH: u32 = u32::MAX;

/// What a `fresh` entry becomes when its reservation leaves before a sweep. `alloc_id` never
/// issues this id (the last counter of every epoch is not used), and `fresh` only ever holds
/// ids `alloc_id` issued.
pub(crate) const VACATED: u64 = u64::MAX;

/// Most entries `fresh` holds: a reserve that finds it full settles it first (moves what is
/// still live into the wheel), so without a sweeper it stays bounded, and a sweep's work
/// under the lock stays short.
pub(crate) const FRESH_CAP: usize = 1024;

/// `repr(C)`: the fields every reserve writes come first (the id counter, the reservation
/// map's counts, the fresh list's length, the ring's, the staged list's and the filter's) so
/// that with the lock they fill the shard's first three cache lines, and the ones it only
/// reads (the product table, the index, the shard's place) the lines after: those stay
/// shared between the cores instead of moving with every reserve (`Padded::prefetch`).
#[repr(C)]
pub(crate) struct Shard {
    /// The next id of this shard has counter `next_k * nshards + index`, so the shard of a
    /// current-epoch id is `counter % nshards` (no scan, no index map).
    pub next_k: u64,
    pub reservations: ResMap,
    /// Ids of the reservations made since the last sweep, in the order made (`VACATED`
    /// where one has since left Pending/Held). A reserve appends here instead of inserting
    /// into the wheel: a reservation released before the next sweep (every 200 ms in the
    /// gateway) never touches the wheel, and the wheel's bucket, a line both cores would
    /// write, is off the reserve path. The sweep (`settle_fresh`) moves the live ones into
    /// the wheel before it looks for due ones.
    pub fresh: Vec<u64>,
    /// Idempotency records keyed by the keyed hash of (user, req, sku), oldest first.
    pub idem: IdemTable,
    /// (expires_at, id) of the Pending and Held reservations that are not in `fresh`, in a
    /// timing wheel. After `idem`: a reserve does not write it.
    pub wheel: Wheel,
    pub products: Products,
    index: u64,
    nshards: u64,
}

impl Shard {
    pub(crate) fn new(index: usize, nshards: usize) -> Shard {
        Shard {
            index: index as u64,
            nshards: nshards as u64,
            next_k: 0,
            products: Products::default(),
            reservations: ResMap::default(),
            fresh: Vec::new(),
            wheel: Wheel::new(),
            idem: IdemTable::new(),
        }
    }

    /// Makes every id this shard issues from now on have a counter >= `floor`.
    pub(crate) fn raise_floor(&mut self, floor: u64) {
        let k = floor.saturating_sub(self.index).div_ceil(self.nshards);
        self.next_k = self.next_k.max(k);
    }

    pub(crate) fn reserve(
        &mut self,
        r: ReserveRequest,
        sku_hash: u64,
        idem_key: IdemKey,
        epoch: u32,
        idem_cap: usize,
    ) -> Result<ReserveOutcome, InvError> {
        self.prefetch_appends(epoch);
        // Disjoint field borrows: the product stays borrowed while the other maps are used.
        let Some((pidx, product)) = self.products.find_mut(sku_hash, &r.sku) else {
            return Err(InvError::UnknownSku);
        };
        if let Some(rec) = self.idem.get(idem_key.key) {
            if rec.check != idem_key.check {
                return Err(collision());
            }
            if rec.ended {
                return Err(InvError::Ended { id: rec.id });
            }
            return match self.reservations.get(&rec.id.0) {
                Some(e) if e.res.user != r.user || e.res.req != r.req || e.res.sku != r.sku => {
                    Err(collision())
                }
                Some(e) if e.state() == State::Held => Ok(ReserveOutcome::Existing(e.res.clone())),
                Some(_) => Err(InvError::InFlight),
                None => Err(InvError::Ended { id: rec.id }),
            };
        }
        let qty = u64::from(r.qty);
        let limit = product.spec.limit_per_user;
        if limit > 0 {
            let used = product
                .cold
                .users
                .get(&*r.user)
                .map_or(0, |u| u.held.saturating_add(u.bought));
            if used.saturating_add(qty) > u64::from(limit) {
                return Err(InvError::LimitExceeded { limit, held: used });
            }
        }
        if product.available < qty {
            return Err(InvError::SoldOut {
                available: product.available,
            });
        }
        let id = alloc_id(&mut self.next_k, self.index, self.nshards, epoch)?;
        let now = r.now;
        let expires_at = now.saturating_add(u64::from(product.spec.ttl_s).saturating_mul(1000));
        // The handle and its second reference (one for the map, one for the caller) before
        // this reserve writes any line another core may hold: the count's locked
        // instruction waits for every earlier store to reach the cache, so after those
        // stores it would wait, under the lock, for their lines to come over (fourteenth
        // round). Nothing below can fail.
        let seq = self.idem.next_seq();
        let (res, out) = ResHandle::pair(
            Reservation {
                id,
                user: r.user,
                req: r.req,
                room: r.room,
                referrer: r.referrer,
                sku: r.sku,
                qty: r.qty,
                price_cents: product.spec.price_cents,
                expires_at,
            },
            State::Pending as u8,
            idem_key.key,
            seq,
        );
        product.available -= qty;
        product.reserved = product.reserved.saturating_add(qty);
        if limit > 0 {
            match product.cold.users.get_mut(&*res.user) {
                Some(u) => u.held = u.held.saturating_add(qty),
                None => {
                    product.cold.users.insert(
                        Arc::from(res.user.as_str()),
                        UserUnits {
                            held: qty,
                            bought: 0,
                        },
                    );
                }
            }
        }
        let rec = IdemRec {
            id,
            check: idem_key.check,
            ended: false,
        };
        // `get` found no record of this key above, and nothing since added one.
        let at = self.idem.insert_new(idem_key.key, rec, now, idem_cap);
        debug_assert_eq!(at, seq, "a record goes where next_seq said");
        // Pending ones are in the expiry index too: `confirm` makes them Held without the
        // lock, so it cannot insert them; a sweep passes over a due Pending one.
        let wheel = Some(self.add_fresh(id.0));
        self.reservations.insert(
            id.0,
            Entry {
                res,
                product: pidx,
                wheel,
            },
        );
        Ok(ReserveOutcome::New(out))
    }

    /// Hints, as soon as the lock is held, that the lines a new reservation appends to will
    /// be written: the record ring's next slot and the staged list's end (`idem.rs`), the
    /// end of `fresh`, and the reservation map's home slot of the next id. Each is a line
    /// of this shard that whichever core served it last wrote; fetched here, their
    /// transfers overlap the product and filter lookups instead of stalling the stores at
    /// the end of the reserve (or the next locked instruction, which waits for them):
    /// 1.10x on two threads over many SKUs, 1.01x on one (fourteenth round).
    #[inline]
    fn prefetch_appends(&self, epoch: u32) {
        self.idem.prefetch_appends();
        prefetch_write(self.fresh.as_ptr().wrapping_add(self.fresh.len()));
        // The id `alloc_id` will issue (a wrong guess, at the end of an epoch, only wastes
        // the fetch).
        let next = self
            .next_k
            .wrapping_mul(self.nshards)
            .wrapping_add(self.index);
        self.reservations.prefetch_home(ResId::new(epoch, next).0);
    }

    pub(crate) fn insert_idem(&mut self, key: u64, rec: IdemRec, at: u64, cap: usize) {
        self.idem.insert(key, rec, at, cap);
    }

    /// Drops idempotency records created at or before `now - ttl`, then the `trim` oldest;
    /// returns how many are left.
    pub(crate) fn prune_idem(&mut self, now: u64, ttl: u64, trim: usize) -> usize {
        self.idem.prune(now, ttl);
        self.idem.drop_oldest(trim);
        self.idem.clean_pending();
        self.idem.shrink_if_sparse();
        self.idem.len()
    }

    fn entry(&mut self, id: ResId) -> Result<&mut Entry, InvError> {
        self.reservations.get_mut(&id.0).ok_or(InvError::NotFound)
    }

    /// Replaces a product's spec. Setting a limit where there was none recounts the units
    /// each user holds from this shard's reservations; removing it forgets them.
    pub(crate) fn set_spec(&mut self, sku: &str, spec: ProductSpec) -> Option<ProductCounts> {
        let p = self.products.get_mut(sku)?;
        let was = p.tracks_held();
        p.spec = spec;
        match (was, p.tracks_held()) {
            (false, true) => {
                for e in self.reservations.values().filter(|e| &*e.res.sku == sku) {
                    let u = p
                        .cold
                        .users
                        .entry(Arc::from(e.res.user.as_str()))
                        .or_default();
                    u.held = u.held.saturating_add(u64::from(e.res.qty));
                }
            }
            (true, false) => {
                p.cold.users.retain(|_, u| {
                    u.held = 0;
                    u.bought > 0
                });
            }
            _ => {}
        }
        Some(p.counts())
    }

    pub(crate) fn confirm(&mut self, id: ResId) -> Result<(), InvError> {
        let e = self.reservations.get(&id.0).ok_or(InvError::NotFound)?;
        State::confirm(&e.res)
    }

    pub(crate) fn abort(&mut self, id: ResId) -> Result<(), InvError> {
        let e = self.entry(id)?;
        // Under the lock only `confirm` (on a handle) can change a Pending state: claim it.
        claim(&e.res, State::Pending, State::Ended)?;
        let Some(mut e) = self.reservations.remove(&id.0) else {
            return Err(InvError::NotFound);
        };
        if let Some(p) = e.wheel.take() {
            self.unwheel(p);
        }
        if let Some(p) = self.products.at_mut(e.product) {
            p.give_back(&e.res.user, u64::from(e.res.qty));
        }
        self.idem.remove(e.res.0.idem_key, id);
        Ok(())
    }

    /// Moves a Held reservation of `user` (if `user` is given) to `to`, returning a copy.
    pub(crate) fn begin(
        &mut self,
        user: Option<&str>,
        id: ResId,
        to: State,
    ) -> Result<ResHandle, InvError> {
        let e = self
            .reservations
            .get_mut_to_remove(&id.0)
            .ok_or(InvError::NotFound)?;
        if user.is_some_and(|u| !same_bytes(e.res.user.as_bytes(), u.as_bytes())) {
            return Err(InvError::NotFound);
        }
        // Held is stable under the lock (only Pending changes without it).
        let s = e.state();
        if s != State::Held {
            return Err(wrong_state(id, s, "held"));
        }
        e.set_state(to);
        let out = e.res.clone();
        if let Some(p) = e.wheel.take() {
            self.unwheel(p);
        }
        Ok(out)
    }

    /// Appends a new reservation's id to `fresh` (settling it first if full); returns its
    /// position there.
    fn add_fresh(&mut self, raw: u64) -> Pos {
        if self.fresh.len() >= FRESH_CAP {
            self.settle_fresh();
        }
        // At most FRESH_CAP (1024) entries: the index fits a u32.
        let idx = self.fresh.len() as u32;
        self.fresh.push(raw);
        Pos { slot: FRESH, idx }
    }

    /// Moves every reservation still waiting in `fresh` into the wheel and empties the list.
    /// One lookup per entry not vacated. Every path that moves a reservation out of
    /// `fresh` vacates its entry (`unwheel`), so each entry left names a reservation there;
    /// the position is still compared, so that a path that failed to vacate would cost a
    /// lookup, not a second wheel entry.
    fn settle_fresh(&mut self) {
        let fresh = std::mem::take(&mut self.fresh);
        for (idx, &raw) in fresh.iter().enumerate() {
            if raw == VACATED {
                continue;
            }
            let here = Some(Pos {
                slot: FRESH,
                idx: idx as u32,
            });
            if let Some(e) = self.reservations.get_mut(&raw).filter(|e| e.wheel == here) {
                e.wheel = Some(self.wheel.insert(e.res.expires_at, raw));
            }
        }
        self.fresh = fresh;
        self.fresh.clear();
    }

    /// Removes the expiry index entry at `p`: vacates it in `fresh`, or takes it out of the
    /// wheel, updating the entry that moved into its place.
    fn unwheel(&mut self, p: Pos) {
        if p.slot == FRESH {
            if let Some(raw) = self.fresh.get_mut(p.idx as usize) {
                *raw = VACATED;
            }
            return;
        }
        if let Some(moved) = self.wheel.remove(p) {
            if let Some(m) = self.reservations.get_mut(&moved) {
                m.wheel = Some(p);
            }
        }
    }

    /// Checks that `id` is in state `from` (for the validation pass of a batch).
    pub(crate) fn check(&self, id: ResId, from: State) -> Result<(), InvError> {
        let e = self.reservations.get(&id.0).ok_or(InvError::NotFound)?;
        let s = e.state();
        if s != from {
            return Err(wrong_state(id, s, from.name()));
        }
        Ok(())
    }

    /// Ends a transition that left Held: `committed` ends the reservation (`sold` says how
    /// its units go: bought or back to available); otherwise it is Held again.
    pub(crate) fn finish(
        &mut self,
        id: ResId,
        from: State,
        committed: bool,
        sold: bool,
    ) -> Result<(), InvError> {
        if !committed {
            let e = self.reservations.get_mut(&id.0).ok_or(InvError::NotFound)?;
            let s = e.state();
            if s != from {
                return Err(wrong_state(id, s, from.name()));
            }
            e.set_state(State::Held);
            e.wheel = Some(self.wheel.insert(e.res.expires_at, id.0));
            return Ok(());
        }
        // One lookup on the usual path: taken out, put back if it is not in `from`.
        let e = self.reservations.remove(&id.0).ok_or(InvError::NotFound)?;
        let s = e.state();
        if s != from {
            self.reservations.insert(id.0, e);
            return Err(wrong_state(id, s, from.name()));
        }
        e.set_state(State::Ended);
        // Not Held, so not in the wheel.
        let qty = u64::from(e.res.qty);
        if let Some(p) = self.products.at_mut(e.product) {
            if sold {
                p.sell(&e.res.user, qty);
            } else {
                p.give_back(&e.res.user, qty);
            }
        }
        self.idem.end(e.res.0.idem_seq, e.res.0.idem_key, id);
        Ok(())
    }

    /// `NotFound` unless `id` is live and (when `user` is given) belongs to `user`.
    pub(crate) fn check_owner(&self, user: Option<&str>, id: ResId) -> Result<(), InvError> {
        match self.reservations.get(&id.0) {
            Some(e) if user.is_none_or(|u| *e.res.user == *u) => Ok(()),
            _ => Err(InvError::NotFound),
        }
    }

    /// Checkout validation of one id (owner, Held, not expired).
    pub(crate) fn check_checkout(&self, user: &str, id: ResId, now: u64) -> Result<(), InvError> {
        let e = self.reservations.get(&id.0).ok_or(InvError::NotFound)?;
        if *e.res.user != *user {
            return Err(InvError::NotFound);
        }
        let s = e.state();
        if s != State::Held {
            return Err(wrong_state(id, s, "held"));
        }
        if e.res.expires_at <= now {
            return Err(InvError::Expired { id });
        }
        Ok(())
    }

    /// Moves due Held reservations to Expiring, appending them to `out` until it has `max`.
    /// Looks only at the wheel buckets from the last sweep up to `now`, after moving the
    /// reservations made since the last sweep into the wheel.
    pub(crate) fn take_due(&mut self, now: u64, max: usize, out: &mut Vec<ResHandle>) {
        self.settle_fresh();
        let Some(plan) = self.wheel.plan(now) else {
            return;
        };
        // Due but still Pending (their durable write is unsettled): back into the wheel
        // after the sweep, at the cursor, so the next sweep looks at them again.
        let mut deferred: Vec<u64> = Vec::new();
        let mut complete = true;
        'sweep: for k in 0..plan.count {
            let slot = Wheel::plan_slot(&plan, k);
            let mut idx = 0u32;
            while (idx as usize) < self.wheel.bucket_len(slot) {
                let p = Pos { slot, idx };
                let Some((at, raw)) = self.wheel.get(p) else {
                    break;
                };
                if at > now {
                    idx += 1;
                    continue;
                }
                if out.len() >= max {
                    complete = false;
                    break 'sweep;
                }
                // Another entry moves into `p`: look at the same index again.
                self.unwheel(p);
                if let Some(e) = self.reservations.get_mut(&raw) {
                    e.wheel = None;
                    match claim(&e.res, State::Held, State::Expiring) {
                        Ok(_) => out.push(e.res.clone()),
                        Err(_) => deferred.push(raw),
                    }
                }
            }
            self.wheel.swept(&plan, k);
        }
        if complete {
            self.wheel.swept_all(&plan);
        }
        for raw in deferred {
            if let Some(e) = self.reservations.get_mut(&raw) {
                e.wheel = Some(self.wheel.insert(e.res.expires_at, raw));
            }
        }
    }
}

fn alloc_id(next_k: &mut u64, index: u64, nshards: u64, epoch: u32) -> Result<ResId, InvError> {
    let counter = next_k
        .checked_mul(nshards)
        .and_then(|c| c.checked_add(index))
        // `<`: the last counter is never issued, so no id is `VACATED`.
        .filter(|&c| c < COUNTER_MASK)
        .ok_or_else(|| {
            InvError::Conflict("reservation ids of this epoch are used up; restart".into())
        })?;
    *next_k += 1;
    Ok(ResId::new(epoch, counter))
}

/// Two different (user, req, sku) with the same key: practically never; answered as a
/// conflict rather than guessed at.
fn collision() -> InvError {
    InvError::Conflict("idempotency key collision; use another req".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(sku: &str) -> (ProductSlot, ProductKey) {
        let spec = ProductSpec {
            price_cents: 1,
            limit_per_user: 0,
            ttl_s: 1,
        };
        (
            ProductSlot {
                inline: InlineSku::of(sku),
                product: Product::new(spec, 1),
            },
            ProductKey {
                hash: sku_hash(sku),
                sku: Arc::from(sku),
            },
        )
    }

    /// A lookup compares the SKU in full: inline ones by length and bytes, long ones by hash
    /// and bytes (here called directly, as on a table tag collision, which the hash of
    /// real SKUs makes too rare to meet in a test through the table).
    #[test]
    fn a_product_slot_matches_its_own_sku_only() {
        assert_eq!(std::mem::size_of::<ProductSlot>(), 64, "one cache line");
        let is =
            |(slot, key): &(ProductSlot, ProductKey), q: &str| slot.is(Some(key), sku_hash(q), q);
        let ab = slot("ab");
        assert!(is(&ab, "ab"));
        for q in ["", "a", "abc", "ab\0", "ba"] {
            assert!(!is(&ab, q), "{q:?}");
        }
        let s15 = slot("abcdefghijklmno");
        assert!(is(&s15, "abcdefghijklmno"));
        assert!(!is(&s15, "abcdefghijklmnop"));
        assert!(!is(&s15, "abcdefghijklmn"));
        let s16 = slot("abcdefghijklmnop");
        assert!(is(&s16, "abcdefghijklmnop"));
        assert!(!is(&s16, "abcdefghijklmnoq"));
        assert!(!is(&s16, "abcdefghijklmno"));
        // Same hash given, other bytes: still no; and no key, no match.
        assert!(!s16.0.is(
            Some(&s16.1),
            sku_hash("abcdefghijklmnop"),
            "abcdefghijklmnoq"
        ));
        assert!(!s16
            .0
            .is(None, sku_hash("abcdefghijklmnop"), "abcdefghijklmnop"));
    }

    /// The word comparison of an inline SKU covers every byte at every length it handles:
    /// a SKU of each length 0..=15 matches itself, and no SKU of that length that differs
    /// in one byte (at each position), nor one a byte longer or shorter.
    #[test]
    fn an_inline_sku_compares_every_byte_at_every_length() {
        let text = "abcdefghijklmnopq";
        for len in 0..=INLINE_SKU {
            let sku = &text[..len];
            let own = InlineSku::of(sku);
            assert!(own.matches(sku.as_bytes()), "{sku:?}");
            for at in 0..len {
                let mut other = sku.as_bytes().to_vec();
                other[at] = b'Z';
                assert!(!own.matches(&other), "{sku:?} against {other:?}");
            }
            assert!(!own.matches(&text.as_bytes()[..len + 1]), "{sku:?} longer");
            if len > 0 {
                assert!(!own.matches(&text.as_bytes()[..len - 1]), "{sku:?} shorter");
            }
        }
        // A long SKU is never matched inline, not even by 255 bytes (its `len` marker).
        let long = InlineSku::of(&"x".repeat(40));
        assert!(!long.matches("x".repeat(40).as_bytes()));
        assert!(!long.matches("x".repeat(255).as_bytes()));
    }

    /// The product table finds each of many products at its index through the table's
    /// growth (clusters of linear probing included), and no SKU it does not hold.
    #[test]
    fn the_product_table_finds_every_product_and_no_other() {
        let spec = ProductSpec {
            price_cents: 1,
            limit_per_user: 0,
            ttl_s: 1,
        };
        let mut ps = Products::default();
        assert_eq!(ps.index_of("sku-0"), None, "an empty table");
        let skus: Vec<String> = (0..1500)
            .map(|i| match i % 3 {
                0 => format!("sku-{i}"),
                1 => format!("a-much-longer-sku-name-{i}"),
                _ => format!("{i}"),
            })
            .collect();
        for (n, sku) in skus.iter().enumerate() {
            let (old, _) = ps.insert(Arc::from(sku.as_str()), Product::new(spec, 1));
            assert!(old.is_none());
            // Every product so far is still found after each insert (and each doubling).
            if n % 97 == 0 || n + 1 == skus.len() {
                for (i, s) in skus.iter().enumerate().take(n + 1) {
                    assert_eq!(ps.index_of(s), Some(i as u32), "{s}");
                }
            }
        }
        assert!(ps.index.len() >= 2 * skus.len(), "at most half full");
        for missing in [
            "sku-1500",
            "sku-",
            "a-much-longer-sku-name-1501",
            "1502",
            "",
        ] {
            assert_eq!(ps.index_of(missing), None, "{missing}");
        }
        // Inserting a SKU again replaces its product in place.
        let (old, moved) = ps.insert(Arc::from("sku-3"), Product::new(spec, 7));
        assert!(old.is_some() && !moved);
        assert_eq!(ps.get("sku-3").map(|p| p.available), Some(7));
        assert_eq!(ps.index_of("sku-3"), Some(3));
    }
}
