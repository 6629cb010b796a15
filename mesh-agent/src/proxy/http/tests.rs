//! The L7 engine against in-process upstreams and clients on 127.0.0.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::detect::Prefixed;
use super::headers::valid_traceparent;
use super::*;

// ---------------------------------------------------------------------------------------------
// Test doubles: router, connector, budgets, observer.

/// How the test proxy speaks to its clients: as the outbound path does, a declared version or
/// detection first.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
    Detect { timeout: Duration },
}

/// Routes by the `x-target` header.
struct HeaderRouter {
    routes: HashMap<String, Decision>,
}

impl Router for HeaderRouter {
    fn route(&self, request: &http::request::Parts) -> Option<Decision> {
        let name = request.headers.get("x-target")?.to_str().ok()?;
        self.routes.get(name).cloned()
    }
}

/// Plain TCP to the target's address.
#[derive(Default)]
struct TestConnector {
    connects: AtomicUsize,
}

impl Connector for TestConnector {
    type Io = TcpStream;

    async fn connect(&self, target: &Target) -> io::Result<TcpStream> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        TcpStream::connect(target.addr).await
    }
}

struct Unlimited;

impl Budget for Unlimited {
    fn record_request(&self) {}
    fn try_retry(&self) -> bool {
        true
    }
}

