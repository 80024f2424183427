//! The order writer against a real redis-server and a real SQL store: SQLite in a temp
//! dir, and the same suite against PostgreSQL when one is reachable (each test in a fresh
//! schema of its own).
//!
//! Entries are written with XADD exactly as docs/redis.md describes them, the writer is
//! driven through `OrderWriter::run_until`, and every claim is checked in Redis and SQL.

mod common;

use std::{
    collections::HashSet,
    future::Future,
    time::{Duration, Instant},
};

use common::redis::{temp_dir, PgSchema, RedisServer};
use futures::StreamExt;
use livegate::{
    config::OrderWriterConfig,
    keys::{Keys, ORDER_WRITER_GROUP},
    order_writer::OrderWriter,
    store::OrderStore,
};
use redis::aio::MultiplexedConnection;
use tokio::{sync::oneshot, task::JoinHandle};

const WAIT: Duration = Duration::from_secs(30);

/// One test's world: a redis-server, a key prefix, and an order store URL.
struct World {
    redis: RedisServer,
    keys: Keys,
    store_url: String,
    store: OrderStore,
    dir: Option<std::path::PathBuf>,
    pg: Option<PgSchema>,
}

enum Db {
    Sqlite,
    Postgres(PgSchema),
}

impl World {
    async fn new(db: Db) -> World {
        World::with_redis(db, RedisServer::start()).await
    }

    async fn with_redis(db: Db, redis: RedisServer) -> World {
        let (store_url, dir, pg) = match db {
            Db::Sqlite => {
                let dir = temp_dir("orders");
                let url = format!("sqlite://{}", dir.join("orders.db").display());
                (url, Some(dir), None)
            }
            Db::Postgres(pg) => (pg.url.clone(), None, Some(pg)),
        };
        let store = OrderStore::connect(&store_url)
            .await
            .expect("connect store");
        World {
            redis,
            keys: Keys::new("lgt"),
            store_url,
            store,
            dir,
            pg,
        }
    }

    async fn conn(&self) -> MultiplexedConnection {
        let client = redis::Client::open(self.redis.url()).expect("redis url");
        client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// A writer with its own store connection, as a separate process would have.
    async fn writer(&self, consumer: &str, claim_idle: Duration) -> OrderWriter {
        let client = redis::Client::open(self.redis.url()).expect("redis url");
        let store = OrderStore::connect(&self.store_url).await.expect("store");
        OrderWriter::new(
            client,
            self.keys.clone(),
            store,
            OrderWriterConfig {
                batch: 50,
                block: Duration::from_millis(100),
                claim_idle,
                consumer: Some(consumer.to_string()),
            },
        )
    }

    async fn finish(self) {
        self.store.close().await;
        if let Some(pg) = self.pg {
            pg.drop_schema().await;
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn spawn(writer: OrderWriter) -> Running {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let res = writer
            .run_until(async {
                let _ = rx.await;
            })
            .await;
        assert!(res.is_ok(), "writer failed: {res:?}");
    });
    Running {
        stop: Some(tx),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("writer stops")
            .expect("writer task");
    }
}

/// Items of test order `n`: three reservations.
fn items(n: usize) -> Vec<(String, String, i64, i64)> {
    (0..3)
        .map(|i| {
            (
                format!("r{n}-{i}"),
                format!("sku-{i}"),
                (i + 1) as i64,
                100 * (i as i64 + 1),
            )
        })
        .collect()
}

fn items_json(items: &[(String, String, i64, i64)]) -> String {
    serde_json::Value::Array(
        items
            .iter()
            .map(|(r, s, q, p)| serde_json::json!({"reservation": r, "sku": s, "qty": q, "price_cents": p}))
            .collect(),
    )
    .to_string()
}

/// XADDs order `n` as the gateway does; returns the entry id.
async fn xadd_order(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    n: usize,
    ref_user: &str,
) -> String {
    let it = items(n);
    let total: i64 = it.iter().map(|(_, _, q, p)| q * p).sum();
    xadd(
        conn,
        keys,
        &[
            ("kind", "order"),
            ("order", &format!("o-{n}")),
            ("user", &format!("u-{}", n % 7)),
            ("req", &format!("q-{n}")),
            ("room", "room-1"),
            ("ref", ref_user),
            ("total_cents", &total.to_string()),
            ("created_at", "1763683200000"),
            ("items", &items_json(&it)),
        ],
    )
    .await
}

async fn xadd(conn: &mut MultiplexedConnection, keys: &Keys, fields: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys.events()).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(conn).await.expect("xadd")
}

async fn pending(conn: &mut MultiplexedConnection, keys: &Keys) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(keys.events())
        .arg(ORDER_WRITER_GROUP)
        .query_async(conn)
        .await
        .expect("xpending");
    match v {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("xpending: {other:?}"),
        },
        other => panic!("xpending: {other:?}"),
    }
}

