//! Keeping a live tunnel connection's authentication current.
//!
//! A handshake proves the peer's identity once; a pooled connection can then carry new streams
//! for hours. Two things can take that proof away while the connection lives: the peer's
//! certificate expires, or this agent's trust bundle changes so that the anchor the peer's
//! chain leads to is no longer in it (the last step of a rotation, or an anchor removed after a
//! compromise). [`PeerWatch`] reports both, and each side of the tunnel then retires the
//! connection: no new streams (they go over a new connection, authenticated afresh), while
//! the streams already open finish. TLS 1.3 cannot re-authenticate a connection in place, and
//! cutting open streams would turn every quarterly rotation into an outage for long-lived
//! connections; the runbook says how to cut them when that is the point (docs/identity.md).

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Sleep;

use super::tls::PeerChain;
use crate::certs::Certs;

/// Why a connection's authentication lapsed.
pub enum Lapse {
    /// The peer's chain expired (the earliest `notAfter` in it has passed).
    Expired,
    /// The trust bundle changed and the peer's chain no longer verifies against it.
    Untrusted(rustls::Error),
}

impl Lapse {
    /// The `reason` label of `mesh_tunnel_connections_retired_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Lapse::Expired => "peer_expired",
            Lapse::Untrusted(_) => "peer_untrusted",
        }
    }
}

/// Watches one connection's peer chain against the clock and the trust bundle.
pub struct PeerWatch {
    chain: PeerChain,
    certs: Arc<Certs>,
    trust_changes: watch::Receiver<u64>,
    expiry: Pin<Box<Sleep>>,
    expired: bool,
    /// False once the trust material can no longer change (the agent is stopping).
    watching_trust: bool,
}

impl PeerWatch {
    pub fn new(chain: PeerChain, certs: Arc<Certs>) -> PeerWatch {
        let mut trust_changes = certs.watch_trust();
        // Only changes after the handshake matter; the handshake used the bundle as it was.
        trust_changes.mark_unchanged();
        PeerWatch {
            expiry: Box::pin(tokio::time::sleep_until(chain.expiry_deadline())),
            chain,
            certs,
            trust_changes,
            expired: false,
            watching_trust: true,
        }
    }

    /// The next lapse: expiry (reported once), or a bundle change after which the chain no
    /// longer verifies (bundle changes it survives are not reported). Never completes when
    /// neither can happen any more. Cancel-safe, so it can be one branch of a `select!`.
    pub async fn next(&mut self) -> Lapse {
        loop {
            tokio::select! {
                () = &mut self.expiry, if !self.expired => {
                    self.expired = true;
                    return Lapse::Expired;
                }
                changed = self.trust_changes.changed(), if self.watching_trust => {
                    if changed.is_err() {
                        self.watching_trust = false;
                        continue;
                    }
                    if let Err(e) = self.chain.verify_against(self.certs.trust()) {
                        return Lapse::Untrusted(e);
                    }
                }
                else => std::future::pending().await,
            }
        }
    }
}
