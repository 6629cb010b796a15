//! `mesh-agent run`: start-up, the signal and reload loop, and orderly shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::capture::Capture;
use crate::certs::Certs;
use crate::config::{CaptureSettings, Cidr, Config, Destination, TaskSpec};
use crate::destinations::Destinations;
use crate::ecs::{self, EcsEvent};
use crate::endpoints::{self, Readiness};
use crate::heap;
use crate::identity::TrustDomain;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::preflight;
use crate::proxy::Mesh;
use crate::routing::outlier::OutlierDetector;
use crate::routing::table::RoutingTable;
use crate::services;
use crate::tasks::TaskManager;
use crate::tunnel::{InboundContext, Pool, Scope, serve_inbound};

pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let host = preflight::check_host()?;
    match preflight::raise_open_files_limit() {
        Ok(n) if n < 65_536 => warn!(
            open_files = n,
            "the open-files limit is low for a proxy (each proxied connection holds 2-3 descriptors); raise LimitNOFILE / ulimits nofile"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
    }
    info!(config = %config_path.display(), cgroup2 = %host.cgroup2_root.display(), tasks = config.tasks.len(), "starting");

    // The programs are loaded (not attached) first because the metrics read their counters;
    // trust material is checked next, so an expired anchor or issuer stops the agent before any
    // task is touched.
    let kernel_log_level = kernel_log_level();
    let capture = Arc::new(Capture::load(kernel_log_level, &host.cgroup2_root)?);
    let metrics = Arc::new(Metrics::new(capture.clone()));
    if let Some(path) = &config.agent.access_log {
        metrics.open_access_log(path).with_context(|| {
            format!(
                "agent.access_log: cannot open {} for appending",
                path.display()
            )
        })?;
        info!(file = %path.display(), "writing the JSON access log");
    }
    let certs = match &config.identity {
        Some(identity) => Some(Certs::load(identity, metrics.clone())?),
        None => {
            info!(
                "no [identity] section: connections are carried as plain TCP, without mutual TLS"
            );
            None
        }
    };
    if kernel_log_level > 0 {
        spawn_kernel_logger(&capture);
    }
    let mut state = State {
        discovered_endpoints: vec![Vec::new(); config.services.len()],
        service_generation: 0,
        config,
        discovered: Vec::new(),
    };
    let (authorizer, destinations, routing) =
        mesh_view(&state.config, &state.tasks(), &state.discovered_endpoints)?;
    let config = &state.config;
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
        OutlierDetector::new(config.outlier_detection.settings()),
        authorizer,
        destinations,
        routing,
    ));

    let readiness = Arc::new(Readiness::default());
    endpoints::start(
        config.agent.metrics_addr,
        config.agent.readiness_addr,
        metrics.clone(),
        readiness.clone(),
    )
    .await?;

    let attestation_timeout = config
        .ecs
        .as_ref()
        .map_or(Duration::ZERO, |e| e.attestation_timeout);
    let mut tasks = TaskManager::new(
        host.cgroup2_root.clone(),
        capture.clone(),
        mesh.clone(),
        config.agent.clone(),
        attestation_timeout,
    );
    // At start-up a task that cannot be set up is a configuration error: refuse to run rather
    // than run half-configured. (On reload the other tasks keep running; see `reload`.)
    let failures = apply(&state, &mut tasks, &capture, &mesh).await?;
    if let Some((_, e)) = failures.into_iter().next() {
        tasks.shutdown(state.config.agent.drain_timeout).await;
        return Err(e);
    }

    // The node's tunnel listener: where peers reach this node's bridge-mode tasks by host
    // port. Only with trust material (no identity, no tunnel).
    let stop_node_listener = CancellationToken::new();
    if let Some(certs) = &certs {
        let addr = SocketAddr::from(([0, 0, 0, 0], state.config.agent.tunnel_port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on the node's tunnel port {addr}"))?;
        let inbound = Arc::new(InboundContext {
            scope: Scope::Node {
                host_ports: mesh.host_ports.clone(),
            },
            certs: certs.clone(),
            mesh: mesh.clone(),
            connect_timeout: state.config.agent.connect_timeout,
            connections: tasks.node_connections(),
            tls: Default::default(),
        });
        tokio::spawn(serve_inbound(listener, inbound, stop_node_listener.clone()));
    }

    // Discovered tasks arrive through this channel once the source has looked.
    let (ecs_events, mut ecs_rx) = tokio::sync::mpsc::channel(256);
    let stop_sources = CancellationToken::new();
    if let Some(ecs) = &state.config.ecs {
        ecs::spawn(
            ecs.clone(),
            metrics.clone(),
            &host.cgroup2_root,
            ecs_events,
            stop_sources.clone(),
        )?;
        info!(agent = %ecs.agent_url, "ECS task source started");
    }
    let (service_updates, mut service_rx) = tokio::sync::mpsc::channel(256);
    let mut service_watches = services::start(
        &state.config,
        state.service_generation,
        service_updates.clone(),
    )?;
    readiness.set(true);
    info!(tasks = state.config.tasks.len(), "ready");
    heap::release_free_memory();

    let mut sigterm = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let mut watch = FileWatch::new(&config_path, state.config.agent.watch_interval);
    let trust_files: Vec<PathBuf> = state
        .config
        .identity
        .iter()
        .flat_map(|i| [i.bundle.clone(), i.issuer.clone()])
        .collect();
    let mut trust_watch = FileWatch::many(&trust_files, state.config.agent.watch_interval);
    let mut expiry_check = tokio::time::interval(EXPIRY_CHECK);
    expiry_check.tick().await;
    let series_idle = state.config.agent.metrics_idle_expiry;
    let mut series_sweep = tokio::time::interval((series_idle / 4).max(Duration::from_secs(1)));
    series_sweep.tick().await;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { info!("SIGINT: draining"); break; }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading configuration and trust material");
                reload(&config_path, &mut state, &mut tasks, &capture, &mesh, &mut service_watches, &service_updates).await;
                watch.mark_seen();
                if let Some(c) = &certs {
                    c.reload();
                }
                trust_watch.mark_seen();
                heap::release_free_memory();
            }
            // Not `true = watch.changed()`: a pattern that does not match disables its branch
            // for the rest of the select!, which would stop the polling after one quiet tick.
            changed = watch.changed() => if changed {
                info!("configuration file changed: reloading");
                reload(&config_path, &mut state, &mut tasks, &capture, &mesh, &mut service_watches, &service_updates).await;
                heap::release_free_memory();
            },
            Some(update) = service_rx.recv() => {
                if update.generation != state.service_generation {
                    continue;
                }
                if let Some(slot) = state.discovered_endpoints.get_mut(update.index) {
                    *slot = update.endpoints;
                    if let Err(e) = apply(&state, &mut tasks, &capture, &mesh).await {
                        error!("service endpoints not applied: {e:#}");
                    }
                }
            },
            Some(event) = ecs_rx.recv() => match event {
                EcsEvent::SliceAppeared(cgroup) => tasks.attach_early(&cgroup),
                EcsEvent::SliceGone(cgroup) => tasks.release_early(&cgroup),
                EcsEvent::Tasks(discovered) => {
                    state.discovered = discovered;
                    match apply(&state, &mut tasks, &capture, &mesh).await {
                        Ok(failures) => for (id, e) in failures {
                            debug!(task = %id, "discovered task not set up: {e:#}");
                        },
                        Err(e) => error!("discovered tasks not applied: {e:#}"),
                    }
                    heap::release_free_memory();
                }
            },
            changed = trust_watch.changed() => if changed && let Some(c) = &certs {
                info!("trust material changed on disk: reloading");
                c.reload();
            },
            _ = series_sweep.tick() => {
                let removed = metrics.expire_idle_series(series_idle);
                if removed > 0 {
                    debug!(removed, "idle per-hop metric series removed");
                }
                heap::release_free_memory();
            }
            _ = expiry_check.tick() => {
                if let Some(c) = &certs {
                    c.warn_expiring();
                }
            }
        }
    }
    readiness.set(false);
    stop_sources.cancel();
    stop_node_listener.cancel();
    tasks.shutdown(state.config.agent.drain_timeout).await;
    // Every link was detached above; the programs and maps go with the process.
    info!("stopped");
    Ok(())
}

