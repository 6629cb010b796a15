//! The ECS task source: which tasks run on this node, where (cgroup, netns, addresses) and as
//! whom (IAM role), from the ECS agent's introspection API, the cgroup tree and the credentials
//! endpoint.
//!
//! Two speeds. A task's cgroup slice is watched with inotify and reported the moment it appears,
//! so the capture programs are attached before any of its processes runs. The task's details are
//! then filled in by a refresh (triggered by the same events and by a periodic poll): its
//! listeners are set up as soon as a process (the pause container, for awsvpc) holds its netns,
//! and its identity once an application process shows which role it runs with. The ECS agent
//! being unreachable changes nothing: the last known task list stays in force.
//!
//! Network modes: awsvpc tasks are fully supported (their own netns and address; inbound
//! tunnel). Bridge tasks are captured in the netns of one of their containers (single-container
//! tasks are fully covered) and reached by host port through the node's tunnel listener.
//! Host-mode tasks share the node's netns and are not meshed (a warning says so).

mod attest;
mod cgroups;
mod model;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::http_client::parse_http_url;

use crate::config::{EcsSettings, TaskSpec};
use crate::identity::RoleArn;
use crate::metrics::Metrics;
use attest::Attestation;

/// What the source tells the agent.
#[derive(Debug)]
pub enum EcsEvent {
    /// A task cgroup appeared: attach the programs now, before its processes run.
    SliceAppeared(PathBuf),
    /// A task cgroup went away.
    SliceGone(PathBuf),
    /// The complete list of discovered tasks (replaces the previous one).
    Tasks(Vec<TaskSpec>),
}

/// Request timeout towards the local ECS agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How soon a refresh follows a cgroup event (coalesces a burst of container starts).
const EVENT_DEBOUNCE: Duration = Duration::from_millis(20);
/// Retry delays for a role that could not be learnt yet (e.g. 503 from the endpoint).
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Starts the source; it runs until `stop` fires.
pub fn spawn(
    settings: EcsSettings,
    metrics: Arc<Metrics>,
    cgroup2_root: &Path,
    events: mpsc::Sender<EcsEvent>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let root = if settings.cgroup_root.is_absolute() {
        settings.cgroup_root.clone()
    } else {
        cgroup2_root.join(&settings.cgroup_root)
    };
    let source = Source {
        agent: parse_http_url(&settings.agent_url).context("ecs.agent_url")?,
        credentials: parse_http_url(&settings.credentials_url).context("ecs.credentials_url")?,
        settings,
        metrics,
        root,
        events,
        roles: HashMap::new(),
        chosen_pid: HashMap::new(),
        warned: HashSet::new(),
        last: None,
        agent_down_since: None,
    };
    Ok(tokio::spawn(source.run(stop)))
}

enum Role {
    Known(Option<RoleArn>),
    Pending {
        next_try: Instant,
        backoff: Duration,
    },
}

