//! `checkout`: every viewer reserves one unit (`add_to_cart`), checks it out (`checkout` with
//! that reservation) and waits for `order_accepted` and then the unsolicited
//! `order_confirmed` for the same order. Measured: orders per second end to end (first
//! `add_to_cart` to last `order_confirmed`) and the latencies of each step. Checked: every
//! accepted order is confirmed, with the right `total_cents`; the room's stats endpoint
//! (admin token) counts exactly the accepted orders and units; when the SQLite order store is
//! known (`--spawn` or `--order-db`) each accepted order is in `orders` exactly once and the
//! room has no other order; every accepted order has a `kind=order` entry in `P:events`.

use crate::client::{Event, Handler};
use crate::ctx::{Common, Ctx};
use crate::report::{histogram, record, Report};
use crate::verify;
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Buyers [default: 1000; smoke: 100].
    #[arg(long)]
    pub viewers: Option<usize>,
    /// Units per order.
    #[arg(long, default_value_t = 1)]
    pub qty: u64,
    /// Seconds to wait for each order_confirmed.
    #[arg(long, default_value_t = 20)]
    pub confirm_timeout: u64,
}

type Confirmed = Arc<(Mutex<HashMap<String, (Instant, Value)>>, Notify)>;

#[derive(Default)]
struct Outcome {
    reserve_errors: BTreeMap<String, usize>,
    checkout_errors: BTreeMap<String, usize>,
    accepted: Vec<(String, i64)>,
    confirmed: usize,
    unconfirmed: Vec<String>,
    wrong_total: usize,
    last_confirm: Option<Instant>,
}

/// Counts one failed step under its error code (or "no reply: …").
fn count(errors: &mut BTreeMap<String, usize>, what: String) {
    *errors.entry(what).or_default() += 1;
}

/// Buyers, after the default.
pub fn buyers(a: &Args, smoke: bool) -> usize {
    a.viewers.unwrap_or(if smoke { 100 } else { 1000 })
}

