//! The command line of the `livegate` binary: `serve`, `order-writer` and `token`. Parses
//! flags, reads the configuration from the environment, sets up logging and metrics, and
//! runs the chosen part until SIGTERM or SIGINT.
//!
//! It owns exit codes (64 for a bad configuration or usage). It must not implement
//! gateway behaviour itself.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{
    app::App,
    auth::{Authenticator, Role},
    config::{Config, ConfigErrors},
};

/// Exit code for a configuration or usage error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "livegate",
    version,
    about = "Real-time gateway for live-room commerce"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (with the order writer in-process unless --no-order-writer).
    Serve {
        /// Listen address (overrides LIVEGATE_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// Redis URL (overrides LIVEGATE_REDIS_URL).
        #[arg(long)]
        redis_url: Option<String>,
        /// Order store URL (overrides LIVEGATE_ORDER_STORE).
        #[arg(long)]
        order_store: Option<String>,
        /// Do not run the order writer in this process.
        #[arg(long)]
        no_order_writer: bool,
    },
    /// Run the order writer alone (run several for scale).
    OrderWriter {
        /// Serve /metrics and /healthz here (e.g. 127.0.0.1:9101); none by default.
        #[arg(long, env = "LIVEGATE_ORDER_WRITER_METRICS")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Redis URL (overrides LIVEGATE_REDIS_URL).
        #[arg(long)]
        redis_url: Option<String>,
        /// Order store URL (overrides LIVEGATE_ORDER_STORE).
        #[arg(long)]
        order_store: Option<String>,
    },
    /// Print a signed token for the configured secret.
    Token {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// viewer, anchor or admin.
        #[arg(long)]
        role: String,
        /// Rooms an anchor controls, comma separated.
        #[arg(long, value_delimiter = ',')]
        rooms: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

fn config_with(overrides: &[(&str, Option<String>)]) -> Result<Config, ConfigErrors> {
    Config::from_source(|key| {
        overrides
            .iter()
            .find(|(k, v)| *k == key && v.is_some())
            .and_then(|(_, v)| v.clone())
            .or_else(|| std::env::var(key).ok())
    })
}

fn fail_config(msg: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("livegate: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIVEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the command line; the return value is the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors are 64.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Token {
            sub,
            role,
            rooms,
            ttl,
        } => token(&sub, &role, rooms, ttl),
        Command::Serve {
            listen,
            redis_url,
            order_store,
            no_order_writer,
        } => {
            let cfg = match config_with(&[
                ("LIVEGATE_LISTEN", listen),
                ("LIVEGATE_REDIS_URL", redis_url),
                ("LIVEGATE_ORDER_STORE", order_store),
            ]) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            if cfg.jwt_secret.is_none() {
                return fail_config(
                    &"LIVEGATE_JWT_SECRET is not set: `serve` needs the HS256 secret that signs client tokens (e.g. export LIVEGATE_JWT_SECRET=$(head -c 32 /dev/urandom | base64))",
                );
            }
            run_async(serve(cfg, !no_order_writer))
        }
        Command::OrderWriter {
            metrics_listen,
            redis_url,
            order_store,
        } => {
            let cfg = match config_with(&[
                ("LIVEGATE_REDIS_URL", redis_url),
                ("LIVEGATE_ORDER_STORE", order_store),
            ]) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            run_async(async move {
                init_logging();
                crate::metrics::install();
                if let Some(addr) = metrics_listen {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => {
                            let router = axum::Router::new()
                                .route("/metrics", axum::routing::get(crate::http::metrics_text))
                                .route("/healthz", axum::routing::get(crate::http::healthz));
                            tokio::spawn(async move { axum::serve(l, router).await });
                        }
                        Err(e) => {
                            eprintln!("livegate: cannot listen on {addr}: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                match crate::order_writer::run(&cfg, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "order writer failed");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn run_async(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("livegate: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(sub: &str, role: &str, rooms: Vec<String>, ttl: u64) -> ExitCode {
    let cfg = match config_with(&[]) {
        Ok(c) => c,
        Err(e) => return fail_config(&e),
    };
    let Some(secret) = cfg.jwt_secret else {
        return fail_config(&"LIVEGATE_JWT_SECRET is not set: `token` signs with it");
    };
    let Some(role) = Role::parse(role) else {
        return fail_config(&format!(
            "--role {role:?}: expected viewer, anchor or admin"
        ));
    };
    if sub.is_empty() || sub.len() > crate::auth::MAX_SUB_LEN {
        return fail_config(&"--sub must be 1..128 characters");
    }
    if let Some(bad) = rooms.iter().find(|r| !crate::config::valid_id(r)) {
        return fail_config(&format!("--rooms: {bad:?} is not a valid room id"));
    }
    match Authenticator::new(&secret).issue(sub, role, rooms, ttl) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("livegate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: Config, with_order_writer: bool) -> ExitCode {
    init_logging();
    crate::metrics::install();
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("livegate: cannot listen on {}: {e}", cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    // One shutdown signal, watched by the server, the start-up loop and the order writer.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Serve at once: /healthz answers while we wait for Redis, the rest says 503.
    let gate = crate::server::Gate::new();
    let server = tokio::spawn(crate::server::run(
        listener,
        gate.clone(),
        stopped(stop_rx.clone()),
    ));
    let app = loop {
        match App::start(cfg.clone()).await {
            Ok(app) => break app,
            Err(e @ crate::app::StartError::Config(_)) => return fail_config(&e),
            Err(e) => {
                tracing::error!(error = %e, "cannot start; retrying in 2 s (is Redis at LIVEGATE_REDIS_URL up?)");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {},
                    _ = stopped(stop_rx.clone()) => {
                        let _ = server.await;
                        return ExitCode::SUCCESS;
                    }
                }
            }
        }
    };
    gate.open(app.clone());
    let writer = with_order_writer.then(|| {
        let cfg = cfg.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            // The gateway keeps serving if its order writer fails (orders stay in the
            // stream); the writer is started again until shutdown.
            loop {
                let r = crate::order_writer::run(&cfg, stopped(stop.clone())).await;
                match r {
                    Ok(()) => return,
                    Err(e) => tracing::error!(error = %e, "order writer failed; restarting in 5 s"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {},
                    _ = stopped(stop.clone()) => return,
                }
            }
        })
    });
    tracing::info!(listen = %cfg.listen, order_writer = with_order_writer, epoch = app.epoch, reserve_mode = ?cfg.reserve_mode, "livegate serving");
    stopped(stop_rx.clone()).await;
    // The server drains within the grace period; the order writer finishes its batch
    // meanwhile. Both share one budget.
    let deadline = tokio::time::Instant::now() + cfg.limits.shutdown_grace;
    let result = server.await;
    if let Some(w) = writer {
        let _ = tokio::time::timeout_at(deadline, w).await;
    }
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "server task failed");
            ExitCode::FAILURE
        }
    }
}
