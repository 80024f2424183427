//! The inventory core's vocabulary: ids, reservations, product specs and counts, requests,
//! outcomes, errors and the restore/snapshot shape.
//!
//! Plain data, plus the one atomic a [`ResHandle`] shares with the core (its state). Nothing
//! here locks, allocates on a hot path beyond what a caller hands in (and a handle's one
//! allocation per reservation), or knows about Redis or the wire protocol; mapping
//! [`InvError`] to protocol error codes is the gateway's job (the table is in docs/inventory.md and on [`InvError::code`]).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use super::counted::Counted;

/// Bits of a [`ResId`] that hold the per-epoch counter; the epoch sits above them.
pub const COUNTER_BITS: u32 = 40;
/// Largest counter value (exclusive bound is `1 << COUNTER_BITS`).
pub const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// Epochs are kept modulo `1 << 24` (the bits above the counter).
pub const EPOCH_MASK: u32 = (1 << (64 - COUNTER_BITS)) - 1;

/// A reservation id: `epoch` in the high 24 bits, a counter in the low 40 bits.
///
/// The gateway takes a fresh epoch (Redis `INCR`) at every start, so ids never repeat across
/// restarts. The text form is `r<epoch>-<counter>` in decimal, e.g. `r7-1234`: at most
/// 23 chars, all from `[A-Za-z0-9_.:-]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResId(pub u64);

impl ResId {
    /// Builds an id from its parts; the epoch is taken modulo 2^24, the counter modulo 2^40.
    pub fn new(epoch: u32, counter: u64) -> ResId {
        ResId((u64::from(epoch & EPOCH_MASK) << COUNTER_BITS) | (counter & COUNTER_MASK))
    }

    /// The epoch (24 bits) this id was issued in.
    pub fn epoch(self) -> u32 {
        // The shift leaves at most 24 significant bits, so the cast is lossless.
        (self.0 >> COUNTER_BITS) as u32
    }

    /// The per-epoch counter (40 bits).
    pub fn counter(self) -> u64 {
        self.0 & COUNTER_MASK
    }

    /// Parses a client-supplied string; anything that is not the canonical text form of an
    /// id gives `None` (the caller answers `not_found`). Never panics.
    pub fn parse(s: &str) -> Option<ResId> {
        let rest = s.strip_prefix('r')?;
        let (e, c) = rest.split_once('-')?;
        let epoch = parse_canonical_decimal(e)?;
        let counter = parse_canonical_decimal(c)?;
        if epoch > u64::from(EPOCH_MASK) || counter > COUNTER_MASK {
            return None;
        }
        // epoch <= EPOCH_MASK was checked just above.
        Some(ResId::new(epoch as u32, counter))
    }
}

/// Digits only, no sign, no leading zero (so every id has exactly one text form), <= 20 chars.
fn parse_canonical_decimal(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 1 && b[0] == b'0' {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for ResId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}-{}", self.epoch(), self.counter())
    }
}

/// The error of [`ResId::from_str`]: the string is not a reservation id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a reservation id")]
pub struct ParseResIdError;

impl FromStr for ResId {
    type Err = ParseResIdError;
    fn from_str(s: &str) -> Result<ResId, ParseResIdError> {
        ResId::parse(s).ok_or(ParseResIdError)
    }
}

/// A live reservation as the core hands it out: the reservation's fields (through `Deref`)
/// and, shared with the core, where it is in its two-phase life. Cloning it is one reference
/// count. `Inventory::confirm` flips its state without taking the shard lock, so the durable
/// write's success costs the core no lock round trip. The count is `Counted` (`counted.rs`):
/// a reserve's two handles are born with a count of 2, and the last handle frees without a
/// locked instruction.
#[derive(Clone)]
pub struct ResHandle(pub(crate) Counted<Live>);

pub(crate) struct Live {
    pub res: Reservation,
    /// A `shard::State` as `u8`. Every change happens under the shard lock except
    /// Pending -> Held (`Inventory::confirm`, a compare-and-swap): so under the lock a state
    /// other than Pending is stable, and Pending may become Held at any moment.
    pub state: AtomicU8,
    /// The key of its idempotency record (`IdemKey::key`), and where `insert_new` put that
    /// record in the shard's ring (`idem::UNKNOWN_SEQ` for a restored reservation), so
    /// ending the reservation marks it without a lookup. Here rather than in the shard's
    /// `Entry`, which they would make 56 bytes instead of 24 (a map bucket then straddles
    /// two cache lines, each written by every reserve).
    pub idem_key: u64,
    pub idem_seq: u64,
}

