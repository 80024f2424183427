//! A plain TCP connection to Redis of its own, with a small hand-written RESP2 reader, for
//! the two hot paths where redis-rs's reply parsing was measured to cost too much: the
//! order writer's `XREADGROUP` reads (`order_writer::resp`) and the committer's
//! transactions (`commit`). docs/benchmarks.md has the profiles.
//!
//! It owns the connection (plain TCP, AUTH and SELECT as the URL says), its read buffer,
//! and the generic reading of replies: a cheap skim until a reply is complete, then the
//! caller's walk. A caller that stops waiting (a timeout) leaves the connection owing the
//! replies to what it sent; the next exchange reads them off before it sends anything, so
//! requests on one connection are answered, and executed by Redis, strictly in order (a
//! probe sent after a timed-out write is run after that write, if the write runs at all).
//! It does not reconnect by itself (a caller resets it after an I/O or parse error and
//! connects again when it next needs it) and knows nothing of what the commands mean. With
//! a stall limit (the committer's), a connection learns at connect who it is in Redis
//! (`INFO` run_id, `CLIENT INFO` id and address) and whether it may end connections; given
//! up while it may still carry a request Redis could run later (one that owes replies), it
//! is then *fenced* before its successor sends anything: the successor's first command is
//! `CLIENT KILL ID .. ADDR ..` of the old connection, or nothing when Redis has restarted
//! since (a new run_id: the old connection died with the old process). So the order "a probe
//! runs after the write it asks about" holds across connections too, which lets the caller
//! give up on a connection stalled past the limit (a connection or network path gone silent)
//! instead of waiting for the kernel to notice. A connection that could not learn this
//! (no limit, or no permission) is dropped unfenced after an error, and waited for, not
//! replaced, when it stalls. It
//! must not panic on any bytes: lengths and counts are checked, never trusted for
//! allocation, and nesting is bounded; a malformed reply is a `Parse` error, after which
//! the caller drops the connection. Other URLs (TLS, Unix sockets) are not handled here:
//! `RawConn::for_client` answers `None` and the callers stay on redis-rs.

use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ErrorKind, RedisError, RedisResult};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The longest reply accepted (the replies read here are far smaller); past it the reply is
/// treated as garbage rather than buffered without end.
const MAX_REPLY_BYTES: usize = 256 << 20;
/// How long connecting (and logging in) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP keepalive: idle time before the first probe, and between probes. Keeps NAT and
/// firewall state alive through the quiet hours before a sale, and lets the kernel notice a
/// peer that vanished while the connection was idle.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A client id no Redis hands out (ids count up from 1): `CLIENT KILL ID` of it answers
/// `0` where the command is allowed, which is how a connection learns it can fence.
const NO_SUCH_CLIENT: &[u8] = b"9223372036854775807";

/// Where and how to connect (taken from a redis-rs client), and the connection once made.
#[derive(Debug)]
pub(crate) struct RawConn {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
    /// Replies still owed to a request whose caller stopped waiting; read off (into `buf`,
    /// which may already hold part of them) before the next request is sent.
    owed: usize,
    /// A write was interrupted: the connection holds part of a request and is unusable.
    writing: bool,
    /// Requests whose writing has begun, ever (so a caller can tell whether its request
    /// went out before it stopped waiting).
    sent: u64,
    /// When the replies now owed were first owed.
    owed_since: Option<Instant>,
    /// Give up on a connection that has owed replies this long (`None`: wait for them, as
    /// long as the kernel keeps the connection).
    stall_limit: Option<Duration>,
    /// Who this connection is in Redis, when Redis told it and lets this user end
    /// connections (`CLIENT KILL`): only then can it be fenced once given up.
    fence_id: Option<Fence>,
    /// A connection given up while it owed replies: ended by `CLIENT KILL` on the next
    /// connection before that one sends anything. At most one: a connection is only used
    /// once the fence before it is done.
    unfenced: Option<Fence>,
}

/// A connection as Redis knows it: the server process (`run_id`, so a fence after a
/// restart, where ids start again from 1, ends nobody) and the connection's id and
/// address there (both must match, so the kill can only end that one connection).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fence {
    run_id: String,
    id: String,
    addr: String,
}

