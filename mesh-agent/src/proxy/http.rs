//! L7: HTTP/1.1 and HTTP/2 (gRPC included) proxying of one application connection.
//!
//! [`serve`] speaks HTTP with the application (hyper server; HTTP/1.1 keep-alive or HTTP/2, as
//! declared or as [`detect`] found from the first bytes) and forwards each request on its own:
//!
//! 1. a [`Router`] decides where the request goes and with which timeouts and retry policy;
//! 2. a [`Pool`] keeps upstream connections per [`Target`] (HTTP/1.1 keep-alive connections are
//!    reused one request at a time, an HTTP/2 connection is multiplexed); the [`Connector`]
//!    opens the byte streams (direct, or a tunnel stream) and says which protocol they speak;
//! 3. hop-by-hop headers are stripped, `Host`/`:authority` is kept, a W3C `traceparent` is
//!    added when the request has none;
//! 4. failures become Envoy-style local replies (503 `UF` when the upstream cannot be reached,
//!    504 `UT` when the request timeout passes), retried as the decision allows when the
//!    request body could be kept (at most [`MAX_REPLAY_BODY`] bytes) and the [`Budget`] agrees;
//! 5. every request ends in one [`RequestRecord`] for the [`RequestObserver`] (golden metrics,
//!    access log), emitted when the response has been delivered or abandoned.
//!
//! Nothing here knows about the routing configuration, tasks or the tunnel: those are behind the
//! traits, implemented by the outbound path.

mod body;
mod detect;
mod forward;
mod headers;
mod idle;
mod pool;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

pub use detect::{Detection, detect};
pub use pool::{Pool, PoolOptions};

/// A request body up to this size is kept while it is sent, so that the request can be retried.
/// Larger bodies (and bodies still streaming when the attempt fails) are not retried.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// The error type of the bodies this module produces.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a request goes: an opaque key for the [`Connector`] (which virtual node, at which
/// address, speaking which protocol) and the key of the upstream connection pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The virtual node (or any name the connector understands); also a metric label.
    pub name: Arc<str>,
    pub addr: SocketAddr,
    /// The protocol the target's listener speaks (HTTP/1.1, or HTTP/2 for `http2`/`grpc`).
    pub version: HttpVersion,
}

/// An HTTP protocol on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Which failed attempts are retried: App Mesh's HTTP and gRPC retry events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx response, a per-try timeout, or no response at all (connect failure, reset).
    pub server_error: bool,
    /// A 502, 503 or 504 response, a per-try timeout, or no response at all.
    pub gateway_error: bool,
    /// No response at all: the connection could not be opened, or failed before the response.
    pub connection_error: bool,
    /// A 409 response.
    pub client_error: bool,
    /// The upstream reset or refused the request before responding.
    pub stream_error: bool,
    /// gRPC statuses retried; seen in the headers of a trailers-only response (a status in
    /// the trailers comes after the body has started: too late to retry).
    pub grpc: GrpcCodes,
}

impl RetryOn {
    pub fn any(&self) -> bool {
        self.server_error
            || self.gateway_error
            || self.connection_error
            || self.client_error
            || self.stream_error
            || !self.grpc.is_empty()
    }
}

/// A set of gRPC status codes (0 to 31; gRPC defines 0 to 16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcCodes(u32);

impl GrpcCodes {
    /// The set with `code` added (codes above 31 are ignored).
    pub fn with(self, code: u32) -> GrpcCodes {
        GrpcCodes(self.0 | 1u32.checked_shl(code).unwrap_or(0))
    }

    pub fn contains(&self, code: u32) -> bool {
        1u32.checked_shl(code).is_some_and(|bit| self.0 & bit != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// What the [`Router`] decided for one request.
#[derive(Clone, Debug)]
pub struct Decision {
    pub target: Target,
    /// Deadline of each attempt until the response headers arrive; an attempt that passes it
    /// counts as a 504 for the retry policy.
    pub per_try_timeout: Option<Duration>,
    /// Deadline of the whole request, retries and response body included: before the response
    /// headers it becomes a 504 (`UT`); afterwards the response is cut.
    pub request_timeout: Option<Duration>,
    /// Retries after the first attempt (0: no retry).
    pub max_retries: u32,
    pub retry_on: RetryOn,
}

impl Decision {
    /// Straight to `target`: no timeout, no retry.
    pub fn to(target: Target) -> Decision {
        Decision {
            target,
            per_try_timeout: None,
            request_timeout: None,
            max_retries: 0,
            retry_on: RetryOn::default(),
        }
    }
}

/// Every request to the one decision: a hop with no routing of its own.
pub struct Fixed(pub Decision);

impl Router for Fixed {
    fn route(&self, _: &http::request::Parts) -> Option<Decision> {
        Some(self.0.clone())
    }
}

/// Chooses the target and policy of each request. Called once per request, with the request's
/// head as the application sent it (override headers included).
pub trait Router: Send + Sync + 'static {
    /// `None`: no route matches; the application gets a 404 (`NR`).
    fn route(&self, request: &http::request::Parts) -> Option<Decision>;
}

/// Opens upstream byte streams.
pub trait Connector: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// A new connection to the target. A failure becomes a 503 (`UF`), retried under any of
    /// the retry events.
    fn connect(&self, target: &Target) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// The retry budget: retries are allowed only while they stay a fraction of the requests, so
/// that retries cannot multiply the load on a failing upstream.
pub trait Budget: Send + Sync + 'static {
    /// A request was routed (once per request, whatever its attempts).
    fn record_request(&self);
    /// Asked before every retry; `false` ends the request with the last failure (`URX`).
    fn try_retry(&self) -> bool;
}

/// Receives one record per request.
pub trait RequestObserver: Send + Sync + 'static {
    fn observe(&self, record: RequestRecord);
}

