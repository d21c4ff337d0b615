//! `--print-boot-times`: where start-up spends its time and its CPU. Each phase, as it ends,
//! prints `boot-time PHASE unix-ns=N cpu-us=C` (wall-clock time, and this process's CPU time
//! so far, all threads) on stderr, for bench/boot.sh's breakdown from exec to the first
//! KVM_RUN.

use std::sync::atomic::{AtomicBool, Ordering};

static ON: AtomicBool = AtomicBool::new(false);

/// Turns the marks on (`--print-boot-times`).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The phase `phase` ends now. (clock_gettime is allowed to every thread's system call
/// filter: a vCPU thread may mark.)
pub fn mark(phase: &str) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let cpu_us = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(|t| t.tv_sec() * 1_000_000 + t.tv_nsec() / 1000)
        .unwrap_or(0);
    log::info!("boot-time {phase} unix-ns={ns} cpu-us={cpu_us}");
}
