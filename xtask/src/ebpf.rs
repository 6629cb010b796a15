//! `cargo xtask build-ebpf`: compiles mesh-ebpf for bpfel-unknown-none.
//!
//! That target ships no precompiled `core`, so the build needs `-Z build-std=core`: a cargo that
//! accepts `-Z` and a rustc whose sysroot holds the library source. Two toolchains qualify:
//! a rustup nightly with the rust-src component, or Debian 12's rustc-web (1.96, LLVM 22) with
//! rust-web-src driven by the ordinary stable cargo under `RUSTC_BOOTSTRAP=1`.

use crate::{Profile, apt, cmd, linker};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const TARGET: &str = "bpfel-unknown-none";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// The oldest rustc-web verified with the crates' rust-version and with bpf-linker's LLVM 22.
const DEBIAN_RUSTC_MIN: (u32, u32) = (1, 96);
pub const DEBIAN_RUST_PACKAGES: &[&str] = &["rustc-web", "rust-web-src"];
/// `e_machine` of an eBPF ELF object.
const EM_BPF: u16 = 247;

/// Settings an outer cargo, a CI runner or the user may have made for host builds. In the nested
/// eBPF build they would pick the wrong compiler, feed host flags (say `-C target-cpu=native`) to
/// the BPF backend, or move the object away from where the agent's build script looks for it.
const LEAKY_ENV: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_BOOTSTRAP",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTDOC",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_TARGET_DIR",
];

pub fn remove_leaky_env(cmd: &mut Command) {
    for key in LEAKY_ENV {
        cmd.env_remove(key);
    }
}

enum Toolchain {
    /// A rustup toolchain named `nightly*` with rust-src.
    RustupNightly(String),
    /// Debian's /usr/bin/rustc with rust-web-src, under the cargo running xtask.
    Debian,
}

impl Toolchain {
    fn describe(&self) -> String {
        match self {
            Toolchain::RustupNightly(name) => format!("rustup toolchain {name}"),
            Toolchain::Debian => {
                format!("RUSTC={DEBIAN_RUSTC} RUSTC_BOOTSTRAP=1 with the stable cargo")
            }
        }
    }

    fn cargo(&self) -> Command {
        let mut cargo = match self {
            // `rustup run` rather than `cargo +nightly`: the `+` syntax only works through the
            // rustup proxy, and PATH may put a toolchain's real cargo first.
            Toolchain::RustupNightly(name) => {
                let mut cmd = Command::new("rustup");
                cmd.args(["run", name, "cargo"]);
                cmd
            }
            Toolchain::Debian => cmd::cargo(),
        };
        remove_leaky_env(&mut cargo);
        if let Toolchain::Debian = self {
            // RUSTC_BOOTSTRAP=1 does two things: cargo then counts itself as a nightly and accepts
            // `-Z build-std`, and rustc accepts the unstable flags and `#![feature]`s of `core`.
            // RUSTC points cargo at the compiler whose sysroot (/usr) has the library source.
            cargo.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
        }
        cargo
    }
}

