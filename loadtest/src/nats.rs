//! The NATS-over-WebSocket baseline for fan-out: starts Debian's `nats-server` with a temp
//! config (core listener and websocket listener on free loopback ports, never the system
//! 4222), and a minimal NATS text-protocol client over WebSocket: INFO, CONNECT
//! {"verbose":false,"pedantic":false}, SUB, PUB, PING/PONG (answered), MSG parsing across
//! frame boundaries. Viewers and publisher use the same source-address spreading and the
//! same payload bytes as the livegate run, so the comparison is like for like.

use crate::net::Sources;
use crate::spawn::{free_port, temp_dir};
use anyhow::{bail, Context, Result};
use futures::stream::{SplitSink, StreamExt};
use futures::SinkExt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A private nats-server with websocket enabled.
pub struct NatsServer {
    child: Child,
    dir: std::path::PathBuf,
    pub ws_addr: SocketAddr,
}

impl NatsServer {
    pub async fn start(bin: &Path) -> Result<Self> {
        let dir = temp_dir("nats")?;
        let core = free_port()?;
        let ws = free_port()?;
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{core}\"\nmax_payload: 1048576\nwebsocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("nats.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let ws_addr: SocketAddr = format!("127.0.0.1:{ws}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(ws_addr).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nats-server websocket port {ws} not open (log in {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            dir,
            ws_addr,
        })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;

/// One NATS connection over WebSocket.
pub struct NatsWs {
    sink: tokio::sync::Mutex<Sink>,
}

/// Called for every MSG with (subject, payload, receive instant).
pub type OnMsg = Arc<dyn Fn(&str, &[u8], Instant) + Send + Sync>;

impl NatsWs {
    /// Connects, sends CONNECT (+ SUB for `subscribe`), and waits for the PONG of a PING so
    /// the subscription is registered when this returns.
    pub async fn connect(
        sources: &Sources,
        i: usize,
        addr: SocketAddr,
        subscribe: Option<&str>,
        on_msg: OnMsg,
    ) -> Result<Arc<NatsWs>> {
        let stream = sources.connect(i, addr).await?;
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async_with_config(
                format!("ws://{addr}/"),
                stream,
                Some(crate::net::ws_config()),
            ),
        )
        .await
        .context("NATS websocket handshake timed out")??;
        let (sink, mut stream) = ws.split();
        let conn = Arc::new(NatsWs {
            sink: tokio::sync::Mutex::new(sink),
        });
        let (pong_tx, pong_rx) = oneshot::channel::<()>();
        let pong_tx = Mutex::new(Some(pong_tx));
        let reader_conn = conn.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(msg)) = stream.next().await {
                let now = Instant::now();
                match msg {
                    Message::Binary(b) => buf.extend_from_slice(&b),
                    Message::Text(t) => buf.extend_from_slice(t.as_bytes()),
                    Message::Close(_) => break,
                    _ => continue,
                }
                let mut start = 0;
                loop {
                    let rest = &buf[start..];
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let line = &rest[..eol];
                    if line.starts_with(b"MSG ") {
                        let text = String::from_utf8_lossy(line);
                        let parts: Vec<&str> = text.split_whitespace().collect();
                        let size: usize = parts.last().and_then(|s| s.parse().ok()).unwrap_or(0);
                        if rest.len() < eol + 2 + size + 2 {
                            break; // payload not complete yet
                        }
                        let payload = &rest[eol + 2..eol + 2 + size];
                        on_msg(parts.get(1).copied().unwrap_or(""), payload, now);
                        start += eol + 2 + size + 2;
                        continue;
                    }
                    if line == b"PING" {
                        let _ = reader_conn.raw(b"PONG\r\n").await;
                    } else if line == b"PONG" {
                        if let Some(tx) = pong_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                    } else if line.starts_with(b"-ERR") {
                        eprintln!("nats: {}", String::from_utf8_lossy(line));
                    }
                    start += eol + 2;
                }
                buf.drain(..start);
            }
        });
        let mut hello = String::from("CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
        if let Some(subj) = subscribe {
            hello.push_str(&format!("SUB {subj} 1\r\n"));
        }
        hello.push_str("PING\r\n");
        conn.raw(hello.as_bytes()).await?;
        tokio::time::timeout(Duration::from_secs(10), pong_rx)
            .await
            .context("no PONG from nats-server")?
            .context("nats connection closed")?;
        Ok(conn)
    }

    async fn raw(&self, bytes: &[u8]) -> Result<()> {
        self.sink
            .lock()
            .await
            .send(Message::binary(bytes.to_vec()))
            .await?;
        Ok(())
    }

    /// PUB subject payload; returns the instant just before the frame was written.
    pub async fn publish(&self, subject: &str, payload: &[u8]) -> Result<Instant> {
        let mut frame = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        let mut sink = self.sink.lock().await;
        let at = Instant::now();
        sink.send(Message::binary(frame)).await?;
        Ok(at)
    }
}
