//! The serial console through chardevd. Guest output goes into a bounded buffer that never
//! blocks a vCPU; a supervisor thread starts chardevd (a sibling executable, on an inherited
//! socketpair), streams the buffer to it one acknowledged write at a time, and restarts it if
//! it dies, resending what it had not acknowledged. Bytes are lost only if the buffer
//! overflows meanwhile (the oldest go first); they are counted and reported.
//!
//! chardevd's death is noticed at once: tokio waits on a child through a pidfd (SIGCHLD on
//! kernels without one), and a helper we only connect to is lost when its connection closes.
//!
//! Viewers attached through the API (`vmmctl console`) get a copy of what chardevd took, each
//! through its own bounded backlog, so a slow viewer skips bytes (and is told) but never slows
//! the console.

use crate::config::serial::Backend;
use crate::events::Events;
use capnp_rpc::twoparty;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_proto::chardevd_capnp::{chardevd, device, input_sink};
use vmm_proto::rpc::RemoteError;

/// Guest output buffered for chardevd.
pub const BUFFER_BYTES: usize = 4 << 20;
const WRITE_CHUNK: usize = 64 << 10;
/// How long output that follows a quiet spell is gathered before the first write.
const BATCH_DELAY: Duration = Duration::from_millis(2);
/// How far an attached viewer may fall behind before it skips bytes.
pub const VIEWER_BACKLOG: usize = 1 << 20;

/// An attached viewer's end in the supervisor: its queue, and how many bytes it has queued.
struct Viewer {
    tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    backlog: Arc<AtomicUsize>,
    skipped: u64,
}

/// What the API hands an attached viewer: guest output, and the byte count it must give back
/// (`Attached::done`) once each chunk has reached the viewer.
pub struct Attached {
    pub output: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    backlog: Arc<AtomicUsize>,
}

impl Attached {
    pub fn done(&self, bytes: usize) {
        self.backlog.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The virtio-rng device chardevd serves over vhost-user-rng: the listening socket vmm-core's
/// frontend connects to and the entropy source, handed to every chardevd start (a restarted
/// one takes the same socket and reads on in the same source), and the device, which
/// reconnects after a restart.
pub struct Rng {
    pub listener: std::os::fd::OwnedFd,
    pub source: std::os::fd::OwnedFd,
    /// The source is an EGD daemon's socket (asked for each request's bytes).
    pub egd: bool,
    /// Bytes a second (0: no limit), and the bucket's size.
    pub rate: u64,
    pub burst: u64,
    pub device: super::blockd::DeviceSlot,
    /// --record or --replay: the log, and whether it is being replayed.
    pub log: Option<(std::os::fd::OwnedFd, bool)>,
}

/// What a backend needs from the host, opened by vmm-core (chardevd opens no host path, so that
/// it can run with an empty root): handed to every chardevd start over the side channel.
/// Kept for the VM's life, so a restarted chardevd gets the same file, listening socket or
/// pty, and their clients see no change.
struct Resources {
    fds: Vec<std::os::fd::OwnedFd>,
    /// A listening socket's path, removed when the VM ends.
    socket: Option<PathBuf>,
    /// The pty's path.
    pty: Option<String>,
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Resources {
    fn open(backend: &Backend) -> Result<Resources, ChardevError> {
        let mut r = Resources {
            fds: Vec::new(),
            socket: None,
            pty: None,
        };
        match backend {
            Backend::Null | Backend::Ring(_) | Backend::UnixClient { .. } => {}
            Backend::Stdio => {
                let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
                for (fd, std) in [(0, stdin.as_fd()), (1, stdout.as_fd())] {
                    let dup = std
                        .try_clone_to_owned()
                        .map_err(|e| {
                            ChardevError::Resource(format!(
                                "--serial stdio: fd {fd} is not open ({e}); give vmm-core a standard input and output, or use --serial null"
                            ))
                        })?;
                    r.fds.push(dup);
                }
            }
            Backend::File { path, append } => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        ChardevError::Resource(format!(
                            "--serial file={path}: cannot open it ({e}); check that its directory exists and is writable"
                        ))
                    })?;
                if !append {
                    file.set_len(0).map_err(|e| {
                        ChardevError::Resource(format!(
                            "--serial file={path}: cannot truncate it ({e})"
                        ))
                    })?;
                }
                r.fds.push(file.into());
            }
            Backend::UnixServer(path) => {
                let listener = vmm_proto::unix::bind(path.as_ref(), 0o600).map_err(|e| {
                    ChardevError::Resource(format!(
                        "--serial unix={path}: cannot listen on it ({e})"
                    ))
                })?;
                r.socket = Some(PathBuf::from(path));
                r.fds.push(listener.into());
            }
            Backend::Pty => {
                let (master, path) = open_pty().map_err(|e| {
                    ChardevError::Resource(format!("--serial pty: cannot open a pty ({e})"))
                })?;
                r.fds.push(master);
                r.pty = Some(path);
            }
        }
        Ok(r)
    }
}

