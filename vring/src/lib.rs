//! The parts of a vhost-user backend that every helper serving one shares: a virtqueue as the
//! frontend's messages set it up and a worker serves it (`Vring`), guest memory as the
//! frontend's memory table maps it (`Memory`), and the frontend's dirty log (`dirty`).

pub mod dirty;
mod vring;

pub use vring::{State, Vring};

/// Guest memory as a backend maps it from the frontend's memory table, swapped whole when the
/// table changes.
pub type Memory = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>;
