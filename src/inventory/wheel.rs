//! The expiry index of one shard: a timing wheel of `SLOTS` buckets of `TICK_MS` each,
//! holding `(expires_at, id)` of every Pending and Held reservation that has outlived a
//! sweep, and nothing else (newer ones wait in the shard's `fresh` list, which the next sweep
//! moves in here).
//!
//! Insert and remove are O(1) with no allocation once a bucket has grown (the reservation
//! keeps its [`Pos`]; a removal moves the bucket's last entry into the hole, and the caller
//! updates that entry's position). A sweep looks only at the buckets between the last
//! sweep and `now`, so it costs O(ticks passed + entries looked at), never O(held).
//! Reservations further out than one turn of the wheel share buckets with nearer ones and
//! are passed over (not due) until their turn comes. The wheel knows nothing of states or
//! reservations: the shard keeps it in step (an entry is in the wheel exactly while Pending
//! or Held and not in `fresh`; a sweep passes over a due Pending one and puts it back at the
//! cursor).

/// Width of one bucket in ms.
pub(crate) const TICK_MS: u64 = 100;
/// Number of buckets (one turn: `SLOTS * TICK_MS` = 102.4 s).
pub(crate) const SLOTS: u64 = 1024;

/// Where an entry sits: bucket and index in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos {
    pub slot: u32,
    pub idx: u32,
}

/// The buckets to look at in one sweep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub first: u64,
    pub count: u64,
    last: u64,
    /// The sweep covers every bucket once (more than a turn passed): afterwards the
    /// cursor may jump to `last`.
    full_turn: bool,
}

/// Invariant: an entry with `expires_at / TICK_MS >= cursor` is in bucket
/// `(expires_at / TICK_MS) % SLOTS`; one with `expires_at / TICK_MS < cursor` (it became
/// Held again, or was passed over while Pending, after its time had been swept past) is in
/// bucket `cursor % SLOTS`. The cursor only
/// moves forward, and only past ticks whose due entries have all been taken.
#[repr(C)]
pub(crate) struct Wheel {
    len: usize,
    cursor: u64,
    buckets: Box<[Vec<(u64, u64)>]>,
}

impl Wheel {
    pub(crate) fn new() -> Wheel {
        Wheel {
            buckets: (0..SLOTS).map(|_| Vec::new()).collect(),
            cursor: 0,
            len: 0,
        }
    }

    fn slot_of(tick: u64) -> u32 {
        // < SLOTS (1024): the cast is lossless.
        (tick % SLOTS) as u32
    }

    /// Adds `id` expiring at `expires_at`; returns where it went.
    pub(crate) fn insert(&mut self, expires_at: u64, id: u64) -> Pos {
        let tick = (expires_at / TICK_MS).max(self.cursor);
        let slot = Self::slot_of(tick);
        let b = &mut self.buckets[slot as usize];
        // A bucket never holds more than all reservations of a shard (well below 2^32).
        let idx = b.len() as u32;
        b.push((expires_at, id));
        self.len += 1;
        Pos { slot, idx }
    }

    /// The entry at `p`, if any.
    pub(crate) fn get(&self, p: Pos) -> Option<(u64, u64)> {
        self.buckets
            .get(p.slot as usize)
            .and_then(|b| b.get(p.idx as usize))
            .copied()
    }

    /// Removes the entry at `p`. If another entry moved into `p`, returns its id: the caller
    /// must record `p` as that entry's new position.
    pub(crate) fn remove(&mut self, p: Pos) -> Option<u64> {
        let b = self.buckets.get_mut(p.slot as usize)?;
        let i = p.idx as usize;
        if i >= b.len() {
            return None;
        }
        b.swap_remove(i);
        self.len -= 1;
        b.get(i).map(|&(_, id)| id)
    }

    /// What a sweep at `now` must look at; `None` if the wheel is empty (the cursor then
    /// catches up with `now` at once).
    pub(crate) fn plan(&mut self, now: u64) -> Option<Plan> {
        let last = now / TICK_MS;
        if self.len == 0 {
            self.cursor = self.cursor.max(last);
            return None;
        }
        if last < self.cursor {
            // The clock is behind the sweeps: anything due is in the cursor's bucket.
            return Some(Plan {
                first: self.cursor,
                count: 1,
                last,
                full_turn: false,
            });
        }
        let span = last - self.cursor + 1;
        Some(Plan {
            first: self.cursor,
            count: span.min(SLOTS),
            last,
            full_turn: span > SLOTS,
        })
    }

    /// The bucket of the plan's `k`-th tick.
    pub(crate) fn plan_slot(plan: &Plan, k: u64) -> u32 {
        Self::slot_of(plan.first + k)
    }

    /// Every due entry of the plan's `k`-th tick has been taken.
    pub(crate) fn swept(&mut self, plan: &Plan, k: u64) {
        let tick = plan.first + k;
        if tick < plan.last {
            self.cursor = self.cursor.max(tick + 1);
        }
    }

    /// Every bucket of the plan has been swept completely.
    pub(crate) fn swept_all(&mut self, plan: &Plan) {
        if plan.full_turn {
            self.cursor = self.cursor.max(plan.last);
        }
    }

    /// Number of entries in all buckets.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of entries in bucket `slot`.
    pub(crate) fn bucket_len(&self, slot: u32) -> usize {
        self.buckets.get(slot as usize).map_or(0, Vec::len)
    }
}
