//! File descriptors over SCM_RIGHTS: the control plane's side channel (Cap'n Proto RPC in Rust
//! carries none). See schema/chardevd.capnp for how the channel is set up.

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 24;

/// The preamble byte that carries a side channel on a new control connection.
pub const SIDE_CHANNEL_PREAMBLE: u8 = 1;

/// Sends `data` (at least one byte) with `fds` attached, in one sendmsg.
pub fn send(socket: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(data)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message into `buf`: its length and the descriptors it carried (close-on-exec).
/// `flags` is passed to recvmsg (e.g. MSG_DONTWAIT).
pub fn recv(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: i32,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
    let flags = MsgFlags::from_bits_truncate(flags) | MsgFlags::MSG_CMSG_CLOEXEC;
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut control), flags) {
            Err(Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    let cmsgs = msg
        .cmsgs()
        .map_err(|_| io::Error::other("too many descriptors in one message"))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel installed these descriptors in this process for this message;
            // nothing else knows them, so each is ours to own.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}

/// A SOCK_SEQPACKET socket pair (close-on-exec): message boundaries hold, so each message
/// keeps its descriptors.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_and_keep_working() {
        let (a, b) = seqpacket_pair().unwrap();
        let (mut p1, p2) = std::os::unix::net::UnixStream::pair().unwrap();
        send(a.as_fd(), b"serial0", &[p2.as_fd()]).unwrap();
        drop(p2);
        let mut buf = [0u8; 64];
        let (n, mut fds) = recv(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"serial0");
        assert_eq!(fds.len(), 1);
        let mut got = std::os::unix::net::UnixStream::from(fds.pop().unwrap());
        p1.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        got.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");
        // Nothing more is queued.
        assert_eq!(
            recv(b.as_fd(), &mut buf, libc::MSG_DONTWAIT)
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