impl Live {
    #[inline(always)]
    fn new(res: Reservation, state: u8, idem_key: u64, idem_seq: u64) -> Live {
        Live {
            res,
            state: AtomicU8::new(state),
            idem_key,
            idem_seq,
        }
    }
}

impl ResHandle {
    pub(crate) fn new(res: Reservation, state: u8, idem_key: u64, idem_seq: u64) -> ResHandle {
        ResHandle(Counted::new(Live::new(res, state, idem_key, idem_seq)))
    }

    /// Two handles of a new reservation (the shard's and the caller's), with no atomic
    /// read-modify-write (`Counted::pair`).
    #[inline(always)]
    pub(crate) fn pair(
        res: Reservation,
        state: u8,
        idem_key: u64,
        idem_seq: u64,
    ) -> (ResHandle, ResHandle) {
        let (a, b) = Counted::pair(Live::new(res, state, idem_key, idem_seq));
        (ResHandle(a), ResHandle(b))
    }

    /// The reservation's data, to keep or compare.
    pub fn reservation(&self) -> &Reservation {
        &self.0.res
    }
}

impl std::ops::Deref for ResHandle {
    type Target = Reservation;
    fn deref(&self) -> &Reservation {
        &self.0.res
    }
}

impl fmt::Debug for ResHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.res.fmt(f)
    }
}

/// Compares the reservations (not the states).
impl PartialEq for ResHandle {
    fn eq(&self, other: &ResHandle) -> bool {
        self.0.res == other.0.res
    }
}

impl Eq for ResHandle {}

/// A live reservation as the caller sees it. Price and expiry are fixed at reserve time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub id: ResId,
    pub user: Text,
    pub req: Text,
    pub room: Text,
    pub referrer: Option<Text>,
    pub sku: Text,
    pub qty: u32,
    pub price_cents: i64,
    /// Unix ms; `now + ttl_s * 1000` of the product at reserve time.
    pub expires_at: u64,
}

impl Reservation {
    /// The idempotency record of this reservation while it is live: its (user, req, sku)
    /// made it, and it has not ended (what a snapshot lists and a restore rebuilds).
    pub fn live_idem(&self) -> RestoredIdem {
        (
            Arc::from(self.user.as_str()),
            Arc::from(self.req.as_str()),
            Arc::from(self.sku.as_str()),
            self.id,
            false,
        )
    }
}

/// What an anchor sets on a product (stock is separate: see `upsert` and `restock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProductSpec {
    pub price_cents: i64,
    /// Max units per user (held + bought); 0 = no limit.
    pub limit_per_user: u32,
    /// Reservation time to live in seconds; must be >= 1.
    pub ttl_s: u32,
}

/// Unit counts of one SKU. `available == stocked - reserved - sold` and
/// `reserved + sold <= stocked` always hold (except after a restore that reported a deficit,
/// see [`RestoreSummary::deficits`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProductCounts {
    /// Units ever stocked (initial stock plus every restock).
    pub stocked: u64,
    /// Units that can be reserved now.
    pub available: u64,
    /// Units held by live reservations (any state).
    pub reserved: u64,
    /// Units bought (checkout committed).
    pub sold: u64,
}

/// A string the core keeps by value: up to 24 bytes inline (no allocation), longer ones on
/// the heap, never reference counted. The request's strings move into the reservation, so
/// handing them over and dropping the reservation cost no atomic instruction (until the
/// tenth round these were `Arc<str>`: four reference counts up and down per reservation,
/// each a locked instruction, docs/inventory.md).
pub type Text = compact_str::CompactString;

/// Input of `Inventory::reserve`. Its strings move into the reservation.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    pub user: Text,
    pub req: Text,
    pub room: Text,
    pub referrer: Option<Text>,
    pub sku: Text,
    pub qty: u32,
    /// Unix ms.
    pub now: u64,
}

/// Result of a successful `reserve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Units were taken; the reservation is Pending until `confirm`/`abort_reserve`.
    New(ResHandle),
    /// The same (user, req, sku) already made this reservation and it is still Held: nothing
    /// was taken, answer the client with the same reservation again.
    Existing(ResHandle),
}

