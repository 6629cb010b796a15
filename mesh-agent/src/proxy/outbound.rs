//! Outbound: connections a task made that the kernel redirected to the agent's listener in the
//! task's netns.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::splice::splice;
use crate::capture::Capture;
use crate::metrics::{ConnectErrorReason, TaskMetrics};
use crate::netns::NetnsWorker;

/// Everything the outbound path of one task needs.
pub struct OutboundContext {
    pub task_id: Arc<str>,
    pub netns: Arc<NetnsWorker>,
    pub capture: Arc<Capture>,
    pub metrics: TaskMetrics,
    /// Identifies the task's netns in the kernel's original-destination map.
    pub netns_cookie: u64,
    /// The listener addresses, to refuse a destination that would loop back into the agent.
    pub listen_addrs: Vec<SocketAddr>,
    pub connect_timeout: Duration,
}

/// How the connections of one listener are tracked and ended.
#[derive(Clone)]
pub struct ConnectionSet {
    /// The task's connections: its metric series go once these are done.
    pub task: TaskTracker,
    /// Every connection of the agent: the shutdown drain waits for these.
    pub all: TaskTracker,
    /// Fired when the drain deadline passes: ends the connections still open.
    pub abort: CancellationToken,
}

/// Accepts until `stop` fires.
pub async fn serve_outbound(
    listener: TcpListener,
    ctx: Arc<OutboundContext>,
    stop: CancellationToken,
    connections: ConnectionSet,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                let abort = connections.abort.clone();
                let connection = async move {
                    tokio::select! {
                        _ = handle(stream, peer, &ctx) => {}
                        _ = abort.cancelled() => {}
                    }
                };
                connections
                    .task
                    .spawn(connections.all.track_future(connection));
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the kernel keeps the
                // connection queued meanwhile.
                warn!(task = %ctx.task_id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, ctx: &OutboundContext) {
    let m = &ctx.metrics;
    let Some(dst) = ctx.capture.take_original_dst(ctx.netns_cookie, peer) else {
        // Someone connected to the listener directly, or the kernel entry was lost.
        warn!(task = %ctx.task_id, %peer, "no original destination recorded for connection; closing it");
        m.connect_error(ConnectErrorReason::no_original_dst);
        reset(client);
        return;
    };
    m.captured.inc();
    if ctx.listen_addrs.contains(&dst) {
        warn!(task = %ctx.task_id, %peer, %dst, "connection to the agent's own listener; closing it");
        m.connect_error(ConnectErrorReason::loop_detected);
        reset(client);
        return;
    }
    let upstream = match connect(ctx, dst).await {
        Ok(s) => s,
        Err((reason, e)) => {
            info!(task = %ctx.task_id, %peer, %dst, error = %e, "cannot connect to original destination");
            m.connect_error(reason);
            // A reset tells the application the connect failed, like a refused connect would.
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    m.opened.inc();
    m.active.inc();
    debug!(task = %ctx.task_id, %peer, %dst, "proxying");
    if let Err(e) = splice(client, upstream, &m.sent_bytes, &m.received_bytes).await {
        debug!(task = %ctx.task_id, %peer, %dst, error = %e, "connection ended with an error");
    }
    m.active.dec();
    m.closed.inc();
}

/// Connects to `dst` from inside the task's netns, so the destination sees the task's own
/// address, exactly as without the mesh (security groups and host firewalls keep working).
async fn connect(
    ctx: &OutboundContext,
    dst: SocketAddr,
) -> Result<TcpStream, (ConnectErrorReason, io::Error)> {
    let std_socket = ctx
        .netns
        .tcp_socket(dst.is_ipv6())
        .await
        .map_err(|e| (ConnectErrorReason::other, io::Error::other(e)))?;
    let socket = TcpSocket::from_std_stream(std_socket);
    let _ = socket.set_nodelay(true);
    match tokio::time::timeout(ctx.connect_timeout, socket.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((classify(&e), e)),
        Err(_) => Err((
            ConnectErrorReason::timeout,
            io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        )),
    }
}

fn classify(e: &io::Error) -> ConnectErrorReason {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ConnectErrorReason::refused,
        Some(libc::ETIMEDOUT) => ConnectErrorReason::timeout,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => ConnectErrorReason::unreachable,
        _ => ConnectErrorReason::other,
    }
}

/// Closes with RST rather than FIN so the application sees a failed connection, not an empty
/// successful one.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
