//! The servers: HTTP/1.1 keep-alive (hyper) answering every request with a fixed body, a
//! byte sink for bulk transfers (protocol in `stream.rs`), and a full-duplex echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::parse_addr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Http,
    Sink,
    Echo,
}

#[derive(clap::Args)]
pub struct Options {
    #[arg(long, value_parser = parse_addr)]
    listen: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// HTTP: response body size, bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    errors: AtomicU64,
}

pub fn run(opts: Options) -> Result<Value> {
    crate::sys::raise_nofile(65_536).or_else(|_| crate::sys::raise_nofile(4096))?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads.max(1))
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(serve(opts))
}

async fn serve(opts: Options) -> Result<Value> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("bind {}", opts.listen))?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    crate::emit(&json!({
        "listening": listener.local_addr()?.to_string(),
        "mode": format!("{:?}", opts.mode).to_lowercase(),
    }));
    let counters = Arc::new(Counters::default());
    let body = Bytes::from(vec![b'y'; opts.size]);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: counted, and the loop goes on after a breath.
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let counters = counters.clone();
        let body = body.clone();
        let mode = opts.mode;
        tokio::spawn(async move {
            let outcome = match mode {
                Mode::Http => http(stream, body, &counters).await,
                Mode::Sink => sink(stream, &counters).await,
                Mode::Echo => echo(stream, &counters).await,
            };
            if outcome.is_err() {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    Ok(json!({
        "mode": format!("{:?}", opts.mode).to_lowercase(),
        "listen": opts.listen.to_string(),
        "connections": counters.connections.load(Ordering::Relaxed),
        "requests": counters.requests.load(Ordering::Relaxed),
        "bytes_in": counters.bytes_in.load(Ordering::Relaxed),
        "errors": counters.errors.load(Ordering::Relaxed),
    }))
}

async fn http(stream: TcpStream, body: Bytes, counters: &Arc<Counters>) -> Result<()> {
    let counters = counters.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let body = body.clone();
        let counters = counters.clone();
        async move {
            // A request whose body breaks off still gets an answer; hyper then sees the
            // broken connection itself.
            if let Ok(collected) = request.into_body().collect().await {
                let n = collected.to_bytes().len() as u64;
                counters.bytes_in.fetch_add(n, Ordering::Relaxed);
            }
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(Full::new(body));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok::<_, Infallible>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}

/// Transfers until the client closes: length, bytes, acknowledgement (see `stream.rs`).
async fn sink(mut stream: TcpStream, counters: &Counters) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut header = [0u8; 8];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let expected = u64::from_be_bytes(header);
        let mut received = 0u64;
        while received < expected {
            let want = (expected - received).min(buf.len() as u64) as usize;
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
            counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
        stream.write_all(&received.to_be_bytes()).await?;
        if received < expected {
            return Ok(());
        }
    }
}

async fn echo(mut stream: TcpStream, counters: &Counters) -> Result<()> {
    let (mut reader, mut writer) = stream.split();
    let n = tokio::io::copy(&mut reader, &mut writer).await?;
    counters.bytes_in.fetch_add(n, Ordering::Relaxed);
    writer.shutdown().await?;
    Ok(())
}
