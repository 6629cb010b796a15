//! `mesh-bench`: the load generator of `cargo xtask bench` (see docs/benchmarks.md).
//!
//! ```text
//! mesh-bench serve --listen ADDR --mode http|sink|echo
//! mesh-bench rate --target ADDR --rate R --duration D [--size 1024] [--new-connection] [--connections N]
//! mesh-bench max --target ADDR --connections N --duration D
//! mesh-bench bulk --target ADDR --bytes N
//! mesh-bench connect-rate --target ADDR --duration D [--concurrency N]
//! mesh-bench idle --target ADDR --count N
//! mesh-bench relay --route LISTEN=TO [--route LISTEN=TO ...]
//! ```
//! Every client subcommand prints one JSON object with its results on stdout and exits 0,
//! also when requests failed: failures are counted (`errors`) with a few samples
//! (`error_samples`), never hidden. Exit status 1 means the run itself could not happen
//! (bad target, no connection at all). `serve` prints `{"listening": ADDR, ...}` once its
//! socket listens and its totals as a second JSON object when it gets SIGTERM or SIGINT.
//! `idle` prints `{"event": "open", ...}` once every connection is open, then holds them
//! until its standard input closes or it gets SIGTERM/SIGINT, and prints its results.
//!
//! The clients are plain threads on blocking sockets with a hand-rolled HTTP/1.1 client
//! (`http1.rs`), not tokio + hyper: at a fixed rate each request costs exactly one
//! `clock_nanosleep`, one `write` and one or two `read`s, with no executor, waker, channel
//! or allocation in between, so the generator's own CPU use and jitter, which land in every
//! figure of the direct baseline, stay as small as they can on a 2-core machine shared
//! with the proxies under test. The server is hyper (HTTP/1.1, keep-alive) on tokio, as a
//! typical Rust service would be; the same server answers all three setups.

mod clock;
mod http1;
mod load;
mod relay;
mod serve;
mod stats;
mod stream;
mod sys;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "Load generator and servers of `cargo xtask bench`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A server: HTTP/1.1 keep-alive answering 1 KiB, a byte sink, or an echo.
    Serve(serve::Options),
    /// Open-loop HTTP/1.1 requests at a constant rate; latency from each intended send time.
    Rate(load::RateOptions),
    /// Closed-loop HTTP/1.1 requests as fast as N connections go.
    Max(load::MaxOptions),
    /// One TCP stream sending N bytes to a `serve --mode sink`; MiB/s until its acknowledgement.
    Bulk(stream::BulkOptions),
    /// New TCP connections per second to a `serve --mode echo` (connect, one exchange, close).
    ConnectRate(stream::ConnectOptions),
    /// Opens N connections to a `serve --mode echo` and holds them until stdin closes.
    Idle(stream::IdleOptions),
    /// A plain TCP relay (no TLS, an event loop copying both ways): the floor of a proxy pair.
    Relay(relay::Options),
}

/// `10`, `10s`, `1.5s`, `500ms` or `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 10s, 500ms)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// A socket address argument.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an ip:port address"))
}

/// Prints one JSON object on stdout, flushed (stdout is usually a pipe).
pub fn emit(value: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(opts) => serve::run(opts),
        Command::Rate(opts) => load::rate(opts),
        Command::Max(opts) => load::max(opts),
        Command::Bulk(opts) => stream::bulk(opts),
        Command::ConnectRate(opts) => stream::connect_rate(opts),
        Command::Idle(opts) => stream::idle(opts),
        Command::Relay(opts) => relay::run(opts),
    };
    match result {
        Ok(report) => {
            emit(&report);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mesh-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
