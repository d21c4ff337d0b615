//! Guest RAM as migrated sees it: the memfd vmm-core hands over, mapped shared (read-only on
//! both ends: the destination writes through the memfd itself), laid out as the stream's regions.

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

pub struct Ram {
    /// The memfd mapped shared and read-only.
    map: memmap2::Mmap,
    /// The memfd itself: for its holes (pages never written) and for writes that allocate
    /// its pages without a page fault each.
    file: std::fs::File,
    /// (guest physical address, bytes, offset in the memfd), in memfd order.
    pub regions: Vec<(u64, u64, u64)>,
}

/// Why guest RAM cannot be mapped.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("the guest RAM descriptor: {0}")]
    Descriptor(#[source] std::io::Error),
    #[error("the guest RAM memfd is {0} bytes, the VM's regions need {1}")]
    TooSmall(u64, u64),
    #[error("cannot map guest RAM ({0} bytes): {1}")]
    Map(u64, #[source] std::io::Error),
}

impl Ram {
    /// Maps the memfd: `regions` are (gpa, bytes), laid end to end in it.
    pub fn map(memfd: &OwnedFd, regions: &[(u64, u64)]) -> Result<Ram, RamError> {
        let len: u64 = regions.iter().map(|r| r.1).sum();
        let file = std::fs::File::from(memfd.try_clone().map_err(RamError::Descriptor)?);
        let size = file.metadata().map_err(RamError::Descriptor)?.len();
        if size < len {
            return Err(RamError::TooSmall(size, len));
        }
        // SAFETY: a read-only shared mapping of the guest's memfd. The guest (through the
        // vCPUs of vmm-core, another process) changes it under us: that is the point of a live
        // migration, whose dirty log sends again what changed after it was read. The file is
        // never truncated while migrated runs.
        let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(&file) }
            .map_err(|e| RamError::Map(len, e))?;
        let mut off = 0;
        let regions = regions
            .iter()
            .map(|&(gpa, bytes)| {
                let r = (gpa, bytes, off);
                off += bytes;
                r
            })
            .collect();
        Ok(Ram { map, file, regions })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The memfd offset of guest physical `gpa` for `bytes` bytes, if all in one region.
    pub fn offset(&self, gpa: u64, bytes: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|(g, b, _)| gpa >= *g && gpa + bytes <= g + b)
            .map(|(g, _, off)| (off + gpa - g) as usize)
    }

    /// The guest physical address of memfd offset `off`.
    pub fn gpa(&self, off: u64) -> u64 {
        let (g, _, o) = self
            .regions
            .iter()
            .find(|(_, b, o)| off >= *o && off < o + b)
            .expect("an offset inside the mapping");
        g + off - o
    }

    /// The memfd's data as [start, end) byte ranges: the rest are holes, pages nobody has
    /// written, which read as zeroes (and reading them through the mapping would allocate them).
    pub fn data_ranges(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let len = self.len() as i64;
        let mut out = Vec::new();
        let mut at = 0i64;
        while at < len {
            let start = match lseek(&self.file, at, Whence::SeekData) {
                Ok(s) => s,
                Err(nix::Error::ENXIO) => break, // no data after `at`
                Err(e) => return Err(e.into()),
            };
            if start >= len {
                break;
            }
            let end = lseek(&self.file, start, Whence::SeekHole)?;
            out.push((start as u64, end.min(len) as u64));
            at = end;
        }
        Ok(out)
    }

    /// Writes `data` at memfd offset `off` (the destination): through the file, so that the
    /// memfd's pages are allocated in one go rather than one page fault at a time.
    pub fn write_at(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, off)
    }

    /// Makes `bytes` at `off` zero by punching a hole (the memory goes back to the host).
    pub fn zero(&self, off: u64, bytes: u64) -> std::io::Result<()> {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(&self.file, flags, off as i64, bytes as i64)?;
        Ok(())
    }
}
