//! seccomp allowlists: a common base every helper needs, layered with each helper's own
//! system calls (as crosvm does), each with a one-line reason, arguments filtered where it
//! matters. The default action kills the process: in `Kill` mode through SIGSYS, whose handler
//! first writes one line to stderr naming the helper and the system call (vmm-core reads the
//! helpers' stderr, logs it and emits an event), then lets the signal kill the process; in
//! `Log` mode the kernel only logs the call (SECCOMP_RET_LOG, for developing allowlists).
//!
//! The filter is installed while the helper has one thread, after its sandbox and before it
//! reads untrusted input; threads created later inherit it.

use crate::SandboxError;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicPtr, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Report the forbidden call on stderr, then die by SIGSYS.
    Kill,
    /// Let the call through and have the kernel log it (audit, type 1326).
    Log,
}

/// A `--seccomp` mode that is neither kill nor log.
#[derive(Debug, thiserror::Error)]
#[error("{0}: write kill or log")]
pub struct UnknownMode(String);

impl std::str::FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Mode, UnknownMode> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            _ => Err(UnknownMode(s.to_string())),
        }
    }
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Kill => "kill",
            Mode::Log => "log",
        }
    }
}

/// A condition on argument `arg`.
#[derive(Debug, Clone, Copy)]
pub enum Cond {
    /// arg == value
    Eq(u8, u64),
    /// arg & mask == value
    Masked(u8, u64, u64),
    /// arg != value
    Ne(u8, u64),
}

/// One allowed system call: its name, why, and the argument conditions of each alternative
/// (none: always allowed; several: any one of them).
#[derive(Debug, Clone)]
pub struct Allow {
    pub name: &'static str,
    pub why: &'static str,
    pub when: Vec<Vec<Cond>>,
}

pub fn allow(name: &'static str, why: &'static str) -> Allow {
    Allow {
        name,
        why,
        when: Vec::new(),
    }
}