/// What `check-config` warns about.
const EXPIRY_WARNING_CHECK: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often expiring trust material is logged again.
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);

/// The typed, validated views of the mesh part of the configuration.
fn mesh_view(
    config: &Config,
    tasks: &[TaskSpec],
    endpoints: &[Vec<SocketAddr>],
) -> anyhow::Result<(Authorizer, Destinations, RoutingTable)> {
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
    Ok((
        authorizer,
        Destinations::new(config, tasks, endpoints)?,
        config.routing_table()?,
    ))
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
    for addr in destinations.meshed_endpoints() {
        let exact = Destination::Exact(addr);
        if !rules.destinations.contains(&exact) {
            rules.destinations.push(exact);
        }
    }
    rules
}

/// The running configuration and what the ECS source and DNS discovered.
struct State {
    config: Config,
    discovered: Vec<TaskSpec>,
    /// `discovered_endpoints[i]`: the current endpoints of `config.services[i]`.
    discovered_endpoints: Vec<Vec<SocketAddr>>,
    /// Bumped when the service watches are restarted (reload).
    service_generation: u64,
}

impl State {
    /// Static tasks, then discovered ones (a discovered task never replaces a static one of
    /// the same id).
    fn tasks(&self) -> Vec<TaskSpec> {
        let mut all = self.config.tasks.clone();
        for d in &self.discovered {
            if all.iter().any(|t| t.id == d.id) {
                warn!(task = %d.id, "a discovered task has the id of a static task; keeping the static one");
            } else {
                all.push(d.clone());
            }
        }
        all
    }
}

