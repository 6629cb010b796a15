//! `cargo xtask <task>`: building, testing and demonstrating the mesh. Plain Rust and
//! `std::process::Command`, so every task behaves the same on a laptop and on a fresh CI machine.

mod apt;
mod bench;
mod ci;
mod cmd;
mod demo;
mod ebpf;
mod layout;
mod linker;
mod workspace;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and demo tasks for the mesh workspace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (target/bpfel-unknown-none/<profile>/mesh-ebpf), installing the
    /// toolchain and bpf-linker first when missing.
    BuildEbpf {
        /// Use the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object, then mesh-agent (which embeds it) and the test harness.
    Build {
        /// Use the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run everything CI runs: prerequisites, fmt, build, clippy, unit and integration tests.
    Test,
    /// Build, then run the demo: simulated ECS nodes with the real agent.
    Demo,
    /// Record which functions of the agent run (the quick benchmark under callgrind) and
    /// write mesh-agent/layout.ld, which release builds use to place them first. Needs root.
    Layout,
    /// Build release binaries, then benchmark direct vs mesh vs a stunnel pair side by side,
    /// with a pair of plain relays as the floor (results in target/bench/; see
    /// docs/benchmarks.md). Needs root.
    Bench {
        /// Shorter runs, fewer rounds, smaller bulk transfer and idle-connection counts.
        #[arg(long)]
        quick: bool,
        /// Run the agents with `capture.loopback_redirect = true` (the sock_ops + sk_msg
        /// socket-map redirect of the app <-> agent loopback legs), for an A/B against a run
        /// without it.
        #[arg(long)]
        loopback_redirect: bool,
        /// Measure only this figure (after the idle memory and the smoke tests): a partial
        /// run, for profiling one kind of traffic.
        #[arg(long, value_enum)]
        only: Option<bench::Figure>,
        /// Only this rate, in requests/s, for the latency figures.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        rate: Option<u32>,
        /// Measured seconds per round of the timed figures (latency, max requests/s, new
        /// connections/s).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: Option<u64>,
    },
}

/// Cargo profile; the eBPF crate's own dev profile is optimised, since the verifier rejects
/// unoptimised code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn from_flag(release: bool) -> Self {
        if release {
            Profile::Release
        } else {
            Profile::Debug
        }
    }

    /// The directory name under target/.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }

    pub fn cargo_flag(self) -> &'static [&'static str] {
        match self {
            Profile::Debug => &[],
            Profile::Release => &["--release"],
        }
    }
}

/// Returned once a failure has already been explained on the terminal.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failure already reported")
    }
}

impl std::error::Error for Reported {}

/// The workspace root: xtask lives one directory below it.
fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf()
}

fn run(task: Task) -> anyhow::Result<()> {
    let root = workspace_root();
    match task {
        Task::BuildEbpf { release } => ebpf::build(&root, Profile::from_flag(release)).map(drop),
        Task::Build { release } => workspace::build(&root, Profile::from_flag(release)).map(drop),
        Task::Test => ci::run(&root),
        Task::Demo => {
            let built = workspace::build(&root, Profile::Debug)?;
            demo::run(&root, &built.agent_bin())
        }
        Task::Layout => layout::run(&root),
        Task::Bench {
            quick,
            loopback_redirect,
            only,
            rate,
            seconds,
        } => bench::run(
            &root,
            bench::Options {
                quick,
                loopback_redirect,
                only,
                rate,
                seconds,
            },
        ),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<Reported>() => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
