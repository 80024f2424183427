//! Test harness: a real `redis-server` child process on a free 127.0.0.1 port, and the
//! detection of a PostgreSQL server for the tests that can also run against one.
//!
//! It owns the child process and its temporary data directory (both are cleaned up on
//! drop); it must not be used outside tests, and it never touches a server it did not
//! start, except the PostgreSQL server, where it only creates and drops its own schemas.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A redis-server started for one test. Killed (SIGKILL) on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    durable: bool,
}

impl RedisServer {
    /// An ephemeral server: no RDB snapshots, no append-only file.
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// A durable server: `--appendonly yes --appendfsync always` in its own temp dir, so
    /// that [`RedisServer::restart`] after [`RedisServer::kill`] finds every acknowledged
    /// write again.
    pub fn start_durable() -> RedisServer {
        RedisServer::start_with(true)
    }

    fn start_with(durable: bool) -> RedisServer {
        let dir = temp_dir("redis");
        // A free port can be taken by someone else between our probe and redis binding it:
        // try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                port,
                dir: dir.clone(),
                durable,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last_err = e;
                    server.kill();
                }
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .arg("--unixsocket")
            .arg(self.dir.join("redis.sock"))
            .arg("--unixsocketperm")
            .arg("700");
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH; the integration tests need a real Redis: \
                 apt-get install -y redis-server"
            ),
            Err(e) => return Err(format!("spawn redis-server: {e}")),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                    return Err(format!("redis-server exited with {status}: {log}"));
                }
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 10 s".to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `redis+unix://DIR/redis.sock`: the same server over its Unix socket (the gateway's
    /// committer and order writer then use redis-rs, not their own TCP connections).
    pub fn unix_url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (append-only file, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILL: no shutdown save, no goodbye to clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts it again on the same port with the same
    /// data directory (a durable server reloads its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if Instant::now() > deadline => panic!("redis-server restart: {e}"),
                Err(_) => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh, empty directory under the system temp dir (the caller removes it).
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "livegate-test-{tag}-{}-{n}-{nanos}",
        std::process::id()
    ));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create temp dir {}: {e}", dir.display());
    }
    dir
}

fn free_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("no free port on 127.0.0.1: {e}"),
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"+PONG"),
        Err(_) => false,
    }
}

/// The URL of a reachable PostgreSQL server for tests: `LIVEGATE_TEST_POSTGRES`, or
/// `postgres://postgres@127.0.0.1:5432/test`. `None` when it does not answer within a
/// couple of seconds (callers print `NOTICE: PostgreSQL not reachable, skipping ...`).
pub async fn postgres_url() -> Option<String> {
    use sqlx::Connection;
    let url = std::env::var("LIVEGATE_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let conn =
        tokio::time::timeout(Duration::from_secs(2), sqlx::PgConnection::connect(&url)).await;
    match conn {
        Ok(Ok(c)) => {
            let _ = c.close().await;
            Some(url)
        }
        _ => None,
    }
}

/// A fresh PostgreSQL schema of its own for one test, so that tests never see each
/// other's rows (nor anything else on the server). Dropped by [`PgSchema::drop_schema`].
pub struct PgSchema {
    base_url: String,
    pub name: String,
    /// The server URL with `search_path` set to the schema: hand it to the code under test.
    pub url: String,
}

impl PgSchema {
    /// `None` when PostgreSQL is not reachable (see [`postgres_url`]).
    pub async fn create(tag: &str) -> Option<PgSchema> {
        use sqlx::Connection;
        let base_url = postgres_url().await?;
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "lgt_{}_{}_{n}_{}",
            tag.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(20)
                .collect::<String>()
                .to_ascii_lowercase(),
            std::process::id(),
            rand::random::<u32>()
        );
        let mut conn = sqlx::PgConnection::connect(&base_url).await.ok()?;
        if let Err(e) = sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await
        {
            panic!("CREATE SCHEMA {name}: {e}");
        }
        let _ = conn.close().await;
        let sep = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{sep}options=-c%20search_path%3D{name}");
        Some(PgSchema {
            base_url,
            name,
            url,
        })
    }

    /// Drops the schema and everything in it (best effort).
    pub async fn drop_schema(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.base_url).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}
