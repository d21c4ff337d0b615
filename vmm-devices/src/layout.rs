//! The guest-physical address map of the x86_64 platform: RAM around a 32-bit MMIO hole, and
//! the interrupt controllers' fixed addresses.

use vm_memory::GuestMemoryMmap;

/// RAM below 4 GiB ends here at most; from here to 4 GiB is the MMIO hole (PCI, IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 1 << 32;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const PAGE_SIZE: u64 = 4096;

/// Guest RAM as the VMM and its devices map it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The guest-physical ranges of RAM for a given size: (start, length, offset in the memfd).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low, 0)];
    if size > low {
        ranges.push((HIGH_RAM_START, size - low, low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20, 0)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30, 0)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, 3 << 30, 0), (HIGH_RAM_START, 1 << 30, 3 << 30)]
        );
    }
}
