//! blockd, the helper that serves the VM's disks over vhost-user, as vmm-core drives it: it
//! opens the images and sockets, starts or connects to blockd, adds the exports, and starts
//! another blockd (adding them again) when one dies.
//!
//! vmm-core opens each image and a listening socket in a private directory, and starts one
//! blockd per disk with both as inherited descriptors; blockd lives as long as vmm-core (across
//! guest reboots) and serves each boot's connection in turn. `socket=PATH` uses a vhost-user-blk
//! backend that runs already instead.

use crate::config::disk::DiskSpec;
use vmm_proto::blockd_capnp::DiskLog;
use vmm_proto::rpc::RemoteError;

/// What went wrong with the VM's disks and their blockd.
#[derive(Debug, thiserror::Error)]
pub enum BlockdError {
    /// A disk's record/replay log (the flag and the log's path in the first).
    #[error("{0}: {1}")]
    Recording(String, std::io::Error),
    #[error("--disk path={path}: cannot open it ({1}); check the path and its permissions, or add readonly=on", path = .0.display())]
    Open(PathBuf, std::io::Error),
    #[error("--disk path={path}: {1}", path = .0.display())]
    NotAnImage(PathBuf, vmm_proto::image::NotAnImage),
    #[error("--disk path={path},format=qcow2: {1}", path = .0.display())]
    Unservable(PathBuf, vmm_proto::image::Unservable),
    #[error("{0}: cannot listen on {path} ({2})", path = .1.display())]
    Listen(String, PathBuf, std::io::Error),
    #[error("cannot create a private directory for the disks' sockets ({0}); check $XDG_RUNTIME_DIR or $TMPDIR")]
    RunDir(std::io::Error),
    #[error("cannot start the blockd client thread: {0}")]
    Thread(std::io::Error),
    #[error("blockd: its client thread ended")]
    ClientEnded,
    #[error(transparent)]
    Helper(#[from] super::HelperError),
    #[error(transparent)]
    Lock(#[from] super::image_lock::LockError),
    #[error("blockd: cannot set up its side channel ({0})")]
    SideChannel(std::io::Error),
    #[error("blockd: {0}")]
    Stream(std::io::Error),
    #[error("{0}: cannot hand blockd its image ({1})")]
    HandImage(String, std::io::Error),
    #[error("--disk {0}: blockd refused it: {1}")]
    Refused(String, RemoteError),
    #[error("{0}: blockd refused its throttle {1}: {2}")]
    Throttle(String, Box<vmm_proto::throttle::Spec>, RemoteError),
    #[error("blockd: cannot watch its disks: {0}")]
    Watch(RemoteError),
    #[error("blockd: {0}")]
    Rpc(capnp::Error),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("no connection")]
    NoConnection,
    #[error("blockd is restarting; try again in a moment")]
    Restarting,
    #[error("this VM has no disks served by blockd")]
    NoBlockd,
    #[error("hot-adding an image needs the VM's blockd, which runs when the VM starts with a path= disk; start the VM with one, or add a socket= disk served by a backend of its own")]
    NoBlockdToAdd,
    #[error("cannot hot-add a disk to a VM that records or replays (--record, --replay): the recording holds the disks it began with")]
    AddWhileRecording,
    #[error("two disks are named {0}; give each its own name=")]
    SameName(String),
    #[error("blockd is not running")]
    NotRunning,
    #[error("disk {0}: {1}")]
    DiskImage(String, String),
    #[error("blockd did not answer within 5 s")]
    NoAnswer,
    #[error("disk {0} is served by a backend of its own (socket=); throttle it there")]
    External(String),
}

/// blockd's answer to a command.
type Answer<T> = std::sync::mpsc::Sender<Result<T, BlockdError>>;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::disk_backend::{DeviceSlot, DiskBackend};

/// The private directory that holds blockd's sockets; removed with everything in it.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new() -> std::io::Result<RunDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let template = base.join("vmm-core.XXXXXX");
        // mkdtemp makes the directory 0700.
        Ok(RunDir(nix::unistd::mkdtemp(&template)?))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One operation's statistics, as blockd reports them.
#[derive(Debug, Clone, Default)]
pub struct OpInfo {
    pub op: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    /// (upper bound in microseconds, 0 for the last bucket; count)
    pub latency: Vec<(u64, u64)>,
}

/// A disk as `vmmctl disk list` shows it.
#[derive(Debug, Clone, Default)]
pub struct DiskInfo {
    pub name: String,
    pub image: String,
    pub format: String,
    pub readonly: bool,
    pub queues: u16,
    pub size: u64,
    pub socket: String,
    pub connected: bool,
    pub writeback: bool,
    pub direct: bool,
    pub invalid: u64,
    /// Interrupts sent to the guest, and those its used_event (EVENT_IDX) spared.
    pub interrupts: u64,
    pub interrupts_suppressed: u64,
    /// Record/replay: where its log stands (empty: neither).
    pub replay: String,
    /// A commit under way: how far it is (empty: none).
    pub job: String,
    pub ops: Vec<OpInfo>,
    pub throttle: vmm_proto::throttle::Spec,
    /// Why blockd stopped it on an I/O error (empty: it serves), and its error policies.
    pub stopped: String,
    pub read_error: String,
    pub write_error: String,
}

/// Fault injection in blockd (see proto/schema/blockd.capnp).
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    Clear,
    ForbiddenSyscall,
}

enum Command {
    List(Answer<Vec<DiskInfo>>),
    Fault(Fault, Answer<()>),
    Throttle(String, vmm_proto::throttle::Spec, Answer<()>),
    AddRule(vmm_proto::faults::Rule, Answer<u32>),
    RemoveRule(u32, Answer<()>),
    ListRules(Answer<Vec<vmm_proto::faults::Rule>>),
    /// Retry what stopped exports hold; how many requests that is.
    Resume(Answer<u32>),
    /// A change to an export's image, or a mark in its recording.
    Image(ImageCommand),
    /// A disk hot-added or hot-removed.
    Disk(DiskCommand),
}

/// What the disk to hot-add is: its spec, name, the sockets' directory, and where its
/// transport goes (for reconnecting after a restart).
type NewDisk = Box<(DiskSpec, String, PathBuf, DeviceSlot)>;

enum DiskCommand {
    /// Open the disk and add its export: its backend and its images' locks.
    Add(
        NewDisk,
        Answer<(DiskBackend, Vec<super::image_lock::ImageLock>)>,
    ),
    /// End the export (the guest ejected the disk) and let go of its images' locks (here:
    /// the API's threads may not).
    Remove(String, Vec<super::image_lock::ImageLock>, Answer<()>),
}

/// A snapshot's or commit's answer: the disk's locks as they are now, and what happened.
type LocksAnd<T> = (Vec<super::image_lock::ImageLock>, Result<T, BlockdError>);

