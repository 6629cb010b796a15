//! The agent's Prometheus metrics.
//!
//! Per-task series are created once when a task is set up ([`TaskMetrics`]) so the connection
//! path only touches atomics, and they are removed when the task is gone and its last connection
//! has closed, so task churn cannot grow the series set without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::access_log::AccessLog;
use crate::capture::Capture;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectErrorLabels {
    pub task: String,
    pub reason: ConnectErrorReason,
}

/// Why a captured connection could not be carried to its destination.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum ConnectErrorReason {
    /// The destination actively refused (RST).
    refused,
    /// No answer within `agent.connect_timeout`.
    timeout,
    /// No route to the destination network or host.
    unreachable,
    /// The kernel had no original destination for the accepted connection.
    no_original_dst,
    /// The original destination is the agent's own listener.
    loop_detected,
    /// The destination's authorization policy refused the source (HTTP 403 from the peer).
    denied,
    /// The peer agent could not reach the destination (HTTP 503 from the peer).
    upstream_unavailable,
    /// The tunnel to the peer agent failed (connect, TLS handshake, HTTP/2).
    tunnel,
    /// The source task has no workload identity, so it cannot reach meshed destinations.
    no_identity,
    /// The destination is not meshed and `mesh.egress = "deny"`.
    egress_denied,
    /// A virtual service's address on a port none of its listeners has, or no TCP route.
    no_route,
    /// Anything else (socket creation failure, netns worker gone, ...).
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EcsInfoLabels {
    pub cluster: String,
    pub container_instance: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// Istio's standard TCP labels, so existing dashboards and queries work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, serde::Serialize)]
pub struct TcpLabels {
    /// `source` on the client's agent, `destination` on the server's.
    pub reporter: &'static str,
    pub source_workload: String,
    /// The task definition revision (ECS), `unknown` otherwise.
    pub source_version: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_version: String,
    pub destination_principal: String,
    /// `mutual_tls` when carried by the tunnel (or between two meshed tasks of one node),
    /// `none` for plain TCP.
    pub connection_security_policy: &'static str,
}

/// Istio's request labels (a subset: no per-request or per-endpoint-IP values).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, serde::Serialize)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_version: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_version: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// What a principal label says when there is no identity.
pub const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub destination_port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionReasonLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub reporter: &'static str,
    pub source_principal: String,
    pub destination_workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnchorLabels {
    pub anchor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadCertLabels {
    pub task: String,
    pub principal: String,
    pub anchor: String,
}

/// How a proxied connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// Both directions finished (a FIN each way).
    Closed,
    /// One side failed (a TCP reset, a reset tunnel stream, a lost tunnel connection), so the
    /// agent reset both sides.
    Reset,
}

impl ConnectionEnd {
    /// `Reset` if carrying the connection failed.
    pub fn of<T, E>(result: &Result<T, E>) -> ConnectionEnd {
        match result {
            Ok(_) => ConnectionEnd::Closed,
            Err(_) => ConnectionEnd::Reset,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConnectionEnd::Closed => "closed",
            ConnectionEnd::Reset => "reset",
        }
    }
}

/// Counters of one proxied connection, from its reporter's point of view: counted as opened
/// when made (`Metrics::tcp`), as closed by `finish`, or as closed and reset if dropped
/// unfinished (its task cut short, as by a stopping agent after its drain deadline).
pub struct TcpMetrics {
    closed: Counter,
    /// Of the closed, those that ended in a reset.
    reset: Counter,
    /// Bytes from the source to the destination (Istio: received during the request).
    pub received_bytes: Counter,
    /// Bytes from the destination back to the source (Istio: sent during the response).
    pub sent_bytes: Counter,
    duration: Histogram,
    started: std::time::Instant,
    /// This connection's own byte counts, for its access log line.
    connection_received: Counter,
    connection_sent: Counter,
    access_log: Option<Arc<AccessLog>>,
    /// Keeps the series from expiring while the connection is open.
    lease: SeriesLease<TcpLabels>,
    /// How it ended, once `finish` says so; recorded when the handle drops.
    end: Option<ConnectionEnd>,
}

impl TcpMetrics {
    /// Where bytes from the source to the destination are counted.
    pub fn received(&self) -> [&Counter; 2] {
        [&self.received_bytes, &self.connection_received]
    }

    /// Where bytes from the destination back to the source are counted.
    pub fn sent(&self) -> [&Counter; 2] {
        [&self.sent_bytes, &self.connection_sent]
    }

    /// The connection has closed: counted (as reset too if it was), its lifetime observed,
    /// and logged.
    pub fn finish(mut self, end: ConnectionEnd) {
        self.end = Some(end);
    }
}

impl Drop for TcpMetrics {
    /// Records the end `finish` gave, or a reset for a connection whose task was dropped
    /// before it finished.
    fn drop(&mut self) {
        let end = self.end.unwrap_or(ConnectionEnd::Reset);
        let lifetime = self.started.elapsed();
        self.closed.inc();
        if end == ConnectionEnd::Reset {
            self.reset.inc();
        }
        self.duration.observe(lifetime.as_secs_f64() * 1000.0);
        if let Some(log) = &self.access_log {
            log.connection(
                &self.lease.labels,
                lifetime,
                self.connection_received.get(),
                self.connection_sent.get(),
                end,
            );
        }
    }
}

/// When each label set of a per-hop family was last used and how many open connections
/// still hold it. Series idle for longer than the expiry with nothing open are removed
/// (`Metrics::expire_idle_series`), so workload churn cannot grow /metrics without bound.
struct SeriesUse<L>(Mutex<HashMap<L, Use>>);

struct Use {
    last: std::time::Instant,
    open: usize,
}

impl<L: Clone + Eq + std::hash::Hash> SeriesUse<L> {
    fn new() -> Arc<Self> {
        Arc::new(SeriesUse(Mutex::new(HashMap::new())))
    }

    fn touch(&self, labels: &L, open_delta: isize) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let u = map.entry(labels.clone()).or_insert(Use {
            last: std::time::Instant::now(),
            open: 0,
        });
        u.last = std::time::Instant::now();
        u.open = u.open.saturating_add_signed(open_delta);
    }

    /// Removes and returns the label sets idle for longer than `idle` with nothing open.
    fn take_idle(&self, idle: std::time::Duration) -> Vec<L> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<L> = map
            .iter()
            .filter(|(_, u)| u.open == 0 && u.last.elapsed() >= idle)
            .map(|(l, _)| l.clone())
            .collect();
        for l in &stale {
            map.remove(l);
        }
        stale
    }
}

