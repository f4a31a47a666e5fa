//! Tells the engine where `scripts/fetch-litert.py` puts the pinned runtime for this target, so a
//! `cargo build` in the repository finds it at run time without any exported variable.
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| manifest_dir.join("../.."));
    let lock = root.join("scripts/litert-runtime.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let version = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
        })
        .unwrap_or("unknown");
    let target = std::env::var("TARGET").unwrap();
    let dir = root.join(".cache/litert").join(version).join(&target);
    println!("cargo:rustc-env=DERMEDGE_DEV_LITERT_DIR={}", dir.display());
    println!("cargo:rustc-env=DERMEDGE_TARGET={target}");
}
