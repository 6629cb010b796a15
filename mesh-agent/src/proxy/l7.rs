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

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::Mesh;
use super::http::{self, Decision, GrpcCodes, HttpVersion, RequestRecord, RetryOn, Target};
use super::outbound::{OutboundContext, open_remote};
use super::splice::{Metered, SpliceEnd, splice};
use crate::access_log::RequestEntry;
use crate::certs::WorkloadSlot;
use crate::destinations::Target as Destination;
use crate::metrics::{ConnectErrorReason, ConnectionEnd, RequestLabels, TcpLabels, UNKNOWN};
use crate::policy::{Decision as PolicyDecision, role_of};
use crate::routing::budget::RetryBudget;
use crate::routing::model::Protocol;
use crate::routing::table::{Discovery, RequestView, VirtualNode};
use crate::tunnel::{StreamMeta, StreamProtocol, TunnelError, TunnelStream};

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
    let _ = client.set_nodelay(true);
    match protocol {
        Protocol::Tcp => {
            let connector = MeshConnector {
                ctx: ctx.clone(),
                slot: slot.clone(),
                service: vs.clone(),
            };
            serve_tcp(&ctx, slot, client, &vs, dst, connector).await
        }
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
            let source = slot.as_ref().map(|s| s.id().clone());
            let router = Arc::new(VsRouter {
                mesh: ctx.mesh.clone(),
                vs: vs.clone(),
                source,
                port: dst.port(),
            });
            let budget = ctx.mesh.retry_budget(&vs);
            let hop = Hop {
                service: vs.clone(),
                endpoint: None,
                idle_timeout: table.idle_timeout(&vs),
            };
            serve_http(
                &ctx,
                slot,
                client,
                version_of(protocol),
                router,
                budget,
                hop,
            )
            .await;
        }
    }
}

/// A connection to a meshed workload's port that speaks HTTP (declared by a virtual node, or
/// detected) but is not a virtual service's: no routing, but each request is proxied and
/// reported, to the address the application dialled.
pub async fn serve_direct<S>(
    ctx: Arc<OutboundContext>,
    slot: Option<Arc<WorkloadSlot>>,
    client: S,
    version: HttpVersion,
    workload: Arc<str>,
    dst: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = Arc::new(http::Fixed(Decision::to(Target {
        name: workload.clone(),
        addr: dst,
        version,
    })));
    let hop = Hop {
        service: workload,
        endpoint: Some(dst),
        idle_timeout: None,
    };
    serve_http(
        &ctx,
        slot,
        client,
        version,
        router,
        Arc::new(NoRetries),
        hop,
    )
    .await;
}

/// The HTTP version a listener protocol speaks.
pub fn version_of(protocol: Protocol) -> HttpVersion {
    match protocol {
        Protocol::Http2 | Protocol::Grpc => HttpVersion::Http2,
        Protocol::Http | Protocol::Tcp => HttpVersion::Http1,
    }
}

/// What an application connection served as HTTP is a hop to.
struct Hop {
    /// The `destination_service` label, and the key of the task's upstream pool.
    service: Arc<str>,
    /// The one endpoint of a direct hop (a virtual service's requests go to several).
    endpoint: Option<SocketAddr>,
    idle_timeout: Option<Duration>,
}

/// Serves one application connection as HTTP, reporting its requests (reporter `source`)
/// and its bytes.
async fn serve_http<S>(
    ctx: &Arc<OutboundContext>,
    slot: Option<Arc<WorkloadSlot>>,
    client: S,
    version: HttpVersion,
    router: Arc<dyn http::Router>,
    budget: Arc<dyn http::Budget>,
    hop: Hop,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mesh = &ctx.mesh;
    let source_principal: Arc<str> = slot
        .as_ref()
        .map_or_else(|| UNKNOWN.into(), |s| s.id().to_string().into());
    let observer = Arc::new(Observer {
        mesh: mesh.clone(),
        reporter: "source",
        source_workload: ctx.workload.clone(),
        source_version: ctx.version.clone(),
        source_principal: source_principal.clone(),
        service: hop.service.clone(),
        destination: None,
    });
    let pool = ctx.l7_pool(&hop.service, || MeshConnector {
        ctx: ctx.clone(),
        slot: slot.clone(),
        service: hop.service.clone(),
    });
    // The application's connection, as a hop: to a virtual service its requests go to
    // several workloads (counted per request in istio_requests_*); its bytes are here.
    let endpoint = hop.endpoint.map(|a| endpoint_labels(mesh, a));
    let labels = TcpLabels {
        reporter: "source",
        source_workload: ctx.workload.to_string(),
        source_version: ctx.version.to_string(),
        source_principal: source_principal.to_string(),
        destination_workload: hop.service.to_string(),
        destination_version: endpoint
            .as_ref()
            .map_or_else(|| UNKNOWN.to_owned(), |e| e.version.clone()),
        destination_principal: endpoint
            .as_ref()
            .map_or_else(|| UNKNOWN.to_owned(), |e| e.principal.clone()),
        connection_security_policy: if mesh.certs.is_some() {
            "mutual_tls"
        } else {
            "none"
        },
    };
    let tcp = mesh.metrics.tcp(&labels);
    // A direct hop to a task of this node is reported by both ends, as two agents would.
    let peer_side = endpoint.as_ref().is_some_and(|e| e.local).then(|| {
        mesh.metrics.tcp(&TcpLabels {
            reporter: "destination",
            ..labels.clone()
        })
    });
    let mut received = vec![&ctx.metrics.sent_bytes];
    let mut sent = vec![&ctx.metrics.received_bytes];
    for t in std::iter::once(&tcp).chain(&peer_side) {
        received.extend(t.received());
        sent.extend(t.sent());
    }
    let client = Metered::new(client, &received, &sent);
    let open = ctx.metrics.connection();
    let options = http::ServeOptions {
        idle_timeout: hop.idle_timeout,
    };
    let served = http::serve(client, version, router, pool, budget, observer, &options).await;
    drop(open);
    // An HTTP connection's failures are its requests' (`response_flags`); the connection
    // itself ends as HTTP ends it.
    tcp.finish(ConnectionEnd::Closed);
    if let Some(d) = peer_side {
        d.finish(ConnectionEnd::Closed);
    }
    if let Err(e) = served {
        debug!(task = %ctx.task_id, service = %hop.service, error = %e, "HTTP connection ended with an error");
    }
}

