//! The Redis key and stream layout: every key livegate writes is named here, under the
//! configured prefix, so the layout documented in docs/redis.md has exactly one source.
//!
//! This module only builds names; it must not talk to Redis.

/// Names of every Redis key, stream and channel, all under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// The consumer group of the order writer on the events stream.
pub const ORDER_WRITER_GROUP: &str = "order-writer";

/// Width of one `add_to_cart` idempotency bucket (`P:idem:reserves:{bucket}`), in ms.
pub const IDEM_BUCKET_MS: u64 = 60_000;

/// The idempotency bucket of a record written at `unix_ms`.
pub fn idem_bucket(unix_ms: u64) -> u64 {
    unix_ms / IDEM_BUCKET_MS
}

/// When bucket `bucket` may go: `ttl_ms` after its last possible write, so every record in
/// it lives at least `ttl_ms` (and at most `ttl_ms` + one bucket width).
pub fn idem_bucket_expiry(bucket: u64, ttl_ms: u64) -> u64 {
    bucket
        .saturating_add(1)
        .saturating_mul(IDEM_BUCKET_MS)
        .saturating_add(ttl_ms)
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The events stream: the durable record of every change (field `kind` on each entry).
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Entries the order writer could not decode, with the reason.
    pub fn dead_letters(&self) -> String {
        format!("{}:events:dead", self.prefix)
    }

    /// Pub/sub channel on which stored orders are announced to every gateway.
    pub fn confirmations(&self) -> String {
        format!("{}:confirmations", self.prefix)
    }

    /// Set of every SKU ever created.
    pub fn products(&self) -> String {
        format!("{}:products", self.prefix)
    }

    /// Hash of one SKU: title, price_cents, limit_per_user, ttl_s, stocked, sold.
    pub fn product(&self, sku: &str) -> String {
        format!("{}:product:{sku}", self.prefix)
    }

    /// Hash of the units each user bought of one SKU (for `limit_per_user`): user -> units.
    pub fn buyers(&self, sku: &str) -> String {
        format!("{}:product:{sku}:buyers", self.prefix)
    }

    /// Hash of active reservations: reservation id -> JSON record.
    pub fn reservations(&self) -> String {
        format!("{}:reservations", self.prefix)
    }

    /// One-key idempotency record of `add_to_cart` (user, req, sku) -> reservation id, with
    /// a TTL: `P:idem:reserve:{field}` (see [`Keys::reserve_idem_field`]). Written by the Lua
    /// baseline; the core writes buckets instead ([`Keys::reserve_idem_bucket`]) and still
    /// reads these at start.
    pub fn reserve_idem(&self, user: &str, req: &str, sku: &str) -> String {
        format!(
            "{}:idem:reserve:{}",
            self.prefix,
            Keys::reserve_idem_field(user, req, sku)
        )
    }

    /// Hash of the `add_to_cart` idempotency records of reservations that ended in one bucket of
    /// [`IDEM_BUCKET_MS`]: field (see [`Keys::reserve_idem_field`]) -> `{reservation id}
    /// {sku}`; the whole hash expires at [`idem_bucket_expiry`].
    pub fn reserve_idem_bucket(&self, bucket: u64) -> String {
        format!("{}:idem:reserves:{bucket}", self.prefix)
    }

    /// The (user, req, sku) of an idempotency record. Lengths first, so any user id (it
    /// may hold `:`) parses back unambiguously: `{len(user)}:{len(req)}:{user}:{req}:{sku}`.
    pub fn reserve_idem_field(user: &str, req: &str, sku: &str) -> String {
        format!("{}:{}:{user}:{req}:{sku}", user.len(), req.len())
    }

    /// Idempotency record of `checkout` (user, req) -> order id and total, with a TTL.
    pub fn order_idem(&self, user: &str, req: &str) -> String {
        format!("{}:idem:order:{}:{req}", self.prefix, user.len()) + ":" + user
    }

    /// Set of every room ever opened.
    pub fn rooms(&self) -> String {
        format!("{}:rooms", self.prefix)
    }

    /// Hash of one room: title, status, pinned, and `shelf` (JSON list of SKUs in order).
    pub fn room(&self, room: &str) -> String {
        format!("{}:room:{room}", self.prefix)
    }

    /// Hash of a room's audience figures: likes, peak_viewers.
    pub fn room_stats(&self, room: &str) -> String {
        format!("{}:room:{room}:stats", self.prefix)
    }

    /// HyperLogLog of the distinct users who joined a room.
    pub fn room_viewers(&self, room: &str) -> String {
        format!("{}:room:{room}:viewers", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_starts_with_the_prefix() {
        let k = Keys::new("lg-test");
        for key in [
            k.events(),
            k.dead_letters(),
            k.confirmations(),
            k.products(),
            k.product("sku-1"),
            k.buyers("sku-1"),
            k.reservations(),
            k.reserve_idem("u:1", "r1", "s"),
            k.reserve_idem_bucket(idem_bucket(1_700_000_000_000)),
            k.order_idem("u", "r"),
            k.rooms(),
            k.room("room"),
            k.room_stats("room"),
            k.room_viewers("room"),
        ] {
            assert!(key.starts_with("lg-test:"), "{key}");
        }
    }

    #[test]
    fn idempotency_keys_cannot_collide_across_users() {
        // user "a:1" with req "x" must not meet user "a" with req "1:x".
        let k = Keys::new("p");
        assert_ne!(
            k.reserve_idem("a:1", "x", "s"),
            k.reserve_idem("a", "1:x", "s")
        );
        assert_ne!(
            k.reserve_idem("a", "x", "s1"),
            k.reserve_idem("a", "x", "s2")
        );
        assert_ne!(k.order_idem("a:1", "x"), k.order_idem("a", "1:x"));
    }

    #[test]
    fn idempotency_buckets_keep_every_record_for_the_ttl() {
        let ttl = 86_400_000;
        for written in [0, 1, IDEM_BUCKET_MS - 1, IDEM_BUCKET_MS, 1_700_000_123_456] {
            let expiry = idem_bucket_expiry(idem_bucket(written), ttl);
            assert!(expiry >= written + ttl, "{written}");
            assert!(expiry <= written + ttl + IDEM_BUCKET_MS, "{written}");
        }
        // The scan pattern of the one-key records does not match a bucket.
        let k = Keys::new("p");
        assert!(!k.reserve_idem_bucket(7).starts_with("p:idem:reserve:"));
    }
}
