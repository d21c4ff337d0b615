//! The bus that dispatches vCPU exits: port-I/O ranges to the platform's devices, MMIO to the
//! PCI bus. It holds the vocabulary every device shares (PioDevice, Action).

use std::sync::{Arc, Mutex};

/// What a device write asks of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    PowerOff,
    Reset,
    Panic,
}

pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> Action;
}

pub type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// How a device tells the VM of something the guest did that is not an exit's result (the
/// VM's main loop hands it in; the device cannot see the VM).
pub type Notify<T> = Box<dyn Fn(T) + Send>;

/// What answers the MMIO exits: false for an address nobody claims.
pub trait MmioBus: Send + Sync {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
}

/// Port-I/O ranges (base, length) and their devices; ports nobody claims read as all ones.
#[derive(Default)]
pub struct IoBus {
    ranges: Vec<(u16, u16, SharedDevice)>,
    /// MMIO exits go here: the PCI bus (ECAM and BARs).
    pub mmio: Option<Arc<dyn MmioBus>>,
    /// Exits handled, for the API and the no-exit-per-I/O check.
    pub pio_exits: std::sync::atomic::AtomicU64,
    pub mmio_exits: std::sync::atomic::AtomicU64,
}

impl IoBus {
    pub fn insert(&mut self, base: u16, len: u16, dev: SharedDevice) {
        assert!(
            !self
                .ranges
                .iter()
                .any(|(b, l, _)| base < b + l && *b < base + len),
            "overlapping port ranges at {base:#x}"
        );
        self.ranges.push((base, len, dev));
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        self.ranges
            .iter()
            .find(|(b, l, _)| port >= *b && port < b + l)
            .map(|(b, _, d)| (port - b, d))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.mmio_exits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.mmio.as_ref().is_some_and(|m| m.mmio_read(addr, data))
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.mmio_exits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.mmio.as_ref().is_some_and(|m| m.mmio_write(addr, data))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        self.pio_exits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.find(port) {
            Some((off, dev)) => dev.lock().unwrap().read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> Action {
        self.pio_exits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.find(port) {
            Some((off, dev)) => dev.lock().unwrap().write(off, data),
            None => Action::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(u8);
    impl PioDevice for Latch {
        fn read(&mut self, _: u16, data: &mut [u8]) {
            data[0] = self.0;
        }
        fn write(&mut self, off: u16, data: &[u8]) -> Action {
            self.0 = data[0] + off as u8;
            Action::None
        }
    }

    #[test]
    fn dispatches_by_range_and_floats_unclaimed_ports() {
        let mut bus = IoBus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Latch(0))));
        bus.write(0x102, &[5]);
        let mut b = [0u8; 1];
        bus.read(0x100, &mut b);
        assert_eq!(b[0], 7);
        let mut w = [0u8; 2];
        bus.read(0x104, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
