//! virtio devices: the modern virtio-pci transport, and the vhost-user devices behind it.

pub mod pci;
pub mod vhost_user_blk;

use vmm_sys_util::eventfd::EventFd;

pub const F_VERSION_1: u64 = 1 << 32;

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
    fn activate(&mut self, features: u64, queues: &[QueueSetup]) -> Result<(), String>;
    /// The driver reset the device: stop the queues.
    fn reset(&mut self);
    /// A name for the log ("disk0").
    fn name(&self) -> &str;
    /// The device's backend came back after a crash: set it up again as it was (queues that
    /// run go on from where the guest's used rings are).
    fn reconnect(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// For a snapshot or a migration, with the VM paused: stops the started queues once the
    /// requests they hold have completed, and returns where each goes on (by queue index).
    fn stop_queues(&mut self) -> Result<Vec<(u16, u16)>, String>;
    /// Starts the queues again, each at its base: after `stop_queues` (the VM goes on) or on
    /// a destination that restores the device.
    fn start_queues(
        &mut self,
        features: u64,
        queues: &[QueueSetup],
        bases: &[(u16, u16)],
    ) -> Result<(), String>;
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
    /// The device's configuration space as the guest set it, and the same put back.
    fn config_bytes(&self) -> Vec<u8>;
    fn restore_config(&mut self, bytes: &[u8]) -> Result<(), String>;
}
