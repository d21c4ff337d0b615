//! The backends and the Cap'n Proto objects that serve them.
//!
//! Flow-control policy (every write is acknowledged to vmm-core only once the backend has
//! taken it or dropped it, so vmm-core's bounded buffer is where a slow backend is felt):
//! - file and stdio take every byte; a slow reader of stdio slows the console down;
//! - the ring keeps the newest bytes and counts what it drops;
//! - a Unix socket (server or client) with no peer connected drops bytes and counts them; a
//!   connected peer gets every byte;
//! - a pty that nobody has open, or whose reader stalls for more than a second, drops bytes
//!   and counts them.

use capnp::capability::Rc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm_proto::chardevd_capnp::{backend, chardevd, device, fault, input_sink};
use vmm_proto::rpc::SideChannelError;

/// How long a pty's reader may stall a write before its bytes are dropped.
const PTY_STALL: Duration = Duration::from_secs(1);

/// Serves `open`. chardevd opens no host path: what a backend needs comes from vmm-core over
/// the side channel (see proto/schema/chardevd.capnp).
pub struct Server {
    side: std::rc::Rc<AsyncFd<OwnedFd>>,
}

impl Server {
    pub fn new(side: OwnedFd) -> std::io::Result<Server> {
        let side = vmm_proto::rpc::async_fd(side, false)?;
        Ok(Server {
            side: std::rc::Rc::new(side),
        })
    }

    /// The descriptors vmm-core sent for device `name`, just before asking to open it.
    fn take_fds(&self, name: &str, want: usize) -> Result<Vec<OwnedFd>, capnp::Error> {
        let mut buf = [0u8; 256];
        let (n, fds) =
            vmm_proto::fdpass::recv(self.side.get_ref().as_fd(), &mut buf, libc::MSG_DONTWAIT)
                .map_err(|e| {
                    failed(format!(
                        "{name}: vmm-core sent no descriptors on the side channel ({e})"
                    ))
                })?;
        if &buf[..n] != name.as_bytes() || fds.len() != want {
            return Err(failed(format!(
                "{name}: the side channel carried {} descriptors for {:?}; expected {want} for {name}",
                fds.len(),
                String::from_utf8_lossy(&buf[..n])
            )));
        }
        Ok(fds)
    }
}

fn failed(msg: String) -> capnp::Error {
    capnp::Error::failed(msg)
}

impl chardevd::Server for Server {
    async fn rng(
        self: Rc<Self>,
        params: chardevd::RngParams,
        mut results: chardevd::RngResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p
            .get_name()?
            .to_string()
            .map_err(|e| failed(e.to_string()))?;
        let (rate, burst, egd) = (p.get_rate(), p.get_burst(), p.get_egd());
        use vmm_proto::chardevd_capnp::RngLog;
        let mode = p.get_log()?;
        let mut fds = self.take_fds(&name, if mode == RngLog::None { 2 } else { 3 })?;
        let log = match mode {
            RngLog::None => crate::rng::Log::None,
            RngLog::Record => {
                let file = std::fs::File::from(fds.pop().expect("three descriptors"));
                crate::rng::Log::Record(
                    vmm_proto::record::Writer::append(file, crate::rng::LOG_KIND)
                        .map_err(|e| failed(format!("{name}: its log: {e}")))?,
                )
            }
            RngLog::Replay => {
                let file = std::fs::File::from(fds.pop().expect("three descriptors"));
                crate::rng::Log::Replay(
                    vmm_proto::record::Reader::resume(file, crate::rng::LOG_KIND)
                        .map_err(|e| failed(format!("{name}: its log: {e}")))?,
                )
            }
        };
        let source = std::fs::File::from(fds.pop().expect("two descriptors"));
        let listener = std::os::unix::net::UnixListener::from(fds.pop().expect("two descriptors"));
        let limit = (rate > 0).then_some(crate::rng::Limit {
            rate,
            burst: burst.max(1),
        });
        let who = name.clone();
        std::thread::Builder::new()
            .name(format!("{name}-vhost"))
            .spawn(move || crate::rng::serve(who, listener, source, egd, limit, log))
            .map_err(|e| failed(format!("{name}: cannot start its thread ({e})")))?;
        let mut text = match limit {
            Some(l) => format!("vhost-user-rng, {} bytes/s, bursts of {}", l.rate, l.burst),
            None => "vhost-user-rng, no rate limit".to_string(),
        };
        if egd {
            text += ", from an EGD daemon";
        }
        match mode {
            RngLog::None => {}
            RngLog::Record => text += ", recording what it serves",
            RngLog::Replay => text += ", replaying a recording",
        }
        log::info!("{name}: {text}");
        results.get().set_description(&text);
        Ok(())
    }

