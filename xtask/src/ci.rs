//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure. Each step gets a
//! banner and a time, and the run ends with a summary whose last line says PASSED or FAILED.

use crate::workspace::{self, Built};
use crate::{Profile, Reported, apt, cmd, ebpf, linker};
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the integration tests use from the host: ip/bridge (iproute2), bpftool, curl,
/// nsenter/unshare (util-linux), tcpdump (proving the tunnel carries no clear text), openssl
/// (independent TLS probes of the tunnel listener) and dnsmasq (a real DNS server for discovery;
/// `dnsmasq-base` is the binary without the system service that would take port 53) and
/// prometheus (scrapes the agents and evaluates the documented PromQL and the dashboard's queries).
const SYSTEM_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "curl",
    "util-linux",
    "tcpdump",
    "openssl",
    "dnsmasq-base",
    "prometheus",
];
const STEPS: usize = 7;

pub fn run(root: &Path) -> Result<()> {
    let mut runner = Runner::new();
    runner.step("prerequisites", || prerequisites(root))?;
    runner.step("cargo fmt --check (workspace)", || {
        cmd::run(cmd::host_cargo(root).args(["fmt", "--all", "--", "--check"]))
    })?;
    runner.step("cargo fmt --check (mesh-ebpf)", || {
        let manifest = root.join("mesh-ebpf/Cargo.toml");
        let mut cargo = cmd::host_cargo(root);
        cargo.arg("fmt").arg("--manifest-path").arg(manifest);
        cmd::run(cargo.args(["--all", "--", "--check"]))
    })?;
    let built = runner.step("build (debug)", || workspace::build(root, Profile::Debug))?;
    runner.step("clippy", || {
        let mut cargo = workspace::cargo_with_object(root, &built.ebpf_object);
        cmd::run(cargo.args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    runner.step("unit tests", || {
        let mut cargo = workspace::cargo_with_object(root, &built.ebpf_object);
        cmd::run(cargo.args(["test", "--workspace", "--exclude", "mesh-tests"]))
    })?;
    runner.step("integration tests", || integration_tests(root, &built))?;
    runner.finish();
    Ok(())
}

/// System packages (installed when root on Debian) and the rustfmt/clippy components.
fn prerequisites(root: &Path) -> Result<()> {
    let mut packages = SYSTEM_PACKAGES.to_vec();
    packages.extend(ebpf::DEBIAN_RUST_PACKAGES);
    packages.extend(linker::DEBIAN_LLVM_PACKAGES);
    if apt::can_install() {
        apt::ensure(&packages, "system packages")?;
    } else if apt::is_debian() {
        report_missing_packages(&packages);
    } else {
        cmd::say(format!(
            "not Debian, so not checking packages; the integration tests need the equivalents of: {}",
            SYSTEM_PACKAGES.join(" ")
        ));
    }
    rust_components(root)
}

/// Without root xtask cannot install; say what is missing now rather than fail obscurely later.
fn report_missing_packages(packages: &[&str]) {
    let missing = apt::missing(packages);
    if missing.is_empty() {
        cmd::say(format!("system packages: present: {}", packages.join(" ")));
        return;
    }
    let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
    cmd::say(format!(
        "system packages: not root, so not installing the missing {}; run:\n    {}",
        missing.join(" "),
        apt::install_instructions(&missing)
    ));
}

/// rustup's minimal profile has neither rustfmt nor clippy.
fn rust_components(root: &Path) -> Result<()> {
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(subcommand, _)| {
            cmd::probe(cmd::host_cargo(root).args([subcommand, "--version"])).is_none()
        })
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        cmd::say("rust components: rustfmt and clippy present");
        return Ok(());
    }
    if cmd::which("rustup").is_none() {
        bail!(
            "cargo cannot run {}; install them for this toolchain",
            missing.join(" and ")
        );
    }
    // rustup acts on the toolchain running xtask: the proxy exported RUSTUP_TOOLCHAIN for it.
    cmd::run(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
}

fn integration_tests(root: &Path, built: &Built) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the integration tests need root (network namespaces, cgroups, eBPF programs) and this \
             is not root; nothing was skipped silently. Re-run as root:\n    \
             sudo env \"PATH=$PATH\" cargo xtask test"
        );
    }
    let mut cargo = workspace::cargo_with_object(root, &built.ebpf_object);
    cargo.env("MESH_AGENT_BIN", built.agent_bin()).args([
        "test",
        "-p",
        "mesh-tests",
        "--",
        "--test-threads=2",
    ]);
    cmd::run(&mut cargo)
}

/// Banners, timings and the summary.
struct Runner {
    started: Instant,
    finished: Vec<(&'static str, Duration)>,
}

impl Runner {
    fn new() -> Self {
        Runner {
            started: Instant::now(),
            finished: Vec::new(),
        }
    }

    fn step<T>(&mut self, name: &'static str, body: impl FnOnce() -> Result<T>) -> Result<T> {
        let number = self.finished.len() + 1;
        println!("\n==> [{number}/{STEPS}] {name}");
        let started = Instant::now();
        let result = body();
        let took = started.elapsed();
        match result {
            Ok(value) => {
                println!("<== [{number}/{STEPS}] {name}: ok ({})", seconds(took));
                self.finished.push((name, took));
                Ok(value)
            }
            Err(error) => {
                println!("!!! [{number}/{STEPS}] {name}: FAILED ({})", seconds(took));
                eprintln!("xtask: error: {error:#}");
                self.summary();
                println!("  FAILED {:>8}  {name}", seconds(took));
                println!(
                    "xtask test: FAILED at step {number}/{STEPS} ({name}) after {}",
                    seconds(self.started.elapsed())
                );
                Err(Reported.into())
            }
        }
    }

    fn summary(&self) {
        println!("\nxtask test summary:");
        for (name, took) in &self.finished {
            println!("  ok     {:>8}  {name}", seconds(*took));
        }
    }

    fn finish(self) {
        self.summary();
        println!(
            "xtask test: PASSED all {STEPS} steps in {}",
            seconds(self.started.elapsed())
        );
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}
