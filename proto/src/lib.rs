//! The control plane's Cap'n Proto schemas (schema/*.capnp) and their generated Rust code.

capnp::generated_code!(pub mod vmm_capnp);
capnp::generated_code!(pub mod chardevd_capnp);
capnp::generated_code!(pub mod blockd_capnp);
capnp::generated_code!(pub mod state_capnp);
capnp::generated_code!(pub mod migrated_capnp);

/// Where the generated code is vendored, so that a build without `capnp` still works.
pub const VENDORED_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/generated");

pub mod channel;
pub mod faults;
pub mod fdpass;
pub mod rpc;
pub mod terminal;
pub mod throttle;
