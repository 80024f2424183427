//! The benchmark baseline for `add_to_cart`: one Redis Lua script per request, the usual
//! flash-sale design (stock counted in Redis, checked and taken atomically by a script).
//! Enabled only by `LIVEGATE_RESERVE_MODE=lua`, so the loadtest can drive both designs with
//! the same clients and payloads.
//!
//! It must not be used in production: reservations made this way are not in the inventory
//! core, so `release`, `checkout` and expiry do not see them; the core only mirrors the
//! units taken, so the room's `stock` broadcasts are the same as with the core.

use std::sync::{Arc, OnceLock};

use super::{cart::reserved_reply, Reply, Session};
use crate::{
    app::App,
    inventory::{ResId, Reservation, Text},
    protocol::{ErrorCode, ProtoError},
};

const SCRIPT: &str = r#"
-- KEYS: product hash, reservations hash, events stream, idempotency key
-- ARGV: id, sku, qty, record, ttl_ms
local prior = redis.call('GET', KEYS[4])
if prior then
  local id = string.match(prior, '^(%S+)')
  return {2, redis.call('HGET', KEYS[2], id) or '', id}
end
local p = redis.call('HMGET', KEYS[1], 'stocked', 'sold', 'held')
if not p[1] then return {-1, 'unknown sku', ''} end
local free = tonumber(p[1]) - tonumber(p[2] or '0') - tonumber(p[3] or '0')
local qty = tonumber(ARGV[3])
if free < qty then return {0, tostring(free), ''} end
redis.call('HINCRBY', KEYS[1], 'held', qty)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'kind', 'reserved', 'reservation', ARGV[1], 'record', ARGV[4])
redis.call('SET', KEYS[4], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[5])
return {1, ARGV[1], ARGV[1]}
"#;

fn script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(SCRIPT))
}

/// Checks what needs the session now and returns the script's round trip as a future that
/// owns everything it needs (the connection polls it beside its next frames, as it does
/// the core's commit).
#[allow(clippy::too_many_arguments)]
pub fn reserve(
    app: &Arc<App>,
    s: &Session,
    req: String,
    room: &Arc<str>,
    sku: &str,
    qty: u32,
    referrer: Option<Arc<str>>,
    now: u64,
) -> impl std::future::Future<Output = Reply> + Send + 'static {
    let app = app.clone();
    let user = s.user.clone();
    let room = room.clone();
    let sku = sku.to_string();
    async move { run_script(&app, user, req, room, &sku, qty, referrer, now).await }
}

#[allow(clippy::too_many_arguments)]
async fn run_script(
    app: &Arc<App>,
    user: Arc<str>,
    req: String,
    room: Arc<str>,
    sku: &str,
    qty: u32,
    referrer: Option<Arc<str>>,
    now: u64,
) -> Reply {
    let Some(product) = app.hub.product(sku) else {
        return Err(ProtoError::new(ErrorCode::NotFound, "unknown sku"));
    };
    let res = Reservation {
        id: ResId::new(app.epoch, app.next_baseline_id()),
        user: Text::from(&*user),
        req: Text::from(req.as_str()),
        room: Text::from(&*room),
        referrer: referrer.as_deref().map(Text::from),
        sku: Text::from(sku),
        qty,
        price_cents: product.price_cents,
        expires_at: now + u64::from(product.ttl_s) * 1000,
    };
    let id = res.id.to_string();
    let (code, detail, prior_id): (i64, String, String) = script()
        .key(app.keys.product(sku))
        .key(app.keys.reservations())
        .key(app.keys.events())
        .key(app.keys.reserve_idem(&user, &req, sku))
        .arg(&id)
        .arg(sku)
        .arg(qty)
        .arg(super::reservation_record(&res))
        .arg(app.cfg.limits.idempotency_ttl.as_millis() as u64)
        .invoke_async(&mut app.redis.clone())
        .await
        .map_err(|e| ProtoError::new(ErrorCode::Unavailable, format!("redis: {e}")))?;
    match code {
        1 => {
            // Viewers of the baseline see stock move as they do with the core: mirror the
            // units taken into the displayed stock (the core is only a display here).
            let _ = app.inventory.restock(sku, -i64::from(qty));
            Ok(Some(reserved_reply(req, &res)))
        }
        // A retry: answer the same reservation while it is held.
        2 => match crate::recovery::parse_reservation(&prior_id, &detail) {
            Some(prior) => Ok(Some(reserved_reply(req, &prior))),
            None => Err(ProtoError::new(
                ErrorCode::Conflict,
                format!("req already made reservation {prior_id}, which has ended"),
            )),
        },
        0 => Err(ProtoError::new(
            ErrorCode::SoldOut,
            format!("sold out: {detail} available"),
        )),
        _ => Err(ProtoError::new(ErrorCode::NotFound, detail)),
    }
}
