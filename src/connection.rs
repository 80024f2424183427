//! One WebSocket connection: the upgrade (auth, subprotocol, connection bound), then a
//! reader (this task) and a writer task.
//!
//! The writer task alone owns the socket's sink: it drains the bounded outgoing queue in as
//! few writes as it can, sends heartbeat pings, and sends the close frame when the kill
//! switch is thrown. The reader decodes frames, applies the rate and abuse limits and runs
//! commands; it never awaits another client's socket. Carts waiting for their durable
//! write (up to `LIVEGATE_CONN_INFLIGHT`) are polled beside the next frames. Clean-up
//! happens in exactly one place, at the end of [`serve`].

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures::{
    stream::{FuturesUnordered, SplitSink},
    SinkExt, StreamExt,
};
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::{
    tungstenite::{
        self,
        handshake::derive_accept_key,
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
        Message,
    },
    WebSocketStream,
};

use crate::{
    app::App,
    auth::{token_from_request, AuthError, Claims},
    command::{self, Session, TokenBucket},
    hub::{close, KillSwitch, Outbox},
    metrics::{self as m, unix_ms},
    outbound,
    protocol::{decode_client, Decoded, Encoding, ProtoError, ServerMsg, PROTOCOL_VERSION},
    server::Ready,
};

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// How long a closing connection waits for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// `GET /ws`: checks the handshake and the token, answers 101, and starts the connection.
pub async fn upgrade(Ready(app): Ready, mut req: Request) -> Response {
    let headers = req.headers();
    if !header_has(headers, header::UPGRADE, "websocket")
        || !header_has(headers, header::CONNECTION, "upgrade")
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .and_then(|v| v.to_str().ok())
            != Some("13")
    {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            "this endpoint speaks WebSocket (version 13) only",
        );
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing Sec-WebSocket-Key",
        );
    };
    let token = token_from_request(
        req.uri().query(),
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let claims = match token
        .ok_or(AuthError::Missing)
        .and_then(|t| app.auth.verify(&t))
    {
        Ok(c) => c,
        Err(e) => {
            let reason = match e {
                AuthError::Missing => "missing",
                AuthError::Expired => "expired",
                AuthError::Invalid(_) => "invalid",
            };
            metrics::counter!(m::AUTH_FAILURES, "reason" => reason).increment(1);
            return json_error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
        }
    };
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let Ok((encoding, chosen)) = Encoding::negotiate(offered) else {
        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "bad_subprotocol").increment(1);
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "offer livegate.v1.json or livegate.v1.msgpack in Sec-WebSocket-Protocol",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The bound is checked before the 101 so the permit travels with the connection; a
    // full gateway still completes the handshake and closes with 1013, as the protocol says.
    let permit = app.conn_permits.clone().try_acquire_owned().ok();
    let config = app.ws_config();
    let app2 = app.clone();
    app.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        match permit {
            Some(permit) => serve(app2, ws, claims, encoding, permit).await,
            None => {
                metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "full").increment(1);
                let mut ws = ws;
                let _ = ws
                    .close(Some(close_frame(
                        close::OVERLOADED,
                        "gateway full, try again later",
                    )))
                    .await;
            }
        }
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = chosen {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    res
}

fn close_frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close::NORMAL => "bye",
        close::GOING_AWAY => "server going away: reconnect and resume",
        close::PROTOCOL => "protocol error",
        close::UNDECODABLE_FLOOD => "too many undecodable frames",
        close::POLICY => "policy violation: command flood",
        close::TOO_BIG => "frame too big",
        close::OVERLOADED => "overloaded",
        close::SLOW_CONSUMER => "slow consumer: reconnect and join with since",
        close::IDLE => "idle: no frame for three heartbeats",
        _ => "internal error",
    }
}

