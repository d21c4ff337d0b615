//! Unix listening sockets that appear at their path only once they listen, with their mode
//! already set.
//!
//! `UnixListener::bind` creates the socket file at `bind(2)` and listens a moment later, so a
//! client that waits for the file (a test, an orchestrator, systemd's `PathExists=`) can find it
//! and still be refused (ECONNREFUSED), and a chmod after it leaves a window in which the
//! umask's mode lets others connect. Here the socket is bound, set to its mode and listening
//! inside a private directory (0700) beside `path`, then renamed into place: rename(2) is
//! atomic, so the path either does not exist or names a listening socket.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The longest path a `sockaddr_un` holds (108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Binds a listening socket at `path` with permissions `mode`, replacing what is there (a
/// socket left over from a process that was killed). The path appears only once the socket
/// listens.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    static N: AtomicU32 = AtomicU32::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(
        ".vmm-bind-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let staged = private.join("s");
    if staged.as_os_str().len() > SUN_PATH_MAX
        || std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .is_err()
    {
        // No room for the private name: bind in place (the old window, but it works).
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        return Ok(l);
    }
    let result = staged_bind(&staged, path, mode);
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

fn staged_bind(staged: &PathBuf, path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let l = UnixListener::bind(staged)?;
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(staged, path)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn the_socket_appears_listening_with_its_mode_and_nothing_is_left_beside_it() {
        let dir = std::env::temp_dir().join(format!("vmm-unix-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A stale socket file is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let l = bind(&path, 0o600).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
