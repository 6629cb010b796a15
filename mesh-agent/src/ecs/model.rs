//! The ECS agent introspection API's `/v1/tasks` answer (docs: ecs-interfaces §1). Parsing is
//! lenient: unknown fields are ignored and optional ones may be missing, because the agent adds
//! fields between versions.

use serde::{Deserialize, Deserializer};

/// The ECS agent is written in Go: an empty list may arrive as `null`.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// `/v1/metadata`: which cluster and container instance this node is.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Metadata {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub container_instance_arn: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TasksResponse {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tasks: Vec<Task>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Task {
    pub arn: String,
    #[serde(default)]
    pub desired_status: Option<String>,
    #[serde(default)]
    pub known_status: String,
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Container {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub ports: Vec<Port>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub networks: Vec<Network>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Port {
    #[serde(default)]
    pub container_port: u16,
    #[serde(default)]
    pub host_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Network {
    #[serde(default)]
    pub network_mode: String,
    #[serde(default, rename = "IPv4Addresses", deserialize_with = "null_as_empty")]
    pub ipv4_addresses: Vec<String>,
    #[serde(default, rename = "IPv6Addresses", deserialize_with = "null_as_empty")]
    pub ipv6_addresses: Vec<String>,
}

impl Task {
    /// The task id: the last segment of the ARN (`.../task/<cluster>/<id>` or `.../task/<id>`).
    pub fn task_id(&self) -> &str {
        self.arn.rsplit('/').next().unwrap_or(&self.arn)
    }

    /// Running or about to run, and not on its way out.
    pub fn is_live(&self) -> bool {
        let stopping = self.desired_status.as_deref() == Some("STOPPED");
        !stopping
            && matches!(
                self.known_status.as_str(),
                "RUNNING" | "PENDING" | "ACTIVATING"
            )
    }

    /// `awsvpc`, or `None` for bridge and host tasks (the API lists networks only for awsvpc).
    pub fn network_mode(&self) -> Option<&str> {
        self.containers
            .iter()
            .flat_map(|c| &c.networks)
            .map(|n| n.network_mode.as_str())
            .next()
    }

    /// TCP ports published on the node (bridge mode): `(host port, container port)`.
    pub fn host_ports(&self) -> Vec<crate::config::HostPort> {
        let mut out: Vec<crate::config::HostPort> = self
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter(|p| p.host_port != 0 && p.container_port != 0)
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "tcp"))
            .map(|p| crate::config::HostPort {
                host: p.host_port,
                container: p.container_port,
            })
            .collect();
        out.sort_by_key(|p| p.host);
        out.dedup();
        out
    }

    pub fn addresses(&self) -> Vec<std::net::IpAddr> {
        let mut out: Vec<std::net::IpAddr> = self
            .containers
            .iter()
            .flat_map(|c| &c.networks)
            .flat_map(|n| n.ipv4_addresses.iter().chain(&n.ipv6_addresses))
            .filter_map(|a| a.parse().ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented awsvpc example, plus fields a newer agent might add.
    #[test]
    fn parses_the_documented_shape() {
        let json = r#"{"Tasks":[{"Arn":"arn:aws:ecs:us-west-2:111122223333:task/prod/8f03e41243824aea923aca126495f665",
 "DesiredStatus":"RUNNING","KnownStatus":"RUNNING","Family":"orders","Version":"7","NewField":1,
 "Containers":[{"DockerId":"ea32192c8553fbff06c9340478a2ff089b2bb5646fb718b4ee206641c9086d66",
  "DockerName":"ecs-orders-7-app-cca48e8dcadd97805600","Name":"app",
  "Ports":[{"ContainerPort":8080,"Protocol":"tcp","HostPort":8080}],
  "Networks":[{"NetworkMode":"awsvpc","IPv4Addresses":["10.0.2.106"]}]}]},
  {"Arn":"arn:aws:ecs:us-west-2:111122223333:task/old","KnownStatus":"STOPPED","Family":"x","Containers":null}]}"#;
        let r: TasksResponse = serde_json::from_str(json).unwrap();
        assert_eq!(r.tasks.len(), 2);
        let t = &r.tasks[0];
        assert_eq!(t.task_id(), "8f03e41243824aea923aca126495f665");
        assert!(t.is_live());
        assert_eq!(t.network_mode(), Some("awsvpc"));
        assert_eq!(
            t.host_ports(),
            vec![crate::config::HostPort {
                host: 8080,
                container: 8080
            }]
        );
        assert_eq!(
            t.addresses(),
            vec!["10.0.2.106".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(!r.tasks[1].is_live());
        assert_eq!(r.tasks[1].task_id(), "old");
        assert_eq!(r.tasks[1].network_mode(), None);
    }
}
