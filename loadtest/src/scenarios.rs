//! The scenarios, one file each: `fanout` (broadcast delivery latency, NATS baseline),
//! `rush` (flash-sale reservations, Lua baseline; `rush_sustained` is its sustained mode,
//! `rush --sustain-secs`), `checkout` (orders end to end),
//! `soak` (churn over time, server RSS) `idle` (memory per idle connection) and `probe` (protocol conformance).

pub mod checkout;
pub mod fanout;
pub mod idle;
pub mod probe;
pub mod rush;
pub mod rush_sustained;
pub mod soak;

use crate::client::Client;
use crate::ctx::Ctx;
use anyhow::Result;
use serde_json::json;
use std::sync::Arc;

/// One product on sale, as `rush` and `checkout` set it up.
pub struct Sale<'a> {
    pub room: &'a str,
    pub title: &'a str,
    pub sku: &'a str,
    pub product: &'a str,
    pub price_cents: i64,
    pub stock: u64,
}

/// An anchor opens `room`, stocks `sku` (reservation TTL 600 s) and pins it; returns the
/// anchor's connection.
pub async fn open_sale(ctx: &Ctx, s: &Sale<'_>) -> Result<Arc<Client>> {
    let anchor = ctx.anchor(&[s.room.to_string()]).await?;
    anchor
        .expect(
            json!({"type": "open_room", "room": s.room, "title": s.title}),
            "ack",
        )
        .await?;
    anchor
        .expect(
            json!({"type": "upsert_product", "room": s.room, "sku": s.sku, "title": s.product,
                   "price_cents": s.price_cents, "stock": s.stock, "ttl_s": 600}),
            "ack",
        )
        .await?;
    anchor
        .expect(json!({"type": "pin", "room": s.room, "sku": s.sku}), "ack")
        .await?;
    Ok(anchor)
}
