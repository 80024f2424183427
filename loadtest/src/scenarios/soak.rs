//! `soak`: churn over time. Each simulated viewer loops until `--duration` ends: connect, join
//! a room, stay a few seconds sending `comment` and `like` (with `req`, so each gets an `ack`),
//! `leave`, disconnect, pause, and again. Sampled every second: server RSS (VmRSS of the
//! gateway), live connections, sessions, errors, unexpected disconnects. Checked: every
//! request got a reply, every connection's sequenced broadcasts arrived without a `seq` gap.
//! Errors are counted and reported, not failed on (a `rate_limited` here would be a finding).

use crate::client::{Event, Handler};
use crate::ctx::{duration, Common, Ctx};
use crate::net::rss_bytes;
use crate::report::{histogram, record, Report};
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Concurrent simulated viewers [default: 500; smoke: 40].
    #[arg(long)]
    pub viewers: Option<usize>,
    /// Rooms [default: 4; smoke: 2].
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Milliseconds between a viewer's comment/like commands.
    #[arg(long, default_value_t = 1000)]
    pub action_ms: u64,
    /// Seconds a viewer stays in a room per session.
    #[arg(long, default_value_t = 5)]
    pub stay_s: u64,
}

#[derive(Default)]
struct Counters {
    sessions: AtomicU64,
    live: AtomicU64,
    commands: AtomicU64,
    lost: AtomicU64,
    seq_gaps: AtomicU64,
    unexpected_closes: AtomicU64,
    comment_items: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    hist: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    first_problem: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: &str) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(what.to_string())
            .or_default() += 1;
    }
    fn problem(&self, what: String) {
        self.first_problem.lock().unwrap().get_or_insert(what);
    }
}

/// Viewers and rooms, after the defaults.
pub fn sizes(a: &Args, smoke: bool) -> (usize, usize) {
    let n = a.viewers.unwrap_or(if smoke { 40 } else { 500 });
    let rooms = a.rooms.unwrap_or(if smoke { 2 } else { 4 }).max(1);
    (n, rooms)
}

