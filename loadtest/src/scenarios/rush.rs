//! `rush`: the flash-sale moment. An anchor opens a room, stocks one SKU with S units and pins
//! it; N viewers join, then all press `add_to_cart` at the same instant (a shared go signal
//! after every viewer is connected and joined). Measured: confirmed reservations per second,
//! reply latency. Checked: every request got exactly one reply; `reserved` ≤ S units;
//! `reserved` + `sold_out` + other errors == N and, without errors, `reserved` == min(S, N);
//! every `reserved` reply is in Redis (a `kind=reserved` entry of `P:events`, or an active
//! entry of `P:reservations`); the stream's net reserved units never exceed the product's
//! `stocked`; a retry with the same `req` returns the same reservation. With `--sustain-secs`
//! the rush is a sustained load instead (`rush_sustained`); this file keeps its flags.

use crate::client::{Client, Event, Handler};
use crate::ctx::{Common, Ctx};
use crate::report::{histogram, record, Report};
use crate::verify;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Viewers pressing add_to_cart at once [default: 2000; smoke: 200].
    #[arg(long)]
    pub viewers: Option<usize>,
    /// Units of stock [default: half the viewers; sustained mode: 10^9, or 100 with
    /// --restock-per-sec].
    #[arg(long)]
    pub stock: Option<u64>,
    /// Units per add_to_cart.
    #[arg(long, default_value_t = 1)]
    pub qty: u64,
    /// Which reservation path of a --spawn'ed gateway to measure (lua sets
    /// LIVEGATE_RESERVE_MODE=lua, the Lua-per-request baseline).
    #[arg(long, value_enum, default_value = "gateway")]
    pub target: Target,
    /// Viewers do not join the room before pressing (no room broadcasts to them), to isolate
    /// the reservation path from fan-out.
    #[arg(long)]
    pub no_join: bool,
    /// Durability check: SIGKILL the gateway this many milliseconds after the go signal
    /// (needs its pid: --spawn or --server-pid). Requests cut off by the kill are not
    /// failures; every `reserved` the viewers did receive must be in Redis, and Redis must
    /// show no oversell.
    #[arg(long)]
    pub kill_after_ms: Option<u64>,
    /// With --spawn: run the rush twice (in-memory core, then Lua) and print the ratios;
    /// with --sustain-secs, --rounds pairs of runs and the median ratio.
    #[arg(long)]
    pub compare_lua: bool,
    /// Sustained mode (scenarios/rush_sustained.rs): every viewer keeps --inflight
    /// add_to_cart requests in flight, and the figures are counted over this many seconds
    /// (1..=60) after --warmup-secs [viewers default: 200; smoke: 20].
    #[arg(long)]
    pub sustain_secs: Option<u64>,
    /// Sustained mode: requests each viewer keeps in flight, pipelined [default: 8].
    #[arg(long, requires = "sustain_secs")]
    pub inflight: Option<usize>,
    /// Sustained mode: seconds of load before the measured window [default: 2; smoke: 1].
    #[arg(long, requires = "sustain_secs")]
    pub warmup_secs: Option<u64>,
    /// Sustained mode, oversubscribed crowd: the SKU starts with --stock units [default: 100]
    /// and the anchor restocks this many units a second (in both modes); without it the
    /// stock is ample (10^9) and every request should be reserved.
    #[arg(long, requires = "sustain_secs")]
    pub restock_per_sec: Option<u64>,
    /// Sustained mode with --compare-lua: pairs of runs (core and Lua, alternating which
    /// goes first), each on a fresh spawned gateway and Redis [default: 3; smoke: 1; max 10].
    #[arg(long, requires = "sustain_secs")]
    pub rounds: Option<usize>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Gateway,
    Lua,
}

impl Target {
    pub fn env(self) -> Vec<(String, String)> {
        match self {
            Target::Gateway => vec![],
            Target::Lua => vec![("LIVEGATE_RESERVE_MODE".into(), "lua".into())],
        }
    }
}

/// Viewers and stock of the one-shot rush (the sustained mode picks its own stock).
pub fn sizes(a: &Args, smoke: bool) -> (usize, u64) {
    let n = a
        .viewers
        .unwrap_or(match (a.sustain_secs.is_some(), smoke) {
            (false, false) => 2000,
            (false, true) => 200,
            (true, false) => 200,
            (true, true) => 20,
        });
    let s = a.stock.unwrap_or((n as u64 / 2).max(1));
    (n, s)
}

