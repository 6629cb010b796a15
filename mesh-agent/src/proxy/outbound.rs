//! Outbound: connections a task made that the kernel redirected to the agent's listener in the
//! task's netns.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::splice::splice_after;
use super::{ConnectionSet, Mesh, accept_loop, http, l7};
use crate::capture::Capture;
use crate::certs::WorkloadSlot;
use crate::destinations::{RemoteWorkload, Target};
use crate::metrics::{ConnectErrorReason, ConnectionEnd, TaskMetrics, TcpLabels, UNKNOWN};
use crate::netns::NetnsWorker;
use crate::policy::{Decision, role_of};
use crate::routing::model::Protocol;
use crate::routing::table::AppProtocol;
use crate::tasks::Identity;
use crate::tunnel::{Pool, Source, StreamMeta, TunnelError, TunnelStream};

/// Everything the outbound path of one task needs.
pub struct OutboundContext {
    pub task_id: Arc<str>,
    /// The `source_workload` label: the task's family when it has one, else its id.
    pub workload: Arc<str>,
    /// The `source_version` label.
    pub version: Arc<str>,
    /// The task's workload identity, which a discovered task may still be waiting for.
    pub identity: watch::Receiver<Identity>,
    /// How long a meshed connection waits for a pending identity.
    pub attestation_timeout: Duration,
    /// Upstream HTTP connections of this task's L7 traffic (made from its netns, with its
    /// identity), one pool per service (virtual service, or workload of a direct hop),
    /// created on first use.
    pub l7_pools: std::sync::Mutex<HashMap<Arc<str>, Arc<http::Pool<l7::MeshConnector>>>>,
    pub mesh: Arc<Mesh>,
    pub netns: Arc<NetnsWorker>,
    pub capture: Arc<Capture>,
    pub metrics: TaskMetrics,
    /// Identifies the task's netns in the kernel's original-destination map.
    pub netns_cookie: u64,
    /// The listener addresses, to refuse a destination that would loop back into the agent.
    pub listen_addrs: Vec<SocketAddr>,
    pub connect_timeout: Duration,
}

/// Accepts until `stop` fires.
pub async fn serve_outbound(
    listener: TcpListener,
    ctx: Arc<OutboundContext>,
    stop: CancellationToken,
    connections: ConnectionSet,
) {
    let task_id = ctx.task_id.clone();
    accept_loop(
        listener,
        stop,
        &connections,
        "outbound",
        &task_id,
        |stream, peer| handle(stream, peer, ctx.clone()),
    )
    .await;
}