    async fn open(
        self: Rc<Self>,
        params: chardevd::OpenParams,
        mut results: chardevd::OpenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p
            .get_name()?
            .to_string()
            .map_err(|e| failed(e.to_string()))?;
        let input = if p.has_input() {
            Some(p.get_input()?)
        } else {
            None
        };
        let mut start: Option<Box<dyn FnOnce(std::rc::Weak<Device>)>> = None;
        let (kind, description) = match p.get_backend()?.which()? {
            backend::Null(()) => (Kind::Null, "null".to_string()),
            backend::File(f) => {
                let path = f?
                    .get_path()?
                    .to_string()
                    .map_err(|e| failed(e.to_string()))?;
                let fd = self.take_fds(&name, 1)?.pop().expect("one descriptor");
                (Kind::File(std::fs::File::from(fd)), format!("file {path}"))
            }
            backend::Ring(size) => (
                Kind::Ring {
                    data: VecDeque::new(),
                    size: size.max(1) as usize,
                },
                format!("ring of {} bytes", size.max(1)),
            ),
            backend::UnixServer(path) => {
                let path = path?.to_string().map_err(|e| failed(e.to_string()))?;
                let fd = self.take_fds(&name, 1)?.pop().expect("one descriptor");
                let listener = std::os::unix::net::UnixListener::from(fd);
                let listener = listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixListener::from_std(listener))
                    .map_err(|e| failed(format!("{name}: socket {path}: {e}")))?;
                start = Some(Box::new(move |dev| {
                    tokio::task::spawn_local(accept_clients(listener, dev));
                }));
                (
                    Kind::Socket { peer: None },
                    format!("unix socket {path} (listening)"),
                )
            }
            backend::UnixClient(c) => {
                let c = c?;
                let path = c
                    .get_path()?
                    .to_string()
                    .map_err(|e| failed(e.to_string()))?;
                let every = Duration::from_millis(u64::from(c.get_reconnect_ms().max(10)));
                let described = format!("unix socket {path} (connecting)");
                let side = self.side.clone();
                start = Some(Box::new(move |dev| {
                    tokio::task::spawn_local(connect_loop(side, path, every, dev));
                }));
                (Kind::Socket { peer: None }, described)
            }
            backend::Stdio(()) => {
                let mut fds = self.take_fds(&name, 2)?;
                let output = fds.pop().expect("two descriptors");
                let input = fds.pop().expect("two descriptors");
                let stop = Arc::new(AtomicBool::new(false));
                let (writes, thread_rx) = std::sync::mpsc::channel::<StdioWrite>();
                std::thread::Builder::new()
                    .name(format!("{name}-stdout"))
                    .spawn(move || stdio_writer(output, thread_rx))
                    .map_err(|e| failed(format!("{name}: stdio: {e}")))?;
                let (in_tx, in_rx) = tokio::sync::mpsc::unbounded_channel();
                let stop_reader = stop.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-stdin"))
                    .spawn(move || read_input(input, in_tx, stop_reader, Hangup::Ends))
                    .map_err(|e| failed(format!("{name}: stdio: {e}")))?;
                start = Some(Box::new(move |dev| {
                    tokio::task::spawn_local(forward_from(in_rx, dev));
                }));
                (
                    Kind::Stdio(Stdio {
                        writes,
                        _stop: Stop(stop),
                        closed: false,
                    }),
                    "stdio".to_string(),
                )
            }
            backend::Pty(path) => {
                let path = path?.to_string().map_err(|e| failed(e.to_string()))?;
                let master = self.take_fds(&name, 1)?.pop().expect("one descriptor");
                let master = vmm_proto::rpc::async_fd(master, true)
                    .map_err(|e| failed(format!("{name}: pty: {e}")))?;
                let master = std::rc::Rc::new(master);
                // Input is read on a thread with level-triggered poll: a pty's master keeps
                // reporting a hang-up while nobody has it open, which edge-triggered readiness
                // does not follow well.
                let input = master
                    .get_ref()
                    .try_clone()
                    .map_err(|e| failed(format!("{name}: pty: {e}")))?;
                let stop = Arc::new(AtomicBool::new(false));
                let (in_tx, in_rx) = tokio::sync::mpsc::unbounded_channel();
                let stop_reader = stop.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-pty"))
                    .spawn(move || read_input(input, in_tx, stop_reader, Hangup::Wait))
                    .map_err(|e| failed(format!("{name}: pty: {e}")))?;
                start = Some(Box::new(move |dev| {
                    tokio::task::spawn_local(forward_from(in_rx, dev));
                }));
                log::info!("{name}: pty {path}");
                (
                    Kind::Pty(Pty {
                        master,
                        _stop: Stop(stop),
                    }),
                    format!("pty {path}"),
                )
            }
        };
        let dev = Rc::new(Device {
            name,
            kind: RefCell::new(kind),
            dropped: RefCell::new(0),
            input: RefCell::new(input),
            delay_ms: std::cell::Cell::new(0),
        });
        if let Some(start) = start {
            start(std::rc::Rc::downgrade(&dev));
        }
        let mut r = results.get();
        r.set_description(&description);
        r.set_device(capnp_rpc::new_client_from_rc(dev));
        Ok(())
    }
}

