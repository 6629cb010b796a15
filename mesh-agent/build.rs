//! Embeds the compiled eBPF object so `mesh-agent` is a single self-contained binary, and
//! links release builds with the code layout of `layout.ld`.
//!
//! The object is built by `cargo xtask build-ebpf` (it needs a different target and toolchain
//! than the agent). `MESH_EBPF_OBJECT` names it explicitly; otherwise the object of the same
//! profile under target/bpfel-unknown-none is used, then the other profile's.
//!
//! `layout.ld` (written by `cargo xtask layout`) places the functions an agent runs ahead of
//! the rest of the code, so an idle agent maps about the code it runs instead of most of its
//! binary (docs/benchmarks.md, change 11). `MESH_AGENT_LINK_MAP`, when set and not empty, has
//! the linker write its map there (`cargo xtask layout` reads it).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let other = if profile == "release" {
        "debug"
    } else {
        "release"
    };
    let candidates: Vec<PathBuf> = match std::env::var_os("MESH_EBPF_OBJECT") {
        Some(p) => vec![PathBuf::from(p)],
        None => [profile.as_str(), other]
            .iter()
            .map(|p| {
                target_dir
                    .join("bpfel-unknown-none")
                    .join(p)
                    .join("mesh-ebpf")
            })
            .collect(),
    };
    for c in &candidates {
        println!("cargo:rerun-if-changed={}", c.display());
    }
    let Some(object) = candidates.iter().find(|c| c.is_file()) else {
        panic!(
            "\n\nthe eBPF object is missing (looked for {}).\n\
             Build it first with `cargo xtask build-ebpf` (or build everything with `cargo xtask build`).\n\n",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mesh-ebpf.o");
    std::fs::copy(object, &out).expect("cannot copy the eBPF object into OUT_DIR");

    println!("cargo:rerun-if-changed=layout.ld");
    println!("cargo:rerun-if-env-changed=MESH_AGENT_LINK_MAP");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if profile == "release" && linux {
        // INSERT BEFORE .text in the script adds to the linker's default layout rather than
        // replacing it (GNU ld and lld).
        let script = manifest.join("layout.ld");
        println!(
            "cargo:rustc-link-arg-bin=mesh-agent=-Wl,-T,{}",
            script.display()
        );
    }
    if let Some(map) = std::env::var_os("MESH_AGENT_LINK_MAP").filter(|m| !m.is_empty()) {
        // Mangled names in the map, as profilers and symbol tables give them.
        println!(
            "cargo:rustc-link-arg-bin=mesh-agent=-Wl,-Map={},--no-demangle",
            PathBuf::from(map).display()
        );
    }
}
