//! The order writer's stream reads over a plain TCP connection of its own, with a small
//! hand-written RESP2 reader for `XREADGROUP` replies.
//!
//! Why: in a sustained rush the events stream carries tens of thousands of `reserved`
//! entries a second, every one of which the writer must read through its group only to
//! skip it. Parsed by redis-rs's parser-combinator grammar (about 150 ns a value, 20
//! values an entry), that was 23 % of the gateway's CPU (docs/benchmarks.md). This reader
//! skims the reply bytes until the reply is complete (no copies), then walks it once,
//! copying only `kind` of an entry that is not an order.
//!
//! It owns one connection (plain TCP, AUTH and SELECT as the URL says) and nothing else:
//! every other command of the writer stays on redis-rs. It must not panic on any bytes
//! (lengths and counts are checked, never trusted for allocation): a malformed reply is a
//! `Parse` error, after which the connection is dropped.

use std::time::Duration;

use redis::{ConnectionAddr, ErrorKind, RedisError, RedisResult};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::decode::{Entry, Fields};

/// The longest reply accepted (a batch of entries is far smaller); past it the reply is
/// treated as garbage rather than buffered without end.
const MAX_REPLY_BYTES: usize = 256 << 20;
/// How long connecting (and logging in) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to connect: taken from the writer's redis-rs client.
#[derive(Debug)]
pub(crate) struct RawReader {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl RawReader {
    /// A reader for the client's Redis, or `None` when its address is not plain TCP (TLS or
    /// a Unix socket: the writer then reads through redis-rs as before).
    pub(crate) fn for_client(client: &redis::Client) -> Option<RawReader> {
        let info = client.get_connection_info();
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return None;
        };
        let settings = info.redis_settings();
        Some(RawReader {
            host: host.clone(),
            port: *port,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
            conn: None,
            buf: Vec::new(),
        })
    }

    /// Forgets the connection (after any error: the next read reconnects).
    pub(crate) fn reset(&mut self) {
        self.conn = None;
        self.buf = Vec::new();
    }

    /// Gives back a read buffer grown by an unusually large reply.
    fn shrink(&mut self) {
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
    }

    /// Sends `args` (an `XREADGROUP ...` command) and returns its entries, waiting at most
    /// `timeout` for the connection and for the whole reply.
    pub(crate) async fn read_group(
        &mut self,
        args: &[&[u8]],
        timeout: Duration,
    ) -> RedisResult<Vec<Entry>> {
        let r = tokio::time::timeout(timeout, self.round_trip(args)).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no reply to XREADGROUP in time",
            ))),
        };
        if r.is_err() {
            self.reset();
        }
        r
    }

    async fn round_trip(&mut self, args: &[&[u8]]) -> RedisResult<Vec<Entry>> {
        if self.conn.is_none() {
            let conn = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
                Ok(conn) => conn?,
                Err(_) => {
                    return Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting to redis timed out",
                    )))
                }
            };
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(RedisError::from((ErrorKind::Client, "not connected")));
        };
        conn.write_all(&encode(args)).await?;
        self.buf.clear();
        let entries = read_reply(conn, &mut self.buf, parse_read_reply).await;
        self.shrink();
        entries
    }

    async fn connect(&self) -> RedisResult<TcpStream> {
        let mut conn = TcpStream::connect((self.host.as_str(), self.port)).await?;
        conn.set_nodelay(true)?;
        let mut buf = Vec::new();
        if let Some(password) = &self.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            conn.write_all(&encode(&args)).await?;
            read_reply(&mut conn, &mut buf, parse_ok).await?;
        }
        if self.db != 0 {
            let db = self.db.to_string();
            conn.write_all(&encode(&[b"SELECT", db.as_bytes()])).await?;
            buf.clear();
            read_reply(&mut conn, &mut buf, parse_ok).await?;
        }
        Ok(conn)
    }
}

