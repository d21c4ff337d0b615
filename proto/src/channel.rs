//! Migration channels, under QEMU's names (`tcp:HOST:PORT`, `unix:PATH`, `fd:N`,
//! `exec:COMMAND`, `file:PATH`), and how vmm-core opens them.
//!
//! vmm-core opens every channel (it may reach the host's network and file system and start
//! commands) and hands migrated one descriptor on the side channel; migrated, in its
//! sandbox, reaches nothing by itself. The descriptor is one of three kinds:
//! - a connected stream socket (tcp:, unix:, fd: of a connected socket, and exec:, whose
//!   command's standard input and output are the other end of a socket pair);
//! - a listening socket (the destination's tcp: and unix:, or fd: of one), on which
//!   migrated accepts sources until one passes its checks;
//! - a regular file (file:, or fd: of one): a snapshot.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Tcp(String),
    Unix(PathBuf),
    Fd(i32),
    Exec(String),
    File(PathBuf),
}

/// Why a channel could not be named or opened: one line that names the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0:?}: not a channel; use tcp:HOST:PORT, unix:PATH, fd:N or exec:COMMAND (file:PATH for a snapshot or a restore)")]
    NotAChannel(String),
    #[error("{0:?}: the {1} channel needs an address after '{1}:'")]
    NoAddress(String, String),
    #[error("{0:?}: a tcp channel is tcp:HOST:PORT (the port is missing)")]
    NoPort(String),
    #[error("{0:?}: the port {1:?} is not a number from 0 to 65535")]
    BadPort(String, String),
    #[error("{0:?}: the host is missing (tcp:HOST:PORT)")]
    NoHost(String),
    #[error("{0:?}: fd:N takes a descriptor number of 3 or more that vmm-core inherited")]
    BadFd(String),
    #[error("{0:?}: unknown channel kind {1:?}; use tcp:HOST:PORT, unix:PATH, fd:N or exec:COMMAND (file:PATH for a snapshot or a restore)")]
    UnknownKind(String, String),
    #[error("{0}: cannot make its socket pair ({1})")]
    SocketPair(Uri, io::Error),
    #[error("{0}: cannot start it with /bin/sh ({1})")]
    Exec(Uri, io::Error),
    #[error("{0}: no answer within {1} s; is the destination started with --incoming {0}?")]
    Timeout(Uri, u64),
    #[error("{0}: cannot connect ({1}); is the destination started with --incoming {0}?")]
    Connect(Uri, io::Error),
    #[error("{0}: {1}")]
    Io(Uri, io::Error),
    #[error(
        "{0}: the file exists; a snapshot never overwrites one, so remove it or pick another name"
    )]
    Exists(Uri),
    #[error("{0}: cannot create it ({1})")]
    Create(Uri, io::Error),
    #[error("{0}: an fd: channel is classified, not opened")]
    NotOpened(Uri),
    #[error("{0}: cannot listen there ({1})")]
    Listen(Uri, io::Error),
    #[error("{0}: cannot open it ({1})")]
    Open(Uri, io::Error),
    #[error("{0}: the descriptor is not a stream socket; pass a connected or listening stream socket, or a file")]
    NotStream(Uri),
    #[error("{0}: the descriptor is neither a stream socket nor a regular file; pass a connected or listening stream socket, or a file (a pipe is refused: it carries one direction only)")]
    NotSocketOrFile(Uri),
    #[error("tls-creds {dir}: not a directory; {CREDS_FILES}", dir = .0.display())]
    CredsNotDir(PathBuf),
    #[error("tls-creds {dir}: cannot read {1} ({2}); {CREDS_FILES}", dir = .0.display())]
    CredsRead(PathBuf, String, io::Error),
}

const CREDS_FILES: &str =
    "it holds ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and client-key.pem";