async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_stored(w: &World, conn: &mut MultiplexedConnection, orders: i64) {
    let store = w.store.clone();
    wait_for(&format!("{orders} orders stored"), || {
        let store = store.clone();
        async move { store.count_orders().await.expect("count") >= orders }
    })
    .await;
    let mut c = conn.clone();
    let keys = w.keys.clone();
    wait_for("nothing pending", || {
        let keys = keys.clone();
        let mut c = c.clone();
        async move { pending(&mut c, &keys).await == 0 }
    })
    .await;
    let _ = &mut c;
    assert_eq!(w.store.count_orders().await.expect("count"), orders);
}

// ---------------------------------------------------------------------------------------
// The scenarios, each run against SQLite and PostgreSQL.

async fn the_store_is_idempotent_within_and_across_batches(db: Db) {
    use livegate::store::{Order, OrderItem, RoomTotals, StoredOutcome};
    let w = World::new(db).await;
    let order = |id: &str, room: &str| Order {
        order_id: id.to_string(),
        user_id: "u".to_string(),
        room: room.to_string(),
        ref_user: Some("r".to_string()),
        total_cents: 2 * 150 + 99,
        created_at_ms: 5,
        items: vec![
            OrderItem {
                reservation: format!("{id}-a"),
                sku: "s1".to_string(),
                qty: 2,
                unit_price_cents: 150,
            },
            OrderItem {
                reservation: format!("{id}-b"),
                sku: "s2".to_string(),
                qty: 1,
                unit_price_cents: 99,
            },
        ],
    };
    let (a, b, c) = (order("a", "r1"), order("b", "r1"), order("c", "r2"));
    let out = w
        .store
        .store_batch(&[a.clone(), b.clone(), a.clone()])
        .await
        .expect("store");
    use StoredOutcome::{AlreadyStored, Inserted};
    assert_eq!(out, vec![Inserted, Inserted, AlreadyStored]);
    let out = w
        .store
        .store_batch(&[b, c, a.clone()])
        .await
        .expect("store");
    assert_eq!(out, vec![AlreadyStored, Inserted, AlreadyStored]);
    assert!(w.store.store_batch(&[]).await.expect("empty").is_empty());
    assert_eq!(w.store.count_orders().await.expect("count"), 3);
    assert_eq!(w.store.count_items().await.expect("count"), 6);
    assert_eq!(
        w.store.room_totals("r1").await.expect("totals"),
        RoomTotals {
            orders: 2,
            units_sold: 6,
            gmv_cents: 798
        }
    );
    assert_eq!(
        w.store.room_totals("nowhere").await.expect("totals"),
        RoomTotals::default()
    );
    let got = w.store.get_order("a").await.expect("get").expect("a");
    assert_eq!(got.order, a);
    assert_eq!(got.status, "accepted");
    assert!(got.stored_at_ms > 0);
    // Connecting again runs the migrations again: a no-op.
    let again = OrderStore::connect(&w.store_url).await.expect("reconnect");
    assert_eq!(again.count_orders().await.expect("count"), 3);
    again.close().await;
    w.finish().await;
}

