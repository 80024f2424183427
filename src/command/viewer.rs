//! Viewer commands: `join`, `leave`, `comment`, `like`. They only touch the room hub; none
//! of them writes to Redis on the request path.

use std::sync::Arc;

use super::{find_room, Reply, Session};
use crate::{
    app::App,
    protocol::{ErrorCode, ProtoError, ServerMsg},
};

pub fn join(
    app: &Arc<App>,
    s: &mut Session,
    req: String,
    room: String,
    since: Option<u64>,
    referrer: Option<String>,
) -> Reply {
    let r = find_room(app, &room)?;
    let max = app.cfg.limits.max_rooms_per_connection;
    if !s.rooms.contains_key(room.as_str()) && s.rooms.len() >= max {
        return Err(ProtoError::new(
            ErrorCode::Conflict,
            format!("a connection may be in at most {max} rooms; leave one first"),
        ));
    }
    // The room queues the reply (room_state, or joined + missed events) itself, so that it
    // comes before any later broadcast.
    r.join(s.outbox.clone(), req, since)?;
    // The session's own copy of the room id (not a clone of the room's `Arc`): every
    // reservation it makes carries it, and a reference count shared by all the room's
    // connections would bounce between the cores on every add_to_cart of a rush.
    s.rooms.insert(Arc::from(&*r.id), referrer.map(Arc::from));
    crate::recovery::note_viewer(app, &r.id, &s.user);
    Ok(None)
}

fn joined(s: &Session, room: &str) -> Result<(), ProtoError> {
    if s.rooms.contains_key(room) {
        Ok(())
    } else {
        Err(ProtoError::new(
            ErrorCode::Forbidden,
            format!("join room {room:?} first"),
        ))
    }
}

pub fn leave(app: &Arc<App>, s: &mut Session, req: String, room: String) -> Reply {
    if !s.rooms.contains_key(room.as_str()) {
        return Err(ProtoError::new(
            ErrorCode::NotFound,
            format!("not in room {room:?}"),
        ));
    }
    let r = find_room(app, &room)?;
    // Forget the room only once the room took the leave (its queue may be full).
    r.leave(s.outbox.conn, Some((s.outbox.clone(), req)))?;
    s.rooms.remove(room.as_str());
    Ok(None)
}

pub fn comment(
    app: &Arc<App>,
    s: &mut Session,
    req: Option<String>,
    room: String,
    text: String,
) -> Reply {
    joined(s, &room)?;
    let r = find_room(app, &room)?;
    // The room answers `ack` or `room_closed`.
    r.comment(s.user.clone(), text, req.map(|q| (s.outbox.clone(), q)))?;
    Ok(None)
}

pub fn like(
    app: &Arc<App>,
    s: &mut Session,
    req: Option<String>,
    room: String,
    count: u32,
) -> Reply {
    joined(s, &room)?;
    let r = find_room(app, &room)?;
    r.like(count);
    crate::recovery::note_likes(app, &r.id, count);
    Ok(req.map(|req| ServerMsg::Ack { req }))
}
