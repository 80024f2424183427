//! `rush --sustain-secs S`: the flash sale as a sustained load, for a stable comparison of
//! the in-memory core with the Lua-per-request baseline. N viewers (default 200) each keep
//! `--inflight` K `add_to_cart` requests in flight (pipelined, every request a fresh `req`)
//! for a warm-up and then S measured seconds; the figures are counted over that steady
//! window only: confirmed `reserved` replies per second, replies per second, each request's
//! round trip, and the CPU the harness, the gateway and Redis used in the window.
//!
//! Two shapes: ample stock (the default: 10^9 units, every request must be `reserved`), and
//! with `--restock-per-sec R` an oversubscribed crowd on a small stock that the anchor
//! restocks at R units a second in both modes (`release` of a Lua-made reservation does not
//! reach the core, so the stock cannot circulate through releases in the baseline).
//!
//! The harness stays cheap because it shares the cores: each connection is one task that
//! owns its socket, writes its requests from a borrowed struct (no `serde_json::Value`),
//! batches them into one write, and decodes replies into a borrowed struct; latencies go to a
//! plain vector per connection, merged at the end.
//!
//! Checked: every request got exactly one reply with the fields of the `reserved` it claims
//! (room, sku, qty, price, a distinct reservation id); with ample stock, no `sold_out`; the
//! units reserved never exceed the units stocked; a retry of each connection's last
//! reserved `req` returns the same reservation (the last, not the first: the core keeps a
//! bounded window of idempotency records per inventory shard, and a run makes more
//! reservations on its one SKU than that window holds). Against Redis (docs/redis.md), without the
//! events stream (the order writer trims it, and a tail of millions of entries would cost
//! the client more memory than the run): nothing is released or expires during a run, so
//! every `reserved` reply must be an active entry of `P:reservations` (read with HSCAN, one
//! page at a time), their units plus `sold` must not exceed `stocked`, and `stocked` must be
//! the initial stock plus the acknowledged restocks.
//!
//! With `--compare-lua` it runs rounds of one core run and one Lua run, each against a
//! freshly spawned Redis and gateway, alternating which goes first (core, lua, lua, core, …)
//! so that a drift in the machine's load does not favour one design, and prints the ratio of
//! each round and the median, and the ratio of Redis CPU per confirmed reservation (what a
//! Redis shared by many gateways would pay). The spawned gateway's per-connection rate limit
//! is raised to 1,000,000/s in both modes (LIVEGATE_RATE_PER_SEC and LIVEGATE_RATE_BURST).

use super::rush::{self, Args, Target};
use crate::ctx::{Common, Ctx};
use crate::report::{histogram, Report};
use crate::verify;
use anyhow::{bail, Context, Result};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::client::Encoding;

/// Stock of the ample-stock shape (the protocol's maximum).
const AMPLE_STOCK: u64 = 1_000_000_000;
/// Initial stock of the oversubscribed shape unless `--stock` says otherwise.
const CROWD_STOCK: u64 = 100;
/// Longest measured window and warm-up (memory: every reservation id is kept).
const MAX_SUSTAIN_S: u64 = 60;
const MAX_WARMUP_S: u64 = 30;
const MAX_INFLIGHT: usize = 256;
const MAX_ROUNDS: usize = 10;
/// Restocks a second in the oversubscribed shape.
const RESTOCK_TICKS_PER_SEC: u64 = 10;
/// The rate limit of the spawned gateway in this mode (the configuration's maximum).
const RATE: &str = "1000000";

const WARMUP: u8 = 0;
const STEADY: u8 = 1;
const STOP: u8 = 2;

/// The environment every spawned gateway gets in this mode, core and Lua alike.
pub fn rate_env() -> Vec<(String, String)> {
    vec![
        ("LIVEGATE_RATE_PER_SEC".into(), RATE.into()),
        ("LIVEGATE_RATE_BURST".into(), RATE.into()),
    ]
}

/// Headline figures of one sustained run.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub reserved_per_sec: f64,
    pub replies_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Redis CPU µs per confirmed reservation (None when unknown or nothing was reserved).
    pub redis_us_per_reserved: Option<f64>,
}

struct Plan {
    n: usize,
    inflight: usize,
    warmup: Duration,
    steady: Duration,
    stock: u64,
    restock_per_sec: Option<u64>,
}