async fn handle(mut client: TcpStream, peer: SocketAddr, ctx: Arc<OutboundContext>) {
    let ctx = &ctx;
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
    let target = ctx.mesh.destinations().resolve(dst);
    // Meshed destinations need the identity and wait for a pending one; others only report it
    // when it is already known.
    let slot = match target {
        Target::Local(_) | Target::Remote(_) | Target::VirtualService(_)
            if ctx.mesh.certs.is_some() =>
        {
            ctx.workload_identity().await
        }
        _ => match &*ctx.identity.borrow() {
            Identity::Attested(slot) => Some(slot.clone()),
            _ => None,
        },
    };
    let source_principal = slot
        .as_ref()
        .map_or_else(|| UNKNOWN.to_owned(), |s| s.id().to_string());
    let mut labels = TcpLabels {
        reporter: "source",
        source_workload: ctx.workload.to_string(),
        source_version: ctx.version.to_string(),
        source_principal,
        destination_version: UNKNOWN.to_owned(),
        destination_workload: UNKNOWN.to_owned(),
        destination_principal: UNKNOWN.to_owned(),
        connection_security_policy: "none",
    };
    let mut same_node = false;
    // Bytes protocol detection read from the application, sent upstream first.
    let mut prefix = Bytes::new();
    let upstream: Upstream = match target {
        Target::VirtualService(vs) => {
            // Boxed: the L7 engine's state is large, and only its connections should pay for it.
            return Box::pin(l7::serve(ctx.clone(), slot, client, vs, dst)).await;
        }
        Target::Refused => {
            info!(task = %ctx.task_id, %dst, "destination is not meshed and egress is denied; connection refused");
            m.connect_error(ConnectErrorReason::egress_denied);
            reset(client);
            return;
        }
        Target::Passthrough => match connect(ctx, dst).await {
            Ok(s) => Upstream::Direct(s),
            Err(failure) => return refuse_unreachable(ctx, client, dst, failure),
        },
        Target::Local(local) if ctx.mesh.certs.is_none() => {
            // Capture only (no [identity]): another task of the node, carried as plain TCP.
            labels.destination_workload = local.workload().to_owned();
            match connect(ctx, dst).await {
                Ok(s) => Upstream::Direct(s),
                Err(failure) => return refuse_unreachable(ctx, client, dst, failure),
            }
        }
        Target::Local(local) => {
            let Some(slot) = &slot else {
                return refuse_without_identity(ctx, client, dst);
            };
            labels.destination_workload = local.workload().to_owned();
            labels.destination_version = local
                .version
                .as_deref()
                .map_or_else(|| UNKNOWN.to_owned(), str::to_owned);
            labels.destination_principal = local
                .identity
                .as_ref()
                .map_or_else(|| UNKNOWN.to_owned(), |i| i.to_string());
            labels.connection_security_policy = "mutual_tls";
            same_node = true;
            // Same node: no network hop, but the destination's policy still applies.
            if let Decision::Deny { by_default } = ctx.mesh.authorizer().check_in(
                slot.id(),
                &local.task,
                local.family.as_deref(),
                dst.port(),
            ) {
                info!(source = %labels.source_principal, source_role = %role_of(slot.id()), destination = %local.task, %dst, by_default, "connection denied by authorization policy");
                // Both ends are this node's: count it as both agents would.
                for reporter in ["source", "destination"] {
                    ctx.mesh.metrics.policy_denial(
                        reporter,
                        &labels.source_principal,
                        local.workload(),
                    );
                }
                m.connect_error(ConnectErrorReason::denied);
                reset(client);
                return;
            }
            let workload: Arc<str> = local.workload().into();
            let Some((c, p)) = Box::pin(http_or_opaque(
                ctx,
                slot,
                client,
                &local.task,
                workload,
                dst,
            ))
            .await
            else {
                return;
            };
            (client, prefix) = (c, p);
            match connect(ctx, dst).await {
                Ok(s) => Upstream::Direct(s),
                Err(failure) => return refuse_unreachable(ctx, client, dst, failure),
            }
        }
        Target::Remote(remote) => {
            let (Some(slot), Some(pool)) = (&slot, &ctx.mesh.pool) else {
                return refuse_without_identity(ctx, client, dst);
            };
            labels.destination_workload = remote.name.to_string();
            labels.destination_principal = remote.identity.to_string();
            labels.connection_security_policy = "mutual_tls";
            let Some((c, p)) = Box::pin(http_or_opaque(
                ctx,
                slot,
                client,
                &remote.name,
                remote.name.clone(),
                dst,
            ))
            .await
            else {
                return;
            };
            (client, prefix) = (c, p);
            let meta = StreamMeta {
                protocol: None,
                source_workload: Some(ctx.workload.clone()),
                source_version: Some(ctx.version.clone()),
                service: Some(remote.name.clone()),
            };
            // Boxed: dialling (TLS and HTTP/2 handshakes) is large and over once the stream is open.
            match Box::pin(open_remote(ctx, slot, pool, &remote, dst, &meta)).await {
                Ok(stream) => Upstream::Tunnel(stream),
                Err(e) => {
                    let reason = match &e {
                        TunnelError::Denied(_) => {
                            ctx.mesh.metrics.policy_denial(
                                "source",
                                &labels.source_principal,
                                &remote.name,
                            );
                            ConnectErrorReason::denied
                        }
                        TunnelError::Unavailable => ConnectErrorReason::upstream_unavailable,
                        _ => ConnectErrorReason::tunnel,
                    };
                    info!(task = %ctx.task_id, %dst, destination = %remote.identity, error = %e, "cannot open a tunnel stream");
                    m.connect_error(reason);
                    reset(client);
                    return;
                }
            }
        }
    };
    let _ = client.set_nodelay(true);
    let tcp = ctx.mesh.metrics.tcp(&labels);
    // A hop between two tasks of this node is reported by both ends, as two agents would.
    let peer_side = same_node.then(|| {
        ctx.mesh.metrics.tcp(&TcpLabels {
            reporter: "destination",
            ..labels.clone()
        })
    });
    let open = m.connection();
    debug!(task = %ctx.task_id, %peer, %dst, "proxying");
    let mut up = vec![&m.sent_bytes];
    let mut down = vec![&m.received_bytes];
    up.extend(tcp.received());
    down.extend(tcp.sent());
    if let Some(d) = &peer_side {
        up.extend(d.received());
        down.extend(d.sent());
    }
    let result = match upstream {
        // What protocol detection read goes upstream first.
        Upstream::Direct(s) => splice_after(prefix, client, s, &up, &down).await,
        Upstream::Tunnel(t) => splice_after(prefix, client, t.io, &up, &down).await,
    };
    let end = ConnectionEnd::of(&result);
    if let Err(e) = result {
        debug!(task = %ctx.task_id, %peer, %dst, error = %e, "connection ended with an error");
    }
    drop(open);
    tcp.finish(end);
    if let Some(d) = peer_side {
        d.finish(end);
    }
}

