//! The agent's configuration file (TOML): node settings, capture rules and, for now, the static
//! task list. Parsing is strict (unknown fields are errors) and validation names the offending
//! field, so a typo is reported instead of silently meshing nothing.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::destinations::Destinations;
use crate::identity::{RoleArn, TrustDomain};
use crate::policy::Authorizer;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSettings,
    #[serde(default)]
    pub capture: CaptureSettings,
    #[serde(default)]
    pub mesh: MeshSettings,
    /// Workload identity and mutual TLS. Without it the agent carries captured connections as
    /// plain TCP (capture only).
    #[serde(default)]
    pub identity: Option<IdentitySettings>,
    /// The ECS task source: tasks discovered from the ECS agent and the cgroup tree.
    #[serde(default)]
    pub ecs: Option<EcsSettings>,
    /// Tasks of this node to mesh (the static task source).
    #[serde(default, rename = "tasks")]
    pub tasks: Vec<TaskSpec>,
    /// Meshed workloads on other nodes (static destination resolution).
    #[serde(default, rename = "endpoints")]
    pub endpoints: Vec<EndpointSpec>,
    /// How DNS discovery asks (`[[services]]`).
    #[serde(default)]
    pub dns: DnsConfig,
    /// Meshed services on other nodes whose endpoints come from DNS.
    #[serde(default, rename = "services")]
    pub services: Vec<ServiceSpec>,
    /// Passive health of DNS-discovered endpoints.
    #[serde(default)]
    pub outlier_detection: OutlierConfig,
    /// L7 routing (docs/routing.md): mesh-wide settings...
    #[serde(default)]
    pub routing: crate::routing::model::RoutingSettings,
    /// ...and the App Mesh objects.
    #[serde(default)]
    pub virtual_services: Vec<crate::routing::model::VirtualServiceSpec>,
    #[serde(default)]
    pub virtual_nodes: Vec<crate::routing::model::VirtualNodeSpec>,
    #[serde(default)]
    pub virtual_routers: Vec<crate::routing::model::VirtualRouterSpec>,
    #[serde(default)]
    pub routes: Vec<crate::routing::model::RouteSpec>,
    /// Inbound authorization: who may connect to this node's tasks.
    #[serde(default, rename = "policies")]
    pub policies: Vec<PolicySpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Prometheus `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`: 200 once every task is set up, 503 while starting or draining.
    pub readiness_addr: SocketAddr,
    /// Port of the outbound listener bound on loopback inside each task netns.
    pub outbound_port: u16,
    /// How long SIGTERM waits for open connections to finish before closing them.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a connect to the original destination may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the config file is checked for changes; `0s` disables watching (SIGHUP still
    /// reloads).
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Port of the mutual-TLS tunnel (HBONE) listener, bound inside each meshed task's netns and
    /// dialled on peers.
    pub tunnel_port: u16,
    /// A pooled tunnel connection with no open stream is closed after this long.
    #[serde(with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
    /// Per-hop series (`istio_*`) unused this long, with no open connection, are removed.
    #[serde(with = "humantime_serde")]
    pub metrics_idle_expiry: Duration,
    /// JSON access log: a file appended to (created 0640), or `/dev/stdout`; none by default.
    /// Read at start-up.
    pub access_log: Option<PathBuf>,
    /// Threads that run the data path (default 1, see docs/benchmarks.md: one thread keeps each
    /// connection's tasks together and is the cheapest per request; raise it on nodes whose
    /// traffic needs more than one core of proxying). Read at start-up.
    pub worker_threads: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            outbound_port: mesh_common::OUTBOUND_PORT,
            drain_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            watch_interval: Duration::from_secs(2),
            tunnel_port: 15008,
            tunnel_idle_timeout: Duration::from_secs(120),
            metrics_idle_expiry: Duration::from_secs(600),
            access_log: None,
            worker_threads: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Capture only destinations listed in `capture.destinations`.
    #[default]
    Listed,
    /// Capture every TCP destination except the excluded ones.
    All,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSettings {
    pub mode: CaptureMode,
    /// `ip:port` (exact) or `cidr` (every port), e.g. `198.18.0.3:8080`, `198.18.1.0/24`,
    /// `[2001:db8::1]:443`.
    pub destinations: Vec<Destination>,
    /// Destination ports never captured (e.g. 22).
    pub exclude_ports: Vec<u16>,
    /// Destination networks never captured.
    pub exclude_cidrs: Vec<Cidr>,
    /// Carry the app <-> agent loopback legs with the kernel's socket-map redirect (sock_ops +
    /// sk_msg) instead of loopback TCP. Applies to connections established after a change.
    /// Off by default: on the kernels measured, a *blocking* read on a redirected app socket
    /// can fail with EAGAIN when the socket is woken without data (e.g. when the app's own
    /// half-close is acknowledged); apps that wait with poll/epoll are not affected. See
    /// docs/benchmarks.md.
    pub loopback_redirect: bool,
}

