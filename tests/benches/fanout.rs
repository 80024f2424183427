//! Fan-out of one room broadcast to N members, in process (no sockets): what the room task
//! pays per member to queue an encode-once frame, at 1,000 / 10,000 / 100,000 members.
//! Run: `cargo bench --bench fanout -- --warm-up-time 1 --measurement-time 3`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livegate::{
    config::Config,
    hub::{Hub, KillSwitch, Outbox, Room, RoomChange, StockSource},
    outbound,
    protocol::Encoding,
};

struct NoStock;
impl StockSource for NoStock {
    fn available(&self, _: &str) -> Option<u64> {
        None
    }
}

/// Frames a member may hold between two drains (drains happen outside the timing).
const QUEUE: usize = 4096;
const DRAIN_EVERY: u64 = 1000;

struct BigRoom {
    room: Room,
    receivers: Vec<outbound::Receiver>,
}

async fn big_room(hub: &Arc<Hub>, name: &str, members: usize, encodings: &[Encoding]) -> BigRoom {
    let room = hub.ensure_room(name).expect("room");
    room.apply(RoomChange::Opened {
        title: "bench".into(),
    })
    .await
    .expect("open");
    let mut receivers = Vec::with_capacity(members);
    for i in 0..members {
        let (tx, rx) = outbound::queue(QUEUE);
        let enc = encodings[i % encodings.len()];
        let outbox = Outbox::new(
            i as u64,
            Arc::from(format!("u{i}")),
            enc,
            tx,
            Arc::new(KillSwitch::default()),
        );
        while room.join(outbox.clone(), "j".into(), None).is_err() {
            // The room's queue is full: let it catch up.
            room.state().await.expect("state");
        }
        receivers.push(rx);
    }
    room.state().await.expect("joined");
    let mut b = BigRoom { room, receivers };
    drain(&mut b).await;
    b
}

async fn drain(b: &mut BigRoom) {
    let mut batch = std::collections::VecDeque::new();
    for rx in &mut b.receivers {
        while !rx.is_empty() {
            rx.recv_batch(&mut batch).await;
            batch.clear();
        }
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut limits = Config::defaults().limits;
    limits.room_queue = 65_536;
    // Keep the periodic ticks out of the measurement.
    limits.room_tick = Duration::from_secs(3600);
    limits.stats_interval = Duration::from_secs(3600);
    let hub = Hub::new(limits, Arc::new(NoStock));
    let mut g = c.benchmark_group("room_broadcast");
    g.sample_size(20);
    for (label, members, encodings) in [
        ("json", 1_000usize, &[Encoding::Json][..]),
        ("json", 10_000, &[Encoding::Json][..]),
        ("json", 100_000, &[Encoding::Json][..]),
        (
            "json+msgpack",
            100_000,
            &[Encoding::Json, Encoding::MsgPack][..],
        ),
    ] {
        let mut room = rt.block_on(big_room(
            &hub,
            &format!("{label}-{members}"),
            members,
            encodings,
        ));
        g.throughput(Throughput::Elements(members as u64));
        g.bench_with_input(BenchmarkId::new(label, members), &members, |bch, _| {
            bch.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    for i in 0..iters {
                        let change = if i % 2 == 0 {
                            RoomChange::Pinned {
                                sku: "sku-1".into(),
                            }
                        } else {
                            RoomChange::Unpinned
                        };
                        let t = Instant::now();
                        room.room.apply(change).await.expect("broadcast");
                        timed += t.elapsed();
                        if (i + 1) % DRAIN_EVERY == 0 {
                            drain(&mut room).await;
                        }
                    }
                    drain(&mut room).await;
                    timed
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
