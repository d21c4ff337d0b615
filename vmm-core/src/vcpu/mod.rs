//! vCPUs: per-vCPU CPUID (APIC ids, topology), MSRs, FPU and LAPIC set-up, the boot vCPU's
//! entry state, and the KVM_RUN loop that dispatches exits.

pub mod kick;
mod pvm;
pub mod set;
pub mod state;

use crate::boot::{self, Entry};
use crate::control::{VcpuEvent, VmEvent};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use vmm_devices::bus::{Action, IoBus};
use vmm_devices::layout::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0}: cannot set {1}")]
    Setup(u32, &'static str, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: cannot create it")]
    Create(u32, #[source] kvm_ioctls::Error),
}

/// Shared between the vCPU threads and the thread that stops them.
#[derive(Default)]
pub struct RunState {
    pub stopping: AtomicBool,
    /// Bumped to ask every vCPU to log its registers (SIGUSR1).
    pub dump_generation: AtomicU64,
    /// Pausing: vCPUs park here, outside KVM_RUN, until resumed or stopped.
    pub pause: Mutex<Pause>,
    pub pause_changed: Condvar,
    /// The MSRs a vCPU's state holds (probed once, at boot).
    pub msrs: std::sync::OnceLock<Vec<u32>>,
}

#[derive(Default)]
pub struct Pause {
    pub paused: bool,
    /// How many vCPU threads are parked.
    pub parked: usize,
    /// Bumped to have every parked vCPU save its state into `saved`.
    pub save_generation: u64,
    pub saved: std::collections::BTreeMap<u32, Result<state::VcpuState, VcpuError>>,
}

impl RunState {
    /// Parks the calling vCPU thread while the VM is paused.
    /// A parked vCPU saves its state when asked (the fd is this thread's alone).
    fn park_while_paused(&self, vcpu: &VcpuFd, id: u32) {
        let mut p = self.pause.lock().unwrap();
        if !p.paused {
            return;
        }
        p.parked += 1;
        self.pause_changed.notify_all();
        let mut seen = p.save_generation;
        while p.paused && !self.stopping.load(Ordering::Acquire) {
            if p.save_generation != seen {
                seen = p.save_generation;
                drop(p);
                let msrs = self.msrs.get().map(Vec::as_slice).unwrap_or(&[]);
                let saved = state::VcpuState::save(vcpu, id, msrs);
                p = self.pause.lock().unwrap();
                p.saved.insert(id, saved);
                self.pause_changed.notify_all();
                continue;
            }
            p = self.pause_changed.wait(p).unwrap();
        }
        p.parked -= 1;
        self.pause_changed.notify_all();
    }
}

/// One log line with the registers that say where a vCPU is and what mode it is in.
fn log_state(vcpu: &VcpuFd, id: u32) {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => {
            log::info!(
            "vCPU {id}: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cs.selector,
            s.cr0, s.cr3, s.cr4, s.efer
        )
        }
        (Err(e), _) | (_, Err(e)) => log::warn!("vCPU {id}: cannot read registers: {e}"),
    }
}

