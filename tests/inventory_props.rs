//! Property test of the inventory core against a plain sequential model: random sequences of
//! reserve / confirm / abort / release / checkout / expiry (with random committed flags),
//! restocks and snapshot -> restore. After every step the outcome must equal the model's and
//! every invariant must hold: `available == stocked - reserved - sold`,
//! `reserved + sold <= stocked`, per-user limits, and each reservation ends exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use livegate::inventory::{
    InvError, Inventory, InventoryConfig, ProductCounts, ProductSpec, ResHandle, ResId,
    ReserveOutcome, ReserveRequest, Text,
};
use proptest::prelude::*;

const SKUS: [&str; 3] = ["a", "b", "c"];
const LIMITS: [u32; 3] = [5, 0, 3];
const TTLS: [u32; 3] = [10, 30, 5];
const EPOCH: u32 = 9;

#[derive(Clone, Debug)]
enum Op {
    /// sku index 3 is unknown; qty 0 and 100 are invalid.
    Reserve {
        user: usize,
        req: usize,
        sku: usize,
        qty: u32,
    },
    Confirm(usize),
    Abort(usize),
    BeginRelease {
        user: usize,
        res: usize,
    },
    FinishRelease {
        res: usize,
        committed: bool,
    },
    BeginCheckout {
        user: usize,
        res: Vec<usize>,
    },
    FinishCheckout {
        res: Vec<usize>,
        committed: bool,
    },
    TakeDue,
    FinishExpire {
        res: Vec<usize>,
        committed: bool,
    },
    Restock {
        sku: usize,
        delta: i64,
    },
    Advance(u64),
    SnapshotRestore {
        shards: usize,
    },
    /// Changes a product's limit (0 = none) through `upsert`.
    SetLimit {
        sku: usize,
        limit: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let idx = 0usize..64;
    prop_oneof![
        6 => (0usize..3, 0usize..4, 0usize..4, prop_oneof![9 => 1u32..4, 1 => Just(0u32), 1 => Just(100u32)])
            .prop_map(|(user, req, sku, qty)| Op::Reserve { user, req, sku, qty }),
        4 => idx.clone().prop_map(Op::Confirm),
        1 => idx.clone().prop_map(Op::Abort),
        2 => (0usize..3, idx.clone()).prop_map(|(user, res)| Op::BeginRelease { user, res }),
        2 => (idx.clone(), any::<bool>()).prop_map(|(res, committed)| Op::FinishRelease { res, committed }),
        2 => (0usize..3, prop::collection::vec(idx.clone(), 0..4))
            .prop_map(|(user, res)| Op::BeginCheckout { user, res }),
        2 => (prop::collection::vec(idx.clone(), 0..4), any::<bool>())
            .prop_map(|(res, committed)| Op::FinishCheckout { res, committed }),
        1 => Just(Op::TakeDue),
        2 => (prop::collection::vec(idx.clone(), 0..4), any::<bool>())
            .prop_map(|(res, committed)| Op::FinishExpire { res, committed }),
        1 => (0usize..4, -4i64..6).prop_map(|(sku, delta)| Op::Restock { sku, delta }),
        // Whole seconds too, so `now` lands exactly on expiry times (TTLs are whole seconds).
        2 => prop_oneof![0u64..8000, (0u64..8).prop_map(|s| s * 1000)].prop_map(Op::Advance),
        1 => (1usize..9).prop_map(|shards| Op::SnapshotRestore { shards }),
        1 => (0usize..3, prop_oneof![Just(0u32), 1u32..8])
            .prop_map(|(sku, limit)| Op::SetLimit { sku, limit }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Pending,
    Held,
    Releasing,
    CheckingOut,
    Expiring,
}

#[derive(Clone, Debug)]
struct MRes {
    user: usize,
    sku: usize,
    qty: u32,
    st: St,
    exp: u64,
}

#[derive(Default)]
struct Model {
    limits: [u32; 3],
    /// A lowered limit applies to later reserves only: the "never above the limit" check
    /// is skipped for a SKU once its limit was changed.
    limit_changed: [bool; 3],
    stocked: [u64; 3],
    sold: [u64; 3],
    live: BTreeMap<ResId, MRes>,
    /// (user, req, sku) -> (id, ended)
    idem: HashMap<(usize, usize, usize), (ResId, bool)>,
    bought: HashMap<(usize, usize), u64>,
    /// Every id ever issued, in order (ops pick from here by index).
    ids: Vec<ResId>,
    ended: Vec<ResId>,
    aborted: Vec<ResId>,
    now: u64,
}

impl Model {
    fn reserved(&self, sku: usize) -> u64 {
        self.live
            .values()
            .filter(|r| r.sku == sku)
            .map(|r| u64::from(r.qty))
            .sum()
    }
    fn available(&self, sku: usize) -> u64 {
        self.stocked[sku] - self.sold[sku] - self.reserved(sku)
    }
    fn used(&self, user: usize, sku: usize) -> u64 {
        let held: u64 = self
            .live
            .values()
            .filter(|r| r.sku == sku && r.user == user)
            .map(|r| u64::from(r.qty))
            .sum();
        held + self.bought.get(&(sku, user)).copied().unwrap_or(0)
    }
    fn pick(&self, i: usize) -> ResId {
        if self.ids.is_empty() || i == 63 {
            // Never issued.
            return ResId::new(EPOCH, (1 << 39) + i as u64);
        }
        self.ids[i % self.ids.len()]
    }
    fn end(&mut self, id: ResId, sold: bool) -> Result<(), TestCaseError> {
        let r = self
            .live
            .remove(&id)
            .ok_or_else(|| TestCaseError::fail("end of non-live"))?;
        prop_assert!(!self.ended.contains(&id), "ended twice");
        self.ended.push(id);
        if sold {
            self.sold[r.sku] += u64::from(r.qty);
            *self.bought.entry((r.sku, r.user)).or_default() += u64::from(r.qty);
        }
        for v in self.idem.values_mut() {
            if v.0 == id {
                v.1 = true;
            }
        }
        Ok(())
    }
    /// Batch precondition in the core's order: empty/duplicates, then any unknown (or
    /// foreign) id, then the first in the wrong state.
    fn batch_check(&self, ids: &[ResId], user: Option<usize>, want: St) -> Result<(), InvError> {
        if ids.is_empty() {
            return Err(InvError::Invalid("no reservation ids"));
        }
        let mut s = ids.to_vec();
        s.sort();
        s.dedup();
        if s.len() != ids.len() {
            return Err(InvError::Invalid("duplicate reservation id"));
        }
        for id in ids {
            match self.live.get(id) {
                Some(r) if user.is_none_or(|u| u == r.user) => {}
                _ => return Err(InvError::NotFound),
            }
        }
        for id in ids {
            let r = &self.live[id];
            if r.st != want {
                return Err(InvError::Conflict(String::new()));
            }
            if want == St::Held && r.exp <= self.now {
                return Err(InvError::Expired { id: *id });
            }
        }
        Ok(())
    }
}

/// Compares errors, treating every `Conflict` message as equal.
fn same_err(a: &InvError, b: &InvError) -> bool {
    match (a, b) {
        (InvError::Conflict(_), InvError::Conflict(_)) => true,
        _ => a == b,
    }
}

fn check_unit<T: std::fmt::Debug>(
    got: Result<T, InvError>,
    want: Result<(), InvError>,
) -> Result<Option<T>, TestCaseError> {
    match (got, want) {
        (Ok(v), Ok(())) => Ok(Some(v)),
        (Err(g), Err(w)) if same_err(&g, &w) => Ok(None),
        (g, w) => Err(TestCaseError::fail(format!("got {g:?}, model says {w:?}"))),
    }
}

fn new_inv(shards: usize) -> Inventory {
    Inventory::new(InventoryConfig {
        shards,
        epoch: EPOCH,
        idempotency_ttl_ms: u64::MAX / 4,
        idempotency_cap: 1 << 20,
    })
}

fn check_invariants(inv: &Inventory, m: &Model) -> Result<(), TestCaseError> {
    for (i, sku) in SKUS.iter().enumerate() {
        let c = inv
            .counts(sku)
            .ok_or_else(|| TestCaseError::fail("sku gone"))?;
        let want = ProductCounts {
            stocked: m.stocked[i],
            available: m.available(i),
            reserved: m.reserved(i),
            sold: m.sold[i],
        };
        prop_assert_eq!(c, want, "counts of {}", sku);
        prop_assert!(c.reserved + c.sold <= c.stocked);
        prop_assert_eq!(c.available, c.stocked - c.reserved - c.sold);
        prop_assert_eq!(inv.available(sku), Some(c.available));
        if m.limits[i] > 0 && !m.limit_changed[i] {
            for u in 0..3 {
                prop_assert!(m.used(u, i) <= u64::from(m.limits[i]));
            }
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let users: Vec<Arc<str>> = (0..3).map(|u| Arc::from(format!("user{u}"))).collect();
    let mut inv = new_inv(4);
    // The handles `reserve` returned, for the lock-free `confirm` (a restore makes them
    // stale: the gateway only restores before serving).
    let mut handles: HashMap<ResId, ResHandle> = HashMap::new();
    let mut m = Model {
        limits: LIMITS,
        ..Model::default()
    };
    for (i, sku) in SKUS.iter().enumerate() {
        let spec = ProductSpec {
            price_cents: 100 * (i as i64 + 1),
            limit_per_user: LIMITS[i],
            ttl_s: TTLS[i],
        };
        inv.upsert(sku, spec, Some(6))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        m.stocked[i] = 6;
    }
    for op in ops {
        match op {
            Op::Reserve {
                user,
                req,
                sku,
                qty,
            } => {
                let sku_name: &str = SKUS.get(sku).copied().unwrap_or("zz");
                let got = inv.reserve(ReserveRequest {
                    user: Text::from(&*users[user]),
                    req: Text::from(format!("q{req}")),
                    room: Text::from("room"),
                    referrer: None,
                    sku: Text::from(sku_name),
                    qty,
                    now: m.now,
                });
                let want: Result<Option<ResId>, InvError> = if !(1..=99).contains(&qty) {
                    Err(InvError::InvalidQty)
                } else if sku >= 3 {
                    Err(InvError::UnknownSku)
                } else if let Some(&(id, ended)) = m.idem.get(&(user, req, sku)) {
                    match (ended, m.live.get(&id).map(|r| r.st)) {
                        (true, _) | (false, None) => Err(InvError::Ended { id }),
                        (false, Some(St::Held)) => Ok(Some(id)),
                        (false, Some(_)) => Err(InvError::InFlight),
                    }
                } else if m.limits[sku] > 0
                    && m.used(user, sku) + u64::from(qty) > u64::from(m.limits[sku])
                {
                    Err(InvError::LimitExceeded {
                        limit: m.limits[sku],
                        held: m.used(user, sku),
                    })
                } else if m.available(sku) < u64::from(qty) {
                    Err(InvError::SoldOut {
                        available: m.available(sku),
                    })
                } else {
                    Ok(None)
                };
                match (got, want) {
                    (Ok(ReserveOutcome::New(r)), Ok(None)) => {
                        prop_assert!(!m.ids.contains(&r.id), "id reused");
                        prop_assert_eq!(r.id.epoch(), EPOCH);
                        prop_assert_eq!(r.qty, qty);
                        prop_assert_eq!(r.expires_at, m.now + u64::from(TTLS[sku]) * 1000);
                        m.ids.push(r.id);
                        handles.insert(r.id, r.clone());
                        m.idem.insert((user, req, sku), (r.id, false));
                        m.live.insert(
                            r.id,
                            MRes {
                                user,
                                sku,
                                qty,
                                st: St::Pending,
                                exp: r.expires_at,
                            },
                        );
                    }
                    (Ok(ReserveOutcome::Existing(r)), Ok(Some(id))) => prop_assert_eq!(r.id, id),
                    (Err(g), Err(w)) => prop_assert!(same_err(&g, &w), "got {:?} want {:?}", g, w),
                    (g, w) => prop_assert!(false, "reserve: got {:?}, model {:?}", g, w),
                }
            }
            Op::Confirm(i) => {
                let id = m.pick(i);
                let st = m.live.get(&id).map(|r| r.st);
                // Odd picks confirm through the handle (no lock; an ended or aborted
                // reservation's handle answers Conflict), even ones by id.
                let got = match handles.get(&id).filter(|_| i % 2 == 1) {
                    Some(h) => {
                        let want = match st {
                            Some(St::Pending) => Ok(()),
                            _ => Err(InvError::Conflict(String::new())),
                        };
                        check_unit(inv.confirm(h), want)?
                    }
                    None => {
                        let want = match st {
                            None => Err(InvError::NotFound),
                            Some(St::Pending) => Ok(()),
                            Some(_) => Err(InvError::Conflict(String::new())),
                        };
                        check_unit(inv.confirm_reserve(id), want)?
                    }
                };
                if got.is_some() {
                    if let Some(r) = m.live.get_mut(&id) {
                        r.st = St::Held;
                    }
                }
            }
            Op::Abort(i) => {
                let id = m.pick(i);
                let want = match m.live.get(&id).map(|r| r.st) {
                    None => Err(InvError::NotFound),
                    Some(St::Pending) => Ok(()),
                    Some(_) => Err(InvError::Conflict(String::new())),
                };
                if check_unit(inv.abort_reserve(id), want)?.is_some() {
                    // Aborted: never durable, forgotten (not "ended").
                    m.live.remove(&id);
                    m.aborted.push(id);
                    m.idem.retain(|_, v| v.0 != id);
                }
            }
            Op::BeginRelease { user, res } => {
                let id = m.pick(res);
                let want = match m.live.get(&id) {
                    Some(r) if r.user == user && r.st == St::Held => Ok(()),
                    Some(r) if r.user == user => Err(InvError::Conflict(String::new())),
                    _ => Err(InvError::NotFound),
                };
                if let Some(r) = check_unit(inv.begin_release(&users[user], id), want)? {
                    prop_assert_eq!(r.id, id);
                    if let Some(r) = m.live.get_mut(&id) {
                        r.st = St::Releasing;
                    }
                }
            }
            Op::FinishRelease { res, committed } => {
                let id = m.pick(res);
                let want = match m.live.get(&id).map(|r| r.st) {
                    None => Err(InvError::NotFound),
                    Some(St::Releasing) => Ok(()),
                    Some(_) => Err(InvError::Conflict(String::new())),
                };
                if check_unit(inv.finish_release(id, committed), want)?.is_some() {
                    if committed {
                        m.end(id, false)?;
                    } else if let Some(r) = m.live.get_mut(&id) {
                        r.st = St::Held;
                    }
                }
            }
            Op::BeginCheckout { user, res } => {
                let ids: Vec<ResId> = res.iter().map(|&i| m.pick(i)).collect();
                let want = m.batch_check(&ids, Some(user), St::Held);
                if let Some(got) = check_unit(inv.begin_checkout(&users[user], &ids, m.now), want)?
                {
                    prop_assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), ids.clone());
                    for id in &ids {
                        if let Some(r) = m.live.get_mut(id) {
                            r.st = St::CheckingOut;
                        }
                    }
                }
            }
            Op::FinishCheckout { res, committed } => {
                let ids: Vec<ResId> = res.iter().map(|&i| m.pick(i)).collect();
                let want = m.batch_check(&ids, None, St::CheckingOut);
                if check_unit(inv.finish_checkout(&ids, committed), want)?.is_some() {
                    for id in &ids {
                        if committed {
                            m.end(*id, true)?;
                        } else if let Some(r) = m.live.get_mut(id) {
                            r.st = St::Held;
                        }
                    }
                }
            }
            Op::TakeDue => {
                let mut got: Vec<ResId> = inv
                    .take_due(m.now, usize::MAX)
                    .iter()
                    .map(|r| r.id)
                    .collect();
                got.sort();
                let want: Vec<ResId> = m
                    .live
                    .iter()
                    .filter(|(_, r)| r.st == St::Held && r.exp <= m.now)
                    .map(|(id, _)| *id)
                    .collect();
                prop_assert_eq!(&got, &want);
                for id in &want {
                    if let Some(r) = m.live.get_mut(id) {
                        r.st = St::Expiring;
                    }
                }
            }
            Op::FinishExpire { res, committed } => {
                let ids: Vec<ResId> = res.iter().map(|&i| m.pick(i)).collect();
                let want = m.batch_check(&ids, None, St::Expiring);
                if check_unit(inv.finish_expire(&ids, committed), want)?.is_some() {
                    for id in &ids {
                        if committed {
                            m.end(*id, false)?;
                        } else if let Some(r) = m.live.get_mut(id) {
                            r.st = St::Held;
                        }
                    }
                }
            }
            Op::Restock { sku, delta } => {
                let name = SKUS.get(sku).copied().unwrap_or("zz");
                let want = if sku >= 3 {
                    Err(InvError::UnknownSku)
                } else if delta < 0 && delta.unsigned_abs() > m.available(sku) {
                    Err(InvError::Conflict(String::new()))
                } else {
                    Ok(())
                };
                if check_unit(inv.restock(name, delta), want)?.is_some() {
                    if delta >= 0 {
                        m.stocked[sku] += delta.unsigned_abs();
                    } else {
                        m.stocked[sku] -= delta.unsigned_abs();
                    }
                }
            }
            Op::Advance(ms) => m.now += ms,
            Op::SetLimit { sku, limit } => {
                let spec = ProductSpec {
                    price_cents: 100 * (sku as i64 + 1),
                    limit_per_user: limit,
                    ttl_s: TTLS[sku],
                };
                let (created, _) = inv
                    .upsert(SKUS[sku], spec, None)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(!created);
                m.limits[sku] = limit;
                m.limit_changed[sku] = true;
            }
            Op::SnapshotRestore { shards } => {
                let snap = inv.snapshot();
                let fresh = new_inv(shards);
                let sum = fresh.restore(snap.clone(), m.now);
                prop_assert!(sum.deficits.is_empty());
                prop_assert_eq!(sum.reservations, m.live.len());
                prop_assert_eq!(fresh.snapshot().reservations, snap.reservations);
                for sku in SKUS {
                    prop_assert_eq!(fresh.counts(sku), inv.counts(sku));
                }
                inv = fresh;
                handles.clear();
                // An aborted id is in no snapshot, so a restore into the same epoch may issue
                // it again (the gateway restores into a fresh epoch, where this cannot happen).
                // Likewise an ended one: a snapshot lists the idempotency records of live
                // reservations only, so ended records are gone too.
                m.aborted.clear();
                m.ended.clear();
                let live: Vec<ResId> = m.live.keys().copied().collect();
                m.ids.retain(|id| live.contains(id));
                m.idem.retain(|_, v| !v.1);
                // Every live reservation comes back Held.
                for r in m.live.values_mut() {
                    r.st = St::Held;
                }
            }
        }
        check_invariants(&inv, &m)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn core_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}
