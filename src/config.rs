//! Configuration: a pure function from a key/value source (the environment, or a map in
//! tests) to a validated [`Config`], with every problem collected before failing.
//!
//! This module owns the names, defaults and bounds of every setting and limit; it must not
//! read the environment itself (the caller passes a source) nor touch the network.

use std::{fmt, net::SocketAddr, time::Duration};

/// Every setting of a livegate process. Each limit is documented in docs/configuration.md.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: String,
    /// HS256 secret. `serve` and `token` refuse to start without it.
    pub jwt_secret: Option<String>,
    pub order_store: String,
    pub key_prefix: String,
    pub limits: Limits,
    pub order_writer: OrderWriterConfig,
    /// How `add_to_cart` reserves: the in-memory core (production) or one Redis Lua script
    /// per request (the usual flash-sale design, kept only as a benchmark baseline).
    pub reserve_mode: ReserveMode,
}

/// See [`Config::reserve_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReserveMode {
    Core,
    Lua,
}

/// The bounds of the gateway. Every one of them is configurable and counted in a metric.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open WebSocket connections; over it, new ones are closed with 1013.
    pub max_connections: usize,
    /// Largest client frame/message in bytes; over it, close 1009.
    pub max_frame_bytes: usize,
    /// Messages queued towards one client; over it, close 4001.
    pub outbound_queue: usize,
    /// `add_to_cart` commands of one connection waiting for their durable write at once;
    /// at the bound the connection's next frames wait unread.
    pub conn_inflight: usize,
    /// Sustained commands per second per connection.
    pub rate_per_sec: u32,
    /// Burst of commands per connection.
    pub rate_burst: u32,
    /// Server ping interval; three silent intervals close with 4002.
    pub heartbeat: Duration,
    /// Sequenced broadcasts kept per room for `join` with `since`.
    pub room_history: usize,
    /// Bytes of history kept per room (estimated payload size); the oldest go first.
    pub room_history_bytes: usize,
    /// Coalescing tick of a room (stock, comments).
    pub room_tick: Duration,
    /// Interval of the unsequenced `stats` broadcast.
    pub stats_interval: Duration,
    /// Comments delivered per room per tick; the rest are dropped and counted.
    pub comments_per_tick: usize,
    /// Commands queued to one room's task; over it the command gets `rate_limited`.
    pub room_queue: usize,
    /// Rooms hosted by one gateway; over it `open_room` gets `unavailable`.
    pub max_rooms: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Undecodable frames a connection may send (bucket refilled at one a second) before
    /// it is closed with 1007.
    pub max_bad_frames: u32,
    /// Products on one room's shelf.
    pub max_products_per_room: usize,
    /// Longest time a durable write may take before the request gets `unavailable`.
    pub commit_timeout: Duration,
    /// How long the committer's connection may owe Redis's replies before it is fenced
    /// off (`CLIENT KILL`) and replaced by a fresh one.
    pub redis_stall: Duration,
    /// Changes waiting for the committer; over it the request gets `unavailable`.
    pub commit_queue: usize,
    /// Largest group commit (changes in one Redis round trip).
    pub commit_batch: usize,
    /// Lock shards of the inventory core.
    pub inventory_shards: usize,
    /// Reservation lifetime when a product sets no `ttl_s`.
    pub default_ttl_s: u32,
    /// How long a (user, req) idempotency record is kept after its reservation was made.
    pub idempotency_ttl: Duration,
    /// Idempotency records kept in memory in all (split over the shards); past it the
    /// oldest are forgotten first.
    pub idempotency_cap: usize,
    /// Time given to in-flight work on SIGTERM / SIGINT before the process exits.
    pub shutdown_grace: Duration,
}

/// Settings of the order writer (in-process or `livegate order-writer`).
#[derive(Clone, Debug)]
pub struct OrderWriterConfig {
    /// Entries read per XREADGROUP (and stored per SQL transaction).
    pub batch: usize,
    /// How long one XREADGROUP blocks waiting for entries.
    pub block: Duration,
    /// A pending entry idle this long is taken over from a dead consumer (XAUTOCLAIM).
    pub claim_idle: Duration,
    /// Consumer name inside the group; defaults to host name + pid.
    pub consumer: Option<String>,
}

/// All problems found in a configuration source, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

struct Reader<'a, F: Fn(&str) -> Option<String>> {
    source: &'a F,
    errors: Vec<String>,
}

impl<F: Fn(&str) -> Option<String>> Reader<'_, F> {
    fn string(&mut self, key: &str, default: &str) -> String {
        self.opt(key).unwrap_or_else(|| default.to_string())
    }

    fn opt(&mut self, key: &str) -> Option<String> {
        (self.source)(key).filter(|v| !v.trim().is_empty())
    }

    fn num<T>(&mut self, key: &str, default: T, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.opt(key) else {
            return default;
        };
        match raw.trim().parse::<T>() {
            Ok(v) if v >= min && v <= max => v,
            Ok(v) => {
                self.errors
                    .push(format!("{key}={v} is out of range ({min}..={max})"));
                default
            }
            Err(_) => {
                self.errors
                    .push(format!("{key}={raw:?} is not a valid number"));
                default
            }
        }
    }

    fn millis(&mut self, key: &str, default: u64, min: u64, max: u64) -> Duration {
        Duration::from_millis(self.num(key, default, min, max))
    }
}

