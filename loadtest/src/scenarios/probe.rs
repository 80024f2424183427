//! `probe`: a protocol conformance pass, written from protocol.md only. Each check sends one
//! thing and compares the answer with what the contract says (HTTP 401 with a JSON body for
//! bad tokens, the `hello` fields, `req` echoed on every reply including errors for invalid
//! messages, `bad_request` for an undecodable frame with the connection kept open, roles,
//! limits, rate limiting, close 1009 for an oversized frame, resume with `since`, the HTTP
//! room API). Every deviation is a failure line "check: expected …, got …".

use crate::client::{Client, Event, Handler};
use crate::ctx::{Common, Ctx};
use crate::report::Report;
use anyhow::Result;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

/// A connection whose unsolicited messages are queued for inspection.
struct Probe {
    c: Arc<Client>,
    rx: mpsc::Receiver<Value>,
    close: Arc<Mutex<Option<Option<u16>>>>,
}

async fn open(ctx: &Ctx, token: &str) -> Result<Probe> {
    let (tx, rx) = mpsc::channel(4096);
    let close: Arc<Mutex<Option<Option<u16>>>> = Arc::default();
    let cl = close.clone();
    let handler: Handler = Arc::new(move |e| match e {
        Event::Msg(m, _) => {
            let _ = tx.try_send(m.clone());
        }
        Event::Closed(code) => *cl.lock().unwrap() = Some(code),
    });
    let c = ctx.dialer.connect(0, token, handler).await?;
    Ok(Probe { c, rx, close })
}

