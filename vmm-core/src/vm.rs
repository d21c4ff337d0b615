//! Building a VM (KVM VM, memory, devices, vCPUs), running it, and stopping it when the guest
//! or the host says so.

use crate::api;
use crate::boot::{self, BootError};
use crate::config::{OnReset, VmConfig};
use crate::control::{ApiRequest, MigrationRequest, Request, VcpuEvent, VmEvent};
use crate::helpers::chardevd;
use crate::kvm::Kvm;
use crate::memory::{Memory, MemoryError};
use crate::vcpu::set::{Origin, Vcpus};
use crate::vcpu::{kick, RunState, VcpuError};
use crate::{Outcome, StopReason};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_devices::bus::{Action, IoBus};
use vmm_devices::platform::cpu_hotplug::{self, CpuHotplug, HotplugEvent};
use vmm_devices::platform::{ged, power, pvpanic, serial};
use vmm_proto::terminal;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the TSS and identity-map pages KVM needs on Intel live: just below the BIOS area at
/// the top of the 32-bit hole, away from RAM and MMIO.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

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
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Chardev(#[from] chardevd::ChardevError),
    /// A disk's image or backend (a user error: exit 2).
    #[error("{0}")]
    Disk(String),
    #[error("cannot install the main thread's seccomp filter ({0}); run with --no-sandbox to debug without it")]
    Seccomp(String),
    /// A disk's backend failed during set-up of a boot.
    #[error("{0}")]
    DiskSetup(String),
    #[error("{0}")]
    Migration(String),
    /// The incoming VM could not be taken (a user error when the stream or its source is).
    #[error("--incoming {0}: {1}")]
    Incoming(String, String),
}