/// Mesh-wide defaults for authorization and for destinations that are not meshed.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshSettings {
    pub default_policy: DefaultPolicy,
    pub egress: Egress,
}

/// What inbound authorization does for a destination no `[[policies]]` entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    /// Any workload of the trust domain may connect (mutual TLS is still required).
    #[default]
    Allow,
    /// Only sources a policy allows.
    Deny,
}

/// What happens to a captured connection whose destination is not a meshed workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Carried as plain TCP, as without the mesh.
    #[default]
    Passthrough,
    /// Refused (reset) and counted.
    Deny,
}

/// Where the trust material lives and how workload certificates are minted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The SPIFFE trust domain, e.g. `prod.example.com`.
    pub trust_domain: String,
    /// PEM file of the trust anchors (`mesh-agent trust init` writes `bundle.pem`).
    pub bundle: PathBuf,
    /// PEM file with the issuer certificate followed by its private key (mode 0600).
    pub issuer: PathBuf,
    /// Lifetime of the workload certificates the agent mints; renewed at half-life.
    #[serde(default = "default_workload_cert_ttl", with = "humantime_serde")]
    pub workload_cert_ttl: Duration,
}

fn default_workload_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Where the ECS agent is and which of its tasks to mesh.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EcsSettings {
    /// The ECS agent's introspection API (`/v1/tasks`).
    pub agent_url: String,
    /// The ECS agent's credentials endpoint (the host side of 169.254.170.2), used to learn
    /// each task's IAM role.
    pub credentials_url: String,
    /// The `ecstasks.slice` cgroup: relative to the cgroup v2 mount, or absolute under it.
    pub cgroup_root: PathBuf,
    /// How often `/v1/tasks` is polled; new task cgroups are seen at once (inotify).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Tasks meshed unless listed otherwise: `mesh` (all but `exclude_families`) or `ignore`
    /// (only `include_families`).
    pub default: EcsDefault,
    pub include_families: Vec<String>,
    pub exclude_families: Vec<String>,
    /// How long a new task's first outbound connection may wait for its identity (the IAM role
    /// is learnt once its first application process runs).
    #[serde(with = "humantime_serde")]
    pub attestation_timeout: Duration,
}

