//! Guest RAM: one memfd mapped MAP_SHARED (so helpers handed its fd see the same pages), laid
//! out around a 32-bit MMIO hole, and registered with KVM.

use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// RAM below 4 GiB ends here at most; from here to 4 GiB is the MMIO hole (PCI, IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 1 << 32;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const PAGE_SIZE: u64 = 4096;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("cannot register guest RAM with KVM")]
    Register(#[source] kvm_ioctls::Error),
    #[error("cannot read KVM's dirty log")]
    DirtyLog(#[source] kvm_ioctls::Error),
}

/// The guest-physical ranges of RAM for a given size: (start, length, offset in the memfd).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low, 0)];
    if size > low {
        ranges.push((HIGH_RAM_START, size - low, low));
    }
    ranges
}

/// Guest RAM and the memfd behind it.
pub struct Memory {
    pub guest: GuestMemory,
    pub memfd: File,
    pub size: u64,
}

impl Memory {
    pub fn new(size: u64) -> Result<Memory, MemoryError> {
        let name = c"guest-ram";
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a new memfd that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|e| MemoryError::Truncate(size, e))?;
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = ram_ranges(size)
            .into_iter()
            .map(|(start, len, off)| {
                let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
                Ok((
                    GuestAddress(start),
                    len as usize,
                    Some(FileOffset::new(file, off)),
                ))
            })
            .collect::<Result<_, MemoryError>>()?;
        let guest = GuestMemory::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        Ok(Memory { guest, memfd, size })
    }

    /// Registers every region as a KVM memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        self.register_with(vm, 0)
    }

    /// Turns KVM's dirty log on or off for every slot (KVM_MEM_LOG_DIRTY_PAGES); the guest
    /// runs on meanwhile.
    pub fn log_dirty(&self, vm: &VmFd, on: bool) -> Result<(), MemoryError> {
        self.register_with(
            vm,
            if on {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        )
    }

    /// How many pages the guest wrote since the last call (or since logging began); the log
    /// starts over.
    pub fn take_dirty(&self, vm: &VmFd) -> Result<u64, MemoryError> {
        let mut pages = 0u64;
        for (slot, region) in self.guest.iter().enumerate() {
            let bitmap = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(MemoryError::DirtyLog)?;
            pages += bitmap
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
        }
        Ok(pages)
    }

    /// The pages the guest wrote since the last call, as a bitmap over the memfd's pages
    /// (the slots lie end to end in it, each a whole number of 64-page words); the log starts
    /// over.
    pub fn take_dirty_bitmap(&self, vm: &VmFd) -> Result<Vec<u64>, MemoryError> {
        let mut all = Vec::new();
        for (slot, region) in self.guest.iter().enumerate() {
            let mut bitmap = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(MemoryError::DirtyLog)?;
            bitmap.resize((region.len() / PAGE_SIZE).div_ceil(64) as usize, 0);
            all.extend(bitmap);
        }
        Ok(all)
    }

    fn register_with(&self, vm: &VmFd, flags: u32) -> Result<(), MemoryError> {
        for (slot, region) in self.guest.iter().enumerate() {
            let mem_region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the mapping is valid for memory_size bytes and outlives the VM: Memory
            // is dropped after the VM fd (see vm::run).
            unsafe { vm.set_user_memory_region(mem_region) }.map_err(MemoryError::Register)?;
        }
        Ok(())
    }
}

/// vhost-user's dirty log (LOG_SHMFD): a bitmap in a memfd shared with every vhost-user
/// backend, one bit per 4 KiB page of guest physical address, that a backend sets for each
/// page it writes while VHOST_F_LOG_ALL is acked. vmm-core reads and clears it with KVM's.
pub struct SharedDirtyLog {
    file: File,
    ptr: *mut u64,
    words: usize,
    /// The VM's RAM ranges (gpa, bytes, memfd offset), for the translation to memfd pages.
    ranges: Vec<(u64, u64, u64)>,
}

// SAFETY: the mapping is only touched through atomic word operations.
unsafe impl Send for SharedDirtyLog {}

