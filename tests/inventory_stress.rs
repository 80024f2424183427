//! Stress test of the inventory core: 8 OS threads hammer one hot SKU (and a second one
//! through checkouts spanning both) with random reserve / confirm / abort / release /
//! checkout outcomes, a sweeper expires reservations with random commit results, and a
//! checker samples the counts and the per-user limit while they run. Bounded in iterations,
//! no timing assertions. At the end every unit is accounted for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use livegate::inventory::{
    Inventory, InventoryConfig, ProductSpec, ResId, ReserveOutcome, ReserveRequest, Text,
};

const THREADS: usize = 8;
const ITERS: usize = 20_000;
const STOCK: u64 = 300;
const LIMIT: u32 = 60;
const USERS: usize = 40;
const SKUS: [&str; 2] = ["hot", "side"];

/// Tiny deterministic xorshift generator (one per thread).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

#[derive(Default)]
struct Tally {
    /// Units sold per SKU, as counted by the threads that committed the checkouts.
    sold: [AtomicU64; 2],
    /// Net units restocked per SKU while running.
    restocked: [AtomicU64; 2],
    removed: [AtomicU64; 2],
}

fn check_counts(inv: &Inventory) {
    for sku in SKUS {
        let c = inv.counts(sku).expect("sku exists");
        assert!(c.reserved + c.sold <= c.stocked, "oversold {sku}: {c:?}");
        assert_eq!(c.available, c.stocked - c.reserved - c.sold, "{sku}: {c:?}");
    }
}

/// Per-user held + bought from a consistent snapshot.
fn check_limits(inv: &Inventory) {
    let snap = inv.snapshot();
    let mut used: HashMap<(String, String), u64> = HashMap::new();
    for r in &snap.reservations {
        *used
            .entry((r.sku.to_string(), r.user.to_string()))
            .or_default() += u64::from(r.qty);
    }
    for (sku, user, units) in &snap.bought {
        *used.entry((sku.to_string(), user.to_string())).or_default() += units;
    }
    for ((sku, user), units) in used {
        assert!(units <= u64::from(LIMIT), "{user} holds {units} of {sku}");
    }
}

fn worker(inv: &Inventory, tally: &Tally, clock: &AtomicU64, t: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9abc));
    let users: Vec<Text> = (0..USERS).map(|u| Text::from(format!("u{u}"))).collect();
    let room = Text::from("room");
    let skus: Vec<Text> = SKUS.iter().map(|s| Text::from(*s)).collect();
    let mut mine: Vec<(ResId, usize)> = Vec::new(); // held reservations: (id, user)
    for i in 0..ITERS {
        let now = clock.fetch_add(1, Ordering::Relaxed);
        let user = rng.below(USERS as u64) as usize;
        let sku = usize::from(rng.below(4) == 0);
        let req = ReserveRequest {
            user: users[user].clone(),
            req: Text::from(format!("t{t}-{i}")),
            room: room.clone(),
            referrer: None,
            sku: skus[sku].clone(),
            qty: 1 + rng.below(3) as u32,
            now,
        };
        let roll = rng.below(64);
        if roll == 0 {
            inv.restock(SKUS[sku], 4).expect("restock");
            tally.restocked[sku].fetch_add(4, Ordering::Relaxed);
        } else if roll == 1 && inv.restock(SKUS[sku], -3).is_ok() {
            // Takes only available units, or fails as a whole.
            tally.removed[sku].fetch_add(3, Ordering::Relaxed);
        }
        if let Ok(ReserveOutcome::New(r)) = inv.reserve(req) {
            if rng.below(8) == 0 {
                inv.abort_reserve(r.id).expect("abort pending");
            } else {
                // Half through the handle, without the lock, racing the other threads'
                // sweeps and releases on the same shard.
                if rng.below(2) == 0 {
                    inv.confirm(&r).expect("confirm pending");
                } else {
                    inv.confirm_reserve(r.id).expect("confirm pending");
                }
                mine.push((r.id, user));
            }
        }
        if mine.is_empty() {
            continue;
        }
        let k = rng.below(mine.len() as u64) as usize;
        let (id, user) = mine[k];
        match rng.below(4) {
            0 => {
                // Release (may lose to the sweeper: then it is not Held any more).
                if inv.begin_release(&users[user], id).is_ok() {
                    let committed = rng.coin();
                    inv.finish_release(id, committed).expect("finish release");
                    if committed {
                        mine.swap_remove(k);
                    }
                } else if inv.reservation(id).is_none() {
                    mine.swap_remove(k);
                }
            }
            1 => {
                // Checkout of every reservation this thread holds for this user.
                let ids: Vec<ResId> = mine
                    .iter()
                    .filter(|(_, u)| *u == user)
                    .map(|(id, _)| *id)
                    .collect();
                if let Ok(got) = inv.begin_checkout(&users[user], &ids, now) {
                    let committed = rng.coin();
                    inv.finish_checkout(&ids, committed)
                        .expect("finish checkout");
                    if committed {
                        for r in &got {
                            let s = usize::from(&*r.sku == "side");
                            tally.sold[s].fetch_add(u64::from(r.qty), Ordering::Relaxed);
                        }
                        mine.retain(|(id, _)| !ids.contains(id));
                    }
                }
            }
            _ => {
                // Keep holding; forget ids that ended elsewhere (expired).
                if inv.reservation(id).is_none() {
                    mine.swap_remove(k);
                }
            }
        }
    }
}

