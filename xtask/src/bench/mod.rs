//! `cargo xtask bench [--quick]`: the side-by-side benchmark of issue #6.
//!
//! Builds release binaries (the agent and the `mesh-bench` load generator), sets up two
//! simulated nodes with four client/server task pairs (direct, through the mesh, through a
//! stunnel pair, through a pair of plain relays: the floor), measures every figure with the
//! setups interleaved, and writes target/bench/results.md and results.json.
//! docs/benchmarks.md explains each figure.
//!
//! Everything it makes (namespaces, cgroups, processes, files) is removed on the way out,
//! also on failure and on Ctrl-C: SIGINT, SIGTERM and SIGHUP only raise a flag that the
//! runs check, so the testbed's destructors always run.

mod procs;
mod report;
mod scenarios;
mod setup;

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{Profile, apt, cmd, workspace};
use report::{Machine, Results};
pub use scenarios::{Figure, Options};
use scenarios::{Plan, Runner};
use setup::Testbed;

/// What the benchmark uses from the host besides the integration tests' tools: stunnel4
/// (the conventional mutual-TLS pair), prlimit (util-linux; the proxies' descriptor limit),
/// openssl (the TLS probes) and iproute2.
const PACKAGES: &[&str] = &["stunnel4", "util-linux", "openssl", "iproute2"];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once SIGINT, SIGTERM or SIGHUP arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Catches the stop signals so that xtask unwinds and tears the testbed down. The children
/// share xtask's process group, so a Ctrl-C at the terminal stops them too.
fn catch_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn run(root: &Path, options: Options) -> Result<()> {
    let (quick, loopback_redirect) = (options.quick, options.loopback_redirect);
    if !cmd::is_root() {
        bail!(
            "the benchmark needs root (network namespaces, cgroups, eBPF programs); re-run as root:\n    \
             sudo env \"PATH=$PATH\" cargo xtask bench{}",
            if quick { " --quick" } else { "" }
        );
    }
    apt::ensure(PACKAGES, "benchmark packages")?;
    let built = workspace::build(root, Profile::Release)?;
    let bench_bin = built.bin_dir.join("mesh-bench");
    if !bench_bin.is_file() {
        bail!("cargo succeeded but {} is missing", bench_bin.display());
    }
    catch_stop_signals();
    let started = Instant::now();
    let plan = Plan::new(&options);
    let mut command = String::from("cargo xtask bench");
    if quick {
        command += " --quick";
    }
    if loopback_redirect {
        command += " --loopback-redirect";
    }
    if let Some(figure) = options.only {
        command += &format!(" --only {}", figure.name());
    }
    if let Some(rate) = options.rate {
        command += &format!(" --rate {rate}");
    }
    if let Some(seconds) = options.seconds {
        command += &format!(" --seconds {seconds}");
    }
    let mut results = Results::new(command, Machine::read(root), plan.json(), plan.text());
    let out_dir = root.join("target/bench");
    let launch = AgentLaunch {
        loopback_redirect,
        wrapper: &[],
    };
    let outcome = measure(
        &built.agent_bin(),
        &bench_bin,
        launch,
        &plan,
        &mut results,
        &out_dir,
    )
    .map_err(|e| {
        // Ctrl-C reaches the children too; what failed first because of it does not matter.
        if interrupted() {
            anyhow::anyhow!("interrupted")
        } else {
            e
        }
    });
    results.took = started.elapsed();
    results.machine.load_after = report::loadavg();
    if let Err(e) = &outcome {
        results
            .failures
            .push(format!("the benchmark stopped early: {e:#}"));
    }
    results.write(&out_dir)?;
    println!("\n{}", results.markdown());
    cmd::say(format!(
        "results: {} and {} ({:.0} s)",
        out_dir.join("results.md").display(),
        out_dir.join("results.json").display(),
        results.took.as_secs_f64()
    ));
    outcome?;
    if interrupted() {
        bail!("interrupted");
    }
    if !results.failures.is_empty() {
        bail!(
            "{} run(s) failed; see the Errors section",
            results.failures.len()
        );
    }
    let errors = results.error_count();
    if errors > 0 {
        bail!("{errors} requests, transfers or connections failed; see the Errors section");
    }
    Ok(())
}

/// How the agents of a testbed run: plainly for the benchmark, or under a profiler that
/// writes its output when they exit (`cargo xtask layout`).
struct AgentLaunch<'a> {
    loopback_redirect: bool,
    wrapper: &'a [OsString],
}

/// Builds the testbed, runs every scenario, tears the testbed down (also on error). Agents
/// run under a wrapper are stopped with SIGTERM first, so that it gets to write its output.
fn measure(
    agent_bin: &Path,
    bench_bin: &Path,
    launch: AgentLaunch<'_>,
    plan: &Plan,
    results: &mut Results,
    out_dir: &Path,
) -> Result<()> {
    let mut bed = Testbed::start(
        agent_bin,
        bench_bin,
        launch.loopback_redirect,
        launch.wrapper,
    )
    .context("setting up the benchmark testbed")?;
    cmd::say(format!(
        "testbed {} ready: {}",
        bed.id(),
        bed.dir().display()
    ));
    results.tls = bed.tls.clone();
    let mut outcome = Runner::new(&mut bed, plan, results).run_all();
    if !launch.wrapper.is_empty() {
        let stopped: Result<Vec<_>> = bed.agents.iter_mut().map(|a| a.terminate()).collect();
        outcome = outcome.and(stopped.map(drop).context("stopping the agents"));
    }
    let logs = out_dir.join("logs");
    match bed.save_logs(&logs) {
        Ok(()) => cmd::say(format!("proxy logs: {}", logs.display())),
        Err(e) => cmd::say(format!("could not keep the proxy logs: {e:#}")),
    }
    let id = bed.id().to_string();
    drop(bed);
    cmd::say(format!("testbed {id} removed"));
    outcome
}

/// Runs every scenario of `cargo xtask bench --quick` (short rounds) with each agent started
/// under `wrapper`, for what the agents execute rather than for figures: `cargo xtask layout`
/// records their code this way. The proxies' logs are kept in `out_dir`/logs.
pub fn exercise(
    root: &Path,
    built: &workspace::Built,
    wrapper: &[OsString],
    out_dir: &Path,
) -> Result<()> {
    apt::ensure(PACKAGES, "benchmark packages")?;
    catch_stop_signals();
    let plan = Plan::new(&Options {
        quick: true,
        loopback_redirect: false,
        only: None,
        rate: None,
        seconds: Some(2),
    });
    let mut results = Results::new(
        "cargo xtask layout".into(),
        Machine::read(root),
        plan.json(),
        plan.text(),
    );
    let launch = AgentLaunch {
        loopback_redirect: false,
        wrapper,
    };
    let outcome = measure(
        &built.agent_bin(),
        &built.bin_dir.join("mesh-bench"),
        launch,
        &plan,
        &mut results,
        out_dir,
    );
    if interrupted() {
        bail!("interrupted");
    }
    outcome
}
