//! The gateway over the wire: a real server on port 0, real WebSocket clients, a real
//! redis-server. Every message of protocol.md in both encodings, ordering and resume, slow
//! consumers, and every bad input with its documented error or close code.

mod common;

use common::{
    gateway::{http_get, room_with_product, Client, Enc, Event, Gateway},
    redis::RedisServer,
};
use livegate::auth::{Claims, Role};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn setup() -> (RedisServer, Gateway) {
    let redis = RedisServer::start();
    let gw = Gateway::start(&redis.url()).await;
    (redis, gw)
}

#[tokio::test]
async fn hello_comes_first_in_both_encodings() {
    let (_r, gw) = setup().await;
    for enc in [Enc::Json, Enc::MsgPack, Enc::Default] {
        let tok = gw.token("u1", Role::Viewer, &[]);
        let c = Client::connect(&gw.ws_url(&tok), enc).await;
        let h = &c.hello;
        assert_eq!(h["type"], "hello", "{h}");
        assert_eq!(h["user"], "u1");
        assert_eq!(h["role"], "viewer");
        assert_eq!(h["protocol"], 1);
        assert!(h["conn"].is_string());
        assert!(h["server_time"].as_u64().unwrap_or(0) > 1_600_000_000_000);
        assert!(h["heartbeat_ms"].as_u64().unwrap_or(0) > 0);
        let want = match enc {
            Enc::Json => Some("livegate.v1.json"),
            Enc::MsgPack => Some("livegate.v1.msgpack"),
            Enc::Default => None,
        };
        assert_eq!(c.subprotocol.as_deref(), want);
    }
}

#[tokio::test]
async fn bearer_header_authenticates_too() {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};
    let (_r, gw) = setup().await;
    let tok = gw.token("hdr", Role::Viewer, &[]);
    let mut req = format!("ws://{}/ws", gw.addr)
        .into_client_request()
        .expect("req");
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {tok}")).expect("header"),
    );
    let c = Client::connect_request(req, Enc::Default)
        .await
        .expect("bearer accepted");
    assert_eq!(c.hello["user"], "hdr");
}

#[tokio::test]
async fn bad_tokens_get_401_before_the_upgrade() {
    let (_r, gw) = setup().await;
    let forged = livegate::auth::Authenticator::new("some-other-secret-123456")
        .issue("u", Role::Admin, vec![], 60)
        .expect("sign");
    let expired = gw
        .auth
        .sign(&Claims {
            sub: "u".into(),
            role: Role::Viewer,
            rooms: vec![],
            exp: 1_000,
        })
        .expect("sign");
    for url in [
        format!("ws://{}/ws", gw.addr),
        gw.ws_url("not-a-jwt"),
        gw.ws_url(&forged),
        gw.ws_url(&expired),
    ] {
        match Client::try_connect(&url, Enc::Json).await {
            Ok(_) => panic!("{url} was accepted"),
            Err((status, body)) => {
                assert_eq!(status, 401, "{url}");
                let v: Value = serde_json::from_str(&body).expect("json body");
                assert_eq!(v["code"], "unauthorized");
                assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
            }
        }
    }
    // The server still serves.
    gw.viewer("after").await;
}

