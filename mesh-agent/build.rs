//! Embeds the compiled eBPF object so `mesh-agent` is a single self-contained binary.
//!
//! The object is built by `cargo xtask build-ebpf` (it needs a different target and toolchain
//! than the agent). `MESH_EBPF_OBJECT` names it explicitly; otherwise the object of the same
//! profile under target/bpfel-unknown-none is used, then the other profile's.

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
}
