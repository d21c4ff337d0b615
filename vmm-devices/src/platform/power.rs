//! ACPI power management for a hardware-reduced platform (the FADT's sleep control, sleep
//! status and reset registers), plus the i8042 pulse-reset that `reboot=k` uses.

use crate::bus::{Action, PioDevice};

pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
pub const RESET_PORT: u16 = 0x602;
pub const PORTS: u16 = 3;
pub const RESET_VALUE: u8 = 0x01;
/// The sleep type the DSDT's \_S5 package names: writing it with SLP_EN powers off.
pub const SLP_TYP_S5: u8 = 5;
const SLP_EN: u8 = 1 << 5;

#[derive(Default)]
pub struct PowerDevice;

impl PioDevice for PowerDevice {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        match offset + SLEEP_CONTROL_PORT {
            SLEEP_CONTROL_PORT if v & SLP_EN != 0 => {
                let typ = (v >> 2) & 7;
                if typ == SLP_TYP_S5 {
                    Action::PowerOff
                } else {
                    log::warn!(
                        "guest asked for sleep state type {typ}, which is not supported; ignoring"
                    );
                    Action::None
                }
            }
            RESET_PORT if v == RESET_VALUE => Action::Reset,
            _ => Action::None,
        }
    }
}

/// The keyboard controller's status and command ports: only the pulse-reset command (0xfe).
#[derive(Default)]
pub struct I8042;

pub const I8042_COMMAND_PORT: u16 = 0x64;

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Action {
        if data.first() == Some(&0xfe) {
            Action::Reset
        } else {
            Action::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_register_resets() {
        let mut p = PowerDevice;
        assert_eq!(p.write(0, &[(SLP_TYP_S5 << 2) | SLP_EN]), Action::PowerOff);
        assert_eq!(p.write(0, &[SLP_TYP_S5 << 2]), Action::None);
        assert_eq!(p.write(0, &[(3 << 2) | SLP_EN]), Action::None);
        assert_eq!(p.write(2, &[RESET_VALUE]), Action::Reset);
        assert_eq!(I8042.write(0, &[0xfe]), Action::Reset);
    }
}
