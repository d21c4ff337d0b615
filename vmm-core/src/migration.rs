//! vmm-core's side of migration and snapshots: it starts migrated (at start-up, before the
//! main thread's filter forbids new processes) and drives it over RPC
//! (proto/schema/migrated.capnp). vmm-core owns the pause, the device state and KVM's dirty
//! log; migrated owns the transfer and moves guest RAM from and to the memfd itself.
//!
//! vmm-core opens the channel (vmm_proto::channel: it connects or listens, starts an exec:
//! command, creates or opens the snapshot file, reads the tls-creds files) on migrated's
//! client thread, and hands migrated the descriptor: migrated, sandboxed, reaches no network,
//! file or program by itself.

use futures::future::LocalBoxFuture;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Mutex;
use vmm_proto::channel::{self, Creds, Opened, Uri};
use vmm_proto::migrated_capnp::{migrated, ChannelKind};

/// A connection to migrated, used on its client thread.
pub struct Conn {
    pub client: migrated::Client,
    side: OwnedFd,
    /// What vmm-core keeps of the channel migrated uses (an exec: command, a socket path, a
    /// snapshot file being written). Dropped (the command killed, the partial file removed)
    /// when the transfer fails, or when migrated dies.
    channel: RefCell<Option<channel::Guard>>,
}

impl Conn {
    /// Hands migrated the guest RAM memfd and the channel for the call that follows; vmm-core
    /// keeps the channel's guard (and closes its own copy of the descriptor).
    fn hand_over(&self, memfd: &std::fs::File, opened: Opened) -> Result<ChannelKind, String> {
        vmm_proto::fdpass::send(self.side.as_fd(), &[1], &[memfd.as_fd(), opened.fd.as_fd()])
            .map_err(|e| format!("migrated: cannot hand it guest RAM and the channel ({e})"))?;
        self.channel.replace(Some(opened.guard));
        Ok(opened.kind.into())
    }

    /// The transfer completed: an exec: command may finish, a snapshot file stays.
    fn channel_done(&self) {
        if let Some(g) = self.channel.take() {
            g.complete();
        }
    }

    /// The transfer failed: the command is killed, a partial snapshot removed.
    fn channel_failed(&self) {
        drop(self.channel.take());
    }
}

/// Descriptors vmm-core inherited when it started: what an fd:N channel may name (each one
/// once; it is closed after use, as QEMU does).
static INHERITED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Notes the descriptors above 2 that are open now; call first thing in main.
pub fn note_inherited_fds() {
    let names: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&n| n > 2)
            .collect(),
        Err(_) => return,
    };
    let mut set = INHERITED.lock().unwrap();
    for n in names {
        // SAFETY: F_GETFD only asks whether the descriptor is open (the directory's own,
        // closed by now, is not).
        if unsafe { libc::fcntl(n, libc::F_GETFD) } >= 0 {
            set.insert(n);
        }
    }
}

/// Whether fd:N names a descriptor vmm-core inherited and has not used.
pub fn check_fd(uri: &str, n: i32) -> Result<(), String> {
    if INHERITED.lock().unwrap().contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "{uri}: descriptor {n} is not one vmm-core inherited when it started (or it was used already); start vmm-core with the channel open as fd {n}"
        ))
    }
}

