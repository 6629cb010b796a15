//! The data path: accept a captured connection, find where it was going, and carry it there:
//! directly (unmeshed destinations and tasks of this node) or through the mutual-TLS tunnel to
//! the destination's agent.

mod outbound;
mod splice;

use std::sync::Arc;

pub use outbound::{ConnectionSet, OutboundContext, serve_outbound};
pub use splice::splice;

use crate::certs::Certs;
use crate::destinations::Destinations;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::tunnel::Pool;

/// What every connection of the node consults: the destination table and authorization policy
/// (both replaced on reload), the tunnel pool, and the metrics.
pub struct Mesh {
    pub metrics: Arc<Metrics>,
    /// Present when `[identity]` is configured.
    pub certs: Option<Arc<Certs>>,
    pub pool: Option<Arc<Pool>>,
    authorizer: Live<Authorizer>,
    destinations: Live<Destinations>,
}

impl Mesh {
    pub fn new(
        metrics: Arc<Metrics>,
        certs: Option<Arc<Certs>>,
        pool: Option<Arc<Pool>>,
        authorizer: Authorizer,
        destinations: Destinations,
    ) -> Mesh {
        Mesh {
            metrics,
            certs,
            pool,
            authorizer: Live::new(authorizer),
            destinations: Live::new(destinations),
        }
    }

    pub fn authorizer(&self) -> Arc<Authorizer> {
        self.authorizer.get()
    }

    pub fn destinations(&self) -> Arc<Destinations> {
        self.destinations.get()
    }

    /// A reload: new connections see the new table and policy; open ones are not touched.
    pub fn update(&self, authorizer: Authorizer, destinations: Destinations) {
        self.authorizer.set(authorizer);
        self.destinations.set(destinations);
    }
}
