//! `client`: drive one of the server modes and verify every byte that comes back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::args::Args;
use crate::ends;
use crate::pattern::{CLIENT_SEED, Pattern, SERVER_SEED};

const CHUNK: usize = 64 * 1024;

enum Mode {
    HalfClose {
        send: u64,
        expect: u64,
    },
    Echo {
        send: u64,
    },
    Concurrent {
        connections: usize,
        send: u64,
    },
    Hold {
        seconds: u64,
    },
    /// Waits for a server-speaks-first greeting (`--mode greet`), then one echo.
    Greeting,
    /// Sends `send` pattern bytes, then resets the connection.
    Abort {
        send: u64,
    },
    /// Sends `send` pattern bytes, then reads the server's to their end: how many came, and
    /// whether they ended in a FIN or a reset.
    UntilEnd {
        send: u64,
    },
    /// Like `UntilEnd`, but keeps sending (without end) while it reads, as an upload that the
    /// server answers early: sending stops when the connection fails. (If the connection is
    /// reset, the write may be the call that reports it, and the read then ends as `eof`.)
    Upload,
    Load(Load),
}

/// `--mode load`: requests in a loop until the stop file exists.
struct Load {
    stop_file: PathBuf,
    /// Workers that each open a new connection per request (one echo of `send` bytes).
    workers: usize,
    /// Connections held open for the whole run, one echoed message per request.
    long_lived: usize,
    send: u64,
    /// Pause between two requests of one worker.
    interval: Duration,
}

pub struct Options {
    connect: SocketAddr,
    timeout: Duration,
    mode: Mode,
    /// `--io poll`: non-blocking sockets, waiting in poll(2) as event-loop programs do,
    /// instead of blocking reads and writes (`--io blocking`, the default).
    poll_io: bool,
}

/// With `--io poll`, how long one wait in poll(2) may last (the `--timeout`).
static POLL_IO: OnceLock<Duration> = OnceLock::new();

impl Options {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        let mode = args.required::<String>("mode")?;
        let (known, mode): (&[&str], Mode) = match mode.as_str() {
            "halfclose" => (
                &["send-bytes", "expect-bytes"],
                Mode::HalfClose {
                    send: args.required("send-bytes")?,
                    expect: args.required("expect-bytes")?,
                },
            ),
            "echo" => (
                &["send-bytes"],
                Mode::Echo {
                    send: args.required("send-bytes")?,
                },
            ),
            "concurrent" => (
                &["connections", "send-bytes"],
                Mode::Concurrent {
                    connections: args.required("connections")?,
                    send: args.required("send-bytes")?,
                },
            ),
            "hold" => (
                &["seconds"],
                Mode::Hold {
                    seconds: args.required("seconds")?,
                },
            ),
            "greeting" => (&[], Mode::Greeting),
            "abort" => (
                &["send-bytes"],
                Mode::Abort {
                    send: args.required("send-bytes")?,
                },
            ),
            "until-end" => (
                &["send-bytes"],
                Mode::UntilEnd {
                    send: args.required("send-bytes")?,
                },
            ),
            "upload" => (&[], Mode::Upload),
            "load" => (
                &[
                    "stop-file",
                    "workers",
                    "long-lived",
                    "send-bytes",
                    "interval-ms",
                ],
                Mode::Load(Load {
                    stop_file: args.required("stop-file")?,
                    workers: args.optional("workers")?.unwrap_or(2),
                    long_lived: args.optional("long-lived")?.unwrap_or(1),
                    send: args.optional("send-bytes")?.unwrap_or(1024),
                    interval: Duration::from_millis(args.optional("interval-ms")?.unwrap_or(20)),
                }),
            ),
            other => return Err(format!("unknown client mode {other:?}")),
        };
        let mut all = vec!["connect", "mode", "timeout", "io"];
        all.extend_from_slice(known);
        args.only(&all)?;
        let timeout = Duration::from_secs(args.optional("timeout")?.unwrap_or(30));
        let poll_io = match args.optional::<String>("io")?.as_deref() {
            None | Some("blocking") => false,
            Some("poll") => true,
            Some(other) => return Err(format!("--io {other:?}: expected blocking or poll")),
        };
        Ok(Self {
            connect: args.required("connect")?,
            timeout,
            mode,
            poll_io,
        })
    }
}

