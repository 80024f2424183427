//! Cart commands, the hot path: `add_to_cart`, `release`, `checkout`.
//!
//! Two-phase with the inventory core: the change is made in memory (units held, nothing
//! else may touch them), recorded through the group committer, then confirmed or undone.
//! A reply says `reserved` / `released` / `order_accepted` only after Redis holds it. When
//! the outcome of a write is unknown (timeout), the core keeps the state that holds the
//! units, so nothing can be sold twice.

use std::sync::Arc;

use super::{anchor::inv_error, find_room, unavailable, Reply, Session, Step};
use crate::{
    app::App,
    commit::{Change, CommitError, HashWrite},
    config::ReserveMode,
    inventory::{InvError, ResHandle, ResId, Reservation, ReserveOutcome, ReserveRequest, Text},
    keys,
    metrics::{self as m, unix_ms},
    protocol::{ErrorCode, ProtoError, ServerMsg},
};

/// The JSON record of an active reservation in `P:reservations` (docs/redis.md).
pub fn reservation_record(r: &Reservation) -> String {
    // Serialized from borrowed fields: `json!` would build a map of owned strings first,
    // and this runs once per reservation on the hot path.
    #[derive(serde::Serialize)]
    struct Record<'a> {
        user: &'a str,
        req: &'a str,
        room: &'a str,
        sku: &'a str,
        qty: u32,
        price_cents: i64,
        expires_at: u64,
        #[serde(rename = "ref")]
        referrer: Option<&'a str>,
    }
    let record = Record {
        user: &r.user,
        req: &r.req,
        room: &r.room,
        sku: &r.sku,
        qty: r.qty,
        price_cents: r.price_cents,
        expires_at: r.expires_at,
        referrer: r.referrer.as_deref(),
    };
    // Serializing strings and integers into a Vec cannot fail.
    serde_json::to_string(&record).unwrap_or_default()
}

/// The state write that makes a reservation durable: its record in `P:reservations`, a
/// hash write merged with the rest of its group commit. While the reservation is active,
/// that record is also its idempotency record (it names the user, req and SKU; a restart
/// rebuilds the index from it); [`ended_idem`] writes one of its own when it ends.
fn reservation_state(app: &App, id: &str, record: String) -> Vec<HashWrite> {
    vec![HashWrite {
        key: app.keys.reservations(),
        field: id.to_string(),
        value: record,
        expire_at_ms: None,
    }]
}

/// The idempotency record of a reservation that ends now (released, bought or expired),
/// written in the same transaction as the removal of its record, into the current minute's
/// bucket: from then until the bucket expires, a retry of its (user, req, sku) is told it
/// ended instead of reserving again, also after a restart. Written at the end rather than
/// at the reserve, so a rush of reserves costs Redis one hash write each, not two.
pub(crate) fn ended_idem(app: &App, r: &Reservation, now: u64) -> HashWrite {
    let bucket = keys::idem_bucket(now);
    let ttl_ms = app.cfg.limits.idempotency_ttl.as_millis() as u64;
    HashWrite {
        key: app.keys.reserve_idem_bucket(bucket),
        field: keys::Keys::reserve_idem_field(&r.user, &r.req, &r.sku),
        value: format!("{} {}", r.id, r.sku),
        expire_at_ms: Some(keys::idem_bucket_expiry(bucket, ttl_ms)),
    }
}

pub(super) fn reserved_reply(req: String, r: &Reservation) -> ServerMsg {
    ServerMsg::Reserved {
        req,
        reservation: r.id.to_string(),
        room: r.room.to_string(),
        sku: r.sku.to_string(),
        qty: r.qty,
        price_cents: r.price_cents,
        expires_at: r.expires_at,
    }
}

/// `add_to_cart` in two parts: the checks and the in-memory reserve run now, in the order
/// the connection sent its commands; the wait for the durable write is returned as a
/// [`Step::Later`] that the connection polls beside its next frames.
pub fn add_to_cart(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    sku: String,
    qty: u32,
) -> Step {
    match reserve_now(app, s, req, room, sku, qty) {
        Ok(step) => step,
        Err(e) => Step::Now(Err(e)),
    }
}

fn reserve_now(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    sku: String,
    qty: u32,
) -> Result<Step, ProtoError> {
    let r = find_room(app, &room)?;
    if !r.counters.is_live() {
        return Err(ProtoError::new(
            ErrorCode::RoomClosed,
            "the room is not live",
        ));
    }
    if !r.counters.on_shelf(&sku) {
        return Err(ProtoError::new(
            ErrorCode::NotFound,
            format!("{sku:?} is not on this room's shelf"),
        ));
    }
    // The session's own copy of the room id when it joined (see `viewer::join`).
    let (room_id, referrer) = match s.rooms.get_key_value(room.as_str()) {
        Some((id, referrer)) => (id.clone(), referrer.clone()),
        None => (r.id.clone(), None),
    };
    let now = unix_ms();
    if app.cfg.reserve_mode == ReserveMode::Lua {
        let fut = super::lua_baseline::reserve(app, s, req, &r.id, &sku, qty, referrer, now);
        return Ok(Step::Later(Box::pin(fut)));
    }
    let request = ReserveRequest {
        user: Text::from(&*s.user),
        req: Text::from(req.as_str()),
        room: Text::from(&*room_id),
        referrer: referrer.as_deref().map(Text::from),
        sku: Text::from(sku.as_str()),
        qty,
        now,
    };
    Ok(start_reserve(app, req, request))
}

