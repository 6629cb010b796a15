//! The receiving side of the tunnel: a mutual-TLS HTTP/2 listener on the tunnel port inside a
//! task's netns. Each CONNECT stream is authorized (the client's proven identity against the
//! destination task's policy), then connected to the target port from inside the task's netns
//! and spliced.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::hostports::HostPorts;
use super::reauth;
use super::tracked::Tracked;
use super::{H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, HANDSHAKE_TIMEOUT};
use super::{StreamMeta, tls};
use crate::certs::{Certs, WorkloadSlot};
use crate::identity::SpiffeId;
use crate::identity::authority::PeerRole;
use crate::metrics::{TcpLabels, UNKNOWN};
use crate::netns::NetnsWorker;
use crate::policy::{Decision, role_of};
use crate::proxy::{ConnectionSet, InboundHttp, Mesh, accept_loop, serve_inbound_http, splice};

/// Streams one client connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Everything the tunnel listener of one task needs.
pub struct InboundContext {
    pub scope: Scope,
    pub certs: Arc<Certs>,
    pub mesh: Arc<Mesh>,
    pub connect_timeout: Duration,
    pub connections: ConnectionSet,
    /// The TLS configuration, rebuilt when the trust material changes.
    pub tls: TlsConfigCache,
}

/// Which tasks a listener delivers to.
pub enum Scope {
    /// The listener in one task's netns (awsvpc): streams to that task's addresses.
    Task {
        task_id: Arc<str>,
        family: Option<Arc<str>>,
        version: Option<Arc<str>>,
        slot: Arc<WorkloadSlot>,
        netns: Arc<NetnsWorker>,
        /// The task's addresses: the only targets a stream may name.
        addresses: Vec<IpAddr>,
    },
    /// The listener in the node's netns: streams to `<node ip>:<host port>`, delivered to the
    /// task that published the host port.
    Node { host_ports: Arc<HostPorts> },
}

impl Scope {
    /// For log lines.
    fn name(&self) -> &str {
        match self {
            Scope::Task { task_id, .. } => task_id,
            Scope::Node { .. } => "node",
        }
    }
}

impl Delivery {
    /// The `*_workload` label: the task's family when it has one, else its id.
    fn workload(&self) -> &str {
        self.family.as_deref().unwrap_or(&self.task_id)
    }
}

/// Where one stream goes, once checked.
struct Delivery {
    task_id: Arc<str>,
    family: Option<Arc<str>>,
    version: Option<Arc<str>>,
    slot: Arc<WorkloadSlot>,
    netns: Arc<NetnsWorker>,
    /// Connected from inside the task's netns.
    connect_to: SocketAddr,
}

/// The server configuration for the current trust generation.
#[derive(Default)]
pub struct TlsConfigCache(Mutex<Option<(u64, Arc<ServerConfig>)>>);

impl InboundContext {
    fn tls_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let certs = &self.certs;
        let generation = certs.generation();
        let mut cached = self.tls.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, c)) = &*cached
            && *g == generation
        {
            return Ok(c.clone());
        }
        let config = Arc::new(match &self.scope {
            Scope::Task { slot, .. } => tls::server_config(certs.trust(), slot.clone())?,
            Scope::Node { host_ports } => {
                tls::node_server_config(certs.trust(), host_ports.clone())?
            }
        });
        *cached = Some((generation, config.clone()));
        Ok(config)
    }
}