/// Retries allowed while retries <= ratio x requests.
struct RatioBudget {
    ratio: f64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RatioBudget {
    fn new(ratio: f64) -> RatioBudget {
        RatioBudget {
            ratio,
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }
}

impl Budget for RatioBudget {
    fn record_request(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
    }

    fn try_retry(&self) -> bool {
        let mut retries = self.retries.load(Ordering::SeqCst);
        loop {
            let allowed = self.ratio * self.requests.load(Ordering::SeqCst) as f64;
            if (retries + 1) as f64 > allowed {
                return false;
            }
            match self.retries.compare_exchange(
                retries,
                retries + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => retries = now,
            }
        }
    }
}

#[derive(Default)]
struct Records(Mutex<Vec<RequestRecord>>);

impl RequestObserver for Records {
    fn observe(&self, record: RequestRecord) {
        self.0.lock().unwrap().push(record);
    }
}

impl Records {
    /// The records, once there are `n` (a record is emitted when the response body is done,
    /// which the client may see a moment earlier).
    async fn wait(&self, n: usize) -> Vec<RequestRecord> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let records = self.0.lock().unwrap().clone();
            if records.len() >= n || Instant::now() > deadline {
                assert_eq!(records.len(), n, "records: {records:#?}");
                return records;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams.

type UpBody = UnsyncBoxBody<Bytes, BoxError>;

struct Upstream {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn upstream<F, Fut>(version: HttpVersion, handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<UpBody>> + Send + 'static,
{
    upstream_with(version, true, handler).await
}

async fn upstream_with<F, Fut>(version: HttpVersion, keep_alive: bool, handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<UpBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let (a, r) = (accepts.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let r = r.clone();
            let service = service_fn(move |request| {
                r.fetch_add(1, Ordering::SeqCst);
                let response = handler(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let io = TokioIo::new(stream);
            tokio::spawn(async move {
                let _ = match version {
                    HttpVersion::Http1 => {
                        server1::Builder::new()
                            .keep_alive(keep_alive)
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await
                    }
                    HttpVersion::Http2 => {
                        server2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    }
                };
            });
        }
    });
    Upstream {
        addr,
        accepts,
        requests,
    }
}

fn full(data: impl Into<Bytes>) -> UpBody {
    Full::new(data.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

/// A gRPC response: one length-prefixed message, then trailers.
fn grpc_response(message: &[u8], status: u32) -> Response<UpBody> {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    let body = Full::new(Bytes::from(framed))
        .with_trailers(async move { Some(Ok(trailers)) })
        .map_err(|e: Infallible| match e {})
        .boxed_unsync();
    let mut r = Response::new(body);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The proxy under test.

struct Proxy {
    addr: SocketAddr,
    records: Arc<Records>,
    pool: Arc<Pool<TestConnector>>,
    /// How each served connection ended: "http1", "http2", "opaque:<prefix>:<timed_out>".
    outcomes: Arc<Mutex<Vec<String>>>,
}

/// A decision for target `name`; names starting with `h2` speak HTTP/2.
fn decision(name: &str, addr: SocketAddr) -> Decision {
    let version = if name.starts_with("h2") {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    Decision::to(Target {
        name: name.into(),
        addr,
        version,
    })
}

fn retrying(mut d: Decision, max_retries: u32) -> Decision {
    d.max_retries = max_retries;
    d.retry_on = RetryOn {
        gateway_error: true,
        connection_error: true,
        ..RetryOn::default()
    };
    d
}

async fn proxy(protocol: Protocol, routes: Vec<(&str, Decision)>) -> Proxy {
    proxy_with(
        protocol,
        routes,
        Arc::new(Unlimited),
        PoolOptions::default(),
        ServeOptions::default(),
    )
    .await
}

async fn proxy_with(
    protocol: Protocol,
    routes: Vec<(&str, Decision)>,
    budget: Arc<dyn Budget>,
    options: PoolOptions,
    serve_options: ServeOptions,
) -> Proxy {
    let router: Arc<dyn Router> = Arc::new(HeaderRouter {
        routes: routes.into_iter().map(|(k, d)| (k.to_owned(), d)).collect(),
    });
    let records = Arc::new(Records::default());
    let observer: Arc<dyn RequestObserver> = records.clone();
    let pool = Pool::new(TestConnector::default(), options);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (p, o) = (pool.clone(), outcomes.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (router, pool, budget, observer, outcomes, serve_options) = (
                router.clone(),
                p.clone(),
                budget.clone(),
                observer.clone(),
                o.clone(),
                serve_options.clone(),
            );
            tokio::spawn(async move {
                let (r, p, b, o) = (router, pool, budget, observer);
                let served = |version, io| async move {
                    let served = serve(io, version, r, p, b, o, &serve_options).await;
                    match (served, version) {
                        (Ok(()), HttpVersion::Http1) => "http1".to_owned(),
                        (Ok(()), HttpVersion::Http2) => "http2".to_owned(),
                        (Err(e), _) => format!("error:{e}"),
                    }
                };
                let what = match protocol {
                    Protocol::Http1 => {
                        served(HttpVersion::Http1, Prefixed::new(Bytes::new(), stream)).await
                    }
                    Protocol::Http2 => {
                        served(HttpVersion::Http2, Prefixed::new(Bytes::new(), stream)).await
                    }
                    Protocol::Detect { timeout } => match detect(stream, timeout).await {
                        Ok(Detection::Http(version, io)) => served(version, io).await,
                        Ok(Detection::Opaque {
                            prefix, timed_out, ..
                        }) => format!("opaque:{}:{timed_out}", String::from_utf8_lossy(&prefix)),
                        Err(e) => format!("error:{e}"),
                    },
                };
                outcomes.lock().unwrap().push(what);
            });
        }
    });
    Proxy {
        addr,
        records,
        pool,
        outcomes,
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

async fn h1_client<B>(addr: SocketAddr) -> client1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = client1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

async fn h2_client(addr: SocketAddr) -> client2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = client2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn get(target: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("/")
        .header("host", "svc.local:8080")
        .header("x-target", target)
        .body(Full::default())
        .unwrap()
}

async fn send1(
    client: &mut client1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, String) {
    client.ready().await.unwrap();
    let response = client.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A request body of `chunks` x `size` bytes of `fill`, with no announced length.
struct Chunked {
    chunks: usize,
    size: usize,
    fill: u8,
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        self.chunks -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![
            self.fill;
            self.size
        ])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Routing and pooling.

#[tokio::test]
async fn keep_alive_requests_are_routed_by_header_to_pooled_connections() {
    let a = upstream(HttpVersion::Http1, |_| async { text(StatusCode::OK, "a") }).await;
    let b = upstream(HttpVersion::Http1, |_| async { text(StatusCode::OK, "b") }).await;
    let p = proxy(
        Protocol::Http1,
        vec![("a", decision("a", a.addr)), ("b", decision("b", b.addr))],
    )
    .await;

    // Two application connections, one after the other, many keep-alive requests each.
    for _ in 0..2 {
        let mut client = h1_client(p.addr).await;
        for i in 0..20 {
            let name = if i % 2 == 0 { "a" } else { "b" };
            let (status, _, body) = send1(&mut client, get(name)).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, name);
        }
    }
    assert_eq!(a.accepts.load(Ordering::SeqCst), 1, "one connection to a");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1, "one connection to b");
    assert_eq!(a.requests.load(Ordering::SeqCst), 20);
    assert_eq!(p.pool.connector().connects.load(Ordering::SeqCst), 2);

    let records = p.records.wait(40).await;
    for r in &records {
        assert_eq!(r.response_code, 200);
        assert_eq!(r.response_flags, "-");
        assert_eq!(r.response_bytes, 1);
        assert_eq!(r.retries, 0);
        assert_eq!(r.method, http::Method::GET);
    }
    let to_a = records
        .iter()
        .filter(|r| r.target.as_ref().unwrap().name.as_ref() == "a")
        .count();
    assert_eq!(to_a, 20);
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_host_is_kept() {
    let echo = |request: Request<Incoming>| async move {
        let names: Vec<String> = request
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        let host = request
            .headers()
            .get("host")
            .map(|h| h.to_str().unwrap().to_owned())
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let mut r = text(StatusCode::OK, names.join(","));
        r.headers_mut()
            .insert("x-seen-host", HeaderValue::from_str(&host).unwrap());
        // Hop-by-hop headers of the response are the proxy's to drop too.
        r.headers_mut()
            .insert("keep-alive", HeaderValue::from_static("timeout=5"));
        r
    };
    let h1 = upstream(HttpVersion::Http1, echo).await;
    let h2 = upstream(HttpVersion::Http2, echo).await;
    let p = proxy(
        Protocol::Http1,
        vec![
            ("a", decision("a", h1.addr)),
            ("h2", decision("h2", h2.addr)),
        ],
    )
    .await;
    let mut client = h1_client(p.addr).await;
    for target in ["a", "h2"] {
        let mut request = get(target);
        let h = request.headers_mut();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        let (status, headers, seen) = send1(&mut client, request).await;
        assert_eq!(status, StatusCode::OK);
        let seen: Vec<&str> = seen.split(',').collect();
        for hop in ["connection", "x-private", "keep-alive", "proxy-connection"] {
            assert!(
                !seen.contains(&hop),
                "{target}: {hop} reached upstream: {seen:?}"
            );
        }
        assert!(seen.contains(&"x-end-to-end"), "{seen:?}");
        assert!(seen.contains(&"traceparent"), "{seen:?}");
        // HTTP/1.1 Host, or HTTP/2 :authority, is what the application sent.
        assert_eq!(headers["x-seen-host"], "svc.local:8080", "{target}");
        assert!(!headers.contains_key("keep-alive"));
    }
}

#[tokio::test]
async fn http2_prior_knowledge_requests_are_multiplexed_on_one_upstream_connection() {
    const N: usize = 20;
    // The upstream answers only once all N requests are in flight at once: they must be
    // multiplexed on both sides of the proxy.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let up = upstream(HttpVersion::Http2, move |request: Request<Incoming>| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            text(StatusCode::OK, request.uri().path().to_owned())
        }
    })
    .await;
    let p = proxy(Protocol::Http2, vec![("h2", decision("h2", up.addr))]).await;
    let client = h2_client(p.addr).await;
    let mut calls = Vec::new();
    for i in 0..N {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let request = Request::builder()
                .uri(format!("http://svc.local/call/{i}"))
                .header("x-target", "h2")
                .body(Full::default())
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("/call/{i}"));
        }));
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        for call in calls {
            call.await.unwrap();
        }
    })
    .await
    .expect("requests were not multiplexed");
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(p.records.wait(N).await.len(), N);
}

#[tokio::test]
async fn grpc_unary_calls_are_recorded_with_their_status() {
    let up = upstream(
        HttpVersion::Http2,
        |request: Request<Incoming>| async move {
            assert_eq!(request.headers()["te"], "trailers");
            assert_eq!(request.headers()["content-type"], "application/grpc");
            let path = request.uri().path().to_owned();
            let body = request.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"\0\0\0\0\x03req");
            match path.as_str() {
                "/pkg.Svc/Found" => grpc_response(b"hello", 0),
                "/pkg.Svc/Missing" => grpc_response(b"", 5),
                _ => {
                    // Trailers-only: the status is in the headers.
                    let mut r = text(StatusCode::OK, "");
                    r.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    r.headers_mut()
                        .insert("grpc-status", HeaderValue::from_static("12"));
                    r
                }
            }
        },
    )
    .await;
    let p = proxy(Protocol::Http2, vec![("h2", decision("h2", up.addr))]).await;
    let mut client = h2_client(p.addr).await;
    let mut message = vec![0u8, 0, 0, 0, 3];
    message.extend_from_slice(b"req");
    for (method, status) in [("Found", 0u32), ("Missing", 5), ("Unknown", 12)] {
        let request = Request::builder()
            .method("POST")
            .uri(format!("http://svc.local:50051/pkg.Svc/{method}"))
            .header("x-target", "h2")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(message.clone())))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.unwrap();
        let got = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| headers.get("grpc-status"))
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u32>()
            .unwrap();
        assert_eq!(got, status);
    }
    let records = p.records.wait(3).await;
    let mut statuses: Vec<_> = records.iter().map(|r| r.grpc_status).collect();
    statuses.sort();
    assert_eq!(statuses, [Some(0), Some(5), Some(12)]);
    for r in &records {
        assert_eq!(r.response_code, 200);
        assert_eq!(r.request_bytes, 8);
        assert_eq!(r.method, http::Method::POST);
    }
    assert!(records.iter().any(|r| r.response_bytes == 10));
}

