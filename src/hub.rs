//! The room hub: every live room hosted by this gateway, the product catalogue, the
//! connections of each user, and the fan-out of room broadcasts.
//!
//! Each room is one task that owns its state (members, `seq`, history ring, shelf, pin,
//! pending comments) and processes its commands in order, so `seq` has no gaps and every
//! member sees broadcasts in `seq` order. A broadcast is encoded at most once per encoding
//! and the same buffer is queued to every member with `try_send`: the fan-out never awaits a
//! socket, and a member whose queue is full is closed with 4001.
//!
//! The hub must not write to Redis or decide whether a change is allowed: the command layer
//! validates and commits first, then applies the change here.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Instant,
};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::{
    config::Limits,
    metrics::{self as m, unix_ms},
    outbound,
    protocol::{
        Broadcast, CommentItem, Encoding, ErrorCode, Frame, ProductView, ProtoError, RoomState,
        RoomStatus, ServerMsg, StockItem,
    },
};

/// Where rooms read the units still available of a SKU (the inventory core).
pub trait StockSource: Send + Sync + 'static {
    fn available(&self, sku: &str) -> Option<u64>;
}

/// Close codes the gateway sends.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNDECODABLE_FLOOD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const OVERLOADED: u16 = 1013;
    pub const SLOW_CONSUMER: u16 = 4001;
    pub const IDLE: u16 = 4002;
}

/// Asks a connection to close with a code; the writer task acts on it.
#[derive(Default)]
pub struct KillSwitch {
    code: AtomicU16,
    notify: Notify,
}

impl KillSwitch {
    /// Requests a close with `code`; the first request wins.
    pub fn kill(&self, code: u16) {
        if self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // Both the reader and the writer wait on this: wake every waiter. A waiter that
            // created its `notified()` before this call is woken; one after sees the code.
            self.notify.notify_waiters();
        }
    }

    /// The requested close code, if any.
    pub fn code(&self) -> Option<u16> {
        match self.code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    /// Resolves once a close was requested.
    pub async fn killed(&self) -> u16 {
        loop {
            let notified = self.notify.notified();
            if let Some(c) = self.code() {
                return c;
            }
            notified.await;
        }
    }
}

/// The sending side of one connection: its bounded outgoing queue and its kill switch.
/// Cheap to clone; held by every room the connection joined.
#[derive(Clone)]
pub struct Outbox {
    pub conn: u64,
    pub user: Arc<str>,
    pub encoding: Encoding,
    tx: outbound::Sender,
    kill: Arc<KillSwitch>,
}

impl Outbox {
    pub fn new(
        conn: u64,
        user: Arc<str>,
        encoding: Encoding,
        tx: outbound::Sender,
        kill: Arc<KillSwitch>,
    ) -> Outbox {
        Outbox {
            conn,
            user,
            encoding,
            tx,
            kill,
        }
    }

    /// Queues a frame without waiting. A full queue closes the connection with 4001 (the
    /// client is expected to reconnect and resume with `since`). Returns false when the
    /// frame was not queued.
    pub fn push(&self, frame: Frame) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(outbound::TrySendError::Full) => {
                if self.kill.code().is_none() {
                    metrics::counter!(m::OUTBOUND_DROPPED).increment(1);
                }
                self.kill.kill(close::SLOW_CONSUMER);
                false
            }
            Err(outbound::TrySendError::Closed) => false,
        }
    }

    /// Encodes `msg` for this connection and queues it.
    pub fn send(&self, msg: &ServerMsg) -> bool {
        self.push(msg.encode(self.encoding))
    }

    pub fn kill(&self, code: u16) {
        self.kill.kill(code)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.kill.code().is_some()
    }
}

/// A product in the catalogue (shared by every shelf that shows the SKU).
#[derive(Clone, Debug, PartialEq)]
pub struct ProductInfo {
    pub title: String,
    pub price_cents: i64,
    pub limit_per_user: Option<u32>,
    pub ttl_s: u32,
}

/// A change to a room, applied after it was durably recorded.
#[derive(Debug)]
pub enum RoomChange {
    Opened {
        title: String,
    },
    Closed,
    /// The SKU is on this room's shelf (added if new) and its catalogue entry changed.
    ShelfProduct {
        sku: String,
    },
    Pinned {
        sku: String,
    },
    Unpinned,
}

