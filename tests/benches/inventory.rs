//! Benchmark of the inventory core's hot path: reserve -> confirm_reserve -> begin_release ->
//! finish_release(true) cycles per second, over many SKUs and on one hot SKU, with 1 and 2
//! threads, against a naive single-global-`Mutex<HashMap>` baseline doing the same steps;
//! and, to bound what sharing costs, two threads that keep to shards of their own.
//!
//! Run: `cargo bench --bench inventory -- --warm-up-time 1 --measurement-time 3`.
//! All keys are built before measuring; only the core's own work is timed.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use livegate::inventory::{
    Inventory, InventoryConfig, ProductSpec, ReserveOutcome, ReserveRequest, Text,
};

/// The allocator the `livegate` binary runs the core with (src/main.rs): the per-reservation
/// handle is one allocation and one free per cycle, so the allocator is part of the cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SKUS: usize = 10_000;
const USERS_PER_THREAD: usize = 1024;
const REQS: usize = 1 << 16;
/// Cycles of one thread between two sweeps (under a millisecond here; the gateway sweeps
/// every 200 ms). Between sweeps a window can pass its cap by this much per thread, so it is
/// kept small next to the smallest window measured (16,384 records).
const SWEEP_EVERY: u64 = 1 << 12;
const STOCK: u64 = 1 << 40;

/// Pre-built keys, shared by every variant; each cycle copies its four strings into the
/// request (`Text`, inline up to 24 bytes), as the gateway copies them out of the frame and
/// the session. Each thread has its own copies (from before the tenth round, when these were
/// `Arc`s whose reference counts must not be shared between the cores).
struct Keys {
    /// `skus[t]`: thread t's copies of the SKU names.
    skus: Vec<Vec<Text>>,
    /// `users[t]` is thread t's own users, so threads never share an idempotency key.
    users: Vec<Vec<Text>>,
    /// `reqs[t]`: thread t's copies of the req names.
    reqs: Vec<Vec<Text>>,
    /// `rooms[t]`: thread t's copy of the room id.
    rooms: Vec<Text>,
}

impl Keys {
    fn new(threads: usize) -> Keys {
        Keys {
            skus: (0..threads)
                .map(|_| (0..SKUS).map(|i| Text::from(format!("sku-{i}"))).collect())
                .collect(),
            users: (0..threads)
                .map(|t| {
                    (0..USERS_PER_THREAD)
                        .map(|i| Text::from(format!("user-{t}-{i}")))
                        .collect()
                })
                .collect(),
            reqs: (0..threads)
                .map(|_| (0..REQS).map(|i| Text::from(format!("req-{i}"))).collect())
                .collect(),
            rooms: (0..threads).map(|_| Text::from("room-1")).collect(),
        }
    }
}

/// Thread t's SKU list when the threads keep to shards of their own: its copies of the SKUs
/// whose shard is `t` modulo `threads`, repeated to `SKUS` entries (so the loop's indices
/// and the uniqueness of (user, req, sku) stay as in the shared lists). The gateway does not
/// place requests this way (any worker serves any SKU): this variant bounds what the cycle
/// costs when no shard's or product's lines move between the cores.
fn own_shards(inv: &Inventory, keys: &Keys, threads: usize) -> Vec<Vec<Text>> {
    (0..threads)
        .map(|t| {
            let own: Vec<&Text> = keys.skus[t]
                .iter()
                .filter(|s| inv.shard_of_sku(s) % threads == t)
                .collect();
            (0..SKUS)
                .filter_map(|i| own.get(i % own.len().max(1)).map(|s| (*s).clone()))
                .collect()
        })
        .collect()
}

/// The operations one cycle needs, so both variants run the same loop.
trait Core: Sync {
    fn cycle(&self, user: &Text, req: &Text, sku: &Text, room: &Text) -> bool;
    /// What the gateway's expiry sweeper does every 200 ms (nothing is due here; it keeps
    /// the idempotency window at its cap).
    fn sweep(&self) {}
}

impl Core for Inventory {
    fn sweep(&self) {
        black_box(self.take_due(1_000, 1024));
    }

