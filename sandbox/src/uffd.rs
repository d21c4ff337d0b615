//! userfaultfd(2): what post-copy migration and lazy restore are built on. A process registers
//! its mapping of guest RAM (MISSING mode: a fault on a page the memfd does not hold yet waits
//! for it), and hands the descriptor to migrated, which places each page as it comes
//! (UFFDIO_COPY, which also wakes the faulting thread) or wakes a waiter whose page another
//! process's descriptor placed (UFFDIO_WAKE).
//!
//! Faults from the kernel (KVM reading guest RAM, a read(2) into it) are waited for too, which
//! needs CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd = 1`, or access to /dev/userfaultfd.
//! A sandboxed helper opens /dev/userfaultfd before it drops its privileges (`Device::open`),
//! and makes its descriptor from it when post-copy begins.
//!
//! Only the few ioctls used here are wrapped; the layouts are the kernel's
//! (include/uapi/linux/userfaultfd.h).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const REGISTER_MODE_MISSING: u64 = 1;
/// sizeof(struct uffd_msg).
const MSG_BYTES: usize = 32;

/// _IOC(dir, 0xaa, nr, size).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_API: u64 = ioc(READ_WRITE, 0x3f, std::mem::size_of::<Api>());
const UFFDIO_REGISTER: u64 = ioc(READ_WRITE, 0x00, std::mem::size_of::<Register>());
const UFFDIO_UNREGISTER: u64 = ioc(READ, 0x01, std::mem::size_of::<Range>());
const UFFDIO_WAKE: u64 = ioc(READ, 0x02, std::mem::size_of::<Range>());
const UFFDIO_COPY: u64 = ioc(READ_WRITE, 0x03, std::mem::size_of::<Copy>());
const UFFDIO_ZEROPAGE: u64 = ioc(READ_WRITE, 0x04, std::mem::size_of::<ZeroPage>());
/// USERFAULTFD_IOC_NEW on /dev/userfaultfd: _IO(0xaa, 0).
const USERFAULTFD_IOC_NEW: u64 = 0xaa << 8;