/// Opens the tunnel stream for a remote workload. For a DNS-discovered service, an ejected
/// endpoint is replaced by a healthy one, and an endpoint that fails now (its agent or its
/// target unreachable) is ejected and the connection tried once more on another: the
/// application sees neither.
pub(super) async fn open_remote(
    ctx: &OutboundContext,
    slot: &Arc<WorkloadSlot>,
    pool: &Pool,
    remote: &RemoteWorkload,
    dst: SocketAddr,
    meta: &StreamMeta,
) -> Result<TunnelStream, TunnelError> {
    let outliers = &ctx.mesh.outliers;
    let balanced = !remote.endpoints.is_empty();
    let mut wanted = dst;
    let mut attempts = if balanced { 2 } else { 1 };
    loop {
        let now = Instant::now();
        let target = if balanced {
            outliers.choose(wanted, &remote.endpoints, now)
        } else {
            dst
        };
        if target != dst {
            debug!(task = %ctx.task_id, %dst, %target, "endpoint ejected; carrying the connection to another");
        }
        let source = Source {
            task: &ctx.task_id,
            slot,
            netns: &ctx.netns,
        };
        let tunnel_peer = SocketAddr::new(target.ip(), remote.tunnel_port);
        let result = pool
            .open(source, &remote.identity, tunnel_peer, target, meta)
            .await;
        attempts -= 1;
        match result {
            Ok(stream) => {
                if balanced {
                    outliers.record_success(target, now);
                }
                return Ok(stream);
            }
            // The endpoint is unhealthy (not the policy's answer): eject it, try another.
            Err(
                e @ (TunnelError::Unavailable
                | TunnelError::Connect { .. }
                | TunnelError::Handshake { .. }),
            ) if balanced => {
                if outliers.record_failure(target, Instant::now()) {
                    ctx.mesh.metrics.endpoint_ejected(&remote.name);
                    info!(service = %remote.name, endpoint = %target, error = %e, "endpoint ejected");
                }
                if attempts == 0 {
                    return Err(e);
                }
                wanted = target;
            }
            Err(e) => return Err(e),
        }
    }
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(TunnelStream),
}

