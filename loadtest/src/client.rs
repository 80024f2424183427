//! The protocol client: one WebSocket connection speaking livegate wire protocol v1 exactly
//! as protocol.md describes it (token in the query, subprotocol `livegate.v1.json` or
//! `livegate.v1.msgpack`, the `hello` first message, `req`-matched replies). A reader task
//! owns the stream half: it answers server pings (tungstenite queues the pong while reading),
//! routes replies to the waiting request by `req`, and hands every other message (room
//! broadcasts, unsolicited `released` / `order_confirmed`) with its receive instant to a
//! per-connection handler, so scenarios measure latency on one in-process monotonic clock.
//! [`Dialer::handshake`] stops after `hello` and hands the socket over, for scenarios that
//! drive it themselves.

use crate::net::{Sources, Target};
use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{SplitSink, StreamExt};
use futures::SinkExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Wire encoding, chosen by subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Encoding {
    Json,
    Msgpack,
}

impl Encoding {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "livegate.v1.json",
            Encoding::Msgpack => "livegate.v1.msgpack",
        }
    }
}

/// What the reader task reports to the handler.
pub enum Event<'a> {
    /// A message that was not a reply to a pending request, with its receive instant.
    Msg(&'a Value, Instant),
    /// The connection ended; the close code if the server sent one.
    Closed(Option<u16>),
}

pub type Handler = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// A handler that ignores everything.
pub fn ignore() -> Handler {
    Arc::new(|_| {})
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<(Value, Instant)>>>>;
type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;

/// Connection parameters shared by every client of a run.
#[derive(Clone)]
pub struct Dialer {
    pub target: Target,
    pub sources: Sources,
    pub encoding: Encoding,
    pub reply_timeout: Duration,
}

/// One protocol connection.
pub struct Client {
    sink: tokio::sync::Mutex<Sink>,
    pending: Pending,
    next_req: AtomicU64,
    closed: Arc<AtomicBool>,
    encoding: Encoding,
    reply_timeout: Duration,
    /// The `hello` message.
    pub hello: Value,
}

impl Dialer {
    /// The WebSocket handshake with `token` (checking the chosen subprotocol) up to the
    /// `hello` message, with the WebSocket settings `config`; returns the socket and `hello`.
    /// For scenarios that drive the socket themselves (`rush --sustain-secs`).
    pub async fn handshake(
        &self,
        i: usize,
        token: &str,
        config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    ) -> Result<(WebSocketStream<TcpStream>, Value)> {
        let stream = self.sources.connect(i, self.target.addr).await?;
        let sep = if self.target.path.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "ws://{}{}{}token={}",
            self.target.host, self.target.path, sep, token
        );
        let mut req = url.into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.encoding.subprotocol()),
        );
        let (mut ws, resp) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async_with_config(req, stream, Some(config)),
        )
        .await
        .context("WebSocket handshake timed out")?
        .context("WebSocket handshake")?;
        // protocol.md: "The server answers with the one it chose."
        let chosen = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        if chosen != Some(self.encoding.subprotocol()) {
            bail!(
                "server answered subprotocol {chosen:?}, offered {}",
                self.encoding.subprotocol()
            );
        }
        // The first message must be hello.
        let hello = loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("no hello within 10 s")?
                .context("closed before hello")??;
            if let Some(v) = decode(&msg, self.encoding)? {
                break v;
            }
        };
        if hello["type"] != "hello" {
            bail!("first server message is not hello: {hello}");
        }
        Ok((ws, hello))
    }

    /// Connects with `token`, waits for `hello`, and starts the reader task.
    /// `i` picks the source address.
    pub async fn connect(&self, i: usize, token: &str, handler: Handler) -> Result<Arc<Client>> {
        let (ws, hello) = self.handshake(i, token, crate::net::ws_config()).await?;
        let (sink, mut stream) = ws.split();
        let encoding = self.encoding;
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let client = Arc::new(Client {
            sink: tokio::sync::Mutex::new(sink),
            pending: pending.clone(),
            next_req: AtomicU64::new(1),
            closed: closed.clone(),
            encoding,
            reply_timeout: self.reply_timeout,
            hello,
        });
        tokio::spawn(async move {
            let mut code = None;
            while let Some(msg) = stream.next().await {
                let now = Instant::now();
                let msg = match msg {
                    Ok(m) => m,
                    Err(_) => break,
                };
                if let Message::Close(frame) = &msg {
                    code = frame.as_ref().map(|f| u16::from(f.code));
                    continue;
                }
                let v = match decode(&msg, encoding) {
                    Ok(Some(v)) => v,
                    Ok(None) => continue,
                    Err(e) => {
                        let bad = json!({"type": "_undecodable", "error": e.to_string()});
                        handler(Event::Msg(&bad, now));
                        continue;
                    }
                };
                if let Some(req) = v.get("req").and_then(Value::as_str) {
                    let waiter = pending.lock().unwrap().remove(req);
                    if let Some(tx) = waiter {
                        let _ = tx.send((v, now));
                        continue;
                    }
                }
                handler(Event::Msg(&v, now));
            }
            closed.store(true, Ordering::Release);
            pending.lock().unwrap().clear();
            handler(Event::Closed(code));
        });
        Ok(client)
    }
}

