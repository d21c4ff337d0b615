//! Disks: `--disk` specifications, and the blockd processes that serve them over vhost-user.
//!
//! vmm-core opens each image and a listening socket in a private directory, and starts one
//! blockd per disk with both as inherited descriptors; blockd lives as long as vmm-core (across
//! guest reboots) and serves each boot's connection in turn. `socket=PATH` uses a vhost-user-blk
//! backend that runs already instead.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: Option<PathBuf>,
    /// An external vhost-user-blk backend's socket.
    pub socket: Option<PathBuf>,
    pub readonly: bool,
    pub queues: u16,
    pub serial: Option<String>,
    /// raw or qcow2.
    pub format: String,
    /// Open the image with O_DIRECT.
    pub direct: bool,
}

pub const MAX_QUEUES: u16 = 16;

/// Parses `path=FILE[,readonly=on|off][,queues=N][,serial=ID]` or `socket=PATH[,queues=N]`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let usage = "write path=FILE[,format=raw|qcow2][,readonly=on][,queues=N][,serial=ID][,direct=on] or socket=PATH[,queues=N]";
    let mut d = DiskSpec {
        path: None,
        socket: None,
        readonly: false,
        queues: 1,
        serial: None,
        format: "raw".into(),
        direct: false,
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--disk {s}: \"{part}\" is not key=value; {usage}"))?;
        match k {
            "path" if !v.is_empty() => d.path = Some(PathBuf::from(v)),
            "socket" if !v.is_empty() => d.socket = Some(PathBuf::from(v)),
            "readonly" => {
                d.readonly = match v {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => {
                        return Err(format!(
                            "--disk {s}: readonly={v}; write readonly=on or off"
                        ))
                    }
                }
            }
            "queues" => {
                d.queues = v
                    .parse::<u16>()
                    .ok()
                    .filter(|q| (1..=MAX_QUEUES).contains(q))
                    .ok_or_else(|| {
                        format!("--disk {s}: queues={v}; write a number from 1 to {MAX_QUEUES}")
                    })?
            }
            "format" => match v {
                "raw" | "qcow2" => d.format = v.to_string(),
                _ => {
                    return Err(format!(
                        "--disk {s}: format={v}; write format=raw or format=qcow2"
                    ))
                }
            },
            "direct" => {
                d.direct = match v {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(format!("--disk {s}: direct={v}; write direct=on or off")),
                }
            }
            "serial" => {
                if v.len() > 20 {
                    return Err(format!("--disk {s}: serial={v} is longer than 20 bytes"));
                }
                d.serial = Some(v.to_string())
            }
            _ => return Err(format!("--disk {s}: unknown or empty key \"{k}\"; {usage}")),
        }
    }
    match (&d.path, &d.socket) {
        (None, None) => Err(format!("--disk {s}: no path= or socket=; {usage}")),
        (Some(_), Some(_)) => Err(format!("--disk {s}: path= and socket= together; give one")),
        (None, Some(_)) if d.readonly || d.serial.is_some() || d.direct || d.format != "raw" => {
            Err(format!(
                "--disk {s}: readonly=, serial=, format= and direct= are the backend's own settings with socket="
            ))
        }
        _ => Ok(d),
    }
}

/// A disk's backend: blockd started by us, or a socket given.
pub struct DiskBackend {
    pub name: String,
    pub socket: PathBuf,
    pub queues: u16,
    child: Option<std::process::Child>,
}

