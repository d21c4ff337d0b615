//! Getting vCPU threads out of KVM_RUN: a real-time signal whose handler does nothing (the
//! interrupted ioctl returns EINTR), repeated until the thread has done what it was asked
//! (park for a pause, or end). Pause parks every thread outside KVM_RUN until resumed.

use super::RunState;
use kvm_ioctls::VcpuFd;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::Killable;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal's handler, before any vCPU thread exists.
pub fn install_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Kicks one thread out of KVM_RUN once (a thread that has ended is left alone).
fn kick(t: &JoinHandle<VcpuFd>) {
    if !t.is_finished() {
        // The handle is not joined, so its pthread_t is valid; a thread that ended since the
        // check gets a signal it no longer handles, which pthread_kill reports, not raises.
        let _ = t.kill(kick_signal());
    }
}

/// Pauses the VM: every vCPU leaves KVM_RUN and parks. Returns once all are parked.
pub fn pause(state: &RunState, threads: &[&JoinHandle<VcpuFd>]) {
    let mut p = state.pause.lock().unwrap();
    p.paused = true;
    loop {
        let running = threads.iter().filter(|t| !t.is_finished()).count();
        if p.parked >= running {
            return;
        }
        drop(p);
        // A kick can land just before KVM_RUN; repeat it until every vCPU is parked.
        kick_all(threads);
        p = state.pause.lock().unwrap();
        p = state
            .pause_changed
            .wait_timeout(p, Duration::from_millis(2))
            .unwrap()
            .0;
    }
}

pub fn resume(state: &RunState) {
    state.pause.lock().unwrap().paused = false;
    state.pause_changed.notify_all();
}

/// Kicks every vCPU out of KVM_RUN once.
pub fn kick_all(threads: &[&JoinHandle<VcpuFd>]) {
    for t in threads {
        kick(t);
    }
}

/// Stops every vCPU thread: set the flag, then kick each out of KVM_RUN with a signal until it
/// has ended (a kick that lands just before KVM_RUN is repeated).
pub fn stop_all(state: &RunState, threads: Vec<JoinHandle<VcpuFd>>) {
    state.stopping.store(true, Ordering::Release);
    {
        // Wake vCPUs parked by a pause.
        let _p = state.pause.lock().unwrap();
        state.pause_changed.notify_all();
    }
    for t in threads {
        let _ = end_thread(t);
    }
}

/// Kicks a vCPU thread out of KVM_RUN until it has ended (its stop flag must be set; a kick
/// that lands just before KVM_RUN is repeated), and joins it.
pub fn end_thread(t: JoinHandle<VcpuFd>) -> std::thread::Result<VcpuFd> {
    while !t.is_finished() {
        kick(&t);
        std::thread::sleep(Duration::from_micros(200));
    }
    t.join()
}
