//! virtio devices: the modern virtio-pci transport, and the vhost-user devices behind it.

pub mod pci;
pub mod vhost_user;

use std::path::PathBuf;
use vmm_sys_util::eventfd::EventFd;

pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// What a virtio device's backend refused or failed, by the device and its backend.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A vhost-user message failed, or the backend's answer cannot serve this device.
    #[error("vhost-user backend at {}: {what}: {why}", .socket.display())]
    Backend {
        socket: PathBuf,
        what: &'static str,
        why: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("queue {queue}'s {what} at {gpa:#x} (+{len:#x}) is not in guest RAM")]
    NotInRam {
        queue: u16,
        what: &'static str,
        gpa: u64,
        len: u64,
    },
    #[error("queue {0}'s used ring: {1}")]
    UsedRing(u16, vm_memory::GuestMemoryError),
    #[error("{device}: queue {queue} still has {requests} request(s) in flight after 30 s; the backend ({}) is stuck", .socket.display())]
    Stuck {
        device: String,
        queue: u16,
        requests: u16,
        socket: PathBuf,
    },
    #[error(transparent)]
    State(#[from] vmm_proto::state::StateError),
}

/// A queue as the driver set it up, handed to the device when the driver is ready.
pub struct QueueSetup<'a> {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// What a virtio device does behind the transport.
/// A device backend's userfaultfd and its mappings of guest RAM (address in the backend,
/// guest address, bytes), for post-copy.
pub type PostcopyBackend = (std::fs::File, Vec<(u64, u64, u64)>);

pub trait VirtioDevice: Send {
    /// The virtio device id (2 is block).
    fn device_type(&self) -> u16;
    fn num_queues(&self) -> u16;
    fn max_queue_size(&self) -> u16;
    /// The features offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start the queues.
    fn activate(&mut self, features: u64, queues: &[QueueSetup]) -> Result<(), VirtioError>;
    /// The driver reset the device: stop the queues.
    fn reset(&mut self);
    /// A name for the log ("disk0").
    fn name(&self) -> &str;
    /// The device's backend came back after a crash: set it up again as it was (queues that
    /// run go on from where the guest's used rings are).
    fn reconnect(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// The device is leaving the VM (hot-remove): waits, up to `limit`, until the backend has
    /// answered every request the driver made available. Returns how many it has not.
    fn drain(&mut self, _limit: std::time::Duration) -> u64 {
        0
    }
    /// For a snapshot or a migration, with the VM paused: stops the started queues once the
    /// requests they hold have completed, and returns where each goes on (by queue index).
    fn stop_queues(&mut self) -> Result<Vec<(u16, u16)>, VirtioError>;
    /// Starts the queues again, each at its base: after `stop_queues` (the VM goes on) or on
    /// a destination that restores the device.
    fn start_queues(
        &mut self,
        features: u64,
        queues: &[QueueSetup],
        bases: &[(u16, u16)],
    ) -> Result<(), VirtioError>;
    /// A migration's dirty logging: its backend logs what it writes into guest memory in
    /// `log` (None: logging ends). Returns whether the backend logs now; a device whose
    /// backend writes guest memory and cannot log makes the last pass resend all of RAM.
    fn set_dirty_log(&mut self, _log: Option<&crate::dirty_log::SharedDirtyLog>) -> bool {
        false
    }
    /// Whether its backend logs its writes (set_dirty_log took).
    fn logs_dirty(&self) -> bool {
        false
    }
    /// The used rings its backend writes, as (guest address, bytes): a migration's last pass
    /// sends them whatever the logs say.
    fn used_rings(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Post-copy, on the destination before the device starts: its backend (a process that
    /// maps guest RAM itself) makes a userfaultfd for its mapping and says where that lies,
    /// as (address in the backend, guest address, bytes). None: no process of its own maps
    /// guest RAM. Its faults wait until `postcopy_served`, after which its queues may run.
    fn postcopy_advise(&mut self) -> Result<Option<PostcopyBackend>, VirtioError> {
        Ok(None)
    }
    /// The backend's faults are served now.
    fn postcopy_served(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// Every page is here: the backend's memory leaves its userfaultfd.
    fn postcopy_end(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// The backend's configuration changed (a disk grew): read it again. Returns whether it
    /// differs, so that the guest is told (a config-change interrupt).
    fn refresh_config(&mut self) -> Result<bool, VirtioError> {
        Ok(false)
    }
    /// The device's configuration space as the guest set it, and the same put back.
    fn config_bytes(&self) -> Vec<u8>;
    fn restore_config(&mut self, bytes: &[u8]) -> Result<(), VirtioError>;
}
