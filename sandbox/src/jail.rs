//! The sandbox a helper enters before it reads untrusted input. In order:
//! 1. every descriptor but the ones it keeps is closed;
//! 2. new mount, IPC, UTS, PID and (unless it needs the network) net namespaces;
//! 3. the root becomes an empty, read-only tmpfs (pivot_root);
//! 4. every capability goes, the bounding set included; the process takes an unprivileged
//!    uid and gid;
//! 5. no_new_privs, and rlimits: no core dumps, bounded descriptors and address space;
//! 6. it forks: the child is PID 1 of the new PID namespace and goes on as the helper; the
//!    parent (which must stay in the host's PID namespace to be the child's parent) is
//!    already as confined as the child and, under a seccomp list of the few calls it makes,
//!    only passes stop signals on, waits, and exits as the child did, so whoever started
//!    the helper sees its end. No process of the helper stays outside the sandbox.
//!
//! It must run while the process has a single thread (before any runtime starts). Without
//! root (under systemd's DynamicUser, say) the steps that need privileges are skipped and the
//! service manager's own sandbox is the wall; the rest still applies.

use crate::SandboxError;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, fork, pivot_root, setgroups, setresgid, setresuid, ForkResult};
use nix::unistd::{Gid, Uid};
use std::os::fd::RawFd;

pub struct Jail {
    /// Who the helper runs as (the default is nobody: 65534).
    pub uid: u32,
    pub gid: u32,
    /// A new network namespace (every helper but migrated).
    pub new_net: bool,
    /// Descriptors that stay open (0, 1 and 2 always do).
    pub keep: Vec<RawFd>,
    /// RLIMIT_NOFILE.
    pub max_fds: u64,
    /// RLIMIT_AS, in bytes.
    pub max_address_space: u64,
}

impl Default for Jail {
    fn default() -> Jail {
        Jail {
            uid: 65534,
            gid: 65534,
            new_net: true,
            keep: Vec::new(),
            max_fds: 256,
            max_address_space: 4 << 30,
        }
    }
}

/// A failed step of the jail, named.
fn step(what: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |e| SandboxError::Jail(what, e)
}

/// A raw system call's result as the step's error.
fn check(what: &'static str, r: libc::c_long) -> Result<(), SandboxError> {
    if r < 0 {
        Err(SandboxError::Jail(what, nix::Error::last()))
    } else {
        Ok(())
    }
}

/// Enters the sandbox; returns in the sandboxed child (`who` names its waiting parent in a
/// seccomp report). Whether the privileged steps ran is the Ok value.
pub fn enter(jail: &Jail, who: &'static str) -> Result<bool, SandboxError> {
    close_other_fds(&jail.keep)?;
    let root = nix::unistd::geteuid().is_root();
    if root {
        namespaces(jail)?;
        empty_root()?;
        drop_privileges(jail)?;
    }
    prctl::set_no_new_privs().map_err(step("no_new_privs"))?;
    let limit = |r: Resource, v: u64| setrlimit(r, v, v).map_err(step("setrlimit"));
    limit(Resource::RLIMIT_CORE, 0)?;
    limit(Resource::RLIMIT_NOFILE, jail.max_fds)?;
    limit(Resource::RLIMIT_AS, jail.max_address_space)?;
    if root {
        fork_into_the_pid_namespace(who)?;
    }
    Ok(root)
}

/// close_range(2) over [from, to]; nix and std have no wrapper for it.
fn close_range(from: u32, to: u32) -> Result<(), SandboxError> {
    // SAFETY: closes descriptors nobody in this single-threaded process still uses; no memory
    // is involved.
    check("close_range", unsafe {
        libc::syscall(libc::SYS_close_range, from, to, 0)
    })
}

fn close_other_fds(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<RawFd> = keep.iter().copied().chain([0, 1, 2]).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: u32 = 0;
    for &k in &keep {
        if k as u32 > from {
            close_range(from, k as u32 - 1)?;
        }
        from = k as u32 + 1;
    }
    close_range(from, u32::MAX)
}

/// New namespaces. The PID namespace applies to the next child (see
/// `fork_into_the_pid_namespace`); the others to this process already.
fn namespaces(jail: &Jail) -> Result<(), SandboxError> {
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if jail.new_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(step("unshare"))
}

