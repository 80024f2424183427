//! Recovery and the background tasks that keep Redis and memory in step: restoring stock,
//! reservations, idempotency records, rooms, shelves and pins at start; the expiry sweeper;
//! the relay of stored-order confirmations to buyers; audience figures (distinct viewers,
//! likes, peak viewers).
//!
//! Everything here reads or writes Redis off the request path. It must not answer clients
//! directly except through the hub (expiry notices, `order_confirmed`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use redis::AsyncCommands;

use crate::{
    app::App,
    commit::CommitError,
    hub::ProductInfo,
    inventory::{ProductSpec, ResId, Reservation, RestoreState, RestoredProduct, Text},
    metrics::{self as m, unix_ms},
    protocol::{RoomStatus, ServerMsg},
};

/// Reservations expired per sweep (one group commit).
const EXPIRE_BATCH: usize = 512;
/// Pause between sweeps.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

fn field<'a>(h: &'a HashMap<String, String>, k: &str) -> &'a str {
    h.get(k).map(String::as_str).unwrap_or("")
}

fn num<T: std::str::FromStr + Default>(h: &HashMap<String, String>, k: &str) -> T {
    field(h, k).parse().unwrap_or_default()
}

/// Rebuilds the inventory core, the catalogue and the rooms from Redis.
pub async fn restore(app: &Arc<App>) -> Result<(), redis::RedisError> {
    let mut c = app.redis.clone();
    let k = &app.keys;
    let now = unix_ms();
    let mut state = RestoreState::default();
    let skus: Vec<String> = c.smembers(k.products()).await?;
    for sku in &skus {
        let h: HashMap<String, String> = c.hgetall(k.product(sku)).await?;
        if h.is_empty() {
            continue;
        }
        let spec = ProductSpec {
            price_cents: num(&h, "price_cents"),
            limit_per_user: num(&h, "limit_per_user"),
            ttl_s: num::<u32>(&h, "ttl_s").max(1),
        };
        let sku_arc: Arc<str> = Arc::from(sku.as_str());
        state.products.push(RestoredProduct {
            sku: sku_arc.clone(),
            spec,
            stocked: num::<i64>(&h, "stocked").max(0) as u64,
            sold: num::<i64>(&h, "sold").max(0) as u64,
        });
        let limit = (spec.limit_per_user > 0).then_some(spec.limit_per_user);
        app.hub.set_product(
            sku,
            ProductInfo {
                title: field(&h, "title").to_string(),
                price_cents: spec.price_cents,
                limit_per_user: limit,
                ttl_s: spec.ttl_s,
            },
            None,
        );
        let buyers: HashMap<String, u64> = c.hgetall(k.buyers(sku)).await?;
        for (user, units) in buyers {
            state
                .bought
                .push((sku_arc.clone(), Arc::from(user.as_str()), units));
        }
    }
    let records: HashMap<String, String> = c.hgetall(k.reservations()).await?;
    let mut bad = 0usize;
    // An active reservation's record is its idempotency record too. These go in last (the
    // restore keeps the newest records within the cap, and a later record of a key
    // replaces an earlier one): a held reservation is never dropped for an ended one, and
    // wins over an ended record of the same (user, req, sku).
    let mut held_idem = Vec::with_capacity(records.len());
    for (id, json) in &records {
        match parse_reservation(id, json) {
            Some(r) => {
                held_idem.push(r.live_idem());
                state.reservations.push(r);
            }
            None => bad += 1,
        }
    }
    // Idempotency records of ended reservations: the buckets `P:idem:reserves:{n}` the
    // core writes when a reservation ends (read oldest minute first), and the one-key
    // records `P:idem:reserve:{field}` (the Lua baseline, older versions). One scan finds
    // both; `reserve*` matches both names. (Versions before 2026-11-21 also wrote a bucket
    // record at the reserve; such a record of an active reservation restores as active.)
    let pattern = format!("{}:idem:reserve*", k.prefix());
    let bucket_prefix = format!("{}:idem:reserves:", k.prefix());
    let (mut buckets, mut single_keys) = (Vec::new(), Vec::new());
    {
        let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await?;
        while let Some(key) = iter.next_item().await {
            let key = key?;
            if key.starts_with(&bucket_prefix) {
                buckets.push(key);
            } else {
                single_keys.push(key);
            }
        }
    }
    buckets.sort_by_key(|b| {
        b.get(bucket_prefix.len()..)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    });
    let mut add_record = |user: &str, req: &str, sku: &str, value: &str| {
        let id = value.split(' ').next().unwrap_or_default();
        if let Some(rid) = ResId::parse(id) {
            let ended = !records.contains_key(id);
            state
                .idempotency
                .push((Arc::from(user), Arc::from(req), Arc::from(sku), rid, ended));
        }
    };
    for chunk in single_keys.chunks(500) {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query_async(&mut c).await?;
        for (key, value) in chunk.iter().zip(values) {
            if let (Some(value), Some((user, req, sku))) = (value, parse_idem_key(k.prefix(), key))
            {
                add_record(user, req, sku, &value);
            }
        }
    }
    for bucket in &buckets {
        let mut iter: redis::AsyncIter<(String, String)> = c.hscan(bucket).await?;
        while let Some(item) = iter.next_item().await {
            let (field, value) = item?;
            if let Some((user, req, sku)) = parse_idem_field(&field) {
                add_record(user, req, sku, &value);
            }
        }
    }
    state.idempotency.extend(held_idem);
    let summary = app.inventory.restore(state, now);
    tracing::info!(
        products = summary.products,
        reservations = summary.reservations,
        idempotency = summary.idempotency,
        skipped = summary.skipped_reservations + bad,
        deficits = summary.deficits.len(),
        "inventory restored from redis"
    );
    for (sku, units) in &summary.deficits {
        tracing::error!(%sku, units, "restored state holds more units than stocked; selling paused until units return");
    }
    let rooms: Vec<String> = c.smembers(k.rooms()).await?;
    let seq_base = now;
    for room in rooms {
        let h: HashMap<String, String> = c.hgetall(k.room(&room)).await?;
        if h.is_empty() {
            continue;
        }
        let Ok(r) = app.hub.ensure_room(&room) else {
            tracing::error!(%room, "room limit reached while restoring; room not restored");
            continue;
        };
        let shelf: Vec<String> = serde_json::from_str(field(&h, "shelf")).unwrap_or_default();
        let pinned = Some(field(&h, "pinned").to_string()).filter(|p| !p.is_empty());
        let status = RoomStatus::parse(field(&h, "status")).unwrap_or(RoomStatus::Closed);
        let stats: HashMap<String, String> = c.hgetall(k.room_stats(&room)).await?;
        r.counters
            .likes
            .store(num(&stats, "likes"), std::sync::atomic::Ordering::Relaxed);
        r.counters.peak_viewers.store(
            num(&stats, "peak_viewers"),
            std::sync::atomic::Ordering::Relaxed,
        );
        r.restore(
            field(&h, "title").to_string(),
            status,
            shelf,
            pinned,
            seq_base,
        )
        .await
        .map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "room restore", e.message))
        })?;
    }
    Ok(())
}

