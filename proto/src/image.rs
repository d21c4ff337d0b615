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
    #[error("its backing file {0} is {1}, which blockd cannot serve under it")]
    Backing(String, Box<Unservable>),
    #[error("its backing chain is deeper than {MAX_CHAIN} images: {0}")]
    TooDeep(String),
}

/// The longest backing chain served (QEMU's own limit is far above; this keeps a crafted
/// chain from opening descriptors without end).
pub const MAX_CHAIN: usize = 16;

/// A backing image under a qcow2 overlay: where it is, its format ("raw" or "qcow2"), and
/// the file, open read-only (as the walk opened it).
#[derive(Debug)]
pub struct Layer {
    pub path: std::path::PathBuf,
    pub format: &'static str,
    pub file: std::fs::File,
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The qcow2 header fields that decide whether blockd can serve an image.
struct Header {
    incompatible: u64,
    crypt: u32,
    compression: u8,
    backing: Option<String>,
    /// The backing file's format, from the header extension that names it.
    backing_format: Option<String>,
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
    // Header extensions: type u32, length u32, data padded to 8 bytes, until type 0.
    const BACKING_FORMAT: u32 = 0xe279_2aca;
    let mut backing_format = None;
    let mut at = u64::from(if version >= 3 { header_len } else { 72 });
    for _ in 0..64 {
        let mut ext = [0u8; 8];
        if f.read_exact_at(&mut ext, at).is_err() {
            break;
        }
        let kind = u32::from_be_bytes(ext[..4].try_into().unwrap());
        let len = u32::from_be_bytes(ext[4..].try_into().unwrap());
        if kind == 0 || len > 4096 {
            break;
        }
        if kind == BACKING_FORMAT {
            let mut name = vec![0u8; len as usize];
            f.read_exact_at(&mut name, at + 8)?;
            backing_format = Some(String::from_utf8_lossy(&name).into_owned());
        }
        at += 8 + u64::from(len).div_ceil(8) * 8;
    }
    Ok(Some(Header {
        incompatible,
        crypt: u32_at(32),
        compression,
        backing,
        backing_format,
    }))
}

/// Checks that blockd can serve the qcow2 image at `path` (opened as `f`): none of the
/// features it does not read, in it and in every image of its backing chain; returns the chain
/// under it (nearest first), each name resolved against the directory of the image that names
/// it, as qemu-img does. A missing backing file and a loop are named. A file that is not qcow2
/// has no chain.
pub fn check_qcow2(path: &std::path::Path, f: &std::fs::File) -> Result<Vec<Layer>, Unservable> {
    check_chain(path, f, None)
}

/// As `check_qcow2`, with the image's backing file given (`backing=`) in place of the one
/// its header names: its format is what the file is, and its own header leads on.
pub fn check_chain(
    path: &std::path::Path,
    f: &std::fs::File,
    backing: Option<&std::path::Path>,
) -> Result<Vec<Layer>, Unservable> {
    let Some(mut h) = header(f).map_err(Unservable::Read)? else {
        return Ok(Vec::new());
    };
    features(&h)?;
    if let Some(b) = backing {
        let b = std::path::absolute(b).unwrap_or_else(|_| b.to_path_buf());
        h.backing = Some(b.display().to_string());
        h.backing_format = None;
    }
    let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let mut names = vec![path.display().to_string()];
    let mut chain = Vec::new();
    let mut current = path.to_path_buf();
    let mut next = h.backing.map(|b| (b, h.backing_format));
    while let Some((name, format)) = next.take() {
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
        if chain.len() == MAX_CHAIN {
            return Err(Unservable::TooDeep(names.join(" -> ")));
        }
        seen.push(canonical);
        let header = header(&file).map_err(Unservable::Read)?;
        // The format the overlay names; without one, what the file is.
        let qcow2 = match format.as_deref() {
            Some("qcow2") => true,
            Some(_) => false,
            None => header.is_some(),
        };
        if qcow2 {
            let h = header.ok_or_else(|| {
                Unservable::Backing(
                    resolved.display().to_string(),
                    Box::new(Unservable::Read(std::io::Error::other(
                        "named as qcow2, but it has no qcow2 header",
                    ))),
                )
            })?;
            features(&h)
                .map_err(|e| Unservable::Backing(resolved.display().to_string(), Box::new(e)))?;
            next = h.backing.map(|b| (b, h.backing_format));
        }
        chain.push(Layer {
            path: resolved.clone(),
            format: if qcow2 { "qcow2" } else { "raw" },
            file,
        });
        current = resolved;
    }
    Ok(chain)
}

/// The incompatible features blockd does not read.
fn features(h: &Header) -> Result<(), Unservable> {
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
    Ok(())
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

/// The base copy of the image at `image` for a recording whose log is at `log`: `LOG.base`,
/// made anew (sparse, see copy_sparse) when the log is new (missing or empty), before its
/// first record. None: the log has records already (the copy beside it, if any, is that
/// recording's and stays as it is).
pub fn base_copy(
    image: &std::path::Path,
    log: &std::path::Path,
) -> std::io::Result<Option<std::path::PathBuf>> {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > 0) {
        return Ok(None);
    }
    let base = base_of(log);
    let src = std::fs::File::open(image)?;
    let dst = std::fs::File::create(&base)?;
    copy_sparse(&src, &dst)?;
    Ok(Some(base))
}

/// A replay's working copy of a recording's base copy at `work`, made anew (sparse), open
/// for reading and writing: the replayed writes are done there.
pub fn working_copy(
    base: &std::path::Path,
    work: &std::path::Path,
) -> std::io::Result<std::fs::File> {
    let src = std::fs::File::open(base)?;
    let dst = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(work)?;
    copy_sparse(&src, &dst)?;
    Ok(dst)
}

/// Where a recording keeps its image as it was at a snapshot, when the log was `bytes` long:
/// beside the log, `LOG.at-BYTES` (a replay from that snapshot works on a copy of it).
pub fn at_mark(log: &std::path::Path, bytes: u64) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".at-{bytes}"));
    name.into()
}