/// What the command layer needs to know of a room to validate an anchor command.
#[derive(Clone, Debug)]
pub struct RoomSummary {
    pub status: RoomStatus,
    pub title: String,
    pub pinned: Option<String>,
    pub shelf: Vec<String>,
}

enum RoomCmd {
    Join {
        outbox: Outbox,
        req: String,
        since: Option<u64>,
    },
    Leave {
        conn: u64,
        reply: Option<(Outbox, String)>,
    },
    Comment {
        user: Arc<str>,
        text: String,
        reply: Option<(Outbox, String)>,
    },
    Apply {
        change: RoomChange,
        done: oneshot::Sender<()>,
    },
    State {
        reply: oneshot::Sender<(RoomState, RoomSummary)>,
    },
    CatalogChanged {
        sku: String,
    },
    Restore {
        title: String,
        status: RoomStatus,
        shelf: Vec<String>,
        pinned: Option<String>,
        seq_base: u64,
        done: oneshot::Sender<()>,
    },
}

/// Figures and facts of a room that other tasks read without asking the room's task
/// (the cart hot path checks `live` and the shelf here).
#[derive(Default)]
pub struct RoomCounters {
    pub likes: AtomicU64,
    pub viewers: AtomicU64,
    pub peak_viewers: AtomicU64,
    pub live: AtomicBool,
    /// The SKUs on the shelf; written only by the room's task, on a shelf change.
    pub shelf: RwLock<Vec<String>>,
}

impl RoomCounters {
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn on_shelf(&self, sku: &str) -> bool {
        // A poisoned lock only means a panic elsewhere; the list itself is still whole.
        let shelf = self.shelf.read().unwrap_or_else(|p| p.into_inner());
        shelf.iter().any(|s| s == sku)
    }
}

/// A handle to one room's task.
#[derive(Clone)]
pub struct Room {
    pub id: Arc<str>,
    tx: mpsc::Sender<RoomCmd>,
    pub counters: Arc<RoomCounters>,
    /// Serialises anchor commands on this room (validate, commit, apply).
    pub anchor_lock: Arc<tokio::sync::Mutex<()>>,
}

fn room_busy() -> ProtoError {
    metrics::counter!(m::ROOM_QUEUE_FULL).increment(1);
    ProtoError::new(ErrorCode::RateLimited, "the room is busy; retry shortly")
}

fn room_gone() -> ProtoError {
    ProtoError::new(ErrorCode::Internal, "the room stopped")
}

impl Room {
    fn send(&self, cmd: RoomCmd) -> Result<(), ProtoError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => room_busy(),
            mpsc::error::TrySendError::Closed(_) => room_gone(),
        })
    }

    /// Adds the connection to the room; the reply (`room_state` or `joined` + missed
    /// events) is queued by the room itself, before any later broadcast.
    pub fn join(&self, outbox: Outbox, req: String, since: Option<u64>) -> Result<(), ProtoError> {
        self.send(RoomCmd::Join { outbox, req, since })
    }

    /// Removes the connection; with `reply`, queues `ack` once it is out.
    pub fn leave(&self, conn: u64, reply: Option<(Outbox, String)>) -> Result<(), ProtoError> {
        self.send(RoomCmd::Leave { conn, reply })
    }

    /// A membership must end even when the room's queue is full: wait for room.
    pub async fn leave_on_disconnect(&self, conn: u64) {
        let _ = self.tx.send(RoomCmd::Leave { conn, reply: None }).await;
    }

    /// Queues a comment for the next tick; with `reply`, the room answers `ack` (or
    /// `room_closed`).
    pub fn comment(
        &self,
        user: Arc<str>,
        text: String,
        reply: Option<(Outbox, String)>,
    ) -> Result<(), ProtoError> {
        self.send(RoomCmd::Comment { user, text, reply })
    }

    pub fn like(&self, count: u32) {
        self.counters
            .likes
            .fetch_add(u64::from(count), Ordering::Relaxed);
    }

    /// Applies a recorded change and resolves once it was broadcast.
    pub async fn apply(&self, change: RoomChange) -> Result<(), ProtoError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(RoomCmd::Apply { change, done })
            .await
            .map_err(|_| room_gone())?;
        rx.await.map_err(|_| room_gone())
    }

    /// Sets a room's state as recovered from Redis, without broadcasting. `seq` continues
    /// from `seq_base`, so a client resuming with a `since` from before the restart gets a
    /// full `room_state` instead of a resume across two numberings.
    pub async fn restore(
        &self,
        title: String,
        status: RoomStatus,
        shelf: Vec<String>,
        pinned: Option<String>,
        seq_base: u64,
    ) -> Result<(), ProtoError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(RoomCmd::Restore {
                title,
                status,
                shelf,
                pinned,
                seq_base,
                done,
            })
            .await
            .map_err(|_| room_gone())?;
        rx.await.map_err(|_| room_gone())
    }

    /// The room's state now, as `room_state` fields and as a summary.
    pub async fn state(&self) -> Result<(RoomState, RoomSummary), ProtoError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(RoomCmd::State { reply })
            .await
            .map_err(|_| room_gone())?;
        rx.await.map_err(|_| room_gone())
    }
}

