//! The run context every scenario gets: where the gateway is (an external one from `--url`,
//! or one `--spawn` started together with its own Redis), how to dial it (encoding, source
//! addresses, reply timeout), how to mint tokens, where Redis and the order store are for the
//! after-run verification, the server pid for RSS sampling, and the connection ramp.

use crate::client::{self, Client, Dialer, Encoding, Handler, Reply};
use crate::net::{self, Sources, Target};
use crate::spawn::{self, Gateway, Redis};
use crate::tokens::Minter;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Flags shared by every scenario.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Gateway WebSocket URL (loopback only: 127.0.0.0/8, ::1, localhost).
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// JWT secret of the gateway (ignored with --spawn, which generates one).
    #[arg(
        long,
        global = true,
        env = "LIVEGATE_JWT_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// Redis of the gateway, for verification (loopback only; ignored with --spawn).
    #[arg(
        long,
        global = true,
        env = "LIVEGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Key prefix of the gateway (ignored with --spawn).
    #[arg(
        long,
        global = true,
        env = "LIVEGATE_KEY_PREFIX",
        default_value = "livegate"
    )]
    pub key_prefix: String,
    /// SQLite order store file of the gateway, for the checkout verification.
    #[arg(long, global = true)]
    pub order_db: Option<PathBuf>,
    /// Pid of the gateway, for RSS sampling (automatic with --spawn).
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Start a private redis-server and gateway on free loopback ports; stop them at the end.
    #[arg(long, global = true)]
    pub spawn: bool,
    /// Gateway binary for --spawn [default: target/release/livegate, else target/debug/livegate].
    #[arg(long, global = true)]
    pub gateway_bin: Option<PathBuf>,
    /// With --spawn: pin the gateway to these CPUs (a `taskset -c` list, e.g. 1 or 0-1).
    #[arg(long, global = true)]
    pub gateway_cpus: Option<String>,
    /// With --spawn: pin redis-server to these CPUs (a `taskset -c` list).
    #[arg(long, global = true)]
    pub redis_cpus: Option<String>,
    /// With --spawn: hold redis-server to this share of one CPU (e.g. 0.25) with a cgroup
    /// CPU quota (needs root, or a delegated cgroup v2), so Redis is the bottleneck, as it is
    /// when it has a core of its own and the gateway has several.
    #[arg(long, global = true)]
    pub redis_cpu_quota: Option<f64>,
    /// Wire encoding (subprotocol livegate.v1.json or livegate.v1.msgpack).
    #[arg(long, global = true, value_enum, default_value = "json")]
    pub encoding: Encoding,
    /// New connections per second while ramping up.
    #[arg(long, global = true, default_value_t = 2000)]
    pub ramp_per_sec: u32,
    /// Number of source addresses 127.0.0.1..127.0.0.N [default: 1 per 20,000 connections].
    #[arg(long, global = true)]
    pub source_addrs: Option<u8>,
    /// Measurement duration in seconds (max 600).
    #[arg(long, global = true)]
    pub duration: Option<u64>,
    /// Seconds to wait for a reply before counting it lost.
    #[arg(long, global = true, default_value_t = 10)]
    pub reply_timeout: u64,
    /// Write the results as JSON here.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Write a latency percentile plot (SVG) here.
    #[arg(long, global = true)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Small, fast run (< 1 min) that checks invariants; implies --spawn unless --url is given
    /// explicitly with --secret.
    #[arg(long, global = true)]
    pub smoke: bool,
}

/// What --spawn started.
pub struct Spawned {
    pub redis: Redis,
    pub gateway: Gateway,
    pub dir: PathBuf,
}

impl Spawned {
    pub async fn stop(self) -> spawn::Stopped {
        let clean = self.gateway.stop().await;
        self.redis.stop().await;
        clean
    }
}

pub struct Ctx {
    pub dialer: Dialer,
    pub minter: Minter,
    pub redis_url: String,
    pub key_prefix: String,
    pub server_pid: Option<u32>,
    /// Pid of the spawned redis-server (None for an external Redis).
    pub redis_pid: Option<u32>,
    pub order_db: Option<PathBuf>,
    /// Unique per run: prefixes room, SKU and user ids so runs never collide.
    pub run_id: String,
    pub ramp_per_sec: u32,
    pub quiet: bool,
    pub smoke: bool,
}