#[tokio::test]
async fn http1_client_reaches_an_http2_upstream() {
    let up = upstream(
        HttpVersion::Http2,
        |request: Request<Incoming>| async move {
            let authority = request.uri().authority().unwrap().to_string();
            text(StatusCode::OK, authority)
        },
    )
    .await;
    let p = proxy(Protocol::Http1, vec![("h2", decision("h2", up.addr))]).await;
    let mut client = h1_client(p.addr).await;
    for _ in 0..5 {
        let (status, _, body) = send1(&mut client, get("h2")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "svc.local:8080");
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_closed_by_the_upstream_is_not_reused() {
    // The upstream closes every connection after one response.
    let up = upstream_with(HttpVersion::Http1, false, |_| async {
        text(StatusCode::OK, "ok")
    })
    .await;
    let p = proxy(Protocol::Http1, vec![("a", decision("a", up.addr))]).await;
    let mut client = h1_client(p.addr).await;
    for _ in 0..10 {
        let (status, _, body) = send1(&mut client, get("a")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 10);
    for r in p.records.wait(10).await {
        assert_eq!(
            (r.response_code, r.response_flags, r.retries),
            (200, "-", 0)
        );
    }
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_while_idle_is_replaced() {
    // A raw server: one response per connection (announced as keep-alive), then it closes
    // the connection 50 ms later, as servers with short keep-alive timeouts do.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = accepts.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = Vec::new();
                while !request.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    request.push(byte[0]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let p = proxy(Protocol::Http1, vec![("a", decision("a", addr))]).await;
    let mut client = h1_client(p.addr).await;
    for _ in 0..3 {
        let (status, _, body) = send1(&mut client, get("a")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepts.load(Ordering::SeqCst), 3);
    for r in p.records.wait(3).await {
        assert_eq!(
            (r.response_code, r.response_flags, r.retries),
            (200, "-", 0)
        );
    }
}

#[tokio::test]
async fn the_idle_pool_is_bounded() {
    const N: usize = 6;
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let first_wave = Arc::new(AtomicUsize::new(0));
    let up = upstream(HttpVersion::Http1, move |_| {
        let barrier = barrier.clone();
        let first_wave = first_wave.clone();
        async move {
            if first_wave.fetch_add(1, Ordering::SeqCst) < N {
                barrier.wait().await;
            }
            text(StatusCode::OK, "ok")
        }
    })
    .await;
    let options = PoolOptions {
        max_idle_per_target: 2,
        ..PoolOptions::default()
    };
    let p = proxy_with(
        Protocol::Http1,
        vec![("a", decision("a", up.addr))],
        Arc::new(Unlimited),
        options,
        ServeOptions::default(),
    )
    .await;
    // N concurrent requests need N upstream connections.
    let mut calls = Vec::new();
    for _ in 0..N {
        let addr = p.addr;
        calls.push(tokio::spawn(async move {
            let mut client = h1_client(addr).await;
            send1(&mut client, get("a")).await
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), N);
    let target = decision("a", up.addr).target;
    p.records.wait(N).await;
    assert_eq!(p.pool.idle_connections(&target), 2);
    // The kept ones serve what follows.
    let mut client = h1_client(p.addr).await;
    for _ in 0..5 {
        assert_eq!(send1(&mut client, get("a")).await.0, StatusCode::OK);
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), N);
}

#[tokio::test]
async fn an_idle_application_connection_is_closed_but_not_a_busy_one() {
    let up = upstream(HttpVersion::Http1, |_| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        text(StatusCode::OK, "slow")
    })
    .await;
    let p = proxy_with(
        Protocol::Http1,
        vec![("a", decision("a", up.addr))],
        Arc::new(Unlimited),
        PoolOptions::default(),
        ServeOptions {
            idle_timeout: Some(Duration::from_millis(100)),
        },
    )
    .await;
    let mut client = h1_client(p.addr).await;
    // A request longer than the idle timeout is not cut.
    let (status, _, body) = send1(&mut client, get("a")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
    let done = Instant::now();
    // Then nothing: the connection closes once idle for the timeout.
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while !client.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection stayed open");
    let idle = done.elapsed();
    assert!(
        idle >= Duration::from_millis(90) && idle < Duration::from_millis(400),
        "{idle:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(1);
    while p.outcomes.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(p.outcomes.lock().unwrap().as_slice(), ["http1"]);
}

#[tokio::test]
async fn no_route_is_404_nr() {
    let p = proxy(Protocol::Http1, vec![]).await;
    let mut client = h1_client(p.addr).await;
    let (status, _, _) = send1(&mut client, get("nowhere")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let records = p.records.wait(1).await;
    assert_eq!(records[0].response_flags, "NR");
    assert!(records[0].target.is_none());
}

// ---------------------------------------------------------------------------------------------
// Failures, timeouts and retries.

#[tokio::test]
async fn the_request_timeout_is_a_504_ut_in_time() {
    let up = upstream(HttpVersion::Http1, |_| async {
        std::future::pending::<()>().await;
        text(StatusCode::OK, "never")
    })
    .await;
    let mut d = decision("a", up.addr);
    d.request_timeout = Some(Duration::from_millis(300));
    let p = proxy(Protocol::Http1, vec![("a", d)]).await;
    let mut client = h1_client(p.addr).await;
    let started = Instant::now();
    let (status, _, body) = send1(&mut client, get("a")).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(400), "{took:?}");
    let records = p.records.wait(1).await;
    assert_eq!(records[0].response_flags, "UT");
    assert_eq!(records[0].response_code, 504);

    // The application's connection is still good for the next request.
    let (status, _, _) = send1(&mut client, get("a")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

/// A response body that sends one chunk, then nothing ever again.
struct Stall {
    sent: bool,
}

impl Body for Stall {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if std::mem::replace(&mut self.sent, true) {
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"partial")))))
    }
}

#[tokio::test]
async fn the_request_timeout_cuts_a_response_body_that_stalls() {
    let up = upstream(HttpVersion::Http1, |_| async {
        Response::new(Stall { sent: false }.boxed_unsync())
    })
    .await;
    let mut d = decision("a", up.addr);
    d.request_timeout = Some(Duration::from_millis(200));
    let p = proxy(Protocol::Http1, vec![("a", d)]).await;
    let mut client = h1_client(p.addr).await;
    let started = Instant::now();
    let response = client.send_request(get("a")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.into_body().collect().await.is_err());
    assert!(started.elapsed() < Duration::from_millis(300));
    let records = p.records.wait(1).await;
    assert_eq!(records[0].response_flags, "UT");
    assert_eq!(
        (records[0].response_code, records[0].response_bytes),
        (200, 7)
    );
}

#[tokio::test]
async fn a_per_try_timeout_is_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(HttpVersion::Http1, move |_| {
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                std::future::pending::<()>().await;
            }
            text(StatusCode::OK, "second try")
        }
    })
    .await;
    let mut d = retrying(decision("a", up.addr), 1);
    d.per_try_timeout = Some(Duration::from_millis(100));
    d.request_timeout = Some(Duration::from_secs(2));
    let p = proxy(Protocol::Http1, vec![("a", d)]).await;
    let mut client = h1_client(p.addr).await;
    let (status, _, body) = send1(&mut client, get("a")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "second try"));
    let records = p.records.wait(1).await;
    assert_eq!((records[0].retries, records[0].response_flags), (1, "-"));
}

#[tokio::test]
async fn a_refused_upstream_is_a_503_uf() {
    let addr = closed_port().await;
    let p = proxy(
        Protocol::Http1,
        vec![
            ("a", decision("a", addr)),
            ("retried", retrying(decision("a", addr), 2)),
        ],
    )
    .await;
    let mut client = h1_client(p.addr).await;
    let (status, _, _) = send1(&mut client, get("a")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let records = p.records.wait(1).await;
    assert_eq!(records[0].response_flags, "UF");
    assert_eq!(p.pool.connector().connects.load(Ordering::SeqCst), 1);

    // With retries: every attempt fails to connect, and the retries run out.
    let (status, _, _) = send1(&mut client, get("retried")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let records = p.records.wait(2).await;
    assert_eq!(records[1].response_flags, "UF,URX");
    assert_eq!(records[1].retries, 2);
    assert_eq!(p.pool.connector().connects.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_grpc_call_to_a_refused_upstream_gets_grpc_unavailable() {
    let p = proxy(
        Protocol::Http2,
        vec![("h2", decision("h2", closed_port().await))],
    )
    .await;
    let mut client = h2_client(p.addr).await;
    let request = Request::builder()
        .method("POST")
        .uri("http://svc.local/pkg.Svc/M")
        .header("x-target", "h2")
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "14");
    let records = p.records.wait(1).await;
    assert_eq!(records[0].grpc_status, Some(14));
    assert_eq!(records[0].response_flags, "UF");
}

#[tokio::test]
async fn retries_turn_an_upstream_failing_half_the_time_into_successes() {
    const REQUESTS: usize = 200;
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(5)));
    let up = upstream(HttpVersion::Http1, move |request: Request<Incoming>| {
        let fail = rng.lock().unwrap().bool();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            if fail {
                text(StatusCode::SERVICE_UNAVAILABLE, "try again")
            } else {
                text(StatusCode::OK, body)
            }
        }
    })
    .await;
    let p = proxy(
        Protocol::Http1,
        vec![("a", retrying(decision("a", up.addr), 10))],
    )
    .await;
    let mut clients = Vec::new();
    for c in 0..10 {
        let addr = p.addr;
        clients.push(tokio::spawn(async move {
            let mut client = h1_client(addr).await;
            let mut ok = 0;
            for i in 0..REQUESTS / 10 {
                // A small body goes again, intact, with each retry.
                let payload = format!("request {c}/{i}");
                let request = Request::builder()
                    .method("POST")
                    .uri("/submit")
                    .header("x-target", "a")
                    .body(Full::new(Bytes::from(payload.clone())))
                    .unwrap();
                let (status, _, body) = send1(&mut client, request).await;
                if status == StatusCode::OK {
                    assert_eq!(body, payload);
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for c in clients {
        ok += c.await.unwrap();
    }
    assert!(ok * 100 >= REQUESTS * 99, "{ok} of {REQUESTS} succeeded");
    let records = p.records.wait(REQUESTS).await;
    let retries: u32 = records.iter().map(|r| r.retries).sum();
    assert!(retries > 50, "{retries} retries");
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        REQUESTS + retries as usize
    );
    // Failed attempts' connections were drained and kept: far fewer connections than attempts.
    assert!(up.accepts.load(Ordering::SeqCst) <= 20);
}

#[tokio::test]
async fn retries_stop_at_the_budget_when_the_upstream_always_fails() {
    const REQUESTS: usize = 200;
    const RATIO: f64 = 0.2;
    let up = upstream(HttpVersion::Http1, |_| async {
        text(StatusCode::SERVICE_UNAVAILABLE, "down")
    })
    .await;
    let budget = Arc::new(RatioBudget::new(RATIO));
    let p = proxy_with(
        Protocol::Http1,
        vec![("a", retrying(decision("a", up.addr), 3))],
        budget.clone(),
        PoolOptions::default(),
        ServeOptions::default(),
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let addr = p.addr;
        clients.push(tokio::spawn(async move {
            let mut client = h1_client(addr).await;
            for _ in 0..REQUESTS / 10 {
                let (status, _, _) = send1(&mut client, get("a")).await;
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let attempts = up.requests.load(Ordering::SeqCst);
    assert!(
        attempts as f64 <= REQUESTS as f64 * (1.0 + RATIO),
        "{attempts} attempts"
    );
    assert!(attempts > REQUESTS, "some retries happened: {attempts}");
    let records = p.records.wait(REQUESTS).await;
    assert!(records.iter().all(|r| r.response_flags == "URX"));
    assert_eq!(
        records.iter().map(|r| r.retries as usize).sum::<usize>(),
        attempts - REQUESTS
    );
}

#[tokio::test]
async fn a_large_body_is_streamed_and_not_retried() {
    let up = upstream(
        HttpVersion::Http1,
        |request: Request<Incoming>| async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            text(StatusCode::SERVICE_UNAVAILABLE, body.len().to_string())
        },
    )
    .await;
    let p = proxy(
        Protocol::Http1,
        vec![("a", retrying(decision("a", up.addr), 3))],
    )
    .await;

    // Announced length above the limit.
    let mut client = h1_client(p.addr).await;
    let big = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("x-target", "a")
        .body(Full::new(Bytes::from(vec![1u8; 1024 * 1024])))
        .unwrap();
    let (status, _, body) = send1(&mut client, big).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "1048576")
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);

    // No announced length, and more than the limit.
    let mut client = h1_client::<Chunked>(p.addr).await;
    let streamed = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("x-target", "a")
        .body(Chunked {
            chunks: 16,
            size: 16 * 1024,
            fill: 2,
        })
        .unwrap();
    let response = client.send_request(streamed).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "262144");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);

    let records = p.records.wait(2).await;
    for r in &records {
        assert_eq!(
            (r.retries, r.response_flags, r.response_code),
            (0, "-", 503)
        );
    }
    assert_eq!(records[0].request_bytes, 1024 * 1024);
    assert_eq!(records[1].request_bytes, 256 * 1024);
}

#[tokio::test]
async fn a_trailers_only_grpc_status_is_retried_when_configured() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(HttpVersion::Http2, move |_| {
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                let mut r = text(StatusCode::OK, "");
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                r.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("14"));
                r
            } else {
                grpc_response(b"ok", 0)
            }
        }
    })
    .await;
    let mut d = decision("h2", up.addr);
    d.max_retries = 2;
    d.retry_on.grpc = GrpcCodes::default().with(14);
    assert!(!d.retry_on.grpc.contains(4) && d.retry_on.grpc.with(99) == d.retry_on.grpc);
    let p = proxy(Protocol::Http2, vec![("h2", d)]).await;
    let mut client = h2_client(p.addr).await;
    let request = Request::builder()
        .method("POST")
        .uri("http://svc.local/pkg.Svc/M")
        .header("x-target", "h2")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    let trailers = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned();
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let records = p.records.wait(1).await;
    assert_eq!((records[0].retries, records[0].grpc_status), (1, Some(0)));
}

#[tokio::test]
async fn a_small_streamed_body_is_replayed_on_retry() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(HttpVersion::Http1, move |request: Request<Incoming>| {
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            if first {
                text(StatusCode::BAD_GATEWAY, "")
            } else {
                text(StatusCode::OK, body)
            }
        }
    })
    .await;
    let p = proxy(
        Protocol::Http1,
        vec![("a", retrying(decision("a", up.addr), 1))],
    )
    .await;
    let mut client = h1_client::<Chunked>(p.addr).await;
    let request = Request::builder()
        .method("POST")
        .uri("/")
        .header("x-target", "a")
        .body(Chunked {
            chunks: 4,
            size: 1024,
            fill: b'x',
        })
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, vec![b'x'; 4096]);
    let records = p.records.wait(1).await;
    assert_eq!((records[0].retries, records[0].request_bytes), (1, 4096));
}

