//! The helper processes as vmm-core sees them: one way to start one (or connect to one that
//! systemd runs), to read its stderr, and to end and reap it. blockd, chardevd and migrated
//! each have a client module here that supervises its helper and speaks its RPC.
//!
//! A helper vmm-core starts gets its control socket (`--control-fd N`), the sandbox flags, no
//! stdin or stdout, stderr through vmm-core (stderr.rs), and our PID (VMM_PARENT_PID), with
//! which it asks for SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG, see
//! vmm_sandbox::control): a vmm-core that dies, even by SIGKILL, leaves no helper behind. The
//! helper's own sandbox passes that on to the process it forks into its PID namespace.
//!
//! Nothing runs in the child before exec, so that the standard library starts it with
//! posix_spawn (a vfork) instead of fork: a fork copies vmm-core's page tables and mappings,
//! guest RAM's among them, which cost milliseconds of start-up. The one descriptor the child
//! inherits is made inheritable only while spawns are serialised (`SPAWN`), so that no other
//! child can inherit it.

pub mod blockd;
pub mod chardevd;
pub mod image_lock;
pub mod migrated;
pub mod stderr;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use stderr::SeccompReport;

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("{0}: cannot make its control socket")]
    ControlSocket(&'static str, #[source] std::io::Error),
    #[error("{0}: cannot make its stderr pipe")]
    StderrPipe(&'static str, #[source] std::io::Error),
    #[error("--{0} {path}: cannot start it ({2}); build it (cargo build) or pass --{0} PATH", path = .1.display())]
    Start(&'static str, PathBuf, std::io::Error),
    #[error("{flag} {}: cannot connect ({source}); is {helper} running ({hint})?", path.display())]
    Connect {
        helper: &'static str,
        flag: &'static str,
        path: PathBuf,
        hint: &'static str,
        source: std::io::Error,
    },
}

/// One of the helpers, as the command line and the log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub name: &'static str,
    /// The arguments before `--control-fd` (migrated's `serve`).
    pub subcommand: &'static [&'static str],
    /// vmm-core's flag for a helper that runs already, and how one starts it.
    pub socket_flag: &'static str,
    pub socket_hint: &'static str,
}

pub const BLOCKD: Kind = Kind {
    name: "blockd",
    subcommand: &[],
    socket_flag: "--blockd-socket",
    socket_hint: "blockd --listen PATH, or its systemd socket",
};
pub const CHARDEVD: Kind = Kind {
    name: "chardevd",
    subcommand: &[],
    socket_flag: "--chardevd-socket",
    socket_hint: "chardevd --listen PATH, or its socket unit",
};
pub const MIGRATED: Kind = Kind {
    name: "migrated",
    subcommand: &["serve"],
    socket_flag: "--migrated-socket",
    socket_hint: "migrated serve --listen PATH, or its systemd socket",
};

/// Where a helper comes from: vmm-core starts it, or connects to one that runs already.
#[derive(Debug, Clone)]
pub enum Source {
    /// The executable, and the seccomp mode (kill or log), or None for no sandbox.
    Spawn(PathBuf, Option<String>),
    /// Its control socket (`--listen`, or its systemd socket unit).
    Connect(PathBuf),
}

/// A helper ready to start: the command, and both ends of its control socket.
pub struct Prepared {
    pub kind: Kind,
    command: Command,
    ours: UnixStream,
    /// The child's end, close-on-exec but while it is spawned; closed here once it has it.
    theirs: OwnedFd,
}

/// Held while a child is spawned: the one descriptor that child is to inherit is inheritable
/// only meanwhile, and no other child is spawned then.
static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `spawn` with `fd` inheritable (under `SPAWN`), then closes `fd`.
fn with_inherited<T>(
    fd: OwnedFd,
    spawn: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let _one = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let r = spawn();
    drop(fd);
    r
}

impl Prepared {
    /// Starts it; returns our end of the control socket and the child.
    pub fn spawn(mut self) -> Result<(UnixStream, Child), HelperError> {
        let exe = program(&self.command);
        let command = &mut self.command;
        let child = with_inherited(self.theirs, || command.spawn())
            .map_err(|e| HelperError::Start(self.kind.name, exe, e))?;
        Ok((self.ours, child))
    }

