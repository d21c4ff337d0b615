//! What may be served as a disk, checked the same way where an image is opened by path
//! (vmm-core's `--disk path=`, blockd's `--image`) and where blockd gets it as a descriptor.

/// An image path or descriptor that is neither a regular file nor a block device.
#[derive(Debug, thiserror::Error)]
#[error("{0}: not a disk image; give a regular file (raw or qcow2) or a block device")]
pub struct NotAnImage(pub &'static str);

/// What kind of file `meta` describes, in the words an error uses.
pub fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Ok for a regular file or a block device; otherwise what it is.
pub fn check(meta: &std::fs::Metadata) -> Result<(), NotAnImage> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        Ok(())
    } else {
        Err(NotAnImage(kind(meta)))
    }
}

/// A qcow2 image blockd cannot serve (yet), and why, in the words of a one-line error.
#[derive(Debug, thiserror::Error)]
pub enum Unservable {
    #[error("cannot read its qcow2 header ({0})")]
    Read(std::io::Error),
    #[error("a qcow2 image compressed with zstd; blockd reads zlib-compressed clusters only: `qemu-img convert -O qcow2 -c -o compression_type=zlib IMAGE NEW` (or without -c)")]
    Zstd,
    #[error("a qcow2 image with extended L2 entries (subclusters), which blockd does not read: `qemu-img convert -O qcow2 IMAGE NEW` (extended_l2 off)")]
    ExtendedL2,
    #[error("a qcow2 image whose data lives in an external data file, which blockd does not serve: `qemu-img convert -O qcow2 IMAGE NEW`")]
    ExternalData,
    #[error("an encrypted qcow2 image, which blockd does not serve")]
    Encrypted,
    #[error("a qcow2 image marked corrupt; check and repair it: `qemu-img check -r all IMAGE`")]
    Corrupt,
    #[error("a qcow2 image with incompatible features {0:#x} that blockd does not know")]
    Unknown(u64),
    #[error("its backing file {0} (named by {1}) does not exist; put it back, or flatten the chain with `qemu-img convert`")]
    MissingBacking(String, String),
    #[error("its backing chain has a loop: {0}")]
    Loop(String),
    #[error("a qcow2 overlay on a backing chain ({0}); blockd does not serve backing chains yet: flatten it with `qemu-img convert -O qcow2 IMAGE NEW`")]
    Chain(String),
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The qcow2 header fields that decide whether blockd can serve an image.
struct Header {
    incompatible: u64,
    crypt: u32,
    compression: u8,
    backing: Option<String>,
}

fn header(f: &std::fs::File) -> std::io::Result<Option<Header>> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; 112];
    let n = f.read_at(&mut h, 0)?;
    if n < 72 || h[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().unwrap());
    let version = u32_at(4);
    let (incompatible, header_len) = if version >= 3 && n >= 104 {
        (u64_at(72), u32_at(100))
    } else {
        (0, 72)
    };
    let compression = if header_len > 104 && n > 104 {
        h[104]
    } else {
        0
    };
    let (off, len) = (u64_at(8), u32_at(16));
    let backing = if off != 0 && len > 0 && len <= 1023 {
        let mut name = vec![0u8; len as usize];
        f.read_exact_at(&mut name, off)?;
        Some(String::from_utf8_lossy(&name).into_owned())
    } else {
        None
    };
    Ok(Some(Header {
        incompatible,
        crypt: u32_at(32),
        compression,
        backing,
    }))
}

/// Checks that blockd can serve the qcow2 image at `path` (opened as `f`): none of the
/// features it does not read, and no backing chain (which is walked, as qemu-img resolves
/// it, to name a missing file or a loop). A file that is not qcow2 passes.
pub fn check_qcow2(path: &std::path::Path, f: &std::fs::File) -> Result<(), Unservable> {
    let Some(h) = header(f).map_err(Unservable::Read)? else {
        return Ok(());
    };
    const DIRTY: u64 = 1;
    const CORRUPT: u64 = 1 << 1;
    const EXTERNAL_DATA: u64 = 1 << 2;
    const COMPRESSION: u64 = 1 << 3;
    const EXTENDED_L2: u64 = 1 << 4;
    if h.incompatible & CORRUPT != 0 {
        return Err(Unservable::Corrupt);
    }
    if h.incompatible & EXTERNAL_DATA != 0 {
        return Err(Unservable::ExternalData);
    }
    if h.incompatible & COMPRESSION != 0 && h.compression != 0 {
        return Err(Unservable::Zstd);
    }
    if h.incompatible & EXTENDED_L2 != 0 {
        return Err(Unservable::ExtendedL2);
    }
    let unknown = h.incompatible & !(DIRTY | COMPRESSION);
    if unknown != 0 {
        return Err(Unservable::Unknown(unknown));
    }
    if h.crypt != 0 {
        return Err(Unservable::Encrypted);
    }
    let Some(first) = h.backing else {
        return Ok(());
    };
    // The chain, each name resolved against the directory of the image that names it.
    let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let mut names = vec![path.display().to_string()];
    let mut current = path.to_path_buf();
    let mut next = Some(first);
    while let Some(name) = next.take() {
        let named = std::path::Path::new(&name);
        let resolved = if named.is_absolute() {
            named.to_path_buf()
        } else {
            current
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(named)
        };
        let file = std::fs::File::open(&resolved).map_err(|_| {
            Unservable::MissingBacking(
                resolved.display().to_string(),
                current.display().to_string(),
            )
        })?;
        let canonical = std::fs::canonicalize(&resolved).unwrap_or_else(|_| resolved.clone());
        names.push(resolved.display().to_string());
        if seen.contains(&canonical) {
            return Err(Unservable::Loop(names.join(" -> ")));
        }
        seen.push(canonical);
        next = header(&file)
            .map_err(Unservable::Read)?
            .and_then(|h| h.backing);
        current = resolved;
    }
    Err(Unservable::Chain(names.join(" -> ")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn directories_and_character_devices_are_not_images() {
        let dir = std::fs::metadata("/").unwrap();
        assert_eq!(
            super::check(&dir).unwrap_err().to_string(),
            "a directory: not a disk image; give a regular file (raw or qcow2) or a block device"
        );
        let null = std::fs::metadata("/dev/null").unwrap();
        assert_eq!(super::kind(&null), "a character device");
        assert!(super::check(&null).is_err());
        let exe = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        assert!(super::check(&exe).is_ok());
    }
}
