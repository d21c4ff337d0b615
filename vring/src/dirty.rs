//! vhost-user's dirty log (LOG_SHMFD): a bitmap in shared memory that the frontend hands over
//! with SET_LOG_BASE, one bit per 4 KiB page of guest physical address. While the frontend
//! has acked VHOST_F_LOG_ALL (a migration is under way), blockd sets the bit of every page it
//! writes into guest memory: read data, status bytes, GET_ID strings. The frontend reads and
//! clears it between passes, as it does KVM's own dirty log. (The used ring blockd writes is
//! in the frontend's last pass anyway, since it knows where each ring is.)

use std::sync::atomic::{AtomicU8, Ordering};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

const PAGE_SHIFT: u64 = 12;

pub struct DirtyLog {
    map: MmapRegion<()>,
}

impl DirtyLog {
    /// Maps the frontend's log: `size` bytes at `offset` of `file`.
    pub fn map(file: &std::fs::File, size: u64, offset: u64) -> std::io::Result<DirtyLog> {
        if size == 0 || size > 1 << 32 {
            return Err(std::io::Error::other(format!(
                "a dirty log of {size} bytes (it covers at most 128 TiB of guest memory)"
            )));
        }
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, offset), size as usize)
            .map_err(std::io::Error::other)?;
        Ok(DirtyLog { map })
    }

    /// Marks the pages of `len` bytes at guest physical address `gpa`. Pages beyond the log
    /// are not marked (the frontend sized it to cover all of guest RAM).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        for page in first..=last {
            let byte = (page / 8) as usize;
            let Ok(cell) = self.map.get_atomic_ref::<AtomicU8>(byte) else {
                return;
            };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn marks_each_page_a_range_touches() {
        let mut f = tempfile();
        f.set_len(16).unwrap();
        let log = DirtyLog::map(&f, 16, 0).unwrap();
        log.mark(0x1000, 1); // page 1
        log.mark(0x8fff, 2); // pages 8 and 9
        log.mark(0x100000, 4096); // page 256: beyond a 16-byte log, ignored
        drop(log);
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got[0], 0b10);
        assert_eq!(got[1], 0b11);
        assert!(got[2..].iter().all(|&b| b == 0));
    }

    fn tempfile() -> std::fs::File {
        let flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        std::fs::File::from(nix::sys::memfd::memfd_create(c"dirty-log-test", flags).unwrap())
    }
}