fn decode(msg: &Message, encoding: Encoding) -> Result<Option<Value>> {
    Ok(match msg {
        Message::Text(t) => Some(serde_json::from_str(t.as_str())?),
        Message::Binary(b) => Some(match encoding {
            Encoding::Msgpack => rmp_serde::from_slice(b)?,
            Encoding::Json => serde_json::from_slice(b)?,
        }),
        _ => None,
    })
}

impl Client {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends one message without waiting for anything; returns the instant just before the
    /// frame was written.
    pub async fn send(&self, msg: &Value) -> Result<Instant> {
        let frame = match self.encoding {
            Encoding::Json => Message::text(serde_json::to_string(msg)?),
            Encoding::Msgpack => Message::binary(rmp_serde::to_vec_named(msg)?),
        };
        let mut sink = self.sink.lock().await;
        let at = Instant::now();
        sink.send(frame).await?;
        Ok(at)
    }

    /// Sends a raw frame (for protocol probes: undecodable or oversized frames).
    pub async fn send_raw(&self, frame: Message) -> Result<()> {
        self.sink.lock().await.send(frame).await?;
        Ok(())
    }

    /// Sends `msg` with a fresh `req` (unless it has one) and waits for the reply carrying it.
    /// Returns the reply, its latency and the send instant.
    pub async fn request(&self, mut msg: Value) -> Result<Reply> {
        let req = match msg.get("req").and_then(Value::as_str) {
            Some(r) => r.to_string(),
            None => {
                let r = format!("r{}", self.next_req.fetch_add(1, Ordering::Relaxed));
                msg["req"] = Value::String(r.clone());
                r
            }
        };
        if self.is_closed() {
            bail!("connection already closed");
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(req.clone(), tx);
        let sent = match self.send(&msg).await {
            Ok(at) => at,
            Err(e) => {
                self.pending.lock().unwrap().remove(&req);
                return Err(e);
            }
        };
        match tokio::time::timeout(self.reply_timeout, rx).await {
            Ok(Ok((v, at))) => Ok(Reply {
                latency: at.saturating_duration_since(sent),
                sent,
                msg: v,
            }),
            Ok(Err(_)) => Err(anyhow!("connection closed before the reply to {req}")),
            Err(_) => {
                self.pending.lock().unwrap().remove(&req);
                Err(anyhow!("no reply to {req} within {:?}", self.reply_timeout))
            }
        }
    }

    /// Like [`request`](Self::request) but fails unless the reply has type `expect`.
    pub async fn expect(&self, msg: Value, expect: &str) -> Result<Reply> {
        let what = msg["type"].clone();
        let r = self.request(msg).await?;
        if r.msg["type"] != expect {
            bail!("{what}: expected {expect}, got {}", r.msg);
        }
        Ok(r)
    }

    /// Closes with 1000; gives up after 5 s (a server that stopped reading must not hold
    /// the end of a run).
    pub async fn close(&self) {
        let close = async {
            let mut sink = self.sink.lock().await;
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })))
                .await;
            let _ = sink.close().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }
}

/// A reply to a request.
pub struct Reply {
    pub msg: Value,
    pub latency: Duration,
    pub sent: Instant,
}

impl Reply {
    pub fn kind(&self) -> &str {
        self.msg["type"].as_str().unwrap_or("")
    }

    /// The error code if this is an `error` reply.
    pub fn error_code(&self) -> Option<&str> {
        (self.kind() == "error").then(|| self.msg["code"].as_str().unwrap_or("?"))
    }
}
