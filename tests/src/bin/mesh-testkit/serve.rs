//! `serve`: accept connections forever, one thread each.
//!
//! HTTP modes answer one request per connection (`Connection: close`). `flaky` answers 503 to
//! `--fail-percent` percent of the requests, deterministically (50: every second request, the
//! 2nd, 4th...; 100: all), and 200 `peer=...` to the others; a request for `/count` is not
//! counted and is answered 200 with the number of other requests received so far. `slow`
//! waits `--delay-ms` before answering like `http`, except requests whose path starts with
//! `/fast`, answered at once. `greet` speaks first (a greeting line), then echoes. `abort`
//! waits for the client's first bytes, sends `--reply-bytes` pattern bytes and resets the
//! connection; `watch` reads the client's pattern bytes to their end and reports on stderr
//! how they ended: `ended after N bytes: eof|reset`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::args::Args;
use crate::ends;
use crate::pattern::{CLIENT_SEED, Pattern, SERVER_SEED};

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
    /// HTTP: 503 to `fail_percent`% of the requests (deterministic), `/count` reports how many
    /// requests (other than `/count`) arrived.
    Flaky { fail_percent: u64 },
    /// HTTP: like `Http` after `delay`, except paths starting with `/fast`.
    Slow { delay: Duration },
    /// Server speaks first, as MySQL or SMTP: `220 <local ip:port> ready\r\n` at once, then
    /// echo.
    Greet,
    /// After the client's first bytes, send `reply_bytes` pattern bytes and reset.
    Abort { reply_bytes: u64 },
    /// Read the client's pattern bytes to their end; report how they ended.
    Watch,
}

pub struct Options {
    listen: SocketAddr,
    mode: Mode,
}

impl Options {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        args.only(&["listen", "mode", "reply-bytes", "fail-percent", "delay-ms"])?;
        let reply_bytes = args.optional::<u64>("reply-bytes")?;
        let fail_percent = args.optional::<u64>("fail-percent")?;
        let delay_ms = args.optional::<u64>("delay-ms")?;
        let mode = match args.required::<String>("mode")?.as_str() {
            "http" => Mode::Http,
            "httpecho" => Mode::HttpEcho,
            "echo" => Mode::Echo,
            "greet" => Mode::Greet,
            "halfclose" => Mode::HalfClose {
                reply_bytes: reply_bytes.unwrap_or(0),
            },
            "abort" => Mode::Abort {
                reply_bytes: reply_bytes.unwrap_or(0),
            },
            "watch" => Mode::Watch,
            "flaky" => {
                let fail_percent = fail_percent.ok_or("--mode flaky needs --fail-percent")?;
                if fail_percent > 100 {
                    return Err("--fail-percent is 0 to 100".into());
                }
                Mode::Flaky { fail_percent }
            }
            "slow" => Mode::Slow {
                delay: Duration::from_millis(delay_ms.ok_or("--mode slow needs --delay-ms")?),
            },
            other => return Err(format!("unknown serve mode {other:?}")),
        };
        if fail_percent.is_some() && !matches!(mode, Mode::Flaky { .. }) {
            return Err("--fail-percent only applies to --mode flaky".into());
        }
        if delay_ms.is_some() && !matches!(mode, Mode::Slow { .. }) {
            return Err("--delay-ms only applies to --mode slow".into());
        }
        if reply_bytes.is_some() && !matches!(mode, Mode::HalfClose { .. } | Mode::Abort { .. }) {
            return Err("--reply-bytes only applies to --mode halfclose and abort".into());
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
    let counter = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let mode = opts.mode;
        let counter = counter.clone();
        thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Err(e) = handle(stream, mode, &counter) {
                eprintln!("connection from {peer}: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(stream: TcpStream, mode: Mode, counter: &AtomicU64) -> Result<()> {
    match mode {
        Mode::Http => http(stream, false),
        Mode::HttpEcho => http(stream, true),
        Mode::Flaky { fail_percent } => flaky(stream, fail_percent, counter),
        Mode::Slow { delay } => slow(stream, delay),
        Mode::Echo => echo(stream),
        Mode::Greet => {
            let mut stream = stream;
            let me = stream.local_addr()?;
            stream.write_all(format!("220 {me} ready\r\n").as_bytes())?;
            echo(stream)
        }
        Mode::HalfClose { reply_bytes } => half_close(stream, reply_bytes),
        Mode::Abort { reply_bytes } => abort(stream, reply_bytes),
        Mode::Watch => {
            let mut stream = stream;
            let (got, end) = ends::read_until_end(&mut stream, Pattern::new(CLIENT_SEED))?;
            eprintln!("ended after {got} bytes: {}", end.name());
            Ok(())
        }
    }
}

fn abort(mut stream: TcpStream, reply_bytes: u64) -> Result<()> {
    let mut first = [0u8; 1024];
    stream
        .read(&mut first)
        .context("read the client's first bytes")?;
    write_pattern(&mut stream, reply_bytes)?;
    ends::reset(stream)
}

/// Reads the request head (or whatever arrives before EOF).
fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The path of the request line (`GET /x HTTP/1.1`), empty if there is none.
fn request_path(head: &[u8]) -> String {
    let head = String::from_utf8_lossy(head);
    let line = head.lines().next().unwrap_or_default();
    line.split(' ').nth(1).unwrap_or_default().to_owned()
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

fn flaky(mut stream: TcpStream, fail_percent: u64, counter: &AtomicU64) -> Result<()> {
    let head = read_head(&mut stream)?;
    if request_path(&head) == "/count" {
        let n = counter.load(Ordering::SeqCst);
        return respond(&mut stream, "200 OK", &format!("count={n}\n"));
    }
    // Request number i (0-based) fails when floor((i + 1) p / 100) > floor(i p / 100): exactly
    // p of every 100 consecutive requests, spread evenly (50: the 2nd, 4th, ...).
    let i = counter.fetch_add(1, Ordering::SeqCst);
    if (i + 1) * fail_percent / 100 > i * fail_percent / 100 {
        respond(&mut stream, "503 Service Unavailable", "flaky failure\n")
    } else {
        let body = format!("peer={}\n", stream.peer_addr()?);
        respond(&mut stream, "200 OK", &body)
    }
}

fn slow(mut stream: TcpStream, delay: Duration) -> Result<()> {
    let head = read_head(&mut stream)?;
    if !request_path(&head).starts_with("/fast") {
        thread::sleep(delay);
    }
    let body = format!("peer={}\n", stream.peer_addr()?);
    respond(&mut stream, "200 OK", &body)
}

fn http(mut stream: TcpStream, echo_request: bool) -> Result<()> {
    // Read the request head (or whatever arrives before EOF); its content does not matter.
    let head = read_head(&mut stream)?;
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
    write_pattern(&mut stream, reply_bytes)?;
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

/// Sends `len` bytes of the server's pattern.
fn write_pattern(stream: &mut TcpStream, len: u64) -> Result<()> {
    let mut pattern = Pattern::new(SERVER_SEED);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}
