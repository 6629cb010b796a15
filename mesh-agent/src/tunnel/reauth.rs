//! Keeping a live tunnel connection's authentication current.
//!
//! A handshake proves the peer's identity once; a pooled connection can then carry new streams
//! for hours. Two things can take that proof away while the connection lives: the peer's
//! certificate expires, or this agent's trust bundle changes so that the anchor the peer's
//! chain leads to is no longer in it (the last step of a rotation, or an anchor removed after a
//! compromise). [`lapse`] reports the first of the two, and each side of the tunnel then retires the
//! connection: no new streams (they go over a new connection, authenticated afresh), while
//! the streams already open finish. TLS 1.3 cannot re-authenticate a connection in place, and
//! cutting open streams would turn every quarterly rotation into an outage for long-lived
//! connections; the runbook says how to cut them when that is the point (docs/identity.md).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{info, warn};

use super::tls::PeerChain;
use crate::certs::Certs;
use crate::metrics::Metrics;

/// Why a connection's authentication lapsed.
pub enum Lapse {
    /// The peer's chain expired (the earliest `notAfter` in it has passed).
    Expired,
    /// The trust bundle changed and the peer's chain no longer verifies against it.
    Untrusted(rustls::Error),
}

impl Lapse {
    /// Counts the retirement (`mesh_tunnel_connections_retired_total`) and logs why.
    pub fn report(&self, metrics: &Metrics, direction: &'static str, task: &str, peer: SocketAddr) {
        match self {
            Lapse::Expired => {
                metrics.tunnel_connection_retired(direction, "peer_expired");
                info!(direction, task, %peer, "tunnel connection retired, the peer's certificate expired: no new streams, open ones finish");
            }
            Lapse::Untrusted(e) => {
                metrics.tunnel_connection_retired(direction, "peer_untrusted");
                warn!(direction, task, %peer, error = %e, "tunnel connection retired, the trust bundle no longer vouches for the peer: no new streams, open ones finish");
            }
        }
    }
}

/// Completes with the first lapse of `chain`'s authentication: its expiry, or a change of the
/// trust material after which it no longer verifies (changes it survives are waited through).
/// Subscribes to trust changes at once, so a change made while the caller sets up the
/// connection is not missed.
pub fn lapse(chain: PeerChain, certs: Arc<Certs>) -> impl Future<Output = Lapse> {
    let mut trust_changes = certs.watch_trust();
    async move {
        let expiry = tokio::time::sleep_until(chain.expiry_deadline());
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                () = &mut expiry => return Lapse::Expired,
                changed = trust_changes.changed() => {
                    if changed.is_err() {
                        // The trust material can no longer change (the agent is stopping).
                        expiry.await;
                        return Lapse::Expired;
                    }
                    if let Err(e) = chain.verify_against(certs.trust()) {
                        return Lapse::Untrusted(e);
                    }
                }
            }
        }
    }
}
