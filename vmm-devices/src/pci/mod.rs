//! The PCI root bus: configuration space through the type-1 ports (0xCF8/0xCFC) and ECAM
//! (described to the guest by the MCFG table), BARs that the VMM assigns and the guest may size
//! and move, and the dispatch of MMIO exits to the device whose BAR holds the address.

pub mod config;
pub mod msix;

use crate::bus::{Action, MmioBus, PioDevice};
use std::sync::{Arc, Mutex};

pub use config::{Bar, ConfigSpace};

/// ECAM for bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;
/// The 32-bit MMIO window from which BARs are assigned (and that the host bridge's _CRS gives).
pub const MEM32_BASE: u64 = 0xc000_0000;
pub const MEM32_END: u64 = 0xdfff_ffff;
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;

pub trait PciDevice: Send {
    fn config(&mut self) -> &mut ConfigSpace;
    /// A config-space write, after the generic header has taken it (for capabilities).
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// A BAR was moved by the guest (or had its decoding switched on or off).
    fn bars_changed(&mut self) {}
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Each slot's share of the 32-bit MMIO window: its BARs are assigned there, so that a slot's
/// addresses do not depend on what else is (or was) on the bus.
pub const SLOT_WINDOW: u64 = (MEM32_END + 1 - MEM32_BASE) / 32;

/// Bus 0's devices by slot (function 0 only). Devices come and go while the VM runs (PCI
/// hotplug), so the slots are behind a lock that vCPU exits take for reading.
pub struct PciBus {
    slots: std::sync::RwLock<Vec<Option<SharedPciDevice>>>,
    /// The type-1 CONFIG_ADDRESS register.
    address: Mutex<u32>,
}

impl Default for PciBus {
    fn default() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = (0..32).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciBus {
            slots: std::sync::RwLock::new(slots),
            address: Mutex::new(0),
        }
    }
}

impl PciBus {
    /// Places the device in the first free slot and assigns its BARs in that slot's window;
    /// returns the slot (None: no slot free, or BARs larger than a slot's window).
    pub fn add(&self, dev: SharedPciDevice) -> Option<u8> {
        self.add_at(dev, None)
    }

    /// As `add`, in slot `want` when given (None: that slot is not free).
    pub fn add_at(&self, dev: SharedPciDevice, want: Option<u8>) -> Option<u8> {
        let mut slots = self.slots.write().unwrap();
        let slot = match want {
            Some(w) => {
                Some(usize::from(w)).filter(|&w| slots.get(w).is_some_and(Option::is_none))?
            }
            None => slots.iter().position(|s| s.is_none())?,
        };
        {
            let mut d = dev.lock().unwrap();
            let base = MEM32_BASE + slot as u64 * SLOT_WINDOW;
            let mut next = base;
            for bar in d.config().bars.iter_mut().flatten() {
                let addr = (next + bar.size - 1) & !(bar.size - 1);
                if addr + bar.size > base + SLOT_WINDOW {
                    return None;
                }
                bar.addr = addr;
                next = addr + bar.size;
            }
            d.config().sync_bars();
        }
        slots[slot] = Some(dev);
        Some(slot as u8)
    }

    /// Takes the device out of `slot` (never the host bridge's); the slot reads as empty.
    pub fn remove(&self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        self.slots
            .write()
            .unwrap()
            .get_mut(usize::from(slot))?
            .take()
    }

    fn device(&self, bus: u8, slot: u8, func: u8) -> Option<SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.read().unwrap().get(usize::from(slot))?.clone()
    }

    fn config_read(&self, bus: u8, slot: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.device(bus, slot, func) {
            Some(d) => d.lock().unwrap().config().read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u8, slot: u8, func: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, slot, func) {
            let mut d = d.lock().unwrap();
            let moved = d.config().write(offset, data);
            d.config_written(offset, data.len());
            if moved {
                d.bars_changed();
            }
        }
    }

    fn bar_at(&self, addr: u64) -> Option<(SharedPciDevice, usize, u64)> {
        for dev in self.slots.read().unwrap().iter().flatten() {
            let mut d = dev.lock().unwrap();
            if let Some((bar, off)) = d.config().decode(addr) {
                return Some((dev.clone(), bar, off));
            }
        }
        None
    }
}

