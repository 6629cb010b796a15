//! ECS on a simulated node: a stand-in of the ECS agent (`mesh-testkit ecs-agent`) and
//! ECS-shaped tasks, for the tests of task discovery and IAM-role attestation.
//!
//! ```text
//!  node k netns (the EC2 host)
//!    127.0.0.1:51678  mesh-testkit ecs-agent: /v1/metadata, /v1/tasks[?dockerid=|?taskarn=],
//!                     /v2/credentials/<id>; re-reads <topology dir>/ecs-agent-*.json per request
//!  cgroups, below the node's (what systemd makes for ECS on Amazon Linux 2023):
//!    ecstasks.slice/                                  <- the agent's [ecs] cgroup_root
//!      ecstasks-<task id: 32 hex>.slice/              <- create_cgroup()
//!        docker-<pause id: 64 hex>.scope              <- start_pause()  (awsvpc only)
//!        docker-<app id: 64 hex>.scope                <- command(), start_containers()
//!  awsvpc task: one netns with eth0 198.18.k.x on the node bridge, shared by all its containers
//!  bridge task: one netns (and address) per container, no pause container
//! ```
//!
//! The stand-in serves exactly what [`api::State`] in its state file says; the harness
//! rewrites that file (a temporary file renamed over it) whenever a task changes, so the
//! stand-in never reads half a file and never needs to be told. What the real agent does
//! and the stand-in copies (from aws/amazon-ecs-agent, `ecs-agent/introspection/v1` and
//! `agent/handlers/v1/credentials_handler.go`):
//! - `?dockerid=` or `?taskarn=` answers ONE task object, not `{"Tasks":[..]}`;
//! - a `dockerid` of at most 12 characters is a prefix; more than one matching *container*
//!   (even of the same task) is 400; longer ids must match exactly; the pause container's
//!   id finds its task although the pause container is never listed (inferred: the agent
//!   tracks it like any container);
//! - error bodies of `/v1/tasks` are an empty task, `{"Arn":"",...,"Containers":null}`;
//! - containers and tasks come in no particular order (Go map iteration); the stand-in
//!   shuffles them on every request;
//! - credentials errors are `{"code":..,"message":..,"HTTPErrorCode":N}`: 400
//!   `InvalidIdInRequest` for an unknown id, 400 `NoIdInRequest` for none, 503
//!   `CredentialsUninitialized` for the first [`EcsTaskBuilder::fail_first`] requests;
//! - every request is logged (`request method=.. path=.. status=.. remote=..` on stderr),
//!   as the real agent writes credential requests to its audit log: see
//!   [`EcsAgent::requests`].
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use mesh_testbed::ecs::{EcsAgent, TaskStatus};
//! use mesh_testbed::{Agent, Testkit, Topology};
//! let topology = Topology::new()?;
//! let node = topology.add_node()?;
//! let kit = Testkit::locate()?;
//! let ecs = EcsAgent::start(&node, &kit, EcsAgent::DEFAULT_ADDR)?;
//! let mut orders = ecs.task("orders").role("orders").port(8080).build()?;
//! orders.start_running()?;                            // slice, pause, app, RUNNING
//! let mut web = ecs.task("web").role("web").build()?; // one step at a time:
//! web.create_cgroup()?;
//! web.start_pause()?;
//! web.register(TaskStatus::Pending)?;
//! let agent = Agent::start(&node, &format!("[capture]\nmode = \"all\"\n\n{}", ecs.config()))?;
//! let app = web.command("sleep")?.arg("600").spawn()?;
//! web.register(TaskStatus::Running)?;
//! assert!(web.credentials().unwrap().leaks_in(&agent.log()).is_empty());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::mesh::{ACCOUNT, role_arn};
use crate::process::Process;
use crate::testkit::Testkit;
use crate::topology::{Node, Task, toml_str};
use crate::{cgroup, http};

/// The region in every ARN the stand-in hands out.
pub const REGION: &str = "us-west-2";
/// The cluster every stand-in reports.
pub const CLUSTER: &str = "mesh-test";
/// `Version` of `/v1/metadata`.
pub const VERSION: &str = "Amazon ECS Agent - v1.90.0 (mesh-testkit stand-in)";
/// The directory of the node's cgroup that holds the task slices.
pub const SLICE_DIR: &str = "ecstasks.slice";

const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the credentials the stand-in hands out are valid (ECS: about 6 hours).
const CREDENTIALS_LIFETIME: Duration = Duration::from_secs(6 * 3600);

/// The JSON shapes of the real ECS agent, field for field (names, casing, omitted when
/// empty), and the stand-in's state file, which is made of them.
pub mod api {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    fn is_zero(n: &u16) -> bool {
        *n == 0
    }

