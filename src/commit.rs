//! The committer: group commit of state changes to Redis. Callers hand it the Redis
//! commands of one change; it writes whatever is pending as one `MULTI`/`EXEC` pipeline in
//! one round trip, then answers every caller of the batch. Hash-field writes
//! ([`HashWrite`]) to the same hash are merged into one `HSET` per hash per batch, ahead of
//! the plain commands, so a batch of N reservations costs Redis N + a few commands, not 3N.
//!
//! It owns the Redis write connection of the hot path: a plain TCP connection of its own
//! whose transactions it writes and reads by hand ([`crate::resp`]; redis-rs's multiplexed
//! connection and reply parser were 16 % of the gateway's CPU in a rush), or, for URLs that
//! is not (TLS, Unix sockets), a redis-rs `ConnectionManager`. It must not decide what a
//! change means (callers build the commands and undo their in-memory change on failure),
//! and a caller is never told "done" before Redis has answered `EXEC` with every command
//! applied.

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use crate::metrics as m;
use crate::resp::{skim, Cursor, Parsed, RawConn, Step};

/// `XADD P:events * kind <kind>`: the start of an events-stream entry (docs/redis.md);
/// callers append the fields of their kind.
pub fn event(keys: &crate::keys::Keys, kind: &str) -> redis::Cmd {
    event_sized(keys, kind, 0, 0)
}

/// [`event`] sized up front for `fields` more field-value pairs of about `bytes` bytes in
/// all, so the hot events (`reserved`) are built without regrowing the command's buffers.
pub fn event_sized(
    keys: &crate::keys::Keys,
    kind: &str,
    fields: usize,
    bytes: usize,
) -> redis::Cmd {
    let key = keys.events();
    let mut c = redis::Cmd::with_capacity(5 + 2 * fields, 16 + key.len() + kind.len() + bytes);
    c.arg("XADD").arg(key).arg("*").arg("kind").arg(kind);
    c
}

/// One field of a hash, written as part of a change. The committer merges the hash writes
/// of a whole batch into one `HSET` per hash, placed before the batch's plain commands
/// (the transaction is atomic either way). So a change must not write, with a hash write,
/// a field that an earlier change of the same batch deletes with a plain command: true of
/// the gateway, whose hash writes either create records under fresh ids (a record can only
/// be deleted once its own commit has been answered, so never in the same batch anyway)
/// or write idempotency bucket fields, which no command deletes (the bucket expires whole).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashWrite {
    pub key: String,
    pub field: String,
    pub value: String,
    /// Expire the hash at this unix-ms time (the latest of the batch's wins), for hashes
    /// that hold records with a common expiry, such as an idempotency bucket. Sent as a
    /// relative `PEXPIRE`, so a gateway clock that differs from Redis's shifts the expiry by
    /// the difference instead of deleting the hash at once.
    pub expire_at_ms: Option<u64>,
}

/// The Redis writes of one change: plain commands, then mergeable hash-field writes.
#[derive(Debug, Default)]
pub struct Change {
    pub cmds: Vec<redis::Cmd>,
    pub hash_writes: Vec<HashWrite>,
}

/// Why a change was not (known to be) recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// Nothing was written: the queue was full, the deadline passed before the write, or
    /// Redis refused the connection or the transaction.
    #[error("the durable store is unavailable: {0}")]
    Unavailable(String),
    /// The write was sent but its answer was lost (timeout, dropped connection, I/O error):
    /// it may or may not have been applied. Callers keep the change in flight, holding its
    /// units, until `recovery::settle_unknown` learns which.
    #[error("the durable store did not answer; the outcome is not known yet")]
    Unknown,
}

enum Job {
    /// A change: its commands join the next `MULTI`/`EXEC`.
    Write {
        change: Change,
        deadline: Instant,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    /// A read answered on the commit connection after every write queued before it (used
    /// to settle writes whose outcome was unknown).
    Probe {
        cmd: redis::Cmd,
        reply: oneshot::Sender<Result<i64, CommitError>>,
    },
}

/// Whether a failed round trip may still have been applied by Redis.
fn classify(e: &redis::RedisError) -> CommitError {
    if e.is_connection_refusal() {
        // Never reached Redis.
        CommitError::Unavailable(e.to_string())
    } else if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        // Sent, perhaps executed, answer lost.
        CommitError::Unknown
    } else {
        // Redis answered with an error: the transaction did not run.
        CommitError::Unavailable(e.to_string())
    }
}

