//! The gateway's shared state: configuration, the hub of rooms, the inventory core, the
//! committer, the Redis connection for reads, the connection bound, and the background
//! tasks (expiry sweeper, confirmation relay) that keep them moving.
//!
//! This module wires parts together and starts them; it must not implement any command
//! (that is `command`) nor any protocol detail (that is `protocol`).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;

use crate::{
    auth::Authenticator,
    commit::Committer,
    config::Config,
    hub::{Hub, StockSource},
    inventory::{Inventory, InventoryConfig},
    keys::Keys,
    recovery,
    store::{OrderStore, StoreError},
};

impl StockSource for Inventory {
    fn available(&self, sku: &str) -> Option<u64> {
        Inventory::available(self, sku)
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("recovery from redis failed: {0}")]
    Recovery(String),
}

/// Everything a connection or an HTTP handler needs.
pub struct App {
    pub cfg: Config,
    pub keys: Keys,
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    pub inventory: Arc<Inventory>,
    pub committer: Committer,
    /// Multiplexed connection for reads and for writes off the commit path.
    pub redis: ConnectionManager,
    /// Permits for open WebSocket connections (`max_connections`).
    pub conn_permits: Arc<Semaphore>,
    /// Every connection task, so a graceful shutdown can wait for them.
    pub tracker: TaskTracker,
    /// This process's epoch: reservation and order ids made here carry it.
    pub epoch: u32,
    next_conn: AtomicU64,
    next_order: AtomicU64,
    next_baseline: AtomicU64,
    audience: mpsc::Sender<redis::Pipeline>,
    store: tokio::sync::OnceCell<OrderStore>,
}

/// Eagerly allocated read buffer of every connection: client frames are small and rare,
/// and larger ones (up to the frame limit) still arrive in several reads.
const READ_BUFFER: usize = 1024;
/// Bytes gathered before the writer writes to the socket (a flush writes the rest).
const WRITE_BUFFER: usize = 8 * 1024;

/// Audience writes (distinct viewers, likes, peak) waiting for Redis; over it they are
/// dropped and counted: they are figures, not commitments.
const AUDIENCE_QUEUE: usize = 10_000;

impl App {
    /// Connects to Redis, restores the durable state, and starts the committer and the
    /// background tasks.
    pub async fn start(cfg: Config) -> Result<Arc<App>, StartError> {
        let secret = cfg
            .jwt_secret
            .clone()
            .ok_or_else(|| StartError::Config("LIVEGATE_JWT_SECRET is not set".to_string()))?;
        let keys = Keys::new(&cfg.key_prefix);
        let client = crate::resp::client(cfg.redis_url.as_str())?;
        let manager_cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(cfg.limits.commit_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_with_config(client.clone(), manager_cfg.clone()).await?;
        let epoch: u32 = redis::cmd("INCR")
            .arg(format!("{}:epoch", keys.prefix()))
            .query_async::<u64>(&mut redis.clone())
            .await? as u32;
        let inventory = Arc::new(Inventory::new(InventoryConfig {
            shards: cfg.limits.inventory_shards,
            epoch,
            idempotency_ttl_ms: cfg.limits.idempotency_ttl.as_millis() as u64,
            idempotency_cap: cfg.limits.idempotency_cap,
        }));
        let hub = Hub::new(cfg.limits.clone(), inventory.clone());
        let (committer, _task) = Committer::start(
            &client,
            manager_cfg,
            cfg.limits.commit_queue,
            cfg.limits.commit_batch,
            cfg.limits.commit_timeout,
            cfg.limits.redis_stall,
        )
        .await?;
        let (audience, audience_rx) = mpsc::channel(AUDIENCE_QUEUE);
        tokio::spawn(audience_writer(redis.clone(), audience_rx));
        let app = Arc::new(App {
            store: tokio::sync::OnceCell::new(),
            audience,
            auth: Authenticator::new(&secret),
            conn_permits: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            tracker: TaskTracker::new(),
            keys,
            hub,
            inventory,
            committer,
            redis,
            epoch,
            next_conn: AtomicU64::new(1),
            next_order: AtomicU64::new(1),
            // Baseline ids live above the core's counter range so the two never meet.
            next_baseline: AtomicU64::new(1 << 39),
            cfg,
        });
        recovery::restore(&app)
            .await
            .map_err(|e| StartError::Recovery(e.to_string()))?;
        tokio::spawn(recovery::expiry_sweeper(app.clone()));
        tokio::spawn(recovery::confirmation_relay(app.clone(), client));
        Ok(app)
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh reservation counter for the Lua baseline mode.
    pub fn next_baseline_id(&self) -> u64 {
        self.next_baseline.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh order id, unique across restarts (it carries the epoch).
    pub fn next_order_id(&self) -> String {
        format!(
            "o{}-{}",
            self.epoch,
            self.next_order.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The WebSocket settings of every connection: small eager buffers (the per-connection
    /// memory budget) and the client frame limit.
    pub fn ws_config(&self) -> WebSocketConfig {
        let max = self.cfg.limits.max_frame_bytes;
        let mut c = WebSocketConfig::default();
        c.read_buffer_size = READ_BUFFER;
        // Frames fed between two flushes are gathered up to this size, so a burst of
        // broadcasts goes out in a few writes; the buffer grows only when used.
        c.write_buffer_size = WRITE_BUFFER;
        c.max_write_buffer_size = 4 << 20;
        c.max_message_size = Some(max);
        c.max_frame_size = Some(max);
        c.accept_unmasked_frames = false;
        c
    }

    /// The SQL order store (for the stats API), connected on first use.
    pub async fn order_store(&self) -> Result<&OrderStore, StoreError> {
        self.store
            .get_or_try_init(|| OrderStore::connect(&self.cfg.order_store))
            .await
    }

    /// Queues an audience-figure write; dropped (and counted) when the queue is full.
    pub fn audience_write(&self, pipe: redis::Pipeline) {
        if self.audience.try_send(pipe).is_err() {
            metrics::counter!(crate::metrics::AUDIENCE_DROPPED).increment(1);
        }
    }

    /// Whether Redis answers a PING now.
    pub async fn redis_ready(&self) -> bool {
        let mut c = self.redis.clone();
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                redis::cmd("PING").query_async::<String>(&mut c)
            )
            .await,
            Ok(Ok(_))
        )
    }
}

async fn audience_writer(mut redis: ConnectionManager, mut rx: mpsc::Receiver<redis::Pipeline>) {
    while let Some(pipe) = rx.recv().await {
        if let Err(e) = pipe.query_async::<()>(&mut redis).await {
            tracing::debug!(error = %e, "audience figure not written");
            metrics::counter!(crate::metrics::AUDIENCE_DROPPED).increment(1);
        }
    }
}