impl Probe {
    /// The next unsolicited message of type `kind` within `t` (others are skipped).
    async fn next(&mut self, kind: &str, t: Duration) -> Option<Value> {
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(m)) if m["type"] == kind => return Some(m),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    async fn closed(&self, t: Duration) -> Option<Option<u16>> {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if let Some(c) = *self.close.lock().unwrap() {
                return Some(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

struct Checks<'a> {
    r: &'a mut Report,
    passed: usize,
}

impl Checks<'_> {
    fn check(&mut self, name: &str, ok: bool, expected: &str, got: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
        } else {
            self.r
                .fail(format!("{name}: expected {expected}, got {got}"));
        }
    }

    /// `reply` must be `error` with `code` and the same `req`.
    fn error(
        &mut self,
        name: &str,
        reply: &Result<crate::client::Reply>,
        code: &str,
        req: Option<&str>,
    ) {
        match reply {
            Ok(r) => {
                let ok = r.msg["type"] == "error"
                    && r.msg["code"] == code
                    && req.is_none_or(|q| r.msg["req"] == q);
                self.check(
                    name,
                    ok,
                    &format!("error {{code:{code:?}, req echoed}}"),
                    &r.msg,
                );
            }
            Err(e) => self.check(name, false, &format!("error {code}"), format!("{e:#}")),
        }
    }
}

async fn http_status_body(ctx: &Ctx, query: &str) -> Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(ctx.dialer.target.addr).await?;
    let url = format!(
        "ws://{}{}{query}",
        ctx.dialer.target.host, ctx.dialer.target.path
    );
    match tokio_tungstenite::client_async(url.into_client_request()?, stream).await {
        Ok(_) => Ok((101, String::new())),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Ok((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn run(ctx: &Ctx, _common: &Common, _a: &Args, report: &mut Report) -> Result<()> {
    let mut k = Checks {
        r: report,
        passed: 0,
    };
    let id = &ctx.run_id;
    let room = format!("probe-{id}");
    let other_room = format!("probe-{id}-other");
    let sku = format!("probe-{id}-sku");

    // Credentials.
    for (name, q) in [
        ("no token", String::new()),
        ("malformed token", "?token=not.a.jwt".to_string()),
        (
            "wrongly signed token",
            format!(
                "?token={}",
                crate::tokens::Minter::new("wrong-secret").viewer("x")?
            ),
        ),
        (
            "expired token",
            format!("?token={}", ctx.minter.expired_viewer("x")?),
        ),
    ] {
        let (status, body) = http_status_body(ctx, &q).await?;
        let code = serde_json::from_str::<Value>(&body)
            .ok()
            .map(|v| v["code"].clone());
        k.check(
            &format!("{name} on /ws"),
            status == 401 && code == Some(json!("unauthorized")),
            "HTTP 401 with {\"code\":\"unauthorized\",...}",
            format!("HTTP {status} {body}"),
        );
    }

    // hello.
    let user = format!("pv-{id}");
    let mut v = open(ctx, &ctx.minter.viewer(&user)?).await?;
    let h = v.c.hello.clone();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let ok = h["conn"].is_string()
        && h["user"] == user.as_str()
        && h["role"] == "viewer"
        && h["server_time"]
            .as_i64()
            .is_some_and(|t| (t - now_ms).abs() < 60_000)
        && h["heartbeat_ms"].as_u64().is_some()
        && h["protocol"] == 1;
    k.check("hello", ok, "{type:hello, conn:str, user:<sub>, role:viewer, server_time:~now ms, heartbeat_ms:int, protocol:1}", &h);

    // ping / pong.
    let r = v.c.request(json!({"type": "ping", "req": "p1"})).await;
    let got = r
        .as_ref()
        .map(|r| r.msg.to_string())
        .unwrap_or_else(|e| e.to_string());
    k.check(
        "ping",
        r.as_ref()
            .is_ok_and(|r| r.msg["type"] == "pong" && r.msg["req"] == "p1"),
        "pong {req:p1}",
        got,
    );

    // Invalid messages still get exactly one reply carrying the req.
    let r =
        v.c.request(json!({"type": "no_such_type", "req": "u1"}))
            .await;
    k.error("unknown type", &r, "bad_request", Some("u1"));
    let r =
        v.c.request(json!({"type": "add_to_cart", "req": "m1", "room": room}))
            .await;
    k.error("add_to_cart missing sku/qty", &r, "bad_request", Some("m1"));
    let r =
        v.c.request(json!({"type": "join", "req": "m2", "room": 42}))
            .await;
    k.error("join with mistyped room", &r, "bad_request", Some("m2"));
    let r =
        v.c.request(json!({"type": "join", "req": "m3", "room": "bad room id!"}))
            .await;
    k.error("join with an invalid id", &r, "bad_request", Some("m3"));

    // Undecodable frame: error bad_request, connection stays open.
    v.c.send_raw(Message::text("this is not json {")).await?;
    let e = v.next("error", Duration::from_secs(3)).await;
    k.check(
        "undecodable frame",
        e.as_ref().is_some_and(|e| e["code"] == "bad_request"),
        "error {code:bad_request}",
        json!(e),
    );
    let r = v.c.request(json!({"type": "ping"})).await;
    k.check(
        "connection open after undecodable frame",
        r.is_ok(),
        "pong",
        r.err().map(|e| e.to_string()).unwrap_or_default(),
    );

    // Roles.
    let r =
        v.c.request(json!({"type": "open_room", "room": room, "title": "x"}))
            .await;
    k.error("viewer open_room", &r, "forbidden", None);
    let anchor_tok = ctx
        .minter
        .anchor(&format!("pa-{id}"), std::slice::from_ref(&room))?;
    let a = open(ctx, &anchor_tok).await?;
    let r =
        a.c.request(json!({"type": "open_room", "room": other_room, "title": "x"}))
            .await;
    k.error("anchor open_room outside its rooms", &r, "forbidden", None);
    let r =
        v.c.request(json!({"type": "join", "room": format!("probe-{id}-nope")}))
            .await;
    k.error("join unknown room", &r, "not_found", None);

    // Anchor set-up.
    a.c.expect(
        json!({"type": "open_room", "room": room, "title": "probe"}),
        "ack",
    )
    .await?;
    a.c.expect(
        json!({"type": "upsert_product", "room": room, "sku": sku, "title": "t", "price_cents": 500, "stock": 5, "ttl_s": 600}),
        "ack",
    )
    .await?;
    let r = v.c.request(json!({"type": "join", "room": room})).await;
    let state = r.as_ref().map(|r| r.msg.clone()).unwrap_or(Value::Null);
    let ok = state["type"] == "room_state"
        && state["room"] == room.as_str()
        && state["seq"].is_u64()
        && state["status"] == "live"
        && state["products"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["sku"] == sku.as_str() && p["available"] == 5 && p["price_cents"] == 500)
        });
    k.check(
        "join → room_state",
        ok,
        "room_state {room, seq, status:live, products:[{sku, available:5, price_cents:500,..}],..}",
        &state,
    );
    let seq0 = state["seq"].as_u64().unwrap_or(0);

    // Pin broadcast with the next seq.
    a.c.expect(json!({"type": "pin", "room": room, "sku": sku}), "ack")
        .await?;
    let p = v.next("pinned", Duration::from_secs(3)).await;
    k.check(
        "pinned broadcast",
        p.as_ref()
            .is_some_and(|p| p["sku"] == sku.as_str() && p["seq"].as_u64() == Some(seq0 + 1)),
        &format!("pinned {{sku, seq:{}}}", seq0 + 1),
        json!(p),
    );

    // Limits.
    let r =
        v.c.request(json!({"type": "add_to_cart", "room": room, "sku": sku, "qty": 0}))
            .await;
    k.error("qty 0", &r, "bad_request", None);
    let r =
        v.c.request(json!({"type": "add_to_cart", "room": room, "sku": sku, "qty": 100}))
            .await;
    k.error("qty 100", &r, "bad_request", None);
    let r =
        v.c.request(json!({"type": "comment", "room": room, "text": "x".repeat(281)}))
            .await;
    k.error("comment of 281 chars", &r, "bad_request", None);
    let r =
        v.c.request(json!({"type": "comment", "room": room, "text": ""}))
            .await;
    k.error("empty comment", &r, "bad_request", None);
    let r =
        v.c.request(json!({"type": "comment", "room": room, "text": "hello"}))
            .await;
    k.check(
        "comment with req",
        r.as_ref().is_ok_and(|r| r.msg["type"] == "ack"),
        "ack",
        r.as_ref().map(|r| r.msg.to_string()).unwrap_or_default(),
    );
    let cm = v.next("comments", Duration::from_secs(3)).await;
    k.check(
        "comments broadcast",
        cm.as_ref().is_some_and(|c| {
            c["items"].as_array().is_some_and(|i| {
                i.iter()
                    .any(|i| i["text"] == "hello" && i["user"] == user.as_str())
            })
        }),
        "comments {items:[{user, text:hello, at}]}",
        json!(cm),
    );

    // Reserve, sold out, release, stock broadcast.
    let r =
        v.c.expect(
            json!({"type": "add_to_cart", "room": room, "sku": sku, "qty": 5}),
            "reserved",
        )
        .await;
    let resv = r.as_ref().map(|r| r.msg.clone()).unwrap_or(Value::Null);
    k.check(
        "reserved fields",
        resv["reservation"].is_string()
            && resv["qty"] == 5
            && resv["price_cents"] == 500
            && resv["expires_at"].as_i64().is_some_and(|t| t > now_ms),
        "reserved {reservation, room, sku, qty:5, price_cents:500, expires_at > now}",
        r.as_ref()
            .map(|r| r.msg.to_string())
            .unwrap_or_else(|e| e.to_string()),
    );
    // Stock is coalesced state: earlier values may still arrive; the latest must reach 0.
    let shows_zero = |s: &Value| {
        s["items"].as_array().is_some_and(|i| {
            i.iter()
                .any(|i| i["sku"] == sku.as_str() && i["available"] == 0)
        })
    };
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match v.next("stock", left).await {
            Some(s) => {
                let done = shows_zero(&s);
                seen.push(s);
                if done {
                    break;
                }
            }
            None => break,
        }
    }
    k.r.data("stock broadcasts after reserving all units", json!(seen));
    k.check(
        "stock broadcast",
        seen.last().is_some_and(shows_zero),
        "a stock broadcast with {sku, available:0} within 3 s",
        json!(seen),
    );
    let r =
        v.c.request(json!({"type": "add_to_cart", "room": room, "sku": sku, "qty": 1}))
            .await;
    k.error("add_to_cart with no stock left", &r, "sold_out", None);
    let r =
        a.c.request(json!({"type": "restock", "room": room, "sku": sku, "delta": -1}))
            .await;
    k.check(
        "restock taking away reserved units",
        r.as_ref().is_ok_and(|r| r.msg["type"] == "error"),
        "error (nothing available to take)",
        r.as_ref().map(|r| r.msg.to_string()).unwrap_or_default(),
    );
    let rid = resv["reservation"].as_str().unwrap_or("none").to_string();
    let other = open(ctx, &ctx.minter.viewer(&format!("pv2-{id}"))?).await?;
    let r = other
        .c
        .request(json!({"type": "checkout", "reservations": [rid]}))
        .await;
    k.check(
        "checkout of another user's reservation",
        r.as_ref().is_ok_and(|r| r.msg["type"] == "error"),
        "error",
        r.as_ref().map(|r| r.msg.to_string()).unwrap_or_default(),
    );
    let r =
        v.c.request(json!({"type": "release", "req": "rel1", "reservation": rid}))
            .await;
    k.check(
        "release",
        r.as_ref().is_ok_and(|r| {
            r.msg["type"] == "released"
                && r.msg["reason"] == "released"
                && r.msg["reservation"] == rid.as_str()
        }),
        "released {req, reservation, reason:released}",
        r.as_ref().map(|r| r.msg.to_string()).unwrap_or_default(),
    );

    // Resume with since.
    let v2 = open(ctx, &ctx.minter.viewer(&format!("pv3-{id}"))?).await?;
    let st =
        v2.c.expect(json!({"type": "join", "room": room}), "room_state")
            .await?;
    let s = st.msg["seq"].as_u64().unwrap_or(0);
    v2.c.close().await;
    a.c.expect(json!({"type": "unpin", "room": room}), "ack")
        .await?;
    let mut v3 = open(ctx, &ctx.minter.viewer(&format!("pv3-{id}"))?).await?;
    let r =
        v3.c.request(json!({"type": "join", "room": room, "since": s}))
            .await;
    let got = r.as_ref().map(|r| r.msg.clone()).unwrap_or(Value::Null);
    k.check(
        "join with since (resume)",
        got["type"] == "joined"
            && got["resumed"] == true
            && got["seq"].as_u64().is_some_and(|q| q > s),
        &format!("joined {{resumed:true, seq>{s}}}"),
        &got,
    );
    let missed = v3.next("unpinned", Duration::from_secs(2)).await;
    k.check(
        "missed events replayed after resume",
        missed
            .as_ref()
            .is_some_and(|m| m["seq"].as_u64().is_some_and(|q| q > s)),
        &format!("unpinned {{seq>{s}}}"),
        json!(missed),
    );

    // Rate limit: 60 commands at once, each still gets exactly one reply.
    let mut futs = Vec::new();
    for i in 0..60 {
        futs.push(v3.c.request(json!({"type": "ping", "req": format!("burst{i}")})));
    }
    let replies = futures::future::join_all(futs).await;
    let limited = replies
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.msg["code"] == "rate_limited"))
        .count();
    let lost = replies.iter().filter(|r| r.is_err()).count();
    k.check(
        "burst of 60: a reply each",
        lost == 0,
        "60 replies",
        format!("{lost} missing"),
    );
    k.check(
        "burst of 60: rate_limited beyond burst 40",
        limited > 0,
        "some error {code:rate_limited}",
        format!("{limited} rate_limited"),
    );

    // Oversized frame: close 1009.
    let _ =
        v3.c.send_raw(Message::text(format!(
            "{{\"type\":\"comment\",\"room\":\"{room}\",\"text\":\"{}\"}}",
            "y".repeat(17 * 1024)
        )))
        .await;
    let code = v3.closed(Duration::from_secs(3)).await;
    k.check(
        "frame over 16 KiB",
        code == Some(Some(1009)),
        "close 1009",
        format!("{code:?}"),
    );

    // Close room.
    a.c.expect(json!({"type": "close_room", "room": room}), "ack")
        .await?;
    let rs = v.next("room_status", Duration::from_secs(3)).await;
    k.check(
        "room_status on close",
        rs.as_ref().is_some_and(|r| r["status"] == "closed"),
        "room_status {status:closed}",
        json!(rs),
    );
    let r =
        v.c.request(json!({"type": "add_to_cart", "room": room, "sku": sku, "qty": 1}))
            .await;
    k.error("add_to_cart in a closed room", &r, "room_closed", None);

    // HTTP API.
    let (st, body) =
        crate::net::http_get(ctx.http(), &format!("/api/v1/rooms/{room}"), None).await?;
    let b: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    k.check(
        "GET /api/v1/rooms/{room}",
        st == 200 && b["status"] == "closed",
        "200 with room_state fields (status closed)",
        format!("{st} {body}"),
    );
    let (st, body) =
        crate::net::http_get(ctx.http(), &format!("/api/v1/rooms/probe-{id}-nope"), None).await?;
    k.check("GET unknown room", st == 404, "404", format!("{st} {body}"));
    let (st, body) =
        crate::net::http_get(ctx.http(), &format!("/api/v1/rooms/{room}/stats"), None).await?;
    k.check(
        "stats without token",
        st == 401,
        "401",
        format!("{st} {body}"),
    );
    let vt = ctx.minter.viewer("someone")?;
    let (st, body) = crate::net::http_get(
        ctx.http(),
        &format!("/api/v1/rooms/{room}/stats"),
        Some(&vt),
    )
    .await?;
    k.check(
        "stats with a viewer token",
        st == 403,
        "403",
        format!("{st} {body}"),
    );
    let (st, body) = crate::net::http_get(
        ctx.http(),
        &format!("/api/v1/rooms/{room}/stats"),
        Some(&anchor_tok),
    )
    .await?;
    let b: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let keys = [
        "viewers",
        "peak_viewers",
        "likes",
        "orders",
        "units_sold",
        "gmv_cents",
        "gpm_cents",
    ];
    k.check(
        "stats with the anchor token",
        st == 200 && keys.iter().all(|x| b.get(x).is_some()),
        "200 {viewers, peak_viewers, likes, orders, units_sold, gmv_cents, gpm_cents}",
        format!("{st} {body}"),
    );
    for p in ["/healthz", "/readyz", "/metrics"] {
        let (st, _) = crate::net::http_get(ctx.http(), p, None).await?;
        k.check(&format!("GET {p}"), st == 200, "200", st);
    }

    for c in [&v.c, &a.c, &other.c] {
        c.close().await;
    }
    let passed = k.passed;
    report.row("checks passed", passed);
    report.row("checks failed", report.failures.len());
    Ok(())
}
