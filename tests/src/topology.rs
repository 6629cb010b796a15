//! Simulated ECS nodes on the real kernel.
//!
//! ```text
//!   node k ("node netns" = the EC2 host)          task netns (one per task)
//!   br0 198.18.k.1/24  ── vethJ ═══════════════ eth0 198.18.k.(J+2)/24, default via .1
//!   to-nodeM 198.19.L.k/24 ═══ (link L) ═══ to-nodek 198.19.L.M/24 in node M
//! ```
//! Cgroups: `<cgroup2>/meshtest-<owner>-<n>/<node>/<task>` is a task's leaf; `agent` and
//! `unmeshed` beside the node subtrees hold the agents and every other process the
//! harness starts, so tearing the subtree down also kills everything the test started.
//!
//! Every interface lives in a namespace the topology made (a veth is created with its peer
//! directly in the target namespace), so nothing is added to the host's own namespace,
//! and interface names only need to be unique within their namespace.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{self, ip_in};
use crate::{cgroup, process, sweep};

/// One simulated cluster: nodes, their tasks and the links between nodes. Everything it
/// made is removed when it is dropped, also while a failing test unwinds.
pub struct Topology {
    shared: Arc<Shared>,
}

struct Shared {
    /// `meshtest-<owner>-<n>`: the cgroup subtree, the temp directory, and the prefix of
    /// every namespace name.
    id: String,
    cgroup_root: PathBuf,
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Namespace names in creation order, recorded before each is made so a half-built
    /// topology is still torn down.
    netns: Vec<String>,
    /// Task ids per node, index = node index - 1.
    nodes: Vec<Vec<String>>,
    links: u8,
    files: u32,
    /// Logs of every agent started here, printed when a failing test tears down.
    agent_logs: Vec<PathBuf>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left the state consistent enough for teardown.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cgroup for processes the harness starts outside every task.
    fn unmeshed_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("unmeshed")
    }

    /// A fresh path in the topology's directory: `<stem>-<n>.<ext>`.
    fn new_file(&self, stem: &str, ext: &str) -> PathBuf {
        let mut state = self.state();
        state.files += 1;
        self.dir.join(format!("{stem}-{}.{ext}", state.files))
    }
}

/// A simulated node: a network namespace standing for the EC2 host, with a bridge.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    index: u8,
    name: String,
    netns_name: String,
    cgroup: PathBuf,
}

/// A task on a node: its own network namespace, cabled to the node's bridge, and a leaf
/// cgroup.
#[derive(Clone)]
pub struct Task {
    shared: Arc<Shared>,
    id: String,
    node: String,
    ip: Ipv4Addr,
    netns_name: String,
    cgroup: PathBuf,
    /// `Some`: the task's processes start from this environment alone (plus `PATH`), as
    /// the processes of a container do; `None`: they inherit the harness's.
    env: Option<Vec<(String, String)>>,
}

impl Topology {
    /// Checks the prerequisites (root, cgroup v2, iproute2), sweeps leftovers of dead
    /// earlier runs, and makes an empty topology.
    pub fn new() -> Result<Self> {
        crate::require_root()?;
        crate::require_tools(&["ip"])?;
        let cgroups = cgroup::mount()?;
        sweep::once();

        static SEQ: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}{}-{}",
            sweep::PREFIX,
            sweep::owner(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let topology = Self {
            shared: Arc::new(Shared {
                cgroup_root: cgroups.join(&id),
                dir: std::env::temp_dir().join(&id),
                id,
                state: Mutex::default(),
            }),
        };
        // From here on, an error drops `topology`, which removes what was made.
        let s = &topology.shared;
        for leaf in ["agent", "unmeshed"] {
            cgroup::create(&s.cgroup_root.join(leaf))?;
        }
        fs::create_dir_all(&s.dir).with_context(|| format!("create {}", s.dir.display()))?;
        Ok(topology)
    }

    /// `meshtest-<owner>-<n>`, unique per topology on this host.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// A private directory for configuration files and logs; kept after a failed test.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Adds node k (k = 1, 2, ...): namespace `<id>-nodek` with bridge `br0` at
    /// 198.18.k.1/24 and IP forwarding on.
    pub fn add_node(&self) -> Result<Node> {
        let s = &self.shared;
        let mut state = s.state();
        ensure!(state.nodes.len() < 200, "too many nodes");
        let index = state.nodes.len() as u8 + 1;
        let name = format!("node{index}");
        let netns_name = format!("{}-{name}", s.id);
        state.nodes.push(Vec::new());
        state.netns.push(netns_name.clone());
        let ns_path = netns::add(&netns_name)?;
        let n = netns_name.as_str();
        ip_in(n, "link set lo up")?;
        ip_in(n, "link add br0 type bridge")?;
        ip_in(n, &format!("addr add {}/24 dev br0", bridge_ip(index)))?;
        ip_in(n, "link set br0 up")?;
        // Needed to route between nodes; a real EC2 host forwards for its bridge too.
        netns::sysctl(&ns_path, "net/ipv4/ip_forward", "1")?;
        let cgroup = s.cgroup_root.join(&name);
        cgroup::create(&cgroup)?;
        Ok(Node {
            shared: s.clone(),
            index,
            name,
            netns_name,
            cgroup,
        })
    }

