//! Checkout to stored order over the wire: the gateway and its order writer against a real
//! redis-server and a real SQL store (SQLite, and PostgreSQL when one answers).

mod common;

use std::time::Duration;

use common::{
    gateway::{http_get, room_with_product, Client, Enc, Gateway},
    redis::{temp_dir, PgSchema, RedisServer},
};
use livegate::{auth::Role, store::OrderStore};
use serde_json::{json, Value};

/// The gateway plus its order writer in this process, storing into `store_url`.
async fn gateway_with_writer(
    redis: &RedisServer,
    store_url: &str,
) -> (Gateway, tokio::sync::oneshot::Sender<()>) {
    let gw = Gateway::start_with(&redis.url(), &[("LIVEGATE_ORDER_STORE", store_url)]).await;
    let cfg = gw.app.cfg.clone();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = livegate::order_writer::run(&cfg, async move {
            let _ = rx.await;
        })
        .await;
    });
    (gw, stop)
}

async fn checkout_flow(store_url: &str) {
    let redis = RedisServer::start();
    let (gw, _stop) = gateway_with_writer(&redis, store_url).await;
    let _anchor = room_with_product(&gw, "live1", "sku-1", 10).await;
    // The buyer, connected twice (phone and tablet), joined through a shared link.
    let tok = gw.token("buyer", Role::Viewer, &[]);
    let mut phone = Client::connect(&gw.ws_url(&tok), Enc::Json).await;
    let mut tablet = Client::connect(&gw.ws_url(&tok), Enc::MsgPack).await;
    let st = phone
        .request(json!({"type":"join","room":"live1","ref":"sharer-7"}))
        .await;
    assert_eq!(st["type"], "room_state");
    let r1 = phone
        .request(json!({"type":"add_to_cart","room":"live1","sku":"sku-1","qty":2}))
        .await;
    let r2 = phone
        .request(json!({"type":"add_to_cart","room":"live1","sku":"sku-1","qty":1}))
        .await;
    let ids = json!([r1["reservation"], r2["reservation"]]);
    let order = phone
        .request(json!({"type":"checkout","reservations":ids}))
        .await;
    assert_eq!(order["type"], "order_accepted", "{order}");
    assert_eq!(order["total_cents"], 3 * 1999);
    let order_id = order["order"].as_str().expect("order id").to_string();
    // Both connections hear it once the writer has stored it.
    for c in [&mut phone, &mut tablet] {
        let m = c.recv_type("order_confirmed").await;
        assert_eq!(
            m,
            json!({"type":"order_confirmed","order":order_id,"total_cents":5997})
        );
    }
    // A retry of the checkout answers the same order and stores nothing new.
    let again = phone
        .request(json!({"type":"checkout","reservations":ids}))
        .await;
    assert_eq!(
        again["type"], "error",
        "reservations already bought: {again}"
    );
    // Stored exactly once, with its items and the referrer.
    let store = OrderStore::connect(store_url).await.expect("store");
    let stored = store
        .get_order(&order_id)
        .await
        .expect("query")
        .expect("stored");
    assert_eq!(stored.order.user_id, "buyer");
    assert_eq!(stored.order.room, "live1");
    assert_eq!(stored.order.ref_user.as_deref(), Some("sharer-7"));
    assert_eq!(stored.order.total_cents, 5997);
    assert_eq!(stored.order.items.len(), 2);
    assert_eq!(store.count_orders().await.expect("count"), 1);
    // The room's results for its anchor.
    let anchor_tok = gw.token("anchor-live1", Role::Anchor, &["live1"]);
    let (status, body) = http_get(&gw, "/api/v1/rooms/live1/stats", Some(&anchor_tok)).await;
    assert_eq!(status, 200, "{body}");
    let s: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(s["orders"], 1);
    assert_eq!(s["units_sold"], 3);
    assert_eq!(s["gmv_cents"], 5997);
    assert_eq!(s["viewers"], 1);
    assert_eq!(s["peak_viewers"], 1);
    // Distinct viewers are counted off the request path: wait for the figure.
    let mut distinct = 0;
    for _ in 0..50 {
        let (_, body) = http_get(&gw, "/api/v1/rooms/live1/stats", Some(&anchor_tok)).await;
        let s: Value = serde_json::from_str(&body).expect("json");
        distinct = s["distinct_viewers"].as_u64().unwrap_or(0);
        if distinct == 1 {
            assert_eq!(
                s["gpm_cents"],
                5997 * 1000,
                "GMV per thousand distinct viewers"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(distinct, 1);
    // Another anchor may not read them.
    let other = gw.token("x", Role::Anchor, &["elsewhere"]);
    assert_eq!(
        http_get(&gw, "/api/v1/rooms/live1/stats", Some(&other))
            .await
            .0,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_is_stored_once_and_confirmed_on_every_connection_sqlite() {
    let dir = temp_dir("orders");
    let url = format!("sqlite://{}", dir.join("orders.db").display());
    checkout_flow(&url).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_is_stored_once_and_confirmed_on_every_connection_postgres() {
    let Some(schema) = PgSchema::create("orders_e2e").await else {
        println!("NOTICE: PostgreSQL not reachable, skipping checkout_is_stored_once..._postgres");
        return;
    };
    checkout_flow(&schema.url).await;
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_retry_with_the_same_req_answers_the_same_order() {
    let redis = RedisServer::start();
    let dir = temp_dir("orders-retry");
    let url = format!("sqlite://{}", dir.join("orders.db").display());
    let (gw, _stop) = gateway_with_writer(&redis, &url).await;
    let _a = room_with_product(&gw, "r", "s", 5).await;
    let mut v = gw.viewer("dora").await;
    let res = v
        .request(json!({"type":"add_to_cart","room":"r","sku":"s","qty":1}))
        .await;
    let msg = json!({"type":"checkout","req":"pay-1","reservations":[res["reservation"]]});
    v.send(msg.clone()).await;
    let first = v.reply_to("pay-1").await;
    assert_eq!(first["type"], "order_accepted");
    v.send(msg).await;
    let second = v.reply_to("pay-1").await;
    assert_eq!(second, first, "same order, same total");
    let _ = std::fs::remove_dir_all(dir);
}