/// Takes the inherited descriptor of an fd:N channel (it is closed when the channel is).
fn take_fd(uri: &Uri, n: i32) -> Result<OwnedFd, String> {
    check_fd(&uri.to_string(), n)?;
    INHERITED.lock().unwrap().remove(&n);
    // SAFETY: an inherited descriptor that is open (checked at start) and that nothing else
    // in vmm-core owns; taken out of the set, so only this channel owns it now.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    // SAFETY: FD_CLOEXEC on the descriptor we now own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

/// Opens the channel for one side (on migrated's client thread, which may), and reads the
/// side's tls-creds files first.
async fn open_channel(
    uri: &str,
    tls: &TlsOptions,
    source: bool,
) -> Result<(Opened, Option<Creds>), String> {
    let uri = Uri::parse(uri)?;
    let creds = match tls.creds.as_str() {
        "" => None,
        dir => Some(channel::Creds::read(Path::new(dir), !source)?),
    };
    let opened = match (&uri, source) {
        (Uri::Fd(n), _) => channel::classify(&uri, take_fd(&uri, *n)?)?,
        (_, true) => channel::open_source(&uri).await?,
        (_, false) => channel::open_destination(&uri)?,
    };
    Ok((opened, creds))
}

type Job = Box<dyn FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, ()> + Send>;

/// migrated, as the rest of vmm-core reaches it.
pub struct Migrated {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    child: std::sync::Arc<std::sync::Mutex<Option<std::process::Child>>>,
    /// Set when vmm-core ends it: no restart then.
    ending: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// migrated's error message, without capnp's prefix.
pub fn remote(e: capnp::Error) -> String {
    match e.kind {
        capnp::ErrorKind::Disconnected => {
            "migrated died during the call (it is restarted; try again)".to_string()
        }
        _ => e.extra.trim_start_matches("remote exception: ").to_string(),
    }
}

impl Migrated {
    /// Runs `f` on migrated's client thread and waits for its answer (from async code).
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                let _ = tx.send(f(conn).await);
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| "migrated is gone (its client thread ended)".to_string())?;
        rx.await
            .map_err(|_| "migrated died during the call (it is restarted; try again)".to_string())?
    }

    /// The same, from a thread that is not async (the main thread).
    pub fn call_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        futures::executor::block_on(self.call(f))
    }

    /// The helper's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }
}

