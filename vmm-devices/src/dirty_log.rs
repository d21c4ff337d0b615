//! vhost-user's dirty log (LOG_SHMFD): a bitmap in a memfd shared with every vhost-user
//! backend, one bit per 4 KiB page of guest physical address, that a backend sets for each
//! page it writes while VHOST_F_LOG_ALL is acked. vmm-core reads and clears it with KVM's.

use crate::layout::{ram_ranges, PAGE_SIZE};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

pub struct SharedDirtyLog {
    file: File,
    map: MmapRegion<()>,
    words: usize,
    /// The VM's RAM ranges (gpa, bytes, memfd offset), for the translation to memfd pages.
    ranges: Vec<(u64, u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot create its memfd")]
    Memfd(#[source] nix::Error),
    #[error("cannot size its memfd")]
    Size(#[source] std::io::Error),
    #[error("cannot map it")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

impl SharedDirtyLog {
    /// A log that covers all guest RAM of a VM of `size` bytes.
    pub fn new(size: u64) -> Result<SharedDirtyLog, DirtyLogError> {
        let ranges = ram_ranges(size);
        let top = ranges
            .iter()
            .map(|&(gpa, len, _)| gpa + len)
            .max()
            .unwrap_or(0);
        let words = (top / PAGE_SIZE).div_ceil(64) as usize;
        let bytes = (words * 8).max(8);
        let file = File::from(
            nix::sys::memfd::memfd_create(
                c"vhost-dirty-log",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .map_err(DirtyLogError::Memfd)?,
        );
        file.set_len(bytes as u64).map_err(DirtyLogError::Size)?;
        let shared = file.try_clone().map_err(DirtyLogError::Size)?;
        let map =
            MmapRegion::from_file(FileOffset::new(shared, 0), bytes).map_err(DirtyLogError::Map)?;
        Ok(SharedDirtyLog {
            file,
            map,
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

    fn word(&self, w: usize) -> &AtomicU64 {
        self.map
            .get_atomic_ref::<AtomicU64>(w * 8)
            .expect("a word within the mapping, which is page-aligned")
    }

    /// Takes (and clears) what the backends logged, ORed into `bitmap`, a bitmap over the
    /// memfd's pages as KVM's dirty log is taken.
    pub fn take_into(&self, bitmap: &mut Vec<u64>) {
        for w in 0..self.words {
            let mut bits = self.word(w).swap(0, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_log_translates_guest_pages_to_memfd_pages() {
        // 4 GiB: 3 GiB below the hole, 1 GiB from 4 GiB (memfd offset 3 GiB).
        let log = SharedDirtyLog::new(4 << 30).unwrap();
        let set = |gpa: u64| {
            let page = gpa / 4096;
            log.word((page / 64) as usize)
                .fetch_or(1 << (page % 64), Ordering::Relaxed);
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
}
