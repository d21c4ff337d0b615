//! Image locks, as QEMU takes them: an open file description lock (F_OFD_SETLK) on the
//! image's first byte, exclusive for a disk the VM writes and shared for a read-only one.
//! So two VMs never write one image, and nothing writes an image that VMs read; read-only
//! sharing (one base image, many VMs) works. The lock belongs to the open file description,
//! which blockd shares (it gets the same descriptor), so it lasts as long as either holds it,
//! across blockd's restarts. A live migration to the same host hands the locks over: the
//! source releases them when it pauses for the last pass (and takes them again if the
//! migration fails), the destination takes them before its VM runs.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Why a disk's image cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("--disk path={path}: in use by {holders}: another VM {what}; {why}", path = .path.display())]
    InUse {
        path: PathBuf,
        holders: String,
        what: &'static str,
        why: &'static str,
    },
    #[error("--disk path={path}: cannot lock it ({1}); is its file system one that takes locks?", path = .0.display())]
    Fcntl(PathBuf, nix::Error),
}

/// One disk's lock: a descriptor of the image (the same open file description blockd has)
/// and whether the VM writes it.
pub struct ImageLock {
    path: PathBuf,
    file: File,
    exclusive: bool,
}

fn lock_of(kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

impl ImageLock {
    /// The lock for `file` (opened read-write when `exclusive`), not taken yet.
    pub fn new(path: &Path, file: &File, exclusive: bool) -> std::io::Result<ImageLock> {
        Ok(ImageLock {
            path: path.to_path_buf(),
            file: file.try_clone()?,
            exclusive,
        })
    }

    fn kind(&self) -> libc::c_short {
        if self.exclusive {
            libc::F_WRLCK as libc::c_short
        } else {
            libc::F_RDLCK as libc::c_short
        }
    }

    /// Takes it, or says why that is refused: who holds the image when `name_holders` (which
    /// reads /proc: not on a thread whose seccomp filter forbids opening files).
    pub fn take(&self, name_holders: bool) -> Result<(), LockError> {
        use nix::fcntl::{fcntl, FcntlArg};
        let want = lock_of(self.kind());
        match fcntl(self.file.as_fd(), FcntlArg::F_OFD_SETLK(&want)) {
            Ok(_) => Ok(()),
            Err(nix::Error::EAGAIN | nix::Error::EACCES) => Err(self.in_use(name_holders)),
            Err(e) => Err(LockError::Fcntl(self.path.clone(), e)),
        }
    }

    /// The image's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// The VM no longer writes the image (a live snapshot put an overlay on it): the lock
    /// becomes a shared one, at once (no other VM can slip in between).
    pub fn downgrade(&mut self) -> Result<(), LockError> {
        self.exclusive = false;
        self.take(true)
    }

    /// Lets go of it (the migration's hand-over to the destination).
    pub fn release(&self) {
        let none = lock_of(libc::F_UNLCK as libc::c_short);
        if let Err(e) =
            nix::fcntl::fcntl(self.file.as_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&none))
        {
            log::warn!("{}: cannot release its lock ({e})", self.path.display());
        }
    }

    /// The refusal: the kind of lock in the way (F_OFD_GETLK) and who has the image open.
    fn in_use(&self, name_holders: bool) -> LockError {
        let mut probe = lock_of(self.kind());
        let writer = nix::fcntl::fcntl(
            self.file.as_fd(),
            nix::fcntl::FcntlArg::F_OFD_GETLK(&mut probe),
        )
        .map(|_| probe.l_type == libc::F_WRLCK as libc::c_short)
        .unwrap_or(true);
        let (what, why) = match (writer, self.exclusive) {
            (true, true) => (
                "writes to it",
                "two VMs writing one image corrupt it; stop that VM, or give this one a copy",
            ),
            (true, false) => (
                "writes to it",
                "a read-only disk would change under this VM; stop that VM, or give this one a copy",
            ),
            (false, _) => (
                "reads it (readonly=on)",
                "writing would change it under that reader; stop it first, or give this VM a copy (read-only sharing needs readonly=on here too)",
            ),
        };
        LockError::InUse {
            path: self.path.clone(),
            holders: if name_holders {
                holders(&self.file)
            } else {
                "another process".into()
            },
            what,
            why,
        }
    }
}

/// The other processes that have `file` open, as "vmm-core (PID 12), blockd (PID 13)": what
/// `fuser` would find, from /proc. ("another process" when none is visible to this user.)
fn holders(file: &File) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = file.metadata() else {
        return "another process".into();
    };
    let own = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let open = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino())
        });
        if open {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{} (PID {pid})", name.trim()));
        }
    }
    if found.is_empty() {
        "another process".into()
    } else {
        found.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let path = std::env::temp_dir().join(format!("image-lock-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        let rw = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let ro = || File::open(&path).unwrap();
        let a = ImageLock::new(&path, &rw(), true).unwrap();
        a.take(true).unwrap();
        let b = ImageLock::new(&path, &rw(), true).unwrap();
        let e = b.take(true).unwrap_err().to_string();
        assert!(
            e.contains("writes to it; two VMs writing one image corrupt it"),
            "{e}"
        );
        let r = ImageLock::new(&path, &ro(), false).unwrap();
        assert!(r
            .take(true)
            .unwrap_err()
            .to_string()
            .contains("a read-only disk would change"));
        // Released (a migration's hand-over): the others may have it.
        a.release();
        r.take(true).unwrap();
        let r2 = ImageLock::new(&path, &ro(), false).unwrap();
        r2.take(true).unwrap();
        let e = b.take(true).unwrap_err().to_string();
        assert!(e.contains("reads it (readonly=on)"), "{e}");
        // A copy of the descriptor (blockd's) shares the lock: same open file description.
        let desc = rw();
        let c = ImageLock::new(&path, &desc, true).unwrap();
        r.release();
        r2.release();
        c.take(true).unwrap();
        let copy = ImageLock::new(&path, &desc, true).unwrap();
        copy.take(true).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
