//! The server: one listener for HTTP and WebSocket, the router, and the graceful drain.
//!
//! [`run`] takes its listener and its shutdown future so tests can drive it on port 0. On
//! shutdown it stops accepting, closes every WebSocket with 1001, waits (bounded by the
//! grace period) for connections and in-flight commits, then returns.

use std::{future::Future, sync::Arc};

use axum::{routing::get, Router};
use tokio::net::TcpListener;

use crate::{app::App, connection, http, hub::close};

/// The routes of protocol.md on one router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/ws", get(connection::upgrade))
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics_text))
        .route("/api/v1/rooms/{room}", get(http::room))
        .route("/api/v1/rooms/{room}/stats", get(http::room_stats))
        .with_state(app)
}

/// Serves `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_http = stop_rx.clone();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(app.clone())).with_graceful_shutdown(async move {
        let _ = stop_http.wait_for(|s| *s).await;
    });
    let drain_app = app.clone();
    let serving = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("shutting down: closing connections with 1001");
    let _ = stop_tx.send(true);
    let grace = drain_app.cfg.limits.shutdown_grace;
    let closed = drain_app.hub.close_all(close::GOING_AWAY);
    tracing::info!(connections = closed, "asked every connection to close");
    drain_app.tracker.close();
    let drained = tokio::time::timeout(grace, async {
        drain_app.tracker.wait().await;
        let _ = drain_app.committer.flush().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?grace, "grace period over with work still in flight");
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), serving).await;
    Ok(())
}
