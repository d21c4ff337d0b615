//! Builds the test guest (tests/guest) with its own flags and target directory, and tells the
//! tests where it is (TEST_GUEST_ELF). A nested cargo, with the outer build's settings removed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("guest");
    for p in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--quiet"])
        .env("CARGO_TARGET_DIR", &out);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = k == "CARGO_HOME" || k == "CARGO_MAKEFLAGS";
        if !keep
            && (k.starts_with("CARGO_")
                || k.starts_with("RUSTC")
                || k == "RUSTFLAGS"
                || k == "RUSTDOCFLAGS")
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("CARGO_TARGET_DIR", &out);
    let output = cmd
        .output()
        .expect("cannot run cargo to build the test guest");
    if !output.status.success() {
        panic!(
            "building the test guest failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = out.join("release").join("test-guest");
    println!("cargo:rustc-env=TEST_GUEST_ELF={}", elf.display());
}
