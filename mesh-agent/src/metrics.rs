//! The agent's Prometheus metrics.
//!
//! Per-task series are created once when a task is set up ([`TaskMetrics`]) so the connection
//! path only touches atomics, and they are removed when the task is gone and its last connection
//! has closed, so task churn cannot grow the series set without bound.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    /// Anything else (socket creation failure, netns worker gone, ...).
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
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

/// Handles on one task's series, held by its listener and connections.
#[derive(Clone)]
pub struct TaskMetrics {
    pub task: Arc<str>,
    pub captured: Counter,
    pub opened: Counter,
    pub closed: Counter,
    pub active: Gauge,
    /// Bytes the task sent to its destination.
    pub sent_bytes: Counter,
    /// Bytes the destination sent back to the task.
    pub received_bytes: Counter,
    errors: Family<ConnectErrorLabels, Counter>,
}

impl TaskMetrics {
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

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