/// A reservation from its `P:reservations` record (docs/redis.md).
pub fn parse_reservation(id: &str, json: &str) -> Option<Reservation> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(Text::from);
    Some(Reservation {
        id: ResId::parse(id)?,
        user: s("user")?,
        req: s("req")?,
        room: s("room")?,
        referrer: s("ref"),
        sku: s("sku")?,
        qty: u32::try_from(v.get("qty")?.as_u64()?).ok()?,
        price_cents: v.get("price_cents")?.as_i64()?,
        expires_at: v.get("expires_at")?.as_u64()?,
    })
}

/// `P:idem:reserve:{len(user)}:{len(req)}:{user}:{req}:{sku}` -> (user, req, sku).
fn parse_idem_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
    parse_idem_field(key.strip_prefix(prefix)?.strip_prefix(":idem:reserve:")?)
}

/// `{len(user)}:{len(req)}:{user}:{req}:{sku}` -> (user, req, sku).
fn parse_idem_field(rest: &str) -> Option<(&str, &str, &str)> {
    let (ulen, rest) = rest.split_once(':')?;
    let (rlen, rest) = rest.split_once(':')?;
    let (ulen, rlen): (usize, usize) = (ulen.parse().ok()?, rlen.parse().ok()?);
    let user = rest.get(..ulen)?;
    let rest = rest.get(ulen..)?.strip_prefix(':')?;
    let req = rest.get(..rlen)?;
    let sku = rest.get(rlen..)?.strip_prefix(':')?;
    (!sku.is_empty()).then_some((user, req, sku))
}