/// Accepts tunnel connections until `stop` fires.
pub async fn serve_inbound(
    listener: TcpListener,
    ctx: Arc<InboundContext>,
    stop: CancellationToken,
) {
    let connections = ctx.connections.clone();
    let name = ctx.scope.name().to_owned();
    accept_loop(
        listener,
        stop,
        &connections,
        "tunnel",
        &name,
        |stream, peer| serve_connection(stream, peer, ctx.clone()),
    )
    .await;
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<InboundContext>) {
    let metrics = &ctx.mesh.metrics;
    let config = match ctx.tls_config() {
        Ok(c) => c,
        Err(e) => {
            warn!(task = %ctx.scope.name(), error = %e, "cannot build the tunnel TLS configuration");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok();
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(config).accept(stream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure(&e);
            info!(task = %ctx.scope.name(), %peer, reason, error = %e, "tunnel handshake rejected");
            metrics.tunnel_handshake_error("inbound", reason);
            return;
        }
        Err(_) => {
            info!(task = %ctx.scope.name(), %peer, "tunnel handshake timed out");
            metrics.tunnel_handshake_error("inbound", "timeout");
            return;
        }
    };
    // The verifier accepted the client's chain and SPIFFE id; read the id back, and keep the
    // chain to check it again when the trust bundle changes.
    let (Some(source), Some(chain)) = (
        tls::peer_identity(tls.get_ref().1),
        tls::PeerChain::of(tls.get_ref().1, PeerRole::Client),
    ) else {
        metrics.tunnel_handshake_error("inbound", "bad_identity");
        return;
    };
    // The node listener presented the certificate of the identity named in SNI: streams on
    // this connection may only reach a task with that identity.
    let presented = tls.get_ref().1.server_name().map(str::to_owned);
    let active = metrics.tunnel_connection_opened("inbound");
    debug!(task = %ctx.scope.name(), %peer, %source, "tunnel connection accepted");
    let source = Arc::new(source);
    let presented = Arc::new(presented);
    let service = {
        let ctx = ctx.clone();
        service_fn(move |request| {
            let ctx = ctx.clone();
            let source = source.clone();
            let presented = presented.clone();
            async move {
                Ok::<_, Infallible>(
                    open_stream(&ctx, &source, peer, local, presented.as_deref(), request).await,
                )
            }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .serve_connection(TokioIo::new(Tracked::new(tls, active)), service);
    // Retired when the client's authentication lapses (see `super::reauth`): GOAWAY, so the
    // client opens its next stream over a new connection (with its renewed certificate, under
    // the current bundle) while the open streams finish.
    let lapse = reauth::lapse(chain, ctx.certs.clone());
    tokio::pin!(connection);
    let served = tokio::select! {
        served = &mut connection => served,
        lapse = lapse => {
            lapse.report(metrics, "inbound", ctx.scope.name(), peer);
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        debug!(task = %ctx.scope.name(), %peer, error = %e, "tunnel connection ended with an error");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// One CONNECT stream: checks, connects the target, answers, then splices once upgraded.
async fn open_stream(
    ctx: &Arc<InboundContext>,
    source: &SpiffeId,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    presented: Option<&str>,
    mut request: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let mesh = &ctx.mesh;
    mesh.metrics.tunnel_stream_opened("inbound");
    if request.method() != Method::CONNECT {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return status(StatusCode::BAD_REQUEST);
    };
    let delivery = match deliver_to(&ctx.scope, target, local, presented) {
        Ok(d) => d,
        Err((code, why)) => {
            info!(listener = %ctx.scope.name(), %source, %target, "tunnel stream refused: {why}");
            return status(code);
        }
    };
    let source_principal = source.to_string();
    let port = delivery.connect_to.port();
    if let Decision::Deny { by_default } =
        mesh.authorizer()
            .check_in(source, &delivery.task_id, delivery.family.as_deref(), port)
    {
        info!(
            source = %source_principal,
            source_role = %role_of(source),
            destination = %delivery.task_id,
            %target,
            %peer,
            by_default,
            "connection denied by authorization policy"
        );
        mesh.metrics
            .policy_denial("destination", &source_principal, delivery.workload());
        return status(StatusCode::FORBIDDEN);
    }
    let upstream = match delivery
        .netns
        .connect(delivery.connect_to, ctx.connect_timeout)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            info!(task = %delivery.task_id, %source, %target, error = %e, "cannot connect to the tunnel's target");
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let meta = StreamMeta::read_from(request.headers());
    let source_workload = meta
        .source_workload
        .clone()
        .or_else(|| mesh.destinations().workload_of(source));
    let labels = TcpLabels {
        reporter: "destination",
        source_workload: source_workload
            .as_deref()
            .map_or_else(|| UNKNOWN.to_owned(), str::to_owned),
        source_version: meta
            .source_version
            .as_deref()
            .map_or_else(|| UNKNOWN.to_owned(), str::to_owned),
        destination_version: delivery
            .version
            .as_deref()
            .map_or_else(|| UNKNOWN.to_owned(), str::to_owned),
        source_principal,
        destination_workload: delivery.workload().to_owned(),
        destination_principal: delivery.slot.id().to_string(),
        connection_security_policy: "mutual_tls",
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let tcp = mesh.metrics.tcp(&labels);
    let task_id = delivery.task_id.clone();
    let mesh = mesh.clone();
    let connect_timeout = ctx.connect_timeout;
    ctx.connections.spawn(async move {
        let tunnel = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                debug!(task = %task_id, %target, error = %e, "tunnel stream closed before upgrade");
                return;
            }
        };
        tcp.opened.inc();
        let (up, down) = (tcp.received(), tcp.sent());
        let result = match meta.protocol {
            // The source agent proxies this stream's requests: serve them as HTTP too, so
            // that they are reported by this end (`reporter="destination"`) as well.
            Some(protocol) => {
                let stream = InboundHttp {
                    protocol,
                    labels: &labels,
                    service: meta.service.clone(),
                    netns: delivery.netns.clone(),
                    connect_to: delivery.connect_to,
                    connect_timeout,
                };
                // Boxed: only HTTP streams should carry the L7 engine's state.
                Box::pin(serve_inbound_http(
                    &mesh, stream, tunnel, upstream, &up, &down,
                ))
                .await
            }
            None => splice(tunnel, upstream, &up, &down).await,
        };
        if let Err(e) = result {
            debug!(task = %task_id, %target, error = %e, "tunnel stream ended with an error");
        }
        tcp.finish();
    });
    status(StatusCode::OK)
}

/// Checks a stream's target against the listener's scope: the tunnel reaches meshed tasks
/// and nothing else; it must never become an open relay into a task's or the node's network.
fn deliver_to(
    scope: &Scope,
    target: SocketAddr,
    local: Option<SocketAddr>,
    presented: Option<&str>,
) -> Result<Delivery, (StatusCode, String)> {
    match scope {
        Scope::Task {
            task_id,
            family,
            version,
            slot,
            netns,
            addresses,
        } => {
            if !addresses.contains(&target.ip()) {
                return Err((
                    StatusCode::FORBIDDEN,
                    "the address is not this task's".into(),
                ));
            }
            Ok(Delivery {
                task_id: task_id.clone(),
                family: family.clone(),
                version: version.clone(),
                slot: slot.clone(),
                netns: netns.clone(),
                connect_to: target,
            })
        }
        Scope::Node { host_ports } => {
            // `<node ip>:<host port>`: the address the client dialled, and a published port.
            if local.map(|l| l.ip()) != Some(target.ip()) {
                return Err((
                    StatusCode::FORBIDDEN,
                    "the address is not the one this node listener was reached at".into(),
                ));
            }
            let owner = host_ports.owner(target.port()).ok_or_else(|| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no meshed task publishes host port {}", target.port()),
                )
            })?;
            // The client checked our certificate against the identity it expects; the task
            // behind the port must be that identity, or the handshake proved nothing about it.
            if presented != Some(tls::server_name_for(owner.slot.id()).as_str()) {
                return Err((
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "host port {} belongs to {}, not to the identity the client asked for",
                        target.port(),
                        owner.slot.id()
                    ),
                ));
            }
            Ok(Delivery {
                task_id: owner.task_id.clone(),
                family: owner.family.clone(),
                version: owner.version.clone(),
                slot: owner.slot.clone(),
                netns: owner.netns.clone(),
                // Bridge-mode containers listen on all their addresses; loopback in the
                // container's netns reaches the published port without the node's NAT.
                connect_to: SocketAddr::from(([127, 0, 0, 1], owner.container_port)),
            })
        }
    }
}

/// A short reason for the handshake failure metric.
fn handshake_failure(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet) => {
            "expired"
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "protocol",
        _ => "other",
    }
}
