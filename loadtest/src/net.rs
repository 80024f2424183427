//! Client-side networking limits: the loopback-only guard on target URLs, raising
//! RLIMIT_NOFILE to the hard limit, and spreading connections over source addresses
//! 127.0.0.1..127.0.0.N (one source address only has ~28,000 ephemeral ports, so tens of
//! thousands of sockets need several), plus a tiny HTTP/1.1 GET for `/healthz` and the stats
//! endpoint (no HTTP client dependency needed for three requests).

use anyhow::{bail, Context, Result};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Hard caps: every run is bounded, whatever the flags say.
pub const MAX_CONNECTIONS: usize = 60_000;
pub const MAX_DURATION_S: u64 = 600;

/// A parsed `ws://host:port/path` target whose host is loopback.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Target {
    /// Parses a `ws://` URL and refuses any host outside 127.0.0.0/8, ::1 and localhost.
    /// There is deliberately no override.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .with_context(|| format!("target URL must start with ws:// or http://: {url}"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h.split_once(']').context("bad IPv6 host")?;
            (h.to_string(), p.trim_start_matches(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), "80"),
            }
        };
        let port: u16 = if port.is_empty() {
            80
        } else {
            port.parse().context("bad port")?
        };
        let ip = loopback_ip(&host)?;
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            host: hostport.to_string(),
            path,
        })
    }
}

/// The address of `host` when it is loopback (127.0.0.0/8, ::1 or localhost); an error for
/// anything else. There is deliberately no override.
fn loopback_ip(host: &str) -> Result<IpAddr> {
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(|| format!("host {host:?} is not an IP address or localhost"))?
    };
    if !ip.is_loopback() {
        bail!("refusing non-loopback target {host}: this harness only ever targets 127.0.0.0/8, ::1 or localhost");
    }
    Ok(ip)
}

/// Refuses a Redis URL (the verification connection) whose host is not loopback; a unix
/// socket is local and allowed.
pub fn check_redis_url(url: &str) -> Result<()> {
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => {
            loopback_ip(host).map(|_| ())
        }
        redis::ConnectionAddr::Unix(_) => Ok(()),
        other => bail!("refusing Redis address {other:?}: loopback only"),
    }
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.maximum.is_some() && lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Source address selection: connection `i` binds to 127.0.0.(1 + i % n).
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    pub n: u8,
}

impl Sources {
    /// Enough addresses for `conns` connections at ~20,000 per address (at least 1).
    pub fn for_connections(conns: usize, requested: Option<u8>) -> Self {
        let auto = (conns / 20_000 + 1).min(250) as u8;
        Self {
            n: requested.unwrap_or(auto).max(1),
        }
    }

    /// Opens a TCP connection to `target`, bound to the source address for index `i`
    /// (bind before connect; only for IPv4 targets).
    pub async fn connect(&self, i: usize, target: SocketAddr) -> Result<TcpStream> {
        let stream = match target {
            SocketAddr::V4(_) => {
                let sock = TcpSocket::new_v4()?;
                let src = Ipv4Addr::new(127, 0, 0, 1 + (i % self.n as usize) as u8);
                sock.bind(SocketAddr::new(IpAddr::V4(src), 0))
                    .with_context(|| format!("bind {src}"))?;
                sock.connect(target).await?
            }
            SocketAddr::V6(_) => TcpStream::connect(target).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A minimal HTTP/1.1 GET (Connection: close); returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let body = match text.split_once("\r\n\r\n") {
            Some((head, body))
                if head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked") =>
            {
                dechunk(body)
            }
            Some((_, body)) => body.to_string(),
            None => String::new(),
        };
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("HTTP GET timed out")?
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// WebSocket settings for every harness socket (livegate and NATS alike): a 4 KiB read
/// buffer instead of tungstenite's eager 128 KiB (10,000 sockets would otherwise cost the
/// harness 1.3 GB), and frames written straight away.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Resident set size of a process in bytes, from /proc/<pid>/status (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(Target::parse("ws://127.0.0.1:8080/ws").is_ok());
        assert!(Target::parse("ws://127.3.2.1:1/ws").is_ok());
        assert!(Target::parse("ws://localhost:8080/ws").is_ok());
        assert!(Target::parse("ws://[::1]:8080/ws").is_ok());
        assert!(Target::parse("ws://10.0.0.1:8080/ws").is_err());
        assert!(Target::parse("ws://example.com/ws").is_err());
        assert!(Target::parse("wss://127.0.0.1/ws").is_err());
        assert!(Target::parse("ws://127.0.0.1.evil.com/ws").is_err());
        assert!(check_redis_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_redis_url("redis://localhost:6379/0").is_ok());
        assert!(check_redis_url("redis://:pw@[::1]:6379").is_ok());
        assert!(check_redis_url("redis://10.0.0.1:6379").is_err());
        assert!(check_redis_url("redis://cache.example.com:6379").is_err());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn source_addresses() {
        assert_eq!(Sources::for_connections(100, None).n, 1);
        assert_eq!(Sources::for_connections(45_000, None).n, 3);
        assert_eq!(Sources::for_connections(10, Some(4)).n, 4);
    }
}