/// Per-vCPU CPUID: APIC ids, a topology of one socket with `max_cpus` cores, and the
/// hypervisor bit. (On KVM-PVM the guest sees the host's CPUID regardless; see GUEST.md.)
pub fn cpuid_for(base: &CpuId, id: u32, max_cpus: u32) -> CpuId {
    let mut cpuid = base.clone();
    let core_bits = 32 - (max_cpus.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((1u32 << core_bits).min(255) << 16);
                if max_cpus > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor per package
                }
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((((1u32 << core_bits) - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                let (shift, count, level_type) = match e.index {
                    0 => (0, 1, 1),                // SMT: one thread per core
                    1 => (core_bits, max_cpus, 2), // cores in the package
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = id;
            }
            _ => {}
        }
    }
    cpuid
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The MSR values a freshly reset x86 CPU has under firmware that leaves fast strings and
/// write-back MTRRs on.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
}

/// A vCPU's state as KVM_CREATE_VCPU made it (power-on: an AP waits for INIT and SIPI), kept
/// so that a parked vCPU fd can be put back into it when its id is hot-added again.
pub struct Pristine {
    regs: kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_bindings::kvm_mp_state,
    events: kvm_bindings::kvm_vcpu_events,
    xcrs: Option<kvm_bindings::kvm_xcrs>,
}

impl Pristine {
    /// Reads the state of a vCPU that has just been created.
    pub fn capture(vcpu: &VcpuFd, id: u32) -> Result<Pristine, VcpuError> {
        let err = |what| move |e| VcpuError::Setup(id, what, e);
        Ok(Pristine {
            regs: vcpu.get_regs().map_err(err("(reading) registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(err("(reading) special registers"))?,
            fpu: vcpu.get_fpu().map_err(err("(reading) the FPU state"))?,
            lapic: vcpu.get_lapic().map_err(err("(reading) the LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(err("(reading) the MP state"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(err("(reading) vCPU events"))?,
            xcrs: vcpu.get_xcrs().ok(),
        })
    }

    /// Puts a parked vCPU back into its power-on state, before it is configured again.
    pub fn restore(&self, vcpu: &VcpuFd, id: u32) -> Result<(), VcpuError> {
        let err = |what| move |e| VcpuError::Setup(id, what, e);
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("vCPU events"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(err("special registers"))?;
        vcpu.set_regs(&self.regs).map_err(err("registers"))?;
        vcpu.set_fpu(&self.fpu).map_err(err("the FPU state"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(err("XCRs"))?;
        }
        vcpu.set_lapic(&self.lapic).map_err(err("the LAPIC"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("the MP state"))?;
        Ok(())
    }
}

/// Sets up a vCPU for boot: CPUID, MSRs, FPU, LAPIC (LINT0 ExtINT, LINT1 NMI), and for the boot
/// vCPU the entry state. A reused (parked) vCPU keeps its CPUID, which KVM does not let change
/// once a vCPU has run.
pub fn configure(
    vcpu: &VcpuFd,
    id: u32,
    max_cpus: u32,
    base_cpuid: Option<&CpuId>,
    entry: Option<Entry>,
) -> Result<(), VcpuError> {
    let err = |what| move |e| VcpuError::Setup(id, what, e);
    if let Some(base_cpuid) = base_cpuid {
        vcpu.set_cpuid2(&cpuid_for(base_cpuid, id, max_cpus))
            .map_err(err("CPUID"))?;
    }

    let msrs = boot_msrs();
    let msr_list = Msrs::from_entries(&msrs).expect("a handful of MSRs fits");
    let set = vcpu.set_msrs(&msr_list).map_err(err("MSRs"))?;
    if set != msrs.len() {
        log::debug!("vCPU {id}: KVM took {set} of {} boot MSRs", msrs.len());
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("FPU state"))?;

    let mut lapic = vcpu.get_lapic().map_err(err("LAPIC"))?;
    let set_lvt = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut v = u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ]);
        v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set_lvt(&mut lapic.regs, 0x350, 0b111); // LINT0: ExtINT (the 8259s)
    set_lvt(&mut lapic.regs, 0x360, 0b100); // LINT1: NMI
    vcpu.set_lapic(&lapic).map_err(err("LAPIC"))?;

    if let Some(entry) = entry {
        set_entry_state(vcpu, id, entry)?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn set_entry_state(vcpu: &VcpuFd, id: u32, entry: Entry) -> Result<(), VcpuError> {
    let err = |what| move |e| VcpuError::Setup(id, what, e);
    let mut sregs = vcpu.get_sregs().map_err(err("segment registers"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let mut tr = segment(0x18, 0xb, false);
    tr.s = 0;
    tr.limit = 0x67;
    tr.g = 0;
    sregs.tr = tr;
    sregs.gdt.base = boot::GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = boot::IDT_START;
    sregs.idt.limit = 7;
    match entry {
        Entry::Pvh { entry } => {
            // PVH: 32-bit protected mode, flat segments, paging off, %ebx = start info.
            sregs.cs = segment(0x08, 0xb, false);
            let data = segment(0x10, 0x3, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = boot::PVH_INFO_START;
        }
        Entry::Linux64 { entry } => {
            // Linux 64-bit boot protocol: long mode on identity tables, %rsi = zero page.
            sregs.cs = segment(0x08, 0xb, true);
            let data = segment(0x10, 0x3, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.cr3 = boot::PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LMA | LME
            regs.rip = entry;
            regs.rsi = boot::ZERO_PAGE_START;
            regs.rsp = boot::BOOT_STACK_POINTER;
            regs.rbp = boot::BOOT_STACK_POINTER;
        }
    }
    vcpu.set_sregs(&sregs).map_err(err("segment registers"))?;
    vcpu.set_regs(&regs).map_err(err("registers"))
}

/// What the loop does after an exit, decided once the exit's borrow of the vCPU has ended.
enum Next {
    Continue,
    Stop(VcpuEvent),
    InternalError,
}

pub struct VcpuContext {
    pub id: u32,
    /// The vCPU thread's seccomp filter (None: --no-sandbox).
    pub seccomp: Option<vmm_sandbox::seccomp::Mode>,
    /// Set (then a kick) to end this vCPU's thread alone: it was hot-removed.
    pub unplug: Arc<AtomicBool>,
    pub bus: Arc<IoBus>,
    pub mem: GuestMemory,
    pub state: Arc<RunState>,
    pub events: Sender<VmEvent>,
    pub pvm: bool,
    pub print_boot_times: bool,
}

/// Runs the vCPU until the VM stops or this vCPU asks it to.
/// What a vCPU thread may call once it runs guest code: KVM ioctls, the virtio-pci transport's
/// work (vhost-user messages, eventfds), the log and console, memory and signals.
pub fn allowlist() -> Vec<vmm_sandbox::seccomp::Allow> {
    use vmm_sandbox::seccomp::{allow, allow_if, Cond};
    let no_exec = vec![vec![Cond::Masked(2, libc::PROT_EXEC as u64, 0)]];
    vec![
        allow_if(
            "ioctl",
            "KVM ioctls (type 0xAE) only: KVM_RUN, registers, irqfds, ioeventfds, GSI routing",
            vec![vec![Cond::Masked(1, 0xff00, 0xae00)]],
        ),
        allow(
            "read",
            "draining eventfds when the guest resets a virtio device",
        ),
        allow("write", "the log, the console (--serial direct), eventfds"),
        allow(
            "sendmsg",
            "vhost-user messages when the guest starts or resets a disk",
        ),
        allow("recvmsg", "vhost-user replies"),
        allow("close", "descriptors of a device the guest reset"),
        allow_if(
            "fcntl",
            "F_DUPFD_CLOEXEC only: a disk the guest starts keeps its queues' eventfds, to set up a restarted blockd",
            vec![vec![Cond::Eq(1, libc::F_DUPFD_CLOEXEC as u64)]],
        ),
        allow("futex", "locks, condition variables and channels"),
        allow_if("mmap", "the allocator, never executable", no_exec.clone()),
        allow_if("mprotect", "the allocator, never executable", no_exec),
        allow("munmap", "the allocator"),
        allow("mremap", "the allocator"),
        allow("madvise", "the allocator returns memory"),
        allow("brk", "the allocator"),
        allow("rt_sigprocmask", "signal masks"),
        allow("rt_sigreturn", "the kick signal's handler returns"),
        allow(
            "sigaltstack",
            "the thread ends (Rust's stack-overflow guard)",
        ),
        allow("sched_yield", "spinning locks"),
        allow("clock_gettime", "time (when the vDSO cannot)"),
        allow("getpid", "logging"),
        allow("gettid", "logging"),
        allow(
            "exit",
            "the thread ends (the VM stops, or the vCPU is hot-removed)",
        ),
        allow("exit_group", "the process ends"),
        allow(
            "restart_syscall",
            "a call interrupted by the kick signal resumes",
        ),
        allow_if(
            "seccomp",
            "SECCOMP_SET_MODE_FILTER only: the SIGSYS reporter's kill-all filter",
            vec![vec![Cond::Eq(0, 1)]],
        ),
    ]
}

pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) -> VcpuFd {
    let id = ctx.id;
    if let Some(mode) = ctx.seccomp {
        if let Err(e) =
            vmm_sandbox::seccomp::install("vmm-core (a vCPU thread)", &allowlist(), mode)
        {
            let _ = ctx.events.send(VmEvent::Vcpu(VcpuEvent::Failed(
                id,
                format!("cannot install the vCPU thread's seccomp filter: {e}"),
            )));
            return vcpu;
        }
    }
    let mut first = true;
    let mut dumped = 0;
    let ending = |ctx: &VcpuContext| {
        ctx.state.stopping.load(Ordering::Acquire) || ctx.unplug.load(Ordering::Acquire)
    };
    while !ending(&ctx) {
        ctx.state.park_while_paused(&vcpu, id);
        if ending(&ctx) {
            break;
        }
        let dump = ctx.state.dump_generation.load(Ordering::Acquire);
        if dump != dumped {
            dumped = dump;
            log_state(&vcpu, id);
        }
        if first && ctx.print_boot_times && id == 0 {
            crate::boot_times::mark("first-kvm-run");
        }
        first = false;
        let next = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    ctx.bus.read(port, data);
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => match ctx.bus.write(port, data) {
                    Action::None => Next::Continue,
                    action => Next::Stop(VcpuEvent::Action(id, action)),
                },
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.bus.mmio_read(addr, data) {
                        log::debug!("vCPU {id}: read of unclaimed MMIO {addr:#x}");
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.bus.mmio_write(addr, data) {
                        log::debug!("vCPU {id}: write to unclaimed MMIO {addr:#x}");
                    }
                    Next::Continue
                }
                VcpuExit::Hlt | VcpuExit::Intr => Next::Continue,
                VcpuExit::Shutdown => Next::Stop(VcpuEvent::TripleFault(id, 0)),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VcpuEvent::Action(id, Action::PowerOff)),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(VcpuEvent::Action(id, Action::Reset)),
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Next::Stop(VcpuEvent::Action(id, Action::Panic)),
                    other => Next::Stop(VcpuEvent::Failed(id, format!("unknown KVM system event {other}"))),
                },
                VcpuExit::InternalError => Next::InternalError,
                VcpuExit::FailEntry(reason, cpu) => Next::Stop(VcpuEvent::Failed(
                    id,
                    format!("KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"),
                )),
                other => Next::Stop(VcpuEvent::Failed(id, format!("unexpected KVM exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Stop(VcpuEvent::Failed(id, format!("KVM_RUN failed: {e}"))),
        };
        let next = match next {
            Next::InternalError => match pvm::handle_internal_error(&mut vcpu, &ctx.mem, ctx.pvm) {
                Ok(()) => Next::Continue,
                Err(e) => Next::Stop(VcpuEvent::Failed(id, e.to_string())),
            },
            Next::Stop(VcpuEvent::TripleFault(_, _)) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Next::Stop(VcpuEvent::TripleFault(id, rip))
            }
            n => n,
        };
        if let Next::Stop(event) = next {
            let _ = ctx.events.send(VmEvent::Vcpu(event));
            break;
        }
    }
    vcpu
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_carries_apic_id_and_topology() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = cpuid_for(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 4, 3));
    }
}
