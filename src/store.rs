//! The SQL order store: the `orders` and `order_items` tables in SQLite (the embedded
//! default) or PostgreSQL (production), reached through one sqlx pool.
//!
//! It owns the schema (the migrations under `src/store/migrations/`, embedded at build time), the
//! idempotent batch insert that makes the order writer exactly-once (an order id is stored
//! at most once, whatever is redelivered), and the read queries of the stats API.
//!
//! It must not know about Redis, streams or acknowledgements: it stores what it is given
//! in one transaction per call and reports, per order, whether the row is new.

use std::{collections::HashSet, str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgPool, PgPoolOptions},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
    QueryBuilder, Row, Sqlite,
};

/// Orders per multi-row SQLite `INSERT` (8 columns, 7 of them bound): far under SQLite's
/// 32,766 bind parameters per statement.
const ORDERS_PER_STATEMENT: usize = 1_000;
/// Items per multi-row SQLite `INSERT` (5 bound columns).
const ITEMS_PER_STATEMENT: usize = 2_000;
/// How long SQLite waits for another writer's lock before failing with SQLITE_BUSY.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page cache of each SQLite connection, in KiB (64 MiB).
const SQLITE_CACHE_KIB: i64 = 65_536;
/// How long a caller waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted order, as the gateway recorded it in the events stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// Unique id assigned by the gateway; the primary key of `orders`.
    pub order_id: String,
    pub user_id: String,
    pub room: String,
    /// User id of the viewer who shared the room link, if any.
    pub ref_user: Option<String>,
    pub total_cents: i64,
    /// Unix milliseconds at which the gateway accepted the order.
    pub created_at_ms: i64,
    pub items: Vec<OrderItem>,
}

/// One reservation bought by an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderItem {
    pub reservation: String,
    pub sku: String,
    pub qty: i64,
    pub unit_price_cents: i64,
}

/// What [`OrderStore::store_batch`] did with one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredOutcome {
    /// The order was not in the store and is now (its items too).
    Inserted,
    /// An order with this id was already stored (a redelivery); nothing was written.
    AlreadyStored,
}

/// Sales figures of one room, for the stats API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoomTotals {
    pub orders: i64,
    pub units_sold: i64,
    pub gmv_cents: i64,
}

/// An order read back from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOrder {
    /// The order; its items are sorted by reservation id.
    pub order: Order,
    pub status: String,
    /// Unix milliseconds at which the order writer stored it.
    pub stored_at_ms: i64,
}

/// Errors of the order store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported order store URL {0:?}: expected sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    #[error("order store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("order store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether retrying later may succeed (the database is unreachable, busy or restarting),
    /// as opposed to a configuration problem that needs a human.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::UnsupportedUrl(_) => false,
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sql_transient(e),
            StoreError::Migrate(_) => false,
            StoreError::Sql(e) => sql_transient(e),
        }
    }
}

impl StoreError {
    /// Whether the database refused the *data* (a constraint, a value out of range, an
    /// invalid string): retrying the same rows will fail again, but other rows may pass.
    /// A missing table or a lost connection is not a data error.
    pub fn is_data_error(&self) -> bool {
        let StoreError::Sql(sqlx::Error::Database(db)) = self else {
            return false;
        };
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        if is_postgres_error(db.as_ref()) {
            // Class 22 data exception, class 23 integrity constraint violation.
            code.starts_with("22") || code.starts_with("23")
        } else {
            // SQLite: 18 TOOBIG, 19 CONSTRAINT (also raised by triggers), 20 MISMATCH,
            // 25 RANGE, and their extended codes.
            matches!(sqlite_primary_code(&code), Some(18 | 19 | 20 | 25))
        }
    }
}

/// PostgreSQL codes are SQLSTATEs (five characters, often all digits); SQLite codes are
/// numbers. Tell them apart by the error's type, not by the code's shape.
fn is_postgres_error(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
}

/// The primary result code of an SQLite (extended) result code.
fn sqlite_primary_code(code: &str) -> Option<i64> {
    code.parse::<i64>().ok().map(|n| n & 0xff)
}

