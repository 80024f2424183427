//! The wire protocol, version 1: the one set of serde types for every client and server
//! message, decoding of client frames in both encodings, and encoding of server messages
//! into shared, reference-counted frames.
//!
//! This is the only module that knows field names and encodings; everything above it works
//! with typed messages and [`Frame`]s. It must not hold state or do I/O.

use std::sync::OnceLock;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{protocol::frame::Utf8Bytes, Message};

use crate::config::valid_id;

/// The protocol version announced in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Subprotocol name of the JSON encoding.
pub const SUBPROTOCOL_JSON: &str = "livegate.v1.json";
/// Subprotocol name of the MessagePack encoding.
pub const SUBPROTOCOL_MSGPACK: &str = "livegate.v1.msgpack";
/// Longest comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 280;
/// Longest room or product title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Most likes one `like` message may carry.
pub const MAX_LIKES_PER_MESSAGE: u32 = 1000;
/// Most reservations one `checkout` may carry.
pub const MAX_CHECKOUT_ITEMS: usize = 50;

/// The encoding a connection negotiated through `Sec-WebSocket-Protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    /// Picks the encoding from the client's offered subprotocols (comma separated header
    /// values). Returns the encoding and the subprotocol to answer with, if any; `Err` when
    /// the client offered subprotocols but none of ours.
    pub fn negotiate<'a>(
        offered: impl Iterator<Item = &'a str>,
    ) -> Result<(Encoding, Option<&'static str>), UnknownSubprotocol> {
        let mut any = false;
        for p in offered.flat_map(|v| v.split(',')).map(str::trim) {
            if p.is_empty() {
                continue;
            }
            any = true;
            if p == SUBPROTOCOL_JSON {
                return Ok((Encoding::Json, Some(SUBPROTOCOL_JSON)));
            }
            if p == SUBPROTOCOL_MSGPACK {
                return Ok((Encoding::MsgPack, Some(SUBPROTOCOL_MSGPACK)));
            }
        }
        if any {
            Err(UnknownSubprotocol)
        } else {
            Ok((Encoding::Json, None))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::MsgPack => "msgpack",
        }
    }
}

/// The client offered subprotocols, none of them ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownSubprotocol;

/// Error codes of protocol.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    RoomClosed,
    SoldOut,
    LimitExceeded,
    RateLimited,
    Expired,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RoomClosed => "room_closed",
            ErrorCode::SoldOut => "sold_out",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Expired => "expired",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A failed command: the code and a human-readable message for the `error` reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProtoError {
        ProtoError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ProtoError {
        ProtoError::new(ErrorCode::BadRequest, message)
    }
}

/// A message from a client, after decoding and validation.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Join {
        req: String,
        room: String,
        #[serde(default)]
        since: Option<u64>,
        #[serde(default, rename = "ref")]
        referrer: Option<String>,
    },
    Leave {
        req: String,
        room: String,
    },
    AddToCart {
        req: String,
        room: String,
        sku: String,
        qty: u32,
    },
    Release {
        req: String,
        reservation: String,
    },
    Checkout {
        req: String,
        reservations: Vec<String>,
    },
    Comment {
        #[serde(default)]
        req: Option<String>,
        room: String,
        text: String,
    },
    Like {
        #[serde(default)]
        req: Option<String>,
        room: String,
        count: u32,
    },
    Ping {
        #[serde(default)]
        req: Option<String>,
    },
    OpenRoom {
        req: String,
        room: String,
        title: String,
    },
    CloseRoom {
        req: String,
        room: String,
    },
    UpsertProduct {
        req: String,
        room: String,
        sku: String,
        title: String,
        price_cents: i64,
        #[serde(default)]
        stock: Option<u64>,
        #[serde(default)]
        limit_per_user: Option<u32>,
        #[serde(default)]
        ttl_s: Option<u32>,
    },
    Restock {
        req: String,
        room: String,
        sku: String,
        delta: i64,
    },
    Pin {
        req: String,
        room: String,
        sku: String,
    },
    Unpin {
        req: String,
        room: String,
    },
}

