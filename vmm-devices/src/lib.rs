//! The guest platform's devices, apart from the VMM that runs them: the bus that vCPU exits
//! are dispatched on, the port-I/O platform devices, the PCI bus and the virtio-pci transports
//! with their vhost-user devices. This crate cannot see vmm-core: a device tells the VM what it
//! wants through a return value (bus::Action) or a callback it was given.

pub mod bus;
pub mod dirty_log;
pub mod layout;
pub mod pci;
pub mod platform;
pub mod virtio;
