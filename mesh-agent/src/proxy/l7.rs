//! Connections to a virtual service's address: routed by the routing table (docs/routing.md).
//! HTTP, HTTP/2 and gRPC listeners are served by the L7 engine (`proxy::http`), one routing
//! decision per request; TCP listeners get one decision per connection. Either way the chosen
//! virtual node's endpoint is reached like any meshed destination: through the tunnel, or
//! directly for a task of this node.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::Mesh;
use super::http::{self, Decision, HttpVersion, RequestRecord, RetryOn, Target};
use super::outbound::OutboundContext;
use super::splice::{Metered, splice};
use crate::certs::WorkloadSlot;
use crate::destinations::Target as Destination;
use crate::metrics::{ConnectErrorReason, RequestLabels, TcpLabels, UNKNOWN};
use crate::routing::budget::RetryBudget;
use crate::routing::model::Protocol;
use crate::routing::table::{Discovery, RequestView, VirtualNode};
use crate::tunnel::{Source, TunnelStream};

/// Carries one captured connection to virtual service `vs`.
pub async fn serve(
    ctx: Arc<OutboundContext>,
    slot: Option<Arc<WorkloadSlot>>,
    client: TcpStream,
    vs: Arc<str>,
    dst: SocketAddr,
) {
    let table = ctx.mesh.routing();
    let Some(protocol) = table.listener_protocol(&vs, dst.port()) else {
        info!(task = %ctx.task_id, %dst, virtual_service = %vs, "no listener of the virtual service on this port; connection refused");
        ctx.metrics.connect_error(ConnectErrorReason::no_route);
        let _ = client.set_zero_linger();
        return;
    };
    let connector = MeshConnector {
        ctx: ctx.clone(),
        slot: slot.clone(),
    };
    let _ = client.set_nodelay(true);
    match protocol {
        Protocol::Tcp => serve_tcp(&ctx, slot, client, &vs, dst, connector).await,
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
            let app_protocol = match protocol {
                Protocol::Http => http::Protocol::Http1,
                _ => http::Protocol::Http2,
            };
            let source = slot.as_ref().map(|s| s.id().clone());
            let router = Arc::new(VsRouter {
                mesh: ctx.mesh.clone(),
                vs: vs.clone(),
                source,
                port: dst.port(),
            });
            let observer = Arc::new(Observer {
                mesh: ctx.mesh.clone(),
                source_workload: ctx.workload.clone(),
                source_version: ctx.version.clone(),
                source_principal: slot
                    .as_ref()
                    .map_or_else(|| UNKNOWN.into(), |s| s.id().to_string().into()),
                vs: vs.clone(),
            });
            let pool = ctx.l7_pool(connector);
            let budget = ctx.mesh.retry_budget(&vs);
            // The application's connection, as a hop to the virtual service: its requests go to
            // several workloads (counted per request in istio_requests_*), its bytes are here.
            let tcp = ctx.mesh.metrics.tcp(&TcpLabels {
                reporter: "source",
                source_workload: ctx.workload.to_string(),
                source_version: ctx.version.to_string(),
                destination_version: UNKNOWN.to_owned(),
                source_principal: slot
                    .as_ref()
                    .map_or_else(|| UNKNOWN.to_owned(), |s| s.id().to_string()),
                destination_workload: vs.to_string(),
                destination_principal: UNKNOWN.to_owned(),
                connection_security_policy: if ctx.mesh.certs.is_some() {
                    "mutual_tls"
                } else {
                    "none"
                },
            });
            tcp.opened.inc();
            let client = Metered::new(
                client,
                &[&tcp.received_bytes, &ctx.metrics.sent_bytes],
                &[&tcp.sent_bytes, &ctx.metrics.received_bytes],
            );
            ctx.metrics.opened.inc();
            ctx.metrics.active.inc();
            let options = http::ServeOptions {
                idle_timeout: table.idle_timeout(&vs),
            };
            let served = http::serve_with(
                client,
                app_protocol,
                router,
                pool,
                budget,
                observer,
                &options,
            )
            .await;
            ctx.metrics.active.dec();
            ctx.metrics.closed.inc();
            tcp.finish();
            if let Err(e) = served {
                debug!(task = %ctx.task_id, virtual_service = %vs, error = %e, "HTTP connection ended with an error");
            }
        }
    }
}