/// A new pseudo-terminal: its master and the slave's path. The slave is set to raw mode, so
/// that the program on the other end sees the guest's bytes as they are.
fn open_pty() -> std::io::Result<(std::os::fd::OwnedFd, String)> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let pty = nix::pty::openpty(None, None)?;
    // openpty(3) cannot set close-on-exec: no other helper vmm-core starts may inherit it.
    fcntl(&pty.master, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    let path = nix::unistd::ttyname(&pty.slave)?;
    if let Ok(mut t) = tcgetattr(&pty.slave) {
        cfmakeraw(&mut t);
        let _ = tcsetattr(&pty.slave, SetArg::TCSANOW, &t);
    }
    drop(pty.slave);
    Ok((pty.master, path.to_string_lossy().into_owned()))
}

#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    #[error("{0}")]
    Resource(String),
    #[error(transparent)]
    Helper(#[from] super::HelperError),
    #[error("--serial: chardevd refused the backend: {0}")]
    Backend(String),
    #[error("chardevd: {0}")]
    Rpc(String),
}

struct Buf {
    data: VecDeque<u8>,
    /// The stream offset of data[0].
    head: u64,
    dropped: u64,
}

/// The bounded buffer between the UART (vCPU threads) and the supervisor.
pub struct ConsoleBuffer {
    buf: Mutex<Buf>,
    notify: tokio::sync::Notify,
    capacity: usize,
    /// Set when the VMM ends: the supervisor stops chardevd and does not restart it.
    stopping: std::sync::atomic::AtomicBool,
    stop: tokio::sync::Notify,
    viewers: Mutex<Vec<Viewer>>,
    /// What chardevd says its backend is (e.g. "pty /dev/pts/3"), once it has opened it.
    pub description: Mutex<String>,
}

impl ConsoleBuffer {
    pub fn new(capacity: usize) -> ConsoleBuffer {
        ConsoleBuffer {
            buf: Mutex::new(Buf {
                data: VecDeque::new(),
                head: 0,
                dropped: 0,
            }),
            notify: tokio::sync::Notify::new(),
            capacity,
            stopping: std::sync::atomic::AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            viewers: Mutex::new(Vec::new()),
            description: Mutex::new(String::new()),
        }
    }

    /// A new viewer: from now on it gets a copy of the output chardevd takes.
    pub fn attach(&self) -> Attached {
        let (tx, output) = tokio::sync::mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        self.viewers.lock().unwrap().push(Viewer {
            tx,
            backlog: backlog.clone(),
            skipped: 0,
        });
        Attached { output, backlog }
    }

    /// Copies output that chardevd took to every viewer; a viewer whose backlog is full skips
    /// it, and is told how much it skipped before the next bytes it gets.
    fn tee(&self, chunk: &[u8]) {
        let mut viewers = self.viewers.lock().unwrap();
        viewers.retain_mut(|v| {
            if v.backlog.load(Ordering::Acquire) + chunk.len() > VIEWER_BACKLOG {
                v.skipped += chunk.len() as u64;
                return !v.tx.is_closed();
            }
            let mut bytes = Vec::with_capacity(chunk.len() + 48);
            if v.skipped > 0 {
                bytes.extend(format!("\r\n[vmm-core: {} bytes skipped]\r\n", v.skipped).bytes());
                v.skipped = 0;
            }
            bytes.extend_from_slice(chunk);
            v.backlog.fetch_add(bytes.len(), Ordering::AcqRel);
            v.tx.send(bytes).is_ok()
        });
    }