pub async fn run(ctx: &Ctx, _common: &Common, a: &Args, report: &mut Report) -> Result<()> {
    let n = buyers(a, ctx.smoke);
    let room = format!("co-{}", ctx.run_id);
    let sku = format!("{room}-sku");
    let price = 2500i64;
    let want_total = price * a.qty as i64;
    report.data("params", json!({"viewers": n, "qty": a.qty}));
    let anchor = super::open_sale(
        ctx,
        &super::Sale {
            room: &room,
            title: "checkout",
            sku: &sku,
            product: "deal",
            price_cents: price,
            stock: n as u64 * a.qty,
        },
    )
    .await?;
    let tail = verify::Tail::start(&ctx.redis_url, &ctx.redis_key("events"))
        .await
        .ok();

    let run_id = ctx.run_id.clone();
    let joined = ctx
        .ramp(n, "checkout buyers", |i| {
            let confirmed: Confirmed = Arc::default();
            let c2 = confirmed.clone();
            let handler: Handler = Arc::new(move |e| {
                if let Event::Msg(m, at) = e {
                    if m["type"] == "order_confirmed" {
                        let order = m["order"].as_str().unwrap_or("").to_string();
                        c2.0.lock().unwrap().insert(order, (at, m.clone()));
                        c2.1.notify_one();
                    }
                }
            });
            let viewer = ctx.viewer(i, &format!("b-{run_id}-{i}"), Some(&room), handler);
            async move { Ok((viewer.await?.0, confirmed)) }
        })
        .await;
    let connect_errors = joined.errors;
    let buyers = joined.ok;

    let hists: Arc<Mutex<[hdrhistogram::Histogram<u64>; 3]>> =
        Arc::new(Mutex::new([histogram(), histogram(), histogram()]));
    let out: Arc<Mutex<Outcome>> = Arc::default();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let confirm_timeout = Duration::from_secs(a.confirm_timeout);
    let mut tasks = Vec::new();
    for (c, confirmed) in buyers.iter().cloned() {
        let (room, sku, hists, out, qty) =
            (room.clone(), sku.clone(), hists.clone(), out.clone(), a.qty);
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            let r = match c
                .request(json!({"type": "add_to_cart", "room": room, "sku": sku, "qty": qty}))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    count(
                        &mut out.lock().unwrap().reserve_errors,
                        format!("no reply: {e}"),
                    );
                    return;
                }
            };
            if let Some(code) = r.error_code() {
                count(&mut out.lock().unwrap().reserve_errors, code.to_string());
                return;
            }
            let start = r.sent;
            record(&mut hists.lock().unwrap()[0], r.latency);
            let reservation = r.msg["reservation"].clone();
            let co = match c
                .request(json!({"type": "checkout", "reservations": [reservation]}))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    count(
                        &mut out.lock().unwrap().checkout_errors,
                        format!("no reply: {e}"),
                    );
                    return;
                }
            };
            if co.kind() != "order_accepted" {
                let code = co.error_code().unwrap_or("unexpected reply").to_string();
                count(&mut out.lock().unwrap().checkout_errors, code);
                return;
            }
            record(&mut hists.lock().unwrap()[1], co.latency);
            let order = co.msg["order"].as_str().unwrap_or("").to_string();
            let total = co.msg["total_cents"].as_i64().unwrap_or(-1);
            {
                let mut o = out.lock().unwrap();
                o.accepted.push((order.clone(), total));
                if total != want_total {
                    o.wrong_total += 1;
                }
            }
            let deadline = Instant::now() + confirm_timeout;
            loop {
                let hit = confirmed.0.lock().unwrap().get(&order).cloned();
                if let Some((at, m)) = hit {
                    record(
                        &mut hists.lock().unwrap()[2],
                        at.saturating_duration_since(start),
                    );
                    let mut o = out.lock().unwrap();
                    o.confirmed += 1;
                    o.last_confirm = Some(o.last_confirm.map_or(at, |l| l.max(at)));
                    if m["total_cents"].as_i64() != Some(want_total) {
                        o.wrong_total += 1;
                    }
                    return;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero()
                    || tokio::time::timeout(left, confirmed.1.notified())
                        .await
                        .is_err()
                {
                    out.lock().unwrap().unconfirmed.push(order);
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let go_at = Instant::now();
    let _ = go_tx.send(true);
    let pb = ctx.progress(tasks.len() as u64, "orders");
    for t in tasks {
        let _ = t.await;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let o = std::mem::take(&mut *out.lock().unwrap());
    let [h_res, h_co, h_e2e] = std::mem::replace(
        &mut *hists.lock().unwrap(),
        [histogram(), histogram(), histogram()],
    );
    let window = o
        .last_confirm
        .map(|l| l.saturating_duration_since(go_at).as_secs_f64())
        .unwrap_or(0.0)
        .max(1e-6);

    report.row("buyers joined", buyers.len());
    report.row("connect errors", connect_errors);
    report.row("reserve errors", serde_json::to_value(&o.reserve_errors)?);
    report.row("checkout errors", serde_json::to_value(&o.checkout_errors)?);
    report.row("orders accepted", o.accepted.len());
    report.row("orders confirmed", o.confirmed);
    report.row("orders/s end to end", o.confirmed as f64 / window);
    report.latency("add_to_cart", &h_res);
    report.latency("checkout->order_accepted", &h_co);
    report.latency("add_to_cart->order_confirmed", &h_e2e);
    if connect_errors > 0 {
        report.fail(format!("{connect_errors} buyers could not connect/join"));
    }
    if !o.unconfirmed.is_empty() {
        report.fail(format!(
            "{} accepted orders never got order_confirmed within {:?} (first: {})",
            o.unconfirmed.len(),
            confirm_timeout,
            o.unconfirmed[0]
        ));
    }
    if o.wrong_total > 0 {
        report.fail(format!(
            "{} orders with total_cents != {want_total}",
            o.wrong_total
        ));
    }
    let no_reply: usize = o
        .reserve_errors
        .iter()
        .chain(o.checkout_errors.iter())
        .filter(|(k, _)| k.starts_with("no reply"))
        .map(|(_, v)| v)
        .sum();
    if no_reply > 0 {
        report.fail(format!("{no_reply} requests got no reply"));
    }
    let ids: HashSet<&str> = o.accepted.iter().map(|x| x.0.as_str()).collect();
    if ids.len() != o.accepted.len() {
        report.fail("the same order id was accepted twice");
    }

    // Stats endpoint: the order writer may lag; poll until it has caught up (max 15 s).
    let admin = ctx.minter.admin("loadtest-admin")?;
    let path = format!("/api/v1/rooms/{room}/stats");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut stats;
    loop {
        match crate::net::http_get(ctx.http(), &path, Some(&admin)).await {
            Ok((200, body)) => stats = serde_json::from_str(&body).unwrap_or(Value::Null),
            Ok((code, body)) => stats = json!({"http_status": code, "body": body}),
            Err(e) => stats = json!({"error": e.to_string()}),
        }
        if stats["orders"].as_u64() == Some(o.accepted.len() as u64) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.row("stats endpoint", stats.clone());
    match stats["orders"].as_u64() {
        Some(x) if x == o.accepted.len() as u64 => {}
        Some(x) => report.fail(format!(
            "stats endpoint counts {x} orders, {} were accepted",
            o.accepted.len()
        )),
        None => report.fail(format!("stats endpoint unusable: {stats}")),
    }
    if let Some(units) = stats["units_sold"].as_u64() {
        if units != o.accepted.len() as u64 * a.qty {
            report.fail(format!(
                "stats units_sold={units}, expected {}",
                o.accepted.len() as u64 * a.qty
            ));
        }
    }

    // The SQL store itself.
    if let Some(db) = &ctx.order_db {
        let q = format!(
            "SELECT order_id, COUNT(*) FROM orders WHERE room = '{room}' GROUP BY order_id;"
        );
        match std::process::Command::new("sqlite3")
            .arg("-readonly")
            .arg(db)
            .arg(&q)
            .output()
        {
            Ok(outp) if outp.status.success() => {
                let rows: HashMap<String, u64> = String::from_utf8_lossy(&outp.stdout)
                    .lines()
                    .filter_map(|l| l.split_once('|'))
                    .map(|(id, n)| (id.to_string(), n.trim().parse().unwrap_or(0)))
                    .collect();
                let missing = ids.iter().filter(|id| !rows.contains_key(**id)).count();
                let twice = rows.values().filter(|n| **n > 1).count();
                let extra = rows.keys().filter(|id| !ids.contains(id.as_str())).count();
                report.row("sql orders for the room", rows.len());
                if missing > 0 {
                    report.fail(format!(
                        "{missing} accepted orders missing from the SQL store"
                    ));
                }
                if twice > 0 {
                    report.fail(format!("{twice} orders stored more than once"));
                }
                if extra > 0 {
                    report.fail(format!(
                        "{extra} orders in the SQL store that were never accepted"
                    ));
                }
            }
            Ok(outp) => report.note(format!(
                "sqlite3 check skipped: {}",
                String::from_utf8_lossy(&outp.stderr).trim()
            )),
            Err(e) => report.note(format!("sqlite3 check skipped: {e}")),
        }
    }

    // The durable record.
    if let Some(tail) = tail {
        let entries = tail.finish().await;
        let in_stream: HashSet<String> = entries
            .iter()
            .filter(|e| e.1.get("kind").map(String::as_str) == Some("order"))
            .filter_map(|e| e.1.get("order").cloned())
            .collect();
        let lost = ids.iter().filter(|id| !in_stream.contains(**id)).count();
        report.row("redis order entries", in_stream.len());
        if let Ok(mut conn) = verify::connect(&ctx.redis_url).await {
            let dead: redis::RedisResult<u64> = redis::cmd("XLEN")
                .arg(ctx.redis_key("events:dead"))
                .query_async(&mut conn)
                .await;
            report.row(
                "redis dead letters",
                dead.map(Value::from).unwrap_or(Value::Null),
            );
            let groups: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(ctx.redis_key("events"))
                .query_async(&mut conn)
                .await;
            if let Ok(g) = groups {
                report.data("redis consumer groups", json!(format!("{g:?}")));
                if !o.unconfirmed.is_empty() {
                    report.note(format!("consumer groups of the events stream: {g:?}"));
                }
            }
        }
        if lost > 0 {
            report.fail(format!("LOST CONFIRMATION: {lost} accepted orders have no `order` entry in the events stream"));
        }
    }
    for (c, _) in &buyers {
        c.close().await;
    }
    anchor.close().await;
    Ok(())
}
