//! Anchor commands: `open_room`, `close_room`, `upsert_product`, `restock`, `pin`, `unpin`.
//!
//! Each runs under its room's anchor lock (and the catalogue lock when it touches a SKU):
//! check, record in Redis, then apply to the inventory core and the room, so the order of
//! the broadcasts is the order of the records. A failed record changes nothing.

use std::sync::Arc;

use super::{find_room, unavailable, Reply, Session};
use crate::{
    app::App,
    hub::{ProductInfo, RoomChange},
    inventory::{InvError, ProductSpec},
    metrics::unix_ms,
    protocol::{ErrorCode, ProtoError, RoomStatus, ServerMsg},
};

fn authorize(s: &Session, room: &str) -> Result<(), ProtoError> {
    if s.claims.controls(room) {
        Ok(())
    } else {
        Err(ProtoError::new(
            ErrorCode::Forbidden,
            format!("this token does not control room {room:?}"),
        ))
    }
}

fn ack(req: String) -> Reply {
    Ok(Some(ServerMsg::Ack { req }))
}

/// Maps an inventory error to its protocol error.
pub(super) fn inv_error(e: InvError) -> ProtoError {
    let code = match &e {
        InvError::UnknownSku | InvError::NotFound => ErrorCode::NotFound,
        InvError::SoldOut { .. } => ErrorCode::SoldOut,
        InvError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
        InvError::Expired { .. } => ErrorCode::Expired,
        InvError::Conflict(_) | InvError::InFlight | InvError::Ended { .. } => ErrorCode::Conflict,
        InvError::InvalidQty | InvError::Invalid(_) => ErrorCode::BadRequest,
    };
    ProtoError::new(code, e.to_string())
}

fn room_write(app: &App, room: &str, fields: &[(&str, String)]) -> redis::Cmd {
    let mut c = redis::cmd("HSET");
    c.arg(app.keys.room(room));
    for (k, v) in fields {
        c.arg(*k).arg(v);
    }
    c
}

pub async fn open_room(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    title: String,
) -> Reply {
    authorize(s, &room)?;
    let r = {
        let _catalog = app.hub.catalog_lock.lock().await;
        app.hub.ensure_room(&room)?
    };
    let _g = r.anchor_lock.lock().await;
    let mut sadd = redis::cmd("SADD");
    sadd.arg(app.keys.rooms()).arg(&room);
    let write = room_write(
        app,
        &room,
        &[
            ("title", title.clone()),
            ("status", RoomStatus::Live.as_str().into()),
        ],
    );
    app.committer
        .commit(vec![sadd, write])
        .await
        .map_err(unavailable)?;
    r.apply(RoomChange::Opened { title }).await?;
    ack(req)
}

pub async fn close_room(app: &Arc<App>, s: &mut Session, req: String, room: String) -> Reply {
    authorize(s, &room)?;
    let r = find_room(app, &room)?;
    let _g = r.anchor_lock.lock().await;
    let write = room_write(
        app,
        &room,
        &[("status", RoomStatus::Closed.as_str().into())],
    );
    app.committer
        .commit(vec![write])
        .await
        .map_err(unavailable)?;
    r.apply(RoomChange::Closed).await?;
    ack(req)
}

pub struct Upsert {
    pub sku: String,
    pub title: String,
    pub price_cents: i64,
    pub stock: Option<u64>,
    pub limit_per_user: Option<u32>,
    pub ttl_s: Option<u32>,
}

