//! The HTTP API on the gateway's listener: health, readiness, Prometheus metrics, and the
//! room endpoints (`/api/v1/rooms/{room}` and its anchor-only `/stats`).
//!
//! Handlers only read: they must not change rooms, stock or orders.

use std::sync::atomic::Ordering;

use axum::{
    extract::Path,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use redis::AsyncCommands;

use crate::{auth::token_from_request, config::valid_id, server::Ready};

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": code, "message": message.into() })),
    )
        .into_response()
}

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: 200 when Redis answers, else 503.
pub async fn readyz(Ready(app): Ready) -> Response {
    if app.redis_ready().await {
        metrics::gauge!(crate::metrics::REDIS_UP).set(1.0);
        (StatusCode::OK, "ready\n").into_response()
    } else {
        metrics::gauge!(crate::metrics::REDIS_UP).set(0.0);
        (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n").into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics_text() -> Response {
    match crate::metrics::install() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no metrics recorder installed",
        ),
    }
}

/// `GET /api/v1/rooms/{room}`: the `room_state` fields.
pub async fn room(Ready(app): Ready, Path(room): Path<String>) -> Response {
    if !valid_id(&room) {
        return error(StatusCode::BAD_REQUEST, "bad_request", "invalid room id");
    }
    let Some(r) = app.hub.room(&room) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no room {room:?}"),
        );
    };
    match r.state().await {
        Ok((state, _)) => Json(state).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.message),
    }
}

/// `GET /api/v1/rooms/{room}/stats` (anchor of the room, or admin): the room's results.
pub async fn room_stats(
    Ready(app): Ready,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Response {
    let token = token_from_request(
        None,
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let claims = match token.map(|t| app.auth.verify(&t)) {
        Some(Ok(c)) => c,
        Some(Err(e)) => return error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
        None => {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authorization: Bearer <JWT> required",
            )
        }
    };
    if !valid_id(&room) {
        return error(StatusCode::BAD_REQUEST, "bad_request", "invalid room id");
    }
    if !claims.controls(&room) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the room's anchor or an admin may read its results",
        );
    }
    let Some(r) = app.hub.room(&room) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no room {room:?}"),
        );
    };
    let mut c = app.redis.clone();
    let distinct: u64 = match c.pfcount(app.keys.room_viewers(&room)).await {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
    };
    let totals = match app.order_store().await {
        Ok(store) => match store.room_totals(&room).await {
            Ok(t) => t,
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            }
        },
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
    };
    let gpm = if distinct == 0 {
        0
    } else {
        (totals.gmv_cents as i128 * 1000 / distinct as i128) as i64
    };
    Json(serde_json::json!({
        "viewers": r.counters.viewers.load(Ordering::Relaxed),
        "peak_viewers": r.counters.peak_viewers.load(Ordering::Relaxed),
        "distinct_viewers": distinct,
        "likes": r.counters.likes.load(Ordering::Relaxed),
        "orders": totals.orders,
        "units_sold": totals.units_sold,
        "gmv_cents": totals.gmv_cents,
        "gpm_cents": gpm,
    }))
    .into_response()
}