enum Kind {
    Null,
    File(std::fs::File),
    Ring {
        data: VecDeque<u8>,
        size: usize,
    },
    /// A Unix socket, listening or connecting: `peer` is the current connection.
    Socket {
        peer: Option<Peer>,
    },
    Stdio(Stdio),
    Pty(Pty),
}

/// Tells an input thread to end (it looks between polls) when the device goes.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

struct Pty {
    master: std::rc::Rc<AsyncFd<OwnedFd>>,
    _stop: Stop,
}

/// A socket backend's connection: where output goes, and how to end it (the reader stops,
/// which closes the connection for good).
struct Peer {
    writer: tokio::net::unix::OwnedWriteHalf,
    cut: std::rc::Rc<tokio::sync::Notify>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.cut.notify_one();
    }
}

/// A write for the stdio thread, and where to say that it is done (or how many bytes were
/// dropped because the output is gone).
type StdioWrite = (Vec<u8>, futures::channel::oneshot::Sender<u64>);

/// The writer thread ends with its channel, the reader with `_stop`.
struct Stdio {
    writes: std::sync::mpsc::Sender<StdioWrite>,
    _stop: Stop,
    closed: bool,
}

pub struct Device {
    name: String,
    kind: RefCell<Kind>,
    dropped: RefCell<u64>,
    input: RefCell<Option<input_sink::Client>>,
    /// Fault injection: every write waits this long first.
    delay_ms: std::cell::Cell<u32>,
}

/// Sends input from a backend to the device's input sink (the guest), in order.
async fn forward(dev: &std::rc::Weak<Device>, data: &[u8]) -> bool {
    let Some(device) = dev.upgrade() else {
        return false;
    };
    let sink = device.input.borrow().clone();
    drop(device);
    if let Some(sink) = sink {
        let mut req = sink.input_request();
        req.get().set_data(data);
        let _ = req.send().promise.await;
    }
    true
}

