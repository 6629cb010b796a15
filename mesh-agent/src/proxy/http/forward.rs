//! One request: route, forward (with retries), and the response or local reply.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version, request};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use super::body::{Recorder, Replay, RequestBody, ResponseBody, Tape};
use super::headers::{
    TRACEPARENT, ensure_traceparent, grpc_status, is_grpc, prepare_request, strip_hop_by_hop,
};
use super::idle::Activity;
use super::pool::{Lease, Pool};
use super::{
    Budget, Connector, Decision, HttpVersion, MAX_REPLAY_BODY, RequestObserver, RetryOn, Router,
    Target, flags,
};

/// First retry back-off ceiling; doubles per retry up to [`BACKOFF_MAX`] (Envoy's defaults),
/// the actual wait drawn uniformly below it.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How long a failed attempt's response body may take to be read (in the background) so that
/// its HTTP/1.1 connection can be reused.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) struct Forwarder<C> {
    pub router: Arc<dyn Router>,
    pub pool: Arc<Pool<C>>,
    pub budget: Arc<dyn Budget>,
    pub observer: Arc<dyn RequestObserver>,
    /// The application's protocol on this connection.
    pub downstream: HttpVersion,
    /// The connection's requests in flight, for its idle timeout.
    pub activity: Arc<Activity>,
}

/// How one attempt ended.
enum Attempt {
    Response(Response<Incoming>, Option<Lease>),
    /// No connection; the request was not sent.
    ConnectFailed(io::Error),
    /// The connection failed after the request was (maybe partly) sent, before a response.
    Reset(hyper::Error),
    PerTryTimeout,
}

impl Attempt {
    fn retryable(&self, on: RetryOn) -> bool {
        match self {
            Attempt::Response(r, _) => {
                let s = r.status();
                (on.server_error && s.is_server_error())
                    || (on.gateway_error
                        && matches!(
                            s,
                            StatusCode::BAD_GATEWAY
                                | StatusCode::SERVICE_UNAVAILABLE
                                | StatusCode::GATEWAY_TIMEOUT
                        ))
                    || (on.client_error && s == StatusCode::CONFLICT)
                    || grpc_status(r.headers()).is_some_and(|code| on.grpc.contains(code))
            }
            Attempt::ConnectFailed(_) => on.connection_error || on.server_error || on.gateway_error,
            Attempt::Reset(_) => {
                on.connection_error || on.server_error || on.gateway_error || on.stream_error
            }
            Attempt::PerTryTimeout => on.server_error || on.gateway_error,
        }
    }
}

/// Where the body of each attempt comes from.
struct Source {
    /// The application's body, not yet (or not at all) read by an attempt.
    stream: Option<RequestBody>,
    /// The copy the streamed body leaves behind, while small.
    tape: Option<Arc<Mutex<Tape>>>,
    /// The complete body, once known.
    replay: Option<Replay>,
}

impl Source {
    fn replay(replay: Replay) -> Source {
        Source {
            stream: None,
            tape: None,
            replay: Some(replay),
        }
    }

    fn stream(body: Incoming, counted: Arc<AtomicU64>, keep: bool) -> Source {
        let tape = keep.then(Arc::default);
        Source {
            stream: Some(RequestBody::Stream {
                inner: body,
                counted,
                tape: tape.clone(),
            }),
            tape,
            replay: None,
        }
    }

    /// A body for the next attempt: the untouched original, else the complete copy; `None`
    /// when the body was (partly) consumed and cannot be replayed.
    fn take(&mut self) -> Option<RequestBody> {
        if let Some(stream) = self.stream.take() {
            return Some(stream);
        }
        if self.replay.is_none() {
            self.replay = self
                .tape
                .as_ref()
                .and_then(|t| t.lock().unwrap_or_else(|p| p.into_inner()).replay());
        }
        self.replay.as_ref().map(RequestBody::replay)
    }

    /// A body an attempt gave back unsent.
    fn put_back(&mut self, body: RequestBody) {
        if body.is_stream() {
            self.stream = Some(body);
        }
    }
}

/// Why the request ended before reaching an upstream.
enum Failed {
    Connect(io::Error),
    Reset(hyper::Error),
}

