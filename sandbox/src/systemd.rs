//! systemd's protocols, without libsystemd: `sd_notify` (a datagram to $NOTIFY_SOCKET) and
//! socket activation ($LISTEN_PID, $LISTEN_FDS: descriptors from 3 on).

use std::io;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The notification socket, connected before a sandbox hides $NOTIFY_SOCKET's path.
static NOTIFIER: std::sync::Mutex<Option<UnixDatagram>> = std::sync::Mutex::new(None);

fn connect() -> io::Result<Option<UnixDatagram>> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(None);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&addr)?;
    Ok(Some(sock))
}

/// Connects to the service manager's notification socket now (before entering a sandbox);
/// returns its descriptor, to keep open, when there is one.
pub fn prepare_notify() -> io::Result<Option<std::os::fd::RawFd>> {
    use std::os::fd::AsRawFd;
    let sock = connect()?;
    let fd = sock.as_ref().map(|s| s.as_raw_fd());
    *NOTIFIER.lock().unwrap() = sock;
    Ok(fd)
}

/// Sends `state` (e.g. "READY=1") to the service manager. Ok(false) when not run by one.
pub fn notify(state: &str) -> io::Result<bool> {
    let mut n = NOTIFIER.lock().unwrap();
    if n.is_none() {
        *n = connect()?;
    }
    match n.as_ref() {
        Some(sock) => sock.send(state.as_bytes()).map(|_| true),
        None => Ok(false),
    }
}

/// The descriptors systemd passed to this process (socket activation), each once: the
/// variables are removed so that children do not take them too. Empty when there are none.
pub fn listen_fds() -> Vec<OwnedFd> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if !ours {
        return Vec::new();
    }
    (3..3 + n.clamp(0, 64))
        .filter_map(crate::fd::take)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_the_socket_in_notify_socket() {
        let dir = std::env::temp_dir().join(format!("vmm-sandbox-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(prepare_notify().unwrap().is_some());
        // The socket was connected beforehand: the path is no longer needed.
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(notify("READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        *NOTIFIER.lock().unwrap() = None;
        assert!(!notify("READY=1").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