/// Where a replay's working copy is: beside the log, `LOG.work`.
pub fn work_of(log: &std::path::Path) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".work");
    name.into()
}

/// Where the base copy of a recording's log is: beside it, `LOG.base`.
pub fn base_of(log: &std::path::Path) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".base");
    name.into()
}

/// Copies `src` (its whole length, from offset 0) into the empty file `dst`, holes as holes:
/// only the extents with data are copied (copy_file_range, which shares the blocks on file
/// systems that can, as XFS and btrfs do). The base copy a disk's recording starts from.
pub fn copy_sparse(src: &std::fs::File, dst: &std::fs::File) -> std::io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    let size = src.metadata()?.len();
    dst.set_len(size)?;
    let mut at = 0i64;
    let end = size as i64;
    while at < end {
        let data = match lseek(src, at, Whence::SeekData) {
            Ok(d) => d,
            // No data after `at`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src, data, Whence::SeekHole).map_err(std::io::Error::from)?;
        let (mut from, mut to) = (data, data);
        while from < hole {
            let left = (hole - from) as usize;
            let n = nix::fcntl::copy_file_range(src, Some(&mut from), dst, Some(&mut to), left)
                .map_err(std::io::Error::from)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the image ended while it was copied",
                ));
            }
        }
        at = hole;
    }
    Ok(size)
}

