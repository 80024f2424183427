//! Orders stored per second by `OrderStore::store_batch`: batches of 500 three-item orders
//! (what the order writer does), against one order per transaction (the baseline), into
//! SQLite (a temp file, WAL, synchronous=FULL) and PostgreSQL when reachable
//! (`LIVEGATE_TEST_POSTGRES` or postgres://postgres@127.0.0.1:5432/test, in a schema of
//! its own that is dropped afterwards).
//!
//! Run: `cargo bench --bench order_store -- --warm-up-time 1 --measurement-time 5`

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livegate::store::{Order, OrderItem, OrderStore};

const BATCH: usize = 500;
/// Orders per iteration of the one-per-transaction baseline.
const SINGLES: usize = 50;

fn order(n: u64) -> Order {
    let items: Vec<OrderItem> = (0..3)
        .map(|i| OrderItem {
            reservation: format!("bench-r{n}-{i}"),
            sku: format!("sku-{i}"),
            qty: i + 1,
            unit_price_cents: 1999,
        })
        .collect();
    Order {
        order_id: format!("bench-o{n}"),
        user_id: format!("user-{}", n % 1000),
        room: format!("room-{}", n % 10),
        ref_user: (n % 3 == 0).then(|| "ref-user".to_string()),
        total_cents: items.iter().map(|i| i.qty * i.unit_price_cents).sum(),
        created_at_ms: 1_763_683_200_000,
        items,
    }
}

fn orders(next: &AtomicU64, n: usize) -> Vec<Order> {
    let first = next.fetch_add(n as u64, Ordering::Relaxed);
    (first..first + n as u64).map(order).collect()
}

fn bench_store(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: &OrderStore) {
    let next = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group(format!("order_store/{name}"));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("batch_{BATCH}"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let store = store.clone();
            let next = next.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = orders(&next, BATCH);
                    let start = Instant::now();
                    if let Err(e) = store.store_batch(&batch).await {
                        panic!("store_batch: {e}");
                    }
                    total += start.elapsed();
                }
                total
            }
        })
    });
    // A redelivered batch: every order already stored (the writer's recovery path).
    g.bench_function(format!("redelivered_batch_{BATCH}"), |b| {
        let batch = orders(&next, BATCH);
        if let Err(e) = rt.block_on(store.store_batch(&batch)) {
            panic!("store_batch: {e}");
        }
        b.to_async(rt).iter(|| async {
            if let Err(e) = store.store_batch(&batch).await {
                panic!("store_batch: {e}");
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("order_store/{name}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(SINGLES as u64));
    g.bench_function("one_order_per_transaction", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let store = store.clone();
            let next = next.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = orders(&next, SINGLES);
                    let start = Instant::now();
                    for o in &batch {
                        if let Err(e) = store.store_batch(std::slice::from_ref(o)).await {
                            panic!("store_batch: {e}");
                        }
                    }
                    total += start.elapsed();
                }
                total
            }
        })
    });
    g.finish();
}

/// A fresh schema on the PostgreSQL server, or `None` (with a notice) when unreachable.
async fn postgres_schema() -> Option<(String, String, String)> {
    use sqlx::Connection;
    let base = std::env::var("LIVEGATE_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let mut conn = tokio::time::timeout(Duration::from_secs(2), sqlx::PgConnection::connect(&base))
        .await
        .ok()?
        .ok()?;
    let schema = format!("lg_bench_{}", std::process::id());
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut conn)
        .await
        .ok()?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .ok()?;
    let _ = conn.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    Some((base, schema, url))
}

fn benches(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };

    let dir = std::env::temp_dir().join(format!("livegate-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("temp dir {}: {e}", dir.display());
    }
    let url = format!("sqlite://{}", dir.join("orders.db").display());
    let store = match rt.block_on(OrderStore::connect(&url)) {
        Ok(s) => s,
        Err(e) => panic!("sqlite store: {e}"),
    };
    bench_store(c, &rt, "sqlite", &store);
    rt.block_on(store.close());
    let _ = std::fs::remove_dir_all(&dir);

    match rt.block_on(postgres_schema()) {
        None => println!("NOTICE: PostgreSQL not reachable, skipping the postgres benchmarks"),
        Some((base, schema, url)) => {
            let store = match rt.block_on(OrderStore::connect(&url)) {
                Ok(s) => s,
                Err(e) => panic!("postgres store: {e}"),
            };
            bench_store(c, &rt, "postgres", &store);
            rt.block_on(async {
                use sqlx::Connection;
                store.close().await;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut conn)
                        .await;
                }
            });
        }
    }
}

criterion_group!(order_store, benches);
criterion_main!(order_store);
