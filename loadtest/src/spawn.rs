//! `--spawn`: the harness starts its own real parts, so a run needs nothing else: a
//! `redis-server` on a free loopback port (no persistence, its own temp dir) and the
//! `livegate` binary on another free port with a generated secret, its own key prefix and a
//! temp SQLite order store; it waits for `/healthz` and `/readyz`, and on drop terminates both
//! (SIGTERM, then SIGKILL after a grace period). The temp directory keeps the logs. Either
//! child can be pinned to a CPU list (`taskset -c`, which execs the program under the same
//! pid), so benchmarks can keep the harness, the gateway and Redis off each other's cores,
//! and redis-server can be held to a share of one CPU (a cgroup CPU quota, root only), so a
//! benchmark can measure the shape where Redis, not the gateway, is the bottleneck.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::process::{Child, Command};

/// A free loopback port (bound then released; good enough for a single-user machine).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A unique-enough token for names and secrets (no RNG dependency needed).
pub fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

pub fn temp_dir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("livegate-loadtest-{tag}-{}", nonce()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The workspace root (where `target/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `--gateway-bin`, else target/release/livegate, else target/debug/livegate.
pub fn gateway_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let root = workspace_root();
    for p in ["target/release/livegate", "target/debug/livegate"] {
        let p = root.join(p);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("no gateway binary: build it (cargo build -p livegate --bin livegate) or pass --gateway-bin")
}

/// A command for `program`, run under `taskset -c <cpus>` when `cpus` is given (taskset
/// execs the program, so the child's pid is the program's).
fn command(program: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(list) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(list).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

async fn stop(child: &mut Child, grace: Duration) {
    terminate(child);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// A cgroup holding a process to `quota` of one CPU (cgroup v2's `cpu.max`, or v1's CFS
/// quota where the v1 `cpu` controller is mounted); removed on drop (once the process has
/// exited: a cgroup with members cannot be removed, and that error is ignored).
pub struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    const PERIOD_US: u64 = 100_000;

    /// Moves `pid` into a new cgroup limited to `quota` CPUs (e.g. 0.25).
    pub fn apply(pid: u32, quota: f64) -> Result<CpuQuota> {
        if !(0.01..=64.0).contains(&quota) {
            bail!("--redis-cpu-quota must be between 0.01 and 64 (CPUs)");
        }
        let quota_us = (quota * Self::PERIOD_US as f64).round() as u64;
        let name = format!("livegate-loadtest-redis-{}", nonce());
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_cpu = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        let dir = if v2_cpu {
            let dir = v2.join(name);
            std::fs::create_dir(&dir)?;
            std::fs::write(
                dir.join("cpu.max"),
                format!("{quota_us} {}", Self::PERIOD_US),
            )?;
            dir
        } else {
            let dir = v2.join("cpu").join(name);
            std::fs::create_dir(&dir).with_context(|| {
                format!(
                    "creating {} (no cgroup v2 cpu controller; v1 needs root)",
                    dir.display()
                )
            })?;
            std::fs::write(dir.join("cpu.cfs_period_us"), Self::PERIOD_US.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
            dir
        };
        let q = CpuQuota { dir };
        std::fs::write(q.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", q.dir.display()))?;
        Ok(q)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A redis-server owned by the harness.
pub struct Redis {
    child: Child,
    pub url: String,
    pub pid: u32,
    /// Declared after the child, so it drops after it; `stop` waits for the exit first, so
    /// the cgroup is empty when it is removed.
    quota: Option<CpuQuota>,
}

impl Redis {
    /// Starts redis-server in `dir`, pinned to `cpus` (a `taskset -c` list) and held to
    /// `quota` CPUs when given.
    pub async fn start(dir: &Path, cpus: Option<&str>, quota: Option<f64>) -> Result<Self> {
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("redis.log"))?;
        let child = command(Path::new("redis-server"), cpus)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (is it installed? is taskset, with --redis-cpus?)")?;
        let pid = child.id().context("redis-server has no pid")?;
        let quota = quota.map(|q| CpuQuota::apply(pid, q)).transpose()?;
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(url.as_str()) {
                if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING on {url}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            url,
            pid,
            quota,
        })
    }

    pub async fn stop(mut self) {
        stop(&mut self.child, Duration::from_secs(3)).await;
        drop(self.quota.take());
    }
}

/// A livegate gateway owned by the harness.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub secret: String,
    pub key_prefix: String,
    pub store_path: PathBuf,
    pub pid: u32,
}

impl Gateway {
    /// Starts `bin serve` against `redis_url` with `extra_env`, pinned to `cpus` (a
    /// `taskset -c` list) when given.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        redis_url: &str,
        extra_env: &[(String, String)],
        cpus: Option<&str>,
    ) -> Result<Self> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let secret = format!("lt-{}-{}", nonce(), nonce());
        let key_prefix = format!("lt{}", &nonce()[..8]);
        let store_path = dir.join("orders.db");
        let log_path = dir.join("gateway.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = command(bin, cpus);
        cmd.arg("serve")
            .env("LIVEGATE_LISTEN", addr.to_string())
            .env("LIVEGATE_REDIS_URL", redis_url)
            .env("LIVEGATE_JWT_SECRET", &secret)
            .env(
                "LIVEGATE_ORDER_STORE",
                format!("sqlite://{}", store_path.display()),
            )
            .env("LIVEGATE_KEY_PREFIX", &key_prefix)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("gateway has no pid")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "gateway exited during start-up ({status}); log tail:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let healthy = matches!(
                crate::net::http_get(addr, "/healthz", None).await,
                Ok((200, _))
            );
            let ready = matches!(
                crate::net::http_get(addr, "/readyz", None).await,
                Ok((200, _))
            );
            if healthy && ready {
                break;
            }
            if Instant::now() > deadline {
                stop(&mut child, Duration::from_secs(1)).await;
                bail!(
                    "gateway not healthy+ready within 30 s (log: {})",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            child,
            addr,
            secret,
            key_prefix,
            store_path,
            pid,
        })
    }

    /// SIGTERM, then SIGKILL after 10 s; returns whether it exited on its own.
    pub async fn stop(mut self) -> Stopped {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Stopped::AlreadyExited(st.to_string());
        }
        terminate(&mut self.child);
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(st)) if st.success() => Stopped::Clean,
            Ok(Ok(st)) => Stopped::Unclean(st.to_string()),
            _ => {
                let _ = self.child.kill().await;
                Stopped::Unclean("still running 10 s after SIGTERM; killed".into())
            }
        }
    }
}

/// How the spawned gateway ended.
pub enum Stopped {
    /// Exited 0 after SIGTERM.
    Clean,
    /// Exited non-zero after SIGTERM, or had to be killed.
    Unclean(String),
    /// Was already gone before the harness asked it to stop (crash, or --kill-after-ms).
    AlreadyExited(String),
}

/// Whether a binary contains `needle` (a cheap way to tell if a gateway build knows an
/// environment variable).
pub fn binary_mentions(bin: &Path, needle: &str) -> bool {
    std::fs::read(bin)
        .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}