pub async fn upsert_product(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    p: Upsert,
) -> Reply {
    authorize(s, &room)?;
    let r = find_room(app, &room)?;
    let _g = r.anchor_lock.lock().await;
    let _catalog = app.hub.catalog_lock.lock().await;
    let (_, summary) = r.state().await?;
    let on_shelf = summary.shelf.contains(&p.sku);
    if !on_shelf && summary.shelf.len() >= app.cfg.limits.max_products_per_room {
        return Err(ProtoError::new(
            ErrorCode::Conflict,
            format!(
                "the shelf holds its maximum of {} products",
                app.cfg.limits.max_products_per_room
            ),
        ));
    }
    let existing = app.inventory.product(&p.sku);
    if existing.is_some() && p.stock.is_some() {
        return Err(ProtoError::new(
            ErrorCode::Conflict,
            "`stock` is only accepted when the SKU is created; use `restock`",
        ));
    }
    let spec = ProductSpec {
        price_cents: p.price_cents,
        limit_per_user: p.limit_per_user.unwrap_or(0),
        ttl_s: p.ttl_s.unwrap_or(app.cfg.limits.default_ttl_s),
    };
    let stocked = match &existing {
        Some((_, counts)) => counts.stocked,
        None => p.stock.unwrap_or(0),
    };
    let k = &app.keys;
    let mut cmds = Vec::with_capacity(5);
    let mut hset = redis::cmd("HSET");
    hset.arg(k.product(&p.sku));
    product_fields(&mut hset, &p.title, &spec);
    cmds.push(hset);
    if existing.is_none() {
        let mut init = redis::cmd("HSET");
        init.arg(k.product(&p.sku))
            .arg("stocked")
            .arg(stocked)
            .arg("sold")
            .arg(0);
        cmds.push(init);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(k.products()).arg(&p.sku);
        cmds.push(sadd);
    }
    let mut xadd = crate::commit::event(k, "product");
    xadd.arg("sku").arg(&p.sku).arg("room").arg(&room);
    product_fields(&mut xadd, &p.title, &spec);
    xadd.arg("stocked").arg(stocked);
    cmds.push(xadd);
    if !on_shelf {
        let mut shelf = summary.shelf.clone();
        shelf.push(p.sku.clone());
        let json = serde_json::to_string(&shelf).unwrap_or_else(|_| "[]".into());
        cmds.push(room_write(app, &room, &[("shelf", json)]));
    }
    app.committer.commit(cmds).await.map_err(unavailable)?;
    app.inventory
        .upsert(
            &p.sku,
            spec,
            if existing.is_none() {
                Some(stocked)
            } else {
                None
            },
        )
        .map_err(inv_error)?;
    let info = ProductInfo {
        title: p.title,
        price_cents: spec.price_cents,
        limit_per_user: p.limit_per_user,
        ttl_s: spec.ttl_s,
    };
    app.hub.set_product(&p.sku, info, Some(&room));
    r.apply(RoomChange::ShelfProduct { sku: p.sku }).await?;
    ack(req)
}

/// The fields a product shares between its hash and its `product` event (docs/redis.md).
fn product_fields(cmd: &mut redis::Cmd, title: &str, spec: &ProductSpec) {
    cmd.arg("title")
        .arg(title)
        .arg("price_cents")
        .arg(spec.price_cents)
        .arg("limit_per_user")
        .arg(spec.limit_per_user)
        .arg("ttl_s")
        .arg(spec.ttl_s);
}

pub async fn restock(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    sku: String,
    delta: i64,
) -> Reply {
    authorize(s, &room)?;
    let r = find_room(app, &room)?;
    if !r.counters.on_shelf(&sku) {
        return Err(ProtoError::new(
            ErrorCode::NotFound,
            format!("{sku:?} is not on this room's shelf"),
        ));
    }
    let _catalog = app.hub.catalog_lock.lock().await;
    // Units are taken away before the record and added after it, so a failed record never
    // leaves units on sale that Redis does not hold.
    let after = if delta < 0 {
        app.inventory.restock(&sku, delta).map_err(inv_error)?
    } else {
        app.inventory
            .counts(&sku)
            .ok_or_else(|| inv_error(InvError::UnknownSku))?
    };
    let stocked_after = if delta < 0 {
        after.stocked
    } else {
        after.stocked.saturating_add(delta.unsigned_abs())
    };
    let mut incr = redis::cmd("HINCRBY");
    incr.arg(app.keys.product(&sku)).arg("stocked").arg(delta);
    let mut xadd = crate::commit::event(&app.keys, "restock");
    xadd.arg("sku")
        .arg(&sku)
        .arg("delta")
        .arg(delta)
        .arg("stocked")
        .arg(stocked_after)
        .arg("at")
        .arg(unix_ms());
    match app.committer.commit(vec![incr, xadd]).await {
        Ok(()) => {
            if delta > 0 {
                app.inventory.restock(&sku, delta).map_err(inv_error)?;
            }
            ack(req)
        }
        Err(e) => {
            if delta < 0 && matches!(e, crate::commit::CommitError::Unavailable(_)) {
                // Nothing was written: give the units back.
                let _ = app.inventory.undo_restock(&sku, delta);
            }
            Err(unavailable(e))
        }
    }
}

pub async fn pin(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    sku: Option<String>,
) -> Reply {
    authorize(s, &room)?;
    let r = find_room(app, &room)?;
    let _g = r.anchor_lock.lock().await;
    if let Some(sku) = &sku {
        if !r.counters.on_shelf(sku) {
            return Err(ProtoError::new(
                ErrorCode::NotFound,
                format!("{sku:?} is not on this room's shelf"),
            ));
        }
    }
    let write = room_write(app, &room, &[("pinned", sku.clone().unwrap_or_default())]);
    app.committer
        .commit(vec![write])
        .await
        .map_err(unavailable)?;
    let change = match sku {
        Some(sku) => RoomChange::Pinned { sku },
        None => RoomChange::Unpinned,
    };
    r.apply(change).await?;
    ack(req)
}
