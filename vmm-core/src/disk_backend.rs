//! A disk's vhost-user backend as the VM's devices use it: vocabulary only (it imports
//! nothing of this crate), shared by helpers/blockd.rs, which makes them, and the main
//! loop's messages (control.rs), which carry a hot-added one.

use std::path::PathBuf;
use std::sync::Arc;

/// A disk's vhost-user backend: an export of the VM's blockd, or a socket given.
pub struct DiskBackend {
    pub name: String,
    pub socket: PathBuf,
    pub queues: u16,
    /// Where it came from, for `vmmctl disk list` (the image's path, or "vhost-user socket").
    pub image: String,
    pub external: bool,
    /// Its transport in the running boot, for reconnecting after blockd restarts.
    pub device: DeviceSlot,
    /// The PCI slot it asks for (slot=), and its --disk spec as given.
    pub slot: Option<u8>,
    pub spec: String,
}

/// The transports of the disks blockd serves, set at each boot, to reconnect after a restart.
pub type DeviceSlot = Arc<
    std::sync::Mutex<
        Option<std::sync::Weak<std::sync::Mutex<vmm_devices::virtio::pci::VirtioPci>>>,
    >,
>;