fn plan(a: &Args, smoke: bool) -> Result<Plan> {
    let secs = a.sustain_secs.unwrap_or(10);
    if secs == 0 || secs > MAX_SUSTAIN_S {
        bail!("--sustain-secs must be 1..={MAX_SUSTAIN_S}");
    }
    let warmup = a.warmup_secs.unwrap_or(if smoke { 1 } else { 2 });
    if warmup > MAX_WARMUP_S {
        bail!("--warmup-secs must be at most {MAX_WARMUP_S}");
    }
    let inflight = a.inflight.unwrap_or(8);
    if inflight == 0 || inflight > MAX_INFLIGHT {
        bail!("--inflight must be 1..={MAX_INFLIGHT}");
    }
    if a.kill_after_ms.is_some() {
        bail!("--kill-after-ms is a one-shot check; it does not combine with --sustain-secs");
    }
    let (n, _) = rush::sizes(a, smoke);
    let stock = match (a.stock, a.restock_per_sec) {
        (Some(s), _) => s,
        (None, None) => AMPLE_STOCK,
        (None, Some(_)) => CROWD_STOCK,
    };
    Ok(Plan {
        n,
        inflight,
        warmup: Duration::from_secs(warmup),
        steady: Duration::from_secs(secs),
        stock,
        restock_per_sec: a.restock_per_sec,
    })
}

/// Runs the sustained rush: once (`--target`), or `--rounds` core/Lua pairs with
/// `--compare-lua`. Each run gets its own spawned Redis and gateway when `--spawn`.
pub async fn run_all(common: &Common, a: &Args, conns: usize, report: &mut Report) -> Result<()> {
    let p = plan(a, common.smoke)?;
    report.data(
        "params",
        json!({"viewers": p.n, "inflight": p.inflight, "warmup_s": p.warmup.as_secs(),
               "sustain_s": p.steady.as_secs(), "stock": p.stock, "qty": a.qty,
               "restock_per_sec": p.restock_per_sec, "join": !a.no_join,
               "encoding": common.encoding, "gateway_cpus": common.gateway_cpus,
               "redis_cpus": common.redis_cpus, "redis_cpu_quota": common.redis_cpu_quota,
               "spawned_gateway_env": rate_env()}),
    );
    if common.spawn {
        report.row(
            "spawned gateway rate limit (both modes)",
            format!("LIVEGATE_RATE_PER_SEC={RATE} LIVEGATE_RATE_BURST={RATE}"),
        );
    } else {
        report.note("external gateway: its per-connection rate limit (LIVEGATE_RATE_PER_SEC, default 20/s) must be raised for this mode, or most requests get rate_limited");
    }
    if let Some(cpus) = harness_cpus() {
        report.row("harness cpus", cpus);
    }
    if !a.compare_lua {
        let label = match a.target {
            Target::Gateway => "core",
            Target::Lua => "lua",
        };
        one(common, a, &p, conns, a.target, label, report).await?;
        return Ok(());
    }
    anyhow::ensure!(
        common.spawn,
        "--compare-lua needs --spawn (it starts a gateway per run)"
    );
    if !crate::spawn::binary_mentions(
        &crate::spawn::gateway_bin(common.gateway_bin.as_deref())?,
        "LIVEGATE_RESERVE_MODE",
    ) {
        report.note("the gateway binary does not mention LIVEGATE_RESERVE_MODE: the `lua` runs probably used the normal path");
    }
    let rounds = a.rounds.unwrap_or(if common.smoke { 1 } else { 3 });
    if rounds == 0 || rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    let mut ratios: Vec<(f64, f64, f64)> = Vec::with_capacity(rounds);
    let mut table = Vec::with_capacity(rounds);
    for r in 1..=rounds {
        // Alternate which design goes first, so a drift in load does not favour one.
        let order = if r % 2 == 1 {
            [Target::Gateway, Target::Lua]
        } else {
            [Target::Lua, Target::Gateway]
        };
        let mut core = None;
        let mut lua = None;
        for t in order {
            let label = match t {
                Target::Gateway => format!("r{r} core"),
                Target::Lua => format!("r{r} lua"),
            };
            let o = one(common, a, &p, conns, t, &label, report).await?;
            match t {
                Target::Gateway => core = Some(o),
                Target::Lua => lua = Some(o),
            }
        }
        let (Some(core), Some(lua)) = (core, lua) else {
            bail!("round {r} did not run both designs");
        };
        let rr = ratio(core.reserved_per_sec, lua.reserved_per_sec);
        let rp = ratio(core.replies_per_sec, lua.replies_per_sec);
        report.row(&format!("r{r} ratio core/lua reserved/s"), rr);
        report.row(&format!("r{r} ratio core/lua replies/s"), rp);
        report.row(
            &format!("r{r} ratio core/lua p50"),
            ratio(core.p50_us as f64, lua.p50_us as f64),
        );
        report.row(
            &format!("r{r} ratio core/lua p99"),
            ratio(core.p99_us as f64, lua.p99_us as f64),
        );
        let redis_cost = match (lua.redis_us_per_reserved, core.redis_us_per_reserved) {
            (Some(l), Some(c)) => ratio(l, c),
            _ => f64::NAN,
        };
        report.row(
            &format!("r{r} ratio lua/core redis cpu per reserved"),
            redis_cost,
        );
        ratios.push((rr, rp, redis_cost));
        table.push(json!({"round": r, "first": if r % 2 == 1 { "core" } else { "lua" },
            "core_reserved_per_sec": core.reserved_per_sec, "lua_reserved_per_sec": lua.reserved_per_sec,
            "core_replies_per_sec": core.replies_per_sec, "lua_replies_per_sec": lua.replies_per_sec,
            "core_p50_us": core.p50_us, "lua_p50_us": lua.p50_us,
            "core_p99_us": core.p99_us, "lua_p99_us": lua.p99_us,
            "core_redis_us_per_reserved": core.redis_us_per_reserved,
            "lua_redis_us_per_reserved": lua.redis_us_per_reserved,
            "ratio_reserved_per_sec": rr, "ratio_replies_per_sec": rp,
            "ratio_lua_core_redis_cpu_per_reserved": redis_cost}));
    }
    report.data("rounds", Value::Array(table));
    let rr: Vec<f64> = ratios.iter().map(|r| r.0).collect();
    let rp: Vec<f64> = ratios.iter().map(|r| r.1).collect();
    report.row("median ratio core/lua reserved/s", median(&rr));
    report.row("median ratio core/lua replies/s", median(&rp));
    let rc: Vec<f64> = ratios.iter().map(|r| r.2).collect();
    report.row("median ratio lua/core redis cpu per reserved", median(&rc));
    report.row(
        "min..max ratio core/lua reserved/s",
        format!(
            "{:.2}..{:.2}",
            rr.iter().copied().fold(f64::INFINITY, f64::min),
            rr.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        ),
    );
    Ok(())
}