async fn forward_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    dev: std::rc::Weak<Device>,
) {
    while let Some(data) = rx.recv().await {
        if !forward(&dev, &data).await {
            return;
        }
    }
}

/// Reads a connection's input until it closes, or until it is cut (its Peer dropped).
async fn read_peer(
    mut reader: tokio::net::unix::OwnedReadHalf,
    cut: std::rc::Rc<tokio::sync::Notify>,
    dev: &std::rc::Weak<Device>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::select! {
            r = reader.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = cut.notified() => return,
        };
        if !forward(dev, &buf[..n]).await {
            return;
        }
    }
}

/// Makes `stream` the device's connection (ending the one before); returns its reader half
/// and how it is cut.
fn set_peer(
    dev: &Device,
    stream: tokio::net::UnixStream,
) -> (
    tokio::net::unix::OwnedReadHalf,
    std::rc::Rc<tokio::sync::Notify>,
) {
    let (reader, writer) = stream.into_split();
    let cut = std::rc::Rc::new(tokio::sync::Notify::new());
    if let Kind::Socket { peer } = &mut *dev.kind.borrow_mut() {
        *peer = Some(Peer {
            writer,
            cut: cut.clone(),
        });
    }
    (reader, cut)
}

/// Serves a socket backend's clients, one at a time: a new client replaces the old one.
async fn accept_clients(listener: tokio::net::UnixListener, dev: std::rc::Weak<Device>) {
    while let Ok((stream, _)) = listener.accept().await {
        let Some(device) = dev.upgrade() else { return };
        let (reader, cut) = set_peer(&device, stream);
        let dev = dev.clone();
        tokio::task::spawn_local(async move { read_peer(reader, cut, &dev).await });
    }
}

/// A connection for a client backend, made by vmm-core (see the side channel).
async fn broker_connect(
    side: &AsyncFd<OwnedFd>,
    name: &str,
) -> Result<tokio::net::UnixStream, SideChannelError> {
    use vmm_proto::fdpass;
    fdpass::send(
        side.get_ref().as_fd(),
        format!("connect {name}").as_bytes(),
        &[],
    )
    .map_err(SideChannelError::Channel)?;
    let mut buf = [0u8; 512];
    loop {
        let mut ready = side.readable().await.map_err(SideChannelError::Channel)?;
        match ready.try_io(|fd| fdpass::recv(fd.get_ref().as_fd(), &mut buf, libc::MSG_DONTWAIT)) {
            Ok(Ok((0, _))) => return Err(SideChannelError::Closed),
            Ok(Ok((n, mut fds))) => {
                if buf[0] == b'!' || fds.len() != 1 {
                    let said = String::from_utf8_lossy(&buf[1..n]).into_owned();
                    return Err(SideChannelError::Refused(said));
                }
                let s = std::os::unix::net::UnixStream::from(fds.pop().expect("one"));
                return s
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixStream::from_std(s))
                    .map_err(SideChannelError::Channel);
            }
            Ok(Err(e)) => return Err(SideChannelError::Channel(e)),
            Err(_would_block) => {}
        }
    }
}