pub fn run(opts: Options) -> Result<()> {
    let started = Instant::now();
    if opts.poll_io {
        let _ = POLL_IO.set(opts.timeout);
    }
    let summary = match opts.mode {
        Mode::HalfClose { send, expect } => {
            let (stream, addrs) = connect(&opts)?;
            half_close(stream, send, expect)?;
            format!("sent={send} received={expect} {addrs}")
        }
        Mode::Echo { send } => {
            let (stream, addrs) = connect(&opts)?;
            echo(stream, send)?;
            format!("sent={send} received={send} {addrs}")
        }
        Mode::Concurrent { connections, send } => {
            concurrent(&opts, connections, send)?;
            format!("connections={connections} sent={send} each")
        }
        Mode::Hold { seconds } => {
            let (stream, addrs) = connect(&opts)?;
            let messages = hold(stream, Duration::from_secs(seconds))?;
            format!("messages={messages} {addrs}")
        }
        Mode::Greeting => {
            let (stream, addrs) = connect(&opts)?;
            greeting(stream, started)? + " " + &addrs
        }
        Mode::Abort { send } => {
            let (mut stream, addrs) = connect(&opts)?;
            write_pattern(&mut stream, send)?;
            ends::reset(stream)?;
            format!("sent={send} then reset {addrs}")
        }
        Mode::UntilEnd { send } => {
            let (mut stream, addrs) = connect(&opts)?;
            write_pattern(&mut stream, send)?;
            let (got, end) = ends::read_until_end(&mut stream, Pattern::new(SERVER_SEED))?;
            format!("sent={send} received={got} ended={} {addrs}", end.name())
        }
        Mode::Upload => {
            let (mut stream, addrs) = connect(&opts)?;
            let mut writer = stream.try_clone()?;
            let uploader = thread::spawn(move || {
                let mut pattern = Pattern::new(CLIENT_SEED);
                let mut buf = vec![0u8; CHUNK];
                let mut sent = 0u64;
                loop {
                    pattern.fill(&mut buf);
                    if write_all(&mut writer, &buf).is_err() {
                        return sent;
                    }
                    sent += buf.len() as u64;
                }
            });
            let (got, end) = ends::read_until_end(&mut stream, Pattern::new(SERVER_SEED))?;
            // A write blocked on a full window fails once the connection does.
            let _ = stream.shutdown(Shutdown::Both);
            let sent = uploader.join().unwrap_or(0);
            format!("sent={sent} received={got} ended={} {addrs}", end.name())
        }
        Mode::Load(ref load) => load_run(&opts, load)?,
    };
    println!("ok {summary} elapsed_ms={}", started.elapsed().as_millis());
    Ok(())
}

/// Connects with `--timeout` bounding the connect and every later read and write.
/// Also returns `local=.. peer=..` as the client saw them, for the summary line.
fn connect(opts: &Options) -> Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&opts.connect, opts.timeout)
        .with_context(|| format!("connect {}", opts.connect))?;
    stream.set_read_timeout(Some(opts.timeout))?;
    stream.set_write_timeout(Some(opts.timeout))?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(POLL_IO.get().is_some())?;
    let addrs = format!(
        "local={} peer={}",
        stream.local_addr()?,
        stream.peer_addr()?
    );
    Ok((stream, addrs))
}

/// Sends `len` bytes of the client's pattern, then shuts the write side down.
fn send_pattern(stream: &mut TcpStream, len: u64, digest: Option<&mut Sha256>) -> Result<()> {
    write_pattern_hashed(stream, len, digest)?;
    stream.shutdown(Shutdown::Write).context("shutdown(write)")
}

/// Sends `len` bytes of the client's pattern and keeps the connection open.
fn write_pattern(stream: &mut TcpStream, len: u64) -> Result<()> {
    write_pattern_hashed(stream, len, None)
}