impl VmError {
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

/// A vCPU change that waits for the guest.
struct CpuChange {
    /// The vCPUs the guest has yet to take (adding) or eject (removing).
    waiting: std::collections::BTreeSet<u32>,
    adding: bool,
    deadline: Instant,
    timeout_ms: u32,
    reply: futures::channel::oneshot::Sender<Result<(), String>>,
}

fn id_list(ids: &std::collections::BTreeSet<u32>) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The serial device that console input goes to (replaced when the guest restarts), and the
/// buffer its output goes to when the console is served by chardevd.
#[derive(Default)]
struct ConsoleInput {
    target: Mutex<Option<Arc<Mutex<serial::SerialDevice>>>>,
    output: std::sync::OnceLock<Arc<chardevd::ConsoleBuffer>>,
    /// chardevd's first start, waited for before the first vCPU runs.
    helper_ready: Mutex<Option<chardevd::Ready>>,
}

/// Queues input for the guest's UART, holding back while its FIFO is full.
fn feed_uart(console: &ConsoleInput, bytes: &[u8]) {
    let mut off = 0;
    let mut waits = 0;
    while off < bytes.len() {
        let target = console.target.lock().unwrap().clone();
        let Some(target) = target else {
            // The guest is being (re)built; its UART comes shortly.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        off += target.lock().unwrap().enqueue(&bytes[off..]);
        if off < bytes.len() {
            waits += 1;
            if waits > 1000 {
                log::warn!(
                    "console input: the guest is not reading; {} bytes dropped",
                    bytes.len() - off
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
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
            "the terminal's mode, restored at the end (TCGETS, TCSETS*)",
            [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF]
                .iter()
                .map(|c| vec![Cond::Eq(1, *c)])
                .collect(),
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
    disks: &'a [crate::helpers::blockd::DiskBackend],
    migrated: Option<&'a crate::helpers::migrated::Migrated>,
}

/// Runs the VM until it ends; restarts it on reset when asked to.
pub fn run(kvm: &Kvm, config: &VmConfig) -> Result<Outcome, VmError> {
    vmm_sandbox::seccomp::set_process_name("vmm-core");
    crate::threads::set_thread_filters(
        config
            .sandbox
            .then(|| config.seccomp.parse().expect("clap checked it")),
    );
    let boot_files = boot::BootFiles::open(config)?;
    // Termination signals (and SIGUSR1) are taken by one thread with sigwait; block them before any thread
    // exists so that every thread inherits the mask.
    let stop_signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];
    // SAFETY: sigset manipulation on a local set, then masking this thread's signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in stop_signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    kick::install_handler().map_err(|e| VmError::Thread("signal", e))?;

    let (tx, rx) = channel();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                crate::threads::filter_service_thread("vmm-core (the signal thread)");
                wait_for_signals(&stop_signals, tx)
            })
            .map_err(|e| VmError::Thread("signal", e))?;
    }
    let console = Arc::new(ConsoleInput::default());
    // A console on stdio (in vmm-core, or served by chardevd) takes the terminal.
    let on_stdio = matches!(
        config.serial,
        None | Some(crate::config::serial::Backend::Stdio)
    );
    let raw = if on_stdio {
        terminal::RawMode::enter()
    } else {
        None
    };
    if config.serial.is_none() {
        let (console, tx, escapes) = (console.clone(), tx.clone(), raw.is_some());
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                crate::threads::filter_service_thread("vmm-core (the console input thread)");
                console_input(console, tx, escapes)
            })
            .map_err(|e| VmError::Thread("console input", e))?;
    }
    if raw.is_some() {
        log::info!("console attached; Ctrl-A x quits");
    }
    let shared = Arc::new(api::Shared {
        status: Mutex::new(api::Status {
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
        blockd: Mutex::new(None),
        migrated: std::sync::OnceLock::new(),
        migration: Default::default(),
    });
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
    let run_dir = if config.disks.iter().any(|d| d.path.is_some()) {
        Some(crate::helpers::blockd::RunDir::new().map_err(|e| {
            VmError::Disk(format!(
                "cannot create a private directory for the disks' sockets ({e}); check $XDG_RUNTIME_DIR or $TMPDIR"
            ))
        })?)
    } else {
        None
    };
    let (disks, blockd) = crate::helpers::blockd::start(
        &config.disks,
        helper_source(config, &config.blockd_socket, &config.blockd),
        run_dir.as_ref(),
        crate::helpers::stderr::seccomp_reporter(shared.events.clone()),
        crate::helpers::blockd::Hooks {
            on_death: {
                let shared = shared.clone();
                Box::new(move || {
                    log::error!(
                        "lost blockd: the VM's disks stall until it is back; restarting it"
                    );
                    shared.events.emit("helper-died", "blockd".to_string());
                })
            },
            on_restart: {
                let shared = shared.clone();
                Box::new(move |what| {
                    log::warn!("{what}");
                    shared.events.emit("helper-restarted", "blockd".to_string());
                })
            },
            on_stop: {
                let tx = tx.clone();
                Box::new(move |disk, reason| {
                    let _ = tx.send(VmEvent::DiskStopped(disk, reason));
                })
            },
        },
    )
    .map_err(VmError::Disk)?;
    *shared.blockd.lock().unwrap() = Some(blockd);

    let mut supervisor = None;
    if let Some(backend) = &config.serial {
        let buffer = Arc::new(chardevd::ConsoleBuffer::new(chardevd::BUFFER_BYTES));
        let _ = console.output.set(buffer.clone());
        // Input from chardevd is queued for a thread of its own: feeding the UART may have to
        // wait (for the guest to read, or for the VM to exist), and the supervisor must not.
        // Input from the terminal (stdio) has the escape keys; from viewers attached through
        // the API (their own escape is in vmmctl) and other backends it goes as it is.
        let (in_tx, in_rx) = std::sync::mpsc::channel::<(Vec<u8>, bool)>();
        let input_to = console.clone();
        let escapes = raw.is_some();
        let quit = tx.clone();
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                crate::threads::filter_service_thread("vmm-core (the console input thread)");
                let mut filter = EscapeFilter::default();
                for (bytes, from_terminal) in in_rx {
                    let (bytes, escape) = if escapes && from_terminal {
                        filter.feed(&bytes)
                    } else {
                        (bytes, false)
                    };
                    feed_uart(&input_to, &bytes);
                    if escape {
                        let _ = quit.send(VmEvent::ConsoleEscape);
                    }
                }
            })
            .map_err(|e| VmError::Thread("console input", e))?;
        let attached_tx = in_tx.clone();
        let input: chardevd::InputFn = Arc::new(move |bytes: &[u8]| {
            let _ = in_tx.send((bytes.to_vec(), true));
        });
        let attached: chardevd::InputFn = Arc::new(move |bytes: &[u8]| {
            let _ = attached_tx.send((bytes.to_vec(), false));
        });
        let _ = shared.console_view.set((buffer.clone(), attached));
        let (started, ready) = chardevd::start(
            helper_source(config, &config.chardevd_socket, &config.chardevd),
            backend.clone(),
            buffer,
            input,
            shared.events.clone(),
        )?;
        supervisor = Some(started);
        *console.helper_ready.lock().unwrap() = Some(ready);
        *shared.console.lock().unwrap() = supervisor.as_ref().map(|s| s.control.clone());
    }

    // migrated: started now, as the main thread's filter forbids new processes later.
    let migrated = crate::helpers::migrated::start(
        helper_source(config, &config.migrated_socket, &config.migrated),
        crate::helpers::stderr::seccomp_reporter(shared.events.clone()),
        {
            let shared = shared.clone();
            Box::new(move |status| {
                log::error!("lost migrated ({status}); a migration under way fails; restarting it");
                shared.events.emit("helper-died", "migrated".to_string());
            })
        },
    )
    .map(Arc::new)
    .map_err(VmError::Migration)?;
    let _ = shared.migrated.set(migrated.clone());

