//! Shared by vmm-core and its helpers: the sandbox a helper enters before it reads untrusted
//! input (the jail, then a seccomp allowlist), and systemd's protocols (readiness
//! notification, socket activation).

pub mod control;
pub mod fd;
pub mod jail;
pub mod logging;
pub mod seccomp;
pub mod syscalls;
pub mod systemd;
pub mod uffd;

/// Why a helper could not enter its sandbox: the step, and what the kernel or the filter
/// compiler said.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}: {1}")]
    Jail(&'static str, #[source] nix::Error),
    #[error("seccomp: no system call named {0}")]
    UnknownSyscall(&'static str),
    #[error("seccomp: {0}: {1}")]
    Rule(&'static str, #[source] seccompiler::BackendError),
    #[error("seccomp: {0}")]
    Filter(#[source] seccompiler::BackendError),
    #[error("seccomp: the SIGSYS handler: {0}")]
    Handler(#[source] nix::Error),
    #[error("seccomp: {0}")]
    Apply(#[source] seccompiler::Error),
}

/// The sandbox flags every helper takes (`#[command(flatten)]` them into its arguments).
#[derive(clap::Args, Debug, Clone)]
pub struct Flags {
    /// Run without the sandbox (namespaces, an empty root, no capabilities, another uid,
    /// seccomp), to debug.
    #[arg(long)]
    pub no_sandbox: bool,
    /// The uid and gid the sandboxed helper runs as.
    #[arg(long, value_name = "UID", default_value_t = 65534)]
    pub uid: u32,
    #[arg(long, value_name = "GID", default_value_t = 65534)]
    pub gid: u32,
    /// What a system call outside the allowlist does: kill (report it on stderr, then die by
    /// SIGSYS) or log (the kernel logs it and lets it through; to develop the allowlist).
    #[arg(long, value_name = "MODE", default_value = "kill")]
    pub seccomp: seccomp::Mode,
}

/// Enters the jail, then installs the helper's seccomp allowlist (base plus `extra`), while
/// the process has one thread. Returns a line for the log.
pub fn confine(
    who: &'static str,
    jail: &jail::Jail,
    extra: Vec<seccomp::Allow>,
    mode: seccomp::Mode,
) -> Result<String, SandboxError> {
    let privileged = jail::enter(jail, who)?;
    let n = seccomp::install(who, &seccomp::with_base(extra), mode)?;
    Ok(format!(
        "sandboxed: {}seccomp allowlist of {n} system calls ({} mode)",
        if privileged {
            "own mount, PID, IPC, UTS and network namespaces, an empty read-only root, no capabilities, uid "
                .to_string()
                + &jail.uid.to_string()
                + ", "
        } else {
            "not root, so namespaces and uid are left to the service manager; ".to_string()
        },
        mode.as_str()
    ))
}