/// Every room, the catalogue and the connections of each user.
pub struct Hub {
    rooms: DashMap<Arc<str>, Room>,
    catalog: DashMap<Arc<str>, ProductInfo>,
    users: DashMap<Arc<str>, HashMap<u64, Outbox>>,
    stock: Arc<dyn StockSource>,
    limits: Limits,
    /// Serialises room creation and catalogue changes (rare anchor commands).
    pub catalog_lock: tokio::sync::Mutex<()>,
}

impl Hub {
    pub fn new(limits: Limits, stock: Arc<dyn StockSource>) -> Arc<Hub> {
        Arc::new(Hub {
            rooms: DashMap::new(),
            catalog: DashMap::new(),
            users: DashMap::new(),
            stock,
            limits,
            catalog_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn room(&self, id: &str) -> Option<Room> {
        self.rooms.get(id).map(|r| r.clone())
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn room_ids(&self) -> Vec<Arc<str>> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
    }

    /// Creates the room's task if the room is new (closed, untitled, empty shelf) and
    /// returns it; `unavailable` past the room limit.
    pub fn ensure_room(self: &Arc<Self>, id: &str) -> Result<Room, ProtoError> {
        if let Some(r) = self.room(id) {
            return Ok(r);
        }
        if self.rooms.len() >= self.limits.max_rooms {
            return Err(ProtoError::new(
                ErrorCode::Unavailable,
                "this gateway hosts its maximum number of rooms",
            ));
        }
        let entry = self.rooms.entry(Arc::from(id)).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.limits.room_queue);
            let id: Arc<str> = Arc::from(id);
            let counters = Arc::new(RoomCounters::default());
            let task = RoomTask::new(id.clone(), self.clone(), counters.clone());
            tokio::spawn(task.run(rx));
            metrics::gauge!(m::ROOMS).increment(1.0);
            Room {
                id,
                tx,
                counters,
                anchor_lock: Arc::new(tokio::sync::Mutex::new(())),
            }
        });
        Ok(entry.clone())
    }

    pub fn product(&self, sku: &str) -> Option<ProductInfo> {
        self.catalog.get(sku).map(|p| p.clone())
    }

    /// Sets a catalogue entry and tells every room showing the SKU.
    pub fn set_product(&self, sku: &str, info: ProductInfo, except_room: Option<&str>) {
        self.catalog.insert(Arc::from(sku), info);
        for r in self.rooms.iter() {
            if Some(r.key().as_ref()) != except_room
                && r.tx
                    .try_send(RoomCmd::CatalogChanged {
                        sku: sku.to_string(),
                    })
                    .is_err()
            {
                // That room shows the change on its next join snapshot instead.
                metrics::counter!(m::ROOM_QUEUE_FULL).increment(1);
            }
        }
    }

    /// Registers a connection of `outbox.user` (for `order_confirmed` and shutdown).
    pub fn register(&self, outbox: &Outbox) {
        self.users
            .entry(outbox.user.clone())
            .or_default()
            .insert(outbox.conn, outbox.clone());
    }

