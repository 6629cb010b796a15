//! `mesh-agent run`: start-up, the signal and reload loop, and orderly shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::capture::Capture;
use crate::certs::Certs;
use crate::config::{CaptureSettings, Cidr, Config, Destination};
use crate::destinations::Destinations;
use crate::endpoints::{self, Readiness};
use crate::identity::TrustDomain;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::preflight;
use crate::proxy::Mesh;
use crate::tasks::TaskManager;
use crate::tunnel::Pool;

pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let host = preflight::check_host()?;
    let mut config = Config::load(&config_path)?;
    info!(config = %config_path.display(), cgroup2 = %host.cgroup2_root.display(), tasks = config.tasks.len(), "starting");

    // The programs are loaded (not attached) first because the metrics read their counters;
    // trust material is checked next, so an expired anchor or issuer stops the agent before any
    // task is touched.
    let capture = Arc::new(Capture::load(kernel_log_level())?);
    let metrics = Arc::new(Metrics::new(capture.clone()));
    let certs = match &config.identity {
        Some(identity) => Some(Certs::load(identity, metrics.clone())?),
        None => {
            info!(
                "no [identity] section: connections are carried as plain TCP, without mutual TLS"
            );
            None
        }
    };
    spawn_kernel_logger(&capture);
    let (authorizer, destinations) = mesh_view(&config)?;
    capture.apply_rules(
        &capture_rules(&config.capture, &destinations),
        config.agent.outbound_port,
    )?;
    let pool = certs.as_ref().map(|c| {
        Pool::new(
            c.clone(),
            metrics.clone(),
            config.agent.connect_timeout,
            config.agent.tunnel_idle_timeout,
        )
    });
    let mesh = Arc::new(Mesh::new(
        metrics.clone(),
        certs.clone(),
        pool,
        authorizer,
        destinations,
    ));

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
        mesh.clone(),
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
    let trust_files: Vec<PathBuf> = config
        .identity
        .iter()
        .flat_map(|i| [i.bundle.clone(), i.issuer.clone()])
        .collect();
    let mut trust_watch = FileWatch::many(&trust_files, config.agent.watch_interval);
    let mut expiry_check = tokio::time::interval(EXPIRY_CHECK);
    expiry_check.tick().await;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { info!("SIGINT: draining"); break; }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading configuration and trust material");
                reload(&config_path, &mut config, &mut tasks, &capture, &mesh).await;
                watch.mark_seen();
                if let Some(c) = &certs {
                    c.reload();
                }
                trust_watch.mark_seen();
            }
            // Not `true = watch.changed()`: a pattern that does not match disables its branch
            // for the rest of the select!, which would stop the polling after one quiet tick.
            changed = watch.changed() => if changed {
                info!("configuration file changed: reloading");
                reload(&config_path, &mut config, &mut tasks, &capture, &mesh).await;
            },
            changed = trust_watch.changed() => if changed && let Some(c) = &certs {
                info!("trust material changed on disk: reloading");
                c.reload();
            },
            _ = expiry_check.tick() => {
                if let Some(c) = &certs {
                    c.warn_expiring();
                }
            }
        }
    }
    readiness.set(false);
    tasks.shutdown(config.agent.drain_timeout).await;
    // Every link was detached above; the programs and maps go with the process.
    info!("stopped");
    Ok(())
}

/// What `check-config` warns about.
const EXPIRY_WARNING_CHECK: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often expiring trust material is logged again.
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);

/// The typed, validated views of the mesh part of the configuration.
fn mesh_view(config: &Config) -> anyhow::Result<(Authorizer, Destinations)> {
    let trust_domain = config
        .identity
        .as_ref()
        .map(|i| i.trust_domain.parse::<TrustDomain>())
        .transpose()?;
    let authorizer = Authorizer::new(
        &config.policies,
        config.mesh.default_policy,
        trust_domain.as_ref(),
    )?;
    Ok((authorizer, Destinations::new(config)?))
}

