//! Configurations for meshes of several nodes: workload identities, the trust directory
//! (`mesh-agent trust ...`), and the agent config sections of the mutual-TLS tunnel
//! (`[identity]`, `[[tasks]]` with `role_arn`, `[[endpoints]]`, `[[policies]]`).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use mesh_testbed::mesh::{MeshConfig, TrustDir, TrustInit, spiffe_id};
//! use mesh_testbed::{Agent, Topology};
//! let topology = Topology::new()?;
//! let (n1, n2) = (topology.add_node()?, topology.add_node()?);
//! topology.link_nodes(&n1, &n2)?;
//! let (a, b) = (n1.add_task("a")?, n2.add_task("b")?);
//! let trust = TrustDir::init(&topology, &TrustInit::default())?;
//! let node1 = MeshConfig::new(&trust).task(&a, "a").endpoint(&b, "b");
//! let node2 = MeshConfig::new(&trust).task(&b, "b").endpoint(&a, "a")
//!     .policy("b", &[8080], &[&spiffe_id("a")]);
//! let agent1 = Agent::start(&n1, &node1.render())?;
//! let agent2 = Agent::start(&n2, &node2.render())?;
//! # Ok(()) }
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::agent;
use crate::pki::{self, TestCa};
use crate::process::run_with_timeout;
use crate::topology::{Node, Task, Topology, toml_str};

/// The AWS account of every test role.
pub const ACCOUNT: &str = "111122223333";
/// The trust domain of the test meshes.
pub const TRUST_DOMAIN: &str = "mesh.test";
/// The tunnel (HBONE) port the agent listens on in every meshed task.
pub const TUNNEL_PORT: u16 = 15008;

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// `arn:aws:iam::111122223333:role/<role>`.
pub fn role_arn(role: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{role}")
}

/// The SPIFFE id the agent derives from [`role_arn`]`(role)` in [`TRUST_DOMAIN`]:
/// `spiffe://mesh.test/aws/111122223333/role/<role>`.
pub fn spiffe_id(role: &str) -> String {
    spiffe_id_in(TRUST_DOMAIN, role)
}

/// [`spiffe_id`] in another trust domain.
pub fn spiffe_id_in(trust_domain: &str, role: &str) -> String {
    format!("spiffe://{trust_domain}/aws/{ACCOUNT}/role/{role}")
}

/// Arguments of `mesh-agent trust init`.
#[derive(Clone, Debug)]
pub struct TrustInit {
    pub trust_domain: String,
    /// `--propagation-delay`: how long a new anchor must be in the bundle before the issuer
    /// may switch to it (humantime, e.g. "1s"); `None`: the CLI's default.
    pub propagation_delay: Option<String>,
    /// `--max-leaf-lifetime`: the longest workload certificate lifetime of any agent; the
    /// old anchor stays that long (plus propagation delay and clock skew) after the switch.
    pub max_leaf_lifetime: Option<String>,
    /// `--clock-skew`: how far behind a node's clock may be (the CLI's default is minutes;
    /// tests of a whole rotation set "0s").
    pub clock_skew: Option<String>,
    /// `--issuer-validity`: the lifetime of each issuer, also of the ones `trust
    /// renew-issuer` makes later (humantime; the CLI's default is 30 days).
    pub issuer_validity: Option<String>,
}

impl Default for TrustInit {
    fn default() -> Self {
        Self {
            trust_domain: TRUST_DOMAIN.to_string(),
            propagation_delay: None,
            max_leaf_lifetime: None,
            clock_skew: None,
            issuer_validity: None,
        }
    }
}

/// Where every two-node mesh test starts: two simulated nodes joined by a link, and a trust
/// directory made by `mesh-agent trust init`. Tasks are added with `n1.add_task(..)`.
///
/// Bind it field by field, topology first:
/// `let TwoNodes { topology, n1, n2, trust } = TwoNodes::new()?;` — locals are dropped in
/// reverse order, so the topology (namespaces, cgroups, files) then goes last, after everything
/// that lives in it. Kept whole, its field order does the same.
pub struct TwoNodes {
    pub trust: TrustDir,
    pub n2: Node,
    pub n1: Node,
    pub topology: Topology,
}

impl TwoNodes {
    pub fn new() -> Result<TwoNodes> {
        TwoNodes::with_trust(&TrustInit::default())
    }

    pub fn with_trust(init: &TrustInit) -> Result<TwoNodes> {
        let topology = Topology::new()?;
        let n1 = topology.add_node()?;
        let n2 = topology.add_node()?;
        topology.link_nodes(&n1, &n2)?;
        let trust = TrustDir::init(&topology, init)?;
        Ok(TwoNodes {
            trust,
            n2,
            n1,
            topology,
        })
    }
}