// ---------------------------------------------------------------------------------------------
// Trace context.

#[tokio::test]
async fn traceparent_is_kept_when_present_and_added_when_absent() {
    let up = upstream(
        HttpVersion::Http1,
        |request: Request<Incoming>| async move {
            let tp = request.headers().get_all("traceparent").iter().count();
            assert_eq!(tp, 1);
            let mut r = text(StatusCode::OK, "");
            r.headers_mut()
                .insert("x-seen", request.headers()["traceparent"].clone());
            r
        },
    )
    .await;
    let p = proxy(Protocol::Http1, vec![("a", decision("a", up.addr))]).await;
    let mut client = h1_client(p.addr).await;

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = get("a");
    request
        .headers_mut()
        .insert("traceparent", HeaderValue::from_static(given));
    let (_, headers, _) = send1(&mut client, request).await;
    assert_eq!(headers["x-seen"], given);

    let mut seen = Vec::new();
    for _ in 0..2 {
        let (_, headers, _) = send1(&mut client, get("a")).await;
        let tp = headers["x-seen"].to_str().unwrap().to_owned();
        assert!(valid_traceparent(tp.as_bytes()), "{tp}");
        assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
        seen.push(tp);
    }
    assert_ne!(seen[0], seen[1], "each request gets its own trace");
}

