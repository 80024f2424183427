//! The server: one listener for HTTP and WebSocket, the router, the start-up gate and the
//! graceful drain.
//!
//! [`run`] takes its listener and its shutdown future so tests can drive it on port 0. It
//! serves from the moment it is called: until the gateway has started (Redis reached, state
//! restored) `/healthz` answers 200 and everything else 503, so a supervisor can tell a
//! starting process from a dead one. On shutdown it stops accepting, closes every WebSocket
//! with 1001, waits (bounded by the grace period) for connections and in-flight commits,
//! then returns.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
};

use axum::{
    extract::FromRequestParts,
    http::{request::Parts, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::net::TcpListener;

use crate::{app::App, connection, http, hub::close};

/// The router's state: the gateway, once it has started.
#[derive(Default)]
pub struct Gate {
    app: OnceLock<Arc<App>>,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// A gate already open on `app`.
    pub fn ready(app: Arc<App>) -> Arc<Gate> {
        let g = Gate::new();
        g.open(app);
        g
    }

    /// Lets requests through to `app`.
    pub fn open(&self, app: Arc<App>) {
        let _ = self.app.set(app);
    }

    pub fn app(&self) -> Option<Arc<App>> {
        self.app.get().cloned()
    }
}

/// Extracts the started gateway, or answers 503 while it is starting.
pub struct Ready(pub Arc<App>);

impl FromRequestParts<Arc<Gate>> for Ready {
    type Rejection = Response;

    async fn from_request_parts(_: &mut Parts, gate: &Arc<Gate>) -> Result<Self, Self::Rejection> {
        gate.app().map(Ready).ok_or_else(|| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "code": "unavailable",
                    "message": "starting: waiting for Redis and restoring state"
                })),
            )
                .into_response()
        })
    }
}

/// The routes of protocol.md on one router.
pub fn router(gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/ws", get(connection::upgrade))
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics_text))
        .route("/api/v1/rooms/{room}", get(http::room))
        .route("/api/v1/rooms/{room}/stats", get(http::room_stats))
        .with_state(gate)
}

/// Serves `listener` until `shutdown` resolves, then drains the gateway behind `gate` (if it
/// had started).
pub async fn run(
    listener: TcpListener,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, mut stop_http) = tokio::sync::watch::channel(false);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(gate.clone())).with_graceful_shutdown(async move {
        let _ = stop_http.wait_for(|s| *s).await;
    });
    let serving = tokio::spawn(async move { server.await });
    shutdown.await;
    let _ = stop_tx.send(true);
    if let Some(app) = gate.app() {
        drain(&app).await;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), serving).await;
    Ok(())
}

/// Closes every connection with 1001 and waits, within the grace period, for the
/// connections to finish and the committer to answer what is in flight.
async fn drain(app: &App) {
    tracing::info!("shutting down: closing connections with 1001");
    let grace = app.cfg.limits.shutdown_grace;
    let closed = app.hub.close_all(close::GOING_AWAY);
    tracing::info!(connections = closed, "asked every connection to close");
    app.tracker.close();
    let drained = tokio::time::timeout(grace, async {
        app.tracker.wait().await;
        let _ = app.committer.flush().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?grace, "grace period over with work still in flight");
    }
}
