//! `cargo xtask build`: the eBPF object first, then the user-space crates that embed or test it.
//!
//! A release build is the product, and it is one static, position-independent executable:
//! glibc is linked in, so the agent does not depend on the C library of the image or host it
//! runs on, and its relocations are packed (RELR), which glibc's own start-up code applies.
//! Both save memory in every idle agent: no shared C library and dynamic loader mapped
//! around the few functions used, and 6 KiB of relocations read at start instead of 447 KiB
//! (docs/benchmarks.md, change 10). Its code is laid out by `mesh-agent/layout.ld`, and the
//! build says how much of that script it applied (`layout::check`, change 11). Debug builds,
//! which the tests and the demo use, stay dynamic: they share their dependencies with
//! `cargo test` and `cargo clippy`.

use crate::{Profile, cmd, ebpf, layout};
use anyhow::{Context, Result, bail};
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Endianness, Object as _, ObjectSymbol as _, elf};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable through which mesh-agent's build script is asked for a link map.
const LINK_MAP_ENV: &str = "MESH_AGENT_LINK_MAP";

pub struct Built {
    pub ebpf_object: PathBuf,
    /// Where cargo put this build's executables (the agent, `mesh-bench`).
    pub bin_dir: PathBuf,
}

impl Built {
    pub fn agent_bin(&self) -> PathBuf {
        self.bin_dir.join("mesh-agent")
    }
}

pub fn build(root: &Path, profile: Profile) -> Result<Built> {
    build_with(root, profile, None)
}

/// A release build whose link also writes the linker's map of the agent to `link_map` (which
/// input section of which file each function came from), for `cargo xtask layout`.
pub fn build_with_link_map(root: &Path, link_map: &Path) -> Result<Built> {
    build_with(root, Profile::Release, Some(link_map))
}

fn build_with(root: &Path, profile: Profile, link_map: Option<&Path>) -> Result<Built> {
    let ebpf_object = ebpf::build(root, profile)?;
    let mut cargo = cargo_with_object(root, &ebpf_object);
    cargo
        .args(["build", "-p", "mesh-agent", "-p", "mesh-tests"])
        .args(profile.cargo_flag());
    if let Some(map) = link_map {
        cargo.env(LINK_MAP_ENV, map);
    }
    let bin_dir = match profile {
        Profile::Debug => root.join("target").join(profile.dir()),
        Profile::Release => {
            let triple = host_gnu_triple()?;
            // An explicit --target keeps these flags off build scripts and proc-macros, which
            // cannot be linked statically.
            cargo.args(["--target", &triple, "--config", &static_rustflags(&triple)]);
            root.join("target").join(&triple).join(profile.dir())
        }
    };
    cmd::run(&mut cargo).context("building mesh-agent failed")?;
    let built = Built {
        ebpf_object,
        bin_dir,
    };
    let agent_bin = built.agent_bin();
    if !agent_bin.exists() {
        bail!("cargo succeeded but {} is missing", agent_bin.display());
    }
    if profile == Profile::Release {
        let executable = std::fs::read(&agent_bin)
            .with_context(|| format!("reading {}", agent_bin.display()))?;
        check_static(&agent_bin, &executable)?;
        layout::check(&agent_bin, &executable, &root.join(layout::SCRIPT))?;
    }
    cmd::say(format!("mesh-agent: {}", agent_bin.display()));
    Ok(built)
}

/// The glibc target of the machine xtask runs on (xtask is built for the host).
fn host_gnu_triple() -> Result<String> {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        bail!("release builds are made on Linux with glibc (Debian 12, as in CI)");
    }
    Ok(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
}

/// `--config` for a static-pie executable with packed relative relocations.
fn static_rustflags(triple: &str) -> String {
    format!(
        "target.{triple}.rustflags = \
         [\"-C\", \"target-feature=+crt-static\", \"-C\", \"link-arg=-Wl,-z,pack-relative-relocs\"]"
    )
}