fn ratio(x: f64, y: f64) -> f64 {
    if y > 0.0 {
        x / y
    } else {
        f64::NAN
    }
}

/// The median (the mean of the two middle values for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// One run against a fresh gateway (spawned with the rate limit raised) or the external one.
async fn one(
    common: &Common,
    a: &Args,
    p: &Plan,
    conns: usize,
    target: Target,
    label: &str,
    report: &mut Report,
) -> Result<Outcome> {
    let mut env = rate_env();
    env.extend(target.env());
    let (ctx, sp) = Ctx::setup(common, conns, &env).await?;
    let r = run(&ctx, a, p, label, report).await;
    crate::stop(sp, report, r.is_ok()).await;
    r
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// The CPU list the harness itself may run on, when it is not every online CPU (the
/// harness was started under `taskset`).
fn harness_cpus() -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = s
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim()
        .to_string();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    (list != online.trim()).then_some(list)
}

/// Redis's own CPU seconds and commands processed, from INFO (the CPU figure is replaced by
/// /proc's for a spawned redis-server).
async fn redis_counters(conn: &mut redis::aio::MultiplexedConnection) -> Option<(f64, u64)> {
    let info: String = redis::cmd("INFO").query_async(conn).await.ok()?;
    let field = |name: &str| -> Option<&str> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let cpu = field("used_cpu_user")?.parse::<f64>().ok()?
        + field("used_cpu_sys")?.parse::<f64>().ok()?;
    let cmds = field("total_commands_processed")?.parse().ok()?;
    Some((cpu, cmds))
}

#[derive(Clone, Copy)]
struct Counters {
    at: Instant,
    harness: Option<f64>,
    gateway: Option<f64>,
    redis: Option<(f64, u64)>,
}

async fn counters(ctx: &Ctx, conn: &mut Option<redis::aio::MultiplexedConnection>) -> Counters {
    let mut redis = match conn {
        Some(c) => redis_counters(c).await,
        None => None,
    };
    // A spawned redis-server: the same /proc figure as for the gateway.
    if let (Some(r), Some(cpu)) = (redis.as_mut(), ctx.redis_pid.and_then(cpu_secs)) {
        r.0 = cpu;
    }
    Counters {
        at: Instant::now(),
        harness: cpu_secs(std::process::id()),
        gateway: ctx.server_pid.and_then(cpu_secs),
        redis,
    }
}

/// `add_to_cart`, written straight from borrowed fields.
#[derive(Serialize)]
struct AddToCart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    req: &'a str,
    room: &'a str,
    sku: &'a str,
    qty: u64,
}

/// `join` with a `req`.
#[derive(Serialize)]
struct Join<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    req: &'a str,
    room: &'a str,
}

/// The fields of a server message this mode looks at, borrowed from the frame.
#[derive(Deserialize)]
struct Lite<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    req: Option<&'a str>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
    #[serde(default, borrow)]
    reservation: Option<&'a str>,
    #[serde(default, borrow)]
    room: Option<&'a str>,
    #[serde(default, borrow)]
    sku: Option<&'a str>,
    #[serde(default)]
    qty: Option<u64>,
    #[serde(default)]
    price_cents: Option<i64>,
}

fn encode<T: Serialize>(enc: Encoding, msg: &T) -> Result<Message> {
    Ok(match enc {
        Encoding::Json => Message::text(serde_json::to_string(msg)?),
        Encoding::Msgpack => Message::binary(rmp_serde::to_vec_named(msg)?),
    })
}