/// One open connection's hold on its series.
struct SeriesLease<L: Clone + Eq + std::hash::Hash> {
    uses: Arc<SeriesUse<L>>,
    labels: L,
}

impl<L: Clone + Eq + std::hash::Hash> Drop for SeriesLease<L> {
    fn drop(&mut self) {
        self.uses.touch(&self.labels, -1);
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_uses: Arc<SeriesUse<RequestLabels>>,
    tcp_uses: Arc<SeriesUse<TcpLabels>>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_duration: Family<TcpLabels, Histogram, fn() -> Histogram>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_reset: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tunnel_connections_opened: Family<DirectionLabels, Counter>,
    tunnel_connections_active: Family<DirectionLabels, Gauge>,
    tunnel_streams_opened: Family<DirectionLabels, Counter>,
    tunnel_handshake_errors: Family<DirectionReasonLabels, Counter>,
    tunnel_connections_retired: Family<DirectionReasonLabels, Counter>,
    policy_denials: Family<DenialLabels, Counter>,
    anchor_expiry: Family<AnchorLabels, Gauge>,
    issuer_expiry: Family<AnchorLabels, Gauge>,
    workload_cert_expiry: Family<WorkloadCertLabels, Gauge>,
    /// The current series of each task's certificate, to replace it on renewal.
    workload_cert_series: Mutex<HashMap<String, WorkloadCertLabels>>,
    cert_renewal_failures: Family<TaskLabels, Counter>,
    trust_reloads: Family<ReloadLabels, Counter>,
    /// Tasks the ECS source currently reports.
    pub ecs_tasks: Gauge,
    ecs_attestations: Family<ResultLabels, Counter>,
    /// Failed reads of the ECS agent's task list.
    pub ecs_agent_errors: Counter,
    endpoint_ejections: Family<ServiceLabels, Counter>,
    detection_timeouts: Family<PortLabels, Counter>,
    access_log_dropped: Counter,
    access_log: std::sync::OnceLock<Arc<AccessLog>>,
    ecs_agent_info: Family<EcsInfoLabels, Gauge>,
    captured: Family<TaskLabels, Counter>,
    opened: Family<TaskLabels, Counter>,
    closed: Family<TaskLabels, Counter>,
    active: Family<TaskLabels, Gauge>,
    sent_bytes: Family<TaskLabels, Counter>,
    received_bytes: Family<TaskLabels, Counter>,
    connect_errors: Family<ConnectErrorLabels, Counter>,
    task_setup_errors: Family<TaskLabels, Counter>,
    pub tasks_meshed: Gauge,
    reloads: Family<ReloadLabels, Counter>,
}

/// One open connection of a task (`TaskMetrics::connection`).
pub struct OpenConnection<'a>(&'a TaskMetrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.active.dec();
        self.0.closed.inc();
    }
}