impl RawConn {
    /// A connection to the client's Redis, or `None` when its address is not plain TCP.
    pub(crate) fn for_client(client: &redis::Client) -> Option<RawConn> {
        let info = client.get_connection_info();
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return None;
        };
        let settings = info.redis_settings();
        Some(RawConn {
            host: host.clone(),
            port: *port,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
            conn: None,
            buf: Vec::new(),
            owed: 0,
            writing: false,
            sent: 0,
            owed_since: None,
            stall_limit: None,
            fence_id: None,
            unfenced: None,
        })
    }

    /// Gives up on a connection that has owed replies for `limit` (checked when it is next
    /// needed), fencing it off before its successor is used. Without a limit a connection
    /// waits for what it is owed as long as the kernel keeps it open.
    pub(crate) fn with_stall_limit(mut self, limit: Duration) -> RawConn {
        self.stall_limit = Some(limit);
        self
    }

    /// Requests whose writing has begun so far (see [`RawConn::exchange`]).
    pub(crate) fn requests_sent(&self) -> u64 {
        self.sent
    }

    /// Forgets the connection (after an I/O or parse error: its state is unknown). If it
    /// may still carry a request Redis has not run, the next connection fences it first.
    pub(crate) fn reset(&mut self) {
        if self.conn.is_some() && (self.owed > 0 || self.writing) {
            if let Some(f) = self.fence_id.take() {
                self.unfenced = Some(f);
            }
        }
        self.conn = None;
        self.buf = Vec::new();
        self.owed = 0;
        self.owed_since = None;
        self.writing = false;
        self.fence_id = None;
    }

    /// Whether the connection has owed replies past the stall limit and can be fenced.
    fn stalled(&self) -> bool {
        self.owed > 0
            && self.fence_id.is_some()
            && self
                .stall_limit
                .zip(self.owed_since)
                .is_some_and(|(limit, since)| since.elapsed() >= limit)
    }

    /// Connects and logs in, within `CONNECT_TIMEOUT`, unless already connected (a
    /// connection left holding part of a request is replaced).
    pub(crate) async fn ensure_connected(&mut self) -> RedisResult<()> {
        if self.writing {
            // The request was cut short, so Redis never got all of it (a request ends with
            // its last command's last byte): dropping the connection loses nothing sent.
            self.reset();
        }
        if self.stalled() {
            tracing::warn!(
                owed = self.owed,
                "redis has not answered this connection for too long: replacing it"
            );
            metrics::counter!(crate::metrics::REDIS_STALLED_REPLACED).increment(1);
            self.reset();
        }
        if self.conn.is_some() {
            return Ok(());
        }
        let (conn, fence_id) = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to redis timed out",
                )))
            }
        };
        self.conn = Some(conn);
        self.fence_id = fence_id;
        self.unfenced = None;
        Ok(())
    }

    /// Writes `request` (commands answered by `replies` replies in all) and reads until
    /// `parse` says the reply is complete. First reads off the replies still owed to an
    /// earlier request whose caller stopped waiting. Needs a connection
    /// (`ensure_connected`). The caller bounds the time (dropping this future at any point
    /// leaves the connection consistent: owing, or marked cut short) and resets after an
    /// error.
    pub(crate) async fn exchange<T>(
        &mut self,
        request: &[u8],
        replies: usize,
        parse: impl Fn(&[u8]) -> Parsed<T>,
    ) -> RedisResult<T> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RedisError::from((ErrorKind::Client, "not connected")));
        };
        if self.owed > 0 {
            read_reply(conn, &mut self.buf, |b| skim_replies(b, self.owed)).await?;
            self.owed = 0;
            self.owed_since = None;
        }
        self.buf.clear();
        self.sent += 1;
        self.writing = true;
        conn.write_all(request).await?;
        self.writing = false;
        self.owed = replies;
        self.owed_since = Some(Instant::now());
        let r = read_reply(conn, &mut self.buf, parse).await;
        if r.is_ok() || r.as_ref().is_err_and(|e| e.kind() == ErrorKind::Extension) {
            // Answered in full (a server error is a whole reply too).
            self.owed = 0;
            self.owed_since = None;
        }
        // Give back a buffer grown by an unusually large reply.
        if self.buf.capacity() > 4 << 20 && self.owed == 0 {
            self.buf = Vec::new();
        }
        r
    }

    /// Connects, logs in, and fences off the connection given up before (if any). Returns
    /// the connection and, when it has a stall limit and Redis allows it, who it is in
    /// Redis, for a later fence.
    async fn connect(&self) -> RedisResult<(TcpStream, Option<Fence>)> {
        let mut conn = TcpStream::connect((self.host.as_str(), self.port)).await?;
        conn.set_nodelay(true)?;
        SockRef::from(&conn).set_tcp_keepalive(&keepalive())?;
        let mut buf = Vec::new();
        if let Some(password) = &self.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            call(&mut conn, &mut buf, &args, parse_ok).await?;
        }
        if self.db != 0 {
            let db = self.db.to_string();
            call(&mut conn, &mut buf, &[b"SELECT", db.as_bytes()], parse_ok).await?;
        }
        if self.stall_limit.is_none() && self.unfenced.is_none() {
            return Ok((conn, None));
        }
        // Any error here fails the connect (retried when next needed): with a fence owed,
        // nothing may go out before it; without one, a connection that cannot learn who it
        // is would be waited for, not replaced, for its whole life.
        let info = call(&mut conn, &mut buf, &[b"INFO", b"server"], parse_text).await;
        let run_id = match info {
            Ok(text) => field(&text, "run_id:", '\n').map(str::to_string),
            Err(e) if !refused(&e) => return Err(e),
            Err(_) => None,
        };
        if let Some(old) = &self.unfenced {
            // Nothing goes out on this connection before the old one can run nothing more:
            // Redis either ran what the old one carried already (the probes that follow
            // see it) or drops it with the connection. 0 (already gone) is as good as 1.
            match run_id.as_deref() {
                Some(now) if now == old.run_id => {
                    let kill = [
                        b"CLIENT".as_slice(),
                        b"KILL",
                        b"ID",
                        old.id.as_bytes(),
                        b"ADDR",
                        old.addr.as_bytes(),
                    ];
                    let killed = call(&mut conn, &mut buf, &kill, parse_int).await?;
                    tracing::info!(
                        client = %old.id,
                        killed,
                        "fenced off the redis connection given up before"
                    );
                }
                Some(_) => tracing::info!(
                    client = %old.id,
                    "redis restarted since the connection was given up: it ended with it"
                ),
                None => {
                    return Err(RedisError::from((
                        ErrorKind::Client,
                        "cannot tell whether redis restarted (INFO refused); not fencing blind",
                    )))
                }
            }
        }
        let fence = match (self.stall_limit, run_id) {
            (Some(_), Some(run_id)) => self.fence_of(&mut conn, &mut buf, run_id).await?,
            (Some(_), None) => {
                tracing::warn!(
                    "INFO refused: a stalled redis connection will be waited for, not replaced"
                );
                None
            }
            (None, _) => None,
        };
        Ok((conn, fence))
    }

    /// Who this connection is in Redis, if Redis tells it and lets this user end
    /// connections (checked by ending one that cannot exist); `None` when not allowed, and
    /// a stalled connection is then waited for rather than replaced. Other errors fail.
    async fn fence_of(
        &self,
        conn: &mut TcpStream,
        buf: &mut Vec<u8>,
        run_id: String,
    ) -> RedisResult<Option<Fence>> {
        let not_allowed = |e: &RedisError| {
            tracing::warn!(error = %e, "CLIENT INFO or CLIENT KILL not allowed: a stalled redis connection will be waited for, not replaced");
        };
        let me = match call(conn, buf, &[b"CLIENT", b"INFO"], parse_text).await {
            Ok(text) => text,
            Err(e) if refused(&e) => {
                not_allowed(&e);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let (Some(id), Some(addr)) = (field(&me, "id=", ' '), field(&me, "addr=", ' ')) else {
            return Err(RedisError::from((
                ErrorKind::Parse,
                "CLIENT INFO without id= and addr=",
            )));
        };
        let fence = Fence {
            run_id,
            id: id.to_string(),
            addr: addr.to_string(),
        };
        let check = [b"CLIENT".as_slice(), b"KILL", b"ID", NO_SUCH_CLIENT];
        match call(conn, buf, &check, parse_int).await {
            Ok(_) => Ok(Some(fence)),
            Err(e) if refused(&e) => {
                not_allowed(&e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// TCP keepalive for livegate's connections to Redis.
pub(crate) fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
}

/// A redis-rs client for `url` whose TCP connections send keepalives (redis-rs sends none
/// by default).
pub(crate) fn client(url: &str) -> RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let tcp = info.tcp_settings().clone().set_keepalive(keepalive());
    redis::Client::open(info.set_tcp_settings(tcp))
}

/// Whether Redis refused a command for good (no permission, or a command this server does
/// not have), as opposed to a passing error such as `BUSY` or `LOADING`.
fn refused(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Extension
        && e.detail().is_some_and(|d| {
            d.starts_with("NOPERM")
                || d.contains("unknown command")
                || d.contains("unknown subcommand")
        })
}

/// The value after `key` in `text`, up to `end` (a `key:value` line of INFO, a `key=value`
/// word of CLIENT INFO).
fn field<'a>(text: &'a str, key: &str, end: char) -> Option<&'a str> {
    text.split(['\n', end])
        .find_map(|part| part.trim().strip_prefix(key))
        .filter(|v| !v.is_empty())
}

/// Sends one command and reads its reply (for the login, not the hot path).
async fn call<T>(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    args: &[&[u8]],
    parse: impl Fn(&[u8]) -> Parsed<T>,
) -> RedisResult<T> {
    conn.write_all(&encode(args)).await?;
    buf.clear();
    read_reply(conn, buf, parse).await
}

/// Reads into `buf` (kept between replies, so its memory is reused) until `parse` finds
/// what it needs. The first reply is skimmed for completeness first (copy-free), so a
/// large reply is walked once, not once per read.
async fn read_reply<T>(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Parsed<T>,
) -> RedisResult<T> {
    loop {
        let complete = {
            let mut c = Cursor { b: buf, at: 0 };
            skim(&mut c, 0)
        };
        let parsed = match complete {
            Ok(()) | Err(Some(_)) => parse(buf),
            Err(None) => Parsed::Incomplete,
        };
        match parsed {
            Parsed::Done(v) => return Ok(v),
            Parsed::ServerError(msg) => {
                return Err(RedisError::from((
                    ErrorKind::Extension,
                    "server error",
                    msg,
                )))
            }
            Parsed::Bad(why) => return Err(RedisError::from((ErrorKind::Parse, "bad reply", why))),
            Parsed::Incomplete => {}
        }
        if buf.len() > MAX_REPLY_BYTES {
            return Err(RedisError::from((ErrorKind::Parse, "reply too large")));
        }
        buf.reserve(64 * 1024);
        if conn.read_buf(buf).await? == 0 {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            )));
        }
    }
}