/// C library functions that, in a static executable, load shared modules of the host's glibc
/// at run time (NSS for host, service, user and group names; iconv converters). Those modules
/// must come from the glibc version that was linked in, which no host can promise. (`dlopen`
/// itself is linked in whatever the program does, for glibc's own message catalogues, which a
/// program that never calls `setlocale` does not load.)
const NEEDS_HOST_GLIBC: &[&str] = &[
    "getaddrinfo",
    "gethostbyname",
    "gethostbyname_r",
    "getpwnam",
    "getpwnam_r",
    "getpwuid",
    "getpwuid_r",
    "getgrnam",
    "getgrnam_r",
    "getgrgid_r",
    "getservbyname",
    "getservbyname_r",
    "iconv_open",
];

/// Fails unless `bin` is a static executable that calls none of [`NEEDS_HOST_GLIBC`].
fn check_static(bin: &Path, data: &[u8]) -> Result<()> {
    let file = ElfFile64::<Endianness>::parse(data)
        .with_context(|| format!("{} is not a 64-bit ELF file", bin.display()))?;
    let endian = file.endian();
    let interpreted = file
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == elf::PT_INTERP);
    if interpreted {
        bail!(
            "{} is dynamically linked, but a release build must be static; RUSTFLAGS or \
             CARGO_ENCODED_RUSTFLAGS in the environment replace the release build's own flags \
             ({}): unset them",
            bin.display(),
            static_rustflags("<host>")
        );
    }
    let mut found: Vec<&str> = file
        .symbols()
        .filter_map(|symbol| symbol.name().ok())
        .filter(|name| NEEDS_HOST_GLIBC.contains(name))
        .collect();
    found.sort_unstable();
    found.dedup();
    if !found.is_empty() {
        bail!(
            "{} links {}, which a static executable can only use with the NSS or iconv \
             modules of the very glibc it was linked with; find the caller and do without it \
             (mesh-agent's http_client::http_address takes IP addresses rather than resolving names)",
            bin.display(),
            found.join(", ")
        );
    }
    Ok(())
}

/// A host cargo that hands the agent's build script the object explicitly (and no link map).
/// Every workspace cargo run in one xtask invocation uses this, so the build script sees the
/// same environment and does not rerun between build, clippy and test.
pub fn cargo_with_object(root: &Path, ebpf_object: &Path) -> Command {
    let mut cargo = cmd::host_cargo(root);
    cargo.env("MESH_EBPF_OBJECT", ebpf_object);
    cargo.env(LINK_MAP_ENV, "");
    cargo
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Links a small C program with the host's cc (which CI installs before xtask exists).
    fn link_c(dir: &Path, name: &str, body: &str, static_pie: bool) -> PathBuf {
        let source = dir.join(format!("{name}.c"));
        std::fs::write(&source, body).unwrap();
        let out = dir.join(name);
        let mut cc = Command::new("cc");
        if static_pie {
            cc.arg("-static-pie");
        }
        let status = cc.arg("-o").arg(&out).arg(&source).status().unwrap();
        assert!(status.success(), "cc failed for {name}");
        out
    }

    #[test]
    fn only_static_executables_without_host_modules_pass() {
        let dir = std::env::temp_dir().join(format!("xtask-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n";
        let resolver = "#include <netdb.h>\n#include <stddef.h>\n\
                        int main(void) { struct addrinfo *r; \
                        return getaddrinfo(\"localhost\", NULL, NULL, &r); }\n";

        let check = |bin: PathBuf| check_static(&bin, &std::fs::read(&bin).unwrap());
        let result = check(link_c(&dir, "static", plain, true));
        let dynamic = check(link_c(&dir, "dynamic", plain, false));
        let resolving = check(link_c(&dir, "resolving", resolver, true));
        std::fs::remove_dir_all(&dir).unwrap();

        result.unwrap();
        let dynamic = format!("{:#}", dynamic.unwrap_err());
        assert!(dynamic.contains("dynamically linked"), "{dynamic}");
        let resolving = format!("{:#}", resolving.unwrap_err());
        assert!(resolving.contains("links getaddrinfo"), "{resolving}");
    }
}