/// Builds the eBPF object and returns its path:
/// `<root>/target/bpfel-unknown-none/<debug|release>/mesh-ebpf`.
pub fn build(root: &Path, profile: Profile) -> Result<PathBuf> {
    let started = Instant::now();
    let crate_dir = root.join("mesh-ebpf");
    let manifest = crate_dir.join("Cargo.toml");
    if !manifest.exists() {
        bail!("{} does not exist", manifest.display());
    }
    let toolchain = find_toolchain()?;
    let linker_dir = linker::ensure()?;
    let target_dir = root.join("target");

    let mut cargo = toolchain.cargo();
    // Run from the crate so a `.cargo/config.toml` of its own applies; all that matters is also
    // given on the command line.
    cargo
        .current_dir(&crate_dir)
        .env("PATH", cmd::path_with(&linker_dir)?)
        .args(["build", "--manifest-path"])
        .arg(&manifest)
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .args(profile.cargo_flag());
    cmd::say(format!(
        "eBPF: building mesh-ebpf ({} profile) with {}; {} first on PATH",
        profile.dir(),
        toolchain.describe(),
        linker_dir.display()
    ));
    cmd::run(&mut cargo).context("building the eBPF crate failed")?;

    let object = target_dir
        .join(TARGET)
        .join(profile.dir())
        .join("mesh-ebpf");
    let size = check_object(&object)?;
    cmd::say(format!(
        "eBPF: object {} ({size} bytes) in {:.1} s",
        object.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(object)
}

/// Discovery order: rustup nightly with rust-src, Debian rustc-web, then install rustc-web.
fn find_toolchain() -> Result<Toolchain> {
    if let Some(name) = rustup_nightly_with_src() {
        return Ok(Toolchain::RustupNightly(name));
    }
    match debian_rustc() {
        Ok(version) => return Ok(found_debian(&version)),
        Err(why) => cmd::say(format!("toolchain: {DEBIAN_RUSTC}: {why}")),
    }
    if !apt::can_install() {
        bail!(no_toolchain_help());
    }
    apt::install(DEBIAN_RUST_PACKAGES, "eBPF toolchain")?;
    if let Ok(version) = debian_rustc() {
        return Ok(found_debian(&version));
    }
    // With a stale index apt happily installs bookworm's rustc-web 1.85; 1.96 is in
    // bookworm-security.
    cmd::say("toolchain: rustc-web is still too old; refreshing the package index and upgrading");
    apt::update()?;
    apt::install(DEBIAN_RUST_PACKAGES, "eBPF toolchain")?;
    let version = debian_rustc().map_err(|why| {
        anyhow!(
            "after installing {}, {DEBIAN_RUSTC} {why}. rustc-web >= 1.96 comes from \
             bookworm-security: make sure apt's sources include \
             `deb http://deb.debian.org/debian-security bookworm-security main`, then run:\n    {}",
            DEBIAN_RUST_PACKAGES.join(" "),
            apt::install_instructions(DEBIAN_RUST_PACKAGES)
        )
    })?;
    Ok(found_debian(&version))
}

fn found_debian(version: &str) -> Toolchain {
    cmd::say(format!(
        "toolchain: {DEBIAN_RUSTC} is `{version}` with library source"
    ));
    Toolchain::Debian
}

/// The first rustup toolchain named `nightly*` whose sysroot has the library source.
fn rustup_nightly_with_src() -> Option<String> {
    let Some(list) = cmd::probe(Command::new("rustup").args(["toolchain", "list"])) else {
        cmd::say("toolchain: rustup not found, so no rustup nightly");
        return None;
    };
    let nightlies: Vec<&str> = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with("nightly"))
        .collect();
    if nightlies.is_empty() {
        cmd::say("toolchain: no rustup nightly installed");
    }
    nightlies
        .into_iter()
        .find_map(nightly_if_usable)
        .map(str::to_owned)
}

fn nightly_if_usable(name: &str) -> Option<&str> {
    let mut rustc = Command::new("rustup");
    // Never let a probe download a toolchain.
    rustc
        .env("RUSTUP_AUTO_INSTALL", "0")
        .args(["run", name, "rustc", "--print", "sysroot"]);
    let usable = cmd::probe(&mut rustc).is_some_and(|sysroot| has_library_source(&sysroot));
    if usable {
        cmd::say(format!("toolchain: rustup {name} with rust-src"));
    } else {
        cmd::say(format!(
            "toolchain: rustup {name} has no rust-src component, skipping it \
             (`rustup component add rust-src --toolchain {name}` would make it usable)"
        ));
    }
    usable.then_some(name)
}

/// Ok(`rustc --version`) when /usr/bin/rustc is new enough and has the library source.
fn debian_rustc() -> Result<String, String> {
    if !Path::new(DEBIAN_RUSTC).exists() {
        return Err("not installed (Debian packages rustc-web rust-web-src)".into());
    }
    let version =
        cmd::probe(Command::new(DEBIAN_RUSTC).arg("--version")).ok_or("`--version` failed")?;
    let (major, minor, _) = cmd::parse_version(&version)
        .ok_or_else(|| format!("cannot read the version in `{version}`"))?;
    if (major, minor) < DEBIAN_RUSTC_MIN {
        return Err(format!(
            "is `{version}`, need >= {}.{} (rustc-web from bookworm-security)",
            DEBIAN_RUSTC_MIN.0, DEBIAN_RUSTC_MIN.1
        ));
    }
    let sysroot = cmd::probe(Command::new(DEBIAN_RUSTC).args(["--print", "sysroot"]))
        .ok_or("`--print sysroot` failed")?;
    if !has_library_source(&sysroot) {
        return Err(format!(
            "`{version}` has no library source under {sysroot}/lib/rustlib/src/rust/library \
             (Debian package rust-web-src)"
        ));
    }
    Ok(version)
}

/// Where `-Z build-std` looks for `core`.
fn has_library_source(sysroot: &str) -> bool {
    Path::new(sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
}

fn no_toolchain_help() -> String {
    let mut help = String::from(
        "no toolchain here can build the eBPF crate: it needs `-Z build-std=core`, i.e. a \
         nightly-capable cargo and rustc plus the Rust library source. Either run\n    \
         rustup toolchain install nightly --component rust-src\n",
    );
    if apt::is_debian() {
        help += &format!(
            "or install Debian's rustc-web 1.96 (from bookworm-security):\n    {}\n",
            apt::install_instructions(DEBIAN_RUST_PACKAGES)
        );
    }
    help + "then re-run `cargo xtask build-ebpf`"
}

/// Fails unless `path` is a 64-bit little-endian eBPF ELF object; returns its size.
fn check_object(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cargo succeeded but {} is missing (is mesh-ebpf's [[bin]] still named `mesh-ebpf`?)",
            path.display()
        )
    })?;
    if !is_bpf_elf(&bytes) {
        bail!("{} is not a little-endian eBPF ELF object", path.display());
    }
    Ok(bytes.len() as u64)
}

fn is_bpf_elf(bytes: &[u8]) -> bool {
    // ELF magic, 64-bit class, little-endian data, then e_machine at offset 18.
    bytes.len() >= 20
        && bytes.starts_with(b"\x7fELF\x02\x01")
        && u16::from_le_bytes([bytes[18], bytes[19]]) == EM_BPF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_bpf_objects() {
        let mut header = b"\x7fELF\x02\x01\x01".to_vec();
        header.resize(20, 0);
        header[18] = 247;
        assert!(is_bpf_elf(&header));
        header[18] = 62; // x86-64
        assert!(!is_bpf_elf(&header));
        assert!(!is_bpf_elf(b"\x7fELF"));
    }
}
