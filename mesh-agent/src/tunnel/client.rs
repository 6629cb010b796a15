//! The dialling side of the tunnel: HTTP/2 CONNECT streams over pooled mutual-TLS connections.
//!
//! A pooled connection is keyed by (source task, source identity, destination identity, peer
//! address): it authenticates exactly one pair of identities, so it can never carry a stream
//! for another workload. Many streams share one connection; a connection with no stream for
//! `idle_timeout` is closed. After the trust material changes, new streams go over new
//! connections (made with the new chain) while the old ones finish their streams and are
//! closed at the next sweep after their last one; so is a connection whose peer's
//! certificate has expired ([`super::reauth`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::reauth::{self, Lapse};
use super::stream::TunnelIo;
use super::tracked::Tracked;
use super::{HANDSHAKE_TIMEOUT, client_builder};
use super::{StreamMeta, tls};
use crate::certs::{Certs, WorkloadSlot};
use crate::identity::SpiffeId;
use crate::identity::authority::PeerRole;
use crate::metrics::Metrics;
use crate::netns::NetnsWorker;

/// Streams per connection before another connection to the same peer is opened: keeps one
/// busy connection from becoming a head-of-line bottleneck.
const MAX_STREAMS_PER_CONNECTION: usize = 100;

/// Why a tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the destination's policy denied the connection (HTTP {0})")]
    Denied(StatusCode),
    #[error("the peer agent could not reach the destination (HTTP 503)")]
    Unavailable,
    #[error("the peer agent answered HTTP {0}")]
    Status(StatusCode),
    #[error("cannot connect to the peer agent at {peer}: {source}")]
    Connect { peer: SocketAddr, source: io::Error },
    #[error("TLS handshake with the peer agent at {peer} failed: {source}")]
    Handshake { peer: SocketAddr, source: io::Error },
    #[error("HTTP/2 with the peer agent failed: {0}")]
    Http(#[from] h2::Error),
    #[error("{0}")]
    Other(String),
}

/// Who dials: the source task's identity and netns.
pub struct Source<'a> {
    pub task: &'a Arc<str>,
    pub slot: &'a Arc<WorkloadSlot>,
    pub netns: &'a NetnsWorker,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PoolKey {
    task: Arc<str>,
    source: SpiffeId,
    destination: SpiffeId,
    peer: SocketAddr,
}

struct Connection {
    sender: h2::client::SendRequest<Bytes>,
    /// Set when a request on it failed or the connection ended: it is not used for new
    /// streams again.
    broken: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
    generation: u64,
    /// When the peer's certificate chain expires: no new streams from then on.
    peer_expires: SystemTime,
}

impl Connection {
    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    fn usable(&self, generation: u64) -> bool {
        !self.is_broken()
            && !self.retired(generation)
            && self.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION
    }