async fn anchor_flow(enc: Enc) {
    let (_r, gw) = setup().await;
    let a_tok = gw.token("anchor1", Role::Anchor, &["r1"]);
    let mut a = Client::connect(&gw.ws_url(&a_tok), enc).await;
    let v_tok = gw.token("viewer1", Role::Viewer, &[]);
    let mut v = Client::connect(&gw.ws_url(&v_tok), enc).await;

    // Unknown room.
    let r = v.request(json!({"type":"join","room":"r1"})).await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("not_found"))
    );

    assert_eq!(
        a.request(json!({"type":"open_room","room":"r1","title":"Night sale"}))
            .await["type"],
        "ack"
    );
    let r = a
        .request(json!({"type":"upsert_product","room":"r1","sku":"sku-1","title":"Serum","price_cents":2500,"stock":10,"limit_per_user":2,"ttl_s":60}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");

    let st = v
        .request(json!({"type":"join","room":"r1","ref":"sharer-9"}))
        .await;
    assert_eq!(st["type"], "room_state", "{st}");
    assert_eq!(st["room"], "r1");
    assert_eq!(st["status"], "live");
    assert_eq!(st["title"], "Night sale");
    assert!(st["pinned"].is_null());
    assert_eq!(st["viewers"], 1);
    assert_eq!(st["likes"], 0);
    let seq0 = st["seq"].as_u64().expect("seq");
    assert_eq!(
        st["products"],
        json!([{"sku":"sku-1","title":"Serum","price_cents":2500,"available":10,"limit_per_user":2}])
    );

    assert_eq!(
        a.request(json!({"type":"pin","room":"r1","sku":"sku-1"}))
            .await["type"],
        "ack"
    );
    let p = v.recv_type("pinned").await;
    assert_eq!(
        p,
        json!({"type":"pinned","room":"r1","seq":seq0 + 1,"sku":"sku-1"})
    );

    // Cart: reserve, release, reserve again, checkout.
    let res = v
        .request(json!({"type":"add_to_cart","room":"r1","sku":"sku-1","qty":2}))
        .await;
    assert_eq!(res["type"], "reserved", "{res}");
    assert_eq!(res["room"], "r1");
    assert_eq!(res["sku"], "sku-1");
    assert_eq!(res["qty"], 2);
    assert_eq!(res["price_cents"], 2500);
    assert!(res["expires_at"].as_u64().unwrap_or(0) > livegate::metrics::unix_ms());
    let id = res["reservation"].as_str().expect("id").to_string();
    // Over the per-user limit.
    let over = v
        .request(json!({"type":"add_to_cart","room":"r1","sku":"sku-1","qty":1}))
        .await;
    assert_eq!(over["code"], "limit_exceeded", "{over}");
    let rel = v.request(json!({"type":"release","reservation":id})).await;
    assert_eq!(rel["type"], "released");
    assert_eq!(rel["reservation"], id.as_str());
    assert_eq!(rel["reason"], "released");
    let res2 = v
        .request(json!({"type":"add_to_cart","room":"r1","sku":"sku-1","qty":1}))
        .await;
    assert_eq!(res2["type"], "reserved");
    let id2 = res2["reservation"].as_str().expect("id").to_string();
    let order = v
        .request(json!({"type":"checkout","reservations":[id2]}))
        .await;
    assert_eq!(order["type"], "order_accepted", "{order}");
    assert_eq!(order["total_cents"], 2500);
    assert!(order["order"].is_string());

    // Stock broadcasts are coalesced state: eventually 9 available (it may have come before
    // the checkout's reply: the client keeps what came before a reply).
    let want = json!([{"sku":"sku-1","available":9}]);
    v.recv_until("`stock` with 9 available", |m| {
        m["type"] == "stock" && m["items"] == want
    })
    .await;

    // Comments (batched per tick), likes, ping.
    assert_eq!(
        v.request(json!({"type":"comment","room":"r1","text":"so pretty"}))
            .await["type"],
        "ack"
    );
    let c = v.recv_type("comments").await;
    assert_eq!(c["items"][0]["user"], "viewer1");
    assert_eq!(c["items"][0]["text"], "so pretty");
    assert!(c["items"][0]["at"].as_u64().is_some());
    assert_eq!(
        v.request(json!({"type":"like","room":"r1","count":5}))
            .await["type"],
        "ack"
    );
    let s = v.recv_type("stats").await;
    assert_eq!(s["room"], "r1");
    assert_eq!(s["viewers"], 1);
    assert_eq!(s["likes"], 5);
    assert!(s.get("seq").is_none(), "stats are not sequenced");
    assert_eq!(v.request(json!({"type":"ping"})).await["type"], "pong");
    // Messages without req get no success reply: a later ping's pong is the next reply.
    v.send(json!({"type":"like","room":"r1","count":1})).await;
    v.send(json!({"type":"ping"})).await;
    let pong = v
        .recv_until("`pong`", |m| {
            assert_ne!(m["type"], "ack");
            m["type"] == "pong"
        })
        .await;
    assert!(pong.get("req").is_none());

    // Anchor: restock, product change, unpin, close.
    assert_eq!(
        a.request(json!({"type":"restock","room":"r1","sku":"sku-1","delta":5}))
            .await["type"],
        "ack"
    );
    let r = a
        .request(json!({"type":"restock","room":"r1","sku":"sku-1","delta":-1000}))
        .await;
    assert_eq!(r["code"], "conflict", "{r}");
    let r = a
        .request(json!({"type":"upsert_product","room":"r1","sku":"sku-1","title":"Serum XL","price_cents":2600}))
        .await;
    assert_eq!(r["type"], "ack");
    let p = v.recv_type("product").await;
    assert_eq!(p["product"]["title"], "Serum XL");
    assert_eq!(p["product"]["available"], 14);
    let r = a
        .request(json!({"type":"upsert_product","room":"r1","sku":"sku-1","title":"x","price_cents":1,"stock":5}))
        .await;
    assert_eq!(r["code"], "conflict", "stock only at creation: {r}");
    assert_eq!(
        a.request(json!({"type":"unpin","room":"r1"})).await["type"],
        "ack"
    );
    assert_eq!(v.recv_type("unpinned").await["room"], "r1");
    assert_eq!(
        a.request(json!({"type":"close_room","room":"r1"})).await["type"],
        "ack"
    );
    let rs = v.recv_type("room_status").await;
    assert_eq!(rs["status"], "closed");
    let r = v
        .request(json!({"type":"add_to_cart","room":"r1","sku":"sku-1","qty":1}))
        .await;
    assert_eq!(r["code"], "room_closed");
    let r = v
        .request(json!({"type":"comment","room":"r1","text":"hi"}))
        .await;
    assert_eq!(r["code"], "room_closed");
    assert_eq!(
        v.request(json!({"type":"leave","room":"r1"})).await["type"],
        "ack"
    );
    let r = v.request(json!({"type":"leave","room":"r1"})).await;
    assert_eq!(r["code"], "not_found");
}

#[tokio::test]
async fn every_message_over_json() {
    anchor_flow(Enc::Json).await;
}

#[tokio::test]
async fn every_message_over_msgpack() {
    anchor_flow(Enc::MsgPack).await;
}

/// The CI hang of 2026-11-22: a coalesced `stock` that came before a reply was dropped by
/// the test client while it waited for that reply, and the room's periodic `stats` kept a
/// per-message timeout from ever firing. The client now keeps what came before a reply, and
/// every wait has one deadline.
#[tokio::test]
async fn a_broadcast_that_comes_before_a_reply_is_still_read() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(
        &redis.url(),
        &[
            ("LIVEGATE_ROOM_TICK_MS", "10"),
            ("LIVEGATE_STATS_MS", "100"),
        ],
    )
    .await;
    let _a = room_with_product(&gw, "rb", "s1", 5).await;
    let mut v = gw.viewer("v").await;
    assert_eq!(
        v.request(json!({"type":"join","room":"rb"})).await["type"],
        "room_state"
    );
    let r = v
        .request(json!({"type":"add_to_cart","room":"rb","sku":"s1","qty":1}))
        .await;
    assert_eq!(r["type"], "reserved", "{r}");
    // Several ticks pass: the one `stock` with 4 available is sent before the pong.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(v.request(json!({"type":"ping"})).await["type"], "pong");
    let s = v.recv_type("stock").await;
    assert_eq!(s["items"], json!([{"sku":"s1","available":4}]));
    // Nothing more is coming but `stats`: a wait for anything else ends within its deadline.
    let waited = tokio::spawn(async move { v.recv_type("stock").await });
    let err = waited.await.expect_err("no second `stock` comes");
    assert!(err.is_panic());
}

