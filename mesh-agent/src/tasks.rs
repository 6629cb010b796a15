//! The meshed tasks of this node: setting one up (netns worker, listeners, program attachment),
//! tearing it down, and reconciling the running set with the configured one.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::capture::{Attachment, Capture};
use crate::config::{AgentSettings, TaskSpec};
use crate::identity::RoleArn;
use crate::metrics::Metrics;
use crate::netns::{NetnsWorker, netns_cookie};
use crate::proxy::{ConnectionSet, Mesh, OutboundContext, serve_outbound};
use crate::tunnel::{InboundContext, serve_inbound};

/// How long a listener keeps accepting after its task's programs were detached: connects the
/// kernel redirected just before the detach are still in the accept queue.
const ACCEPT_GRACE: Duration = Duration::from_millis(200);

struct RunningTask {
    spec: TaskSpec,
    attachment: Attachment,
    /// Stops the accept loops.
    stop_accepting: CancellationToken,
    /// The accept loops, awaited so that no connection is accepted after a drain began.
    listeners: Vec<JoinHandle<()>>,
    /// The task's open connections.
    connections: TaskTracker,
}

pub struct TaskManager {
    cgroup2_root: PathBuf,
    capture: Arc<Capture>,
    metrics: Arc<Metrics>,
    mesh: Arc<Mesh>,
    settings: AgentSettings,
    running: HashMap<String, RunningTask>,
    /// Every connection of every task, for the drain at shutdown.
    all_connections: TaskTracker,
    /// Fired when the drain deadline passes: ends the connections still open.
    abort_connections: CancellationToken,
}

impl TaskManager {
    pub fn new(
        cgroup2_root: PathBuf,
        capture: Arc<Capture>,
        mesh: Arc<Mesh>,
        settings: AgentSettings,
    ) -> TaskManager {
        TaskManager {
            cgroup2_root,
            capture,
            metrics: mesh.metrics.clone(),
            mesh,
            settings,
            running: HashMap::new(),
            all_connections: TaskTracker::new(),
            abort_connections: CancellationToken::new(),
        }
    }

    /// Brings the running tasks in line with `desired`: removed and changed tasks are torn down,
    /// new and changed ones set up. Tasks that did not change are not touched, so their
    /// connections are undisturbed. Returns the tasks that could not be set up; the others are
    /// running regardless.
    pub async fn reconcile(&mut self, desired: &[TaskSpec]) -> Vec<(String, anyhow::Error)> {
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(id, t)| !desired.iter().any(|d| &d.id == *id && *d == t.spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove(&id).await;
        }
        let mut failures = Vec::new();
        for spec in desired {
            if self.running.contains_key(&spec.id) {
                continue;
            }
            match self.start(spec).await {
                Ok(task) => {
                    info!(task = %spec.id, cgroup = %spec.cgroup.display(), "task meshed");
                    self.running.insert(spec.id.clone(), task);
                }
                Err(e) => {
                    let e = e.context(format!("task \"{}\"", spec.id));
                    warn!("{e:#}");
                    self.metrics.task_setup_error(&spec.id);
                    failures.push((spec.id.clone(), e));
                }
            }
        }
        self.metrics.tasks_meshed.set(self.running.len() as i64);
        failures
    }

    async fn start(&self, spec: &TaskSpec) -> anyhow::Result<RunningTask> {
        let started = self.start_inner(spec).await;
        if started.is_err()
            && let Some(certs) = &self.mesh.certs
        {
            certs.remove(&spec.id);
        }
        started
    }

    async fn start_inner(&self, spec: &TaskSpec) -> anyhow::Result<RunningTask> {
        let cgroup = self.resolve_cgroup(&spec.cgroup)?;
        let netns = Arc::new(NetnsWorker::spawn(&spec.id, &spec.netns_path())?);
        let task_id: Arc<str> = spec.id.as_str().into();

        // The workload identity, when the task has a role and the mesh has trust material.
        let slot = match (&spec.role_arn, &self.mesh.certs) {
            (Some(arn), Some(certs)) => {
                let id = arn
                    .parse::<RoleArn>()
                    .context("role_arn")?
                    .to_spiffe_id(certs.trust().trust_domain());
                Some(certs.add(&spec.id, id)?)
            }
            _ => None,
        };

        let port = self.settings.outbound_port;
        let v4_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let v4 = netns.bind(v4_addr).await?;
        let cookie = netns_cookie(&v4).context("cannot read the netns cookie of the listener")?;
        // IPv6 is optional: tasks often have it disabled. Without the listener, IPv6 connects of
        // the task are not captured (connect6 is not attached) rather than refused.
        let v6_addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let v6 = match netns.bind(v6_addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                info!(task = %spec.id, "no IPv6 outbound listener, IPv6 is not captured: {e:#}");
                None
            }
        };
        let mut listen_addrs = vec![v4_addr];
        if v6.is_some() {
            listen_addrs.push(v6_addr);
        }

