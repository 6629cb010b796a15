//! A minimal HTTP/1.x GET over std sockets, run from inside a network namespace, so the
//! harness itself needs no curl and no HTTP crate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` on `addr` from inside the network namespace at `netns`; every step is
/// bounded by `timeout`.
pub fn get(netns: &Path, addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    netns::run_in(netns, || get_here(addr, path, timeout))?
        .with_context(|| format!("GET http://{addr}{path} in {}", netns.display()))
}

fn get_here(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // HTTP/1.0: the server closes after the response and does not use chunked encoding,
    // so the body is simply everything up to EOF.
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Response> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no complete HTTP response head in {} bytes", raw.len());
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let r = parse(b"HTTP/1.0 503 Service Unavailable\r\nA: b\r\n\r\nnot ready\n").unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "not ready\n");
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
