//! bpf-linker: rustc hands the bpfel-unknown-none link step to it. Version 0.13 built against
//! LLVM 22 reads the bitcode of both toolchains xtask uses (Debian rustc-web 1.96 and current
//! nightlies), so that is the one version we accept.

use crate::{apt, cmd};
use anyhow::{Context, Result, bail};
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const WANTED_MINOR: (u32, u32) = (0, 13);
const VERSION_REQ: &str = "~0.13";
const LLVM_FEATURE: &str = "llvm-22";
const DEBIAN_LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// What bpf-linker's build script links against: LLVM itself plus the libraries LLVM was built with.
pub const DEBIAN_LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Where xtask installs tools it builds: `$MESH_TOOLS_DIR`, else a machine-wide cache for root
/// (CI runners share it between checkouts), else the user's cache.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("MESH_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if cmd::is_root() {
        return PathBuf::from("/var/cache/mesh-tools");
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".cache/mesh-tools")
}

/// Finds or installs bpf-linker 0.13 and returns the directory holding it, for the front of PATH.
pub fn ensure() -> Result<PathBuf> {
    if let Some(found) = cmd::which("bpf-linker") {
        match check(&found) {
            Ok(version) => return Ok(report(&found, &version, "on PATH")),
            Err(why) => cmd::say(format!("bpf-linker: ignoring {}: {why}", found.display())),
        }
    }
    let tools = tools_dir();
    let cached = tools.join("bin/bpf-linker");
    if cached.exists() {
        match check(&cached) {
            Ok(version) => return Ok(report(&cached, &version, "in the tools dir")),
            Err(why) => cmd::say(format!("bpf-linker: replacing {}: {why}", cached.display())),
        }
    } else {
        cmd::say(format!(
            "bpf-linker: not on PATH and not in {}",
            tools.display()
        ));
    }
    // --force: a binary that is there but unusable (wrong version, broken libraries) must be
    // replaced, which `cargo install` otherwise refuses when the version matches.
    install(&tools, cached.exists())?;
    let version = check(&cached).map_err(|why| {
        anyhow::anyhow!(
            "bpf-linker was installed but {} is unusable: {why}",
            cached.display()
        )
    })?;
    Ok(report(&cached, &version, "freshly installed"))
}

fn report(binary: &Path, version: &str, where_: &str) -> PathBuf {
    cmd::say(format!(
        "bpf-linker: {version} at {} ({where_})",
        binary.display()
    ));
    binary.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Ok(version) when `binary` runs and is 0.13.x.
fn check(binary: &Path) -> Result<String, String> {
    let output = cmd::probe(Command::new(binary).arg("--version"))
        .ok_or_else(|| "`--version` failed".to_owned())?;
    match cmd::parse_version(&output) {
        Some((major, minor, patch)) if (major, minor) == WANTED_MINOR => {
            Ok(format!("{major}.{minor}.{patch}"))
        }
        _ => Err(format!("it is `{output}`, need 0.13.x")),
    }
}

/// `cargo install bpf-linker` into `<tools>/bin`, against LLVM 22.
fn install(tools: &Path, force: bool) -> Result<()> {
    let llvm = llvm_prefix(tools)?;
    let mut cargo = cmd::cargo();
    crate::ebpf::remove_leaky_env(&mut cargo);
    // Without LLVM_PREFIX the build script looks for LLVM under /usr and fails to link -lLLVM.
    cargo.env("LLVM_PREFIX", &llvm).args(install_args(tools));
    if force {
        cargo.arg("--force");
    }
    cmd::say(format!(
        "bpf-linker: building it against LLVM at {} (a minute or two)",
        llvm.display()
    ));
    let started = Instant::now();
    cmd::run(&mut cargo).context("installing bpf-linker failed")?;
    cmd::say(format!(
        "bpf-linker: installed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn install_args(tools: &Path) -> Vec<String> {
    let args = [
        "install",
        "bpf-linker",
        "--version",
        VERSION_REQ,
        "--locked",
    ];
    let features = [
        "--no-default-features",
        "--features",
        LLVM_FEATURE,
        "--root",
    ];
    args.iter()
        .chain(&features)
        .map(|a| a.to_string())
        .chain([tools.display().to_string()])
        .collect()
}

/// The LLVM 22 installation to build bpf-linker against: `$LLVM_PREFIX` when the user gave one,
/// else Debian's llvm-22 packages (installed here when root).
fn llvm_prefix(tools: &Path) -> Result<PathBuf> {
    if let Some(prefix) = env::var_os("LLVM_PREFIX").filter(|p| !p.is_empty()) {
        cmd::say(format!(
            "bpf-linker: using LLVM_PREFIX={}",
            prefix.to_string_lossy()
        ));
        return Ok(prefix.into());
    }
    if !apt::is_debian() {
        bail!(
            "bpf-linker 0.13 is missing and must be built against LLVM 22 (with Polly, zstd and zlib \
             development files). Install those, then run:\n    LLVM_PREFIX=<llvm 22 prefix> {}",
            manual_install(tools)
        );
    }
    if let Err(error) = apt::ensure(DEBIAN_LLVM_PACKAGES, "bpf-linker build") {
        bail!(
            "{error:#}\nand then:\n    LLVM_PREFIX={DEBIAN_LLVM_PREFIX} {}",
            manual_install(tools)
        );
    }
    Ok(DEBIAN_LLVM_PREFIX.into())
}

fn manual_install(tools: &Path) -> String {
    let mut cmd = Command::new("cargo");
    cmd.args(install_args(tools));
    cmd::render(&cmd)
}
