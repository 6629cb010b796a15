//! Raw TCP figures: one bulk stream, new connections per second, idle connections.
//!
//! The sink protocol (`serve --mode sink`), per transfer on a connection: the client sends
//! the transfer's length N as a big-endian u64, then N bytes; the sink reads and discards
//! them and answers with the number of bytes it received, as a big-endian u64. The client's
//! clock stops at that answer, so buffers still in flight in the proxies cannot flatter the
//! figure.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::clock::now_ns;
use crate::http1::{connect, read_exact_patiently};
use crate::stats::{Latency, Tally};
use crate::sys::{block_stop_signals, raise_nofile, wait_for_stop};
use crate::{parse_addr, parse_duration};

/// Bytes of each `write` of a bulk transfer.
const BULK_CHUNK: usize = 256 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(clap::Args)]
pub struct BulkOptions {
    #[arg(long, value_parser = parse_addr)]
    target: SocketAddr,
    /// Bytes to send.
    #[arg(long)]
    bytes: u64,
    /// Longest a connect, read or write may block.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
}

#[derive(clap::Args)]
pub struct ConnectOptions {
    #[arg(long, value_parser = parse_addr)]
    target: SocketAddr,
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Connections being opened at once (closed loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Bytes sent and echoed on each connection.
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
}

#[derive(clap::Args)]
pub struct IdleOptions {
    #[arg(long, value_parser = parse_addr)]
    target: SocketAddr,
    /// Connections to open and hold.
    #[arg(long)]
    count: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Bytes sent and echoed on each connection when it opens (and again at the end).
    #[arg(long, default_value_t = 16)]
    size: usize,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
}

pub fn bulk(opts: BulkOptions) -> Result<Value> {
    let started = now_ns();
    let outcome = transfer(&opts);
    let seconds = (now_ns() - started) as f64 / 1e9;
    let mut report = json!({
        "mode": "bulk",
        "target": opts.target.to_string(),
        "bytes": opts.bytes,
        "seconds": seconds,
    });
    match outcome {
        Ok(()) => {
            report["errors"] = json!(0);
            report["error_samples"] = json!([]);
            report["mib_per_s"] = json!(opts.bytes as f64 / MIB / seconds);
        }
        Err(e) => {
            report["errors"] = json!(1);
            report["error_samples"] = json!([format!("{e:#}")]);
            report["mib_per_s"] = Value::Null;
        }
    }
    Ok(report)
}

fn transfer(opts: &BulkOptions) -> Result<()> {
    let mut stream = connect(opts.target, opts.timeout)?;
    stream.write_all(&opts.bytes.to_be_bytes())?;
    let chunk = vec![0x5au8; BULK_CHUNK];
    let mut left = opts.bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    let mut ack = [0u8; 8];
    read_exact_patiently(&mut stream, &mut ack, opts.timeout)?;
    let received = u64::from_be_bytes(ack);
    ensure!(
        received == opts.bytes,
        "the sink acknowledged {received} bytes of {}",
        opts.bytes
    );
    Ok(())
}

/// Connects, sends `payload`, reads it back from the echo server.
fn open_and_exchange(
    target: SocketAddr,
    timeout: Duration,
    payload: &[u8],
) -> io::Result<TcpStream> {
    let mut stream = connect(target, timeout)?;
    exchange(&mut stream, payload, timeout)?;
    Ok(stream)
}

fn exchange(stream: &mut TcpStream, payload: &[u8], timeout: Duration) -> io::Result<()> {
    stream.write_all(payload)?;
    let mut echoed = vec![0u8; payload.len()];
    read_exact_patiently(stream, &mut echoed, timeout)?;
    if echoed != payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the echo differs from what was sent",
        ));
    }
    Ok(())
}