    /// Never blocks: when full, the oldest bytes make room and are counted.
    pub fn push(&self, bytes: &[u8]) {
        let mut b = self.buf.lock().unwrap();
        let was_empty = b.data.is_empty();
        b.data.extend(bytes);
        let excess = b.data.len().saturating_sub(self.capacity);
        if excess > 0 {
            b.data.drain(..excess);
            b.head += excess as u64;
            b.dropped += excess as u64;
        }
        drop(b);
        // The supervisor looks again after each write; it only needs waking from idle.
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// The oldest unacknowledged bytes, and the stream offset they start at.
    fn peek(&self, max: usize) -> (u64, Vec<u8>) {
        let b = self.buf.lock().unwrap();
        let n = b.data.len().min(max);
        (b.head, b.data.iter().take(n).copied().collect())
    }

    /// Forgets bytes up to `end` (a stream offset): chardevd has them.
    fn ack(&self, end: u64) {
        let mut b = self.buf.lock().unwrap();
        let n = end.saturating_sub(b.head).min(b.data.len() as u64);
        b.data.drain(..n as usize);
        b.head += n;
    }

    /// Waits (up to `timeout`) until chardevd has acknowledged everything.
    pub fn wait_drained(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.buf.lock().unwrap().data.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn dropped(&self) -> u64 {
        self.buf.lock().unwrap().dropped
    }
}

/// The UART's writer when the console goes to chardevd.
pub struct BufferWriter(pub Arc<ConsoleBuffer>);

impl std::io::Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fault injection on the console's backend (see proto/schema/chardevd.capnp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Clear,
    DropConnection,
    DelayWritesMs(u32),
    ForbiddenSyscall,
}

/// What the management API asks of the device in chardevd.
pub enum Control {
    DumpRing(futures::channel::oneshot::Sender<Result<(Vec<u8>, u64), RemoteError>>),
    Fault(
        Fault,
        futures::channel::oneshot::Sender<Result<(), RemoteError>>,
    ),
}

pub type ControlSender = tokio::sync::mpsc::UnboundedSender<Control>;

/// Where console input from chardevd goes (the UART of the current boot).
pub type InputFn = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The running supervisor; dropping it ends chardevd (and reaps it) and the supervisor.
pub struct Supervisor {
    buffer: Arc<ConsoleBuffer>,
    /// Requests for the device, served between writes.
    pub control: ControlSender,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.buffer
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.buffer.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the supervisor, which starts chardevd; `Ready` says when it runs and accepted the
/// backend (or why not).
pub fn start(
    mode: super::Source,
    backend: Backend,
    buffer: Arc<ConsoleBuffer>,
    input: InputFn,
    events: Arc<Events>,
    rng: Option<Rng>,
) -> Result<(Supervisor, Ready), ChardevError> {
    let resources = Resources::open(&backend)?;
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let for_handle = buffer.clone();
    let (control, mut controls) = tokio::sync::mpsc::unbounded_channel();
    let thread = super::client_thread("chardevd-supervisor", move || async move {
        let helper = (backend, resources, rng);
        supervise(mode, helper, buffer, input, events, first_tx, &mut controls).await
    })
    .map_err(|e| ChardevError::Rpc(format!("cannot start the supervisor thread: {e}")))?;
    Ok((
        Supervisor {
            buffer: for_handle,
            control,
            thread: Some(thread),
        },
        Ready(first_rx),
    ))
}

/// Whether chardevd came up: the VM waits for it only before its vCPUs run, so that
/// chardevd starts (and enters its sandbox) while the VM is being built.
pub struct Ready(std::sync::mpsc::Receiver<Result<(), ChardevError>>);

impl Ready {
    pub fn wait(self) -> Result<(), ChardevError> {
        self.0
            .recv()
            .unwrap_or_else(|_| Err(ChardevError::Rpc("the supervisor ended".into())))
    }
}

async fn supervise(
    mode: super::Source,
    (backend, resources, rng): (Backend, Resources, Option<Rng>),
    buffer: Arc<ConsoleBuffer>,
    input: InputFn,
    events: Arc<Events>,
    first: std::sync::mpsc::Sender<Result<(), ChardevError>>,
    controls: &mut tokio::sync::mpsc::UnboundedReceiver<Control>,
) {
    let mut first = Some(first);
    let mut restarts = 0u32;
    let mut dropped_at_death = None;
    loop {
        let helper = Helper {
            mode: &mode,
            backend: &backend,
            resources: &resources,
            rng: rng.as_ref(),
            buffer: &buffer,
            input: &input,
            events: &events,
        };
        let result = run_helper(&helper, &mut first, &mut dropped_at_death, controls).await;
        if buffer.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Some(tx) = first.take() {
            // chardevd never came up: the VM does not start.
            let _ = tx.send(result.map(|_| ()));
            return;
        }
        let why = match result {
            Ok(status) => status,
            Err(e) => e.to_string(),
        };
        if matches!(mode, super::Source::Spawn(..)) {
            log::warn!("chardevd died ({why}); restarting it");
        } else {
            log::warn!("lost chardevd ({why}); reconnecting");
        }
        events.emit("helper-died", format!("chardevd: {why}"));
        dropped_at_death.get_or_insert(buffer.dropped());
        restarts += 1;
        // Back off a little when it keeps dying, but never give up while the VM lives.
        let delay = Duration::from_millis(50 * u64::from(restarts.min(20)));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = buffer.stop.notified() => return,
        }
    }
}

/// Runs one chardevd until it dies; Ok(why) when it died after starting.
/// What every start of chardevd needs.
struct Helper<'a> {
    mode: &'a super::Source,
    backend: &'a Backend,
    resources: &'a Resources,
    rng: Option<&'a Rng>,
    buffer: &'a ConsoleBuffer,
    input: &'a InputFn,
    events: &'a Arc<Events>,
}

