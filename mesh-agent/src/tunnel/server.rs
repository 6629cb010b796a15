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
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::tls;
use super::{H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, HANDSHAKE_TIMEOUT};
use crate::certs::{Certs, WorkloadSlot};
use crate::identity::SpiffeId;
use crate::metrics::{TcpLabels, UNKNOWN};
use crate::netns::NetnsWorker;
use crate::policy::{Decision, role_of};
use crate::proxy::{ConnectionSet, Mesh, accept_loop, splice};

/// Streams one client connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Everything the tunnel listener of one task needs.
pub struct InboundContext {
    pub task_id: Arc<str>,
    pub slot: Arc<WorkloadSlot>,
    pub certs: Arc<Certs>,
    pub netns: Arc<NetnsWorker>,
    /// The task's addresses: the only targets a stream may name.
    pub addresses: Vec<IpAddr>,
    pub mesh: Arc<Mesh>,
    pub connect_timeout: Duration,
    pub connections: ConnectionSet,
    /// The TLS configuration, rebuilt when the trust material changes.
    pub tls: TlsConfigCache,
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
        let config = Arc::new(tls::server_config(certs.trust(), self.slot.clone())?);
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
    accept_loop(
        listener,
        stop,
        &connections,
        "tunnel",
        &ctx.task_id,
        |stream, peer| serve_connection(stream, peer, ctx.clone()),
    )
    .await;
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<InboundContext>) {
    let metrics = &ctx.mesh.metrics;
    let config = match ctx.tls_config() {
        Ok(c) => c,
        Err(e) => {
            warn!(task = %ctx.task_id, error = %e, "cannot build the tunnel TLS configuration");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = handshake_failure(&e);
                info!(task = %ctx.task_id, %peer, reason, error = %e, "tunnel handshake rejected");
                metrics.tunnel_handshake_error("inbound", reason);
                return;
            }
            Err(_) => {
                info!(task = %ctx.task_id, %peer, "tunnel handshake timed out");
                metrics.tunnel_handshake_error("inbound", "timeout");
                return;
            }
        };
    // The verifier accepted the client's chain and SPIFFE id; read the id back.
    let Some(source) = tls::peer_identity(tls.get_ref().1) else {
        metrics.tunnel_handshake_error("inbound", "bad_identity");
        return;
    };
    let active = metrics.tunnel_connection_opened("inbound");
    debug!(task = %ctx.task_id, %peer, %source, "tunnel connection accepted");
    let source = Arc::new(source);
    let service = {
        let ctx = ctx.clone();
        service_fn(move |request| {
            let ctx = ctx.clone();
            let source = source.clone();
            async move { Ok::<_, Infallible>(open_stream(&ctx, &source, peer, request).await) }
        })
    };
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        debug!(task = %ctx.task_id, %peer, error = %e, "tunnel connection ended with an error");
    }
    active.dec();
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
    // The tunnel reaches this task and nothing else: it must not become an open relay into
    // the task's network.
    if !ctx.addresses.contains(&target.ip()) {
        info!(task = %ctx.task_id, %source, %target, "tunnel stream names an address that is not this task's; refused");
        return status(StatusCode::FORBIDDEN);
    }
    let source_principal = source.to_string();
    if let Decision::Deny { by_default } =
        mesh.authorizer().check(source, &ctx.task_id, target.port())
    {
        info!(
            source = %source_principal,
            source_role = %role_of(source),
            destination = %ctx.task_id,
            %target,
            %peer,
            by_default,
            "connection denied by authorization policy"
        );
        mesh.metrics
            .policy_denial("destination", &source_principal, &ctx.task_id);
        return status(StatusCode::FORBIDDEN);
    }
    let upstream = match connect(&ctx.netns, target, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            info!(task = %ctx.task_id, %source, %target, error = %e, "cannot connect to the tunnel's target");
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let labels = TcpLabels {
        reporter: "destination",
        source_workload: mesh
            .destinations()
            .workload_of(source)
            .map_or_else(|| UNKNOWN.to_owned(), |w| w.to_string()),
        source_principal,
        destination_workload: ctx.task_id.to_string(),
        destination_principal: ctx.slot.id().to_string(),
        connection_security_policy: "mutual_tls",
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let tcp = mesh.metrics.tcp(&labels);
    let task_id = ctx.task_id.clone();
    ctx.connections.spawn(async move {
        let tunnel = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                debug!(task = %task_id, %target, error = %e, "tunnel stream closed before upgrade");
                return;
            }
        };
        tcp.opened.inc();
        let (up, down) = ([&tcp.received_bytes], [&tcp.sent_bytes]);
        if let Err(e) = splice(tunnel, upstream, &up, &down).await {
            debug!(task = %task_id, %target, error = %e, "tunnel stream ended with an error");
        }
        tcp.closed.inc();
    });
    status(StatusCode::OK)
}

async fn connect(
    netns: &NetnsWorker,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = netns
        .tcp_socket(target.is_ipv6())
        .await
        .map_err(|e| io::Error::other(format!("{e:#}")))?;
    let socket = TcpSocket::from_std_stream(socket);
    let _ = socket.set_nodelay(true);
    tokio::time::timeout(timeout, socket.connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
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