/// Settles a change whose durable write has an unknown outcome (Redis did not answer in
/// time): once Redis answers again, `probe` (a command answering 1 when the record landed,
/// 0 when not) decides, and `settle(landed)` finishes the in-memory change. Until then the
/// change stays in flight, holding its units, so nothing is sold twice meanwhile. Gives up
/// after `limit` and settles as landed (the conservative side: units stay held and the
/// ordinary expiry returns them).
pub fn settle_unknown(
    app: &Arc<App>,
    probe: redis::Cmd,
    limit: Duration,
    settle: impl FnOnce(bool) + Send + 'static,
) {
    // The probe runs on the commit connection, after the write it asks about.
    let committer = app.committer.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            tokio::time::sleep(SETTLE_RETRY).await;
            match committer.probe(probe.clone()).await {
                Ok(n) => {
                    settle(n > 0);
                    metrics::counter!(m::UNKNOWN_SETTLED, "landed" => if n > 0 { "yes" } else { "no" })
                        .increment(1);
                    return;
                }
                Err(_) if tokio::time::Instant::now() < deadline => continue,
                Err(_) => {
                    settle(true);
                    return;
                }
            }
        }
    });
}

/// Pause between probes of an unknown outcome.
const SETTLE_RETRY: Duration = Duration::from_millis(250);

/// Ends reservations whose time is up: records `expired`, returns the units, and tells the
/// holder `released {reason:"expired"}`. A failed record leaves them held for the next
/// sweep. Cost per sweep grows with what expires, not with what is held.
pub async fn expiry_sweeper(app: Arc<App>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        metrics::counter!(crate::metrics::INVENTORY_LOCK_WAITS)
            .absolute(app.inventory.lock_waits());
        loop {
            let due = app.inventory.take_due(unix_ms(), EXPIRE_BATCH);
            if due.is_empty() {
                break;
            }
            let full = due.len() == EXPIRE_BATCH;
            let now = unix_ms();
            let mut cmds = Vec::with_capacity(due.len() + 1);
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(app.keys.reservations());
            for r in &due {
                let id = r.id.to_string();
                let mut xadd = crate::commit::event(&app.keys, "expired");
                xadd.arg("reservation")
                    .arg(&id)
                    .arg("user")
                    .arg(&*r.user)
                    .arg("sku")
                    .arg(&*r.sku)
                    .arg("qty")
                    .arg(r.qty)
                    .arg("at")
                    .arg(now);
                cmds.push(xadd);
                hdel.arg(id);
            }
            cmds.push(hdel);
            let ids: Vec<ResId> = due.iter().map(|r| r.id).collect();
            let hash_writes = due
                .iter()
                .map(|r| crate::command::ended_idem(&app, r, now))
                .collect();
            let result = app
                .committer
                .commit_change(crate::commit::Change { cmds, hash_writes })
                .await;
            let ok = result.is_ok();
            let _ = app.inventory.finish_expire(&ids, ok);
            match result {
                Ok(()) => {
                    metrics::counter!(m::EXPIRED).increment(due.len() as u64);
                    for r in &due {
                        app.hub.send_to_user(
                            &r.user,
                            &ServerMsg::Released {
                                req: None,
                                reservation: r.id.to_string(),
                                reason: "expired",
                            },
                        );
                    }
                }
                Err(CommitError::Unavailable(_)) | Err(CommitError::Unknown) => break,
            }
            if !full {
                break;
            }
        }
    }
}

