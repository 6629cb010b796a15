//! A plain TCP relay: the cheapest user-space proxy there is, for the benchmark's floor.
//!
//! A pair of these (one in the client's task, one in the server's) carries a connection the
//! way two proxies do, with nothing else: no TLS, no framing, no policy, no metrics. One
//! thread runs an event loop (tokio's current-thread runtime); each connection is accepted,
//! dialled onward and copied both ways, so a request costs each relay a wake-up, a `read` and
//! a `write` per direction, which any pair of user-space proxies pays too. What a pair of
//! relays adds to the direct figures is therefore what the hand-over between processes costs
//! on this machine, the part of the mesh's (and stunnel's) added cost that no proxy code can
//! remove. (A blocking thread per direction was tried as well: the same latency and CPU per
//! request within the spread, and two thread starts per new connection.)

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::parse_addr;

/// As large as one of the agent's splice reads.
const BUFFER: usize = 32 * 1024;

#[derive(clap::Args)]
pub struct Options {
    /// `LISTEN=TO`: accept on LISTEN, relay every connection to TO. Repeatable.
    #[arg(long = "route", value_parser = parse_route, required = true)]
    routes: Vec<(SocketAddr, SocketAddr)>,
}

fn parse_route(text: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, to) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not LISTEN=TO"))?;
    Ok((parse_addr(listen)?, parse_addr(to)?))
}

/// Relays until killed (errors go to stderr, which the benchmark keeps as a log); prints
/// `{"listening": [LISTEN=TO, ...]}` once every route's socket listens.
pub fn run(opts: Options) -> Result<Value> {
    crate::sys::raise_nofile(65_536).or_else(|_| crate::sys::raise_nofile(4096))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(relay_routes(opts.routes))
}

async fn relay_routes(routes: Vec<(SocketAddr, SocketAddr)>) -> Result<Value> {
    let mut listening = Vec::new();
    let mut acceptors = Vec::new();
    for (listen, to) in routes {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind {listen}"))?;
        listening.push(format!("{}={to}", listener.local_addr()?));
        acceptors.push((listener, to));
    }
    crate::emit(&json!({ "listening": listening, "mode": "relay" }));
    let acceptors: Vec<_> = acceptors
        .into_iter()
        .map(|(listener, to)| tokio::spawn(accept_loop(listener, to)))
        .collect();
    for acceptor in acceptors {
        let _ = acceptor.await;
    }
    bail!("every route's listener stopped accepting")
}

async fn accept_loop(listener: TcpListener, to: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = relay(client, to).await {
                        eprintln!("relay to {to}: {e}");
                    }
                });
            }
            Err(e) => {
                // EMFILE and the like: the next accept may succeed.
                eprintln!("accept for {to}: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Carries one connection until both directions have ended; a half-close is passed on as a
/// half-close.
async fn relay(mut client: TcpStream, to: SocketAddr) -> io::Result<()> {
    let mut server = TcpStream::connect(to).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUFFER, BUFFER).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_routes() {
        let (listen, to) = parse_route("127.0.0.1:28080=198.18.2.9:10080").unwrap();
        assert_eq!(listen, "127.0.0.1:28080".parse().unwrap());
        assert_eq!(to, "198.18.2.9:10080".parse().unwrap());
        assert!(parse_route("127.0.0.1:28080").is_err());
        assert!(parse_route("127.0.0.1:28080=nowhere").is_err());
    }

    /// A request, its half-close, and the answer after it cross the relay whole: what the
    /// benchmark's bulk transfer (the sink answers after the sender's FIN) relies on.
    #[tokio::test]
    async fn relays_both_ways_and_passes_the_half_close_on() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let relay_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay_listener.local_addr().unwrap();
        tokio::spawn(accept_loop(relay_listener, server_addr));
        let answering = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut request = Vec::new();
            s.read_to_end(&mut request).await.unwrap();
            let answer = format!("got {} bytes", request.len());
            s.write_all(answer.as_bytes()).await.unwrap();
        });
        let mut client = TcpStream::connect(relay_addr).await.unwrap();
        let request = vec![7u8; 3 * BUFFER + 5];
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, format!("got {} bytes", request.len()));
        answering.await.unwrap();
    }
}
