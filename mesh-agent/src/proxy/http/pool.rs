//! Upstream HTTP connections, pooled per [`Target`].
//!
//! HTTP/1.1: a connection carries one request at a time; it returns to the target's idle list
//! when its response has been read through (a response abandoned half-way closes it), at most
//! `max_idle_per_target` wait there, for at most `idle_timeout`. HTTP/2: one connection per
//! target carries every request, opened by the first request (concurrent first requests share
//! that dial) and replaced when it closes. Closed or failed connections are never handed out.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::body::RequestBody;
use super::{Connector, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, HttpVersion, Target};

/// How long a returned HTTP/1.1 connection may take to become ready for its next request (its
/// previous exchange is finishing); past that it is closed rather than waited for.
const READY_WAIT: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Idle HTTP/1.1 connections kept per target; more are closed when they come back.
    pub max_idle_per_target: usize,
    /// A connection unused for this long is closed. Shorter than the usual server keep-alive
    /// timeouts (Node.js closes after 5 s) so that the server's close rarely races a request.
    pub idle_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            max_idle_per_target: 16,
            idle_timeout: Duration::from_secs(4),
        }
    }
}

/// Upstream connections of one source (the connector decides where they are made from).
pub struct Pool<C> {
    connector: C,
    options: PoolOptions,
    slots: Mutex<HashMap<Target, Arc<Slot>>>,
}

/// The connections to one target.
pub(super) struct Slot {
    idle: Mutex<Vec<IdleH1>>,
    /// Locked while dialling, so concurrent first requests share one connection.
    h2: tokio::sync::Mutex<Option<H2Conn>>,
    max_idle: usize,
}

struct IdleH1 {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    last_used: Instant,
}

/// An HTTP/1.1 connection lent to one exchange; [`Lease::release`] returns it to its target's
/// idle list. Dropped instead, it closes.
pub(super) struct Lease {
    sender: http1::SendRequest<RequestBody>,
    slot: Weak<Slot>,
}

