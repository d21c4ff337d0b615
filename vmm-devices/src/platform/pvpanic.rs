//! QEMU's pvpanic ISA device (ACPI QEMU0001): the guest writes bit 0 when it panics.

use crate::bus::{Action, PioDevice};

pub const PORT: u16 = 0x505;
const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

#[derive(Default)]
pub struct PvPanic;

impl PioDevice for PvPanic {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // The events this device supports.
        data.fill(0);
        data[0] = PANICKED | CRASH_LOADED;
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        if v & PANICKED != 0 {
            Action::Panic
        } else {
            if v & CRASH_LOADED != 0 {
                log::warn!("guest panicked and is running its crash kernel");
            }
            Action::None
        }
    }
}