#[tokio::test]
async fn seq_has_no_gaps_and_resume_works() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(
        &redis.url(),
        &[
            ("LIVEGATE_ROOM_HISTORY", "16"),
            ("LIVEGATE_RATE_PER_SEC", "10000"),
            ("LIVEGATE_RATE_BURST", "10000"),
        ],
    )
    .await;
    let mut a = room_with_product(&gw, "r2", "s1", 5).await;
    let mut v = gw.viewer("v").await;
    let st = v.request(json!({"type":"join","room":"r2"})).await;
    let mut last = st["seq"].as_u64().expect("seq");
    for i in 0..100 {
        let m = if i % 2 == 0 {
            json!({"type":"pin","room":"r2","sku":"s1"})
        } else {
            json!({"type":"unpin","room":"r2"})
        };
        assert_eq!(a.request(m).await["type"], "ack");
    }
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "{got} of 100 pin changes within 30 s"
        );
        let m = v.recv().await;
        if let Some(seq) = m.get("seq").and_then(Value::as_u64) {
            assert_eq!(seq, last + 1, "gap or reorder at {m}");
            last = seq;
            if m["type"] == "pinned" || m["type"] == "unpinned" {
                got += 1;
            }
        }
    }
    // Resume inside the history: `joined` then exactly the missed events.
    let mut v2 = gw.viewer("v2").await;
    let since = last - 3;
    let r = v2
        .request(json!({"type":"join","room":"r2","since":since}))
        .await;
    assert_eq!(r["type"], "joined", "{r}");
    assert_eq!(r["resumed"], true);
    assert_eq!(r["room"], "r2");
    assert_eq!(r["seq"], last);
    for want in since + 1..=last {
        let m = v2.recv().await;
        assert_eq!(m["seq"], want, "{m}");
    }
    // Up to date: resumed with nothing to send.
    let mut v3 = gw.viewer("v3").await;
    let r = v3
        .request(json!({"type":"join","room":"r2","since":last}))
        .await;
    assert_eq!(r["type"], "joined");
    // Beyond the history (16 kept): a full room_state.
    let mut v4 = gw.viewer("v4").await;
    let r = v4
        .request(json!({"type":"join","room":"r2","since":last - 50}))
        .await;
    assert_eq!(r["type"], "room_state", "{r}");
    assert_eq!(r["seq"], last);
    // A `since` from the future (another incarnation): room_state too.
    let r = v4
        .request(json!({"type":"join","room":"r2","since":last + 1000}))
        .await;
    assert_eq!(r["type"], "room_state");
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_4001_and_others_keep_receiving() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(
        &redis.url(),
        &[
            ("LIVEGATE_OUTBOUND_QUEUE", "8"),
            ("LIVEGATE_RATE_PER_SEC", "100000"),
            ("LIVEGATE_RATE_BURST", "100000"),
        ],
    )
    .await;
    let mut a = room_with_product(&gw, "r3", "s1", 5).await;
    let mut slow =
        Client::connect_small_window(&gw.ws_url(&gw.token("slow", Role::Viewer, &[]))).await;
    slow.request(json!({"type":"join","room":"r3"})).await;
    let mut fast = gw.viewer("fast").await;
    fast.request(json!({"type":"join","room":"r3"})).await;
    // The slow client never reads again; a long title makes each broadcast large, so its
    // socket buffers fill and then its queue.
    let title = "x".repeat(200);
    let mut n = 0;
    let mut closed = false;
    while n < 20_000 && !closed {
        let r = a
            .request(json!({"type":"upsert_product","room":"r3","sku":"s1","title":title,"price_cents":n}))
            .await;
        assert_eq!(r["type"], "ack");
        n += 1;
        // The fast client keeps up.
        let p = fast.recv_type("product").await;
        assert_eq!(p["product"]["price_cents"], n - 1);
        if n % 50 == 0 {
            let metrics = http_get(&gw, "/metrics", None).await.1;
            closed = metrics
                .lines()
                .any(|l| l.starts_with("livegate_outbound_overflow_total") && !l.ends_with(" 0"));
        }
    }
    assert!(closed, "the slow consumer was never cut off");
    assert_eq!(slow.closed_with().await, Some(4001));
    // The room still serves the others.
    assert_eq!(
        a.request(json!({"type":"pin","room":"r3","sku":"s1"}))
            .await["type"],
        "ack"
    );
    assert_eq!(fast.recv_type("pinned").await["sku"], "s1");
}

