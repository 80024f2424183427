//! Invariants under load and failure, against a real redis-server: no oversell, no lost
//! confirmation, no leaked stock — through a rush, Redis dying mid-rush, the gateway being
//! SIGKILLed mid-rush, restarts, and expiry.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    gateway::{room_with_product, unique_prefix, Client, Enc, Gateway, GatewayProcess},
    proxy::HoldingProxy,
    redis::RedisServer,
};
use livegate::auth::Role;
use redis::AsyncCommands;
use serde_json::{json, Value};

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// Entries of the events stream of `kind` (for `sku` when given).
async fn stream_entries(url: &str, prefix: &str, kind: &str) -> Vec<HashMap<String, String>> {
    let mut c = redis_conn(url).await;
    let reply: redis::streams::StreamRangeReply = c
        .xrange_all(format!("{prefix}:events"))
        .await
        .expect("xrange");
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
                .collect::<HashMap<_, _>>()
        })
        .filter(|m| m.get("kind").map(String::as_str) == Some(kind))
        .collect()
}

/// Checks that each `reserved` entry is `kind`, `reservation` and the `record` that
/// P:reservations holds for it (docs/redis.md); returns the records, parsed.
async fn entry_records(url: &str, prefix: &str, entries: &[HashMap<String, String>]) -> Vec<Value> {
    let mut c = redis_conn(url).await;
    let mut records = Vec::new();
    for e in entries {
        let id = e.get("reservation").expect("reservation field");
        let record: String = c
            .hget(format!("{prefix}:reservations"), id)
            .await
            .expect("hget");
        assert_eq!(e.get("record"), Some(&record), "{e:?}");
        assert_eq!(e.len(), 3, "{e:?}");
        records.push(serde_json::from_str(&record).expect("json record"));
    }
    records
}

async fn connect_many(url: impl Fn(usize) -> String, n: usize) -> Vec<Client> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(Client::connect(&url(i), Enc::Json).await);
    }
    out
}