async fn run_helper(
    helper: &Helper<'_>,
    first: &mut Option<std::sync::mpsc::Sender<Result<(), ChardevError>>>,
    dropped_at_death: &mut Option<u64>,
    controls: &mut tokio::sync::mpsc::UnboundedReceiver<Control>,
) -> Result<String, ChardevError> {
    let Helper {
        mode,
        backend,
        resources,
        rng,
        buffer,
        input,
        events,
    } = *helper;
    let (ours, mut child, who) = match mode {
        super::Source::Spawn(exe, sandbox) => {
            let report = super::stderr::seccomp_reporter(events.clone());
            let (ours, child) = super::prepare(super::CHARDEVD, exe, sandbox.as_deref(), report)
                .and_then(super::Prepared::spawn_async)?;
            let who = format!("chardevd (pid {})", child.id().unwrap_or(0));
            (ours, Some(child), who)
        }
        super::Source::Connect(path) => {
            let ours = super::connect(super::CHARDEVD, path)?;
            (ours, None, format!("chardevd at {}", path.display()))
        }
    };

    // The side channel goes first (see proto/schema/chardevd.capnp), and with it the
    // descriptors the backend takes from us.
    let side = side_channel(&ours, resources, rng)
        .map_err(|e| ChardevError::Rpc(format!("{who}: cannot hand it descriptors ({e})")))?;
    let side = vmm_proto::rpc::async_fd(side, false)
        .map_err(|e| ChardevError::Rpc(format!("{who}: side channel: {e}")))?;
    let stream =
        vmm_proto::rpc::tokio_stream(ours).map_err(|e| ChardevError::Rpc(e.to_string()))?;
    let (rpc, server): (_, chardevd::Client) = vmm_proto::rpc::client(stream);
    let disconnect = rpc.get_disconnector();
    let mut connection = tokio::task::spawn_local(rpc);

    let mut open = server.open_request();
    {
        let mut p = open.get();
        p.set_name("serial0");
        p.set_input(capnp_rpc::new_client(InputServer(input.clone())));
        write_backend(p.init_backend(), backend, resources);
    }
    let (device, description) = match open.send().promise.await {
        Ok(reply) => reply
            .get()
            .and_then(|r| {
                Ok((
                    r.get_device()?,
                    r.get_description()?.to_string().unwrap_or_default(),
                ))
            })
            .map_err(|e| ChardevError::Rpc(e.to_string()))?,
        Err(e) => {
            if let Some(c) = child.as_mut() {
                let _ = c.kill().await;
            }
            let msg = vmm_proto::rpc::remote_message(&e);
            return Err(if e.kind == capnp::ErrorKind::Failed {
                ChardevError::Backend(msg)
            } else {
                ChardevError::Rpc(msg)
            });
        }
    };
    if let Some(rng) = rng {
        serve_rng(&server, rng, first.is_none(), &who).await?;
    }
    let changed = {
        let mut d = buffer.description.lock().unwrap();
        let changed = *d != description;
        *d = description.clone();
        changed
    };
    if changed {
        log::info!("serial0: console on {description}");
        if first.is_none() {
            events.emit("console-backend", format!("serial0: {description}"));
        }
    }
    match (first.take(), dropped_at_death.take()) {
        (Some(tx), _) => {
            log::info!(
                "{} {who}",
                if child.is_some() {
                    "started"
                } else {
                    "connected to"
                }
            );
            events.emit("helper-started", who.clone());
            let _ = tx.send(Ok(()));
        }
        (None, before) => {
            let lost = buffer.dropped() - before.unwrap_or(buffer.dropped());
            log::info!(
                "{} {who}; console output resumes, {lost} bytes lost meanwhile",
                if child.is_some() {
                    "restarted"
                } else {
                    "reconnected to"
                }
            );
            events.emit("helper-restarted", format!("{who}, {lost} bytes lost"));
        }
    }
    // chardevd's requests on the side channel are answered while it runs.
    let side_task = {
        let backend = backend.clone();
        tokio::task::spawn_local(async move {
            while let Ok(mut ready) = side.readable().await {
                loop {
                    match serve_side_request(ready.get_inner(), &backend) {
                        Side::Served => {}
                        Side::Idle => break,
                        // chardevd is gone; the next one gets a new channel.
                        Side::Closed => return,
                    }
                }
                ready.clear_ready();
            }
        })
    };
    let result = pump(
        &device,
        buffer,
        &mut child,
        &mut connection,
        disconnect,
        controls,
    )
    .await;
    side_task.abort();
    result
}