#[tokio::test]
async fn bad_input_gets_errors_and_the_connection_stays_open() {
    let (_r, gw) = setup().await;
    let _a = room_with_product(&gw, "r4", "s1", 5).await;
    let mut v = gw.viewer("v").await;
    // Undecodable.
    v.send_raw(Message::Text("{nope".into())).await;
    let e = v.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    assert!(e.get("req").is_none());
    // Unknown type, wrong field types, invalid ids, out-of-range values: error with req.
    for (m, req) in [
        (json!({"type":"teleport","req":"a1"}), "a1"),
        (
            json!({"type":"add_to_cart","req":"a2","room":"r4","sku":"s1","qty":"two"}),
            "a2",
        ),
        (
            json!({"type":"add_to_cart","req":"a3","room":"r4","sku":"s1"}),
            "a3",
        ),
        (json!({"type":"join","req":"a4","room":"bad room!"}), "a4"),
        (
            json!({"type":"add_to_cart","req":"a5","room":"r4","sku":"s1","qty":100}),
            "a5",
        ),
        (
            json!({"type":"comment","req":"a6","room":"r4","text":""}),
            "a6",
        ),
        (json!({"type":"release","req":"a7","reservation":7}), "a7"),
        (json!({"req":"a8"}), "a8"),
    ] {
        v.send(m.clone()).await;
        let e = v.recv().await;
        assert_eq!(e["type"], "error", "{m} -> {e}");
        assert_eq!(e["code"], "bad_request", "{m} -> {e}");
        assert_eq!(e["req"], req, "{m} -> {e}");
    }
    // Unknown ids.
    let r = v
        .request(json!({"type":"release","reservation":"r1-999"}))
        .await;
    assert_eq!(r["code"], "not_found");
    let r = v
        .request(json!({"type":"add_to_cart","room":"r4","sku":"nope","qty":1}))
        .await;
    assert_eq!(r["code"], "not_found");
    let r = v
        .request(json!({"type":"checkout","reservations":["zzz"]}))
        .await;
    assert_eq!(r["code"], "not_found");
    // A viewer sending anchor commands.
    for m in [
        json!({"type":"open_room","room":"r4","title":"mine"}),
        json!({"type":"pin","room":"r4","sku":"s1"}),
        json!({"type":"restock","room":"r4","sku":"s1","delta":5}),
    ] {
        assert_eq!(v.request(m).await["code"], "forbidden");
    }
    // Still open and serving.
    assert_eq!(v.request(json!({"type":"ping"})).await["type"], "pong");
    // Msgpack connection: a garbage binary frame.
    let tok = gw.token("m", Role::Viewer, &[]);
    let mut m = Client::connect(&gw.ws_url(&tok), Enc::MsgPack).await;
    m.send_raw(Message::Binary(vec![0xc1, 0xff].into())).await;
    assert_eq!(m.recv().await["code"], "bad_request");
    assert_eq!(m.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn an_anchor_cannot_command_another_room() {
    let (_r, gw) = setup().await;
    let _a = room_with_product(&gw, "theirs", "s1", 5).await;
    let mut other = gw.anchor("other", &["mine"]).await;
    for m in [
        json!({"type":"open_room","room":"theirs","title":"hijack"}),
        json!({"type":"close_room","room":"theirs"}),
        json!({"type":"upsert_product","room":"theirs","sku":"s2","title":"t","price_cents":1,"stock":1}),
        json!({"type":"pin","room":"theirs","sku":"s1"}),
        json!({"type":"unpin","room":"theirs"}),
        json!({"type":"restock","room":"theirs","sku":"s1","delta":1}),
    ] {
        let r = other.request(m.clone()).await;
        assert_eq!(r["code"], "forbidden", "{m} -> {r}");
    }
    // An admin may.
    let tok = gw.token("root", Role::Admin, &[]);
    let mut admin = Client::connect(&gw.ws_url(&tok), Enc::Json).await;
    assert_eq!(
        admin
            .request(json!({"type":"pin","room":"theirs","sku":"s1"}))
            .await["type"],
        "ack"
    );
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let (_r, gw) = setup().await;
    let mut v = gw.viewer("big").await;
    let text = "a".repeat(20 * 1024);
    v.send_raw(Message::Text(
        format!(r#"{{"type":"comment","room":"r","text":"{text}"}}"#).into(),
    ))
    .await;
    assert_eq!(v.closed_with().await, Some(1009));
    // Others are served.
    let mut w = gw.viewer("ok").await;
    assert_eq!(w.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn an_undecodable_flood_closes_with_1007() {
    let (_r, gw) = setup().await;
    let mut v = gw.viewer("flood").await;
    for _ in 0..50 {
        v.send_raw(Message::Text("garbage".into())).await;
    }
    assert_eq!(v.closed_with().await, Some(1007));
}

#[tokio::test]
async fn the_rate_limit_answers_rate_limited() {
    let (_r, gw) = setup().await;
    let mut v = gw.viewer("spammer").await;
    for i in 0..60 {
        v.send(json!({"type":"ping","req":format!("p{i}")})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..60 {
        let m = v.recv().await;
        match m["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(m["code"], "rate_limited");
                assert!(m["req"].is_string(), "the refusal carries the req");
                limited += 1;
            }
            _ => panic!("{m}"),
        }
    }
    assert!((40..=45).contains(&pongs), "burst of 40 (+refill): {pongs}");
    assert_eq!(pongs + limited, 60);
}

#[tokio::test]
async fn a_silent_client_is_closed_with_4002() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(&redis.url(), &[("LIVEGATE_HEARTBEAT_MS", "100")]).await;
    let mut v = gw.viewer("sleepy").await;
    // Not reading means not answering pings: no frame from the client at all.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(v.closed_with().await, Some(4002));
}

#[tokio::test]
async fn a_reading_client_stays_connected_across_heartbeats() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(&redis.url(), &[("LIVEGATE_HEARTBEAT_MS", "100")]).await;
    let mut v = gw.viewer("awake").await;
    // Reading lets the client library answer the server's pings.
    match v.next_event(Duration::from_millis(800)).await {
        Event::Timeout => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(v.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn a_full_gateway_closes_new_connections_with_1013() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(&redis.url(), &[("LIVEGATE_MAX_CONNECTIONS", "2")]).await;
    let _a = gw.viewer("a").await;
    let _b = gw.viewer("b").await;
    let tok = gw.token("c", Role::Viewer, &[]);
    let req = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        gw.ws_url(&tok).into_client_request().expect("req")
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("handshake completes");
    use futures::StreamExt;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(u16::from(f.code), 1013),
        other => panic!("expected close 1013, got {other:?}"),
    }
    // A place frees up when a client leaves.
    drop(_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.viewer("d").await;
}

#[tokio::test]
async fn graceful_shutdown_closes_viewers_with_1001() {
    let (_r, mut gw) = setup().await;
    let mut v = gw.viewer("v").await;
    let mut w = Client::connect(&gw.ws_url(&gw.token("w", Role::Viewer, &[])), Enc::MsgPack).await;
    gw.stop().await;
    assert_eq!(v.closed_with().await, Some(1001));
    assert_eq!(w.closed_with().await, Some(1001));
}

#[tokio::test]
async fn http_endpoints() {
    let (mut redis, gw) = setup().await;
    let _a = room_with_product(&gw, "r5", "s1", 7).await;
    assert_eq!(http_get(&gw, "/healthz", None).await.0, 200);
    assert_eq!(http_get(&gw, "/readyz", None).await.0, 200);
    let (status, body) = http_get(&gw, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("livegate_commands_total"), "{body}");
    // The expiry sweeper exports the core's lock waits every 200 ms.
    let mut waits = None;
    for _ in 0..40 {
        let body = http_get(&gw, "/metrics", None).await.1;
        waits = body
            .lines()
            .find_map(|l| l.strip_prefix("livegate_inventory_lock_waits_total "))
            .and_then(|n| n.trim().parse::<f64>().ok());
        if waits.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waits.is_some_and(|n| n >= 0.0), "lock waits not exported");
    let (status, body) = http_get(&gw, "/api/v1/rooms/r5", None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["room"], "r5");
    assert_eq!(v["status"], "live");
    assert_eq!(v["products"][0]["available"], 7);
    assert_eq!(http_get(&gw, "/api/v1/rooms/nope", None).await.0, 404);
    // Stats: only the room's anchor or an admin.
    assert_eq!(http_get(&gw, "/api/v1/rooms/r5/stats", None).await.0, 401);
    let viewer = gw.token("v", Role::Viewer, &[]);
    assert_eq!(
        http_get(&gw, "/api/v1/rooms/r5/stats", Some(&viewer))
            .await
            .0,
        403
    );
    // Redis down: not ready, still healthy.
    redis.kill();
    assert_eq!(http_get(&gw, "/readyz", None).await.0, 503);
    assert_eq!(http_get(&gw, "/healthz", None).await.0, 200);
}

#[tokio::test]
async fn room_history_is_bounded_by_bytes_too() {
    let redis = RedisServer::start();
    let gw = Gateway::start_with(
        &redis.url(),
        &[
            ("LIVEGATE_ROOM_HISTORY_BYTES", "2048"),
            ("LIVEGATE_ROOM_HISTORY", "1000"),
        ],
    )
    .await;
    let _a = room_with_product(&gw, "chatty", "s1", 5).await;
    let mut v = gw.viewer("talker").await;
    let st = v.request(json!({"type":"join","room":"chatty"})).await;
    let start = st["seq"].as_u64().expect("seq");
    let text = "x".repeat(280);
    let mut last = start;
    for _ in 0..12 {
        v.request(json!({"type":"comment","room":"chatty","text":text}))
            .await;
        last = v.recv_type("comments").await["seq"].as_u64().expect("seq");
    }
    // 12 batches of ~400 bytes do not fit in 2 KiB: the early ones are gone.
    let mut late = gw.viewer("late").await;
    let r = late
        .request(json!({"type":"join","room":"chatty","since":start}))
        .await;
    assert_eq!(r["type"], "room_state", "{r}");
    // The most recent ones are still there.
    let mut recent = gw.viewer("recent").await;
    let r = recent
        .request(json!({"type":"join","room":"chatty","since":last - 2}))
        .await;
    assert_eq!(r["type"], "joined", "{r}");
    assert_eq!(recent.recv().await["seq"], last - 1);
    assert_eq!(recent.recv().await["seq"], last);
}