/// ECAM and BAR MMIO. An address nothing decodes is not claimed.
impl MmioBus for PciBus {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
            let off = addr - ECAM_BASE;
            let (slot, func, reg) = ((off >> 15) as u8, ((off >> 12) & 7) as u8, off & 0xfff);
            self.config_read(0, slot, func, reg as usize, data);
            return true;
        }
        match self.bar_at(addr) {
            Some((dev, bar, offset)) => {
                dev.lock().unwrap().bar_read(bar, offset, data);
                true
            }
            None => false,
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
            let off = addr - ECAM_BASE;
            let (slot, func, reg) = ((off >> 15) as u8, ((off >> 12) & 7) as u8, off & 0xfff);
            self.config_write(0, slot, func, reg as usize, data);
            return true;
        }
        match self.bar_at(addr) {
            Some((dev, bar, offset)) => {
                dev.lock().unwrap().bar_write(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

/// The type-1 configuration mechanism: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC-0xCFF.
pub struct Type1(pub Arc<PciBus>);

impl PioDevice for Type1 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let addr = *self.0.address.lock().unwrap();
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&addr.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        if addr & 0x8000_0000 == 0 {
            data.fill(0xff);
            return;
        }
        let (bus, slot, func, reg) = split(addr);
        self.0
            .config_read(bus, slot, func, reg + usize::from(offset - 4), data);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Action {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                *self.0.address.lock().unwrap() = u32::from_le_bytes(data.try_into().unwrap());
            }
            return Action::None;
        }
        let addr = *self.0.address.lock().unwrap();
        if addr & 0x8000_0000 != 0 {
            let (bus, slot, func, reg) = split(addr);
            self.0
                .config_write(bus, slot, func, reg + usize::from(offset - 4), data);
        }
        Action::None
    }
}

fn split(addr: u32) -> (u8, u8, u8, usize) {
    (
        (addr >> 16) as u8,
        ((addr >> 11) & 0x1f) as u8,
        ((addr >> 8) & 7) as u8,
        (addr & 0xfc) as usize,
    )
}

/// 00:00.0, the host bridge (class 06.00), so that guests see a conventional root bus.
struct HostBridge(ConfigSpace);

impl HostBridge {
    fn new() -> HostBridge {
        // Red Hat's vendor id with the id QEMU uses for its generic PCIe host bridge.
        HostBridge(ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0, 0))
    }
}

impl PciDevice for HostBridge {
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev(ConfigSpace, Vec<u8>);
    impl PciDevice for Dev {
        fn config(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
        fn bar_read(&mut self, _: usize, off: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.1[off as usize..off as usize + data.len()]);
        }
        fn bar_write(&mut self, _: usize, off: u64, data: &[u8]) {
            self.1[off as usize..off as usize + data.len()].copy_from_slice(data);
        }
    }

    fn cfg_read32(t: &mut Type1, slot: u8, reg: u32) -> u32 {
        t.write(
            0,
            &(0x8000_0000 | (u32::from(slot) << 11) | reg).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        t.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg_write32(t: &mut Type1, slot: u8, reg: u32, v: u32) {
        t.write(
            0,
            &(0x8000_0000 | (u32::from(slot) << 11) | reg).to_le_bytes(),
        );
        t.write(4, &v.to_le_bytes());
    }

    #[test]
    fn enumerate_size_and_move_a_bar() {
        let bus = PciBus::default();
        let mut cs = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 0x1af4, 0x42);
        cs.add_bar(0, 0x4000);
        let slot = bus
            .add(Arc::new(Mutex::new(Dev(cs, vec![0; 0x4000]))))
            .unwrap();
        assert_eq!(slot, 1);
        let bus = Arc::new(bus);
        let mut t = Type1(bus.clone());
        assert_eq!(cfg_read32(&mut t, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read32(&mut t, 1, 0), 0x1042_1af4);
        assert_eq!(cfg_read32(&mut t, 2, 0), 0xffff_ffff);
        let bar = cfg_read32(&mut t, 1, 0x10);
        let first = MEM32_BASE + SLOT_WINDOW;
        assert_eq!(u64::from(bar), first, "slot 1's window");
        // Decoding is off until the guest enables memory space.
        assert!(!bus.mmio_write(first + 8, &[1]));
        cfg_write32(&mut t, 1, 0x04, 0x2);
        assert!(bus.mmio_write(first + 8, &[1]));
        // Sizing: all ones reads back the size mask.
        cfg_write32(&mut t, 1, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read32(&mut t, 1, 0x10), !(0x4000u32 - 1));
        cfg_write32(&mut t, 1, 0x10, 0xd000_0000);
        let mut b = [0u8; 1];
        assert!(bus.mmio_read(0xd000_0008, &mut b));
        assert_eq!(b[0], 1);
        assert!(!bus.mmio_read(first + 8, &mut b));
        // ECAM sees the same space.
        let mut w = [0u8; 4];
        assert!(bus.mmio_read(ECAM_BASE + (1 << 15), &mut w));
        assert_eq!(u32::from_le_bytes(w), 0x1042_1af4);
        // Hot-removed: the slot reads as empty and the BAR decodes no more; a device added
        // again gets the same slot and window.
        assert!(bus.remove(0).is_none(), "the host bridge stays");
        assert!(bus.remove(1).is_some());
        assert_eq!(cfg_read32(&mut t, 1, 0), 0xffff_ffff);
        assert!(!bus.mmio_read(0xd000_0008, &mut b));
        let mut cs = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 0x1af4, 0x42);
        cs.add_bar(0, 0x4000);
        assert_eq!(
            bus.add(Arc::new(Mutex::new(Dev(cs, vec![0; 0x4000])))),
            Some(1)
        );
        assert_eq!(u64::from(cfg_read32(&mut t, 1, 0x10)), first);
    }
}