impl Migrated {
    /// Ends migrated for good (vmm-core is ending).
    pub fn end(&self) {
        self.ending
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Migrated {
    fn drop(&mut self) {
        self.end();
    }
}

/// Where migrated comes from: vmm-core starts it (the executable, and the seccomp mode or
/// None for --no-sandbox), or it runs already and listens on a socket (systemd's).
#[derive(Clone)]
pub enum Source {
    Spawn(std::path::PathBuf, Option<String>),
    Socket(std::path::PathBuf),
}

/// A control connection to migrated: started now (and its process), or connected to.
fn obtain(
    source: &Source,
    report: crate::helpers::SeccompReport,
) -> Result<(std::os::unix::net::UnixStream, Option<std::process::Child>), String> {
    match source {
        Source::Spawn(exe, sandbox) => {
            spawn(exe, sandbox.as_deref(), report).map(|(s, c)| (s, Some(c)))
        }
        Source::Socket(path) => std::os::unix::net::UnixStream::connect(path)
            .map(|s| (s, None))
            .map_err(|e| {
                format!(
                    "--migrated-socket {}: cannot connect ({e}); is migrated running (migrated serve --listen PATH, or its systemd socket)?",
                    path.display()
                )
            }),
    }
}

/// Starts migrated with a connected control socket as its fd 3.
fn spawn(
    exe: &Path,
    sandbox: Option<&str>,
    report: crate::helpers::SeccompReport,
) -> Result<(std::os::unix::net::UnixStream, std::process::Child), String> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("migrated: cannot make its control socket ({e})"))?;
    let stderr = crate::helpers::stderr_pipe("migrated", report)
        .map_err(|e| format!("migrated: cannot make its stderr pipe ({e})"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["serve", "--control-fd", "3"])
        .stdin(std::process::Stdio::null())
        .stderr(stderr);
    match sandbox {
        Some(mode) => cmd.args(["--seccomp", mode]),
        None => cmd.arg("--no-sandbox"),
    };
    let tfd = theirs.as_raw_fd();
    // SAFETY: only async-signal-safe calls (fcntl, dup2, prctl): the control socket becomes
    // fd 3 without close-on-exec, and migrated dies with vmm-core.
    unsafe {
        cmd.pre_exec(move || {
            let t = libc::fcntl(tfd, libc::F_DUPFD_CLOEXEC, 10);
            if t < 0 || libc::dup2(t, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start migrated ({}): {e}", exe.display()))?;
    drop(theirs);
    Ok((ours, child))
}

/// Starts migrated, and the thread that talks to it. That thread is its supervisor (as
/// blockd's and chardevd's are): when migrated dies it starts another, so the next
/// migration works; a call that was under way fails and says so.
pub fn start(
    source: Source,
    report: crate::helpers::SeccompReport,
    on_death: Box<dyn Fn(String) + Send>,
) -> Result<Migrated, String> {
    let (first, child) = obtain(&source, report.clone())?;
    match (&child, &source) {
        (Some(c), _) => log::info!("started migrated (pid {})", c.id()),
        (None, Source::Socket(p)) => log::info!("connected to migrated at {}", p.display()),
        (None, _) => {}
    }
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let ending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (slot, stop) = (child.clone(), ending.clone());
    std::thread::Builder::new()
        .name("migrated-client".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("migrated: cannot start its client runtime ({e})");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let mut control = Some(first);
                let mut backoff = std::time::Duration::from_millis(100);
                loop {
                    let ours = match control.take() {
                        Some(c) => c,
                        None => match obtain(&source, report.clone()) {
                            Ok((c, child)) => {
                                match &child {
                                    Some(ch) => {
                                        log::warn!("migrated: started another (pid {})", ch.id())
                                    }
                                    None => log::warn!("migrated: connected again"),
                                }
                                let old = std::mem::replace(&mut *slot.lock().unwrap(), child);
                                if let Some(mut old) = old {
                                    let _ = old.wait();
                                }
                                c
                            }
                            Err(e) => {
                                log::error!("{e}; trying again in {} ms", backoff.as_millis());
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                                continue;
                            }
                        },
                    };
                    let side = match vmm_proto::rpc::open_side_channel(&ours) {
                        Ok(s) => s,
                        Err(e) => {
                            log::error!("migrated: cannot set up its side channel ({e})");
                            tokio::time::sleep(backoff).await;
                            continue;
                        }
                    };
                    let stream = match vmm_proto::rpc::tokio_stream(ours) {
                        Ok(s) => s,
                        Err(e) => {
                            log::error!("migrated: {e}");
                            tokio::time::sleep(backoff).await;
                            continue;
                        }
                    };
                    let (rpc, client): (_, migrated::Client) = vmm_proto::rpc::client(stream);
                    let mut connection = tokio::task::spawn_local(rpc);
                    let conn = Rc::new(Conn {
                        client,
                        side,
                        channel: RefCell::new(None),
                    });
                    loop {
                        tokio::select! {
                            job = rx.recv() => match job {
                                Some(job) => {
                                    tokio::task::spawn_local(job(conn.clone()));
                                }
                                None => {
                                    connection.abort();
                                    return;
                                }
                            },
                            _ = &mut connection => break,
                        }
                    }
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    // migrated is gone: reap it, say so, and start another (or reconnect to
                    // the socket, where systemd starts another).
                    let status = slot
                        .lock()
                        .unwrap()
                        .as_mut()
                        .and_then(|c| c.wait().ok())
                        .map_or("its connection closed".to_string(), |s| s.to_string());
                    on_death(status);
                    backoff = std::time::Duration::from_millis(100);
                }
            });
        })
        .map_err(|e| format!("migrated: cannot start its client thread ({e})"))?;
    Ok(Migrated {
        jobs: tx,
        child,
        ending,
    })
}

/// The VM's RAM regions as migrated's shape: (gpa, bytes) in memfd order, and the vCPUs.
pub fn write_shape(mut b: vmm_proto::migrated_capnp::shape::Builder, memory: u64, vcpus: u32) {
    let ranges = crate::memory::ram_ranges(memory);
    b.set_vcpus(vcpus);
    let mut l = b.init_regions(ranges.len() as u32);
    for (i, (gpa, len, _)) in ranges.into_iter().enumerate() {
        let mut r = l.reborrow().get(i as u32);
        r.set_gpa(gpa);
        r.set_bytes(len);
    }
}

/// What the main thread does for a migration or snapshot (it owns the VM).
pub enum Request {
    /// KVM's dirty log on (and cleared) or off.
    DirtyLog(bool, Reply<()>),
    /// The pages written since the last take (a bitmap over the memfd's pages).
    TakeDirty(Reply<Vec<u64>>),
    /// Pause (if running), stop the queues once their requests completed, and save the state;
    /// with the dirty log on, the pages written since the last take come too.
    Save(Reply<Saved>),
    /// The VM goes on here (after a snapshot, or a migration that failed): the queues start
    /// again, and the vCPUs run unless the user had paused the VM.
    Continue(Reply<()>),
    /// The VM runs elsewhere now: this vmm-core ends.
    Leave,
    /// The guest RAM memfd, for migrated.
    Memfd(Reply<std::fs::File>),
}

pub type Reply<T> = futures::channel::oneshot::Sender<Result<T, String>>;

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::DirtyLog(..) => "DirtyLog",
            Request::TakeDirty(_) => "TakeDirty",
            Request::Save(_) => "Save",
            Request::Continue(_) => "Continue",
            Request::Leave => "Leave",
            Request::Memfd(_) => "Memfd",
        })
    }
}