/// The configured capture rules plus every meshed address: connections to meshed workloads
/// must reach the agent whatever `[capture]` lists.
fn capture_rules(configured: &CaptureSettings, destinations: &Destinations) -> CaptureSettings {
    let mut rules = configured.clone();
    for ip in destinations.meshed_addresses() {
        let host = Destination::Network(Cidr {
            addr: ip,
            prefix_len: if ip.is_ipv4() { 32 } else { 128 },
        });
        if !rules.destinations.contains(&host) {
            rules.destinations.push(host);
        }
    }
    rules
}

/// Applies a changed configuration. A file that does not parse or validate changes nothing.
async fn reload(
    path: &Path,
    running: &mut Config,
    tasks: &mut TaskManager,
    capture: &Capture,
    mesh: &Mesh,
) {
    let metrics = &mesh.metrics;
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
    if new.identity != running.identity {
        warn!(
            "changes to [identity] settings take effect at the next restart (the bundle and issuer files themselves are reloaded when they change)"
        );
    }
    let (authorizer, destinations) = match mesh_view(&new) {
        Ok(v) => v,
        Err(e) => {
            error!("configuration reload failed, keeping the running configuration: {e:#}");
            metrics.reload(false);
            return;
        }
    };
    if let Err(e) = capture.apply_rules(
        &capture_rules(&new.capture, &destinations),
        running.agent.outbound_port,
    ) {
        error!("configuration reload failed, capture rules unchanged: {e:#}");
        metrics.reload(false);
        return;
    }
    // Policy and destinations first, so a task started below already sees them.
    mesh.update(authorizer, destinations);
    let failures = tasks.reconcile(&new.tasks).await;
    metrics.reload(failures.is_empty());
    running.capture = new.capture;
    running.mesh = new.mesh;
    running.tasks = new.tasks;
    running.endpoints = new.endpoints;
    running.policies = new.policies;
    info!(failed_tasks = failures.len(), "configuration reloaded");
}

/// Polls files' modification time and size; cheap, and works for files replaced by rename
/// (how ECS, SSM agents and editors update files) without inotify bookkeeping.
struct FileWatch {
    paths: Vec<PathBuf>,
    interval: Option<tokio::time::Interval>,
    seen: Vec<Option<(SystemTime, u64)>>,
}

impl FileWatch {
    fn new(path: &Path, every: Duration) -> FileWatch {
        Self::many(&[path.to_owned()], every)
    }

    /// Watches several files as one: a change to any of them is one change.
    fn many(paths: &[PathBuf], every: Duration) -> FileWatch {
        let interval = (!every.is_zero() && !paths.is_empty()).then(|| {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        FileWatch {
            paths: paths.to_vec(),
            interval,
            seen: paths.iter().map(|p| stamp(p)).collect(),
        }
    }

    fn mark_seen(&mut self) {
        self.seen = self.paths.iter().map(|p| stamp(p)).collect();
    }

    /// Resolves at the next poll; `true` if a file changed since last seen. A file that is
    /// missing (mid-replacement) is not a change.
    async fn changed(&mut self) -> bool {
        match &mut self.interval {
            Some(i) => i.tick().await,
            None => std::future::pending().await,
        };
        let now: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
        if now.iter().all(Option::is_some) && now != self.seen {
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
        "{}: valid ({} tasks, {} remote endpoints, {} policies, capture mode {:?}, {} destinations)",
        path.display(),
        c.tasks.len(),
        c.endpoints.len(),
        c.policies.len(),
        c.capture.mode,
        c.capture.destinations.len()
    );
    // The agent refuses to start on bad trust material; say so now rather than at deploy time.
    if let Some(identity) = &c.identity {
        let authority = crate::identity::Authority::load(
            &identity.bundle,
            &identity.issuer,
            SystemTime::now(),
        )?;
        println!(
            "trust material valid: bundle {} and issuer {} (trust domain {})",
            identity.bundle.display(),
            identity.issuer.display(),
            authority.bundle().trust_domain()
        );
        for w in authority.expiry_warnings(SystemTime::now(), EXPIRY_WARNING_CHECK) {
            println!("warning: {w}");
        }
    }
    Ok(())
}