/// Relays `P:confirmations` (published by the order writer once an order is stored) to the
/// buyer's connections on this gateway as `order_confirmed`. Reconnects by itself.
pub async fn confirmation_relay(app: Arc<App>, client: redis::Client) {
    let channel = app.keys.confirmations();
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    let mut stream = pubsub.on_message();
                    while let Some(msg) = stream.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        relay_confirmation(&app, &payload);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "confirmation relay cannot reach redis"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn relay_confirmation(app: &App, payload: &str) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
        tracing::warn!(payload, "undecodable confirmation");
        return;
    };
    let (Some(order), Some(user), Some(total)) = (
        v.get("order").and_then(|x| x.as_str()),
        v.get("user").and_then(|x| x.as_str()),
        v.get("total_cents").and_then(|x| x.as_i64()),
    ) else {
        tracing::warn!(payload, "confirmation without order, user or total_cents");
        return;
    };
    let n = app.hub.send_to_user(
        user,
        &ServerMsg::OrderConfirmed {
            order: order.to_string(),
            total_cents: total,
        },
    );
    metrics::counter!(m::CONFIRMATIONS_SENT).increment(n as u64);
}

/// Records that `user` joined `room` (distinct viewers, peak), off the request path.
pub fn note_viewer(app: &Arc<App>, room: &Arc<str>, user: &Arc<str>) {
    let Some(r) = app.hub.room(room) else { return };
    let peak = r
        .counters
        .peak_viewers
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut pipe = redis::pipe();
    pipe.cmd("PFADD")
        .arg(app.keys.room_viewers(room))
        .arg(&**user)
        .ignore();
    pipe.cmd("HSET")
        .arg(app.keys.room_stats(room))
        .arg("peak_viewers")
        .arg(peak)
        .ignore();
    app.audience_write(pipe);
}

/// Adds likes to the room's durable figure, off the request path.
pub fn note_likes(app: &Arc<App>, room: &Arc<str>, count: u32) {
    let mut pipe = redis::pipe();
    pipe.cmd("HINCRBY")
        .arg(app.keys.room_stats(room))
        .arg("likes")
        .arg(count)
        .ignore();
    app.audience_write(pipe);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::reservation_record as cart_record;

    #[test]
    fn idempotency_keys_parse_back() {
        let keys = crate::keys::Keys::new("lg");
        for (user, req, sku) in [("u1", "r1", "s"), ("a:b", "x:y", "s:1"), ("ü", "q", "z")] {
            let key = keys.reserve_idem(user, req, sku);
            let field = crate::keys::Keys::reserve_idem_field(user, req, sku);
            assert_eq!(parse_idem_field(&field), Some((user, req, sku)), "{field}");
            assert_eq!(parse_idem_key("lg", &key), Some((user, req, sku)), "{key}");
        }
        assert_eq!(parse_idem_key("lg", "lg:idem:reserve:99:1:r:u:s"), None);
        assert_eq!(parse_idem_key("lg", "lg:idem:reserve:1:1:u:r:"), None);
        assert_eq!(parse_idem_key("lg", "other"), None);
    }

    #[test]
    fn reservation_records_round_trip() {
        let r = Reservation {
            id: ResId::new(3, 7),
            user: "u".into(),
            req: "q".into(),
            room: "room".into(),
            referrer: Some("sharer".into()),
            sku: "sku".into(),
            qty: 2,
            price_cents: 999,
            expires_at: 123,
        };
        let back = parse_reservation(&r.id.to_string(), &cart_record(&r)).expect("parses");
        assert_eq!(back, r);
    }
}