/// A command as a RESP array of bulk strings.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What a parse of the buffer found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed<T> {
    Done(T),
    /// More bytes are needed.
    Incomplete,
    /// The server answered `-ERR ...`.
    ServerError(String),
    /// Not a reply of the expected shape.
    Bad(String),
}

impl<T> Parsed<T> {
    /// A walk's result as a parse: `Err(None)` is incomplete, `Err(Some)` malformed.
    pub(crate) fn from_step(s: Step<T>) -> Parsed<T> {
        match s {
            Ok(v) => Parsed::Done(v),
            Err(None) => Parsed::Incomplete,
            Err(Some(why)) => Parsed::Bad(why),
        }
    }
}

/// A cursor over the reply bytes; every read checks its bounds (`None`: need more bytes).
pub(crate) struct Cursor<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) at: usize,
}

/// One step of a walk: `Err(None)` = incomplete, `Err(Some(why))` = malformed.
pub(crate) type Step<T> = Result<T, Option<String>>;

impl<'a> Cursor<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Cursor<'a> {
        Cursor { b, at: 0 }
    }

    /// The next line (without its CRLF).
    pub(crate) fn line(&mut self) -> Step<&'a [u8]> {
        let rest = self.b.get(self.at..).ok_or(None)?;
        // Header lines hold no CR of their own: the first CR ends the line.
        let end = rest.iter().position(|&c| c == b'\r').ok_or(None)?;
        match rest.get(end + 1) {
            Some(b'\n') => {}
            Some(_) => return Err(Some("CR without LF".into())),
            None => return Err(None),
        }
        self.at += end + 2;
        Ok(&rest[..end])
    }

    /// A header line `<t><int>`: returns (type byte, integer). `-` lines are errors.
    fn header(&mut self) -> Step<(u8, i64)> {
        let line = self.line()?;
        let (&t, num) = line
            .split_first()
            .ok_or_else(|| Some("empty line".to_string()))?;
        if t == b'-' {
            return Err(Some(format!(
                "server error: {}",
                String::from_utf8_lossy(num)
            )));
        }
        let n = std::str::from_utf8(num)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| Some(format!("bad header {:?}", String::from_utf8_lossy(line))))?;
        Ok((t, n))
    }

    /// An array header: `Some(len)`, or `None` for the nil array `*-1`.
    pub(crate) fn array(&mut self) -> Step<Option<usize>> {
        match self.header()? {
            (b'*', -1) => Ok(None),
            (b'*', n) if n >= 0 => Ok(Some(n as usize)),
            (t, n) => Err(Some(format!("expected an array, got {}{n}", t as char))),
        }
    }

    /// A bulk string (or a simple string / integer, as bytes).
    pub(crate) fn bulk(&mut self) -> Step<&'a [u8]> {
        let start = self.at;
        let line = self.line()?;
        match line.first() {
            Some(b'$') => {
                let n = std::str::from_utf8(&line[1..])
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or_else(|| Some("bad bulk length".to_string()))?;
                let body_end = self.at.checked_add(n);
                let Some(end) = body_end.and_then(|e| e.checked_add(2)) else {
                    return Err(Some("bulk length overflows".into()));
                };
                let (Some(body), Some(crlf)) = (
                    body_end.and_then(|e| self.b.get(self.at..e)),
                    body_end.and_then(|e| self.b.get(e..end)),
                ) else {
                    self.at = start;
                    return Err(None);
                };
                if crlf != b"\r\n" {
                    return Err(Some("bulk string not followed by CRLF".into()));
                }
                self.at = end;
                Ok(body)
            }
            Some(b'+') | Some(b':') => Ok(&line[1..]),
            Some(b'-') => Err(Some(format!(
                "server error: {}",
                String::from_utf8_lossy(&line[1..])
            ))),
            _ => Err(Some(format!(
                "expected a string, got {:?}",
                String::from_utf8_lossy(line)
            ))),
        }
    }

    /// The type byte of the next value, if any byte is there.
    pub(crate) fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }
}