/// A commit's answer, when it is done: the bytes copied, the base's path and format.
pub type CommitDone = tokio::sync::oneshot::Receiver<LocksAnd<(u64, PathBuf, &'static str)>>;

enum ImageCommand {
    /// A live external snapshot of an export onto a new overlay (its path); the disk's locks
    /// go along and come back (the old top's shared now, the overlay's exclusive).
    Snapshot(
        String,
        PathBuf,
        Vec<super::image_lock::ImageLock>,
        std::sync::mpsc::Sender<LocksAnd<()>>,
    ),
    /// A commit of an export's top overlay into its base, answered when done: the bytes
    /// copied and the base's path.
    Commit(
        String,
        Vec<super::image_lock::ImageLock>,
        tokio::sync::oneshot::Sender<LocksAnd<(u64, PathBuf, &'static str)>>,
    ),
    /// An export grown (or shrunk, forced) to the bytes given; the size it had.
    Resize(String, u64, bool, Answer<u64>),
    /// A recorded export's image and log flushed; where its log stands (bytes). With (image,
    /// log): the image is copied beside the log as it is now (`LOG.at-BYTES`).
    Mark(String, Option<(PathBuf, PathBuf)>, Answer<u64>),
}

/// Called with (disk, reason) when blockd stops a disk on an I/O error (error policy stop or
/// enospc).
pub type OnStop = Box<dyn Fn(String, String) + Send>;

/// blockd's stop reports, passed on.
struct StopWatcher(std::rc::Rc<OnStop>);

impl vmm_proto::blockd_capnp::watcher::Server for StopWatcher {
    async fn stopped(
        self: capnp::capability::Rc<Self>,
        params: vmm_proto::blockd_capnp::watcher::StoppedParams,
        _: vmm_proto::blockd_capnp::watcher::StoppedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        (self.0)(p.get_export()?.to_string()?, p.get_reason()?.to_string()?);
        Ok(())
    }
}

/// The VM's blockd: started with the VM, one export per `path=` disk, ended with the VM
/// (closing its control connection makes it flush every image and exit).
pub struct Blockd {
    commands: Option<tokio::sync::mpsc::UnboundedSender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The blockd vmm-core started (the latest, after restarts).
    child: Arc<std::sync::Mutex<Option<std::process::Child>>>,
    external: Vec<DiskInfo>,
    /// Each image's lock (see image_lock.rs), by disk.
    locks: Vec<(String, super::image_lock::ImageLock)>,
    /// Every disk's name (hot-added ones too).
    names: Vec<String>,
    /// The private directory of the exports' sockets (a VM with a path= disk has one).
    dir: Option<PathBuf>,
    /// The VM records or replays: no disk can be hot-added.
    recording: bool,
}

impl Blockd {
    /// Takes every image's lock (an incoming VM, as it arrives; a source whose migration
    /// failed, as it goes on).
    /// (From the main thread, under its seccomp filter: the holders are not named.)
    pub fn lock_images(&self) -> Result<(), super::image_lock::LockError> {
        for (_, l) in &self.locks {
            l.take(false)?;
        }
        if !self.locks.is_empty() {
            log::info!("took the disks' image locks");
        }
        Ok(())
    }

    /// Lets go of every image's lock: the destination of a migration on this host takes
    /// them.
    pub fn release_images(&self) {
        for (_, l) in &self.locks {
            l.release();
        }
        if !self.locks.is_empty() {
            log::info!("released the disks' image locks for the destination");
        }
    }

    /// Every disk with blockd's statistics (and the external ones, without).
    pub fn list(&self) -> Result<Vec<DiskInfo>, BlockdError> {
        let mut out = match self.commands {
            Some(_) => self.ask(Command::List)?,
            None => Vec::new(),
        };
        out.extend(self.external.iter().cloned());
        Ok(out)
    }
}

impl Blockd {
    /// Sends a command to the client thread and waits (5 s at most) for blockd's answer.
    fn ask<T>(&self, cmd: impl FnOnce(Answer<T>) -> Command) -> Result<T, BlockdError> {
        let c = self.commands.as_ref().ok_or(BlockdError::NoBlockd)?;
        let (tx, rx) = std::sync::mpsc::channel();
        c.send(cmd(tx)).map_err(|_| BlockdError::NotRunning)?;
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .map_err(|_| BlockdError::NoAnswer)?
    }

    pub fn fault(&self, fault: Fault) -> Result<(), BlockdError> {
        self.ask(|tx| Command::Fault(fault, tx))
    }

    pub fn add_rule(&self, rule: vmm_proto::faults::Rule) -> Result<u32, BlockdError> {
        self.ask(|tx| Command::AddRule(rule, tx))
    }

    pub fn remove_rule(&self, id: u32) -> Result<(), BlockdError> {
        self.ask(|tx| Command::RemoveRule(id, tx))
    }

    pub fn rules(&self) -> Result<Vec<vmm_proto::faults::Rule>, BlockdError> {
        self.ask(Command::ListRules)
    }

    /// Retries what stopped disks hold (after `vmmctl resume`); a VM without blockd has none.
    pub fn resume(&self) -> Result<u32, BlockdError> {
        if self.commands.is_none() {
            return Ok(0);
        }
        self.ask(Command::Resume)
    }

    /// Takes disk `name`'s locks out, for the client thread to change.
    fn take_locks(&mut self, name: &str) -> Vec<super::image_lock::ImageLock> {
        let (mine, kept) = std::mem::take(&mut self.locks)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.locks = kept;
        mine.into_iter().map(|(_, l)| l).collect()
    }

    /// Gives disk `name`'s locks back.
    pub fn put_locks(&mut self, name: &str, locks: Vec<super::image_lock::ImageLock>) {
        self.locks
            .extend(locks.into_iter().map(|l| (name.to_string(), l)));
    }

    /// A path= disk of this VM's blockd, or why not.
    fn served(&self, name: &str) -> Result<(), BlockdError> {
        if self.external.iter().any(|d| d.name == name) {
            return Err(BlockdError::External(name.to_string()));
        }
        if !self.names.iter().any(|n| n == name) {
            return Err(BlockdError::DiskImage(
                name.to_string(),
                "no such disk (disk list shows them)".into(),
            ));
        }
        Ok(())
    }

    /// A live external snapshot: disk `name` goes on a new qcow2 overlay at `overlay`.
    pub fn snapshot(&mut self, name: &str, overlay: &Path) -> Result<(), BlockdError> {
        self.served(name)?;
        let c = self.commands.as_ref().ok_or(BlockdError::NoBlockd)?.clone();
        let locks = self.take_locks(name);
        let (tx, rx) = std::sync::mpsc::channel();
        let cmd = ImageCommand::Snapshot(name.to_string(), overlay.to_path_buf(), locks, tx);
        if let Err(e) = c.send(Command::Image(cmd)) {
            if let Command::Image(ImageCommand::Snapshot(_, _, locks, _)) = e.0 {
                self.put_locks(name, locks);
            }
            return Err(BlockdError::NotRunning);
        }
        // blockd waits up to 10 s for the disk's requests in flight.
        let (locks, r) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .map_err(|_| BlockdError::NoAnswer)?;
        self.put_locks(name, locks);
        r
    }

    /// Starts a commit of disk `name`'s top overlay into its base; the answer comes when it
    /// is done (the locks then go back with `put_locks`).
    pub fn commit(&mut self, name: &str) -> Result<CommitDone, BlockdError> {
        self.served(name)?;
        let c = self.commands.as_ref().ok_or(BlockdError::NoBlockd)?.clone();
        let locks = self.take_locks(name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = c.send(Command::Image(ImageCommand::Commit(
            name.to_string(),
            locks,
            tx,
        ))) {
            if let Command::Image(ImageCommand::Commit(_, locks, _)) = e.0 {
                self.put_locks(name, locks);
            }
            return Err(BlockdError::NotRunning);
        }
        Ok(rx)
    }

    /// Grows disk `name` to `bytes` (shrinks it with `force`); returns the size it had.
    pub fn resize(&self, name: &str, bytes: u64, force: bool) -> Result<u64, BlockdError> {
        if self.external.iter().any(|d| d.name == name) {
            return Err(BlockdError::External(name.to_string()));
        }
        self.ask(|tx| Command::Image(ImageCommand::Resize(name.to_string(), bytes, force, tx)))
    }

    /// At a snapshot of a recorded VM (its queues stopped): disk `name`'s image and log are
    /// flushed; returns the log's length, where a replay from the snapshot reads on.
    /// With `keep` (the image, the log): the image as it is now is copied beside the log
    /// (`LOG.at-BYTES`), on the client thread, which may open files (the VM's threads may
    /// not); the VM stays paused meanwhile, so a large image on a file system without
    /// reflinks lengthens the pause.
    pub fn mark(&self, name: &str, keep: Option<(PathBuf, PathBuf)>) -> Result<u64, BlockdError> {
        let c = self.commands.as_ref().ok_or(BlockdError::NoBlockd)?;
        let (tx, rx) = std::sync::mpsc::channel();
        c.send(Command::Image(ImageCommand::Mark(
            name.to_string(),
            keep,
            tx,
        )))
        .map_err(|_| BlockdError::NotRunning)?;
        rx.recv_timeout(std::time::Duration::from_secs(600))
            .map_err(|_| BlockdError::NoAnswer)?
    }

    /// A disk for a running VM (hot-add): its image opened, locked and handed to blockd as
    /// a new export (on the client thread, which may open files), or a socket= backend
    /// taken as it is. Returns its backend, for the VM's main loop to plug in.
    pub fn add_disk(&mut self, spec: &DiskSpec, text: &str) -> Result<DiskBackend, BlockdError> {
        let name = match &spec.name {
            Some(n) if self.names.contains(n) => return Err(BlockdError::SameName(n.clone())),
            Some(n) => n.clone(),
            None => (0..)
                .map(|i| format!("disk{i}"))
                .find(|n| !self.names.contains(n))
                .expect("a free name"),
        };
        if spec.path.is_some() {
            if self.recording {
                return Err(BlockdError::AddWhileRecording);
            }
            let (Some(c), Some(dir)) = (self.commands.as_ref(), self.dir.clone()) else {
                return Err(BlockdError::NoBlockdToAdd);
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let device = DeviceSlot::default();
            c.send(Command::Disk(DiskCommand::Add(
                Box::new((spec.clone(), name.clone(), dir, device)),
                tx,
            )))
            .map_err(|_| BlockdError::NotRunning)?;
            let (mut backend, locks) = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .map_err(|_| BlockdError::NoAnswer)??;
            self.locks
                .extend(locks.into_iter().map(|l| (name.clone(), l)));
            self.names.push(name);
            backend.spec = text.to_string();
            return Ok(backend);
        }
        let mut disk = open_disk(spec, name.clone(), None, true, None)?;
        self.external.extend(disk.external);
        self.names.push(name);
        disk.backend.spec = text.to_string();
        Ok(disk.backend)
    }

    /// A disk the guest ejected: blockd ends its export (its socket goes) and its image's
    /// locks are let go; a socket= backend is forgotten.
    pub fn remove_disk(&mut self, name: &str) -> Result<(), BlockdError> {
        self.names.retain(|n| n != name);
        let before = self.external.len();
        self.external.retain(|d| d.name != name);
        if self.external.len() != before {
            return Ok(());
        }
        let (locks, kept) = std::mem::take(&mut self.locks)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.locks = kept;
        let locks = locks.into_iter().map(|(_, l)| l).collect();
        self.ask(|tx| Command::Disk(DiskCommand::Remove(name.to_string(), locks, tx)))
    }

    pub fn throttle(&self, name: &str, spec: vmm_proto::throttle::Spec) -> Result<(), BlockdError> {
        if self.external.iter().any(|d| d.name == name) {
            return Err(BlockdError::External(name.to_string()));
        }
        self.ask(|tx| Command::Throttle(name.to_string(), spec, tx))
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Its control connection closed, so it flushes every image and exits.
        if let Some(child) = self.child.lock().unwrap().take() {
            super::end("blockd", child, std::time::Duration::from_secs(10));
        }
    }
}

/// What vmm-core opened for one export: handed to blockd on the side channel.
struct Opened {
    name: String,
    spec: DiskSpec,
    image: std::fs::File,
    listener: std::os::unix::net::UnixListener,
    socket: PathBuf,
    /// --record or --replay: its log, and how blockd takes it.
    log: Option<(std::fs::File, vmm_proto::blockd_capnp::DiskLog)>,
    /// A qcow2 image's backing chain, nearest first: each file (read-only) and its format.
    backing: Vec<(std::fs::File, &'static str)>,
    /// Its lock was taken when it was opened: no other VM writes it (an incoming VM's images
    /// are still its source's until it arrives).
    owned: bool,
}

/// A qcow2 image's backing chain (nearest first): each layer opened read-only, with its
/// format, under a shared lock (many VMs may stand on one base), taken now unless the VM is
/// incoming. A raw image has none.
fn open_chain(
    d: &DiskSpec,
    path: &std::path::Path,
    image: &std::fs::File,
    lock_now: bool,
    locks: &mut Vec<super::image_lock::ImageLock>,
) -> Result<Vec<(std::fs::File, &'static str)>, BlockdError> {
    if d.format != "qcow2" {
        return Ok(Vec::new());
    }
    let chain = vmm_proto::image::check_chain(path, image, d.backing.as_deref())
        .map_err(|e| BlockdError::Unservable(path.to_path_buf(), e))?;
    let mut backing = Vec::new();
    for layer in chain {
        let lock = super::image_lock::ImageLock::new(&layer.path, &layer.file, false)
            .map_err(|e| BlockdError::Open(layer.path.clone(), e))?;
        if lock_now {
            lock.take(true)?;
        }
        locks.push(lock);
        backing.push((layer.file, layer.format));
    }
    Ok(backing)
}

/// A disk's --record or --replay log and how blockd takes it, with the image blockd is to
/// serve: a new recording starts from a copy of the image beside the log (`LOG.base`: reads
/// no write raced are logged as checksums), and a replay of such a recording serves a
/// working copy of it (`LOG.work`, made anew) in the image's place, where the guest's
/// replayed writes are done. A qcow2 image's copy is of its top layer: the backing chain,
/// read-only, is the image's own, opened as for a run (a replay's checksums catch a base
/// that changed since).
fn open_log(
    rec: &crate::config::Recording,
    name: &str,
    path: &std::path::Path,
    image: std::fs::File,
) -> Result<(std::fs::File, DiskLog, std::fs::File), BlockdError> {
    let replay = matches!(rec, crate::config::Recording::Replay(..));
    let flag = if replay { "--replay" } else { "--record" };
    let log = rec.log(name);
    let failed = |what: String, e| BlockdError::Recording(format!("{flag} {what}"), e);
    let file = rec
        .open(name)
        .map_err(|e| failed(log.display().to_string(), e))?;
    let base = vmm_proto::image::base_of(&log);
    if let crate::config::Recording::Replay(_, true, _) = rec {
        // --replay-writes=apply: on the image itself (reads logged as checksums from it).
        log::info!(
            "{name}: replaying with the guest's writes done on {}",
            path.display()
        );
        return Ok((file, DiskLog::ReplayOnCopy, image));
    }
    if replay {
        if !base.exists() {
            return Ok((file, DiskLog::Replay, image));
        }
        // From a snapshot: the image as it was then, which the recording kept beside the log.
        let base = match rec.marks().and_then(|m| m.of(name)) {
            Some(at) => {
                let then = vmm_proto::image::at_mark(&log, at);
                if !then.exists() {
                    return Err(failed(
                        format!("{}: the image as it was at the snapshot is not there; give the directory the snapshot's recording wrote", then.display()),
                        std::io::ErrorKind::NotFound.into(),
                    ));
                }
                then
            }
            None => base,
        };
        let work = vmm_proto::image::work_of(&log);
        let copy = vmm_proto::image::working_copy(&base, &work).map_err(|e| {
            failed(
                format!("{}: cannot copy {} there", work.display(), base.display()),
                e,
            )
        })?;
        log::info!(
            "{name}: replaying on a working copy of the recording's base, {}",
            work.display()
        );
        return Ok((file, DiskLog::ReplayOnCopy, copy));
    }
    match vmm_proto::image::base_copy(path, &log).map_err(|e| {
        failed(
            format!("{}: cannot copy the image there", base.display()),
            e,
        )
    })? {
        Some(b) => {
            log::info!("{name}: recording on a copy of its image, {}", b.display());
            Ok((file, DiskLog::RecordOnBase, image))
        }
        None => Ok((file, DiskLog::Record, image)),
    }
}

/// A disk opened for the VM: its backend, and for a path= disk what blockd is handed and the
/// locks of its image and backing chain (for a socket= disk, what `disk list` shows).
struct OpenedDisk {
    backend: DiskBackend,
    opened: Option<Opened>,
    external: Option<DiskInfo>,
    locks: Vec<super::image_lock::ImageLock>,
}

/// Opens disk `name`: its image (checked), backing chain, locks (taken now unless the VM is
/// incoming), record/replay log, and a listening socket in `dir`; or takes a socket= backend.
fn open_disk(
    d: &DiskSpec,
    name: String,
    dir: Option<&Path>,
    lock_now: bool,
    recording: Option<&crate::config::Recording>,
) -> Result<OpenedDisk, BlockdError> {
    if let Some(socket) = &d.socket {
        return Ok(OpenedDisk {
            backend: DiskBackend {
                name: name.clone(),
                socket: socket.clone(),
                queues: d.queues,
                image: "vhost-user socket".into(),
                external: true,
                device: DeviceSlot::default(),
                slot: d.slot,
                spec: String::new(),
            },
            opened: None,
            external: Some(DiskInfo {
                name,
                image: "(an external vhost-user-blk backend)".into(),
                queues: d.queues,
                socket: socket.display().to_string(),
                ..Default::default()
            }),
            locks: Vec::new(),
        });
    }
    let path = d.path.as_ref().expect("parse_disk gives path or socket");
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::metadata(path).map_err(|e| BlockdError::Open(path.clone(), e))?;
    vmm_proto::image::check(&meta).map_err(|e| BlockdError::NotAnImage(path.clone(), e))?;
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(!d.readonly)
        .custom_flags(if d.direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| BlockdError::Open(path.clone(), e))?;
    let mut locks = Vec::new();
    let backing = open_chain(d, path, &image, lock_now, &mut locks)?;
    let lock = super::image_lock::ImageLock::new(path, &image, !d.readonly)
        .map_err(|e| BlockdError::Open(path.clone(), e))?;
    // An incoming VM's images are still the source's: it locks them when it arrives.
    if lock_now {
        lock.take(true)?;
    }
    locks.push(lock);
    let dir = dir.expect("a run directory exists when a disk has a path");
    let socket = dir.join(format!("{name}.sock"));
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| BlockdError::Listen(name.clone(), socket.clone(), e))?;
    let backend = DiskBackend {
        name: name.clone(),
        socket: socket.clone(),
        queues: d.queues,
        image: path.display().to_string(),
        external: false,
        device: DeviceSlot::default(),
        slot: d.slot,
        spec: String::new(),
    };
    let (log, image) = match recording {
        Some(rec) => {
            let (file, how, image) = open_log(rec, &name, path, image)?;
            (Some((file, how)), image)
        }
        None => (None, image),
    };
    Ok(OpenedDisk {
        backend,
        opened: Some(Opened {
            name,
            spec: d.clone(),
            image,
            listener,
            socket,
            log,
            backing,
            owned: lock_now,
        }),
        external: None,
        locks,
    })
}

/// Opens each disk's image and listening socket, starts blockd, and adds the exports.
/// (`disks`: each parsed, and as given, for what a snapshot carries.)
pub fn start(
    disks: &[(DiskSpec, String)],
    source: super::Source,
    dir: Option<&RunDir>,
    report: super::SeccompReport,
    hooks: Hooks,
    lock_now: bool,
    recording: Option<&crate::config::Recording>,
) -> Result<(Vec<DiskBackend>, Blockd), BlockdError> {
    let mut backends = Vec::new();
    let mut opened = Vec::new();
    let mut locks = Vec::new();
    let mut external = Vec::new();
    let mut names = Vec::new();
    for (i, (d, text)) in disks.iter().enumerate() {
        let name = d.name.clone().unwrap_or_else(|| format!("disk{i}"));
        if names.contains(&name) {
            return Err(BlockdError::SameName(name));
        }
        let mut disk = open_disk(
            d,
            name.clone(),
            dir.map(|d| d.0.as_path()),
            lock_now,
            recording,
        )?;
        disk.backend.spec = text.clone();
        backends.push(disk.backend);
        opened.extend(disk.opened);
        external.extend(disk.external);
        locks.extend(disk.locks.into_iter().map(|l| (name.clone(), l)));
        names.push(name);
    }
    let mut handle = Blockd {
        commands: None,
        thread: None,
        child: Arc::default(),
        external,
        locks,
        names,
        dir: dir.map(|d| d.0.clone()),
        recording: recording.is_some(),
    };
    if opened.is_empty() {
        return Ok((backends, handle));
    }

    let respawn: Respawn = {
        let child = handle.child.clone();
        Box::new(move || match &source {
            super::Source::Connect(path) => {
                let s = super::connect(super::BLOCKD, path)?;
                log::info!("connected to blockd at {}", path.display());
                Ok(s)
            }
            super::Source::Spawn(exe, sandbox) => {
                let (ours, new) =
                    super::prepare(super::BLOCKD, exe, sandbox.as_deref(), report.clone())
                        .and_then(super::Prepared::spawn)?;
                log::info!("started blockd (pid {})", new.id());
                if let Some(old) = child.lock().unwrap().replace(new) {
                    // The one that died (its connection ended).
                    match super::reap(old, std::time::Duration::from_secs(2)) {
                        Some(status) => log::info!("the blockd that died ended with {status}"),
                        None => log::info!("the blockd that died was killed"),
                    }
                }
                Ok(ours)
            }
        })
    };
    let ours = respawn()?;
    let child = handle.child.clone();
    let devices: Vec<(String, DeviceSlot)> = backends
        .iter()
        .filter(|b| !b.external)
        .map(|b| (b.name.clone(), b.device.clone()))
        .collect();

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (commands, rx) = tokio::sync::mpsc::unbounded_channel();
    let restart = Restart {
        respawn,
        devices,
        child,
    };
    // A destination may switch to post-copy, for which blockd makes a userfaultfd from
    // /dev/userfaultfd: opened here, where vmm-core may, and handed over (blockd may not
    // open it itself under its unit).
    let uffd_dev = (!lock_now)
        .then(vmm_sandbox::uffd::Device::open)
        .flatten()
        .map(Arc::new);
    let thread = super::client_thread("blockd-client", move || {
        client(ours, opened, ready_tx, rx, hooks, restart, uffd_dev)
    })
    .map_err(BlockdError::Thread)?;
    handle.thread = Some(thread);
    handle.commands = Some(commands);
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((backends, handle)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BlockdError::ClientEnded),
    }
}

/// What the client thread does when blockd dies and comes back.
pub struct Hooks {
    /// blockd died (its control connection ended).
    pub on_death: Box<dyn Fn() + Send>,
    /// It is back and the disks reconnected: (what the log says).
    pub on_restart: Box<dyn Fn(String) + Send>,
    pub on_stop: OnStop,
}

/// Starts another blockd (or reconnects to systemd's) and returns its control connection.
type Respawn = Box<dyn Fn() -> Result<std::os::unix::net::UnixStream, BlockdError> + Send>;

/// What the client thread needs to bring blockd back.
struct Restart {
    respawn: Respawn,
    /// The disks to reconnect.
    devices: Vec<(String, DeviceSlot)>,
    /// The blockd vmm-core started (None when it connects to systemd's).
    child: Arc<std::sync::Mutex<Option<std::process::Child>>>,
}

/// Sets blockd up on a new control connection: the side channel, the exports (with the
/// images and listening sockets vmm-core keeps), and the watcher.
async fn attach(
    control: std::os::unix::net::UnixStream,
    disks: &ClientDisks,
    on_stop: &std::rc::Rc<OnStop>,
    uffd_dev: Option<&vmm_sandbox::uffd::Device>,
    restart: bool,
) -> Result<Attached, BlockdError> {
    use std::os::fd::AsFd;
    use vmm_proto::blockd_capnp::blockd;
    use vmm_proto::fdpass;
    let side = vmm_proto::rpc::open_side_channel(&control).map_err(BlockdError::SideChannel)?;
    let stream = vmm_proto::rpc::tokio_stream(control).map_err(BlockdError::Stream)?;
    let (rpc, server): (_, blockd::Client) = vmm_proto::rpc::client(stream);
    let connection = tokio::task::spawn_local(rpc);
    for o in &disks.opened {
        // A restart follows a blockd that may have died mid-write: its images are checked.
        add_export(&side, &server, o, restart || o.owned).await?;
    }
    if let Some(dev) = uffd_dev {
        fdpass::send(side.as_fd(), b"userfaultfd", &[dev.fd()])
            .map_err(|e| BlockdError::HandImage("/dev/userfaultfd".into(), e))?;
        if let Err(e) = server.userfaultfd_device_request().send().promise.await {
            // An older blockd: post-copy then depends on its own access to the device.
            log::warn!("blockd did not take /dev/userfaultfd ({e}); a post-copy destination's disks need blockd to open it itself");
        }
    }
    // The disks' throttles: from --disk, as changed since (a restarted blockd gets them
    // again). Those with limits go first, so that a group exists before a member joins it.
    let mut ordered: Vec<_> = disks.throttles.iter().collect();
    ordered.sort_by_key(|(_, t)| t.is_off());
    for (name, spec) in ordered {
        set_throttle(&server, name, spec).await?;
    }
    // Stops on I/O errors (error policy) come back through a watcher.
    let mut req = server.watch_request();
    req.get()
        .set_watcher(capnp_rpc::new_client(StopWatcher(on_stop.clone())));
    req.send()
        .promise
        .await
        .map_err(|e| BlockdError::Watch(e.into()))?;
    Ok(Attached {
        server,
        side,
        connection,
    })
}

/// blockd on a control connection: its RPC client, the side channel that carries
/// descriptors, and the connection's task.
struct Attached {
    server: vmm_proto::blockd_capnp::blockd::Client,
    side: std::os::fd::OwnedFd,
    connection: tokio::task::JoinHandle<Result<(), capnp::Error>>,
}

/// What the client thread keeps of the disks, to add them again to a restarted blockd: the
/// exports (the images and listening sockets vmm-core keeps), each disk's transport, and the
/// throttles as set.
struct ClientDisks {
    opened: Vec<Opened>,
    devices: Vec<(String, DeviceSlot)>,
    throttles: std::collections::BTreeMap<String, vmm_proto::throttle::Spec>,
}

async fn set_throttle(
    server: &vmm_proto::blockd_capnp::blockd::Client,
    name: &str,
    spec: &vmm_proto::throttle::Spec,
) -> Result<(), BlockdError> {
    let mut req = server.set_throttle_request();
    req.get().set_name(name);
    spec.write(req.get().init_throttle());
    req.send()
        .promise
        .await
        .map(|_| ())
        .map_err(|e| BlockdError::Throttle(name.to_string(), Box::new(spec.clone()), e.into()))
}

/// Hands blockd an export's descriptors on the side channel and adds the export.
/// Hands blockd an export; `check`: a writable qcow2 image's refcounts are repaired first
/// (see `repair`), when no other process may be writing it.
async fn add_export(
    side: &std::os::fd::OwnedFd,
    server: &vmm_proto::blockd_capnp::blockd::Client,
    o: &Opened,
    check: bool,
) -> Result<(), BlockdError> {
    use std::os::fd::AsFd;
    use vmm_proto::fdpass;
    if check && o.spec.format == "qcow2" && !o.spec.readonly {
        repair(o)?;
    }
    let mut fds = vec![o.image.as_fd(), o.listener.as_fd()];
    if let Some((log, _)) = &o.log {
        fds.push(log.as_fd());
    }
    fds.extend(o.backing.iter().map(|(f, _)| f.as_fd()));
    fdpass::send(side.as_fd(), o.name.as_bytes(), &fds)
        .map_err(|e| BlockdError::HandImage(o.name.clone(), e))?;
    let mut req = server.add_request();
    {
        let mut e = req.get().init_export();
        e.set_name(&o.name);
        e.set_image(
            o.spec
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        e.set_format(&o.spec.format);
        e.set_readonly(o.spec.readonly);
        e.set_queues(o.spec.queues);
        e.set_serial(o.spec.serial.as_deref().unwrap_or(&o.name));
        e.set_read_error(&o.spec.rerror);
        e.set_write_error(&o.spec.werror);
        e.set_socket(o.socket.display().to_string());
        e.set_fds_on_side_channel(true);
        let mut formats = e.reborrow().init_backing(o.backing.len() as u32);
        for (i, (_, format)) in o.backing.iter().enumerate() {
            formats.set(i as u32, *format);
        }
        e.set_log(match &o.log {
            None => DiskLog::None,
            Some((_, how)) => *how,
        });
    }
    if let Err(e) = req.send().promise.await {
        let path = o.spec.path.as_ref().map(|p| p.display().to_string());
        return Err(BlockdError::Refused(path.unwrap_or_default(), e.into()));
    }
    Ok(())
}

/// A writable qcow2 image, before a blockd serves it (again): the refcounts a killed blockd
/// may have left unwritten are set (see vmm_proto::image::repair_l2_refcounts). Through a
/// descriptor of its own, without O_DIRECT (its reads and writes are small).
fn repair(o: &Opened) -> Result<(), BlockdError> {
    use std::os::fd::AsRawFd;
    let path = o.spec.path.clone().unwrap_or_default();
    let failed =
        |why: String| BlockdError::DiskImage(o.name.clone(), format!("{}: {why}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", o.image.as_raw_fd()))
        .map_err(|e| failed(format!("cannot open it again to check its refcounts ({e})")))?;
    let n = vmm_proto::image::repair_l2_refcounts(&f).map_err(failed)?;
    if n > 0 {
        log::warn!(
            "{}: {}: set {n} refcount(s) that a killed blockd had left at 0 (imago writes a new L2 table's L1 entry first)",
            o.name,
            path.display()
        );
    }
    Ok(())
}

/// Answers a command without blockd.
fn refuse(cmd: Command, why: fn() -> BlockdError) {
    match cmd {
        Command::List(reply) => {
            let _ = reply.send(Err(why()));
        }
        Command::Fault(_, reply)
        | Command::Throttle(_, _, reply)
        | Command::RemoveRule(_, reply) => {
            let _ = reply.send(Err(why()));
        }
        Command::AddRule(_, reply) => {
            let _ = reply.send(Err(why()));
        }
        Command::ListRules(reply) => {
            let _ = reply.send(Err(why()));
        }
        Command::Resume(reply) => {
            let _ = reply.send(Err(why()));
        }
        Command::Image(ImageCommand::Resize(_, _, _, reply))
        | Command::Image(ImageCommand::Mark(_, _, reply)) => {
            let _ = reply.send(Err(why()));
        }
        Command::Image(ImageCommand::Snapshot(_, _, locks, reply)) => {
            let _ = reply.send((locks, Err(why())));
        }
        Command::Image(ImageCommand::Commit(_, locks, reply)) => {
            let _ = reply.send((locks, Err(why())));
        }
        Command::Disk(DiskCommand::Add(_, reply)) => {
            let _ = reply.send(Err(why()));
        }
        Command::Disk(DiskCommand::Remove(_, locks, reply)) => {
            for l in locks {
                l.release();
            }
            let _ = reply.send(Err(why()));
        }
    }
}

/// Talks to blockd for the life of the VM. When blockd dies, it starts another (with backoff,
/// for as long as the VM lives), adds the exports again and reconnects every disk.
async fn client(
    first: std::os::unix::net::UnixStream,
    opened: Vec<Opened>,
    ready: Answer<()>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    hooks: Hooks,
    restart: Restart,
    uffd_dev: Option<Arc<vmm_sandbox::uffd::Device>>,
) {
    let Restart {
        respawn,
        devices,
        child,
    } = restart;
    let on_stop = std::rc::Rc::new(hooks.on_stop);
    let throttles = opened
        .iter()
        .filter_map(|o| o.spec.throttle.clone().map(|t| (o.name.clone(), t)))
        .collect();
    let mut disks = ClientDisks {
        opened,
        devices,
        throttles,
    };
    let mut control = Some(first);
    let mut restarts = 0u32;
    loop {
        let attached = match control.take() {
            Some(c) => attach(c, &disks, &on_stop, uffd_dev.as_deref(), restarts > 0).await,
            None => Err(BlockdError::NoConnection),
        };
        match attached {
            Err(e) if restarts == 0 => {
                let _ = ready.send(Err(e));
                return;
            }
            Err(e) => log::warn!("restarted blockd, but {e}; trying again"),
            Ok(mut a) => {
                if restarts == 0 {
                    let _ = ready.send(Ok(()));
                } else {
                    let mut done = Vec::new();
                    for (name, slot) in &disks.devices {
                        let dev = slot.lock().unwrap().as_ref().and_then(|w| w.upgrade());
                        let Some(dev) = dev else { continue };
                        let r = dev.lock().unwrap().reconnect();
                        match r {
                            Ok(()) => done.push(name.clone()),
                            Err(e) => {
                                log::error!("{name}: cannot reconnect to the restarted blockd: {e}")
                            }
                        }
                    }
                    (hooks.on_restart)(format!(
                        "restarted blockd (restart {restarts}); disks reconnected: {}",
                        if done.is_empty() {
                            "none yet in use".to_string()
                        } else {
                            done.join(", ")
                        }
                    ));
                }
                if serve(&mut a, &mut commands, &mut disks).await {
                    // The VM ends: closing the connection stops blockd; a blockd this thread
                    // started must end before the thread does (a parent-death signal follows the thread).
                    a.connection.abort();
                    let _ = a.connection.await;
                    drop(a.server);
                    if let Some(c) = child.lock().unwrap().take() {
                        super::end("blockd", c, std::time::Duration::from_secs(10));
                    }
                    return;
                }
                (hooks.on_death)();
            }
        }
        // blockd is gone while the VM runs: start another, waiting longer after each failure
        // (up to 5 s), for as long as the VM lives. Meanwhile the disks stall and API calls
        // are refused.
        let mut delay = std::time::Duration::from_millis(20);
        loop {
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = commands.recv() => match cmd {
                        Some(c) => refuse(c, || BlockdError::Restarting),
                        None => return,
                    },
                }
            }
            match respawn() {
                Ok(c) => {
                    control = Some(c);
                    break;
                }
                Err(e) => {
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                    log::warn!(
                        "cannot restart blockd ({e}); trying again in {} ms",
                        delay.as_millis()
                    );
                }
            }
        }
        restarts += 1;
    }
}

/// Serves the API's commands until the VM ends (true) or blockd's connection ends (false).
async fn serve(
    a: &mut Attached,
    commands: &mut tokio::sync::mpsc::UnboundedReceiver<Command>,
    disks: &mut ClientDisks,
) -> bool {
    let server = &a.server;
    // Commits run as tasks of their own; each tells, when done, what the export's image is.
    let (committed_tx, mut committed) = tokio::sync::mpsc::unbounded_channel::<Committed>();
    loop {
        let cmd = tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(c) => c,
                None => return true,
            },
            Some(c) = committed.recv() => {
                if let Some(o) = disks.opened.iter_mut().find(|o| o.name == c.name) {
                    o.image = c.image;
                    o.spec.path = Some(c.path);
                    o.spec.format = c.format.to_string();
                    o.spec.backing = None;
                    if !o.backing.is_empty() {
                        o.backing.remove(0);
                    }
                }
                continue;
            }
            _ = &mut a.connection => return false,
        };
        match cmd {
            Command::List(reply) => {
                let r = server.list_request().send().promise.await;
                let _ = reply.send(r.and_then(read_exports).map_err(BlockdError::Rpc));
            }
            Command::Fault(fault, reply) => {
                let mut req = server.inject_fault_request();
                match fault {
                    Fault::Clear => req.get().init_fault().set_clear(()),
                    Fault::ForbiddenSyscall => req.get().init_fault().set_forbidden_syscall(()),
                }
                let r = req
                    .send()
                    .promise
                    .await
                    .map(|_| ())
                    .map_err(BlockdError::Rpc);
                let _ = reply.send(r);
            }
            Command::AddRule(rule, reply) => {
                let mut req = server.add_fault_rule_request();
                rule.write_to(req.get().init_rule());
                let r = req
                    .send()
                    .promise
                    .await
                    .and_then(|r| Ok(r.get()?.get_id()))
                    .map_err(|e| BlockdError::Remote(e.into()));
                let _ = reply.send(r);
            }
            Command::RemoveRule(id, reply) => {
                let mut req = server.remove_fault_rule_request();
                req.get().set_id(id);
                let r = req
                    .send()
                    .promise
                    .await
                    .map(|_| ())
                    .map_err(|e| BlockdError::Remote(e.into()));
                let _ = reply.send(r);
            }
            Command::ListRules(reply) => {
                let r = server
                    .list_fault_rules_request()
                    .send()
                    .promise
                    .await
                    .and_then(|r| vmm_proto::faults::read_list(r.get()?.get_rules()?))
                    .map_err(|e| BlockdError::Remote(e.into()));
                let _ = reply.send(r);
            }
            Command::Resume(reply) => {
                let mut req = server.resume_request();
                req.get().set_name("");
                let r = req
                    .send()
                    .promise
                    .await
                    .and_then(|r| Ok(r.get()?.get_retried()))
                    .map_err(|e| BlockdError::Remote(e.into()));
                let _ = reply.send(r);
            }
            Command::Image(ImageCommand::Snapshot(name, overlay, mut locks, reply)) => {
                let r = snapshot(server, &a.side, disks, &name, &overlay, &mut locks).await;
                let _ = reply.send((locks, r));
            }
            Command::Image(ImageCommand::Commit(name, locks, reply)) => commit(
                server,
                &a.side,
                disks,
                name,
                locks,
                reply,
                committed_tx.clone(),
            ),
            Command::Image(c) => image_command(server, c).await,
            Command::Disk(c) => disk_command(server, &a.side, c, disks).await,
            Command::Throttle(name, spec, reply) => {
                let mut req = server.set_throttle_request();
                req.get().set_name(&name);
                spec.write(req.get().init_throttle());
                let r = req
                    .send()
                    .promise
                    .await
                    .map(|_| ())
                    .map_err(|e| BlockdError::Remote(e.into()));
                if r.is_ok() {
                    remember_throttle(&mut disks.throttles, name, spec);
                }
                let _ = reply.send(r);
            }
        }
    }
}