fn payload(m: &Message) -> Option<&[u8]> {
    match m {
        Message::Text(t) => Some(t.as_bytes()),
        Message::Binary(b) => Some(b),
        _ => None,
    }
}

fn decode(enc: Encoding, bytes: &[u8]) -> Option<Lite<'_>> {
    match enc {
        Encoding::Json => serde_json::from_slice(bytes).ok(),
        Encoding::Msgpack => rmp_serde::from_slice(bytes).ok(),
    }
}

type Ws = WebSocketStream<TcpStream>;

/// WebSocket settings of this mode's sockets: the harness's 4 KiB read buffer, and an
/// 8 KiB write buffer so a batch of requests goes out in one write.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    crate::net::ws_config().write_buffer_size(8192)
}

/// Sends `join` and waits (10 s) for its `room_state`.
async fn join(ws: &mut Ws, enc: Encoding, room: &str) -> Result<()> {
    ws.send(encode(
        enc,
        &Join {
            kind: "join",
            req: "join",
            room,
        },
    )?)
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("no reply to join within 10 s")?
            .context("closed before the reply to join")??;
        let Some(l) = payload(&m).and_then(|b| decode(enc, b)) else {
            continue;
        };
        if l.req == Some("join") {
            if l.kind != "room_state" {
                bail!("join answered {} ({:?})", l.kind, l.code);
            }
            return Ok(());
        }
    }
}

/// What one connection saw.
#[derive(Default)]
struct Seen {
    sent: u64,
    replies: u64,
    reserved_ids: Vec<String>,
    sold_out: u64,
    errors: BTreeMap<String, u64>,
    steady_replies: u64,
    steady_reserved: u64,
    /// Round trips (µs) of the replies received in the steady window.
    steady_latency_us: Vec<u32>,
    bad_fields: u64,
    bad_example: Option<String>,
    unexpected: u64,
    undecodable: u64,
    broadcasts: BTreeMap<String, u64>,
    lost: u64,
    ended: Option<String>,
    retry: Option<std::result::Result<(), String>>,
}

struct Conn {
    enc: Encoding,
    room: Arc<str>,
    sku: Arc<str>,
    qty: u64,
    price: i64,
    inflight: usize,
    reply_timeout: Duration,
}

impl Conn {
    fn frame(&self, req: &str) -> Result<Message> {
        encode(
            self.enc,
            &AddToCart {
                kind: "add_to_cart",
                req,
                room: &self.room,
                sku: &self.sku,
                qty: self.qty,
            },
        )
    }

    /// The pipelined loop of one connection: keep `inflight` requests out until the phase is
    /// STOP, then collect the outstanding replies (until `reply_timeout` after the stop).
    async fn drive(
        &self,
        ws: &mut Ws,
        phase: &AtomicU8,
        mut go: tokio::sync::watch::Receiver<bool>,
    ) -> Seen {
        let mut seen = Seen::default();
        let k = self.inflight;
        // Outstanding requests by seq: the gateway answers a connection's carts in the order
        // their commits finish (a `sold_out` overtakes a `reserved` still waiting for Redis),
        // so replies are matched by `req`, as protocol.md says, never by position.
        let mut outstanding: HashMap<u64, Instant> = HashMap::with_capacity(k);
        let mut inflight = 0usize;
        let mut next_seq = 0u64;
        let mut last_reserved: Option<(u64, String)> = None;
        let mut req = String::with_capacity(16);
        let _ = go.wait_for(|g| *g).await;
        let mut last_progress = tokio::time::Instant::now();
        let mut drain_until: Option<tokio::time::Instant> = None;
        'run: loop {
            if phase.load(Ordering::Acquire) < STOP {
                let mut fed = false;
                while inflight < k {
                    req.clear();
                    let _ = write!(req, "{next_seq}");
                    let frame = match self.frame(&req) {
                        Ok(f) => f,
                        Err(e) => {
                            seen.ended = Some(format!("encode: {e:#}"));
                            break 'run;
                        }
                    };
                    let at = Instant::now();
                    if let Err(e) = ws.feed(frame).await {
                        seen.ended = Some(format!("send: {e}"));
                        break 'run;
                    }
                    outstanding.insert(next_seq, at);
                    next_seq += 1;
                    inflight += 1;
                    seen.sent += 1;
                    fed = true;
                }
                if fed {
                    if let Err(e) = ws.flush().await {
                        seen.ended = Some(format!("send: {e}"));
                        break 'run;
                    }
                }
            } else {
                if inflight == 0 {
                    break;
                }
                drain_until.get_or_insert_with(|| tokio::time::Instant::now() + self.reply_timeout);
            }
            // No reply for reply_timeout (broadcasts do not count), or the drain is over.
            let mut deadline = last_progress + self.reply_timeout;
            if let Some(d) = drain_until {
                deadline = deadline.min(d);
            }
            let first = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => {
                    seen.ended = Some(format!(
                        "no reply within {:?} ({inflight} outstanding)",
                        self.reply_timeout
                    ));
                    break;
                }
                Ok(None) => {
                    seen.ended = Some("closed by the server".into());
                    break;
                }
                Ok(Some(Err(e))) => {
                    seen.ended = Some(format!("read: {e}"));
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            let mut next = Some(first);
            while let Some(m) = next.take() {
                if matches!(m, Message::Close(_)) {
                    seen.ended = Some("closed by the server".into());
                    break 'run;
                }
                if self.handle(&m, phase, &mut outstanding, &mut seen, &mut last_reserved) {
                    inflight -= 1;
                    last_progress = tokio::time::Instant::now();
                }
                // Whatever else is already buffered, without waiting.
                match ws.next().now_or_never() {
                    Some(Some(Ok(m))) => next = Some(m),
                    Some(Some(Err(e))) => {
                        seen.ended = Some(format!("read: {e}"));
                        break 'run;
                    }
                    Some(None) => {
                        seen.ended = Some("closed by the server".into());
                        break 'run;
                    }
                    None => {}
                }
            }
        }
        seen.lost = inflight as u64;
        if seen.ended.is_none() {
            if let Some((seq, id)) = last_reserved {
                seen.retry = Some(self.retry(ws, seq, &id).await);
            }
        }
        seen
    }

