//! HTTP/1.1 request load: open loop at a constant rate (`rate`) and closed loop (`max`).
//!
//! `rate` is open loop and free of coordinated omission: request k has an intended send
//! time `start + k / rate`, fixed before the run, and its latency is measured from that time
//! to the last byte of its response. A thread takes the next ticket only when its connection
//! is free, so when every connection is busy (a stall in the path under test) the next
//! requests go out late and their latency includes the wait, as a real client's would;
//! nothing is skipped. `send_lag` reports how late requests actually went out, `service`
//! the time from the actual send to the response (what a closed-loop tool would report).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::clock::{now_ns, precise_timer_slack, sleep_until};
use crate::http1::{self, Conn};
use crate::stats::{Latency, Tally};
use crate::{parse_addr, parse_duration};

/// Threads (and so connections) of a keep-alive `rate` run unless `--connections` says.
/// Enough that a stall of 10 ms at 2,000 requests/s does not exhaust the pool.
const DEFAULT_RATE_CONNECTIONS: usize = 32;

#[derive(clap::Args)]
pub struct RateOptions {
    #[arg(long, value_parser = parse_addr)]
    target: SocketAddr,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    /// Measured time, after the warm-up.
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Request and response body size, bytes (the server's `--size` sets the response).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// A new TCP connection per request instead of keep-alive connections.
    #[arg(long)]
    new_connection: bool,
    /// Keep-alive: connections in the pool; new-connection: requests in flight at most.
    #[arg(long, default_value_t = DEFAULT_RATE_CONNECTIONS)]
    connections: usize,
    /// Run at the rate this long before measuring (connections warm, caches hot).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Longest a connect, read or write may block before the request counts as failed.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Also print the latency histogram (`latency_histogram`: `[ns, count]` buckets), so
    /// several runs can be merged exactly.
    #[arg(long)]
    histogram: bool,
}

#[derive(clap::Args)]
pub struct MaxOptions {
    #[arg(long, value_parser = parse_addr)]
    target: SocketAddr,
    /// Keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
}

/// What one thread measured.
struct ThreadResult {
    latency: Latency,
    service: Latency,
    send_lag: Latency,
    tally: Tally,
    /// Requests answered during the warm-up (not in the figures, but they cost CPU).
    warmup_ok: u64,
    /// Latencies (ns) by the second of the measured window their request was due in: a
    /// path that slows down under steady load shows as a trend here, which the whole-run
    /// percentiles hide.
    by_second: Vec<Vec<u64>>,
}

impl ThreadResult {
    fn new() -> Self {
        Self {
            latency: Latency::new(),
            service: Latency::new(),
            send_lag: Latency::new(),
            tally: Tally::default(),
            warmup_ok: 0,
            by_second: Vec::new(),
        }
    }

    fn record_in_second(&mut self, second: usize, ns: u64) {
        if self.by_second.len() <= second {
            self.by_second.resize_with(second + 1, Vec::new);
        }
        self.by_second[second].push(ns);
    }

    fn merge(&mut self, other: ThreadResult) {
        self.latency.merge(&other.latency);
        self.service.merge(&other.service);
        self.send_lag.merge(&other.send_lag);
        self.tally.merge(other.tally);
        self.warmup_ok += other.warmup_ok;
        if self.by_second.len() < other.by_second.len() {
            self.by_second.resize_with(other.by_second.len(), Vec::new);
        }
        for (mine, theirs) in self.by_second.iter_mut().zip(other.by_second) {
            mine.extend(theirs);
        }
    }