    // Set-up is over: the helpers run, the API serves, the boot files are open. From here the
    // main thread builds the guest (again at each reset), waits for its events and, at the end,
    // stops the helpers, under a filter of its own; the vCPU threads it starts inherit it and
    // add theirs.
    // A filter that cannot be installed ends the VM before the guest runs, through the same
    // clean-up as any other end.
    let filtered = match config.sandbox {
        true => {
            let mode = config.seccomp.parse().expect("clap checked it");
            let list = vmm_sandbox::seccomp::with_base(main_allowlist());
            vmm_sandbox::seccomp::install("vmm-core (the main thread)", &list, mode)
                .map(|_| ())
                .map_err(VmError::Seccomp)
        }
        false => Ok(()),
    };
    let res = Resources {
        boot: &boot_files,
        disks: &disks,
        migrated: Some(&migrated),
    };
    let result = filtered.and_then(|()| run_guest(kvm, config, &tx, &rx, &console, &shared, &res));
    migrated.end();
    drop(disks);
    // Ends blockd (it flushes the images), then removes its sockets' directory.
    shared.blockd.lock().unwrap().take();
    drop(run_dir);
    let _ = vmm_sandbox::systemd::notify("STOPPING=1");
    if let Some(buffer) = console.output.get() {
        // Let the last output reach the backend before the VMM exits.
        buffer.wait_drained(Duration::from_secs(2));
        let dropped = buffer.dropped();
        if dropped > 0 {
            log::warn!("console: {dropped} bytes of guest output were dropped while chardevd could not take them");
        }
    }
    // End chardevd (and reap it) only once the last output reached it.
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

/// Boots the guest, and again after each reset that should restart it.
fn run_guest(
    kvm: &Kvm,
    config: &VmConfig,
    tx: &Sender<VmEvent>,
    rx: &Receiver<VmEvent>,
    console: &ConsoleInput,
    shared: &api::Shared,
    res: &Resources,
) -> Result<Outcome, VmError> {
    loop {
        let boot = {
            let mut st = shared.status.lock().unwrap();
            st.boots += 1;
            st.paused = false;
            st.boots
        };
        shared.events.emit("started", format!("boot {boot}"));
        match run_once(kvm, config, tx, rx, console, shared, res)? {
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

fn wait_for_signals(signals: &[libc::c_int], tx: Sender<VmEvent>) {
    // SAFETY: a local sigset that sigwait reads.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    };
    loop {
        let mut sig = 0;
        // SAFETY: set is initialised and every signal in it is blocked in all threads.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let event = if sig == libc::SIGUSR1 {
            VmEvent::DumpVcpus
        } else {
            VmEvent::Signal(sig)
        };
        let last = !matches!(event, VmEvent::DumpVcpus);
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

/// The terminal's escape keys: Ctrl-A x quits, Ctrl-A Ctrl-A sends a literal Ctrl-A, and
/// Ctrl-A followed by anything else sends nothing.
#[derive(Default)]
struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// The bytes for the guest, and whether Ctrl-A x was typed (what follows it is dropped).
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut bytes = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return (bytes, true),
                    0x01 => bytes.push(0x01),
                    _ => {}
                }
            } else if b == 0x01 {
                self.pending = true;
            } else {
                bytes.push(b);
            }
        }
        (bytes, false)
    }
}

/// Feeds stdin to the guest's UART (--serial direct). With a terminal, the escape keys work
/// (see EscapeFilter). A full FIFO holds input back rather than dropping it.
fn console_input(console: Arc<ConsoleInput>, tx: Sender<VmEvent>, escapes: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    let mut filter = EscapeFilter::default();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (bytes, escape) = if escapes {
            filter.feed(&buf[..n])
        } else {
            (buf[..n].to_vec(), false)
        };
        feed_uart(&console, &bytes);
        if escape {
            let _ = tx.send(VmEvent::ConsoleEscape);
            return;
        }
    }
}