/// A decoded frame: the message, or the error to answer (with the `req`, when readable).
#[derive(Debug)]
pub enum Decoded {
    Msg(ClientMsg),
    Invalid {
        req: Option<String>,
        error: ProtoError,
    },
}

/// Decodes one client frame payload in `encoding`, then validates it. Never panics; any
/// problem becomes [`Decoded::Invalid`] carrying the `req` when it could be read.
pub fn decode_client(encoding: Encoding, payload: &[u8]) -> Decoded {
    if encoding == Encoding::Json {
        if let Some(d) = decode_json_direct(payload) {
            return d;
        }
    }
    decode_via_value(encoding, payload)
}

/// The common case in one pass: a JSON object that decodes straight into a [`ClientMsg`]
/// and has a valid `req` (going through a `serde_json::Value` first, for the precise
/// errors of [`decode_via_value`], was 6.5 % of the gateway's CPU in a rush, mostly
/// allocating the map's keys). `None` sends the frame to `decode_via_value`, which
/// answers it as before, so this only ever answers what that would answer the same way
/// (tested against it). Only objects: serde's internally tagged enums also accept an array
/// whose first element is the tag, which the contract does not. Only JSON: a MessagePack
/// map may have integer keys, which the typed decoder would read as field indexes.
fn decode_json_direct(payload: &[u8]) -> Option<Decoded> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let msg: ClientMsg = serde_json::from_slice(payload).ok()?;
    let req = msg.req();
    if !req.is_none_or(valid_id) {
        return None;
    }
    Some(match validate(&msg) {
        Ok(()) => Decoded::Msg(msg),
        Err(error) => Decoded::Invalid {
            req: req.map(str::to_owned),
            error,
        },
    })
}

/// The general decoder: any frame, through a `serde_json::Value`, so a bad frame gets an
/// error that names what is wrong and keeps its `req` whenever it is readable.
fn decode_via_value(encoding: Encoding, payload: &[u8]) -> Decoded {
    let value: Result<serde_json::Value, String> = match encoding {
        Encoding::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        Encoding::MsgPack => rmp_serde::from_slice(payload).map_err(|e| e.to_string()),
    };
    let value = match value {
        Ok(v) => v,
        Err(e) => {
            return Decoded::Invalid {
                req: None,
                error: ProtoError::bad_request(format!("undecodable frame: {e}")),
            }
        }
    };
    let Some(obj) = value.as_object() else {
        return Decoded::Invalid {
            req: None,
            error: ProtoError::bad_request("a message must be a map with a string field `type`"),
        };
    };
    let req = match obj.get("req") {
        Some(serde_json::Value::String(r)) if valid_id(r) => Some(r.clone()),
        Some(serde_json::Value::String(_)) => {
            return Decoded::Invalid {
                req: None,
                error: ProtoError::bad_request("`req` must be 1..64 chars of [A-Za-z0-9_.:-]"),
            }
        }
        Some(serde_json::Value::Null) | None => None,
        Some(_) => {
            return Decoded::Invalid {
                req: None,
                error: ProtoError::bad_request("`req` must be a string"),
            }
        }
    };
    match obj.get("type") {
        Some(serde_json::Value::String(_)) => {}
        _ => {
            return Decoded::Invalid {
                req,
                error: ProtoError::bad_request("missing string field `type`"),
            }
        }
    }
    let msg: ClientMsg = match serde_json::from_value(value) {
        Ok(m) => m,
        Err(e) => {
            return Decoded::Invalid {
                req,
                error: ProtoError::bad_request(e.to_string()),
            }
        }
    };
    match validate(&msg) {
        Ok(()) => Decoded::Msg(msg),
        Err(error) => Decoded::Invalid { req, error },
    }
}

fn check_id(field: &str, v: &str) -> Result<(), ProtoError> {
    if valid_id(v) {
        Ok(())
    } else {
        Err(ProtoError::bad_request(format!(
            "`{field}` must be 1..64 chars of [A-Za-z0-9_.:-]"
        )))
    }
}

fn check_title(v: &str) -> Result<(), ProtoError> {
    let n = v.chars().count();
    if (1..=MAX_TITLE_CHARS).contains(&n) && !v.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(ProtoError::bad_request(format!(
            "`title` must be 1..{MAX_TITLE_CHARS} characters without control characters"
        )))
    }
}

