//! Reaching the peer: which socket (`--socket`, `--vm NAME`, `$VMMCTL_SOCKET`), whether the
//! path is a socket at all, how long to wait for an answer, and what a peer of the wrong kind
//! (a blockd's control socket given as a VM's, a listener that never answers) is called. And
//! standard output, which a closed pipe (`vmmctl info | head -1`) ends quietly.

use crate::Failure;
use std::path::{Path, PathBuf};

use std::time::Duration;

/// Where systemd's vmm-core@NAME serves its API.
pub fn vm_socket(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/vmm/{name}/api.sock"))
}

/// Writes `text` and a newline to standard output. A reader that went away ends vmmctl at
/// once with status 0, as `head` expects of what feeds it; any other failure is reported.
pub fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{text}").and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: standard output: {e}");
        std::process::exit(1);
    }
}

/// Refuses a path that exists but is no socket, naming what it is and what to give.
/// (`named` is the flag and path as errors show them.)
pub fn check_is_socket(named: &str, path: &Path, what: &str) -> Result<(), Failure> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // connect says why
    };
    let t = meta.file_type();
    if t.is_socket() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a socket"
    };
    Err(Failure(
        2,
        format!("{named}: {kind}, not a socket; give {what}"),
    ))
}

/// The connection error, in words that say what to check.
pub fn connect_failed(named: &str, who: &str, e: std::io::Error) -> Failure {
    let why = match e.kind() {
        std::io::ErrorKind::NotFound => format!("no such socket; is {who} running with this path?"),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied; run as the VM's user or root".to_string()
        }
        std::io::ErrorKind::ConnectionRefused => {
            format!("nothing is listening; {who} has exited (the socket file is left over)")
        }
        _ => e.to_string(),
    };
    Failure(2, format!("{named}: {why}"))
}

/// The process that listens on the other end, from its credentials: its PID, its name and
/// whether it runs as another user than this one (and this one is not root).
pub struct Listener {
    pid: i32,
    name: String,
    other_user: bool,
}

impl Listener {
    pub fn of(stream: &impl std::os::fd::AsFd) -> Option<Listener> {
        let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .ok()?;
        let me = nix::unistd::geteuid().as_raw();
        Some(Listener {
            pid: cred.pid(),
            name: std::fs::read_to_string(format!("/proc/{}/comm", cred.pid()))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            other_user: me != 0 && cred.uid() != me,
        })
    }

    /// Refuses at once a peer that is one of this project's programs, but not `expected`
    /// (a blockd's control socket given as a VM's, say), naming it and the right flag.
    pub fn check(
        &self,
        named: &str,
        expected: &str,
        what: &str,
        hint: &str,
    ) -> Result<(), Failure> {
        let ours = ["vmm-core", "blockd", "chardevd", "migrated"];
        if ours.contains(&self.name.as_str()) && self.name != expected {
            return Err(Failure(
                2,
                format!(
                    "{named}: that is {}'s socket (PID {}), not {what}; {hint}",
                    self.name, self.pid
                ),
            ));
        }
        Ok(())
    }

    fn described(&self) -> String {
        if self.name.is_empty() {
            format!("PID {}", self.pid)
        } else {
            format!("{}, PID {}", self.name, self.pid)
        }
    }
}

/// What a failed first request says about the peer: the wrong kind of server (it does not
/// know the method), one that hung up without answering, or one that did not answer in time.
pub fn probe_failed(
    named: &str,
    peer: Option<&Listener>,
    expected: &str,
    hint: &str,
    e: capnp::Error,
) -> Failure {
    let listener = peer
        .map(|p| format!(" (the listener is {})", p.described()))
        .unwrap_or_default();
    let why = match e.kind {
        capnp::ErrorKind::Unimplemented => {
            format!("not {expected}: it answers, but not as one{listener}; {hint}")
        }
        capnp::ErrorKind::Disconnected if peer.is_some_and(|p| p.other_user) => format!(
            "the listener ({}) runs as another user and hung up: vmm-core and blockd serve their own uid and root only; run vmmctl as that user or as root",
            peer.map(Listener::described).unwrap_or_default()
        ),
        capnp::ErrorKind::Disconnected => {
            format!("not {expected}: it hung up without answering{listener}; {hint}")
        }
        _ => vmm_proto::rpc::remote_message(&e),
    };
    Failure(2, format!("{named}: {why}"))
}

/// No answer within the deadline.
pub fn no_answer(named: &str, peer: Option<&Listener>, expected: &str, wait: Duration) -> Failure {
    let listener = peer
        .map(|p| format!(" (the listener is {})", p.described()))
        .unwrap_or_default();
    Failure(
        2,
        format!(
            "{named}: no answer in {} s{listener}; is it {expected}? (--timeout SECONDS waits longer)",
            wait.as_secs_f64()
        ),
    )
}

/// `work`, given at most `wait`; `late` is the failure when it takes longer.
pub async fn within<T>(
    wait: Duration,
    work: impl std::future::Future<Output = Result<T, Failure>>,
    late: impl FnOnce() -> Failure,
) -> Result<T, Failure> {
    tokio::time::timeout(wait, work)
        .await
        .unwrap_or_else(|_| Err(late()))
}

/// A path the peer will open (a snapshot file, a unix: socket, a TLS directory), made
/// absolute here: the peer's working directory is not the caller's.
pub fn absolute(path: &str) -> String {
    if path.is_empty() || path.starts_with('/') {
        return path.to_string();
    }
    match std::path::absolute(path) {
        Ok(p) => p.display().to_string(),
        Err(_) => path.to_string(),
    }
}

/// `file:PATH` and `unix:PATH` with PATH made absolute; other URIs as they are.
pub fn absolute_uri(uri: &str) -> String {
    for scheme in ["file:", "unix:"] {
        if let Some(p) = uri.strip_prefix(scheme) {
            return format!("{scheme}{}", absolute(p));
        }
    }
    uri.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn relative_paths_are_made_absolute_for_the_peer() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            super::absolute_uri("file:snap.bin"),
            format!("file:{}/snap.bin", cwd.display())
        );
        assert_eq!(super::absolute_uri("file:/x/y"), "file:/x/y");
        assert_eq!(
            super::absolute_uri("unix:d/s.sock"),
            format!("unix:{}/d/s.sock", cwd.display())
        );
        assert_eq!(super::absolute_uri("tcp:host:4444"), "tcp:host:4444");
        assert_eq!(super::absolute(""), "");
    }
}