/// A disk hot-added (opened here, where files may be opened, and added as an export, with
/// its throttle) or hot-removed (its export ended, its socket removed); a restarted blockd
/// gets the disks as they are now.
async fn disk_command(
    server: &vmm_proto::blockd_capnp::blockd::Client,
    side: &std::os::fd::OwnedFd,
    cmd: DiskCommand,
    disks: &mut ClientDisks,
) {
    match cmd {
        DiskCommand::Add(new, reply) => {
            let (spec, name, dir, device) = *new;
            let added = async {
                let mut d = open_disk(&spec, name.clone(), Some(&dir), true, None)?;
                let o = d.opened.take().expect("a path= disk is handed to blockd");
                let mut r = add_export(side, server, &o, true).await;
                if let (Ok(()), Some(t)) = (&r, &spec.throttle) {
                    r = set_throttle(server, &name, t).await;
                    if r.is_err() {
                        let _ = end_export(server, &name).await;
                    }
                }
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&o.socket);
                    for l in &d.locks {
                        l.release();
                    }
                    return Err(e);
                }
                if let Some(t) = &spec.throttle {
                    disks.throttles.insert(name.clone(), t.clone());
                }
                d.backend.device = device.clone();
                disks.opened.push(o);
                disks.devices.push((name.clone(), device));
                log::info!("{name}: blockd serves {}", d.backend.image);
                Ok((d.backend, d.locks))
            };
            let _ = reply.send(added.await);
        }
        DiskCommand::Remove(name, locks, reply) => {
            let r = end_export(server, &name).await;
            if let Some(i) = disks.opened.iter().position(|o| o.name == name) {
                let o = disks.opened.remove(i);
                let _ = std::fs::remove_file(&o.socket);
            }
            disks.devices.retain(|(n, _)| *n != name);
            disks.throttles.remove(&name);
            for l in locks {
                l.release();
            }
            let _ = reply.send(r);
        }
    }
}