    pub fn unregister(&self, user: &str, conn: u64) {
        if let Some(mut conns) = self.users.get_mut(user) {
            conns.remove(&conn);
        }
        self.users.remove_if(user, |_, conns| conns.is_empty());
    }

    /// How many connections of `user` are registered on this gateway (a connection is
    /// unregistered only once its carts in flight have finished).
    pub fn connections_of(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |conns| conns.len())
    }

    /// Queues `msg` to every connection of `user` on this gateway; returns how many.
    pub fn send_to_user(&self, user: &str, msg: &ServerMsg) -> usize {
        let Some(conns) = self.users.get(user) else {
            return 0;
        };
        let mut sent = 0;
        let mut frames: [Option<Frame>; 2] = [None, None];
        for o in conns.values() {
            let slot = &mut frames[o.encoding as usize];
            let f = slot.get_or_insert_with(|| msg.encode(o.encoding)).clone();
            if o.push(f) {
                sent += 1;
            }
        }
        sent
    }

    /// Asks every connection to close with `code` (graceful shutdown uses 1001).
    pub fn close_all(&self, code: u16) -> usize {
        let mut n = 0;
        for conns in self.users.iter() {
            for o in conns.values() {
                o.kill(code);
                n += 1;
            }
        }
        n
    }

    fn product_view(&self, sku: &str) -> Option<ProductView> {
        let p = self.catalog.get(sku)?;
        Some(ProductView {
            sku: sku.to_string(),
            title: p.title.clone(),
            price_cents: p.price_cents,
            available: self.stock.available(sku).unwrap_or(0),
            limit_per_user: p.limit_per_user,
        })
    }
}

/// The state of one room, owned by its task.
struct RoomTask {
    id: Arc<str>,
    hub: Arc<Hub>,
    counters: Arc<RoomCounters>,
    status: RoomStatus,
    title: String,
    shelf: Vec<String>,
    pinned: Option<String>,
    seq: u64,
    history: VecDeque<Broadcast>,
    /// Sum of `approx_size` over `history`.
    history_bytes: usize,
    members: Vec<Outbox>,
    index: HashMap<u64, usize>,
    comments: Vec<CommentItem>,
    last_stock: HashMap<String, u64>,
}

/// Members served between two yields of a long fan-out, so one huge room shares its
/// worker thread with the other rooms and the accept loop.
const FANOUT_CHUNK: usize = 2048;

