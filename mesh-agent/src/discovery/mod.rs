//! Discovery of remote endpoints: where the workloads behind a meshed service name are.
//!
//! Local tasks are discovered from the node itself (the ECS agent, cgroups, procfs); the
//! endpoints of services on other nodes come from DNS, the way ECS users already publish
//! them: AWS Cloud Map (A and SRV records under `<service>.<namespace>`) or Consul DNS
//! (`<service>.service.consul`, `_<service>._tcp.service.consul`). [`dns`] keeps such a
//! name resolved and hands the routing layer a fresh endpoint set whenever it changes;
//! failover between TTL refreshes is the job of passive health checking
//! (`routing::outlier`), because DNS alone is minutes too slow for it.

pub mod dns;
