//! Test harness: the gateway started in-process on port 0 against a test redis-server, and
//! a WebSocket client that speaks the wire protocol in either encoding.

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use futures::{SinkExt, StreamExt};
use livegate::{
    app::App,
    auth::{Authenticator, Role},
    config::Config,
};
use serde_json::{json, Value};
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::HeaderValue, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};

pub const SECRET: &str = "integration-test-secret-0123456789";

/// A gateway serving on 127.0.0.1:<random port>.
pub struct Gateway {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub auth: Authenticator,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// A unique key prefix, so tests sharing a redis-server never meet.
pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Gateway {
    pub async fn start(redis_url: &str) -> Gateway {
        Gateway::start_with(redis_url, &[]).await
    }

    /// Starts a gateway with extra configuration (`LIVEGATE_*` keys).
    pub async fn start_with(redis_url: &str, extra: &[(&str, &str)]) -> Gateway {
        let prefix = unique_prefix();
        let mut pairs: Vec<(String, String)> = vec![
            ("LIVEGATE_LISTEN".into(), "127.0.0.1:0".into()),
            ("LIVEGATE_REDIS_URL".into(), redis_url.into()),
            ("LIVEGATE_JWT_SECRET".into(), SECRET.into()),
            ("LIVEGATE_KEY_PREFIX".into(), prefix),
            ("LIVEGATE_COMMIT_TIMEOUT_MS".into(), "2000".into()),
        ];
        for (k, v) in extra {
            pairs.retain(|(pk, _)| pk != k);
            pairs.push((k.to_string(), v.to_string()));
        }
        let cfg =
            Config::from_source(|k| pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone()))
                .expect("test configuration is valid");
        Gateway::start_cfg(cfg).await
    }