fn sql_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if is_postgres_error(db.as_ref()) {
                // 08 connection, 40 rollback/deadlock, 53 resources, 57 operator intervention.
                ["08", "40", "53", "57"].iter().any(|p| code.starts_with(p))
            } else {
                // SQLite: 5 BUSY, 6 LOCKED (and their extended codes, e.g. 261, 517).
                matches!(sqlite_primary_code(&code), Some(5 | 6))
            }
        }
        _ => false,
    }
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A handle on the order store; cheap to clone (it is a connection pool).
#[derive(Clone, Debug)]
pub struct OrderStore {
    backend: Backend,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The SQLite batch store: multi-row `INSERT`s (`QueryBuilder::push_values`), chunked
/// under the bind-parameter limit.
async fn store_batch_sqlite(
    pool: &SqlitePool,
    orders: &[Order],
) -> Result<Vec<StoredOutcome>, StoreError> {
    let stored_at = now_ms();
    let mut outcomes = Vec::with_capacity(orders.len());
    // Order ids inserted by this transaction: a later duplicate in the same batch is a
    // redelivery of the same order, not a new one.
    let mut inserted: HashSet<&str> = HashSet::with_capacity(orders.len());
    let mut tx = pool.begin().await?;
    for chunk in orders.chunks(ORDERS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO orders \
                 (order_id, user_id, room, ref, total_cents, status, created_at, stored_at) ",
        );
        qb.push_values(chunk, |mut row, o| {
            row.push_bind(o.order_id.as_str())
                .push_bind(o.user_id.as_str())
                .push_bind(o.room.as_str())
                .push_bind(o.ref_user.as_deref())
                .push_bind(o.total_cents)
                .push("'accepted'")
                .push_bind(o.created_at_ms)
                .push_bind(stored_at);
        });
        qb.push(" ON CONFLICT (order_id) DO NOTHING RETURNING order_id");
        let returned: HashSet<String> = qb
            .build_query_scalar::<String>()
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        let mut new_orders: Vec<&Order> = Vec::new();
        for o in chunk {
            if returned.contains(&o.order_id) && inserted.insert(o.order_id.as_str()) {
                outcomes.push(StoredOutcome::Inserted);
                new_orders.push(o);
            } else {
                outcomes.push(StoredOutcome::AlreadyStored);
            }
        }
        let items: Vec<(&str, &OrderItem)> = new_orders
            .iter()
            .flat_map(|o| o.items.iter().map(|i| (o.order_id.as_str(), i)))
            .collect();
        for items in items.chunks(ITEMS_PER_STATEMENT) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO order_items \
                     (order_id, reservation, sku, qty, unit_price_cents) ",
            );
            qb.push_values(items, |mut row, (order_id, i)| {
                row.push_bind(*order_id)
                    .push_bind(i.reservation.as_str())
                    .push_bind(i.sku.as_str())
                    .push_bind(i.qty)
                    .push_bind(i.unit_price_cents);
            });
            qb.push(" ON CONFLICT (order_id, reservation) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// The PostgreSQL batch insert: each column travels as one array parameter and is
/// expanded with `UNNEST`, so a batch is two statements of a handful of parameters each
/// (no per-row placeholders to parse, no bind limit to chunk under).
async fn store_batch_pg(pool: &PgPool, orders: &[Order]) -> Result<Vec<StoredOutcome>, StoreError> {
    let stored_at = now_ms();
    let n = orders.len();
    let mut ids = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut rooms = Vec::with_capacity(n);
    let mut refs: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut totals = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for o in orders {
        ids.push(o.order_id.as_str());
        users.push(o.user_id.as_str());
        rooms.push(o.room.as_str());
        refs.push(o.ref_user.as_deref());
        totals.push(o.total_cents);
        created.push(o.created_at_ms);
    }
    let mut tx = pool.begin().await?;
    let returned: HashSet<String> = sqlx::query_scalar::<_, String>(
        "INSERT INTO orders \
         (order_id, user_id, room, ref, total_cents, status, created_at, stored_at) \
         SELECT o, u, r, f, t, 'accepted', c, $7 \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) \
         AS x(o, u, r, f, t, c) \
         ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&rooms)
    .bind(&refs)
    .bind(&totals)
    .bind(&created)
    .bind(stored_at)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut outcomes = Vec::with_capacity(n);
    let mut inserted: HashSet<&str> = HashSet::with_capacity(returned.len());
    let (mut i_order, mut i_res, mut i_sku, mut i_qty, mut i_price) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for o in orders {
        if returned.contains(&o.order_id) && inserted.insert(o.order_id.as_str()) {
            outcomes.push(StoredOutcome::Inserted);
            for i in &o.items {
                i_order.push(o.order_id.as_str());
                i_res.push(i.reservation.as_str());
                i_sku.push(i.sku.as_str());
                i_qty.push(i.qty);
                i_price.push(i.unit_price_cents);
            }
        } else {
            outcomes.push(StoredOutcome::AlreadyStored);
        }
    }
    if !i_order.is_empty() {
        sqlx::query(
            "INSERT INTO order_items (order_id, reservation, sku, qty, unit_price_cents) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[]) \
             ON CONFLICT (order_id, reservation) DO NOTHING",
        )
        .bind(&i_order)
        .bind(&i_res)
        .bind(&i_sku)
        .bind(&i_qty)
        .bind(&i_price)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

macro_rules! get_order_on {
    ($pool:expr, $p1:literal, $id:expr) => {{
        let pool = $pool;
        let row = sqlx::query(concat!(
            "SELECT order_id, user_id, room, ref, total_cents, status, created_at, stored_at \
             FROM orders WHERE order_id = ",
            $p1
        ))
        .bind($id)
        .fetch_optional(pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let items = sqlx::query(concat!(
            "SELECT reservation, sku, qty, unit_price_cents FROM order_items \
             WHERE order_id = ",
            $p1,
            " ORDER BY reservation"
        ))
        .bind($id)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| {
            Ok(OrderItem {
                reservation: r.try_get(0)?,
                sku: r.try_get(1)?,
                qty: r.try_get(2)?,
                unit_price_cents: r.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some(StoredOrder {
            order: Order {
                order_id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                room: row.try_get(2)?,
                ref_user: row.try_get(3)?,
                total_cents: row.try_get(4)?,
                created_at_ms: row.try_get(6)?,
                items,
            },
            status: row.try_get(5)?,
            stored_at_ms: row.try_get(7)?,
        }))
    }};
}

macro_rules! room_totals_on {
    ($pool:expr, $p1:literal, $room:expr) => {{
        let pool = $pool;
        let (orders, gmv_cents): (i64, i64) = sqlx::query_as(concat!(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(total_cents), 0) AS BIGINT) \
             FROM orders WHERE room = ",
            $p1
        ))
        .bind($room)
        .fetch_one(pool)
        .await?;
        let (units_sold,): (i64,) = sqlx::query_as(concat!(
            "SELECT CAST(COALESCE(SUM(i.qty), 0) AS BIGINT) \
             FROM order_items i JOIN orders o ON o.order_id = i.order_id WHERE o.room = ",
            $p1
        ))
        .bind($room)
        .fetch_one(pool)
        .await?;
        Ok(RoomTotals {
            orders,
            units_sold,
            gmv_cents,
        })
    }};
}

impl OrderStore {
    /// Opens the store at `url` and brings its schema up to date.
    ///
    /// `sqlite://PATH` (or `sqlite:PATH`) creates the file if it is missing and uses WAL
    /// with `synchronous=FULL`, so a commit survives a power cut, and a busy timeout so
    /// that several writers on one file wait for each other instead of failing.
    /// `postgres://...` (or `postgresql://...`) connects a pool of a few connections.
    pub async fn connect(url: &str) -> Result<OrderStore, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
                // Page cache per connection, in KiB (negative): the default 2 MiB makes
                // inserts into a table of a few hundred thousand orders read from disk.
                .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"));
            let mut pool = SqlitePoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
            if in_memory {
                // Every connection to `:memory:` is its own database: keep exactly one, forever.
                pool = pool
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            } else {
                // SQLite has one writer at a time; a few connections serve the readers.
                pool = pool.max_connections(4);
            }
            let pool = pool.connect_with(opts).await?;
            sqlx::migrate!("./src/store/migrations/sqlite")
                .run(&pool)
                .await?;
            Backend::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(url)
                .await?;
            sqlx::migrate!("./src/store/migrations/postgres")
                .run(&pool)
                .await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(redact(url)));
        };
        Ok(OrderStore { backend })
    }

    /// Stores `orders` in one transaction, idempotently: an order whose id is already
    /// stored (or appears earlier in the same batch) is left as it is and reported as
    /// [`StoredOutcome::AlreadyStored`]; the items of an order are written only together
    /// with its new `orders` row. Returns one outcome per input order, in input order.
    ///
    /// On error nothing of the batch is committed.
    pub async fn store_batch(&self, orders: &[Order]) -> Result<Vec<StoredOutcome>, StoreError> {
        if orders.is_empty() {
            return Ok(Vec::new());
        }
        match &self.backend {
            Backend::Sqlite(pool) => store_batch_sqlite(pool, orders).await,
            Backend::Postgres(pool) => store_batch_pg(pool, orders).await,
        }
    }

    /// Orders, units sold and gross merchandise value (cents) of one room.
    pub async fn room_totals(&self, room: &str) -> Result<RoomTotals, StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => room_totals_on!(pool, "?", room),
            Backend::Postgres(pool) => room_totals_on!(pool, "$1", room),
        }
    }

    /// Number of stored orders (all rooms).
    pub async fn count_orders(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM orders";
        Ok(match &self.backend {
            Backend::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
            Backend::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
        })
    }

    /// Number of stored order items (all orders).
    pub async fn count_items(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM order_items";
        Ok(match &self.backend {
            Backend::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
            Backend::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
        })
    }

    /// One stored order with its items, or `None`.
    pub async fn get_order(&self, order_id: &str) -> Result<Option<StoredOrder>, StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => get_order_on!(pool, "?", order_id),
            Backend::Postgres(pool) => get_order_on!(pool, "$1", order_id),
        }
    }

    /// Whether this store is PostgreSQL (as opposed to SQLite).
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(pool) => pool.close().await,
            Backend::Postgres(pool) => pool.close().await,
        }
    }
}