// ---------------------------------------------------------------------------------------------
// Upgrades.

#[tokio::test]
async fn an_upgrade_is_carried_and_spliced() {
    let up = upstream(
        HttpVersion::Http1,
        |mut request: Request<Incoming>| async move {
            assert_eq!(request.headers()["upgrade"], "echo");
            let on = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    io.write_all(&buf[..n]).await.unwrap();
                }
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("upgrade"));
            r.headers_mut()
                .insert("upgrade", HeaderValue::from_static("echo"));
            r
        },
    )
    .await;
    let p = proxy(Protocol::Http1, vec![("a", decision("a", up.addr))]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: svc.local\r\nx-target: a\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    let records = p.records.wait(1).await;
    assert_eq!(records[0].response_code, 101);
}

// ---------------------------------------------------------------------------------------------
// Detection.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn read_all_of<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn detection_finds_the_http2_preface_and_replays_it() {
    let (mut app, agent) = tokio::io::duplex(1024);
    let mut sent = PREFACE.to_vec();
    sent.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    // In two writes: detection has to wait for the whole preface.
    app.write_all(&sent[..10]).await.unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        app.write_all(&sent[10..]).await.unwrap();
        (app, sent)
    });
    let detection = detect(agent, Duration::from_secs(1)).await.unwrap();
    let (_app, sent) = writer.await.unwrap();
    let Detection::Http(HttpVersion::Http2, mut io) = detection else {
        panic!("not h2: {detection:?}");
    };
    assert_eq!(read_all_of(&mut io, sent.len()).await, sent);
}