        let ctx = Arc::new(OutboundContext {
            task_id: task_id.clone(),
            slot: slot.clone(),
            mesh: self.mesh.clone(),
            netns: netns.clone(),
            capture: self.capture.clone(),
            metrics: self.metrics.task(&spec.id),
            netns_cookie: cookie,
            listen_addrs,
            connect_timeout: self.settings.connect_timeout,
        });
        let stop_accepting = CancellationToken::new();
        let connections = ConnectionSet {
            task: TaskTracker::new(),
            all: self.all_connections.clone(),
            abort: self.abort_connections.clone(),
        };
        let ipv6 = v6.is_some();
        // Until set-up succeeds, any early return stops what was already started.
        let stop_on_error = stop_accepting.clone().drop_guard();

        // The tunnel listener: where peer agents deliver connections for this task. Only a
        // task with an identity can prove itself to them.
        let mut tunnel_listener = None;
        if let (Some(slot), Some(certs)) = (&slot, &self.mesh.certs) {
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.settings.tunnel_port));
            let listener = netns.bind(addr).await.with_context(|| {
                format!("cannot listen on the tunnel port {addr} in the task's netns")
            })?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .context("cannot register the tunnel listener with the runtime")?;
            let inbound = Arc::new(InboundContext {
                task_id: task_id.clone(),
                slot: slot.clone(),
                certs: certs.clone(),
                netns: netns.clone(),
                addresses: spec.addresses.clone(),
                mesh: self.mesh.clone(),
                connect_timeout: self.settings.connect_timeout,
                connections: connections.clone(),
                tls: Default::default(),
            });
            tunnel_listener = Some(tokio::spawn(serve_inbound(
                listener,
                inbound,
                stop_accepting.clone(),
            )));
        }

        let registered = std::iter::once(v4)
            .chain(v6)
            .map(tokio::net::TcpListener::from_std)
            .collect::<Result<Vec<_>, _>>()
            .context("cannot register the outbound listener with the runtime")?;
        let listeners = registered
            .into_iter()
            .map(|listener| {
                tokio::spawn(serve_outbound(
                    listener,
                    ctx.clone(),
                    stop_accepting.clone(),
                    connections.clone(),
                ))
            })
            .chain(tunnel_listener)
            .collect();
        // Last: from here on the task's connects arrive at the listeners above.
        let attachment = self.capture.attach(&cgroup, ipv6)?;
        stop_on_error.disarm();
        Ok(RunningTask {
            spec: spec.clone(),
            attachment,
            stop_accepting,
            listeners,
            connections: connections.task,
        })
    }

    /// Stops capturing a task. Its open connections finish on their own (or at the shutdown
    /// drain); its metric series go once the last one has closed.
    async fn remove(&mut self, id: &str) {
        let Some(task) = self.running.remove(id) else {
            return;
        };
        if let Err(e) = self.capture.detach(task.attachment) {
            warn!(task = %id, "{e:#}");
        }
        if let Some(certs) = &self.mesh.certs {
            certs.remove(id);
        }
        tokio::time::sleep(ACCEPT_GRACE).await;
        task.stop_accepting.cancel();
        for l in task.listeners {
            let _ = l.await;
        }
        task.connections.close();
        let metrics = self.metrics.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            task.connections.wait().await;
            metrics.forget_task(&id);
        });
        info!(task = %task.spec.id, "task no longer meshed");
    }

    /// Shutdown: detach every program, stop accepting, wait up to `drain` for open connections,
    /// then end the rest.
    pub async fn shutdown(&mut self, drain: Duration) {
        // Detach every task first, then sit through one accept grace period for all of them.
        let tasks: Vec<RunningTask> = self.running.drain().map(|(_, t)| t).collect();
        let mut accepting = Vec::new();
        for task in tasks {
            if let Err(e) = self.capture.detach(task.attachment) {
                warn!(task = %task.spec.id, "{e:#}");
            }
            accepting.push((task.stop_accepting, task.listeners));
        }
        self.metrics.tasks_meshed.set(0);
        tokio::time::sleep(ACCEPT_GRACE).await;
        for (stop, listeners) in accepting {
            stop.cancel();
            for l in listeners {
                let _ = l.await;
            }
        }
        self.all_connections.close();
        if tokio::time::timeout(drain, self.all_connections.wait())
            .await
            .is_err()
        {
            warn!(
                "drain timeout ({}) passed; closing the remaining connections",
                humantime::format_duration(drain)
            );
            self.abort_connections.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.all_connections.wait()).await;
        }
    }

    /// A task's cgroup directory: relative paths are under the cgroup v2 mount, absolute ones
    /// must be.
    fn resolve_cgroup(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let full = if path.is_absolute() {
            path.to_owned()
        } else {
            self.cgroup2_root.join(path)
        };
        if !full.starts_with(&self.cgroup2_root) {
            bail!(
                "cgroup {} is not under the cgroup v2 mount {}",
                full.display(),
                self.cgroup2_root.display()
            );
        }
        match std::fs::metadata(&full) {
            Ok(m) if m.is_dir() => Ok(full),
            Ok(_) => Err(anyhow!("cgroup {} is not a directory", full.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(anyhow!(
                "cgroup {} does not exist (has the task stopped?)",
                full.display()
            )),
            Err(e) => Err(anyhow!(e).context(format!("cannot inspect cgroup {}", full.display()))),
        }
    }
}