pub struct Saved {
    pub state: Vec<u8>,
    pub dirty: Option<Vec<u64>>,
    /// Whether a queue's backend writes guest RAM without a dirty log of its own (KVM's log
    /// does not see those writes, so every page goes again in the last pass).
    pub unlogged_writers: bool,
}

/// `vmmctl migrate status`: what the last or current migration is doing.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub phase: String,
    pub uri: String,
    pub passes: u32,
    pub bytes: u64,
    pub ram_bytes: u64,
    pub dirty_pages: u64,
    pub dirty_rate_pages: u64,
    pub bandwidth: u64,
    pub expected_downtime_ms: u64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub error: String,
}

/// A migration's knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub uri: String,
    pub downtime_ms: u64,
    /// Bytes per second; 0 is no limit.
    pub bandwidth: u64,
    pub max_passes: u32,
    pub tls: TlsOptions,
    /// LZ4-compress RAM runs.
    pub compress: bool,
}

/// QEMU's tls-creds (a directory; empty: no TLS), tls-hostname and tls-authz.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub creds: String,
    pub hostname: String,
    pub authz: Vec<String>,
}

fn write_tls(
    mut b: vmm_proto::migrated_capnp::tls::Builder,
    t: &TlsOptions,
    creds: Option<&Creds>,
) {
    let Some(c) = creds else {
        return;
    };
    b.set_creds(t.creds.as_str());
    b.set_ca(&c.ca);
    b.set_cert(&c.cert);
    b.set_key(&c.key);
    b.set_hostname(t.hostname.as_str());
    let mut l = b.init_authz(t.authz.len() as u32);
    for (i, a) in t.authz.iter().enumerate() {
        l.set(i as u32, a.as_str());
    }
}

pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// One request to the main thread, and its answer.
async fn ask<T>(
    tx: &std::sync::mpsc::Sender<crate::vm::VmEvent>,
    make: impl FnOnce(Reply<T>) -> Request,
) -> Result<T, String> {
    let (reply, answer) = futures::channel::oneshot::channel();
    tx.send(crate::vm::VmEvent::Migration(make(reply)))
        .map_err(|_| "the VM is stopping".to_string())?;
    answer
        .await
        .map_err(|_| "the VM stopped before it answered".to_string())?
}

fn or(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x |= y;
    }
}

fn count(b: &[u64]) -> u64 {
    b.iter().map(|w| u64::from(w.count_ones())).sum()
}

struct PassStats {
    bytes: u64,
    pages: u64,
    micros: u64,
}

async fn send_pages(m: &Migrated, bitmap: Option<Vec<u64>>) -> Result<PassStats, String> {
    m.call(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.send_pages_request();
            match &bitmap {
                None => req.get().set_all(true),
                Some(b) => {
                    let mut l = req.get().init_bitmap(b.len() as u32);
                    for (i, w) in b.iter().enumerate() {
                        l.set(i as u32, *w);
                    }
                }
            }
            let r = req.send().promise.await.map_err(remote)?;
            let s = r.get().map_err(remote)?.get_stats().map_err(remote)?;
            Ok(PassStats {
                bytes: s.get_bytes(),
                pages: s.get_pages() + s.get_zero_pages(),
                micros: s.get_micros().max(1),
            })
        })
    })
    .await
}