/// Whether a failed transaction through redis-rs may still have been applied, in part.
/// Only `EXECABORT` (a command refused while queueing) and a refused connection say that
/// nothing ran: an error from a command inside `EXEC` comes back the same way as one that
/// stopped the transaction, and Redis does not roll back the commands around it.
fn classify_exec(e: &redis::RedisError) -> CommitError {
    if e.is_connection_refusal() || e.code() == Some("EXECABORT") {
        CommitError::Unavailable(e.to_string())
    } else {
        CommitError::Unknown
    }
}

/// A handle to the committer task; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    timeout: Duration,
}

impl Committer {
    /// Starts the committer task on `client`'s Redis: over a connection of its own when the
    /// client's address is plain TCP (made when first needed, and given up for a fresh one
    /// once it has owed replies for `stall`), else over a redis-rs `ConnectionManager` with
    /// `manager_cfg` (made now). `queue` bounds the changes waiting, `batch` the changes per
    /// round trip, `timeout` how long a change may wait in all.
    pub async fn start(
        client: &redis::Client,
        manager_cfg: redis::aio::ConnectionManagerConfig,
        queue: usize,
        batch: usize,
        timeout: Duration,
        stall: Duration,
    ) -> redis::RedisResult<(Committer, tokio::task::JoinHandle<()>)> {
        let conn = match RawConn::for_client(client) {
            Some(raw) => Transport::Raw(Box::new(raw.with_stall_limit(stall)), Vec::new()),
            None => Transport::Managed(
                ConnectionManager::new_with_config(client.clone(), manager_cfg).await?,
            ),
        };
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(conn, rx, batch.max(1), timeout));
        Ok((Committer { tx, timeout }, task))
    }

    /// Records `cmds` atomically with the other changes of its batch. Resolves once Redis
    /// has answered, or with an error within the commit timeout.
    pub async fn commit(&self, cmds: Vec<redis::Cmd>) -> Result<(), CommitError> {
        self.commit_change(Change {
            cmds,
            hash_writes: Vec::new(),
        })
        .await
    }

    /// Records `change` atomically with the other changes of its batch, its hash writes
    /// merged with theirs (see [`HashWrite`]). Resolves as [`Committer::commit`] does.
    pub async fn commit_change(&self, change: Change) -> Result<(), CommitError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Write {
            change,
            deadline: Instant::now() + self.timeout,
            reply,
        };
        if let Err(e) = self.tx.try_send(job) {
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => {
                    metrics::counter!(m::COMMIT_QUEUE_FULL).increment(1);
                    CommitError::Unavailable("commit queue full".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    CommitError::Unavailable("committer stopped".into())
                }
            });
        }
        // The committer enforces the deadline itself; the extra second only guards against
        // a committer that died holding the job.
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CommitError::Unavailable("committer stopped".into())),
            Err(_) => Err(CommitError::Unknown),
        }
    }

    /// Runs `cmd` (answering an integer) on the commit connection, after every change
    /// queued before it. Waits for room in the queue: probes are rare and not urgent.
    pub async fn probe(&self, cmd: redis::Cmd) -> Result<i64, CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Probe { cmd, reply })
            .await
            .map_err(|_| CommitError::Unavailable("committer stopped".into()))?;
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CommitError::Unavailable("committer stopped".into())),
            Err(_) => Err(CommitError::Unknown),
        }
    }

    /// Waits until every change queued so far has been answered (used by graceful drain).
    pub async fn flush(&self) -> Result<(), CommitError> {
        self.commit(Vec::new()).await
    }
}

/// How the committer reaches Redis.
enum Transport {
    /// Its own TCP connection, transactions written and read by hand (plain TCP URLs),
    /// and the request buffer, kept between batches so its memory is reused.
    Raw(Box<RawConn>, Vec<u8>),
    /// redis-rs (TLS and Unix-socket URLs).
    Managed(ConnectionManager),
}

async fn run(mut conn: Transport, mut rx: mpsc::Receiver<Job>, max: usize, timeout: Duration) {
    let mut batch: Vec<Job> = Vec::with_capacity(max);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // Writes go out together; a probe waits for the writes queued before it.
        let mut writes = Vec::new();
        for job in batch.drain(..) {
            match job {
                Job::Write {
                    change,
                    deadline,
                    reply,
                } => writes.push((change, deadline, reply)),
                Job::Probe { cmd, reply } => {
                    write_batch(&mut conn, std::mem::take(&mut writes), timeout).await;
                    let r = probe(&mut conn, &cmd, timeout).await;
                    let _ = reply.send(r);
                }
            }
        }
        write_batch(&mut conn, writes, timeout).await;
    }
}

