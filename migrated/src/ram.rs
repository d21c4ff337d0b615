//! Guest RAM as migrated sees it: the memfd vmm-core hands over, mapped shared (read-only on
//! both ends: the destination writes through the memfd itself), laid out as the stream's regions.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

pub struct Ram {
    ptr: *mut u8,
    len: usize,
    /// The memfd itself: for its holes (pages never written) and for writes that allocate
    /// its pages without a page fault each.
    file: std::fs::File,
    /// (guest physical address, bytes, offset in the memfd), in memfd order.
    pub regions: Vec<(u64, u64, u64)>,
}

// SAFETY: the mapping is plain shared memory; `Ram` hands out slices only through &self and
// &mut self, and the mapping lives as long as it does.
unsafe impl Send for Ram {}

impl Ram {
    /// Maps the memfd: `regions` are (gpa, bytes), laid end to end in it.
    pub fn map(memfd: &OwnedFd, regions: &[(u64, u64)]) -> Result<Ram, String> {
        let len: u64 = regions.iter().map(|r| r.1).sum();
        let mut st: libc::stat = unsafe_zeroed();
        // SAFETY: fstat on a descriptor we own, into a local.
        if unsafe { libc::fstat(memfd.as_raw_fd(), &mut st) } != 0 {
            return Err(format!(
                "the guest RAM descriptor: {}",
                std::io::Error::last_os_error()
            ));
        }
        if (st.st_size as u64) < len {
            return Err(format!(
                "the guest RAM memfd is {} bytes, the VM's regions need {len}",
                st.st_size
            ));
        }
        // SAFETY: a new shared mapping of a descriptor we own; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map guest RAM ({len} bytes): {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut off = 0;
        let regions = regions
            .iter()
            .map(|&(gpa, bytes)| {
                let r = (gpa, bytes, off);
                off += bytes;
                r
            })
            .collect();
        let file = match memfd.try_clone() {
            Ok(f) => std::fs::File::from(f),
            Err(e) => {
                // SAFETY: unmaps the mapping made above, which nothing else refers to.
                unsafe { libc::munmap(ptr, len as usize) };
                return Err(format!("the guest RAM descriptor: {e}"));
            }
        };
        Ok(Ram {
            ptr: ptr.cast(),
            len: len as usize,
            file,
            regions,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
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
        let fd = self.file.as_raw_fd();
        let len = self.len as i64;
        let mut out = Vec::new();
        let mut at = 0i64;
        while at < len {
            // SAFETY: lseek on a descriptor we own; the results are checked.
            let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if start < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after `at`
                }
                return Err(e);
            }
            if start >= len {
                break;
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
            if end < 0 {
                return Err(std::io::Error::last_os_error());
            }
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
        // SAFETY: fallocate on a descriptor we own; the result is checked.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                bytes as i64,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn unsafe_zeroed() -> libc::stat {
    // SAFETY: stat is plain data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}