async fn end_export(
    server: &vmm_proto::blockd_capnp::blockd::Client,
    name: &str,
) -> Result<(), BlockdError> {
    let mut req = server.remove_request();
    req.get().set_name(name);
    req.send()
        .promise
        .await
        .map(|_| ())
        .map_err(|e| BlockdError::Remote(e.into()))
}

/// blockd's list of exports, as `disk list` shows it.
fn read_exports(
    r: capnp::capability::Response<vmm_proto::blockd_capnp::blockd::list_results::Owned>,
) -> capnp::Result<Vec<DiskInfo>> {
    let list = r.get()?.get_exports()?;
    let mut v = Vec::new();
    for x in list.iter() {
        let mut ops = Vec::new();
        for o in x.get_ops()?.iter() {
            ops.push(OpInfo {
                op: o.get_op()?.to_string()?,
                requests: o.get_requests(),
                bytes: o.get_bytes(),
                errors: o.get_errors(),
                latency: o
                    .get_latency()?
                    .iter()
                    .map(|b| (b.get_up_to_us(), b.get_count()))
                    .collect(),
            });
        }
        v.push(DiskInfo {
            name: x.get_name()?.to_string()?,
            image: x.get_image()?.to_string()?,
            format: x.get_format()?.to_string()?,
            readonly: x.get_readonly(),
            queues: x.get_queues(),
            size: x.get_size(),
            socket: x.get_socket()?.to_string()?,
            connected: x.get_connected(),
            writeback: x.get_writeback(),
            direct: x.get_direct(),
            invalid: x.get_invalid(),
            interrupts: x.get_interrupts(),
            interrupts_suppressed: x.get_interrupts_suppressed(),
            replay: x.get_replay()?.to_string()?,
            job: x.get_job()?.to_string()?,
            ops,
            throttle: vmm_proto::throttle::Spec::read(x.get_throttle()?)?,
            stopped: x.get_stopped()?.to_string()?,
            read_error: x.get_read_error()?.to_string()?,
            write_error: x.get_write_error()?.to_string()?,
        });
    }
    Ok(v)
}