/// Runs one connection to its end.
async fn serve(
    app: Arc<App>,
    ws: Socket,
    claims: Claims,
    encoding: Encoding,
    _permit: OwnedSemaphorePermit,
) {
    // Borrowed from the App this task holds anyway: no per-connection copy.
    let limits = &app.cfg.limits;
    let conn = app.next_conn_id();
    let (tx, rx) = outbound::queue(limits.outbound_queue);
    let kill = Arc::new(KillSwitch::default());
    let user: Arc<str> = Arc::from(claims.sub.as_str());
    let outbox = Outbox::new(conn, user.clone(), encoding, tx, kill.clone());
    metrics::counter!(m::CONNECTIONS_TOTAL).increment(1);
    metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
    let (sink, mut stream) = ws.split();
    tracing::debug!(conn, user = %user, encoding = encoding.name(), "connection open");
    outbox.send(&ServerMsg::Hello {
        conn: format!("c{}-{conn}", app.epoch),
        user: user.to_string(),
        role: claims.role.as_str().to_string(),
        server_time: unix_ms(),
        heartbeat_ms: limits.heartbeat.as_millis() as u64,
        protocol: PROTOCOL_VERSION,
    });
    app.hub.register(&outbox);
    let writer = tokio::spawn(write_loop(sink, rx, kill.clone(), limits.heartbeat));
    let mut session = Session::new(claims, outbox, limits.rate_per_sec, limits.rate_burst);
    let idle = limits.heartbeat * 3;
    let mut bad_frames = TokenBucket::new(1, limits.max_bad_frames);
    let mut refused_in_row = 0u32;
    // Carts waiting for their group commit; at the bound, frames wait unread (TCP
    // backpressure on this client alone) until one is answered.
    let mut inflight: FuturesUnordered<command::InFlight> = FuturesUnordered::new();
    let max_inflight = limits.conn_inflight;
    loop {
        let room_to_read = inflight.len() < max_inflight;
        if !room_to_read {
            // The next frames wait unread until a cart is answered.
            metrics::counter!(m::CONN_INFLIGHT_FULL).increment(1);
        }
        // The kill branch is always enabled, so some branch always can run.
        let next = tokio::select! {
            biased;
            _ = kill.killed() => break,
            Some(()) = inflight.next(), if !inflight.is_empty() => continue,
            next = tokio::time::timeout(idle, stream.next()), if room_to_read => next,
        };
        let msg = match next {
            Err(_) => {
                kill.kill(close::IDLE);
                break;
            }
            Ok(None) => {
                kill.kill(close::NORMAL);
                break;
            }
            Ok(Some(Err(e))) => {
                kill.kill(match e {
                    tungstenite::Error::Capacity(_) => close::TOO_BIG,
                    tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_) => {
                        close::PROTOCOL
                    }
                    _ => close::NORMAL,
                });
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        let payload = match msg {
            Message::Text(t) => t.into(),
            Message::Binary(b) => b,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(_) => {
                kill.kill(close::NORMAL);
                break;
            }
        };
        match decode_client(encoding, &payload) {
            Decoded::Invalid { req, error } => {
                metrics::counter!(m::FRAMES_UNDECODABLE).increment(1);
                if !bad_frames.take(std::time::Instant::now()) {
                    kill.kill(close::UNDECODABLE_FLOOD);
                    break;
                }
                session.outbox.send(&ServerMsg::error(req, error));
            }
            Decoded::Msg(msg) => {
                if !session.allow() {
                    metrics::counter!(m::RATE_LIMITED).increment(1);
                    refused_in_row += 1;
                    if refused_in_row > limits.rate_burst.saturating_mul(4) {
                        kill.kill(close::POLICY);
                        break;
                    }
                    session.outbox.send(&ServerMsg::error(
                        msg.req().map(str::to_string),
                        ProtoError::new(
                            crate::protocol::ErrorCode::RateLimited,
                            format!(
                                "over {} commands per second (burst {})",
                                limits.rate_per_sec, limits.rate_burst
                            ),
                        ),
                    ));
                    continue;
                }
                refused_in_row = 0;
                // Boxed: the reader of an idle connection does not carry the state of the
                // largest command while it waits for the next frame. The carts in flight
                // are driven meanwhile, so a slow command (a checkout's commit) does not
                // hold their replies or leave their reservations Pending.
                let mut command = Box::pin(command::dispatch(&app, &mut session, msg));
                let rest = loop {
                    tokio::select! {
                        biased;
                        rest = &mut command => break rest,
                        Some(()) = inflight.next(), if !inflight.is_empty() => {}
                    }
                };
                drop(command);
                if let Some(rest) = rest {
                    inflight.push(rest);
                }
            }
        }
    }
    // Every cart in flight finishes (bounded by the commit timeout): its reservation is
    // confirmed or undone (or, when Redis did not answer, handed to `settle_unknown` like
    // any unknown outcome), and its reply queued for the writer's last flush.
    while inflight.next().await.is_some() {}
    // Clean-up, the one place: leave every room, forget the connection, let the writer
    // send the close frame and finish.
    for room in session.rooms.keys() {
        if let Some(r) = app.hub.room(room) {
            r.leave_on_disconnect(conn).await;
        }
    }
    app.hub.unregister(&user, conn);
    drop(session);
    let code = kill.code().unwrap_or(close::NORMAL);
    // Finish the closing handshake: the writer sends our close frame while we read (and
    // discard) what the client still sends until its close frame, so the socket is not
    // reset under the client's feet. Bounded: a client that never answers is dropped.
    let drain = async {
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, futures::future::join(writer, drain)).await;
    metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "code" => code.to_string()).increment(1);
}