impl Drop for DiskBackend {
    /// SIGTERM (blockd flushes the image and exits), then SIGKILL if it takes over 10 s.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on the PID of our own child, which has not been reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            log::warn!("{}: blockd ended with {status}", self.name);
                        }
                        return;
                    }
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    _ => break,
                }
            }
            log::warn!(
                "{}: blockd did not stop within 10 s of SIGTERM; killing it",
                self.name
            );
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The private directory that holds blockd's sockets; removed with everything in it.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new() -> std::io::Result<RunDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let template = base.join("vmm-core.XXXXXX");
        let mut bytes = std::ffi::CString::new(template.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?
            .into_bytes_with_nul();
        // SAFETY: a writable NUL-terminated template; mkdtemp creates the directory 0700.
        let r = unsafe { libc::mkdtemp(bytes.as_mut_ptr() as *mut libc::c_char) };
        if r.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        bytes.pop();
        use std::os::unix::ffi::OsStringExt;
        Ok(RunDir(PathBuf::from(std::ffi::OsString::from_vec(bytes))))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens each disk's image and starts its blockd.
pub fn start(
    disks: &[DiskSpec],
    blockd: &Path,
    dir: Option<&RunDir>,
) -> Result<Vec<DiskBackend>, String> {
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let name = format!("disk{i}");
        if let Some(socket) = &d.socket {
            out.push(DiskBackend {
                name,
                socket: socket.clone(),
                queues: d.queues,
                child: None,
            });
            continue;
        }
        let path = d.path.as_ref().expect("parse_disk gives path or socket");
        use std::os::unix::fs::OpenOptionsExt;
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(!d.readonly)
            .custom_flags(if d.direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|e| {
                format!(
                    "--disk path={}: cannot open it ({e}); check the path and its permissions, or add readonly=on",
                    path.display()
                )
            })?;
        let dir = dir.expect("a run directory exists when a disk has a path");
        let socket = dir.0.join(format!("{name}.sock"));
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|e| format!("{name}: cannot listen on {} ({e})", socket.display()))?;
        let mut cmd = std::process::Command::new(blockd);
        cmd.args(["--listen-fd", "3", "--image-fd", "4", "--queues"])
            .arg(d.queues.to_string())
            .arg("--serial")
            .arg(d.serial.clone().unwrap_or_else(|| name.clone()))
            .arg("--format")
            .arg(&d.format)
            .stdin(std::process::Stdio::null());
        if d.readonly {
            cmd.arg("--readonly");
        }
        let (lfd, ifd) = (listener.as_raw_fd(), image.as_raw_fd());
        // SAFETY: only async-signal-safe calls (dup2, prctl): the listener becomes fd 3 and
        // the image fd 4, both without close-on-exec, and blockd dies with vmm-core.
        unsafe {
            cmd.pre_exec(move || {
                // Move them out of the way first, in case either already sits at 3 or 4.
                let l = libc::fcntl(lfd, libc::F_DUPFD_CLOEXEC, 10);
                let i = libc::fcntl(ifd, libc::F_DUPFD_CLOEXEC, 10);
                if l < 0 || i < 0 || libc::dup2(l, 3) < 0 || libc::dup2(i, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{name}: cannot start {} ({e})", blockd.display()))?;
        log::info!(
            "{name}: {}{} served by blockd (pid {}), {} queue(s)",
            path.display(),
            if d.readonly { " (read-only)" } else { "" },
            child.id(),
            d.queues
        );
        out.push(DiskBackend {
            name,
            socket,
            queues: d.queues,
            child: Some(child),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = parse_disk("path=/x.img,readonly=on,queues=2,serial=abc,format=qcow2,direct=on")
            .unwrap();
        assert_eq!(d.format, "qcow2");
        assert!(d.direct);
        assert_eq!(d.path.as_deref(), Some(Path::new("/x.img")));
        assert!(d.readonly);
        assert_eq!(d.queues, 2);
        assert!(parse_disk("socket=/s,queues=4").is_ok());
        for bad in [
            "",
            "x.img",
            "path=/x,queues=0",
            "path=/x,queues=99",
            "path=/x,readonly=maybe",
            "path=/x,socket=/y",
            "path=/x,colour=red",
            "socket=/s,readonly=on",
            "path=/x,format=vmdk",
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(e.starts_with("--disk "), "{e}");
        }
    }
}