impl Ctx {
    /// Builds the context, starting Redis and the gateway when `--spawn` (with `extra_env`
    /// for the gateway, e.g. LIVEGATE_RESERVE_MODE=lua).
    pub async fn setup(
        c: &Common,
        conns: usize,
        extra_env: &[(String, String)],
    ) -> Result<(Ctx, Option<Spawned>)> {
        if conns > net::MAX_CONNECTIONS {
            bail!("at most {} connections per run", net::MAX_CONNECTIONS);
        }
        let nofile = net::raise_nofile();
        if (conns as u64) + 64 > nofile {
            bail!("{conns} connections need more open files than RLIMIT_NOFILE={nofile} allows (hard limit)");
        }
        let target = Target::parse(&c.url)?;
        let sources = Sources::for_connections(conns, c.source_addrs);
        if !c.spawn
            && (c.gateway_cpus.is_some() || c.redis_cpus.is_some() || c.redis_cpu_quota.is_some())
        {
            bail!("--gateway-cpus, --redis-cpus and --redis-cpu-quota need --spawn");
        }
        let (target, secret, redis_url, key_prefix, pid, redis_pid, order_db, spawned) = if c.spawn
        {
            let dir = spawn::temp_dir("run")?;
            let bin = spawn::gateway_bin(c.gateway_bin.as_deref())?;
            let redis = Redis::start(&dir, c.redis_cpus.as_deref(), c.redis_cpu_quota).await?;
            let gateway =
                match Gateway::start(&bin, &dir, &redis.url, extra_env, c.gateway_cpus.as_deref())
                    .await
                {
                    Ok(g) => g,
                    Err(e) => {
                        redis.stop().await;
                        return Err(e);
                    }
                };
            if !c.quiet {
                eprintln!(
                    "spawned {} on {} (pid {}), redis {}, logs in {}",
                    bin.display(),
                    gateway.addr,
                    gateway.pid,
                    redis.url,
                    dir.display()
                );
            }
            let target = Target::parse(&format!("ws://{}/ws", gateway.addr))?;
            (
                target,
                gateway.secret.clone(),
                redis.url.clone(),
                gateway.key_prefix.clone(),
                Some(gateway.pid),
                Some(redis.pid),
                Some(gateway.store_path.clone()),
                Some(Spawned {
                    redis,
                    gateway,
                    dir,
                }),
            )
        } else {
            net::check_redis_url(&c.redis_url)?;
            let secret = c
                .secret
                .clone()
                .context("--secret (or LIVEGATE_JWT_SECRET) is required without --spawn")?;
            (
                target,
                secret,
                c.redis_url.clone(),
                c.key_prefix.clone(),
                c.server_pid,
                None,
                c.order_db.clone(),
                None,
            )
        };
        Ok((
            Ctx {
                dialer: Dialer {
                    target,
                    sources,
                    encoding: c.encoding,
                    reply_timeout: Duration::from_secs(c.reply_timeout),
                },
                minter: Minter::new(&secret),
                redis_url,
                key_prefix,
                server_pid: pid,
                redis_pid,
                order_db,
                run_id: spawn::nonce()[..6].to_string(),
                ramp_per_sec: c.ramp_per_sec.max(1),
                quiet: c.quiet,
                smoke: c.smoke,
            },
            spawned,
        ))
    }

    pub fn progress(&self, len: u64, msg: &str) -> ProgressBar {
        let pb = ProgressBar::new(len);
        if self.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            pb.set_draw_target(ProgressDrawTarget::hidden());
        }
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{elapsed_precise}] {bar:40} {pos}/{len} ({per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_message(msg.to_string());
        pb
    }

    /// Runs `f(i)` for i in 0..n, starting at most `ramp_per_sec` per second and at most
    /// 256 at once; returns the successes in order and counts the failures (the first one is
    /// printed to stderr).
    pub async fn ramp<F, Fut, T>(&self, n: usize, label: &str, f: F) -> Connected<T>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let pb = self.progress(n as u64, label);
        let sem = Arc::new(tokio::sync::Semaphore::new(256));
        let period = Duration::from_secs_f64(1.0 / self.ramp_per_sec as f64);
        let mut tick = tokio::time::interval(period.max(Duration::from_micros(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            tick.tick().await;
            let permit = sem.clone().acquire_owned().await.expect("semaphore open");
            let fut = f(i);
            let pb = pb.clone();
            handles.push(tokio::spawn(async move {
                let r = fut.await;
                drop(permit);
                pb.inc(1);
                r
            }));
        }
        let mut out = Connected {
            ok: Vec::with_capacity(n),
            errors: 0,
            first_error: None,
        };
        for h in handles {
            match h
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("task failed: {e}")))
            {
                Ok(t) => out.ok.push(t),
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
        pb.finish_and_clear();
        if let Some(e) = &out.first_error {
            eprintln!("{label}: {} failed to connect/join; first: {e}", out.errors);
        }
        out
    }

    /// An anchor connection (user `anchor-<run id>`, allowed `rooms`), from source address 0.
    pub async fn anchor(&self, rooms: &[String]) -> Result<Arc<Client>> {
        let token = self
            .minter
            .anchor(&format!("anchor-{}", self.run_id), rooms)?;
        self.dialer.connect(0, &token, client::ignore()).await
    }

    /// Viewer `i`: connects as user `sub` with a fresh viewer token and, with `join`, joins
    /// that room (the reply must be `room_state`). Returns the client and the join reply; the
    /// future owns everything, as [`ramp`](Self::ramp) needs.
    pub fn viewer(
        &self,
        i: usize,
        sub: &str,
        join: Option<&str>,
        handler: Handler,
    ) -> impl Future<Output = Result<(Arc<Client>, Option<Reply>)>> + Send + 'static {
        let dialer = self.dialer.clone();
        let token = self.minter.viewer(sub);
        let join = join.map(str::to_string);
        async move {
            let c = dialer.connect(i, &token?, handler).await?;
            let joined = match join {
                Some(room) => Some(
                    c.expect(json!({"type": "join", "room": room}), "room_state")
                        .await?,
                ),
                None => None,
            };
            Ok((c, joined))
        }
    }

    /// The gateway's HTTP address (the same listener as the WebSocket).
    pub fn http(&self) -> SocketAddr {
        self.dialer.target.addr
    }

    pub fn redis_key(&self, suffix: &str) -> String {
        format!("{}:{}", self.key_prefix, suffix)
    }
}

/// What [`Ctx::ramp`] got: the successes in order, and how many failed.
pub struct Connected<T> {
    pub ok: Vec<T>,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// The duration to use: `--duration`, else the smoke or normal default; capped at 600 s.
pub fn duration(c: &Common, smoke_default: u64, default: u64) -> Result<Duration> {
    let d = c
        .duration
        .unwrap_or(if c.smoke { smoke_default } else { default });
    if d > net::MAX_DURATION_S {
        bail!("--duration is capped at {} s", net::MAX_DURATION_S);
    }
    Ok(Duration::from_secs(d))
}
