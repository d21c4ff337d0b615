//! Building a VM (KVM VM, memory, devices, vCPUs), running it, and stopping it when the guest
//! or the host says so.

mod build;
mod console;
mod marks;
mod running;

use crate::api;
use crate::boot::{self, BootError};
use crate::config::{OnReset, VmConfig};
use crate::control::{ApiRequest, Request, VcpuEvent, VmEvent};
use crate::helpers::chardevd;
use crate::kvm::Kvm;
use crate::memory::MemoryError;
use crate::vcpu::{kick, VcpuError};
use crate::{Outcome, StopReason};
use build::Guest;
use console::ConsoleInput;
use nix::sys::signal::{SigSet, Signal};
use running::Running;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_devices::bus::Action;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
    #[error("cannot set up {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("vCPU {0}: {1}")]
    VcpuFailed(u32, String),
    #[error("the guest triple-faulted on vCPU {0} at RIP {1:#x} (pass --on-reset restart to reboot it instead)")]
    TripleFault(u32, u64),
    #[error("the VM stopped before post-copy was over: the pages still missing were at the source only, so it is lost")]
    PostcopyLost,
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Chardev(#[from] chardevd::ChardevError),
    /// A disk's image or backend (a user error: exit 2).
    #[error(transparent)]
    Disk(#[from] crate::helpers::blockd::BlockdError),
    #[error("cannot install the main thread's seccomp filter ({0}); run with --no-sandbox to debug without it")]
    Seccomp(#[source] vmm_sandbox::SandboxError),
    /// A disk's backend failed during set-up of a boot.
    #[error("{0}: {1}")]
    DiskSetup(String, vmm_devices::virtio::VirtioError),
    #[error("--rng socket={0}: {1}; start the vhost-user-rng backend first (vhost-device-rng --socket-path {0})")]
    RngSetup(std::path::PathBuf, vmm_devices::virtio::VirtioError),
    #[error("--rng {0}: {1}")]
    Rng(String, #[source] std::io::Error),
    /// A record/replay log that cannot be opened or read (the flag and the path in it).
    #[error("{0}")]
    Recording(String),
    #[error("{0}: no free PCI slot or BAR space")]
    NoPciSlot(String),
    #[error("{0}: PCI slot {1} is taken by another disk; give each disk its own slot=")]
    SlotTaken(String, u8),
    #[error(transparent)]
    Migration(#[from] crate::helpers::migrated::MigratedError),
    /// The incoming VM could not be taken (a user error when the stream or its source is).
    /// The error names the channel already: "--incoming URI: " (or "--restore file:PATH: ",
    /// the flag that was given) goes in front of the rest.
    /// What ended the run before the VM was built (a stop while an incoming VM was awaited):
    /// not an error, the run's end.
    #[error("stopped before the VM arrived")]
    Interrupted(VmEvent),
    #[error("{0} {1}: {why}", why = without_uri(.1, .2.as_ref()))]
    Incoming(
        &'static str,
        String,
        Box<dyn std::error::Error + Send + Sync>,
    ),
}

/// An error's line without the channel's name in front (the caller puts it there).
fn without_uri(uri: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let line = crate::error_chain(e);
    match line.strip_prefix(&format!("{uri}: ")) {
        Some(rest) => rest.to_string(),
        None => line,
    }
}

impl VmError {
    /// The incoming VM (from `uri`, given with `flag`) could not be taken.
    fn incoming(
        flag: &'static str,
        uri: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> VmError {
        VmError::Incoming(flag, uri.to_string(), Box::new(e))
    }

    pub fn is_user_error(&self) -> bool {
        matches!(self, VmError::Boot(e) if e.is_user_error())
            || matches!(
                self,
                VmError::Api(_) | VmError::Disk(_) | VmError::Incoming(..)
            )
            || matches!(
                self,
                VmError::Chardev(
                    chardevd::ChardevError::Helper(_)
                        | chardevd::ChardevError::Backend(_)
                        | chardevd::ChardevError::Resource(_)
                )
            )
    }
}

/// The main thread's system calls beyond the common base: building the VM and its devices at
/// each boot, stopping it, and ending the helpers. A superset of the vCPU threads' list, since
/// vCPU threads start under this filter and add their own.
pub fn main_allowlist() -> Vec<vmm_sandbox::seccomp::Allow> {
    use vmm_sandbox::seccomp::{allow, allow_if, Cond};
    let o_dir = (libc::O_DIRECTORY | libc::O_CREAT | libc::O_ACCMODE) as u64;
    vec![
        allow_if(
            "ioctl",
            "KVM ioctls (type 0xAE): the VM, its memory, vCPUs, irqfds, ioeventfds, GSI routing",
            vec![vec![Cond::Masked(1, 0xff00, 0xae00)]],
        ),
        allow_if(
            "ioctl",
            "userfaultfd ioctls (type 0xAA): a post-copy destination registers guest RAM, and unregisters it once every page is here",
            vec![vec![Cond::Masked(1, 0xff00, 0xaa00)]],
        ),
        allow_if(
            "ioctl",
            "the terminal's mode, restored at the end (TCGETS, TCSETS*)",
            [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF]
                .iter()
                .map(|c| vec![Cond::Eq(1, *c)])
                .collect(),
        ),
        allow_if(
            "fcntl",
            "image locks: taken by an incoming VM as it arrives, released and taken back around a live migration's last pass",
            vec![
                vec![Cond::Eq(1, libc::F_OFD_SETLK as u64)],
                vec![Cond::Eq(1, libc::F_OFD_GETLK as u64)],
            ],
        ),
        allow("memfd_create", "guest RAM, created at each boot"),
        allow("ftruncate", "sizing guest RAM"),
        allow("lseek", "rewinding the kernel and initramfs at each boot"),
        allow("pread64", "reading the kernel (ELF segments)"),
        allow_if(
            "socket",
            "AF_UNIX only: connecting to the disks' vhost-user sockets at each boot",
            vec![vec![Cond::Eq(0, libc::AF_UNIX as u64)]],
        ),
        allow("connect", "the disks' vhost-user sockets"),
        allow("tgkill", "kicking vCPU threads out of KVM_RUN"),
        allow_if(
            "prctl",
            "PR_SET_NO_NEW_PRIVS: a vCPU thread installs its own filter",
            vec![vec![Cond::Eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)]],
        ),
        allow("wait4", "reaping blockd when the VM ends"),
        allow(
            "kill",
            "ending blockd (SIGTERM, then SIGKILL) when it does not exit by itself",
        ),
        allow_if(
            "openat",
            "directories only, read-only: removing the disks' socket directory at the end",
            vec![vec![Cond::Masked(2, o_dir, libc::O_DIRECTORY as u64)]],
        ),
        allow("getdents64", "listing that directory"),
        allow("unlinkat", "removing the sockets and the directory"),
        allow("unlink", "removing the API socket at the end"),
        allow(
            "newfstatat",
            "removing the directory (std checks each entry)",
        ),
        allow("statx", "metadata of open files"),
    ]
}

/// A helper vmm-core connects to (its --*-socket), or starts (its executable), sandboxed
/// unless --no-sandbox.
fn helper_source(
    config: &VmConfig,
    socket: &Option<std::path::PathBuf>,
    exe: &std::path::Path,
) -> crate::helpers::Source {
    match socket {
        Some(path) => crate::helpers::Source::Connect(path.clone()),
        None => crate::helpers::Source::Spawn(
            exe.to_path_buf(),
            config.sandbox.then(|| config.seccomp.clone()),
        ),
    }
}

/// What every boot of the guest uses, opened or started once.
struct Resources<'a> {
    boot: &'a boot::BootFiles,
    /// The disks, as hot-add and hot-remove leave them (a reset's new boot has them all).
    disks: &'a std::sync::Mutex<Vec<crate::helpers::blockd::DiskBackend>>,
    /// The virtio-rng device's vhost-user-rng socket (--rng), and where its transport goes
    /// (for chardevd to reconnect it after a restart).
    rng: Option<(&'a std::path::Path, &'a crate::helpers::blockd::DeviceSlot)>,
    migrated: Option<&'a Arc<crate::helpers::migrated::Migrated>>,
    /// A destination's userfaultfd, for post-copy (made before the main thread's filter).
    uffd: Option<&'a Result<vmm_sandbox::uffd::Uffd, vmm_sandbox::uffd::UffdError>>,
    /// The first boot's memory and VM, made while the helpers started.
    early: &'a build::Early,
}

/// Runs the VM until it ends; restarts it on reset when asked to.
pub fn run(
    kvm: &Kvm,
    config: &VmConfig,
    early: Option<Arc<crate::helpers::migrated::Migrated>>,
) -> Result<Outcome, VmError> {
    vmm_sandbox::seccomp::set_process_name("vmm-core");
    crate::boot_times::enable(config.print_boot_times);
    crate::boot_times::mark("config");
    let made = build::Early::start(config.memory);
    crate::threads::set_thread_filters(
        config
            .sandbox
            .then(|| config.seccomp.parse().expect("clap checked it")),
    );
    let boot_files = boot::BootFiles::open(config)?;
    let (tx, rx) = channel();
    start_signal_thread(tx.clone())?;
    let console = Arc::new(ConsoleInput::default());
    console::setup_recording(config, &console)?;
    let raw = console::take_terminal(config, &console, &tx)?;
    let shared = new_shared(config);
    if config.recording.is_some() {
        let _ = shared.console_replay.set(console.progress.clone());
        let _ = shared.console_written.set(console.written.clone());
    }
    let _api = match &config.api_socket {
        Some(path) => Some(api::start(
            path,
            shared.clone(),
            tx.clone(),
            config
                .sandbox
                .then(|| config.seccomp.parse().expect("clap checked it")),
        )?),
        None => None,
    };
    // Disks: blockd processes live as long as vmm-core, across guest reboots.
    let (disks, run_dir) = start_disks(config, &shared, &tx)?;
    crate::boot_times::mark("blockd");
    let disks = std::sync::Mutex::new(disks);
    let (rng, rng_served, run_dir) = rng_backend(config, run_dir, &shared)?;
    let supervisor = match &config.serial {
        Some(backend) => Some(console::start_chardevd(
            helper_source(config, &config.chardevd_socket, &config.chardevd),
            backend,
            &console,
            &shared,
            &tx,
            raw.is_some(),
            rng_served,
        )?),
        None => None,
    };
    crate::boot_times::mark("chardevd");
    // migrated: started now, as the main thread's filter forbids new processes later.
    let migrated = start_migrated(config, &shared, early)?;
    crate::boot_times::mark("migrated");

    // Set-up is over: the helpers run, the API serves, the boot files are open. From here the
    // main thread builds the guest (again at each reset), waits for its events and, at the end,
    // stops the helpers, under a filter of its own; the vCPU threads it starts inherit it and
    // add theirs. A filter that cannot be installed ends the VM before the guest runs, through
    // the same clean-up as any other end.
    // A destination may switch to post-copy: its userfaultfd is made now (the filter
    // forbids it later), and used only then.
    let uffd = config
        .incoming
        .is_some()
        .then(|| vmm_sandbox::uffd::Uffd::new(None));
    let res = Resources {
        boot: &boot_files,
        disks: &disks,
        rng: rng.as_ref().map(|(p, d)| (p.as_path(), d)),
        migrated: Some(&migrated),
        uffd: uffd.as_ref(),
        early: &made,
    };
    let result = filter_main_thread(config)
        .and_then(|()| run_guest(kvm, config, (&tx, &rx), &console, &shared, &res));
    migrated.end();
    drop(disks);
    // Ends blockd (it flushes the images), then removes its sockets' directory.
    shared.blockd.lock().unwrap().take();
    drop(run_dir);
    let _ = vmm_sandbox::systemd::notify("STOPPING=1");
    // End chardevd (and reap it) only once the last output reached it.
    console::drain(&console);
    drop(supervisor);
    let (kind, detail) = match &result {
        Ok(Outcome::PowerOff) => ("powered-off", String::new()),
        Ok(Outcome::Reset) => ("guest-reset", String::new()),
        Ok(Outcome::Panic) => ("guest-panic", String::new()),
        Ok(o @ Outcome::Stopped(_)) => ("stopped", o.to_string()),
        Err(e) => ("vcpu-failed", crate::error_chain(e)),
    };
    shared.events.emit(kind, detail);
    shared.events.flush(Duration::from_millis(500));
    result
}

/// Termination signals (and SIGUSR1) are taken by one thread with sigwait; they are blocked
/// before any other thread exists, so that every thread inherits the mask.
/// The stop signals, blocked in this thread and so in every thread it starts from now on:
/// only the signal thread's sigwait takes them.
fn block_stop_signals() -> Result<SigSet, VmError> {
    let mut set = SigSet::empty();
    for s in STOP_SIGNALS {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| VmError::Thread("signal", e.into()))?;
    Ok(set)
}

fn start_signal_thread(tx: Sender<VmEvent>) -> Result<(), VmError> {
    let set = block_stop_signals()?;
    kick::install_handler().map_err(|e| VmError::Thread("signal", e))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::threads::filter_service_thread("vmm-core (the signal thread)");
            wait_for_signals(set, tx)
        })
        .map_err(|e| VmError::Thread("signal", e))?;
    Ok(())
}

const STOP_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGUSR1,
];