    /// `GET /v1/metadata`. `ContainerInstanceArn` is `null` (not omitted) until the
    /// instance is registered.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct MetadataResponse {
        #[serde(rename = "Cluster")]
        pub cluster: String,
        #[serde(rename = "ContainerInstanceArn")]
        pub container_instance_arn: Option<String>,
        #[serde(rename = "Version")]
        pub version: String,
    }

    /// `GET /v1/tasks` (`{"Tasks":[...]}`, `[]` when there is none).
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct TasksResponse {
        #[serde(rename = "Tasks")]
        pub tasks: Vec<TaskResponse>,
    }

    /// One task; also the whole answer to `?dockerid=` and `?taskarn=`.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct TaskResponse {
        #[serde(rename = "Arn")]
        pub arn: String,
        /// Omitted when empty: the real agent blanks it when KnownStatus is STOPPED but
        /// the desired status is not, or KnownStatus is RUNNING and desired PENDING.
        #[serde(
            rename = "DesiredStatus",
            default,
            skip_serializing_if = "String::is_empty"
        )]
        pub desired_status: String,
        #[serde(rename = "KnownStatus")]
        pub known_status: String,
        #[serde(rename = "Family")]
        pub family: String,
        #[serde(rename = "Version")]
        pub version: String,
        /// Always present (`[]` before any container is created); the pause container is
        /// never in it.
        #[serde(rename = "Containers")]
        pub containers: Vec<ContainerResponse>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct ContainerResponse {
        #[serde(rename = "DockerId")]
        pub docker_id: String,
        #[serde(rename = "DockerName")]
        pub docker_name: String,
        #[serde(rename = "Name")]
        pub name: String,
        #[serde(rename = "Image")]
        pub image: String,
        #[serde(rename = "ImageID")]
        pub image_id: String,
        /// Go RFC 3339 with nanoseconds, trailing zeros trimmed: `2026-05-02T10:15:07.62Z`.
        #[serde(rename = "CreatedAt", default, skip_serializing_if = "Option::is_none")]
        pub created_at: Option<String>,
        #[serde(rename = "StartedAt", default, skip_serializing_if = "Option::is_none")]
        pub started_at: Option<String>,
        #[serde(rename = "Ports", default, skip_serializing_if = "Vec::is_empty")]
        pub ports: Vec<PortResponse>,
        /// Only for awsvpc tasks.
        #[serde(rename = "Networks", default, skip_serializing_if = "Vec::is_empty")]
        pub networks: Vec<Network>,
    }

    /// A port mapping; awsvpc tasks report HostPort = ContainerPort.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct PortResponse {
        #[serde(rename = "ContainerPort", default, skip_serializing_if = "is_zero")]
        pub container_port: u16,
        #[serde(rename = "Protocol", default, skip_serializing_if = "String::is_empty")]
        pub protocol: String,
        #[serde(rename = "HostPort", default, skip_serializing_if = "is_zero")]
        pub host_port: u16,
        #[serde(rename = "HostIp", default, skip_serializing_if = "String::is_empty")]
        pub host_ip: String,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct Network {
        #[serde(
            rename = "NetworkMode",
            default,
            skip_serializing_if = "String::is_empty"
        )]
        pub network_mode: String,
        #[serde(
            rename = "IPv4Addresses",
            default,
            skip_serializing_if = "Vec::is_empty"
        )]
        pub ipv4_addresses: Vec<String>,
        #[serde(
            rename = "IPv6Addresses",
            default,
            skip_serializing_if = "Vec::is_empty"
        )]
        pub ipv6_addresses: Vec<String>,
    }

    /// `GET /v2/credentials/<id>`, 200.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct CredentialsResponse {
        #[serde(rename = "RoleArn")]
        pub role_arn: String,
        #[serde(rename = "AccessKeyId")]
        pub access_key_id: String,
        #[serde(rename = "SecretAccessKey")]
        pub secret_access_key: String,
        #[serde(rename = "Token")]
        pub token: String,
        #[serde(rename = "Expiration")]
        pub expiration: String,
    }

    /// A credentials error body. The real agent's Go struct has no JSON tag on
    /// `HTTPErrorCode`, so the status is in the body too.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct ErrorMessage {
        pub code: String,
        pub message: String,
        #[serde(rename = "HTTPErrorCode")]
        pub http_error_code: u16,
    }

    /// The stand-in's state file.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct State {
        pub metadata: MetadataResponse,
        pub tasks: Vec<StateTask>,
        /// By credentials id (the last segment of `/v2/credentials/<id>`).
        pub credentials: BTreeMap<String, StateCredentials>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct StateTask {
        /// Served as is.
        pub task: TaskResponse,
        /// Containers the agent tracks but never lists (the pause container): found by
        /// `?dockerid=` all the same.
        #[serde(default)]
        pub internal_docker_ids: Vec<String>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct StateCredentials {
        pub task_arn: String,
        /// The first `fail_first` requests for this id answer 503 (counted by the
        /// stand-in process, from its start).
        #[serde(default)]
        pub fail_first: u32,
        pub response: CredentialsResponse,
    }
}

/// `KnownStatus` of a task, as the introspection API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    Pending,
    Running,
    Stopped,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Stopped => "STOPPED",
        }
    }
}

/// A task's network mode (EC2 launch type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// One netns per task, owned by a pause container; `Networks` in the listing.
    Awsvpc,
    /// One netns per container, no pause container, no `Networks`; ports have host ports.
    Bridge,
}

/// The node's `ecstasks.slice` (absolute path).
pub fn slice_root(node: &Node) -> PathBuf {
    node.cgroup_path().join(SLICE_DIR)
}

/// The node's `ecstasks.slice` relative to the cgroup2 mount: the agent's
/// `[ecs] cgroup_root`.
pub fn cgroup_root(node: &Node) -> Result<String> {
    relative_to_mount(&slice_root(node))
}

fn relative_to_mount(path: &Path) -> Result<String> {
    let mount = cgroup::mount()?;
    let rel = path
        .strip_prefix(mount)
        .with_context(|| format!("{} is not below {}", path.display(), mount.display()))?;
    Ok(rel.to_string_lossy().into_owned())
}

/// The agent's `[ecs]` section. [`EcsAgent::section`] fills it for a stand-in; change
/// fields as a test needs, then [`EcsSection::render`].
#[derive(Clone, Debug)]
pub struct EcsSection {
    pub agent_url: String,
    pub credentials_url: String,
    /// The node's `ecstasks.slice`, relative to the cgroup2 mount.
    pub cgroup_root: String,
    /// Humantime, e.g. `"1s"`.
    pub poll_interval: String,
    pub default: String,
}

