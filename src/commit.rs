//! The committer: group commit of state changes to Redis. Callers hand it the Redis
//! commands of one change; it writes whatever is pending as one `MULTI`/`EXEC` pipeline in
//! one round trip, then answers every caller of the batch. Hash-field writes
//! ([`HashWrite`]) to the same hash are merged into one `HSET` per hash per batch, ahead of
//! the plain commands, so a batch of N reservations costs Redis N + a few commands, not 3N.
//!
//! It owns the Redis write connection of the hot path. It must not decide what a change
//! means (callers build the commands and undo their in-memory change on failure), and a
//! caller is never told "done" before Redis has answered `EXEC`.

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use crate::metrics as m;

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
/// the gateway, whose hash writes create records under fresh ids (a record can only be
/// deleted once its own commit has been answered, so never in the same batch anyway).
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

/// A handle to the committer task; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    timeout: Duration,
}

impl Committer {
    /// Starts the committer task on `conn`. `queue` bounds the changes waiting, `batch` the
    /// changes per round trip, `timeout` how long a change may wait in all.
    pub fn start(
        conn: ConnectionManager,
        queue: usize,
        batch: usize,
        timeout: Duration,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(conn, rx, batch.max(1), timeout));
        (Committer { tx, timeout }, task)
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

async fn run(
    mut conn: ConnectionManager,
    mut rx: mpsc::Receiver<Job>,
    max: usize,
    timeout: Duration,
) {
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
                    let r = match tokio::time::timeout(timeout, cmd.query_async::<i64>(&mut conn))
                        .await
                    {
                        Ok(Ok(n)) => Ok(n),
                        Ok(Err(e)) => Err(classify(&e)),
                        Err(_) => Err(CommitError::Unknown),
                    };
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
    hashes: Vec<(String, redis::Cmd, Option<u64>)>,
}

impl MergedHashes {
    fn add(&mut self, w: HashWrite) {
        let i = match self.hashes.iter().position(|(k, _, _)| *k == w.key) {
            Some(i) => i,
            None => {
                let mut hset = redis::cmd("HSET");
                hset.arg(&w.key);
                self.hashes.push((w.key, hset, None));
                self.hashes.len() - 1
            }
        };
        let (_, hset, expire) = &mut self.hashes[i];
        hset.arg(w.field).arg(w.value);
        *expire = (*expire).max(w.expire_at_ms);
    }

    /// Appends one `HSET` per hash, each followed by its `PEXPIRE` (relative to `now_ms`,
    /// at least 1 ms) when it has an expiry.
    fn append_to(self, pipe: &mut redis::Pipeline, now_ms: u64) {
        for (key, hset, expire) in self.hashes {
            pipe.add_command(hset).ignore();
            if let Some(at) = expire {
                let ttl = at.saturating_sub(now_ms).max(1);
                pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
            }
        }
    }
}

/// One group commit: every live change in one `MULTI`/`EXEC`, then every caller answered.
async fn write_batch(conn: &mut ConnectionManager, jobs: Vec<WriteJob>, timeout: Duration) {
    if jobs.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut pipe = redis::pipe();
    pipe.atomic();
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
    hashes.append_to(&mut pipe, crate::metrics::unix_ms());
    for c in plain {
        pipe.add_command(c).ignore();
    }
    metrics::histogram!(m::COMMIT_BATCH).record(live.len() as f64);
    let started = Instant::now();
    let remaining = live
        .iter()
        .map(|(d, _)| *d)
        .min()
        .map(|d| d.saturating_duration_since(started))
        .unwrap_or(timeout);
    let result = if pipe.cmd_iter().next().is_none() {
        Ok(())
    } else {
        match tokio::time::timeout(remaining, pipe.query_async::<()>(conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let c = classify(&e);
                tracing::warn!(error = %e, changes = live.len(), outcome = ?c, "group commit failed");
                Err(c)
            }
            Err(_) => {
                tracing::warn!(changes = live.len(), "group commit timed out");
                Err(CommitError::Unknown)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        m.add(write("idem:1", "x", Some(100)));
        m.add(write("res", "b", None));
        m.add(write("idem:1", "y", Some(90)));
        m.add(write("idem:2", "z", Some(200)));
        let mut pipe = redis::pipe();
        m.append_to(&mut pipe, 40);
        let cmds: Vec<Vec<String>> = pipe.cmd_iter().map(args).collect();
        assert_eq!(
            cmds,
            vec![
                vec!["HSET", "res", "a", "v-a", "b", "v-b"],
                vec!["HSET", "idem:1", "x", "v-x", "y", "v-y"],
                vec!["PEXPIRE", "idem:1", "60"],
                vec!["HSET", "idem:2", "z", "v-z"],
                vec!["PEXPIRE", "idem:2", "160"],
            ]
        );
        // An expiry already past (a clock ahead of the records) still expires, at once.
        let mut m = MergedHashes::default();
        m.add(write("idem:0", "w", Some(10)));
        let mut pipe = redis::pipe();
        m.append_to(&mut pipe, 40);
        let cmds: Vec<Vec<String>> = pipe.cmd_iter().map(args).collect();
        assert_eq!(cmds[1], vec!["PEXPIRE", "idem:0", "1"]);
    }
}