/// Envoy's response flags, as Istio's `response_flags` label carries them.
pub mod flags {
    /// Nothing to report.
    pub const NONE: &str = "-";
    /// Upstream request timeout (the request timeout, or the last attempt's per-try timeout).
    pub const UPSTREAM_TIMEOUT: &str = "UT";
    /// Upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: &str = "UF";
    /// Upstream connection termination (reset before or during the response).
    pub const UPSTREAM_CONNECTION_TERMINATION: &str = "UC";
    /// The retry limit (or the retry budget) was reached; the last failure was returned.
    pub const RETRY_LIMIT_EXCEEDED: &str = "URX";
    /// No route.
    pub const NO_ROUTE: &str = "NR";
    /// The application went away before its response was complete.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: &str = "DC";

    /// `flag` with `URX` appended, as Envoy reports a failure that exhausted the retries.
    pub fn with_retry_limit(flag: &'static str) -> &'static str {
        match flag {
            UPSTREAM_TIMEOUT => "UT,URX",
            UPSTREAM_CONNECTION_FAILURE => "UF,URX",
            UPSTREAM_CONNECTION_TERMINATION => "UC,URX",
            _ => RETRY_LIMIT_EXCEEDED,
        }
    }
}

/// One request, as the golden metrics and the access log see it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// `None` when no route matched.
    pub target: Option<Target>,
    pub method: http::Method,
    /// The request's target as the application sent it (the access log keeps its path, not its
    /// query, which may carry secrets).
    pub uri: http::Uri,
    /// The `Host` header (HTTP/1.1; HTTP/2 has the authority in `uri`).
    pub host: Option<http::HeaderValue>,
    /// The W3C trace context the request was forwarded with.
    pub traceparent: Option<http::HeaderValue>,
    /// The status the application received (0 if it went away before any).
    pub response_code: u16,
    /// `grpc-status` of the response (trailers, or headers of a trailers-only response).
    pub grpc_status: Option<u32>,
    /// From the request's arrival to the end of its response.
    pub duration: Duration,
    /// Request body bytes read from the application.
    pub request_bytes: u64,
    /// Response body bytes delivered to the application.
    pub response_bytes: u64,
    /// Attempts after the first.
    pub retries: u32,
    /// One of [`flags`] (or a combination such as `UF,URX`).
    pub response_flags: &'static str,
}

impl RequestRecord {
    /// `:authority`, or the `Host` header.
    pub fn authority(&self) -> Option<&str> {
        match self.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => self.host.as_ref().and_then(|h| h.to_str().ok()),
        }
    }
}

/// How an application connection is served, beyond its protocol.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Close the connection (gracefully) after this long without a request in flight.
    pub idle_timeout: Option<Duration>,
}

/// Serves one application connection, speaking `version`, until it closes, forwarding each
/// request as `router` decides through `pool`. A connection whose protocol is not declared goes
/// through [`detect`] first.
pub async fn serve<S, C>(
    client: S,
    version: HttpVersion,
    router: Arc<dyn Router>,
    pool: Arc<Pool<C>>,
    budget: Arc<dyn Budget>,
    observer: Arc<dyn RequestObserver>,
    options: &ServeOptions,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Connector,
{
    let activity = idle::Activity::new();
    let forwarder = Arc::new(forward::Forwarder {
        router,
        pool,
        budget,
        observer,
        downstream: version,
        activity: activity.clone(),
    });
    let service = service_fn(move |request| {
        let forwarder = forwarder.clone();
        async move { Ok::<_, Infallible>(forwarder.handle(request).await) }
    });
    let io = TokioIo::new(client);
    let idle = options.idle_timeout;
    let served = match version {
        HttpVersion::Http1 => {
            let connection = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service)
                .with_upgrades();
            let connection = pin!(connection);
            idle::run(connection, |c| c.graceful_shutdown(), &activity, idle).await
        }
        HttpVersion::Http2 => {
            let connection = http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .serve_connection(io, service);
            let connection = pin!(connection);
            idle::run(connection, |c| c.graceful_shutdown(), &activity, idle).await
        }
    };
    served.map_err(io::Error::other)
}

/// HTTP/2 flow-control windows, both towards the application and upstream: the 64 KiB defaults
/// would cap a stream at 64 KiB per round trip over the tunnel.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