impl EcsSection {
    /// The section for `node` with the ECS agent (and credentials endpoint) at `addr`.
    pub fn for_node(node: &Node, addr: SocketAddr) -> Result<Self> {
        let url = format!("http://{addr}");
        Ok(Self {
            agent_url: url.clone(),
            credentials_url: url,
            cgroup_root: cgroup_root(node)?,
            poll_interval: "1s".into(),
            default: "mesh".into(),
        })
    }

    pub fn render(&self) -> String {
        let mut s = String::from("[ecs]\n");
        for (key, value) in [
            ("agent_url", &self.agent_url),
            ("credentials_url", &self.credentials_url),
            ("cgroup_root", &self.cgroup_root),
            ("poll_interval", &self.poll_interval),
            ("default", &self.default),
        ] {
            let _ = writeln!(s, "{key} = {}", toml_str(value));
        }
        s
    }
}

/// One request as the stand-in logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    pub status: u16,
    /// The client's address.
    pub remote: String,
}

impl Request {
    /// Parses a `request method=.. path=.. status=.. remote=..` line.
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("request ")?;
        let mut fields = BTreeMap::new();
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            fields.insert(k, v);
        }
        Some(Self {
            method: fields.get("method")?.to_string(),
            path: fields.get("path")?.to_string(),
            status: fields.get("status")?.parse().ok()?,
            remote: fields.get("remote")?.to_string(),
        })
    }

    /// The credentials id if this was `GET /v2/credentials/<id>`.
    pub fn credentials_id(&self) -> Option<&str> {
        let path = self.path.split('?').next().unwrap_or_default();
        path.strip_prefix("/v2/credentials/")
    }
}

/// The state file, shared by the stand-in handle and its tasks; rewritten atomically on
/// every change.
struct StateFile {
    path: PathBuf,
    state: Mutex<api::State>,
}

impl StateFile {
    fn update<T>(&self, change: impl FnOnce(&mut api::State) -> T) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let out = change(&mut state);
        let json = serde_json::to_vec_pretty(&*state)?;
        let staged = self.path.with_extension("json.new");
        fs::write(&staged, json).with_context(|| format!("write {}", staged.display()))?;
        fs::rename(&staged, &self.path)
            .with_context(|| format!("rename {} over the state", staged.display()))?;
        Ok(out)
    }
}

/// `mesh-testkit ecs-agent` running in a node's namespace: the ECS agent's introspection
/// API and the credentials endpoint, serving the tasks made with [`EcsAgent::task`].
/// Killed when dropped; its state file and log stay in the topology's directory.
pub struct EcsAgent {
    node: Node,
    kit: Testkit,
    addr: SocketAddr,
    state: Arc<StateFile>,
    log: PathBuf,
    process: Option<Process>,
}