    /// Accounts for one message; true when it answered an outstanding request.
    fn handle(
        &self,
        m: &Message,
        phase: &AtomicU8,
        outstanding: &mut HashMap<u64, Instant>,
        seen: &mut Seen,
        last_reserved: &mut Option<(u64, String)>,
    ) -> bool {
        let Some(bytes) = payload(m) else {
            return false;
        };
        let now = Instant::now();
        let Some(l) = decode(self.enc, bytes) else {
            seen.undecodable += 1;
            return false;
        };
        let Some(req) = l.req else {
            *seen.broadcasts.entry(l.kind.to_string()).or_default() += 1;
            return false;
        };
        let Some(seq) = req.parse::<u64>().ok() else {
            seen.unexpected += 1;
            return false;
        };
        let Some(sent) = outstanding.remove(&seq) else {
            seen.unexpected += 1;
            return false;
        };
        seen.replies += 1;
        let steady = phase.load(Ordering::Acquire) == STEADY;
        if steady {
            seen.steady_replies += 1;
            let us = now.saturating_duration_since(sent).as_micros();
            seen.steady_latency_us
                .push(u32::try_from(us).unwrap_or(u32::MAX));
        }
        match (l.kind, l.code) {
            ("reserved", _) => {
                let id = l.reservation.unwrap_or("");
                let ok = !id.is_empty()
                    && l.qty == Some(self.qty)
                    && l.room == Some(&*self.room)
                    && l.sku == Some(&*self.sku)
                    && l.price_cents == Some(self.price);
                if !ok {
                    seen.bad_fields += 1;
                    if seen.bad_example.is_none() {
                        seen.bad_example = Some(String::from_utf8_lossy(bytes).into_owned());
                    }
                }
                if steady {
                    seen.steady_reserved += 1;
                }
                *last_reserved = Some((seq, id.to_string()));
                seen.reserved_ids.push(id.to_string());
            }
            ("error", Some("sold_out")) => seen.sold_out += 1,
            ("error", code) => {
                *seen
                    .errors
                    .entry(code.unwrap_or("?").to_string())
                    .or_default() += 1
            }
            (other, _) => {
                *seen
                    .errors
                    .entry(format!("unexpected reply {other}"))
                    .or_default() += 1
            }
        }
        true
    }

    /// The same `req` again must return the same reservation.
    async fn retry(&self, ws: &mut Ws, seq: u64, id: &str) -> std::result::Result<(), String> {
        let req = seq.to_string();
        let frame = self.frame(&req).map_err(|e| format!("{e:#}"))?;
        ws.send(frame).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + self.reply_timeout;
        loop {
            let m = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => return Err(format!("no reply to the retry of {req}")),
                Ok(None) | Ok(Some(Err(_))) => return Err("closed before the retry's reply".into()),
                Ok(Some(Ok(m))) => m,
            };
            let Some(l) = payload(&m).and_then(|b| decode(self.enc, b)) else {
                continue;
            };
            if l.req == Some(req.as_str()) {
                return if l.kind == "reserved" && l.reservation == Some(id) {
                    Ok(())
                } else {
                    Err(format!(
                        "retry of req {req} got {} {:?} {:?} instead of reservation {id}",
                        l.kind, l.code, l.reservation
                    ))
                };
            }
        }
    }
}

/// Units the anchor has restocked (acknowledged) and the restocks that failed.
#[derive(Default)]
struct Restocked {
    units: u64,
    failed: u64,
    first_failure: Option<String>,
}