    /// Made under other trust material, or its peer's certificate has expired: it carries
    /// the streams it has and never takes another.
    fn retired(&self, generation: u64) -> bool {
        self.generation != generation || SystemTime::now() >= self.peer_expires
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Connection>>>;

pub struct Pool {
    certs: Arc<Certs>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    entries: Mutex<HashMap<PoolKey, Slot>>,
}

/// An open stream: the CONNECT tunnel. Counts as a stream of its connection until dropped.
pub struct TunnelStream {
    pub io: TunnelIo,
    _guard: StreamGuard,
}

/// A stream slot taken on a connection.
struct Checkout {
    sender: h2::client::SendRequest<Bytes>,
    broken: Arc<AtomicBool>,
    guard: StreamGuard,
}

struct StreamGuard {
    streams: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(
        certs: Arc<Certs>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            certs,
            metrics,
            connect_timeout,
            idle_timeout,
            entries: Mutex::new(HashMap::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// Opens a stream to `target` through the peer agent at `peer`, which must prove
    /// `destination`; `meta` tells the peer what the stream carries.
    pub async fn open(
        &self,
        source: Source<'_>,
        destination: &SpiffeId,
        peer: SocketAddr,
        target: SocketAddr,
        meta: &StreamMeta,
    ) -> Result<TunnelStream, TunnelError> {
        let key = PoolKey {
            task: source.task.clone(),
            source: source.slot.id().clone(),
            destination: destination.clone(),
            peer,
        };
        let slot = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let (stream, reused) = self
            .checkout(&slot, &source, destination, peer, false)
            .await?;
        match self.connect_stream(stream, target, meta).await {
            // A pooled connection can die unnoticed (the peer agent restarted, an idle NAT
            // entry expired). The stream failed before the peer saw the request, so one retry
            // on a fresh connection is safe and spares the application a reset.
            Err(TunnelError::Http(e)) if reused => {
                debug!(%peer, error = %e, "pooled tunnel connection failed; retrying on a new one");
                let (stream, _) = self
                    .checkout(&slot, &source, destination, peer, true)
                    .await?;
                self.connect_stream(stream, target, meta).await
            }
            result => result,
        }
    }

    /// A sender for a new stream on a usable pooled connection (or a new one when `fresh` or
    /// none is usable); says whether the connection was reused.
    async fn checkout(
        &self,
        slot: &Slot,
        source: &Source<'_>,
        destination: &SpiffeId,
        peer: SocketAddr,
        fresh: bool,
    ) -> Result<(Checkout, bool), TunnelError> {
        // Holding the key's lock while dialling makes concurrent first connects share one
        // handshake instead of racing to open many.
        let mut connections = slot.lock().await;
        let generation = self.certs.generation();
        connections.retain(|c| !c.is_broken());
        let reusable = (!fresh)
            .then(|| connections.iter().position(|c| c.usable(generation)))
            .flatten();
        let (index, reused) = match reusable {
            Some(i) => (i, true),
            None => {
                let c = self.dial(source, destination, peer, generation).await?;
                connections.push(c);
                (connections.len() - 1, false)
            }
        };
        let c = &connections[index];
        c.streams.fetch_add(1, Ordering::Relaxed);
        let checkout = Checkout {
            sender: c.sender.clone(),
            broken: c.broken.clone(),
            guard: StreamGuard {
                streams: c.streams.clone(),
                last_used: c.last_used.clone(),
            },
        };
        Ok((checkout, reused))
    }

    /// Sends the CONNECT request and waits for the peer's answer.
    async fn connect_stream(
        &self,
        stream: Checkout,
        target: SocketAddr,
        meta: &StreamMeta,
    ) -> Result<TunnelStream, TunnelError> {
        self.metrics.tunnel_stream_opened("outbound");
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| TunnelError::Other(e.to_string()))?;
        meta.write_to(request.headers_mut());
        let sent = async {
            let mut sender = stream.sender.ready().await?;
            let (response, send) = sender.send_request(request, false)?;
            Ok::<_, h2::Error>((response.await?, send))
        };
        let (response, send) = match sent.await {
            Ok(r) => r,
            Err(e) => {
                // No new stream goes over this connection again.
                stream.broken.store(true, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        match response.status() {
            StatusCode::OK => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(TunnelError::Denied(s));
            }
            StatusCode::SERVICE_UNAVAILABLE => return Err(TunnelError::Unavailable),
            s => return Err(TunnelError::Status(s)),
        }
        Ok(TunnelStream {
            io: TunnelIo::new(send, response.into_body()),
            _guard: stream.guard,
        })
    }

    async fn dial(
        &self,
        source: &Source<'_>,
        destination: &SpiffeId,
        peer: SocketAddr,
        generation: u64,
    ) -> Result<Connection, TunnelError> {
        let result = self.dial_inner(source, destination, peer, generation).await;
        if let Err(e) = &result {
            let reason = match e {
                TunnelError::Connect { .. } => "connect",
                TunnelError::Handshake { .. } => "tls",
                TunnelError::Http(_) => "http2",
                _ => "other",
            };
            self.metrics.tunnel_handshake_error("outbound", reason);
        }
        result
    }

    async fn dial_inner(
        &self,
        source: &Source<'_>,
        destination: &SpiffeId,
        peer: SocketAddr,
        generation: u64,
    ) -> Result<Connection, TunnelError> {
        let connect_error = |e: io::Error| TunnelError::Connect { peer, source: e };
        // From the source task's netns: the peer sees the task's address, and the task's
        // routes and security groups apply as they would without the mesh.
        let tcp = source
            .netns
            .connect(peer, self.connect_timeout)
            .await
            .map_err(connect_error)?;

        let config =
            tls::client_config(self.certs.trust(), source.slot.clone(), destination.clone())
                .map_err(|e| TunnelError::Other(e.to_string()))?;
        let connector = TlsConnector::from(Arc::new(config));
        // The server name carries the identity we expect, so the node listener of a host-port
        // endpoint can present the right task's certificate.
        let server_name =
            rustls::pki_types::ServerName::try_from(tls::server_name_for(destination))
                .map_err(|e| TunnelError::Other(e.to_string()))?;
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
            .await
            .map_err(|_| TunnelError::Handshake {
                peer,
                source: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|e| TunnelError::Handshake { peer, source: e })?;

        // The verifier accepted the chain; keep it to check again when the bundle changes.
        let chain = tls::PeerChain::of(tls.get_ref().1, PeerRole::Server).ok_or_else(|| {
            TunnelError::Handshake {
                peer,
                source: io::Error::other("the peer's certificate chain cannot be read back"),
            }
        })?;
        let peer_expires = chain.expires();

        // Counted from the TLS handshake on, until the socket is dropped.
        let tls = Tracked::new(tls, self.metrics.tunnel_connection_opened("outbound"));
        let (sender, connection) = client_builder().handshake(tls).await?;
        info!(task = %source.task, source = %source.slot.id(), destination = %destination, %peer, "tunnel connection established");
        let broken = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive(
            connection,
            reauth::lapse(chain, self.certs.clone()),
            broken.clone(),
            self.metrics.clone(),
            source.task.clone(),
            peer,
        ));
        Ok(Connection {
            sender,
            broken,
            streams: Arc::new(AtomicUsize::new(0)),
            last_used: Arc::new(Mutex::new(Instant::now())),
            generation,
            peer_expires,
        })
    }

    /// Drops closed connections, and those without streams that are idle for longer than the
    /// idle timeout or retired (they would only wait for the timeout, unusable).
    fn reap_idle(&self) {
        let generation = self.certs.generation();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, slot| {
            // A key being dialled right now is kept as is.
            let Ok(mut connections) = slot.try_lock() else {
                return true;
            };
            connections.retain(|c| {
                let done = c.streams.load(Ordering::Relaxed) == 0
                    && (c.retired(generation)
                        || c.last_used
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .elapsed()
                            >= self.idle_timeout);
                !done && !c.is_broken()
            });
            !connections.is_empty()
        });
    }
}

/// Runs the HTTP/2 connection (its frames in both directions, for all its streams) until it
/// ends, then marks it broken so that the pool drops it; reports when the peer's
/// authentication lapses (see [`super::reauth`]). Nothing else is needed here: an expired peer
/// fails [`Connection::usable`], a bundle change bumps the generation, so either way the pool
/// opens new streams elsewhere and this connection ends once its open streams have and the
/// pool has let go of it, like any idle one.
async fn drive<C>(
    connection: C,
    lapse: impl std::future::Future<Output = Lapse>,
    broken: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    task: Arc<str>,
    peer: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), h2::Error>>,
{
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = &mut connection => ended,
        lapse = lapse => {
            lapse.report(&metrics, "outbound", &task, peer);
            connection.await
        }
    };
    broken.store(true, Ordering::Relaxed);
    match ended {
        Err(e) => debug!(%peer, error = %e, "tunnel connection ended with an error"),
        Ok(()) => debug!(%peer, "tunnel connection closed"),
    }
}

async fn reap(pool: std::sync::Weak<Pool>) {
    loop {
        let every = match pool.upgrade() {
            Some(p) => {
                (p.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30))
            }
            None => return,
        };
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.reap_idle(),
            None => return,
        }
    }
}