impl<C: Connector> Forwarder<C> {
    pub(super) async fn handle(&self, mut request: Request<Incoming>) -> Response<ResponseBody> {
        let start = Instant::now();
        let mut recorder = Recorder::new(
            self.observer.clone(),
            request.method().clone(),
            start.into_std(),
            self.activity.begin(),
        );
        let grpc = is_grpc(request.headers());
        let on_client_upgrade = (self.downstream == HttpVersion::Http1 && wants_upgrade(&request))
            .then(|| hyper::upgrade::on(&mut request));
        let (mut head, body) = request.into_parts();
        // For the access log: reference-counted clones, no copy of the bytes.
        recorder.record.uri = head.uri.clone();
        recorder.record.host = head.headers.get(http::header::HOST).cloned();
        let Some(decision) = self.router.route(&head) else {
            return self.local_reply(recorder, StatusCode::NOT_FOUND, flags::NO_ROUTE, grpc);
        };
        recorder.record.target = Some(decision.target.clone());
        self.budget.record_request();
        let upstream = decision.target.version;
        let deadline = decision.request_timeout.map(|t| start + t);
        ensure_traceparent(&mut head.headers);
        recorder.record.traceparent = head.headers.get(TRACEPARENT).cloned();
        match on_client_upgrade {
            Some(on_client) if upstream == HttpVersion::Http1 => {
                return self
                    .upgrade(head, body, on_client, &decision.target, recorder, deadline)
                    .await;
            }
            // HTTP/2 has no HTTP/1 upgrade: a WebSocket request goes as a plain request (the
            // server answers it as it would any); a CONNECT cannot go at all.
            _ if head.method == Method::CONNECT => {
                return self.local_reply(recorder, StatusCode::NOT_IMPLEMENTED, flags::NONE, grpc);
            }
            _ => {}
        }
        prepare_request(&mut head, upstream, &decision.target, false);
        self.forward(head, body, &decision, recorder, deadline, grpc)
            .await
    }

    /// Sends the request, retrying as the decision and the budget allow, and turns the last
    /// attempt into the application's response.
    async fn forward(
        &self,
        head: request::Parts,
        body: Incoming,
        decision: &Decision,
        mut recorder: Recorder,
        deadline: Option<Instant>,
        grpc: bool,
    ) -> Response<ResponseBody> {
        let may_retry = decision.max_retries > 0 && decision.retry_on.any();
        let counted = recorder.request_bytes.clone();
        let mut retries = 0u32;
        let exchange = async {
            // A body the application has committed to send in full (announced and small, or
            // none at all) is read first and kept: any attempt can send it again.
            let mut source = if body.is_end_stream() || (may_retry && known_small(&body)) {
                let collected = body.collect().await.ok()?;
                let trailers = collected.trailers().cloned();
                let data = collected.to_bytes();
                counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                Source::replay(Replay { data, trailers })
            } else {
                Source::stream(body, counted.clone(), may_retry)
            };
            let mut body = source.take()?;
            loop {
                let attempt = self.attempt(&head, decision, body, &mut source).await;
                if !attempt.retryable(decision.retry_on) {
                    return Some((attempt, false));
                }
                if retries >= decision.max_retries {
                    return Some((attempt, decision.max_retries > 0));
                }
                // A body already streamed upstream (too large, or unfinished) cannot be sent
                // again.
                let Some(next) = source.take() else {
                    return Some((attempt, false));
                };
                if !self.budget.try_retry() {
                    return Some((attempt, true));
                }
                if let Attempt::Response(response, Some(lease)) = attempt {
                    tokio::spawn(drain(response, lease));
                }
                retries += 1;
                tokio::time::sleep(backoff(retries)).await;
                body = next;
            }
        };
        let result = within(deadline, exchange).await;
        recorder.record.retries = retries;
        let Some(result) = result else {
            return self.local_reply(
                recorder,
                StatusCode::GATEWAY_TIMEOUT,
                flags::UPSTREAM_TIMEOUT,
                grpc,
            );
        };
        let Some((attempt, exhausted)) = result else {
            // The application's body failed (it went away, or sent a malformed body).
            return self.local_reply(
                recorder,
                StatusCode::BAD_REQUEST,
                flags::DOWNSTREAM_CONNECTION_TERMINATION,
                grpc,
            );
        };
        let flag = |f| {
            if exhausted {
                flags::with_retry_limit(f)
            } else {
                f
            }
        };
        let target = &decision.target.name;
        match attempt {
            Attempt::Response(response, lease) => {
                recorder.record.response_flags = flag(flags::NONE);
                self.respond(response, recorder, lease, deadline, false)
            }
            // The destination's authorization policy refused the caller: Envoy's RBAC reply.
            Attempt::ConnectFailed(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                debug!(%target, error = %e, "denied by the destination's policy");
                self.local_reply(recorder, StatusCode::FORBIDDEN, flags::NONE, grpc)
            }
            Attempt::ConnectFailed(e) => {
                debug!(%target, error = %e, "cannot connect upstream");
                let f = flag(flags::UPSTREAM_CONNECTION_FAILURE);
                self.local_reply(recorder, StatusCode::SERVICE_UNAVAILABLE, f, grpc)
            }
            Attempt::Reset(e) => {
                debug!(%target, error = %e, "upstream connection failed before the response");
                let f = flag(flags::UPSTREAM_CONNECTION_TERMINATION);
                self.local_reply(recorder, StatusCode::SERVICE_UNAVAILABLE, f, grpc)
            }
            Attempt::PerTryTimeout => {
                let f = flag(flags::UPSTREAM_TIMEOUT);
                self.local_reply(recorder, StatusCode::GATEWAY_TIMEOUT, f, grpc)
            }
        }
    }

