//! A two-party Cap'n Proto RPC system over a Unix stream, as every party of the control plane
//! sets it up.

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

fn network(
    stream: tokio::net::UnixStream,
    side: Side,
) -> Box<dyn capnp_rpc::VatNetwork<twoparty::VatId>> {
    let (reader, writer) = stream.into_split();
    Box::new(twoparty::VatNetwork::new(
        reader.compat(),
        writer.compat_write(),
        side,
        Default::default(),
    ))
}

/// The client side: the RPC system to drive (spawn it on a LocalSet) and the server's
/// bootstrap capability.
pub fn client<C: capnp::capability::FromClientHook>(
    stream: tokio::net::UnixStream,
) -> (RpcSystem<twoparty::VatId>, C) {
    let mut rpc = RpcSystem::new(network(stream, Side::Client), None);
    let bootstrap = rpc.bootstrap(twoparty::VatId::Server);
    (rpc, bootstrap)
}

/// The server side, offering `bootstrap` to the client.
pub fn server(
    stream: tokio::net::UnixStream,
    bootstrap: capnp::capability::Client,
) -> RpcSystem<twoparty::VatId> {
    RpcSystem::new(network(stream, Side::Server), Some(bootstrap))
}

/// A std stream made ready for tokio (non-blocking, registered with the running reactor).
pub fn tokio_stream(
    stream: std::os::unix::net::UnixStream,
) -> std::io::Result<tokio::net::UnixStream> {
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// Why a control connection's first message was not the side channel, or why descriptors
/// asked for over the side channel did not come.
#[derive(Debug, thiserror::Error)]
pub enum SideChannelError {
    #[error("it sent nothing for 10 s")]
    Silent,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("it began with {0} byte(s) ({1:#04x}) and {2} descriptor(s), not the side channel")]
    Unexpected(usize, u8, usize),
    #[error("nothing came on the side channel within {0} s")]
    Timeout(u64),
    #[error("the other side closed the side channel")]
    Closed,
    #[error("the side channel: {0}")]
    Channel(#[source] std::io::Error),
    /// The other side's answer to a request over the side channel: it could not do it.
    #[error("{0}")]
    Refused(String),
    #[error("the side channel carried {0:?} with {1} descriptor(s); expected {2}")]
    Wrong(String, usize, &'static str),
}

/// The next message on a side channel, with its descriptors, waiting up to `secs` seconds for
/// it: how a helper takes the descriptors vmm-core sends just before a call that uses them.
pub fn side_message(
    side: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    secs: u16,
) -> Result<(usize, Vec<std::os::fd::OwnedFd>), SideChannelError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pfd = [PollFd::new(side, PollFlags::POLLIN)];
    match poll(&mut pfd, PollTimeout::from(secs.saturating_mul(1000))) {
        Ok(0) => Err(SideChannelError::Timeout(secs.into())),
        Ok(_) => {
            crate::fdpass::recv(side, buf, libc::MSG_DONTWAIT).map_err(SideChannelError::Channel)
        }
        Err(e) => Err(SideChannelError::Channel(e.into())),
    }
}

/// Runs `f` to its end on a current-thread tokio runtime, in a LocalSet (capnp-rpc is !Send):
/// how every binary of the project, and each of vmm-core's RPC threads, runs its RPC.
pub fn run_local<F: std::future::Future>(f: F) -> std::io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(tokio::task::LocalSet::new().block_on(&rt, f))
}

/// A descriptor this process owns, watched by the current tokio runtime (made non-blocking
/// first when `nonblocking` says so: tokio expects it).
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
    nonblocking: bool,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    if nonblocking {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fl = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    }
    // SAFETY: an OwnedFd is open and, owned by the AsyncFd from here on, names the same open
    // file description for the AsyncFd's whole life (nothing else can close or replace it).
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// The other side's message for a failed call, as a user reads it: capnp's "remote
/// exception: " prefix taken off. Every RPC client maps its errors through here.
pub fn remote_message(e: &capnp::Error) -> String {
    e.extra.trim_start_matches("remote exception: ").to_string()
}

/// An RPC call that failed: the peer refused it (its message), or the connection ended.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Failed(String),
    #[error("the connection ended ({0})")]
    Disconnected(String),
}

impl From<capnp::Error> for RemoteError {
    fn from(e: capnp::Error) -> Self {
        match e.kind {
            capnp::ErrorKind::Disconnected => RemoteError::Disconnected(remote_message(&e)),
            _ => RemoteError::Failed(remote_message(&e)),
        }
    }
}

/// The server's side of a new control connection's side channel (see chardevd.capnp and
/// blockd.capnp): the first message, one byte (1) with one descriptor, the client's end of a
/// SOCK_SEQPACKET pair that carries file descriptors from then on.
pub async fn accept_side_channel(
    stream: &tokio::net::UnixStream,
) -> Result<std::os::fd::OwnedFd, SideChannelError> {
    use std::os::fd::AsFd;
    let recv = stream.async_io(tokio::io::Interest::READABLE, || {
        let mut byte = [0u8; 1];
        crate::fdpass::recv(stream.as_fd(), &mut byte, libc::MSG_DONTWAIT)
            .map(|(n, fds)| (n, byte[0], fds))
    });
    match tokio::time::timeout(std::time::Duration::from_secs(10), recv).await {
        Err(_) => Err(SideChannelError::Silent),
        Ok(Err(e)) => Err(SideChannelError::Io(e)),
        Ok(Ok((1, crate::fdpass::SIDE_CHANNEL_PREAMBLE, mut fds))) if fds.len() == 1 => {
            Ok(fds.pop().expect("one descriptor"))
        }
        Ok(Ok((n, b, fds))) => Err(SideChannelError::Unexpected(n, b, fds.len())),
    }
}

/// The client's side of a new control connection's side channel: sends the preamble with
/// the server's end of a new SOCK_SEQPACKET pair, and returns ours.
pub fn open_side_channel(
    stream: &std::os::unix::net::UnixStream,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let (ours, theirs) = crate::fdpass::seqpacket_pair()?;
    crate::fdpass::send(
        stream.as_fd(),
        &[crate::fdpass::SIDE_CHANNEL_PREAMBLE],
        &[theirs.as_fd()],
    )?;
    Ok(ours)
}