    #[inline]
    fn cycle(&self, user: &Text, req: &Text, sku: &Text, room: &Text) -> bool {
        let out = self.reserve(ReserveRequest {
            user: user.clone(),
            req: req.clone(),
            room: room.clone(),
            referrer: None,
            sku: sku.clone(),
            qty: 1,
            now: 1_000,
        });
        let Ok(ReserveOutcome::New(res)) = out else {
            return false;
        };
        self.confirm(&res).is_ok()
            && self.begin_release(user, res.id).is_ok()
            && self.finish_release(res.id, true).is_ok()
    }
}

/// The baseline: one global lock, `String` keys, the same four steps.
#[derive(Default)]
struct Naive {
    inner: Mutex<NaiveInner>,
}

#[derive(Default)]
struct NaiveInner {
    available: HashMap<String, u64>,
    /// id -> (sku, user, qty, state: 0 pending, 1 held, 2 releasing)
    reservations: HashMap<u64, (String, String, u32, u8)>,
    next: u64,
}

impl Naive {
    fn with_skus(skus: &[Text]) -> Naive {
        let n = Naive::default();
        if let Ok(mut g) = n.inner.lock() {
            for s in skus {
                g.available.insert(s.to_string(), STOCK);
            }
        }
        n
    }

    fn reserve(&self, user: &str, sku: &str, qty: u32) -> Option<u64> {
        let mut g = self.inner.lock().ok()?;
        let a = g.available.get_mut(sku)?;
        if *a < u64::from(qty) {
            return None;
        }
        *a -= u64::from(qty);
        g.next += 1;
        let id = g.next;
        g.reservations
            .insert(id, (sku.to_string(), user.to_string(), qty, 0));
        Some(id)
    }

    fn set_state(&self, id: u64, from: u8, to: u8) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        match g.reservations.get_mut(&id) {
            Some(r) if r.3 == from => {
                r.3 = to;
                true
            }
            _ => false,
        }
    }

    fn finish_release(&self, id: u64) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        let Some((sku, _, qty, _)) = g.reservations.remove(&id) else {
            return false;
        };
        if let Some(a) = g.available.get_mut(&sku) {
            *a += u64::from(qty);
        }
        true
    }
}

impl Core for Naive {
    #[inline]
    fn cycle(&self, user: &Text, _req: &Text, sku: &Text, _room: &Text) -> bool {
        let Some(id) = self.reserve(user, sku, 1) else {
            return false;
        };
        self.set_state(id, 0, 1) && self.set_state(id, 1, 2) && self.finish_release(id)
    }
}

/// The real core with `shards` lock shards and `idem_cap` idempotency records in all
/// (262,144 in the window, several MiB: mostly cache misses, like a busy gateway; every
/// thread sweeps every `SWEEP_EVERY` cycles, as the gateway does every 200 ms, which trims
/// the window back to the cap). With one shard it is the same code behind a single global
/// lock, which isolates what sharding buys from what the core's features cost.
fn sharded(keys: &Keys, shards: usize, idem_cap: usize) -> Inventory {
    let inv = Inventory::new(InventoryConfig {
        shards,
        epoch: 1,
        idempotency_ttl_ms: 60_000,
        idempotency_cap: idem_cap,
    });
    let spec = ProductSpec {
        price_cents: 1999,
        limit_per_user: 0,
        ttl_s: 60,
    };
    for s in &keys.skus[0] {
        let _ = inv.upsert(s, spec, Some(STOCK));
    }
    inv
}

/// How long a run took: wall time, and the CPU time of its slowest thread.
struct Timing {
    wall: Duration,
    cpu: Duration,
}