#[tokio::test]
async fn detection_finds_an_http1_request_line() {
    let (mut app, agent) = tokio::io::duplex(1024);
    let sent = b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n";
    app.write_all(b"PO").await.unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        app.write_all(&sent[2..]).await.unwrap();
        app
    });
    let detection = detect(agent, Duration::from_secs(1)).await.unwrap();
    let _app = writer.await.unwrap();
    let Detection::Http(HttpVersion::Http1, mut io) = detection else {
        panic!("not http1: {detection:?}");
    };
    assert_eq!(read_all_of(&mut io, sent.len()).await, sent);
}

#[tokio::test]
async fn a_server_speaks_first_peer_falls_back_after_the_timeout_with_no_byte_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (agent_side, _) = listener.accept().await.unwrap();

    // The client waits for the server's greeting, as a MySQL or SMTP client would.
    let started = Instant::now();
    let detection = detect(agent_side, Duration::from_millis(100))
        .await
        .unwrap();
    let took = started.elapsed();
    let Detection::Opaque {
        stream: mut server,
        prefix,
        timed_out,
    } = detection
    else {
        panic!("not opaque: {detection:?}");
    };
    assert!(prefix.is_empty());
    assert!(timed_out);
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(300),
        "{took:?}"
    );

    // The conversation goes on over the stream handed back.
    server.write_all(b"220 ready\r\n").await.unwrap();
    assert_eq!(read_all_of(&mut client, 11).await, b"220 ready\r\n");
    client.write_all(b"HELO mesh\r\n").await.unwrap();
    assert_eq!(read_all_of(&mut server, 11).await, b"HELO mesh\r\n");
}

