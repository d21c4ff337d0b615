//! The runtime the compiler expects (mem* functions), CPU tables (IDT, TSS) and exceptions.

use crate::entry::{self, Frame};
use crate::io::Line;
use core::sync::atomic::{AtomicU64, Ordering};

/// How many #BP exceptions (int3) the guest has taken at CPL0.
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: a forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards with the direction flag set, then clear it again.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, v: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees dst..dst+n is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") v as u8, options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, hlt parks this CPU for good.
        unsafe { core::arch::asm!("cli", "hlt") }
    }
}

/// A NUL-terminated string at `p`, cut at the first non-UTF-8 byte.
///
/// # Safety
/// `p` must point to a NUL-terminated string that lives for the rest of the program.
pub unsafe fn cstr(p: *const u8) -> &'static str {
    let mut n = 0;
    // SAFETY: the caller guarantees a terminating NUL.
    while unsafe { *p.add(n) } != 0 && n < 4096 {
        n += 1;
    }
    // SAFETY: p..p+n was just read.
    let bytes = unsafe { core::slice::from_raw_parts(p, n) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // SAFETY: valid_up_to marks a UTF-8 prefix.
        Err(e) => unsafe { core::str::from_utf8_unchecked(&bytes[..e.valid_up_to()]) },
    }
}

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: 104,
};

#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; 16384]);
static mut EXCEPTION_STACK: Stack = Stack([0; 16384]);
static mut IDT: [u64; 64] = [0; 64];

/// Loads a TSS (its RSP0 is where CPL3 exceptions land) and an IDT for the 32 exceptions.
pub fn setup_cpu_tables() {
    // SAFETY: runs once on the BSP before any other CPU or user task exists; the tables are
    // statics that live forever, and the descriptors follow the SDM's 64-bit formats.
    unsafe {
        let tss = core::ptr::addr_of_mut!(TSS);
        (*tss).rsp0 = core::ptr::addr_of_mut!(EXCEPTION_STACK) as u64 + 16384;
        let base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let gdt = core::ptr::addr_of_mut!(entry::gdt) as *mut u64;
        *gdt.add(6) = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((base >> 24) & 0xff) << 56);
        *gdt.add(7) = base >> 32;
        core::arch::asm!("ltr ax", in("ax") 0x30u16);

        let idt = core::ptr::addr_of_mut!(IDT) as *mut u64;
        let stubs = core::ptr::addr_of!(entry::isr_base) as u64;
        for v in 0..32u64 {
            let handler = stubs + v * 16;
            // Interrupt gate, present, DPL 0, kernel code segment.
            *idt.add((v * 2) as usize) = (handler & 0xffff)
                | (0x08 << 16)
                | (0x8e << 40)
                | (((handler >> 16) & 0xffff) << 48);
            *idt.add((v * 2 + 1) as usize) = handler >> 32;
        }
        let ptr: [u64; 2] = [(32 * 16 - 1) | ((idt as u64) << 16), (idt as u64) >> 48];
        core::arch::asm!("lidt [{}]", in(reg) ptr.as_ptr() as u64, options(readonly, nostack));
    }
}

/// Called by isr_common for every exception except a user task's closing ud2.
#[no_mangle]
extern "C" fn exception_handler(frame: &mut Frame) {
    if frame.vector == 3 {
        BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
        return;
    }
    Line::new()
        .s("tg: error exception vector=")
        .u(frame.vector)
        .s(" error=")
        .hex(frame.error)
        .s(" rip=")
        .hex(frame.rip)
        .s(" cs=")
        .hex(frame.cs)
        .emit();
    halt_forever();
}

/// The precompiled core library names an unwinding personality; the guest aborts on panic, so
/// this is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