impl Timing {
    /// The time criterion is given: wall time, or with `INV_CLOCK=cpu` the slowest
    /// thread's CPU time (on a shared machine, time spent preempted by other tenants'
    /// processes is not the core's cost; lock spinning still counts, parked time does not).
    fn pick(&self) -> Duration {
        static CPU: OnceLock<bool> = OnceLock::new();
        if *CPU.get_or_init(|| std::env::var("INV_CLOCK").is_ok_and(|v| v == "cpu")) {
            self.cpu
        } else {
            self.wall
        }
    }
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Runs `iters` cycles split over `threads` threads. Thread t starts at its own offset so
/// its (user, req, sku) keys never repeat within the idempotency window.
fn run<C: Core>(
    core: &C,
    keys: &Keys,
    skus: &[Vec<Text>],
    threads: usize,
    hot: bool,
    iters: u64,
    base: &mut u64,
) -> Timing {
    let per = iters.div_ceil(threads as u64);
    let start = *base;
    *base += per;
    let t0 = Instant::now();
    let cpu = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (users, skus, reqs) = (&keys.users[t], &skus[t], &keys.reqs[t]);
                let room = &keys.rooms[t];
                s.spawn(move || {
                    let cpu0 = thread_cpu();
                    let mut failed = 0u64;
                    for i in start..start + per {
                        let i = i as usize;
                        // (user, req, sku) never repeats within a run: a repeat inside the
                        // idempotency window would be answered from its record (`Ended`),
                        // not reserved.
                        let (sku, req) = if hot {
                            (&skus[0], &reqs[(i / USERS_PER_THREAD) % REQS])
                        } else {
                            // Threads walk the SKUs half a lap apart, like unrelated buyers.
                            let j = i + t * SKUS / 2;
                            (&skus[j % SKUS], &reqs[(i / SKUS) % REQS])
                        };
                        let user = &users[i % USERS_PER_THREAD];
                        if !core.cycle(user, req, sku, room) {
                            failed += 1;
                        }
                        if (i as u64) % SWEEP_EVERY == 0 {
                            core.sweep();
                        }
                    }
                    (thread_cpu().saturating_sub(cpu0), failed)
                })
            })
            .collect();
        let done: Vec<(Duration, u64)> =
            handles.into_iter().filter_map(|h| h.join().ok()).collect();
        // A refused cycle is much cheaper than a real one: the figures would be wrong.
        let failed: u64 = done.iter().map(|d| d.1).sum();
        assert!(failed == 0, "{failed} cycles were refused by the core");
        assert!(done.len() == threads, "a benchmark thread panicked");
        done.into_iter().map(|d| d.0).max().unwrap_or_default()
    });
    Timing {
        wall: t0.elapsed(),
        cpu,
    }
}

fn bench(c: &mut Criterion) {
    let keys = Keys::new(2);
    for (group, hot) in [("cycle_many_skus", false), ("cycle_hot_sku", true)] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(1));
        for threads in [1usize, 2] {
            let inv = sharded(&keys, 64, 4096 * 64);
            let mut base = 0u64;
            g.bench_function(format!("sharded_{threads}t"), |b| {
                b.iter_custom(|iters| {
                    run(&inv, &keys, &keys.skus, threads, hot, iters, &mut base).pick()
                })
            });
            let naive = Naive::with_skus(&keys.skus[0]);
            let mut base = 0u64;
            g.bench_function(format!("naive_global_mutex_{threads}t"), |b| {
                b.iter_custom(|iters| {
                    run(&naive, &keys, &keys.skus, threads, hot, iters, &mut base).pick()
                })
            });
        }
        if !hot {
            for threads in [1usize, 2] {
                let inv = sharded(&keys, 1, 4096 * 64);
                let mut base = 0u64;
                g.bench_function(format!("one_shard_{threads}t"), |b| {
                    b.iter_custom(|iters| {
                        run(&inv, &keys, &keys.skus, threads, hot, iters, &mut base).pick()
                    })
                });
            }
            // Two threads on shards of their own (`own_shards`): no line of a shard or a
            // product moves between the cores.
            let inv = sharded(&keys, 64, 4096 * 64);
            let own = own_shards(&inv, &keys, 2);
            let mut base = 0u64;
            g.bench_function("sharded_2t_own_shards", |b| {
                b.iter_custom(|iters| run(&inv, &keys, &own, 2, hot, iters, &mut base).pick())
            });
            // The same with a small idempotency window (256 x 64 records, cache resident):
            // shows how much of the cost is the window's cache misses.
            let inv = sharded(&keys, 64, 256 * 64);
            let mut base = 0u64;
            g.bench_function("sharded_1t_small_idem_window", |b| {
                b.iter_custom(|iters| run(&inv, &keys, &keys.skus, 1, hot, iters, &mut base).pick())
            });
        }
        g.finish();
    }
}

