//! Building a VM (KVM VM, memory, devices, vCPUs), running it, and stopping it when the guest
//! or the host says so.

use crate::api::{self, ApiRequest, Request};
use crate::boot::{self, BootError};
use crate::chardev;
use crate::config::{OnReset, VmConfig};
use crate::devices::{ged, power, pvpanic, serial, Action, IoBus};
use crate::kvm::Kvm;
use crate::memory::{Memory, MemoryError};
use crate::vcpu::{self, RunState, VcpuContext, VcpuError, VcpuEvent};
use crate::{Outcome, StopReason};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use std::io::Read;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
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
    Chardev(#[from] chardev::ChardevError),
}

impl VmError {
    pub fn is_user_error(&self) -> bool {
        matches!(self, VmError::Boot(e) if e.is_user_error())
            || matches!(self, VmError::Api(_))
            || matches!(
                self,
                VmError::Chardev(
                    chardev::ChardevError::Spawn(..)
                        | chardev::ChardevError::Connect(..)
                        | chardev::ChardevError::Backend(_)
                )
            )
    }
}

/// Everything that can end a run.
#[derive(Debug)]
pub enum VmEvent {
    Vcpu(VcpuEvent),
    Signal(i32),
    ConsoleEscape,
    /// SIGUSR1: log every vCPU's registers and go on.
    DumpVcpus,
    /// A management API request.
    Api(ApiRequest),
}

/// The serial device that console input goes to (replaced when the guest restarts), and the
/// buffer its output goes to when the console is served by chardevd.
#[derive(Default)]
struct ConsoleInput {
    target: Mutex<Option<Arc<Mutex<serial::SerialDevice>>>>,
    output: std::sync::OnceLock<Arc<chardev::ConsoleBuffer>>,
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

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Runs the VM until it ends; restarts it on reset when asked to.
pub fn run(kvm: &Kvm, config: &VmConfig) -> Result<Outcome, VmError> {
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
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| VmError::Thread("signal", std::io::Error::from_raw_os_error(e.errno())))?;