/// The backend as chardevd's `open` takes it.
fn write_backend(
    mut b: vmm_proto::chardevd_capnp::backend::Builder,
    backend: &Backend,
    resources: &Resources,
) {
    match backend {
        Backend::Null => b.set_null(()),
        Backend::Stdio => b.set_stdio(()),
        Backend::Pty => b.set_pty(resources.pty.as_deref().unwrap_or_default()),
        Backend::UnixClient { path, reconnect_ms } => {
            let mut c = b.init_unix_client();
            c.set_path(path);
            c.set_reconnect_ms(*reconnect_ms);
        }
        Backend::File { path, append } => {
            let mut f = b.init_file();
            f.set_path(path);
            f.set_append(*append);
        }
        Backend::Ring(size) => b.set_ring(*size),
        Backend::UnixServer(path) => b.set_unix_server(path),
    }
}

/// Sends chardevd the side channel on a new control connection, and on it the descriptors
/// the backend takes from us; returns our end, which then serves chardevd's requests.
fn side_channel(
    control: &std::os::unix::net::UnixStream,
    resources: &Resources,
    rng: Option<&Rng>,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use vmm_proto::fdpass;
    let (ours, theirs) = fdpass::seqpacket_pair()?;
    fdpass::send(
        control.as_fd(),
        &[fdpass::SIDE_CHANNEL_PREAMBLE],
        &[theirs.as_fd()],
    )?;
    if !resources.fds.is_empty() {
        let fds: Vec<BorrowedFd> = resources.fds.iter().map(|f| f.as_fd()).collect();
        fdpass::send(ours.as_fd(), b"serial0", &fds)?;
    }
    if let Some(r) = rng {
        let mut fds = vec![r.listener.as_fd(), r.source.as_fd()];
        if let Some((log, _)) = &r.log {
            fds.push(log.as_fd());
        }
        fdpass::send(ours.as_fd(), RNG.as_bytes(), &fds)?;
    }
    Ok(ours)
}

/// The rng device's name.
pub const RNG: &str = "rng0";

