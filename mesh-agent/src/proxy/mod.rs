//! The data path: accept a captured connection, find where it was going, and carry it there:
//! directly (unmeshed destinations and tasks of this node) or through the mutual-TLS tunnel to
//! the destination's agent.

mod http;
mod inbound;
mod l7;
mod outbound;
mod splice;

pub use inbound::{InboundHttp, serve_inbound_http};
pub use outbound::{OutboundContext, serve_outbound};
pub use splice::{SpliceEnd, splice};
use std::sync::Arc;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::certs::Certs;
use crate::destinations::Destinations;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::routing::budget::RetryBudget;
use crate::routing::outlier::OutlierDetector;
use crate::routing::table::RoutingTable;
use crate::tunnel::{HostPorts, Pool};

/// What every connection of the node consults: the destination table and authorization policy
/// (both replaced on reload), the tunnel pool, and the metrics.
pub struct Mesh {
    pub metrics: Arc<Metrics>,
    /// Present when `[identity]` is configured.
    pub certs: Option<Arc<Certs>>,
    pub pool: Option<Arc<Pool>>,
    /// Passive health of DNS-discovered endpoints.
    pub outliers: OutlierDetector,
    /// Host ports published by this node's bridge-mode tasks, for the node's tunnel listener.
    pub host_ports: Arc<HostPorts>,
    authorizer: Live<Authorizer>,
    destinations: Live<Destinations>,
    routing: Live<RoutingTable>,
    /// One retry budget per virtual service, so one failing service cannot spend another's.
    budgets: std::sync::Mutex<std::collections::HashMap<Arc<str>, Arc<RetryBudget>>>,
}

impl Mesh {
    pub fn new(
        metrics: Arc<Metrics>,
        certs: Option<Arc<Certs>>,
        pool: Option<Arc<Pool>>,
        outliers: OutlierDetector,
        authorizer: Authorizer,
        destinations: Destinations,
        routing: RoutingTable,
    ) -> Mesh {
        Mesh {
            metrics,
            certs,
            pool,
            outliers,
            host_ports: Arc::default(),
            authorizer: Live::new(authorizer),
            destinations: Live::new(destinations),
            routing: Live::new(routing),
            budgets: Default::default(),
        }
    }

    pub fn authorizer(&self) -> Arc<Authorizer> {
        self.authorizer.get()
    }

    pub fn destinations(&self) -> Arc<Destinations> {
        self.destinations.get()
    }

    /// A reload: new connections see the new table and policy; open ones are not touched.
    pub fn routing(&self) -> Arc<RoutingTable> {
        self.routing.get()
    }

    /// The retry budget of a virtual service (kept across reloads: its window is history).
    pub fn retry_budget(&self, virtual_service: &Arc<str>) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        budgets
            .entry(virtual_service.clone())
            .or_insert_with(|| Arc::new(RetryBudget::new(self.routing().retry_budget())))
            .clone()
    }

    pub fn update(
        &self,
        authorizer: Authorizer,
        destinations: Destinations,
        routing: RoutingTable,
    ) {
        if routing.retry_budget() != self.routing().retry_budget() {
            self.budgets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.routing.set(routing);
        let live: Vec<SocketAddr> = destinations.meshed_endpoints().collect();
        self.outliers.retain(&live);
        self.authorizer.set(authorizer);
        self.destinations.set(destinations);
    }
}

/// How the connections of one task are tracked and ended.
#[derive(Clone)]
pub struct ConnectionSet {
    /// The task's connections: its metric series go once these are done.
    pub task: TaskTracker,
    /// Every connection of the agent: the shutdown drain waits for these.
    pub all: TaskTracker,
    /// Fired when the drain deadline passes: ends the connections still open.
    pub abort: CancellationToken,
}

impl ConnectionSet {
    /// Runs one connection (or tunnel stream): tracked for its task and for the drain, and
    /// ended when the drain deadline passes.
    pub fn spawn(&self, connection: impl Future<Output = ()> + Send + 'static) {
        let abort = self.abort.clone();
        let ended_at_abort = async move {
            tokio::select! {
                _ = connection => {}
                _ = abort.cancelled() => {}
            }
        };
        self.task.spawn(self.all.track_future(ended_at_abort));
    }
}

/// Accepts on `listener` until `stop` fires, running `handle` for each connection in
/// `connections`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    connections: &ConnectionSet,
    listener_name: &str,
    task_id: &str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => connections.spawn(handle(stream, peer)),
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the kernel keeps the
                // connection queued meanwhile.
                warn!(task = %task_id, listener = listener_name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