fn write_pattern_hashed(
    stream: &mut TcpStream,
    len: u64,
    mut digest: Option<&mut Sha256>,
) -> Result<()> {
    let mut pattern = Pattern::new(CLIENT_SEED);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        if let Some(d) = digest.as_deref_mut() {
            d.update(&buf[..n]);
        }
        write_all(stream, &buf[..n])
            .with_context(|| format!("write after {} of {len} bytes", len - left))?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads to EOF, checking the bytes against `pattern`; fails unless exactly `len` arrive.
fn expect_pattern(
    stream: &mut TcpStream,
    mut pattern: Pattern,
    len: u64,
    what: &str,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut scratch = Vec::with_capacity(CHUNK);
    let mut got = 0u64;
    loop {
        let n = read_some(stream, &mut buf)
            .with_context(|| format!("{what}: read after {got} of {len} bytes"))?;
        if n == 0 {
            break;
        }
        ensure!(
            got + n as u64 <= len,
            "{what}: more than the expected {len} bytes arrived"
        );
        if let Err(i) = pattern.verify(&buf[..n], &mut scratch) {
            bail!("{what}: byte {} differs from what was sent", got + i as u64);
        }
        got += n as u64;
    }
    ensure!(got == len, "{what}: EOF after {got} of {len} bytes");
    Ok(())
}

fn half_close(mut stream: TcpStream, send: u64, expect: u64) -> Result<()> {
    let mut digest = Sha256::new();
    send_pattern(&mut stream, send, Some(&mut digest))?;
    let mut theirs = [0u8; 32];
    read_exact(&mut stream, &mut theirs).context("read the server's digest")?;
    ensure!(
        theirs[..] == digest.finalize()[..],
        "the server's SHA-256 of the {send} bytes it received differs from what was sent"
    );
    expect_pattern(&mut stream, Pattern::new(SERVER_SEED), expect, "reply")
}

fn echo(mut stream: TcpStream, send: u64) -> Result<()> {
    // Write and read at the same time: a proxy that only moves one direction at a time,
    // or stops reading while its write blocks, deadlocks here and hits the timeout.
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || send_pattern(&mut writer, send, None));
    let read = expect_pattern(&mut stream, Pattern::new(CLIENT_SEED), send, "echo");
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
    // A write error usually explains a read error, so report it first.
    sent.and(read)
}

fn concurrent(opts: &Options, connections: usize, send: u64) -> Result<()> {
    ensure!(connections > 0, "--connections must be positive");
    // All connections are opened before any sends, so the far side really holds
    // `connections` at once. Every thread reaches the barrier, even one whose connect
    // failed, so a failure cannot leave the others waiting forever.
    let barrier = Arc::new(Barrier::new(connections));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let barrier = barrier.clone();
            let connected = connect(opts);
            thread::spawn(move || {
                barrier.wait();
                let (stream, _) = connected?;
                echo(stream, send)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (i, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("connection {i}: {e:#}")),
            Err(_) => failures.push(format!("connection {i}: thread panicked")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {connections} connections failed; first: {}",
            failures.len(),
            failures[0]
        );
    }
    Ok(())
}

fn hold(mut stream: TcpStream, duration: Duration) -> Result<u64> {
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        // Fixed width, so every echo has a known length.
        let message = format!("hold {sent:012}\n");
        write_all(&mut stream, message.as_bytes())
            .with_context(|| format!("write message {sent}"))?;
        let mut echoed = vec![0u8; message.len()];
        read_exact(&mut stream, &mut echoed).with_context(|| {
            format!(
                "message {sent} not echoed ({:?} into the hold)",
                started.elapsed()
            )
        })?;
        ensure!(
            echoed == message.as_bytes(),
            "message {sent} came back altered"
        );
        sent += 1;
        thread::sleep(Duration::from_millis(100));
    }
    stream.shutdown(Shutdown::Write)?;
    let rest = read_to_end(&mut stream).context("read to EOF after the hold")?;
    ensure!(
        rest.is_empty(),
        "{} unexpected bytes after the last echo",
        rest.len()
    );
    Ok(sent)
}

/// Counts of a load run, shared by its workers.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    started: Option<Instant>,
}