type WriteJob = (Change, Instant, oneshot::Sender<Result<(), CommitError>>);

/// The hash writes of one batch, one `HSET` (and at most one `PEXPIRE`) per hash, in the
/// order each hash was first written. A batch touches a handful of hashes, so a linear
/// search beats a map.
#[derive(Default)]
struct MergedHashes {
    hashes: Vec<MergedHash>,
}

/// The writes of one batch to one hash.
struct MergedHash {
    key: String,
    fields: Vec<(String, String)>,
    /// The latest expiry asked for, unix ms.
    expire: Option<u64>,
}

impl MergedHash {
    /// Its `PEXPIRE` argument (relative to `now_ms`, at least 1 ms), if it expires.
    fn ttl_ms(&self, now_ms: u64) -> Option<u64> {
        self.expire.map(|at| at.saturating_sub(now_ms).max(1))
    }
}

impl MergedHashes {
    fn add(&mut self, w: HashWrite) {
        let i = match self.hashes.iter().position(|h| h.key == w.key) {
            Some(i) => i,
            None => {
                self.hashes.push(MergedHash {
                    key: w.key,
                    fields: Vec::new(),
                    expire: None,
                });
                self.hashes.len() - 1
            }
        };
        let h = &mut self.hashes[i];
        h.fields.push((w.field, w.value));
        h.expire = h.expire.max(w.expire_at_ms);
    }

    /// Appends one `HSET` per hash, each followed by its `PEXPIRE` when it has an expiry.
    fn append_to(self, cmds: &mut Vec<redis::Cmd>, now_ms: u64) {
        for h in self.hashes {
            let ttl = h.ttl_ms(now_ms);
            let mut hset = redis::cmd("HSET");
            hset.arg(&h.key);
            for (f, v) in &h.fields {
                hset.arg(f).arg(v);
            }
            cmds.push(hset);
            if let Some(ttl) = ttl {
                let mut pexpire = redis::cmd("PEXPIRE");
                pexpire.arg(h.key).arg(ttl);
                cmds.push(pexpire);
            }
        }
    }

    /// The same commands as [`MergedHashes::append_to`], encoded straight into `out` (no
    /// command objects, no regrowing of their buffers); returns how many it wrote.
    fn encode(&self, out: &mut Vec<u8>, now_ms: u64) -> usize {
        let mut n = 0;
        for h in &self.hashes {
            resp_header(out, b'*', 2 + 2 * h.fields.len());
            resp_bulk(out, b"HSET");
            resp_bulk(out, h.key.as_bytes());
            for (f, v) in &h.fields {
                resp_bulk(out, f.as_bytes());
                resp_bulk(out, v.as_bytes());
            }
            n += 1;
            if let Some(ttl) = h.ttl_ms(now_ms) {
                resp_header(out, b'*', 3);
                resp_bulk(out, b"PEXPIRE");
                resp_bulk(out, h.key.as_bytes());
                resp_bulk(out, ttl.to_string().as_bytes());
                n += 1;
            }
        }
        n
    }

    /// About the bytes `encode` writes (room for every length header).
    fn encoded_len(&self) -> usize {
        self.hashes
            .iter()
            .map(|h| {
                64 + 2 * h.key.len()
                    + h.fields
                        .iter()
                        .map(|(f, v)| f.len() + v.len() + 32)
                        .sum::<usize>()
            })
            .sum()
    }
}

/// `<t><n>\r\n`.
fn resp_header(out: &mut Vec<u8>, t: u8, n: usize) {
    use std::io::Write as _;
    out.push(t);
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{n}\r\n");
}