impl Uri {
    pub fn parse(s: &str) -> Result<Uri, ChannelError> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| ChannelError::NotAChannel(s.into()))?;
        if rest.is_empty() {
            return Err(ChannelError::NoAddress(s.into(), kind.into()));
        }
        match kind {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| ChannelError::NoPort(s.into()))?;
                port.parse::<u16>()
                    .map_err(|_| ChannelError::BadPort(s.into(), port.into()))?;
                if host.is_empty() {
                    return Err(ChannelError::NoHost(s.into()));
                }
                Ok(Uri::Tcp(rest.to_string()))
            }
            "unix" => Ok(Uri::Unix(PathBuf::from(rest))),
            "fd" => match rest.parse::<i32>() {
                Ok(n) if n >= 3 => Ok(Uri::Fd(n)),
                _ => Err(ChannelError::BadFd(s.into())),
            },
            "exec" => Ok(Uri::Exec(rest.to_string())),
            "file" => Ok(Uri::File(PathBuf::from(rest))),
            other => Err(ChannelError::UnknownKind(s.into(), other.into())),
        }
    }

    /// The host part of a tcp: address (the name TLS checks by default).
    pub fn host(&self) -> Option<&str> {
        match self {
            Uri::Tcp(a) => a
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')),
            _ => None,
        }
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Fd(n) => write!(f, "fd:{n}"),
            Uri::Exec(c) => write!(f, "exec:{c}"),
            Uri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// What the descriptor handed to migrated is (the schema's `ChannelKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Listener,
    File,
}

impl From<Kind> for crate::migrated_capnp::ChannelKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Stream => Self::Stream,
            Kind::Listener => Self::Listener,
            Kind::File => Self::File,
        }
    }
}

impl From<crate::migrated_capnp::ChannelKind> for Kind {
    fn from(k: crate::migrated_capnp::ChannelKind) -> Self {
        use crate::migrated_capnp::ChannelKind as C;
        match k {
            C::Stream => Kind::Stream,
            C::Listener => Kind::Listener,
            C::File => Kind::File,
        }
    }
}

/// An opened channel: the descriptor for migrated, and what vmm-core keeps to end it.
pub struct Opened {
    pub fd: OwnedFd,
    pub kind: Kind,
    pub guard: Guard,
}

/// What stays with vmm-core while migrated uses the channel: an exec: command (ended with
/// the channel), a unix: socket path it made (removed), a snapshot file it created (removed
/// unless the snapshot completed).
pub struct Guard {
    uri: String,
    exec: Option<std::process::Child>,
    /// A unix: socket path the destination listened on.
    socket: Option<PathBuf>,
    /// The snapshot file being written.
    partial: Option<PathBuf>,
}

impl Guard {
    fn new(uri: &Uri) -> Guard {
        Guard {
            uri: uri.to_string(),
            exec: None,
            socket: None,
            partial: None,
        }
    }

    /// The transfer completed: an exec: command gets 5 s to finish (it has read the end of
    /// the stream) before it is killed; a snapshot file stays.
    pub fn complete(mut self) {
        self.partial = None;
        if let Some(mut child) = self.exec.take() {
            let uri = self.uri.clone();
            // Waited for on a thread of its own, so that the caller goes on.
            let _ = std::thread::Builder::new()
                .name("exec-reaper".into())
                .spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    loop {
                        match child.try_wait() {
                            Ok(Some(st)) => {
                                if !st.success() {
                                    log::warn!("{uri}: the command ended with {st}");
                                }
                                return;
                            }
                            Ok(None) if std::time::Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(10))
                            }
                            _ => {
                                log::warn!("{uri}: the command still ran after the stream; killed");
                                kill_group(&mut child);
                                return;
                            }
                        }
                    }
                });
        }
    }
}