    /// One attempt, up to the response headers.
    async fn attempt(
        &self,
        head: &request::Parts,
        decision: &Decision,
        body: RequestBody,
        source: &mut Source,
    ) -> Attempt {
        let target = &decision.target;
        let send = async {
            let mut body = body;
            let mut fresh = false;
            loop {
                let checkout = match self.pool.checkout(target, fresh).await {
                    Ok(c) => c,
                    Err(e) => {
                        source.put_back(body);
                        return Attempt::ConnectFailed(e);
                    }
                };
                let reused = checkout.reused;
                let mut error = match checkout.send(build(head, body)).await {
                    Ok((response, lease)) => return Attempt::Response(response, lease),
                    Err(e) => e,
                };
                // A pooled connection may have gone stale (the server closed it while idle):
                // once, the request goes again on a new connection without counting as a
                // retry, when the server cannot have seen it (or it is idempotent and can be
                // sent again as it was).
                let stale = reused && !fresh;
                match error.take_message() {
                    Some(request) if stale => body = request.into_body(),
                    Some(request) => {
                        source.put_back(request.into_body());
                        return Attempt::ConnectFailed(io::Error::other(error.into_error()));
                    }
                    None if stale
                        && error.error().is_incomplete_message()
                        && idempotent(&head.method) =>
                    {
                        match source.take() {
                            Some(again) => body = again,
                            None => return Attempt::Reset(error.into_error()),
                        }
                    }
                    None => return Attempt::Reset(error.into_error()),
                }
                fresh = true;
            }
        };
        match decision.per_try_timeout {
            Some(t) => tokio::time::timeout(t, send)
                .await
                .unwrap_or(Attempt::PerTryTimeout),
            None => send.await,
        }
    }

    /// The upstream's response, for the application.
    fn respond(
        &self,
        response: Response<Incoming>,
        mut recorder: Recorder,
        lease: Option<Lease>,
        deadline: Option<Instant>,
        upgraded: bool,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgraded);
        parts.version = self.version();
        recorder.record.response_code = parts.status.as_u16();
        // A trailers-only gRPC response carries its status in the headers.
        recorder.record.grpc_status = grpc_status(&parts.headers);
        let body = if upgraded {
            ResponseBody::local(Bytes::new(), recorder)
        } else {
            ResponseBody::upstream(body, recorder, lease, deadline)
        };
        Response::from_parts(parts, body)
    }

    /// An HTTP/1.1 upgrade (WebSocket) or CONNECT: sent on a connection of its own; once the
    /// upstream switches protocols, both connections are spliced.
    async fn upgrade(
        &self,
        mut head: request::Parts,
        body: Incoming,
        on_client: OnUpgrade,
        target: &Target,
        mut recorder: Recorder,
        deadline: Option<Instant>,
    ) -> Response<ResponseBody> {
        prepare_request(&mut head, HttpVersion::Http1, target, true);
        let body = RequestBody::Stream {
            inner: body,
            counted: recorder.request_bytes.clone(),
            tape: None,
        };
        let exchange = async {
            let mut sender = self
                .pool
                .upgradeable(target)
                .await
                .map_err(Failed::Connect)?;
            sender
                .send_request(build(&head, body))
                .await
                .map_err(Failed::Reset)
        };
        let mut response = match within(deadline, exchange).await {
            None => {
                return self.local_reply(
                    recorder,
                    StatusCode::GATEWAY_TIMEOUT,
                    flags::UPSTREAM_TIMEOUT,
                    false,
                );
            }
            Some(Err(Failed::Connect(e))) => {
                debug!(target = %target.name, error = %e, "cannot connect upstream");
                return self.local_reply(
                    recorder,
                    StatusCode::SERVICE_UNAVAILABLE,
                    flags::UPSTREAM_CONNECTION_FAILURE,
                    false,
                );
            }
            Some(Err(Failed::Reset(e))) => {
                debug!(target = %target.name, error = %e, "upstream connection failed before the response");
                return self.local_reply(
                    recorder,
                    StatusCode::SERVICE_UNAVAILABLE,
                    flags::UPSTREAM_CONNECTION_TERMINATION,
                    false,
                );
            }
            Some(Ok(r)) => r,
        };
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (head.method == Method::CONNECT && response.status().is_success());
        if !switched {
            recorder.record.response_flags = flags::NONE;
            return self.respond(response, recorder, None, deadline, false);
        }
        let on_upstream = hyper::upgrade::on(&mut response);
        let name = target.name.clone();
        tokio::spawn(async move {
            match tokio::try_join!(on_client, on_upstream) {
                Ok((client, upstream)) => {
                    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        debug!(target = %name, error = %e, "upgraded connection ended with an error");
                    }
                }
                Err(e) => debug!(target = %name, error = %e, "upgrade failed"),
            }
        });
        recorder.record.response_flags = flags::NONE;
        self.respond(response, recorder, None, None, true)
    }

    /// A response made here. A gRPC request gets a trailers-only gRPC response (HTTP 200 with
    /// `grpc-status`), as gRPC clients expect from a proxy.
    fn local_reply(
        &self,
        mut recorder: Recorder,
        status: StatusCode,
        flag: &'static str,
        grpc: bool,
    ) -> Response<ResponseBody> {
        recorder.record.response_flags = flag;
        let message = local_message(status, flag);
        let mut response = if grpc {
            let code = grpc_code(status);
            recorder.record.response_code = StatusCode::OK.as_u16();
            recorder.record.grpc_status = Some(code);
            let mut r = Response::new(ResponseBody::local(Bytes::new(), recorder));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(message));
            r
        } else {
            recorder.record.response_code = status.as_u16();
            let mut r = Response::new(ResponseBody::local(
                Bytes::from_static(message.as_bytes()),
                recorder,
            ));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        };
        *response.version_mut() = self.version();
        response
    }

    fn version(&self) -> Version {
        match self.downstream {
            HttpVersion::Http1 => Version::HTTP_11,
            HttpVersion::Http2 => Version::HTTP_2,
        }
    }
}