/// The writer: the only owner of the sink. Every socket write races the kill switch, so a
/// client that stopped reading cannot hold the writer (and its socket) forever.
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut rx: outbound::Receiver,
    kill: Arc<KillSwitch>,
    heartbeat: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut batch = std::collections::VecDeque::new();
    let code = loop {
        let step = async {
            tokio::select! {
                more = rx.recv_batch(&mut batch) => {
                    if !more {
                        return Ok(false);
                    }
                    let n = batch.len();
                    // Feeding gathers frames in the write buffer; one flush writes them.
                    while let Some(f) = batch.pop_front() {
                        sink.feed(f).await?;
                    }
                    sink.flush().await?;
                    outbound::trim(&mut batch);
                    metrics::counter!(m::MESSAGES_SENT).increment(n as u64);
                    metrics::histogram!(m::WRITE_BATCH).record(n as f64);
                    Ok(true)
                }
                _ = ping.tick() => {
                    sink.send(Message::Ping(Default::default())).await?;
                    Ok(true)
                }
            }
        };
        let r: Result<bool, tungstenite::Error> = tokio::select! {
            biased;
            code = kill.killed() => break code,
            r = step => r,
        };
        match r {
            Ok(true) => continue,
            // Every sender is gone: the reader ended without a close request.
            Ok(false) => break kill.code().unwrap_or(close::NORMAL),
            Err(e) => {
                tracing::debug!(error = %e, "writer stopped");
                kill.kill(close::NORMAL);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
                return;
            }
        }
    };
    // Closing, bounded: deliver what is queued and what the reader still queues (the reply
    // to a command in flight) until the queue closes, unless the client is the reason the
    // queue is full; then the close frame.
    let closing = async {
        if code != close::SLOW_CONSUMER {
            // Frames taken before the kill, then whatever is still queued.
            for f in batch.drain(..) {
                sink.feed(f).await?;
            }
            while rx.recv_batch(&mut batch).await {
                for f in batch.drain(..) {
                    sink.feed(f).await?;
                }
            }
        }
        sink.send(Message::Close(Some(close_frame(code, close_reason(code)))))
            .await
    };
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!(error = %e, "close frame not delivered");
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
}