/// Kills an exec: command's process group (the shell and what it started) and reaps it.
fn kill_group(child: &mut std::process::Child) {
    // The process group this channel made: its leader is our child, not yet reaped, so the
    // id is still ours.
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

impl Drop for Guard {
    /// The transfer failed or was cancelled: the command is killed, and a partial snapshot
    /// file removed.
    fn drop(&mut self) {
        if let Some(mut child) = self.exec.take() {
            kill_group(&mut child);
        }
        for p in [self.socket.take(), self.partial.take()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How long the source tries to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `exec:COMMAND`: `sh -c COMMAND` in its own process group, its standard input and output
/// one end of a socket pair; the other end is the channel.
fn exec(uri: &Uri, command: &str) -> Result<Opened, ChannelError> {
    use std::os::unix::process::CommandExt;
    let pair = |e| ChannelError::SocketPair(uri.clone(), e);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(pair)?;
    let input = theirs.try_clone().map_err(pair)?;
    let child = std::process::Command::new("/bin/sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::from(OwnedFd::from(input)))
        .stdout(std::process::Stdio::from(OwnedFd::from(theirs)))
        .process_group(0)
        .spawn()
        .map_err(|e| ChannelError::Exec(uri.clone(), e))?;
    Ok(Opened {
        fd: ours.into(),
        kind: Kind::Stream,
        guard: {
            let mut g = Guard::new(uri);
            g.exec = Some(child);
            g
        },
    })
}

/// Waits for a connection for at most CONNECT_TIMEOUT.
async fn within<S>(
    uri: &Uri,
    connect: impl std::future::Future<Output = io::Result<S>>,
) -> Result<S, ChannelError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ChannelError::Timeout(uri.clone(), CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| ChannelError::Connect(uri.clone(), e))
}

/// Clears O_NONBLOCK: migrated uses every channel blocking.
fn set_blocking(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(fl) = fcntl(fd, FcntlArg::F_GETFL) {
        let fl = OFlag::from_bits_retain(fl) - OFlag::O_NONBLOCK;
        let _ = fcntl(fd, FcntlArg::F_SETFL(fl));
    }
}

/// The source's end: connects, starts the command, or creates the snapshot file (which must
/// not exist). fd: is the caller's (see `classify`).
pub async fn open_source(uri: &Uri) -> Result<Opened, ChannelError> {
    let mut guard = Guard::new(uri);
    let (fd, kind): (OwnedFd, Kind) = match uri {
        Uri::Tcp(addr) => {
            let s = within(uri, tokio::net::TcpStream::connect(addr)).await?;
            let _ = s.set_nodelay(true);
            let s = s.into_std().map_err(|e| ChannelError::Io(uri.clone(), e))?;
            (s.into(), Kind::Stream)
        }
        Uri::Unix(p) => {
            let s = within(uri, tokio::net::UnixStream::connect(p)).await?;
            let s = s.into_std().map_err(|e| ChannelError::Io(uri.clone(), e))?;
            (s.into(), Kind::Stream)
        }
        Uri::Exec(cmd) => return exec(uri, cmd),
        Uri::File(p) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => ChannelError::Exists(uri.clone()),
                    _ => ChannelError::Create(uri.clone(), e),
                })?;
            guard.partial = Some(p.clone());
            (f.into(), Kind::File)
        }
        Uri::Fd(_) => return Err(ChannelError::NotOpened(uri.clone())),
    };
    set_blocking(&fd);
    Ok(Opened { fd, kind, guard })
}

/// The destination's end: a listening socket, the command, or the snapshot file to read.
pub fn open_destination(uri: &Uri) -> Result<Opened, ChannelError> {
    let mut guard = Guard::new(uri);
    let listen_failed = |e: io::Error| ChannelError::Listen(uri.clone(), e);
    let (fd, kind): (OwnedFd, Kind) = match uri {
        Uri::Tcp(addr) => (
            std::net::TcpListener::bind(addr)
                .map_err(listen_failed)?
                .into(),
            Kind::Listener,
        ),
        Uri::Unix(p) => {
            let l = crate::unix::bind(p, 0o600).map_err(listen_failed)?;
            guard.socket = Some(p.clone());
            (l.into(), Kind::Listener)
        }
        Uri::Exec(cmd) => return exec(uri, cmd),
        Uri::File(p) => (
            std::fs::File::open(p)
                .map_err(|e| ChannelError::Open(uri.clone(), e))?
                .into(),
            Kind::File,
        ),
        Uri::Fd(_) => return Err(ChannelError::NotOpened(uri.clone())),
    };
    Ok(Opened { fd, kind, guard })
}

/// A socket's address family (AF_UNIX, AF_INET, AF_INET6), from its own address.
pub fn socket_family(fd: &impl AsFd) -> io::Result<Option<nix::sys::socket::AddressFamily>> {
    use nix::sys::socket::{getsockname, SockaddrLike, SockaddrStorage};
    let addr: SockaddrStorage = getsockname(fd.as_fd().as_raw_fd())?;
    Ok(addr.family())
}

/// An fd: channel: what the descriptor is decides the kind. A pipe or anything else is
/// refused, since a live migration needs both directions.
pub fn classify(uri: &Uri, fd: OwnedFd) -> Result<Opened, ChannelError> {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    use nix::sys::stat::SFlag;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| ChannelError::Io(uri.clone(), e.into()))?;
    let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFSOCK => {
            if getsockopt(&fd, sockopt::SockType).ok() != Some(SockType::Stream) {
                return Err(ChannelError::NotStream(uri.clone()));
            }
            if getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
                Kind::Listener
            } else {
                Kind::Stream
            }
        }
        _ => return Err(ChannelError::NotSocketOrFile(uri.clone())),
    };
    set_blocking(&fd);
    Ok(Opened {
        fd,
        kind,
        guard: Guard::new(uri),
    })
}