/// A commit done: export `name`'s image is now its old base.
struct Committed {
    name: String,
    image: std::fs::File,
    path: PathBuf,
    format: &'static str,
}

/// The absolute form of `p` (as a qcow2 header names a backing file).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A live external snapshot of export `name`: a new overlay file is made at `overlay`
/// (it must not exist), locked for writing and handed to blockd, which formats it over the
/// old top and serves it; the old top's lock becomes a shared one.
async fn snapshot(
    server: &vmm_proto::blockd_capnp::blockd::Client,
    side: &std::os::fd::OwnedFd,
    disks: &mut ClientDisks,
    name: &str,
    overlay: &Path,
    locks: &mut Vec<super::image_lock::ImageLock>,
) -> Result<(), BlockdError> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |why: String| BlockdError::DiskImage(name.to_string(), why);
    let o = disks
        .opened
        .iter_mut()
        .find(|o| o.name == name)
        .ok_or_else(|| failed("no such disk (disk list shows them)".into()))?;
    if o.spec.readonly {
        return Err(failed(
            "it is read-only (readonly=on): a snapshot of it would hold no writes".into(),
        ));
    }
    if let Some(b) = &o.spec.backing {
        return Err(failed(format!(
            "it was given backing={}, which its header does not name, and an overlay's chain follows the headers; write it into the image first (qemu-img rebase -u -b {} -F FORMAT IMAGE)",
            b.display(),
            b.display()
        )));
    }
    let top = absolute(o.spec.path.as_ref().expect("a path= disk"));
    let overlay = absolute(overlay);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(if o.spec.direct { libc::O_DIRECT } else { 0 })
        .open(&overlay)
        .map_err(|e| {
            failed(format!(
                "--overlay {}: cannot create it ({e}); give a new file's path in a directory that exists",
                overlay.display()
            ))
        })?;
    let undo = |why: BlockdError| {
        let _ = std::fs::remove_file(&overlay);
        why
    };
    let lock = super::image_lock::ImageLock::new(&overlay, &file, true)
        .map_err(|e| undo(BlockdError::Open(overlay.clone(), e)))?;
    lock.take(true).map_err(|e| undo(e.into()))?;
    let what = format!("snapshot:{name}");
    vmm_proto::fdpass::send(side.as_fd(), what.as_bytes(), &[file.as_fd()])
        .map_err(|e| undo(BlockdError::HandImage(name.to_string(), e)))?;
    let mut req = server.snapshot_request();
    req.get().set_name(name);
    req.get().set_overlay(overlay.display().to_string());
    req.get().set_backing_name(top.display().to_string());
    if let Err(e) = req.send().promise.await {
        lock.release();
        return Err(undo(BlockdError::Remote(e.into())));
    }
    // The old top is read from now on: other VMs may read it too (a copy, a backup).
    for l in locks.iter_mut() {
        if l.is_exclusive() {
            if let Err(e) = l.downgrade() {
                log::warn!("{name}: the old image's lock stays exclusive: {e}");
            }
        }
    }
    locks.push(lock);
    let old = o
        .image
        .try_clone()
        .map_err(|e| BlockdError::Open(top.clone(), e))?;
    let format = if o.spec.format == "qcow2" {
        "qcow2"
    } else {
        "raw"
    };
    o.backing.insert(0, (old, format));
    o.image = file;
    o.spec.path = Some(overlay.clone());
    o.spec.format = "qcow2".into();
    // The overlay's header names the old top; a backing= given for the old top is its own.
    o.spec.backing = None;
    log::info!(
        "{name}: live snapshot: writes go to {} over {}",
        overlay.display(),
        top.display()
    );
    Ok(())
}