/// Restocks `rate` units a second in `RESTOCK_TICKS_PER_SEC` steps until the phase is STOP;
/// after a stall it catches up (the total follows the clock), so both designs are offered
/// the same units over the same time.
async fn restock_pump(
    anchor: Arc<crate::client::Client>,
    room: String,
    sku: String,
    rate: u64,
    phase: Arc<AtomicU8>,
) -> Restocked {
    let mut out = Restocked::default();
    let start = Instant::now();
    let mut offered = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RESTOCK_TICKS_PER_SEC));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while phase.load(Ordering::Acquire) < STOP {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let delta = due.saturating_sub(offered).min(1_000_000_000);
        if delta == 0 {
            continue;
        }
        offered += delta;
        match anchor
            .request(json!({"type": "restock", "room": room, "sku": sku, "delta": delta}))
            .await
        {
            Ok(r) if r.kind() == "ack" => out.units += delta,
            Ok(r) => {
                out.failed += 1;
                out.first_failure.get_or_insert_with(|| r.msg.to_string());
            }
            Err(e) => {
                out.failed += 1;
                out.first_failure.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    out
}

async fn run(ctx: &Ctx, a: &Args, p: &Plan, label: &str, report: &mut Report) -> Result<Outcome> {
    let tag = label.replace(' ', "-");
    let room = format!("sus-{}-{tag}", ctx.run_id);
    let sku = format!("{room}-sku");
    let price = super::rush::PRICE;
    let anchor = super::rush::open_rush(ctx, &room, &sku, p.stock).await?;

    let enc = ctx.dialer.encoding;
    let run_id = ctx.run_id.clone();
    let join_room = (!a.no_join).then(|| room.clone());
    let viewers = ctx
        .ramp(p.n, &format!("{label} viewers"), |i| {
            let dialer = ctx.dialer.clone();
            let token = ctx.minter.viewer(&format!("u-{run_id}-{tag}-{i}"));
            let join_room = join_room.clone();
            async move {
                let (mut ws, _hello) = dialer.handshake(i, &token?, ws_config()).await?;
                if let Some(room) = join_room {
                    join(&mut ws, enc, &room).await?;
                }
                Ok(ws)
            }
        })
        .await;
    let connect_errors = viewers.errors;
    let conn = Arc::new(Conn {
        enc,
        room: Arc::from(room.as_str()),
        sku: Arc::from(sku.as_str()),
        qty: a.qty,
        price,
        inflight: p.inflight,
        reply_timeout: ctx.dialer.reply_timeout,
    });
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(viewers.ok.len());
    for mut ws in viewers.ok {
        let conn = conn.clone();
        let phase = phase.clone();
        let go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let seen = conn.drive(&mut ws, &phase, go).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
            seen
        }));
    }
    let mut redis_conn = verify::connect(&ctx.redis_url).await.ok();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = go_tx.send(true);
    let pump = p.restock_per_sec.map(|rate| {
        tokio::spawn(restock_pump(
            anchor.clone(),
            room.clone(),
            sku.clone(),
            rate,
            phase.clone(),
        ))
    });
    tokio::time::sleep(p.warmup).await;
    let c0 = counters(ctx, &mut redis_conn).await;
    let t0 = Instant::now();
    phase.store(STEADY, Ordering::Release);
    tokio::time::sleep(p.steady).await;
    phase.store(STOP, Ordering::Release);
    let t1 = Instant::now();
    let c1 = counters(ctx, &mut redis_conn).await;
    // Rates over the phase changes; CPU shares over the counters' own instants.
    let window = t1.saturating_duration_since(t0).as_secs_f64().max(1e-6);
    let cpu_window = c1
        .at
        .saturating_duration_since(c0.at)
        .as_secs_f64()
        .max(1e-6);

    let restocked = match pump {
        Some(h) => Some(h.await.context("restock task")?),
        None => None,
    };
    let pb = ctx.progress(tasks.len() as u64, "drain");
    let mut all = Seen::default();
    let mut lat = histogram();
    let mut retries_ok = 0u64;
    let mut retry_failures = Vec::new();
    let mut ended = Vec::new();
    for t in tasks {
        let s = t.await.context("connection task")?;
        pb.inc(1);
        all.sent += s.sent;
        all.replies += s.replies;
        all.sold_out += s.sold_out;
        all.steady_replies += s.steady_replies;
        all.steady_reserved += s.steady_reserved;
        all.bad_fields += s.bad_fields;
        all.unexpected += s.unexpected;
        all.undecodable += s.undecodable;
        all.lost += s.lost;
        if all.bad_example.is_none() {
            all.bad_example = s.bad_example;
        }
        for (k, v) in s.errors {
            *all.errors.entry(k).or_default() += v;
        }
        for (k, v) in s.broadcasts {
            *all.broadcasts.entry(k).or_default() += v;
        }
        for us in s.steady_latency_us {
            let _ = lat.record(u64::from(us).clamp(1, 600_000_000));
        }
        all.reserved_ids.extend(s.reserved_ids);
        match s.retry {
            Some(Ok(())) => retries_ok += 1,
            Some(Err(e)) => retry_failures.push(e),
            None => {}
        }
        if let Some(e) = s.ended {
            ended.push(e);
        }
    }
    pb.finish_and_clear();

    let reserved = all.reserved_ids.len() as u64;
    let n_err: u64 = all.errors.values().sum();
    let reserved_per_sec = all.steady_reserved as f64 / window;
    let replies_per_sec = all.steady_replies as f64 / window;
    let l = |s: &str| format!("{label} {s}");
    report.row(&l("viewers connected"), p.n - connect_errors);
    report.row(&l("connect errors"), connect_errors);
    report.row(&l("window s"), window);
    report.row(&l("reserved/s"), reserved_per_sec);
    report.row(&l("replies/s"), replies_per_sec);
    report.row(&l("sold_out in all"), all.sold_out);
    report.row(&l("other errors"), serde_json::to_value(&all.errors)?);
    report.row(&l("requests sent"), all.sent);
    report.row(&l("reserved in all"), reserved);
    report.row(&l("lost replies"), all.lost);
    report.row(
        &l("broadcasts received"),
        serde_json::to_value(&all.broadcasts)?,
    );
    report.latency(&l("add_to_cart round trip"), &lat);
    let share = |f: fn(&Counters) -> Option<f64>| match (f(&c0), f(&c1)) {
        (Some(x), Some(y)) => Some(((y - x) / cpu_window).max(0.0)),
        _ => None,
    };
    let harness = share(|c| c.harness);
    let gateway = share(|c| c.gateway);
    let redis_cpu = share(|c| c.redis.map(|r| r.0));
    let per_reply = |cores: Option<f64>| {
        cores
            .filter(|_| replies_per_sec > 0.0)
            .map(|c| c * 1e6 / replies_per_sec)
    };
    let opt = |x: Option<f64>| x.map(Value::from).unwrap_or(Value::Null);
    report.row(&l("cpu harness (cores)"), opt(harness));
    report.row(&l("cpu gateway (cores)"), opt(gateway));
    report.row(&l("cpu redis (cores)"), opt(redis_cpu));
    report.row(&l("cpu harness us/reply"), opt(per_reply(harness)));
    report.row(&l("cpu gateway us/reply"), opt(per_reply(gateway)));
    report.row(&l("cpu redis us/reply"), opt(per_reply(redis_cpu)));
    // Per confirmed reservation: what a Redis shared by many gateways would pay for each.
    let per_reserved = |cores: Option<f64>| {
        cores
            .filter(|_| reserved_per_sec > 0.0)
            .map(|c| c * 1e6 / reserved_per_sec)
    };
    report.row(&l("cpu gateway us/reserved"), opt(per_reserved(gateway)));
    report.row(&l("cpu redis us/reserved"), opt(per_reserved(redis_cpu)));
    if let (Some((_, n0)), Some((_, n1))) = (c0.redis, c1.redis) {
        let cmds = n1.saturating_sub(n0) as f64;
        report.row(
            &l("redis commands/reply"),
            if all.steady_replies > 0 {
                cmds / all.steady_replies as f64
            } else {
                f64::NAN
            },
        );
    }

    // Invariants on the replies.
    if connect_errors > 0 {
        report.fail(format!(
            "{label}: {connect_errors} viewers could not connect/join"
        ));
    }
    if all.lost > 0 || !ended.is_empty() {
        report.fail(format!(
            "{label}: {} add_to_cart got no reply; {} connections ended early (first: {})",
            all.lost,
            ended.len(),
            ended.first().map(String::as_str).unwrap_or("-")
        ));
    }
    if all.sent != all.replies + all.lost {
        report.fail(format!(
            "{label}: {} sent, {} replies, {} lost: replies do not add up",
            all.sent, all.replies, all.lost
        ));
    }
    if all.unexpected > 0 || all.undecodable > 0 {
        report.fail(format!(
            "{label}: {} replies to no outstanding request, {} undecodable messages",
            all.unexpected, all.undecodable
        ));
    }
    if all.bad_fields > 0 {
        report.fail(format!(
            "{label}: {} reserved replies with wrong fields (e.g. {})",
            all.bad_fields,
            all.bad_example.unwrap_or_default()
        ));
    }
    if p.restock_per_sec.is_none() && all.sold_out > 0 && reserved * a.qty < p.stock {
        report.fail(format!(
            "{label}: {} sold_out while {} of {} units were left",
            all.sold_out,
            p.stock - reserved * a.qty,
            p.stock
        ));
    }
    if n_err > 0 {
        let hint = if all.errors.contains_key("rate_limited") {
            " (raise the gateway's LIVEGATE_RATE_PER_SEC / LIVEGATE_RATE_BURST)"
        } else {
            ""
        };
        report.note(format!(
            "{label}: {n_err} error replies other than sold_out{hint}"
        ));
    }
    let distinct: HashSet<&str> = all.reserved_ids.iter().map(String::as_str).collect();
    if distinct.len() as u64 != reserved {
        report.fail(format!("{label}: duplicate reservation ids in replies"));
    }
    drop(distinct);
    report.row(&l("idempotent retries (same reservation)"), retries_ok);
    if let Some(e) = retry_failures.first() {
        report.fail(format!(
            "{label}: {} retries with the same req did not return the same reservation (first: {e})",
            retry_failures.len()
        ));
    }
    let stocked_by_anchor = p.stock + restocked.as_ref().map(|r| r.units).unwrap_or(0);
    if let Some(r) = &restocked {
        report.row(&l("restocked units (acked)"), r.units);
        report.row(
            &l("units left unsold at the end"),
            stocked_by_anchor.saturating_sub(reserved * a.qty),
        );
        if r.failed > 0 {
            report.note(format!(
                "{label}: {} restocks failed (first: {})",
                r.failed,
                r.first_failure.as_deref().unwrap_or("-")
            ));
        }
    }
    if reserved * a.qty > stocked_by_anchor {
        report.fail(format!(
            "{label}: OVERSELL: {} units reserved of {stocked_by_anchor} stocked",
            reserved * a.qty
        ));
    }

    // Against Redis.
    let checked = tokio::time::timeout(
        Duration::from_secs(60),
        verify_redis(
            ctx,
            label,
            &sku,
            stocked_by_anchor,
            &all.reserved_ids,
            report,
        ),
    )
    .await;
    match checked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.note(format!("{label}: Redis verification skipped: {e:#}")),
        Err(_) => report.fail(format!("{label}: Redis verification took over 60 s")),
    }
    anchor.close().await;
    Ok(Outcome {
        reserved_per_sec,
        replies_per_sec,
        p50_us: lat.value_at_quantile(0.5),
        p99_us: lat.value_at_quantile(0.99),
        redis_us_per_reserved: per_reserved(redis_cpu),
    })
}