async fn stores_every_order_once_with_items_and_ref(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    // Other kinds before, between and after: acknowledged without work.
    xadd(
        &mut conn,
        &w.keys,
        &[("kind", "product"), ("sku", "sku-0"), ("room", "room-1")],
    )
    .await;
    for n in 0..120 {
        xadd_order(&mut conn, &w.keys, n, if n == 7 { "u-ref" } else { "" }).await;
        if n % 10 == 0 {
            xadd(
                &mut conn,
                &w.keys,
                &[("kind", "reserved"), ("reservation", "x")],
            )
            .await;
        }
    }
    // The committer retried an XADD: the same order twice in the stream.
    xadd_order(&mut conn, &w.keys, 3, "").await;
    xadd(&mut conn, &w.keys, &[("kind", "some-future-kind")]).await;

    let run = spawn(w.writer("w1", Duration::from_secs(30)).await);
    wait_stored(&w, &mut conn, 120).await;
    run.stop().await;

    assert_eq!(w.store.count_items().await.expect("items"), 360);
    let o7 = w
        .store
        .get_order("o-7")
        .await
        .expect("get")
        .expect("o-7 stored");
    assert_eq!(o7.order.ref_user.as_deref(), Some("u-ref"));
    assert_eq!(o7.order.user_id, "u-0");
    assert_eq!(o7.order.room, "room-1");
    assert_eq!(o7.order.created_at_ms, 1_763_683_200_000);
    assert_eq!(o7.status, "accepted");
    let want: Vec<(String, String, i64, i64)> = items(7);
    let got: Vec<(String, String, i64, i64)> = o7
        .order
        .items
        .iter()
        .map(|i| {
            (
                i.reservation.clone(),
                i.sku.clone(),
                i.qty,
                i.unit_price_cents,
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(o7.order.total_cents, 100 + 400 + 900);
    let o8 = w.store.get_order("o-8").await.expect("get").expect("o-8");
    assert_eq!(o8.order.ref_user, None);
    let totals = w.store.room_totals("room-1").await.expect("totals");
    assert_eq!(totals.orders, 120);
    assert_eq!(totals.units_sold, 120 * 6);
    assert_eq!(totals.gmv_cents, 120 * 1400);
    w.finish().await;
}

async fn a_dead_consumers_entries_are_claimed_and_stored_once(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(w.keys.events())
        .arg(ORDER_WRITER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("group");
    for n in 0..40 {
        xadd_order(&mut conn, &w.keys, n, "").await;
    }
    // Consumer A reads everything and dies before acknowledging: for the first half it had
    // even committed to SQL (crash after commit, before XACK); for the rest it had not.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(ORDER_WRITER_GROUP)
        .arg("dead-a")
        .arg("COUNT")
        .arg(1000)
        .arg("STREAMS")
        .arg(w.keys.events())
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("xreadgroup");
    let a = w.writer("dead-a-store", Duration::from_secs(30)).await;
    drop(a);
    let half: Vec<_> = (0..20)
        .map(|n| livegate::store::Order {
            order_id: format!("o-{n}"),
            user_id: format!("u-{}", n % 7),
            room: "room-1".into(),
            ref_user: None,
            total_cents: 1400,
            created_at_ms: 1_763_683_200_000,
            items: items(n)
                .into_iter()
                .map(
                    |(reservation, sku, qty, unit_price_cents)| livegate::store::OrderItem {
                        reservation,
                        sku,
                        qty,
                        unit_price_cents,
                    },
                )
                .collect(),
        })
        .collect();
    w.store.store_batch(&half).await.expect("A's commit");
    assert_eq!(pending(&mut conn, &w.keys).await, 40);

    // Subscribe before B starts: B confirms the orders A stored too (A never did).
    let client = redis::Client::open(w.redis.url()).expect("url");
    let mut sub = client.get_async_pubsub().await.expect("pubsub");
    sub.subscribe(w.keys.confirmations())
        .await
        .expect("subscribe");
    let mut messages = sub.into_on_message();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = spawn(w.writer("b", Duration::from_millis(200)).await);
    wait_stored(&w, &mut conn, 40).await;
    let mut confirmed = HashSet::new();
    while confirmed.len() < 40 {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("confirmation in time")
            .expect("pubsub open");
        let payload: String = msg.get_payload().expect("payload");
        let v: serde_json::Value = serde_json::from_str(&payload).expect("json");
        confirmed.insert(v["order"].as_str().expect("order").to_string());
    }
    run.stop().await;
    assert_eq!(w.store.count_items().await.expect("items"), 120);
    w.finish().await;
}

async fn a_batch_stored_twice_is_one_row_each(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    for n in 0..30 {
        xadd_order(&mut conn, &w.keys, n, "").await;
    }
    let run = spawn(w.writer("first", Duration::from_secs(30)).await);
    wait_stored(&w, &mut conn, 30).await;
    run.stop().await;
    // The acknowledgements are lost (as if XACK never reached Redis): every entry is
    // delivered again, to a new writer.
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(w.keys.events())
        .arg(ORDER_WRITER_GROUP)
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("setid");
    let run = spawn(w.writer("second", Duration::from_secs(30)).await);
    let last_id: String = {
        let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(w.keys.events())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .expect("xrevrange");
        v.first().map(|e| e.0.clone()).expect("an entry")
    };
    let mut c = conn.clone();
    let keys = w.keys.clone();
    wait_for("redelivered entries handled", || {
        let mut c = c.clone();
        let keys = keys.clone();
        let last_id = last_id.clone();
        async move {
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(keys.events())
                .query_async(&mut c)
                .await
                .expect("xinfo");
            format!("{groups:?}").contains(&last_id) && pending(&mut c, &keys).await == 0
        }
    })
    .await;
    let _ = &mut c;
    run.stop().await;
    assert_eq!(w.store.count_orders().await.expect("count"), 30);
    assert_eq!(w.store.count_items().await.expect("items"), 90);
    w.finish().await;
}

async fn two_writers_competing_store_every_order_once(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    let a = spawn(w.writer("a", Duration::from_millis(500)).await);
    let b = spawn(w.writer("b", Duration::from_millis(500)).await);
    // Written while both run, from two producers.
    let mut c1 = conn.clone();
    let mut c2 = conn.clone();
    let keys1 = w.keys.clone();
    let keys2 = w.keys.clone();
    let p1 = tokio::spawn(async move {
        for n in (0..600).step_by(2) {
            xadd_order(&mut c1, &keys1, n, "").await;
        }
    });
    let p2 = tokio::spawn(async move {
        for n in (1..600).step_by(2) {
            xadd_order(&mut c2, &keys2, n, "").await;
        }
    });
    p1.await.expect("producer");
    p2.await.expect("producer");
    wait_stored(&w, &mut conn, 600).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(w.store.count_items().await.expect("items"), 1800);
    w.finish().await;
}

async fn poison_entries_go_to_dead_letters_and_the_writer_goes_on(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    xadd_order(&mut conn, &w.keys, 1, "").await;
    let bad_items = xadd(
        &mut conn,
        &w.keys,
        &[
            ("kind", "order"),
            ("order", "o-bad-items"),
            ("user", "u"),
            ("req", "q"),
            ("room", "room-1"),
            ("ref", ""),
            ("total_cents", "100"),
            ("created_at", "1"),
            ("items", "[{\"reservation\": oops"),
        ],
    )
    .await;
    let no_total = xadd(
        &mut conn,
        &w.keys,
        &[
            ("kind", "order"),
            ("order", "o-no-total"),
            ("user", "u"),
            ("req", "q"),
            ("room", "room-1"),
            ("ref", ""),
            ("created_at", "1"),
            ("items", &items_json(&items(9))),
        ],
    )
    .await;
    let dead = store_past_poison(&w, &mut conn).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let field = |e: &(String, Vec<(String, String)>), k: &str| {
        e.1.iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(field(&dead[0], "source_id"), bad_items);
    assert_eq!(field(&dead[0], "order"), "o-bad-items");
    assert!(field(&dead[0], "error").contains("items"), "{dead:?}");
    assert_eq!(field(&dead[1], "source_id"), no_total);
    assert!(field(&dead[1], "error").contains("total_cents"), "{dead:?}");
    assert!(w
        .store
        .get_order("o-bad-items")
        .await
        .expect("get")
        .is_none());
    w.finish().await;
}

async fn an_order_the_store_refuses_is_dead_lettered(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    // A rule of the database that the writer does not know about: no order over 10,000.00.
    if w.store_url.starts_with("sqlite:") {
        exec(
            &w.store_url,
            "CREATE TRIGGER refuse_big BEFORE INSERT ON orders \
             WHEN NEW.total_cents > 1000000 BEGIN SELECT RAISE(ABORT, 'too big'); END",
        )
        .await;
    } else {
        exec(
            &w.store_url,
            "ALTER TABLE orders ADD CONSTRAINT refuse_big CHECK (total_cents <= 1000000)",
        )
        .await;
    }
    xadd_order(&mut conn, &w.keys, 1, "").await;
    let big_items = r#"[{"reservation":"rb","sku":"gold","qty":1,"price_cents":2000000}]"#;
    let big = xadd(
        &mut conn,
        &w.keys,
        &[
            ("kind", "order"),
            ("order", "o-big"),
            ("user", "u"),
            ("req", "q"),
            ("room", "room-1"),
            ("ref", ""),
            ("total_cents", "2000000"),
            ("created_at", "1"),
            ("items", big_items),
        ],
    )
    .await;
    let dead = store_past_poison(&w, &mut conn).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let fields: std::collections::HashMap<_, _> = dead[0].1.iter().cloned().collect();
    assert_eq!(fields.get("source_id"), Some(&big));
    assert_eq!(fields.get("order").map(String::as_str), Some("o-big"));
    assert!(
        fields.get("error").is_some_and(|e| e.contains("refused")),
        "{fields:?}"
    );
    assert!(w.store.get_order("o-big").await.expect("get").is_none());
    w.finish().await;
}

async fn idle_empty_consumers_are_forgotten(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    xadd_order(&mut conn, &w.keys, 1, "").await;
    let run = spawn(w.writer("w", Duration::from_secs(30)).await);
    wait_stored(&w, &mut conn, 1).await;
    run.stop().await;
    // A ghost (a writer of an earlier process, nothing pending) and a holder (one entry).
    xadd_order(&mut conn, &w.keys, 2, "").await;
    for name in ["holder", "ghost"] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(ORDER_WRITER_GROUP)
            .arg(name)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(w.keys.events())
            .arg(">")
            .query_async(&mut conn)
            .await
            .expect("xreadgroup");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writer = w
        .writer("w2", Duration::from_secs(3600))
        .await
        .with_trim_interval(Duration::from_millis(50))
        .with_forget_consumer_idle(Duration::from_millis(200));
    let run = spawn(writer);
    let c = conn.clone();
    let keys = w.keys.clone();
    let consumers = |mut c: MultiplexedConnection, keys: Keys| async move {
        let v: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(keys.events())
            .arg(ORDER_WRITER_GROUP)
            .query_async(&mut c)
            .await
            .expect("xinfo consumers");
        let mut names: Vec<String> = v.consumers.into_iter().map(|c| c.name).collect();
        names.sort();
        names
    };
    wait_for("the ghosts forgotten", || {
        let (c, keys) = (c.clone(), keys.clone());
        async move {
            let names = consumers(c, keys).await;
            !names.contains(&"ghost".to_string()) && !names.contains(&"w".to_string())
        }
    })
    .await;
    run.stop().await;
    // The holder keeps its entry (and so its place in the group).
    assert!(consumers(conn.clone(), w.keys.clone())
        .await
        .contains(&"holder".to_string()));
    assert_eq!(pending(&mut conn, &w.keys).await, 1);
    w.finish().await;
}

/// `kill -9` of the `livegate order-writer` process at arbitrary moments while orders
/// flow, restarted each time (alternately under the same consumer name, which re-reads its
/// own pending entries, and under a new one, which leaves them to be claimed): every order
/// is stored, none twice.
async fn kill_9_of_the_writer_process_loses_and_duplicates_nothing(db: Db) {
    const ORDERS: usize = 1500;
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    let log_dir = temp_dir("writer-log");
    let spawn_writer = |consumer: &str| {
        let log = std::fs::File::create(log_dir.join(format!("{consumer}.log"))).expect("log");
        std::process::Command::new(env!("CARGO_BIN_EXE_livegate"))
            .arg("order-writer")
            .env("LIVEGATE_REDIS_URL", w.redis.url())
            .env("LIVEGATE_ORDER_STORE", &w.store_url)
            .env("LIVEGATE_KEY_PREFIX", w.keys.prefix())
            .env("LIVEGATE_ORDER_WRITER_CONSUMER", consumer)
            .env("LIVEGATE_ORDER_WRITER_BATCH", "40")
            .env("LIVEGATE_ORDER_WRITER_BLOCK_MS", "50")
            .env("LIVEGATE_ORDER_WRITER_CLAIM_IDLE_MS", "300")
            .env("LIVEGATE_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn livegate order-writer")
    };
    let mut producer_conn = conn.clone();
    let keys = w.keys.clone();
    let producer = tokio::spawn(async move {
        for n in 0..ORDERS {
            xadd_order(&mut producer_conn, &keys, n, "").await;
            // Spread over the kill rounds below (~2 s), so that kills land mid-batch.
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(12)).await;
            }
        }
    });
    for round in 0..10 {
        let name = if round % 2 == 0 {
            "proc-writer".to_string()
        } else {
            format!("proc-writer-{round}")
        };
        let mut child = spawn_writer(&name);
        let ms = 80 + rand::random_range(0..250u64);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
    producer.await.expect("producer");
    // The killed writers did work (so the kills hit them working, not starting).
    let by_killed = w.store.count_orders().await.expect("count");
    let pending_left = pending(&mut conn, &w.keys).await;
    eprintln!("killed writers stored {by_killed} orders and left {pending_left} entries pending");
    assert!(by_killed > 0);
    let mut last = spawn_writer("proc-final");
    let store = w.store.clone();
    let waited = tokio::time::timeout(WAIT, async {
        while store.count_orders().await.expect("count") < ORDERS as i64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if waited.is_err() {
        let _ = last.kill();
        panic!(
            "orders stored: {:?} of {ORDERS}; logs in {}",
            w.store.count_orders().await,
            log_dir.display()
        );
    }
    wait_stored(&w, &mut conn, ORDERS as i64).await;
    let _ = last.kill();
    let _ = last.wait();
    assert_eq!(
        w.store.count_items().await.expect("items"),
        3 * ORDERS as i64
    );
    let totals = w.store.room_totals("room-1").await.expect("totals");
    assert_eq!(totals.gmv_cents, 1400 * ORDERS as i64);
    let _ = std::fs::remove_dir_all(&log_dir);
    w.finish().await;
}

async fn trimming_never_drops_an_unacknowledged_entry(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(xadd_order(&mut conn, &w.keys, n, "").await);
    }
    let writer = w
        .writer("w", Duration::from_secs(3600))
        .await
        .with_trim_interval(Duration::from_millis(50));
    let run = spawn(writer);
    wait_stored(&w, &mut conn, 5).await;
    run.stop().await;

    for n in 5..10 {
        ids.push(xadd_order(&mut conn, &w.keys, n, "").await);
    }
    // A slow consumer of the same group takes two entries and sits on them.
    let held: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(ORDER_WRITER_GROUP)
        .arg("slow")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(w.keys.events())
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("slow read");
    let held: Vec<String> = held
        .keys
        .iter()
        .flat_map(|k| k.ids.iter().map(|e| e.id.clone()))
        .collect();
    // The stopped writer finished its blocked read before it returned, so it left nothing
    // in flight that could have taken ids[5] after it stopped.
    assert_eq!(held, ids[5..7].to_vec());
    let first_held = ids
        .iter()
        .position(|id| *id == held[0])
        .expect("held id is in the stream");
    let writer = w
        .writer("w", Duration::from_secs(3600))
        .await
        .with_trim_interval(Duration::from_millis(50));
    let run = spawn(writer);
    let store = w.store.clone();
    wait_for("the other entries stored", || {
        let store = store.clone();
        async move { store.count_orders().await.expect("count") == 8 }
    })
    .await;
    let stream_ids = |conn: MultiplexedConnection, keys: Keys| async move {
        let mut conn = conn;
        stream_entries(&mut conn, &keys.events())
            .await
            .into_iter()
            .map(|e| e.0)
            .collect::<Vec<String>>()
    };
    let c = conn.clone();
    let keys = w.keys.clone();
    let expected_after_first_trim = ids[first_held..].to_vec();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = stream_ids(c.clone(), keys.clone()).await;
        if now == expected_after_first_trim {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stream {now:?}, want {expected_after_first_trim:?}, all {ids:?}, pending {}",
            pending(&mut conn, &w.keys).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Held for a while more: still there, however often the writer trims.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stream_ids(conn.clone(), w.keys.clone()).await,
        ids[first_held..].to_vec()
    );

    // The slow consumer acknowledges: now everything but the last delivered entry goes.
    let _: i64 = redis::cmd("XACK")
        .arg(w.keys.events())
        .arg(ORDER_WRITER_GROUP)
        .arg(&held[0])
        .arg(&held[1])
        .query_async(&mut conn)
        .await
        .expect("xack");
    let last = vec![ids[9].clone()];
    wait_for("trimmed to the last delivered entry", || {
        let c = c.clone();
        let keys = keys.clone();
        let want = last.clone();
        async move { stream_ids(c, keys).await == want }
    })
    .await;
    run.stop().await;
    // The slow consumer's entries were never stored by this writer (they were not its own
    // and were not idle long enough to claim): exactly the other eight are.
    assert_eq!(w.store.count_orders().await.expect("count"), 8);
    w.finish().await;
}

async fn the_writer_survives_redis_going_down(db: Db) {
    let w = World::with_redis(db, RedisServer::start_durable()).await;
    let mut conn = w.conn().await;
    for n in 0..10 {
        xadd_order(&mut conn, &w.keys, n, "").await;
    }
    let run = spawn(w.writer("w", Duration::from_secs(30)).await);
    wait_stored(&w, &mut conn, 10).await;
    let mut w = w;
    w.redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.redis.restart();
    let mut conn = w.conn().await;
    for n in 10..20 {
        xadd_order(&mut conn, &w.keys, n, "").await;
    }
    wait_stored(&w, &mut conn, 20).await;
    run.stop().await;
    w.finish().await;
}

async fn the_writer_waits_for_a_failing_store(db: Db) {
    let w = World::new(db).await;
    let mut conn = w.conn().await;
    // The store "goes down": its table disappears under the writer.
    let admin = OrderStore::connect(&w.store_url).await.expect("admin");
    let run = spawn(w.writer("w", Duration::from_secs(30)).await);
    xadd_order(&mut conn, &w.keys, 1, "").await;
    wait_stored(&w, &mut conn, 1).await;
    exec(&w.store_url, "ALTER TABLE orders RENAME TO orders_away").await;
    for n in 2..6 {
        xadd_order(&mut conn, &w.keys, n, "").await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The batch it holds is not stored, so not acknowledged (and it reads no further).
    let p = pending(&mut conn, &w.keys).await;
    assert!((1..=4).contains(&p), "pending {p}");
    exec(&w.store_url, "ALTER TABLE orders_away RENAME TO orders").await;
    wait_stored(&w, &mut conn, 5).await;
    run.stop().await;
    admin.close().await;
    w.finish().await;
}

async fn exec(url: &str, sql: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.expect("sqlite");
        sqlx::query(sql).execute(&mut c).await.expect(sql);
        let _ = c.close().await;
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.expect("pg");
        sqlx::query(sql).execute(&mut c).await.expect(sql);
        let _ = c.close().await;
    }
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(pg) = super::PgSchema::create(stringify!($name)).await else {
                        eprintln!(
                            "NOTICE: PostgreSQL not reachable, skipping postgres::{}",
                            stringify!($name)
                        );
                        return;
                    };
                    super::$name(super::Db::Postgres(pg)).await;
                }
            )*
        }
    };
}

on_both_stores!(
    the_store_is_idempotent_within_and_across_batches,
    stores_every_order_once_with_items_and_ref,
    a_dead_consumers_entries_are_claimed_and_stored_once,
    a_batch_stored_twice_is_one_row_each,
    two_writers_competing_store_every_order_once,
    poison_entries_go_to_dead_letters_and_the_writer_goes_on,
    an_order_the_store_refuses_is_dead_lettered,
    idle_empty_consumers_are_forgotten,
    kill_9_of_the_writer_process_loses_and_duplicates_nothing,
    trimming_never_drops_an_unacknowledged_entry,
    the_writer_survives_redis_going_down,
    the_writer_waits_for_a_failing_store,
);

/// The entry point the `livegate` binary calls: configuration in, orders stored, clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_consumes_with_the_process_configuration() {
    let w = World::new(Db::Sqlite).await;
    let mut conn = w.conn().await;
    let (redis_url, store_url) = (w.redis.url(), w.store_url.clone());
    let cfg = livegate::config::Config::from_source(|k| match k {
        "LIVEGATE_REDIS_URL" => Some(redis_url.clone()),
        "LIVEGATE_ORDER_STORE" => Some(store_url.clone()),
        "LIVEGATE_KEY_PREFIX" => Some("lgt".to_string()),
        "LIVEGATE_ORDER_WRITER_BLOCK_MS" => Some("100".to_string()),
        _ => None,
    })
    .expect("config");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        livegate::order_writer::run(&cfg, async {
            let _ = rx.await;
        })
        .await
    });
    for n in 0..25 {
        xadd_order(&mut conn, &w.keys, n, "").await;
    }
    wait_stored(&w, &mut conn, 25).await;
    let _ = tx.send(());
    let res = tokio::time::timeout(WAIT, task)
        .await
        .expect("run stops")
        .expect("run task");
    assert!(res.is_ok(), "{res:?}");

    // A store URL it cannot use is a configuration error, reported at once.
    let mut bad = livegate::config::Config::defaults();
    bad.order_store = "sqlite:///nonexistent-dir/for/sure/orders.db".to_string();
    bad.redis_url = w.redis.url();
    let res = tokio::time::timeout(
        WAIT,
        livegate::order_writer::run(&bad, std::future::pending::<()>()),
    )
    .await
    .expect("fails fast");
    assert!(res.is_err());
    w.finish().await;
}