impl Tally {
    fn success(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed request and reports it on stdout at once (the harness reads it).
    fn failure(&self, what: &str, error: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let at = self.started.map(|s| s.elapsed().as_millis()).unwrap_or(0);
        print_line(&format!("failure t_ms={at} {what}: {error:#}"));
    }

    fn line(&self) -> String {
        format!(
            "ok={} failed={}",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// One line on stdout, flushed (stdout is a pipe, hence block-buffered); lines of
/// different threads never interleave.
fn print_line(line: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs requests until `load.stop_file` exists; prints `progress ok=N failed=M` every
/// 250 ms and one `failure ...` line per failed request. Fails if any request failed.
fn load_run(opts: &Options, load: &Load) -> Result<String> {
    let tally = Arc::new(Tally {
        started: Some(Instant::now()),
        ..Tally::default()
    });
    let stop = || load.stop_file.exists();
    thread::scope(|scope| {
        for worker in 0..load.workers {
            let tally = &tally;
            scope.spawn(move || {
                let mut request = 0u64;
                while !stop() {
                    match connect(opts).and_then(|(stream, _)| echo(stream, load.send)) {
                        Ok(()) => tally.success(),
                        Err(e) => tally.failure(&format!("worker {worker} request {request}"), &e),
                    }
                    request += 1;
                    thread::sleep(load.interval);
                }
            });
        }
        for held in 0..load.long_lived {
            let tally = &tally;
            scope.spawn(move || long_lived(opts, held, tally, &stop));
        }
        scope.spawn(|| {
            while !stop() {
                print_line(&format!("progress {}", tally.line()));
                thread::sleep(Duration::from_millis(250));
            }
        });
    });
    let summary = tally.line();
    print_line(&format!("progress {summary}"));
    let failed = tally.failed.load(Ordering::Relaxed);
    ensure!(failed == 0, "{failed} requests failed ({summary})");
    Ok(format!("load {summary}"))
}

/// One connection held for the whole run: a fixed-width message echoed every 100 ms is
/// one request. After a failure the connection is replaced.
fn long_lived(opts: &Options, held: usize, tally: &Tally, stop: &dyn Fn() -> bool) {
    let what = |n: u64| format!("long-lived {held} message {n}");
    let mut sent = 0u64;
    while !stop() {
        let mut stream = match connect(opts) {
            Ok((stream, _)) => stream,
            Err(e) => {
                tally.failure(&what(sent), &e);
                sent += 1;
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let outcome = (|| -> Result<()> {
            while !stop() {
                let message = format!("load {held:04} {sent:012}\n");
                write_all(&mut stream, message.as_bytes())?;
                let mut echoed = vec![0u8; message.len()];
                read_exact(&mut stream, &mut echoed)?;
                ensure!(echoed == message.as_bytes(), "came back altered");
                tally.success();
                sent += 1;
                thread::sleep(Duration::from_millis(100));
            }
            // A clean end: our FIN through, the echo server's FIN back, nothing else.
            stream.shutdown(Shutdown::Write)?;
            let rest = read_to_end(&mut stream)?;
            ensure!(
                rest.is_empty(),
                "{} unexpected bytes at the end",
                rest.len()
            );
            Ok(())
        })();
        if let Err(e) = outcome {
            tally.failure(&what(sent), &e);
            sent += 1;
        }
    }
}

/// `read`, but a timeout reads as a clear error rather than `WouldBlock`.
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock && POLL_IO.get().is_some() => {
                wait_for(stream, libc::POLLIN, "data")?
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("timed out waiting for data")
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Everything up to EOF.
fn read_to_end(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            return Ok(rest);
        }
        rest.extend_from_slice(&buf[..n]);
    }
}

/// `write_all`, waiting in poll(2) for room with `--io poll`.
fn write_all(stream: &mut TcpStream, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => bail!("the connection accepts no more bytes"),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock && POLL_IO.get().is_some() => {
                wait_for(stream, libc::POLLOUT, "room to write")?
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("timed out waiting for room to write")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One poll(2) for `events` on the socket, bounded by `--timeout`.
fn wait_for(stream: &TcpStream, events: libc::c_short, what: &str) -> Result<()> {
    let timeout = POLL_IO.get().copied().unwrap_or_default();
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the timeout is clamped to the int range.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    match n {
        0 => bail!("timed out waiting for {what}"),
        n if n < 0 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e.into())
            }
        }
        _ => Ok(()),
    }
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = read_some(stream, &mut buf[filled..])?;
        ensure!(n > 0, "EOF after {filled} of {} bytes", buf.len());
        filled += n;
    }
    Ok(())
}

/// Says nothing until the server's greeting line has arrived (as a MySQL client waits for the
/// handshake), then checks one echo. Reports the greeting and how long it took from the start
/// of the connect: `greeting="220 ..." greeting_ms=<ms>`.
fn greeting(mut stream: TcpStream, started: Instant) -> Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        ensure!(line.len() < 256, "no greeting line: {line:?}");
        let n = read_some(&mut stream, &mut byte).context("reading the greeting")?;
        ensure!(
            n == 1,
            "connection closed before the greeting ended: {line:?}"
        );
        line.push(byte[0]);
    }
    let greeting_ms = started.elapsed().as_secs_f64() * 1000.0;
    write_all(&mut stream, b"ping\n")?;
    let mut echoed = [0u8; 5];
    read_exact(&mut stream, &mut echoed).context("reading the echo")?;
    ensure!(&echoed == b"ping\n", "echo: {echoed:?}");
    let text = String::from_utf8_lossy(&line);
    Ok(format!(
        "greeting={:?} greeting_ms={greeting_ms:.1}",
        text.trim_end()
    ))
}
