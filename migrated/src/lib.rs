//! migrated: the stream format, the channels, and the server vmm-core drives.
pub mod channel;
pub mod postcopy;
pub mod ram;
pub mod server;
pub mod stream;
pub mod tls;
pub mod wire;