/// Field-level rules of protocol.md that serde's types cannot express.
fn validate(msg: &ClientMsg) -> Result<(), ProtoError> {
    use ClientMsg::*;
    match msg {
        Join { room, referrer, .. } => {
            check_id("room", room)?;
            if let Some(r) = referrer {
                if r.is_empty() || r.len() > 128 || r.chars().any(char::is_control) {
                    return Err(ProtoError::bad_request(
                        "`ref` must be a user id of 1..128 characters",
                    ));
                }
            }
        }
        Leave { room, .. } | CloseRoom { room, .. } | Unpin { room, .. } => check_id("room", room)?,
        AddToCart { room, sku, qty, .. } => {
            check_id("room", room)?;
            check_id("sku", sku)?;
            if !(1..=99).contains(qty) {
                return Err(ProtoError::bad_request("`qty` must be 1..99"));
            }
        }
        Release { reservation, .. } => check_id("reservation", reservation)?,
        Checkout { reservations, .. } => {
            if reservations.is_empty() || reservations.len() > MAX_CHECKOUT_ITEMS {
                return Err(ProtoError::bad_request(format!(
                    "`reservations` must list 1..{MAX_CHECKOUT_ITEMS} reservation ids"
                )));
            }
            for r in reservations {
                check_id("reservations", r)?;
            }
        }
        Comment { room, text, .. } => {
            check_id("room", room)?;
            let n = text.chars().count();
            if !(1..=MAX_COMMENT_CHARS).contains(&n) {
                return Err(ProtoError::bad_request(format!(
                    "`text` must be 1..{MAX_COMMENT_CHARS} characters"
                )));
            }
        }
        Like { room, count, .. } => {
            check_id("room", room)?;
            if !(1..=MAX_LIKES_PER_MESSAGE).contains(count) {
                return Err(ProtoError::bad_request(format!(
                    "`count` must be 1..{MAX_LIKES_PER_MESSAGE}"
                )));
            }
        }
        Ping { .. } => {}
        OpenRoom { room, title, .. } => {
            check_id("room", room)?;
            check_title(title)?;
        }
        UpsertProduct {
            room,
            sku,
            title,
            price_cents,
            stock,
            limit_per_user,
            ttl_s,
            ..
        } => {
            check_id("room", room)?;
            check_id("sku", sku)?;
            check_title(title)?;
            if *price_cents < 0 {
                return Err(ProtoError::bad_request("`price_cents` must be >= 0"));
            }
            if stock.is_some_and(|s| s > 1_000_000_000) {
                return Err(ProtoError::bad_request("`stock` must be <= 1000000000"));
            }
            if limit_per_user.is_some_and(|l| l == 0 || l > 1_000_000) {
                return Err(ProtoError::bad_request(
                    "`limit_per_user` must be 1..1000000 (omit it for no limit)",
                ));
            }
            if ttl_s.is_some_and(|t| t == 0 || t > 7 * 86_400) {
                return Err(ProtoError::bad_request("`ttl_s` must be 1..604800"));
            }
        }
        Restock {
            room, sku, delta, ..
        } => {
            check_id("room", room)?;
            check_id("sku", sku)?;
            if *delta == 0 || delta.unsigned_abs() > 1_000_000_000 {
                return Err(ProtoError::bad_request(
                    "`delta` must be non-zero and at most 1000000000 in size",
                ));
            }
        }
        Pin { room, sku, .. } => {
            check_id("room", room)?;
            check_id("sku", sku)?;
        }
    }
    Ok(())
}

impl ClientMsg {
    /// The `req` this message carries, if any.
    pub fn req(&self) -> Option<&str> {
        use ClientMsg::*;
        match self {
            Join { req, .. }
            | Leave { req, .. }
            | AddToCart { req, .. }
            | Release { req, .. }
            | Checkout { req, .. }
            | OpenRoom { req, .. }
            | CloseRoom { req, .. }
            | UpsertProduct { req, .. }
            | Restock { req, .. }
            | Pin { req, .. }
            | Unpin { req, .. } => Some(req),
            Comment { req, .. } | Like { req, .. } | Ping { req } => req.as_deref(),
        }
    }