pub async fn run(ctx: &Ctx, common: &Common, a: &Args, report: &mut Report) -> Result<()> {
    let (n, rooms) = sizes(a, ctx.smoke);
    let dur = duration(common, 20, 120)?;
    report.data("params", json!({"viewers": n, "rooms": rooms, "duration_s": dur.as_secs(), "action_ms": a.action_ms, "stay_s": a.stay_s}));
    let room_ids: Vec<String> = (0..rooms)
        .map(|r| format!("soak-{}-{r}", ctx.run_id))
        .collect();
    let anchor = ctx.anchor(&room_ids).await?;
    for r in &room_ids {
        anchor
            .expect(
                json!({"type": "open_room", "room": r, "title": "soak"}),
                "ack",
            )
            .await?;
    }
    let counters = Arc::new(Counters {
        hist: Mutex::new(Some(histogram())),
        ..Default::default()
    });
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = Vec::new();
    let period = Duration::from_secs_f64(1.0 / ctx.ramp_per_sec as f64);
    for i in 0..n {
        let (dialer, minter, counters) = (ctx.dialer.clone(), ctx.minter.clone(), counters.clone());
        let room = room_ids[i % rooms].clone();
        let user = format!("s-{}-{i}", ctx.run_id);
        let (action, stay) = (
            Duration::from_millis(a.action_ms.max(50)),
            Duration::from_secs(a.stay_s.max(1)),
        );
        tasks.push(tokio::spawn(async move {
            let mut session = 0u64;
            while Instant::now() < end {
                session += 1;
                let Ok(token) = minter.viewer(&user) else { return };
                let last_seq = Arc::new(AtomicU64::new(0));
                let closing = Arc::new(AtomicBool::new(false));
                let (c2, ls, cl) = (counters.clone(), last_seq.clone(), closing.clone());
                let handler: Handler = Arc::new(move |e| match e {
                    Event::Msg(m, _) => {
                        if let Some(seq) = m.get("seq").and_then(Value::as_u64) {
                            let last = ls.swap(seq, Ordering::Relaxed);
                            if last != 0 && seq != last + 1 {
                                c2.seq_gaps.fetch_add(1, Ordering::Relaxed);
                                c2.problem(format!("seq {last} then {seq}: {m}"));
                            }
                        }
                        if m["type"] == "comments" {
                            let k = m["items"].as_array().map_or(0, Vec::len) as u64;
                            c2.comment_items.fetch_add(k, Ordering::Relaxed);
                        }
                    }
                    Event::Closed(code) => {
                        if !cl.load(Ordering::Relaxed) {
                            c2.unexpected_closes.fetch_add(1, Ordering::Relaxed);
                            c2.problem(format!("server closed a connection (code {code:?})"));
                        }
                    }
                });
                let c = match dialer.connect(i, &token, handler).await {
                    Ok(c) => c,
                    Err(e) => {
                        counters.error(&format!("connect: {}", e.root_cause()));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                counters.sessions.fetch_add(1, Ordering::Relaxed);
                counters.live.fetch_add(1, Ordering::Relaxed);
                let send = |msg: Value| {
                    let (c, counters) = (c.clone(), counters.clone());
                    async move {
                        counters.commands.fetch_add(1, Ordering::Relaxed);
                        match c.request(msg).await {
                            Ok(r) => {
                                if let Some(code) = r.error_code() {
                                    counters.error(code);
                                }
                                if let Some(h) = counters.hist.lock().unwrap().as_mut() {
                                    record(h, r.latency);
                                }
                                Some(r)
                            }
                            Err(e) => {
                                counters.lost.fetch_add(1, Ordering::Relaxed);
                                counters.problem(format!("no reply: {e:#}"));
                                None
                            }
                        }
                    }
                };
                if let Some(r) = send(json!({"type": "join", "room": room})).await {
                    if let Some(seq) = r.msg["seq"].as_u64() {
                        last_seq.fetch_max(seq, Ordering::Relaxed);
                    }
                }
                let leave_at = Instant::now() + stay;
                let mut k = 0u64;
                let stop_at = leave_at.min(end);
                while Instant::now() < stop_at && !c.is_closed() {
                    let left = stop_at.saturating_duration_since(Instant::now());
                    tokio::time::sleep(action.min(left)).await;
                    if Instant::now() >= stop_at {
                        break;
                    }
                    k += 1;
                    let msg = if k % 2 == 0 {
                        json!({"type": "like", "room": room, "count": 1 + k % 5})
                    } else {
                        json!({"type": "comment", "room": room, "text": format!("{user} says hi #{session}.{k}")})
                    };
                    send(msg).await;
                }
                send(json!({"type": "leave", "room": room})).await;
                closing.store(true, Ordering::Relaxed);
                c.close().await;
                counters.live.fetch_sub(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200 + (i as u64 * 37) % 800)).await;
            }
        }));
        tokio::time::sleep(period).await;
    }
    let pb = ctx.progress(dur.as_secs(), "soak");
    let mut samples = Vec::new();
    let mut peak_rss = 0u64;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = ctx.server_pid.and_then(rss_bytes);
        peak_rss = peak_rss.max(rss.unwrap_or(0));
        samples.push(json!({
            "t_s": start.elapsed().as_secs_f64(), "rss": rss,
            "live": counters.live.load(Ordering::Relaxed),
            "sessions": counters.sessions.load(Ordering::Relaxed),
            "errors": counters.errors.lock().unwrap().values().sum::<u64>(),
            "unexpected_closes": counters.unexpected_closes.load(Ordering::Relaxed),
        }));
        pb.inc(1);
    }
    pb.finish_and_clear();
    // The viewers stop at `end`; one 30 s grace for all of them (not 30 s each), then the
    // stragglers are aborted so nothing outlives the run.
    let grace = tokio::time::Instant::now() + Duration::from_secs(30);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(grace, t).await.is_err() {
            abort.abort();
        }
    }
    anchor.close().await;
    let h = counters
        .hist
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(histogram);
    let errors = counters.errors.lock().unwrap().clone();
    let first_rss = samples.first().and_then(|s| s["rss"].as_u64());
    let last_rss = samples.last().and_then(|s| s["rss"].as_u64());
    report.row("sessions", counters.sessions.load(Ordering::Relaxed));
    report.row("commands", counters.commands.load(Ordering::Relaxed));
    report.row(
        "commands/s",
        counters.commands.load(Ordering::Relaxed) as f64 / dur.as_secs_f64(),
    );
    report.row(
        "comment items received",
        counters.comment_items.load(Ordering::Relaxed),
    );
    report.row("lost replies", counters.lost.load(Ordering::Relaxed));
    report.row("seq gaps", counters.seq_gaps.load(Ordering::Relaxed));
    report.row(
        "unexpected disconnects",
        counters.unexpected_closes.load(Ordering::Relaxed),
    );
    report.row("errors", serde_json::to_value(&errors)?);
    if let (Some(f), Some(l)) = (first_rss, last_rss) {
        report.row("server RSS first sample (MiB)", f as f64 / 1048576.0);
        report.row("server RSS last sample (MiB)", l as f64 / 1048576.0);
        report.row("server RSS peak (MiB)", peak_rss as f64 / 1048576.0);
    }
    report.latency("command ack", &h);
    report.data("samples", json!(samples));
    if counters.lost.load(Ordering::Relaxed) > 0 {
        report.fail(format!(
            "{} requests got no reply",
            counters.lost.load(Ordering::Relaxed)
        ));
    }
    if counters.seq_gaps.load(Ordering::Relaxed) > 0 {
        report.fail(format!(
            "{} seq gaps",
            counters.seq_gaps.load(Ordering::Relaxed)
        ));
    }
    if let Some(p) = counters.first_problem.lock().unwrap().clone() {
        report.note(format!("first problem: {p}"));
    }
    Ok(())
}
