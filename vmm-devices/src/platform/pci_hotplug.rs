//! The PCI hotplug controller of bus 0, as ACPI PCI hotplug uses it (QEMU's PIIX4 PCIU/PCID/
//! B0EJ registers, one bit per slot): the DSDT's `PCNT` reads which slots changed and
//! notifies their devices, and each slot's `_EJ0` ejects it. Our test guest uses the
//! registers directly.
//!
//! | offset | size | read | write |
//! |---|---|---|---|
//! | 0 | 4 | PCIU: slots a device was put in since the last read (the read clears it) | - |
//! | 4 | 4 | PCID: slots whose device the VMM asks the guest to eject | - |
//! | 8 | 4 | 0 | B0EJ: 1s eject those slots' devices (ACPI _EJ0) |
//!
//! A change is signalled through the GED (ged::EVENT_PCI_HOTPLUG). An eject is honoured only
//! for a slot the VMM asked to empty; any other is logged and ignored.

use crate::bus::Notify;
use crate::bus::{Action, PioDevice};

/// Below the PCI configuration ports (0xCF8), next to the CPU hotplug controller.
pub const PORT: u16 = 0x0ce8;
pub const LEN: u16 = 12;

pub struct PciHotplug {
    up: u32,
    down: u32,
    /// The slots the guest ejected (a bit each), for the VM's main loop.
    ejected: Notify<u32>,
}

impl PciHotplug {
    pub fn new(ejected: Notify<u32>) -> PciHotplug {
        PciHotplug {
            up: 0,
            down: 0,
            ejected,
        }
    }

    /// A device was put in `slot`: the guest's next scan finds it.
    pub fn inserted(&mut self, slot: u8) {
        self.up |= 1 << slot;
        self.down &= !(1 << slot);
    }

    /// Asks the guest to eject `slot`'s device (or stops asking).
    pub fn ask_eject(&mut self, slot: u8, ask: bool) {
        if ask {
            self.down |= 1 << slot;
            self.up &= !(1 << slot);
        } else {
            self.down &= !(1 << slot);
        }
    }

    /// Whether an eject of `slot` is asked and not done.
    pub fn eject_asked(&self, slot: u8) -> bool {
        self.down & (1 << slot) != 0
    }
}

impl PioDevice for PciHotplug {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            0 => std::mem::take(&mut self.up),
            4 => self.down,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data.fill(0);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Action {
        if offset != 8 {
            return Action::None;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let bits = u32::from_le_bytes(b);
        let ejected = bits & self.down;
        if bits & !ejected != 0 {
            log::warn!(
                "the guest ejected PCI slot(s) {:#x} that nobody asked it to; ignored",
                bits & !ejected
            );
        }
        if ejected != 0 {
            self.down &= !ejected;
            (self.ejected)(ejected);
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn inserts_are_read_once_and_only_asked_ejects_count() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut hp = PciHotplug::new(Box::new(move |bits| s.lock().unwrap().push(bits)));
        hp.inserted(3);
        let mut r = [0u8; 4];
        hp.read(0, &mut r);
        assert_eq!(u32::from_le_bytes(r), 1 << 3);
        hp.read(0, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0, "the read cleared it");
        // An eject nobody asked for is ignored.
        hp.write(8, &(1u32 << 3).to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        hp.ask_eject(3, true);
        hp.read(4, &mut r);
        assert_eq!(u32::from_le_bytes(r), 1 << 3);
        hp.write(8, &(1u32 << 3 | 1 << 5).to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![1 << 3]);
        assert!(!hp.eject_asked(3));
        hp.read(4, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0);
    }
}
