//! `livegate-loadtest`: a load-test harness that speaks livegate's wire protocol like real
//! viewer apps and anchor consoles. This file is only the CLI: it parses flags, sets up the
//! run context (an external gateway, or `--spawn`ed Redis + gateway), runs one scenario,
//! prints and writes the report, and exits non-zero when an invariant broke.

mod client;
mod ctx;
mod nats;
mod net;
mod report;
mod scenarios;
mod spawn;
mod tokens;
mod verify;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ctx::{Common, Ctx};
use report::Report;
use scenarios::{checkout, fanout, idle, probe, rush, rush_sustained, soak};

#[derive(Parser, Debug)]
#[command(version, about = "Load-test harness for livegate (loopback only)")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Pin/unpin broadcast delivery to N viewers in R rooms (optionally vs NATS).
    Fanout(fanout::Args),
    /// N viewers press add_to_cart at once on S units (optionally vs the Lua baseline).
    Rush(rush::Args),
    /// Reserve then checkout; orders per second end to end; every order stored once.
    Checkout(checkout::Args),
    /// Viewers joining, leaving, commenting and liking; server RSS over time.
    Soak(soak::Args),
    /// N idle connections; server memory per connection.
    Idle(idle::Args),
    /// Protocol conformance checks against protocol.md (one connection at a time).
    Probe(probe::Args),
}

/// Connections a run opens at once, from the same defaults the scenario uses: checked against
/// the connection cap and RLIMIT_NOFILE, and used to pick the number of source addresses.
fn conns(s: &Scenario, smoke: bool) -> usize {
    match s {
        Scenario::Fanout(a) => fanout::connections(a, smoke),
        Scenario::Rush(a) => rush::sizes(a, smoke).0 + 1,
        Scenario::Checkout(a) => checkout::buyers(a, smoke) + 1,
        Scenario::Soak(a) => soak::sizes(a, smoke).0 + 1,
        Scenario::Idle(a) => idle::connections(a, smoke) + 1,
        Scenario::Probe(_) => 8,
    }
}

async fn run(cli: Cli) -> Result<bool> {
    let mut common = cli.common;
    if common.smoke && !common.spawn && common.secret.is_none() {
        common.spawn = true;
    }
    let n = conns(&cli.scenario, common.smoke);
    let (json_path, plot_path) = (common.json.clone(), common.plot.clone());
    let mut report = Report::new(match &cli.scenario {
        Scenario::Fanout(_) => "fanout",
        Scenario::Rush(_) => "rush",
        Scenario::Checkout(_) => "checkout",
        Scenario::Soak(_) => "soak",
        Scenario::Idle(_) => "idle",
        Scenario::Probe(_) => "probe",
    });
    if let Scenario::Rush(a) = &cli.scenario {
        if a.sustain_secs.is_some() {
            report.row("load average at start", loadavg());
            rush_sustained::run_all(&common, a, n, &mut report).await?;
            report.row("load average at end", loadavg());
            return report.finish(json_path.as_deref(), plot_path.as_deref());
        }
        if a.compare_lua {
            anyhow::ensure!(
                common.spawn,
                "--compare-lua needs --spawn (it starts the gateway twice)"
            );
            report.row("load average at start", loadavg());
            let mut a = a.clone();
            a.target = rush::Target::Gateway;
            let (ctx, sp) = Ctx::setup(&common, n, &[]).await?;
            let core = rush::run(&ctx, &common, &a, "core", &mut report).await;
            stop(sp, &mut report, core.is_ok()).await;
            let core = core?;
            let (ctx, sp) = Ctx::setup(&common, n, &rush::Target::Lua.env()).await?;
            if !spawn::binary_mentions(
                &spawn::gateway_bin(common.gateway_bin.as_deref())?,
                "LIVEGATE_RESERVE_MODE",
            ) {
                report.note("the gateway binary does not mention LIVEGATE_RESERVE_MODE: the `lua` run probably used the normal path");
            }
            a.target = rush::Target::Lua;
            let lua = rush::run(&ctx, &common, &a, "lua", &mut report).await;
            stop(sp, &mut report, lua.is_ok()).await;
            let lua = lua?;
            let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
            report.row(
                "ratio core/lua reserved/s",
                ratio(core.reserved_per_sec, lua.reserved_per_sec),
            );
            report.row(
                "ratio core/lua replies/s",
                ratio(core.replies_per_sec, lua.replies_per_sec),
            );
            report.row(
                "ratio core/lua p50",
                ratio(core.p50_us as f64, lua.p50_us as f64),
            );
            report.row(
                "ratio core/lua p99",
                ratio(core.p99_us as f64, lua.p99_us as f64),
            );
            report.row("load average at end", loadavg());
            return report.finish(json_path.as_deref(), plot_path.as_deref());
        }
    }
    report.row("load average at start", loadavg());
    let env = match &cli.scenario {
        Scenario::Rush(a) => a.target.env(),
        _ => vec![],
    };
    let (ctx, sp) = Ctx::setup(&common, n, &env).await?;
    let result = match &cli.scenario {
        Scenario::Fanout(a) => fanout::run(&ctx, &common, a, &mut report).await,
        Scenario::Rush(a) => {
            let label = if a.target == rush::Target::Lua {
                "lua"
            } else {
                "core"
            };
            rush::run(&ctx, &common, a, label, &mut report)
                .await
                .map(|_| ())
        }
        Scenario::Checkout(a) => checkout::run(&ctx, &common, a, &mut report).await,
        Scenario::Soak(a) => soak::run(&ctx, &common, a, &mut report).await,
        Scenario::Idle(a) => idle::run(&ctx, &common, a, &mut report).await,
        Scenario::Probe(a) => probe::run(&ctx, &common, a, &mut report).await,
    };
    stop(sp, &mut report, result.is_ok()).await;
    result?;
    report.row("load average at end", loadavg());
    report.finish(json_path.as_deref(), plot_path.as_deref())
}

/// The 1-minute load average: the machine is shared, so every result says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// Stops what --spawn started. The temp dir (logs, Redis dir, SQLite store) is removed after
/// a clean run and kept, with a note, when anything went wrong.
async fn stop(sp: Option<ctx::Spawned>, report: &mut Report, ran_ok: bool) {
    if let Some(sp) = sp {
        let dir = sp.dir.clone();
        let clean = match sp.stop().await {
            spawn::Stopped::Clean => true,
            spawn::Stopped::Unclean(how) => {
                report.note(format!(
                    "the spawned gateway did not exit 0 within 10 s of SIGTERM: {how}"
                ));
                false
            }
            spawn::Stopped::AlreadyExited(how) => {
                report.note(format!(
                    "the spawned gateway had exited before the end of the run: {how}"
                ));
                false
            }
        };
        if clean && ran_ok && report.failures.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            report.note(format!("gateway and Redis logs kept in {}", dir.display()));
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Ctrl-C drops the run: every spawned child (redis-server, gateway, nats-server) is
    // killed on drop, so nothing is left behind.
    let outcome = tokio::select! {
        r = run(cli) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