/// Opens the channel (the guest RAM memfd goes to migrated first).
async fn open(
    m: &Migrated,
    memfd: std::fs::File,
    opts: &Options,
    memory: u64,
    vcpus: u32,
) -> Result<(), String> {
    let (uri, tls, bandwidth, compress) = (
        opts.uri.clone(),
        opts.tls.clone(),
        opts.bandwidth,
        opts.compress,
    );
    m.call(move |conn| {
        Box::pin(async move {
            let (opened, creds) = open_channel(&uri, &tls, true).await?;
            let kind = conn.hand_over(&memfd, opened)?;
            let mut req = conn.client.open_request();
            req.get().set_uri(uri.as_str());
            req.get().set_kind(kind);
            req.get().set_bandwidth(bandwidth);
            req.get().set_compress(compress);
            write_tls(req.get().init_tls(), &tls, creds.as_ref());
            write_shape(req.get().init_shape(), memory, vcpus);
            req.send().promise.await.map_err(remote)?;
            Ok(())
        })
    })
    .await
}

async fn finish(m: &Migrated, state: Vec<u8>) -> Result<u64, String> {
    m.call(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.finish_request();
            req.get().set_state(&state);
            let r = req.send().promise.await.map_err(remote)?;
            let bytes = r.get().map_err(remote)?.get_bytes();
            conn.channel_done();
            Ok(bytes)
        })
    })
    .await
}

/// Cuts the channel of the migration under way: it fails, and the VM goes on here.
pub async fn cancel(m: &Migrated) {
    abort(m).await
}

async fn abort(m: &Migrated) {
    let _ = m
        .call(|conn| {
            Box::pin(async move {
                // The command dies and the partial snapshot goes first: a transfer blocked
                // on the channel then fails at once.
                conn.channel_failed();
                conn.client
                    .abort_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                Ok(())
            })
        })
        .await;
}

/// Where the progress goes: `vmmctl migrate status` reads it.
pub type Progress = std::sync::Arc<std::sync::Mutex<Status>>;

/// Sends the VM to `opts.uri`: a snapshot for file:, else a live pre-copy migration. On
/// success the VM has left (a snapshot: it goes on, or stays paused as it was). On failure
/// before the destination confirmed, the VM goes on here and the error says why.
pub async fn send(
    m: &Migrated,
    tx: &std::sync::mpsc::Sender<crate::vm::VmEvent>,
    progress: &Progress,
    opts: Options,
    memory: u64,
    vcpus: u32,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    let live = !opts.uri.starts_with("file:");
    let set = |f: &dyn Fn(&mut Status)| f(&mut progress.lock().unwrap());
    *progress.lock().unwrap() = Status {
        phase: "setup".into(),
        uri: opts.uri.clone(),
        ..Default::default()
    };
    let memfd = ask(tx, Request::Memfd).await?;
    let r = transfer(m, tx, progress, &opts, memfd, memory, vcpus, live, start).await;
    if live {
        let _ = ask(tx, |r| Request::DirtyLog(false, r)).await;
    }
    match r {
        Ok(downtime) => {
            set(&|s| {
                s.phase = "completed".into();
                s.total_ms = start.elapsed().as_millis() as u64;
                s.downtime_ms = downtime;
            });
            if live {
                let _ = tx.send(crate::vm::VmEvent::Migration(Request::Leave));
            } else {
                ask(tx, Request::Continue).await?;
            }
            Ok(())
        }
        Err(e) => {
            abort(m).await;
            let resumed = ask(tx, Request::Continue).await;
            set(&|s| {
                s.phase = "failed".into();
                s.error = e.clone();
                s.total_ms = start.elapsed().as_millis() as u64;
            });
            match resumed {
                Ok(()) => Err(format!("{e}; the VM goes on here")),
                Err(r) => Err(format!("{e}; and the VM could not go on here: {r}")),
            }
        }
    }
}