/// Builds the VM, runs it until the first event that ends it, stops every vCPU.
fn run_once(
    kvm: &Kvm,
    config: &VmConfig,
    tx: &Sender<VmEvent>,
    rx: &Receiver<VmEvent>,
    console: &ConsoleInput,
    shared: &api::Shared,
    res: &Resources,
) -> Result<VmEvent, VmError> {
    let disks = res.disks;
    // Memory is created before the VM so that it is dropped after it.
    let memory = Memory::new(config.memory)?;
    let vm = Arc::new(kvm.fd.create_vm().map_err(VmError::CreateVm)?);
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| VmError::Setup("the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Setup("the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Setup("the in-kernel PIT", e))?;
    memory.register(&vm)?;

    // A VM coming in (a migration or a snapshot) brings its RAM and state; one that boots
    // gets the kernel. Only the first boot is incoming: a reset boots the kernel.
    let incoming = match (&config.incoming, shared.status.lock().unwrap().boots) {
        (Some(uri), 1) => Some(uri.clone()),
        _ => None,
    };
    let entry = match &incoming {
        None => {
            let entry = boot::load(&memory.guest, config, res.boot)?;
            log::debug!("guest entry: {entry:?}");
            Some(entry)
        }
        Some(_) => None,
    };

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(|e| VmError::Setup("the serial interrupt", e))?;
    let serial_out = || -> Box<dyn std::io::Write + Send> {
        match console.output.get() {
            Some(buffer) => Box::new(chardevd::BufferWriter(buffer.clone())),
            None => Box::new(serial::RawStdout),
        }
    };
    let serial_irq_restore = serial_irq.try_clone().map_err(VmError::EventFd)?;
    let uart = Arc::new(Mutex::new(serial::SerialDevice::new(
        serial_irq,
        serial_out(),
    )));
    *console.target.lock().unwrap() = Some(uart.clone());

    let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&ged_irq, ged::GSI)
        .map_err(|e| VmError::Setup("the GED interrupt", e))?;
    let ged = Arc::new(Mutex::new(ged::Ged::new(ged_irq)));
    let hotplug = Arc::new(Mutex::new(CpuHotplug::new(config.cpus, config.max_cpus, {
        let tx = tx.clone();
        Box::new(move |e| {
            let _ = tx.send(VmEvent::Hotplug(e));
        })
    })));

    // The PCI bus and its devices: a virtio-blk device per disk, served over vhost-user.
    let routing = Arc::new(vmm_devices::pci::msix::Routing::new(vm.clone()));
    let mut pci = vmm_devices::pci::PciBus::default();
    let mut kicks_missed = Vec::new();
    let mut transports = Vec::new();
    for d in disks {
        let memfd = memory.memfd.try_clone().map_err(VmError::EventFd)?;
        let dev = vmm_devices::virtio::vhost_user_blk::VhostUserBlk::connect(
            &d.name,
            &d.socket,
            d.queues,
            memory.guest.clone(),
            memfd,
        )
        .map_err(|e| VmError::DiskSetup(format!("{}: {e}", d.name)))?;
        let transport = vmm_devices::virtio::pci::VirtioPci::new(Box::new(dev), routing.clone())
            .map_err(VmError::EventFd)?;
        kicks_missed.push((d.name.clone(), transport.notify_exits.clone()));
        let transport = Arc::new(Mutex::new(transport));
        *d.device.lock().unwrap() = Some(Arc::downgrade(&transport));
        let slot = pci.add(transport.clone()).ok_or_else(|| {
            VmError::DiskSetup(format!("{}: no free PCI slot or BAR space", d.name))
        })?;
        transports.push((slot, transport));
        log::debug!("{}: virtio-blk at PCI 00:{slot:02x}.0", d.name);
    }
    let pci = Arc::new(pci);

    let mut bus = IoBus::default();
    bus.mmio = Some(pci.clone());
    bus.insert(
        vmm_devices::pci::CONFIG_ADDRESS_PORT,
        8,
        Arc::new(Mutex::new(vmm_devices::pci::Type1(pci.clone()))),
    );
    bus.insert(ged::PORT, 1, ged.clone());
    bus.insert(cpu_hotplug::PORT, cpu_hotplug::LEN, hotplug.clone());
    bus.insert(serial::COM1_BASE, 8, uart.clone());
    bus.insert(
        power::SLEEP_CONTROL_PORT,
        power::PORTS,
        Arc::new(Mutex::new(power::PowerDevice)),
    );
    bus.insert(
        power::I8042_COMMAND_PORT,
        1,
        Arc::new(Mutex::new(power::I8042)),
    );
    bus.insert(pvpanic::PORT, 1, Arc::new(Mutex::new(pvpanic::PvPanic)));
    let bus = Arc::new(bus);

    let base_cpuid = kvm
        .fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Setup("CPUID", e))?;
    let state = Arc::new(RunState::default());
    let mut vcpus = Vcpus::new(crate::vcpu::set::Common {
        bus: bus.clone(),
        mem: memory.guest.clone(),
        state: state.clone(),
        events: tx.clone(),
        pvm: config.pvm,
        print_boot_times: config.print_boot_times,
        max: config.max_cpus,
        base_cpuid,
        seccomp: config
            .sandbox
            .then(|| config.seccomp.parse().expect("clap checked it")),
    });
    let devices = crate::snapshot::Devices {
        vm: &vm,
        uart: &uart,
        ged: &ged,
        hotplug: &hotplug,
        pci: &transports,
    };
    let restore = match &incoming {
        Some(uri) => Some(take_incoming(
            uri,
            config,
            &memory,
            &devices,
            res,
            serial_irq_restore,
            serial_out(),
        )?),
        None => None,
    };
    // Every boot vCPU exists before any runs: the boot vCPU starts the others by IPI.
    let mut fds = Vec::new();
    match &restore {
        None => {
            for id in 0..config.cpus {
                fds.push(
                    vcpus
                        .prepare(&vm, id, if id == 0 { entry } else { None })?
                        .0,
                );
            }
        }
        Some(r) => {
            for v in &r.vcpus {
                let (fd, _) = vcpus.prepare(&vm, v.id, None)?;
                if let Err(e) = v.restore(&fd) {
                    let e = crate::error_chain(&e);
                    let m = res.migrated.expect("an incoming VM has migrated");
                    let _ = crate::migration::started(m, false, e.clone());
                    return Err(VmError::Incoming(incoming.clone().unwrap_or_default(), e));
                }
                fds.push(fd);
            }
        }
    }
    if state.msrs.get().is_none() {
        let msrs = crate::vcpu::state::saveable_msrs(&kvm.fd, &fds[0])?;
        let _ = state.msrs.set(msrs);
    }
    // chardevd started while the VM was built; a helper that cannot serve stops the VM here,
    // before any guest code runs.
    let ready = console.helper_ready.lock().unwrap().take();
    if let Some(ready) = ready {
        ready.wait()?;
    }
    let ids: Vec<u32> = match &restore {
        Some(r) => r.vcpus.iter().map(|v| v.id).collect(),
        None => (0..config.cpus).collect(),
    };
    let mut paused_clock = None;
    if let Some(r) = &restore {
        let m = res.migrated.expect("an incoming VM has migrated");
        // The source must hear that the VM runs here before it does, so that it never runs
        // in both places: if it cannot be told, this one does not run.
        crate::migration::started(m, true, String::new())
            .map_err(|e| VmError::Incoming(incoming.clone().unwrap_or_default(), e))?;
        if r.paused {
            // Paused on the source by its user: paused here too, until `vmmctl resume`.
            state.pause.lock().unwrap().paused = true;
            shared.status.lock().unwrap().paused = true;
            paused_clock = vm.get_clock().ok();
        }
        log::info!(
            "--incoming {}: the VM is here ({} vCPU(s)){}",
            incoming.as_deref().unwrap_or(""),
            ids.len(),
            if r.paused { "; paused, as it was" } else { "" }
        );
        shared
            .events
            .emit("incoming-done", incoming.clone().unwrap_or_default());
    }
    for (id, fd) in ids.into_iter().zip(fds) {
        vcpus
            .spawn(id, fd)
            .map_err(|e| VmError::Thread("vCPU", e))?;
    }
    publish_vcpus(&vcpus, shared);
    if shared.status.lock().unwrap().boots == 1 {
        // Under systemd (Type=notify): the VM runs, with its helpers and API.
        if let Err(e) = vmm_sandbox::systemd::notify("READY=1") {
            log::warn!("cannot tell systemd the VM is ready: {e}");
        }
    }

    // Stops every vCPU, and guest time too, as QEMU does: a guest should not see the pause as
    // time that passed (or it reports soft lockups).
    let pause = |paused_clock: &mut Option<kvm_bindings::kvm_clock_data>, vcpus: &Vcpus| {
        kick::pause(&state, &vcpus.handles());
        if paused_clock.is_none() {
            match vm.get_clock() {
                Ok(clock) => *paused_clock = Some(clock),
                Err(e) => log::warn!("cannot read kvmclock at pause: {e}"),
            }
        }
        shared.status.lock().unwrap().paused = true;
    };
    let mut change: Option<CpuChange> = None;
    // Whether a migration paused the VM (and a failed one resumes it), and whether KVM's
    // dirty log is on for it.
    let mut migration_paused = false;
    let mut dirty_logging = false;
    let mut backend_log: Option<vmm_devices::dirty_log::SharedDirtyLog> = None;
    let event = loop {
        let next = match &change {
            Some(c) => rx.recv_timeout(c.deadline.saturating_duration_since(Instant::now())),
            None => rx
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        let next = match next {
            Ok(e) => e,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let c = change.take().expect("a deadline comes from a change");
                let msg = if c.adding {
                    format!(
                        "vCPU {}: the guest did not take it within {} ms; it stays present for the guest to start later",
                        id_list(&c.waiting),
                        c.timeout_ms
                    )
                } else {
                    let mut hp = hotplug.lock().unwrap();
                    for id in &c.waiting {
                        let slot = &mut hp.slots[*id as usize];
                        slot.removing = false;
                        slot.eject_wanted = false;
                    }
                    format!(
                        "vCPU {}: the guest did not eject it within {} ms, so it keeps running (is the CPU offline in the guest, and does it support CPU hot-remove?)",
                        id_list(&c.waiting),
                        c.timeout_ms
                    )
                };
                log::warn!("{msg}");
                shared.events.emit("cpu-change-failed", msg.clone());
                let _ = c.reply.send(Err(msg));
                continue;
            }
            Err(_) => panic!("the signal thread holds a sender for the life of the process"),
        };
        match next {
            VmEvent::DiskStopped(disk, reason) => {
                // As QEMU's werror/rerror=stop: the VM pauses until someone resumes it.
                pause(&mut paused_clock, &vcpus);
                log::error!(
                    "{disk}: {reason}; the VM is paused (its error policy is stop); fix the cause, then `vmmctl resume` retries the request"
                );
                shared
                    .events
                    .emit("disk-stopped", format!("{disk}: {reason}"));
                shared
                    .events
                    .emit("paused", format!("{disk} stopped on an I/O error"));
            }
            VmEvent::Migration(req) => {
                use MigrationRequest as M;
                let chain = |e: MemoryError| crate::error_chain(&e);
                match req {
                    M::Memfd(reply) => {
                        let _ = reply.send(
                            memory
                                .memfd
                                .try_clone()
                                .map_err(|e| format!("cannot hand guest RAM to migrated ({e})")),
                        );
                    }
                    M::DirtyLog(on, reply) => {
                        let r = memory.log_dirty(&vm, on).and_then(|()| {
                            if on {
                                memory.take_dirty_bitmap(&vm).map(|_| ())
                            } else {
                                Ok(())
                            }
                        });
                        dirty_logging = on && r.is_ok();
                        // The vhost-user backends log their own writes into a shared
                        // bitmap (LOG_SHMFD); a backend that cannot makes the last pass
                        // resend everything (see Save).
                        backend_log = match dirty_logging {
                            true => vmm_devices::dirty_log::SharedDirtyLog::new(memory.size)
                                .map_err(|e| log::warn!("cannot make the vhost-user dirty log ({e}); a migration resends all of RAM at the end"))
                                .ok(),
                            false => None,
                        };
                        for (_, t) in &transports {
                            t.lock()
                                .unwrap()
                                .device_mut()
                                .set_dirty_log(backend_log.as_ref());
                        }
                        let _ = reply.send(r.map_err(chain));
                    }
                    M::TakeDirty(reply) => {
                        let r = memory.take_dirty_bitmap(&vm).map(|mut b| {
                            if let Some(l) = &backend_log {
                                l.take_into(&mut b);
                            }
                            b
                        });
                        let _ = reply.send(r.map_err(chain));
                    }
                    M::Save(reply) => {
                        let was_paused = shared.status.lock().unwrap().paused;
                        if !was_paused {
                            pause(&mut paused_clock, &vcpus);
                            migration_paused = true;
                        }
                        let r = save_vm(&state, &vcpus, &devices, paused_clock, config, was_paused)
                            .and_then(|st| {
                                let mut dirty = match dirty_logging {
                                    true => Some(memory.take_dirty_bitmap(&vm).map_err(chain)?),
                                    false => None,
                                };
                                let mut unlogged_writers = false;
                                for (_, t) in &transports {
                                    let t = t.lock().unwrap();
                                    if !t.is_active() {
                                        continue;
                                    }
                                    let dev = t.device();
                                    unlogged_writers |= !dev.logs_dirty();
                                    // The used rings the backend wrote go whatever the logs
                                    // say (a backend logs only what it writes for requests).
                                    if let Some(b) = dirty.as_mut() {
                                        for (gpa, len) in dev.used_rings() {
                                            vmm_devices::dirty_log::mark_gpa(
                                                b,
                                                memory.size,
                                                gpa,
                                                len,
                                            );
                                        }
                                    }
                                }
                                if let (Some(b), Some(l)) = (dirty.as_mut(), &backend_log) {
                                    l.take_into(b);
                                }
                                Ok(crate::control::Saved {
                                    state: st,
                                    dirty,
                                    unlogged_writers,
                                })
                            });
                        let _ = reply.send(r);
                    }
                    M::Continue(reply) => {
                        resume_queues(&transports);
                        if std::mem::take(&mut migration_paused) {
                            if let Some(mut clock) = paused_clock.take() {
                                clock.flags = 0;
                                if let Err(e) = vm.set_clock(&clock) {
                                    log::warn!("cannot restore kvmclock at resume: {e}");
                                }
                            }
                            kick::resume(&state);
                            shared.status.lock().unwrap().paused = false;
                        }
                        let _ = reply.send(Ok(()));
                    }
                    M::Leave => break VmEvent::Migration(M::Leave),
                }
            }
            VmEvent::DumpVcpus => {
                state.dump_generation.fetch_add(1, Ordering::AcqRel);
                kick::kick_all(&vcpus.handles());
            }
            VmEvent::Hotplug(event) => {
                let id = match event {
                    HotplugEvent::InsertSeen(id) => {
                        log::info!("vCPU {id}: the guest took it");
                        shared.events.emit("cpu-added", format!("vCPU {id}"));
                        id
                    }
                    HotplugEvent::Ejected(id) => {
                        vcpus.park(id);
                        log::info!("vCPU {id}: the guest ejected it; its KVM fd is parked");
                        shared.events.emit("cpu-removed", format!("vCPU {id}"));
                        publish_vcpus(&vcpus, shared);
                        id
                    }
                };
                if let Some(c) = &mut change {
                    c.waiting.remove(&id);
                    if c.waiting.is_empty() {
                        let _ = change.take().expect("checked").reply.send(Ok(()));
                    }
                }
            }
            VmEvent::Api(req) => match req.request {
                Request::SetCpus { count, timeout_ms } => {
                    let reply = req.reply;
                    if change.is_some() {
                        let _ = reply.send(Err(
                            "another vCPU change is still waiting for the guest; try again when it is done".into(),
                        ));
                        continue;
                    }
                    match start_cpu_change(&vm, &mut vcpus, &hotplug, &ged, count, config) {
                        Err(msg) => {
                            let _ = reply.send(Err(msg));
                        }
                        Ok((waiting, _)) if waiting.is_empty() => {
                            let _ = reply.send(Ok(()));
                        }
                        Ok((waiting, adding)) => {
                            change = Some(CpuChange {
                                waiting,
                                adding,
                                deadline: Instant::now() + Duration::from_millis(timeout_ms.into()),
                                timeout_ms,
                                reply,
                            });
                        }
                    }
                    publish_vcpus(&vcpus, shared);
                }
                Request::DirtyLog { on } => {
                    let r = if on {
                        memory
                            .log_dirty(&vm, true)
                            .and_then(|()| memory.take_dirty(&vm).map(|_| ()))
                    } else {
                        memory.take_dirty(&vm).and_then(|pages| {
                            shared.status.lock().unwrap().dirty_pages = pages;
                            memory.log_dirty(&vm, false)
                        })
                    };
                    let _ = req.reply.send(r.map_err(|e| crate::error_chain(&e)));
                }
                Request::Pause => {
                    pause(&mut paused_clock, &vcpus);
                    log::info!("paused through the management API");
                    shared.events.emit("paused", "");
                    let _ = req.reply.send(Ok(()));
                }
                Request::Resume => {
                    if let Some(mut clock) = paused_clock.take() {
                        clock.flags = 0;
                        if let Err(e) = vm.set_clock(&clock) {
                            log::warn!("cannot restore kvmclock at resume: {e}");
                        }
                    }
                    resume_queues(&transports);
                    migration_paused = false;
                    kick::resume(&state);
                    shared.status.lock().unwrap().paused = false;
                    // Disks that stopped on an I/O error retry what they hold.
                    let retried = match shared.blockd.lock().unwrap().as_ref() {
                        Some(b) => b.resume(),
                        None => Ok(0),
                    };
                    match retried {
                        Ok(0) => {}
                        Ok(n) => log::info!("disks: retrying {n} request(s) that stopped the VM"),
                        Err(e) => log::warn!("disks: cannot have blockd retry: {e}"),
                    }
                    log::info!("resumed through the management API");
                    shared.events.emit("resumed", "");
                    let _ = req.reply.send(Ok(()));
                }
                Request::Shutdown { force: false } => {
                    let pressed = ged.lock().unwrap().notify(ged::EVENT_POWER_BUTTON);
                    log::info!("pressed the ACPI power button through the management API");
                    shared
                        .events
                        .emit("power-button", "pressed through the management API");
                    let _ = req
                        .reply
                        .send(pressed.map_err(|e| format!("cannot interrupt the guest: {e}")));
                }
                Request::Shutdown { force: true } | Request::Reboot => {
                    let request = req.request;
                    let _ = req.reply.send(Ok(()));
                    let (reply, _) = futures::channel::oneshot::channel();
                    break VmEvent::Api(ApiRequest { request, reply });
                }
            },
            event => break event,
        }
    };
    kick::stop_all(
        &state,
        vcpus.running.into_values().map(|t| t.handle).collect(),
    );
    // Later events from vCPUs that were stopping anyway are reported, not acted on. Requests
    // from people (API calls, signals, the console escape) carry over: if the guest boots
    // again they apply to it; if the VMM ends, the API caller hears that it stopped.
    let mut carried = Vec::new();
    while let Ok(other) = rx.try_recv() {
        match other {
            VmEvent::Vcpu(VcpuEvent::Failed(id, msg)) => {
                log::warn!("vCPU {id} while stopping: {msg}")
            }
            // The next boot has its own vCPUs.
            VmEvent::Vcpu(_) | VmEvent::Hotplug(_) => {}
            other => carried.push(other),
        }
    }
    for e in carried {
        let _ = tx.send(e);
    }
    *console.target.lock().unwrap() = None;
    if !disks.is_empty() {
        // Block I/O must not exit to vmm-core: kicks are ioeventfds, completions irqfds.
        let missed: Vec<String> = kicks_missed
            .iter()
            .map(|(name, n)| format!("{name} {}", n.load(Ordering::Relaxed)))
            .collect();
        log::info!(
            "exits handled by vmm-core this boot: {} port I/O, {} MMIO; queue kicks that reached vmm-core: {}",
            bus.pio_exits.load(Ordering::Relaxed),
            bus.mmio_exits.load(Ordering::Relaxed),
            missed.join(", ")
        );
    }
    Ok(event)
}