    pub async fn start_cfg(cfg: Config) -> Gateway {
        livegate::metrics::install();
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = App::start(cfg).await.expect("gateway starts");
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(livegate::server::run(
            listener,
            livegate::server::Gate::ready(app.clone()),
            async move {
                let _ = rx.await;
            },
        ));
        Gateway {
            addr,
            app,
            auth: Authenticator::new(SECRET),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn token(&self, sub: &str, role: Role, rooms: &[&str]) -> String {
        self.auth
            .issue(
                sub,
                role,
                rooms.iter().map(|r| r.to_string()).collect(),
                3600,
            )
            .expect("sign")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    pub async fn viewer(&self, sub: &str) -> Client {
        Client::connect(&self.ws_url(&self.token(sub, Role::Viewer, &[])), Enc::Json).await
    }

    pub async fn anchor(&self, sub: &str, rooms: &[&str]) -> Client {
        Client::connect(
            &self.ws_url(&self.token(sub, Role::Anchor, rooms)),
            Enc::Json,
        )
        .await
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The client's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enc {
    Json,
    MsgPack,
    /// No subprotocol offered (the server must pick JSON).
    Default,
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub enc: Enc,
    pub hello: Value,
    pub subprotocol: Option<String>,
    next_req: u64,
    /// Messages that arrived while [`Client::reply_to`] waited for a reply, in arrival
    /// order: the next reads return them first, so a broadcast that came before a reply is
    /// not lost to the test (a coalesced `stock` is sent once; skipping it left a test
    /// waiting forever, kept alive by the room's periodic `stats`).
    backlog: VecDeque<Value>,
}

/// How long a test waits for an expected message: one deadline for the whole wait, however
/// many other messages (periodic `stats`, say) arrive meanwhile.
pub const WAIT: Duration = Duration::from_secs(10);

/// The first messages' types, for a timeout's message.
fn kinds(seen: &[Value]) -> String {
    let mut out: Vec<String> = seen
        .iter()
        .take(20)
        .map(|m| m["type"].as_str().unwrap_or("?").to_string())
        .collect();
    if seen.len() > out.len() {
        out.push(format!("... {} in all", seen.len()));
    }
    out.join(", ")
}

impl Client {
    pub async fn connect(url: &str, enc: Enc) -> Client {
        Client::try_connect(url, enc).await.expect("connects")
    }

    /// Connects; `Err` carries the HTTP status and body of a refused upgrade.
    pub async fn try_connect(url: &str, enc: Enc) -> Result<Client, (u16, String)> {
        let mut req = url.into_client_request().expect("request");
        match enc {
            Enc::Json => {
                req.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static("livegate.v1.json"),
                );
            }
            Enc::MsgPack => {
                req.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static("livegate.v1.msgpack"),
                );
            }
            Enc::Default => {}
        }
        Client::connect_request(req, enc).await
    }

    /// Connects over a socket with a tiny receive buffer: a client on a bad network.
    pub async fn connect_small_window(url: &str) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let req = url.into_client_request().expect("request");
        let host = req
            .uri()
            .authority()
            .expect("authority")
            .as_str()
            .to_string();
        let addr: SocketAddr = host.parse().expect("ip:port");
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(2048).expect("rcvbuf");
        let stream = sock.connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
        let mut c = Client {
            ws,
            enc: Enc::Default,
            hello: Value::Null,
            subprotocol: None,
            next_req: 0,
            backlog: VecDeque::new(),
        };
        c.hello = c.recv().await;
        c
    }

    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
        enc: Enc,
    ) -> Result<Client, (u16, String)> {
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => {
                let subprotocol = resp
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let mut c = Client {
                    ws,
                    enc,
                    hello: Value::Null,
                    subprotocol,
                    next_req: 0,
                    backlog: VecDeque::new(),
                };
                c.hello = c.recv().await;
                Ok(c)
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((status, body))
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub fn encode(&self, v: &Value) -> Message {
        match self.enc {
            Enc::Json | Enc::Default => Message::Text(v.to_string().into()),
            Enc::MsgPack => Message::Binary(rmp_serde::to_vec_named(v).expect("msgpack").into()),
        }
    }

    pub async fn send(&mut self, v: Value) {
        let m = self.encode(&v);
        self.ws.send(m).await.expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next protocol message (pings are answered by the library and skipped).
    pub async fn recv(&mut self) -> Value {
        match self.next_event(WAIT).await {
            Event::Msg(v) => v,
            Event::Closed(c) => panic!("connection closed ({c:?}) while a message was expected"),
            Event::Timeout => panic!("no message within {WAIT:?}"),
        }
    }

    /// The next event within `wait`: a message kept by [`Client::reply_to`] first, then
    /// what the connection brings.
    pub async fn next_event(&mut self, wait: Duration) -> Event {
        if let Some(v) = self.backlog.pop_front() {
            return Event::Msg(v);
        }
        self.read_event(tokio::time::Instant::now() + wait).await
    }

    /// The next event from the connection itself, by `deadline`.
    async fn read_event(&mut self, deadline: tokio::time::Instant) -> Event {
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(n) => n,
            };
            match next {
                None => return Event::Closed(None),
                Some(Err(e)) => {
                    eprintln!("client read error: {e}");
                    return Event::Closed(None);
                }
                Some(Ok(Message::Text(t))) => {
                    assert!(
                        self.enc != Enc::MsgPack,
                        "text frame on a msgpack connection: {t}"
                    );
                    return Event::Msg(serde_json::from_str(&t).expect("server sent valid JSON"));
                }
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(self.enc, Enc::MsgPack, "binary frame on a JSON connection");
                    return Event::Msg(
                        rmp_serde::from_slice(&b).expect("server sent valid msgpack"),
                    );
                }
                Some(Ok(Message::Close(c))) => return Event::Closed(c),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The first message for which `want` holds, within [`WAIT`] in all; the messages
    /// before it are dropped. Panics naming `what` and what came instead.
    pub async fn recv_until(&mut self, what: &str, mut want: impl FnMut(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let event = match self.backlog.pop_front() {
                Some(v) => Event::Msg(v),
                None => self.read_event(deadline).await,
            };
            match event {
                Event::Msg(v) if want(&v) => return v,
                Event::Msg(v) => seen.push(v),
                Event::Closed(c) => panic!(
                    "connection closed ({c:?}) while waiting for {what}; before it: {}",
                    kinds(&seen)
                ),
                Event::Timeout => {
                    panic!("no {what} within {WAIT:?}; came instead: {}", kinds(&seen))
                }
            }
        }
    }

    /// Skips messages until one of `kind` arrives (e.g. past `stats`), within [`WAIT`].
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        self.recv_until(&format!("`{kind}`"), |v| v["type"] == kind)
            .await
    }

    /// Sends `v` with a fresh `req` and returns the reply carrying that `req`; the
    /// broadcasts that came before it stay for the next reads.
    pub async fn request(&mut self, mut v: Value) -> Value {
        self.next_req += 1;
        let req = format!("q{}", self.next_req);
        v["req"] = json!(req);
        self.send(v).await;
        self.reply_to(&req).await
    }

    /// The reply carrying `req`, within [`WAIT`]; the other messages that came before it
    /// are kept, in order, for the next reads.
    pub async fn reply_to(&mut self, req: &str) -> Value {
        let mut kept = VecDeque::new();
        let reply = self
            .recv_until(&format!("the reply to {req}"), |m| {
                let mine = m["req"] == req;
                if !mine {
                    kept.push_back(m.clone());
                }
                mine
            })
            .await;
        kept.extend(self.backlog.drain(..));
        self.backlog = kept;
        reply
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed_with(&mut self) -> Option<u16> {
        self.backlog.clear();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.read_event(deadline).await {
                Event::Msg(_) => continue,
                Event::Closed(c) => return c.map(|c| u16::from(c.code)),
                Event::Timeout => panic!("connection not closed within {WAIT:?}"),
            }
        }
    }
}

#[derive(Debug)]
pub enum Event {
    Msg(Value),
    Closed(Option<CloseFrame>),
    Timeout,
}

/// Opens `room` with one product on the shelf (`stock` units) and returns the anchor.
pub async fn room_with_product(gw: &Gateway, room: &str, sku: &str, stock: u64) -> Client {
    let mut a = gw.anchor(&format!("anchor-{room}"), &[room]).await;
    let r = a
        .request(json!({"type":"open_room","room":room,"title":"Flash sale"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let r = a
        .request(json!({"type":"upsert_product","room":room,"sku":sku,"title":"Lipstick","price_cents":1999,"stock":stock}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    a
}

/// A plain HTTP GET on the gateway: (status, body).
pub async fn http_get(gw: &Gateway, path: &str, bearer: Option<&str>) -> (u16, String) {
    http_request(gw.addr, path, bearer).await
}

pub async fn http_get_addr(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, path, None).await
}

async fn http_request(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The `livegate serve` binary as a child process (for kill -9 tests).
pub struct GatewayProcess {
    child: Option<std::process::Child>,
    pub addr: SocketAddr,
    pub auth: Authenticator,
    env: Vec<(String, String)>,
}

impl GatewayProcess {
    /// Starts `livegate serve --no-order-writer` on a free port and waits for /readyz.
    pub async fn start(redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> GatewayProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut env: Vec<(String, String)> = vec![
            ("LIVEGATE_LISTEN".into(), format!("127.0.0.1:{port}")),
            ("LIVEGATE_REDIS_URL".into(), redis_url.into()),
            ("LIVEGATE_JWT_SECRET".into(), SECRET.into()),
            ("LIVEGATE_KEY_PREFIX".into(), prefix.into()),
            ("LIVEGATE_LOG".into(), "warn".into()),
        ];
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        let mut p = GatewayProcess {
            child: None,
            addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            auth: Authenticator::new(SECRET),
            env,
        };
        p.spawn().await;
        p
    }

    async fn spawn(&mut self) {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_livegate"));
        cmd.arg("serve").arg("--no-order-writer");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(std::process::Stdio::null());
        self.child = Some(cmd.spawn().expect("spawn livegate"));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(self.addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s
                    .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
                if buf.starts_with(b"HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "livegate did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then the same command again.
    pub async fn kill9_and_restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn ws_url(&self, sub: &str, role: Role, rooms: &[&str]) -> String {
        let t = self
            .auth
            .issue(
                sub,
                role,
                rooms.iter().map(|r| r.to_string()).collect(),
                3600,
            )
            .expect("sign");
        format!("ws://{}/ws?token={t}", self.addr)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
