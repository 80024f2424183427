//! Metrics: the Prometheus recorder, the names and descriptions of every metric livegate
//! exports, and the wall clock in unix milliseconds.
//!
//! Metric names live here so that docs/operations.md and the code cannot drift apart; this
//! module must not hold any other state than the process-wide recorder.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_OPEN: &str = "livegate_connections_open";
pub const CONNECTIONS_TOTAL: &str = "livegate_connections_total";
pub const CONNECTIONS_REJECTED: &str = "livegate_connections_rejected_total";
pub const CONNECTIONS_CLOSED: &str = "livegate_connections_closed_total";
pub const AUTH_FAILURES: &str = "livegate_auth_failures_total";
pub const COMMANDS: &str = "livegate_commands_total";
pub const COMMAND_ERRORS: &str = "livegate_command_errors_total";
pub const RATE_LIMITED: &str = "livegate_rate_limited_total";
pub const CONN_INFLIGHT_FULL: &str = "livegate_conn_inflight_full_total";
pub const FRAMES_UNDECODABLE: &str = "livegate_frames_undecodable_total";
pub const OUTBOUND_DROPPED: &str = "livegate_outbound_overflow_total";
pub const MESSAGES_SENT: &str = "livegate_messages_sent_total";
pub const WRITE_BATCH: &str = "livegate_writer_batch_messages";
pub const ROOMS: &str = "livegate_rooms";
pub const ROOM_MEMBERS: &str = "livegate_room_members";
pub const BROADCASTS: &str = "livegate_broadcasts_total";
pub const FANOUT_SECONDS: &str = "livegate_fanout_seconds";
pub const ROOM_QUEUE_FULL: &str = "livegate_room_queue_full_total";
pub const COMMENTS_DROPPED: &str = "livegate_comments_dropped_total";
pub const RESUMES: &str = "livegate_resumes_total";
pub const COMMIT_BATCH: &str = "livegate_commit_batch_size";
pub const COMMIT_SECONDS: &str = "livegate_commit_seconds";
pub const COMMIT_FAILURES: &str = "livegate_commit_failures_total";
pub const COMMIT_QUEUE_FULL: &str = "livegate_commit_queue_full_total";
pub const RESERVATIONS: &str = "livegate_reservations_total";
pub const EXPIRED: &str = "livegate_reservations_expired_total";
pub const ORDERS_ACCEPTED: &str = "livegate_orders_accepted_total";
pub const CONFIRMATIONS_SENT: &str = "livegate_order_confirmations_sent_total";
pub const REDIS_UP: &str = "livegate_redis_up";
pub const REDIS_STALLED_REPLACED: &str = "livegate_redis_stalled_connections_replaced_total";
pub const UNKNOWN_SETTLED: &str = "livegate_unknown_outcomes_settled_total";
pub const INVENTORY_LOCK_WAITS: &str = "livegate_inventory_lock_waits_total";
pub const AUDIENCE_DROPPED: &str = "livegate_audience_writes_dropped_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are drained into their summaries.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once and returns its handle (`None` when
/// another recorder was installed first, for example by an embedding program).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().ok()?;
            describe();
            // Histogram samples wait in the recorder until upkeep drains them into their
            // summaries; without it they grow with every sample between two scrapes.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the metrics upkeep thread");
            }
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_gauge!(CONNECTIONS_OPEN, "Open WebSocket connections");
    describe_counter!(CONNECTIONS_TOTAL, "WebSocket connections accepted");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections refused after authentication, by reason (full, bad_subprotocol)"
    );
    describe_counter!(CONNECTIONS_CLOSED, "Connections closed, by close code");
    describe_counter!(AUTH_FAILURES, "Upgrades refused with 401, by reason");
    describe_counter!(COMMANDS, "Client commands handled, by type");
    describe_counter!(COMMAND_ERRORS, "Error replies sent, by code");
    describe_counter!(
        RATE_LIMITED,
        "Commands refused by the per-connection rate limit"
    );
    describe_counter!(
        CONN_INFLIGHT_FULL,
        "Times a connection reached LIVEGATE_CONN_INFLIGHT carts awaiting their durable write and stopped reading until one was answered"
    );
    describe_counter!(
        FRAMES_UNDECODABLE,
        "Client frames that could not be decoded"
    );
    describe_counter!(
        OUTBOUND_DROPPED,
        "Connections closed with 4001 because their outgoing queue was full"
    );
    describe_counter!(MESSAGES_SENT, "Messages written to client sockets");
    describe_histogram!(WRITE_BATCH, "Messages written per socket flush");
    describe_gauge!(ROOMS, "Rooms hosted by this gateway");
    describe_gauge!(ROOM_MEMBERS, "Room memberships on this gateway");
    describe_counter!(BROADCASTS, "Room broadcasts, by type");
    describe_histogram!(
        FANOUT_SECONDS,
        Unit::Seconds,
        "Time to queue one broadcast to every member"
    );
    describe_counter!(
        ROOM_QUEUE_FULL,
        "Commands refused because a room's queue was full"
    );
    describe_counter!(COMMENTS_DROPPED, "Comments dropped over the per-tick limit");
    describe_counter!(
        RESUMES,
        "Joins with `since`, by outcome (resumed, snapshot)"
    );
    describe_histogram!(COMMIT_BATCH, "Changes per group commit");
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Duration of one group commit round trip"
    );
    describe_counter!(
        COMMIT_FAILURES,
        "Group commits that failed (changes undone, `unavailable`)"
    );
    describe_counter!(
        COMMIT_QUEUE_FULL,
        "Changes refused because the commit queue was full"
    );
    describe_counter!(RESERVATIONS, "Reservations confirmed");
    describe_counter!(
        INVENTORY_LOCK_WAITS,
        "Times an inventory shard lock was found taken and its taker waited (updated by the expiry sweeper, every 200 ms)"
    );
    describe_counter!(EXPIRED, "Reservations expired");
    describe_counter!(ORDERS_ACCEPTED, "Orders accepted (durably recorded)");
    describe_counter!(
        CONFIRMATIONS_SENT,
        "order_confirmed messages queued to buyers"
    );
    describe_counter!(
        UNKNOWN_SETTLED,
        "Writes with an unknown outcome, settled once Redis answered (landed yes/no)"
    );
    describe_gauge!(REDIS_UP, "1 when the last Redis round trip succeeded");
    describe_counter!(
        REDIS_STALLED_REPLACED,
        "Committer connections to Redis given up after owing replies past LIVEGATE_REDIS_STALL_MS (fenced off with CLIENT KILL, then replaced)"
    );
    describe_counter!(
        AUDIENCE_DROPPED,
        "Audience figure writes dropped (queue full or Redis down)"
    );
}

/// Wall-clock time in unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
