//! Descriptors a process inherited by number (a flag's, systemd's): the one place such a
//! number becomes an owned descriptor.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Descriptor `fd` as owned, with close-on-exec, if it is open and not 0, 1 or 2. Each
/// inherited descriptor is taken once, at start-up (systemd's through `listen_fds`).
pub fn take(fd: RawFd) -> Option<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    if fd < 3 {
        return None;
    }
    // SAFETY: `fd` is only borrowed for the F_SETFD below, which fails (EBADF) when it is not
    // open; no memory is involved.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    // SAFETY: `fd` is open (checked above) and was handed to this process to own; nothing
    // else in it owns it, as each inherited descriptor is taken once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