#[cfg(test)]
mod copy_tests {
    #[test]
    fn a_sparse_copy_holds_the_same_bytes_and_the_holes_stay_holes() {
        use std::io::{Seek, Write};
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("vmm-copy-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let mut f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(b"start").unwrap();
        f.seek(std::io::SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        drop(f);
        let src = std::fs::File::open(&a).unwrap();
        let dst = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&b)
            .unwrap();
        assert_eq!(super::copy_sparse(&src, &dst).unwrap(), 64 << 20);
        drop(dst);
        let same = std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap();
        let blocks = std::fs::metadata(&b).unwrap().blocks();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(same, "the copy differs");
        assert!(
            blocks < 1024,
            "the copy is not sparse: {blocks} blocks of 512 bytes"
        );
    }
}

/// What a writer killed while imago 0.2.6 hooked a new L2 table (or a grown L1 table) into a
/// qcow2 image can leave: the L1 entry (or the header's L1 pointer) written, the refcount that
/// counts the new cluster not, so that the next allocation could take that cluster again.
/// Sets each such refcount to 1 (what it was to be) and returns how many; an image without
/// the fault is not written. Its refcount block must exist (one covers 2 GiB of image at the
/// default sizes); where it does not, the error says to run `qemu-img check -r all`.
/// Call it with no writer on the image.
pub fn repair_l2_refcounts(f: &std::fs::File) -> Result<u32, String> {
    use std::os::unix::fs::FileExt;
    let io = |what: &str, e: std::io::Error| format!("cannot read its {what} ({e})");
    let mut h = [0u8; 104];
    let n = f.read_at(&mut h, 0).map_err(|e| io("header", e))?;
    if n < 72 || h[..4] != QCOW2_MAGIC {
        return Ok(0);
    }
    let u32_at = |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |b: &[u8], i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    let version = u32_at(&h, 4);
    let cluster_bits = u32_at(&h, 20);
    let l1_size = u64::from(u32_at(&h, 36));
    let l1_offset = u64_at(&h, 40);
    let rt_offset = u64_at(&h, 48);
    let rt_clusters = u64::from(u32_at(&h, 56));
    let refcount_order = if version >= 3 && n >= 104 {
        u32_at(&h, 96)
    } else {
        4
    };
    if !(9..=21).contains(&cluster_bits) || refcount_order > 6 || l1_size > 1 << 25 {
        return Err("its header is out of range".into());
    }
    let cluster = 1u64 << cluster_bits;
    let bits = 1u64 << refcount_order;
    let per_block = cluster * 8 / bits;
    // The clusters to check: the L1 table's own, and every L2 table it points to.
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    f.read_exact_at(&mut l1, l1_offset)
        .map_err(|e| io("L1 table", e))?;
    let mut clusters: Vec<u64> =
        (l1_offset >> cluster_bits..(l1_offset + l1_size * 8).div_ceil(cluster)).collect();
    const L1E_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    clusters.extend(
        l1.chunks_exact(8)
            .map(|e| u64::from_be_bytes(e.try_into().unwrap()) & L1E_OFFSET)
            .filter(|&o| o != 0)
            .map(|o| o >> cluster_bits),
    );
    let mut repaired = 0;
    for c in clusters {
        let index = c / per_block;
        if index >= rt_clusters * cluster / 8 {
            return Err(format!(
                "cluster {c} is past its refcount table; repair it with `qemu-img check -r all`"
            ));
        }
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, rt_offset + index * 8)
            .map_err(|e| io("refcount table", e))?;
        let block = u64::from_be_bytes(e) & !0x1ff;
        if block == 0 {
            return Err(format!(
                "cluster {c} has no refcount block; repair it with `qemu-img check -r all`"
            ));
        }
        let bit = (c % per_block) * bits;
        let at = block + bit / 8;
        let width = bits.div_ceil(8) as usize;
        let mut r = [0u8; 8];
        f.read_exact_at(&mut r[..width], at)
            .map_err(|e| io("refcount block", e))?;
        let count = if bits >= 8 {
            r[..width].iter().fold(0u64, |v, &b| v << 8 | u64::from(b))
        } else {
            // Narrower entries are packed from the low bits of each byte up (as QEMU reads them).
            u64::from(r[0] >> (bit % 8)) & ((1 << bits) - 1)
        };
        if count != 0 {
            continue;
        }
        if bits >= 8 {
            r[width - 1] = 1;
        } else {
            r[0] |= 1 << (bit % 8);
        }
        f.write_all_at(&r[..width], at)
            .map_err(|e| format!("cannot write its refcount block ({e})"))?;
        repaired += 1;
    }
    if repaired > 0 {
        f.sync_data()
            .map_err(|e| format!("cannot flush the repaired refcounts ({e})"))?;
    }
    Ok(repaired)
}