/// Starts the virtio queues a snapshot or migration stopped.
fn resume_queues(transports: &[(u8, Arc<Mutex<vmm_devices::virtio::pci::VirtioPci>>)]) {
    for (slot, t) in transports {
        if let Err(e) = t.lock().unwrap().resume_queues() {
            log::error!("PCI 00:{slot:02x}.0: cannot start its queues again: {e}");
        }
    }
}

/// Saves the paused VM: each vCPU saves its own state on its thread, then the devices.
fn save_vm(
    state: &RunState,
    vcpus: &Vcpus,
    devices: &crate::snapshot::Devices,
    clock: Option<kvm_bindings::kvm_clock_data>,
    config: &VmConfig,
    paused: bool,
) -> Result<Vec<u8>, String> {
    let ids: Vec<u32> = vcpus
        .running
        .iter()
        .filter(|(_, t)| !t.handle.is_finished())
        .map(|(id, _)| *id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut p = state.pause.lock().unwrap();
    p.saved.clear();
    p.save_generation += 1;
    state.pause_changed.notify_all();
    while ids.iter().any(|id| !p.saved.contains_key(id)) {
        if Instant::now() > deadline {
            return Err("the vCPUs did not save their state within 10 s".into());
        }
        p = state
            .pause_changed
            .wait_timeout(p, Duration::from_millis(10))
            .unwrap()
            .0;
    }
    let mut saved = std::mem::take(&mut p.saved);
    drop(p);
    let vcpus = ids
        .iter()
        .map(|id| saved.remove(id).expect("checked above"))
        .collect::<Result<Vec<_>, String>>()?;
    crate::snapshot::save(
        devices,
        &crate::snapshot::Taken {
            vcpus,
            clock,
            memory: config.memory,
            max_cpus: config.max_cpus,
            paused,
        },
    )
}

/// Takes an incoming VM (its RAM straight into the memfd, through migrated) and puts its
/// state into the devices; the vCPUs' state comes back to be put on their fds.
fn take_incoming(
    uri: &str,
    config: &VmConfig,
    memory: &Memory,
    devices: &crate::snapshot::Devices,
    res: &Resources,
    serial_irq: EventFd,
    serial_out: Box<dyn std::io::Write + Send>,
) -> Result<crate::snapshot::Restore, VmError> {
    let m = res
        .migrated
        .ok_or_else(|| VmError::Incoming(uri.into(), "migrated is not running".into()))?;
    let memfd = memory.memfd.try_clone().map_err(VmError::EventFd)?;
    log::info!("--incoming {uri}: waiting for the VM");
    let start = Instant::now();
    let (bytes, n) = crate::migration::receive(
        m,
        uri,
        &config.incoming_tls,
        memfd,
        config.memory,
        config.max_cpus,
    )
    // The error names the channel already; "--incoming URI: " goes in front of the rest.
    .map_err(|e| {
        let why = e.strip_prefix(&format!("{uri}: ")).unwrap_or(&e);
        VmError::Incoming(uri.into(), why.to_string())
    })?;
    log::info!(
        "--incoming {uri}: {} MiB received in {} ms, every check passed",
        n >> 20,
        start.elapsed().as_millis()
    );
    let restored =
        crate::snapshot::Restore::read(&bytes, config.memory, config.max_cpus).and_then(|r| {
            r.apply(devices, |s| {
                serial::SerialDevice::restored(serial_irq, serial_out, s)
            })?;
            Ok(r)
        });
    match restored {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = crate::migration::started(m, false, e.clone());
            Err(VmError::Incoming(uri.into(), e))
        }
    }
}