/// A TCP listener: one weighted choice per connection, then bytes.
async fn serve_tcp(
    ctx: &OutboundContext,
    slot: Option<Arc<WorkloadSlot>>,
    client: TcpStream,
    vs: &Arc<str>,
    dst: SocketAddr,
    connector: MeshConnector,
) {
    let table = ctx.mesh.routing();
    let Some(decision) = table.route_tcp(vs) else {
        ctx.metrics.connect_error(ConnectErrorReason::no_route);
        let _ = client.set_zero_linger();
        return;
    };
    let port = decision.port.unwrap_or(dst.port());
    let target = Target {
        name: decision.target.name().into(),
        addr: pick_endpoint(&ctx.mesh, decision.target, port),
    };
    let upstream = match connector.open(&target).await {
        Ok(u) => u,
        Err(e) => {
            info!(task = %ctx.task_id, virtual_service = %vs, node = %target.name, error = %e, "cannot reach the virtual node");
            ctx.metrics
                .connect_error(ConnectErrorReason::upstream_unavailable);
            let _ = client.set_zero_linger();
            return;
        }
    };
    let endpoint = endpoint_labels(&ctx.mesh, target.addr);
    let labels = TcpLabels {
        reporter: "source",
        source_workload: ctx.workload.to_string(),
        source_version: ctx.version.to_string(),
        destination_version: endpoint.version,
        source_principal: slot
            .as_ref()
            .map_or_else(|| UNKNOWN.to_owned(), |s| s.id().to_string()),
        destination_workload: target.name.to_string(),
        destination_principal: endpoint.principal,
        connection_security_policy: endpoint.policy,
    };
    let tcp = ctx.mesh.metrics.tcp(&labels);
    tcp.opened.inc();
    ctx.metrics.opened.inc();
    ctx.metrics.active.inc();
    let m = &ctx.metrics;
    let (up, down) = (
        [&m.sent_bytes, &tcp.received_bytes],
        [&m.received_bytes, &tcp.sent_bytes],
    );
    if let Err(e) = splice(client, upstream, &up, &down).await {
        debug!(task = %ctx.task_id, virtual_service = %vs, error = %e, "connection ended with an error");
    }
    ctx.metrics.active.dec();
    ctx.metrics.closed.inc();
    tcp.finish();
}

/// An endpoint of `node` for `port`: a DNS service's endpoint (healthy ones first), a static
/// endpoint's address, or the local task's address. Unspecified when the node has none yet;
/// connecting to it then fails as "no endpoint" (a 503 for HTTP).
fn pick_endpoint(mesh: &Mesh, node: &VirtualNode, port: u16) -> SocketAddr {
    let destinations = mesh.destinations();
    let random = |n: usize| fastrand::usize(..n);
    let none = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port);
    match node.discovery() {
        Discovery::Service(name) => {
            let endpoints = destinations.service_endpoints(name);
            if endpoints.is_empty() {
                return none;
            }
            let wanted = endpoints[random(endpoints.len())];
            mesh.outliers.choose(wanted, endpoints, Instant::now())
        }
        Discovery::Endpoint(name) => {
            let ips = destinations.endpoint_addresses(name);
            ips.get(random(ips.len().max(1)))
                .map_or(none, |ip| SocketAddr::new(*ip, port))
        }
        Discovery::Task(id) => destinations
            .task_addresses(id)
            .first()
            .map_or(none, |ip| SocketAddr::new(*ip, port)),
    }
}

/// The labels of an endpoint the proxy reached: principal, version (a local task's; a remote
/// one's is not known here) and security policy, from one destination lookup.
struct EndpointLabels {
    principal: String,
    version: String,
    policy: &'static str,
}

fn endpoint_labels(mesh: &Mesh, addr: SocketAddr) -> EndpointLabels {
    let unknown = || UNKNOWN.to_owned();
    let meshed = if mesh.certs.is_some() {
        "mutual_tls"
    } else {
        "none"
    };
    match mesh.destinations().resolve(addr) {
        Destination::Remote(w) => EndpointLabels {
            principal: w.identity.to_string(),
            version: unknown(),
            policy: meshed,
        },
        Destination::Local(l) => EndpointLabels {
            principal: l.identity.as_ref().map_or_else(unknown, |i| i.to_string()),
            version: l.version.as_deref().map_or_else(unknown, str::to_owned),
            policy: meshed,
        },
        _ => EndpointLabels {
            principal: unknown(),
            version: unknown(),
            policy: "none",
        },
    }
}

/// Per-request routing over the routing table.
struct VsRouter {
    mesh: Arc<Mesh>,
    vs: Arc<str>,
    source: Option<crate::identity::SpiffeId>,
    /// The port the application connected to.
    port: u16,
}

impl http::Router for VsRouter {
    fn route(&self, request: &::http::request::Parts) -> Option<Decision> {
        let table = self.mesh.routing();
        let view = RequestView::new(&request.method, request.uri.path(), &request.headers);
        let d = table.route_http(&self.vs, &view, self.source.as_ref())?;
        let port = d.port.unwrap_or(self.port);
        let retry = d.retry;
        Some(Decision {
            target: Target {
                name: d.target.name().into(),
                addr: pick_endpoint(&self.mesh, d.target, port),
            },
            per_try_timeout: retry.map(|r| r.per_retry_timeout),
            request_timeout: d.timeouts.per_request,
            max_retries: retry.map_or(0, |r| r.max_retries),
            retry_on: RetryOn {
                server_error: retry.is_some_and(|r| r.retries_status(500)),
                gateway_error: retry.is_some_and(|r| r.retries_status(502)),
                connection_error: retry.is_some_and(|r| r.retries_connection_error()),
                client_error: retry.is_some_and(|r| r.retries_status(409)),
                stream_error: retry.is_some_and(|r| r.retries_stream_error()),
                ..RetryOn::default()
            },
        })
    }
}

