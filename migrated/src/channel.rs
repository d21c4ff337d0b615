//! The channel as migrated sees it: one descriptor that vmm-core opened and handed over
//! (see vmm_proto::channel, which names the channels and opens them): a connected stream
//! socket, a listening socket to accept a source on, or a snapshot file. migrated, in its
//! sandbox, opens nothing by itself.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;
pub use vmm_proto::channel::{Kind, Uri};

/// A connected channel: reads and writes, and a way to shut it down from another thread.
pub trait Stream: Read + Write + Send {
    /// Ends the connection both ways, so that a blocked read or write on it returns.
    fn shutdown(&self);
    /// Another handle on the same connection (to shut it down from elsewhere).
    fn handle(&self) -> io::Result<Box<dyn Stream>>;
    /// Makes what was written durable (a snapshot file).
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    /// Post-copy: small socket buffers, so that a page the destination waits for is not
    /// queued behind megabytes of background pages (a no-op where there is no socket).
    fn shrink_buffers(&self) {}
    /// The connection as a reading half and a writing half that two threads use at once
    /// (post-copy: pages go one way while the destination's page requests come the other).
    fn split(self: Box<Self>) -> io::Result<Halves>;
}

/// A connection's reading and writing halves.
pub type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

impl Stream for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn split(self: Box<Self>) -> io::Result<Halves> {
        Ok((Box::new(self.try_clone()?), self))
    }
    fn shrink_buffers(&self) {
        shrink(self);
    }
}

impl Stream for UnixStream {
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn split(self: Box<Self>) -> io::Result<Halves> {
        Ok((Box::new(self.try_clone()?), self))
    }
    fn shrink_buffers(&self) {
        shrink(self);
    }
}

impl Stream for std::fs::File {
    fn shutdown(&self) {}
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
    fn split(self: Box<Self>) -> io::Result<Halves> {
        Ok((Box::new(self.try_clone()?), self))
    }
}

/// The socket buffers post-copy asks for each way (the kernel doubles them).
pub const POSTCOPY_BUFFER: usize = 64 << 10;

fn shrink(s: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::SndBuf, &POSTCOPY_BUFFER);
    let _ = setsockopt(s, sockopt::RcvBuf, &POSTCOPY_BUFFER);
}

/// A socket's address family.
fn domain(fd: &OwnedFd) -> io::Result<libc::c_int> {
    Ok(vmm_proto::channel::socket_family(fd)?.map_or(-1, |f| f as libc::c_int))
}

/// A descriptor migrated cannot use as its channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0}: {1}")]
    Socket(Uri, #[source] io::Error),
    #[error("{0}: a socket of family {1}, not unix or tcp")]
    Family(Uri, libc::c_int),
    #[error("{0}: a listening socket, not a connection")]
    Listening(Uri),
    #[error("{0}: no source connected within --incoming-timeout")]
    NoSource(Uri),
}

pub fn stream(uri: &Uri, fd: OwnedFd, kind: Kind) -> Result<Box<dyn Stream>, ChannelError> {
    let socket = |e| ChannelError::Socket(uri.clone(), e);
    Ok(match kind {
        Kind::File => Box::new(std::fs::File::from(fd)),
        Kind::Stream => match domain(&fd).map_err(socket)? {
            libc::AF_UNIX => Box::new(UnixStream::from(fd)),
            libc::AF_INET | libc::AF_INET6 => {
                let s = TcpStream::from(fd);
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            d => return Err(ChannelError::Family(uri.clone(), d)),
        },
        Kind::Listener => return Err(ChannelError::Listening(uri.clone())),
    })
}

/// The destination's listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub fn new(uri: &Uri, fd: OwnedFd) -> Result<Listener, ChannelError> {
        let socket = |e| ChannelError::Socket(uri.clone(), e);
        let l = match domain(&fd).map_err(socket)? {
            libc::AF_UNIX => Listener::Unix(UnixListener::from(fd)),
            libc::AF_INET | libc::AF_INET6 => Listener::Tcp(TcpListener::from(fd)),
            d => return Err(ChannelError::Family(uri.clone(), d)),
        };
        match &l {
            Listener::Tcp(t) => t.set_nonblocking(true),
            Listener::Unix(u) => u.set_nonblocking(true),
        }
        .map_err(socket)?;
        log::info!("waiting for the source on {uri}");
        Ok(l)
    }

    /// The next source (waiting until `deadline`, or for as long as it takes).
    pub fn accept(
        &mut self,
        uri: &Uri,
        deadline: Option<std::time::Instant>,
    ) -> Result<Box<dyn Stream>, ChannelError> {
        loop {
            let got: io::Result<Box<dyn Stream>> = match self {
                Listener::Tcp(l) => l.accept().and_then(|(s, peer)| {
                    log::info!("{uri}: a source connected from {peer}");
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::Unix(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
            };
            match got {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                        return Err(ChannelError::NoSource(uri.clone()));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(ChannelError::Socket(uri.clone(), e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_become_streams_and_listeners_by_their_family() {
        let uri = Uri::Fd(9);
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = stream(&uri, a.into(), Kind::Stream).unwrap();
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // A stream's handle shuts it down from elsewhere: a blocked read ends.
        let h = s.handle().unwrap();
        let t = std::thread::spawn(move || s.read(&mut [0u8; 8]));
        std::thread::sleep(Duration::from_millis(50));
        h.shutdown();
        assert_eq!(t.join().unwrap().unwrap(), 0);

        let tl = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tl.local_addr().unwrap();
        let mut l = Listener::new(&uri, tl.into()).unwrap();
        let _c = TcpStream::connect(addr).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        assert!(l.accept(&uri, Some(deadline)).is_ok());
        let e = l
            .accept(&uri, Some(std::time::Instant::now()))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("no source connected within --incoming-timeout"),
            "{e}"
        );
    }
}