/// Deepest nesting of a reply skimmed (an `XREADGROUP` reply is 4 arrays deep).
const MAX_DEPTH: usize = 8;

/// Walks one whole RESP2 value of any shape without copying: `Ok` once the buffer holds
/// all of it. Every step consumes bytes and the depth is bounded, so it ends.
pub(crate) fn skim(c: &mut Cursor<'_>, depth: usize) -> Step<()> {
    if depth > MAX_DEPTH {
        return Err(Some("reply nested too deep".into()));
    }
    match c.b.get(c.at) {
        None => Err(None),
        Some(b'*') => match c.array()? {
            None => Ok(()),
            Some(n) => {
                for _ in 0..n {
                    skim(c, depth + 1)?;
                }
                Ok(())
            }
        },
        Some(b'$') if c.b.get(c.at..).is_some_and(|r| r.starts_with(b"$-1\r\n")) => {
            // The nil bulk string.
            c.at += 5;
            Ok(())
        }
        Some(b'$' | b'+' | b':') => c.bulk().map(|_| ()),
        Some(b'-') => c.line().map(|_| ()),
        Some(other) => Err(Some(format!("unexpected reply type {:?}", *other as char))),
    }
}

/// A reply that is a server error (`-ERR ...`), as a parse; `None` for any other reply.
pub(crate) fn server_error<T>(b: &[u8]) -> Option<Parsed<T>> {
    if b.first() != Some(&b'-') {
        return None;
    }
    Some(match Cursor::new(b).line() {
        Ok(l) => Parsed::ServerError(String::from_utf8_lossy(&l[1..]).into_owned()),
        Err(None) => Parsed::Incomplete,
        Err(Some(why)) => Parsed::Bad(why),
    })
}

