-- The order store (SQLite). One row per accepted order, keyed by the order id that the
-- gateway assigned: the primary key is what makes the order writer's inserts idempotent.
CREATE TABLE IF NOT EXISTS orders (
    order_id    TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    room        TEXT NOT NULL,
    ref         TEXT NULL,
    total_cents BIGINT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'accepted',
    created_at  BIGINT NOT NULL,
    stored_at   BIGINT NOT NULL
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS orders_room ON orders (room);

-- One row per reservation bought by an order. No foreign key to orders: items are only
-- ever written in the same transaction as their order (src/store.rs), and the per-row
-- check would cost more than the rest of the insert.
CREATE TABLE IF NOT EXISTS order_items (
    order_id         TEXT NOT NULL,
    reservation      TEXT NOT NULL,
    sku              TEXT NOT NULL,
    qty              BIGINT NOT NULL,
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, reservation)
) WITHOUT ROWID;