/// Serves a connection to a meshed workload (`name`: its task id or `[[endpoints]]`/
/// `[[services]]` name; `workload`: its label) as HTTP when its port is declared HTTP or the
/// application's first bytes are HTTP, and returns `None` once done. Otherwise hands the
/// connection back for opaque TCP, with the bytes detection read from it.
async fn http_or_opaque(
    ctx: &Arc<OutboundContext>,
    slot: &Arc<WorkloadSlot>,
    client: TcpStream,
    name: &str,
    workload: Arc<str>,
    dst: SocketAddr,
) -> Option<(TcpStream, Bytes)> {
    let slot = Some(slot.clone());
    match ctx.mesh.routing().app_protocol(name, dst.port()) {
        AppProtocol::Declared(Protocol::Tcp) | AppProtocol::Opaque => Some((client, Bytes::new())),
        AppProtocol::Declared(p) => {
            let _ = client.set_nodelay(true);
            let version = l7::version_of(p);
            Box::pin(l7::serve_direct(
                ctx.clone(),
                slot,
                client,
                version,
                workload,
                dst,
            ))
            .await;
            None
        }
        AppProtocol::Detect(timeout) => match http::detect(client, timeout).await {
            Ok(http::Detection::Http(version, io)) => {
                let _ = io.get_ref().set_nodelay(true);
                Box::pin(l7::serve_direct(
                    ctx.clone(),
                    slot,
                    io,
                    version,
                    workload,
                    dst,
                ))
                .await;
                None
            }
            Ok(http::Detection::Opaque {
                stream,
                prefix,
                timed_out,
            }) => {
                if timed_out {
                    // The application said nothing (or too little) within the timeout: a
                    // server-speaks-first protocol waited that long. Declare the port.
                    ctx.mesh.metrics.detection_timeout(dst.port());
                    debug!(task = %ctx.task_id, %dst, "protocol detection timed out; carrying the connection as opaque TCP");
                }
                Some((stream, prefix))
            }
            Err(e) => {
                debug!(task = %ctx.task_id, %dst, error = %e, "connection failed during protocol detection");
                None
            }
        },
    }
}

/// The direct connect failed: a reset tells the application, as a refused connect would.
fn refuse_unreachable(
    ctx: &OutboundContext,
    client: TcpStream,
    dst: SocketAddr,
    (reason, e): (ConnectErrorReason, io::Error),
) {
    info!(task = %ctx.task_id, %dst, error = %e, "cannot connect to the destination");
    ctx.metrics.connect_error(reason);
    reset(client);
}

impl OutboundContext {
    /// The task's L7 connection pool for `service`.
    pub fn l7_pool(
        &self,
        service: &Arc<str>,
        connector: impl FnOnce() -> l7::MeshConnector,
    ) -> Arc<http::Pool<l7::MeshConnector>> {
        let mut pools = self.l7_pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(service.clone())
            .or_insert_with(|| {
                http::Pool::new(
                    connector(),
                    http::PoolOptions {
                        idle_timeout: l7::POOL_IDLE,
                        ..http::PoolOptions::default()
                    },
                )
            })
            .clone()
    }

    /// The task's certificate; waits up to the attestation timeout while the task's role is
    /// still being learnt (a new task's first connection).
    async fn workload_identity(&self) -> Option<Arc<WorkloadSlot>> {
        let mut identity = self.identity.clone();
        let wait = async {
            loop {
                let current = identity.borrow_and_update().clone();
                match current {
                    Identity::Attested(slot) => return Some(slot),
                    Identity::None => return None,
                    Identity::Pending => {
                        if identity.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(self.attestation_timeout, wait)
            .await
            .unwrap_or_else(|_| {
                info!(task = %self.task_id, "the task's identity is still unknown after {}; treating it as none", humantime::format_duration(self.attestation_timeout));
                None
            })
    }
}

/// A task without a workload identity cannot prove who it is to a meshed destination.
fn refuse_without_identity(ctx: &OutboundContext, client: TcpStream, dst: SocketAddr) {
    info!(task = %ctx.task_id, %dst, "task has no workload identity (no role); meshed destinations are refused");
    ctx.metrics.connect_error(ConnectErrorReason::no_identity);
    reset(client);
}

/// Connects to `dst` from inside the task's netns, so the destination sees the task's own
/// address, exactly as without the mesh (security groups and host firewalls keep working).
async fn connect(
    ctx: &OutboundContext,
    dst: SocketAddr,
) -> Result<TcpStream, (ConnectErrorReason, io::Error)> {
    ctx.netns
        .connect(dst, ctx.connect_timeout)
        .await
        .map_err(|e| (classify(&e), e))
}

fn classify(e: &io::Error) -> ConnectErrorReason {
    if e.kind() == io::ErrorKind::TimedOut {
        return ConnectErrorReason::timeout;
    }
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

#[cfg(test)]
mod tests {
    /// The size of the future an `async fn` of three arguments returns.
    fn future_size<A, B, C, F: Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every captured connection is one task holding this future for its whole life: it must
    /// stay small (the L7 paths, much larger, are boxed only when taken).
    #[test]
    fn a_connection_task_is_small() {
        let size = future_size(super::handle);
        println!("outbound connection future: {size} bytes");
        assert!(size <= 2048, "{size} bytes");
    }
}