/// A trust directory made by `mesh-agent trust init` inside the topology's directory
/// (removed with it). Every agent of a test reads its `bundle.pem` and `issuer.pem`.
#[derive(Clone, Debug)]
pub struct TrustDir {
    dir: PathBuf,
    bin: PathBuf,
    trust_domain: String,
}

impl TrustDir {
    /// Runs `mesh-agent trust init` (the binary [`agent::default_bin`] names) in a fresh
    /// directory under the topology's.
    pub fn init(topology: &Topology, init: &TrustInit) -> Result<Self> {
        Self::init_with(topology, init, &agent::default_bin())
    }

    /// [`TrustDir::init`] with another agent binary.
    pub fn init_with(topology: &Topology, init: &TrustInit, bin: &Path) -> Result<Self> {
        if !bin.is_file() {
            bail!(
                "agent binary {} not found: build it (cargo build -p mesh-agent) or set MESH_AGENT_BIN",
                bin.display()
            );
        }
        // `trust init` makes the directory itself; pick a name that does not exist yet.
        let dir = (0..)
            .map(|n| topology.dir().join(format!("trust-{n}")))
            .find(|d| !d.exists())
            .expect("an unused name");
        let trust = Self {
            dir,
            bin: bin.to_path_buf(),
            trust_domain: init.trust_domain.clone(),
        };
        let mut args = vec!["init".to_string(), "--dir".to_string()];
        args.push(trust.dir.to_string_lossy().into_owned());
        args.extend(["--trust-domain".to_string(), init.trust_domain.clone()]);
        if let Some(delay) = &init.propagation_delay {
            args.extend(["--propagation-delay".to_string(), delay.clone()]);
        }
        if let Some(lifetime) = &init.max_leaf_lifetime {
            args.extend(["--max-leaf-lifetime".to_string(), lifetime.clone()]);
        }
        if let Some(skew) = &init.clock_skew {
            args.extend(["--clock-skew".to_string(), skew.clone()]);
        }
        if let Some(validity) = &init.issuer_validity {
            args.extend(["--issuer-validity".to_string(), validity.clone()]);
        }
        trust.cli_ok(&args)?;
        for file in [trust.bundle(), trust.issuer()] {
            if !file.is_file() {
                bail!("`mesh-agent trust init` did not write {}", file.display());
            }
        }
        Ok(trust)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `bundle.pem`: the trust anchors.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// `issuer.pem`: the issuer certificate and its key.
    pub fn issuer(&self) -> PathBuf {
        self.dir.join("issuer.pem")
    }

    /// The anchor ids (as the agent's metrics label them) of the bundle, in file order.
    pub fn anchor_ids(&self) -> Result<Vec<String>> {
        pki::bundle_anchor_ids(&self.bundle())
    }

    /// The agent's current issuer, to mint test leaves with.
    pub fn issuer_ca(&self) -> Result<TestCa> {
        TestCa::load(&self.issuer())
    }

    /// The `[identity]` section for agents using this directory.
    pub fn identity_section(&self, workload_cert_ttl: &str) -> String {
        format!(
            "[identity]\ntrust_domain = {}\nbundle = {}\nissuer = {}\nworkload_cert_ttl = {}\n",
            toml_str(&self.trust_domain),
            toml_str(&self.bundle().to_string_lossy()),
            toml_str(&self.issuer().to_string_lossy()),
            toml_str(workload_cert_ttl),
        )
    }

    /// `mesh-agent trust rotate --dir D [--force]`, whatever its exit status.
    pub fn rotate(&self, force: bool) -> Result<Output> {
        let mut args = vec!["rotate".to_string(), "--dir".to_string()];
        args.push(self.dir.to_string_lossy().into_owned());
        if force {
            args.push("--force".to_string());
        }
        self.cli(&args)
    }

    /// `mesh-agent trust renew-issuer --dir D`; fails unless it exits 0. Returns what it
    /// printed.
    pub fn renew_issuer(&self) -> Result<String> {
        let args = ["renew-issuer", "--dir", &self.dir.to_string_lossy()].map(String::from);
        self.cli_ok(&args)
    }

    /// `mesh-agent trust status --dir D` (text); fails unless it exits 0.
    pub fn status(&self) -> Result<String> {
        let args = ["status", "--dir", &self.dir.to_string_lossy()].map(String::from);
        self.cli_ok(&args)
    }

    /// `mesh-agent trust status --dir D --json`, parsed; fails unless it exits 0.
    pub fn status_json(&self) -> Result<TrustStatus> {
        let args = ["status", "--dir", &self.dir.to_string_lossy(), "--json"].map(String::from);
        let text = self.cli_ok(&args)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("`trust status --json` printed no JSON: {text}"))?;
        Ok(TrustStatus { json })
    }