/// Has chardevd serve the rng (its descriptors went on the side channel); after a restart,
/// the device connects again.
async fn serve_rng(
    server: &chardevd::Client,
    rng: &Rng,
    restarted: bool,
    who: &str,
) -> Result<(), ChardevError> {
    let mut req = server.rng_request();
    req.get().set_name(RNG);
    req.get().set_rate(rng.rate);
    req.get().set_egd(rng.egd);
    req.get().set_burst(rng.burst);
    use vmm_proto::chardevd_capnp::RngLog;
    req.get().set_log(match &rng.log {
        None => RngLog::None,
        Some((_, false)) => RngLog::Record,
        Some((_, true)) => RngLog::Replay,
    });
    let reply = req.send().promise.await.map_err(|e| {
        ChardevError::Rpc(format!(
            "{who}: cannot serve {RNG}: {}",
            vmm_proto::rpc::remote_message(&e)
        ))
    })?;
    let description = reply
        .get()
        .and_then(|r| Ok(r.get_description()?.to_string().unwrap_or_default()))
        .map_err(|e| ChardevError::Rpc(e.to_string()))?;
    log::info!("{RNG}: {description}, served by {who}");
    if restarted {
        let dev = rng
            .device
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|w| w.upgrade());
        if let Some(dev) = dev {
            match dev.lock().unwrap().reconnect() {
                Ok(()) => log::info!("{RNG}: reconnected to the restarted chardevd"),
                Err(e) => log::error!("{RNG}: cannot reconnect: {e}"),
            }
        }
    }
    Ok(())
}

/// Answers a request chardevd sent on the side channel: `connect NAME` (a unix-connect
/// backend asks for a connection to its path) gets `NAME` and the connected socket, or
/// `!why`.
enum Side {
    Served,
    /// No request is waiting.
    Idle,
    /// chardevd closed its end.
    Closed,
}

fn serve_side_request(side: &std::os::fd::OwnedFd, backend: &Backend) -> Side {
    use vmm_proto::fdpass;
    let mut buf = [0u8; 256];
    let n = match fdpass::recv(side.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
        Ok((0, _)) => return Side::Closed,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Side::Idle,
        Err(_) => return Side::Closed,
        Ok((n, _)) => n,
    };
    let request = String::from_utf8_lossy(&buf[..n]).into_owned();
    let reply = match (request.strip_prefix("connect "), backend) {
        (Some(name), Backend::UnixClient { path, .. }) => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => fdpass::send(side.as_fd(), name.as_bytes(), &[s.as_fd()]),
                Err(e) => fdpass::send(side.as_fd(), format!("!{path}: {e}").as_bytes(), &[]),
            }
        }
        _ => fdpass::send(
            side.as_fd(),
            format!("!vmm-core does not serve {request:?}").as_bytes(),
            &[],
        ),
    };
    if let Err(e) = reply {
        log::debug!("chardevd side channel: cannot answer {request:?}: {e}");
    }
    Side::Served
}

/// Streams the buffer to chardevd until it dies.
async fn pump(
    device: &device::Client,
    buffer: &ConsoleBuffer,
    child: &mut Option<tokio::process::Child>,
    connection: &mut tokio::task::JoinHandle<Result<(), capnp::Error>>,
    disconnect: capnp_rpc::Disconnector<twoparty::VatId>,
    controls: &mut tokio::sync::mpsc::UnboundedReceiver<Control>,
) -> Result<String, ChardevError> {
    loop {
        // Requests are served between writes, never cancelling one in flight.
        while let Ok(c) = controls.try_recv() {
            serve_control(device, c).await;
        }
        let (start, chunk) = buffer.peek(WRITE_CHUNK);
        if chunk.is_empty() {
            tokio::select! {
                _ = buffer.notify.notified() => {
                    // Output starts after a quiet spell: gather what follows for a moment, so
                    // that a byte-at-a-time UART does not cost a write each.
                    tokio::time::sleep(BATCH_DELAY).await;
                    continue;
                }
                Some(c) = controls.recv() => {
                    serve_control(device, c).await;
                    continue;
                }
                why = child_exit(child) => return Ok(settled(why, connection).await),
            _ = &mut *connection => return Ok("the connection closed".into()),
                _ = buffer.stop.notified() => return Ok(stop(child, disconnect).await),
            }
        }
        let mut req = device.write_request();
        req.get().set_data(&chunk);
        tokio::select! {
            reply = req.send().promise => match reply {
                Ok(_) => {
                    buffer.ack(start + chunk.len() as u64);
                    buffer.tee(&chunk);
                }
                Err(e) => {
                    if let Some(c) = child.as_mut() {
                        let _ = c.kill().await;
                    }
                    return Ok(format!("a write failed: {}", e.extra));
                }
            },
            why = child_exit(child) => return Ok(settled(why, connection).await),
            _ = &mut *connection => return Ok("the connection closed".into()),
            _ = buffer.stop.notified() => return Ok(stop(child, disconnect).await),
        }
    }
}

