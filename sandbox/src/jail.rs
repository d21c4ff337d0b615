//! The sandbox a helper enters before it reads untrusted input. In order:
//! 1. every descriptor but the ones it keeps is closed;
//! 2. new mount, IPC, UTS, PID and (unless it needs the network) net namespaces; the process
//!    forks, and the child (PID 1 of the new PID namespace) goes on as the helper while the
//!    parent waits for it and exits as it did (so whoever started the helper sees its end);
//! 3. the root becomes an empty, read-only tmpfs (pivot_root);
//! 4. every capability goes, the bounding set included; the helper takes an unprivileged
//!    uid and gid;
//! 5. no_new_privs, and rlimits: no core dumps, bounded descriptors and address space.
//!
//! It must run while the process has a single thread (before any runtime starts). Without
//! root (under systemd's DynamicUser, say) the steps that need privileges are skipped and the
//! service manager's own sandbox is the wall; the rest still applies.

use std::ffi::CString;
use std::io;
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
    /// Paths the helper made outside (its listening socket) that it cannot reach from inside:
    /// the waiting parent removes them when the helper ends.
    pub remove_at_exit: Vec<std::path::PathBuf>,
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
            remove_at_exit: Vec::new(),
        }
    }
}

fn check(what: &str, r: libc::c_int) -> Result<(), String> {
    if r < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Enters the sandbox; returns in the sandboxed child. Whether the privileged steps ran is
/// the Ok value.
pub fn enter(jail: &Jail) -> Result<bool, String> {
    close_other_fds(&jail.keep)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        namespaces(jail)?;
        empty_root()?;
        drop_privileges(jail)?;
        // The child dies with the parent that waits for it. (Set only now: a change of uid
        // clears it.)
        // SAFETY: prctl only sets this process's parent-death signal.
        check("the parent-death signal", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL)
        })?;
    }
    // SAFETY: prctl with these arguments only sets this process's flags.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    rlimit(libc::RLIMIT_CORE, 0)?;
    rlimit(libc::RLIMIT_NOFILE, jail.max_fds)?;
    rlimit(libc::RLIMIT_AS, jail.max_address_space)?;
    Ok(root)
}

fn rlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), String> {
    let l = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: l is a valid rlimit.
    check("setrlimit", unsafe { libc::setrlimit(resource, &l) })
}

fn close_other_fds(keep: &[RawFd]) -> Result<(), String> {
    let mut keep: Vec<RawFd> = keep.iter().copied().chain([0, 1, 2]).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: u32 = 0;
    for &k in &keep {
        if k as u32 > from {
            // SAFETY: closes descriptors nobody in this single-threaded process still uses.
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above.
    check("close_range", unsafe {
        libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) as libc::c_int
    })
}

/// New namespaces; forks so that the helper is PID 1 of its own PID namespace. Returns in the
/// child; the parent waits for it and exits with its status.
fn namespaces(jail: &Jail) -> Result<(), String> {
    // The PID namespace applies to the next child; the others are the child's alone (the
    // waiting parent keeps the host's mounts, to clean up after it).
    // SAFETY: unshare affects only this (single-threaded) process.
    check("unshare (pid)", unsafe {
        libc::unshare(libc::CLONE_NEWPID)
    })?;
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if jail.new_net {
        flags |= libc::CLONE_NEWNET;
    }
    // Signals that stop the helper are passed on to it by the parent.
    let stop = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    // SAFETY: sigset manipulation on a local set, then this thread's mask.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in stop {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: the process is single-threaded, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // The child takes the stop signals itself.
        // SAFETY: prctl and sigprocmask only change this process's state.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        // SAFETY: unshare affects only this (single-threaded) process.
        return check("unshare", unsafe { libc::unshare(flags) });
    }
    // The parent holds nothing the helper uses (its end of a connection must close when the
    // helper dies), passes on stop signals, and ends as the child did.
    // SAFETY: closes this process's own descriptors; the child has its copies.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0) };
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: set is a valid sigset; a null siginfo is allowed.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            // SAFETY: pid is our child, not yet reaped.
            unsafe { libc::kill(pid, sig) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            for p in &jail.remove_at_exit {
                let _ = std::fs::remove_file(p);
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                let sig = libc::WTERMSIG(status);
                eprintln!(
                    "sandbox: the sandboxed process was killed by signal {sig}{}",
                    if sig == libc::SIGSYS {
                        " (SIGSYS: a system call its seccomp filter forbids)"
                    } else {
                        ""
                    }
                );
                128 + sig
            };
            // SAFETY: _exit ends the process without running destructors that the child owns.
            unsafe { libc::_exit(code) };
        }
    }
}

/// Makes the root an empty, read-only tmpfs: nothing of the host's file system is reachable.
fn empty_root() -> Result<(), String> {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (root, tmpfs, dot) = (c("/"), c("tmpfs"), c("."));
    // SAFETY: mount/chdir/pivot_root/umount2 with valid C strings, in our own mount namespace.
    unsafe {
        check(
            "making mounts private",
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        // Any directory serves as the mount point: this mount namespace is ours alone.
        let target = c("/tmp");
        let opts = c("size=16k,mode=0555");
        check(
            "mounting the new root",
            libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
        )?;
        check("chdir", libc::chdir(target.as_ptr()))?;
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
        )?;
        check(
            "detaching the old root",
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
        )?;
        check("chdir /", libc::chdir(root.as_ptr()))?;
        check(
            "making the root read-only",
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
        )?;
    }
    Ok(())
}

/// Drops every capability (the bounding and ambient sets too) and becomes `uid`/`gid`.
fn drop_privileges(jail: &Jail) -> Result<(), String> {
    // SAFETY: prctl/setgroups/setresgid/setresuid/capset only change this process's
    // credentials; the capset header and data are valid structures.
    unsafe {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
            .unwrap_or(40);
        for cap in 0..=last {
            check(
                "dropping the bounding set",
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0),
            )?;
        }
        check(
            "clearing ambient capabilities",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
        )?;
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(jail.gid, jail.gid, jail.gid))?;
        check("setresuid", libc::setresuid(jail.uid, jail.uid, jail.uid))?;
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
        check(
            "capset",
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int,
        )?;
    }
    Ok(())
}