#[test]
fn many_threads_never_oversell_and_account_for_every_unit() {
    let inv = Arc::new(Inventory::new(InventoryConfig {
        shards: 4,
        epoch: 1,
        idempotency_ttl_ms: 1_000,
        idempotency_cap: 2048,
    }));
    for sku in SKUS {
        let spec = ProductSpec {
            price_cents: 100,
            limit_per_user: LIMIT,
            ttl_s: 1,
        };
        inv.upsert(sku, spec, Some(STOCK)).expect("create");
    }
    let tally = Arc::new(Tally::default());
    let clock = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (inv, tally, clock) = (inv.clone(), tally.clone(), clock.clone());
            thread::spawn(move || worker(&inv, &tally, &clock, t))
        })
        .collect();
    let sweeper = {
        let (inv, clock, done) = (inv.clone(), clock.clone(), done.clone());
        thread::spawn(move || {
            let mut rng = Rng(42);
            let mut expired = 0u64;
            while !done.load(Ordering::Relaxed) {
                let due = inv.take_due(clock.load(Ordering::Relaxed), 64);
                if due.is_empty() {
                    thread::yield_now();
                    continue;
                }
                let ids: Vec<ResId> = due.iter().map(|r| r.id).collect();
                let committed = rng.below(4) != 0;
                inv.finish_expire(&ids, committed).expect("finish expire");
                if committed {
                    expired += ids.len() as u64;
                }
            }
            expired
        })
    };
    let checker = {
        let (inv, done) = (inv.clone(), done.clone());
        thread::spawn(move || {
            let mut rounds = 0u64;
            while !done.load(Ordering::Relaxed) {
                check_counts(&inv);
                if rounds % 16 == 0 {
                    check_limits(&inv);
                }
                rounds += 1;
                thread::yield_now();
            }
        })
    };
    for w in workers {
        w.join().expect("worker");
    }
    done.store(true, Ordering::Relaxed);
    let expired = sweeper.join().expect("sweeper");
    checker.join().expect("checker");

    check_counts(&inv);
    check_limits(&inv);
    let snap = inv.snapshot();
    for (i, sku) in SKUS.iter().enumerate() {
        let c = inv.counts(sku).expect("sku");
        let restocked = tally.restocked[i].load(Ordering::Relaxed);
        let removed = tally.removed[i].load(Ordering::Relaxed);
        assert_eq!(c.stocked, STOCK + restocked - removed);
        assert_eq!(c.stocked, c.available + c.reserved + c.sold);
        let held: u64 = snap
            .reservations
            .iter()
            .filter(|r| &*r.sku == *sku)
            .map(|r| u64::from(r.qty))
            .sum();
        assert_eq!(held, c.reserved, "{sku}: live reservations sum to reserved");
        assert_eq!(c.sold, tally.sold[i].load(Ordering::Relaxed), "{sku}: sold");
        let bought: u64 = snap
            .bought
            .iter()
            .filter(|b| &*b.0 == *sku)
            .map(|b| b.2)
            .sum();
        assert_eq!(bought, c.sold, "{sku}: bought per user sums to sold");
    }
    // Drain: expire everything left; then all unsold stock is available again.
    let end = u64::MAX / 2;
    loop {
        let due = inv.take_due(end, 256);
        if due.is_empty() {
            break;
        }
        let ids: Vec<ResId> = due.iter().map(|r| r.id).collect();
        inv.finish_expire(&ids, true).expect("drain");
    }
    for sku in SKUS {
        let c = inv.counts(sku).expect("sku");
        assert_eq!(c.reserved, 0);
        assert_eq!(c.available, c.stocked - c.sold);
    }
    assert!(inv.snapshot().reservations.is_empty());
    eprintln!(
        "expired {expired}, sold {:?}",
        tally
            .sold
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    );
    assert!(tally.sold[0].load(Ordering::Relaxed) > 0);
}
