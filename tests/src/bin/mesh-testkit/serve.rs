//! `serve`: accept connections forever, one thread each.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::args::Args;
use crate::pattern::{Pattern, SERVER_SEED};

#[derive(Clone, Copy)]
enum Mode {
    /// Answer any request with `peer=<ip:port>`: the address the server saw the client as.
    Http,
    /// Like `Http`, and the body also has `request=<the request line>`.
    HttpEcho,
    /// Echo full duplex; pass the client's half-close on.
    Echo,
    /// Read to EOF, then send the SHA-256 of what was read and `reply_bytes` pattern bytes.
    HalfClose { reply_bytes: u64 },
}

pub struct Options {
    listen: SocketAddr,
    mode: Mode,
}

impl Options {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        args.only(&["listen", "mode", "reply-bytes"])?;
        let reply_bytes = args.optional::<u64>("reply-bytes")?;
        let mode = match args.required::<String>("mode")?.as_str() {
            "http" => Mode::Http,
            "httpecho" => Mode::HttpEcho,
            "echo" => Mode::Echo,
            "halfclose" => Mode::HalfClose {
                reply_bytes: reply_bytes.unwrap_or(0),
            },
            other => return Err(format!("unknown serve mode {other:?}")),
        };
        if reply_bytes.is_some() && !matches!(mode, Mode::HalfClose { .. }) {
            return Err("--reply-bytes only applies to --mode halfclose".into());
        }
        Ok(Self {
            listen: args.required("listen")?,
            mode,
        })
    }
}

pub fn run(opts: Options) -> Result<()> {
    let listener =
        TcpListener::bind(opts.listen).with_context(|| format!("bind {}", opts.listen))?;
    // The harness waits for this line before it starts clients, so print it only once the
    // socket is listening, and flush: stdout is a pipe, hence block-buffered.
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let mode = opts.mode;
        thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Err(e) = handle(stream, mode) {
                eprintln!("connection from {peer}: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(stream: TcpStream, mode: Mode) -> Result<()> {
    match mode {
        Mode::Http => http(stream, false),
        Mode::HttpEcho => http(stream, true),
        Mode::Echo => echo(stream),
        Mode::HalfClose { reply_bytes } => half_close(stream, reply_bytes),
    }
}

fn http(mut stream: TcpStream, echo_request: bool) -> Result<()> {
    // Read the request head (or whatever arrives before EOF); its content does not matter.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let mut body = format!("peer={}\n", stream.peer_addr()?);
    if echo_request {
        let head = String::from_utf8_lossy(&head);
        body += &format!("request={}\n", head.lines().next().unwrap_or_default());
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

fn echo(mut stream: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // Pass the half-close on: the client reads to EOF to know it got everything.
            stream.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn half_close(mut stream: TcpStream, reply_bytes: u64) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    stream.write_all(&hasher.finalize())?;
    let mut pattern = Pattern::new(SERVER_SEED);
    let mut left = reply_bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}
