//! The order writer: consumes the events stream with the consumer group `order-writer`
//! and stores every `kind=order` entry in the SQL order store exactly once.
//!
//! Exactly once is three things together: an idempotent insert keyed by the order id
//! ([`OrderStore::store_batch`]), XACK only after the SQL commit, and XAUTOCLAIM of entries
//! a dead consumer left pending. A crash anywhere leaves the entry pending, so it is
//! delivered again; storing it again is a no-op. It also owns the dead-letter stream, the confirmations it publishes, and the
//! trimming of the events stream (never past what the group has not acknowledged).
//!
//! It must not write to the events stream or any state key, must not decide anything
//! about stock or orders (the gateway did, before the entry was written), and must never
//! exit on a transient error of Redis or of the SQL store: it backs off and retries.
//! See docs/order-writer.md.

mod decode;
mod resp;

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    time::{Duration, Instant},
};

use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, Value};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, OrderWriterConfig},
    keys::{Keys, ORDER_WRITER_GROUP},
    store::{OrderStore, StoreError, StoredOutcome},
};
use decode::{Decoded, Entry};

/// Dead letters kept (approximately, `XADD MAXLEN ~`): the stream stays bounded even if
/// nobody looks at it.
const DEAD_LETTERS_MAX: usize = 100_000;
/// Trim the events stream after this many batches...
const TRIM_EVERY_BATCHES: u32 = 64;
/// ...or after this long, whichever comes first.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// A consumer of the group with nothing pending, idle this long, is removed from the group.
const FORGET_CONSUMER_IDLE: Duration = Duration::from_secs(3600);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Atomically: the oldest entry the group has not acknowledged (its first pending entry, or
/// its last-delivered id when none is pending), then `XTRIM MINID` to it. In one script so
/// that no entry can be delivered between the look-up and the trim.
/// Also forgets consumers of the group that hold nothing and were idle longer than ARGV[2]
/// ms (every restart with the default `host-pid` name adds one; a live writer reads at
/// least every `block`, and one that comes back is re-created by its next read).
/// Returns `{pending, lag (-1 if unknown), trimmed}`.
const TRIM_SCRIPT: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
local pending = p[1]
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local last, lag = nil, -1
for _, g in ipairs(groups) do
  local name, l, lg = nil, nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then l = g[i + 1]
    elseif g[i] == 'lag' then lg = g[i + 1] end
  end
  if name == ARGV[1] then
    last = l
    if type(lg) == 'number' then lag = lg end
  end
end
local minid = last
if pending > 0 then minid = p[2] end
if not minid then return {pending, lag, 0} end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', minid)
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, cp, idle = nil, nil, nil
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then cp = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name and cp == 0 and idle and idle > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
  end
end
return {pending, lag, trimmed}
"#;

/// Errors that stop the order writer before its loop starts (the loop itself never fails).
#[derive(Debug, thiserror::Error)]
pub enum OrderWriterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs the order writer of a `livegate` process until `shutdown` completes: connects the
/// order store (`cfg.order_store`, retrying while it is unreachable) and consumes
/// `cfg.redis_url`. Fails only on a configuration problem (bad URL, failed migration).
pub async fn run(cfg: &Config, shutdown: impl Future<Output = ()>) -> Result<(), OrderWriterError> {
    let client = crate::resp::client(cfg.redis_url.as_str())?;
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    let store = loop {
        let attempt = tokio::select! {
            biased;
            _ = shutdown.as_mut() => return Ok(()),
            s = OrderStore::connect(&cfg.order_store) => s,
        };
        match attempt {
            Ok(s) => break s,
            Err(e) if e.is_transient() => {
                warn!(error = %e, "order store unreachable; retrying");
                tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return Ok(()),
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let writer = OrderWriter::new(
        client,
        Keys::new(&cfg.key_prefix),
        store,
        cfg.order_writer.clone(),
    );
    writer.run_until(shutdown).await
}

/// The shutdown signal of the loop, never polled again once it has completed.
struct Shutdown<'a, F> {
    fut: Pin<&'a mut F>,
    fired: bool,
}

impl<F: Future<Output = ()>> Shutdown<'_, F> {
    /// Completes when shutdown was asked for (at once if it already was).
    async fn fired(&mut self) {
        if !self.fired {
            self.fut.as_mut().await;
            self.fired = true;
        }
    }
}

/// Sleeps `d`; true when shutdown was asked for (before or during the sleep).
async fn sleep_or_shutdown<F: Future<Output = ()>>(
    d: Duration,
    shutdown: &mut Shutdown<'_, F>,
) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.fired() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Bounded exponential back-off with jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // Up to +50 % so that several writers do not retry in lock-step.
        let jitter = rand::random_range(0..=d.as_millis() as u64 / 2);
        d + Duration::from_millis(jitter)
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Where the next batch comes from.
enum Source {
    /// Re-reading this consumer's own pending entries after the given id (on start and
    /// after any Redis error: whatever was delivered but not acknowledged).
    Pending(String),
    /// New entries (`>`).
    New,
}

/// Counts of one handled batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub entries: usize,
    pub stored: usize,
    pub duplicates: usize,
    pub dead_letters: usize,
}

/// One consumer of the group `order-writer`. Build it with [`OrderWriter::new`] and drive
/// it with [`OrderWriter::run_until`].
pub struct OrderWriter {
    client: redis::Client,
    keys: Keys,
    store: OrderStore,
    cfg: OrderWriterConfig,
    consumer: String,
    conn: Option<MultiplexedConnection>,
    /// The stream reads' own connection and reply reader (`resp.rs`); `None` when Redis is
    /// not reached over plain TCP, and the reads go through redis-rs.
    raw: Option<resp::RawReader>,
    source: Source,
    claim_cursor: String,
    last_claim: Option<Instant>,
    trim_interval: Duration,
    forget_consumer_idle: Duration,
    batches_since_trim: u32,
    last_trim: Instant,
    trim_script: redis::Script,
    backoff: Backoff,
}

impl OrderWriter {
    /// A writer for `keys.events()`; it connects to Redis lazily, inside its loop.
    pub fn new(
        client: redis::Client,
        keys: Keys,
        store: OrderStore,
        cfg: OrderWriterConfig,
    ) -> OrderWriter {
        let consumer = cfg.consumer.clone().unwrap_or_else(default_consumer);
        let forget_consumer_idle = FORGET_CONSUMER_IDLE.max(cfg.claim_idle * 4);
        let raw = resp::RawReader::for_client(&client);
        OrderWriter {
            client,
            raw,
            keys,
            store,
            cfg,
            consumer,
            conn: None,
            source: Source::Pending("0".to_string()),
            claim_cursor: "0-0".to_string(),
            last_claim: None,
            trim_interval: TRIM_INTERVAL,
            forget_consumer_idle,
            batches_since_trim: 0,
            last_trim: Instant::now(),
            trim_script: redis::Script::new(TRIM_SCRIPT),
            backoff: Backoff::new(),
        }
    }

    /// Trims the events stream at least this often (default 5 s; also every 64 batches).
    pub fn with_trim_interval(mut self, every: Duration) -> OrderWriter {
        self.trim_interval = every;
        self
    }

    /// Removes consumers of the group that hold nothing and were idle this long (default
    /// one hour, at least 4 × `claim_idle`), at each trim.
    pub fn with_forget_consumer_idle(mut self, idle: Duration) -> OrderWriter {
        self.forget_consumer_idle = idle;
        self
    }

    /// This writer's consumer name inside the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Consumes until `shutdown` completes. The read in flight and the batch it returns
    /// are finished (stored and acknowledged) unless the store or Redis is failing, so a
    /// stop takes at most about `block` plus one batch; anything left unacknowledged is
    /// delivered again later, to this consumer or another one.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), OrderWriterError> {
        tokio::pin!(shutdown);
        let mut shutdown = Shutdown {
            fut: shutdown,
            fired: false,
        };
        info!(consumer = %self.consumer, stream = %self.keys.events(), "order writer started");
        loop {
            let read = {
                let read = self.next_batch();
                tokio::pin!(read);
                tokio::select! {
                    biased;
                    r = &mut read => r,
                    // Let the read finish (at most `block`) rather than abandon it: a
                    // blocked XREADGROUP dropped on our side could still deliver an entry
                    // into this consumer's pending list after we are gone, where only a
                    // claim (after `claim_idle`) would find it.
                    _ = shutdown.fired() => read.await,
                }
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(e) => {
                    if self.redis_failed("read", &e, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            if !entries.is_empty() {
                match self.handle_batch(&entries, &mut shutdown).await {
                    Ok(Some(_)) => self.backoff.reset(),
                    Ok(None) => break, // shut down while the store was failing
                    Err(e) => {
                        if self.redis_failed("acknowledge", &e, &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            } else {
                self.backoff.reset();
            }
            if shutdown.fired {
                break;
            }
            self.maybe_trim().await;
        }
        info!(consumer = %self.consumer, "order writer stopped");
        Ok(())
    }

    /// Logs a Redis error, forgets the connection, re-reads our pending entries next, and
    /// backs off. True when shutdown completed during the back-off.
    async fn redis_failed<F: Future<Output = ()>>(
        &mut self,
        what: &str,
        e: &redis::RedisError,
        shutdown: &mut Shutdown<'_, F>,
    ) -> bool {
        warn!(error = %e, what, "order writer: redis error; backing off");
        metrics::counter!("livegate_order_writer_errors_total", "source" => "redis").increment(1);
        self.conn = None;
        if let Some(raw) = &mut self.raw {
            raw.reset();
        }
        self.source = Source::Pending("0".to_string());
        sleep_or_shutdown(self.backoff.next(), shutdown).await
    }

    async fn connection(&mut self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        // A blocking XREADGROUP holds its reply for up to `block`.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(self.cfg.block + Duration::from_secs(5)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.events())
            .arg(ORDER_WRITER_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => info!(group = ORDER_WRITER_GROUP, "created consumer group"),
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// The next batch: entries claimed from dead consumers when a claim is due, else our
    /// own pending entries (after a start or an error), else new entries.
    async fn next_batch(&mut self) -> redis::RedisResult<Vec<Entry>> {
        let mut conn = self.connection().await?;
        let events = self.keys.events();
        let count = self.cfg.batch.max(1);
        let claim_every = (self.cfg.claim_idle / 2).max(Duration::from_millis(50));
        if self.last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&events)
                .arg(ORDER_WRITER_GROUP)
                .arg(&self.consumer)
                .arg(self.cfg.claim_idle.as_millis() as u64)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn)
                .await?;
            let (next, entries) = decode::parse_autoclaim_reply(&reply).map_err(protocol_error)?;
            if next == "0-0" {
                // A full pass over the pending list: rest until the next claim is due.
                self.last_claim = Some(Instant::now());
            }
            self.claim_cursor = next;
            if !entries.is_empty() {
                info!(
                    count = entries.len(),
                    "claimed entries idle in dead consumers"
                );
                metrics::counter!("livegate_order_writer_claimed_total")
                    .increment(entries.len() as u64);
                return Ok(entries);
            }
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(ORDER_WRITER_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        let from_pending = match &self.source {
            Source::Pending(after) => Some(after.clone()),
            Source::New => None,
        };
        match &from_pending {
            Some(after) => cmd.arg("STREAMS").arg(&events).arg(after),
            None => cmd
                .arg("BLOCK")
                .arg(self.cfg.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&events)
                .arg(">"),
        };
        let entries = match &mut self.raw {
            Some(raw) => {
                let args: Vec<Vec<u8>> = cmd
                    .args_iter()
                    .filter_map(|a| match a {
                        redis::Arg::Simple(b) => Some(b.to_vec()),
                        _ => None,
                    })
                    .collect();
                let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                raw.read_group(&args, self.cfg.block + Duration::from_secs(5))
                    .await?
            }
            None => {
                let reply: Value = cmd.query_async(&mut conn).await?;
                decode::parse_read_reply(&reply).map_err(protocol_error)?
            }
        };
        if from_pending.is_some() {
            self.source = match entries.last() {
                Some(last) => Source::Pending(last.id.clone()),
                None => Source::New,
            };
        }
        Ok(entries)
    }

    /// Stores the orders of `entries` in one transaction (retrying while the store fails),
    /// then, in one MULTI/EXEC: copies undecodable entries to the dead letters,
    /// acknowledges every entry, and publishes a confirmation per order. `Ok(None)` when
    /// shutdown completed while the store was failing (nothing acknowledged).
    async fn handle_batch<F: Future<Output = ()>>(
        &mut self,
        entries: &[Entry],
        shutdown: &mut Shutdown<'_, F>,
    ) -> redis::RedisResult<Option<BatchReport>> {
        let started = Instant::now();
        let mut orders = Vec::new();
        let mut order_entries = Vec::new();
        let mut dead = Vec::new();
        for e in entries {
            match decode::decode(e) {
                Decoded::Order(o) => {
                    orders.push(o);
                    order_entries.push(e);
                }
                Decoded::Skip => {}
                Decoded::Dead(reason) => dead.push((e, reason)),
            }
        }
        // One outcome per order; `Err(reason)` = the store refused that order's data.
        let outcomes: Vec<Result<StoredOutcome, String>> = loop {
            let err = match self.store.store_batch(&orders).await {
                Ok(o) => break o.into_iter().map(Ok).collect(),
                Err(e) if e.is_data_error() => {
                    // An order the store refuses would hold the batch forever: store the
                    // orders one by one and dead-letter the ones refused.
                    warn!(error = %e, "order store refused the batch; storing its orders one by one");
                    match self.store_one_by_one(&orders).await {
                        Ok(o) => break o,
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            warn!(error = %err, orders = orders.len(), "order store failed; batch not acknowledged, retrying");
            metrics::counter!("livegate_order_writer_errors_total", "source" => "store")
                .increment(1);
            if sleep_or_shutdown(self.backoff.next(), shutdown).await {
                return Ok(None);
            }
        };
        let mut refused = Vec::new();
        for (e, outcome) in order_entries.iter().zip(&outcomes) {
            if let Err(reason) = outcome {
                refused.push((*e, format!("the order store refused the order: {reason}")));
            }
        }
        dead.extend(refused);
        let mut report = BatchReport {
            entries: entries.len(),
            dead_letters: dead.len(),
            ..BatchReport::default()
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (e, reason) in &dead {
            warn!(id = %e.id, error = %reason, "order writer: dead letter");
            let cmd = pipe
                .cmd("XADD")
                .arg(self.keys.dead_letters())
                .arg("MAXLEN")
                .arg("~")
                .arg(DEAD_LETTERS_MAX)
                .arg("*");
            for (k, v) in e.fields.iter().flatten() {
                cmd.arg(k.as_slice()).arg(v.as_slice());
            }
            cmd.arg("source_id")
                .arg(&e.id)
                .arg("error")
                .arg(reason)
                .ignore();
        }
        let ack = pipe
            .cmd("XACK")
            .arg(self.keys.events())
            .arg(ORDER_WRITER_GROUP);
        for e in entries {
            ack.arg(&e.id);
        }
        ack.ignore();
        let mut confirmed: HashSet<&str> = HashSet::with_capacity(orders.len());
        for (o, outcome) in orders.iter().zip(&outcomes) {
            match outcome {
                Ok(StoredOutcome::Inserted) => report.stored += 1,
                Ok(StoredOutcome::AlreadyStored) => report.duplicates += 1,
                Err(_) => continue,
            }
            // Newly stored or stored before (a redelivery): the buyer may not have heard.
            if confirmed.insert(o.order_id.as_str()) {
                let msg = serde_json::json!({
                    "order": o.order_id,
                    "user": o.user_id,
                    "total_cents": o.total_cents,
                });
                pipe.cmd("PUBLISH")
                    .arg(self.keys.confirmations())
                    .arg(msg.to_string())
                    .ignore();
            }
        }
        let mut conn = self.connection().await?;
        pipe.query_async::<()>(&mut conn).await?;
        self.batches_since_trim += 1;
        metrics::counter!("livegate_order_writer_batches_total").increment(1);
        metrics::counter!("livegate_order_writer_entries_total").increment(report.entries as u64);
        metrics::counter!("livegate_order_writer_orders_stored_total")
            .increment(report.stored as u64);
        metrics::counter!("livegate_order_writer_duplicates_total")
            .increment(report.duplicates as u64);
        metrics::counter!("livegate_order_writer_dead_letters_total")
            .increment(report.dead_letters as u64);
        metrics::histogram!("livegate_order_writer_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        debug!(?report, "order writer: batch handled");
        Ok(Some(report))
    }

    /// Stores each order in its own transaction; `Err(reason)` for an order whose data the
    /// store refuses. Fails on any other error (nothing is acknowledged then; what was stored
    /// stays stored, which the idempotent insert makes harmless).
    async fn store_one_by_one(
        &self,
        orders: &[crate::store::Order],
    ) -> Result<Vec<Result<StoredOutcome, String>>, StoreError> {
        let mut out = Vec::with_capacity(orders.len());
        for o in orders {
            match self.store.store_batch(std::slice::from_ref(o)).await {
                Ok(v) => match v.first() {
                    Some(outcome) => out.push(Ok(*outcome)),
                    None => out.push(Err("no outcome reported".to_string())),
                },
                Err(e) if e.is_data_error() => {
                    warn!(order = %o.order_id, error = %e, "order store refused an order");
                    out.push(Err(e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Trims the events stream when due (see [`TRIM_SCRIPT`]); a failure is only logged.
    async fn maybe_trim(&mut self) {
        if self.batches_since_trim < TRIM_EVERY_BATCHES
            && self.last_trim.elapsed() < self.trim_interval
        {
            return;
        }
        self.batches_since_trim = 0;
        self.last_trim = Instant::now();
        let Some(mut conn) = self.conn.clone() else {
            return;
        };
        let res: redis::RedisResult<(i64, i64, i64)> = self
            .trim_script
            .key(self.keys.events())
            .arg(ORDER_WRITER_GROUP)
            .arg(self.forget_consumer_idle.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        match res {
            Ok((pending, lag, trimmed)) => {
                metrics::gauge!("livegate_order_writer_pending").set(pending as f64);
                if lag >= 0 {
                    metrics::gauge!("livegate_order_writer_lag").set(lag as f64);
                }
                metrics::counter!("livegate_order_writer_trimmed_total")
                    .increment(trimmed.max(0) as u64);
                debug!(
                    pending,
                    lag, trimmed, "order writer: trimmed the events stream"
                );
            }
            Err(e) => warn!(error = %e, "order writer: trim failed"),
        }
    }
}

fn protocol_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "unexpected stream reply", msg))
}

/// `host-pid`, with anything outside `[A-Za-z0-9_.:-]` replaced.
fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let host = if host.is_empty() {
        "order-writer".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next();
            assert!(last <= BACKOFF_MAX + BACKOFF_MAX / 2);
        }
        assert!(last >= BACKOFF_MAX);
        b.reset();
        assert!(b.next() <= BACKOFF_MIN + BACKOFF_MIN / 2);
    }

    #[test]
    fn default_consumer_is_a_valid_id() {
        assert!(crate::config::valid_id(&default_consumer()));
    }
}
