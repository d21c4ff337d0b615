//! What the VM's main loop is told, and by whom: vCPU threads, the guest's hotplug actions,
//! signals, the console, the management API, blockd and migrations. This is vocabulary only:
//! the modules that send these import it, and it imports none of them.

use futures::channel::oneshot;
use vmm_devices::bus::Action;
use vmm_devices::platform::cpu_hotplug::HotplugEvent;

/// Everything that can end a run, or that only the main loop can carry out.
#[derive(Debug)]
pub enum VmEvent {
    Vcpu(VcpuEvent),
    Signal(i32),
    ConsoleEscape,
    /// SIGUSR1: log every vCPU's registers and go on.
    DumpVcpus,
    /// A management API request.
    Api(ApiRequest),
    /// The guest acted on the CPU hotplug controller.
    Hotplug(HotplugEvent),
    /// A disk comes or goes (the management API).
    Disk(DiskChange),
    /// The guest ejected the devices of these PCI slots (a bit each), as asked.
    PciEjected(u32),
    /// blockd stopped a disk on an I/O error (its error policy): (disk, reason).
    DiskStopped(String, String),
    /// A step of a migration or snapshot.
    Migration(MigrationRequest),
    /// The incoming VM's stream, taken whole (its device state and size), or why not.
    Arrived(Arrival),
    /// Post-copy (the destination): every page came, or why not.
    PostcopyDone(Result<PostcopySummary, PostcopyFailed>),
    /// Post-copy (the destination): the channel broke (why); the VM waits for a recovery.
    PostcopyPaused(String),
}

/// A disk that comes or goes while the VM runs (PCI hotplug).
pub enum DiskChange {
    /// Put the disk's virtio-blk function on the bus and tell the guest: its PCI slot.
    Add(crate::disk_backend::DiskBackend, Reply<u8>),
    /// Ask the guest to eject disk `name`: answered once it did (the function is then off
    /// the bus and its backend disconnected), or when `timeout_ms` passed (it stays).
    Remove {
        name: String,
        timeout_ms: u32,
        reply: Reply<()>,
    },
}

impl std::fmt::Debug for DiskChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskChange::Add(d, _) => write!(f, "Add({})", d.name),
            DiskChange::Remove { name, .. } => write!(f, "Remove({name})"),
        }
    }
}

/// An incoming VM's device state and stream size, or why it did not come.
/// What came in: the device state, the bytes read, and whether the source switched to
/// post-copy (the rest of RAM comes through migrated's page server).
pub type Arrival = Result<(Vec<u8>, u64, bool), Box<dyn std::error::Error + Send + Sync>>;

/// Why a vCPU thread asks the VM to stop.
#[derive(Debug)]
pub enum VcpuEvent {
    Action(u32, Action),
    /// A triple fault: on PC hardware this resets the machine.
    TripleFault(u32, u64),
    Failed(u32, String),
}

/// Where the main loop's answer to a request goes.
pub type Reply<T> = oneshot::Sender<Result<T, LoopError>>;

/// Why the main loop did not carry out a request: a refusal it explains, or the error of the
/// part that failed (with its chain).
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("the VM has not arrived yet (state incoming): until it does, only info, events and shutdown work")]
    NotArrived,
    #[error("another vCPU change is still waiting for the guest; try again when it is done")]
    CpuChangeBusy,
    #[error("cannot remove vCPU 0, the boot CPU: at least 1 vCPU stays online")]
    BootCpu,
    #[error("cannot have {0} vCPUs: this VM's maximum is {1} (start it with --cpus N,max=M to allow more)")]
    AboveMax(u32, u32),
    #[error("vCPU {0}: the guest did not take it within {1} ms; it stays present for the guest to start later")]
    NotTaken(String, u32),
    #[error("vCPU {0}: the guest did not eject it within {1} ms, so it keeps running (is the CPU offline in the guest, and does it support CPU hot-remove?)")]
    NotEjected(String, u32),
    #[error("vCPU {0}: cannot start its thread")]
    VcpuThread(u32, #[source] std::io::Error),
    #[error("cannot interrupt the guest")]
    Interrupt(#[source] std::io::Error),
    #[error("post-copy is paused (its channel broke): a vCPU waits for a page that only the source has and cannot stop until it comes; `vmmctl migrate recover URI` first, or `shutdown --force`")]
    PostcopyPaused,
    #[error("cannot hand guest RAM to migrated")]
    Memfd(#[source] std::io::Error),
    #[error("no device {0} in the guest")]
    NoDevice(String),
    #[error("disk {0}: the guest did not eject it within {1} ms, so it stays (does the guest support ACPI PCI hotplug, and has it stopped using the disk?)")]
    DiskNotEjected(String, u32),
    #[error("disk {0} is being removed already; wait for that to end")]
    DiskRemoving(String),
    #[error("{0}: no free PCI slot (bus 0 has 31); remove a device first")]
    NoPciSlot(String),
    #[error("{0}: PCI slot {1} is taken (or not a slot); give another slot=, or none for the first free one")]
    SlotTaken(String, u8),
    #[error("{0}: cannot be hot-removed (only disks can)")]
    NotRemovable(String),
    #[error("a migration or snapshot is under way ({0}); add or remove disks before it starts or once it has ended")]
    Migrating(String),
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl LoopError {
    /// Another part's error, as the answer.
    pub fn failed(e: impl std::error::Error + Send + Sync + 'static) -> LoopError {
        LoopError::Failed(Box::new(e))
    }
}

/// A management API request that only the VM's main loop can carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    Shutdown {
        force: bool,
    },
    Reboot,
    /// Hot-add or hot-remove vCPUs until `count` are online; give up after `timeout_ms`.
    SetCpus {
        count: u32,
        timeout_ms: u32,
    },
    /// KVM's dirty log on (and cleared), or off: turning it off stores how many pages the
    /// guest wrote meanwhile in the API's status (`dirty_pages`).
    DirtyLog {
        on: bool,
    },
    /// Disk `name`'s backend grew it: its device reads its configuration again and tells
    /// the guest (a config-change interrupt).
    DiskResized {
        name: String,
    },
    /// Disk `name`'s image is `path` now (a live snapshot, a commit).
    DiskImage {
        name: String,
        path: std::path::PathBuf,
        format: &'static str,
    },
}

/// A request and where its answer goes.
#[derive(Debug)]
pub struct ApiRequest {
    pub request: Request,
    pub reply: Reply<()>,
}

/// What the main thread does for a migration or snapshot (it owns the VM).
pub enum MigrationRequest {
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

impl std::fmt::Debug for MigrationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationRequest::DirtyLog(..) => "DirtyLog",
            MigrationRequest::TakeDirty(_) => "TakeDirty",
            MigrationRequest::Save(_) => "Save",
            MigrationRequest::Continue(_) => "Continue",
            MigrationRequest::Leave => "Leave",
            MigrationRequest::Memfd(_) => "Memfd",
        })
    }
}