/// A commit of export `name`'s top overlay into its base: the base is opened for writing
/// and locked exclusively (in place of its shared lock), handed to blockd, and the rest
/// waits for blockd on a task of its own. Its answer comes back with the disk's locks: the
/// base's exclusive and the overlay's let go when it worked, as they were when not.
fn commit(
    server: &vmm_proto::blockd_capnp::blockd::Client,
    side: &std::os::fd::OwnedFd,
    disks: &mut ClientDisks,
    name: String,
    locks: Vec<super::image_lock::ImageLock>,
    reply: tokio::sync::oneshot::Sender<LocksAnd<(u64, PathBuf, &'static str)>>,
    committed: tokio::sync::mpsc::UnboundedSender<Committed>,
) {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |why: String| BlockdError::DiskImage(name.clone(), why);
    let Some(o) = disks.opened.iter().find(|o| o.name == name) else {
        let _ = reply.send((
            locks,
            Err(failed("no such disk (disk list shows them)".into())),
        ));
        return;
    };
    let top = o.spec.path.clone().expect("a path= disk");
    let base = if o.spec.format == "qcow2" {
        vmm_proto::image::check_chain(&top, &o.image, o.spec.backing.as_deref())
            .map_err(|e| BlockdError::Unservable(top.clone(), e))
            .map(|chain| chain.into_iter().next())
    } else {
        Ok(None)
    };
    let base = match base {
        Ok(Some(b)) => b,
        Ok(None) => {
            let why = format!(
                "{} has no backing file: there is nothing to commit it into",
                top.display()
            );
            let _ = reply.send((locks, Err(failed(why))));
            return;
        }
        Err(e) => {
            let _ = reply.send((locks, Err(e)));
            return;
        }
    };
    let direct = o.spec.direct;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(&base.path);
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            let why = format!(
                "cannot open its base {} for writing ({e}); check its permissions",
                base.path.display()
            );
            let _ = reply.send((locks, Err(failed(why))));
            return;
        }
    };
    // Our own shared lock on the base goes, for the exclusive one (another VM that reads
    // the base keeps its shared lock, and then the commit is refused).
    let shared = locks.iter().position(|l| l.path() == base.path);
    if let Some(i) = shared {
        locks[i].release();
    }
    let exclusive = match super::image_lock::ImageLock::new(&base.path, &file, true) {
        Ok(l) => l.take(true).map(|()| l),
        Err(e) => Err(super::image_lock::LockError::Fcntl(
            base.path.clone(),
            nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )),
    };
    let base_path = base.path.clone();
    let retake = move |locks: &Vec<super::image_lock::ImageLock>| {
        if let Some(i) = shared {
            if let Err(e) = locks[i].take(false) {
                log::warn!(
                    "{}: cannot take its shared lock again: {e}",
                    base_path.display()
                );
            }
        }
    };
    let exclusive = match exclusive {
        Ok(l) => l,
        Err(e) => {
            retake(&locks);
            let _ = reply.send((locks, Err(e.into())));
            return;
        }
    };
    let what = format!("commit:{name}");
    if let Err(e) = vmm_proto::fdpass::send(side.as_fd(), what.as_bytes(), &[file.as_fd()]) {
        exclusive.release();
        retake(&locks);
        let _ = reply.send((locks, Err(BlockdError::HandImage(name.clone(), e))));
        return;
    }
    let mut req = server.commit_request();
    req.get().set_name(&name);
    req.get().set_base(base.path.display().to_string());
    let promise = req.send().promise;
    log::info!(
        "{name}: committing {} into {}",
        top.display(),
        base.path.display()
    );
    tokio::task::spawn_local(async move {
        let r = promise
            .await
            .and_then(|r| Ok(r.get()?.get_bytes()))
            .map_err(|e| BlockdError::Remote(e.into()));
        let bytes = match r {
            Ok(b) => b,
            Err(e) => {
                exclusive.release();
                retake(&locks);
                let _ = reply.send((locks, Err(e)));
                return;
            }
        };
        // The overlay is no longer used; the base is the disk's image, written by this VM.
        let mut kept = Vec::new();
        for (i, l) in locks.into_iter().enumerate() {
            if l.is_exclusive() || Some(i) == shared {
                l.release();
            } else {
                kept.push(l);
            }
        }
        kept.push(exclusive);
        log::info!(
            "{name}: committed ({bytes} bytes copied); its image is {}",
            base.path.display()
        );
        let _ = committed.send(Committed {
            name: name.clone(),
            image: file,
            path: base.path.clone(),
            format: base.format,
        });
        let _ = reply.send((kept, Ok((bytes, base.path, base.format))));
    });
}