/// Keeps a client backend connected: has vmm-core connect, serves the connection until it
/// closes (or a write to it fails), and tries again every `every`, while the device exists.
async fn connect_loop(
    side: std::rc::Rc<AsyncFd<OwnedFd>>,
    path: String,
    every: Duration,
    dev: std::rc::Weak<Device>,
) {
    let mut connected_before = false;
    loop {
        let name = match dev.upgrade() {
            None => return,
            Some(d) => d.name.clone(),
        };
        let connected = broker_connect(&side, &name).await;
        match dev.upgrade() {
            None => return,
            Some(d) => match connected {
                Ok(stream) => {
                    log::info!(
                        "{}: {} {path}",
                        d.name,
                        if connected_before {
                            "reconnected to"
                        } else {
                            "connected to"
                        }
                    );
                    connected_before = true;
                    let (reader, cut) = set_peer(&d, stream);
                    drop(d);
                    read_peer(reader, cut.clone(), &dev).await;
                    if let Some(d) = dev.upgrade() {
                        if let Kind::Socket { peer } = &mut *d.kind.borrow_mut() {
                            if peer
                                .as_ref()
                                .is_some_and(|p| std::rc::Rc::ptr_eq(&p.cut, &cut))
                            {
                                *peer = None;
                            }
                        }
                        log::info!("{}: {path} disconnected; reconnecting", d.name);
                    }
                }
                Err(_) => drop(d),
            },
        }
        tokio::time::sleep(every).await;
    }
}

/// Writes to the stdio output, blocking (a slow terminal or pipe slows the console, which is
/// the backpressure). Once the output is gone (EPIPE), every later byte is counted as dropped.
fn stdio_writer(output: OwnedFd, writes: std::sync::mpsc::Receiver<StdioWrite>) {
    let mut out = std::fs::File::from(output);
    let mut gone = false;
    for (data, done) in writes {
        let dropped = if gone {
            data.len() as u64
        } else {
            match write_blocking(&mut out, &data) {
                Ok(()) => 0,
                Err(_) => {
                    gone = true;
                    data.len() as u64
                }
            }
        };
        let _ = done.send(dropped);
    }
}

/// write_all that also waits out EAGAIN, in case the descriptor is non-blocking.
fn write_blocking(out: &mut std::fs::File, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match out.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = [PollFd::new(out.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut p, PollTimeout::from(100u8));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a hang-up on an input means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hangup {
    /// The input has ended (a pipe's writer is gone; a file's end).
    Ends,
    /// Nobody has it open just now (a pty): look again shortly.
    Wait,
}

/// Reads an input (stdio's, or a pty's master) until it ends or the device is gone.
fn read_input(
    input: OwnedFd,
    to: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    stop: Arc<AtomicBool>,
    hangup: Hangup,
) {
    let mut buf = [0u8; 4096];
    let idle = || std::thread::sleep(Duration::from_millis(100));
    while !stop.load(Ordering::Acquire) {
        let mut p = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
        if poll(&mut p, PollTimeout::from(200u8)).unwrap_or(0) <= 0 {
            continue;
        }
        let readable = p[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if hangup == Hangup::Wait && !readable {
            idle();
            continue;
        }
        let n = match nix::unistd::read(&input, &mut buf) {
            Ok(0) if hangup == Hangup::Ends => return,
            Ok(0) | Err(nix::Error::EINTR | nix::Error::EAGAIN) => continue,
            Ok(n) => n,
            Err(_) if hangup == Hangup::Wait => {
                idle();
                continue;
            }
            Err(_) => return,
        };
        if to.send(buf[..n].to_vec()).is_err() {
            return;
        }
    }
}

/// Writes to a pty's master; returns how many bytes were dropped (nobody has the pty open, or
/// its reader stalled for longer than PTY_STALL).
async fn write_pty(master: &AsyncFd<OwnedFd>, data: &[u8]) -> u64 {
    let mut off = 0;
    while off < data.len() {
        let Ok(Ok(mut guard)) = tokio::time::timeout(PTY_STALL, master.writable()).await else {
            return (data.len() - off) as u64;
        };
        match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), &data[off..])?)) {
            Ok(Ok(0)) | Ok(Err(_)) => return (data.len() - off) as u64,
            Ok(Ok(n)) => off += n,
            Err(_would_block) => {}
        }
    }
    0
}

