//! A type-0 configuration space: the header, 32-bit memory BARs, and a capability list.

use vmm_proto::state::StateError;

const SIZE: usize = 256;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAP: usize = 0x40;
pub const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAP_LIST: u16 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub addr: u64,
    /// A power of two, at least 16 bytes.
    pub size: u64,
}

pub struct ConfigSpace {
    bytes: [u8; SIZE],
    wmask: [u8; SIZE],
    pub bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    pub fn new(vendor: u16, device: u16, class: u32, sub_vendor: u16, sub_id: u16) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; SIZE],
            wmask: [0; SIZE],
            bars: [None; 6],
            next_cap: FIRST_CAP,
            last_cap: None,
        };
        c.put(0, &vendor.to_le_bytes());
        c.put(2, &device.to_le_bytes());
        c.put(0x08, &[1]); // revision 1 (virtio 1.x devices must have at least 1)
        c.put(
            0x09,
            &[
                (class & 0xff) as u8,
                (class >> 8) as u8,
                (class >> 16) as u8,
            ],
        );
        c.put(0x2c, &sub_vendor.to_le_bytes());
        c.put(0x2e, &sub_id.to_le_bytes());
        // Memory space, bus master and INTx disable are writable; so is the interrupt line.
        c.wmask[COMMAND] = 0x06;
        c.wmask[COMMAND + 1] = 0x04;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put(&mut self, off: usize, data: &[u8]) {
        self.bytes[off..off + data.len()].copy_from_slice(data);
    }

    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    /// A 32-bit, non-prefetchable memory BAR.
    pub fn add_bar(&mut self, index: usize, size: u64) {
        assert!(size.is_power_of_two() && (16..=1 << 31).contains(&size));
        self.bars[index] = Some(Bar { addr: 0, size });
        let mask = !(size as u32 - 1);
        let off = BAR0 + 4 * index;
        self.wmask[off..off + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Writes the BARs' addresses into their registers (after the VMM assigned them).
    pub fn sync_bars(&mut self) {
        for i in 0..6 {
            if let Some(bar) = self.bars[i] {
                self.put(BAR0 + 4 * i, &(bar.addr as u32).to_le_bytes());
            }
        }
    }

    /// Appends a capability (its first two bytes, id and next, are filled in here) whose bytes
    /// are writable where `wmask` has bits set. Returns its offset.
    pub fn add_capability(&mut self, data: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        assert!(
            off + data.len() <= SIZE,
            "capabilities overflow config space"
        );
        self.put(off, data);
        self.bytes[off + 1] = 0;
        for (i, m) in wmask.iter().enumerate() {
            self.wmask[off + i] = *m;
        }
        match self.last_cap {
            Some(last) => self.bytes[last + 1] = off as u8,
            None => {
                self.bytes[CAP_PTR] = off as u8;
                let status = u16::from_le_bytes([self.bytes[STATUS], self.bytes[STATUS + 1]])
                    | STATUS_CAP_LIST;
                self.put(STATUS, &status.to_le_bytes());
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + data.len() + 3) & !3;
        off
    }

    pub fn bytes(&self, off: usize, len: usize) -> &[u8] {
        &self.bytes[off..off + len]
    }

    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(off + i).copied().unwrap_or(0);
        }
    }

    /// Applies a guest write through the write mask. Returns whether a BAR's address or
    /// memory decoding changed.
    pub fn write(&mut self, off: usize, data: &[u8]) -> bool {
        let before = (self.command() & COMMAND_MEMORY, self.bars);
        for (i, b) in data.iter().enumerate() {
            let at = off + i;
            if at >= SIZE {
                break;
            }
            let m = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !m) | (b & m);
        }
        for i in 0..6 {
            if let Some(bar) = self.bars[i].as_mut() {
                let reg = BAR0 + 4 * i;
                let v = u32::from_le_bytes(self.bytes[reg..reg + 4].try_into().unwrap());
                bar.addr = u64::from(v & !(bar.size as u32 - 1));
            }
        }
        before != (self.command() & COMMAND_MEMORY, self.bars)
    }

    /// Which BAR (and offset in it) decodes this address, if memory decoding is on.
    pub fn decode(&self, addr: u64) -> Option<(usize, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        self.bars.iter().enumerate().find_map(|(i, b)| {
            let b = b.as_ref()?;
            (addr >= b.addr && addr < b.addr + b.size).then(|| (i, addr - b.addr))
        })
    }

    pub fn save(&self, mut b: vmm_proto::state_capnp::pci_config::Builder) {
        b.set_bytes(&self.bytes);
        let bars: Vec<(usize, Bar)> = self
            .bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
            .collect();
        let mut list = b.init_bars(bars.len() as u32);
        for (k, (i, bar)) in bars.into_iter().enumerate() {
            let mut e = list.reborrow().get(k as u32);
            e.set_index(i as u8);
            e.set_addr(bar.addr);
            e.set_size(bar.size);
        }
    }

    /// Takes a saved configuration space; it must be of the same function (the same BARs and
    /// read-only bytes), or it is refused and nothing changes.
    pub fn restore(
        &mut self,
        r: vmm_proto::state_capnp::pci_config::Reader,
    ) -> Result<(), StateError> {
        let bytes = r
            .get_bytes()
            .map_err(StateError::read("its configuration space"))?;
        if bytes.len() != SIZE {
            return Err(StateError::Size {
                part: "its configuration space",
                got: bytes.len(),
                want: SIZE,
            });
        }
        for (i, (theirs, ours)) in bytes.iter().zip(self.bytes).enumerate() {
            if (theirs ^ ours) & !self.wmask[i] != 0 && !(BAR0..BAR0 + 24).contains(&i) {
                return Err(StateError::ConfigReadOnly(i, *theirs, ours));
            }
        }
        let mut bars = self.bars;
        for e in r.get_bars().map_err(StateError::read("its BARs"))?.iter() {
            let i = usize::from(e.get_index());
            match bars.get_mut(i).and_then(|b| b.as_mut()) {
                Some(b) if b.size == e.get_size() && e.get_addr() % b.size == 0 => {
                    b.addr = e.get_addr()
                }
                _ => return Err(StateError::Bar(i, e.get_size(), e.get_addr())),
            }
        }
        self.bytes.copy_from_slice(bytes);
        self.bars = bars;
        Ok(())
    }

    /// The BAR's address when the guest has memory decoding on.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        self.bars[index].map(|b| b.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_list_links_and_masks() {
        let mut c = ConfigSpace::new(1, 2, 0x010000, 3, 4);
        let a = c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0], &[]);
        let b = c.add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0]);
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(c.bytes[CAP_PTR], 0x40);
        assert_eq!(c.bytes[0x41], 0x48);
        assert_eq!(c.bytes[0x49], 0);
        assert!(c.bytes[STATUS] & 0x10 != 0);
        c.write(0x48, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.bytes(0x48, 4), &[0x11, 0, 0, 0xc0]);
        // The vendor id is read-only.
        c.write(0, &[9, 9]);
        assert_eq!(c.bytes(0, 2), &[1, 0]);
    }
}
