//! Commands: what each client message does. Each command checks who may do it and what it
//! may touch, records the change durably through the committer when it must, applies it
//! (inventory core, room hub) and produces exactly one reply for a message with `req`.
//!
//! Commands see typed messages only (never bytes, never sockets). They must not block the
//! reader on another client: they await the committer or a room's queue, never a socket.
//! `add_to_cart` does not even await the committer: it returns the wait as an [`InFlight`]
//! future, so one connection's pipelined carts join the same group commit.

mod anchor;
mod cart;
mod lua_baseline;
mod viewer;

pub(crate) use cart::ended_idem;
pub use cart::reservation_record;

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Instant};

use crate::{
    app::App,
    auth::Claims,
    hub::{Outbox, Room},
    metrics as m,
    protocol::{ClientMsg, ErrorCode, ProtoError, ServerMsg},
};

/// The state of one connection that commands read and change.
pub struct Session {
    pub claims: Claims,
    pub user: Arc<str>,
    pub outbox: Outbox,
    /// Rooms this connection joined, with the `ref` it joined with.
    pub rooms: HashMap<Arc<str>, Option<Arc<str>>>,
    limiter: TokenBucket,
}

impl Session {
    pub fn new(claims: Claims, outbox: Outbox, rate_per_sec: u32, burst: u32) -> Session {
        Session {
            user: outbox.user.clone(),
            claims,
            outbox,
            rooms: HashMap::new(),
            limiter: TokenBucket::new(rate_per_sec, burst),
        }
    }

    /// Whether one more command may run now (the per-connection rate limit).
    pub fn allow(&mut self) -> bool {
        self.limiter.take(Instant::now())
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` banked.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a command answers: a message to queue now, or nothing (the room queues the reply
/// itself, or the message had no `req`).
pub type Reply = Result<Option<ServerMsg>, ProtoError>;

/// What a command that waits for a durable write hands back: its reply now, or the rest of
/// the command as a future that owns what it needs (it must not hold the session).
pub enum Step {
    Now(Reply),
    Later(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

/// The rest of a command whose reply waits for Redis; the connection polls it beside its
/// next frames, at most `LIVEGATE_CONN_INFLIGHT` at once. It queues its reply itself.
pub type InFlight = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs one decoded client message and queues its reply on the session's outbox, or, for
/// `add_to_cart`, makes the in-memory change now and returns the wait for its durable
/// write (so a client that pipelines its carts has them committed in one batch).
pub async fn dispatch(app: &Arc<App>, s: &mut Session, msg: ClientMsg) -> Option<InFlight> {
    let kind = msg.kind();
    metrics::counter!(m::COMMANDS, "type" => kind).increment(1);
    let req = msg.req().map(str::to_string);
    let result = match msg {
        ClientMsg::AddToCart {
            req: r,
            room,
            sku,
            qty,
        } => match cart::add_to_cart(app, s, r, room, sku, qty) {
            Step::Now(result) => result,
            Step::Later(rest) => {
                let outbox = s.outbox.clone();
                return Some(Box::pin(async move {
                    let result = rest.await;
                    answer(&outbox, kind, req, result);
                }));
            }
        },
        msg => run(app, s, msg).await,
    };
    answer(&s.outbox, kind, req, result);
    None
}

fn answer(outbox: &Outbox, kind: &'static str, req: Option<String>, result: Reply) {
    match result {
        Ok(Some(reply)) => {
            outbox.send(&reply);
        }
        Ok(None) => {}
        Err(e) => {
            metrics::counter!(m::COMMAND_ERRORS, "code" => e.code.as_str()).increment(1);
            if e.code == ErrorCode::Internal {
                tracing::error!(kind, error = %e.message, "command failed");
            }
            outbox.send(&ServerMsg::error(req, e));
        }
    }
}

async fn run(app: &Arc<App>, s: &mut Session, msg: ClientMsg) -> Reply {
    use ClientMsg::*;
    match msg {
        Join {
            req,
            room,
            since,
            referrer,
        } => viewer::join(app, s, req, room, since, referrer),
        Leave { req, room } => viewer::leave(app, s, req, room),
        Comment { req, room, text } => viewer::comment(app, s, req, room, text),
        Like { req, room, count } => viewer::like(app, s, req, room, count),
        Ping { req } => Ok(Some(ServerMsg::Pong { req })),
        // Always taken by `dispatch`; answered here too so the match stays whole.
        AddToCart {
            req,
            room,
            sku,
            qty,
        } => match cart::add_to_cart(app, s, req, room, sku, qty) {
            Step::Now(result) => result,
            Step::Later(rest) => rest.await,
        },
        Release { req, reservation } => cart::release(app, s, req, reservation).await,
        Checkout { req, reservations } => cart::checkout(app, s, req, reservations).await,
        OpenRoom { req, room, title } => anchor::open_room(app, s, req, room, title).await,
        CloseRoom { req, room } => anchor::close_room(app, s, req, room).await,
        UpsertProduct {
            req,
            room,
            sku,
            title,
            price_cents,
            stock,
            limit_per_user,
            ttl_s,
        } => {
            let p = anchor::Upsert {
                sku,
                title,
                price_cents,
                stock,
                limit_per_user,
                ttl_s,
            };
            anchor::upsert_product(app, s, req, room, p).await
        }
        Restock {
            req,
            room,
            sku,
            delta,
        } => anchor::restock(app, s, req, room, sku, delta).await,
        Pin { req, room, sku } => anchor::pin(app, s, req, room, Some(sku)).await,
        Unpin { req, room } => anchor::pin(app, s, req, room, None).await,
    }
}

/// The room, or `not_found`.
fn find_room(app: &App, room: &str) -> Result<Room, ProtoError> {
    app.hub
        .room(room)
        .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, format!("no room {room:?}")))
}

fn unavailable(e: crate::commit::CommitError) -> ProtoError {
    let hint = match e {
        crate::commit::CommitError::Unavailable(_) => "nothing was recorded",
        crate::commit::CommitError::Unknown => {
            "it may still be recorded: retry with the same req to learn the outcome"
        }
    };
    ProtoError::new(ErrorCode::Unavailable, format!("{e}; {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(20, 40);
        let t0 = b.last;
        let allowed = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(allowed, 40);
        assert!(!b.take(t0));
        // 100 ms later, two more tokens.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1));
        assert!(b.take(t1));
        assert!(!b.take(t1));
    }
}
