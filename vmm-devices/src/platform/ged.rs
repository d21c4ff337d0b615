//! The ACPI Generic Event Device (ACPI0013) of a hardware-reduced platform: one status
//! register of pending events (write 1 to clear) and an edge interrupt. The DSDT's `_EVT`
//! reads it and notifies the device concerned: the power button, the CPU or PCI hotplug scan,
//! or the VMGenID device.

use crate::bus::{Action, PioDevice};
use vmm_sys_util::eventfd::EventFd;

pub const PORT: u16 = 0x610;
pub const GSI: u32 = 9;
/// Status bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Status bit: a vCPU is being added or removed (see cpu_hotplug).
pub const EVENT_CPU_HOTPLUG: u8 = 1 << 1;
/// Status bit: the VM generation ID changed (a restore); the DSDT notifies the VMGenID device.
pub const EVENT_VMGENID: u8 = 1 << 2;
/// Status bit: a PCI device is being added or removed (see pci_hotplug).
pub const EVENT_PCI_HOTPLUG: u8 = 1 << 3;

pub struct Ged {
    pending: u8,
    irq: EventFd,
}

impl Ged {
    pub fn new(irq: EventFd) -> Ged {
        Ged { pending: 0, irq }
    }

    /// Records `event` and interrupts the guest.
    pub fn notify(&mut self, event: u8) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.write(1)
    }
}

impl Ged {
    pub fn save(&self, mut b: vmm_proto::state_capnp::ged::Builder) {
        b.set_pending(self.pending);
    }

    pub fn restore(&mut self, r: vmm_proto::state_capnp::ged::Reader) {
        self.pending = r.get_pending();
    }
}

impl PioDevice for Ged {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.pending;
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Action {
        self.pending &= !data.first().copied().unwrap_or(0);
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_stay_pending_until_written_back() {
        let irq = EventFd::new(0).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        ged.notify(EVENT_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        ged.read(0, &mut b);
        assert_eq!(b[0], EVENT_POWER_BUTTON);
        ged.write(0, &[0]);
        ged.read(0, &mut b);
        assert_eq!(b[0], EVENT_POWER_BUTTON, "writing 0 clears nothing");
        ged.write(0, &[EVENT_POWER_BUTTON]);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0);
    }
}