/// A bulk string.
fn resp_bulk(out: &mut Vec<u8>, b: &[u8]) {
    resp_header(out, b'$', b.len());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// One group commit: every live change in one `MULTI`/`EXEC`, then every caller answered.
async fn write_batch(conn: &mut Transport, jobs: Vec<WriteJob>, timeout: Duration) {
    if jobs.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut live = Vec::with_capacity(jobs.len());
    let mut hashes = MergedHashes::default();
    let mut plain = Vec::new();
    for (change, deadline, reply) in jobs {
        if deadline <= now {
            let _ = reply.send(Err(CommitError::Unavailable(
                "commit deadline passed".into(),
            )));
            continue;
        }
        plain.extend(change.cmds);
        for w in change.hash_writes {
            hashes.add(w);
        }
        live.push((deadline, reply));
    }
    if live.is_empty() {
        return;
    }
    metrics::histogram!(m::COMMIT_BATCH).record(live.len() as f64);
    let started = Instant::now();
    let remaining = live
        .iter()
        .map(|(d, _)| *d)
        .min()
        .map(|d| d.saturating_duration_since(started))
        .unwrap_or(timeout);
    let now_ms = crate::metrics::unix_ms();
    let result = if plain.is_empty() && hashes.hashes.is_empty() {
        Ok(())
    } else {
        match conn {
            Transport::Raw(raw, request) => {
                request.clear();
                request.reserve(
                    MULTI.len()
                        + EXEC.len()
                        + hashes.encoded_len()
                        + plain.iter().map(packed_len).sum::<usize>(),
                );
                request.extend_from_slice(MULTI);
                let mut n = hashes.encode(request, now_ms);
                for c in &plain {
                    c.write_packed_command(request);
                    n += 1;
                }
                request.extend_from_slice(EXEC);
                let r = exec_raw(raw, request, n, remaining, live.len()).await;
                // Give back a buffer grown by an unusually large batch.
                if request.capacity() > 4 << 20 {
                    *request = Vec::new();
                }
                r
            }
            Transport::Managed(manager) => {
                let mut cmds = Vec::with_capacity(plain.len() + 4);
                hashes.append_to(&mut cmds, now_ms);
                cmds.append(&mut plain);
                exec_managed(manager, cmds, remaining, live.len()).await
            }
        }
    };
    metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::gauge!(m::REDIS_UP).set(if result.is_ok() { 1.0 } else { 0.0 });
    if result.is_err() {
        metrics::counter!(m::COMMIT_FAILURES).increment(1);
    }
    for (_, reply) in live {
        let _ = reply.send(result.clone());
    }
}

/// `cmds` as one transaction through redis-rs.
async fn exec_managed(
    conn: &mut ConnectionManager,
    cmds: Vec<redis::Cmd>,
    remaining: Duration,
    changes: usize,
) -> Result<(), CommitError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for c in cmds {
        pipe.add_command(c).ignore();
    }
    match tokio::time::timeout(remaining, pipe.query_async::<()>(conn)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let c = classify_exec(&e);
            tracing::warn!(error = %e, changes, outcome = ?c, "group commit failed");
            Err(c)
        }
        Err(_) => {
            tracing::warn!(changes, "group commit timed out");
            Err(CommitError::Unknown)
        }
    }
}

const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

/// The bytes `cmd` packs into, about.
fn packed_len(cmd: &redis::Cmd) -> usize {
    cmd.args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b.len() + 16,
            _ => 24,
        })
        .sum::<usize>()
        + 16
}

/// `request` (`MULTI`, `n` commands, `EXEC`) as one transaction on the committer's own
/// connection, written at once; then the replies, walked by hand. Connecting is part of it:
/// a connection that cannot be made means nothing was sent (`Unavailable`); once the
/// request may have reached Redis, every failure to read a full, clean answer is
/// `Unknown`, and the connection is dropped (its state is unknown too).
async fn exec_raw(
    conn: &mut RawConn,
    request: &[u8],
    n: usize,
    remaining: Duration,
    changes: usize,
) -> Result<(), CommitError> {
    let started = Instant::now();
    if let Err(why) = connect_raw(conn, remaining).await {
        tracing::warn!(error = %why, changes, "group commit: redis unreachable");
        return Err(CommitError::Unavailable(why));
    }
    let left = remaining.saturating_sub(started.elapsed());
    let before = conn.requests_sent();
    // MULTI, the n commands, EXEC: n + 2 replies.
    let outcome =
        tokio::time::timeout(left, conn.exchange(request, n + 2, |b| parse_exec(b, n))).await;
    let sent = conn.requests_sent() != before;
    match outcome {
        Ok(Ok(Exec::Committed)) => Ok(()),
        Ok(Ok(Exec::Discarded(why))) => {
            // Redis refused the transaction as a whole: nothing ran.
            tracing::warn!(error = %why, changes, "group commit refused");
            Err(CommitError::Unavailable(why))
        }
        Ok(Ok(Exec::Partial(why))) => {
            // Redis does not roll back: the commands before and after the failed one ran.
            tracing::warn!(error = %why, changes, "group commit partly failed");
            Err(CommitError::Unknown)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, changes, sent, "group commit failed");
            conn.reset();
            Err(if sent {
                CommitError::Unknown
            } else {
                // Failed while reading off an earlier request's replies: this one never
                // went out.
                CommitError::Unavailable(e.to_string())
            })
        }
        Err(_) => {
            // The connection is kept: it owes the replies, and the next request (a probe
            // of this one, say) is read and run after this one, never before.
            tracing::warn!(changes, sent, "group commit timed out");
            Err(if sent {
                CommitError::Unknown
            } else {
                CommitError::Unavailable("redis has not answered an earlier write yet".into())
            })
        }
    }
}