impl EcsAgent {
    /// Where the real ECS agent serves its introspection API.
    pub const DEFAULT_ADDR: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 51678));

    /// Makes the node's `ecstasks.slice` (as the ECS agent does at start-up), writes an
    /// empty state and starts the stand-in on `addr` in the node's namespace, waiting
    /// until it listens.
    pub fn start(node: &Node, kit: &Testkit, addr: SocketAddr) -> Result<Self> {
        cgroup::create(&slice_root(node))?;
        let path = node.new_file(&format!("ecs-agent-{}", node.name()), "json");
        let log = path.with_extension("log");
        let state = Arc::new(StateFile {
            path,
            state: Mutex::new(api::State {
                metadata: api::MetadataResponse {
                    cluster: CLUSTER.into(),
                    container_instance_arn: Some(format!(
                        "arn:aws:ecs:{REGION}:{ACCOUNT}:container-instance/{CLUSTER}/{}",
                        random_hex(32)?
                    )),
                    version: VERSION.into(),
                },
                tasks: Vec::new(),
                credentials: BTreeMap::new(),
            }),
        });
        state.update(|_| ())?;
        node.register_agent_log(&log);
        let mut agent = Self {
            node: node.clone(),
            kit: kit.clone(),
            addr,
            state,
            log,
            process: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = self.node.command(self.kit.bin())?;
        command
            .arg("ecs-agent")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--state")
            .arg(&self.state.path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut process = Process::spawn(&mut command)?;
        match process.first_stdout_line(LISTEN_TIMEOUT) {
            Ok(Some(line)) if line.starts_with("listening on ") => {}
            other => bail!(
                "mesh-testkit ecs-agent on {} in {} did not start ({other:?}); log: {}",
                self.addr,
                self.node.name(),
                self.log_text().trim()
            ),
        }
        self.process = Some(process);
        Ok(())
    }

    /// Kills the stand-in (the agent under test then sees connection refused); the state
    /// stays. [`EcsAgent::restart`] brings it back.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Kills and restarts the stand-in on the same address with the same state, as an ECS
    /// agent restart does; the `fail_first` counts start again from zero.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cluster(&self) -> String {
        self.state().metadata.cluster
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The state file the stand-in reads on every request.
    pub fn state_path(&self) -> &Path {
        &self.state.path
    }

    /// A copy of the current state.
    pub fn state(&self) -> api::State {
        self.state
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the state by hand (e.g. a ContainerInstanceArn of `None`, an odd task) and
    /// rewrites the file.
    pub fn update_state<T>(&self, change: impl FnOnce(&mut api::State) -> T) -> Result<T> {
        self.state.update(change)
    }

    /// The agent's `[ecs]` section for this stand-in and node, with defaults.
    pub fn section(&self) -> Result<EcsSection> {
        EcsSection::for_node(&self.node, self.addr)
    }

    /// [`EcsAgent::section`], rendered.
    pub fn config(&self) -> String {
        self.section()
            .expect("the stand-in started, so cgroup2 is mounted")
            .render()
    }

    /// Starts describing a task of `family` on this node (awsvpc, revision 1, one
    /// container `app`, no role, unless told otherwise).
    pub fn task(&self, family: &str) -> EcsTaskBuilder<'_> {
        EcsTaskBuilder {
            agent: self,
            family: family.to_string(),
            version: "1".into(),
            role: None,
            fail_first: 0,
            mode: NetworkMode::Awsvpc,
            containers: Vec::new(),
            task_id: None,
        }
    }

    /// `GET path` from the node's namespace (HTTP/1.0, so the body is the whole rest).
    pub fn get(&self, path: &str) -> Result<http::Response> {
        http::get(&self.node.netns_path(), self.addr, path, HTTP_TIMEOUT)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything the stand-in logged (one `request ...` line per request).
    pub fn log(&self) -> String {
        self.log_text()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Every request so far, in order (also those of earlier runs of a restarted stand-in).
    pub fn requests(&self) -> Vec<Request> {
        self.log_text().lines().filter_map(Request::parse).collect()
    }

    /// How many requests for `/v2/credentials/<id>` the stand-in answered.
    pub fn credential_requests(&self, id: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.credentials_id() == Some(id))
            .count()
    }

    /// Waits until at least `count` requests satisfy `matches`; returns them.
    pub fn wait_requests(
        &self,
        count: usize,
        timeout: Duration,
        matches: impl Fn(&Request) -> bool,
    ) -> Result<Vec<Request>> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<Request> = self.requests().into_iter().filter(&matches).collect();
            if seen.len() >= count {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {} of {count} expected requests reached the ECS agent stand-in in {timeout:?}: {seen:?}",
                    seen.len()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One container of a task to be built.
#[derive(Clone, Debug)]
struct ContainerSpec {
    name: String,
    image: Option<String>,
    /// (container port, host port); host port 0: awsvpc (= container port) or a dynamic
    /// one in bridge mode.
    ports: Vec<(u16, u16)>,
}

/// Describes an [`EcsTask`]; from [`EcsAgent::task`].
pub struct EcsTaskBuilder<'a> {
    agent: &'a EcsAgent,
    family: String,
    version: String,
    role: Option<String>,
    fail_first: u32,
    mode: NetworkMode,
    containers: Vec<ContainerSpec>,
    task_id: Option<String>,
}

impl EcsTaskBuilder<'_> {
    /// Task definition revision (`Version`), default "1".
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// The task role `arn:aws:iam::111122223333:role/<role>`: the task gets a credentials
    /// id, its containers `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
    pub fn role(mut self, role: &str) -> Self {
        self.role = Some(role.to_string());
        self
    }

    /// The first `n` credentials requests answer 503 (not ready yet).
    pub fn fail_first(mut self, n: u32) -> Self {
        self.fail_first = n;
        self
    }

    /// Bridge network mode instead of awsvpc.
    pub fn bridge(mut self) -> Self {
        self.mode = NetworkMode::Bridge;
        self
    }

    /// Adds a container (the first one added replaces the default `app`).
    pub fn container(mut self, name: &str) -> Self {
        self.containers.push(ContainerSpec {
            name: name.to_string(),
            image: None,
            ports: Vec::new(),
        });
        self
    }

    /// The image of the last container added (default
    /// `111122223333.dkr.ecr.us-west-2.amazonaws.com/<family>:latest`).
    pub fn image(mut self, image: &str) -> Self {
        self.last_container().image = Some(image.to_string());
        self
    }

    /// A TCP port of the last container added; bridge mode maps it to a dynamic host port.
    pub fn port(self, container_port: u16) -> Self {
        self.host_port(container_port, 0)
    }

    /// A TCP port mapping of the last container added (bridge mode).
    pub fn host_port(mut self, container_port: u16, host_port: u16) -> Self {
        self.last_container()
            .ports
            .push((container_port, host_port));
        self
    }

    /// A fixed task id (32 lowercase hex digits) instead of a random one, e.g. for two
    /// tasks whose ids share their first 8 digits.
    pub fn task_id(mut self, id: &str) -> Self {
        self.task_id = Some(id.to_string());
        self
    }

    fn last_container(&mut self) -> &mut ContainerSpec {
        if self.containers.is_empty() {
            self.containers.push(ContainerSpec {
                name: "app".into(),
                image: None,
                ports: Vec::new(),
            });
        }
        self.containers.last_mut().expect("just ensured")
    }

    /// Makes the task's network namespace(s) (on the node's bridge, like
    /// [`Node::add_task`]) and its identities; no cgroup, no process, not listed yet.
    pub fn build(mut self) -> Result<EcsTask> {
        let family = self.family.clone();
        ensure!(
            !family.is_empty()
                && family.len() <= 40
                && family
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "family {family:?}: use 1-40 letters, digits, '-' or '_'"
        );
        let task_id = match self.task_id.take() {
            Some(id) => id,
            None => random_hex(32)?,
        };
        ensure!(
            task_id.len() == 32
                && task_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "task id {task_id:?}: 32 lowercase hex digits"
        );
        self.last_container();
        let agent = self.agent;
        let node = agent.node.clone();
        let cluster = agent.cluster();
        let arn = format!("arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/{task_id}");
        let slice = slice_root(&node).join(format!("ecstasks-{task_id}.slice"));
        let role_arn = self.role.as_deref().map(role_arn);
        let credentials = match &role_arn {
            Some(role_arn) => Some(Credentials::derive(
                &uuid_v4()?,
                role_arn,
                &arn,
                self.fail_first,
            )),
            None => None,
        };
        let short = &task_id[..12];
        let scope = |docker_id: &str| slice.join(format!("docker-{docker_id}.scope"));

        let mut ids = Vec::new();
        for _ in &self.containers {
            ids.push(random_hex(64)?);
        }
        let (pause, netns_tasks) = match self.mode {
            NetworkMode::Awsvpc => {
                let pause_id = random_hex(64)?;
                let base = node.add_task_at(&format!("{family}-{short}"), scope(&ids[0]))?;
                let pause = Pause {
                    docker_id: pause_id.clone(),
                    task: base
                        .with_cgroup(scope(&pause_id))?
                        .with_container_env(Vec::new()),
                };
                let tasks = ids
                    .iter()
                    .map(|id| base.with_cgroup(scope(id)))
                    .collect::<Result<Vec<_>>>()?;
                (Some(pause), tasks)
            }
            NetworkMode::Bridge => {
                let mut tasks = Vec::new();
                for (spec, id) in self.containers.iter().zip(&ids) {
                    let name = format!("{family}-{short}-{}", spec.name);
                    tasks.push(node.add_task_at(&name, scope(id))?);
                }
                (None, tasks)
            }
        };

        let mut containers = Vec::new();
        for ((spec, docker_id), task) in self.containers.iter().zip(ids).zip(netns_tasks) {
            let mut env = vec![
                ("AWS_EXECUTION_ENV".to_string(), "AWS_ECS_EC2".to_string()),
                (
                    "ECS_CONTAINER_METADATA_URI".to_string(),
                    format!("http://169.254.170.2/v3/{docker_id}"),
                ),
                (
                    "ECS_CONTAINER_METADATA_URI_V4".to_string(),
                    format!("http://169.254.170.2/v4/{docker_id}"),
                ),
            ];
            if let Some(credentials) = &credentials {
                env.push((
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI".to_string(),
                    credentials.relative_uri(),
                ));
            }
            let mut ports = Vec::new();
            for &(container_port, host_port) in &spec.ports {
                let host_port = match (self.mode, host_port) {
                    (NetworkMode::Awsvpc, _) => container_port,
                    (NetworkMode::Bridge, 0) => 32768 + random_u16()? % 28000,
                    (NetworkMode::Bridge, port) => port,
                };
                ports.push(api::PortResponse {
                    container_port,
                    protocol: "tcp".into(),
                    host_port,
                    host_ip: String::new(),
                });
            }
            containers.push(EcsContainer {
                name: spec.name.clone(),
                docker_name: docker_name(&family, &self.version, &spec.name)?,
                image: spec.image.clone().unwrap_or_else(|| {
                    format!("{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{family}:latest")
                }),
                image_id: format!("sha256:{}", sha256_hex(&format!("{family}/{}", spec.name))),
                docker_id,
                ports,
                task: task.with_container_env(env),
            });
        }
        Ok(EcsTask {
            node,
            state: agent.state.clone(),
            family,
            version: self.version,
            mode: self.mode,
            task_id,
            arn,
            slice,
            containers,
            pause,
            credentials,
            created_at: None,
            started_at: None,
            processes: Vec::new(),
            pause_pid: None,
        })
    }
}

/// One (non-internal) container of an [`EcsTask`].
pub struct EcsContainer {
    name: String,
    docker_id: String,
    docker_name: String,
    image: String,
    image_id: String,
    ports: Vec<api::PortResponse>,
    /// Its netns and address, its scope cgroup and its environment.
    task: Task,
}

impl EcsContainer {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 64 hex digits.
    pub fn docker_id(&self) -> &str {
        &self.docker_id
    }

    /// `ecs-<family>-<version>-<name>-<20 hex>`.
    pub fn docker_name(&self) -> &str {
        &self.docker_name
    }

    pub fn image(&self) -> &str {
        &self.image
    }

    pub fn ports(&self) -> &[api::PortResponse] {
        &self.ports
    }

    /// The container as a harness [`Task`]: [`Task::command`] runs in its netns, in its
    /// `docker-<id>.scope`, with its environment; usable with [`Testkit::serve`] once the
    /// scope exists ([`EcsTask::create_container_cgroups`]).
    pub fn task(&self) -> &Task {
        &self.task
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.task.ip()
    }

    /// Absolute path of its `docker-<id>.scope`.
    pub fn cgroup_path(&self) -> &Path {
        self.task.cgroup_path()
    }

    /// Its scope relative to the cgroup2 mount, as `/proc/<pid>/cgroup` shows it (after
    /// `0::/`).
    pub fn cgroup_relative(&self) -> String {
        self.task.cgroup_relative()
    }
}

struct Pause {
    docker_id: String,
    task: Task,
}

/// The task role's credentials as the stand-in hands them out. The secret values look
/// like AWS's (ASIA... access key, 40-character secret, long token), are unique per
/// credentials id and are deterministic for it, so a test can search any text for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// A UUID: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/<id>`.
    pub id: String,
    pub role_arn: String,
    pub task_arn: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: String,
    pub fail_first: u32,
}

impl Credentials {
    fn derive(id: &str, role_arn: &str, task_arn: &str, fail_first: u32) -> Self {
        const BASE32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let expiration = time::OffsetDateTime::now_utc() + CREDENTIALS_LIFETIME;
        Self {
            id: id.to_string(),
            role_arn: role_arn.to_string(),
            task_arn: task_arn.to_string(),
            access_key_id: format!("ASIA{}", derived(id, "access-key-id", 16, BASE32)),
            secret_access_key: derived(id, "secret-access-key", 40, BASE64),
            token: format!("IQoJ{}", derived(id, "token", 380, BASE64)),
            expiration: go_time(expiration.replace_nanosecond(0).unwrap_or(expiration)),
            fail_first,
        }
    }

    /// `/v2/credentials/<id>`.
    pub fn relative_uri(&self) -> String {
        format!("/v2/credentials/{}", self.id)
    }

    /// AccessKeyId, SecretAccessKey and Token: what must never be logged or kept.
    pub fn secrets(&self) -> [&str; 3] {
        [&self.access_key_id, &self.secret_access_key, &self.token]
    }

    /// Which secrets appear in `text`, whole or as any 16-character piece (a truncated or
    /// wrapped value is a leak too): e.g. `["SecretAccessKey (piece at 8)"]`. Empty when
    /// none does.
    pub fn leaks_in(&self, text: &str) -> Vec<String> {
        const PIECE: usize = 16;
        let mut leaks = Vec::new();
        for (name, secret) in [
            ("AccessKeyId", &self.access_key_id),
            ("SecretAccessKey", &self.secret_access_key),
            ("Token", &self.token),
        ] {
            if text.contains(secret.as_str()) {
                leaks.push(format!("{name} (whole)"));
                continue;
            }
            if let Some(at) =
                (0..=secret.len() - PIECE).find(|&i| text.contains(&secret[i..i + PIECE]))
            {
                leaks.push(format!("{name} (piece at {at})"));
            }
        }
        leaks
    }

    fn response(&self) -> api::CredentialsResponse {
        api::CredentialsResponse {
            role_arn: self.role_arn.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            token: self.token.clone(),
            expiration: self.expiration.clone(),
        }
    }
}

/// An ECS task on a node, driven one lifecycle step at a time (or all at once with
/// [`EcsTask::start_running`]). Dropping it kills its processes, removes its cgroups and
/// takes it out of the stand-in's state; the topology removes its namespaces.
pub struct EcsTask {
    node: Node,
    state: Arc<StateFile>,
    family: String,
    version: String,
    mode: NetworkMode,
    task_id: String,
    arn: String,
    slice: PathBuf,
    containers: Vec<EcsContainer>,
    pause: Option<Pause>,
    credentials: Option<Credentials>,
    created_at: Option<String>,
    started_at: Option<String>,
    /// The pause process and the idle app processes this handle started.
    processes: Vec<Process>,
    pause_pid: Option<u32>,
}

impl EcsTask {
    pub fn family(&self) -> &str {
        &self.family
    }

    /// The node the task runs on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Task definition revision.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn network_mode(&self) -> NetworkMode {
        self.mode
    }

    /// 32 lowercase hex digits: the last segment of the ARN and of the slice name.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// `arn:aws:ecs:us-west-2:111122223333:task/<cluster>/<task id>`.
    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The agent's id of this task: `<family>-<first 8 hex of the task id>`.
    pub fn agent_task_id(&self) -> String {
        format!("{}-{}", self.family, &self.task_id[..8])
    }

    /// `arn:aws:iam::111122223333:role/<role>` if the task has a role.
    pub fn role_arn(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.role_arn.as_str())
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn containers(&self) -> &[EcsContainer] {
        &self.containers
    }

    pub fn container(&self, name: &str) -> Option<&EcsContainer> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The first container as a harness [`Task`] (see [`EcsContainer::task`]).
    pub fn task(&self) -> &Task {
        &self.containers[0].task
    }

    /// The task's address (awsvpc), or its first container's (bridge).
    pub fn ip(&self) -> Ipv4Addr {
        self.task().ip()
    }

    /// The netns of the task (awsvpc), or of its first container (bridge).
    pub fn netns_path(&self) -> PathBuf {
        self.task().netns_path()
    }

    /// Absolute path of `ecstasks-<task id>.slice`.
    pub fn slice_path(&self) -> &Path {
        &self.slice
    }

    /// The slice relative to the cgroup2 mount.
    pub fn slice_relative(&self) -> String {
        relative_to_mount(&self.slice).expect("task slices live under the mount")
    }

    /// The pause container's docker id (awsvpc only).
    pub fn pause_docker_id(&self) -> Option<&str> {
        self.pause.as_ref().map(|p| p.docker_id.as_str())
    }

    /// The pause process, once [`EcsTask::start_pause`] ran.
    pub fn pause_pid(&self) -> Option<u32> {
        self.pause_pid
    }

    /// Absolute path of the pause container's scope (awsvpc only).
    pub fn pause_cgroup_path(&self) -> Option<&Path> {
        self.pause.as_ref().map(|p| p.task.cgroup_path())
    }

    /// Every process in the task's slice.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        collect_pids(&self.slice, &mut pids);
        pids
    }

    /// Step (a): the task's slice, as systemd makes it before any container starts.
    pub fn create_cgroup(&mut self) -> Result<()> {
        cgroup::create(&self.slice)
    }

    /// Step (b), awsvpc only: the pause container, a long-lived process in the task's netns
    /// and in `docker-<pause id>.scope`, with no ECS variables in its environment, never
    /// listed in `/v1/tasks`.
    pub fn start_pause(&mut self) -> Result<u32> {
        let Some(pause) = &self.pause else {
            bail!("{}: bridge-mode tasks have no pause container", self.arn);
        };
        ensure!(
            self.pause_pid.is_none(),
            "{}: pause already started",
            self.arn
        );
        self.require_slice()?;
        cgroup::create(pause.task.cgroup_path())?;
        let mut command = pause.task.command("sleep")?;
        command.arg("infinity").stdin(Stdio::null());
        let process = Process::spawn(&mut command)?;
        let pid = process.pid();
        self.processes.push(process);
        self.pause_pid = Some(pid);
        Ok(pid)
    }

    /// Step (c): lists the task in the stand-in with `status` (again to change it) and its
    /// containers, and makes its credentials known. PENDING lists the containers as
    /// created (CreatedAt), RUNNING also as started (StartedAt). DesiredStatus is RUNNING,
    /// or STOPPED with STOPPED.
    pub fn register(&mut self, status: TaskStatus) -> Result<()> {
        self.publish(status, true)
    }

    /// Like [`EcsTask::register`], but with `Containers: []`, as the agent lists a task it
    /// has received but whose containers it has not created yet.
    pub fn register_without_containers(&mut self, status: TaskStatus) -> Result<()> {
        self.publish(status, false)
    }

    fn publish(&mut self, status: TaskStatus, with_containers: bool) -> Result<()> {
        if with_containers {
            if self.created_at.is_none() {
                self.created_at = Some(now());
            }
            if status == TaskStatus::Running && self.started_at.is_none() {
                self.started_at = Some(now());
            }
        }
        let containers = if with_containers {
            self.containers
                .iter()
                .map(|c| api::ContainerResponse {
                    docker_id: c.docker_id.clone(),
                    docker_name: c.docker_name.clone(),
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_id: c.image_id.clone(),
                    created_at: self.created_at.clone(),
                    started_at: self.started_at.clone(),
                    ports: c.ports.clone(),
                    networks: match self.mode {
                        NetworkMode::Awsvpc => vec![api::Network {
                            network_mode: "awsvpc".into(),
                            ipv4_addresses: vec![c.ip().to_string()],
                            ipv6_addresses: Vec::new(),
                        }],
                        NetworkMode::Bridge => Vec::new(),
                    },
                })
                .collect()
        } else {
            Vec::new()
        };
        let entry = api::StateTask {
            task: api::TaskResponse {
                arn: self.arn.clone(),
                desired_status: match status {
                    TaskStatus::Stopped => "STOPPED",
                    _ => "RUNNING",
                }
                .into(),
                known_status: status.as_str().into(),
                family: self.family.clone(),
                version: self.version.clone(),
                containers,
            },
            internal_docker_ids: self.pause.iter().map(|p| p.docker_id.clone()).collect(),
        };
        let credentials = self.credentials.clone();
        self.state.update(|state| {
            match state
                .tasks
                .iter_mut()
                .find(|t| t.task.arn == entry.task.arn)
            {
                Some(existing) => *existing = entry,
                None => state.tasks.push(entry),
            }
            if let Some(c) = credentials {
                state
                    .credentials
                    .entry(c.id.clone())
                    .or_insert(api::StateCredentials {
                        task_arn: c.task_arn.clone(),
                        fail_first: c.fail_first,
                        response: c.response(),
                    });
            }
        })
    }

    /// Makes the `docker-<id>.scope` of every container (as Docker does when it starts
    /// them); [`EcsTask::command`] does it too.
    pub fn create_container_cgroups(&mut self) -> Result<()> {
        self.require_slice()?;
        for c in &self.containers {
            cgroup::create(c.task.cgroup_path())?;
        }
        Ok(())
    }

    /// Step (d): a command in the first container: its netns, its `docker-<id>.scope`
    /// (made if missing), and only the container's environment (`ECS_CONTAINER_METADATA_URI_V4`
    /// and, with a role, `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, plus `PATH`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let name = self.containers[0].name.clone();
        self.command_in(&name, program)
    }

    /// [`EcsTask::command`] in the container called `container`.
    pub fn command_in(
        &self,
        container: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        self.require_slice()?;
        let c = self
            .container(container)
            .with_context(|| format!("{} has no container {container:?}", self.arn))?;
        cgroup::create(c.task.cgroup_path())?;
        c.task.command(program)
    }

    /// Starts an idle long-lived process (`sleep infinity`) in every container, kept (and
    /// killed) by this handle, so each container has a process whose environment the
    /// agent can read. Returns their pids, in container order.
    pub fn start_containers(&mut self) -> Result<Vec<u32>> {
        let names: Vec<String> = self.containers.iter().map(|c| c.name.clone()).collect();
        let mut pids = Vec::new();
        for name in names {
            let mut command = self.command_in(&name, "sleep")?;
            command.arg("infinity").stdin(Stdio::null());
            let process = Process::spawn(&mut command)?;
            pids.push(process.pid());
            self.processes.push(process);
        }
        Ok(pids)
    }

    /// Every step for a task that is simply running: slice, PENDING, pause (awsvpc),
    /// containers with an idle process each, RUNNING.
    pub fn start_running(&mut self) -> Result<()> {
        self.create_cgroup()?;
        self.register(TaskStatus::Pending)?;
        if self.pause.is_some() {
            self.start_pause()?;
        }
        self.start_containers()?;
        self.register(TaskStatus::Running)
    }

    /// Step (e): kills every process of the task, removes its cgroups and lists it as
    /// STOPPED (it stays listed, and its credentials stay known, until
    /// [`EcsTask::cleanup`], as with the real agent until its cleanup).
    pub fn stop(&mut self) -> Result<()> {
        self.kill()?;
        if self.is_listed() {
            self.register(TaskStatus::Stopped)?;
        }
        Ok(())
    }

    /// Kills every process of the task and removes its cgroups, without touching the
    /// listing (the containers died; the agent has not noticed yet).
    pub fn kill(&mut self) -> Result<()> {
        let result = cgroup::kill_and_remove(&self.slice);
        // Dead already; reap them.
        self.processes.clear();
        self.pause_pid = None;
        result
    }

    /// The agent's task cleanup: kills and removes what is left, and the task leaves
    /// `/v1/tasks`; its credentials id becomes unknown (400).
    pub fn cleanup(&mut self) -> Result<()> {
        let killed = self.kill();
        let arn = self.arn.clone();
        let id = self.credentials.as_ref().map(|c| c.id.clone());
        self.state.update(|state| {
            state.tasks.retain(|t| t.task.arn != arn);
            if let Some(id) = id {
                state.credentials.remove(&id);
            }
        })?;
        killed
    }

    fn is_listed(&self) -> bool {
        let state = self.state.state.lock().unwrap_or_else(|e| e.into_inner());
        state.tasks.iter().any(|t| t.task.arn == self.arn)
    }

    fn require_slice(&self) -> Result<()> {
        ensure!(
            self.slice.is_dir(),
            "{}: no task cgroup {} (create_cgroup() first; stop() removes it)",
            self.arn,
            self.slice.display()
        );
        Ok(())
    }
}