/// Reserves in memory now; the durable write (or the wait for an earlier request with the
/// same `req`) is the [`Step::Later`].
fn start_reserve(app: &Arc<App>, req: String, request: ReserveRequest) -> Step {
    match app.inventory.reserve(request.clone()) {
        // A retry: the core answers Existing only for a Held reservation, and a
        // reservation is Held only once Redis holds it.
        Ok(ReserveOutcome::Existing(res)) => Step::Now(Ok(Some(reserved_reply(req, &res)))),
        Ok(ReserveOutcome::New(res)) => {
            Step::Later(Box::pin(commit_reservation(app.clone(), req, res)))
        }
        // The same (user, req, sku) is still being recorded (a client that resent before
        // its first reply, on this connection or another): answer what the first gets.
        Err(InvError::InFlight) => {
            Step::Later(Box::pin(wait_then_reserve(app.clone(), req, request)))
        }
        Err(e) => Step::Now(Err(inv_error(e))),
    }
}

/// Waits until the earlier request with the same key is settled, then answers its
/// reservation, or, if it was undone, reserves anew. Bounded by the commit timeout (plus a
/// second): past it, `conflict` as before.
async fn wait_then_reserve(app: Arc<App>, req: String, mut request: ReserveRequest) -> Reply {
    let deadline = tokio::time::Instant::now()
        + app.cfg.limits.commit_timeout
        + std::time::Duration::from_secs(1);
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
        request.now = unix_ms();
        match app.inventory.reserve(request.clone()) {
            Ok(ReserveOutcome::Existing(res)) => return Ok(Some(reserved_reply(req, &res))),
            Ok(ReserveOutcome::New(res)) => return commit_reservation(app, req, res).await,
            Err(InvError::InFlight) if tokio::time::Instant::now() < deadline => {}
            Err(e) => return Err(inv_error(e)),
        }
    }
}

/// Records a new reservation through the group committer, then confirms it (`reserved`),
/// undoes it (`unavailable`), or, when Redis did not answer, keeps its units until Redis
/// says whether the record landed.
async fn commit_reservation(app: Arc<App>, req: String, res: ResHandle) -> Reply {
    let id = res.id.to_string();
    // The entry carries the reservation's record, the same JSON as `P:reservations`
    // (docs/redis.md): three fields rather than ten, which is what Redis pays per entry
    // when it is added and again when the order writer reads it.
    let record = reservation_record(&res);
    let mut xadd =
        crate::commit::event_sized(&app.keys, "reserved", 2, 20 + id.len() + record.len());
    xadd.arg("reservation").arg(&id).arg("record").arg(&record);
    let change = Change {
        cmds: vec![xadd],
        hash_writes: reservation_state(&app, &id, record),
    };
    match app.committer.commit_change(change).await {
        Ok(()) => {
            let _ = app.inventory.confirm(&res);
            metrics::counter!(m::RESERVATIONS).increment(1);
            Ok(Some(reserved_reply(req, &res)))
        }
        Err(e @ CommitError::Unavailable(_)) => {
            let _ = app.inventory.abort_reserve(res.id);
            Err(unavailable(e))
        }
        Err(e @ CommitError::Unknown) => {
            // Redis may or may not hold it: the units stay held (Pending) until Redis
            // answers whether the record landed.
            let mut probe = redis::cmd("HEXISTS");
            probe.arg(app.keys.reservations()).arg(&id);
            let inventory = app.inventory.clone();
            let id = res.id;
            crate::recovery::settle_unknown(&app, probe, settle_limit(&app), move |landed| {
                let _ = if landed {
                    inventory.confirm_reserve(id)
                } else {
                    inventory.abort_reserve(id)
                };
            });
            Err(unavailable(e))
        }
    }
}

/// How long an unknown outcome may stay unsettled before it is settled as landed.
fn settle_limit(app: &App) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(app.cfg.limits.default_ttl_s))
}

fn parse_id(id: &str) -> Result<ResId, ProtoError> {
    ResId::parse(id)
        .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, format!("no reservation {id:?}")))
}