/// Envoy's wording, so that applications and runbooks recognise it.
fn local_message(status: StatusCode, flag: &'static str) -> &'static str {
    match (status, flag) {
        (StatusCode::NOT_FOUND, _) => "no route",
        (StatusCode::FORBIDDEN, _) => "RBAC: access denied",
        (StatusCode::NOT_IMPLEMENTED, _) => "CONNECT cannot be carried to this upstream",
        (StatusCode::GATEWAY_TIMEOUT, _) => "upstream request timeout",
        (StatusCode::BAD_REQUEST, _) => "request body failed",
        (_, f) if f.starts_with(flags::UPSTREAM_CONNECTION_FAILURE) => {
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
        }
        _ => {
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
        }
    }
}

/// gRPC status of a local reply: DEADLINE_EXCEEDED for a timeout, PERMISSION_DENIED for a
/// policy refusal, UNAVAILABLE when the upstream could not answer, UNIMPLEMENTED without a
/// route.
fn grpc_code(status: StatusCode) -> u32 {
    match status {
        StatusCode::GATEWAY_TIMEOUT => 4,
        StatusCode::FORBIDDEN => 7,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => 14,
        StatusCode::NOT_FOUND | StatusCode::NOT_IMPLEMENTED => 12,
        _ => 13,
    }
}

/// An HTTP/1.1 request asking to switch protocols, or to open a tunnel.
fn wants_upgrade<B>(request: &Request<B>) -> bool {
    if request.method() == Method::CONNECT {
        return true;
    }
    let connection_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && request.headers().contains_key(header::UPGRADE)
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A body whose whole length is announced and small: reading it before sending cannot wait on
/// the response (a streaming client would), so it is read first and kept for retries.
fn known_small(body: &Incoming) -> bool {
    body.is_end_stream()
        || body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY as u64)
}

fn build(head: &request::Parts, body: RequestBody) -> Request<RequestBody> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request
}

fn backoff(retry: u32) -> Duration {
    let ceiling = (BACKOFF_BASE * ((1u32 << retry.min(8)) - 1)).min(BACKOFF_MAX);
    Duration::from_micros(fastrand::u64(0..=ceiling.as_micros() as u64))
}

async fn within<F: Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// Reads a failed attempt's (small) response body so that its connection can serve again.
async fn drain(response: Response<Incoming>, lease: Lease) {
    let body = Limited::new(response.into_body(), MAX_REPLAY_BODY);
    if let Ok(Ok(_)) = tokio::time::timeout(DRAIN_TIMEOUT, body.collect()).await {
        lease.release();
    }
}