    /// The message's `type`, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        use ClientMsg::*;
        match self {
            Join { .. } => "join",
            Leave { .. } => "leave",
            AddToCart { .. } => "add_to_cart",
            Release { .. } => "release",
            Checkout { .. } => "checkout",
            Comment { .. } => "comment",
            Like { .. } => "like",
            Ping { .. } => "ping",
            OpenRoom { .. } => "open_room",
            CloseRoom { .. } => "close_room",
            UpsertProduct { .. } => "upsert_product",
            Restock { .. } => "restock",
            Pin { .. } => "pin",
            Unpin { .. } => "unpin",
        }
    }
}

/// Room status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomStatus {
    Live,
    Closed,
}

impl RoomStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomStatus::Live => "live",
            RoomStatus::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Option<RoomStatus> {
        match s {
            "live" => Some(RoomStatus::Live),
            "closed" => Some(RoomStatus::Closed),
            _ => None,
        }
    }
}

/// A product as shown on a room's shelf.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProductView {
    pub sku: String,
    pub title: String,
    pub price_cents: i64,
    pub available: u64,
    pub limit_per_user: Option<u32>,
}

/// One SKU's stock in a `stock` broadcast.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StockItem {
    pub sku: String,
    pub available: u64,
}

/// One comment in a `comments` broadcast.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommentItem {
    pub user: String,
    pub text: String,
    pub at: u64,
}

/// The fields of `room_state` (also the body of `GET /api/v1/rooms/{room}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoomState {
    pub room: String,
    pub seq: u64,
    pub status: RoomStatus,
    pub title: String,
    pub pinned: Option<String>,
    pub products: Vec<ProductView>,
    pub viewers: u64,
    pub likes: u64,
}

/// A message from the server.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Hello {
        conn: String,
        user: String,
        role: String,
        server_time: u64,
        heartbeat_ms: u64,
        protocol: u32,
    },
    Ack {
        req: String,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        req: Option<String>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        req: Option<String>,
        code: ErrorCode,
        message: String,
    },
    RoomState {
        #[serde(skip_serializing_if = "Option::is_none")]
        req: Option<String>,
        #[serde(flatten)]
        state: RoomState,
    },
    Joined {
        req: String,
        room: String,
        resumed: bool,
        seq: u64,
    },
    Reserved {
        req: String,
        reservation: String,
        room: String,
        sku: String,
        qty: u32,
        price_cents: i64,
        expires_at: u64,
    },
    Released {
        #[serde(skip_serializing_if = "Option::is_none")]
        req: Option<String>,
        reservation: String,
        reason: &'static str,
    },
    OrderAccepted {
        req: String,
        order: String,
        total_cents: i64,
    },
    OrderConfirmed {
        order: String,
        total_cents: i64,
    },
    RoomStatus {
        room: String,
        seq: u64,
        status: RoomStatus,
    },
    Product {
        room: String,
        seq: u64,
        product: ProductView,
    },
    Pinned {
        room: String,
        seq: u64,
        sku: String,
    },
    Unpinned {
        room: String,
        seq: u64,
    },
    Stock {
        room: String,
        seq: u64,
        items: Vec<StockItem>,
    },
    Comments {
        room: String,
        seq: u64,
        items: Vec<CommentItem>,
    },
    Stats {
        room: String,
        viewers: u64,
        likes: u64,
    },
}

impl ServerMsg {
    pub fn error(req: Option<String>, e: ProtoError) -> ServerMsg {
        ServerMsg::Error {
            req,
            code: e.code,
            message: e.message,
        }
    }

    /// Encodes this message once in `encoding` as a WebSocket message whose payload is a
    /// shared buffer: cloning the result never copies the bytes.
    pub fn encode(&self, encoding: Encoding) -> Frame {
        match encoding {
            Encoding::Json => match serde_json::to_string(self) {
                Ok(s) => Message::Text(Utf8Bytes::from(s)),
                Err(e) => internal_frame(encoding, &e.to_string()),
            },
            Encoding::MsgPack => match rmp_serde::to_vec_named(self) {
                Ok(v) => Message::Binary(Bytes::from(v)),
                Err(e) => internal_frame(encoding, &e.to_string()),
            },
        }
    }
}