/// A reply that is one line: `-ERR ...` is a server error, anything else goes to `f`.
fn one_line<T>(b: &[u8], f: impl Fn(&[u8]) -> Parsed<T>) -> Parsed<T> {
    if let Some(e) = server_error(b) {
        return e;
    }
    match Cursor::new(b).line() {
        Err(None) => Parsed::Incomplete,
        Err(Some(why)) => Parsed::Bad(why),
        Ok(l) => f(l),
    }
}

/// `n` whole replies of any shape, read off and dropped.
fn skim_replies(b: &[u8], n: usize) -> Parsed<()> {
    let mut c = Cursor::new(b);
    for _ in 0..n {
        if let Err(e) = skim(&mut c, 0) {
            return Parsed::from_step(Err(e));
        }
    }
    Parsed::Done(())
}

/// `+OK` (AUTH, SELECT).
pub(crate) fn parse_ok(b: &[u8]) -> Parsed<()> {
    one_line(b, |l| {
        if l.first() == Some(&b'+') {
            Parsed::Done(())
        } else {
            Parsed::Bad(format!(
                "expected +OK, got {:?}",
                String::from_utf8_lossy(l)
            ))
        }
    })
}

/// `:<n>` (HEXISTS and the like).
/// A bulk or simple string reply, as text.
pub(crate) fn parse_text(b: &[u8]) -> Parsed<String> {
    if let Some(e) = server_error(b) {
        return e;
    }
    Parsed::from_step(
        Cursor::new(b)
            .bulk()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
    )
}