impl Lease {
    pub(super) fn release(self) {
        let Some(slot) = self.slot.upgrade() else {
            return;
        };
        if self.sender.is_closed() {
            return;
        }
        let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < slot.max_idle {
            idle.push(IdleH1 {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

/// A connection ready for one request.
pub(super) struct Checkout {
    conn: Conn,
    /// It had served requests before (a failure to send on it may just mean it went stale).
    pub reused: bool,
}

enum Conn {
    H1 {
        sender: http1::SendRequest<RequestBody>,
        slot: Arc<Slot>,
    },
    H2(http2::SendRequest<RequestBody>),
}

impl Checkout {
    /// Sends the request. When the error gives the request back, it was not sent at all.
    #[allow(clippy::result_large_err)]
    pub(super) async fn send(
        self,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), TrySendError<Request<RequestBody>>> {
        match self.conn {
            Conn::H1 { mut sender, slot } => {
                let response = sender.try_send_request(request).await?;
                let lease = Lease {
                    sender,
                    slot: Arc::downgrade(&slot),
                };
                Ok((response, Some(lease)))
            }
            Conn::H2(mut sender) => Ok((sender.try_send_request(request).await?, None)),
        }
    }
}

impl<C: Connector> Pool<C> {
    /// A pool; its idle connections are reaped by a task on the current tokio runtime.
    pub fn new(connector: C, options: PoolOptions) -> Arc<Pool<C>> {
        let pool = Arc::new(Pool {
            connector,
            options,
            slots: Mutex::new(HashMap::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    #[cfg(test)]
    pub fn connector(&self) -> &C {
        &self.connector
    }

    /// Idle HTTP/1.1 connections and open HTTP/2 connections to `target`.
    #[cfg(test)]
    pub fn idle_connections(&self, target: &Target) -> usize {
        let Some(slot) = self.existing_slot(target) else {
            return 0;
        };
        let idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner()).len();
        let h2 = slot.h2.try_lock().map_or(0, |h2| {
            usize::from(h2.as_ref().is_some_and(|c| !c.sender.is_closed()))
        });
        idle + h2
    }

    #[cfg(test)]
    fn existing_slot(&self, target: &Target) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(target)
            .cloned()
    }

    fn slot(&self, target: &Target) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(target.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    idle: Mutex::new(Vec::new()),
                    h2: tokio::sync::Mutex::new(None),
                    max_idle: self.options.max_idle_per_target,
                })
            })
            .clone()
    }

    /// A connection for one request: a pooled one unless `fresh`, else a new one.
    pub(super) async fn checkout(&self, target: &Target, fresh: bool) -> io::Result<Checkout> {
        let slot = self.slot(target);
        match target.version {
            HttpVersion::Http1 => {
                if !fresh && let Some(sender) = self.idle_h1(&slot).await {
                    return Ok(Checkout {
                        conn: Conn::H1 { sender, slot },
                        reused: true,
                    });
                }
                let sender = self.dial_h1(target, false).await?;
                Ok(Checkout {
                    conn: Conn::H1 { sender, slot },
                    reused: false,
                })
            }
            HttpVersion::Http2 => {
                let mut h2 = slot.h2.lock().await;
                if !fresh
                    && let Some(c) = h2.as_mut()
                    && !c.sender.is_closed()
                {
                    c.last_used = Instant::now();
                    return Ok(Checkout {
                        conn: Conn::H2(c.sender.clone()),
                        reused: true,
                    });
                }
                let sender = self.dial_h2(target).await?;
                *h2 = Some(H2Conn {
                    sender: sender.clone(),
                    last_used: Instant::now(),
                });
                Ok(Checkout {
                    conn: Conn::H2(sender),
                    reused: false,
                })
            }
        }
    }

    /// A new HTTP/1.1 connection of its own for a request that upgrades (WebSocket, CONNECT):
    /// it becomes the upgraded stream, so it is never pooled.
    pub(super) async fn upgradeable(
        &self,
        target: &Target,
    ) -> io::Result<http1::SendRequest<RequestBody>> {
        self.dial_h1(target, true).await
    }

    /// The most recently returned idle connection that is still usable.
    async fn idle_h1(&self, slot: &Slot) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if idle.since.elapsed() >= self.options.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            // Returned the moment its response ended: the connection may take a moment more
            // to be ready for the next request.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, idle.sender.ready()).await {
                return Some(idle.sender);
            }
        }
    }

    async fn dial_h1(
        &self,
        target: &Target,
        upgrades: bool,
    ) -> io::Result<http1::SendRequest<RequestBody>> {
        let io = self.connector.connect(target).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let name = target.name.clone();
        if upgrades {
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(target = %name, error = %e, "upstream HTTP/1.1 connection failed");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    debug!(target = %name, error = %e, "upstream HTTP/1.1 connection failed");
                }
            });
        }
        Ok(sender)
    }

    async fn dial_h2(&self, target: &Target) -> io::Result<http2::SendRequest<RequestBody>> {
        let io = self.connector.connect(target).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let name = target.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(target = %name, error = %e, "upstream HTTP/2 connection failed");
            }
        });
        Ok(sender)
    }

    /// Closes connections idle for longer than the idle timeout and forgets closed ones.
    fn reap_idle(&self) {
        let timeout = self.options.idle_timeout;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
            // An HTTP/2 connection whose handle the pool drops finishes its open streams first.
            let h2_open = match slot.h2.try_lock() {
                Ok(mut h2) => {
                    if h2
                        .as_ref()
                        .is_some_and(|c| c.sender.is_closed() || c.last_used.elapsed() >= timeout)
                    {
                        *h2 = None;
                    }
                    h2.is_some()
                }
                Err(_) => true,
            };
            // Kept while a request holds it (a checkout, or a dial in progress).
            !idle.is_empty() || h2_open || Arc::strong_count(slot) > 1
        });
    }
}

async fn reap<C: Connector>(pool: Weak<Pool<C>>) {
    loop {
        let every = match pool.upgrade() {
            Some(p) => (p.options.idle_timeout / 4)
                .clamp(Duration::from_millis(250), Duration::from_secs(30)),
            None => return,
        };
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.reap_idle(),
            None => return,
        }
    }
}