/// Why a userfaultfd could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd ({0}); it needs CAP_SYS_PTRACE, read-write access to /dev/userfaultfd, or the sysctl vm.unprivileged_userfaultfd=1")]
    Create(#[source] nix::Error),
    #[error("the kernel refused the userfaultfd API ({0})")]
    Api(#[source] nix::Error),
    #[error("cannot register {1:#x}+{2:#x} on the userfaultfd ({0})")]
    Register(#[source] nix::Error, u64, u64),
}

/// One ioctl on a userfaultfd (or /dev/userfaultfd) with its argument structure.
fn ioctl<T>(fd: BorrowedFd, req: u64, arg: &mut T) -> nix::Result<libc::c_int> {
    // SAFETY: `req` is one of the requests above, each defined with the size of the `T` it is
    // called with here (or, for USERFAULTFD_IOC_NEW, taking its argument by value, which the
    // kernel does not dereference); `arg` is a live, exclusively borrowed structure of that
    // layout for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    nix::errno::Errno::result(r)
}

/// /dev/userfaultfd, opened while the process may (before its jail drops privileges).
pub struct Device(std::fs::File);

impl Device {
    /// None when there is no such device or no access to it.
    pub fn open() -> Option<Device> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .ok()
            .map(Device)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// One another process opened and handed over (access is checked at open only: a
    /// process that may not open the device can still use it).
    pub fn from_fd(fd: OwnedFd) -> Device {
        Device(std::fs::File::from(fd))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A userfaultfd of this process (or one handed over by another).
pub struct Uffd(OwnedFd);

impl Uffd {
    /// A new userfaultfd for this process's memory, non-blocking: by the system call, or
    /// else from /dev/userfaultfd (`dev`, opened earlier, or opened now).
    pub fn new(dev: Option<&Device>) -> Result<Uffd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes flags only and returns a new descriptor or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            return Self::handshake(r as RawFd);
        }
        let first = nix::errno::Errno::last();
        match dev {
            Some(d) => Self::from_device(Some(d)),
            None => match Device::open() {
                Some(d) => Self::from_device(Some(&d)),
                None => Err(UffdError::Create(first)),
            },
        }
    }

    /// A new userfaultfd from /dev/userfaultfd only (for a process whose seccomp list does
    /// not allow the system call); `dev` opened earlier, while the process could.
    pub fn from_device(dev: Option<&Device>) -> Result<Uffd, UffdError> {
        let dev = dev.ok_or(UffdError::Create(nix::Error::ENOENT))?;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_ulong;
        // SAFETY: an ioctl on /dev/userfaultfd that takes a plain integer (the flags) and
        // returns a new descriptor or -1; no memory is passed.
        let r = unsafe { libc::ioctl(dev.0.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        let fd = nix::errno::Errno::result(r).map_err(UffdError::Create)?;
        Self::handshake(fd)
    }

    /// Owns a new descriptor and does the API handshake on it.
    fn handshake(fd: RawFd) -> Result<Uffd, UffdError> {
        // SAFETY: the kernel just returned this descriptor, which nothing else owns.
        let uffd = Uffd(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = Api {
            api: UFFD_API,
            ..Default::default()
        };
        ioctl(uffd.0.as_fd(), UFFDIO_API, &mut api).map_err(UffdError::Api)?;
        Ok(uffd)
    }

    /// One received from another process (its API handshake done there).
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd(fd)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Registers [start, start+len) of this process's memory: a fault on a missing page
    /// there waits for this descriptor's owner.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Register {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.0.as_fd(), UFFDIO_REGISTER, &mut r)
            .map(|_| ())
            .map_err(|e| UffdError::Register(e, start, len))
    }

    pub fn unregister(&self, start: u64, len: u64) -> nix::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.0.as_fd(), UFFDIO_UNREGISTER, &mut r).map(|_| ())
    }

    /// Places `data` (whole pages) at `dst` in the registered memory and wakes whoever waits
    /// there. EEXIST: a page of the range is there already (`copied` bytes before it were
    /// placed).
    pub fn copy(&self, dst: u64, data: &[u8]) -> Result<(), (nix::Error, u64)> {
        let mut c = Copy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        ioctl(self.0.as_fd(), UFFDIO_COPY, &mut c)
            .map(|_| ())
            .map_err(|e| (e, c.copy.max(0) as u64))
    }

    /// Places zero pages at [dst, dst+len) and wakes the waiters.
    pub fn zero(&self, dst: u64, len: u64) -> Result<(), (nix::Error, u64)> {
        let mut z = ZeroPage {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        ioctl(self.0.as_fd(), UFFDIO_ZEROPAGE, &mut z)
            .map(|_| ())
            .map_err(|e| (e, z.zeropage.max(0) as u64))
    }

    /// Wakes the threads waiting in [start, start+len) (their page is there now).
    pub fn wake(&self, start: u64, len: u64) -> nix::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.0.as_fd(), UFFDIO_WAKE, &mut r).map(|_| ())
    }

    /// The addresses of the page faults waiting now (none when there are none: the
    /// descriptor is non-blocking).
    pub fn faults(&self, out: &mut Vec<u64>) -> nix::Result<()> {
        let mut buf = [0u8; MSG_BYTES * 32];
        loop {
            match nix::unistd::read(&self.0, &mut buf) {
                Ok(n) => {
                    for m in buf[..n].chunks_exact(MSG_BYTES) {
                        if m[0] == UFFD_EVENT_PAGEFAULT {
                            // struct uffd_msg: event u8, 7 reserved bytes, then
                            // pagefault.flags u64 and pagefault.address u64.
                            out.push(u64::from_le_bytes(m[16..24].try_into().unwrap()));
                        }
                    }
                    if n < buf.len() {
                        return Ok(());
                    }
                }
                Err(nix::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page missing from a registered memfd mapping waits until another thread places it;
    /// a present page never faults. Needs CAP_SYS_PTRACE or /dev/userfaultfd (root here).
    #[test]
    fn a_missing_page_waits_for_its_copy() {
        let page = 4096usize;
        let memfd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = std::fs::File::from(memfd);
        file.set_len(2 * page as u64).unwrap();
        // SAFETY: a fresh shared mapping of a private memfd; nothing else maps it.
        let mut map = unsafe { memmap2::MmapOptions::new().len(2 * page).map_mut(&file) }.unwrap();
        map[page] = 7; // the second page is there before registering
        let uffd = Uffd::new(None).expect("a userfaultfd (run as root)");
        let base = map.as_ptr() as u64;
        uffd.register(base, 2 * page as u64).unwrap();
        let addr = base as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping outlives this thread (joined below).
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        let mut faults = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while faults.is_empty() && std::time::Instant::now() < deadline {
            uffd.faults(&mut faults).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(faults, vec![base], "one fault, at the first page");
        let data = vec![42u8; page];
        uffd.copy(base, &data).unwrap();
        assert_eq!(reader.join().unwrap(), 42);
        assert_eq!(map[page], 7);
        // A page that is there: EEXIST.
        assert_eq!(uffd.copy(base, &data).unwrap_err().0, nix::Error::EEXIST);
    }
}
