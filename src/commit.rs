//! The committer: group commit of state changes to Redis. Callers hand it the Redis
//! commands of one change; it writes whatever is pending as one `MULTI`/`EXEC` pipeline in
//! one round trip, then answers every caller of the batch.
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
    let mut c = redis::cmd("XADD");
    c.arg(keys.events()).arg("*").arg("kind").arg(kind);
    c
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
        cmds: Vec<redis::Cmd>,
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
        let (reply, rx) = oneshot::channel();
        let job = Job::Write {
            cmds,
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
                    cmds,
                    deadline,
                    reply,
                } => writes.push((cmds, deadline, reply)),
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

type WriteJob = (
    Vec<redis::Cmd>,
    Instant,
    oneshot::Sender<Result<(), CommitError>>,
);

/// One group commit: every live change in one `MULTI`/`EXEC`, then every caller answered.
async fn write_batch(conn: &mut ConnectionManager, jobs: Vec<WriteJob>, timeout: Duration) {
    if jobs.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut live = Vec::with_capacity(jobs.len());
    for (cmds, deadline, reply) in jobs {
        if deadline <= now {
            let _ = reply.send(Err(CommitError::Unavailable(
                "commit deadline passed".into(),
            )));
            continue;
        }
        for c in cmds {
            pipe.add_command(c).ignore();
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
