//! `idle`: N connections that do nothing but answer the server's pings (optionally after
//! joining one room, like a viewer watching). The server's RSS (VmRSS of `--server-pid` or the
//! spawned gateway) before and after the ramp gives the memory per idle connection. The
//! connections are held for `--duration` (by default long enough for several heartbeats);
//! any that the server closes in that time is a failure, since they answered every ping.

use crate::client::{Event, Handler};
use crate::ctx::{duration, Common, Ctx};
use crate::net::rss_bytes;
use crate::report::Report;
use anyhow::{Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Idle connections [default: 5000; smoke: 300].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Also join one room per connection (a watching viewer rather than a bare socket).
    #[arg(long)]
    pub join: bool,
}

/// Idle connections, after the default.
pub fn connections(a: &Args, smoke: bool) -> usize {
    a.connections.unwrap_or(if smoke { 300 } else { 5000 })
}

pub async fn run(ctx: &Ctx, common: &Common, a: &Args, report: &mut Report) -> Result<()> {
    let n = connections(a, ctx.smoke);
    let pid = ctx
        .server_pid
        .context("idle needs the server pid: --server-pid PID or --spawn")?;
    let room = format!("idle-{}", ctx.run_id);
    if a.join {
        let anchor = ctx.anchor(std::slice::from_ref(&room)).await?;
        anchor
            .expect(
                json!({"type": "open_room", "room": room, "title": "idle"}),
                "ack",
            )
            .await?;
        anchor.close().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_bytes(pid).context("cannot read the server's VmRSS")?;
    let closes: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let run_id = ctx.run_id.clone();
    let start = Instant::now();
    let join = a.join.then_some(room.as_str());
    let conns = ctx
        .ramp(n, "idle connections", |i| {
            let closes = closes.clone();
            let handler: Handler = Arc::new(move |e| {
                if let Event::Closed(code) = e {
                    let key = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
                    *closes.lock().unwrap().entry(key).or_default() += 1;
                }
            });
            ctx.viewer(i, &format!("idle-{run_id}-{i}"), join, handler)
        })
        .await;
    let ramp_time = start.elapsed();
    let errors = conns.errors;
    let clients: Vec<_> = conns.ok.into_iter().map(|(c, _)| c).collect();
    let heartbeat_ms = clients
        .first()
        .and_then(|c| c.hello["heartbeat_ms"].as_u64())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_bytes(pid).unwrap_or(rss0);
    // Hold: by default 3.5 heartbeats (so a client that did not answer pings would be
    // closed), bounded to 30..120 s; smoke: 3.2 heartbeats within 10..48 s; --duration overrides.
    let hold = if common.duration.is_some() {
        duration(common, 10, 30)?
    } else {
        let (lo, hi, tenths) = if ctx.smoke {
            (10, 48, 32)
        } else {
            (30, 120, 35)
        };
        Duration::from_millis(heartbeat_ms * tenths / 10)
            .clamp(Duration::from_secs(lo), Duration::from_secs(hi))
    };
    let pb = ctx.progress(hold.as_secs(), "holding");
    let mut samples = Vec::new();
    let hold_start = Instant::now();
    while hold_start.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let alive = clients.iter().filter(|c| !c.is_closed()).count();
        samples.push(json!({"t_s": hold_start.elapsed().as_secs_f64(), "rss": rss_bytes(pid), "alive": alive}));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let rss2 = rss_bytes(pid).unwrap_or(rss1);
    let alive = clients.iter().filter(|c| !c.is_closed()).count();
    let dropped = clients.len() - alive;
    let close_codes = closes.lock().unwrap().clone();
    for c in &clients {
        c.close().await;
    }
    drop(clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss3 = rss_bytes(pid).unwrap_or(rss2);

    let connected = n - errors;
    let per_conn = (rss1 as f64 - rss0 as f64) / connected.max(1) as f64;
    report.data(
        "params",
        json!({"connections": n, "join": a.join, "hold_s": hold.as_secs_f64()}),
    );
    report.row("connections", connected);
    report.row("connect errors", errors);
    report.row("ramp seconds", ramp_time.as_secs_f64());
    report.row("heartbeat_ms (hello)", heartbeat_ms);
    report.row("hold seconds", hold.as_secs_f64());
    report.row("server RSS before (MiB)", rss0 as f64 / 1048576.0);
    report.row("server RSS with conns (MiB)", rss1 as f64 / 1048576.0);
    report.row("server RSS end of hold (MiB)", rss2 as f64 / 1048576.0);
    report.row("server RSS after close (MiB)", rss3 as f64 / 1048576.0);
    report.row("bytes per idle connection", per_conn.round());
    report.row("closed by server during hold", dropped);
    report.row("close codes", serde_json::to_value(&close_codes)?);
    report.data("rss_samples", json!(samples));
    if errors > 0 {
        report.fail(format!("{errors} connections failed"));
    }
    if dropped > 0 {
        report.fail(format!("{dropped} idle connections were closed although they answered pings (codes {close_codes:?})"));
    }
    Ok(())
}
