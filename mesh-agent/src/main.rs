//! `mesh-agent`: the per-node daemon of a sidecarless service mesh for Amazon ECS on EC2.

mod access_log;
mod agent;
mod capture;
mod certs;
mod config;
mod destinations;
mod discovery;
mod ecs;
mod endpoints;
mod heap;
mod http_client;
mod identity;
mod live;
mod metrics;
mod netns;
mod policy;
mod preflight;
mod proxy;
mod routing;
mod services;
mod stat;
mod tasks;
mod tunnel;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless service mesh agent for Amazon ECS on EC2"
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (needs root).
    Run {
        /// Configuration file (TOML); reloaded on SIGHUP and when it changes.
        #[arg(long, env = "MESH_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        #[arg(long, env = "MESH_CONFIG")]
        config: PathBuf,
    },
    /// Manage the trust anchor and issuer (offline operator commands; no root needed).
    Trust(identity::cli::TrustArgs),
    /// Per-hop success rate, RPS, latency and TCP traffic from an agent's metrics endpoint.
    Stat(stat::StatArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        // The configuration is read before the runtime exists: it says how many threads to give it.
        Command::Run { config: path } => config::Config::load(&path).and_then(|config| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads(&config))
                .enable_all()
                .thread_name("mesh-worker")
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(path, config)))
        }),
        Command::CheckConfig { config } => agent::check_config(&config),
        Command::Trust(args) => identity::cli::run(args),
        Command::Stat(args) => stat::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `agent.worker_threads`; `MESH_WORKER_THREADS` overrides it, for benchmarks.
fn worker_threads(config: &config::Config) -> usize {
    std::env::var("MESH_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(config.agent.worker_threads)
        .max(1)
}

/// Level from `MESH_LOG` (or `RUST_LOG`), default `info`.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("MESH_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