    /// Cables two nodes with a veth pair (link L gets 198.19.L.0/24; each end's host
    /// number is its node index) and routes each node's task subnet through it, so tasks
    /// on one node reach tasks on the other.
    pub fn link_nodes(&self, a: &Node, b: &Node) -> Result<()> {
        ensure!(a.index != b.index, "cannot link {} to itself", a.name);
        let mut state = self.shared.state();
        ensure!(state.links < 250, "too many links");
        state.links += 1;
        let link = state.links;
        let (a_end, b_end) = (format!("to-{}", b.name), format!("to-{}", a.name));
        let (a_ip, b_ip) = (link_ip(link, a.index), link_ip(link, b.index));
        let (a_ns, b_ns) = (a.netns_name.as_str(), b.netns_name.as_str());
        ip_in(
            a_ns,
            &format!("link add {a_end} type veth peer name {b_end} netns {b_ns}"),
        )?;
        for (node, end, addr, peer, peer_addr) in
            [(a, &a_end, a_ip, b, b_ip), (b, &b_end, b_ip, a, a_ip)]
        {
            let n = node.netns_name.as_str();
            ip_in(n, &format!("addr add {addr}/24 dev {end}"))?;
            ip_in(n, &format!("link set {end} up"))?;
            ip_in(n, &format!("route add {} via {peer_addr}", peer.subnet()))?;
        }
        Ok(())
    }

    fn teardown(&self) -> Result<()> {
        let s = &self.shared;
        // Kill every process first (agents, servers, clients): they hold namespaces open.
        let mut result = cgroup::kill_and_remove(&s.cgroup_root);
        for name in s.state().netns.iter().rev() {
            result = result.and(netns::delete(name));
        }
        if std::thread::panicking() {
            for log in &s.state().agent_logs {
                eprintln!("{}", crate::agent::log_tail(log, 80));
            }
            eprintln!(
                "mesh_testbed: test failed; logs and configs kept in {}",
                s.dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&s.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            result = result.and(Err(e).with_context(|| format!("remove {}", s.dir.display())));
        }
        result
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failing test unwinds.
        if let Err(e) = self.teardown() {
            eprintln!(
                "mesh_testbed: teardown of {} incomplete: {e:#}",
                self.shared.id
            );
        }
    }
}

impl Node {
    /// `node1`, `node2`, ...
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// `/var/run/netns/<name>` of the node's namespace.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns_name)
    }

    /// The node's address on its bridge, 198.18.k.1.
    pub fn ip(&self) -> Ipv4Addr {
        bridge_ip(self.index)
    }

    /// The node's task subnet, `198.18.k.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/24", subnet(self.index))
    }

    /// The cgroup holding the node's task cgroups (absolute path).
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// Adds a task with address 198.18.k.(J+2) for the J-th task of the node (J from 0).
    /// `id` names its cgroup and is meant as the agent's task id: letters, digits, '-'
    /// and '_'.
    pub fn add_task(&self, id: &str) -> Result<Task> {
        let task = self.add_task_at(id, self.cgroup.join(id))?;
        cgroup::create(&task.cgroup)?;
        Ok(task)
    }

    /// Like [`Node::add_task`] (same namespace, veth and address), but the task's
    /// processes go to `cgroup`, a path under the node's cgroup that is NOT created here:
    /// the caller makes it when it wants, e.g. for the `ecstasks.slice/.../docker-<id>.scope`
    /// layout of ECS (see [`crate::ecs`]). The topology's teardown removes it like the rest.
    pub fn add_task_at(&self, id: &str, cgroup: PathBuf) -> Result<Task> {
        ensure!(
            cgroup.starts_with(&self.cgroup) && cgroup != self.cgroup,
            "task cgroup {} is not below {}",
            cgroup.display(),
            self.cgroup.display()
        );
        ensure!(
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "task id {id:?}: use 1-64 letters, digits, '-' or '_'"
        );
        let s = &self.shared;
        let mut state = s.state();
        let tasks = &mut state.nodes[usize::from(self.index) - 1];
        if tasks.iter().any(|t| t == id) {
            bail!("{} already has a task {id:?}", self.name);
        }
        ensure!(tasks.len() < 250, "too many tasks on {}", self.name);
        let host = tasks.len() as u8 + 2;
        tasks.push(id.to_string());
        let task_ip = Ipv4Addr::new(198, 18, self.index, host);
        let netns_name = format!("{}-{id}", self.netns_name);
        state.netns.push(netns_name.clone());
        netns::add(&netns_name)?;

        let (n, t) = (self.netns_name.as_str(), netns_name.as_str());
        let veth = format!("veth{}", host - 2);
        // Created in the node's namespace with its peer directly in the task's, so the
        // host namespace never sees either end.
        ip_in(
            n,
            &format!("link add {veth} type veth peer name eth0 netns {t}"),
        )?;
        ip_in(n, &format!("link set {veth} master br0 up"))?;
        ip_in(t, "link set lo up")?;
        ip_in(t, &format!("addr add {task_ip}/24 dev eth0"))?;
        ip_in(t, "link set eth0 up")?;
        ip_in(t, &format!("route add default via {}", self.ip()))?;
        Ok(Task {
            shared: s.clone(),
            id: id.to_string(),
            node: self.name.clone(),
            ip: task_ip,
            netns_name,
            cgroup,
            env: None,
        })
    }

    /// A command that runs in the node's namespace (like a process on the EC2 host),
    /// outside every task cgroup.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        process::placed(program, &self.shared.unmeshed_cgroup(), &self.netns_path())
    }

    /// Like [`Node::command`], but in the `agent` cgroup: for the mesh agent itself.
    pub(crate) fn agent_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        process::placed(
            program,
            &self.shared.cgroup_root.join("agent"),
            &self.netns_path(),
        )
    }

    /// A fresh path in the topology's directory (for configs and logs).
    pub(crate) fn new_file(&self, stem: &str, ext: &str) -> PathBuf {
        self.shared.new_file(stem, ext)
    }

    pub(crate) fn register_agent_log(&self, log: &Path) {
        self.shared.state().agent_logs.push(log.to_path_buf());
    }
}