/// A command that changes or marks an export's image: a resize, or a recording's mark at a
/// snapshot (with the image kept as it is then).
async fn image_command(server: &vmm_proto::blockd_capnp::blockd::Client, cmd: ImageCommand) {
    match cmd {
        ImageCommand::Resize(name, bytes, force, reply) => {
            let mut req = server.resize_request();
            req.get().set_name(&name);
            req.get().set_bytes(bytes);
            req.get().set_force(force);
            let r = req
                .send()
                .promise
                .await
                .and_then(|r| Ok(r.get()?.get_old()))
                .map_err(|e| BlockdError::Remote(e.into()));
            let _ = reply.send(r);
        }
        ImageCommand::Snapshot(_, _, locks, reply) => {
            let _ = reply.send((locks, Err(BlockdError::NoConnection)));
        }
        ImageCommand::Commit(_, locks, reply) => {
            let _ = reply.send((locks, Err(BlockdError::NoConnection)));
        }
        ImageCommand::Mark(name, keep, reply) => {
            let mut req = server.mark_request();
            req.get().set_name(&name);
            let r = req
                .send()
                .promise
                .await
                .and_then(|r| Ok(r.get()?.get_log_bytes()))
                .map_err(|e| BlockdError::Remote(e.into()))
                .and_then(|bytes| match keep {
                    Some((image, log)) => keep_image(&image, &log, bytes).map(|()| bytes),
                    None => Ok(bytes),
                });
            let _ = reply.send(r);
        }
    }
}