fn internal_frame(encoding: Encoding, why: &str) -> Frame {
    tracing::error!(why, "failed to encode a server message");
    match encoding {
        Encoding::Json => Message::Text(Utf8Bytes::from_static(
            r#"{"type":"error","code":"internal","message":"encoding failed"}"#,
        )),
        Encoding::MsgPack => Message::Binary(Bytes::new()),
    }
}

/// An encoded server message, ready for the socket. Its payload is reference-counted.
pub type Frame = Message;

/// A broadcast encoded at most once per encoding, on first use, and shared by every
/// member's queue.
pub struct Broadcast {
    msg: ServerMsg,
    json: OnceLock<Frame>,
    msgpack: OnceLock<Frame>,
}

impl Broadcast {
    pub fn new(msg: ServerMsg) -> Broadcast {
        Broadcast {
            msg,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    pub fn msg(&self) -> &ServerMsg {
        &self.msg
    }

    /// The room `seq` of a sequenced broadcast (0 for unsequenced ones).
    pub fn seq(&self) -> u64 {
        match &self.msg {
            ServerMsg::RoomStatus { seq, .. }
            | ServerMsg::Product { seq, .. }
            | ServerMsg::Pinned { seq, .. }
            | ServerMsg::Unpinned { seq, .. }
            | ServerMsg::Stock { seq, .. }
            | ServerMsg::Comments { seq, .. } => *seq,
            _ => 0,
        }
    }

    /// An estimate of the encoded size in bytes (for byte-bounded history), without
    /// encoding.
    pub fn approx_size(&self) -> usize {
        const BASE: usize = 64;
        match &self.msg {
            ServerMsg::Comments { items, .. } => {
                BASE + items
                    .iter()
                    .map(|c| c.text.len() + c.user.len() + 40)
                    .sum::<usize>()
            }
            ServerMsg::Stock { items, .. } => {
                BASE + items.iter().map(|i| i.sku.len() + 30).sum::<usize>()
            }
            ServerMsg::Product { product, .. } => {
                BASE + product.sku.len() + product.title.len() + 80
            }
            ServerMsg::Pinned { sku, .. } => BASE + sku.len(),
            _ => BASE,
        }
    }

    /// The message's `type`, for metric labels.
    pub fn kind(&self) -> &'static str {
        match &self.msg {
            ServerMsg::RoomStatus { .. } => "room_status",
            ServerMsg::Product { .. } => "product",
            ServerMsg::Pinned { .. } => "pinned",
            ServerMsg::Unpinned { .. } => "unpinned",
            ServerMsg::Stock { .. } => "stock",
            ServerMsg::Comments { .. } => "comments",
            ServerMsg::Stats { .. } => "stats",
            _ => "other",
        }
    }

    /// The frame for `encoding`: a cheap clone of the one shared buffer.
    pub fn frame(&self, encoding: Encoding) -> Frame {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| self.msg.encode(encoding)).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Decoded {
        decode_client(Encoding::Json, s.as_bytes())
    }

    #[test]
    fn negotiation_follows_the_contract() {
        assert_eq!(
            Encoding::negotiate(std::iter::empty()),
            Ok((Encoding::Json, None))
        );
        assert_eq!(
            Encoding::negotiate(["foo, livegate.v1.msgpack"].into_iter()),
            Ok((Encoding::MsgPack, Some(SUBPROTOCOL_MSGPACK)))
        );
        assert_eq!(
            Encoding::negotiate(["livegate.v1.json"].into_iter()),
            Ok((Encoding::Json, Some(SUBPROTOCOL_JSON)))
        );
        assert_eq!(
            Encoding::negotiate(["chat"].into_iter()),
            Err(UnknownSubprotocol)
        );
    }

    #[test]
    fn a_valid_join_decodes() {
        match json(r#"{"type":"join","req":"1","room":"r1","since":4,"ref":"u9"}"#) {
            Decoded::Msg(ClientMsg::Join {
                req,
                room,
                since,
                referrer,
            }) => {
                assert_eq!((req.as_str(), room.as_str()), ("1", "r1"));
                assert_eq!(since, Some(4));
                assert_eq!(referrer.as_deref(), Some("u9"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_messages_keep_their_req() {
        for (frame, want_req) in [
            (r#"{"type":"nope","req":"a"}"#, Some("a")),
            (
                r#"{"type":"add_to_cart","req":"b","room":"r","sku":"s","qty":"2"}"#,
                Some("b"),
            ),
            (
                r#"{"type":"add_to_cart","req":"c","room":"r","sku":"s","qty":0}"#,
                Some("c"),
            ),
            (r#"{"type":"join","req":"d","room":"bad room"}"#, Some("d")),
            (r#"{"req":"e"}"#, Some("e")),
            (r#"{"type":"join","req":5,"room":"r"}"#, None),
            ("not json", None),
            ("[1,2]", None),
        ] {
            match json(frame) {
                Decoded::Invalid { req, error } => {
                    assert_eq!(req.as_deref(), want_req, "{frame}");
                    assert_eq!(error.code, ErrorCode::BadRequest);
                }
                other => panic!("{frame}: {other:?}"),
            }
        }
    }

    /// Valid frames of every client message type.
    const VALID: &[&str] = &[
        r#"{"type":"join","req":"1","room":"r1","since":4,"ref":"u9"}"#,
        r#"{"type":"join","req":"1","room":"r1"}"#,
        r#"{"type":"leave","req":"2","room":"r1"}"#,
        r#"{"type":"add_to_cart","req":"3","room":"r1","sku":"s-1","qty":2}"#,
        r#"{"type":"release","req":"4","reservation":"r7-12"}"#,
        r#"{"type":"checkout","req":"5","reservations":["r7-12","r7-13"]}"#,
        r#"{"type":"comment","req":"6","room":"r1","text":"hi \u597d\n"}"#,
        r#"{"type":"comment","room":"r1","text":"no req"}"#,
        r#"{"type":"like","room":"r1","count":3}"#,
        r#"{"type":"ping","req":null}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"open_room","req":"7","room":"r2","title":"T"}"#,
        r#"{"type":"close_room","req":"8","room":"r2"}"#,
        r#"{"type":"upsert_product","req":"9","room":"r2","sku":"s","title":"T","price_cents":100,"stock":5,"limit_per_user":1,"ttl_s":60}"#,
        r#"{"type":"restock","req":"10","room":"r2","sku":"s","delta":-3}"#,
        r#"{"type":"pin","req":"11","room":"r2","sku":"s"}"#,
        r#"{"type":"unpin","req":"12","room":"r2"}"#,
        " \n\t{\"req\":\"13\",\"type\":\"ping\",\"extra\":[1,{\"a\":2}]} \r\n",
    ];

    #[test]
    fn the_direct_json_decoder_answers_as_the_general_one() {
        let mut frames: Vec<String> = VALID.iter().map(|f| f.to_string()).collect();
        frames.extend(
            [
                r#"["ping","p1"]"#,
                r#"["add_to_cart","3","r1","s",1]"#,
                r#"{"type":"ping","req":"a","req":"b"}"#,
                r#"{"type":"ping","type":"like","room":"r","count":1}"#,
                r#"{"type":"add_to_cart","req":"3","room":"r1","sku":"s","qty":1,"qty":2}"#,
                r#"{"type":"ping","req":5}"#,
                r#"{"type":"ping","req":"bad req"}"#,
                r#"{"type":"ping","req":""}"#,
                r#"{"type":"add_to_cart","req":"3","room":"r1","sku":"s","qty":1.0}"#,
                r#"{"type":"add_to_cart","req":"3","room":"r1","sku":"s","qty":100}"#,
                r#"{"type":"add_to_cart","req":"3","room":"r1","sku":"s","qty":-1}"#,
                r#"{"type":"add_to_cart","req":"3","room":"r1","sku":"s","qty":4294967296}"#,
                r#"{"type":"like","room":"r","count":1}garbage"#,
                r#"{"type":"like","room":"r","count":1} {}"#,
                r#"{"type":"Ping"}"#,
                r#"{"type":null}"#,
                r#"{}"#,
                "",
                "   ",
                "\u{c}{\"type\":\"ping\"}",
            ]
            .map(str::to_string),
        );
        // Every valid frame with one byte taken out, and with one byte replaced by each of
        // a few that matter to JSON: thousands of near misses.
        for f in VALID {
            let b = f.as_bytes();
            for i in 0..b.len() {
                let mut cut = b.to_vec();
                cut.remove(i);
                frames.push(String::from_utf8_lossy(&cut).into_owned());
                for c in [b'"', b'{', b'}', b',', b':', b'1', b'x', b' ', b'-', b'['] {
                    let mut swapped = b.to_vec();
                    swapped[i] = c;
                    frames.push(String::from_utf8_lossy(&swapped).into_owned());
                }
            }
        }
        let mut direct = 0;
        for f in &frames {
            let general = format!("{:?}", decode_via_value(Encoding::Json, f.as_bytes()));
            if let Some(d) = decode_json_direct(f.as_bytes()) {
                direct += 1;
                assert_eq!(format!("{d:?}"), general, "{f}");
            }
            assert_eq!(format!("{:?}", json(f)), general, "{f}");
        }
        // The valid frames take the direct path (and so do some near misses).
        assert!(direct > VALID.len(), "{direct} of {}", frames.len());
        for f in VALID {
            assert!(
                matches!(decode_json_direct(f.as_bytes()), Some(Decoded::Msg(_))),
                "{f}"
            );
        }
    }

    #[test]
    fn comment_length_counts_characters() {
        let ok = format!(
            r#"{{"type":"comment","room":"r","text":"{}"}}"#,
            "好".repeat(280)
        );
        assert!(matches!(json(&ok), Decoded::Msg(_)));
        let long = format!(
            r#"{{"type":"comment","room":"r","text":"{}"}}"#,
            "a".repeat(281)
        );
        assert!(matches!(json(&long), Decoded::Invalid { .. }));
    }

    #[test]
    fn msgpack_maps_decode_like_json() {
        #[derive(Serialize)]
        struct Ping<'a> {
            r#type: &'a str,
            req: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Ping {
            r#type: "ping",
            req: "p1",
        })
        .expect("encode");
        match decode_client(Encoding::MsgPack, &bytes) {
            Decoded::Msg(ClientMsg::Ping { req }) => assert_eq!(req.as_deref(), Some("p1")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_client(Encoding::MsgPack, &[0xc1]),
            Decoded::Invalid { req: None, .. }
        ));
    }

    #[test]
    fn server_messages_have_the_contract_shape() {
        let v: serde_json::Value = serde_json::from_str(
            ServerMsg::RoomState {
                req: Some("1".into()),
                state: RoomState {
                    room: "r".into(),
                    seq: 3,
                    status: RoomStatus::Live,
                    title: "t".into(),
                    pinned: None,
                    products: vec![],
                    viewers: 2,
                    likes: 0,
                },
            }
            .encode(Encoding::Json)
            .to_text()
            .expect("text"),
        )
        .expect("json");
        assert_eq!(v["type"], "room_state");
        assert_eq!(v["req"], "1");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["status"], "live");
        assert!(v["pinned"].is_null());
        let pong = ServerMsg::Pong { req: None }.encode(Encoding::Json);
        assert_eq!(pong.to_text().expect("text"), r#"{"type":"pong"}"#);
        let err = ServerMsg::error(
            Some("x".into()),
            ProtoError::new(ErrorCode::SoldOut, "gone"),
        )
        .encode(Encoding::Json);
        assert_eq!(
            err.to_text().expect("text"),
            r#"{"type":"error","req":"x","code":"sold_out","message":"gone"}"#
        );
    }

    #[test]
    fn a_broadcast_is_encoded_once_and_shared() {
        let b = Broadcast::new(ServerMsg::Unpinned {
            room: "r".into(),
            seq: 1,
        });
        let (Message::Text(a), Message::Text(c)) =
            (b.frame(Encoding::Json), b.frame(Encoding::Json))
        else {
            panic!("text frames expected");
        };
        assert_eq!(a.as_str().as_ptr(), c.as_str().as_ptr(), "same buffer");
        assert!(matches!(b.frame(Encoding::MsgPack), Message::Binary(_)));
    }
}