impl device::Server for Device {
    async fn write(
        self: Rc<Self>,
        params: device::WriteParams,
        _: device::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        let delay = self.delay_ms.get();
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay.into())).await;
        }
        enum Later {
            Socket(Peer),
            Stdio(futures::channel::oneshot::Receiver<u64>),
            Pty(std::rc::Rc<AsyncFd<OwnedFd>>),
        }
        let mut later = None;
        {
            let mut kind = self.kind.borrow_mut();
            match &mut *kind {
                Kind::Null => {}
                Kind::File(f) => f
                    .write_all(&data)
                    .map_err(|e| failed(format!("{}: write failed ({e})", self.name)))?,
                Kind::Ring { data: ring, size } => {
                    ring.extend(&data);
                    let excess = ring.len().saturating_sub(*size);
                    ring.drain(..excess);
                    *self.dropped.borrow_mut() += excess as u64;
                }
                Kind::Socket { peer } => match peer.take() {
                    Some(c) => later = Some(Later::Socket(c)),
                    None => *self.dropped.borrow_mut() += data.len() as u64,
                },
                Kind::Stdio(s) => {
                    let (done, wait) = futures::channel::oneshot::channel();
                    if s.closed || s.writes.send((data.clone(), done)).is_err() {
                        s.closed = true;
                        *self.dropped.borrow_mut() += data.len() as u64;
                    } else {
                        later = Some(Later::Stdio(wait));
                    }
                }
                Kind::Pty(p) => later = Some(Later::Pty(p.master.clone())),
            }
        }
        let dropped = match later {
            None => 0,
            Some(Later::Socket(mut c)) => {
                // A peer that went away is let go; the next one comes by accept or reconnect.
                if c.writer.write_all(&data).await.is_ok() {
                    if let Kind::Socket { peer } = &mut *self.kind.borrow_mut() {
                        peer.get_or_insert(c);
                    }
                    0
                } else {
                    data.len() as u64
                }
            }
            Some(Later::Stdio(wait)) => wait.await.unwrap_or(data.len() as u64),
            Some(Later::Pty(m)) => write_pty(&m, &data).await,
        };
        *self.dropped.borrow_mut() += dropped;
        Ok(())
    }

    async fn read_ring(
        self: Rc<Self>,
        _: device::ReadRingParams,
        mut results: device::ReadRingResults,
    ) -> Result<(), capnp::Error> {
        let kind = self.kind.borrow();
        let Kind::Ring { data, .. } = &*kind else {
            return Err(failed(format!("{}: not a ring backend", self.name)));
        };
        let (a, b) = data.as_slices();
        let mut r = results.get();
        r.set_data(&[a, b].concat());
        r.set_dropped(*self.dropped.borrow());
        Ok(())
    }

    async fn set_input(
        self: Rc<Self>,
        params: device::SetInputParams,
        _: device::SetInputResults,
    ) -> Result<(), capnp::Error> {
        *self.input.borrow_mut() = Some(params.get()?.get_sink()?);
        Ok(())
    }

    async fn inject_fault(
        self: Rc<Self>,
        params: device::InjectFaultParams,
        _: device::InjectFaultResults,
    ) -> Result<(), capnp::Error> {
        match params.get()?.get_fault()?.which()? {
            fault::Clear(()) => self.delay_ms.set(0),
            fault::DelayWritesMs(ms) => self.delay_ms.set(ms),
            fault::ForbiddenSyscall(()) => {
                // Answer first, then make the call.
                tokio::task::spawn_local(async {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    vmm_sandbox::seccomp::forbidden_call();
                });
            }
            fault::DropConnection(()) => match &mut *self.kind.borrow_mut() {
                // Dropping the write half shuts the connection down; the peer sees EOF.
                Kind::Socket { peer } => {
                    if peer.take().is_none() {
                        return Err(failed(format!("{}: no peer is connected", self.name)));
                    }
                }
                _ => {
                    return Err(failed(format!(
                        "{}: its backend has no connection to drop",
                        self.name
                    )))
                }
            },
        }
        Ok(())
    }
}