    /// `mesh-agent trust ARGS...`, whatever its exit status.
    pub fn cli(&self, args: &[String]) -> Result<Output> {
        let mut command = Command::new(&self.bin);
        command.arg("trust").args(args);
        run_with_timeout(&mut command, CLI_TIMEOUT)
    }

    /// `mesh-agent trust ARGS...`; fails with its output unless it exits 0.
    pub fn cli_ok(&self, args: &[String]) -> Result<String> {
        let out = self.cli(args)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "`mesh-agent trust {}` failed ({}); stdout: {} stderr: {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

/// What `mesh-agent trust status --json` reported.
#[derive(Clone, Debug)]
pub struct TrustStatus {
    pub json: serde_json::Value,
}

impl TrustStatus {
    /// `anchors[].id`: the short ids of the anchors in the bundle, in bundle order.
    pub fn anchor_ids(&self) -> Vec<String> {
        self.json["anchors"]
            .as_array()
            .map(|anchors| {
                anchors
                    .iter()
                    .filter_map(|a| a["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `issuer.anchor`: the SHA-256 fingerprint (64 hex digits) of the anchor the issuer
    /// chains to; its first 16 digits are the anchor's id.
    pub fn issuer_anchor(&self) -> Option<String> {
        self.json["issuer"]["anchor"].as_str().map(str::to_string)
    }

    /// `rotation.phase`: "stable", "anchor-added" or "issuer-switched".
    pub fn phase(&self) -> Option<String> {
        self.json["rotation"]["phase"].as_str().map(str::to_string)
    }

    /// `ok`: no problem found.
    pub fn ok(&self) -> bool {
        self.json["ok"].as_bool() == Some(true)
    }
}

/// One agent's configuration for a mesh: `[agent]`, `[mesh]`, `[identity]`, local tasks,
/// endpoints on other nodes, and policies. Defaults: config and identity files polled
/// every 500 ms, 2 s drain and connect timeouts, 24 h workload certificates.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    agent: Vec<(String, String)>,
    mesh: Vec<(String, String)>,
    identity: Option<(TrustDir, String)>,
    /// `[routing.protocol_detection] timeout`, or the agent's default when `None`.
    protocol_detection: Option<String>,
    sections: Vec<String>,
}

impl MeshConfig {
    pub fn new(trust: &TrustDir) -> Self {
        Self {
            agent: vec![
                ("watch_interval".into(), toml_str("500ms")),
                ("drain_timeout".into(), toml_str("2s")),
                ("connect_timeout".into(), toml_str("2s")),
            ],
            mesh: Vec::new(),
            identity: Some((trust.clone(), "24h".into())),
            // Off unless a test asks for it: most tests are about L4 behaviour (connections
            // counted one for one, refusals as resets) and use curl as a convenient client;
            // with detection their HTTP would be proxied request by request.
            protocol_detection: Some("0s".into()),
            sections: Vec::new(),
        }
    }

    /// Protocol detection on undeclared ports: `Some(timeout)` (humantime), or `None` for the
    /// agent's default (on, 100ms). The harness turns it off otherwise (see [`MeshConfig::new`]).
    pub fn protocol_detection(mut self, timeout: Option<&str>) -> Self {
        self.protocol_detection = timeout.map(str::to_owned);
        self
    }

    /// Sets `[agent] key = value`; `value` is TOML (quote strings, e.g. with `"\"1s\""`).
    pub fn agent(mut self, key: &str, value: &str) -> Self {
        set(&mut self.agent, key, value);
        self
    }

    /// `[agent] access_log`: the agent writes its JSON access log to `path`.
    pub fn access_log(self, path: &Path) -> Self {
        let path = toml_str(&path.to_string_lossy());
        self.agent("access_log", &path)
    }

    /// Sets `[mesh] key = value` (a TOML value), e.g. `("default_policy", "\"deny\"")`.
    pub fn mesh(mut self, key: &str, value: &str) -> Self {
        set(&mut self.mesh, key, value);
        self
    }

    /// `[identity] workload_cert_ttl` (humantime, e.g. "6s").
    pub fn workload_cert_ttl(mut self, ttl: &str) -> Self {
        if let Some((_, current)) = &mut self.identity {
            *current = ttl.to_string();
        }
        self
    }

    /// No `[identity]` section: the agent carries plain TCP.
    pub fn without_identity(mut self) -> Self {
        self.identity = None;
        self
    }

    /// A local task (`[[tasks]]`) with the IAM role `role` (see [`role_arn`]).
    pub fn task(mut self, task: &Task, role: &str) -> Self {
        self.sections.push(task_section(task, role));
        self
    }

    /// A meshed workload on another node (`[[endpoints]]`), named after the task's id.
    pub fn endpoint(mut self, task: &Task, role: &str) -> Self {
        self.sections.push(endpoint_section(task, role));
        self
    }

    /// An inbound policy for local task `task_id`: only `allow` (SPIFFE ids, `.../*`
    /// prefixes or role ARNs) may reach `ports` (empty: every port).
    pub fn policy(mut self, task_id: &str, ports: &[u16], allow: &[&str]) -> Self {
        self.sections.push(policy_section(task_id, ports, allow));
        self
    }

    /// Any other TOML, appended as is (e.g. a `[capture]` section).
    pub fn raw(mut self, toml: &str) -> Self {
        self.sections.push(toml.to_string());
        self
    }

    /// The configuration file.
    pub fn render(&self) -> String {
        let mut out = String::from("[agent]\n");
        for (k, v) in &self.agent {
            let _ = writeln!(out, "{k} = {v}");
        }
        if !self.mesh.is_empty() {
            out.push_str("\n[mesh]\n");
            for (k, v) in &self.mesh {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        if let Some((trust, ttl)) = &self.identity {
            out.push('\n');
            out.push_str(&trust.identity_section(ttl));
        }
        if let Some(timeout) = &self.protocol_detection {
            let _ = write!(
                out,
                "\n[routing.protocol_detection]\ntimeout = {}\n",
                toml_str(timeout)
            );
        }
        for section in &self.sections {
            out.push('\n');
            out.push_str(section);
        }
        out
    }
}

fn set(entries: &mut Vec<(String, String)>, key: &str, value: &str) {
    match entries.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = value.to_string(),
        None => entries.push((key.to_string(), value.to_string())),
    }
}

/// The routing of the seed scenario (`l7.rs`, `prometheus.rs`): virtual service
/// `serviceb.apps.local` at `vip:port` (HTTP), split by weight between the virtual nodes
/// serviceB (task `b1`) and serviceBv2 (task `b2`), no retry policy.
pub fn seed_routing(vip: &str, port: u16, weight_b: u32, weight_b2: u32) -> String {
    format!(
        r#"
[[virtual_services]]
name = "serviceb.apps.local"
addresses = ["{vip}"]
provider = {{ virtual_router = "serviceB" }}

[[virtual_routers]]
name = "serviceB"
listeners = [{{ port = {port}, protocol = "http" }}]

[[virtual_nodes]]
name = "serviceB"
endpoint = "b1"
listeners = [{{ port = {port}, protocol = "http" }}]

[[virtual_nodes]]
name = "serviceBv2"
endpoint = "b2"
listeners = [{{ port = {port}, protocol = "http" }}]

[[routes]]
name = "split"
virtual_router = "serviceB"
match.prefix = "/"
action.weighted_targets = [
  {{ virtual_node = "serviceB", weight = {weight_b} }},
  {{ virtual_node = "serviceBv2", weight = {weight_b2} }},
]
"#
    )
}

/// `[[tasks]]` for `task` with `role_arn = role_arn(role)`.
pub fn task_section(task: &Task, role: &str) -> String {
    format!(
        "{}role_arn = {}\n",
        task.config(),
        toml_str(&role_arn(role))
    )
}

/// `[[endpoints]]` for a task on another node, named after its id.
pub fn endpoint_section(task: &Task, role: &str) -> String {
    format!(
        "[[endpoints]]\nname = {}\naddresses = [{}]\nrole_arn = {}\n",
        toml_str(task.id()),
        toml_str(&task.ip().to_string()),
        toml_str(&role_arn(role)),
    )
}

/// `[[policies]]` for local task `task_id`.
pub fn policy_section(task_id: &str, ports: &[u16], allow: &[&str]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let allow: Vec<String> = allow.iter().map(|a| toml_str(a)).collect();
    format!(
        "[[policies]]\ntask = {}\nports = [{}]\nallow = [{}]\n",
        toml_str(task_id),
        ports.join(", "),
        allow.join(", "),
    )
}

/// Runs `f` every 100 ms until it returns `Ok(Ok(value))`, at most until `timeout`; `Ok(Err(
/// reason))` means "not yet". The error names `what` and the last reason or error.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(reason)) => reason,
            Err(e) => format!("{e:#}"),
        };
        if std::time::Instant::now() >= deadline {
            return Err(anyhow::anyhow!("{last}"))
                .with_context(|| format!("{what}: not so after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