impl RoomTask {
    fn new(id: Arc<str>, hub: Arc<Hub>, counters: Arc<RoomCounters>) -> RoomTask {
        RoomTask {
            id,
            hub,
            counters,
            status: RoomStatus::Closed,
            title: String::new(),
            shelf: Vec::new(),
            pinned: None,
            seq: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            members: Vec::new(),
            index: HashMap::new(),
            comments: Vec::new(),
            last_stock: HashMap::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<RoomCmd>) {
        let limits = self.hub.limits.clone();
        let mut tick = tokio::time::interval(limits.room_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut stats = tokio::time::interval(limits.stats_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
                _ = stats.tick() => self.on_stats().await,
            }
        }
        metrics::gauge!(m::ROOMS).decrement(1.0);
    }

    async fn handle(&mut self, cmd: RoomCmd) {
        match cmd {
            RoomCmd::Join { outbox, req, since } => self.join(outbox, req, since),
            RoomCmd::Leave { conn, reply } => {
                self.remove(conn);
                if let Some((o, req)) = reply {
                    o.send(&ServerMsg::Ack { req });
                }
            }
            RoomCmd::Comment { user, text, reply } => {
                if self.status != RoomStatus::Live {
                    if let Some((o, req)) = reply {
                        o.send(&ServerMsg::error(
                            Some(req),
                            ProtoError::new(ErrorCode::RoomClosed, "the room is closed"),
                        ));
                    }
                    return;
                }
                if let Some((o, req)) = reply {
                    o.send(&ServerMsg::Ack { req });
                }
                if self.comments.len() < self.hub.limits.comments_per_tick {
                    self.comments.push(CommentItem {
                        user: user.to_string(),
                        text,
                        at: unix_ms(),
                    });
                } else {
                    metrics::counter!(m::COMMENTS_DROPPED).increment(1);
                }
            }
            RoomCmd::Apply { change, done } => {
                self.apply(change).await;
                let _ = done.send(());
            }
            RoomCmd::State { reply } => {
                let _ = reply.send((self.state(), self.summary()));
            }
            RoomCmd::Restore {
                title,
                status,
                shelf,
                pinned,
                seq_base,
                done,
            } => {
                self.title = title;
                self.status = status;
                self.counters
                    .live
                    .store(status == RoomStatus::Live, Ordering::Release);
                *self
                    .counters
                    .shelf
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = shelf.clone();
                self.shelf = shelf;
                self.pinned = pinned;
                self.seq = self.seq.max(seq_base);
                self.history.clear();
                self.history_bytes = 0;
                let _ = done.send(());
            }
            RoomCmd::CatalogChanged { sku } => {
                if self.shelf.contains(&sku) {
                    if let Some(product) = self.hub.product_view(&sku) {
                        self.broadcast(|room, seq| ServerMsg::Product { room, seq, product })
                            .await;
                    }
                }
            }
        }
    }

    fn summary(&self) -> RoomSummary {
        RoomSummary {
            status: self.status,
            title: self.title.clone(),
            pinned: self.pinned.clone(),
            shelf: self.shelf.clone(),
        }
    }

    fn state(&self) -> RoomState {
        RoomState {
            room: self.id.to_string(),
            seq: self.seq,
            status: self.status,
            title: self.title.clone(),
            pinned: self.pinned.clone(),
            products: self
                .shelf
                .iter()
                .filter_map(|s| self.hub.product_view(s))
                .collect(),
            viewers: self.members.len() as u64,
            likes: self.counters.likes.load(Ordering::Relaxed),
        }
    }

    fn join(&mut self, outbox: Outbox, req: String, since: Option<u64>) {
        // A second join of the same connection starts its membership over.
        self.remove(outbox.conn);
        let oldest = self.history.front().map(|b| b.seq());
        let resumable = match since {
            Some(n) if n == self.seq => true,
            Some(n) if n < self.seq => oldest.is_some_and(|o| o <= n + 1),
            _ => false,
        };
        if since.is_some() {
            metrics::counter!(m::RESUMES, "outcome" => if resumable { "resumed" } else { "snapshot" })
                .increment(1);
        }
        // Members count themselves in the state they receive.
        self.index.insert(outbox.conn, self.members.len());
        self.members.push(outbox.clone());
        let ok = if let (true, Some(n)) = (resumable, since) {
            let mut ok = outbox.send(&ServerMsg::Joined {
                req,
                room: self.id.to_string(),
                resumed: true,
                seq: self.seq,
            });
            for b in self.history.iter().filter(|b| b.seq() > n) {
                if !ok {
                    break;
                }
                ok = outbox.push(b.frame(outbox.encoding));
            }
            ok
        } else {
            outbox.send(&ServerMsg::RoomState {
                req: Some(req),
                state: self.state(),
            })
        };
        metrics::gauge!(m::ROOM_MEMBERS).increment(1.0);
        if !ok {
            self.remove(outbox.conn);
            return;
        }
        let n = self.members.len() as u64;
        self.counters.viewers.store(n, Ordering::Relaxed);
        self.counters.peak_viewers.fetch_max(n, Ordering::Relaxed);
    }

    fn remove(&mut self, conn: u64) {
        if let Some(i) = self.index.remove(&conn) {
            self.members.swap_remove(i);
            if let Some(moved) = self.members.get(i) {
                self.index.insert(moved.conn, i);
            }
            metrics::gauge!(m::ROOM_MEMBERS).decrement(1.0);
            self.counters
                .viewers
                .store(self.members.len() as u64, Ordering::Relaxed);
        }
    }

    async fn apply(&mut self, change: RoomChange) {
        match change {
            RoomChange::Opened { title } => {
                let was = self.status;
                self.title = title;
                self.status = RoomStatus::Live;
                self.counters.live.store(true, Ordering::Release);
                if was != RoomStatus::Live {
                    self.broadcast(|room, seq| ServerMsg::RoomStatus {
                        room,
                        seq,
                        status: RoomStatus::Live,
                    })
                    .await;
                }
            }
            RoomChange::Closed => {
                if self.status != RoomStatus::Closed {
                    self.status = RoomStatus::Closed;
                    self.counters.live.store(false, Ordering::Release);
                    self.broadcast(|room, seq| ServerMsg::RoomStatus {
                        room,
                        seq,
                        status: RoomStatus::Closed,
                    })
                    .await;
                }
            }
            RoomChange::ShelfProduct { sku } => {
                if !self.shelf.contains(&sku) {
                    self.shelf.push(sku.clone());
                    let mut shelf = self
                        .counters
                        .shelf
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    shelf.push(sku.clone());
                }
                if let Some(product) = self.hub.product_view(&sku) {
                    self.last_stock.insert(sku, product.available);
                    self.broadcast(|room, seq| ServerMsg::Product { room, seq, product })
                        .await;
                }
            }
            RoomChange::Pinned { sku } => {
                self.pinned = Some(sku.clone());
                self.broadcast(|room, seq| ServerMsg::Pinned { room, seq, sku })
                    .await;
            }
            RoomChange::Unpinned => {
                if self.pinned.take().is_some() {
                    self.broadcast(|room, seq| ServerMsg::Unpinned { room, seq })
                        .await;
                }
            }
        }
    }

    /// Flushes the batched comments and the changed stock levels.
    async fn on_tick(&mut self) {
        if self.members.is_empty() {
            // Nobody to tell: a joiner gets the current state in its snapshot.
            self.comments.clear();
            return;
        }
        if !self.comments.is_empty() {
            let items = std::mem::take(&mut self.comments);
            self.broadcast(|room, seq| ServerMsg::Comments { room, seq, items })
                .await;
        }
        let mut items = Vec::new();
        for sku in &self.shelf {
            let now = self.hub.stock.available(sku).unwrap_or(0);
            let last = self.last_stock.insert(sku.clone(), now);
            if last != Some(now) {
                items.push(StockItem {
                    sku: sku.clone(),
                    available: now,
                });
            }
        }
        if !items.is_empty() {
            self.broadcast(|room, seq| ServerMsg::Stock { room, seq, items })
                .await;
        }
    }

    async fn on_stats(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let msg = Broadcast::new(ServerMsg::Stats {
            room: self.id.to_string(),
            viewers: self.members.len() as u64,
            likes: self.counters.likes.load(Ordering::Relaxed),
        });
        self.fan_out(&msg).await;
    }

    /// Assigns the next `seq`, keeps the broadcast in the history ring and queues it to
    /// every member.
    async fn broadcast(&mut self, make: impl FnOnce(String, u64) -> ServerMsg) {
        self.seq += 1;
        let b = Broadcast::new(make(self.id.to_string(), self.seq));
        metrics::counter!(m::BROADCASTS, "type" => b.kind()).increment(1);
        self.fan_out(&b).await;
        self.history_bytes += b.approx_size();
        self.history.push_back(b);
        let limits = &self.hub.limits;
        while self.history.len() > limits.room_history
            || (self.history_bytes > limits.room_history_bytes && self.history.len() > 1)
        {
            if let Some(old) = self.history.pop_front() {
                self.history_bytes -= old.approx_size();
            }
        }
    }

    async fn fan_out(&mut self, b: &Broadcast) {
        let started = Instant::now();
        let mut dead = Vec::new();
        let mut i = 0;
        while i < self.members.len() {
            let end = (i + FANOUT_CHUNK).min(self.members.len());
            for o in &self.members[i..end] {
                if !o.push(b.frame(o.encoding)) {
                    dead.push(o.conn);
                }
            }
            i = end;
            if i < self.members.len() {
                // Nothing else runs on this room while we yield: membership cannot change.
                tokio::task::yield_now().await;
            }
        }
        for conn in dead {
            self.remove(conn);
        }
        metrics::histogram!(m::FANOUT_SECONDS).record(started.elapsed().as_secs_f64());
    }
}