#[tokio::test]
async fn a_partial_method_then_silence_falls_back_with_its_bytes() {
    let (mut app, agent) = tokio::io::duplex(1024);
    app.write_all(b"GE").await.unwrap();
    let detection = detect(agent, Duration::from_millis(50)).await.unwrap();
    let Detection::Opaque {
        prefix, timed_out, ..
    } = detection
    else {
        panic!("not opaque: {detection:?}");
    };
    assert_eq!((&prefix[..], timed_out), (&b"GE"[..], true));
}

#[tokio::test]
async fn binary_garbage_falls_back_with_every_byte_returned() {
    let (mut app, agent) = tokio::io::duplex(4096);
    let mut rng = fastrand::Rng::with_seed(3);
    let mut sent = vec![0x16, 0x03, 0x01]; // a TLS record header, then noise
    sent.extend((0..2000).map(|_| rng.u8(..)));
    app.write_all(&sent[..700]).await.unwrap();
    let detection = detect(agent, Duration::from_secs(5)).await.unwrap();
    let Detection::Opaque {
        mut stream,
        prefix,
        timed_out,
    } = detection
    else {
        panic!("not opaque: {detection:?}");
    };
    assert!(!timed_out, "decided at once, without waiting");
    assert!(!prefix.is_empty() && prefix.len() <= 700);
    app.write_all(&sent[700..]).await.unwrap();
    drop(app);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let mut got = prefix.to_vec();
    got.extend_from_slice(&rest);
    assert_eq!(got, sent);
}