impl Default for EcsSettings {
    fn default() -> Self {
        EcsSettings {
            agent_url: "http://127.0.0.1:51678".into(),
            credentials_url: "http://127.0.0.1:51679".into(),
            cgroup_root: PathBuf::from("ecstasks.slice"),
            poll_interval: Duration::from_secs(5),
            default: EcsDefault::Mesh,
            include_families: Vec::new(),
            exclude_families: Vec::new(),
            attestation_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EcsDefault {
    #[default]
    Mesh,
    Ignore,
}

impl EcsSettings {
    /// Whether tasks of `family` are meshed.
    pub fn meshes(&self, family: &str) -> bool {
        if self.exclude_families.iter().any(|f| f == family) {
            return false;
        }
        match self.default {
            EcsDefault::Mesh => true,
            EcsDefault::Ignore => self.include_families.iter().any(|f| f == family),
        }
    }
}

/// A meshed workload on another node, reached through the tunnel to its agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Workload name for metrics and logs (`destination_workload`).
    pub name: String,
    /// The addresses applications connect to.
    pub addresses: Vec<IpAddr>,
    /// The workload's IAM role; its SPIFFE id is derived from it...
    #[serde(default)]
    pub role_arn: Option<String>,
    /// ...or its SPIFFE id given directly. Exactly one of the two.
    #[serde(default)]
    pub identity: Option<String>,
    /// Tunnel port of the peer agent for these addresses.
    #[serde(default)]
    pub tunnel_port: Option<u16>,
}

/// The name server and refresh bounds of DNS discovery.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// e.g. Consul's `127.0.0.1:8600`; absent: the servers of /etc/resolv.conf (on EC2 the VPC
    /// resolver, which answers Cloud Map names).
    pub resolver: Option<SocketAddr>,
    /// Shortest time an answer is used (also for TTL 0, Consul's default).
    #[serde(with = "humantime_serde")]
    pub min_refresh: Duration,
    /// Longest time an answer is used, whatever its TTL.
    #[serde(with = "humantime_serde")]
    pub max_refresh: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        let d = crate::discovery::dns::DnsSettings::default();
        DnsConfig {
            resolver: d.resolver,
            min_refresh: d.min_refresh,
            max_refresh: d.max_refresh,
            timeout: d.timeout,
        }
    }
}

impl DnsConfig {
    pub fn settings(&self) -> crate::discovery::dns::DnsSettings {
        crate::discovery::dns::DnsSettings {
            resolver: self.resolver,
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
            timeout: self.timeout,
        }
    }
}

/// A meshed service whose endpoints are looked up in DNS (an App Mesh virtual node with DNS or
/// Cloud Map service discovery).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `destination_workload` in metrics.
    pub name: String,
    /// A/AAAA lookup of this name, every address with `port`...
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// ...or an SRV lookup (`orders.apps.local`, `_orders._tcp.service.consul`).
    #[serde(default)]
    pub srv: Option<String>,
    /// The identity its endpoints must prove: a role ARN or a SPIFFE id (exactly one).
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default)]
    pub identity: Option<String>,
    /// Tunnel port of the endpoints' agents, if not `agent.tunnel_port`.
    #[serde(default)]
    pub tunnel_port: Option<u16>,
}

impl ServiceSpec {
    pub fn query(&self) -> anyhow::Result<crate::discovery::dns::Query> {
        use crate::discovery::dns::Query;
        let q = match (&self.hostname, self.port, &self.srv) {
            (Some(h), Some(port), None) if port != 0 => Query::Address {
                hostname: h.clone(),
                port,
            },
            (None, None, Some(name)) => Query::Srv { name: name.clone() },
            _ => bail!(
                "service `{}` needs either `hostname` and `port`, or `srv`",
                self.name
            ),
        };
        q.validate()
            .map_err(|e| anyhow::anyhow!("service `{}`: {e}", self.name))?;
        Ok(q)
    }
}

/// Ejection of endpoints whose connections fail (passive health checking).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        let d = crate::routing::outlier::OutlierSettings::default();
        OutlierConfig {
            consecutive_failures: d.consecutive_failures,
            base_ejection: d.base_ejection,
            max_ejection: d.max_ejection,
            max_ejection_percent: d.max_ejection_percent,
        }
    }
}

impl OutlierConfig {
    pub fn settings(&self) -> crate::routing::outlier::OutlierSettings {
        crate::routing::outlier::OutlierSettings {
            consecutive_failures: self.consecutive_failures,
            base_ejection: self.base_ejection,
            max_ejection: self.max_ejection,
            max_ejection_percent: self.max_ejection_percent,
        }
    }
}

