//! The receiving side of the tunnel: a mutual-TLS HTTP/2 listener on the tunnel port inside a
//! task's netns. Each CONNECT stream is authorized (the client's proven identity against the
//! destination task's policy), then connected to the target port from inside the task's netns
//! and spliced.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::hostports::HostPorts;
use super::reauth;
use super::stream::TunnelIo;
use super::tracked::Tracked;
use super::{HANDSHAKE_TIMEOUT, server_builder};
use super::{StreamMeta, tls};
use crate::certs::{Certs, WorkloadSlot};
use crate::identity::SpiffeId;
use crate::identity::authority::PeerRole;
use crate::metrics::{ConnectionEnd, TcpLabels, UNKNOWN};
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
    let presented: Arc<Option<String>> = Arc::new(tls.get_ref().1.server_name().map(str::to_owned));
    let active = metrics.tunnel_connection_opened("inbound");
    debug!(task = %ctx.scope.name(), %peer, %source, "tunnel connection accepted");
    let source = Arc::new(source);
    let tls = Tracked::new(tls, active);
    let mut connection = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_builder(MAX_CONCURRENT_STREAMS).handshake(tls),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(task = %ctx.scope.name(), %peer, error = %e, "tunnel connection failed before its first stream");
            return;
        }
        Err(_) => {
            info!(task = %ctx.scope.name(), %peer, "tunnel connection sent no HTTP/2 preface in time");
            return;
        }
    };
    // Retired when the client's authentication lapses (see `super::reauth`): GOAWAY, so the
    // client opens its next stream over a new connection (with its renewed certificate, under
    // the current bundle) while the open streams finish.
    let lapse = reauth::lapse(chain, ctx.certs.clone());
    tokio::pin!(lapse);
    let mut lapsed = false;
    // Accepting also drives the connection: the frames of every open stream move only while
    // this loop polls it, until the client has closed it (or it failed).
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let answer = Box::pin(answer_stream(
                        ctx.clone(),
                        source.clone(),
                        peer,
                        local,
                        presented.clone(),
                        request,
                        respond,
                    ));
                    ctx.connections.spawn(carry(answer));
                }
                Some(Err(e)) => {
                    debug!(task = %ctx.scope.name(), %peer, error = %e, "tunnel connection ended with an error");
                    break;
                }
                None => break,
            },
            lapse = &mut lapse, if !lapsed => {
                lapse.report(metrics, "inbound", ctx.scope.name(), peer);
                connection.graceful_shutdown();
                lapsed = true;
            }
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// Answers a stream that will not be connected, and ends it.
fn refuse(mut respond: SendResponse<Bytes>, code: StatusCode) {
    // Fails only when the client has already reset the stream: nobody to tell.
    let _ = respond.send_response(status(code), true);
}

/// A stream answered with 200: what carrying it needs.
struct Answered {
    tunnel: TunnelIo,
    upstream: TcpStream,
    target: SocketAddr,
    delivery: Delivery,
    meta: StreamMeta,
    labels: TcpLabels,
    mesh: Arc<Mesh>,
    connect_timeout: Duration,
}

/// One CONNECT stream, up to its answer: checks it, connects the target and answers 200, or
/// refuses it with the status that says why.
async fn answer_stream(
    ctx: Arc<InboundContext>,
    source: Arc<SpiffeId>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    presented: Arc<Option<String>>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<Answered> {
    let mesh = &ctx.mesh;
    mesh.metrics.tunnel_stream_opened("inbound");
    if request.method() != Method::CONNECT {
        refuse(respond, StatusCode::METHOD_NOT_ALLOWED);
        return None;
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        refuse(respond, StatusCode::BAD_REQUEST);
        return None;
    };
    let delivery = match deliver_to(&ctx.scope, target, local, presented.as_deref()) {
        Ok(d) => d,
        Err((code, why)) => {
            info!(listener = %ctx.scope.name(), %source, %target, "tunnel stream refused: {why}");
            refuse(respond, code);
            return None;
        }
    };
    let source_principal = source.to_string();
    let port = delivery.connect_to.port();
    if let Decision::Deny { by_default } =
        mesh.authorizer()
            .check_in(&source, &delivery.task_id, delivery.family.as_deref(), port)
    {
        info!(
            source = %source_principal,
            source_role = %role_of(&source),
            destination = %delivery.task_id,
            %target,
            %peer,
            by_default,
            "connection denied by authorization policy"
        );
        mesh.metrics
            .policy_denial("destination", &source_principal, delivery.workload());
        refuse(respond, StatusCode::FORBIDDEN);
        return None;
    }
    let upstream = match delivery
        .netns
        .connect(delivery.connect_to, ctx.connect_timeout)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            info!(task = %delivery.task_id, %source, %target, error = %e, "cannot connect to the tunnel's target");
            refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
    };
    let meta = StreamMeta::read_from(request.headers());
    let source_workload = meta
        .source_workload
        .clone()
        .or_else(|| mesh.destinations().workload_of(&source));
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
    match respond.send_response(status(StatusCode::OK), false) {
        Ok(send) => Some(Answered {
            tunnel: TunnelIo::new(send, request.into_body()),
            upstream,
            target,
            delivery,
            meta,
            labels,
            mesh: mesh.clone(),
            connect_timeout: ctx.connect_timeout,
        }),
        Err(e) => {
            debug!(task = %delivery.task_id, %target, error = %e, "tunnel stream closed before it was answered");
            None
        }
    }
}

/// [`answer_stream`]'s future, boxed apart from the splice that follows: the checks and the
/// connect to the target are over before the bytes flow, and their state should not stay
/// allocated for as long as the stream lives.
type Answer = Pin<Box<dyn Future<Output = Option<Answered>> + Send>>;

/// Answers a stream, then carries its bytes, or its requests when the source agent said they
/// are HTTP, until both directions have ended.
async fn carry(answer: Answer) {
    // Taken apart here rather than passed on, so that each part is held once.
    let Some(Answered {
        tunnel,
        upstream,
        target,
        delivery,
        meta,
        labels,
        mesh,
        connect_timeout,
    }) = answer.await
    else {
        return;
    };
    let tcp = mesh.metrics.tcp(&labels);
    let (up, down) = (tcp.received(), tcp.sent());
    let result = match meta.protocol {
        // The source agent proxies this stream's requests: serve them as HTTP too, so that
        // they are reported by this end (`reporter="destination"`) as well.
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
    // An HTTP stream's failures are its requests' (`response_flags`), as on the source side.
    let end = match meta.protocol {
        Some(_) => ConnectionEnd::Closed,
        None => ConnectionEnd::of(&result),
    };
    if let Err(e) = result {
        debug!(task = %delivery.task_id, %target, error = %e, "tunnel stream ended with an error");
    }
    tcp.finish(end);
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

#[cfg(test)]
mod tests {
    /// The size of the future an `async fn` of one argument returns.
    fn future_size<A, F: Future>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every stream a tunnel listener carries is one task holding this future for the
    /// stream's whole life (what answered it is boxed and gone once the bytes flow): it must
    /// stay small, as the dialling side's connection task does.
    #[test]
    fn a_carried_stream_is_small() {
        let size = future_size(super::carry);
        println!("inbound stream future: {size} bytes");
        assert!(size <= 2048, "{size} bytes");
    }
}