/// Allowed only when one of these conditions holds.
pub fn allow_if(name: &'static str, why: &'static str, when: Vec<Vec<Cond>>) -> Allow {
    Allow { name, why, when }
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// What every helper needs: its threads, memory, event loop, descriptors and signals.
pub fn base() -> Vec<Allow> {
    let no_exec = vec![vec![Cond::Masked(2, PROT_EXEC, 0)]];
    vec![
        allow("read", "reads on inherited and received descriptors"),
        allow("write", "writes on them, and the log on stderr"),
        allow("readv", "vectored reads"),
        allow("writev", "vectored writes"),
        allow("recvfrom", "the control connection"),
        allow("sendto", "the control connection"),
        allow(
            "recvmsg",
            "the control connection and the side channel (SCM_RIGHTS)",
        ),
        allow("sendmsg", "the side channel"),
        allow("close", "descriptors it is done with"),
        allow("shutdown", "ending a connection"),
        allow("epoll_create1", "event loops (tokio, vhost-user workers)"),
        allow("epoll_ctl", "event loops"),
        allow("epoll_wait", "event loops"),
        allow("epoll_pwait", "event loops"),
        allow("poll", "waiting on one descriptor"),
        allow("ppoll", "waiting on one descriptor"),
        allow("eventfd2", "wakers and vhost-user events"),
        allow("futex", "locks and condition variables"),
        allow_if(
            "mmap",
            "the allocator and guest memory, never executable",
            no_exec.clone(),
        ),
        allow_if(
            "mprotect",
            "the allocator (guard pages), never executable",
            no_exec,
        ),
        allow("munmap", "the allocator and guest memory"),
        allow("mremap", "the allocator"),
        allow("madvise", "the allocator returns memory"),
        allow("brk", "the allocator"),
        allow(
            "clone3",
            "thread creation by glibc 2.34+ (its flags live in memory, so no argument filter)",
        ),
        allow_if(
            "clone",
            "thread creation by older glibc: only with CLONE_THREAD",
            vec![vec![Cond::Masked(
                0,
                libc::CLONE_THREAD as u64,
                libc::CLONE_THREAD as u64,
            )]],
        ),
        allow("set_robust_list", "new threads"),
        allow("rseq", "new threads (glibc)"),
        allow("sched_yield", "spinning locks"),
        allow("sched_getaffinity", "thread pools size themselves"),
        allow_if(
            "prctl",
            "naming threads (PR_SET_NAME) only",
            vec![vec![Cond::Eq(0, libc::PR_SET_NAME as u64)]],
        ),
        allow("exit", "a thread ends"),
        allow("exit_group", "the helper ends"),
        allow("rt_sigprocmask", "signal masks of threads"),
        allow("rt_sigreturn", "return from a signal handler"),
        allow(
            "sigaltstack",
            "threads' signal stacks (Rust's stack-overflow guard)",
        ),
        allow_if(
            "rt_sigaction",
            "handlers for any signal but SIGSYS, so that the reporter stays",
            vec![vec![Cond::Ne(0, libc::SIGSYS as u64)]],
        ),
        allow("rt_sigtimedwait", "a thread that waits for SIGTERM"),
        allow_if(
            "seccomp",
            "SECCOMP_SET_MODE_FILTER only: the SIGSYS reporter adds a kill-all filter to die by",
            vec![vec![Cond::Eq(0, 1)]],
        ),
        allow("clock_gettime", "time (when the vDSO cannot)"),
        allow("clock_nanosleep", "sleeps and timers"),
        allow("nanosleep", "sleeps"),
        allow("getrandom", "hash map seeds"),
        allow_if(
            "fcntl",
            "descriptor flags only: F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC",
            [
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_DUPFD_CLOEXEC,
            ]
            .iter()
            .map(|c| vec![Cond::Eq(1, *c as u64)])
            .collect(),
        ),
        allow_if(
            "ioctl",
            "FIONBIO and FIOCLEX on its own descriptors only",
            vec![
                vec![Cond::Eq(1, libc::FIONBIO)],
                vec![Cond::Eq(1, libc::FIOCLEX)],
            ],
        ),
        allow_if(
            "getsockopt",
            "SOL_SOCKET options (SO_ERROR) only",
            vec![vec![Cond::Eq(1, libc::SOL_SOCKET as u64)]],
        ),
        allow("accept4", "control connections on a listening socket"),
        allow_if(
            "socketpair",
            "AF_UNIX pairs only (tokio's signal driver)",
            vec![vec![Cond::Eq(0, libc::AF_UNIX as u64)]],
        ),
        allow("getpid", "logging"),
        allow("gettid", "logging"),
        allow("restart_syscall", "a call interrupted by a signal resumes"),
    ]
}

/// The common base with a filter's own calls added.
pub fn with_base(extra: Vec<Allow>) -> Vec<Allow> {
    let mut list = base();
    list.extend(extra);
    list
}

fn rules(list: &[Allow]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list {
        let nr = crate::syscalls::number(a.name).ok_or(SandboxError::UnknownSyscall(a.name))?;
        let entry = map.entry(nr).or_default();
        for alt in &a.when {
            let conds = alt
                .iter()
                .map(|c| match *c {
                    Cond::Eq(arg, v) => SeccompCondition::new(arg, Len::Qword, Op::Eq, v),
                    Cond::Masked(arg, mask, v) => {
                        SeccompCondition::new(arg, Len::Qword, Op::MaskedEq(mask), v)
                    }
                    Cond::Ne(arg, v) => SeccompCondition::new(arg, Len::Dword, Op::Ne, v),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SandboxError::Rule(a.name, e))?;
            entry.push(SeccompRule::new(conds).map_err(|e| SandboxError::Rule(a.name, e))?);
        }
    }
    Ok(map)
}

/// The allowlist as text, one system call a line with its reason (`--print-seccomp`).
pub fn describe(list: &[Allow]) -> String {
    let mut names: Vec<&Allow> = list.iter().collect();
    // Stable: a call allowed for several reasons (each with its own arguments) keeps them
    // in order, a line each.
    names.sort_by_key(|a| a.name);
    names.dedup_by_key(|a| (a.name, a.why));
    let mut distinct: Vec<&str> = names.iter().map(|a| a.name).collect();
    distinct.dedup();
    let mut out = format!(
        "{} system calls allowed; anything else kills the process\n",
        distinct.len()
    );
    for a in names {
        let cond = if a.when.is_empty() {
            ""
        } else {
            " (arguments filtered)"
        };
        out.push_str(&format!("{:<18} {}{cond}\n", a.name, a.why));
    }
    out
}

/// `--print-seccomp`: prints text (an allowlist's `describe`) on standard output; a closed
/// pipe (`| head`) ends the output quietly rather than with a panic.
pub fn print(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Who the SIGSYS reporter names: the process (set by its first filter, or by
/// `set_process_name`), and, where a thread installed a filter of its own, that thread's role.
static WHO: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
thread_local! {
    static THREAD_WHO: std::cell::Cell<*const u8> = const { std::cell::Cell::new(std::ptr::null()) };
}
/// The SIGSYS reporter is process-wide and installed once, before the first filter: later
/// filters (other threads') must not need rt_sigaction(SIGSYS), which every filter forbids.
static HANDLER: std::sync::Once = std::sync::Once::new();

fn leak_name(who: &str) -> *mut u8 {
    let name: &'static mut [u8] = Box::leak(format!("{who}\0").into_bytes().into_boxed_slice());
    name.as_mut_ptr()
}

/// Names the process in SIGSYS reports from threads without a role of their own.
pub fn set_process_name(who: &str) {
    WHO.store(leak_name(who), Ordering::Release);
}

/// Installs the SIGSYS reporter (process-wide) and the filter on the calling thread (threads
/// it creates later inherit it). Returns how many system calls the allowlist has.
pub fn install(who: &'static str, list: &[Allow], mode: Mode) -> Result<usize, SandboxError> {
    let map = rules(list)?;
    let n = map.len();
    let filter = SeccompFilter::new(
        map,
        match mode {
            Mode::Kill => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        },
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SandboxError::Filter)?;
    let program: BpfProgram = filter.try_into().map_err(SandboxError::Filter)?;
    // glibc's malloc opens files in two places, which a filter must never meet: it counts
    // the CPUs (/sys/devices/system/cpu/online) the first time a thread needs an arena of
    // its own, unless the arena count is fixed; and the first time it shrinks a thread's
    // heap it reads /proc/sys/vm/overcommit_memory (a lazy restore's loader freeing its
    // 4 MiB buffers did). So: a fixed arena count; no trimming (freed heap memory stays for
    // reuse); and blocks of 256 KiB or more from mmap, so that they go back at once with
    // munmap (a fixed threshold: glibc's dynamic one would move them into the heap).
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 8);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
    // Leaked, NUL-terminated copies for the handler.
    let name = leak_name(who);
    THREAD_WHO.with(|w| w.set(name));
    let _ = WHO.compare_exchange(
        std::ptr::null_mut(),
        name,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    let mut handler = Ok(());
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler (an extern "C" fn with the SA_SIGINFO
        // signature).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = report_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) < 0 {
                handler = Err(SandboxError::Handler(nix::Error::last()));
            }
        }
    });
    handler?;
    seccompiler::apply_filter(&program).map_err(SandboxError::Apply)?;
    Ok(n)
}

/// A filter that kills the process on any system call (SECCOMP_RET_KILL_PROCESS).
static KILL_ALL: [libc::sock_filter; 1] = [libc::sock_filter {
    code: 0x06, // BPF_RET | BPF_K
    jt: 0,
    jf: 0,
    k: 0x8000_0000, // SECCOMP_RET_KILL_PROCESS
}];

/// The SIGSYS handler: "WHO: seccomp: forbidden system call NAME (NR); killed by SIGSYS" on
/// stderr, then death by SIGSYS: it stacks a kill-all filter and makes one more call, so the
/// kernel ends the whole process with SIGSYS (which works even for PID 1 of a PID namespace,
/// where a raised signal would be ignored). Only async-signal-safe work: no allocation, one
/// write, the filter, one call.
extern "C" fn report_sigsys(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let mut buf = [0u8; 256];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    // The thread's own role if it has one (a const-initialised thread-local: no allocation),
    // else the process.
    let mut who = THREAD_WHO.with(|w| w.get()) as *mut u8;
    if who.is_null() {
        who = WHO.load(Ordering::Acquire);
    }
    if !who.is_null() {
        // SAFETY: WHO points at a leaked NUL-terminated string.
        let who = unsafe { std::ffi::CStr::from_ptr(who as *const libc::c_char) };
        put(who.to_bytes());
    }
    // siginfo for SIGSYS: si_syscall is the int at offset 24 (after si_signo, si_errno,
    // si_code, padding and si_call_addr).
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) } as i64;
    put(b": seccomp: forbidden system call ");
    put(crate::syscalls::name(nr).unwrap_or("unknown").as_bytes());
    put(b" (");
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = nr.unsigned_abs();
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in (0..d).rev() {
        put(&[digits[i]]);
    }
    put(b"); killed by SIGSYS\n");
    // SAFETY: write to stderr, then seccomp with a valid program that lives forever; the
    // getpid after it is what the kill-all filter kills.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, n);
        let prog = libc::sock_fprog {
            len: 1,
            filter: KILL_ALL.as_ptr() as *mut libc::sock_filter,
        };
        libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog);
        libc::syscall(libc::SYS_getpid);
        // Not reached; if the kernel refused the filter, end anyway.
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Makes a system call no helper may make (`ptrace(PTRACE_TRACEME)`), for fault-injection
/// tests of the filter. Without a filter it is harmless: the helper merely asks to be traced
/// by its parent, which does not trace it.
pub fn forbidden_call() {
    let _ = nix::sys::ptrace::traceme();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_compiles_and_names_real_calls() {
        let map = rules(&base()).unwrap();
        assert!(map.len() > 40);
        let f = SeccompFilter::new(
            map,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap();
        let p: BpfProgram = f.try_into().unwrap();
        assert!(!p.is_empty());
        assert!(describe(&base()).contains("clone3"));
        assert_eq!(crate::syscalls::name(0), Some("read"));
        assert_eq!(crate::syscalls::number("io_uring_setup"), Some(425));
    }

    /// A child process installs the filter and makes a forbidden call: it dies by SIGSYS
    /// after reporting it.
    #[test]
    fn a_forbidden_call_kills_with_a_report() {
        use nix::sys::wait::{waitpid, WaitStatus};
        use nix::unistd::{fork, pipe, ForkResult};
        let (read_end, write_end) = pipe().unwrap();
        // SAFETY: the child makes only system calls (no allocation, no lock) and ends with
        // _exit; the test harness's other threads do not exist in it.
        let child = match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = if nix::unistd::dup2_stderr(&write_end).is_ok()
                    && nix::sys::prctl::set_no_new_privs().is_ok()
                    && install("test-helper", &base(), Mode::Kill).is_ok()
                {
                    forbidden_call();
                    0
                } else {
                    3
                };
                // SAFETY: ends the forked child at once, running nothing of the parent's.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => child,
        };
        drop(write_end);
        let status = waitpid(child, None).unwrap();
        let mut buf = [0u8; 512];
        let n = nix::unistd::read(&read_end, &mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            matches!(
                status,
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{status:?}: {text}"
        );
        assert!(
            text.contains(
                "test-helper: seccomp: forbidden system call ptrace (101); killed by SIGSYS"
            ),
            "{text}"
        );
    }
}
