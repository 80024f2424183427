//! Test harness: a TCP proxy in front of a test redis-server that can hold back what its
//! existing connections send (the way a segment waits for retransmission), so a test can
//! make a request late rather than lost, and see what a client does meanwhile.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

#[derive(Default)]
struct State {
    /// Ids given to the connections so far.
    next_id: u64,
    /// Hold what connections with an id below `.0` send, until `.1`.
    hold: Option<(u64, Instant)>,
}

pub struct HoldingProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl HoldingProxy {
    /// A proxy on a free 127.0.0.1 port to the redis-server on `upstream`.
    pub async fn start(upstream: u16) -> HoldingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = {
                    let mut s = shared.lock().expect("proxy state");
                    s.next_id += 1;
                    s.next_id - 1
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                tokio::spawn(pump(id, client, server, shared.clone()));
            }
        });
        HoldingProxy { addr, state, task }
    }

    /// `redis://127.0.0.1:PORT/` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Holds back, for `d`, what the connections open now send from now on; connections
    /// opened later pass freely.
    pub fn hold_existing(&self, d: Duration) {
        let mut s = self.state.lock().expect("proxy state");
        s.hold = Some((s.next_id, Instant::now() + d));
    }

    /// Ends the hold now: what was held back goes on (within a few milliseconds).
    pub fn release(&self) {
        self.state.lock().expect("proxy state").hold = None;
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(id: u64, client: TcpStream, server: TcpStream, state: Arc<Mutex<State>>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            loop {
                let wait = {
                    let s = state.lock().expect("proxy state");
                    match s.hold {
                        Some((below, until)) if id < below => {
                            until.checked_duration_since(Instant::now())
                        }
                        _ => None,
                    }
                };
                match wait {
                    // In short steps, so `release` takes effect at once.
                    Some(w) => tokio::time::sleep(w.min(Duration::from_millis(10))).await,
                    None => break,
                }
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}