impl ReserveOutcome {
    /// The reservation, whichever way it came.
    pub fn reservation(&self) -> &Reservation {
        match self {
            ReserveOutcome::New(r) | ReserveOutcome::Existing(r) => r,
        }
    }
}

/// Errors of the inventory core. Protocol code for each: [`InvError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvError {
    #[error("unknown sku")]
    UnknownSku,
    #[error("sold out: {available} available")]
    SoldOut { available: u64 },
    #[error("limit of {limit} per user exceeded: {held} already held or bought")]
    LimitExceeded { limit: u32, held: u64 },
    #[error("qty must be 1..=99")]
    InvalidQty,
    #[error("reservation not found")]
    NotFound,
    #[error("reservation {id} expired")]
    Expired { id: ResId },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("the earlier request with this req is still being recorded; retry")]
    InFlight,
    #[error("the reservation {id} made by this req has already ended")]
    Ended { id: ResId },
    /// Input that no state could make valid (negative price, zero ttl, empty or duplicate id
    /// list). Not in the brief's list; added so such input is not reported as a conflict.
    #[error("invalid: {0}")]
    Invalid(&'static str),
}

impl InvError {
    /// The protocol error code (protocol.md "Errors") this error is answered with.
    pub fn code(&self) -> &'static str {
        match self {
            InvError::UnknownSku | InvError::NotFound => "not_found",
            InvError::SoldOut { .. } => "sold_out",
            InvError::LimitExceeded { .. } => "limit_exceeded",
            InvError::Expired { .. } => "expired",
            InvError::Conflict(_) | InvError::InFlight | InvError::Ended { .. } => "conflict",
            InvError::InvalidQty | InvError::Invalid(_) => "bad_request",
        }
    }
}

/// Construction parameters of `Inventory`.
#[derive(Clone, Copy, Debug)]
pub struct InventoryConfig {
    /// Number of lock shards (clamped to 1..=4096, then rounded up to a power of two).
    /// Around 4-8x the core count is plenty.
    pub shards: usize,
    /// This process's epoch (fresh from Redis `INCR` at start); kept modulo 2^24.
    pub epoch: u32,
    /// How long an idempotency record is kept after the reserve that created it (ms).
    pub idempotency_ttl_ms: u64,
    /// Idempotency records kept in all shards together (at most 2^31). One shard may hold
    /// all of them (the hot SKU of a rush needs the window, not `cap / shards` of it); past
    /// the cap, each `take_due` sweep drops every shard's oldest records in proportion to
    /// its share, and a shard never holds more than the cap. See docs/inventory.md.
    pub idempotency_cap: usize,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            shards: 64,
            epoch: 0,
            idempotency_ttl_ms: 24 * 3600 * 1000,
            idempotency_cap: 1_000_000,
        }
    }
}

/// One product as recorded durably (`P:product:{sku}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredProduct {
    pub sku: Arc<str>,
    pub spec: ProductSpec,
    pub stocked: u64,
    pub sold: u64,
}

/// One idempotency record: (user, req, sku) made reservation `id`, which has `ended` or not.
pub type RestoredIdem = (Arc<str>, Arc<str>, Arc<str>, ResId, bool);

/// Everything the core needs to rebuild itself; also what `snapshot` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreState {
    pub products: Vec<RestoredProduct>,
    /// (sku, user, units bought) for per-user limits.
    pub bought: Vec<(Arc<str>, Arc<str>, u64)>,
    /// Live reservations; they are all restored as Held.
    pub reservations: Vec<Reservation>,
    pub idempotency: Vec<RestoredIdem>,
}

/// What `restore` did with what it was given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    pub products: usize,
    pub reservations: usize,
    pub idempotency: usize,
    /// Products listed twice (the later one wins).
    pub duplicate_products: usize,
    /// Reservations for an unknown SKU or with an id seen before, or with qty 0: not restored.
    pub skipped_reservations: usize,
    /// `bought` or idempotency rows for an unknown SKU: not restored.
    pub skipped_rows: usize,
    /// SKUs where `stocked - sold - held` was negative: (sku, missing units). Their
    /// `available` is clamped to 0 and the first units that come back pay the deficit off
    /// before any becomes available again, so nothing is sold twice.
    pub deficits: Vec<(Arc<str>, u64)>,
}