/// Makes what `info` and `cpus` report match the vCPUs.
fn publish_vcpus(vcpus: &Vcpus, shared: &api::Shared) {
    let mut st = shared.status.lock().unwrap();
    st.vcpus = vcpus.status();
    st.vcpus_created = vcpus.created;
    st.cpus = vcpus.running.len() as u32;
}

/// Starts hot-adding or hot-removing vCPUs until `count` are online: returns the ids the guest
/// must now take or eject, and whether they are being added; or why the change is refused.
fn start_cpu_change(
    vm: &kvm_ioctls::VmFd,
    vcpus: &mut Vcpus,
    hotplug: &Mutex<CpuHotplug>,
    ged: &Mutex<ged::Ged>,
    count: u32,
    config: &VmConfig,
) -> Result<(std::collections::BTreeSet<u32>, bool), String> {
    let max = config.max_cpus;
    if count == 0 {
        return Err("cannot remove vCPU 0, the boot CPU: at least 1 vCPU stays online".into());
    }
    if count > max {
        return Err(format!(
            "cannot have {count} vCPUs: this VM's maximum is {max} (start it with --cpus N,max=M to allow more)"
        ));
    }
    let online = vcpus.running.len() as u32;
    let mut ids = std::collections::BTreeSet::new();
    if count > online {
        let absent: Vec<u32> = (0..max)
            .filter(|id| !vcpus.running.contains_key(id))
            .take((count - online) as usize)
            .collect();
        for id in absent {
            let (fd, origin) = vcpus
                .prepare(vm, id, None)
                .map_err(|e| crate::error_chain(&e))?;
            vcpus
                .spawn(id, fd)
                .map_err(|e| format!("vCPU {id}: cannot start its thread: {e}"))?;
            match origin {
                Origin::Created => log::info!("vCPU {id}: created; asking the guest to take it"),
                Origin::Reused(n) => log::info!(
                    "vCPU {id}: its parked KVM fd reused (time {n}); asking the guest to take it"
                ),
            }
            let mut hp = hotplug.lock().unwrap();
            let slot = &mut hp.slots[id as usize];
            slot.enabled = true;
            slot.inserting = true;
            ids.insert(id);
        }
    } else if count < online {
        let going: Vec<u32> = vcpus
            .running
            .keys()
            .rev()
            .copied()
            .filter(|&id| id != 0)
            .take((online - count) as usize)
            .collect();
        let mut hp = hotplug.lock().unwrap();
        for id in going {
            log::info!("vCPU {id}: asking the guest to eject it");
            let slot = &mut hp.slots[id as usize];
            slot.removing = true;
            slot.eject_wanted = true;
            ids.insert(id);
        }
    }
    if !ids.is_empty() {
        ged.lock()
            .unwrap()
            .notify(ged::EVENT_CPU_HOTPLUG)
            .map_err(|e| format!("cannot interrupt the guest: {e}"))?;
    }
    Ok((ids, count > online))
}

#[cfg(test)]
mod tests {
    use super::EscapeFilter;

    #[test]
    fn escape_keys() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ab"), (b"ab".to_vec(), false));
        // Ctrl-A Ctrl-A is a literal Ctrl-A, across calls too.
        assert_eq!(f.feed(b"c\x01"), (b"c".to_vec(), false));
        assert_eq!(f.feed(b"\x01d"), (b"\x01d".to_vec(), false));
        // Ctrl-A and another key send nothing.
        assert_eq!(f.feed(b"\x01qe"), (b"e".to_vec(), false));
        assert_eq!(f.feed(b"f\x01xg"), (b"f".to_vec(), true));
    }
}