impl Task {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name of the node the task runs on.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `/var/run/netns/<name>` of the task's namespace.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns_name)
    }

    /// Absolute path of the task's cgroup.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// The task's cgroup relative to the cgroup2 mount, as the agent's config takes it.
    pub fn cgroup_relative(&self) -> String {
        let mount = cgroup::mount().expect("a Task exists only where cgroup2 is mounted");
        let rel = self
            .cgroup
            .strip_prefix(mount)
            .expect("task cgroups live under the mount");
        rel.to_string_lossy().into_owned()
    }

    /// A command that runs inside the task: in its cgroup and its network namespace, as a
    /// process of a task container would.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut command = process::placed(program, &self.cgroup, &self.netns_path())?;
        if let Some(env) = &self.env {
            let path = std::env::var_os("PATH").unwrap_or_default();
            command
                .env_clear()
                .env("PATH", path)
                .envs(env.iter().cloned());
        }
        Ok(command)
    }

    /// The same task (namespace, address, id) with its processes placed in another
    /// cgroup below the topology's, e.g. another container of the same ECS task. The
    /// cgroup is not created here.
    pub fn with_cgroup(&self, cgroup: PathBuf) -> Result<Task> {
        ensure!(
            cgroup.starts_with(&self.shared.cgroup_root),
            "cgroup {} is outside the topology",
            cgroup.display()
        );
        Ok(Task {
            cgroup,
            ..self.clone()
        })
    }

    /// The same task, whose [`Task::command`]s start from `env` alone (plus the harness's
    /// `PATH`) instead of inheriting the harness's environment, as the processes of a
    /// container do; `/proc/<pid>/environ` then shows exactly these variables.
    pub fn with_container_env(&self, env: Vec<(String, String)>) -> Task {
        Task {
            env: Some(env),
            ..self.clone()
        }
    }

    /// A command in the task's network namespace but outside its cgroup (and outside every
    /// other task cgroup): the mesh must not capture it.
    pub fn command_unmeshed(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        process::placed(program, &self.shared.unmeshed_cgroup(), &self.netns_path())
    }

    /// A fresh path in the topology's directory (for logs).
    pub(crate) fn new_file(&self, stem: &str, ext: &str) -> PathBuf {
        self.shared.new_file(stem, ext)
    }

    /// The task's `[[tasks]]` entry for the agent's configuration file.
    pub fn config(&self) -> String {
        let mut entry = String::new();
        let _ = writeln!(entry, "[[tasks]]");
        let _ = writeln!(entry, "id = {}", toml_str(&self.id));
        let _ = writeln!(entry, "cgroup = {}", toml_str(&self.cgroup_relative()));
        let _ = writeln!(
            entry,
            "netns = {}",
            toml_str(&self.netns_path().to_string_lossy())
        );
        let _ = writeln!(entry, "addresses = [{}]", toml_str(&self.ip.to_string()));
        entry
    }
}

/// A TOML basic string.
pub(crate) fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn bridge_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, 1)
}

/// Node k's task subnet, 198.18.k.0 (/24).
fn subnet(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, 0)
}

fn link_ip(link: u8, node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, link, node)
}