pub(crate) fn parse_int(b: &[u8]) -> Parsed<i64> {
    one_line(b, |l| {
        match l
            .strip_prefix(b":")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<i64>().ok())
        {
            Some(n) => Parsed::Done(n),
            None => Parsed::Bad(format!(
                "expected an integer, got {:?}",
                String::from_utf8_lossy(l)
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_a_connection_is_reads_from_info_and_client_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:ab12cd\r\ntcp_port:6379\r\n";
        assert_eq!(field(info, "run_id:", '\n'), Some("ab12cd"));
        assert_eq!(field(info, "missing:", '\n'), None);
        let me = "id=7 addr=127.0.0.1:50000 laddr=127.0.0.1:6379 fd=8 name= age=0\n";
        assert_eq!(field(me, "id=", ' '), Some("7"));
        assert_eq!(field(me, "addr=", ' '), Some("127.0.0.1:50000"));
        // An empty value is no value.
        assert_eq!(field(me, "name=", ' '), None);
        assert_eq!(
            parse_text(b"$6\r\nid=7 a\r\n"),
            Parsed::Done("id=7 a".to_string())
        );
        assert_eq!(parse_text(b"$6\r\nid="), Parsed::Incomplete);
        assert!(matches!(
            parse_text(b"-NOPERM no\r\n"),
            Parsed::ServerError(_)
        ));
    }

    #[test]
    fn only_lasting_refusals_turn_fencing_off() {
        let server =
            |msg: &str| RedisError::from((ErrorKind::Extension, "server error", msg.to_string()));
        assert!(refused(&server(
            "NOPERM this user has no permissions to run the 'client|kill' command"
        )));
        assert!(refused(&server(
            "ERR unknown subcommand 'INFO'. Try CLIENT HELP."
        )));
        assert!(refused(&server("ERR unknown command 'CLIENT'")));
        assert!(!refused(&server("BUSY Redis is busy running a script.")));
        assert!(!refused(&server(
            "LOADING Redis is loading the dataset in memory"
        )));
        assert!(!refused(&RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset"
        ))));
    }

    #[test]
    fn one_line_replies() {
        assert_eq!(parse_ok(b"+OK\r\n"), Parsed::Done(()));
        assert_eq!(parse_ok(b"+OK"), Parsed::Incomplete);
        assert!(matches!(
            parse_ok(b"-WRONGPASS\r\n"),
            Parsed::ServerError(_)
        ));
        assert!(matches!(parse_ok(b":1\r\n"), Parsed::Bad(_)));
        assert_eq!(parse_int(b":1\r\n"), Parsed::Done(1));
        assert_eq!(parse_int(b":-42\r\n"), Parsed::Done(-42));
        assert_eq!(parse_int(b":1"), Parsed::Incomplete);
        assert!(matches!(parse_int(b"+OK\r\n"), Parsed::Bad(_)));
        assert!(matches!(parse_int(b":x\r\n"), Parsed::Bad(_)));
        assert!(matches!(
            parse_int(b"-ERR wrong\r\n"),
            Parsed::ServerError(_)
        ));
    }

    #[test]
    fn hostile_counts_and_nesting_end_without_panic() {
        // A count far beyond the bytes: incomplete, no huge allocation.
        let mut c = Cursor::new(b"*4611686018427387904\r\n");
        assert_eq!(skim(&mut c, 0), Err(None));
        // Deep nesting is refused before the stack is.
        let deep = "*1\r\n".repeat(100_000);
        let mut c = Cursor::new(deep.as_bytes());
        assert!(matches!(skim(&mut c, 0), Err(Some(_))));
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        assert_eq!(
            encode(&[b"SELECT", b"2"]),
            b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n".to_vec()
        );
    }
}