/// Connects the committer's own connection if it is not, within `limit`; the error says
/// why it could not.
async fn connect_raw(conn: &mut RawConn, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, conn.ensure_connected()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            conn.reset();
            Err(e.to_string())
        }
        Err(_) => {
            conn.reset();
            Err("connecting to redis timed out".into())
        }
    }
}

/// A probe (a command answering an integer) on the commit connection.
async fn probe(
    conn: &mut Transport,
    cmd: &redis::Cmd,
    timeout: Duration,
) -> Result<i64, CommitError> {
    match conn {
        Transport::Managed(manager) => {
            match tokio::time::timeout(timeout, cmd.query_async::<i64>(manager)).await {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => Err(classify(&e)),
                Err(_) => Err(CommitError::Unknown),
            }
        }
        Transport::Raw(raw, _) => {
            let started = Instant::now();
            connect_raw(raw, timeout)
                .await
                .map_err(CommitError::Unavailable)?;
            let left = timeout.saturating_sub(started.elapsed());
            let request = cmd.get_packed_command();
            let exchange = raw.exchange(&request, 1, crate::resp::parse_int);
            match tokio::time::timeout(left, exchange).await {
                Ok(Ok(n)) => Ok(n),
                // Redis answered with an error: the probe did not run.
                Ok(Err(e)) if e.kind() == redis::ErrorKind::Extension => {
                    Err(CommitError::Unavailable(e.to_string()))
                }
                Ok(Err(_)) => {
                    raw.reset();
                    Err(CommitError::Unknown)
                }
                // Kept, owing the reply (see `exec_raw`).
                Err(_) => Err(CommitError::Unknown),
            }
        }
    }
}

/// What Redis made of a transaction.
#[derive(Debug, PartialEq, Eq)]
enum Exec {
    /// Every command ran.
    Committed,
    /// Nothing ran (`EXECABORT`: a command was refused while queueing; or `EXEC` failed).
    Discarded(String),
    /// `EXEC` ran the commands and some failed at run time (Redis does not roll back).
    Partial(String),
}

/// The replies to `MULTI`, `n` queued commands and `EXEC`: `+OK`, `n` × `+QUEUED` (or an
/// error for a command refused while queueing), then `EXEC`'s array of `n` replies, an
/// error (`-EXECABORT`), or nil.
fn parse_exec(b: &[u8], n: usize) -> Parsed<Exec> {
    Parsed::from_step(walk_exec(&mut Cursor::new(b), n))
}

