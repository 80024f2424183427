//! `fanout`: N viewers spread over R rooms; an anchor opens each room, puts K
//! products on the shelf, then alternates `pin` (cycling through the SKUs) and `unpin` at
//! `--rate` events per second per room. The harness stores the send instant of event k of
//! each room; a viewer's k-th `pinned`/`unpinned` broadcast must be event k (type and SKU are
//! checked), and its latency is receive − send on the same monotonic clock. Every event must
//! reach every viewer: a missing delivery, an out-of-order event or a `seq` gap is a failure.
//! `--baseline nats` repeats the same delivery pattern through nats-server over WebSocket
//! (same viewers, same rate, payloads shaped like the `pinned` broadcast) and prints the
//! livegate / NATS ratios.

use crate::client::{Event, Handler};
use crate::ctx::{duration, Common, Ctx};
use crate::nats::{NatsServer, NatsWs};
use crate::report::{histogram, record, Report};
use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Viewer connections [default: 1000; smoke: 60].
    #[arg(long)]
    pub viewers: Option<usize>,
    /// Rooms [default: 4; smoke: 2].
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Pin/unpin events per second per room (the anchor uses ceil(rate/15) connections per
    /// room round-robin, to stay under the per-connection command limit of 20/s).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Products per room the pins cycle through.
    #[arg(long, default_value_t = 8)]
    pub products: usize,
    /// Run the same pattern through a baseline too.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// nats-server binary for --baseline nats.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    pub nats_server: PathBuf,
    /// Run only the baseline (no gateway needed; for checking the baseline itself).
    #[arg(long, requires = "baseline")]
    pub baseline_only: bool,
    /// Seconds to wait for late deliveries after the last event.
    #[arg(long, default_value_t = 3)]
    pub drain: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Baseline {
    Nats,
}

/// The schedule of one room: event k is a pin of SKU k/2 % K when k is even, an unpin when odd.
struct RoomPlan {
    id: String,
    skus: Vec<String>,
    sends: Box<[OnceLock<Instant>]>,
    sent: AtomicUsize,
}

impl RoomPlan {
    fn expected(&self, k: usize) -> Option<&str> {
        (k % 2 == 0).then(|| self.skus[(k / 2) % self.skus.len()].as_str())
    }

    /// The broadcast-shaped payload of event k (used for the NATS baseline).
    fn payload(&self, k: usize, seq: u64) -> Vec<u8> {
        let v = match self.expected(k) {
            Some(sku) => json!({"type": "pinned", "room": self.id, "seq": seq, "sku": sku}),
            None => json!({"type": "unpinned", "room": self.id, "seq": seq}),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// Delivery accounting shared by the livegate and the NATS viewers.
struct Tally {
    hists: Vec<Mutex<Histogram<u64>>>,
    mismatches: AtomicU64,
    seq_gaps: AtomicU64,
    undecodable: AtomicU64,
    disconnects: AtomicU64,
    /// Latest receive instant of a pin event, in µs since `base`.
    last_rx_us: AtomicU64,
    base: Instant,
    /// Set when the harness closes its own connections, so those closes are not counted.
    closing: AtomicBool,
    first_problem: Mutex<Option<String>>,
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            hists: (0..16).map(|_| Mutex::new(histogram())).collect(),
            mismatches: AtomicU64::new(0),
            seq_gaps: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            last_rx_us: AtomicU64::new(0),
            base: Instant::now(),
            first_problem: Mutex::new(None),
        })
    }

    fn problem(&self, what: String) {
        let mut p = self.first_problem.lock().unwrap();
        if p.is_none() {
            *p = Some(what);
        }
    }

    fn merged(&self) -> Histogram<u64> {
        let mut h = histogram();
        for s in &self.hists {
            let _ = h.add(&*s.lock().unwrap());
        }
        h
    }
}

struct Viewer {
    idx: usize,
    room: usize,
    received: AtomicUsize,
    last_seq: AtomicU64,
    closed: AtomicBool,
}

/// Accounts one pin/unpin message received by viewer `v`.
fn on_pin_event(t: &Tally, plan: &RoomPlan, v: &Viewer, msg: &Value, now: Instant) {
    let kind = msg["type"].as_str().unwrap_or("");
    let k = v.received.fetch_add(1, Ordering::Relaxed);
    let ok = match (plan.expected(k), kind) {
        (Some(sku), "pinned") => msg["sku"] == sku,
        (None, "unpinned") => true,
        _ => false,
    };
    if !ok {
        t.mismatches.fetch_add(1, Ordering::Relaxed);
        t.problem(format!(
            "viewer {} room {}: event #{k} expected {:?}, got {msg}",
            v.idx,
            plan.id,
            plan.expected(k).unwrap_or("unpinned")
        ));
        return;
    }
    match plan.sends.get(k).and_then(OnceLock::get) {
        Some(sent) => {
            let us = now.saturating_duration_since(t.base).as_micros() as u64;
            t.last_rx_us.fetch_max(us, Ordering::Relaxed);
            let mut h = t.hists[v.idx % t.hists.len()].lock().unwrap();
            record(&mut h, now.saturating_duration_since(*sent));
        }
        None => {
            t.mismatches.fetch_add(1, Ordering::Relaxed);
            t.problem(format!(
                "viewer {} got event #{k} that was never sent: {msg}",
                v.idx
            ));
        }
    }
}

struct Phase {
    label: &'static str,
    hist: Histogram<u64>,
    delivered: u64,
    expected: u64,
    missing: u64,
    mismatches: u64,
    anchor_errors: u64,
    seq_gaps: u64,
    disconnects: u64,
    undecodable: u64,
    elapsed: Duration,
    connect_errors: usize,
    first_problem: Option<String>,
}

impl Phase {
    /// The figures of a phase whose events started at `start`: deliveries counted against the
    /// events each viewer's room sent, throughput over first event sent → last delivery.
    fn tally(
        label: &'static str,
        t: &Tally,
        plans: &[Arc<RoomPlan>],
        states: &[Arc<Viewer>],
        start: Instant,
        connect_errors: usize,
        first_err: Option<String>,
    ) -> Self {
        let last_rx = t.base + Duration::from_micros(t.last_rx_us.load(Ordering::Relaxed));
        let elapsed = last_rx
            .saturating_duration_since(start)
            .max(Duration::from_millis(1));
        let (mut expected, mut delivered, mut missing) = (0u64, 0u64, 0u64);
        for v in states {
            let sent = plans[v.room].sent.load(Ordering::Acquire) as u64;
            let got = v.received.load(Ordering::Relaxed) as u64;
            expected += sent;
            delivered += got.min(sent);
            missing += sent.saturating_sub(got);
        }
        Phase {
            label,
            hist: t.merged(),
            delivered,
            expected,
            missing,
            mismatches: t.mismatches.load(Ordering::Relaxed),
            anchor_errors: 0,
            seq_gaps: t.seq_gaps.load(Ordering::Relaxed),
            disconnects: t.disconnects.load(Ordering::Relaxed),
            undecodable: t.undecodable.load(Ordering::Relaxed),
            elapsed,
            connect_errors,
            first_problem: t.first_problem.lock().unwrap().clone().or(first_err),
        }
    }

    fn per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn report(&self, r: &mut Report) {
        let l = self.label;
        r.row(&format!("{l} connect errors"), self.connect_errors);
        r.row(&format!("{l} deliveries expected"), self.expected);
        r.row(&format!("{l} deliveries"), self.delivered);
        r.row(&format!("{l} deliveries/s"), self.per_sec());
        r.row(&format!("{l} missing"), self.missing);
        r.row(&format!("{l} out of order/mismatched"), self.mismatches);
        if l == "livegate" {
            r.row(&format!("{l} anchor commands rejected"), self.anchor_errors);
            r.row(&format!("{l} seq gaps"), self.seq_gaps);
        }
        r.row(&format!("{l} disconnects"), self.disconnects);
        r.row(&format!("{l} undecodable messages"), self.undecodable);
        r.latency(&format!("{l} delivery"), &self.hist);
        if self.connect_errors > 0 {
            r.fail(format!(
                "{l}: {} viewers could not connect/join",
                self.connect_errors
            ));
        }
        if self.missing > 0 {
            r.fail(format!("{l}: {} deliveries missing", self.missing));
        }
        if self.mismatches > 0 {
            r.fail(format!(
                "{l}: {} events out of order or wrong",
                self.mismatches
            ));
        }
        if self.anchor_errors > 0 {
            r.fail(format!(
                "{l}: {} anchor pin/unpin commands rejected (later events then misalign)",
                self.anchor_errors
            ));
        }
        if self.seq_gaps > 0 {
            r.fail(format!("{l}: {} seq gaps", self.seq_gaps));
        }
        if let Some(p) = &self.first_problem {
            r.note(format!("{l} first problem: {p}"));
        }
    }
}

fn plans(ctx: &Ctx, rooms: usize, products: usize, events: usize) -> Vec<Arc<RoomPlan>> {
    (0..rooms)
        .map(|r| {
            let id = format!("fan-{}-{r}", ctx.run_id);
            Arc::new(RoomPlan {
                skus: (0..products.max(2)).map(|p| format!("{id}-p{p}")).collect(),
                id,
                sends: (0..events).map(|_| OnceLock::new()).collect(),
                sent: AtomicUsize::new(0),
            })
        })
        .collect()
}

/// Viewers and rooms, after the defaults.
pub fn sizes(a: &Args, smoke: bool) -> (usize, usize) {
    let viewers = a.viewers.unwrap_or(if smoke { 60 } else { 1000 });
    let rooms = a.rooms.unwrap_or(if smoke { 2 } else { 4 }).max(1);
    (viewers, rooms)
}

/// Anchor connections per room: ceil(rate / 15), to stay under the per-connection command
/// limit (20/s). `--rate` above 1000 is refused later; here it counts as 1000.
fn anchors_per_room(rate: f64) -> usize {
    (rate.min(1000.0) / 15.0).ceil().max(1.0) as usize
}

/// Connections the livegate phase opens: the viewers and every room's anchors.
pub fn connections(a: &Args, smoke: bool) -> usize {
    let (viewers, rooms) = sizes(a, smoke);
    viewers + rooms * anchors_per_room(a.rate)
}

/// Viewer i watches room i mod `rooms`.
fn viewer_states(viewers: usize, rooms: usize) -> Vec<Arc<Viewer>> {
    (0..viewers)
        .map(|i| {
            Arc::new(Viewer {
                idx: i,
                room: i % rooms,
                received: AtomicUsize::new(0),
                last_seq: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            })
        })
        .collect()
}

/// Plays events 0..events of every room at `rate` per second, one task per room. For event k
/// of room r, `emit(plan, r, k)` prepares the send and returns it as a future; the send
/// instant of event k is taken just before that future runs, and its `false` ends the room.
/// Returns the instant the first event was due.
async fn play<E, Fut>(
    ctx: &Ctx,
    plans: &[Arc<RoomPlan>],
    events: usize,
    rate: f64,
    label: &str,
    emit: E,
) -> Instant
where
    E: Fn(Arc<RoomPlan>, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let pb = ctx.progress((events * plans.len()) as u64, label);
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::new();
    for (r, plan) in plans.iter().cloned().enumerate() {
        let (pb, emit) = (pb.clone(), emit.clone());
        tasks.push(tokio::spawn(async move {
            // After a stall (a slow `ack`, a busy machine) the next event waits a full period
            // rather than bursting to catch up: a burst could push an anchor connection past
            // the per-connection command limit and fail the run on timing alone.
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for k in 0..events {
                tick.tick().await;
                let send = emit(plan.clone(), r, k);
                let _ = plan.sends[k].set(Instant::now());
                plan.sent.store(k + 1, Ordering::Release);
                if !send.await {
                    break;
                }
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    pb.finish_and_clear();
    start
}

pub async fn run(ctx: &Ctx, common: &Common, a: &Args, report: &mut Report) -> Result<()> {
    let (viewers, rooms) = sizes(a, ctx.smoke);
    let dur = duration(common, 8, 30)?;
    if a.rate <= 0.0 || a.rate > 1000.0 {
        bail!("--rate must be in (0, 1000]");
    }
    let events = ((a.rate * dur.as_secs_f64()).ceil() as usize).max(2);
    report.data(
        "params",
        json!({"viewers": viewers, "rooms": rooms, "rate_per_room": a.rate, "duration_s": dur.as_secs_f64(),
               "events_per_room": events, "encoding": common.encoding, "products": a.products}),
    );
    report.row("offered deliveries/s", viewers as f64 * a.rate);
    if a.baseline_only {
        let nats = nats_phase(ctx, a, viewers, rooms, events).await?;
        nats.report(report);
        return Ok(());
    }
    let lg = livegate_phase(ctx, a, viewers, rooms, events).await?;
    lg.report(report);
    if let Some(Baseline::Nats) = a.baseline {
        let nats = nats_phase(ctx, a, viewers, rooms, events).await?;
        nats.report(report);
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
        if !lg.hist.is_empty() && !nats.hist.is_empty() {
            report.row(
                "ratio livegate/nats p50",
                ratio(
                    lg.hist.value_at_quantile(0.5) as f64,
                    nats.hist.value_at_quantile(0.5) as f64,
                ),
            );
            report.row(
                "ratio livegate/nats p99",
                ratio(
                    lg.hist.value_at_quantile(0.99) as f64,
                    nats.hist.value_at_quantile(0.99) as f64,
                ),
            );
        }
        report.row(
            "ratio livegate/nats deliveries/s",
            ratio(lg.per_sec(), nats.per_sec()),
        );
    }
    Ok(())
}

async fn livegate_phase(
    ctx: &Ctx,
    a: &Args,
    viewers: usize,
    rooms: usize,
    events: usize,
) -> Result<Phase> {
    let plans = plans(ctx, rooms, a.products, events);
    let room_ids: Vec<String> = plans.iter().map(|p| p.id.clone()).collect();
    let anchor_token = ctx
        .minter
        .anchor(&format!("anchor-{}", ctx.run_id), &room_ids)?;
    // The per-connection command limit (20/s sustained) applies to anchors too: each room gets
    // ceil(rate / 15) anchor connections used round-robin. The next event is sent only after
    // the previous one's `ack`, so the order is kept across connections.
    let per_room = anchors_per_room(a.rate);
    let mut anchors: Vec<Vec<Arc<crate::client::Client>>> = Vec::new();
    for (r, plan) in plans.iter().enumerate() {
        let mut conns = Vec::new();
        for j in 0..per_room {
            conns.push(
                ctx.dialer
                    .connect(r + j, &anchor_token, crate::client::ignore())
                    .await?,
            );
        }
        let c = conns[0].clone();
        c.expect(
            json!({"type": "open_room", "room": plan.id, "title": format!("fanout {r}")}),
            "ack",
        )
        .await?;
        for (p, sku) in plan.skus.iter().enumerate() {
            c.expect(
                json!({"type": "upsert_product", "room": plan.id, "sku": sku, "title": format!("product {p}"),
                       "price_cents": 1000 + p as i64, "stock": 1000}),
                "ack",
            )
            .await?;
        }
        anchors.push(conns);
    }
    let tally = Tally::new();
    let states = viewer_states(viewers, rooms);
    let run_id = ctx.run_id.clone();
    let joined = ctx
        .ramp(viewers, "livegate viewers", |i| {
            let v = states[i].clone();
            let plan = plans[v.room].clone();
            let t = tally.clone();
            let hv = v.clone();
            let handler: Handler = Arc::new(move |e| match e {
                Event::Msg(msg, now) => {
                    if let Some(seq) = msg.get("seq").and_then(Value::as_u64) {
                        let last = hv.last_seq.swap(seq, Ordering::Relaxed);
                        if last != 0 && seq != last + 1 {
                            t.seq_gaps.fetch_add(1, Ordering::Relaxed);
                            t.problem(format!("viewer {}: seq {last} then {seq}: {msg}", hv.idx));
                        }
                    }
                    match msg["type"].as_str() {
                        Some("pinned" | "unpinned") => on_pin_event(&t, &plan, &hv, msg, now),
                        Some("_undecodable") => {
                            t.undecodable.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                Event::Closed(code) => {
                    if !hv.closed.swap(true, Ordering::Relaxed)
                        && !t.closing.load(Ordering::Relaxed)
                    {
                        t.disconnects.fetch_add(1, Ordering::Relaxed);
                        t.problem(format!(
                            "viewer {} disconnected (close code {code:?})",
                            hv.idx
                        ));
                    }
                }
            });
            let room_id = plans[v.room].id.clone();
            let viewer = ctx.viewer(i, &format!("v-{run_id}-{i}"), Some(&room_id), handler);
            async move {
                let (c, joined) = viewer.await?;
                if let Some(seq) = joined.and_then(|r| r.msg["seq"].as_u64()) {
                    v.last_seq.fetch_max(seq, Ordering::Relaxed);
                }
                Ok(c)
            }
        })
        .await;
    let (clients, connect_errors, first_err) = (joined.ok, joined.errors, joined.first_error);
    // Pin/unpin phase: one task per room.
    let anchor_errors = Arc::new(AtomicU64::new(0));
    let anchors = Arc::new(anchors);
    let (errs, conns) = (anchor_errors.clone(), anchors.clone());
    let start = play(ctx, &plans, events, a.rate, "pins", move |plan, r, k| {
        let msg = match plan.expected(k) {
            Some(sku) => json!({"type": "pin", "room": plan.id, "sku": sku}),
            None => json!({"type": "unpin", "room": plan.id}),
        };
        let anchor = conns[r][k % conns[r].len()].clone();
        let errs = errs.clone();
        async move {
            match anchor.request(msg).await {
                Ok(r) if r.kind() == "ack" => true,
                Ok(r) => {
                    errs.fetch_add(1, Ordering::Relaxed);
                    eprintln!("anchor {}: event {k}: {}", plan.id, r.msg);
                    true
                }
                Err(e) => {
                    errs.fetch_add(1, Ordering::Relaxed);
                    eprintln!("anchor {}: event {k}: {e:#}", plan.id);
                    false
                }
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(a.drain)).await;
    let mut phase = Phase::tally(
        "livegate",
        &tally,
        &plans,
        &states,
        start,
        connect_errors,
        first_err,
    );
    phase.anchor_errors = anchor_errors.load(Ordering::Relaxed);
    tally.closing.store(true, Ordering::Relaxed);
    for c in clients.iter().chain(anchors.iter().flatten()) {
        c.close().await;
    }
    Ok(phase)
}

async fn nats_phase(
    ctx: &Ctx,
    a: &Args,
    viewers: usize,
    rooms: usize,
    events: usize,
) -> Result<Phase> {
    let server = NatsServer::start(&a.nats_server).await?;
    let addr = server.ws_addr;
    let plans = plans(ctx, rooms, a.products, events);
    let tally = Tally::new();
    let states = viewer_states(viewers, rooms);
    let sources = ctx.dialer.sources;
    let results = ctx
        .ramp(viewers, "nats viewers", |i| {
            let v = states[i].clone();
            let plan = plans[v.room].clone();
            let t = tally.clone();
            async move {
                let hv = v.clone();
                let subject = format!("room.{}", plan.id);
                let on_msg: crate::nats::OnMsg = Arc::new(move |_subj, payload, now| {
                    match serde_json::from_slice::<Value>(payload) {
                        Ok(msg) => on_pin_event(&t, &plan, &hv, &msg, now),
                        Err(_) => {
                            t.undecodable.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                NatsWs::connect(&sources, i, addr, Some(&subject), on_msg).await
            }
        })
        .await;
    let (clients, connect_errors, first_err) = (results.ok, results.errors, results.first_error);
    let mut publishers = Vec::new();
    for r in 0..rooms {
        publishers.push(NatsWs::connect(&sources, r, addr, None, Arc::new(|_, _, _| {})).await?);
    }
    let publishers = Arc::new(publishers);
    let pubs = publishers.clone();
    let start = play(
        ctx,
        &plans,
        events,
        a.rate,
        "nats pubs",
        move |plan, r, k| {
            let payload = plan.payload(k, k as u64 + 1);
            let publisher = pubs[r].clone();
            let subject = format!("room.{}", plan.id);
            async move { publisher.publish(&subject, &payload).await.is_ok() }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(a.drain)).await;
    let phase = Phase::tally(
        "nats",
        &tally,
        &plans,
        &states,
        start,
        connect_errors,
        first_err,
    );
    drop(clients);
    drop(publishers);
    server.stop().await;
    Ok(phase)
}