/// Reads into `buf` (kept between replies, so its memory is reused) until it holds one
/// complete reply (a cheap skim, repeated after each read), then lets `parse` walk it.
async fn read_reply<T>(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: fn(&[u8]) -> Parsed<T>,
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
fn encode(args: &[&[u8]]) -> Vec<u8> {
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
enum Parsed<T> {
    Done(T),
    /// More bytes are needed.
    Incomplete,
    /// The server answered `-ERR ...`.
    ServerError(String),
    /// Not a reply of the expected shape.
    Bad(String),
}

/// A cursor over the reply bytes; every read checks its bounds (`None`: need more bytes).
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

/// One step of the walk: `Err(None)` = incomplete, `Err(Some(why))` = malformed.
type Step<T> = Result<T, Option<String>>;

impl<'a> Cursor<'a> {
    /// The next line (without its CRLF).
    fn line(&mut self) -> Step<&'a [u8]> {
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
    fn array(&mut self) -> Step<Option<usize>> {
        match self.header()? {
            (b'*', -1) => Ok(None),
            (b'*', n) if n >= 0 => Ok(Some(n as usize)),
            (t, n) => Err(Some(format!("expected an array, got {}{n}", t as char))),
        }
    }

    /// A bulk string (or a simple string / integer, as bytes).
    fn bulk(&mut self) -> Step<&'a [u8]> {
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
}

/// Deepest nesting of a reply skimmed (an `XREADGROUP` reply is 4 arrays deep).
const MAX_DEPTH: usize = 8;

/// Walks one whole RESP2 value of any shape without copying: `Ok` once the buffer holds
/// all of it. Every step consumes bytes and the depth is bounded, so it ends.
fn skim(c: &mut Cursor<'_>, depth: usize) -> Step<()> {
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
        Some(b'$' | b'+' | b':') => c.bulk().map(|_| ()),
        Some(b'-') => c.line().map(|_| ()),
        Some(other) => Err(Some(format!("unexpected reply type {:?}", *other as char))),
    }
}

/// `+OK` (AUTH, SELECT).
fn parse_ok(b: &[u8]) -> Parsed<()> {
    let mut c = Cursor { b, at: 0 };
    match c.line() {
        Err(None) => Parsed::Incomplete,
        Err(Some(why)) => Parsed::Bad(why),
        Ok(l) if l.first() == Some(&b'-') => {
            Parsed::ServerError(String::from_utf8_lossy(&l[1..]).into_owned())
        }
        Ok(l) if l.first() == Some(&b'+') => Parsed::Done(()),
        Ok(l) => Parsed::Bad(format!(
            "expected +OK, got {:?}",
            String::from_utf8_lossy(l)
        )),
    }
}

/// An `XREADGROUP` reply (RESP2): nil (the block timed out) or
/// `[[stream, [[id, [field, value, ...] | nil], ...]], ...]`.
fn parse_read_reply(b: &[u8]) -> Parsed<Vec<Entry>> {
    if b.first() == Some(&b'-') {
        let mut c = Cursor { b, at: 0 };
        return match c.line() {
            Ok(l) => Parsed::ServerError(String::from_utf8_lossy(&l[1..]).into_owned()),
            Err(None) => Parsed::Incomplete,
            Err(Some(why)) => Parsed::Bad(why),
        };
    }
    let mut c = Cursor { b, at: 0 };
    match walk(&mut c) {
        Ok(entries) => Parsed::Done(entries),
        Err(None) => Parsed::Incomplete,
        Err(Some(why)) => Parsed::Bad(why),
    }
}

fn walk(c: &mut Cursor<'_>) -> Step<Vec<Entry>> {
    let Some(streams) = c.array()? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for _ in 0..streams {
        if c.array()? != Some(2) {
            return Err(Some("a stream is not [key, entries]".into()));
        }
        c.bulk()?; // the stream's key
        let Some(n) = c.array()? else {
            continue;
        };
        // A count is never trusted for allocation: an entry takes at least 4 bytes.
        out.reserve(n.min(c.b.len().saturating_sub(c.at) / 4));
        for _ in 0..n {
            match c.array()? {
                // Not expected from XREADGROUP (XAUTOCLAIM of Redis 6.2 reports deleted
                // entries so); skipped like decode::parse_entries does.
                None => continue,
                Some(2) => {}
                Some(k) => return Err(Some(format!("an entry of {k} parts"))),
            }
            let id = std::str::from_utf8(c.bulk()?)
                .map_err(|_| Some("entry id is not UTF-8".to_string()))?
                .to_string();
            let fields = match c.array()? {
                None => None,
                Some(k) if k % 2 != 0 => return Err(Some("odd number of field values".into())),
                Some(k) => Some(fields(c, k / 2)?),
            };
            out.push(Entry { id, fields });
        }
    }
    Ok(out)
}

/// The `pairs` field/value pairs of one entry; of an entry that is not an `order`, only
/// `kind` (the writer skips it), as `decode::fields_of` does for redis-rs values.
fn fields(c: &mut Cursor<'_>, pairs: usize) -> Step<Fields> {
    // First pass: find `kind`, copying nothing.
    let start = c.at;
    let mut kind = None;
    for _ in 0..pairs {
        let k = c.bulk()?;
        let v = c.bulk()?;
        if kind.is_none() && k == b"kind" {
            kind = Some(v);
        }
    }
    if let Some(kind) = kind.filter(|k| *k != b"order") {
        return Ok(vec![(b"kind".to_vec(), kind.to_vec())]);
    }
    // An order (or an entry without a kind, for the dead letters): every field.
    c.at = start;
    let mut out = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let k = c.bulk()?.to_vec();
        let v = c.bulk()?.to_vec();
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> String {
        format!("${}\r\n{s}\r\n", s.len())
    }

    fn reply() -> Vec<u8> {
        let order = ["kind", "order", "order", "o-1", "items", "[{\"a\":1}]"];
        let reserved = ["kind", "reserved", "user", "u", "qty", "1", "at", "17"];
        let mut s = String::from("*1\r\n*2\r\n");
        s += &bulk("p:events");
        s += "*3\r\n";
        s += "*2\r\n";
        s += &bulk("1-0");
        s += &format!("*{}\r\n", reserved.len());
        for f in reserved {
            s += &bulk(f);
        }
        s += "*2\r\n";
        s += &bulk("2-0");
        s += &format!("*{}\r\n", order.len());
        for f in order {
            s += &bulk(f);
        }
        s += "*2\r\n";
        s += &bulk("3-0");
        s += "*-1\r\n";
        s.into_bytes()
    }

    #[test]
    fn a_reply_parses_with_only_kind_kept_of_other_entries() {
        let Parsed::Done(entries) = parse_read_reply(&reply()) else {
            panic!("{:?}", parse_read_reply(&reply()));
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(
            entries[0].fields,
            Some(vec![(b"kind".to_vec(), b"reserved".to_vec())])
        );
        assert_eq!(entries[1].id, "2-0");
        let order = entries[1].fields.as_ref().expect("fields");
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], (b"items".to_vec(), b"[{\"a\":1}]".to_vec()));
        assert_eq!(entries[2].fields, None, "deleted while pending");
        // What redis-rs's path makes of the same entries.
        assert_eq!(
            super::super::decode::decode(&entries[0]),
            super::super::decode::Decoded::Skip
        );
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete_never_wrong() {
        let r = reply();
        for cut in 0..r.len() {
            assert_eq!(
                parse_read_reply(&r[..cut]),
                Parsed::Incomplete,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn nil_errors_and_garbage() {
        assert_eq!(parse_read_reply(b"*-1\r\n"), Parsed::Done(Vec::new()));
        assert_eq!(
            parse_read_reply(b"-NOGROUP No such key\r\n"),
            Parsed::ServerError("NOGROUP No such key".into())
        );
        for bad in [
            &b"+OK\r\n"[..],
            b"*1\r\n*3\r\n",
            b"*1\r\n*2\r\n$1\r\nk\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n",
            b"*x\r\n",
            b"*1\r\n*2\r\n$1\r\nkXX",
            b"*1\r\n*2\r\n$99999999999999999999\r\n",
            // Lengths at the edge of usize: no overflow, no panic.
            b"*1\r\n*2\r\n$18446744073709551584\r\n",
            b"*1\r\n*2\r\n$18446744073709551615\r\n",
            b"+O\rK\r\n",
        ] {
            assert!(
                matches!(parse_read_reply(bad), Parsed::Bad(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse_read_reply(bad)
            );
        }
        assert_eq!(parse_ok(b"+OK\r\n"), Parsed::Done(()));
        assert_eq!(parse_ok(b"+OK"), Parsed::Incomplete);
        assert!(matches!(
            parse_ok(b"-WRONGPASS\r\n"),
            Parsed::ServerError(_)
        ));
    }

    #[test]
    fn hostile_counts_and_nesting_end_without_panic() {
        // A count far beyond the bytes: incomplete, no huge allocation.
        assert_eq!(
            parse_read_reply(b"*1\r\n*2\r\n$1\r\nk\r\n*4611686018427387904\r\n"),
            Parsed::Incomplete
        );
        let mut c = Cursor {
            b: b"*4611686018427387904\r\n",
            at: 0,
        };
        assert_eq!(skim(&mut c, 0), Err(None));
        // Deep nesting is refused before the stack is.
        let deep = "*1\r\n".repeat(100_000);
        let mut c = Cursor {
            b: deep.as_bytes(),
            at: 0,
        };
        assert!(matches!(skim(&mut c, 0), Err(Some(_))));
        assert!(matches!(parse_read_reply(deep.as_bytes()), Parsed::Bad(_)));
    }

    #[test]
    fn both_readers_make_the_same_entries() {
        let r = reply();
        let value = redis::parse_redis_value(&r).expect("redis-rs parses it");
        let via_redis_rs = super::super::decode::parse_read_reply(&value).expect("decode");
        let Parsed::Done(via_resp) = parse_read_reply(&r) else {
            panic!("resp.rs did not parse it");
        };
        assert_eq!(via_resp, via_redis_rs);
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        assert_eq!(
            encode(&[b"SELECT", b"2"]),
            b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n".to_vec()
        );
    }
}
