//! Guest RAM as migrated sees it: the memfd vmm-core hands over, mapped shared (read-only on
//! the source, writable on the destination), laid out as the stream's regions.

use std::os::fd::{AsRawFd, OwnedFd};

pub struct Ram {
    ptr: *mut u8,
    len: usize,
    /// (guest physical address, bytes, offset in the memfd), in memfd order.
    pub regions: Vec<(u64, u64, u64)>,
}

// SAFETY: the mapping is plain shared memory; `Ram` hands out slices only through &self and
// &mut self, and the mapping lives as long as it does.
unsafe impl Send for Ram {}

impl Ram {
    /// Maps the memfd: `regions` are (gpa, bytes), laid end to end in it.
    pub fn map(memfd: &OwnedFd, regions: &[(u64, u64)], writable: bool) -> Result<Ram, String> {
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
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of a descriptor we own; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
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
        Ok(Ram {
            ptr: ptr.cast(),
            len: len as usize,
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

    /// Writable bytes (the destination's mapping).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, writable when mapped for the destination, and
        // lives as long as self; &mut self makes this the only slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
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
