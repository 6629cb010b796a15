//! `grpc-serve` and `grpc-call`: a minimal gRPC server and unary client over HTTP/2 with prior
//! knowledge (h2c), as a gRPC application inside a task speaks it.
//!
//! `grpc-serve --listen ADDR` answers every `POST` with `content-type: application/grpc...` with
//! one length-prefixed message (`ok <path>`) and trailers `grpc-status: 0`; a path ending in
//! `/Fail` gets `grpc-status: 5` (NOT_FOUND) and a `grpc-message` instead. Anything else gets
//! a trailers-only `grpc-status: 12` (UNIMPLEMENTED). Prints `listening on ADDR`, then runs
//! until killed.
//!
//! `grpc-call --connect ADDR --path /pkg.Svc/Method --authority HOST [--timeout SECS]` makes one
//! unary call and prints `status=<grpc-status, or none> http=<HTTP status> message=<the response
//! message, or the body of a non-200 answer>`; exit 0 when the exchange completed, whatever the
//! statuses.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::args::Args;

/// NOT_FOUND, the status of `/Fail` calls.
const NOT_FOUND: u32 = 5;
/// UNIMPLEMENTED, for requests that are not gRPC.
const UNIMPLEMENTED: u32 = 12;

pub struct ServeOptions {
    listen: SocketAddr,
}

impl ServeOptions {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        args.only(&["listen"])?;
        Ok(Self {
            listen: args.required("listen")?,
        })
    }
}

pub struct CallOptions {
    connect: SocketAddr,
    path: String,
    authority: String,
    timeout: Duration,
}

impl CallOptions {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        args.only(&["connect", "path", "authority", "timeout"])?;
        let path: String = args.required("path")?;
        if !path.starts_with('/') {
            return Err("--path must start with /".to_string());
        }
        Ok(Self {
            connect: args.required("connect")?,
            path,
            authority: args.required("authority")?,
            timeout: Duration::from_secs(args.optional("timeout")?.unwrap_or(30)),
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn serve(opts: ServeOptions) -> Result<()> {
    runtime()?.block_on(accept_loop(opts.listen))
}

pub fn call(opts: CallOptions) -> Result<()> {
    let timeout = opts.timeout;
    let (http, status, message) = runtime()?.block_on(async move {
        tokio::time::timeout(timeout, unary(&opts))
            .await
            .unwrap_or_else(|_| bail!("no complete response within {timeout:?}"))
    })?;
    let status = status.map_or_else(|| "none".to_owned(), |s| s.to_string());
    println!(
        "status={status} http={http} message={}",
        String::from_utf8_lossy(&message)
    );
    Ok(())
}

/// A gRPC message: compressed flag 0, big-endian length, payload.
fn frame(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.into()
}

/// The payload of the first message of `body`, if it holds a complete one.
fn unframe(body: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(body.get(1..5)?.try_into().ok()?) as usize;
    body.get(5..5 + len)
}

/// A body of given frames (data, then trailers).
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

async fn accept_loop(listen: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    // The harness waits for this line; stdout is a pipe, hence block-buffered.
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(answer(req).await)
            });
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection from {remote}: {e}");
            }
        });
    }
}

fn status_trailers(status: u32, message: Option<&str>) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if let Some(Ok(value)) = message.map(HeaderValue::from_str) {
        trailers.insert("grpc-message", value);
    }
    trailers
}

async fn answer(req: Request<Incoming>) -> Response<Frames> {
    let grpc = req.method() == Method::POST
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    let path = req.uri().path().to_owned();
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/grpc");
    if !grpc {
        // Trailers-only: the status in the headers, no body.
        response = response.header("grpc-status", UNIMPLEMENTED);
        return response
            .body(Frames(VecDeque::new()))
            .expect("a valid response");
    }
    // Read the request to its end (a unary call: one message), as a server does before
    // answering.
    let _ = req.into_body().collect().await;
    let frames = if path.ends_with("/Fail") {
        VecDeque::from([Frame::trailers(status_trailers(
            NOT_FOUND,
            Some("no such thing"),
        ))])
    } else {
        VecDeque::from([
            Frame::data(frame(format!("ok {path}").as_bytes())),
            Frame::trailers(status_trailers(0, None)),
        ])
    };
    response.body(Frames(frames)).expect("a valid response")
}

/// One unary call; the HTTP status, the grpc-status (trailers, or headers of a trailers-only
/// response; `None` if neither has one) and the response message.
async fn unary(opts: &CallOptions) -> Result<(u16, Option<u32>, Vec<u8>)> {
    let stream = tokio::net::TcpStream::connect(opts.connect)
        .await
        .with_context(|| format!("connect {}", opts.connect))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection: {e}");
        }
    });
    let uri = format!("http://{}{}", opts.authority, opts.path);
    let body = Frames(VecDeque::from([Frame::data(frame(b"hello"))]));
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(body)
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("sending the request")?;
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.context("reading the response")?;
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    let status = match trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
    {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("grpc-status {value:?} is not a number"))?,
        ),
        None => None,
    };
    let message = if parts.status == StatusCode::OK {
        unframe(&bytes).unwrap_or_default().to_vec()
    } else {
        bytes.to_vec()
    };
    Ok((parts.status.as_u16(), status, message))
}