impl http::Budget for RetryBudget {
    fn record_request(&self) {
        RetryBudget::record_request(self);
    }

    fn try_retry(&self) -> bool {
        RetryBudget::try_retry(self)
    }
}

/// Turns request records into Istio's request metrics (reporter `source`).
struct Observer {
    mesh: Arc<Mesh>,
    source_workload: Arc<str>,
    source_version: Arc<str>,
    source_principal: Arc<str>,
    vs: Arc<str>,
}

impl http::RequestObserver for Observer {
    fn observe(&self, r: RequestRecord) {
        let (workload, endpoint) = match &r.target {
            Some(t) => (t.name.to_string(), endpoint_labels(&self.mesh, t.addr)),
            None => (
                UNKNOWN.to_owned(),
                EndpointLabels {
                    principal: UNKNOWN.to_owned(),
                    version: UNKNOWN.to_owned(),
                    policy: "none",
                },
            ),
        };
        let labels = RequestLabels {
            reporter: "source",
            source_workload: self.source_workload.to_string(),
            source_version: self.source_version.to_string(),
            source_principal: self.source_principal.to_string(),
            destination_workload: workload,
            destination_version: endpoint.version,
            destination_principal: endpoint.principal,
            destination_service: self.vs.to_string(),
            request_protocol: if r.grpc_status.is_some() {
                "grpc"
            } else {
                "http"
            },
            response_code: r.response_code.to_string(),
            grpc_response_status: r.grpc_status.map_or_else(String::new, |s| s.to_string()),
            response_flags: r.response_flags.to_string(),
            connection_security_policy: endpoint.policy,
        };
        self.mesh
            .metrics
            .request(&labels, r.duration, r.request_bytes, r.response_bytes);
    }
}

/// Opens upstream streams for the L7 pool of one source task.
pub struct MeshConnector {
    ctx: Arc<OutboundContext>,
    slot: Option<Arc<WorkloadSlot>>,
}

impl MeshConnector {
    async fn open(&self, target: &Target) -> io::Result<UpstreamIo> {
        if target.addr.ip().is_unspecified() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("virtual node {} has no endpoint", target.name),
            ));
        }
        let mesh = &self.ctx.mesh;
        match mesh.destinations().resolve(target.addr) {
            Destination::Remote(remote) => {
                let (Some(slot), Some(pool)) = (&self.slot, &mesh.pool) else {
                    return Err(io::Error::other("the task has no identity"));
                };
                let source = Source {
                    task: &self.ctx.task_id,
                    slot,
                    netns: &self.ctx.netns,
                };
                let peer = SocketAddr::new(target.addr.ip(), remote.tunnel_port);
                let opened = pool.open(source, &remote.identity, peer, target.addr).await;
                let balanced = !remote.endpoints.is_empty();
                match opened {
                    Ok(stream) => {
                        if balanced {
                            mesh.outliers.record_success(target.addr, Instant::now());
                        }
                        Ok(UpstreamIo::Tunnel(Box::new(stream)))
                    }
                    Err(e) => {
                        if balanced && mesh.outliers.record_failure(target.addr, Instant::now()) {
                            mesh.metrics.endpoint_ejected(&remote.name);
                        }
                        Err(io::Error::other(e.to_string()))
                    }
                }
            }
            Destination::Local(_) | Destination::Passthrough => {
                let stream = self
                    .ctx
                    .netns
                    .connect(target.addr, self.ctx.connect_timeout)
                    .await?;
                Ok(UpstreamIo::Tcp(stream))
            }
            Destination::VirtualService(_) | Destination::Refused => Err(io::Error::other(
                format!("{} is not a reachable endpoint", target.addr),
            )),
        }
    }
}

impl http::Connector for MeshConnector {
    type Io = UpstreamIo;

    fn protocol(&self, target: &Target) -> HttpVersion {
        let table = self.ctx.mesh.routing();
        match table
            .virtual_node(&target.name)
            .and_then(|n| n.protocol_on(target.addr.port()))
        {
            Some(Protocol::Http2 | Protocol::Grpc) => HttpVersion::Http2,
            _ => HttpVersion::Http1,
        }
    }

    fn connect(&self, target: &Target) -> impl Future<Output = io::Result<UpstreamIo>> + Send {
        self.open(target)
    }
}

/// An upstream byte stream: a direct TCP connection or a tunnel stream.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<TunnelStream>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_shutdown(cx),
        }
    }
}

/// How long idle upstream connections of a task's L7 pool are kept.
pub const POOL_IDLE: Duration = Duration::from_secs(30);