fn walk_exec(c: &mut Cursor<'_>, n: usize) -> Step<Exec> {
    let error_text =
        |l: &[u8]| String::from_utf8_lossy(l.get(1..).unwrap_or_default()).into_owned();
    // MULTI's reply: `+OK`, or an error, after which Redis ran each command at once.
    let multi_refused = match c.peek() {
        None => return Err(None),
        Some(b'-') => Some(error_text(c.line()?)),
        Some(_) => match c.line()? {
            b"+OK" => None,
            l => {
                return Err(Some(format!(
                    "MULTI answered {:?}",
                    String::from_utf8_lossy(l)
                )))
            }
        },
    };
    let mut refused: Option<String> = None;
    let mut ran_alone = false;
    for _ in 0..n {
        match c.peek() {
            None => return Err(None),
            Some(b'-') => {
                let l = c.line()?;
                refused.get_or_insert_with(|| error_text(l));
            }
            Some(_) if multi_refused.is_some() => {
                skim(c, 1)?;
                ran_alone = true;
            }
            Some(_) => match c.line()? {
                b"+QUEUED" => {}
                l => {
                    return Err(Some(format!(
                        "a command inside MULTI answered {:?}",
                        String::from_utf8_lossy(l)
                    )))
                }
            },
        }
    }
    if let Some(why) = multi_refused {
        // EXEC answers an error ("EXEC without MULTI").
        match c.peek() {
            None => return Err(None),
            _ => skim(c, 1)?,
        }
        return Ok(if ran_alone {
            Exec::Partial(format!("MULTI refused ({why}); commands ran one by one"))
        } else {
            Exec::Discarded(why)
        });
    }
    match c.peek() {
        None => Err(None),
        Some(b'-') => {
            let l = c.line()?;
            Ok(Exec::Discarded(refused.unwrap_or_else(|| error_text(l))))
        }
        Some(b'*') => {
            let Some(k) = c.array()? else {
                return Ok(Exec::Discarded("transaction aborted".into()));
            };
            if k != n {
                return Err(Some(format!("EXEC answered {k} replies for {n} commands")));
            }
            let mut failed = refused;
            for _ in 0..k {
                if c.peek() == Some(b'-') {
                    let l = c.line()?;
                    failed.get_or_insert_with(|| error_text(l));
                } else {
                    skim(c, 1)?;
                }
            }
            Ok(match failed {
                None => Exec::Committed,
                Some(why) => Exec::Partial(why),
            })
        }
        Some(t) => Err(Some(format!("unexpected EXEC reply {:?}", t as char))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_transaction_is_what_redis_rs_would_send() {
        let mut a = redis::cmd("HSET");
        a.arg("h").arg("f").arg("v");
        let mut b = redis::cmd("XADD");
        b.arg("s").arg("*").arg("kind").arg("reserved");
        let mut request = MULTI.to_vec();
        for c in [&a, &b] {
            c.write_packed_command(&mut request);
        }
        request.extend_from_slice(EXEC);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(a)
            .ignore()
            .add_command(b)
            .ignore();
        assert_eq!(request, pipe.get_packed_pipeline());
    }

    #[test]
    fn transaction_replies_say_what_ran() {
        let ok = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n$3\r\n1-0\r\n";
        assert_eq!(parse_exec(ok, 2), Parsed::Done(Exec::Committed));
        for cut in 0..ok.len() {
            assert_eq!(
                parse_exec(&ok[..cut], 2),
                Parsed::Incomplete,
                "cut at {cut}"
            );
        }
        // A command refused while queueing: nothing ran.
        let refused =
            b"+OK\r\n-ERR unknown command 'NOPE'\r\n+QUEUED\r\n-EXECABORT Transaction discarded\r\n";
        assert_eq!(
            parse_exec(refused, 2),
            Parsed::Done(Exec::Discarded("ERR unknown command 'NOPE'".into()))
        );
        assert_eq!(
            parse_exec(b"-NOAUTH x\r\n-NOAUTH x\r\n-NOAUTH x\r\n", 1),
            Parsed::Done(Exec::Discarded("NOAUTH x".into()))
        );
        assert_eq!(
            parse_exec(b"+OK\r\n+QUEUED\r\n*-1\r\n", 1),
            Parsed::Done(Exec::Discarded("transaction aborted".into()))
        );
        // A command failing at run time: the others ran.
        let partial = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n-WRONGTYPE no\r\n:1\r\n";
        assert_eq!(
            parse_exec(partial, 2),
            Parsed::Done(Exec::Partial("WRONGTYPE no".into()))
        );
        // MULTI refused: nothing ran if every command was refused too; else they ran alone.
        assert_eq!(
            parse_exec(b"-ERR nested\r\n-ERR x\r\n-ERR EXEC without MULTI\r\n", 1),
            Parsed::Done(Exec::Discarded("ERR nested".into()))
        );
        assert!(matches!(
            parse_exec(
                b"-ERR nested\r\n+OK\r\n:1\r\n-ERR EXEC without MULTI\r\n",
                2
            ),
            Parsed::Done(Exec::Partial(_))
        ));
        // A nil bulk string among EXEC's replies (a `SET NX` that did not set, say).
        assert_eq!(
            parse_exec(b"+OK\r\n+QUEUED\r\n*1\r\n$-1\r\n", 1),
            Parsed::Done(Exec::Committed)
        );
        // Not a transaction's replies: malformed, never a success, never a panic.
        for bad in [
            &b"+OK\r\n+OK\r\n*1\r\n:1\r\n"[..],
            b"+QUEUED\r\n+QUEUED\r\n*1\r\n:1\r\n",
            &b"+OK\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n"[..],
            b"+OK\r\n:1\r\n*1\r\n:1\r\n",
            b"$2\r\nOK\r\n",
            b"+OK\r\n+QUEUED\r\n:1\r\n",
            b"+OK\r\n+QUEUED\r\n*1\r\n$18446744073709551615\r\n",
            b"+OK\r\n+QUEUED\r\n*1\r\n*x\r\n",
        ] {
            assert!(
                matches!(parse_exec(bad, 1), Parsed::Bad(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse_exec(bad, 1)
            );
        }
        // A count that is not the number of commands is malformed (nothing is allocated).
        assert_eq!(
            parse_exec(b"+OK\r\n+QUEUED\r\n*4611686018427387904\r\n", 1),
            Parsed::Bad("EXEC answered 4611686018427387904 replies for 1 commands".into())
        );
    }

    #[test]
    fn a_sized_event_is_the_same_command() {
        let keys = crate::keys::Keys::new("lg");
        let mut plain = event(&keys, "reserved");
        let mut sized = event_sized(&keys, "reserved", 2, 8);
        for c in [&mut plain, &mut sized] {
            c.arg("qty").arg(3u32).arg("user").arg("u-1");
        }
        assert_eq!(plain.get_packed_command(), sized.get_packed_command());
        let mut expected = redis::cmd("XADD");
        expected
            .arg("lg:events")
            .arg("*")
            .arg("kind")
            .arg("reserved");
        expected.arg("qty").arg(3u32).arg("user").arg("u-1");
        assert_eq!(plain.get_packed_command(), expected.get_packed_command());
    }

    fn write(key: &str, field: &str, expire_at_ms: Option<u64>) -> HashWrite {
        HashWrite {
            key: key.into(),
            field: field.into(),
            value: format!("v-{field}"),
            expire_at_ms,
        }
    }

    fn args(c: &redis::Cmd) -> Vec<String> {
        c.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    #[test]
    fn hash_writes_merge_into_one_hset_per_hash() {
        let mut m = MergedHashes::default();
        m.add(write("res", "a", None));
        m.add(write("res", "", None));
        m.add(write("res", "好 \r\n$", None));
        m.add(write("idem:1", "x", Some(100)));
        m.add(write("res", "b", None));
        m.add(write("idem:1", "y", Some(90)));
        m.add(write("idem:2", "z", Some(200)));
        // Encoded straight to bytes, the same commands as redis-rs would pack.
        let mut encoded = Vec::new();
        assert_eq!(m.encode(&mut encoded, 40), 5);
        assert!(String::from_utf8_lossy(&encoded).contains("$7\r\n好 \r\n$\r\n"));
        assert!(encoded.len() <= m.encoded_len());
        let mut out = Vec::new();
        m.append_to(&mut out, 40);
        let packed: Vec<u8> = out.iter().flat_map(|c| c.get_packed_command()).collect();
        assert_eq!(encoded, packed);
        let cmds: Vec<Vec<String>> = out.iter().map(args).collect();
        assert_eq!(
            cmds,
            vec![
                vec![
                    "HSET",
                    "res",
                    "a",
                    "v-a",
                    "",
                    "v-",
                    "好 \r\n$",
                    "v-好 \r\n$",
                    "b",
                    "v-b"
                ],
                vec!["HSET", "idem:1", "x", "v-x", "y", "v-y"],
                vec!["PEXPIRE", "idem:1", "60"],
                vec!["HSET", "idem:2", "z", "v-z"],
                vec!["PEXPIRE", "idem:2", "160"],
            ]
        );
        // An expiry already past (a clock ahead of the records) still expires, at once.
        let mut m = MergedHashes::default();
        m.add(write("idem:0", "w", Some(10)));
        let mut out = Vec::new();
        m.append_to(&mut out, 40);
        let cmds: Vec<Vec<String>> = out.iter().map(args).collect();
        assert_eq!(cmds[1], vec!["PEXPIRE", "idem:0", "1"]);
    }
}
