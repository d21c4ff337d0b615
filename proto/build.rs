//! Generates Rust from the schemas with the `capnp` compiler when it is installed; otherwise
//! uses the generated code committed under src/generated (refresh it with
//! `CAPNP_UPDATE_VENDORED=1 cargo build -p vmm-proto`).

use std::path::{Path, PathBuf};

const SCHEMAS: &[&str] = &["vmm", "chardevd", "blockd", "state", "migrated"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let vendored = manifest.join("src").join("generated");
    for s in SCHEMAS {
        println!("cargo:rerun-if-changed=schema/{s}.capnp");
    }
    println!("cargo:rerun-if-env-changed=CAPNP_UPDATE_VENDORED");
    let have_capnp = std::process::Command::new("capnp")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_capnp {
        let mut cmd = capnpc::CompilerCommand::new();
        cmd.src_prefix(manifest.join("schema")).output_path(&out);
        for s in SCHEMAS {
            cmd.file(manifest.join("schema").join(format!("{s}.capnp")));
        }
        cmd.run().expect("capnp compile");
        if std::env::var_os("CAPNP_UPDATE_VENDORED").is_some() {
            std::fs::create_dir_all(&vendored).unwrap();
            for s in SCHEMAS {
                copy(&out, &vendored, s);
            }
        }
    } else {
        println!("cargo:warning=capnp is not installed; using the generated code in proto/src/generated (apt-get install capnproto to regenerate)");
        for s in SCHEMAS {
            copy(&vendored, &out, s);
        }
    }
}

fn copy(from: &Path, to: &Path, schema: &str) {
    let name = format!("{schema}_capnp.rs");
    std::fs::copy(from.join(&name), to.join(&name))
        .unwrap_or_else(|e| panic!("copy {name} from {}: {e}", from.display()));
}
