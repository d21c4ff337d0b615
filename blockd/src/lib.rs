//! blockd's parts, as its binary (main.rs) and the fuzz targets (fuzz/) use them: the
//! vhost-user-blk device, the guest's requests, the images, and the control RPC.

pub mod backend;
pub mod commit;
pub mod connection;
pub mod disk;
pub mod engine;
pub mod exports;
pub mod faults;
pub mod image;
pub mod inflight;
pub mod job;
pub mod replay;
pub mod request;
pub mod rpc;
pub mod throttle;

use vhost::vhost_user::Listener;

/// A listening vhost-user socket at `path` (replacing a stale one). The path is not removed
/// when the listener goes: a sandboxed blockd cannot reach it then (the jail removes it).
pub fn bind_listener(path: &std::path::Path) -> std::io::Result<Listener> {
    Ok(Listener::from(vmm_proto::unix::bind(path, 0o600)?))
}
