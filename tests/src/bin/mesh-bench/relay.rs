//! A plain TCP relay: the cheapest user-space proxy there is, for the benchmark's floor.
//!
//! A pair of these (one in the client's task, one in the server's) carries a connection the
//! way two proxies do, with nothing else: no TLS, no framing, no event loop. Each direction
//! of each connection is one thread doing a blocking `read` then `write` of whatever arrived,
//! so a request costs each relay one `read` and one `write` per direction and the thread
//! wake-ups that any pair of user-space proxies makes. What a pair of relays adds to the
//! direct figures is therefore what the hand-over between processes costs on this machine,
//! the part of the mesh's (and stunnel's) added latency no proxy code can remove.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::parse_addr;

/// As large as one of the agent's splice reads.
const BUFFER: usize = 32 * 1024;
/// Each relaying thread needs its buffer (on the heap) and a few frames.
const STACK: usize = 64 * 1024;

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
/// `{"listening": [ADDR, ...]}` once every route's socket listens.
pub fn run(opts: Options) -> Result<Value> {
    crate::sys::raise_nofile(65_536).or_else(|_| crate::sys::raise_nofile(4096))?;
    let mut listeners = Vec::new();
    for (listen, to) in opts.routes {
        let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
        listeners.push((listener, to));
    }
    let listening: Vec<String> = listeners
        .iter()
        .map(|(l, to)| Ok(format!("{}={to}", l.local_addr()?)))
        .collect::<io::Result<_>>()?;
    crate::emit(&json!({ "listening": listening, "mode": "relay" }));
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|(listener, to)| thread::spawn(move || accept_loop(listener, to)))
        .collect();
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    bail!("every route's listener stopped accepting")
}

fn accept_loop(listener: TcpListener, to: SocketAddr) {
    for accepted in listener.incoming() {
        let client = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: the next accept may succeed.
                eprintln!("accept for {to}: {e}");
                thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let spawned = thread::Builder::new().stack_size(STACK).spawn(move || {
            if let Err(e) = relay(client, to) {
                eprintln!("relay to {to}: {e}");
            }
        });
        if let Err(e) = spawned {
            eprintln!("cannot start a relay thread: {e}");
        }
    }
}

/// Carries one connection: this thread takes the server's direction, a second one the
/// client's. Returns once both directions have ended.
fn relay(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    let server = TcpStream::connect(to)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_in, server_out) = (client.try_clone()?, server.try_clone()?);
    let upstream = thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || pump(client_in, server_out))?;
    let down = pump(server, client);
    let up = upstream
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked")));
    down.and(up)
}

/// Copies `from` to `to` until `from` ends, then passes the end on as a FIN. On a failure
/// both sockets are shut down, so the other direction's thread ends too.
fn pump(mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER];
    let copied = loop {
        match from.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = to.write_all(&buffer[..n]) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match copied {
        Ok(()) => to.shutdown(Shutdown::Write),
        Err(e) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    #[test]
    fn relays_both_ways_and_passes_the_half_close_on() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = server.local_addr().unwrap();
        let relay_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay_listener.local_addr().unwrap();
        thread::spawn(move || accept_loop(relay_listener, server_addr));
        let answering = thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut request = Vec::new();
            s.read_to_end(&mut request).unwrap();
            s.write_all(format!("got {} bytes", request.len()).as_bytes())
                .unwrap();
        });
        let mut client = TcpStream::connect(relay_addr).unwrap();
        let request = vec![7u8; 3 * BUFFER + 5];
        client.write_all(&request).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("got {} bytes", request.len()));
        answering.join().unwrap();
    }
}