/// Whether an id (room, sku, req, reservation, order, key prefix) has the protocol's shape:
/// 1..=64 characters from `[A-Za-z0-9_.:-]`.
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl Config {
    /// Reads the configuration from `source` (for example `|k| std::env::var(k).ok()`).
    pub fn from_source<F: Fn(&str) -> Option<String>>(source: F) -> Result<Config, ConfigErrors> {
        let mut r = Reader {
            source: &source,
            errors: Vec::new(),
        };
        let listen_raw = r.string("LIVEGATE_LISTEN", "127.0.0.1:8080");
        let listen = match listen_raw.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                r.errors.push(format!(
                    "LIVEGATE_LISTEN={listen_raw:?} is not an address like 127.0.0.1:8080"
                ));
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        };
        let redis_url = r.string("LIVEGATE_REDIS_URL", "redis://127.0.0.1:6379");
        if !(redis_url.starts_with("redis://")
            || redis_url.starts_with("rediss://")
            || redis_url.starts_with("redis+unix://")
            || redis_url.starts_with("unix://"))
        {
            r.errors.push(format!(
                "LIVEGATE_REDIS_URL={redis_url:?} must start with redis://, rediss:// or unix://"
            ));
        }
        let jwt_secret = r.opt("LIVEGATE_JWT_SECRET");
        if let Some(s) = &jwt_secret {
            if s.len() < 16 {
                r.errors.push(
                    "LIVEGATE_JWT_SECRET is shorter than 16 bytes; use a long random secret"
                        .to_string(),
                );
            }
        }
        let order_store = r.string("LIVEGATE_ORDER_STORE", "sqlite://livegate-orders.db");
        if !(order_store.starts_with("sqlite:")
            || order_store.starts_with("postgres://")
            || order_store.starts_with("postgresql://"))
        {
            r.errors.push(format!(
                "LIVEGATE_ORDER_STORE={order_store:?} must be sqlite://PATH or postgres://..."
            ));
        }
        let key_prefix = r.string("LIVEGATE_KEY_PREFIX", "livegate");
        if !valid_id(&key_prefix) || key_prefix.contains('{') {
            r.errors.push(format!(
                "LIVEGATE_KEY_PREFIX={key_prefix:?} must be 1..64 chars of [A-Za-z0-9_.:-]"
            ));
        }
        let limits = Limits {
            max_connections: r.num("LIVEGATE_MAX_CONNECTIONS", 100_000, 1, 10_000_000),
            max_frame_bytes: r.num("LIVEGATE_MAX_FRAME_BYTES", 16 * 1024, 256, 16 << 20),
            outbound_queue: r.num("LIVEGATE_OUTBOUND_QUEUE", 1024, 8, 1 << 20),
            conn_inflight: r.num("LIVEGATE_CONN_INFLIGHT", 16, 1, 4096),
            rate_per_sec: r.num("LIVEGATE_RATE_PER_SEC", 20, 1, 1_000_000),
            rate_burst: r.num("LIVEGATE_RATE_BURST", 40, 1, 1_000_000),
            heartbeat: r.millis("LIVEGATE_HEARTBEAT_MS", 15_000, 50, 3_600_000),
            room_history: r.num("LIVEGATE_ROOM_HISTORY", 1024, 1, 1 << 20),
            room_history_bytes: r.num("LIVEGATE_ROOM_HISTORY_BYTES", 1 << 20, 1024, 1 << 30),
            room_tick: r.millis("LIVEGATE_ROOM_TICK_MS", 100, 10, 10_000),
            stats_interval: r.millis("LIVEGATE_STATS_MS", 1000, 50, 60_000),
            comments_per_tick: r.num("LIVEGATE_COMMENTS_PER_TICK", 200, 1, 100_000),
            room_queue: r.num("LIVEGATE_ROOM_QUEUE", 4096, 8, 1 << 20),
            max_rooms: r.num("LIVEGATE_MAX_ROOMS", 10_000, 1, 10_000_000),
            max_rooms_per_connection: r.num("LIVEGATE_MAX_ROOMS_PER_CONNECTION", 8, 1, 10_000),
            max_bad_frames: r.num("LIVEGATE_MAX_BAD_FRAMES", 10, 1, 1_000_000),
            max_products_per_room: r.num("LIVEGATE_MAX_PRODUCTS_PER_ROOM", 200, 1, 100_000),
            commit_timeout: r.millis("LIVEGATE_COMMIT_TIMEOUT_MS", 5_000, 10, 600_000),
            redis_stall: r.millis("LIVEGATE_REDIS_STALL_MS", 10_000, 100, 3_600_000),
            commit_queue: r.num("LIVEGATE_COMMIT_QUEUE", 65_536, 16, 1 << 24),
            commit_batch: r.num("LIVEGATE_COMMIT_BATCH", 1024, 1, 1 << 20),
            inventory_shards: r.num("LIVEGATE_INVENTORY_SHARDS", 64, 1, 4096),
            default_ttl_s: r.num("LIVEGATE_DEFAULT_TTL_S", 600, 1, 7 * 86_400),
            idempotency_ttl: Duration::from_secs(r.num(
                "LIVEGATE_IDEMPOTENCY_TTL_S",
                86_400,
                1,
                30 * 86_400,
            )),
            idempotency_cap: r.num("LIVEGATE_IDEMPOTENCY_CAP", 1_000_000, 1_000, 1 << 30),
            shutdown_grace: r.millis("LIVEGATE_SHUTDOWN_GRACE_MS", 10_000, 0, 600_000),
        };
        let order_writer = OrderWriterConfig {
            batch: r.num("LIVEGATE_ORDER_WRITER_BATCH", 512, 1, 100_000),
            block: r.millis("LIVEGATE_ORDER_WRITER_BLOCK_MS", 1_000, 1, 60_000),
            claim_idle: r.millis(
                "LIVEGATE_ORDER_WRITER_CLAIM_IDLE_MS",
                30_000,
                100,
                86_400_000,
            ),
            consumer: r.opt("LIVEGATE_ORDER_WRITER_CONSUMER"),
        };
        if let Some(c) = &order_writer.consumer {
            if !valid_id(c) {
                r.errors.push(format!(
                    "LIVEGATE_ORDER_WRITER_CONSUMER={c:?} must be 1..64 chars of [A-Za-z0-9_.:-]"
                ));
            }
        }
        let reserve_mode = match r.string("LIVEGATE_RESERVE_MODE", "core").as_str() {
            "core" => ReserveMode::Core,
            "lua" => ReserveMode::Lua,
            other => {
                r.errors.push(format!(
                    "LIVEGATE_RESERVE_MODE={other:?} must be core or lua (lua is a benchmark baseline)"
                ));
                ReserveMode::Core
            }
        };
        if r.errors.is_empty() {
            Ok(Config {
                listen,
                redis_url,
                jwt_secret,
                order_store,
                key_prefix,
                limits,
                order_writer,
                reserve_mode,
            })
        } else {
            Err(ConfigErrors(r.errors))
        }
    }

    /// The configuration with every default, for tests.
    pub fn defaults() -> Config {
        match Config::from_source(|_| None) {
            Ok(c) => c,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn source(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_match_the_operating_contract() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.order_store, "sqlite://livegate-orders.db");
        assert_eq!(c.key_prefix, "livegate");
        assert!(c.jwt_secret.is_none());
        assert_eq!(c.limits.max_frame_bytes, 16 * 1024);
        assert_eq!(c.limits.rate_per_sec, 20);
        assert_eq!(c.limits.rate_burst, 40);
        assert_eq!(c.limits.commit_timeout, Duration::from_secs(5));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::from_source(source(&[
            ("LIVEGATE_LISTEN", "nowhere"),
            ("LIVEGATE_REDIS_URL", "http://x"),
            ("LIVEGATE_MAX_CONNECTIONS", "lots"),
            ("LIVEGATE_RATE_PER_SEC", "0"),
            ("LIVEGATE_KEY_PREFIX", "bad prefix"),
        ]))
        .err()
        .map(|e| e.0)
        .unwrap_or_default();
        assert_eq!(err.len(), 5, "{err:?}");
        assert!(err[0].contains("LIVEGATE_LISTEN"));
        assert!(err.iter().any(|e| e.contains("LIVEGATE_MAX_CONNECTIONS")));
        assert!(err.iter().any(|e| e.contains("out of range")));
    }

    #[test]
    fn overrides_are_read() {
        let c = Config::from_source(source(&[
            ("LIVEGATE_LISTEN", "127.0.0.1:0"),
            ("LIVEGATE_JWT_SECRET", "0123456789abcdef0123"),
            ("LIVEGATE_ORDER_STORE", "postgres://localhost/test"),
            ("LIVEGATE_HEARTBEAT_MS", "250"),
        ]))
        .expect("valid");
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.jwt_secret.as_deref(), Some("0123456789abcdef0123"));
        assert_eq!(c.limits.heartbeat, Duration::from_millis(250));
    }

    #[test]
    fn ids_follow_the_protocol() {
        assert!(valid_id("room-1"));
        assert!(valid_id("a.b:c_d-E9"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(!valid_id("has space"));
        assert!(!valid_id("ünï"));
    }
}
