//! The test guest: a small freestanding x86_64 program that vmm-core (and QEMU, through its
//! PVH note) boots in seconds, even where guest kernel code is emulated (KVM-PVM).
//!
//! It reports what it sees on the serial port as `tg: key=value` lines, runs a scenario named on
//! its command line (`tg.scenario=`), and powers off through ACPI. Heavy loops run at CPL3.
#![no_std]
#![no_main]

mod acpi;
mod blk;
mod entry;
mod io;
mod rng;
mod rt;
mod smp;

use core::sync::atomic::{AtomicU64, Ordering};
use io::Line;

/// `hvm_start_info`, as the PVH boot protocol lays it out.
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// The result a CPL3 task leaves for the kernel (all pages are user-accessible).
static USER_RESULT: AtomicU64 = AtomicU64::new(0);

#[repr(align(16))]
struct UserStack(#[allow(dead_code)] [u8; 65536]);
static mut USER_STACK: UserStack = UserStack([0; 65536]);

/// The PVH entry hands over here in long mode, on the BSP's stack.
#[no_mangle]
extern "C" fn guest_main(start_info: u64) -> ! {
    io::serial_init();
    Line::new().s("tg: hello").emit();

    // SAFETY: the PVH protocol passes the physical address of a valid hvm_start_info in %ebx, and
    // the first 4 GiB are identity mapped.
    let info = unsafe { &*(start_info as *const StartInfo) };
    if info.magic != PVH_MAGIC {
        Line::new()
            .s("tg: error bad-start-info magic=")
            .hex(info.magic as u64)
            .emit();
        rt::halt_forever();
    }
    let cmdline = if info.cmdline_paddr != 0 {
        // SAFETY: the loader wrote a NUL-terminated command line at this address.
        unsafe { rt::cstr(info.cmdline_paddr as *const u8) }
    } else {
        ""
    };
    Line::new().s("tg: cmdline=").s(cmdline).emit();

    check_memory(info);
    rt::setup_cpu_tables();

    let tables = acpi::Tables::find(info.rsdp_paddr);
    let Some(tables) = tables else {
        Line::new().s("tg: error no-acpi").emit();
        rt::halt_forever();
    };
    Line::new()
        .s("tg: acpi fadt=")
        .u(tables.fadt.is_some() as u64)
        .s(" hw-reduced=")
        .u(tables.hw_reduced() as u64)
        .s(" s5=")
        .u(tables.slp_typ_s5().map_or(0xff, |v| v as u64))
        .emit();

    if let Some(addr) = tables.vmgenid_addr() {
        VMGENID_ADDR.store(addr, Ordering::Relaxed);
        let (lo, hi) = vmgenid();
        Line::new()
            .s("tg: vmgenid addr=")
            .hex(addr)
            .s(" id=")
            .hex16(hi)
            .s(":")
            .hex16(lo)
            .emit();
    }

    let madt = tables.madt();
    Line::new()
        .s("tg: madt cpus=")
        .u(madt.count as u64)
        .s(" enabled=")
        .u(madt.enabled as u64)
        .emit();
    let online = smp::start_aps(&madt);
    Line::new()
        .s("tg: smp online=")
        .u(online as u64 + 1)
        .s(" enabled=")
        .u(madt.enabled as u64)
        .emit();

    let iterations = param(cmdline, "tg.work=")
        .and_then(parse_u64)
        .unwrap_or(10_000_000);
    // USER_STACK is only used by the one CPL3 task, which runs to completion here.
    let stack_top = core::ptr::addr_of_mut!(USER_STACK) as u64 + 65536;
    // SAFETY: user_work ends with ud2, which isr_common turns into a return from run_user.
    unsafe { entry::run_user(user_work as *const () as u64, iterations, stack_top) };
    Line::new()
        .s("tg: user-work iterations=")
        .u(iterations)
        .s(" result=")
        .hex(USER_RESULT.load(Ordering::SeqCst))
        .emit();

    // Console throughput (bench/console.sh): write this many bytes before the scenario runs.
    if let Some(n) = param(cmdline, "tg.spew=").and_then(parse_u64) {
        io::serial_spew(n);
        Line::new().s("tg: spew done bytes=").u(n).emit();
    }
    let scenario = param(cmdline, "tg.scenario=").unwrap_or("poweroff");
    if scenario == "pvm-fixups" {
        smp::exercise_fixups();
    }
    Line::new().s("tg: ready").emit();

    match scenario {
        "idle" => rt::halt_forever(),
        "ticker" => {
            // Progress that a pause must stop: CPL3 work, then a counter line, forever.
            let mut tick = 0u64;
            loop {
                // SAFETY: as above, user_work returns through ud2.
                unsafe { entry::run_user(user_work as *const () as u64, 2_000_000, stack_top) };
                tick += 1;
                Line::new().s("tg: tick ").u(tick).emit();
            }
        }
        "echo" => {
            // Console input: read lines from COM1 (polling its data-ready bit) and echo each,
            // until "quit".
            let mut line = [0u8; 128];
            let mut n = 0;
            loop {
                let b = io::serial_get();
                if b == b'\r' || b == b'\n' {
                    if n > 0 {
                        // Only ASCII is echoed, so the bytes are valid UTF-8.
                        let text = core::str::from_utf8(&line[..n]).unwrap_or("?");
                        Line::new().s("tg: echo ").s(text).emit();
                        n = 0;
                        // "quit" ends the session (the guest powers off).
                        if text == "quit" {
                            break;
                        }
                    }
                } else if n < line.len() && b.is_ascii() && !b.is_ascii_control() {
                    line[n] = b;
                    n += 1;
                }
            }
        }
        "wait-powerbutton" => {
            // What an ACPI driver does for the GED: wait for its event, clear it, act on it.
            const GED_PORT: u16 = 0x610;
            const POWER_BUTTON: u8 = 1;
            while io::inb(GED_PORT) & POWER_BUTTON == 0 {}
            io::outb(GED_PORT, POWER_BUTTON);
            Line::new().s("tg: power button").emit();
        }
        "hotplug" => hotplug(cmdline, stack_top),
        "blk" => blk_scenario(cmdline, stack_top),
        "blk-bad" => blk_bad(stack_top),
        "blk-seq" => blk_seq(cmdline),
        "blk-digest" => blk_digest(cmdline),
        "blk-resize" => blk_resize(),
        "blk-hotplug" => blk_hotplug(cmdline),
        "dirty" => dirty(cmdline, stack_top),
        "migrate" => migrate_load(cmdline, stack_top),
        "rng" => rng::scenario(cmdline),
        "reset" => {
            Line::new().s("tg: resetting").emit();
            tables.reset();
        }
        "panic" => {
            Line::new().s("tg: panicking").emit();
            // pvpanic: bit 0 of its port means "guest panicked".
            io::outb(0x505, 1);
        }
        "bad-insn" => {
            Line::new().s("tg: executing lock cmpxchg16b").emit();
            smp::cmpxchg16b();
            Line::new().s("tg: bad-insn executed").emit();
        }
        "poweroff" => blk_look(),
        _ => {}
    }
    Line::new().s("tg: poweroff").emit();
    tables.power_off();
    Line::new().s("tg: error poweroff-failed").emit();
    rt::halt_forever();
}

/// Sums the memory map, and writes and reads back the first and last word of each RAM range.
fn check_memory(info: &StartInfo) {
    let mut total = 0u64;
    let mut usable = 0u64;
    let mut ok = true;
    for i in 0..info.memmap_entries as u64 {
        // SAFETY: the loader wrote memmap_entries entries at memmap_paddr.
        let e = unsafe { &*((info.memmap_paddr + i * 24) as *const MemmapEntry) };
        Line::new()
            .s("tg: e820 addr=")
            .hex(e.addr)
            .s(" size=")
            .hex(e.size)
            .s(" type=")
            .u(e.kind as u64)
            .emit();
        total += e.size;
        if e.kind == E820_RAM {
            usable += e.size;
            // Only probe what our identity map covers, and stay clear of our own image.
            let last = e.addr + e.size - 8;
            if last < (4 << 30) && e.addr >= 0x100_0000 {
                for addr in [e.addr, last] {
                    let p = addr as *mut u64;
                    let pattern = addr ^ 0x5a5a_5a5a_5a5a_5a5a;
                    // SAFETY: the address is RAM that the memory map gives us and nothing uses.
                    unsafe {
                        core::ptr::write_volatile(p, pattern);
                        ok &= core::ptr::read_volatile(p) == pattern;
                    }
                }
            }
        }
    }
    Line::new()
        .s("tg: memory total=")
        .u(total)
        .s(" usable=")
        .u(usable)
        .s(" check=")
        .s(if ok { "ok" } else { "bad" })
        .emit();
}

/// The CPL3 task: a loop that only native-speed execution finishes quickly on a PVM host.
extern "C" fn user_work(iterations: u64) -> ! {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < iterations {
        x ^= i;
        x = x.wrapping_mul(0x0000_0100_0000_01b3);
        x ^= x >> 29;
        i += 1;
    }
    USER_RESULT.store(x, Ordering::SeqCst);
    // SAFETY: ud2 is how a user task hands control back (see isr_common).
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// The VMM's CPU hotplug controller (vmm-core's devices/cpu_hotplug.rs).
const HP_SELECT: u16 = 0x0cd8;
const HP_STATUS: u16 = 0x0cdc;
const HP_COUNT: u16 = 0x0ce0;
const HP_ENABLED: u8 = 1 << 0;
const HP_INSERTING: u8 = 1 << 1;
const HP_REMOVING: u8 = 1 << 2;
const HP_EJECT: u8 = 1 << 3;
const GED_PORT: u16 = 0x610;
const GED_CPU_HOTPLUG: u8 = 1 << 1;

/// CPU hotplug as an ACPI driver does it, on the registers directly: a CPU-bound load (CPL3
/// work in chunks, summed) runs all the while; between chunks, a GED CPU event is taken by
/// scanning the controller: inserting CPUs are started, removing ones are offlined and
/// ejected (or refused, with tg.eject=refuse). A 'q' on the console ends the load.
fn hotplug(cmdline: &str, stack_top: u64) {
    let chunk = param(cmdline, "tg.chunk=")
        .and_then(parse_u64)
        .unwrap_or(200_000);
    let refuse = param(cmdline, "tg.eject=") == Some("refuse");
    let max = io::inl(HP_COUNT);
    Line::new()
        .s("tg: hotplug max=")
        .u(max as u64)
        .s(" online=")
        .u(smp::online_count() as u64)
        .emit();
    let (mut chunks, mut sum) = (0u64, 0u64);
    loop {
        // SAFETY: user_work ends with ud2, which isr_common turns into a return from run_user.
        unsafe { entry::run_user(user_work as *const () as u64, chunk, stack_top) };
        sum = sum.wrapping_add(USER_RESULT.load(Ordering::SeqCst));
        chunks += 1;
        if io::inb(GED_PORT) & GED_CPU_HOTPLUG != 0 {
            io::outb(GED_PORT, GED_CPU_HOTPLUG);
            for id in 0..max {
                io::outl(HP_SELECT, id);
                let status = io::inb(HP_STATUS);
                if status & HP_INSERTING != 0 {
                    io::outb(HP_STATUS, HP_INSERTING);
                    let started = smp::start_ap(id);
                    Line::new()
                        .s("tg: cpu added apic=")
                        .u(id as u64)
                        .s(" started=")
                        .u(started as u64)
                        .s(" online=")
                        .u(smp::online_count() as u64)
                        .emit();
                } else if status & HP_REMOVING != 0 {
                    io::outb(HP_STATUS, HP_REMOVING);
                    if refuse {
                        Line::new()
                            .s("tg: cpu eject refused apic=")
                            .u(id as u64)
                            .emit();
                        continue;
                    }
                    smp::set_offline(id);
                    io::outl(HP_SELECT, id);
                    io::outb(HP_STATUS, HP_EJECT);
                    io::outl(HP_SELECT, id);
                    let gone = io::inb(HP_STATUS) & HP_ENABLED == 0;
                    Line::new()
                        .s("tg: cpu removed apic=")
                        .u(id as u64)
                        .s(" gone=")
                        .u(gone as u64)
                        .s(" online=")
                        .u(smp::online_count() as u64)
                        .emit();
                }
            }
        }
        if io::serial_try_get() == Some(b'q') {
            break;
        }
    }
    Line::new()
        .s("tg: load chunks=")
        .u(chunks)
        .s(" iterations=")
        .u(chunk)
        .s(" sum=")
        .hex(sum)
        .emit();
}

/// Live migration's load: fills `tg.dirty.mib` MiB (default 8) at 64 MiB with non-zero words
/// at CPL3 (native speed), then rewrites the first `tg.dirty.hot` MiB of them (default all;
/// 0: none, the guest idles) pass after pass, forever, each pass with its own words, waiting
/// `tg.dirty.gap` TSC cycles after each MiB (default 0) for a steady, lower rate. Reports
/// "tg: dirty filled mib=N" once, then "tg: dirty pass N" every 16 passes.
fn dirty(cmdline: &str, stack_top: u64) {
    const BASE: u64 = 64 << 20;
    let get = |k: &str| param(cmdline, k).and_then(parse_u64);
    let mib = get("tg.dirty.mib=").unwrap_or(8);
    let hot = get("tg.dirty.hot=").unwrap_or(mib).min(mib);
    let gap = get("tg.dirty.gap=").unwrap_or(0);
    user_pattern(0, BASE, mib << 17, 0, 1, stack_top);
    Line::new().s("tg: dirty filled mib=").u(mib).emit();
    if hot == 0 {
        rt::halt_forever();
    }
    let mut pass = 1u64;
    loop {
        pass += 1;
        for m in 0..hot {
            user_pattern(0, BASE + (m << 20), 1 << 17, m << 17, pass, stack_top);
            if gap > 0 {
                let until = rdtsc() + gap;
                while rdtsc() < until {
                    core::hint::spin_loop();
                }
            }
        }
        if pass.is_multiple_of(16) {
            Line::new().s("tg: dirty pass ").u(pass).emit();
        }
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A pattern job for CPL3 (native speed): fill `words` words at `buf` with the pattern of
/// disk word `first_word` on (op 0), count words that differ from it (op 1), or count words
/// that are not zero (op 2).
#[repr(C)]
struct Job {
    op: u64,
    buf: u64,
    words: u64,
    first_word: u64,
    seed: u64,
}

static mut JOB: Job = Job {
    op: 0,
    buf: 0,
    words: 0,
    first_word: 0,
    seed: 0,
};

extern "C" fn user_job(arg: u64) -> ! {
    // SAFETY: arg is the address of JOB, which the kernel side does not touch meanwhile.
    let j = unsafe { &*(arg as *const Job) };
    let p = j.buf as *mut u64;
    let mut bad = 0u64;
    let mut i = 0;
    while i < j.words {
        let w = (j.first_word + i).wrapping_add(j.seed).wrapping_mul(blk::K);
        // SAFETY: buf..buf+8*words is the DMA data buffer.
        unsafe {
            match j.op {
                0 => core::ptr::write_volatile(p.add(i as usize), w),
                1 => bad += (core::ptr::read_volatile(p.add(i as usize)) != w) as u64,
                _ => bad += (core::ptr::read_volatile(p.add(i as usize)) != 0) as u64,
            }
        }
        i += 1;
    }
    USER_RESULT.store(bad, Ordering::SeqCst);
    // SAFETY: ud2 is how a user task hands control back (see isr_common).
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

fn pattern_job(op: u64, words: u64, first_word: u64, seed: u64, stack_top: u64) -> u64 {
    user_pattern(
        op,
        blk::data_buf() as u64,
        words,
        first_word,
        seed,
        stack_top,
    )
}

/// A pattern job (see `user_job`) on any identity-mapped buffer.
fn user_pattern(op: u64, buf: u64, words: u64, first_word: u64, seed: u64, stack_top: u64) -> u64 {
    // SAFETY: no user task runs now, so JOB is ours to write.
    unsafe {
        JOB = Job {
            op,
            buf,
            words,
            first_word,
            seed,
        };
    }
    let arg = core::ptr::addr_of!(JOB) as u64;
    // SAFETY: user_job ends with ud2, which isr_common turns into a return from run_user.
    unsafe { entry::run_user(user_job as *const () as u64, arg, stack_top) };
    USER_RESULT.load(Ordering::SeqCst)
}

/// Zeroed ranges (first sector, sectors) of the `blk` scenario: discard, write-zeroes, and
/// write-zeroes with unmap. The host's check (tests/tests/block.rs) knows them too.
const ZERO_RANGES: [(u64, u32); 3] = [(8, 16), (40, 16), (80, 16)];

/// The virtio-blk scenario (see blk.rs for the parameters).
fn blk_scenario(cmdline: &str, stack_top: u64) {
    let seed = param(cmdline, "tg.blk.seed=")
        .and_then(parse_u64)
        .unwrap_or(1);
    let host = param(cmdline, "tg.blk.host=").and_then(parse_u64);
    let write_through = param(cmdline, "tg.blk.wce=") == Some("0");
    let halt_after_write = param(cmdline, "tg.blk.halt-after-write=") == Some("1");
    blk::WANT_WCE.store(write_through, Ordering::Relaxed);
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    let n = blk::probe(&mut disks);
    Line::new().s("tg: blk disks=").u(n as u64).emit();
    let buf = blk::data_buf() as u64;
    let chunk = blk::CHUNK as u64;
    for d in disks.iter_mut().flatten() {
        let name = d.index as u64;
        let mut id = [0u8; 20];
        let (id_status, id_len) = d.get_id(&mut id).unwrap_or((0xff, 0));
        Line::new()
            .s("tg: blk")
            .u(name)
            .s(" slot=")
            .u(d.slot as u64)
            .s(" capacity=")
            .u(d.capacity)
            .s(" blk-size=")
            .u(d.blk_size as u64)
            .s(" queues=")
            .u(d.queues as u64)
            .s(" ro=")
            .u(d.read_only() as u64)
            .s(" features=")
            .hex(d.features)
            .s(" id-status=")
            .u(id_status as u64)
            .s(" id=")
            .s(core::str::from_utf8(&id[..id_len]).unwrap_or("?"))
            .emit();
        let bytes = d.capacity * 512;
        let chunks = bytes / chunk;
        let queues = d.queues as usize;
        let mut counts = (0u64, 0u64);
        if let Some(hs) = host {
            let mut bad = 0;
            for c in 0..chunks {
                tally(
                    &mut counts,
                    d.read((c as usize) % queues, c * chunk / 512, buf, chunk as u32),
                );
                bad += pattern_job(1, chunk / 8, c * chunk / 8, hs, stack_top);
            }
            Line::new()
                .s("tg: blk")
                .u(name)
                .s(" host-pattern bad-words=")
                .u(bad)
                .s(" errors=")
                .u(counts.0)
                .emit();
        }
        if d.read_only() {
            pattern_job(0, 512 / 8, 0, seed, stack_top);
            let w = d.write(0, 0, buf, 512);
            let z = d.zero(false, false, 0, 8);
            let r = d.read(0, 0, buf, 512);
            Line::new()
                .s("tg: blk")
                .u(name)
                .s(" ro write-status=")
                .u(w.map_or(0xff, |r| r.0) as u64)
                .s(" write-zeroes-status=")
                .u(z.map_or(0xff, |r| r.0) as u64)
                .s(" read-status=")
                .u(r.map_or(0xff, |r| r.0) as u64)
                .emit();
        } else {
            if write_through {
                let wb = d.write_through();
                Line::new()
                    .s("tg: blk")
                    .u(name)
                    .s(" writeback=")
                    .u(wb as u64)
                    .emit();
            }
            for c in 0..chunks {
                pattern_job(0, chunk / 8, c * chunk / 8, seed, stack_top);
                tally(
                    &mut counts,
                    d.write((c as usize) % queues, c * chunk / 512, buf, chunk as u32),
                );
            }
            if halt_after_write {
                // No flush: with the write cache off, each write was durable when it completed.
                Line::new()
                    .s("tg: blk")
                    .u(name)
                    .s(" written-unflushed bytes=")
                    .u(chunks * chunk)
                    .s(" errors=")
                    .u(counts.0)
                    .s(" timeouts=")
                    .u(counts.1)
                    .emit();
                rt::halt_forever();
            }
            tally(&mut counts, d.flush(0));
            let mut bad = 0;
            for c in 0..chunks {
                // Poison the buffer first, so that a read that moves no data cannot pass.
                pattern_job(0, chunk / 8, 0, seed ^ 0xdead, stack_top);
                tally(
                    &mut counts,
                    d.read((c as usize) % queues, c * chunk / 512, buf, chunk as u32),
                );
                bad += pattern_job(1, chunk / 8, c * chunk / 8, seed, stack_top);
            }
            Line::new()
                .s("tg: blk")
                .u(name)
                .s(" pattern written-bytes=")
                .u(chunks * chunk)
                .s(" bad-words=")
                .u(bad)
                .s(" errors=")
                .u(counts.0)
                .s(" timeouts=")
                .u(counts.1)
                .emit();
            // Discard, write-zeroes, write-zeroes with unmap; then every word of the first
            // chunk must be zero inside those ranges and the pattern outside them.
            let mut zs = [0xffu8; 3];
            for (i, (sector, n)) in ZERO_RANGES.iter().enumerate() {
                let r = d.zero(i == 0, i == 2, *sector, *n);
                zs[i] = r.map_or(0xff, |r| r.0);
            }
            tally(&mut counts, d.read(0, 0, buf, chunk as u32));
            let (mut nonzero, mut wrong) = (0u64, 0u64);
            let mut word = 0u64;
            for (sector, n) in ZERO_RANGES {
                let first = sector * 64;
                if first > word {
                    wrong += pattern_job_at(1, word, first - word, seed, stack_top);
                }
                nonzero += pattern_job_at(2, first, u64::from(n) * 64, seed, stack_top);
                word = first + u64::from(n) * 64;
            }
            wrong += pattern_job_at(1, word, chunk / 8 - word, seed, stack_top);
            Line::new()
                .s("tg: blk")
                .u(name)
                .s(" zeroes discard=")
                .u(zs[0] as u64)
                .s(" write-zeroes=")
                .u(zs[1] as u64)
                .s(" write-zeroes-unmap=")
                .u(zs[2] as u64)
                .s(" nonzero-words=")
                .u(nonzero)
                .s(" pattern-bad-words=")
                .u(wrong)
                .emit();
            // A request beyond the end of the disk must fail, and the disk keep working.
            let beyond = d.read(0, d.capacity, buf, 512);
            let after = d.read(0, 0, buf, 512);
            Line::new()
                .s("tg: blk")
                .u(name)
                .s(" beyond-end status=")
                .u(beyond.map_or(0xff, |r| r.0) as u64)
                .s(" then-read status=")
                .u(after.map_or(0xff, |r| r.0) as u64)
                .emit();
        }
        let mut line = Line::new().s("tg: blk").u(name).s(" queue-requests");
        for q in 0..queues {
            line = line.s(" ").u(d.requests[q]);
        }
        line = line.s(" msix");
        for q in 0..queues {
            line = line.s(" ").u(d.irq_seen(q) as u64);
        }
        line.emit();
    }
    Line::new().s("tg: blk done").emit();
}

/// What the default scenario does with disks: reads each one's serial and first sector,
/// writing nothing.
fn blk_look() {
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    if blk::probe(&mut disks) == 0 {
        return;
    }
    let buf = blk::data_buf() as u64;
    for d in disks.iter_mut().flatten() {
        let mut id = [0u8; 20];
        let (id_status, n) = d.get_id(&mut id).unwrap_or((0xff, 0));
        let r = d.read(0, 0, buf, 512);
        Line::new()
            .s("tg: blk")
            .u(d.index as u64)
            .s(" capacity=")
            .u(d.capacity)
            .s(" blk-size=")
            .u(d.blk_size as u64)
            .s(" ro=")
            .u(d.read_only() as u64)
            .s(" id-status=")
            .u(id_status as u64)
            .s(" id=")
            .s(core::str::from_utf8(&id[..n]).unwrap_or("?"))
            .s(" read-status=")
            .u(r.map_or(0xff, |r| r.0) as u64)
            .emit();
    }
}

/// The crash test's writer: `tg.seq.count` blocks of 4 KiB, block N at byte N*4096 (wrapping
/// over the disk), with the write cache off so that each write is durable when it completes
/// (as FUA). A block holds a magic, its sequence number, a checksum, and words derived from the
/// sequence number (the host's check in tests/tests/block.rs knows the layout). Each
/// completed write is logged as "tg: ack N"; a summary line ends the run.
/// Whether the 4 KiB at `at` hold block `seq` exactly.
/// The canary's words in migrate_load's sector buffer.
const CANARY: u64 = 0xC0A1_C0A1_5EED_0000;

/// The buffer holds block `seq`'s first sector, then the canary's words intact.
fn sector_and_canary_hold(at: *mut u64, seq: u64) -> bool {
    let mut want = [0u64; 512];
    seq_block(want.as_mut_ptr(), seq);
    // SAFETY: `at` is a 4 KiB block of the DMA data buffer; read volatile, as a device wrote
    // its first sector.
    let word = |j: usize| unsafe { at.add(j).read_volatile() };
    (0..64).all(|j| word(j) == want[j]) && (64..512).all(|j| word(j) == CANARY ^ j as u64)
}

fn seq_block_matches(at: *mut u64, seq: u64) -> bool {
    let mut want = [0u64; 512];
    seq_block(want.as_mut_ptr(), seq);
    // SAFETY: `at` is a 4 KiB block of the DMA data buffer; read volatile, as a device wrote it.
    (0..512).all(|j| unsafe { at.add(j).read_volatile() } == want[j])
}

/// Block `seq` of the sequence writers: magic, seq, checksum, then words the host can
/// compute (tests/src/lib.rs checks them).
fn seq_block(at: *mut u64, seq: u64) {
    const MAGIC: u64 = 0x5345_515f_424c_4b21;
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut sum = 0u64;
    for j in 3..512u64 {
        let w = ((seq << 32) | j).wrapping_mul(K);
        sum = sum.rotate_left(5) ^ w;
        // SAFETY: `at` is a 4 KiB block of the DMA data buffer.
        unsafe { at.add(j as usize).write_volatile(w) };
    }
    // SAFETY: as above.
    unsafe {
        at.write_volatile(MAGIC);
        at.add(1).write_volatile(seq);
        at.add(2).write_volatile(sum);
    }
}

/// Where the VMM keeps the VM generation ID (the DSDT's VMGenID device; 0: none).
static VMGENID_ADDR: AtomicU64 = AtomicU64::new(0);

/// The VM generation ID, as two 64-bit halves (low, high); zero without one.
fn vmgenid() -> (u64, u64) {
    let a = VMGENID_ADDR.load(Ordering::Relaxed);
    if a == 0 {
        return (0, 0);
    }
    // SAFETY: the VMM's 16-byte ID, in identity-mapped reserved low memory, read volatile as
    // the VMM rewrites it when the VM is restored.
    unsafe {
        (
            core::ptr::read_volatile(a as *const u64),
            core::ptr::read_volatile((a + 8) as *const u64),
        )
    }
}

/// The migration tests' guest: a counter in memory (the pass number), `tg.dirty.mib` MiB
/// (default 8) at 64 MiB rewritten at CPL3 each pass with that pass's words after checking
/// they still hold the previous pass's (so a page a migration lost or left stale is found on
/// the destination), and, with a disk, a sequence-numbered block written through every
/// `tg.mig.every` passes (default 8), each acknowledged as "tg: ack N". Every 16 passes:
/// "tg: mig pass N acked=A"; a bad check: "tg: mig error pass N bad=B" (words wrong).
/// The ACPI power button ends it (the guest then powers off).
fn migrate_load(cmdline: &str, stack_top: u64) {
    const BASE: u64 = 64 << 20;
    let mib = param(cmdline, "tg.dirty.mib=")
        .and_then(parse_u64)
        .unwrap_or(8);
    let every = param(cmdline, "tg.mig.every=")
        .and_then(parse_u64)
        .unwrap_or(8)
        .max(1);
    let words = mib << 17;
    blk::WANT_WCE.store(true, Ordering::Relaxed);
    // As Linux's driver: the used ring's event index, and blockd's, in use across the move.
    blk::WANT_EVENT_IDX.store(true, Ordering::Relaxed);
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    let have_disk = blk::probe(&mut disks) > 0;
    let mut seq = 0u64;
    let mut pass = 0u64;
    // Each acknowledged block is read back into this buffer (blockd writes it by DMA, which
    // KVM's dirty log does not see) and checked again before the next write: on a destination,
    // a page the backend's dirty log missed shows as the block before.
    let rbuf = blk::data_buf().wrapping_add(32 << 10) as *mut u64;
    // The first sector of each acknowledged block is also read into the start of this
    // buffer, whose other 3.5 KiB hold words written once, here (a canary). Between its
    // reads the CPU does not touch it: on a post-copy destination, the first request into
    // it finds its page still on the source, and blockd itself faults on it. Were the page
    // not brought from the source, the canary would be gone.
    // tg.mig.canary=MIB puts it at that guest address instead, far above everything else.
    let cbuf = match param(cmdline, "tg.mig.canary=").and_then(parse_u64) {
        Some(mib) => (mib << 20) as *mut u64,
        None => blk::data_buf().wrapping_add(48 << 10) as *mut u64,
    };
    for j in 64..512 {
        // SAFETY: `cbuf` is a 4 KiB block of the DMA data buffer.
        unsafe { cbuf.add(j).write_volatile(CANARY ^ j as u64) };
    }
    let mut last_read: Option<u64> = None;
    let mut generation = vmgenid();
    loop {
        // The ACPI power button (GED) ends the load, and the guest powers off.
        const GED_PORT: u16 = 0x610;
        const POWER_BUTTON: u8 = 1;
        const VMGENID_CHANGED: u8 = 1 << 2;
        if io::inb(GED_PORT) & POWER_BUTTON != 0 {
            io::outb(GED_PORT, POWER_BUTTON);
            Line::new().s("tg: power button").emit();
            return;
        }
        // A restored (or cloned) VM gets a new generation ID, and the GED says so.
        let now = vmgenid();
        if now != generation {
            generation = now;
            let ged = io::inb(GED_PORT) & VMGENID_CHANGED != 0;
            if ged {
                io::outb(GED_PORT, VMGENID_CHANGED);
            }
            Line::new()
                .s("tg: vmgenid changed id=")
                .hex16(now.1)
                .s(":")
                .hex16(now.0)
                .s(" ged=")
                .u(ged as u64)
                .emit();
        }
        pass += 1;
        if pass > 1 {
            let bad = user_pattern(1, BASE, words, 0, pass - 1, stack_top);
            if bad != 0 {
                Line::new()
                    .s("tg: mig error pass ")
                    .u(pass)
                    .s(" bad=")
                    .u(bad)
                    .emit();
            }
        }
        user_pattern(0, BASE, words, 0, pass, stack_top);
        if have_disk && pass.is_multiple_of(every) {
            let d = disks[0].as_mut().expect("probed");
            let blocks = d.capacity / 8;
            if let Some(prev) = last_read {
                if !seq_block_matches(rbuf, prev) {
                    Line::new().s("tg: mig error read ").u(prev).emit();
                }
                let sector_ok = matches!(
                    d.read(0, (prev % blocks) * 8, cbuf as u64, 512),
                    Some((0, _))
                ) && sector_and_canary_hold(cbuf, prev);
                if !sector_ok {
                    Line::new().s("tg: mig error canary ").u(prev).emit();
                }
            }
            let buf = blk::data_buf() as *mut u64;
            seq_block(buf, seq);
            match d.write(0, (seq % blocks) * 8, buf as u64, 4096) {
                Some((0, _)) => {
                    Line::new().s("tg: ack ").u(seq).emit();
                    last_read = match d.read(0, (seq % blocks) * 8, rbuf as u64, 4096) {
                        Some((0, _)) if seq_block_matches(rbuf, seq) => Some(seq),
                        _ => {
                            Line::new().s("tg: mig error readback ").u(seq).emit();
                            None
                        }
                    };
                }
                other => Line::new()
                    .s("tg: mig error write ")
                    .u(seq)
                    .s(" status=")
                    .u(other.map_or(0x100, |(s, _)| s as u64))
                    .emit(),
            }
            seq += 1;
        }
        if pass.is_multiple_of(16) {
            Line::new()
                .s("tg: mig pass ")
                .u(pass)
                .s(" acked=")
                .u(seq)
                .emit();
        }
    }
}

/// A disk and console workload for record/replay: once a line comes on the console,
/// `tg.blk.count` requests (default 200), each a read or
/// a write of 4 KiB at a sector drawn from `tg.blk.seed`, then "tg: blk digest ..." with the
/// count of errors and an FNV-1a digest of every status and of the data of every read that
/// succeeded. A replay of it must print the same line.
fn blk_digest(cmdline: &str) {
    let count = param(cmdline, "tg.blk.count=")
        .and_then(parse_u64)
        .unwrap_or(200);
    let mut x = param(cmdline, "tg.blk.seed=")
        .and_then(parse_u64)
        .unwrap_or(1)
        | 1;
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    if blk::probe(&mut disks) == 0 {
        Line::new().s("tg: blk digest no disk").emit();
        return;
    }
    let d = disks[0].as_mut().expect("probed");
    let blocks = (d.capacity / 8).max(1);
    let buf = blk::data_buf();
    // The console's part: the workload starts when a line comes (after the host set its
    // fault rules up).
    // tg.blk.wait=0: no console line to wait for.
    if param(cmdline, "tg.blk.wait=").and_then(parse_u64) != Some(0) {
        Line::new().s("tg: blk digest waiting").emit();
        loop {
            let b = io::serial_get();
            if b == b'\r' || b == b'\n' {
                break;
            }
        }
    }
    // tg.blk.batch=N: every fourth step writes N blocks at once instead (at most blk::BATCH),
    // and the order they complete in goes into the digest too.
    let batch = param(cmdline, "tg.blk.batch=")
        .and_then(parse_u64)
        .unwrap_or(0)
        .min(blk::BATCH as u64) as usize;
    let xq = param(cmdline, "tg.blk.xq=").and_then(parse_u64) == Some(1) && d.queues >= 2;
    let mut digest = 0xcbf2_9ce4_8422_2325u64;
    let mut fnv = |b: u8| digest = (digest ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    let mut errors = 0u64;
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // tg.blk.xq=1 (a disk with two queues): every fourth step writes a block on queue 0
        // and reads it on queue 1 at once; which the read sees goes into the digest.
        if xq && i % 4 == 1 {
            let sector = (x % blocks) * 8;
            let rbuf = buf as u64 + 32768;
            for j in 0..4096usize {
                // SAFETY: the DMA data buffer, 64 KiB: the write's 4 KiB at its start.
                unsafe {
                    buf.add(j)
                        .write_volatile((i as u8).wrapping_add(j as u8) ^ 0xc3)
                };
            }
            d.submit(0, blk::T_OUT, sector, &[(buf as u64, 4096, false)]);
            d.submit(1, blk::T_IN, sector, &[(rbuf, 4096, true)]);
            let w = d.complete(0).map_or(0xff, |(s, _)| s);
            let r = d.complete(1).map_or(0xff, |(s, _)| s);
            fnv(w);
            fnv(r);
            errors += u64::from(w != 0) + u64::from(r != 0);
            if r == 0 {
                for j in 0..4096usize {
                    // SAFETY: as above, the read's 4 KiB at 32 KiB; the device wrote it.
                    fnv(unsafe { buf.add(32768 + j).read_volatile() });
                }
            }
            continue;
        }
        if batch > 0 && i % 4 == 3 {
            let mut sectors = [0u64; blk::BATCH];
            for (k, s) in sectors[..batch].iter_mut().enumerate() {
                *s = ((x >> (k * 5)) % blocks) * 8;
            }
            for j in 0..4096 * batch {
                // SAFETY: the DMA data buffer, 64 KiB, of which at most 32 KiB are used here.
                unsafe {
                    buf.add(j)
                        .write_volatile((i as u8) ^ (j >> 12) as u8 ^ j as u8)
                };
            }
            let done = d.write_batch(0, &sectors[..batch], buf as u64, |k, status| {
                fnv(k as u8);
                fnv(status);
                if status != 0 {
                    errors += 1;
                }
            });
            if done != batch {
                fnv(0xfd);
            }
            continue;
        }
        let sector = (x % blocks) * 8;
        let write = (x >> 32).is_multiple_of(3);
        if write {
            for j in 0..4096usize {
                // SAFETY: the DMA data buffer, 64 KiB, of which 4 KiB are used here.
                unsafe {
                    buf.add(j)
                        .write_volatile((i as u8).wrapping_mul(31) ^ j as u8)
                };
            }
        }
        let r = if write {
            d.write(0, sector, buf as u64, 4096)
        } else {
            d.read(0, sector, buf as u64, 4096)
        };
        let status = r.map_or(0xff, |(s, _)| s);
        fnv(status);
        if status != 0 {
            errors += 1;
        } else if !write {
            for j in 0..4096usize {
                // SAFETY: as above; the device wrote it.
                fnv(unsafe { buf.add(j).read_volatile() });
            }
        }
    }
    Line::new()
        .s("tg: blk digest ops=")
        .u(count)
        .s(" errors=")
        .u(errors)
        .s(" fnv=")
        .hex16(digest)
        .emit();
}

/// Waits for disk 0 to grow (a configuration-change interrupt), then writes and reads back
/// the last 4 KiB of the new capacity, past the old end.
/// The VMM's PCI hotplug controller (vmm-devices' platform/pci_hotplug.rs): PCIU, PCID, B0EJ.
const PCI_HOTPLUG_PORT: u16 = 0x0ce8;
const GED_PCI_HOTPLUG: u8 = 1 << 3;

/// Disk hotplug as an ACPI driver does it, on the registers directly: each GED PCI event is
/// taken (cleared), PCIU and PCID read. A disk put in a slot is brought up and written: the
/// `blk` pattern (seed tg.blk.seed) over its first 256 KiB, flushed, read back and checked. A
/// disk to eject is ejected (B0EJ): with tg.hp.inflight=1 only after a batch of 4 KiB writes
/// (pattern words at sectors 1024 + 8i) was put in flight and not waited for; the writes'
/// completions are then counted (the device must complete or fail each one). tg.hp.ignore=1:
/// eject requests are ignored. The power button ends it.
fn blk_hotplug(cmdline: &str) {
    let seed = param(cmdline, "tg.blk.seed=")
        .and_then(parse_u64)
        .unwrap_or(1);
    let inflight = param(cmdline, "tg.hp.inflight=") == Some("1");
    let ignore = param(cmdline, "tg.hp.ignore=") == Some("1");
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    let n = blk::probe(&mut disks);
    Line::new()
        .s("tg: hotplug-blk ready disks=")
        .u(n as u64)
        .emit();
    loop {
        let ged = io::inb(GED_PORT);
        if ged & 1 != 0 {
            io::outb(GED_PORT, 1);
            Line::new().s("tg: power button").emit();
            return;
        }
        if ged & GED_PCI_HOTPLUG == 0 {
            core::hint::spin_loop();
            continue;
        }
        io::outb(GED_PORT, GED_PCI_HOTPLUG);
        let up = io::inl(PCI_HOTPLUG_PORT);
        let down = io::inl(PCI_HOTPLUG_PORT + 4);
        Line::new()
            .s("tg: pci-event up=")
            .hex(up.into())
            .s(" down=")
            .hex(down.into())
            .emit();
        for slot in (1..32u8).filter(|s| up & (1 << s) != 0) {
            let Some(i) = disks.iter().position(Option::is_none) else {
                Line::new().s("tg: error hp no room").emit();
                continue;
            };
            match blk::init(i, slot) {
                Ok(d) => disks[i] = Some(hp_write_check(d, seed)),
                Err(why) => Line::new().s("tg: error hp init ").s(why).emit(),
            }
        }
        for slot in (1..32u8).filter(|s| down & (1 << s) != 0) {
            let at = disks
                .iter()
                .position(|d| d.as_ref().is_some_and(|d| d.slot == slot));
            if ignore {
                Line::new()
                    .s("tg: hp-eject-ignored slot=")
                    .u(slot.into())
                    .emit();
                continue;
            }
            let mut line = Line::new().s("tg: hp-ejected slot=").u(slot.into());
            let mut pending = None;
            if let (true, Some(i)) = (inflight, at) {
                let d = disks[i].as_mut().expect("found");
                let buf = blk::data_buf() as u64;
                let mut sectors = [0u64; blk::BATCH];
                for (k, s) in sectors.iter_mut().enumerate() {
                    *s = 1024 + 8 * k as u64;
                    hp_fill(buf + 4096 * k as u64, *s * 512, seed);
                }
                pending = Some(d.submit_batch(0, &sectors, buf));
            }
            io::outl(PCI_HOTPLUG_PORT + 8, 1 << slot);
            if let (Some(n), Some(i)) = (pending, at) {
                let d = disks[i].as_mut().expect("found");
                let mut ok = 0u64;
                let got = d.reap_batch(0, n, 2_000_000_000, |_, st| ok += u64::from(st == 0));
                line = line
                    .s(" in-flight=")
                    .u(n as u64)
                    .s(" answered=")
                    .u(got as u64)
                    .s(" ok=")
                    .u(ok);
            }
            line.emit();
            if let Some(i) = at {
                disks[i] = None;
            }
        }
    }
}

/// Fills 4 KiB at `buf` with the `blk` pattern of the disk bytes at `offset`.
fn hp_fill(buf: u64, offset: u64, seed: u64) {
    for w in 0..512u64 {
        let v = (offset / 8 + w).wrapping_add(seed).wrapping_mul(blk::K);
        // SAFETY: the caller's buffer in the DMA area, 4 KiB.
        unsafe { ((buf + 8 * w) as *mut u64).write_volatile(v) };
    }
}

/// A hot-added disk written with the pattern over its first 256 KiB, flushed, read back and
/// checked; reported as "tg: hp-added".
fn hp_write_check(mut d: blk::Disk, seed: u64) -> blk::Disk {
    let buf = blk::data_buf() as u64;
    let chunk = blk::CHUNK as u64;
    let mut write = 0u8;
    let mut same = true;
    for c in 0..(256 * 1024 / chunk) {
        let at = c * chunk;
        for k in 0..chunk / 4096 {
            hp_fill(buf + 4096 * k, at + 4096 * k, seed);
        }
        write |= d
            .write(0, at / 512, buf, chunk as u32)
            .map_or(0xff, |(s, _)| s);
    }
    write |= d.flush(0).map_or(0xff, |(s, _)| s);
    for c in 0..(256 * 1024 / chunk) {
        let at = c * chunk;
        // SAFETY: the DMA data buffer, cleared before the device writes it.
        unsafe { core::ptr::write_bytes(buf as *mut u8, 0, chunk as usize) };
        write |= d
            .read(0, at / 512, buf, chunk as u32)
            .map_or(0xff, |(s, _)| s);
        for w in 0..chunk / 8 {
            let want = (at / 8 + w).wrapping_add(seed).wrapping_mul(blk::K);
            // SAFETY: as above; the device wrote it.
            same &= unsafe { ((buf + 8 * w) as *const u64).read_volatile() } == want;
        }
    }
    Line::new()
        .s("tg: hp-added slot=")
        .u(d.slot.into())
        .s(" capacity=")
        .u(d.capacity)
        .s(" status=")
        .u(write.into())
        .s(if same { " data=ok" } else { " data=differs" })
        .emit();
    d
}

fn blk_resize() {
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    if blk::probe(&mut disks) == 0 {
        Line::new().s("tg: resize no disk").emit();
        return;
    }
    let d = disks[0].as_mut().expect("probed");
    let (g0, old) = d.read_capacity();
    Line::new()
        .s("tg: resize capacity=")
        .u(old)
        .s(" generation=")
        .u(g0.into())
        .s(" waiting")
        .emit();
    let mut spins = 0u64;
    while !d.config_irq_seen() {
        spins += 1;
        if spins > 4_000_000_000 {
            Line::new().s("tg: resize no config interrupt").emit();
            return;
        }
        core::hint::spin_loop();
    }
    let (g, cap) = d.read_capacity();
    Line::new()
        .s("tg: resize config-irq capacity=")
        .u(cap)
        .s(" generation=")
        .u(g.into())
        .emit();
    if cap <= old {
        return;
    }
    let buf = blk::data_buf();
    let sector = cap - 8;
    for j in 0..4096usize {
        // SAFETY: the DMA data buffer, 64 KiB, of which 4 KiB are used here.
        unsafe { buf.add(j).write_volatile((j as u8) ^ 0x5a) };
    }
    let w = d
        .write(0, sector, buf as u64, 4096)
        .map_or(0xff, |(s, _)| s);
    for j in 0..4096usize {
        // SAFETY: as above.
        unsafe { buf.add(j).write_volatile(0) };
    }
    let r = d.read(0, sector, buf as u64, 4096).map_or(0xff, |(s, _)| s);
    // SAFETY: as above; the device wrote it.
    let same = (0..4096usize).all(|j| unsafe { buf.add(j).read_volatile() } == (j as u8) ^ 0x5a);
    Line::new()
        .s("tg: resize sector=")
        .u(sector)
        .s(" write-status=")
        .u(w.into())
        .s(" read-status=")
        .u(r.into())
        .s(if same { " data=ok" } else { " data=differs" })
        .emit();
}

fn blk_seq(cmdline: &str) {
    let count = param(cmdline, "tg.seq.count=")
        .and_then(parse_u64)
        .unwrap_or(1000);
    // Writes in flight at once: 1 waits for each; more lets blockd complete them out of order.
    let depth = param(cmdline, "tg.seq.depth=")
        .and_then(parse_u64)
        .unwrap_or(1)
        .clamp(1, blk::BATCH as u64);
    blk::WANT_WCE.store(true, Ordering::Relaxed);
    blk::WANT_EVENT_IDX.store(
        param(cmdline, "tg.seq.event-idx=").and_then(parse_u64) != Some(0),
        Ordering::Relaxed,
    );
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    if blk::probe(&mut disks) == 0 {
        Line::new().s("tg: seq no disk").emit();
        return;
    }
    let d = disks[0].as_mut().expect("probe found one");
    // Write-through by default (each acknowledgement promises the block is durable, as a
    // FUA write does); tg.seq.writeback=1 turns the cache on, and tg.seq.flush=N flushes
    // after every N writes, "tg: flushed S" promising every block up to S.
    let wb = if param(cmdline, "tg.seq.writeback=").and_then(parse_u64) == Some(1) {
        d.write_back()
    } else {
        d.write_through()
    };
    let flush_every = param(cmdline, "tg.seq.flush=")
        .and_then(parse_u64)
        .unwrap_or(0);
    Line::new().s("tg: seq writeback=").u(wb as u64).emit();
    let blocks = d.capacity / 8;
    let buf = blk::data_buf() as *mut u64;
    let fill = seq_block;
    let (mut errors, mut timeouts) = (0u64, 0u64);
    let mut seq = 0;
    while seq < count {
        if depth == 1 {
            fill(buf, seq);
            match d.write(0, (seq % blocks) * 8, buf as u64, 4096) {
                Some((0, _)) => {
                    Line::new().s("tg: ack ").u(seq).emit();
                    if flush_every > 0 && (seq + 1).is_multiple_of(flush_every) {
                        match d.flush(0) {
                            Some((0, _)) => Line::new().s("tg: flushed ").u(seq).emit(),
                            _ => Line::new().s("tg: seq flush error ").u(seq).emit(),
                        }
                    }
                }
                Some((status, _)) => {
                    errors += 1;
                    Line::new()
                        .s("tg: seq error ")
                        .u(seq)
                        .s(" status=")
                        .u(status as u64)
                        .emit();
                }
                None => {
                    timeouts += 1;
                    Line::new().s("tg: seq timeout ").u(seq).emit();
                }
            }
            seq += 1;
            continue;
        }
        let n = depth.min(count - seq) as usize;
        let mut sectors = [0u64; blk::BATCH];
        for (i, s) in sectors[..n].iter_mut().enumerate() {
            let this = seq + i as u64;
            // SAFETY: block i of the data buffer (BATCH blocks of 4 KiB fit in CHUNK).
            fill(unsafe { buf.add(512 * i) }, this);
            *s = (this % blocks) * 8;
        }
        let got = d.write_batch(0, &sectors[..n], buf as u64, |i, status| {
            let this = seq + i as u64;
            if status == 0 {
                Line::new().s("tg: ack ").u(this).emit();
            } else {
                errors += 1;
                Line::new()
                    .s("tg: seq error ")
                    .u(this)
                    .s(" status=")
                    .u(status as u64)
                    .emit();
            }
        });
        if got < n {
            // The ring's state is unknown now: stop here.
            timeouts += (n - got) as u64;
            Line::new().s("tg: seq timeout ").u(seq).emit();
            break;
        }
        seq += n as u64;
    }
    Line::new()
        .s("tg: seq done count=")
        .u(count)
        .s(" depth=")
        .u(depth)
        .s(" writeback=")
        .u(wb as u64)
        .s(" errors=")
        .u(errors)
        .s(" timeouts=")
        .u(timeouts)
        .s(" event-idx=")
        .u(u64::from(d.features & (1 << 29) != 0))
        .s(" kicks=")
        .u(d.kicks)
        .s(" kicks-skipped=")
        .u(d.kicks_skipped)
        .emit();
}

/// Malformed requests, as a hostile driver would send them; each must get an answer (or at
/// least not hurt the device), and a good request must work afterwards.
fn blk_bad(stack_top: u64) {
    let mut disks: [Option<blk::Disk>; 4] = [None, None, None, None];
    blk::probe(&mut disks);
    let Some(d) = disks[0].as_mut() else {
        Line::new().s("tg: error no disk").emit();
        return;
    };
    let (hdr, status) = d.header_and_status();
    let buf = blk::data_buf() as u64;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let outside = 0xffff_f000_0000u64;
    let cap = d.capacity;
    // (name, type, sector, chain)
    let cases: [(&str, u32, u64, &[blk::RawDesc]); 11] = [
        (
            "header-outside-ram",
            0,
            0,
            &[(outside, 16, NEXT, 1), (status, 1, WRITE, 0)],
        ),
        (
            "data-outside-ram",
            0,
            0,
            &[
                (hdr, 16, NEXT, 1),
                (outside, 512, NEXT | WRITE, 2),
                (status, 1, WRITE, 0),
            ],
        ),
        (
            "short-header",
            0,
            0,
            &[(hdr, 8, NEXT, 1), (status, 1, WRITE, 0)],
        ),
        (
            "odd-length",
            1,
            0,
            &[
                (hdr, 16, NEXT, 1),
                (buf, 100, NEXT, 2),
                (status, 1, WRITE, 0),
            ],
        ),
        (
            "unknown-type",
            77,
            0,
            &[(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)],
        ),
        (
            "beyond-capacity",
            0,
            cap,
            &[
                (hdr, 16, NEXT, 1),
                (buf, 512, NEXT | WRITE, 2),
                (status, 1, WRITE, 0),
            ],
        ),
        (
            "sector-overflow",
            1,
            u64::MAX / 8,
            &[
                (hdr, 16, NEXT, 1),
                (buf, 512, NEXT, 2),
                (status, 1, WRITE, 0),
            ],
        ),
        ("no-status", 0, 0, &[(hdr, 16, 0, 0)]),
        (
            "self-loop",
            0,
            0,
            &[(hdr, 16, NEXT, 1), (status, 1, WRITE | NEXT, 1)],
        ),
        (
            "next-out-of-range",
            0,
            0,
            &[(hdr, 16, NEXT, 200), (status, 1, WRITE, 0)],
        ),
        ("bad-indirect", 0, 0, &[(outside, 64, INDIRECT, 0)]),
    ];
    let mut answered = 0;
    for (name, kind, sector, chain) in cases.iter() {
        let r = d.request_raw(*kind, *sector, chain);
        if r.is_some() {
            answered += 1;
        }
        Line::new()
            .s("tg: blk-bad case=")
            .s(name)
            .s(" answered=")
            .u(r.is_some() as u64)
            .s(" status=")
            .u(r.map_or(0xff, |r| r.0) as u64)
            .s(" used=")
            .u(r.map_or(0, |r| r.1) as u64)
            .emit();
    }
    // Still serving: a good write and read of one chunk.
    pattern_job(0, blk::CHUNK as u64 / 8, 0, 5, stack_top);
    let w = d.write(0, 0, buf, blk::CHUNK as u32);
    pattern_job(0, blk::CHUNK as u64 / 8, 0, 6, stack_top);
    let r = d.read(0, 0, buf, blk::CHUNK as u32);
    let bad = pattern_job(1, blk::CHUNK as u64 / 8, 0, 5, stack_top);
    Line::new()
        .s("tg: blk-bad answered=")
        .u(answered)
        .s(" after write-status=")
        .u(w.map_or(0xff, |r| r.0) as u64)
        .s(" read-status=")
        .u(r.map_or(0xff, |r| r.0) as u64)
        .s(" bad-words=")
        .u(bad)
        .emit();
}

/// Counts a request's failure: (error statuses, requests never answered).
fn tally(counts: &mut (u64, u64), r: Option<(u8, u32)>) {
    match r {
        Some((0, _)) => {}
        Some(_) => counts.0 += 1,
        None => counts.1 += 1,
    }
}

/// A pattern job on part of the data buffer: `words` words from buffer word `at`, which hold
/// disk words `at`.. (the buffer holds the disk's first chunk).
fn pattern_job_at(op: u64, at: u64, words: u64, seed: u64, stack_top: u64) -> u64 {
    // SAFETY: no user task runs now, so JOB is ours to write.
    unsafe {
        JOB = Job {
            op,
            buf: blk::data_buf() as u64 + at * 8,
            words,
            first_word: at,
            seed,
        };
    }
    let arg = core::ptr::addr_of!(JOB) as u64;
    // SAFETY: user_job ends with ud2, which isr_common turns into a return from run_user.
    unsafe { entry::run_user(user_job as *const () as u64, arg, stack_top) };
    USER_RESULT.load(Ordering::SeqCst)
}

/// The value of `key` (which includes its `=`) on a space-separated command line.
fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split(' ').find_map(|w| w.strip_prefix(key))
}

fn parse_u64(s: &str) -> Option<u64> {
    let mut v: u64 = 0;
    if s.is_empty() {
        return None;
    }
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new();
    line = line.s("tg: error panic");
    if let Some(loc) = info.location() {
        line = line.s(" at ").s(loc.file()).s(":").u(loc.line() as u64);
    }
    line.emit();
    rt::halt_forever();
}