/// Who may connect to a local task (and, optionally, only to some of its ports).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The destination: a local task id...
    #[serde(default)]
    pub task: String,
    /// ...or every task of a family (discovered ECS tasks: the task definition family; their
    /// ids change with every deployment). Exactly one of the two.
    #[serde(default)]
    pub family: Option<String>,
    /// Destination ports this entry covers; empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Allowed sources: SPIFFE ids, SPIFFE id prefixes ending in `/*`, or IAM role ARNs.
    pub allow: Vec<String>,
}

/// A published port: `<host port>:<container port>` (or one number for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: u16,
    pub container: u16,
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| {
            p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("`{s}`: expected `<host port>:<container port>`, e.g. 32768:8080")
            })
        };
        let (host, container) = match s.split_once(':') {
            Some((h, c)) => (parse(h)?, parse(c)?),
            None => (parse(s)?, parse(s)?),
        };
        Ok(HostPort { host, container })
    }
}

/// A capture rule target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Exact(SocketAddr),
    Network(Cidr),
}

/// An IP network. The address is normalised (host bits cleared) on parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not a CIDR (expected e.g. 198.18.0.0/16)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr {
            addr: mask(addr, prefix_len),
            prefix_len,
        })
    }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix_len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix_len))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix_len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix_len))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!(
                    "`{s}`: port 0 is not a destination; use a CIDR to capture every port"
                ));
            }
            return Ok(Destination::Exact(sa));
        }
        s.parse::<Cidr>().map(Destination::Network).map_err(|_| {
            format!("`{s}` is neither `ip:port` nor a CIDR (e.g. 198.18.0.3:8080, 198.18.0.0/24)")
        })
    }
}

macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
deserialize_from_str!(Cidr);
deserialize_from_str!(Destination);
deserialize_from_str!(HostPort);

/// One meshed task in the static task source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique, stable name; used in metric labels and logs.
    pub id: String,
    /// The task's cgroup v2 directory: absolute, or relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// The task's network namespace as a path (e.g. `/var/run/netns/x`)...
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// ...or as the pid of any process of the task (`/proc/<pid>/ns/net`). Exactly one is set.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The task's own addresses: connections to them from other tasks are meshed, and the
    /// tunnel accepts connections for them.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The task's IAM role, from which its workload identity is derived. A task without one
    /// has no identity: it can still reach unmeshed destinations, but neither dial nor accept
    /// mutual-TLS connections.
    #[serde(default)]
    pub role_arn: Option<String>,
    /// The task's family (ECS task definition family), which `[[policies]] family` matches.
    #[serde(default)]
    pub family: Option<String>,
    /// The task definition revision: the `*_version` metric labels.
    #[serde(default)]
    pub version: Option<String>,
    /// Ports the task publishes on the node (bridge mode), `"<host port>:<container port>"`:
    /// peers reach it at `<node ip>:<host port>` through the node's tunnel listener.
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
    /// Discovered tasks only: the role is not known yet (no application process has run).
    /// Outbound connections wait for it up to `ecs.attestation_timeout`.
    #[serde(skip)]
    pub role_pending: bool,
}

impl TaskSpec {
    /// Equal but for the identity, which changes without restarting the task.
    pub fn same_placement(&self, other: &TaskSpec) -> bool {
        self.id == other.id
            && self.cgroup == other.cgroup
            && self.netns == other.netns
            && self.pid == other.pid
            && self.addresses == other.addresses
            && self.host_ports == other.host_ports
            && self.family == other.family
            && self.version == other.version
    }
}

