//! After-run verification against the durable record, using the key layout of docs/redis.md:
//! a tail reader that follows `P:events` with XREAD from the moment before a scenario starts
//! (so entries the order writer trims later are still seen), a full XRANGE for the union,
//! and small helpers for hashes. Entries are flattened to string maps.

use crate::report::Report;
use anyhow::{Context, Result};
use redis::streams::StreamReadReply;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long [`Tail::finish`] may keep reading after it was asked to stop.
const TAIL_DRAIN: Duration = Duration::from_secs(10);

pub type Entry = (String, HashMap<String, String>);

fn flatten(map: &HashMap<String, redis::Value>) -> HashMap<String, String> {
    map.iter()
        .filter_map(|(k, v)| {
            redis::from_redis_value_ref::<String>(v)
                .ok()
                .map(|s| (k.clone(), s))
        })
        .collect()
}

pub async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {url} for verification"))
}

/// Follows a stream from "now" on until stopped.
pub struct Tail {
    entries: Arc<Mutex<Vec<Entry>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Tail {
    pub async fn start(url: &str, key: &str) -> Result<Tail> {
        let mut conn = connect(url).await?;
        let key = key.to_string();
        let entries: Arc<Mutex<Vec<Entry>>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        // The current last id, so nothing between now and the first XREAD is missed.
        let last: String = match redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&key)
            .query_async::<HashMap<String, redis::Value>>(&mut conn)
            .await
        {
            Ok(info) => info
                .get("last-generated-id")
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_else(|| "0-0".into()),
            Err(_) => "0-0".into(),
        };
        let out = entries.clone();
        let task = tokio::spawn(async move {
            let mut last = last;
            // Once stopped, reading to the end of the stream gets at most this long, so a
            // stream that keeps growing or a Redis that keeps failing cannot hold the run.
            let mut drain_until: Option<Instant> = None;
            loop {
                if *stopped.borrow_and_update() {
                    let until = *drain_until.get_or_insert_with(|| Instant::now() + TAIL_DRAIN);
                    if Instant::now() > until {
                        break;
                    }
                }
                let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(5000)
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await;
                match reply {
                    Ok(Some(r)) => {
                        let mut out = out.lock().unwrap();
                        for k in r.keys {
                            for id in k.ids {
                                last = id.id.clone();
                                out.push((id.id, flatten(&id.map)));
                            }
                        }
                    }
                    Ok(None) => {
                        if drain_until.is_some() {
                            break;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Tail {
            entries,
            stop,
            task,
        })
    }

    /// Stops after the stream has been read up to its end (at most [`TAIL_DRAIN`] more);
    /// returns every entry seen.
    pub async fn finish(self) -> Vec<Entry> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        std::mem::take(&mut *self.entries.lock().unwrap())
    }
}

/// Every entry still in the stream.
pub async fn xrange_all(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        let n = r.ids.len();
        for id in r.ids {
            start = format!("({}", id.id);
            out.push((id.id, flatten(&id.map)));
        }
        if n < 10_000 {
            return Ok(out);
        }
    }
}

/// Union of two entry lists by id.
pub fn union(a: Vec<Entry>, b: Vec<Entry>) -> Vec<Entry> {
    let mut seen = std::collections::HashSet::new();
    a.into_iter()
        .chain(b)
        .filter(|(id, _)| seen.insert(id.clone()))
        .collect()
}

/// Checks a product's durable stock in its hash `key` (`P:product:{sku}`): `stocked` is
/// there and equals what the anchor stocked, and `held` units plus `sold` do not exceed it
/// (no oversell in Redis). Reports the `redis stocked` row and any failure.
pub async fn check_stock(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    label: &str,
    want_stocked: u64,
    held: u64,
    report: &mut Report,
) -> Result<()> {
    let product: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .context("HGETALL product")?;
    let stocked: Option<u64> = product.get("stocked").and_then(|s| s.parse().ok());
    let sold: u64 = product
        .get("sold")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    report.row(
        &format!("{label} redis stocked"),
        stocked
            .map(serde_json::Value::from)
            .unwrap_or(serde_json::Value::Null),
    );
    match stocked {
        None => report.fail(format!("{label}: product hash {key} has no `stocked`")),
        Some(s) => {
            if s != want_stocked {
                report.fail(format!(
                    "{label}: redis stocked={s}, the anchor stocked {want_stocked}"
                ));
            }
            if held + sold > s {
                report.fail(format!(
                    "{label}: OVERSELL in Redis: {held} units held + {sold} sold > stocked {s}"
                ));
            }
        }
    }
    Ok(())
}