/// A recording's image as it is at a snapshot's mark (blockd flushed it), copied beside the
/// log as `LOG.at-BYTES` (sparse; shared blocks where the file system can).
fn keep_image(image: &Path, log: &Path, bytes: u64) -> Result<(), BlockdError> {
    let then = vmm_proto::image::at_mark(log, bytes);
    let copy = || -> std::io::Result<()> {
        let src = std::fs::File::open(image)?;
        let dst = std::fs::File::create(&then)?;
        vmm_proto::image::copy_sparse(&src, &dst).map(|_| ())
    };
    copy().map_err(|e| {
        BlockdError::Recording(
            format!(
                "--record {}: cannot keep the image as it is now there",
                then.display()
            ),
            e,
        )
    })?;
    log::info!("{}: the image as the snapshot saw it", then.display());
    Ok(())
}

/// Keeps a disk's throttle as blockd now has it, to give a restarted blockd: a disk that
/// joined a group without limits gets the group's limits as another disk set them.
fn remember_throttle(
    throttles: &mut std::collections::BTreeMap<String, vmm_proto::throttle::Spec>,
    name: String,
    mut spec: vmm_proto::throttle::Spec,
) {
    if spec.is_off() {
        if spec.group.is_empty() {
            throttles.remove(&name);
            return;
        }
        if let Some(other) = throttles
            .values()
            .find(|t| t.group == spec.group && !t.is_off())
        {
            spec.limits = other.limits;
        }
    } else if !spec.group.is_empty() {
        // New limits for the group are every member's.
        for t in throttles.values_mut().filter(|t| t.group == spec.group) {
            t.limits = spec.limits;
        }
    }
    throttles.insert(name, spec);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a restarted blockd gets: every disk's throttle as blockd last had it, group
    /// members with the group's limits.
    #[test]
    fn throttles_are_remembered_as_blockd_has_them() {
        use vmm_proto::throttle::Spec;
        let mut t = std::collections::BTreeMap::new();
        let parse = |s: &str| Spec::parse(s).unwrap();
        remember_throttle(&mut t, "disk1".into(), parse("group=g,iops=400"));
        // disk0 joins without limits: it is kept with the group's.
        remember_throttle(&mut t, "disk0".into(), parse("group=g"));
        assert_eq!(t["disk0"], parse("group=g,iops=400"));
        // New limits for the group are every member's.
        remember_throttle(&mut t, "disk0".into(), parse("group=g,iops=100"));
        assert_eq!(t["disk1"], parse("group=g,iops=100"));
        remember_throttle(&mut t, "disk1".into(), parse("off"));
        assert!(!t.contains_key("disk1"));
        assert_eq!(t.len(), 1);
    }
}