    /// The same, as a tokio child (its exit can be awaited), killed if dropped.
    pub fn spawn_async(self) -> Result<(UnixStream, tokio::process::Child), HelperError> {
        let exe = program(&self.command);
        let mut command = tokio::process::Command::from(self.command);
        command.kill_on_drop(true);
        let child = with_inherited(self.theirs, || command.spawn())
            .map_err(|e| HelperError::Start(self.kind.name, exe, e))?;
        Ok((self.ours, child))
    }
}

fn program(c: &Command) -> PathBuf {
    PathBuf::from(c.get_program())
}

/// The one way vmm-core starts a helper. Call it on the thread that will outlive the child
/// (a parent-death signal follows the thread that forked).
pub fn prepare(
    kind: Kind,
    exe: &Path,
    sandbox: Option<&str>,
    report: SeccompReport,
) -> Result<Prepared, HelperError> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| HelperError::ControlSocket(kind.name, e))?;
    // Never 0, 1 or 2, which the spawn sets up for the child: the standard library opens
    // /dev/null on any of them that vmm-core was started without.
    let theirs = OwnedFd::from(theirs);
    let stderr =
        stderr::pipe(kind.name, report).map_err(|e| HelperError::StderrPipe(kind.name, e))?;
    let mut command = Command::new(exe);
    command
        .args(kind.subcommand)
        .arg("--control-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // One level for every process; vmm-core puts the front on the helper's lines.
        .env("VMM_LOG", vmm_sandbox::logging::current_level())
        .env("VMM_LOG_STYLE", "bare")
        .env(
            vmm_sandbox::control::PARENT_ENV,
            std::process::id().to_string(),
        );
    match sandbox {
        Some(mode) => command.args(["--seccomp", mode]),
        None => command.arg("--no-sandbox"),
    };
    Ok(Prepared {
        kind,
        command,
        ours,
        theirs,
    })
}

/// Connects to a helper that runs already.
pub fn connect(kind: Kind, path: &Path) -> Result<UnixStream, HelperError> {
    UnixStream::connect(path).map_err(|source| HelperError::Connect {
        helper: kind.name,
        flag: kind.socket_flag,
        path: path.to_path_buf(),
        hint: kind.socket_hint,
        source,
    })
}

/// Starts the helper or connects to it: our end of its control connection, and the child
/// when vmm-core started it.
pub fn obtain(
    kind: Kind,
    source: &Source,
    report: SeccompReport,
) -> Result<(UnixStream, Option<Child>), HelperError> {
    match source {
        Source::Spawn(exe, sandbox) => prepare(kind, exe, sandbox.as_deref(), report)?
            .spawn()
            .map(|(s, c)| (s, Some(c))),
        Source::Connect(path) => connect(kind, path).map(|s| (s, None)),
    }
}

/// Reaps a helper that died (its connection ended): it gets `grace` to exit by itself (a
/// sandboxed helper's outer process reports how its inner one died), then SIGKILL. Returns
/// its status when it exited by itself.
pub fn reap(mut child: Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < grace => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Ends a helper that should exit by itself now (its control connection closed): `grace`,
/// SIGTERM half-way (a helper flushes on it too), then SIGKILL.
pub fn end(name: &str, mut child: Child, grace: Duration) {
    let start = Instant::now();
    let mut termed = false;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    log::warn!("{name} ended with {status}");
                }
                return;
            }
            Ok(None) if start.elapsed() < grace => {
                if !termed && start.elapsed() > grace / 2 {
                    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                    // Our own child, not yet reaped: the PID is still its.
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                    termed = true;
                }
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => break,
        }
    }
    log::warn!(
        "{name} did not stop within {} s; killing it",
        grace.as_secs()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts a helper's client thread: capnp-rpc is !Send, so each client runs on a
/// current-thread tokio runtime of its own, in a LocalSet; `make` builds its future there.
pub fn client_thread<Fut>(
    name: &str,
    make: impl FnOnce() -> Fut + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = vmm_proto::rpc::run_local(make()) {
                log::error!("cannot start the {} runtime ({e})", name_of_this_thread());
            }
        })
}

fn name_of_this_thread() -> String {
    std::thread::current()
        .name()
        .unwrap_or("client")
        .to_string()
}

/// The delay between attempts to get a helper back, doubling up to a ceiling.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, max }
    }

    /// The delay to wait now; the next one is longer.
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}