/// Handles on one task's series, held by its listener and connections.
#[derive(Clone)]
pub struct TaskMetrics {
    pub task: Arc<str>,
    pub captured: Counter,
    opened: Counter,
    closed: Counter,
    active: Gauge,
    /// Bytes the task sent to its destination.
    pub sent_bytes: Counter,
    /// Bytes the destination sent back to the task.
    pub received_bytes: Counter,
    errors: Family<ConnectErrorLabels, Counter>,
}

impl TaskMetrics {
    /// Counts a connection of the task opened, and active until the guard drops: then closed,
    /// whether the connection finished or its task was cut short.
    pub fn connection(&self) -> OpenConnection<'_> {
        self.opened.inc();
        self.active.inc();
        OpenConnection(self)
    }

    pub fn connect_error(&self, reason: ConnectErrorReason) {
        self.errors
            .get_or_create(&ConnectErrorLabels {
                task: self.task.to_string(),
                reason,
            })
            .inc();
    }
}

impl Metrics {
    pub fn new(capture: Arc<Capture>) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            captured: Family::default(),
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            connect_errors: Family::default(),
            task_setup_errors: Family::default(),
            tasks_meshed: Gauge::default(),
            reloads: Family::default(),
            registry: Registry::default(),
            requests: Family::default(),
            request_uses: SeriesUse::new(),
            tcp_uses: SeriesUse::new(),
            request_duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            tcp_opened: Family::default(),
            tcp_duration: Family::new_with_constructor(duration_histogram),
            tcp_closed: Family::default(),
            tcp_reset: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            tunnel_connections_opened: Family::default(),
            tunnel_connections_active: Family::default(),
            tunnel_streams_opened: Family::default(),
            tunnel_handshake_errors: Family::default(),
            tunnel_connections_retired: Family::default(),
            policy_denials: Family::default(),
            anchor_expiry: Family::default(),
            issuer_expiry: Family::default(),
            workload_cert_expiry: Family::default(),
            workload_cert_series: Mutex::new(HashMap::new()),
            cert_renewal_failures: Family::default(),
            trust_reloads: Family::default(),
            ecs_tasks: Gauge::default(),
            ecs_attestations: Family::default(),
            ecs_agent_errors: Counter::default(),
            endpoint_ejections: Family::default(),
            detection_timeouts: Family::default(),
            access_log_dropped: Counter::default(),
            access_log: std::sync::OnceLock::new(),
            ecs_agent_info: Family::default(),
        };
        let reg = &mut registry;
        reg.register(
            "mesh_connections_captured",
            "Connections accepted from a task with a known original destination",
            m.captured.clone(),
        );
        reg.register(
            "mesh_connections_opened",
            "Captured connections whose upstream connection was established",
            m.opened.clone(),
        );
        reg.register(
            "mesh_connections_closed",
            "Proxied connections that have finished (both directions closed)",
            m.closed.clone(),
        );
        reg.register(
            "mesh_connections_active",
            "Proxied connections currently open",
            m.active.clone(),
        );
        reg.register(
            "mesh_tcp_sent_bytes",
            "Bytes the task sent through the agent to its destination",
            m.sent_bytes.clone(),
        );
        reg.register(
            "mesh_tcp_received_bytes",
            "Bytes the destination sent back to the task through the agent",
            m.received_bytes.clone(),
        );
        reg.register(
            "mesh_connect_errors",
            "Captured connections that could not be carried, by reason",
            m.connect_errors.clone(),
        );
        reg.register(
            "mesh_task_setup_errors",
            "Failures to set up capture for a task (missing netns or cgroup, attach failure)",
            m.task_setup_errors.clone(),
        );
        reg.register(
            "mesh_tasks_meshed",
            "Tasks whose sockets are currently captured",
            m.tasks_meshed.clone(),
        );
        reg.register(
            "mesh_config_reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        reg.register(
            "istio_requests",
            "Requests, by reporter, source and destination workload and principal, service, response code and flags",
            m.requests.clone(),
        );
        reg.register(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's arrival to the end of its response",
            m.request_duration.clone(),
        );
        reg.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        reg.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        reg.register(
            "istio_tcp_connections_opened",
            "TCP connections opened, by reporter, source and destination workload and principal",
            m.tcp_opened.clone(),
        );
        reg.register(
            "mesh_tcp_connection_duration_milliseconds",
            "Lifetime of closed TCP connections, same labels as istio_tcp_connections_opened",
            m.tcp_duration.clone(),
        );
        reg.register(
            "istio_tcp_connections_closed",
            "TCP connections closed, same labels as istio_tcp_connections_opened",
            m.tcp_closed.clone(),
        );
        reg.register(
            "mesh_tcp_connections_reset",
            "TCP connections the agent reset on both sides because one side failed or the tunnel between them did (also counted as closed), same labels as istio_tcp_connections_opened",
            m.tcp_reset.clone(),
        );
        reg.register(
            "istio_tcp_received_bytes",
            "Bytes from the source to the destination (the request direction)",
            m.tcp_received.clone(),
        );
        reg.register(
            "istio_tcp_sent_bytes",
            "Bytes from the destination back to the source (the response direction)",
            m.tcp_sent.clone(),
        );
        reg.register(
            "mesh_tunnel_connections_opened",
            "Mutual-TLS tunnel connections established (one TLS handshake each), by direction",
            m.tunnel_connections_opened.clone(),
        );
        reg.register(
            "mesh_tunnel_connections_active",
            "Mutual-TLS tunnel connections currently open, by direction",
            m.tunnel_connections_active.clone(),
        );
        reg.register(
            "mesh_tunnel_streams_opened",
            "CONNECT streams opened over tunnel connections (one per proxied connection)",
            m.tunnel_streams_opened.clone(),
        );
        reg.register(
            "mesh_tunnel_handshake_errors",
            "Tunnel connections that failed before carrying a stream, by direction and reason",
            m.tunnel_handshake_errors.clone(),
        );
        reg.register(
            "mesh_tunnel_connections_retired",
            "Tunnel connections retired because the peer's authentication lapsed, by direction and reason",
            m.tunnel_connections_retired.clone(),
        );
        reg.register(
            "mesh_policy_denials",
            "Connections refused by authorization policy",
            m.policy_denials.clone(),
        );
        reg.register(
            "mesh_trust_anchor_expiry_timestamp_seconds",
            "Expiry (Unix time) of each trust anchor in the loaded bundle",
            m.anchor_expiry.clone(),
        );
        reg.register(
            "mesh_issuer_expiry_timestamp_seconds",
            "Expiry (Unix time) of the loaded issuer certificate, labelled by the anchor it chains to",
            m.issuer_expiry.clone(),
        );
        reg.register(
            "mesh_workload_cert_expiry_timestamp_seconds",
            "Expiry (Unix time) of each task's current workload certificate",
            m.workload_cert_expiry.clone(),
        );
        reg.register(
            "mesh_workload_cert_renewal_failures",
            "Failed workload certificate renewals (the previous certificate stays in use)",
            m.cert_renewal_failures.clone(),
        );
        reg.register(
            "mesh_trust_reloads",
            "Reloads of the trust bundle and issuer files, by result",
            m.trust_reloads.clone(),
        );
        reg.register(
            "mesh_ecs_tasks",
            "Live, meshed tasks the ECS task source currently reports",
            m.ecs_tasks.clone(),
        );
        reg.register(
            "mesh_ecs_attestations",
            "Role attestations by result: role, no_role, retry (e.g. 503 from the credentials endpoint)",
            m.ecs_attestations.clone(),
        );
        reg.register(
            "mesh_ecs_agent_errors",
            "Failed reads of the ECS agent's task list (the last known list stays in force)",
            m.ecs_agent_errors.clone(),
        );
        reg.register(
            "mesh_ecs_agent_info",
            "The ECS cluster and container instance of this node, and the ECS agent's version (value 1)",
            m.ecs_agent_info.clone(),
        );
        reg.register(
            "mesh_endpoint_ejections",
            "DNS-discovered endpoints ejected after failed connections (outlier detection), by service",
            m.endpoint_ejections.clone(),
        );
        reg.register(
            "mesh_protocol_detection_timeouts",
            "Connections to an undeclared port whose application sent too little to detect its protocol within routing.protocol_detection.timeout (carried as opaque TCP, delayed by the timeout), by destination port",
            m.detection_timeouts.clone(),
        );
        reg.register(
            "mesh_access_log_dropped_lines",
            "Access log lines dropped because the writer fell behind (agent.access_log)",
            m.access_log_dropped.clone(),
        );
        reg.register_collector(Box::new(KernelStats { capture }));
        Metrics { registry, ..m }
    }

    pub fn task(&self, task: &str) -> TaskMetrics {
        let l = TaskLabels {
            task: task.to_owned(),
        };
        TaskMetrics {
            task: task.into(),
            captured: self.captured.get_or_create(&l).clone(),
            opened: self.opened.get_or_create(&l).clone(),
            closed: self.closed.get_or_create(&l).clone(),
            active: self.active.get_or_create(&l).clone(),
            sent_bytes: self.sent_bytes.get_or_create(&l).clone(),
            received_bytes: self.received_bytes.get_or_create(&l).clone(),
            errors: self.connect_errors.clone(),
        }
    }

    /// Drops every series of a task that is gone.
    pub fn forget_task(&self, task: &str) {
        let l = TaskLabels {
            task: task.to_owned(),
        };
        for f in [
            &self.captured,
            &self.opened,
            &self.closed,
            &self.sent_bytes,
            &self.received_bytes,
            &self.task_setup_errors,
        ] {
            f.remove(&l);
        }
        self.active.remove(&l);
        use ConnectErrorReason::*;
        for reason in [
            refused,
            timeout,
            unreachable,
            no_original_dst,
            loop_detected,
            denied,
            upstream_unavailable,
            tunnel,
            no_identity,
            egress_denied,
            no_route,
            other,
        ] {
            self.connect_errors.remove(&ConnectErrorLabels {
                task: task.to_owned(),
                reason,
            });
        }
    }

    pub fn task_setup_error(&self, task: &str) {
        self.task_setup_errors
            .get_or_create(&TaskLabels {
                task: task.to_owned(),
            })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// One finished request.
    pub fn request(
        &self,
        labels: &RequestLabels,
        duration: std::time::Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.request_uses.touch(labels, 0);
        self.requests.get_or_create(labels).inc();
        self.request_duration
            .get_or_create(labels)
            .observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }

    /// Removes per-hop series (`istio_*`) not used for `idle` and held by no open connection.
    pub fn expire_idle_series(&self, idle: std::time::Duration) -> usize {
        let tcp = self.tcp_uses.take_idle(idle);
        for l in &tcp {
            self.tcp_opened.remove(l);
            self.tcp_closed.remove(l);
            self.tcp_reset.remove(l);
            self.tcp_received.remove(l);
            self.tcp_sent.remove(l);
            self.tcp_duration.remove(l);
        }
        let requests = self.request_uses.take_idle(idle);
        for l in &requests {
            self.requests.remove(l);
            self.request_duration.remove(l);
            self.request_bytes.remove(l);
            self.response_bytes.remove(l);
        }
        tcp.len() + requests.len()
    }

    /// A proxied connection opened now, counted as such; see `TcpMetrics` for its end.
    pub fn tcp(&self, labels: &TcpLabels) -> TcpMetrics {
        self.tcp_uses.touch(labels, 1);
        self.tcp_opened.get_or_create(labels).inc();
        TcpMetrics {
            lease: SeriesLease {
                uses: self.tcp_uses.clone(),
                labels: labels.clone(),
            },
            connection_received: Counter::default(),
            connection_sent: Counter::default(),
            access_log: self.access_log.get().cloned(),
            closed: self.tcp_closed.get_or_create(labels).clone(),
            reset: self.tcp_reset.get_or_create(labels).clone(),
            received_bytes: self.tcp_received.get_or_create(labels).clone(),
            sent_bytes: self.tcp_sent.get_or_create(labels).clone(),
            duration: self.tcp_duration.get_or_create(labels).clone(),
            started: std::time::Instant::now(),
            end: None,
        }
    }

    pub fn tunnel_connection_opened(&self, direction: &'static str) -> Gauge {
        let l = DirectionLabels { direction };
        self.tunnel_connections_opened.get_or_create(&l).inc();
        let active = self.tunnel_connections_active.get_or_create(&l).clone();
        active.inc();
        active
    }

    pub fn tunnel_stream_opened(&self, direction: &'static str) {
        self.tunnel_streams_opened
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn tunnel_handshake_error(&self, direction: &'static str, reason: &'static str) {
        self.tunnel_handshake_errors
            .get_or_create(&DirectionReasonLabels { direction, reason })
            .inc();
    }

    /// `reason`: `peer_expired` (the peer's certificate expired) or `peer_untrusted` (the
    /// trust bundle no longer vouches for the peer).
    pub fn tunnel_connection_retired(&self, direction: &'static str, reason: &'static str) {
        self.tunnel_connections_retired
            .get_or_create(&DirectionReasonLabels { direction, reason })
            .inc();
    }

    pub fn policy_denial(&self, reporter: &'static str, source: &str, destination: &str) {
        self.policy_denials
            .get_or_create(&DenialLabels {
                reporter,
                source_principal: source.to_owned(),
                destination_workload: destination.to_owned(),
            })
            .inc();
    }

    /// Replaces the trust material series: one per anchor, and the issuer's.
    pub fn set_trust_expiry(
        &self,
        anchors: Vec<(String, SystemTime)>,
        issuer: (String, SystemTime),
    ) {
        self.anchor_expiry.clear();
        for (anchor, at) in anchors {
            self.anchor_expiry
                .get_or_create(&AnchorLabels { anchor })
                .set(unix_seconds(at));
        }
        self.issuer_expiry.clear();
        self.issuer_expiry
            .get_or_create(&AnchorLabels { anchor: issuer.0 })
            .set(unix_seconds(issuer.1));
    }

    pub fn set_workload_cert_expiry(
        &self,
        task: &str,
        principal: &str,
        anchor: &str,
        at: SystemTime,
    ) {
        let labels = WorkloadCertLabels {
            task: task.to_owned(),
            principal: principal.to_owned(),
            anchor: anchor.to_owned(),
        };
        let mut series = self
            .workload_cert_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = series.insert(task.to_owned(), labels.clone())
            && old != labels
        {
            self.workload_cert_expiry.remove(&old);
        }
        self.workload_cert_expiry
            .get_or_create(&labels)
            .set(unix_seconds(at));
    }

    pub fn forget_workload_cert(&self, task: &str) {
        let mut series = self
            .workload_cert_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = series.remove(task) {
            self.workload_cert_expiry.remove(&old);
        }
        self.cert_renewal_failures.remove(&TaskLabels {
            task: task.to_owned(),
        });
    }

    pub fn cert_renewal_failure(&self, task: &str) {
        self.cert_renewal_failures
            .get_or_create(&TaskLabels {
                task: task.to_owned(),
            })
            .inc();
    }

    pub fn ecs_agent_info(&self, cluster: String, container_instance: String, version: String) {
        self.ecs_agent_info.clear();
        self.ecs_agent_info
            .get_or_create(&EcsInfoLabels {
                cluster,
                container_instance,
                version,
            })
            .set(1);
    }

    /// Starts the access log (once, at start-up).
    pub fn open_access_log(&self, path: &std::path::Path) -> std::io::Result<()> {
        let log = AccessLog::open(path, self.access_log_dropped.clone())?;
        let _ = self.access_log.set(Arc::new(log));
        Ok(())
    }

    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.get().map(|l| &**l)
    }

    pub fn detection_timeout(&self, port: u16) {
        self.detection_timeouts
            .get_or_create(&PortLabels {
                destination_port: port.to_string(),
            })
            .inc();
    }

    pub fn endpoint_ejected(&self, service: &str) {
        self.endpoint_ejections
            .get_or_create(&ServiceLabels {
                destination_workload: service.to_owned(),
            })
            .inc();
    }

    pub fn ecs_attestation(&self, result: &'static str) {
        self.ecs_attestations
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn trust_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.trust_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Istio's default millisecond buckets, so dashboards' `histogram_quantile` reads the same.
fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(dst: &str) -> TcpLabels {
        TcpLabels {
            reporter: "source",
            source_workload: "a".into(),
            source_version: UNKNOWN.into(),
            source_principal: "spiffe://td/a".into(),
            destination_version: UNKNOWN.into(),
            destination_workload: dst.into(),
            destination_principal: "spiffe://td/b".into(),
            connection_security_policy: "mutual_tls",
        }
    }

    fn connection(uses: &Arc<SeriesUse<TcpLabels>>) -> TcpMetrics {
        uses.touch(&labels("b"), 1);
        TcpMetrics {
            closed: Counter::default(),
            reset: Counter::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            duration: duration_histogram(),
            started: std::time::Instant::now(),
            connection_received: Counter::default(),
            connection_sent: Counter::default(),
            access_log: None,
            lease: SeriesLease {
                uses: uses.clone(),
                labels: labels("b"),
            },
            end: None,
        }
    }

    /// A connection whose task is dropped before it finished (a stopping agent cutting it
    /// after the drain deadline) is still counted as ended, as a reset, and lets go of its
    /// series; one that finished is counted once.
    #[test]
    fn a_connection_cut_short_is_counted_as_reset() {
        let uses = SeriesUse::<TcpLabels>::new();
        let finished = connection(&uses);
        let (closed, reset) = (finished.closed.clone(), finished.reset.clone());
        finished.finish(ConnectionEnd::Closed);
        assert_eq!((closed.get(), reset.get()), (1, 0));

        let cut = connection(&uses);
        let (closed, reset) = (cut.closed.clone(), cut.reset.clone());
        drop(cut);
        assert_eq!((closed.get(), reset.get()), (1, 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let idle = std::time::Duration::from_millis(10);
        assert_eq!(
            uses.take_idle(idle),
            vec![labels("b")],
            "no open connection holds it"
        );
    }

    #[test]
    fn a_task_connection_is_active_until_its_guard_drops() {
        let task = TaskMetrics {
            task: "t".into(),
            captured: Counter::default(),
            opened: Counter::default(),
            closed: Counter::default(),
            active: Gauge::default(),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            errors: Family::default(),
        };
        let open = task.connection();
        assert_eq!(
            (task.opened.get(), task.active.get(), task.closed.get()),
            (1, 1, 0)
        );
        drop(open);
        assert_eq!(
            (task.opened.get(), task.active.get(), task.closed.get()),
            (1, 0, 1)
        );
    }

    /// An idle series goes; one held by an open connection stays until the connection ends
    /// and the series has been idle again.
    #[test]
    fn idle_series_expire_but_open_connections_keep_theirs() {
        let uses = SeriesUse::<TcpLabels>::new();
        uses.touch(&labels("gone"), 0);
        uses.touch(&labels("open"), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let idle = std::time::Duration::from_millis(10);
        assert_eq!(uses.take_idle(idle), vec![labels("gone")]);
        assert!(uses.take_idle(idle).is_empty(), "the open one stays");
        uses.touch(&labels("open"), -1);
        assert!(uses.take_idle(idle).is_empty(), "just closed: not idle yet");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(uses.take_idle(idle), vec![labels("open")]);
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Reads the kernel programs' per-CPU decision counters at scrape time.
#[derive(Debug)]
struct KernelStats {
    capture: Arc<Capture>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capture")
    }
}

impl Collector for KernelStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.capture.stats();
        let mut family = encoder.encode_descriptor(
            "mesh_capture_decisions",
            "Decisions of the kernel connect hooks in meshed task cgroups, and original-destination bookkeeping",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in mesh_common::stat::NAMES.iter().zip(totals) {
            let labels = [("decision", *name)];
            let sample = family.encode_family(&labels)?;
            ConstCounter::new(value).encode(sample)?;
        }
        Ok(())
    }
}
