//! The node's HTTP endpoints: Prometheus metrics (15020) and readiness (15021).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the agent is ready: every configured task set up, not draining.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Binds both endpoints now (so a port clash is a start-up error) and serves them in the
/// background.
pub async fn start(
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> anyhow::Result<()> {
    let metrics_listener = TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} for /metrics"))?;
    let ready_listener = TcpListener::bind(readiness_addr)
        .await
        .with_context(|| format!("cannot listen on {readiness_addr} for readiness"))?;
    tokio::spawn(serve(metrics_listener, move |req| {
        route_metrics(req.method(), req.uri().path(), &metrics)
    }));
    tokio::spawn(serve(ready_listener, move |req| {
        route_readiness(req.method(), req.uri().path(), &readiness)
    }));
    Ok(())
}

async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + Clone + 'static,
{
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = route(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "endpoint connection error");
            }
        });
    }
}

fn route_metrics(method: &Method, path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/metrics") => respond(StatusCode::OK, OPENMETRICS, metrics.encode()),
        _ => not_found(),
    }
}

fn route_readiness(method: &Method, path: &str, readiness: &Readiness) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/healthz/ready") if readiness.get() => {
            respond(StatusCode::OK, "text/plain", "ready\n".into())
        }
        (&Method::GET, "/healthz/ready") => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => not_found(),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("static header"),
    );
    resp
}
