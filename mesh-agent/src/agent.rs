//! `mesh-agent run`: start-up, the signal and reload loop, and orderly shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::capture::Capture;
use crate::config::Config;
use crate::endpoints::{self, Readiness};
use crate::metrics::Metrics;
use crate::preflight;
use crate::tasks::TaskManager;

pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let host = preflight::check_host()?;
    let mut config = Config::load(&config_path)?;
    info!(config = %config_path.display(), cgroup2 = %host.cgroup2_root.display(), tasks = config.tasks.len(), "starting");

    let capture = Arc::new(Capture::load(kernel_log_level())?);
    spawn_kernel_logger(&capture);
    capture.apply_rules(&config.capture, config.agent.outbound_port)?;

    let metrics = Arc::new(Metrics::new(capture.clone()));
    let readiness = Arc::new(Readiness::default());
    endpoints::start(
        config.agent.metrics_addr,
        config.agent.readiness_addr,
        metrics.clone(),
        readiness.clone(),
    )
    .await?;

    let mut tasks = TaskManager::new(
        host.cgroup2_root,
        capture.clone(),
        metrics.clone(),
        config.agent.clone(),
    );
    // At start-up a task that cannot be set up is a configuration error: refuse to run rather
    // than run half-configured. (On reload the other tasks keep running; see `reload`.)
    let failures = tasks.reconcile(&config.tasks).await;
    if let Some((_, e)) = failures.into_iter().next() {
        tasks.shutdown(config.agent.drain_timeout).await;
        return Err(e);
    }
    readiness.set(true);
    info!(tasks = config.tasks.len(), "ready");

    let mut sigterm = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let mut watch = FileWatch::new(&config_path, config.agent.watch_interval);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { info!("SIGINT: draining"); break; }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading configuration");
                reload(&config_path, &mut config, &mut tasks, &capture, &metrics).await;
                watch.mark_seen();
            }
            true = watch.changed() => {
                info!("configuration file changed: reloading");
                reload(&config_path, &mut config, &mut tasks, &capture, &metrics).await;
            }
        }
    }
    readiness.set(false);
    tasks.shutdown(config.agent.drain_timeout).await;
    // Every link was detached above; the programs and maps go with the process.
    info!("stopped");
    Ok(())
}

/// Applies a changed configuration. A file that does not parse or validate changes nothing.
async fn reload(
    path: &Path,
    running: &mut Config,
    tasks: &mut TaskManager,
    capture: &Capture,
    metrics: &Metrics,
) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("configuration reload failed, keeping the running configuration: {e:#}");
            metrics.reload(false);
            return;
        }
    };
    if new.agent != running.agent {
        warn!("changes to [agent] settings take effect at the next restart");
    }
    if let Err(e) = capture.apply_rules(&new.capture, running.agent.outbound_port) {
        error!("configuration reload failed, capture rules unchanged: {e:#}");
        metrics.reload(false);
        return;
    }
    let failures = tasks.reconcile(&new.tasks).await;
    metrics.reload(failures.is_empty());
    running.capture = new.capture;
    running.tasks = new.tasks;
    info!(failed_tasks = failures.len(), "configuration reloaded");
}

/// Polls the config file's modification time and size; cheap, and works for files replaced by
/// rename (how ECS, SSM agents and editors update files) without inotify bookkeeping.
struct FileWatch {
    path: PathBuf,
    interval: Option<tokio::time::Interval>,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    fn new(path: &Path, every: std::time::Duration) -> FileWatch {
        let interval = (!every.is_zero()).then(|| {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        FileWatch {
            path: path.to_owned(),
            interval,
            seen: stamp(path),
        }
    }

    fn mark_seen(&mut self) {
        self.seen = stamp(&self.path);
    }

    /// Resolves at the next poll; `true` if the file changed since last seen.
    async fn changed(&mut self) -> bool {
        match &mut self.interval {
            Some(i) => i.tick().await,
            None => std::future::pending().await,
        };
        let now = stamp(&self.path);
        if now.is_some() && now != self.seen {
            self.seen = now;
            return true;
        }
        false
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The aya-log level compiled into the kernel programs: their per-connection debug records cost
/// CPU, so they are on only when the agent itself logs at debug.
fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    if LevelFilter::current() >= LevelFilter::DEBUG {
        4
    } else {
        0
    }
}

fn spawn_kernel_logger(capture: &Capture) {
    let logger = match capture.take_kernel_logger() {
        Ok(l) => l,
        Err(e) => {
            warn!("kernel program logs unavailable: {e:#}");
            return;
        }
    };
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer fd, which stays open and unchanged until the
        // logger (moved into the AsyncFd) is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// `mesh-agent check-config`: validate without touching the kernel.
pub fn check_config(path: &Path) -> anyhow::Result<()> {
    let c = Config::load(path)?;
    if c.tasks.is_empty() {
        bail!("{}: valid, but lists no tasks to mesh", path.display());
    }
    println!(
        "{}: valid ({} tasks, capture mode {:?}, {} destinations)",
        path.display(),
        c.tasks.len(),
        c.capture.mode,
        c.capture.destinations.len()
    );
    Ok(())
}