/// Headline figures of one rush, for the Lua comparison.
pub struct Outcome {
    pub reserved_per_sec: f64,
    pub replies_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

enum Answer {
    Reserved { id: String, qty: u64, msg: Value },
    SoldOut,
    Error(String),
    Lost(String),
}

/// Price of the rush's one product (cents).
pub const PRICE: i64 = 1999;

/// Opens the rush's room with its one product, `stock` units, pinned; returns the anchor.
pub async fn open_rush(ctx: &Ctx, room: &str, sku: &str, stock: u64) -> Result<Arc<Client>> {
    super::open_sale(
        ctx,
        &super::Sale {
            room,
            title: "rush",
            sku,
            product: "flash deal",
            price_cents: PRICE,
            stock,
        },
    )
    .await
}

pub async fn run(
    ctx: &Ctx,
    _common: &Common,
    a: &Args,
    label: &str,
    report: &mut Report,
) -> Result<Outcome> {
    let (n, stock) = sizes(a, ctx.smoke);
    // Checked before anyone connects: when to SIGKILL the gateway, and its pid.
    let kill = match a.kill_after_ms {
        Some(ms) => Some((
            ms,
            ctx.server_pid
                .context("--kill-after-ms needs --spawn or --server-pid")?,
        )),
        None => None,
    };
    let room = format!("rush-{}-{label}", ctx.run_id);
    let sku = format!("{room}-sku");
    let price = PRICE;
    report.data(
        &format!("{label} params"),
        json!({"viewers": n, "stock": stock, "qty": a.qty, "target": format!("{:?}", a.target), "join": !a.no_join}),
    );
    let anchor = open_rush(ctx, &room, &sku, stock).await?;

    let events_key = ctx.redis_key("events");
    let tail = match verify::Tail::start(&ctx.redis_url, &events_key).await {
        Ok(t) => Some(t),
        Err(e) => {
            report.note(format!("Redis verification skipped: {e:#}"));
            None
        }
    };

    let run_id = ctx.run_id.clone();
    // Broadcasts the viewers receive, by type (the rush also fans out `stock` updates).
    let seen: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let join = (!a.no_join).then_some(room.as_str());
    let viewers = ctx
        .ramp(n, &format!("{label} viewers"), |i| {
            let seen = seen.clone();
            let handler: Handler = Arc::new(move |e| {
                if let Event::Msg(m, _) = e {
                    let kind = m["type"].as_str().unwrap_or("?").to_string();
                    *seen.lock().unwrap().entry(kind).or_default() += 1;
                }
            });
            ctx.viewer(i, &format!("u-{run_id}-{label}-{i}"), join, handler)
        })
        .await;
    let connect_errors = viewers.errors;
    let clients: Vec<Arc<Client>> = viewers.ok.into_iter().map(|(c, _)| c).collect();

    // Everyone presses at the same instant.
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(clients.len());
    for (i, c) in clients.iter().cloned().enumerate() {
        let mut go = go_rx.clone();
        let room = room.clone();
        let sku = sku.clone();
        let qty = a.qty;
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            let req = format!("cart-{i}");
            let r = c
                .request(json!({"type": "add_to_cart", "req": req, "room": room, "sku": sku, "qty": qty}))
                .await;
            let now = Instant::now();
            let reply_latency = r.as_ref().ok().map(|r| r.latency);
            let answer = match r {
                Ok(r) => match (r.kind(), r.error_code()) {
                    ("reserved", _) => Answer::Reserved {
                        id: r.msg["reservation"].as_str().unwrap_or("").to_string(),
                        qty: r.msg["qty"].as_u64().unwrap_or(0),
                        msg: r.msg.clone(),
                    },
                    (_, Some("sold_out")) => Answer::SoldOut,
                    (_, Some(code)) => Answer::Error(code.to_string()),
                    (other, None) => Answer::Error(format!("unexpected reply {other}")),
                },
                Err(e) => Answer::Lost(format!("{e:#}")),
            };
            (answer, now, reply_latency)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let go_at = Instant::now();
    let _ = go_tx.send(true);
    if let Some((ms, pid)) = kill {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                .context("SIGKILL of the gateway")?;
        }
        report.row(&format!("{label} gateway SIGKILLed after go (ms)"), ms);
    }
    let killed = kill.is_some();
    let pb = ctx.progress(tasks.len() as u64, "add_to_cart");
    let mut answers = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.into_iter().enumerate() {
        if let Ok((ans, at, reply_latency)) = t.await {
            answers.push((i, ans, at, reply_latency));
        }
        pb.inc(1);
    }
    pb.finish_and_clear();

    let mut since_go = histogram();
    let mut reserved_ids: Vec<(String, u64, Value)> = Vec::new();
    let mut sold_out = 0usize;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut lost = Vec::new();
    let mut last_reserved = go_at;
    let mut last_reply = go_at;
    let mut from_send = histogram();
    // The first viewer that got a reservation (its index and the reservation id), for the
    // idempotent retry below.
    let mut first_reserved: Option<(usize, String)> = None;
    for (i, ans, at, reply_latency) in answers {
        if let Some(l) = reply_latency {
            record(&mut from_send, l);
        }
        record(&mut since_go, at.saturating_duration_since(go_at));
        last_reply = last_reply.max(at);
        match ans {
            Answer::Reserved { id, qty, msg } => {
                last_reserved = last_reserved.max(at);
                first_reserved.get_or_insert_with(|| (i, id.clone()));
                reserved_ids.push((id, qty, msg));
            }
            Answer::SoldOut => sold_out += 1,
            Answer::Error(c) => *errors.entry(c).or_default() += 1,
            Answer::Lost(e) => lost.push(e),
        }
    }
    let reserved = reserved_ids.len();
    let reserved_units: u64 = reserved_ids.iter().map(|r| r.1).sum();
    let window = last_reserved
        .saturating_duration_since(go_at)
        .as_secs_f64()
        .max(1e-6);
    let per_sec = reserved as f64 / window;
    let n_err: usize = errors.values().sum();

    report.row(&format!("{label} viewers joined"), clients.len());
    report.row(&format!("{label} connect errors"), connect_errors);
    report.row(&format!("{label} stock"), stock);
    report.row(&format!("{label} reserved"), reserved);
    report.row(&format!("{label} sold_out"), sold_out);
    report.row(
        &format!("{label} other errors"),
        serde_json::to_value(&errors)?,
    );
    report.row(&format!("{label} lost replies"), lost.len());
    report.row(&format!("{label} reserved/s"), per_sec);
    let replies = (reserved + sold_out + n_err) as f64;
    let reply_window = last_reply
        .saturating_duration_since(go_at)
        .as_secs_f64()
        .max(1e-6);
    report.row(&format!("{label} replies/s"), replies / reply_window);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    report.row(
        &format!("{label} broadcasts received"),
        serde_json::to_value(&seen)?,
    );
    report.latency(&format!("{label} add_to_cart (from go)"), &since_go);
    report.latency(&format!("{label} add_to_cart (from its send)"), &from_send);

    // Invariants on the replies.
    if connect_errors > 0 {
        report.fail(format!(
            "{label}: {connect_errors} viewers could not connect/join"
        ));
    }
    if reserved_units > stock {
        report.fail(format!(
            "{label}: OVERSELL: {reserved_units} units reserved of {stock}"
        ));
    }
    if killed {
        report.row(&format!("{label} requests cut off by the kill"), lost.len());
    } else if !lost.is_empty() {
        report.fail(format!(
            "{label}: {} add_to_cart got no reply (first: {})",
            lost.len(),
            lost[0]
        ));
    }
    if !killed && reserved + sold_out + n_err + lost.len() != clients.len() {
        report.fail(format!("{label}: replies do not add up to the requests"));
    }
    let want = (stock / a.qty.max(1)).min(clients.len() as u64) as usize;
    if !killed && n_err == 0 && lost.is_empty() && reserved != want {
        report.fail(format!("{label}: {reserved} reserved, expected exactly {want} (sold_out while stock was left?)"));
    }
    let wrong = |(id, qty, m): &&(String, u64, Value)| {
        id.is_empty()
            || *qty != a.qty
            || m["sku"] != sku.as_str()
            || m["room"] != room.as_str()
            || m["price_cents"] != price
    };
    let bad_fields = reserved_ids.iter().filter(wrong).count();
    if bad_fields > 0 {
        report.fail(format!(
            "{label}: {bad_fields} reserved replies with wrong fields (e.g. {})",
            reserved_ids
                .iter()
                .find(wrong)
                .map(|r| r.2.to_string())
                .unwrap_or_default()
        ));
    }
    let distinct: HashSet<&str> = reserved_ids.iter().map(|r| r.0.as_str()).collect();
    if distinct.len() != reserved {
        report.fail(format!("{label}: duplicate reservation ids in replies"));
    }

    // Idempotent retry: the same req from the same user returns the same reservation.
    if let Some((pos, orig)) = first_reserved.filter(|_| !killed) {
        let r = clients[pos]
            .request(json!({"type": "add_to_cart", "req": format!("cart-{pos}"), "room": room, "sku": sku, "qty": a.qty}))
            .await;
        let orig = Some(orig);
        match r {
            Ok(r)
                if r.kind() == "reserved"
                    && r.msg["reservation"].as_str().map(str::to_string) == orig =>
            {
                report.row(&format!("{label} idempotent retry"), "same reservation");
            }
            Ok(r) => report.fail(format!(
                "{label}: retry with the same req got {} instead of reservation {orig:?}",
                r.msg
            )),
            Err(e) => report.fail(format!("{label}: retry with the same req: {e:#}")),
        }
    }

    // Against Redis.
    if let Some(tail) = tail {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tailed = tail.finish().await;
        verify_redis(ctx, label, &sku, stock, &reserved_ids, tailed, report).await?;
    }

    for c in clients.iter().chain(std::iter::once(&anchor)) {
        c.close().await;
    }
    let h = since_go;
    Ok(Outcome {
        reserved_per_sec: per_sec,
        replies_per_sec: replies / reply_window,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
    })
}

async fn verify_redis(
    ctx: &Ctx,
    label: &str,
    sku: &str,
    stock: u64,
    reserved: &[(String, u64, Value)],
    tailed: Vec<verify::Entry>,
    report: &mut Report,
) -> Result<()> {
    let mut conn = verify::connect(&ctx.redis_url).await?;
    let events_key = ctx.redis_key("events");
    let all = verify::union(tailed, verify::xrange_all(&mut conn, &events_key).await?);
    // (kind, reservation id, qty) of this SKU's entries. A `reserved` entry carries the
    // reservation's record as JSON in `record` (docs/redis.md); older entries, and the other
    // kinds, have flat `sku` and `qty` fields.
    let mine: Vec<(&str, &str, u64)> = all
        .iter()
        .map(|e| &e.1)
        .filter_map(|m| {
            let kind = m.get("kind").map(String::as_str)?;
            let id = m.get("reservation").map(String::as_str).unwrap_or("");
            let (entry_sku, qty) = match m.get("record") {
                Some(record) => {
                    let v: Value = serde_json::from_str(record).ok()?;
                    (
                        v["sku"].as_str()?.to_string(),
                        v["qty"].as_u64().unwrap_or(0),
                    )
                }
                None => (
                    m.get("sku")?.clone(),
                    m.get("qty")
                        .and_then(|q| q.parse::<u64>().ok())
                        .unwrap_or(0),
                ),
            };
            (entry_sku == sku).then_some((kind, id, qty))
        })
        .collect();
    let units = |kind: &str| -> u64 { mine.iter().filter(|m| m.0 == kind).map(|m| m.2).sum() };
    let stream_ids: HashSet<&str> = mine
        .iter()
        .filter(|m| m.0 == "reserved")
        .map(|m| m.1)
        .collect();
    let active: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(ctx.redis_key("reservations"))
        .query_async(&mut conn)
        .await
        .context("HGETALL reservations")?;
    let net = units("reserved").saturating_sub(units("released") + units("expired"));
    report.row(&format!("{label} redis reserved entries"), stream_ids.len());
    verify::check_stock(
        &mut conn,
        &ctx.redis_key(&format!("product:{sku}")),
        label,
        stock,
        net,
        report,
    )
    .await?;
    let missing: Vec<&str> = reserved
        .iter()
        .map(|r| r.0.as_str())
        .filter(|id| !stream_ids.contains(id) && !active.contains_key(*id))
        .collect();
    if !missing.is_empty() {
        report.fail(format!(
            "{label}: LOST CONFIRMATION: {} `reserved` replies not in Redis (first: {})",
            missing.len(),
            missing[0]
        ));
    }
    let extra = stream_ids.len().saturating_sub(reserved.len());
    if extra > 0 {
        report.note(format!(
            "{label}: {extra} reserved entries in the stream without a reply seen by the harness"
        ));
    }
    Ok(())
}