/// The part of a `P:reservations` record this check reads.
#[derive(Deserialize)]
struct Record {
    sku: String,
    qty: u64,
}

/// Every `reserved` reply is an active reservation in Redis; the units they hold plus `sold`
/// never exceed `stocked`; `stocked` is what the anchor stocked.
async fn verify_redis(
    ctx: &Ctx,
    label: &str,
    sku: &str,
    stocked_by_anchor: u64,
    reserved: &[String],
    report: &mut Report,
) -> Result<()> {
    let mut conn = verify::connect(&ctx.redis_url).await?;
    let key = ctx.redis_key("reservations");
    let mut active: HashSet<String> = HashSet::with_capacity(reserved.len());
    let mut held_units = 0u64;
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .context("HSCAN reservations")?;
        for (id, rec) in page {
            let Ok(r) = serde_json::from_str::<Record>(&rec) else {
                continue;
            };
            // HSCAN may return an entry twice; count it once.
            if r.sku == sku && active.insert(id) {
                held_units += r.qty;
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    report.row(&format!("{label} redis active reservations"), active.len());
    verify::check_stock(
        &mut conn,
        &ctx.redis_key(&format!("product:{sku}")),
        label,
        stocked_by_anchor,
        held_units,
        report,
    )
    .await?;
    let missing: Vec<&String> = reserved.iter().filter(|id| !active.contains(*id)).collect();
    if let Some(first) = missing.first() {
        report.fail(format!(
            "{label}: LOST CONFIRMATION: {} `reserved` replies not in Redis (first: {first})",
            missing.len()
        ));
    }
    let extra = active.len().saturating_sub(reserved.len());
    if extra > 0 {
        report.note(format!(
            "{label}: {extra} active reservations in Redis without a reply seen by the harness"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn lite_decodes_both_encodings() {
        let v = json!({"type": "reserved", "req": "7", "reservation": "r1-9", "room": "r",
                       "sku": "s", "qty": 1, "price_cents": 1999, "expires_at": 5,
                       "extra": {"nested": [1, 2]}});
        let j = serde_json::to_vec(&v).unwrap();
        let l = decode(Encoding::Json, &j).unwrap();
        assert_eq!((l.kind, l.req, l.qty), ("reserved", Some("7"), Some(1)));
        let m = rmp_serde::to_vec_named(&v).unwrap();
        let l = decode(Encoding::Msgpack, &m).unwrap();
        assert_eq!(
            (l.kind, l.reservation, l.price_cents),
            ("reserved", Some("r1-9"), Some(1999))
        );
        let b = serde_json::to_vec(&json!({"type": "stock", "room": "r", "seq": 3,
                                           "items": [{"sku": "s", "available": 0}]}))
        .unwrap();
        let l = decode(Encoding::Json, &b).unwrap();
        assert_eq!((l.kind, l.req), ("stock", None));
    }
}
