//! How a helper gets its control socket, the same way in every helper: a connection inherited
//! from vmm-core (`--control-fd N`), a socket it listens on (`--listen PATH`), or a socket
//! systemd passed (socket activation; `--listen systemd` or no flag at all). Also the one
//! place where an inherited descriptor number becomes an owned descriptor.

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why a helper has no control socket, in one line that says what to give it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{flag} {fd}: not an open descriptor of this process; vmm-core starts {who} with one")]
    NotOpen {
        flag: &'static str,
        fd: RawFd,
        who: &'static str,
    },
    #[error("--listen {0}: cannot listen on it ({1})")]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("systemd passed {0} sockets; {1} takes one (ListenStream= once in its .socket unit)")]
    Sockets(usize, &'static str),
    #[error("give --control-fd FD (from vmm-core) or --listen PATH, or start {0} from a systemd socket unit")]
    Nothing(&'static str),
    #[error(
        "vmm-core (PID {0}), which started {1}, ended before {1} could follow it; {1} ends too"
    )]
    ParentGone(u32, &'static str),
    #[error("cannot ask for SIGKILL when vmm-core ends (PR_SET_PDEATHSIG): {0}")]
    DeathSignal(#[source] nix::Error),
}

/// The environment variable in which vmm-core gives a helper it starts its PID.
pub const PARENT_ENV: &str = "VMM_PARENT_PID";

/// A helper that vmm-core started (it set PARENT_ENV) dies with vmm-core's thread that
/// started it: SIGKILL then (PR_SET_PDEATHSIG). If vmm-core ended already, before the request
/// took, the helper has another parent now, and ends here.
pub fn die_with_parent(who: &'static str) -> Result<(), ControlError> {
    let Some(pid) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return Ok(());
    };
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(ControlError::DeathSignal)?;
    if std::os::unix::process::parent_id() != pid {
        return Err(ControlError::ParentGone(pid, who));
    }
    Ok(())
}

/// Descriptor `fd`, which this process inherited for `flag`, as its own: checked open, and
/// never 0, 1 or 2. It gets close-on-exec: nothing this helper starts may inherit it.
pub fn inherited(
    fd: RawFd,
    flag: &'static str,
    who: &'static str,
) -> Result<OwnedFd, ControlError> {
    crate::fd::take(fd).ok_or(ControlError::NotOpen { flag, fd, who })
}

/// What a helper serves: one inherited connection (vmm-core's), or a listening socket and,
/// when it made it, its path. An unsandboxed helper removes the path at exit; a sandboxed one
/// cannot reach it (nor can its jail's waiting parent, which runs as an unprivileged uid), so
/// the socket file stays until the next start at that path replaces it.
pub enum Control {
    Connection(UnixStream),
    Listener(UnixListener, Option<PathBuf>),
}

impl Control {
    /// What the helper's jail keeps open for it: the control socket and, under a service
    /// manager, the notification socket (connected now, while its path is reachable).
    pub fn jail_keep(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        let mut keep = vec![match self {
            Control::Connection(s) => s.as_raw_fd(),
            Control::Listener(l, _) => l.as_raw_fd(),
        }];
        match crate::systemd::prepare_notify() {
            Ok(fd) => keep.extend(fd),
            Err(e) => log::warn!("cannot reach systemd's notification socket: {e}"),
        }
        keep
    }
}

/// The control socket from `--control-fd`, `--listen PATH`, or systemd. A socket made here
/// is readable and writable by its owner only.
pub fn control(
    who: &'static str,
    control_fd: Option<RawFd>,
    listen: Option<&Path>,
) -> Result<Control, ControlError> {
    if let Some(fd) = control_fd {
        die_with_parent(who)?;
        let fd = inherited(fd, "--control-fd", who)?;
        return Ok(Control::Connection(UnixStream::from(fd)));
    }
    if let Some(path) = listen.filter(|p| p.as_os_str() != "systemd") {
        let l = vmm_proto::unix::bind(path, 0o600)
            .map_err(|e| ControlError::Listen(path.to_path_buf(), e))?;
        return Ok(Control::Listener(l, Some(path.to_path_buf())));
    }
    let mut fds = crate::systemd::listen_fds();
    match fds.len() {
        1 => Ok(Control::Listener(fds.pop().expect("one").into(), None)),
        0 => Err(ControlError::Nothing(who)),
        n => Err(ControlError::Sockets(n, who)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_not_open_is_refused_by_name() {
        let e = inherited(1000, "--control-fd", "blockd").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--control-fd 1000: not an open descriptor of this process; vmm-core starts blockd with one"
        );
        assert!(inherited(1, "--image-fd", "blockd").is_err());
    }

    #[test]
    fn a_listening_socket_is_made_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let Control::Listener(_, Some(made)) = control("chardevd", None, Some(&path)).unwrap()
        else {
            panic!("a listener at the path")
        };
        assert_eq!(made, path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
