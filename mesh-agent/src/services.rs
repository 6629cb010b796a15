//! DNS-discovered services at run time: one watch per `[[services]]` entry; every change of an
//! endpoint set is forwarded to the agent loop, which rebuilds the destination table and the
//! capture rules. Endpoints that fail are ejected by the outlier detector (`routing::outlier`),
//! faster than any TTL.

use std::net::SocketAddr;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Config;
use crate::discovery::dns::{DnsClient, DnsWatch, Source};

/// The endpoints of `services[index]` changed.
#[derive(Debug)]
pub struct ServiceUpdate {
    /// Which start of the watches sent it: an update still queued from before a reload names
    /// an index of the old service list and is dropped.
    pub generation: u64,
    pub index: usize,
    pub endpoints: Vec<SocketAddr>,
}

/// The running watches; dropping it stops them.
#[derive(Default)]
pub struct ServiceWatches {
    watches: Vec<DnsWatch>,
}

impl ServiceWatches {
    /// Stops every watch and waits for their tasks, so no update of the old service list
    /// arrives after the new one's.
    pub async fn stop(self) {
        for w in self.watches {
            w.stop().await;
        }
    }
}

/// Starts watching every service of `config`. Errors (no name server configured) stop nothing
/// else: the services then have no endpoints and their addresses pass through unmeshed.
pub fn start(
    config: &Config,
    generation: u64,
    updates: mpsc::Sender<ServiceUpdate>,
) -> anyhow::Result<ServiceWatches> {
    if config.services.is_empty() {
        return Ok(ServiceWatches::default());
    }
    let client = DnsClient::new(&config.dns.settings())
        .map_err(|e| anyhow::anyhow!("DNS discovery: {e}"))?;
    let mut watches = Vec::with_capacity(config.services.len());
    for (index, service) in config.services.iter().enumerate() {
        let watch = client
            .watch(service.query()?)
            .map_err(|e| anyhow::anyhow!("service `{}`: {e}", service.name))?;
        let mut rx = watch.subscribe();
        let updates = updates.clone();
        let name = service.name.clone();
        tokio::spawn(async move {
            let mut last: Option<Vec<SocketAddr>> = None;
            loop {
                let resolution = rx.borrow_and_update().clone();
                match (&resolution.source, &resolution.last_error) {
                    (Source::LastKnownGood, Some(e)) => {
                        warn!(service = %name, "DNS lookup failed, keeping the last known endpoints: {e}")
                    }
                    (Source::Pending, Some(e)) => {
                        warn!(service = %name, "DNS lookup failed, no endpoints known yet: {e}")
                    }
                    _ => {}
                }
                let endpoints = resolution.addrs();
                // "Nothing known yet" is not "no endpoints": the agent keeps what it had.
                let known = resolution.source != Source::Pending;
                if known && last.as_ref() != Some(&endpoints) {
                    info!(service = %name, endpoints = ?endpoints, "service endpoints changed");
                    if updates
                        .send(ServiceUpdate {
                            generation,
                            index,
                            endpoints: endpoints.clone(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last = Some(endpoints);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        watches.push(watch);
    }
    Ok(ServiceWatches { watches })
}