struct Source {
    settings: EcsSettings,
    metrics: Arc<Metrics>,
    agent: SocketAddr,
    credentials: SocketAddr,
    /// The `ecstasks.slice` directory.
    root: PathBuf,
    events: mpsc::Sender<EcsEvent>,
    /// By task ARN.
    roles: HashMap<String, Role>,
    /// The process whose netns stands for the task, kept while it lives so the task's spec
    /// (and its listeners) stay put.
    chosen_pid: HashMap<String, u32>,
    /// Things said once per task (host mode, missing slice, ...).
    warned: HashSet<(String, &'static str)>,
    last: Option<Vec<TaskSpec>>,
    agent_down_since: Option<Instant>,
}

impl Source {
    async fn run(mut self, stop: CancellationToken) {
        self.describe_node().await;
        let mut watcher = SliceWatcher::new(&self.root);
        // Tasks already running when the agent starts: their slices get programs first.
        for slice in watcher.existing() {
            self.send(EcsEvent::SliceAppeared(slice)).await;
        }
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut soon: Option<tokio::time::Instant> = None;
        loop {
            let wake_early = async {
                match soon {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {}
                _ = wake_early => {}
                change = watcher.next() => {
                    let mut now_please = false;
                    let mut any = false;
                    for c in change {
                        any = true;
                        match c {
                            SliceChange::Appeared(p) => self.send(EcsEvent::SliceAppeared(p)).await,
                            SliceChange::Gone(p) => self.send(EcsEvent::SliceGone(p)).await,
                            SliceChange::Inside => {}
                            SliceChange::Populated => now_please = true,
                        }
                    }
                    if !any {
                        continue;
                    }
                    // A populated slice is set up at once; other events are coalesced.
                    let delay = if now_please { Duration::ZERO } else { EVENT_DEBOUNCE };
                    let at = tokio::time::Instant::now() + delay;
                    soon = Some(soon.map_or(at, |s| s.min(at)));
                    continue;
                }
            }
            soon = None;
            if let Some(retry_in) = self.refresh().await {
                soon = Some(tokio::time::Instant::now() + retry_in);
            }
        }
    }

    async fn send(&self, event: EcsEvent) {
        let _ = self.events.send(event).await;
    }

    /// Reads the task list and publishes it if it changed. Returns when to try again early
    /// (a role still being learnt).
    async fn refresh(&mut self) -> Option<Duration> {
        let tasks = match self.fetch_tasks().await {
            Ok(t) => {
                if let Some(since) = self.agent_down_since.take() {
                    info!(after = ?since.elapsed(), "ECS agent introspection API reachable again");
                }
                t
            }
            Err(e) => {
                self.metrics.ecs_agent_errors.inc();
                if self.agent_down_since.is_none() {
                    warn!(
                        "cannot read the task list from the ECS agent at {}, keeping the current tasks: {e:#}",
                        self.agent
                    );
                    self.agent_down_since = Some(Instant::now());
                }
                return None;
            }
        };
        let now = Instant::now();
        // Placement first, with the roles known so far: the task's listeners come up at once,
        // its identity follows when the role is learnt (its connections wait for that).
        let (mut retry, due) = self.publish(&tasks, now).await;
        if !due.is_empty() {
            for (arn, pids) in due {
                self.attest(&arn, &pids, now).await;
            }
            let (again, _) = self.publish(&tasks, Instant::now()).await;
            retry = match (retry, again) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        retry
    }

    /// Publishes the task specs for `tasks` (if they changed). Returns when to look again early
    /// and the tasks whose role should be asked for now.
    async fn publish(
        &mut self,
        tasks: &[model::Task],
        now: Instant,
    ) -> (Option<Duration>, Vec<(String, Vec<u32>)>) {
        let mut specs = Vec::new();
        let mut retry: Option<Duration> = None;
        let mut soon = |d: Duration| retry = Some(retry.map_or(d, |r: Duration| r.min(d)));
        let mut due = Vec::new();
        let mut live = HashSet::new();
        for task in tasks.iter().filter(|t| t.is_live()) {
            if !self.settings.meshes(&task.family) {
                continue;
            }
            live.insert(task.arn.clone());
            let slice = cgroups::task_slice(&self.root, task.task_id());
            if !slice.is_dir() {
                self.warn_once(&task.arn, "no-slice", || format!(
                    "task {} ({}) has no cgroup {}: is ECS_ENABLE_TASK_CPU_MEM_LIMIT off? It is not meshed",
                    task.arn, task.family, slice.display()
                ));
                continue;
            }
            let pids = cgroups::pids(&slice);
            let Some(pid) = self.pick_pid(&task.arn, &pids) else {
                // Listed, but no process yet: a container's scope exists before its process
                // moves in, so look again shortly (the slice already has the programs).
                soon(EVENT_DEBOUNCE);
                continue;
            };
            if cgroups::in_agent_netns(pid) {
                self.warn_once(&task.arn, "host", || format!(
                    "task {} ({}) uses host network mode: it shares the node's network namespace and is not meshed",
                    task.arn, task.family
                ));
                continue;
            }
            if task.network_mode().is_none() && task.containers.len() > 1 {
                self.warn_once(&task.arn, "bridge", || format!(
                    "bridge-mode task {} ({}) has {} containers, each in its own netns: only the netns of pid {pid} is captured",
                    task.arn, task.family, task.containers.len()
                ));
            }
            let (role, pending) = match self.roles.get(&task.arn) {
                Some(Role::Known(r)) => (r.clone(), false),
                Some(Role::Pending { next_try, .. }) if *next_try > now => {
                    soon(*next_try - now);
                    (None, true)
                }
                _ => {
                    due.push((task.arn.clone(), pids.clone()));
                    (None, true)
                }
            };
            specs.push(TaskSpec {
                id: agent_task_id(&task.family, task.task_id()),
                cgroup: slice,
                netns: None,
                pid: Some(pid),
                addresses: task.addresses(),
                // awsvpc tasks are reached at their own address; host ports matter for bridge.
                host_ports: if task.network_mode().is_some() {
                    Vec::new()
                } else {
                    task.host_ports()
                },
                role_arn: role.map(|r| r.to_string()),
                role_pending: pending,
                family: Some(task.family.clone()),
                version: (!task.version.is_empty()).then(|| task.version.clone()),
            });
        }
        self.roles.retain(|arn, _| live.contains(arn));
        self.chosen_pid.retain(|arn, _| live.contains(arn));
        self.warned.retain(|(arn, _)| live.contains(arn));
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        self.metrics.ecs_tasks.set(specs.len() as i64);
        if self.last.as_ref() != Some(&specs) {
            debug!(tasks = specs.len(), "discovered tasks changed");
            self.last = Some(specs.clone());
            self.send(EcsEvent::Tasks(specs)).await;
        }
        (retry, due)
    }

    /// Logs and exports which cluster and instance this node is (`/v1/metadata`), so metrics
    /// and logs of a node can be told apart. Best effort: the task list is what matters.
    async fn describe_node(&self) {
        let answer = crate::http_client::get(self.agent, "/v1/metadata", REQUEST_TIMEOUT)
            .await
            .and_then(|(status, body)| {
                anyhow::ensure!(status.is_success(), "/v1/metadata answered {status}");
                Ok(serde_json::from_slice::<model::Metadata>(&body)?)
            });
        match answer {
            Ok(m) => {
                let unknown = || "unknown".to_owned();
                let cluster = m.cluster.unwrap_or_else(unknown);
                let instance = m.container_instance_arn.unwrap_or_else(unknown);
                let version = m.version.unwrap_or_else(unknown);
                info!(%cluster, container_instance = %instance, ecs_agent = %version, "ECS agent found");
                self.metrics.ecs_agent_info(cluster, instance, version);
            }
            Err(e) => warn!(
                "cannot read /v1/metadata from the ECS agent at {}: {e:#}",
                self.agent
            ),
        }
    }

    async fn fetch_tasks(&self) -> anyhow::Result<Vec<model::Task>> {
        let (status, body) =
            crate::http_client::get(self.agent, "/v1/tasks", REQUEST_TIMEOUT).await?;
        anyhow::ensure!(status.is_success(), "/v1/tasks answered {status}");
        let parsed: model::TasksResponse =
            serde_json::from_slice(&body).context("/v1/tasks is not the documented JSON")?;
        Ok(parsed.tasks)
    }

    fn pick_pid(&mut self, arn: &str, pids: &[u32]) -> Option<u32> {
        if let Some(p) = self.chosen_pid.get(arn)
            && pids.contains(p)
        {
            return Some(*p);
        }
        let p = *pids.first()?;
        self.chosen_pid.insert(arn.to_owned(), p);
        Some(p)
    }

    /// Asks for a task's role and records the outcome (known, or when to ask again).
    async fn attest(&mut self, arn: &str, pids: &[u32], now: Instant) {
        let backoff = match self.roles.get(arn) {
            Some(Role::Pending { backoff, .. }) => *backoff,
            _ => RETRY_MIN,
        };
        let role = match attest::attest(pids, self.credentials, REQUEST_TIMEOUT).await {
            Attestation::Role(role) => {
                self.metrics.ecs_attestation("role");
                info!(task = %arn, role = %role, "task role attested");
                Role::Known(Some(role))
            }
            Attestation::NoRole => {
                self.metrics.ecs_attestation("no_role");
                info!(task = %arn, "task has no IAM role: it gets no workload identity");
                Role::Known(None)
            }
            // No application process yet: asked again at the next container event or soon.
            Attestation::NotYet => Role::Pending {
                next_try: now + RETRY_MIN,
                backoff: RETRY_MIN,
            },
            Attestation::Retry(why) => {
                self.metrics.ecs_attestation("retry");
                info!(task = %arn, retry_in = ?backoff, "task role not known yet: {why}");
                Role::Pending {
                    next_try: now + backoff,
                    backoff: (backoff * 2).min(RETRY_MAX),
                }
            }
        };
        self.roles.insert(arn.to_owned(), role);
    }

    fn warn_once(&mut self, arn: &str, what: &'static str, message: impl FnOnce() -> String) {
        if self.warned.insert((arn.to_owned(), what)) {
            warn!("{}", message());
        }
    }
}

/// The agent's id for a discovered task (metric label `task`): family and the start of the
/// task id, readable and unique on a node.
pub fn agent_task_id(family: &str, task_id: &str) -> String {
    let short: String = task_id.chars().take(8).collect();
    format!("{family}-{short}")
}

enum SliceChange {
    Appeared(PathBuf),
    Gone(PathBuf),
    /// Something changed inside a task slice (a container scope appeared).
    Inside,
    /// A task slice's first process joined (or its last left).
    Populated,
}

/// inotify on `ecstasks.slice` (task slices) and on each task slice (container scopes). If the
/// root does not exist yet (no task has run on this node since boot), it is looked for again at
/// each poll by the periodic refresh instead.
struct SliceWatcher {
    root: PathBuf,
    inotify: Option<AsyncFd<Inotify>>,
    slices: HashMap<inotify::WatchDescriptor, PathBuf>,
    root_wd: Option<inotify::WatchDescriptor>,
}

impl SliceWatcher {
    fn new(root: &Path) -> SliceWatcher {
        let mut w = SliceWatcher {
            root: root.to_owned(),
            inotify: None,
            slices: HashMap::new(),
            root_wd: None,
        };
        // SAFETY: the Inotify owns its fd, and the AsyncFd owns the Inotify, so the fd stays open
        // and unchanged for as long as it is registered.
        let registered = Inotify::init().and_then(|i| unsafe {
            AsyncFd::register_with_interest(i, Interest::READABLE).map_err(std::io::Error::from)
        });
        match registered {
            Ok(i) => w.inotify = Some(i),
            Err(e) => warn!("inotify unavailable, new tasks are found by polling only: {e}"),
        }
        w.watch_root();
        w
    }

    fn watch_root(&mut self) {
        if self.root_wd.is_some() {
            return;
        }
        let Some(inotify) = &mut self.inotify else {
            return;
        };
        match inotify.get_mut().watches().add(
            &self.root,
            WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR,
        ) {
            Ok(wd) => self.root_wd = Some(wd),
            Err(e) => {
                debug!(root = %self.root.display(), "not watching the task cgroup root yet: {e}")
            }
        }
    }

    fn watch_slice(&mut self, slice: &Path) {
        let Some(inotify) = &mut self.inotify else {
            return;
        };
        if let Ok(wd) = inotify
            .get_mut()
            .watches()
            // CREATE: a container scope; MODIFY of `cgroup.events`: the slice became populated
            // (its first process, the pause container, joined): time to set the task up.
            .add(
                slice,
                WatchMask::CREATE | WatchMask::MODIFY | WatchMask::ONLYDIR,
            )
        {
            self.slices.insert(wd, slice.to_owned());
        }
    }

    /// Task slices present now (also starts watching them).
    fn existing(&mut self) -> Vec<PathBuf> {
        let found: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(cgroups::is_task_slice))
            .map(|e| e.path())
            .collect();
        for s in &found {
            self.watch_slice(s);
        }
        found
    }

    /// The next batch of changes; pends forever without inotify.
    async fn next(&mut self) -> Vec<SliceChange> {
        self.watch_root();
        let Some(inotify) = &mut self.inotify else {
            return std::future::pending().await;
        };
        let mut buffer = [0u8; 4096];
        let events = match readable(inotify, &mut buffer).await {
            Ok(e) => e,
            Err(e) => {
                warn!("inotify read failed, falling back to polling: {e}");
                self.inotify = None;
                return Vec::new();
            }
        };
        let mut changes = Vec::new();
        for (wd, mask, name) in events {
            let is_root = self.root_wd.as_ref() == Some(&wd);
            if is_root && let Some(name) = name.clone().filter(|n| cgroups::is_task_slice(n)) {
                let path = self.root.join(&name);
                if mask.contains(EventMask::CREATE) {
                    self.watch_slice(&path);
                    changes.push(SliceChange::Appeared(path));
                } else if mask.contains(EventMask::DELETE) {
                    changes.push(SliceChange::Gone(path));
                }
            } else if mask.contains(EventMask::IGNORED) {
                self.slices.remove(&wd);
                if is_root {
                    self.root_wd = None;
                }
            } else if mask.contains(EventMask::MODIFY) {
                if name.as_deref() == Some("cgroup.events") {
                    changes.push(SliceChange::Populated);
                }
            } else {
                changes.push(SliceChange::Inside);
            }
        }
        changes
    }
}

/// Waits for inotify events without blocking a runtime thread.
async fn readable(
    inotify: &mut AsyncFd<Inotify>,
    buffer: &mut [u8],
) -> std::io::Result<Vec<(inotify::WatchDescriptor, EventMask, Option<String>)>> {
    loop {
        let mut guard = inotify.readable_mut().await?;
        match guard.get_inner_mut().read_events(buffer) {
            Ok(events) => {
                return Ok(events
                    .map(|e| {
                        (
                            e.wd,
                            e.mask,
                            e.name.and_then(|n| n.to_str().map(str::to_owned)),
                        )
                    })
                    .collect());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) => return Err(e),
        }
    }
}
