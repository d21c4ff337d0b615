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
pub mod image;
pub mod json;
pub mod record;
pub mod rpc;
pub mod size;
pub mod state;
pub mod terminal;
pub mod throttle;
pub mod unix;

/// A state message as a restore gets it: written out as bytes (as in a stream) and read back.
/// The device state tests of vmm-core and vmm-devices use it.
pub fn through_bytes(
    msg: &capnp::message::Builder<capnp::message::HeapAllocator>,
) -> capnp::message::Reader<capnp::serialize::OwnedSegments> {
    let bytes = capnp::serialize::write_message_to_words(msg);
    capnp::serialize::read_message(&mut &bytes[..], capnp::message::ReaderOptions::new())
        .expect("a message just written reads back")
}