/// The number in environment variable `name`, if it is set and parses.
fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `INV_CYCLES=<n> [INV_HOT=1] [INV_THREADS=t] [INV_OWN_SHARDS=1] [INV_SHARDS=s]
/// [INV_WINDOW=records] [INV_SPLIT=k]`: runs `n` cycles of the core (64 shards and a
/// 262,144-record idempotency window unless told; with `INV_OWN_SHARDS=1` each thread on
/// shards of its own)
/// without criterion and exits, for instruction counts under
/// `valgrind --tool=callgrind` (run it with `n` and `2n`: the difference over `n` is the
/// cost of one cycle, setup excluded). With `INV_SPLIT=k` the `n` cycles run as `k` runs
/// with fresh threads each, as criterion's samples do, after an untimed million cycles that
/// fill the idempotency window (as criterion's warm-up does): what starting threads per
/// sample costs. It prints the rate by wall time and by the slowest thread's CPU time, and
/// how many times since the process started (warm-up included) a shard's lock was found
/// taken (`Inventory::lock_waits`).
fn fixed_run() -> bool {
    let Some(n) = env_num::<u64>("INV_CYCLES") else {
        return false;
    };
    let hot = std::env::var("INV_HOT").is_ok_and(|v| v == "1");
    let threads = env_num("INV_THREADS").unwrap_or(1usize).clamp(1, 2);
    let window = env_num("INV_WINDOW").unwrap_or(4096 * 64);
    let shards = env_num("INV_SHARDS").unwrap_or(64);
    let keys = Keys::new(2);
    let inv = sharded(&keys, shards, window);
    let mut base = 0u64;
    // `INV_OWN_SHARDS=1`: each thread keeps to shards of its own (`own_shards`).
    let skus = if std::env::var("INV_OWN_SHARDS").is_ok_and(|v| v == "1") {
        own_shards(&inv, &keys, threads)
    } else {
        keys.skus.clone()
    };
    let split = env_num("INV_SPLIT").unwrap_or(1u64).max(1);
    if split > 1 {
        let _ = run(&inv, &keys, &skus, threads, hot, 1_000_000, &mut base);
    }
    let mut d = Timing {
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
    };
    for _ in 0..split {
        let t = run(&inv, &keys, &skus, threads, hot, n / split, &mut base);
        d.wall += t.wall;
        d.cpu += t.cpu;
    }
    let n = n / split * split;
    let rate = |t: Duration| n as f64 / t.as_secs_f64().max(1e-9) / 1e6;
    eprintln!(
        "{n} cycles, {threads} thread(s): wall {:?} ({:.2} M/s), slowest thread's CPU {:?} ({:.2} M/s), {} lock waits",
        d.wall,
        rate(d.wall),
        d.cpu,
        rate(d.cpu),
        inv.lock_waits()
    );
    true
}

/// `INV_PINGPONG=<n>`: bounces one cache line between two threads `n` times and prints the
/// round trip in ns (two transfers of a line between the cores), then exits. On a shared
/// virtual machine this moves by several times from minute to minute (where the host puts
/// the two vCPUs), and the two-thread many-SKU figure moves with it: run it beside the
/// fixed-count runs to see which kind of minute they ran in.
fn pingpong_run() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    #[repr(align(128))]
    struct Line(AtomicU64);
    let Some(n) = env_num::<u64>("INV_PINGPONG") else {
        return false;
    };
    let line = Line(AtomicU64::new(0));
    let wall = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..n {
                while line.0.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                line.0.store(2 * i + 2, Ordering::Release);
            }
        });
        let t0 = Instant::now();
        for i in 0..n {
            line.0.store(2 * i + 1, Ordering::Release);
            while line.0.load(Ordering::Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
        }
        t0.elapsed()
    });
    eprintln!(
        "{n} round trips of one cache line between two threads: {:.0} ns each",
        wall.as_nanos() as f64 / n.max(1) as f64
    );
    true
}

criterion_group!(benches, bench);

fn main() {
    if pingpong_run() || fixed_run() {
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