/// Brings policy, destinations, capture rules and running tasks in line with `state`. Errors
/// (an invalid view) change nothing; per-task set-up failures are returned.
async fn apply(
    state: &State,
    tasks: &mut TaskManager,
    capture: &Capture,
    mesh: &Mesh,
) -> anyhow::Result<Vec<(String, anyhow::Error)>> {
    let all = state.tasks();
    let (authorizer, destinations, routing) =
        mesh_view(&state.config, &all, &state.discovered_endpoints)?;
    capture
        .apply_rules(
            &capture_rules(&state.config.capture, &destinations),
            state.config.agent.outbound_port,
        )
        .context("capture rules unchanged")?;
    // Policy and destinations first, so a task started below already sees them.
    mesh.update(authorizer, destinations, routing);
    Ok(tasks.reconcile(&all).await)
}

/// Applies a changed configuration. A file that does not parse or validate changes nothing.
async fn reload(
    path: &Path,
    state: &mut State,
    tasks: &mut TaskManager,
    capture: &Capture,
    mesh: &Mesh,
    service_watches: &mut services::ServiceWatches,
    service_updates: &tokio::sync::mpsc::Sender<services::ServiceUpdate>,
) {
    let metrics = &mesh.metrics;
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("configuration reload failed, keeping the running configuration: {e:#}");
            metrics.reload(false);
            return;
        }
    };
    let running = &state.config;
    if new.agent != running.agent {
        warn!("changes to [agent] settings take effect at the next restart");
    }
    if new.identity != running.identity {
        warn!(
            "changes to [identity] settings take effect at the next restart (the bundle and issuer files themselves are reloaded when they change)"
        );
    }
    if new.ecs != running.ecs {
        warn!("changes to [ecs] settings take effect at the next restart");
    }
    if new.outlier_detection != running.outlier_detection {
        warn!("changes to [outlier_detection] take effect at the next restart");
    }
    new.agent = running.agent.clone();
    new.identity = running.identity.clone();
    new.ecs = running.ecs.clone();
    new.outlier_detection = running.outlier_detection.clone();
    let services_changed = new.services != running.services || new.dns != running.dns;
    let previous = std::mem::replace(&mut state.config, new);
    let previous_endpoints = state.discovered_endpoints.clone();
    if services_changed {
        // A service that keeps its lookup keeps its endpoints until its new watch answers: a
        // reload must not unmesh anything, least of all while the resolver is down.
        state.discovered_endpoints = state
            .config
            .services
            .iter()
            .map(|service| {
                previous
                    .services
                    .iter()
                    .position(|p| p.query().ok() == service.query().ok())
                    .and_then(|i| previous_endpoints.get(i).cloned())
                    .unwrap_or_default()
            })
            .collect();
    }
    match apply(state, tasks, capture, mesh).await {
        Ok(failures) => {
            if services_changed {
                let old = std::mem::take(service_watches);
                old.stop().await;
                state.service_generation += 1;
                match services::start(
                    &state.config,
                    state.service_generation,
                    service_updates.clone(),
                ) {
                    Ok(w) => *service_watches = w,
                    Err(e) => error!("DNS discovery not restarted: {e:#}"),
                }
            }
            metrics.reload(failures.is_empty());
            info!(failed_tasks = failures.len(), "configuration reloaded");
        }
        Err(e) => {
            error!("configuration reload failed, keeping the running configuration: {e:#}");
            state.config = previous;
            state.discovered_endpoints = previous_endpoints;
            metrics.reload(false);
        }
    }
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
/// CPU, so they are on only when the agent itself logs at debug. At 0 the programs' log ring
/// is one page and nothing reads it.
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
    if c.tasks.is_empty() && c.ecs.is_none() {
        bail!(
            "{}: valid, but lists no tasks to mesh and has no [ecs] task source",
            path.display()
        );
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
