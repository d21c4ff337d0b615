//! Guest RAM: one memfd mapped MAP_SHARED (so helpers handed its fd see the same pages), laid
//! out around a 32-bit MMIO hole, and registered with KVM.

use kvm_ioctls::VmFd;
use std::fs::File;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_devices::layout::{ram_ranges, GuestMemory, PAGE_SIZE};

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

/// Guest RAM and the memfd behind it.
pub struct Memory {
    pub guest: GuestMemory,
    pub memfd: File,
    pub size: u64,
}

impl Memory {
    pub fn new(size: u64) -> Result<Memory, MemoryError> {
        let memfd = File::from(
            nix::sys::memfd::memfd_create(c"guest-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| MemoryError::Memfd(e.into()))?,
        );
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

#[cfg(test)]
mod tests {
    use super::*;

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