fn wait_for_signals(set: SigSet, tx: Sender<VmEvent>) {
    // Every signal in the set is blocked in all threads, so sigwait takes it. Each one is
    // passed on: a second SIGTERM ends a graceful stop's wait.
    while let Ok(sig) = set.wait() {
        let event = match sig {
            Signal::SIGUSR1 => VmEvent::DumpVcpus,
            sig => VmEvent::Signal(sig as i32),
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// What the API reads, at start.
fn new_shared(config: &VmConfig) -> Arc<api::Shared> {
    Arc::new(api::Shared {
        config_json: std::sync::Mutex::new(config.to_json()),
        spec_toml: std::sync::Mutex::new(config.spec_toml()),
        status: Mutex::new(api::Status {
            phase: if config.incoming.is_some() {
                api::Phase::Incoming
            } else {
                api::Phase::Here
            },
            paused: false,
            cpus: config.cpus,
            max_cpus: config.max_cpus,
            memory: config.memory,
            kernel: config.kernel.display().to_string(),
            cmdline: config.cmdline.clone(),
            boots: 0,
            vcpus: Vec::new(),
            vcpus_created: 0,
            dirty_pages: 0,
        }),
        started: std::time::Instant::now(),
        events: Default::default(),
        console: Mutex::new(None),
        console_view: std::sync::OnceLock::new(),
        console_replay: std::sync::OnceLock::new(),
        rng_replay: std::sync::OnceLock::new(),
        console_written: std::sync::OnceLock::new(),
        incoming_tls: config.incoming_tls.clone(),
        commits: std::sync::Mutex::new(Vec::new()),
        blockd: Mutex::new(None),
        migrated: std::sync::OnceLock::new(),
        migration: Default::default(),
    })
}

/// The virtio-rng device's socket and transport slot, and what chardevd needs to serve it
/// (its listening socket, made in the run directory, and the entropy source).
type RngBackend = (
    Option<(std::path::PathBuf, crate::helpers::blockd::DeviceSlot)>,
    Option<crate::helpers::chardevd::Rng>,
    Option<crate::helpers::blockd::RunDir>,
);

fn rng_backend(
    config: &VmConfig,
    run_dir: Option<crate::helpers::blockd::RunDir>,
    shared: &api::Shared,
) -> Result<RngBackend, VmError> {
    use crate::config::RngSpec;
    let spec = config.rng_spec.clone().unwrap_or_default();
    let slot = crate::helpers::blockd::DeviceSlot::default();
    match &config.rng {
        None => Ok((None, None, run_dir)),
        Some(RngSpec::Socket(p)) => Ok((Some((p.clone(), slot)), None, run_dir)),
        Some(RngSpec::Chardevd {
            file,
            egd,
            rate,
            burst,
        }) => {
            let bad = |e: std::io::Error| VmError::Rng(spec.clone(), e);
            let path = file.as_deref().unwrap_or("/dev/urandom".as_ref());
            let source: std::os::fd::OwnedFd = if *egd {
                std::os::unix::net::UnixStream::connect(path)
                    .map_err(|e| {
                        bad(std::io::Error::new(
                            e.kind(),
                            format!(
                                "cannot connect to the entropy daemon there ({e}); start it first"
                            ),
                        ))
                    })?
                    .into()
            } else {
                std::fs::File::open(path).map_err(bad)?.into()
            };
            let run_dir = match run_dir {
                Some(d) => d,
                None => crate::helpers::blockd::RunDir::new().map_err(bad)?,
            };
            let socket = run_dir
                .0
                .join(format!("{}.sock", crate::helpers::chardevd::RNG));
            let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(bad)?;
            let log = match &config.recording {
                Some(rec) => {
                    let replay = matches!(rec, crate::config::Recording::Replay(..));
                    let failed = |e: std::io::Error| {
                        VmError::Recording(format!(
                            "{} {}: {e}",
                            if replay { "--replay" } else { "--record" },
                            rec.log(crate::helpers::chardevd::RNG).display()
                        ))
                    };
                    let file = rec.open(crate::helpers::chardevd::RNG).map_err(failed)?;
                    // vmm-core keeps a copy to say where the log stands.
                    let view = file
                        .try_clone()
                        .and_then(|f| crate::control::SharedLog::new(f, replay))
                        .map_err(failed)?;
                    let _ = shared.rng_replay.set(view);
                    Some((file.into(), replay))
                }
                None => None,
            };
            let served = crate::helpers::chardevd::Rng {
                listener: listener.into(),
                source,
                egd: *egd,
                rate: *rate,
                burst: *burst,
                device: slot.clone(),
                log,
            };
            Ok((Some((socket, slot)), Some(served), Some(run_dir)))
        }
    }
}

/// Opens the disks and starts (or connects to) their blockd, whose handle goes to the API;
/// the private directory of their sockets lives as long as vmm-core.
fn start_disks(
    config: &VmConfig,
    shared: &Arc<api::Shared>,
    tx: &Sender<VmEvent>,
) -> Result<
    (
        Vec<crate::helpers::blockd::DiskBackend>,
        Option<crate::helpers::blockd::RunDir>,
    ),
    VmError,
> {
    let run_dir = if config.disks.iter().any(|d| d.path.is_some()) {
        Some(
            crate::helpers::blockd::RunDir::new()
                .map_err(crate::helpers::blockd::BlockdError::RunDir)?,
        )
    } else {
        None
    };
    let events = shared.events.clone();
    let restarted = shared.events.clone();
    let stops = tx.clone();
    let hooks = crate::helpers::blockd::Hooks {
        on_death: Box::new(move || {
            log::error!("lost blockd: the VM's disks stall until it is back; restarting it");
            events.emit("helper-died", "blockd".to_string());
        }),
        on_restart: Box::new(move |what| {
            log::warn!("{what}");
            restarted.emit("helper-restarted", "blockd".to_string());
        }),
        on_stop: Box::new(move |disk, reason| {
            let _ = stops.send(VmEvent::DiskStopped(disk, reason));
        }),
    };
    let given: Vec<_> = config
        .disks
        .iter()
        .cloned()
        .zip(config.disk_specs.iter().cloned())
        .collect();
    let (disks, blockd) = crate::helpers::blockd::start(
        &given,
        helper_source(config, &config.blockd_socket, &config.blockd),
        run_dir.as_ref(),
        crate::helpers::stderr::seccomp_reporter(shared.events.clone()),
        hooks,
        config.incoming.is_none(),
        config.recording.as_ref(),
    )?;
    *shared.blockd.lock().unwrap() = Some(blockd);
    Ok((disks, run_dir))
}

/// A destination that does not know the VM's shape yet (a live --incoming without --memory):
/// starts migrated now, and has it take the source's connection and read the stream's
/// header; returns migrated (the connection stays with it) and the source's settings.
pub fn peek_incoming(
    config: &VmConfig,
) -> Result<(Arc<crate::helpers::migrated::Migrated>, String), VmError> {
    // The threads started here must never take a stop signal (the signal thread, started
    // later, waits for them); this thread does until then: a stop while the destination
    // waits for its source ends it at once.
    let blocked = block_stop_signals()?;
    let migrated = crate::helpers::migrated::start(
        helper_source(config, &config.migrated_socket, &config.migrated),
        Arc::new(|helper: &str, call: &str| {
            log::error!("{helper} made a system call outside its seccomp allowlist, {call}, and was killed by SIGSYS");
        }),
        Box::new(|status| log::error!("lost migrated ({status}); restarting it")),
    )
    .map(Arc::new)?;
    blocked
        .thread_unblock()
        .map_err(|e| VmError::Thread("signal", e.into()))?;
    let uri = config.incoming.as_deref().expect("an incoming VM");
    log::info!(
        "{} {uri}: waiting for the source, to learn the VM's shape from it",
        config.incoming_flag
    );
    let spec = crate::migration::peek(
        &migrated,
        uri,
        &config.incoming_tls,
        config.incoming_timeout,
    )
    .map_err(|e| VmError::incoming(config.incoming_flag, uri, e))?;
    Ok((migrated, spec))
}

/// Starts migrated (or connects to it, or takes the one a peek started), and says so to the
/// API.
fn start_migrated(
    config: &VmConfig,
    shared: &Arc<api::Shared>,
    early: Option<Arc<crate::helpers::migrated::Migrated>>,
) -> Result<Arc<crate::helpers::migrated::Migrated>, VmError> {
    if let Some(m) = early {
        let _ = shared.migrated.set(m.clone());
        return Ok(m);
    }
    let events = shared.events.clone();
    let migrated = crate::helpers::migrated::start(
        helper_source(config, &config.migrated_socket, &config.migrated),
        crate::helpers::stderr::seccomp_reporter(shared.events.clone()),
        Box::new(move |status| {
            log::error!("lost migrated ({status}); a migration under way fails; restarting it");
            events.emit("helper-died", "migrated".to_string());
        }),
    )
    .map(Arc::new)?;
    let _ = shared.migrated.set(migrated.clone());
    Ok(migrated)
}

/// The main thread's own filter, once set-up is over (none with --no-sandbox).
fn filter_main_thread(config: &VmConfig) -> Result<(), VmError> {
    if !config.sandbox {
        return Ok(());
    }
    let mode = config.seccomp.parse().expect("clap checked it");
    let list = vmm_sandbox::seccomp::with_base(main_allowlist());
    vmm_sandbox::seccomp::install("vmm-core (the main thread)", &list, mode)
        .map(|_| ())
        .map_err(VmError::Seccomp)
}

/// Boots the guest, and again after each reset that should restart it.
fn run_guest(
    kvm: &Kvm,
    config: &VmConfig,
    (tx, rx): (&Sender<VmEvent>, &Receiver<VmEvent>),
    console: &ConsoleInput,
    shared: &api::Shared,
    res: &Resources,
) -> Result<Outcome, VmError> {
    // An incoming VM's resets boot with the command line it came with (unless --cmdline
    // said otherwise: then it had to be the same).
    let mut adopted: Option<VmConfig> = None;
    loop {
        let boot = {
            let mut st = shared.status.lock().unwrap();
            st.boots += 1;
            st.paused = false;
            st.boots
        };
        shared.events.emit("started", format!("boot {boot}"));
        let event = run_once(
            kvm,
            adopted.as_ref().unwrap_or(config),
            (tx, rx),
            console,
            shared,
            res,
        )?;
        let came_with = shared.status.lock().unwrap().cmdline.clone();
        if adopted.is_none() && came_with != config.cmdline {
            log::info!("the VM came with its command line; its resets boot with it: {came_with}");
            let user = came_with
                .strip_suffix(crate::config::PVM_CMDLINE)
                .map_or(came_with.as_str(), str::trim_end);
            let c = config.with_cmdline(user);
            shared.status.lock().unwrap().cmdline = c.cmdline.clone();
            adopted = Some(c);
        }
        match event {
            VmEvent::Api(ApiRequest {
                request: Request::Reboot,
                ..
            }) => {
                log::info!("reset through the management API; restarting the guest");
                shared.events.emit("reset", "through the management API");
            }
            VmEvent::Api(_) => return Ok(Outcome::Stopped(StopReason::Api)),
            VmEvent::Vcpu(VcpuEvent::Action(_, Action::Reset))
                if config.on_reset == OnReset::Restart =>
            {
                log::info!("guest requested a reset; restarting it");
                shared.events.emit("guest-reset", "restarting");
            }
            VmEvent::Vcpu(VcpuEvent::TripleFault(id, rip))
                if config.on_reset == OnReset::Restart =>
            {
                log::warn!("guest triple-faulted on vCPU {id} at RIP {rip:#x}; restarting it");
            }
            VmEvent::Vcpu(VcpuEvent::Action(_, Action::Reset)) => return Ok(Outcome::Reset),
            VmEvent::Vcpu(VcpuEvent::Action(_, Action::PowerOff)) => return Ok(Outcome::PowerOff),
            VmEvent::Vcpu(VcpuEvent::Action(_, Action::Panic)) => return Ok(Outcome::Panic),
            VmEvent::Vcpu(VcpuEvent::Action(_, Action::None))
            | VmEvent::DumpVcpus
            | VmEvent::DiskStopped(..)
            | VmEvent::Arrived(_)
            | VmEvent::PostcopyDone(_)
            | VmEvent::PostcopyPaused(_)
            | VmEvent::Disk(_)
            | VmEvent::PciEjected(_)
            | VmEvent::Hotplug(_) => {
                unreachable!("not a stop")
            }
            VmEvent::Vcpu(VcpuEvent::TripleFault(id, rip)) => {
                return Err(VmError::TripleFault(id, rip))
            }
            VmEvent::Vcpu(VcpuEvent::Failed(id, msg)) => return Err(VmError::VcpuFailed(id, msg)),
            VmEvent::Signal(sig) => return Ok(Outcome::Stopped(StopReason::Signal(sig))),
            VmEvent::Migration(_) => return Ok(Outcome::Stopped(StopReason::Migrated)),
            VmEvent::ConsoleEscape => return Ok(Outcome::Stopped(StopReason::ConsoleEscape)),
        }
    }
}

/// Builds the VM, runs it until the first event that ends it, stops every vCPU.
fn run_once(
    kvm: &Kvm,
    config: &VmConfig,
    (tx, rx): (&Sender<VmEvent>, &Receiver<VmEvent>),
    console: &ConsoleInput,
    shared: &api::Shared,
    res: &Resources,
) -> Result<VmEvent, VmError> {
    // Only the first boot is incoming: a reset boots the kernel.
    let incoming = match (&config.incoming, shared.status.lock().unwrap().boots) {
        (Some(uri), 1) => Some(uri.as_str()),
        _ => None,
    };
    // chardevd serves the rng: the device's handshake would wait for it, so it must be up
    // (and have said why not, if it cannot be).
    if matches!(config.rng, Some(crate::config::RngSpec::Chardevd { .. })) {
        let ready = console.helper_ready.lock().unwrap().take();
        if let Some(ready) = ready {
            ready.wait()?;
        }
    }
    let (guest, fds, incoming) = match Guest::build(kvm, config, (tx, rx), console, res, incoming) {
        Err(VmError::Interrupted(event)) => return Ok(event),
        built => built?,
    };
    crate::boot_times::mark("guest-built");
    // chardevd started while the VM was built; a helper that cannot serve stops the VM here,
    // before any guest code runs.
    let ready = console.helper_ready.lock().unwrap().take();
    if let Some(ready) = ready {
        ready.wait()?;
    }
    crate::boot_times::mark("chardevd-ready");
    let paused_clock = match &incoming {
        Some(inc) => arrive(&guest, inc, shared, res, tx)?,
        None => None,
    };
    let mut running = Running::new(guest, config, shared, paused_clock, res.disks);
    if let (Some(inc), Some(Ok(uffd))) = (&incoming, res.uffd) {
        if inc.postcopy {
            running.postcopy = Some(running::Postcopy {
                migrated: Arc::clone(res.migrated.expect("an incoming VM has migrated")),
                uffd,
                lazy: config.lazy,
            });
        }
    }
    start_vcpus(&mut running.guest, fds, incoming.as_ref(), shared)?;
    let event = running.run(rx);
    if running.pages_missing() {
        // A vCPU may wait for a page that only the source has (under PVM it cannot even be
        // kicked): the vCPUs are not waited for. The process's end takes them.
        log::error!(
            "the VM stops before post-copy is over; the pages still missing are at the source only, so the VM is lost"
        );
        if let VmEvent::Api(crate::control::ApiRequest { reply, .. }) = event {
            let _ = reply.send(Ok(()));
        }
        std::mem::forget(running);
        return Err(VmError::PostcopyLost);
    }
    let guest = running.stop(tx, rx);
    *console.target.lock().unwrap() = None;
    if !res.disks.lock().unwrap().is_empty() {
        log_exits(&guest);
    }
    Ok(event)
}

/// The incoming VM is here: the source hears it before it runs (so that it never runs in both
/// places: if it cannot be told, this one does not run). A VM its user had paused stays
/// paused, its clock with it.
fn arrive(
    guest: &Guest,
    inc: &build::Incoming,
    shared: &api::Shared,
    res: &Resources,
    tx: &Sender<VmEvent>,
) -> Result<Option<kvm_bindings::kvm_clock_data>, VmError> {
    let m = res.migrated.expect("an incoming VM has migrated");
    // The images are this VM's now. A source on this host let go of them when it paused for
    // the last pass; a little time is allowed for that.
    if let Some(blockd) = shared.blockd.lock().unwrap().as_ref() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = blockd.lock_images() {
            if std::time::Instant::now() >= deadline {
                let _ = crate::migration::started(m, false, crate::error_chain(&e));
                return Err(VmError::incoming(inc.flag, &inc.uri, e));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    crate::migration::started(m, true, String::new())
        .map_err(|e| VmError::incoming(inc.flag, &inc.uri, e))?;
    shared.set_phase(api::Phase::Here);
    if inc.postcopy {
        // The rest of RAM comes while the VM runs; the main loop hears when it is all here.
        *shared.migration.lock().unwrap() = crate::migration::Status {
            phase: "postcopy-active".into(),
            uri: inc.uri.clone(),
            postcopy_allowed: true,
            destination: true,
            ..Default::default()
        };
        let (m, tx) = (Arc::clone(m), tx.clone());
        std::thread::Builder::new()
            .name("postcopy".into())
            .spawn(move || {
                crate::threads::filter_service_thread("vmm-core (the post-copy thread)");
                let mut seen = 0;
                loop {
                    match crate::migration::postcopy_wait(&m, seen) {
                        crate::migration::PostcopyWait::Done(r) => {
                            let _ = tx.send(VmEvent::PostcopyDone(r));
                            return;
                        }
                        crate::migration::PostcopyWait::Paused(why, n) => {
                            seen = n;
                            if tx.send(VmEvent::PostcopyPaused(why)).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| VmError::Thread("postcopy", e))?;
    }
    if let Some(user) = &inc.restore.cmdline {
        let c = &mut shared.status.lock().unwrap().cmdline;
        if !c.starts_with(user.as_str()) {
            *c = user.clone();
        }
    }
    let mut paused_clock = None;
    if inc.restore.paused {
        // Paused on the source by its user: paused here too, until `vmmctl resume`.
        guest.state.pause.lock().unwrap().paused = true;
        shared.status.lock().unwrap().paused = true;
        paused_clock = guest.vm.get_clock().ok();
    }
    log::info!(
        "{} {}: the VM is here ({} vCPU(s)){}",
        inc.flag,
        inc.uri,
        inc.restore.vcpus.len(),
        if inc.restore.paused {
            "; paused, as it was"
        } else {
            ""
        }
    );
    shared.events.emit("incoming-done", inc.uri.clone());
    Ok(paused_clock)
}

/// Starts a thread for each boot vCPU; at the first boot, tells systemd the VM runs.
fn start_vcpus(
    guest: &mut Guest,
    fds: Vec<kvm_ioctls::VcpuFd>,
    incoming: Option<&build::Incoming>,
    shared: &api::Shared,
) -> Result<(), VmError> {
    let ids: Vec<u32> = match incoming {
        Some(inc) => inc.restore.vcpus.iter().map(|v| v.id).collect(),
        None => (0..fds.len() as u32).collect(),
    };
    for (id, fd) in ids.into_iter().zip(fds) {
        guest
            .vcpus
            .spawn(id, fd)
            .map_err(|e| VmError::Thread("vCPU", e))?;
    }
    guest.publish_vcpus(shared);
    if shared.status.lock().unwrap().boots == 1 {
        // Under systemd (Type=notify): the VM runs, with its helpers and API.
        if let Err(e) = vmm_sandbox::systemd::notify("READY=1") {
            log::warn!("cannot tell systemd the VM is ready: {e}");
        }
    }
    Ok(())
}

/// Block I/O must not exit to vmm-core: kicks are ioeventfds, completions irqfds. The log
/// says how many exits this boot had.
fn log_exits(guest: &Guest) {
    let missed: Vec<String> = guest
        .kicks_missed
        .iter()
        .map(|(name, n)| format!("{name} {}", n.load(Ordering::Relaxed)))
        .collect();
    log::info!(
        "exits handled by vmm-core this boot: {} port I/O, {} MMIO; queue kicks that reached vmm-core: {}",
        guest.bus.pio_exits.load(Ordering::Relaxed),
        guest.bus.mmio_exits.load(Ordering::Relaxed),
        missed.join(", ")
    );
}