pub fn connect_rate(opts: ConnectOptions) -> Result<Value> {
    ensure!(opts.concurrency > 0, "--concurrency must be at least 1");
    let payload: Vec<u8> = (0..opts.size).map(|i| b'a' + (i % 26) as u8).collect();
    let start = now_ns();
    let measure_from = start + opts.warmup.as_nanos() as u64;
    let end = measure_from + opts.duration.as_nanos() as u64;
    let results: Vec<(Latency, Tally, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.concurrency)
            .map(|_| {
                let (opts, payload) = (&opts, &payload);
                scope.spawn(move || {
                    let mut latency = Latency::new();
                    let mut tally = Tally::default();
                    let mut outside = 0u64;
                    loop {
                        let began = now_ns();
                        if began >= end {
                            break;
                        }
                        // Dropped at once: the client closes first, as a client does.
                        let outcome = open_and_exchange(opts.target, opts.timeout, payload);
                        let done = now_ns();
                        if began < measure_from || done > end {
                            outside += u64::from(outcome.is_ok());
                            continue;
                        }
                        match outcome {
                            Ok(_) => {
                                tally.ok += 1;
                                latency.record_ns(done - began);
                            }
                            Err(e) => tally.error(e),
                        }
                    }
                    (latency, tally, outside)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut latency = Latency::new();
    let mut tally = Tally::default();
    let mut outside = 0;
    for (l, t, o) in results {
        latency.merge(&l);
        tally.merge(t);
        outside += o;
    }
    let seconds = opts.duration.as_secs_f64();
    Ok(json!({
        "mode": "connect-rate",
        "target": opts.target.to_string(),
        "concurrency": opts.concurrency,
        "duration_s": seconds,
        "connections": tally.ok,
        "warmup_connections": outside,
        "errors": tally.errors,
        "error_samples": tally.samples,
        "connections_per_s": tally.ok as f64 / seconds,
        "latency_us": latency.summary_us(),
    }))
}

pub fn idle(opts: IdleOptions) -> Result<Value> {
    ensure!(opts.parallel > 0, "--parallel must be at least 1");
    // Before any thread exists, so every thread inherits the mask.
    block_stop_signals();
    let nofile = raise_nofile(opts.count as u64 + 256)?;
    let payload: Vec<u8> = (0..opts.size).map(|i| b'A' + (i % 26) as u8).collect();
    let started = now_ns();
    let held: Mutex<Vec<TcpStream>> = Mutex::new(Vec::with_capacity(opts.count));
    let tally = Mutex::new(Tally::default());
    let latency = Mutex::new(Latency::new());
    std::thread::scope(|scope| {
        for worker in 0..opts.parallel {
            let (opts, payload, held, tally, latency) = (&opts, &payload, &held, &tally, &latency);
            scope.spawn(move || {
                let mine = (worker..opts.count).step_by(opts.parallel).count();
                let mut streams = Vec::with_capacity(mine);
                let mut local = Tally::default();
                let mut local_latency = Latency::new();
                for _ in 0..mine {
                    let began = now_ns();
                    match open_and_exchange(opts.target, opts.timeout, payload) {
                        Ok(stream) => {
                            local.ok += 1;
                            local_latency.record_ns(now_ns() - began);
                            streams.push(stream);
                        }
                        Err(e) => local.error(e),
                    }
                }
                lock(held).extend(streams);
                lock(tally).merge(local);
                lock(latency).merge(&local_latency);
            });
        }
    });
    let open_seconds = (now_ns() - started) as f64 / 1e9;
    let mut streams = held.into_inner().unwrap_or_else(|e| e.into_inner());
    let tally = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    let latency = latency.into_inner().unwrap_or_else(|e| e.into_inner());
    crate::emit(&json!({
        "event": "open",
        "open": streams.len(),
        "errors": tally.errors,
        "error_samples": tally.samples,
        "seconds": open_seconds,
    }));
    let held_from = now_ns();
    let stopped_by = wait_for_stop();
    let held_seconds = (now_ns() - held_from) as f64 / 1e9;

    // Every held connection must still carry data: one more exchange each.
    let alive = Mutex::new(0usize);
    let dead = Mutex::new(Tally::default());
    let per_worker = streams.len().div_ceil(opts.parallel).max(1);
    std::thread::scope(|scope| {
        for chunk in streams.chunks_mut(per_worker) {
            let (payload, alive, dead, timeout) = (&payload, &alive, &dead, opts.timeout);
            scope.spawn(move || {
                let mut ok = 0;
                let mut failed = Tally::default();
                for stream in chunk {
                    match exchange(stream, payload, timeout) {
                        Ok(()) => ok += 1,
                        Err(e) => failed.error(e),
                    }
                }
                *lock(alive) += ok;
                lock(dead).merge(failed);
            });
        }
    });
    let dead = dead.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(json!({
        "mode": "idle",
        "target": opts.target.to_string(),
        "count": opts.count,
        "open": streams.len(),
        "errors": tally.errors,
        "error_samples": tally.samples,
        "nofile_limit": nofile,
        "open_seconds": open_seconds,
        "open_latency_us": latency.summary_us(),
        "held_seconds": held_seconds,
        "stopped_by": stopped_by,
        "alive_at_end": alive.into_inner().unwrap_or_else(|e| e.into_inner()),
        "dead_at_end": dead.errors,
        "dead_samples": dead.samples,
    }))
}

/// A poisoned lock only means another worker panicked; its data is still counts.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
