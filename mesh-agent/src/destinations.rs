//! Destination resolution: what a captured connection's original destination is.
//!
//! For now from the configuration only: the addresses of this node's tasks and the static
//! `[[endpoints]]` (meshed workloads elsewhere). Anything else is not meshed and follows the
//! egress policy. DNS and ECS discovery later feed the same table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::{Config, Egress, TaskSpec};
use crate::identity::{RoleArn, SpiffeId, TrustDomain};

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A task of this node: no network hop, but policy and metrics as for any meshed hop.
    Local(Arc<LocalWorkload>),
    /// A meshed workload behind a peer agent.
    Remote(Arc<RemoteWorkload>),
    /// A virtual service's address: routed at L7 (or by TCP route) to its virtual nodes.
    VirtualService(Arc<str>),
    /// Not meshed: plain TCP, as without the mesh.
    Passthrough,
    /// Not meshed, and the egress policy refuses it.
    Refused,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LocalWorkload {
    pub task: Arc<str>,
    pub family: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    /// `None` for a task without a role.
    pub identity: Option<SpiffeId>,
}

impl LocalWorkload {
    /// The `*_workload` label: the task's family when it has one, else its id.
    pub fn workload(&self) -> &str {
        self.family.as_deref().unwrap_or(&self.task)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct RemoteWorkload {
    /// `destination_workload` in metrics.
    pub name: Arc<str>,
    /// The identity the peer agent must prove for this workload.
    pub identity: SpiffeId,
    /// The tunnel port of the peer agent; the tunnel goes to `<destination ip>:<port>`.
    pub tunnel_port: u16,
    /// For a DNS-discovered service, all its endpoints: a connection to an ejected one is
    /// carried to another.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Destinations {
    by_ip: HashMap<IpAddr, Target>,
    /// DNS-discovered endpoints, by exact address.
    by_addr: HashMap<SocketAddr, Target>,
    /// Workload names by identity, to label the source of inbound connections.
    workloads: HashMap<SpiffeId, Arc<str>>,
    /// Where the virtual nodes' endpoints are, by what they name: task ids, static endpoint
    /// names and DNS service names.
    task_addresses: HashMap<String, Vec<IpAddr>>,
    endpoint_addresses: HashMap<String, Vec<IpAddr>>,
    service_endpoints: HashMap<String, Vec<SocketAddr>>,
    egress: Egress,
}

impl Destinations {
    /// Builds the table from the configuration and this node's tasks (static and discovered);
    /// errors name the offending entry.
    ///
    /// `discovered[i]` are the current DNS endpoints of `config.services[i]`.
    pub fn new(
        config: &Config,
        tasks: &[TaskSpec],
        discovered: &[Vec<SocketAddr>],
    ) -> anyhow::Result<Destinations> {
        let trust_domain = config
            .identity
            .as_ref()
            .map(|i| TrustDomain::from_str(&i.trust_domain))
            .transpose()
            .context("identity.trust_domain")?;
        let mut by_ip = HashMap::new();
        let mut workloads = HashMap::new();
        let mut task_addresses = HashMap::new();
        let mut endpoint_addresses = HashMap::new();
        let mut service_endpoints = HashMap::new();
        for task in tasks {
            task_addresses.insert(task.id.clone(), task.addresses.clone());
            let task_id: Arc<str> = task.id.as_str().into();
            let identity = match (&task.role_arn, &trust_domain) {
                (Some(arn), Some(td)) => Some(RoleArn::from_str(arn)?.to_spiffe_id(td)),
                _ => None,
            };
            if let Some(id) = &identity {
                let workload: Arc<str> = task.family.as_deref().unwrap_or(&task.id).into();
                workloads.entry(id.clone()).or_insert(workload);
            }
            let local = Arc::new(LocalWorkload {
                task: task_id,
                family: task.family.as_deref().map(Arc::from),
                version: task.version.as_deref().map(Arc::from),
                identity,
            });
            for ip in &task.addresses {
                if by_ip.insert(*ip, Target::Local(local.clone())).is_some() {
                    bail!("address {ip} belongs to more than one task");
                }
            }
        }
        for (i, e) in config.endpoints.iter().enumerate() {
            let Some(td) = &trust_domain else {
                bail!(
                    "endpoints[{i}] (`{}`): meshed endpoints need an [identity] section",
                    e.name
                );
            };
            if e.name.is_empty() {
                bail!("endpoints[{i}].name must not be empty");
            }
            if e.addresses.is_empty() {
                bail!("endpoints[{i}] (`{}`) lists no addresses", e.name);
            }
            let identity = workload_identity(
                &e.role_arn,
                &e.identity,
                td,
                &format!("endpoints[{i}] (`{}`)", e.name),
            )?;
            endpoint_addresses.insert(e.name.clone(), e.addresses.clone());
            let tunnel_port = e.tunnel_port.unwrap_or(config.agent.tunnel_port);
            if tunnel_port == 0 {
                bail!("endpoints[{i}].tunnel_port must not be 0");
            }
            workloads
                .entry(identity.clone())
                .or_insert_with(|| e.name.as_str().into());
            let workload = Arc::new(RemoteWorkload {
                name: e.name.as_str().into(),
                identity,
                tunnel_port,
                endpoints: Vec::new(),
            });
            for ip in &e.addresses {
                if by_ip
                    .insert(*ip, Target::Remote(workload.clone()))
                    .is_some()
                {
                    bail!(
                        "endpoints[{i}] (`{}`): address {ip} is already a task or another endpoint",
                        e.name
                    );
                }
            }
        }
        // DNS-discovered services: exact `ip:port` entries, since one address (a node with
        // several host ports) may serve several services.
        let mut by_addr = HashMap::new();
        for (i, service) in config.services.iter().enumerate() {
            let Some(td) = &trust_domain else {
                bail!(
                    "services[{i}] (`{}`): meshed services need an [identity] section",
                    service.name
                );
            };
            if service.name.is_empty() {
                bail!("services[{i}].name must not be empty");
            }
            let identity = workload_identity(
                &service.role_arn,
                &service.identity,
                td,
                &format!("services[{i}] (`{}`)", service.name),
            )?;
            workloads
                .entry(identity.clone())
                .or_insert_with(|| service.name.as_str().into());
            let endpoints = discovered.get(i).cloned().unwrap_or_default();
            service_endpoints.insert(service.name.clone(), endpoints.clone());
            let workload = Arc::new(RemoteWorkload {
                name: service.name.as_str().into(),
                identity,
                tunnel_port: service.tunnel_port.unwrap_or(config.agent.tunnel_port),
                endpoints: endpoints.clone(),
            });
            for addr in endpoints {
                // A local task or a static endpoint at that address wins: it is known better.
                if !by_ip.contains_key(&addr.ip()) {
                    by_addr
                        .entry(addr)
                        .or_insert_with(|| Target::Remote(workload.clone()));
                }
            }
        }
        for vs in &config.virtual_services {
            let name: Arc<str> = vs.name.get_ref().as_str().into();
            for ip in &vs.addresses {
                if by_ip
                    .insert(*ip, Target::VirtualService(name.clone()))
                    .is_some()
                {
                    bail!(
                        "virtual service `{name}`: address {ip} is already a task, an endpoint or another virtual service"
                    );
                }
            }
        }
        Ok(Destinations {
            by_ip,
            by_addr,
            workloads,
            task_addresses,
            endpoint_addresses,
            service_endpoints,
            egress: config.mesh.egress,
        })
    }

    pub fn resolve(&self, dst: SocketAddr) -> Target {
        let ip = match dst.ip() {
            // A dual-stack socket connecting to a v4 destination shows it v4-mapped.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if let Some(t) = self.by_addr.get(&SocketAddr::new(ip, dst.port())) {
            return t.clone();
        }
        match self.by_ip.get(&ip) {
            Some(t) => t.clone(),
            None if self.egress == Egress::Deny => Target::Refused,
            None => Target::Passthrough,
        }
    }

    /// The addresses of a local task, a static endpoint or a DNS service's endpoints, for a
    /// virtual node that names it.
    pub fn task_addresses(&self, task: &str) -> &[IpAddr] {
        self.task_addresses.get(task).map_or(&[], Vec::as_slice)
    }

    pub fn endpoint_addresses(&self, endpoint: &str) -> &[IpAddr] {
        self.endpoint_addresses
            .get(endpoint)
            .map_or(&[], Vec::as_slice)
    }

    pub fn service_endpoints(&self, service: &str) -> &[SocketAddr] {
        self.service_endpoints
            .get(service)
            .map_or(&[], Vec::as_slice)
    }

    /// The workload name of an identity, when the configuration knows it.
    pub fn workload_of(&self, id: &SpiffeId) -> Option<Arc<str>> {
        self.workloads.get(id).cloned()
    }

    /// Every meshed address (all ports): the capture rules must include them.
    pub fn meshed_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_ip.keys().copied()
    }

    /// Every meshed `ip:port` (DNS-discovered endpoints).
    pub fn meshed_endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_addr.keys().copied()
    }
}

