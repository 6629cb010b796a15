//! The meshed tasks of this node: setting one up (netns worker, listeners, program attachment),
//! tearing it down, and reconciling the running set with the configured one.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::capture::{Attachment, Capture};
use crate::certs::WorkloadSlot;
use crate::config::{AgentSettings, TaskSpec};
use crate::identity::RoleArn;
use crate::metrics::{Metrics, UNKNOWN};
use crate::netns::{NetnsWorker, NewSocketHook, netns_cookie};
use crate::proxy::{ConnectionSet, Mesh, OutboundContext, serve_outbound};
use crate::tunnel::{InboundContext, Scope, serve_inbound};

/// How long a listener keeps accepting after its task's programs were detached: connects the
/// kernel redirected just before the detach are still in the accept queue.
const ACCEPT_GRACE: Duration = Duration::from_millis(200);

/// What is known of a task's workload identity.
#[derive(Clone, Debug)]
pub enum Identity {
    /// A discovered task whose role is not known yet: its meshed connections wait for it.
    Pending,
    /// No role (or no trust material): meshed destinations are refused.
    None,
    Attested(Arc<WorkloadSlot>),
}

struct RunningTask {
    spec: TaskSpec,
    attachment: Attachment,
    /// The task netns, as the kernel's READY_NETNS map knows it.
    netns_cookie: u64,
    netns: Arc<NetnsWorker>,
    identity: watch::Sender<Identity>,
    /// The tunnel listener, once the task has an identity.
    tunnel: Option<JoinHandle<()>>,
    connection_set: ConnectionSet,
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
    /// Programs attached to task cgroups that are not (yet) running tasks: a discovered task's
    /// cgroup gets them as soon as it exists, before its first process.
    early: HashMap<PathBuf, Attachment>,
    /// How long an outbound connection waits for a pending identity.
    attestation_timeout: Duration,
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
        attestation_timeout: Duration,
    ) -> TaskManager {
        TaskManager {
            cgroup2_root,
            capture,
            metrics: mesh.metrics.clone(),
            mesh,
            settings,
            running: HashMap::new(),
            early: HashMap::new(),
            attestation_timeout,
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
            .filter(|(id, t)| {
                !desired
                    .iter()
                    .any(|d| &d.id == *id && d.same_placement(&t.spec))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove(&id).await;
        }
        let mut failures = Vec::new();
        for spec in desired {
            let result = match self.running.get_mut(&spec.id) {
                // Same task, same place: only its identity may have changed (a discovered task
                // whose role was just learnt), which needs no restart.
                Some(task) if task.spec == *spec => continue,
                Some(task) => {
                    let updated =
                        Self::apply_identity(&self.mesh, &self.settings, task, spec).await;
                    if updated.is_ok() {
                        task.spec = spec.clone();
                    }
                    updated
                }
                None => match self.start(spec).await {
                    Ok(task) => {
                        info!(task = %spec.id, cgroup = %spec.cgroup.display(), "task meshed");
                        self.running.insert(spec.id.clone(), task);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                let e = e.context(format!("task \"{}\"", spec.id));
                warn!("{e:#}");
                self.metrics.task_setup_error(&spec.id);
                failures.push((spec.id.clone(), e));
            }
        }
        self.metrics.tasks_meshed.set(self.running.len() as i64);
        failures
    }

    /// Attaches the capture programs to a task cgroup that just appeared, before any of its
    /// processes runs. They capture nothing until the task's listeners are up.
    pub fn attach_early(&mut self, cgroup: &Path) {
        let Ok(cgroup) = self.resolve_cgroup(cgroup) else {
            return;
        };
        let known = self.early.contains_key(&cgroup)
            || self
                .running
                .values()
                .any(|t| self.resolve_cgroup(&t.spec.cgroup).ok().as_ref() == Some(&cgroup));
        if known {
            return;
        }
        match self.capture.attach(&cgroup) {
            Ok(a) => {
                debug!(cgroup = %cgroup.display(), "programs attached to a new task cgroup");
                self.early.insert(cgroup, a);
            }
            Err(e) => warn!("{e:#}"),
        }
    }

    /// Detaches early programs of a cgroup that went away without becoming a running task.
    pub fn release_early(&mut self, cgroup: &Path) {
        let full = if cgroup.is_absolute() {
            cgroup.to_owned()
        } else {
            self.cgroup2_root.join(cgroup)
        };
        if let Some(a) = self.early.remove(&full)
            && let Err(e) = self.capture.detach(a)
        {
            debug!("{e:#}");
        }
    }

    /// Brings a running task's identity in line with `spec`: mints its certificate and opens
    /// its tunnel listener once the role is known.
    async fn apply_identity(
        mesh: &Arc<Mesh>,
        settings: &AgentSettings,
        task: &mut RunningTask,
        spec: &TaskSpec,
    ) -> anyhow::Result<()> {
        let identity = match (&spec.role_arn, &mesh.certs) {
            _ if spec.role_pending => Identity::Pending,
            (Some(arn), Some(certs)) => {
                let id = arn
                    .parse::<RoleArn>()
                    .context("role_arn")?
                    .to_spiffe_id(certs.trust().trust_domain());
                let current = task.identity.borrow().clone();
                match current {
                    Identity::Attested(slot) if *slot.id() == id => Identity::Attested(slot),
                    _ => Identity::Attested(certs.add(&spec.id, id)?),
                }
            }
            _ => Identity::None,
        };
        if let (Identity::Attested(slot), Some(certs), None) =
            (&identity, &mesh.certs, &task.tunnel)
        {
            // The tunnel listener: where peer agents deliver connections for this task. Only a
            // task with an identity can prove itself to them.
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, settings.tunnel_port));
            let listener = task.netns.bind(addr).await.with_context(|| {
                format!("cannot listen on the tunnel port {addr} in the task's netns")
            })?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .context("cannot register the tunnel listener with the runtime")?;
            let inbound = Arc::new(InboundContext {
                scope: Scope::Task {
                    task_id: spec.id.as_str().into(),
                    family: spec.family.as_deref().map(Arc::from),
                    version: spec.version.as_deref().map(Arc::from),
                    slot: slot.clone(),
                    netns: task.netns.clone(),
                    addresses: spec.addresses.clone(),
                },
                certs: certs.clone(),
                mesh: mesh.clone(),
                connect_timeout: settings.connect_timeout,
                connections: task.connection_set.clone(),
                tls: Default::default(),
            });
            task.tunnel = Some(tokio::spawn(serve_inbound(
                listener,
                inbound,
                task.stop_accepting.clone(),
            )));
        }
        // Host ports (bridge mode) are served by the node's listener, with this identity.
        match &identity {
            Identity::Attested(slot) if !spec.host_ports.is_empty() => {
                let ports: Vec<(u16, u16)> = spec
                    .host_ports
                    .iter()
                    .map(|p| (p.host, p.container))
                    .collect();
                let family: Option<Arc<str>> = spec.family.as_deref().map(Arc::from);
                let version: Option<Arc<str>> = spec.version.as_deref().map(Arc::from);
                mesh.host_ports.set_task(
                    &spec.id.as_str().into(),
                    (family.as_ref(), version.as_ref()),
                    slot,
                    &task.netns,
                    &ports,
                );
            }
            _ => mesh.host_ports.remove_task(&spec.id),
        }
        if matches!(identity, Identity::None)
            && let Some(certs) = &mesh.certs
        {
            certs.remove(&spec.id);
        }
        task.identity.send_replace(identity);
        Ok(())
    }

    async fn start(&mut self, spec: &TaskSpec) -> anyhow::Result<RunningTask> {
        let cgroup = self.resolve_cgroup(&spec.cgroup)?;
        let early = self.early.remove(&cgroup);
        let started = self.start_inner(spec, &cgroup, early).await;
        if started.is_err()
            && let Some(certs) = &self.mesh.certs
        {
            certs.remove(&spec.id);
        }
        started
    }

    async fn start_inner(
        &self,
        spec: &TaskSpec,
        cgroup: &Path,
        early: Option<Attachment>,
    ) -> anyhow::Result<RunningTask> {
        let capture = self.capture.clone();
        let register_dial: NewSocketHook = Arc::new(move |s| capture.register_dial(s));
        let netns = match NetnsWorker::spawn(&spec.id, &spec.netns_path(), Some(register_dial)) {
            Ok(n) => Arc::new(n),
            Err(e) => {
                if let Some(a) = early {
                    let _ = self.capture.detach(a);
                }
                return Err(e);
            }
        };
        let task_id: Arc<str> = spec.id.as_str().into();

        let port = self.settings.outbound_port;
        let v4_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let v4 = netns.bind(v4_addr).await?;
        let cookie = netns_cookie(&v4).context("cannot read the netns cookie of the listener")?;
        // IPv6 is optional: tasks often have it disabled. Without the listener, IPv6 connects of
        // the task are not captured rather than refused.
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

        let (identity, identity_rx) = watch::channel(Identity::Pending);
        let ctx = Arc::new(OutboundContext {
            task_id: task_id.clone(),
            workload: spec.family.as_deref().unwrap_or(&spec.id).into(),
            version: spec.version.as_deref().unwrap_or(UNKNOWN).into(),
            identity: identity_rx,
            attestation_timeout: self.attestation_timeout,
            l7_pools: Default::default(),
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
            .collect();
        let attachment = match early {
            Some(a) => a,
            None => self.capture.attach(cgroup)?,
        };
        let mut task = RunningTask {
            spec: spec.clone(),
            attachment,
            netns_cookie: cookie,
            netns,
            identity,
            tunnel: None,
            connection_set: connections.clone(),
            stop_accepting: stop_accepting.clone(),
            listeners,
            connections: connections.task,
        };
        let ready = match Self::apply_identity(&self.mesh, &self.settings, &mut task, spec).await {
            // Last: from here on the task's connects arrive at the listeners above.
            Ok(()) => self.capture.listeners_ready(cookie, ipv6),
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            let _ = self.capture.detach(task.attachment);
            return Err(e);
        }
        stop_on_error.disarm();
        Ok(task)
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
        self.capture.listeners_gone(task.netns_cookie);
        self.mesh.host_ports.remove_task(id);
        if let Some(certs) = &self.mesh.certs {
            certs.remove(id);
        }
        tokio::time::sleep(ACCEPT_GRACE).await;
        task.stop_accepting.cancel();
        for l in task.listeners.into_iter().chain(task.tunnel) {
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

    /// A connection set for listeners that belong to no task (the node's tunnel listener):
    /// drained and aborted with everything else at shutdown.
    pub fn node_connections(&self) -> ConnectionSet {
        ConnectionSet {
            task: TaskTracker::new(),
            all: self.all_connections.clone(),
            abort: self.abort_connections.clone(),
        }
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
            self.capture.listeners_gone(task.netns_cookie);
            accepting.push((
                task.stop_accepting,
                task.listeners.into_iter().chain(task.tunnel),
            ));
        }
        for (_, a) in self.early.drain() {
            let _ = self.capture.detach(a);
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
