//! The order writer's stream reads over a plain TCP connection of its own
//! ([`crate::resp::RawConn`]), walking `XREADGROUP` replies by hand.
//!
//! Why: in a sustained rush the events stream carries tens of thousands of `reserved`
//! entries a second, every one of which the writer must read through its group only to
//! skip it. Parsed by redis-rs's parser-combinator grammar (about 150 ns a value, 20
//! values an entry), that was 23 % of the gateway's CPU (docs/benchmarks.md). This reader
//! walks the reply once, copying only `kind` of an entry that is not an order.
//!
//! It owns the writer's read connection and nothing else: every other command of the
//! writer stays on redis-rs. It must not panic on any bytes: a malformed reply is a
//! `Parse` error, after which the connection is dropped.

use std::time::Duration;

use redis::{RedisError, RedisResult};

use super::decode::{Entry, Fields};
use crate::resp::{Cursor, Parsed, RawConn, Step};

/// The writer's read connection.
#[derive(Debug)]
pub(crate) struct RawReader {
    conn: RawConn,
}

impl RawReader {
    /// A reader for the client's Redis, or `None` when its address is not plain TCP (TLS or
    /// a Unix socket: the writer then reads through redis-rs as before).
    pub(crate) fn for_client(client: &redis::Client) -> Option<RawReader> {
        RawConn::for_client(client).map(|conn| RawReader { conn })
    }

    /// Forgets the connection (after any error: the next read reconnects).
    pub(crate) fn reset(&mut self) {
        self.conn.reset();
    }

    /// Sends `args` (an `XREADGROUP ...` command) and returns its entries, waiting at most
    /// `timeout` for the connection and for the whole reply.
    pub(crate) async fn read_group(
        &mut self,
        args: &[&[u8]],
        timeout: Duration,
    ) -> RedisResult<Vec<Entry>> {
        let request = crate::resp::encode(args);
        let conn = &mut self.conn;
        let r = tokio::time::timeout(timeout, async move {
            conn.ensure_connected().await?;
            conn.exchange(&request, 1, parse_read_reply).await
        })
        .await;
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
}

/// An `XREADGROUP` reply (RESP2): nil (the block timed out) or
/// `[[stream, [[id, [field, value, ...] | nil], ...]], ...]`.
fn parse_read_reply(b: &[u8]) -> Parsed<Vec<Entry>> {
    if let Some(e) = crate::resp::server_error(b) {
        return e;
    }
    Parsed::from_step(walk(&mut Cursor::new(b)))
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
    }

    #[test]
    fn hostile_counts_and_nesting_end_without_panic() {
        // A count far beyond the bytes: incomplete, no huge allocation.
        assert_eq!(
            parse_read_reply(b"*1\r\n*2\r\n$1\r\nk\r\n*4611686018427387904\r\n"),
            Parsed::Incomplete
        );
        // Deep nesting is refused before the stack is.
        let deep = "*1\r\n".repeat(100_000);
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
}