/// The identity a remote workload must prove, from exactly one of a role ARN or a SPIFFE id.
fn workload_identity(
    role_arn: &Option<String>,
    identity: &Option<String>,
    td: &TrustDomain,
    what: &str,
) -> anyhow::Result<SpiffeId> {
    match (role_arn, identity) {
        (Some(arn), None) => Ok(RoleArn::from_str(arn)
            .with_context(|| format!("{what}: role_arn"))?
            .to_spiffe_id(td)),
        (None, Some(id)) => {
            let id = SpiffeId::from_str(id).with_context(|| format!("{what}: identity"))?;
            if id.trust_domain() != td {
                bail!("{what}: identity `{id}` is outside the trust domain `{td}`");
            }
            Ok(id)
        }
        _ => bail!("{what} needs exactly one of `role_arn` or `identity`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            r#"
            [identity]
            trust_domain = "mesh.test"
            bundle = "/b.pem"
            issuer = "/i.pem"

            [[tasks]]
            id = "a"
            cgroup = "x/a"
            pid = 1
            addresses = ["198.18.1.2"]
            role_arn = "arn:aws:iam::111122223333:role/a"
            {extra}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn resolves_local_remote_and_the_rest() {
        let c = config(
            r#"
            [[endpoints]]
            name = "b"
            addresses = ["198.18.2.2"]
            role_arn = "arn:aws:iam::111122223333:role/b"
            [[endpoints]]
            name = "c"
            addresses = ["198.18.2.3"]
            identity = "spiffe://mesh.test/custom/c"
            tunnel_port = 16008
            "#,
        );
        let d = Destinations::new(&c, &c.tasks, &[]).unwrap();
        let at = |s: &str| d.resolve(s.parse().unwrap());
        let Target::Local(a) = at("198.18.1.2:80") else {
            panic!("a is local")
        };
        assert_eq!(&*a.task, "a");
        assert_eq!(
            a.identity.as_ref().unwrap().to_string(),
            "spiffe://mesh.test/aws/111122223333/role/a"
        );
        assert_eq!(at("[::ffff:198.18.1.2]:80"), Target::Local(a));
        let Target::Remote(b) = at("198.18.2.2:8080") else {
            panic!("b is remote")
        };
        assert_eq!(
            b.identity.to_string(),
            "spiffe://mesh.test/aws/111122223333/role/b"
        );
        assert_eq!(b.tunnel_port, 15008);
        let Target::Remote(c) = at("198.18.2.3:1") else {
            panic!("c is remote")
        };
        assert_eq!(c.tunnel_port, 16008);
        assert_eq!(at("198.18.9.9:80"), Target::Passthrough);
        assert_eq!(d.meshed_addresses().count(), 3);
    }

    #[test]
    fn egress_deny_refuses_the_rest() {
        let mut c = config("");
        c.mesh.egress = Egress::Deny;
        let d = Destinations::new(&c, &c.tasks, &[]).unwrap();
        assert_eq!(
            d.resolve("203.0.113.1:443".parse().unwrap()),
            Target::Refused
        );
    }

    #[test]
    fn bad_endpoints_are_rejected_by_config_validation() {
        for (extra, needle) in [
            (
                "[[endpoints]]\nname = \"b\"\naddresses = [\"198.18.2.2\"]",
                "exactly one of",
            ),
            (
                "[[endpoints]]\nname = \"b\"\naddresses = [\"198.18.1.2\"]\nidentity = \"spiffe://mesh.test/b\"",
                "already a task",
            ),
            (
                "[[endpoints]]\nname = \"b\"\naddresses = [\"198.18.2.2\"]\nidentity = \"spiffe://other/b\"",
                "outside the trust domain",
            ),
            (
                "[[endpoints]]\nname = \"b\"\naddresses = []\nidentity = \"spiffe://mesh.test/b\"",
                "no addresses",
            ),
        ] {
            let text = format!(
                "[identity]\ntrust_domain = \"mesh.test\"\nbundle = \"/b\"\nissuer = \"/i\"\n\
                 [[tasks]]\nid = \"a\"\ncgroup = \"x\"\npid = 1\naddresses = [\"198.18.1.2\"]\n{extra}"
            );
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(err.contains(needle), "`{extra}` gave `{err}`");
        }
    }
}