#[tokio::test]
async fn serve_with_detection_speaks_http1_and_http2_and_hands_back_the_rest() {
    let h1 = upstream(HttpVersion::Http1, |_| async {
        text(StatusCode::OK, "one")
    })
    .await;
    let p = proxy(
        Protocol::Detect {
            timeout: Duration::from_millis(100),
        },
        vec![("a", decision("a", h1.addr))],
    )
    .await;

    let mut client = h1_client(p.addr).await;
    assert_eq!(send1(&mut client, get("a")).await.2, "one");
    drop(client);

    let mut client = h2_client(p.addr).await;
    let response = client.send_request(get("a")).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "one");
    drop(client);

    let mut garbage = TcpStream::connect(p.addr).await.unwrap();
    garbage.write_all(b"\x00\x01binary").await.unwrap();
    let silent = TcpStream::connect(p.addr).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut outcomes = p.outcomes.lock().unwrap().clone();
        if outcomes.len() == 4 {
            outcomes.sort();
            let mut expected = [
                "http1",
                "http2",
                "opaque::true",
                "opaque:\u{0}\u{1}binary:false",
            ];
            expected.sort();
            assert_eq!(outcomes, expected);
            break;
        }
        assert!(Instant::now() < deadline, "outcomes: {outcomes:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(silent);
}