impl Drop for EcsTask {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failing test unwinds. After the
        // topology's own teardown the cgroup and the state file are already gone.
        if let Err(e) = cgroup::kill_and_remove(&self.slice) {
            eprintln!("mesh_testbed: removing ECS task {}: {e:#}", self.arn);
        }
        self.processes.clear();
        if self.state.path.parent().is_some_and(Path::exists) {
            let _ = self.cleanup();
        }
    }
}

fn collect_pids(cgroup: &Path, pids: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// `ecs-<family>-<version>-<container>-<20 hex>`, as the ECS agent names Docker containers.
fn docker_name(family: &str, version: &str, container: &str) -> Result<String> {
    Ok(format!(
        "ecs-{family}-{version}-{container}-{}",
        random_hex(20)?
    ))
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf)
}

fn random_hex(digits: usize) -> Result<String> {
    let bytes = random_bytes(digits.div_ceil(2))?;
    let mut hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.truncate(digits);
    Ok(hex)
}

fn random_u16() -> Result<u16> {
    let b = random_bytes(2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

/// A random (version 4) UUID, as ECS credentials ids are.
fn uuid_v4() -> Result<String> {
    let mut b = random_bytes(16)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn sha256_hex(input: &str) -> String {
    Sha256::digest(input.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `len` characters of `alphabet`, derived from `id` and `label` (SHA-256 in counter mode):
/// random-looking, but the same for the same id.
fn derived(id: &str, label: &str, len: usize, alphabet: &[u8]) -> String {
    let mut out = String::with_capacity(len);
    let mut counter = 0u32;
    while out.len() < len {
        let block = Sha256::new()
            .chain_update(id.as_bytes())
            .chain_update([0])
            .chain_update(label.as_bytes())
            .chain_update(counter.to_le_bytes())
            .finalize();
        for byte in block {
            if out.len() == len {
                break;
            }
            out.push(alphabet[usize::from(byte) % alphabet.len()] as char);
        }
        counter += 1;
    }
    out
}

fn now() -> String {
    go_time(time::OffsetDateTime::now_utc())
}

/// Go's `time.Time` JSON (RFC 3339, nanoseconds with trailing zeros trimmed), in UTC:
/// `2026-05-02T10:15:07.62Z`.
fn go_time(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let nanos = t.nanosecond();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_trims_like_rfc3339nano() {
        let secs = 1_777_716_907_i128; // 2026-05-02T10:15:07Z
        let at = |nanos: i128| {
            time::OffsetDateTime::from_unix_timestamp_nanos(secs * 1_000_000_000 + nanos).unwrap()
        };
        assert_eq!(go_time(at(620_000_000)), "2026-05-02T10:15:07.62Z");
        assert_eq!(go_time(at(0)), "2026-05-02T10:15:07Z");
        assert_eq!(go_time(at(1)), "2026-05-02T10:15:07.000000001Z");
    }

    #[test]
    fn credentials_are_deterministic_per_id_and_aws_shaped() {
        let a = Credentials::derive("id-1", "arn:r", "arn:t", 0);
        let b = Credentials::derive("id-1", "arn:r", "arn:t", 0);
        let c = Credentials::derive("id-2", "arn:r", "arn:t", 0);
        assert_eq!(a.secrets(), b.secrets());
        assert_ne!(a.secret_access_key, c.secret_access_key);
        assert!(a.access_key_id.starts_with("ASIA") && a.access_key_id.len() == 20);
        assert_eq!(a.secret_access_key.len(), 40);
        assert!(a.leaks_in("nothing here").is_empty());
        let piece = &a.token[100..120];
        assert_eq!(
            a.leaks_in(&format!("x {piece} y")),
            ["Token (piece at 100)"]
        );
        assert_eq!(
            a.leaks_in(&a.secret_access_key),
            ["SecretAccessKey (whole)"]
        );
    }

    #[test]
    fn request_lines_parse() {
        let r = Request::parse(
            "request method=GET path=/v2/credentials/abc status=503 remote=127.0.0.1:4000",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.credentials_id(), Some("abc"));
        assert!(Request::parse("listening on x").is_none());
    }

    #[test]
    fn uuid_shape() {
        let u = uuid_v4().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
