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

/// Why a change was not (known to be) recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// Nothing was written: the queue was full, the deadline passed before the write, or
    /// Redis refused the connection or the transaction.
    #[error("the durable store is unavailable: {0}")]
    Unavailable(String),
    /// The write was sent but no answer came within the commit timeout: it may or may not
    /// have been applied. Callers keep the more conservative in-memory state.
    #[error("the durable store did not answer in time")]
    Unknown,
}

struct Job {
    cmds: Vec<redis::Cmd>,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), CommitError>>,
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
        let job = Job {
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
        let now = Instant::now();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut live = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            if job.deadline <= now {
                let _ = job.reply.send(Err(CommitError::Unavailable(
                    "commit deadline passed".into(),
                )));
                continue;
            }
            for c in &job.cmds {
                pipe.add_command(c.clone()).ignore();
            }
            live.push(job);
        }
        if live.is_empty() {
            continue;
        }
        metrics::histogram!(m::COMMIT_BATCH).record(live.len() as f64);
        let started = Instant::now();
        let remaining = live
            .iter()
            .map(|j| j.deadline)
            .min()
            .map(|d| d.saturating_duration_since(started))
            .unwrap_or(timeout);
        let result = if pipe.cmd_iter().next().is_none() {
            Ok(())
        } else {
            match tokio::time::timeout(remaining, pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, changes = live.len(), "group commit failed");
                    Err(CommitError::Unavailable(e.to_string()))
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
        for job in live {
            let _ = job.reply.send(result.clone());
        }
    }
}