/// The URL without its password, for error messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, room: &str, items: &[(&str, i64, i64)]) -> Order {
        let items: Vec<OrderItem> = items
            .iter()
            .enumerate()
            .map(|(n, (sku, qty, price))| OrderItem {
                reservation: format!("{id}-r{n}"),
                sku: sku.to_string(),
                qty: *qty,
                unit_price_cents: *price,
            })
            .collect();
        Order {
            order_id: id.to_string(),
            user_id: "u1".to_string(),
            room: room.to_string(),
            ref_user: None,
            total_cents: items.iter().map(|i| i.qty * i.unit_price_cents).sum(),
            created_at_ms: 1_700_000_000_000,
            items,
        }
    }

    #[tokio::test]
    async fn batch_insert_is_idempotent_in_memory() {
        let store = OrderStore::connect("sqlite::memory:")
            .await
            .expect("connect");
        let a = order("o1", "room", &[("sku", 2, 100), ("sku2", 1, 50)]);
        let b = order("o2", "room", &[("sku", 1, 100)]);
        let out = store
            .store_batch(&[a.clone(), b.clone(), a.clone()])
            .await
            .expect("store");
        assert_eq!(
            out,
            vec![
                StoredOutcome::Inserted,
                StoredOutcome::Inserted,
                StoredOutcome::AlreadyStored
            ]
        );
        let out = store.store_batch(&[b]).await.expect("store");
        assert_eq!(out, vec![StoredOutcome::AlreadyStored]);
        assert_eq!(store.count_orders().await.expect("count"), 2);
        assert_eq!(store.count_items().await.expect("count"), 3);
        let t = store.room_totals("room").await.expect("totals");
        assert_eq!(
            t,
            RoomTotals {
                orders: 2,
                units_sold: 4,
                gmv_cents: 350
            }
        );
        let got = store.get_order("o1").await.expect("get").expect("some");
        assert_eq!(got.order, a);
        assert_eq!(got.status, "accepted");
        assert!(store.get_order("nope").await.expect("get").is_none());
        assert_eq!(
            store.room_totals("empty").await.expect("totals"),
            RoomTotals::default()
        );
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused() {
        let err = OrderStore::connect("mysql://u:secret@h/db").await.err();
        match err {
            Some(StoreError::UnsupportedUrl(u)) => assert!(!u.contains("secret"), "{u}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
