//! Starting the other CPUs with INIT and SIPI through the local APIC, and the instructions
//! that KVM-PVM cannot emulate (which the VMM completes for us).

use crate::acpi::Madt;
use crate::entry;
use crate::io::Line;
use crate::rt::BREAKPOINTS;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const LAPIC: u64 = 0xfee0_0000;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
/// The trampoline's page: SIPI vector 0x08 starts a CPU at 0x8000 in real mode.
const SIPI_VECTOR: u32 = 0x08;

static ONLINE: AtomicU32 = AtomicU32::new(0);
/// Which APIC ids (below 64) are online: set by the AP itself, cleared when it is offlined.
static ONLINE_MASK: AtomicU64 = AtomicU64::new(1);

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the local APIC's registers are at their architectural address, identity mapped.
    unsafe { core::ptr::read_volatile((LAPIC + reg) as *const u32) }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: as for lapic_read.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, v) }
}

fn send_ipi(apic_id: u32, low: u32) {
    lapic_write(ICR_HIGH, apic_id << 24);
    lapic_write(ICR_LOW, low);
    let mut spins = 0;
    while lapic_read(ICR_LOW) & (1 << 12) != 0 && spins < 10_000 {
        spins += 1;
    }
}

/// Starts every enabled CPU but this one; returns how many reported in.
pub fn start_aps(madt: &Madt) -> u32 {
    let me = lapic_read(0x20) >> 24;
    let mut expected = 0;
    for i in 0..(madt.count as usize).min(256) {
        let id = madt.apic_ids[i];
        if !madt.enabled_mask[i] || id == me || expected >= entry::MAX_APS {
            continue;
        }
        send_ipi(id, 0x4500); // INIT, level assert
        send_ipi(id, 0x4600 | SIPI_VECTOR); // start-up
        expected += 1;
    }
    // Each spin is a few emulated instructions; this allows seconds, not minutes.
    let mut spins = 0u64;
    while ONLINE.load(Ordering::SeqCst) < expected && spins < 3_000_000 {
        spins += 1;
    }
    ONLINE.load(Ordering::SeqCst)
}

/// An application processor arrives here in long mode, on its own stack.
#[no_mangle]
extern "C" fn ap_main(slot: u32) -> ! {
    let apic_id = lapic_read(0x20) >> 24;
    Line::new()
        .s("tg: cpu online apic=")
        .u(apic_id as u64)
        .s(" slot=")
        .u(slot as u64)
        .emit();
    ONLINE_MASK.fetch_or(1 << (apic_id & 63), Ordering::SeqCst);
    ONLINE.fetch_add(1, Ordering::SeqCst);
    // With interrupts off and halted, as an offlined CPU waits: what is ejected from here.
    crate::rt::halt_forever();
}

/// Starts one CPU (a hot-added one); returns whether it reported in.
pub fn start_ap(apic_id: u32) -> bool {
    send_ipi(apic_id, 0x4500); // INIT, level assert
    send_ipi(apic_id, 0x4600 | SIPI_VECTOR); // start-up
    let bit = 1u64 << (apic_id & 63);
    let mut spins = 0u64;
    while ONLINE_MASK.load(Ordering::SeqCst) & bit == 0 && spins < 3_000_000 {
        spins += 1;
    }
    ONLINE_MASK.load(Ordering::SeqCst) & bit != 0
}

/// Takes a CPU offline before its eject: it already waits halted with interrupts off, so only
/// the bookkeeping is left.
pub fn set_offline(apic_id: u32) {
    ONLINE_MASK.fetch_and(!(1u64 << (apic_id & 63)), Ordering::SeqCst);
}

/// How many CPUs are online, this one included.
pub fn online_count() -> u32 {
    ONLINE_MASK.load(Ordering::SeqCst).count_ones()
}

fn has_smap() -> bool {
    let r = core::arch::x86_64::__cpuid_count(7, 0);
    r.ebx & (1 << 20) != 0
}

/// int3, fwait and clac/stac at CPL0: on a PVM host the VMM completes them.
pub fn exercise_fixups() {
    let before = BREAKPOINTS.load(Ordering::SeqCst);
    // SAFETY: the IDT's #BP handler counts and returns.
    unsafe { core::arch::asm!("int3") };
    let int3 = BREAKPOINTS.load(Ordering::SeqCst) - before;
    // SAFETY: fwait with no pending x87 exception does nothing.
    unsafe { core::arch::asm!("fwait") };
    let mut ac = 0xff;
    if has_smap() {
        let (set, clear): (u64, u64);
        // SAFETY: stac/clac only flip RFLAGS.AC; with CR4.SMAP off they have no other effect.
        unsafe {
            core::arch::asm!("stac", "pushfq", "pop {s}", "clac", "pushfq", "pop {c}",
                s = out(reg) set, c = out(reg) clear);
        }
        ac = ((set >> 18) & 1) << 1 | ((clear >> 18) & 1);
    }
    Line::new()
        .s("tg: fixups int3=")
        .u(int3)
        .s(" fwait=1 stac-clac=")
        .u(ac)
        .emit();
}

#[repr(align(16))]
struct Pair(#[allow(dead_code)] [u64; 2]);
static mut PAIR: Pair = Pair([0; 2]);

/// `lock cmpxchg16b`, which KVM-PVM's emulator cannot complete and the VMM must not fake.
pub fn cmpxchg16b() {
    // SAFETY: PAIR is 16-byte aligned and used by nothing else.
    unsafe {
        let p = core::ptr::addr_of_mut!(PAIR);
        core::arch::asm!("xchg rbx, {t}", "lock cmpxchg16b [{p}]", "xchg rbx, {t}",
            p = in(reg) p, t = inout(reg) 1u64 => _, inout("rax") 0u64 => _,
            inout("rdx") 0u64 => _, in("rcx") 0u64);
    }
}