    let (tx, rx) = channel();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || wait_for_signals(&stop_signals, tx))
            .map_err(|e| VmError::Thread("signal", e))?;
    }
    let console = Arc::new(ConsoleInput::default());
    // A console on stdio (in vmm-core, or served by chardevd) takes the terminal.
    let on_stdio = matches!(config.serial, None | Some(chardev::Backend::Stdio));
    let raw = if on_stdio {
        terminal::RawMode::enter()
    } else {
        None
    };
    if config.serial.is_none() {
        let (console, tx, escapes) = (console.clone(), tx.clone(), raw.is_some());
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || console_input(console, tx, escapes))
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
        }),
        started: std::time::Instant::now(),
        events: api::Events::default(),
        console: Mutex::new(None),
        console_view: std::sync::OnceLock::new(),
    });
    let _api = match &config.api_socket {
        Some(path) => Some(api::start(path, shared.clone(), tx.clone())?),
        None => None,
    };

    let mut supervisor = None;
    if let Some(backend) = &config.serial {
        let buffer = Arc::new(chardev::ConsoleBuffer::new(chardev::BUFFER_BYTES));
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
        let input: chardev::InputFn = Arc::new(move |bytes: &[u8]| {
            let _ = in_tx.send((bytes.to_vec(), true));
        });
        let attached: chardev::InputFn = Arc::new(move |bytes: &[u8]| {
            let _ = attached_tx.send((bytes.to_vec(), false));
        });
        let _ = shared.console_view.set((buffer.clone(), attached));
        supervisor = Some(chardev::start(
            match &config.chardevd_socket {
                Some(path) => chardev::Mode::Connect(path.clone()),
                None => chardev::Mode::Spawn(config.chardevd.clone()),
            },
            backend.clone(),
            buffer,
            input,
            shared.clone(),
        )?);
        *shared.console.lock().unwrap() = supervisor.as_ref().map(|s| s.control.clone());
    }

    let result = run_guest(kvm, config, &tx, &rx, &console, &shared);
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
) -> Result<Outcome, VmError> {
    loop {
        let boot = {
            let mut st = shared.status.lock().unwrap();
            st.boots += 1;
            st.paused = false;
            st.boots
        };
        shared.events.emit("started", format!("boot {boot}"));
        match run_once(kvm, config, tx, rx, console, shared)? {
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
            VmEvent::Vcpu(VcpuEvent::Action(_, Action::None)) | VmEvent::DumpVcpus => {
                unreachable!("not a stop")
            }
            VmEvent::Vcpu(VcpuEvent::TripleFault(id, rip)) => {
                return Err(VmError::TripleFault(id, rip))
            }
            VmEvent::Vcpu(VcpuEvent::Failed(id, msg)) => return Err(VmError::VcpuFailed(id, msg)),
            VmEvent::Signal(sig) => return Ok(Outcome::Stopped(StopReason::Signal(sig))),
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
) -> Result<VmEvent, VmError> {
    // Memory is created before the VM so that it is dropped after it.
    let memory = Memory::new(config.memory)?;
    let vm = kvm.fd.create_vm().map_err(VmError::CreateVm)?;
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

    let entry = boot::load(&memory.guest, config)?;
    log::debug!("guest entry: {entry:?}");

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(|e| VmError::Setup("the serial interrupt", e))?;
    let uart = Arc::new(Mutex::new(serial::SerialDevice::new(
        serial_irq,
        match console.output.get() {
            Some(buffer) => Box::new(chardev::BufferWriter(buffer.clone())),
            None => Box::new(serial::RawStdout),
        },
    )));
    *console.target.lock().unwrap() = Some(uart.clone());

    let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&ged_irq, ged::GSI)
        .map_err(|e| VmError::Setup("the GED interrupt", e))?;
    let ged = Arc::new(Mutex::new(ged::Ged::new(ged_irq)));

    let mut bus = IoBus::default();
    bus.insert(ged::PORT, 1, ged.clone());
    bus.insert(serial::COM1_BASE, 8, uart);
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
    let mut fds = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(|e| VcpuError::Create(id, e))?;
        vcpu::configure(
            &fd,
            id,
            config.max_cpus,
            &base_cpuid,
            (id == 0).then_some(entry),
        )?;
        fds.push(fd);
    }

    let state = Arc::new(RunState::default());
    let mut threads: Vec<JoinHandle<kvm_ioctls::VcpuFd>> = Vec::new();
    for (id, fd) in fds.into_iter().enumerate() {
        let ctx = VcpuContext {
            id: id as u32,
            bus: bus.clone(),
            mem: memory.guest.clone(),
            state: state.clone(),
            events: tx.clone(),
            pvm: config.pvm,
            print_boot_times: config.print_boot_times,
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(fd, ctx))
            .map_err(|e| VmError::Thread("vCPU", e))?;
        threads.push(handle);
    }

    let mut paused_clock = None;
    let event = loop {
        match rx
            .recv()
            .expect("the signal thread holds a sender for the life of the process")
        {
            VmEvent::DumpVcpus => {
                state.dump_generation.fetch_add(1, Ordering::AcqRel);
                kick_vcpus(&threads);
            }
            VmEvent::Api(req) => match req.request {
                Request::Pause => {
                    pause_vcpus(&state, &threads);
                    // Stop guest time too, as QEMU does: a guest should not see the pause as
                    // time that passed (or it reports soft lockups).
                    if paused_clock.is_none() {
                        match vm.get_clock() {
                            Ok(clock) => paused_clock = Some(clock),
                            Err(e) => log::warn!("cannot read kvmclock at pause: {e}"),
                        }
                    }
                    shared.status.lock().unwrap().paused = true;
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
                    resume_vcpus(&state);
                    shared.status.lock().unwrap().paused = false;
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
    stop_vcpus(&state, threads);
    // Later events from vCPUs that were stopping anyway are reported, not acted on. Requests
    // from people (API calls, signals, the console escape) carry over: if the guest boots
    // again they apply to it; if the VMM ends, the API caller hears that it stopped.
    let mut carried = Vec::new();
    while let Ok(other) = rx.try_recv() {
        match other {
            VmEvent::Vcpu(VcpuEvent::Failed(id, msg)) => {
                log::warn!("vCPU {id} while stopping: {msg}")
            }
            VmEvent::Vcpu(_) => {}
            other => carried.push(other),
        }
    }
    for e in carried {
        let _ = tx.send(e);
    }
    *console.target.lock().unwrap() = None;
    Ok(event)
}

/// Pauses the VM: every vCPU leaves KVM_RUN and parks. Returns once all are parked.
fn pause_vcpus(state: &RunState, threads: &[JoinHandle<kvm_ioctls::VcpuFd>]) {
    let mut p = state.pause.lock().unwrap();
    p.paused = true;
    loop {
        let running = threads.iter().filter(|t| !t.is_finished()).count();
        if p.parked >= running {
            return;
        }
        drop(p);
        // A kick can land just before KVM_RUN; repeat it until every vCPU is parked.
        kick_vcpus(threads);
        p = state.pause.lock().unwrap();
        p = state
            .pause_changed
            .wait_timeout(p, Duration::from_millis(2))
            .unwrap()
            .0;
    }
}

fn resume_vcpus(state: &RunState) {
    state.pause.lock().unwrap().paused = false;
    state.pause_changed.notify_all();
}

/// Kicks every vCPU out of KVM_RUN once.
fn kick_vcpus(threads: &[JoinHandle<kvm_ioctls::VcpuFd>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // SAFETY: the thread has not been joined, so its pthread_t is valid.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
    }
}

/// Stops every vCPU thread: set the flag, then kick each out of KVM_RUN with a signal until it
/// has ended (a kick that lands just before KVM_RUN is repeated).
fn stop_vcpus(state: &RunState, threads: Vec<JoinHandle<kvm_ioctls::VcpuFd>>) {
    state.stopping.store(true, Ordering::Release);
    {
        // Wake vCPUs parked by a pause.
        let _p = state.pause.lock().unwrap();
        state.pause_changed.notify_all();
    }
    for t in threads {
        while !t.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_micros(500));
        }
        let _ = t.join();
    }
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
