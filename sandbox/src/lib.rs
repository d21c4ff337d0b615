//! Shared by vmm-core and its helpers: the sandbox a helper enters before it reads untrusted
//! input (the jail, then a seccomp allowlist), and systemd's protocols (readiness
//! notification, socket activation).

pub mod jail;
pub mod seccomp;
pub mod syscalls;
pub mod systemd;

/// Enters the jail, then installs the helper's seccomp allowlist (base plus `extra`), while
/// the process has one thread. Returns a line for the log.
pub fn confine(
    who: &'static str,
    jail: &jail::Jail,
    extra: Vec<seccomp::Allow>,
    mode: seccomp::Mode,
) -> Result<String, String> {
    let privileged = jail::enter(jail)?;
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