impl TaskSpec {
    /// Path of the task's netns file. Validation guarantees exactly one of `netns`/`pid`.
    pub fn netns_path(&self) -> PathBuf {
        match (&self.netns, self.pid) {
            (Some(p), _) => p.clone(),
            (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            (None, None) => PathBuf::new(),
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`. Errors name the file and, for syntax errors, the line.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse_named(&text, &path.display().to_string())
            .with_context(|| format!("invalid config file {}", path.display()))
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Self::parse_named(text, "config")
    }

    /// Parses and validates; routing errors name `file`, the line and the field.
    fn parse_named(text: &str, file: &str) -> anyhow::Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        crate::routing::validate::parse_and_validate(text, file)
            .map_err(|e| anyhow::anyhow!("invalid routing configuration:\n{e}"))?;
        Ok(cfg)
    }

    /// The compiled L7 routing table (empty when nothing is routed at L7).
    pub fn routing_table(&self) -> anyhow::Result<crate::routing::table::RoutingTable> {
        use crate::routing::{model::RoutingSpec, validate};
        let spec = RoutingSpec {
            routing: self.routing.clone(),
            virtual_services: self.virtual_services.clone(),
            virtual_nodes: self.virtual_nodes.clone(),
            virtual_routers: self.virtual_routers.clone(),
            routes: self.routes.clone(),
        };
        let known = validate::KnownNames {
            services: self.services.iter().map(|s| s.name.clone()).collect(),
            endpoints: self.endpoints.iter().map(|e| e.name.clone()).collect(),
            tasks: self
                .ecs
                .is_none()
                .then(|| self.tasks.iter().map(|t| t.id.clone()).collect()),
            trust_domain: self
                .identity
                .as_ref()
                .and_then(|i| i.trust_domain.parse().ok()),
        };
        validate::validate(&spec, &known, "", "config")
            .map_err(|e| anyhow::anyhow!("invalid routing configuration:\n{e}"))
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mut ids = HashSet::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if t.id.is_empty() || t.id.len() > 128 {
                bail!("tasks[{i}].id must be 1..=128 characters");
            }
            if !t
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
            {
                bail!(
                    "tasks[{i}].id `{}` may only contain letters, digits and -_.:/",
                    t.id
                );
            }
            if !ids.insert(&t.id) {
                bail!("tasks[{i}].id `{}` is used by more than one task", t.id);
            }
            if t.netns.is_some() == t.pid.is_some() {
                bail!(
                    "tasks[{i}] (`{}`) needs exactly one of `netns = \"/path\"` or `pid = N`",
                    t.id
                );
            }
            if t.cgroup.components().any(|c| c.as_os_str() == "..") {
                bail!(
                    "tasks[{i}].cgroup `{}` must not contain `..`",
                    t.cgroup.display()
                );
            }
        }
        if !(1..=64).contains(&self.agent.worker_threads) {
            bail!(
                "agent.worker_threads = {} is not between 1 and 64",
                self.agent.worker_threads
            );
        }
        if self.agent.outbound_port == 0 {
            bail!("agent.outbound_port must not be 0");
        }
        if self.agent.tunnel_port == 0 || self.agent.tunnel_port == self.agent.outbound_port {
            bail!("agent.tunnel_port must be set and differ from agent.outbound_port");
        }
        let trust_domain = match &self.identity {
            Some(id) => {
                if id.workload_cert_ttl < Duration::from_secs(2) {
                    bail!("identity.workload_cert_ttl must be at least 2s");
                }
                Some(TrustDomain::from_str(&id.trust_domain).context("identity.trust_domain")?)
            }
            None => None,
        };
        for (i, t) in self.tasks.iter().enumerate() {
            if let Some(arn) = &t.role_arn {
                if trust_domain.is_none() {
                    bail!("tasks[{i}].role_arn needs an [identity] section");
                }
                RoleArn::from_str(arn).with_context(|| format!("tasks[{i}].role_arn"))?;
            }
        }
        if let Some(ecs) = &self.ecs {
            for (name, url) in [
                ("ecs.agent_url", &ecs.agent_url),
                ("ecs.credentials_url", &ecs.credentials_url),
            ] {
                crate::ecs::parse_http_url(url).with_context(|| name.to_owned())?;
            }
            if ecs.poll_interval.is_zero() {
                bail!("ecs.poll_interval must be more than 0s");
            }
            if ecs.cgroup_root.components().any(|c| c.as_os_str() == "..") {
                bail!("ecs.cgroup_root must not contain `..`");
            }
        }
        self.dns
            .settings()
            .validate()
            .map_err(|e| anyhow::anyhow!("dns: {e}"))?;
        self.outlier_detection
            .settings()
            .validate()
            .map_err(|e| anyhow::anyhow!("outlier_detection: {e}"))?;
        for s in &self.services {
            s.query()?;
        }
        // The typed views used at run time validate the rest (and name the entry).
        Destinations::new(self, &self.tasks, &[])?;
        Authorizer::new(
            &self.policies,
            self.mesh.default_policy,
            trust_domain.as_ref(),
        )?;
        if self.capture.exclude_ports.contains(&0) {
            bail!("capture.exclude_ports must not contain 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        [agent]
        metrics_addr = "127.0.0.1:15020"
        drain_timeout = "2s"

        [capture]
        mode = "listed"
        destinations = ["198.18.0.3:8080", "198.18.1.7/24", "[2001:db8::1]:443"]
        exclude_ports = [22]
        exclude_cidrs = ["198.18.9.0/24"]

        [[tasks]]
        id = "a"
        cgroup = "mesh/a"
        netns = "/var/run/netns/a"
        addresses = ["198.18.0.2"]

        [[tasks]]
        id = "b"
        cgroup = "/sys/fs/cgroup/mesh/b"
        pid = 42
    "#;

    #[test]
    fn parses_a_full_config() {
        let c = Config::parse(FULL).unwrap();
        assert_eq!(c.agent.drain_timeout, Duration::from_secs(2));
        assert_eq!(c.agent.outbound_port, 15001);
        assert_eq!(c.capture.destinations.len(), 3);
        assert_eq!(
            c.capture.destinations[1],
            Destination::Network(Cidr {
                addr: "198.18.1.0".parse().unwrap(),
                prefix_len: 24
            })
        );
        assert_eq!(c.tasks[1].netns_path(), PathBuf::from("/proc/42/ns/net"));
        assert!(!c.capture.loopback_redirect, "the redirect is opt-in");
        let on = FULL.replace(
            "exclude_ports = [22]",
            "exclude_ports = [22]\nloopback_redirect = true",
        );
        assert!(Config::parse(&on).unwrap().capture.loopback_redirect);
        let bad = FULL.replace("exclude_ports = [22]", "loopback_redirect = \"yes\"");
        assert!(Config::parse(&bad).is_err());
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        for (bad, needle) in [
            ("[agent]\nmetrics_adr = \"1.2.3.4:1\"", "unknown field"),
            ("[capture]\ndestinations = [\"198.18.0.1:0\"]", "port 0"),
            ("[capture]\ndestinations = [\"nonsense\"]", "neither"),
            (
                "[capture]\nexclude_cidrs = [\"10.0.0.0/33\"]",
                "prefix length",
            ),
            ("[capture]\nmode = \"some\"", "unknown variant"),
            (
                "[[tasks]]\nid = \"a\"\ncgroup = \"x\"\npid = 1\n[[tasks]]\nid = \"a\"\ncgroup = \"y\"\npid = 2",
                "more than one task",
            ),
            ("[[tasks]]\nid = \"a\"\ncgroup = \"../x\"\npid = 1", "`..`"),
            ("[[tasks]]\nid = \"a\"\ncgroup = \"x\"", "netns"),
        ] {
            let err = format!("{:#}", Config::parse(bad).unwrap_err());
            assert!(err.contains(needle), "`{bad}` gave `{err}`");
        }
    }

    #[test]
    fn cidrs_are_normalised() {
        let c: Cidr = "198.19.255.1/15".parse().unwrap();
        assert_eq!(c.addr, "198.18.0.0".parse::<IpAddr>().unwrap());
        let host: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(host.prefix_len, 128);
        let all: Cidr = "8.8.8.8/0".parse().unwrap();
        assert_eq!(all.addr, "0.0.0.0".parse::<IpAddr>().unwrap());
    }
}