impl SharedDirtyLog {
    /// A log that covers all guest RAM of a VM of `size` bytes.
    pub fn new(size: u64) -> std::io::Result<SharedDirtyLog> {
        let ranges = ram_ranges(size);
        let top = ranges
            .iter()
            .map(|&(gpa, len, _)| gpa + len)
            .max()
            .unwrap_or(0);
        let words = (top / PAGE_SIZE).div_ceil(64) as usize;
        let bytes = (words * 8).max(8);
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new memfd nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes as u64)?;
        // SAFETY: a fresh shared mapping of the whole file; checked, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedDirtyLog {
            file,
            ptr: ptr.cast(),
            words: bytes / 8,
            ranges,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn bytes(&self) -> u64 {
        self.words as u64 * 8
    }

    /// Takes (and clears) what the backends logged, ORed into `bitmap`, a bitmap over the
    /// memfd's pages as KVM's dirty log is taken.
    pub fn take_into(&self, bitmap: &mut Vec<u64>) {
        for w in 0..self.words {
            // SAFETY: `w` is within the mapping; AtomicU64 has u64's layout and the mapping
            // is page-aligned.
            let cell = unsafe { &*(self.ptr.add(w) as *const std::sync::atomic::AtomicU64) };
            let mut bits = cell.swap(0, std::sync::atomic::Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let gpa = (w as u64 * 64 + b) * PAGE_SIZE;
                mark_in(bitmap, &self.ranges, gpa, PAGE_SIZE);
            }
        }
    }
}

/// Sets, in a bitmap over the memfd's pages, the pages of `len` bytes at guest physical
/// address `gpa` (what lies outside RAM is left out).
pub fn mark_gpa(bitmap: &mut Vec<u64>, size: u64, gpa: u64, len: u64) {
    mark_in(bitmap, &ram_ranges(size), gpa, len)
}

fn mark_in(bitmap: &mut Vec<u64>, ranges: &[(u64, u64, u64)], gpa: u64, len: u64) {
    if len == 0 {
        return;
    }
    for &(start, rlen, offset) in ranges {
        let (a, b) = (gpa.max(start), (gpa + len).min(start + rlen));
        if a >= b {
            continue;
        }
        let first = (offset + a - start) / PAGE_SIZE;
        let last = (offset + b - 1 - start) / PAGE_SIZE;
        for page in first..=last {
            let w = (page / 64) as usize;
            if bitmap.len() <= w {
                bitmap.resize(w + 1, 0);
            }
            bitmap[w] |= 1 << (page % 64);
        }
    }
}

impl Drop for SharedDirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.ptr.cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shared_log_translates_guest_pages_to_memfd_pages() {
        // 4 GiB: 3 GiB below the hole, 1 GiB from 4 GiB (memfd offset 3 GiB).
        let log = super::SharedDirtyLog::new(4 << 30).unwrap();
        let set = |gpa: u64| {
            let page = gpa / 4096;
            // SAFETY: within the mapping (the log covers 5 GiB of addresses).
            let cell = unsafe {
                &*(log.ptr.add((page / 64) as usize) as *const std::sync::atomic::AtomicU64)
            };
            cell.fetch_or(1 << (page % 64), std::sync::atomic::Ordering::Relaxed);
        };
        set(0x3000);
        set(1 << 32);
        let mut bitmap = Vec::new();
        log.take_into(&mut bitmap);
        let pages: Vec<u64> = (0..bitmap.len() as u64 * 64)
            .filter(|p| bitmap[(*p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(pages, vec![3, (3u64 << 30) / 4096]);
        // Taken means cleared.
        let mut again = Vec::new();
        log.take_into(&mut again);
        assert!(again.iter().all(|&w| w == 0));
    }

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

    #[test]
    fn memory_is_a_shared_memfd() {
        use vm_memory::Bytes;
        let m = Memory::new(32 << 20).unwrap();
        m.guest
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // Another mapping of the same memfd sees the write: it is MAP_SHARED.
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&m.memfd, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