pub async fn release(app: &Arc<App>, s: &mut Session, req: String, reservation: String) -> Reply {
    let id = parse_id(&reservation)?;
    let res = app
        .inventory
        .begin_release(&s.user, id)
        .map_err(inv_error)?;
    let now = unix_ms();
    let mut xadd = crate::commit::event(&app.keys, "released");
    xadd.arg("reservation")
        .arg(&reservation)
        .arg("user")
        .arg(&*res.user)
        .arg("sku")
        .arg(&*res.sku)
        .arg("qty")
        .arg(res.qty)
        .arg("at")
        .arg(now);
    let mut hdel = redis::cmd("HDEL");
    hdel.arg(app.keys.reservations()).arg(&reservation);
    let result = app
        .committer
        .commit_change(Change {
            cmds: vec![xadd, hdel],
            hash_writes: vec![ended_idem(app, &res, now)],
        })
        .await;
    if matches!(result, Err(CommitError::Unknown)) {
        // Released in Redis if the record is gone.
        let mut probe = redis::cmd("HEXISTS");
        probe.arg(app.keys.reservations()).arg(&reservation);
        let inventory = app.inventory.clone();
        crate::recovery::settle_unknown(app, probe, settle_limit(app), move |still_held| {
            let _ = inventory.finish_release(id, !still_held);
        });
    } else {
        let _ = app.inventory.finish_release(id, result.is_ok());
    }
    result.map_err(unavailable)?;
    Ok(Some(ServerMsg::Released {
        req: Some(req),
        reservation,
        reason: "released",
    }))
}

pub async fn checkout(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    reservations: Vec<String>,
) -> Reply {
    // A retry of a recorded checkout answers the same order.
    let idem_key = app.keys.order_idem(&s.user, &req);
    let prior: Option<String> = redis::cmd("GET")
        .arg(&idem_key)
        .query_async(&mut app.redis.clone())
        .await
        .map_err(|e| ProtoError::new(ErrorCode::Unavailable, format!("redis: {e}")))?;
    if let Some((order, total)) = prior.as_deref().and_then(|v| v.split_once(' ')) {
        return Ok(Some(ServerMsg::OrderAccepted {
            req,
            order: order.to_string(),
            total_cents: total.parse().unwrap_or(0),
        }));
    }
    let ids = reservations
        .iter()
        .map(|r| parse_id(r))
        .collect::<Result<Vec<_>, _>>()?;
    let now = unix_ms();
    let held = app
        .inventory
        .begin_checkout(&s.user, &ids, now)
        .map_err(inv_error)?;
    let order = app.next_order_id();
    let total: i64 = held
        .iter()
        .map(|r| r.price_cents.saturating_mul(i64::from(r.qty)))
        .sum();
    let items: Vec<serde_json::Value> = held
        .iter()
        .map(|r| {
            serde_json::json!({
                "reservation": r.id.to_string(),
                "sku": &*r.sku,
                "qty": r.qty,
                "price_cents": r.price_cents,
            })
        })
        .collect();
    // An order belongs to one room: the room of its first reservation.
    let first = &held[0];
    let k = &app.keys;
    let mut cmds = Vec::with_capacity(3 + 2 * held.len());
    let mut xadd = crate::commit::event(k, "order");
    xadd.arg("order")
        .arg(&order)
        .arg("user")
        .arg(&*s.user)
        .arg("req")
        .arg(&req)
        .arg("room")
        .arg(&*first.room)
        .arg("ref")
        .arg(first.referrer.as_deref().unwrap_or(""))
        .arg("total_cents")
        .arg(total)
        .arg("created_at")
        .arg(now)
        .arg("items")
        .arg(serde_json::Value::Array(items).to_string());
    cmds.push(xadd);
    let mut hdel = redis::cmd("HDEL");
    hdel.arg(k.reservations());
    for r in &held {
        hdel.arg(r.id.to_string());
        let mut sold = redis::cmd("HINCRBY");
        sold.arg(k.product(&r.sku)).arg("sold").arg(r.qty);
        cmds.push(sold);
        let mut bought = redis::cmd("HINCRBY");
        bought.arg(k.buyers(&r.sku)).arg(&*s.user).arg(r.qty);
        cmds.push(bought);
    }
    cmds.push(hdel);
    let mut idem = redis::cmd("SET");
    idem.arg(&idem_key)
        .arg(format!("{order} {total}"))
        .arg("PX")
        .arg(app.cfg.limits.idempotency_ttl.as_millis() as u64);
    cmds.push(idem);
    let result = app
        .committer
        .commit_change(Change {
            cmds,
            hash_writes: held.iter().map(|r| ended_idem(app, r, now)).collect(),
        })
        .await;
    if matches!(result, Err(CommitError::Unknown)) {
        // The order is recorded if its idempotency record is; until Redis says, the units
        // stay in checkout. A retry with the same req finds the record once it is there.
        let mut probe = redis::cmd("EXISTS");
        probe.arg(&idem_key);
        let inventory = app.inventory.clone();
        let ids2 = ids.clone();
        crate::recovery::settle_unknown(app, probe, settle_limit(app), move |landed| {
            let _ = inventory.finish_checkout(&ids2, landed);
        });
    } else {
        let _ = app.inventory.finish_checkout(&ids, result.is_ok());
    }
    result.map_err(unavailable)?;
    metrics::counter!(m::ORDERS_ACCEPTED).increment(1);
    Ok(Some(ServerMsg::OrderAccepted {
        req,
        order,
        total_cents: total,
    }))
}