/// The transfer proper; returns the downtime in ms.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    m: &Migrated,
    tx: &std::sync::mpsc::Sender<crate::vm::VmEvent>,
    progress: &Progress,
    opts: &Options,
    memfd: std::fs::File,
    memory: u64,
    vcpus: u32,
    live: bool,
    start: std::time::Instant,
) -> Result<u64, String> {
    let set = |f: &dyn Fn(&mut Status)| f(&mut progress.lock().unwrap());
    open(m, memfd, opts, memory, vcpus).await?;
    let mut pending: Option<Vec<u64>> = None;
    if live {
        ask(tx, |r| Request::DirtyLog(true, r)).await?;
        set(&|s| s.phase = "pre-copy".into());
        let mut bitmap: Option<Vec<u64>> = None;
        let mut pass = 0u32;
        loop {
            let sent = send_pages(m, bitmap.take()).await?;
            pass += 1;
            // Bytes per second, from what this pass took.
            let bw = (sent.bytes.max(1) * 1_000_000) / sent.micros;
            let dirty = ask(tx, Request::TakeDirty).await?;
            let n = count(&dirty);
            let rate = n * 1_000_000 / sent.micros;
            let expected_ms = n * crate::memory::PAGE_SIZE * 1000 / bw.max(1);
            set(&|s| {
                s.passes = pass;
                s.bytes += sent.bytes;
                s.ram_bytes += sent.pages * crate::memory::PAGE_SIZE;
                s.dirty_pages = n;
                s.dirty_rate_pages = rate;
                s.bandwidth = bw;
                s.expected_downtime_ms = expected_ms;
            });
            log::info!(
                "migration pass {pass}: {} KiB in {} ms; {n} page(s) dirty, expected downtime {expected_ms} ms",
                sent.bytes >> 10,
                sent.micros / 1000
            );
            if expected_ms <= opts.downtime_ms || pass >= opts.max_passes {
                pending = Some(dirty);
                break;
            }
            bitmap = Some(dirty);
        }
    }
    set(&|s| s.phase = "stop-and-copy".into());
    let stop = std::time::Instant::now();
    let saved = ask(tx, Request::Save).await?;
    let last = if !live || saved.unlogged_writers {
        // Everything: a snapshot, or RAM a backend may have written unseen.
        None
    } else {
        let mut b = pending.unwrap_or_default();
        or(&mut b, saved.dirty.as_deref().unwrap_or(&[]));
        Some(b)
    };
    let saved_ms = stop.elapsed().as_millis();
    let sent = send_pages(m, last).await?;
    let last_ms = stop.elapsed().as_millis() - saved_ms;
    let bytes = finish(m, saved.state).await?;
    let downtime = stop.elapsed().as_millis() as u64;
    log::info!(
        "stop-and-copy: paused and saved in {saved_ms} ms, the last {} page(s) in {last_ms} ms, the device state and the destination's answer in {} ms",
        sent.pages,
        u128::from(downtime) - saved_ms - last_ms
    );
    set(&|s| {
        s.bytes = bytes;
        s.ram_bytes += sent.pages * crate::memory::PAGE_SIZE;
    });
    log::info!(
        "{}: {} MiB sent in {} ms; the VM was paused for {downtime} ms",
        opts.uri,
        bytes >> 20,
        start.elapsed().as_millis()
    );
    Ok(downtime)
}

/// The destination's side: takes the stream into the memfd; returns the state.
pub fn receive(
    m: &Migrated,
    uri: &str,
    tls: &TlsOptions,
    memfd: std::fs::File,
    memory: u64,
    vcpus: u32,
) -> Result<(Vec<u8>, u64), String> {
    let uri = uri.to_string();
    let tls = tls.clone();
    m.call_blocking(move |conn| {
        Box::pin(async move {
            let (opened, creds) = open_channel(&uri, &tls, false).await?;
            let kind = conn.hand_over(&memfd, opened)?;
            let mut req = conn.client.receive_request();
            req.get().set_uri(uri.as_str());
            req.get().set_kind(kind);
            write_tls(req.get().init_tls(), &tls, creds.as_ref());
            write_shape(req.get().init_shape(), memory, vcpus);
            let got = async {
                let r = req.send().promise.await.map_err(remote)?;
                let r = r.get().map_err(remote)?;
                Ok((r.get_state().map_err(remote)?.to_vec(), r.get_bytes()))
            }
            .await;
            if got.is_err() {
                conn.channel_failed();
            }
            got
        })
    })
}

/// Tells the source (through migrated) whether this destination runs the VM.
pub fn started(m: &Migrated, ok: bool, why: String) -> Result<(), String> {
    m.call_blocking(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.started_request();
            req.get().set_ok(ok);
            req.get().set_why(why.as_str());
            let r = req.send().promise.await.map_err(remote);
            // The answer is written: an exec: command may finish with it.
            conn.channel_done();
            r.map(|_| ())
        })
    })
}