/// Forks so that the helper is PID 1 of its own PID namespace. Returns in the child; the
/// parent waits for it and exits with its status.
fn fork_into_the_pid_namespace(who: &'static str) -> Result<(), SandboxError> {
    // Both die with their parent. (Set only now: the change of uid cleared vmm-core's.)
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("the parent-death signal"))?;
    // Signals that stop the helper are passed on to it by the parent; SIGCHLD says it ended.
    // All are blocked before the fork, so none is lost: the parent takes them with sigwait.
    let mut stop = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stop.add(s);
    }
    let mut waited = stop;
    waited.add(Signal::SIGCHLD);
    waited.thread_block().map_err(step("blocking signals"))?;
    // The child learns that the parent is gone from this pipe's write end closing: PID 1
    // of a namespace has no parent PID to look at.
    let (parent_alive, parent_holds) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    // SAFETY: the process is single-threaded, so the child may run any code.
    match unsafe { fork() }.map_err(step("fork"))? {
        ForkResult::Child => {
            drop(parent_holds);
            prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("the parent-death signal"))?;
            // Had the parent died before the line above, no signal would come.
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&parent_alive),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_err(step("poll"))? > 0 {
                // The VMM went away while this helper started (it refused its own settings,
                // say): nobody is left to serve or to tell, and a line on the VMM's stderr
                // would only trail its one-line error.
                std::process::exit(1);
            }
            drop(parent_alive);
            // The child takes the stop signals itself.
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&waited), None)
                .map_err(step("unblocking signals"))
        }
        ForkResult::Parent { child } => {
            drop(parent_alive);
            // Keep only stderr (for the one line below) and the pipe, then the filter.
            let keep = std::os::fd::AsRawFd::as_raw_fd(&parent_holds);
            let _ = close_other_fds(&[keep]);
            let _ = close_range(0, 1);
            if let Err(e) =
                crate::seccomp::install(who, &waiting_parent(), crate::seccomp::Mode::Kill)
            {
                // Not confined, so it does not wait: the helper ends, and this with it.
                eprintln!("{who}: error: the waiting parent's seccomp filter: {e}");
                let _ = kill(child, Signal::SIGKILL);
            }
            wait_for(child, &waited, who)
        }
    }
}

/// The system calls of the waiting parent, once its filter is on.
fn waiting_parent() -> Vec<crate::seccomp::Allow> {
    use crate::seccomp::allow;
    vec![
        allow("rt_sigtimedwait", "waits for a stop signal or SIGCHLD"),
        allow("wait4", "reaps the helper"),
        allow("kill", "passes a stop signal on to the helper"),
        allow("write", "one line on stderr if the helper was killed"),
        allow("exit_group", "ends as the helper did"),
        allow("exit", "ends as the helper did"),
        allow("rt_sigreturn", "returns from the SIGSYS reporter"),
    ]
}

/// The parent's life: it holds nothing the helper uses (its end of a connection must close
/// when the helper dies), passes on stop signals, and ends as the child did.
fn wait_for(child: nix::unistd::Pid, waited: &SigSet, who: &str) -> ! {
    let code = loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(child, sig);
                continue;
            }
        }
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                eprintln!(
                    "{who}: error: the sandboxed process was killed by signal {}{}",
                    sig as i32,
                    if sig == Signal::SIGSYS {
                        " (SIGSYS: a system call its seccomp filter forbids)"
                    } else {
                        ""
                    }
                );
                break 128 + sig as i32;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("{who}: error: waiting for the sandboxed process: {e}");
                break 1;
            }
        }
    };
    // _exit: the child owns what destructors would release.
    // SAFETY: ends the process; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// Makes the root an empty, read-only tmpfs: nothing of the host's file system is reachable.
fn empty_root() -> Result<(), SandboxError> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("making mounts private"))?;
    // Any directory serves as the mount point: this mount namespace is ours alone.
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=16k,mode=0555"),
    )
    .map_err(step("mounting the new root"))?;
    chdir("/tmp").map_err(step("chdir"))?;
    pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    chdir("/").map_err(step("chdir /"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(step("making the root read-only"))
}

/// Drops every capability (the bounding and ambient sets too) and becomes `uid`/`gid`.
fn drop_privileges(jail: &Jail) -> Result<(), SandboxError> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        // SAFETY: PR_CAPBSET_DROP only changes this process's bounding set (nix has no
        // wrapper for it).
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        check("dropping the bounding set", r.into())?;
    }
    // SAFETY: clears this process's ambient set; no memory is involved.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check("clearing ambient capabilities", r.into())?;
    setgroups(&[]).map_err(step("setgroups"))?;
    let gid = Gid::from_raw(jail.gid);
    setresgid(gid, gid, gid).map_err(step("setresgid"))?;
    let uid = Uid::from_raw(jail.uid);
    setresuid(uid, uid, uid).map_err(step("setresuid"))?;
    clear_capabilities()
}

/// capset(2) with empty effective, permitted and inheritable sets (libc and nix have no
/// wrapper; the structures are the kernel's, version 3).
fn clear_capabilities() -> Result<(), SandboxError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid, properly laid-out structures that live across the
    // call; version 3 takes two Data entries.
    check("capset", unsafe {
        libc::syscall(libc::SYS_capset, &mut header, data.as_ptr())
    })
}