/// Every entry of a stream: (id, fields).
async fn stream_entries(
    conn: &mut MultiplexedConnection,
    key: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("xrange")
}

/// With a poison entry already in the stream: adds good orders 2 and 3 around a writer run,
/// waits until both are stored (the poison did not stop the writer), and returns the
/// dead-letter stream.
async fn store_past_poison(
    w: &World,
    conn: &mut MultiplexedConnection,
) -> Vec<(String, Vec<(String, String)>)> {
    xadd_order(conn, &w.keys, 2, "").await;
    let run = spawn(w.writer("w", Duration::from_secs(30)).await);
    wait_stored(w, conn, 2).await;
    xadd_order(conn, &w.keys, 3, "").await;
    wait_stored(w, conn, 3).await;
    run.stop().await;
    stream_entries(conn, &w.keys.dead_letters()).await
}

/// The writer's stream reads have a connection of their own (src/order_writer/resp.rs):
/// it must log in and pick the database exactly as the URL says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_reader_uses_the_urls_password_and_database() {
    let w = World::new(Db::Sqlite).await;
    let port = w
        .redis
        .url()
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches('/')
        .to_string();
    let mut admin = w.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query_async(&mut admin)
        .await
        .expect("config set requirepass");
    let url = format!("redis://:s3cret@127.0.0.1:{port}/3");
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection with password and db");
    for n in 0..30 {
        xadd_order(&mut conn, &w.keys, n, "").await;
        xadd(
            &mut conn,
            &w.keys,
            &[("kind", "reserved"), ("reservation", "x")],
        )
        .await;
    }
    let store = OrderStore::connect(&w.store_url).await.expect("store");
    let writer = OrderWriter::new(
        client,
        w.keys.clone(),
        store,
        OrderWriterConfig {
            batch: 7,
            block: Duration::from_millis(100),
            claim_idle: Duration::from_secs(30),
            consumer: Some("w-auth".to_string()),
        },
    );
    let run = spawn(writer);
    wait_stored(&w, &mut conn, 30).await;
    run.stop().await;
    // Nothing went to database 0.
    let in_db0: bool = redis::cmd("EXISTS")
        .arg(w.keys.events())
        .query_async(&mut admin)
        .await
        .expect("exists");
    assert!(
        !in_db0,
        "the events stream of database 3 was read from database 0"
    );
    w.finish().await;
}