/// A paused VM's saved state, for a migration's last pass or a snapshot.
pub struct Saved {
    pub state: Vec<u8>,
    pub dirty: Option<Vec<u64>>,
    /// Whether a queue's backend writes guest RAM without a dirty log of its own (KVM's log
    /// does not see those writes, so every page goes again in the last pass).
    pub unlogged_writers: bool,
}

/// Why a destination's post-copy (or lazy restore) ended without every page.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyFailed {
    /// migrated's page server said why the rest cannot come.
    #[error("{0}")]
    Broken(String),
    /// migrated could not be asked (it died, or its connection broke).
    #[error("migrated cannot be asked how post-copy goes: {0}")]
    Unreachable(String),
}

/// What post-copy did: pages carried, faults that asked the source for a page, and the
/// time from a request to its page (on the destination).
#[derive(Debug, Clone, Default)]
pub struct PostcopySummary {
    pub pages: u64,
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub ms: u64,
    /// Page faults served on the destination, and of them those of device backends.
    pub faults: u64,
    pub backend_faults: u64,
}

impl PostcopySummary {
    pub fn read(s: vmm_proto::migrated_capnp::postcopy_summary::Reader) -> PostcopySummary {
        PostcopySummary {
            pages: s.get_pages(),
            requests: s.get_requests(),
            p50_us: s.get_p50_micros(),
            p99_us: s.get_p99_micros(),
            max_us: s.get_max_micros(),
            ms: s.get_micros() / 1000,
            faults: s.get_faults(),
            backend_faults: s.get_backend_faults(),
        }
    }
}

impl std::fmt::Display for PostcopySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} page(s) in {} ms, {} fault(s) asked the source (from a request to its page: p50 {} us, p99 {} us, max {} us)",
            self.pages, self.ms, self.requests, self.p50_us, self.p99_us, self.max_us
        )?;
        if self.faults > 0 {
            write!(
                f,
                "; {} fault(s) served, {} of them device backends'",
                self.faults, self.backend_faults
            )?;
        }
        Ok(())
    }
}

/// How far the console's log has come: inputs recorded, or given of those recorded.
#[derive(Default)]
pub struct LogProgress {
    replaying: std::sync::atomic::AtomicBool,
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

impl LogProgress {
    /// "recording, 3 input(s)" or "replaying, 2 of 3 input(s) given".
    pub fn status(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let done = self.done.load(Relaxed);
        if self.replaying.load(Relaxed) {
            format!(
                "replaying, {done} of {} input(s) given",
                self.total.load(Relaxed)
            )
        } else {
            format!("recording, {done} input(s)")
        }
    }

    /// A replay of `total` recorded inputs begins.
    pub fn replaying(&self, total: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.replaying.store(true, Relaxed);
        self.total.store(total, Relaxed);
    }

    pub fn one_more(&self) {
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The guest's console output so far, in bytes: where an input stands in a recording.
#[derive(Default)]
pub struct ConsoleWritten {
    bytes: std::sync::Mutex<u64>,
    changed: std::sync::Condvar,
}

impl ConsoleWritten {
    pub fn get(&self) -> u64 {
        *self.bytes.lock().unwrap()
    }

    pub fn add(&self, n: u64) {
        *self.bytes.lock().unwrap() += n;
        self.changed.notify_all();
    }

    /// Waits until the guest has written `at` bytes.
    pub fn wait_for(&self, at: u64) {
        let mut b = self.bytes.lock().unwrap();
        while *b < at {
            b = self.changed.wait(b).unwrap();
        }
    }
}

/// A log a helper writes or reads (the rng's): a copy of its descriptor, whose offset is the
/// helper's, to say where it stands.
pub struct SharedLog {
    file: std::fs::File,
    /// Replaying: the log's length.
    replay_of: Option<u64>,
}

impl SharedLog {
    pub fn new(file: std::fs::File, replaying: bool) -> std::io::Result<SharedLog> {
        let replay_of = replaying
            .then(|| file.metadata().map(|m| m.len()))
            .transpose()?;
        Ok(SharedLog { file, replay_of })
    }

    /// "recording, 4096 byte(s) of log" or "replaying, 2048 of 4096 byte(s) of log read".
    pub fn status(&self) -> String {
        use std::io::Seek;
        let at = match (&self.file).stream_position() {
            Ok(at) => at,
            Err(e) => return format!("unknown ({e})"),
        };
        match self.replay_of {
            Some(total) => format!("replaying, {at} of {total} byte(s) of log read"),
            None => format!("recording, {at} byte(s) of log"),
        }
    }
}