/// Every client sends one add_to_cart at once; returns each client's reply.
async fn rush(clients: Vec<Client>, room: &str, sku: &str) -> Vec<(Client, Value)> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let (room, sku) = (room.to_string(), sku.to_string());
            tokio::spawn(async move {
                let r = c
                    .request(json!({"type":"add_to_cart","room":room,"sku":sku,"qty":1}))
                    .await;
                (c, r)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rush_of_1000_for_100_units_reserves_exactly_100() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let gw = Gateway::start_with(&redis.url(), &[("LIVEGATE_KEY_PREFIX", &prefix)]).await;
    let _a = room_with_product(&gw, "hot", "sku-hot", 100).await;
    let clients = connect_many(
        |i| gw.ws_url(&gw.token(&format!("buyer{i}"), Role::Viewer, &[])),
        1000,
    )
    .await;
    let mut watcher = gw.viewer("watcher").await;
    watcher.request(json!({"type":"join","room":"hot"})).await;
    let started = std::time::Instant::now();
    let replies = rush(clients, "hot", "sku-hot").await;
    // Stock is state, coalesced per room tick: the watcher hears the level go from 100 to
    // 0 in at most one message per 100 ms tick, not one per reservation.
    let mut stock_msgs = 0;
    loop {
        let m = watcher.recv_type("stock").await;
        stock_msgs += 1;
        if m["items"][0]["available"] == 0 {
            break;
        }
    }
    let ticks = started.elapsed().as_millis() / 100 + 2;
    assert!(
        stock_msgs as u128 <= ticks,
        "{stock_msgs} stock messages for 100 reservations in {ticks} ticks"
    );
    let mut reserved = Vec::new();
    for (_, r) in &replies {
        match r["type"].as_str() {
            Some("reserved") => reserved.push(r["reservation"].as_str().expect("id").to_string()),
            Some("error") => assert_eq!(r["code"], "sold_out", "{r}"),
            _ => panic!("unexpected reply {r}"),
        }
    }
    assert_eq!(reserved.len(), 100);
    let entries = stream_entries(&redis.url(), &prefix, "reserved").await;
    assert_eq!(entries.len(), 100);
    let mut c = redis_conn(&redis.url()).await;
    for id in &reserved {
        let held: bool = c
            .hexists(format!("{prefix}:reservations"), id)
            .await
            .expect("hexists");
        assert!(held, "confirmed reservation {id} is in redis");
    }
    // A reserve writes no idempotency bucket: the record is its idempotency record, and a
    // bucket record is written only when a reservation ends.
    let buckets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:idem:reserves:*"))
        .query_async(&mut c)
        .await
        .expect("keys");
    assert!(buckets.is_empty(), "{buckets:?}");
    // Each entry carries the reservation's record, as docs/redis.md says: the same JSON as
    // its value in P:reservations.
    for v in entry_records(&redis.url(), &prefix, &entries).await {
        assert_eq!(v["sku"], "sku-hot", "{v}");
        assert_eq!(v["qty"], 1, "{v}");
    }
    let counts = gw.app.inventory.counts("sku-hot").expect("sku");
    assert_eq!(
        (counts.available, counts.reserved, counts.sold),
        (0, 100, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_mid_rush_gives_unavailable_leaks_nothing_and_serving_resumes() {
    let mut redis = RedisServer::start_durable();
    let prefix = unique_prefix();
    let gw = Gateway::start_with(
        &redis.url(),
        &[
            ("LIVEGATE_KEY_PREFIX", &prefix),
            ("LIVEGATE_COMMIT_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let _a = room_with_product(&gw, "r", "s", 1000).await;
    let clients = connect_many(
        |i| gw.ws_url(&gw.token(&format!("b{i}"), Role::Viewer, &[])),
        300,
    )
    .await;
    let (first, second): (Vec<_>, Vec<_>) =
        clients.into_iter().enumerate().partition(|(i, _)| *i < 150);
    let first: Vec<Client> = first.into_iter().map(|(_, c)| c).collect();
    let second: Vec<Client> = second.into_iter().map(|(_, c)| c).collect();
    let ok_before = rush(first, "r", "s").await;
    assert!(ok_before.iter().all(|(_, r)| r["type"] == "reserved"));
    redis.kill();
    let during = rush(second, "r", "s").await;
    for (_, r) in &during {
        assert_eq!(r["type"], "error", "{r}");
        assert_eq!(r["code"], "unavailable", "{r}");
    }
    // Nothing was sold twice while Redis was away.
    let counts = gw.app.inventory.counts("s").expect("sku");
    assert_eq!(counts.available + counts.reserved, 1000, "{counts:?}");
    redis.restart();
    // Serving resumes by itself.
    let mut c = Client::connect(&gw.ws_url(&gw.token("late", Role::Viewer, &[])), Enc::Json).await;
    let mut resumed = false;
    for _ in 0..50 {
        let r = c
            .request(json!({"type":"add_to_cart","room":"r","sku":"s","qty":1}))
            .await;
        if r["type"] == "reserved" {
            resumed = true;
            break;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(resumed, "serving did not resume after redis came back");
    let mut rc = redis_conn(&redis.url()).await;
    let held: usize = rc
        .hlen(format!("{prefix}:reservations"))
        .await
        .expect("hlen");
    assert_eq!(
        held, 151,
        "every confirmed reservation survived the redis crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_rush_keeps_every_invariant_after_restart() {
    let redis = RedisServer::start_durable();
    let prefix = unique_prefix();
    let mut gw = GatewayProcess::start(&redis.url(), &prefix, &[]).await;
    let mut anchor = Client::connect(&gw.ws_url("anchor", Role::Anchor, &["k"]), Enc::Json).await;
    anchor
        .request(json!({"type":"open_room","room":"k","title":"t"}))
        .await;
    let r = anchor
        .request(json!({"type":"upsert_product","room":"k","sku":"s","title":"t","price_cents":100,"stock":100}))
        .await;
    assert_eq!(r["type"], "ack");
    anchor
        .request(json!({"type":"pin","room":"k","sku":"s"}))
        .await;
    let clients = connect_many(|i| gw.ws_url(&format!("u{i}"), Role::Viewer, &[]), 300).await;
    // Everyone presses at once; the gateway is killed while replies are in flight.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                c.send(json!({"type":"add_to_cart","req":format!("q{i}"),"room":"k","sku":"s","qty":1}))
                    .await;
                match c.next_event(Duration::from_secs(5)).await {
                    common::gateway::Event::Msg(m) => Some(m),
                    _ => None,
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    gw.kill9_and_restart().await;
    let mut confirmed = Vec::new();
    for t in tasks {
        if let Some(m) = t.await.expect("task") {
            if m["type"] == "reserved" {
                confirmed.push((
                    m["req"].as_str().unwrap_or("").to_string(),
                    m["reservation"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    let mut c = redis_conn(&redis.url()).await;
    let held: HashMap<String, String> = c
        .hgetall(format!("{prefix}:reservations"))
        .await
        .expect("hgetall");
    // No lost confirmation.
    for (_, id) in &confirmed {
        assert!(held.contains_key(id), "confirmed {id} lost");
    }
    // No oversell, and the restarted gateway agrees with redis on what is left.
    assert!(held.len() <= 100);
    let (status, body) = common::gateway::http_get_addr(gw.addr, "/api/v1/rooms/k").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["pinned"], "s", "pin restored");
    assert_eq!(v["products"][0]["available"], 100 - held.len() as u64);
    // A retry with the same req after the restart returns the same reservation.
    if let Some((req, id)) = confirmed.first() {
        let i: usize = req.trim_start_matches('q').parse().expect("req number");
        let mut again =
            Client::connect(&gw.ws_url(&format!("u{i}"), Role::Viewer, &[]), Enc::Json).await;
        let r = cart(&mut again, "k", "s", req, 1).await;
        assert_eq!(r["type"], "reserved", "{r}");
        assert_eq!(r["reservation"], id.as_str());
    }
    // Selling goes on after the restart up to exactly the stock.
    let more = connect_many(|i| gw.ws_url(&format!("late{i}"), Role::Viewer, &[]), 150).await;
    let replies = rush(more, "k", "s").await;
    let sold_after = replies
        .iter()
        .filter(|(_, r)| r["type"] == "reserved")
        .count();
    assert_eq!(
        held.len() + sold_after,
        100,
        "exactly the stock is sold, no more"
    );
}

#[tokio::test]
async fn a_restart_restores_rooms_shelves_pins_and_reservations() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let cfg = [("LIVEGATE_KEY_PREFIX", prefix.as_str())];
    let mut gw = Gateway::start_with(&redis.url(), &cfg).await;
    let mut a = room_with_product(&gw, "room", "sku", 10).await;
    a.request(json!({"type":"pin","room":"room","sku":"sku"}))
        .await;
    let mut v = gw.viewer("alice").await;
    v.request(json!({"type":"join","room":"room"})).await;
    let r = cart(&mut v, "room", "sku", "cart-1", 3).await;
    assert_eq!(r["type"], "reserved");
    let id = r["reservation"].as_str().expect("id").to_string();
    gw.stop().await;
    drop(gw);

    let mut gw2 = Gateway::start_with(&redis.url(), &cfg).await;
    let mut v = gw2.viewer("alice").await;
    let st = v
        .request(json!({"type":"join","room":"room","since":3}))
        .await;
    assert_eq!(
        st["type"], "room_state",
        "a since from before the restart gets a snapshot"
    );
    assert_eq!(st["status"], "live");
    assert_eq!(st["pinned"], "sku");
    assert_eq!(st["products"][0]["available"], 7);
    assert_eq!(st["products"][0]["title"], "Lipstick");
    // Idempotent retry after the restart.
    let again = cart(&mut v, "room", "sku", "cart-1", 3).await;
    assert_eq!(again["reservation"], id.as_str());
    let rel = v.request(json!({"type":"release","reservation":id})).await;
    assert_eq!(rel["type"], "released");
    assert_eq!(gw2.app.inventory.available("sku"), Some(10));
    // A second cart, bought.
    let r2 = cart(&mut v, "room", "sku", "cart-2", 1).await;
    assert_eq!(r2["type"], "reserved", "{r2}");
    let order = v
        .request(json!({"type":"checkout","reservations":[r2["reservation"]]}))
        .await;
    assert_eq!(order["type"], "order_accepted", "{order}");
    gw2.stop().await;
    drop(gw2);

    // The idempotency records outlive the reservations (released, bought) and the
    // restart: the same req does not buy a second time, it is told its reservation ended.
    let gw3 = Gateway::start_with(&redis.url(), &cfg).await;
    let mut v = gw3.viewer("alice").await;
    for (req, qty) in [("cart-1", 3), ("cart-2", 1)] {
        let ended = cart(&mut v, "room", "sku", req, qty).await;
        assert_eq!(ended["type"], "error", "{req}: {ended}");
        assert_eq!(ended["code"], "conflict", "{req}: {ended}");
    }
    assert_eq!(gw3.app.inventory.available("sku"), Some(9));
    // The record lives in this minute's bucket, which expires after the idempotency TTL.
    let mut c = redis_conn(&redis.url()).await;
    let buckets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:idem:reserves:*"))
        .query_async(&mut c)
        .await
        .expect("keys");
    assert!(!buckets.is_empty(), "no idempotency bucket written");
    for b in &buckets {
        let ttl: i64 = c.pttl(b).await.expect("pttl");
        assert!(ttl > 0, "bucket {b} has no expiry ({ttl})");
    }
}

#[tokio::test]
async fn reservations_expire_with_a_notice_and_their_units_return() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let gw = Gateway::start_with(&redis.url(), &[("LIVEGATE_KEY_PREFIX", &prefix)]).await;
    let mut a = gw.anchor("a", &["x"]).await;
    a.request(json!({"type":"open_room","room":"x","title":"t"}))
        .await;
    let r = a
        .request(json!({"type":"upsert_product","room":"x","sku":"quick","title":"t","price_cents":5,"stock":2,"ttl_s":1}))
        .await;
    assert_eq!(r["type"], "ack");
    let mut v = gw.viewer("bob").await;
    let r = v
        .request(json!({"type":"add_to_cart","room":"x","sku":"quick","qty":2}))
        .await;
    let id = r["reservation"].as_str().expect("id").to_string();
    assert_eq!(gw.app.inventory.available("quick"), Some(0));
    let notice = v.recv_type("released").await;
    assert_eq!(
        notice,
        json!({"type":"released","reservation":id,"reason":"expired"})
    );
    assert_eq!(gw.app.inventory.available("quick"), Some(2));
    let expired = stream_entries(&redis.url(), &prefix, "expired").await;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["reservation"], id);
    // Checkout of an expired reservation.
    let r = v
        .request(json!({"type":"checkout","reservations":[id]}))
        .await;
    assert_eq!(r["type"], "error");
}

#[tokio::test]
async fn reservations_that_expired_while_down_are_expired_at_start() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let cfg = [("LIVEGATE_KEY_PREFIX", prefix.as_str())];
    let mut gw = Gateway::start_with(&redis.url(), &cfg).await;
    let mut a = gw.anchor("a", &["y"]).await;
    a.request(json!({"type":"open_room","room":"y","title":"t"}))
        .await;
    a.request(json!({"type":"upsert_product","room":"y","sku":"z","title":"t","price_cents":5,"stock":3,"ttl_s":1}))
        .await;
    let mut v = gw.viewer("carol").await;
    let r = cart(&mut v, "y", "z", "c1", 3).await;
    assert_eq!(r["type"], "reserved", "{r}");
    // Down before the sweeper sees it expire.
    gw.stop().await;
    drop(gw);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gw2 = Gateway::start_with(&redis.url(), &cfg).await;
    let mut back = false;
    for _ in 0..50 {
        if gw2.app.inventory.available("z") == Some(3) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "units of a reservation that expired while down came back"
    );
    let mut c = redis_conn(&redis.url()).await;
    let held: usize = c
        .hlen(format!("{prefix}:reservations"))
        .await
        .expect("hlen");
    assert_eq!(held, 0);
    // The expiry recorded its idempotency record: after one more restart, the same req
    // is told its reservation ended rather than reserving again.
    let mut gw2 = gw2;
    gw2.stop().await;
    drop(gw2);
    let gw3 = Gateway::start_with(&redis.url(), &cfg).await;
    let mut v = gw3.viewer("carol").await;
    let again = cart(&mut v, "y", "z", "c1", 3).await;
    assert_eq!(again["code"], "conflict", "{again}");
    assert_eq!(gw3.app.inventory.available("z"), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_baseline_mode_never_oversells_either() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let gw = Gateway::start_with(
        &redis.url(),
        &[
            ("LIVEGATE_KEY_PREFIX", &prefix),
            ("LIVEGATE_RESERVE_MODE", "lua"),
        ],
    )
    .await;
    let _a = room_with_product(&gw, "lua", "s", 50).await;
    let clients = connect_many(
        |i| gw.ws_url(&gw.token(&format!("l{i}"), Role::Viewer, &[])),
        200,
    )
    .await;
    let replies = rush(clients, "lua", "s").await;
    let ok = replies
        .iter()
        .filter(|(_, r)| r["type"] == "reserved")
        .count();
    assert_eq!(ok, 50);
    assert!(replies
        .iter()
        .all(|(_, r)| r["type"] == "reserved" || r["code"] == "sold_out"));
    let entries = stream_entries(&redis.url(), &prefix, "reserved").await;
    assert_eq!(entries.len(), 50);
    // The baseline's entries have the core's layout: kind, reservation and the record
    // that P:reservations holds.
    entry_records(&redis.url(), &prefix, &entries).await;
    // A retry with the same req answers the same reservation here too.
    let (mut c, first) = replies
        .into_iter()
        .find(|(_, r)| r["type"] == "reserved")
        .expect("a reservation");
    let req = first["req"].as_str().expect("req").to_string();
    let again = cart(&mut c, "lua", "s", &req, 1).await;
    assert_eq!(again["reservation"], first["reservation"], "{again}");
    let entries = stream_entries(&redis.url(), &prefix, "reserved").await;
    assert_eq!(entries.len(), 50, "a retry records nothing new");
}

#[tokio::test]
async fn a_gateway_started_before_redis_is_alive_then_ready_once_redis_is_up() {
    let mut redis = RedisServer::start();
    redis.kill();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_livegate"))
        .arg("serve")
        .arg("--no-order-writer")
        .env("LIVEGATE_LISTEN", addr.to_string())
        .env("LIVEGATE_REDIS_URL", redis.url())
        .env("LIVEGATE_JWT_SECRET", common::gateway::SECRET)
        .env("LIVEGATE_KEY_PREFIX", unique_prefix())
        .env("LIVEGATE_LOG", "off")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut healthy = false;
    for _ in 0..100 {
        if let Ok((200, _)) = try_get(addr, "/healthz").await {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "healthz answers while redis is missing");
    assert_eq!(common::gateway::http_get_addr(addr, "/readyz").await.0, 503);
    assert_eq!(
        common::gateway::http_get_addr(addr, "/api/v1/rooms/x")
            .await
            .0,
        503
    );
    redis.restart();
    let mut ready = false;
    for _ in 0..100 {
        if common::gateway::http_get_addr(addr, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready once redis is up");
    // SIGTERM: a clean exit.
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}");
}

async fn try_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), ()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|_| ())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|_| ())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(())?;
    Ok((status, text))
}

/// A gateway (its room "p" with `stock` units of "s") whose per-connection rate limit does
/// not get in the way of pipelined carts, with `extra` configuration.
async fn pipelining_gateway(stock: u64, extra: &[(&str, &str)]) -> (RedisServer, String, Gateway) {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let mut cfg = vec![
        ("LIVEGATE_KEY_PREFIX", prefix.as_str()),
        ("LIVEGATE_RATE_PER_SEC", "100000"),
        ("LIVEGATE_RATE_BURST", "100000"),
    ];
    cfg.extend_from_slice(extra);
    let gw = Gateway::start_with(&redis.url(), &cfg).await;
    // The anchor's connection may close: the room and its product stay.
    let _anchor = room_with_product(&gw, "p", "s", stock).await;
    (redis, prefix, gw)
}

/// Sends carts on one connection without waiting for their replies.
async fn send_carts(c: &mut Client, reqs: &[String]) {
    for req in reqs {
        c.send(json!({"type":"add_to_cart","req":req,"room":"p","sku":"s","qty":1}))
            .await;
    }
}

/// Collects the one reply to each of `reqs`, in whatever order they come.
async fn replies_to(c: &mut Client, reqs: &[String]) -> HashMap<String, Value> {
    let mut replies = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while replies.len() < reqs.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} replies within 30 s",
            replies.len(),
            reqs.len()
        );
        let m = c.recv().await;
        if let Some(req) = m["req"].as_str().filter(|r| reqs.iter().any(|q| q == r)) {
            assert!(
                replies.insert(req.to_string(), m.clone()).is_none(),
                "two replies to {req}: {m}"
            );
        }
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_carts_on_one_connection_are_all_answered_and_recorded() {
    // A bound of 3 carts in flight, so the reader also stops and resumes reading.
    let (redis, prefix, gw) = pipelining_gateway(1000, &[("LIVEGATE_CONN_INFLIGHT", "3")]).await;
    let mut v = gw.viewer("piper").await;
    let carts: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    send_carts(&mut v, &carts[..20]).await;
    // A command that is not a cart, in the middle, is answered too.
    v.send(json!({"type":"ping","req":"p1"})).await;
    send_carts(&mut v, &carts[20..]).await;
    let mut all = carts.clone();
    all.push("p1".into());
    let mut replies = replies_to(&mut v, &all).await;
    let pong = replies.remove("p1").expect("pong");
    assert_eq!(pong["type"], "pong");
    let mut c = redis_conn(&redis.url()).await;
    let held: HashMap<String, String> = c
        .hgetall(format!("{prefix}:reservations"))
        .await
        .expect("hgetall");
    let mut ids = std::collections::HashSet::new();
    for (req, r) in &replies {
        assert_eq!(r["type"], "reserved", "{req}: {r}");
        let id = r["reservation"].as_str().expect("id").to_string();
        assert!(held.contains_key(&id), "{id} not in redis");
        assert!(ids.insert(id), "one reservation per req");
    }
    assert_eq!(held.len(), 40);
    assert_eq!(gw.app.inventory.available("s"), Some(960));
    assert_eq!(
        stream_entries(&redis.url(), &prefix, "reserved")
            .await
            .len(),
        40
    );

    // The same req twice back to back: the second waits for the first to be recorded and
    // answers the same reservation; so does a retry after the reply.
    let dup = vec!["dup".to_string(), "dup".to_string()];
    send_carts(&mut v, &dup).await;
    let first = v.reply_to("dup").await;
    let second = v.reply_to("dup").await;
    assert_eq!(first["type"], "reserved", "{first}");
    assert_eq!(second["reservation"], first["reservation"], "{second}");
    let again = cart(&mut v, "p", "s", "dup", 1).await;
    assert_eq!(again["reservation"], first["reservation"], "{again}");
    assert_eq!(gw.app.inventory.available("s"), Some(959));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_with_carts_in_flight_leaves_none_half_done() {
    let (redis, prefix, gw) = pipelining_gateway(1000, &[]).await;
    let mut v = gw.viewer("dropper").await;
    // Redis holds every write for 300 ms, so the carts are surely in flight at the drop.
    let mut c = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(300)
        .arg("WRITE")
        .query_async(&mut c)
        .await
        .expect("client pause");
    for i in 0..16 {
        v.send(json!({"type":"add_to_cart","req":format!("d{i}"),"room":"p","sku":"s","qty":1}))
            .await;
    }
    // Gone without a close frame, carts still waiting for their group commit.
    drop(v);
    // The connection is unregistered only after its carts in flight have finished.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.app.hub.connections_of("dropper") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped connection is still registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every cart ended recorded and Held (so its owner can release it); none stays half
    // done holding units.
    let held: HashMap<String, String> = c
        .hgetall(format!("{prefix}:reservations"))
        .await
        .expect("hgetall");
    assert_eq!(
        held.len(),
        16,
        "every cart sent before the drop is recorded"
    );
    let counts = gw.app.inventory.counts("s").expect("sku");
    assert_eq!(counts.reserved, 16, "core and redis disagree");
    let mut again = gw.viewer("dropper").await;
    for id in held.keys() {
        let r = again
            .request(json!({"type":"release","reservation":id}))
            .await;
        assert_eq!(r["type"], "released", "{id}: {r}");
    }
    let counts = gw.app.inventory.counts("s").expect("sku");
    assert_eq!((counts.available, counts.reserved), (1000, 0));
}

/// Sold-out answers (from memory) overtake reservations still waiting for Redis on the same
/// connection; every request gets its one reply all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_carts_mixing_reserved_and_sold_out_all_get_their_reply() {
    let (_redis, _prefix, gw) = pipelining_gateway(5, &[]).await;
    let mut v = gw.viewer("mixed").await;
    let carts: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    send_carts(&mut v, &carts).await;
    let replies = replies_to(&mut v, &carts).await;
    let reserved = replies.values().filter(|r| r["type"] == "reserved").count();
    assert_eq!(reserved, 5, "{replies:?}");
    let sold_out = replies.values().filter(|r| r["code"] == "sold_out").count();
    assert_eq!(sold_out, 5, "{replies:?}");
}

/// Over a Unix socket the committer writes through redis-rs (its own connection is plain
/// TCP only): carts are recorded, a release is, and a retry answers the same reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_unix_socket_carts_and_releases_are_recorded() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let gw = Gateway::start_with(
        &redis.unix_url(),
        &[("LIVEGATE_KEY_PREFIX", prefix.as_str())],
    )
    .await;
    let _anchor = room_with_product(&gw, "u", "s", 10).await;
    let mut v = gw.viewer("unixer").await;
    let mut ids = Vec::new();
    for req in ["a", "b", "c"] {
        let r = cart(&mut v, "u", "s", req, 1).await;
        assert_eq!(r["type"], "reserved", "{r}");
        ids.push(r["reservation"].as_str().expect("id").to_string());
    }
    let again = cart(&mut v, "u", "s", "a", 1).await;
    assert_eq!(again["reservation"], ids[0].as_str(), "{again}");
    let released = v
        .request(json!({"type":"release","req":"r1","reservation":ids[1]}))
        .await;
    assert_eq!(released["type"], "released", "{released}");
    let mut c = redis_conn(&redis.url()).await;
    let held: HashMap<String, String> = c
        .hgetall(format!("{prefix}:reservations"))
        .await
        .expect("hgetall");
    let mut held: Vec<String> = held.into_keys().collect();
    held.sort();
    let mut want = vec![ids[0].clone(), ids[2].clone()];
    want.sort();
    assert_eq!(held, want);
    assert_eq!(
        stream_entries(&redis.url(), &prefix, "reserved")
            .await
            .len(),
        3
    );
    assert_eq!(
        stream_entries(&redis.url(), &prefix, "released")
            .await
            .len(),
        1
    );
    assert_eq!(gw.app.inventory.available("s"), Some(8));
}

/// A transaction that is late, not lost: the cart's commit times out (its outcome is
/// unknown, the units stay held), the transaction reaches Redis after the probe that asks
/// about it was due, and still the probe sees it, because the committer keeps the
/// connection and reads and runs everything on it in order. Before, a probe on a fresh
/// connection could run first, answer "not landed", and give the units back while Redis
/// then recorded the reservation: a unit sold twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_transaction_is_settled_by_a_probe_that_runs_after_it() {
    let redis = RedisServer::start();
    let proxy = HoldingProxy::start(redis.port()).await;
    let prefix = unique_prefix();
    let gw = Gateway::start_with(
        &proxy.url(),
        &[
            ("LIVEGATE_KEY_PREFIX", prefix.as_str()),
            ("LIVEGATE_COMMIT_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let _anchor = room_with_product(&gw, "late", "s", 10).await;
    let mut v = gw.viewer("late-buyer").await;
    let first = cart(&mut v, "late", "s", "first", 1).await;
    assert_eq!(first["type"], "reserved", "{first}");

    proxy.hold_existing(Duration::from_secs(2));
    let late = cart(&mut v, "late", "s", "late", 1).await;
    assert_eq!(late["type"], "error", "{late}");
    assert_eq!(late["code"], "unavailable", "{late}");
    // Held while unknown.
    assert_eq!(gw.app.inventory.available("s"), Some(8));

    // The hold ends after 2 s; the probes (every 250 ms) settle it soon after.
    let mut c = redis_conn(&redis.url()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let settled = loop {
        let counts = gw.app.inventory.counts("s").expect("product");
        let held: HashMap<String, String> = c
            .hgetall(format!("{prefix}:reservations"))
            .await
            .expect("hgetall");
        if held.len() == 2 && counts.reserved == 2 && counts.available == 8 {
            // Settled as landed, in memory as in Redis; now a retry is the same cart.
            break true;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "memory {counts:?} against {} reservations in redis",
                held.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(settled);
    let mut confirmed = false;
    for _ in 0..50 {
        let again = cart(&mut v, "late", "s", "late", 1).await;
        if again["type"] == "reserved" {
            confirmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(confirmed, "the late cart was never confirmed");
    assert_eq!(gw.app.inventory.available("s"), Some(8));
    assert_eq!(
        stream_entries(&redis.url(), &prefix, "reserved")
            .await
            .len(),
        2
    );
}

/// A gateway behind a holding proxy, with a 1 s commit timeout and a 1.5 s stall limit;
/// `url` is the proxy's (the test holds and releases it).
async fn stalling_gateway(url: &str, room: &str) -> (Gateway, String, Client) {
    let prefix = unique_prefix();
    let gw = Gateway::start_with(
        url,
        &[
            ("LIVEGATE_KEY_PREFIX", prefix.as_str()),
            ("LIVEGATE_COMMIT_TIMEOUT_MS", "1000"),
            ("LIVEGATE_REDIS_STALL_MS", "1500"),
        ],
    )
    .await;
    let _anchor = room_with_product(&gw, room, "s", 10).await;
    let mut v = gw.viewer("stall-buyer").await;
    let first = cart(&mut v, room, "s", "first", 1).await;
    assert_eq!(first["type"], "reserved", "{first}");
    (gw, prefix, v)
}

/// Sends one add_to_cart and waits for its reply.
async fn cart(v: &mut Client, room: &str, sku: &str, req: &str, qty: u32) -> Value {
    v.send(json!({"type":"add_to_cart","req":req,"room":room,"sku":sku,"qty":qty}))
        .await;
    v.reply_to(req).await
}

/// Waits until memory and Redis hold the same reservations of SKU `s`; returns them.
async fn agreed_reservations(gw: &Gateway, url: &str, prefix: &str) -> HashMap<String, String> {
    let mut c = redis_conn(url).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = gw.app.inventory.counts("s").expect("product");
        let held: HashMap<String, String> = c
            .hgetall(format!("{prefix}:reservations"))
            .await
            .expect("hgetall");
        if held.len() as u64 == counts.reserved && counts.reserved + counts.available == 10 {
            return held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "memory {counts:?} against {} reservations in redis",
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis connection that stops answering (its bytes held back by a proxy, the way a
/// silently dead peer or a partition looks) is given up after `LIVEGATE_REDIS_STALL_MS`,
/// and carts are served again over a fresh connection while the old one is still stuck.
/// The old connection is fenced off in Redis (`CLIENT KILL`) before the fresh one sends
/// anything, so the transaction it held back can never run: the held bytes are let go the
/// moment the cart whose outcome was unknown has been settled as not landed, and Redis
/// still holds exactly what memory counts. Without the fence (or with a fence sent any
/// later than the settling probe) the held transaction runs after its probe said it had
/// not: one reservation more in Redis than in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_connection_is_fenced_off_and_replaced() {
    let redis = RedisServer::start();
    let proxy = HoldingProxy::start(redis.port()).await;
    let (gw, prefix, mut v) = stalling_gateway(&proxy.url(), "stall").await;

    let held_at = std::time::Instant::now();
    proxy.hold_existing(Duration::from_secs(120));
    let stuck = cart(&mut v, "stall", "s", "stuck", 1).await;
    assert_eq!(stuck["code"], "unavailable", "{stuck}");

    // Served again while the old connection still hangs.
    let mut served = false;
    for i in 0..30 {
        let r = cart(&mut v, "stall", "s", &format!("after-{i}"), 1).await;
        if r["type"] == "reserved" {
            served = true;
            break;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "never served again; {:?} since the hold",
        held_at.elapsed()
    );

    // The unknown cart is settled (as not landed: its units are back) ...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.app.inventory.counts("s").expect("product").reserved != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stuck cart was never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and only then does what the old connection held back go on, to a connection
    // Redis has already closed.
    proxy.release();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = agreed_reservations(&gw, &redis.url(), &prefix).await;
    assert_eq!(held.len(), 2, "first and the one served after: {held:?}");
    assert!(
        held.values().all(|r| !r.contains("\"stuck\"")),
        "the held-back cart ran after all: {held:?}"
    );
    assert_eq!(
        stream_entries(&redis.url(), &prefix, "reserved")
            .await
            .len(),
        2
    );
    // Counted (the recorder is shared by the tests of this process: at least this one).
    let text = livegate::metrics::install()
        .expect("the tests' recorder")
        .render();
    let replaced = text
        .lines()
        .find_map(|l| l.strip_prefix("livegate_redis_stalled_connections_replaced_total "))
        .and_then(|n| n.trim().parse::<f64>().ok());
    assert!(replaced.is_some_and(|n| n >= 1.0), "metric: {replaced:?}");
}

/// A Redis user not allowed `CLIENT KILL` (a common ACL for applications) still commits,
/// but a stalled connection then cannot be fenced, so it is waited for, not replaced:
/// carts stay `unavailable` past the stall limit until the held bytes go on; the held
/// transaction then runs before the probe that settles it, and memory agrees with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_client_kill_waits_for_a_stalled_connection() {
    let redis = RedisServer::start();
    let mut admin = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "gw",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-client|kill",
        ])
        .query_async(&mut admin)
        .await
        .expect("acl setuser");
    let proxy = HoldingProxy::start(redis.port()).await;
    let url = proxy.url().replacen("redis://", "redis://gw:pw@", 1);
    let (gw, prefix, mut v) = stalling_gateway(&url, "acl").await;

    proxy.hold_existing(Duration::from_secs(120));
    let stuck = cart(&mut v, "acl", "s", "stuck", 1).await;
    assert_eq!(stuck["code"], "unavailable", "{stuck}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let waiting = cart(&mut v, "acl", "s", "waiting", 1).await;
    assert_eq!(
        waiting["code"], "unavailable",
        "served past the stall limit over a connection it could not fence: {waiting}"
    );

    proxy.release();
    let mut served = false;
    for i in 0..30 {
        let r = cart(&mut v, "acl", "s", &format!("after-{i}"), 1).await;
        if r["type"] == "reserved" {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "never served again after the hold ended");
    let held = agreed_reservations(&gw, &redis.url(), &prefix).await;
    assert!(
        held.values().any(|r| r.contains("\"stuck\"")),
        "the held transaction ran, and memory counts it: {held:?}"
    );
}

async fn set_maxmemory(c: &mut redis::aio::MultiplexedConnection, bytes: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(c)
        .await
        .expect("config set maxmemory");
}

/// A transaction Redis refuses as a whole (`EXECABORT`: here every write is refused for
/// lack of memory) is known not to have run: the cart answers `unavailable` with its units
/// already back, not held for a probe. Over the committer's own connection and over redis-rs.
async fn a_refused_transaction_is_undone_at_once(unix: bool) {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let url = if unix { redis.unix_url() } else { redis.url() };
    let gw = Gateway::start_with(&url, &[("LIVEGATE_KEY_PREFIX", prefix.as_str())]).await;
    let _anchor = room_with_product(&gw, "oom", "s", 10).await;
    let mut v = gw.viewer("oom-buyer").await;
    let mut c = redis_conn(&redis.url()).await;
    set_maxmemory(&mut c, "1").await;
    let r = cart(&mut v, "oom", "s", "x", 2).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    // Known not written: undone before the reply, not left to a probe.
    let counts = gw.app.inventory.counts("s").expect("product");
    assert_eq!((counts.available, counts.reserved), (10, 0), "{counts:?}");
    set_maxmemory(&mut c, "0").await;
    let r = cart(&mut v, "oom", "s", "x", 2).await;
    assert_eq!(r["type"], "reserved", "{r}");
    assert_eq!(gw.app.inventory.available("s"), Some(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_is_undone_at_once_over_tcp() {
    a_refused_transaction_is_undone_at_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_is_undone_at_once_over_a_unix_socket() {
    a_refused_transaction_is_undone_at_once(true).await;
}

/// Redis numbers its connections from 1 again after a restart, so the fence owed for a
/// committer connection that died with the old process must end nobody in the new one
/// (the fence checks the server's `run_id`, and matches the old connection's address as
/// well as its id). Twenty other clients connected right after the restart, whose ids
/// cover the old connection's, all still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_after_a_redis_restart_ends_nobody_else() {
    let mut redis = RedisServer::start();
    let (_gw, _prefix, mut v) = stalling_gateway(&redis.url(), "restart").await;
    redis.restart();
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(redis_conn(&redis.url()).await);
    }
    let mut served = false;
    for i in 0..50 {
        if cart(&mut v, "restart", "s", &format!("again-{i}"), 1).await["type"] == "reserved" {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "never served again after the restart");
    for (i, c) in others.iter_mut().enumerate() {
        let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(c).await;
        assert!(pong.is_ok(), "client {i} was killed: {pong:?}");
    }
}

/// Settings for the idempotency tests below: a small in-memory cap, no rate limit.
fn cap_cfg(prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LIVEGATE_KEY_PREFIX", prefix.to_string()),
        ("LIVEGATE_RATE_PER_SEC", "100000".into()),
        ("LIVEGATE_RATE_BURST", "100000".into()),
        ("LIVEGATE_IDEMPOTENCY_CAP", "1000".into()),
    ]
}

fn pairs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

/// A gateway with `cap_cfg`, room `p` selling SKU `s`, and alice's connection.
struct CapSetup {
    redis: RedisServer,
    prefix: String,
    cfg: Vec<(&'static str, String)>,
    gw: Gateway,
    anchor: Client,
    v: Client,
}

impl CapSetup {
    async fn start(stock: u64) -> CapSetup {
        let redis = RedisServer::start();
        let prefix = unique_prefix();
        let cfg = cap_cfg(&prefix);
        let gw = Gateway::start_with(&redis.url(), &pairs(&cfg)).await;
        let anchor = room_with_product(&gw, "p", "s", stock).await;
        let v = gw.viewer("alice").await;
        CapSetup {
            redis,
            prefix,
            cfg,
            gw,
            anchor,
            v,
        }
    }
}

/// Stops `gw`, starts a fresh gateway with `cfg` on the same Redis, and sends alice's
/// add_to_cart of `qty` units of SKU `s` in room `p` with each of `reqs` again; returns
/// the new gateway and the replies.
async fn restart_and_retry(
    mut gw: Gateway,
    url: &str,
    cfg: &[(&'static str, String)],
    reqs: &[&str],
    qty: u32,
) -> (Gateway, Vec<Value>) {
    gw.stop().await;
    drop(gw);
    let gw2 = Gateway::start_with(url, &pairs(cfg)).await;
    let mut v = gw2.viewer("alice").await;
    let mut replies = Vec::new();
    for req in reqs {
        replies.push(cart(&mut v, "p", "s", req, qty).await);
    }
    (gw2, replies)
}

/// A busy past: more ended add_to_cart records in Redis than LIVEGATE_IDEMPOTENCY_CAP (the
/// documented regime: Redis keeps them for the TTL, memory keeps the newest CAP). After a
/// restart, a retry of a reservation that is still held must get that reservation: the
/// restore puts held reservations' records in last, so the cap drops ended ones first.
/// (Found by review: with them first, the retry reserved a second time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reservation_keeps_its_idempotency_when_ended_records_exceed_the_cap() {
    let CapSetup {
        redis,
        prefix: _,
        cfg,
        gw,
        anchor: _anchor,
        mut v,
    } = CapSetup::start(100).await;
    for chunk in 0..10 {
        let reqs: Vec<String> = (0..100).map(|i| format!("old-{chunk}-{i}")).collect();
        send_carts(&mut v, &reqs).await;
        let replies = replies_to(&mut v, &reqs).await;
        let rels: Vec<String> = reqs.iter().map(|r| format!("rel-{r}")).collect();
        for (req, rel) in reqs.iter().zip(&rels) {
            let id = replies[req]["reservation"]
                .as_str()
                .expect("reserved")
                .to_string();
            v.send(json!({"type":"release","req":rel,"reservation":id}))
                .await;
        }
        let released = replies_to(&mut v, &rels).await;
        assert!(released.values().all(|m| m["type"] == "released"));
    }
    let kept = cart(&mut v, "p", "s", "keep", 2).await;
    assert_eq!(kept["type"], "reserved", "{kept}");
    let (gw2, again) = restart_and_retry(gw, &redis.url(), &cfg, &["keep"], 2).await;
    assert_eq!(
        again[0]["reservation"], kept["reservation"],
        "retry after restart: {}",
        again[0]
    );
    assert_eq!(gw2.app.inventory.available("s"), Some(98));
}

/// An ended record of (user, req, sku) in a bucket and a held reservation of the same key in
/// P:reservations (reachable: the in-memory record was evicted by the cap or the TTL, and a
/// retry reserved anew, as documented). After a restart the held one must win.
#[tokio::test]
async fn a_held_reservation_wins_over_an_ended_record_of_the_same_key() {
    let CapSetup {
        redis,
        prefix,
        cfg,
        gw,
        anchor: _anchor,
        mut v,
    } = CapSetup::start(10).await;
    let held = cart(&mut v, "p", "s", "cart-1", 1).await;
    assert_eq!(held["type"], "reserved", "{held}");
    // What release of an earlier reservation of the same key wrote (ended_idem).
    let now = livegate::metrics::unix_ms();
    let bucket = livegate::keys::idem_bucket(now);
    let mut c = redis_conn(&redis.url()).await;
    let _: () = c
        .hset(
            format!("{prefix}:idem:reserves:{bucket}"),
            livegate::keys::Keys::reserve_idem_field("alice", "cart-1", "s"),
            "r1-999 s",
        )
        .await
        .expect("hset");
    let (_gw2, again) = restart_and_retry(gw, &redis.url(), &cfg, &["cart-1"], 1).await;
    assert_eq!(
        again[0]["reservation"], held["reservation"],
        "retry after restart: {}",
        again[0]
    );
}

/// Checkout of two reservations: both retries are told they ended, after a restart.
#[tokio::test]
async fn a_checkout_of_two_reservations_records_both_ended() {
    let CapSetup {
        redis,
        prefix: _,
        cfg,
        gw,
        anchor: _anchor,
        mut v,
    } = CapSetup::start(10).await;
    let mut ids = Vec::new();
    for req in ["c-a", "c-b"] {
        let r = cart(&mut v, "p", "s", req, 1).await;
        ids.push(r["reservation"].clone());
    }
    let order = v
        .request(json!({"type":"checkout","reservations":ids}))
        .await;
    assert_eq!(order["type"], "order_accepted", "{order}");
    let (gw2, again) = restart_and_retry(gw, &redis.url(), &cfg, &["c-a", "c-b"], 1).await;
    for r in &again {
        assert_eq!(r["code"], "conflict", "{r}");
    }
    assert_eq!(gw2.app.inventory.available("s"), Some(8));
}