    /// `[[p50, p99, count], ...]` per second of the measured window, microseconds.
    fn timeline_us(&mut self) -> Value {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        let seconds: Vec<Value> = self
            .by_second
            .iter_mut()
            .map(|samples| {
                if samples.is_empty() {
                    return json!([null, null, 0]);
                }
                samples.sort_unstable();
                let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
                json!([us(at(0.50)), us(at(0.99)), samples.len()])
            })
            .collect();
        json!(seconds)
    }
}

pub fn rate(opts: RateOptions) -> Result<Value> {
    ensure!(
        opts.rate > 0.0 && opts.rate.is_finite(),
        "--rate must be positive"
    );
    ensure!(opts.connections > 0, "--connections must be at least 1");
    let request = http1::post_request(opts.target, opts.size);
    // Keep-alive connections are opened before the clock starts; a failure is counted and
    // the thread retries at its first ticket.
    let mut pool: Vec<Option<Conn>> = Vec::with_capacity(opts.connections);
    let mut setup = Tally::default();
    for _ in 0..opts.connections {
        if opts.new_connection {
            pool.push(None);
            continue;
        }
        match Conn::connect(opts.target, opts.timeout) {
            Ok(conn) => pool.push(Some(conn)),
            Err(e) => {
                setup.error(&e);
                pool.push(None);
            }
        }
    }
    ensure!(
        opts.new_connection || pool.iter().any(Option::is_some),
        "no connection to {} could be opened: {}",
        opts.target,
        setup.samples.join("; ")
    );

    let next_ticket = AtomicU64::new(0);
    // Threads start sleeping on their first ticket; 20 ms lets every thread get there.
    let start = now_ns() + 20_000_000;
    let measure_from = start + opts.warmup.as_nanos() as u64;
    let end = measure_from + opts.duration.as_nanos() as u64;
    // Wall-clock time of the measured window's start, to line the per-second figures up
    // with other logs (the agents', perf, a scheduler trace).
    let measured_from_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        + measure_from.saturating_sub(now_ns()) as f64 / 1e9;
    let interval = 1e9 / opts.rate;
    let request = &request;
    let results: Vec<ThreadResult> = std::thread::scope(|scope| {
        let workers: Vec<_> = pool
            .into_iter()
            .map(|mut conn| {
                let next_ticket = &next_ticket;
                let opts = &opts;
                scope.spawn(move || {
                    precise_timer_slack();
                    let mut result = ThreadResult::new();
                    loop {
                        let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
                        let intended = start + (ticket as f64 * interval) as u64;
                        if intended >= end {
                            break;
                        }
                        sleep_until(intended);
                        let sent = now_ns();
                        let outcome = one_request(&mut conn, opts, request);
                        let done = now_ns();
                        if intended < measure_from {
                            result.warmup_ok += u64::from(outcome.is_ok());
                            continue;
                        }
                        match outcome {
                            Ok(()) => {
                                result.tally.ok += 1;
                                result.latency.record_ns(done - intended);
                                let second = (intended - measure_from) / 1_000_000_000;
                                result.record_in_second(second as usize, done - intended);
                                result.service.record_ns(done - sent);
                                result.send_lag.record_ns(sent.saturating_sub(intended));
                            }
                            Err(e) => result.tally.error(e),
                        }
                    }
                    result
                })
            })
            .collect();
        workers.into_iter().map(join_worker).collect()
    });
    let mut total = ThreadResult::new();
    results.into_iter().for_each(|r| total.merge(r));
    let seconds = opts.duration.as_secs_f64();
    let mut report = json!({
        "mode": "rate",
        "target": opts.target.to_string(),
        "new_connection": opts.new_connection,
        "rate": opts.rate,
        "connections": opts.connections,
        "duration_s": seconds,
        "requests": total.tally.ok,
        "warmup_requests": total.warmup_ok,
        "errors": total.tally.errors,
        "setup_errors": setup.errors,
        "error_samples": total.tally.samples.iter().chain(&setup.samples).collect::<Vec<_>>(),
        "achieved_rps": (total.tally.ok + total.tally.errors) as f64 / seconds,
        "latency_us": total.latency.summary_us(),
        "service_us": total.service.summary_us(),
        "send_lag_us": total.send_lag.summary_us(),
        "measured_from_unix_s": measured_from_unix_s,
        "latency_by_second_us": total.timeline_us(),
    });
    if opts.histogram {
        report["latency_histogram"] = total.latency.buckets();
    }
    Ok(report)
}

/// One request on the thread's keep-alive connection (opened again after a failure or a
/// `Connection: close`), or on a fresh connection closed right after.
fn one_request(
    conn: &mut Option<Conn>,
    opts: &RateOptions,
    request: &[u8],
) -> Result<(), http1::Error> {
    if opts.new_connection {
        let mut fresh = Conn::connect(opts.target, opts.timeout)?;
        return fresh.exchange(request).map(drop);
    }
    let mut current = match conn.take() {
        Some(c) => c,
        None => Conn::connect(opts.target, opts.timeout)?,
    };
    current.exchange(request)?;
    if current.reusable() {
        *conn = Some(current);
    }
    Ok(())
}

pub fn max(opts: MaxOptions) -> Result<Value> {
    ensure!(opts.connections > 0, "--connections must be at least 1");
    let request = http1::post_request(opts.target, opts.size);
    let mut conns = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections {
        conns
            .push(Conn::connect(opts.target, opts.timeout).map_err(|e| {
                anyhow::anyhow!("cannot open a connection to {}: {e}", opts.target)
            })?);
    }
    let start = now_ns();
    let measure_from = start + opts.warmup.as_nanos() as u64;
    let end = measure_from + opts.duration.as_nanos() as u64;
    let request = &request;
    let results: Vec<ThreadResult> = std::thread::scope(|scope| {
        let workers: Vec<_> = conns
            .into_iter()
            .map(|conn| {
                let opts = &opts;
                scope.spawn(move || {
                    let mut conn = Some(conn);
                    let mut result = ThreadResult::new();
                    loop {
                        let sent = now_ns();
                        if sent >= end {
                            break;
                        }
                        let mut current = match conn.take() {
                            Some(c) => Ok(c),
                            None => Conn::connect(opts.target, opts.timeout),
                        };
                        let outcome = current
                            .as_mut()
                            .map_err(|e| e.to_string())
                            .and_then(|c| c.exchange(request).map(drop).map_err(|e| e.to_string()));
                        let done = now_ns();
                        if let Ok(c) = current
                            && outcome.is_ok()
                            && c.reusable()
                        {
                            conn = Some(c);
                        }
                        // Only requests that both started and finished inside the window.
                        if sent < measure_from || done > end {
                            result.warmup_ok += u64::from(outcome.is_ok());
                            continue;
                        }
                        match outcome {
                            Ok(()) => {
                                result.tally.ok += 1;
                                result.latency.record_ns(done - sent);
                            }
                            Err(e) => result.tally.error(e),
                        }
                    }
                    result
                })
            })
            .collect();
        workers.into_iter().map(join_worker).collect()
    });
    let mut total = ThreadResult::new();
    results.into_iter().for_each(|r| total.merge(r));
    let seconds = opts.duration.as_secs_f64();
    Ok(json!({
        "mode": "max",
        "target": opts.target.to_string(),
        "connections": opts.connections,
        "duration_s": seconds,
        "requests": total.tally.ok,
        "warmup_requests": total.warmup_ok,
        "errors": total.tally.errors,
        "error_samples": total.tally.samples,
        "rps": total.tally.ok as f64 / seconds,
        "latency_us": total.latency.summary_us(),
    }))
}

/// A worker that panicked is a bug in this program, not an error of the path under test.
fn join_worker<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_merges_threads_by_second_and_marks_empty_seconds() {
        let mut a = ThreadResult::new();
        for ns in [100_000, 300_000, 200_000] {
            a.record_in_second(0, ns);
        }
        a.record_in_second(2, 900_000);
        let mut b = ThreadResult::new();
        b.record_in_second(0, 400_000);
        b.record_in_second(3, 50_000);
        a.merge(b);
        assert_eq!(
            a.timeline_us(),
            json!([
                [300.0, 400.0, 4],
                [null, null, 0],
                [900.0, 900.0, 1],
                [50.0, 50.0, 1]
            ])
        );
    }
}