/// For hops without a retry policy.
pub(super) struct NoRetries;

impl http::Budget for NoRetries {
    fn record_request(&self) {}

    fn try_retry(&self) -> bool {
        false
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
        version: HttpVersion::Http1,
    };
    let upstream = match connector.open(&target, None).await {
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
    let open = ctx.metrics.connection();
    let m = &ctx.metrics;
    let [received, received_here] = tcp.received();
    let [sent, sent_here] = tcp.sent();
    let (up, down) = (
        [&m.sent_bytes, received, received_here],
        [&m.received_bytes, sent, sent_here],
    );
    let result = splice(client, upstream, &up, &down).await;
    if let Err(e) = &result {
        debug!(task = %ctx.task_id, virtual_service = %vs, error = %e, "connection ended with an error");
    }
    drop(open);
    tcp.finish(ConnectionEnd::of(&result));
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
    /// A task of this node: its agent (this one) reports the destination side too.
    local: bool,
}

impl EndpointLabels {
    fn unknown() -> EndpointLabels {
        EndpointLabels {
            principal: UNKNOWN.to_owned(),
            version: UNKNOWN.to_owned(),
            policy: "none",
            local: false,
        }
    }
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
            local: false,
        },
        Destination::Local(l) => EndpointLabels {
            principal: l.identity.as_ref().map_or_else(unknown, |i| i.to_string()),
            version: l.version.as_deref().map_or_else(unknown, str::to_owned),
            policy: meshed,
            local: true,
        },
        _ => EndpointLabels::unknown(),
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
        // The virtual node's listener says what the endpoint speaks; HTTP/1.1 when it
        // declares none on that port.
        let version = d
            .target
            .protocol_on(port)
            .map_or(HttpVersion::Http1, version_of);
        Some(Decision {
            target: Target {
                name: d.target.name().into(),
                addr: pick_endpoint(&self.mesh, d.target, port),
                version,
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
                grpc: retry.map_or_else(GrpcCodes::default, |r| {
                    (0..=16)
                        .filter(|c| r.retries_grpc_status(*c))
                        .fold(GrpcCodes::default(), GrpcCodes::with)
                }),
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

/// Turns request records into Istio's request metrics.
pub(super) struct Observer {
    pub mesh: Arc<Mesh>,
    /// `source` (the caller's agent: the destination is looked up per request, by the
    /// address it went to) or `destination` (the callee's agent: `destination` is set).
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_version: Arc<str>,
    pub source_principal: Arc<str>,
    /// `destination_service`: the virtual service, or the workload of a direct hop.
    pub service: Arc<str>,
    pub destination: Option<FixedDestination>,
}

/// The destination labels the destination's agent knows for every request of a stream.
pub(super) struct FixedDestination {
    pub workload: String,
    pub version: String,
    pub principal: String,
}

impl http::RequestObserver for Observer {
    fn observe(&self, r: RequestRecord) {
        let (workload, endpoint) = match (&self.destination, &r.target) {
            (Some(d), _) => (
                d.workload.clone(),
                EndpointLabels {
                    principal: d.principal.clone(),
                    version: d.version.clone(),
                    policy: "mutual_tls",
                    local: false,
                },
            ),
            (None, Some(t)) => (t.name.to_string(), endpoint_labels(&self.mesh, t.addr)),
            (None, None) => (UNKNOWN.to_owned(), EndpointLabels::unknown()),
        };
        let labels = RequestLabels {
            reporter: self.reporter,
            source_workload: self.source_workload.to_string(),
            source_version: self.source_version.to_string(),
            source_principal: self.source_principal.to_string(),
            destination_workload: workload,
            destination_version: endpoint.version,
            destination_principal: endpoint.principal,
            destination_service: self.service.to_string(),
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
        self.report(&labels, &r);
        if endpoint.local {
            // Both ends are this node's: reported as both agents would.
            let labels = RequestLabels {
                reporter: "destination",
                ..labels
            };
            self.report(&labels, &r);
        }
    }
}

impl Observer {
    fn report(&self, labels: &RequestLabels, r: &RequestRecord) {
        let metrics = &self.mesh.metrics;
        metrics.request(labels, r.duration, r.request_bytes, r.response_bytes);
        if let Some(log) = metrics.access_log() {
            log.request(&RequestEntry {
                labels,
                method: r.method.as_str(),
                authority: r.authority(),
                path: r.uri.path(),
                traceparent: r.traceparent.as_ref().and_then(|t| t.to_str().ok()),
                upstream: r.target.as_ref().map(|t| t.addr.to_string()),
                duration: r.duration,
                request_bytes: r.request_bytes,
                response_bytes: r.response_bytes,
                retries: r.retries,
            });
        }
    }
}

/// Opens upstream streams for one of a source task's L7 pools (one per service).
pub struct MeshConnector {
    ctx: Arc<OutboundContext>,
    slot: Option<Arc<WorkloadSlot>>,
    /// Told to the destination's agent, for its `destination_service` label.
    service: Arc<str>,
}

impl MeshConnector {
    /// A stream to `target`: a tunnel stream to its agent, or a connection from the task's
    /// netns for a task of this node (after its policy, as its agent would check it).
    /// `protocol`: the stream carries HTTP proxied request by request (the destination's
    /// agent then reports the requests too); `None` for opaque bytes.
    async fn open(
        &self,
        target: &Target,
        protocol: Option<StreamProtocol>,
    ) -> io::Result<UpstreamIo> {
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
                let meta = StreamMeta {
                    protocol,
                    source_workload: Some(self.ctx.workload.clone()),
                    source_version: Some(self.ctx.version.clone()),
                    service: Some(self.service.clone()),
                };
                // As for opaque connections: an ejected endpoint of a DNS service is replaced,
                // one that fails now is ejected and another tried.
                match open_remote(&self.ctx, slot, pool, &remote, target.addr, &meta).await {
                    Ok(stream) => Ok(UpstreamIo::Tunnel(Box::new(stream))),
                    Err(TunnelError::Denied(status)) => {
                        mesh.metrics
                            .policy_denial("source", &slot.id().to_string(), &remote.name);
                        Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!("the destination's policy denied the stream (HTTP {status})"),
                        ))
                    }
                    Err(e) => Err(io::Error::other(e.to_string())),
                }
            }
            Destination::Local(local) => {
                if mesh.certs.is_some() {
                    let Some(slot) = &self.slot else {
                        return Err(io::Error::other("the task has no identity"));
                    };
                    let decision = mesh.authorizer().check_in(
                        slot.id(),
                        &local.task,
                        local.family.as_deref(),
                        target.addr.port(),
                    );
                    if let PolicyDecision::Deny { by_default } = decision {
                        info!(source = %slot.id(), source_role = %role_of(slot.id()), destination = %local.task, dst = %target.addr, by_default, "request denied by authorization policy");
                        let source = slot.id().to_string();
                        for reporter in ["source", "destination"] {
                            mesh.metrics
                                .policy_denial(reporter, &source, local.workload());
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "denied by the destination's policy",
                        ));
                    }
                }
                self.connect_direct(target).await
            }
            Destination::Passthrough => self.connect_direct(target).await,
            Destination::VirtualService(_) | Destination::Refused => Err(io::Error::other(
                format!("{} is not a reachable endpoint", target.addr),
            )),
        }
    }