async fn serve_control(device: &device::Client, control: Control) {
    let msg = RemoteError::from;
    match control {
        Control::DumpRing(reply) => {
            let result = match device.read_ring_request().send().promise.await {
                Ok(r) => r
                    .get()
                    .and_then(|r| Ok((r.get_data()?.to_vec(), r.get_dropped())))
                    .map_err(msg),
                Err(e) => Err(msg(e)),
            };
            let _ = reply.send(result);
        }
        Control::Fault(fault, reply) => {
            let mut req = device.inject_fault_request();
            {
                let mut f = req.get().init_fault();
                match fault {
                    Fault::Clear => f.set_clear(()),
                    Fault::DropConnection => f.set_drop_connection(()),
                    Fault::DelayWritesMs(ms) => f.set_delay_writes_ms(ms),
                    Fault::ForbiddenSyscall => f.set_forbidden_syscall(()),
                }
            }
            let _ = reply.send(req.send().promise.await.map(|_| ()).map_err(msg));
        }
    }
}

/// Ends chardevd and reaps it: the VMM is exiting. Closing its control connection is how it
/// is told (it then removes its sockets and exits); SIGKILL only if it does not.
async fn stop(
    child: &mut Option<tokio::process::Child>,
    disconnect: capnp_rpc::Disconnector<twoparty::VatId>,
) -> String {
    let _ = disconnect.await;
    if let Some(c) = child.as_mut() {
        if tokio::time::timeout(Duration::from_secs(2), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
    "stopped with the VMM".into()
}

/// Once the chardevd we started has exited, waits (briefly) until its connection is closed too:
/// a sandboxed chardevd's worker (its child) may outlive it by a moment, and must not write
/// after its successor has started.
async fn settled(
    why: String,
    connection: &mut tokio::task::JoinHandle<Result<(), capnp::Error>>,
) -> String {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
    why
}

/// How a chardevd we started ended; never, for one we only connect to.
async fn child_exit(child: &mut Option<tokio::process::Child>) -> String {
    match child {
        Some(c) => describe(c.wait().await),
        None => std::future::pending().await,
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

struct InputServer(InputFn);

impl input_sink::Server for InputServer {
    async fn input(
        self: capnp::capability::Rc<Self>,
        params: input_sink::InputParams,
        _: input_sink::InputResults,
    ) -> Result<(), capnp::Error> {
        (self.0)(params.get()?.get_data()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_bytes_leave_and_overflow_drops_the_oldest() {
        let b = ConsoleBuffer::new(8);
        b.push(b"abcdef");
        let (start, chunk) = b.peek(4);
        assert_eq!((start, chunk.as_slice()), (0, &b"abcd"[..]));
        // While that write is in flight, more output overflows the buffer.
        b.push(b"ghijk");
        assert_eq!(b.dropped(), 3);
        b.ack(start + 4); // "abc" were dropped already; only "d" is left to forget
        let (start, chunk) = b.peek(100);
        assert_eq!((start, chunk.as_slice()), (4, &b"efghijk"[..]));
    }

    #[test]
    fn a_slow_viewer_skips_bytes_and_is_told_how_many() {
        let b = ConsoleBuffer::new(8);
        let mut v = b.attach();
        let chunk = vec![b'x'; VIEWER_BACKLOG / 2];
        b.tee(&chunk);
        b.tee(&chunk);
        // The backlog is full: this one is skipped.
        b.tee(b"lost");
        let mut got = 0;
        while let Ok(c) = v.output.try_recv() {
            got += c.len();
            v.done(c.len());
        }
        assert_eq!(got, VIEWER_BACKLOG);
        b.tee(b"next");
        let c = v.output.try_recv().unwrap();
        assert_eq!(c, b"\r\n[vmm-core: 4 bytes skipped]\r\nnext");
        // A viewer that went away is forgotten at the next output.
        drop(v);
        b.tee(b"more");
        assert!(b.viewers.lock().unwrap().is_empty());
    }
}