/// A tls-creds directory's files for one side, read by vmm-core: the CA, and the side's
/// certificate and key (server-* on the destination, client-* on the source).
#[derive(Debug, Clone, Default)]
pub struct Creds {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Creds {
    pub fn read(dir: &Path, server: bool) -> Result<Creds, ChannelError> {
        if !dir.is_dir() {
            return Err(ChannelError::CredsNotDir(dir.to_path_buf()));
        }
        let read = |file: &str| {
            std::fs::read(dir.join(file))
                .map_err(|e| ChannelError::CredsRead(dir.to_path_buf(), file.to_string(), e))
        };
        let side = if server { "server" } else { "client" };
        Ok(Creds {
            ca: read("ca-cert.pem")?,
            cert: read(&format!("{side}-cert.pem"))?,
            key: read(&format!("{side}-key.pem"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn uris_parse_or_say_why_not() {
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(Uri::parse("tcp:[::1]:4444").unwrap().host(), Some("::1"));
        assert_eq!(
            Uri::parse("unix:/run/m.sock").unwrap(),
            Uri::Unix("/run/m.sock".into())
        );
        assert_eq!(Uri::parse("fd:5").unwrap(), Uri::Fd(5));
        assert_eq!(
            Uri::parse("exec:gzip -c").unwrap(),
            Uri::Exec("gzip -c".into())
        );
        assert_eq!(
            Uri::parse("file:/tmp/s").unwrap(),
            Uri::File("/tmp/s".into())
        );
        for (bad, says) in [
            ("127.0.0.1:4444", "unknown channel kind"),
            ("tcp:127.0.0.1", "port"),
            ("tcp:host:99999", "not a number"),
            ("file:", "needs an address"),
            ("nonsense", "not a channel"),
            ("fd:x", "descriptor number"),
            ("fd:1", "3 or more"),
        ] {
            let e = Uri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn exec_streams_through_the_command_and_is_killed_when_dropped() {
        let uri = Uri::parse("exec:cat").unwrap();
        let o = open_destination(&uri).unwrap();
        assert_eq!(o.kind, Kind::Stream);
        let mut s = std::os::unix::net::UnixStream::from(o.fd);
        s.write_all(b"through cat").unwrap();
        let mut got = [0u8; 11];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through cat");
        // Dropping the guard (a failed transfer) kills the command: its end closes.
        drop(o.guard);
        assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn fd_channels_are_classified_by_what_the_descriptor_is() {
        let uri = Uri::Fd(9);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(classify(&uri, a.into()).unwrap().kind, Kind::Stream);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(classify(&uri, l.into()).unwrap().kind, Kind::Listener);
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(classify(&uri, f.into()).unwrap().kind, Kind::File);
        let (r, _w) = std::io::pipe().unwrap();
        let e = classify(&uri, r.into()).err().unwrap().to_string();
        assert!(e.contains("one direction only"), "{e}");
    }
}