    async fn connect_direct(&self, target: &Target) -> io::Result<UpstreamIo> {
        let stream = self
            .ctx
            .netns
            .connect(target.addr, self.ctx.connect_timeout)
            .await?;
        Ok(UpstreamIo::Tcp(stream))
    }
}

impl http::Connector for MeshConnector {
    type Io = UpstreamIo;

    fn connect(&self, target: &Target) -> impl Future<Output = io::Result<UpstreamIo>> + Send {
        let protocol = match target.version {
            HttpVersion::Http1 => StreamProtocol::Http1,
            HttpVersion::Http2 => StreamProtocol::Http2,
        };
        self.open(target, Some(protocol))
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

impl SpliceEnd for UpstreamIo {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        match self {
            UpstreamIo::Tcp(s) => s.poll_read_chunk(cx),
            UpstreamIo::Tunnel(t) => t.io.poll_read_chunk(cx),
        }
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        match self {
            UpstreamIo::Tcp(s) => s.poll_write_chunk(cx, chunk),
            UpstreamIo::Tunnel(t) => t.io.poll_write_chunk(cx, chunk),
        }
    }

    fn abort(&mut self) {
        match self {
            UpstreamIo::Tcp(s) => s.abort(),
            UpstreamIo::Tunnel(t) => t.io.abort(),
        }
    }
}

/// How long idle upstream connections of a task's L7 pool are kept.
pub const POOL_IDLE: Duration = Duration::from_secs(30);
