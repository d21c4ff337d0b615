//! A disk image as blockd serves it: its size, its virtio-blk configuration space, and the
//! I/O calls on the image file (positioned vectored reads and writes, flush, discard and
//! write-zeroes).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

// virtio-blk feature bits (virtio 1.2, 5.2.3), as masks of virtio-bindings' bit numbers.
use virtio_bindings::virtio_blk as blk;
use virtio_bindings::{virtio_config, virtio_ring};

/// Feature bit `n` as a mask.
pub const fn bit(n: u32) -> u64 {
    1 << n
}

pub const F_SIZE_MAX: u64 = bit(blk::VIRTIO_BLK_F_SIZE_MAX);
pub const F_SEG_MAX: u64 = bit(blk::VIRTIO_BLK_F_SEG_MAX);
pub const F_RO: u64 = bit(blk::VIRTIO_BLK_F_RO);
pub const F_BLK_SIZE: u64 = bit(blk::VIRTIO_BLK_F_BLK_SIZE);
pub const F_FLUSH: u64 = bit(blk::VIRTIO_BLK_F_FLUSH);
pub const F_TOPOLOGY: u64 = bit(blk::VIRTIO_BLK_F_TOPOLOGY);
pub const F_CONFIG_WCE: u64 = bit(blk::VIRTIO_BLK_F_CONFIG_WCE);
pub const F_MQ: u64 = bit(blk::VIRTIO_BLK_F_MQ);
pub const F_DISCARD: u64 = bit(blk::VIRTIO_BLK_F_DISCARD);
pub const F_WRITE_ZEROES: u64 = bit(blk::VIRTIO_BLK_F_WRITE_ZEROES);
pub const F_INDIRECT_DESC: u64 = bit(virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
pub const F_EVENT_IDX: u64 = bit(virtio_ring::VIRTIO_RING_F_EVENT_IDX);
pub const F_VERSION_1: u64 = bit(virtio_config::VIRTIO_F_VERSION_1);

/// The largest single data segment and request we accept.
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard and write-zeroes: at most this many sectors per segment, and segments per request.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
pub const MAX_DISCARD_SEG: u32 = 32;
/// Offset of `writeback` in virtio_blk_config.
pub const CONFIG_WRITEBACK: usize = 32;
pub const CONFIG_SIZE: usize = 60;
/// Memory alignment that O_DIRECT needs; offsets and lengths need the image's block size.
const DIRECT_ALIGN: usize = 512;

nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);

/// The size in bytes and the logical block size of the image `file`: for a regular file its
/// length and 512; for a block device (LVM, NVMe, a loop device), whose st_size is 0, the end
/// its offset can seek to and BLKSSZGET.
pub fn geometry(file: &File) -> std::io::Result<(u64, u32)> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    vmm_proto::image::check(&meta)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if !meta.file_type().is_block_device() {
        return Ok((meta.len(), SECTOR_SIZE as u32));
    }
    let size = std::io::Seek::seek(&mut &*file, std::io::SeekFrom::End(0))?;
    let mut block: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which names a live local; the
    // descriptor is a block device's.
    unsafe { blksszget(file.as_raw_fd(), &mut block) }.map_err(std::io::Error::from)?;
    let block = u32::try_from(block)
        .ok()
        .filter(|b| b.is_power_of_two() && (SECTOR_SIZE as u32..=65536).contains(b))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the block device reports a logical block size of {block} bytes"),
            )
        })?;
    Ok((size, block))
}

#[derive(Debug, Clone)]
pub struct Options {
    pub readonly: bool,
    pub queues: u16,
    pub queue_size: u16,
    /// Every write is durable when it completes (as with a guest that turned the write cache off).
    pub writethrough: bool,
    /// GET_ID's answer, at most 20 bytes.
    pub serial: String,
    pub format: crate::image::Format,
    /// What an I/O error on a read does (QEMU's rerror), and on a write or flush (werror).
    pub read_error: Policy,
    pub write_error: Policy,
}

/// What an I/O error does to the request, as QEMU's rerror/werror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The guest gets IOERR.
    #[default]
    Report,
    /// The request completes as if it had worked.
    Ignore,
    /// The export holds the request and stops; the watcher is told, `resume` retries it.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

/// An error policy that is none of QEMU's.
#[derive(Debug, thiserror::Error)]
#[error("{0}: write report, ignore, stop or enospc")]
pub struct UnknownPolicy(String);

impl std::str::FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Policy, UnknownPolicy> {
        match s {
            "" | "report" => Ok(Policy::Report),
            "ignore" => Ok(Policy::Ignore),
            "stop" => Ok(Policy::Stop),
            "enospc" => Ok(Policy::Enospc),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

impl Policy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::Report => "report",
            Policy::Ignore => "ignore",
            Policy::Stop => "stop",
            Policy::Enospc => "enospc",
        }
    }

    /// Whether an error `e` stops the export under this policy.
    pub fn stops_on(&self, e: &std::io::Error) -> bool {
        match self {
            Policy::Stop => true,
            Policy::Enospc => e.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

/// Where exports report that they stopped on an I/O error: (export, reason). Set by the
/// control server when a client watches.
pub static STOP_REPORTS: std::sync::Mutex<
    Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
> = std::sync::Mutex::new(None);

/// Latency histogram bounds, in microseconds (a last bucket holds everything above).
pub const LATENCY_BOUNDS_US: [u64; 13] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
];

/// Per-operation counters.
#[derive(Default)]
pub struct OpStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
}

impl OpStats {
    pub fn record_latency(&self, since: std::time::Instant) {
        let us = since.elapsed().as_micros() as u64;
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Stats {
    pub read: OpStats,
    pub write: OpStats,
    pub flush: OpStats,
    pub discard: OpStats,
    pub write_zeroes: OpStats,
    pub get_id: OpStats,
    /// Requests refused before any I/O: malformed chains, bad sectors, unknown types.
    pub invalid: AtomicU64,
    /// Used-ring notifications (interrupts) sent to the guest, and those left out because
    /// the driver's used_event (VIRTIO_F_EVENT_IDX) did not ask for them.
    pub interrupts: AtomicU64,
    pub interrupts_suppressed: AtomicU64,
}

/// The image layers a disk serves: the top, which takes the writes, over its backing chain.
/// A live external snapshot stacks a new top on them; a commit merges the top down.
pub struct Layers {
    file: File,
    pub format: crate::image::Format,
    qcow2: Option<crate::image::Qcow2Image>,
    /// The image is open with O_DIRECT: unaligned requests go through an aligned bounce buffer.
    direct: bool,
    /// The backing chain's files, nearest first (kept to stack a new top on them).
    backing: Vec<(File, crate::image::Format)>,
}

pub struct Disk {
    /// Its image and backing chain; swapped only while the disk is quiesced (`quiesce`).
    layers: std::sync::RwLock<Layers>,
    /// Requests may not start (a snapshot or commit swaps the layers).
    paused: AtomicBool,
    /// Queue workers inside their loop plus transfers in flight in io_uring: what `quiesce`
    /// waits to drain.
    pub busy: std::sync::Arc<AtomicU64>,
    /// A commit under way: what the guest wrote since it started (see `commit`), and how far
    /// it is.
    pub job: std::sync::Mutex<Option<crate::job::Job>>,
    /// `job` is set: writes take its lock to be counted (none is taken otherwise).
    committing: AtomicBool,
    /// The top image's path since a snapshot or commit changed it, for `list`.
    pub shown: std::sync::Mutex<Option<String>>,
    /// The image's logical block size (a block device's; 512 for a file): what the guest is
    /// told (VIRTIO_BLK_F_BLK_SIZE), and the alignment O_DIRECT transfers need.
    pub block_size: u32,
    /// Served as raw (as asked), but it starts with the qcow2 magic: the caller warns, in
    /// the words of its own flags.
    pub looks_like_qcow2: bool,
    /// Size in bytes, a whole number of sectors (it grows with `resize`).
    size: AtomicU64,
    pub options: Options,
    writethrough: AtomicBool,
    pub stats: Stats,
    /// The throttle group the export's requests go through, if any.
    pub throttle: std::sync::Mutex<Option<std::sync::Arc<crate::throttle::Group>>>,
    /// The connected frontend's queue timers: a throttle change wakes them.
    pub timers: std::sync::Mutex<Vec<std::sync::Arc<crate::throttle::Timer>>>,
    /// Why the export stopped on an I/O error (error policy stop or enospc); None: it serves.
    pub stopped: std::sync::Mutex<Option<String>>,
    /// Requests held since it stopped, retried at resume.
    pub held_failed: std::sync::atomic::AtomicU32,
    /// Its requests recorded, or answered from a recording.
    pub recording: std::sync::OnceLock<crate::replay::Recording>,
}

/// Every writable disk of this process, for a flush at exit.
static WRITABLE: std::sync::Mutex<Vec<std::sync::Weak<Disk>>> = std::sync::Mutex::new(Vec::new());

/// Flushes every writable disk still in use.
/// `BLOCKD_BREAK_DURABILITY=1`, for the crash-consistency check only (tests/tests/crash.rs):
/// blockd acknowledges write-through writes and flushes without making anything durable, the
/// bug that check must catch. Said loudly in the log whenever it is on.
pub fn broken_durability() -> bool {
    static BROKEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BROKEN.get_or_init(|| {
        let on = std::env::var_os("BLOCKD_BREAK_DURABILITY").is_some_and(|v| v == "1");
        if on {
            log::warn!("BLOCKD_BREAK_DURABILITY=1: writes and flushes are acknowledged WITHOUT being made durable (a deliberate bug, for the crash-consistency check)");
        }
        on
    })
}

/// `BLOCKD_SLOW_LOG_ALL_MS=N`, for the migration tests only (tests/tests/migrate.rs): blockd
/// takes N ms to start logging when a migration asks it to (VHOST_F_LOG_ALL), as a blockd on
/// a loaded host may; the frontend must wait for it before its first pass. Said in the log.
pub fn slow_log_all() {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *MS.get_or_init(|| {
        let ms = std::env::var("BLOCKD_SLOW_LOG_ALL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ms > 0 {
            log::warn!(
                "BLOCKD_SLOW_LOG_ALL_MS={ms}: dirty page logging starts {ms} ms late (for a test)"
            );
        }
        ms
    });
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

pub fn flush_all() -> std::io::Result<()> {
    let disks: Vec<_> = WRITABLE
        .lock()
        .unwrap()
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    for d in disks {
        d.flush()?;
        // Everything recorded goes into the log before blockd exits.
        if let Some(r) = d.recording.get() {
            r.finish();
        }
    }
    Ok(())
}

/// Registers a disk for `flush_all`.
pub fn register(disk: &std::sync::Arc<Disk>) {
    if !disk.options.readonly {
        let mut w = WRITABLE.lock().unwrap();
        w.retain(|d| d.strong_count() > 0);
        w.push(std::sync::Arc::downgrade(disk));
    }
}

impl Disk {
    /// Stops the export on an I/O error: the first reason is kept and reported.
    pub fn stop(&self, export: &str, reason: String) {
        let mut s = self.stopped.lock().unwrap();
        if s.is_none() {
            if reason.starts_with("replay diverged") {
                log::error!("export {export}: stopped: {reason}");
            } else {
                log::error!("export {export}: stopped: {reason}; `resume` retries it");
            }
            *s = Some(reason.clone());
            if let Some(tx) = STOP_REPORTS.lock().unwrap().as_ref() {
                let _ = tx.send((export.to_string(), reason));
            }
        }
    }

    /// Serves again; the queues retry what they hold. Returns how many requests they hold.
    pub fn resume(&self) -> u32 {
        *self.stopped.lock().unwrap() = None;
        for t in self.timers.lock().unwrap().iter() {
            t.arm(std::time::Duration::ZERO);
        }
        self.held_failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A 1 MiB raw image in a memfd, one queue of 16: for the unit tests.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Disk {
        let fd =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(1 << 20).unwrap();
        let options = Options {
            readonly: false,
            queues: 1,
            queue_size: 16,
            writethrough: false,
            serial: "t".into(),
            format: crate::image::Format::Raw,
            read_error: Policy::Report,
            write_error: Policy::Report,
        };
        Disk::new(file, options).unwrap()
    }

    /// An image with no backing chain.
    pub fn new(file: File, options: Options) -> std::io::Result<Disk> {
        Disk::with_backing(file, options, Vec::new())
    }

    /// A qcow2 image over its backing chain (nearest first; see Qcow2Image::open).
    pub fn with_backing(
        file: File,
        options: Options,
        backing: Vec<(File, crate::image::Format)>,
    ) -> std::io::Result<Disk> {
        broken_durability();
        let (_, block_size) = geometry(&file)?;
        let looks_like_qcow2 = options.format == crate::image::Format::Raw && {
            let mut magic = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 0).is_ok()
                && magic == crate::image::QCOW2_MAGIC
        };
        let layers = Layers::open(file, options.format, !options.readonly, backing)?;
        let len = layers.size()?;
        let size = len & !(u64::from(block_size) - 1);
        if size != len {
            log::warn!(
                "the image is {len} bytes, not a whole number of {block_size}-byte blocks; the last {} bytes are not served",
                len - size
            );
        }
        Ok(Disk {
            layers: std::sync::RwLock::new(layers),
            paused: AtomicBool::new(false),
            busy: std::sync::Arc::new(AtomicU64::new(0)),
            job: std::sync::Mutex::new(None),
            committing: AtomicBool::new(false),
            shown: std::sync::Mutex::new(None),
            block_size,
            looks_like_qcow2,
            size: AtomicU64::new(size),
            writethrough: AtomicBool::new(options.writethrough),
            options,
            stats: Stats::default(),
            throttle: std::sync::Mutex::new(None),
            timers: std::sync::Mutex::new(Vec::new()),
            stopped: std::sync::Mutex::new(None),
            held_failed: std::sync::atomic::AtomicU32::new(0),
            recording: std::sync::OnceLock::new(),
        })
    }

    /// A queue worker starts taking requests: None while the disk is paused (the worker
    /// leaves them on its ring; `resume_after_pause` wakes it). The guard counts it busy.
    pub fn enter(&self) -> Option<Busy<'_>> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) {
            self.busy.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Busy(&self.busy))
    }

    /// Counts the caller busy whether or not the disk pauses (completions must be answered).
    pub fn busy_anyway(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(&self.busy)
    }

    /// Pauses the disk and waits (up to `timeout`) until no request touches its image: no
    /// worker in its loop, nothing in flight in io_uring. Requests delayed by a fault rule or
    /// held by the throttle stay where they are. The guard lets them go again when dropped.
    pub fn quiesce(&self, timeout: std::time::Duration) -> Result<Quiesced<'_>, String> {
        if self.paused.swap(true, Ordering::SeqCst) {
            return Err("another snapshot or commit is pausing it".into());
        }
        let q = Quiesced(self, std::time::Instant::now());
        let deadline = std::time::Instant::now() + timeout;
        while self.busy.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "its requests in flight did not finish within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(q)
    }

    /// Runs `f` on the layers, which it may replace (the disk must be quiesced).
    pub fn with_layers_mut<T>(&self, _quiesced: &Quiesced, f: impl FnOnce(&mut Layers) -> T) -> T {
        f(&mut self.layers.write().unwrap())
    }

    /// Runs `f` on the layers as they are.
    pub fn with_layers<T>(&self, f: impl FnOnce(&Layers) -> T) -> T {
        f(&self.layers.read().unwrap())
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the disk to `bytes` (a raw file is extended, a qcow2 image's virtual size grows,
    /// reading as zeroes; a block device must have grown to it already); returns the size it
    /// had. Shrinking a raw file is refused unless `force` (the data past the end is lost).
    pub fn resize(&self, bytes: u64, force: bool) -> Result<u64, String> {
        let old = self.size();
        let block = u64::from(self.block_size);
        if self.options.readonly {
            return Err("the export is read-only".into());
        }
        if self.recording.get().is_some() {
            return Err("it is recorded or replayed (--record, --replay), and a recording does not hold a resize".into());
        }
        if bytes == 0 || !bytes.is_multiple_of(block) {
            return Err(format!(
                "{bytes} bytes is not a whole, non-zero number of {block}-byte blocks"
            ));
        }
        if self.job.lock().unwrap().is_some() {
            return Err("a commit is under way; resize it when the commit is done".into());
        }
        let layers = self.layers.read().unwrap();
        let (now, _) = geometry(&layers.file).map_err(|e| format!("cannot read its size ({e})"))?;
        let device = {
            use std::os::unix::fs::FileTypeExt;
            layers
                .file
                .metadata()
                .is_ok_and(|m| m.file_type().is_block_device())
        };
        if bytes < old && !force {
            return Err(format!(
                "{bytes} bytes is less than its {old}: shrinking loses the data past the new end; give --force if that is meant"
            ));
        }
        match (&layers.qcow2, device) {
            (_, true) if bytes != now => {
                return Err(format!(
                    "a block device of {now} bytes: grow the device first (e.g. lvextend), then give its size"
                ))
            }
            (_, true) => {}
            (Some(_), _) if bytes < old => {
                return Err("a qcow2 image is not shrunk while in use; shrink it offline (qemu-img resize --shrink)".into())
            }
            (Some(q), _) => q
                .grow(bytes)
                .map_err(|e| format!("cannot grow the qcow2 image ({e})"))?,
            (None, false) => layers
                .file
                .set_len(bytes)
                .map_err(|e| format!("cannot set the image file's length ({e})"))?,
        }
        self.size.store(bytes, Ordering::Release);
        Ok(old)
    }

    pub fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_EVENT_IDX
            | F_INDIRECT_DESC
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | F_CONFIG_WCE
            | F_MQ;
        if self.options.readonly {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    pub fn is_direct(&self) -> bool {
        self.layers.read().unwrap().direct
    }

    pub fn format(&self) -> crate::image::Format {
        self.layers.read().unwrap().format
    }

    pub fn writethrough(&self) -> bool {
        self.writethrough.load(Ordering::Relaxed) && !broken_durability()
    }

    /// The guest writes `writeback` (with VIRTIO_BLK_F_CONFIG_WCE): 0 makes every write durable.
    pub fn set_writeback(&self, on: bool) {
        self.writethrough
            .store(!on || self.options.writethrough, Ordering::Relaxed);
    }

    /// struct virtio_blk_config, little-endian.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let put = |c: &mut [u8; CONFIG_SIZE], off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut c, 0, &(self.size() >> SECTOR_SHIFT).to_le_bytes());
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        // Two descriptors go to the header and the status.
        put(
            &mut c,
            12,
            &(u32::from(self.options.queue_size) - 2).to_le_bytes(),
        );
        put(&mut c, 20, &self.block_size.to_le_bytes());
        // Topology: physical blocks of one logical block, no alignment offset, min_io one
        // block, opt_io 0.
        put(&mut c, 26, &1u16.to_le_bytes());
        c[CONFIG_WRITEBACK] = u8::from(!self.writethrough());
        put(&mut c, 34, &self.options.queues.to_le_bytes());
        if !self.options.readonly {
            put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
            put(&mut c, 44, &1u32.to_le_bytes());
            put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes());
            c[56] = 1;
        }
        c
    }

    /// Whether `len` bytes at `offset` lie inside the disk.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    /// A discard or write-zeroes of `len` bytes at `offset` begins (or ends): a recording on
    /// a base copy keeps the bytes of reads it may race.
    pub fn zeroing(&self, offset: u64, len: u64, begins: bool) {
        if let Some(r) = self.recording.get() {
            r.zeroing(offset, len, begins);
        }
    }

    /// Reads into (or, with `write`, writes from) the buffers, all of them, at `offset`.
    pub fn rw(&self, iovs: &mut [libc::iovec], offset: u64, write: bool) -> std::io::Result<u64> {
        let len: usize = iovs.iter().map(|v| v.iov_len).sum();
        let r = self.layers.read().unwrap().rw(
            iovs,
            offset,
            write,
            write && self.writethrough(),
            self.block_size,
        );
        if write {
            self.written(offset, len as u64);
        }
        r
    }

    /// A commit under way learns what the guest changed (whether it worked or not: a failed
    /// write may have changed some of it).
    fn written(&self, offset: u64, len: u64) {
        // (A write that finds no commit yet is done before the commit's first pass reads.)
        if !self.committing.load(Ordering::SeqCst) {
            return;
        }
        if let Some(j) = self.job.lock().unwrap().as_mut() {
            j.written(offset, len);
        }
    }

    /// A commit starts counting the guest's writes.
    pub fn begin_job(&self) {
        *self.job.lock().unwrap() = Some(crate::job::Job::default());
        self.committing.store(true, Ordering::SeqCst);
    }

    /// The commit ends: its account.
    pub fn end_job(&self) -> Option<crate::job::Job> {
        self.committing.store(false, Ordering::SeqCst);
        self.job.lock().unwrap().take()
    }

    /// Whether this transfer can go to the image file as it is (raw, and aligned if O_DIRECT):
    /// then an asynchronous engine may do it on `raw_fd` with `write_flags`.
    pub fn plain_io(&self, iovs: &[libc::iovec], offset: u64) -> bool {
        let l = self.layers.read().unwrap();
        // (A commit's top is qcow2: its writes are counted on the way through `rw`.)
        l.qcow2.is_none() && (!l.direct || l.direct_aligned(iovs, offset, self.block_size))
    }

    /// The top image's descriptor, for io_uring (valid while the disk's worker is busy: the
    /// layers are swapped only when it is quiesced).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.layers.read().unwrap().file.as_raw_fd()
    }

    /// preadv2/pwritev2 flags for a write now: RWF_DSYNC when writes must be durable.
    pub fn write_flags(&self) -> i32 {
        if self.writethrough() {
            libc::RWF_DSYNC
        } else {
            0
        }
    }

    pub fn flush(&self) -> std::io::Result<()> {
        if broken_durability() {
            return Ok(());
        }
        self.layers.read().unwrap().flush()
    }

    /// Deallocates the range: it reads back as zeroes and the file gets sparse there.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.layers.read().unwrap().discard(offset, len);
        self.written(offset, len);
        r
    }

    /// Zeroes the range; with `unmap` it may be deallocated too.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        let r = self.layers.read().unwrap().write_zeroes(
            offset,
            len,
            unmap,
            self.writethrough(),
            self.block_size,
        );
        self.written(offset, len);
        r
    }
}

/// A queue worker in its loop (see `Disk::enter`).
pub struct Busy<'a>(&'a AtomicU64);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A paused disk with nothing in flight (see `Disk::quiesce`); dropped, it serves again and
/// its queues take what waited.
pub struct Quiesced<'a>(&'a Disk, std::time::Instant);

impl Quiesced<'_> {
    /// How long the disk has held its requests so far.
    pub fn held(&self) -> std::time::Duration {
        self.1.elapsed()
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.0.paused.store(false, Ordering::SeqCst);
        for t in self.0.timers.lock().unwrap().iter() {
            t.arm(std::time::Duration::ZERO);
        }
    }
}

impl Layers {
    /// The image (a qcow2 one over its backing chain, nearest first).
    pub fn open(
        file: File,
        format: crate::image::Format,
        writable: bool,
        backing: Vec<(File, crate::image::Format)>,
    ) -> std::io::Result<Layers> {
        let qcow2 = match format {
            crate::image::Format::Raw => None,
            crate::image::Format::Qcow2 => {
                let chain = backing
                    .iter()
                    .map(|(f, fmt)| Ok((f.try_clone()?, *fmt)))
                    .collect::<std::io::Result<Vec<_>>>()?;
                Some(crate::image::Qcow2Image::open(
                    file.try_clone()?,
                    writable,
                    chain,
                )?)
            }
        };
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_retain)
            .unwrap_or(nix::fcntl::OFlag::empty());
        Ok(Layers {
            direct: flags.contains(nix::fcntl::OFlag::O_DIRECT),
            file,
            format,
            qcow2,
            backing,
        })
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> std::io::Result<u64> {
        match &self.qcow2 {
            Some(q) => Ok(q.size()),
            None => Ok(geometry(&self.file)?.0),
        }
    }

    pub fn top(&self) -> &File {
        &self.file
    }

    pub fn qcow2(&self) -> Option<&crate::image::Qcow2Image> {
        self.qcow2.as_ref()
    }

    /// The backing chain, nearest first.
    pub fn backing(&self) -> &[(File, crate::image::Format)] {
        &self.backing
    }

    /// Reads into (or, with `write`, writes from) the buffers, all of them, at `offset`;
    /// `durable`: the write is on the disk when it returns.
    pub fn rw(
        &self,
        iovs: &mut [libc::iovec],
        offset: u64,
        write: bool,
        durable: bool,
        block_size: u32,
    ) -> std::io::Result<u64> {
        if let Some(q) = &self.qcow2 {
            // SAFETY: the iovecs name memory valid for the call (this function's contract).
            let n = unsafe {
                if write {
                    q.writev(iovs, offset)?
                } else {
                    q.readv(iovs, offset)?
                }
            };
            if write && durable {
                q.flush()?;
            }
            return Ok(n);
        }
        if self.direct && !self.direct_aligned(iovs, offset, block_size) {
            return self.rw_bounced(iovs, offset, write, durable, block_size);
        }
        self.rw_direct(iovs, offset, write, durable)
    }

    /// O_DIRECT with buffers it cannot take: through an aligned copy of the whole blocks the
    /// transfer touches. A write that covers part of a block reads that block first (a
    /// guest that respects the block size it was told never needs this).
    fn rw_bounced(
        &self,
        iovs: &[libc::iovec],
        offset: u64,
        write: bool,
        durable: bool,
        block_size: u32,
    ) -> std::io::Result<u64> {
        let block = u64::from(block_size);
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        let start = offset - offset % block;
        let end = (offset + total as u64).div_ceil(block) * block;
        let len = ((end - start) as usize).max(block as usize);
        let head = (offset - start) as usize;
        // A page-aligned window of a zeroed vector.
        let mut storage = vec![0u8; len + 4096];
        let skip = storage.as_ptr().align_offset(4096);
        let buf = &mut storage[skip..skip + len];
        let copy = |buf: &mut [u8], to_buf: bool| {
            let mut at = head;
            for v in iovs {
                let (ours, theirs) = (buf[at..].as_mut_ptr(), v.iov_base as *mut u8);
                // SAFETY: each iovec names v.iov_len bytes valid for the call (this function's
                // contract, as `rw`'s), and `buf` has room for all of them after `at`; the
                // two never overlap (`buf` is ours alone).
                unsafe {
                    if to_buf {
                        std::ptr::copy_nonoverlapping(theirs, ours, v.iov_len)
                    } else {
                        std::ptr::copy_nonoverlapping(ours, theirs, v.iov_len)
                    }
                }
                at += v.iov_len;
            }
        };
        let whole = |buf: &mut [u8], write: bool| {
            let mut one = [libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: (end - start) as usize,
            }];
            self.rw_direct(&mut one, start, write, durable)
        };
        if write {
            if head != 0 || end - start != total as u64 {
                whole(buf, false)?;
            }
            copy(buf, true);
            whole(buf, true)?;
        } else {
            whole(buf, false)?;
            copy(buf, false);
        }
        Ok(total as u64)
    }

    fn rw_direct(
        &self,
        iovs: &mut [libc::iovec],
        mut offset: u64,
        write: bool,
        durable: bool,
    ) -> std::io::Result<u64> {
        let flags = if write && durable { libc::RWF_DSYNC } else { 0 };
        let mut done = 0u64;
        let mut iovs = &mut iovs[..];
        while !iovs.is_empty() {
            let n = iovs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: every iovec names guest memory (or a local buffer) that stays mapped for
            // this call, and n is at most their number.
            let r = unsafe {
                if write {
                    libc::pwritev2(
                        self.file.as_raw_fd(),
                        iovs.as_ptr(),
                        n,
                        offset as i64,
                        flags,
                    )
                } else {
                    libc::preadv2(self.file.as_raw_fd(), iovs.as_ptr(), n, offset as i64, 0)
                }
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the image ended early",
                ));
            }
            let mut r = r as usize;
            done += r as u64;
            offset += r as u64;
            while r > 0 && !iovs.is_empty() {
                if r >= iovs[0].iov_len {
                    r -= iovs[0].iov_len;
                    iovs = &mut iovs[1..];
                } else {
                    iovs[0].iov_base = (iovs[0].iov_base as usize + r) as *mut libc::c_void;
                    iovs[0].iov_len -= r;
                    r = 0;
                }
            }
            while !iovs.is_empty() && iovs[0].iov_len == 0 {
                iovs = &mut iovs[1..];
            }
        }
        Ok(done)
    }

    /// Whether O_DIRECT takes these buffers at `offset` as they are: memory aligned to 512
    /// bytes, offset and lengths to the block size.
    fn direct_aligned(&self, iovs: &[libc::iovec], offset: u64, block_size: u32) -> bool {
        let block = block_size as usize;
        (offset as usize).is_multiple_of(block)
            && iovs.iter().all(|v| {
                (v.iov_base as usize).is_multiple_of(DIRECT_ALIGN)
                    && v.iov_len.is_multiple_of(block)
            })
    }

    pub fn flush(&self) -> std::io::Result<()> {
        match &self.qcow2 {
            Some(q) => q.flush(),
            None => self.file.sync_data(),
        }
    }

    /// Deallocates the range: it reads back as zeroes and the file gets sparse there.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if let Some(q) = &self.qcow2 {
            return q.discard(offset, len);
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes the range; with `unmap` it may be deallocated too.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        durable: bool,
        block_size: u32,
    ) -> std::io::Result<()> {
        if let Some(q) = &self.qcow2 {
            if unmap {
                q.discard(offset, len)?;
            } else {
                q.write_zeroes(offset, len)?;
            }
            if durable {
                q.flush()?;
            }
            return Ok(());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len, block_size)
            }
            r => r,
        }?;
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zero_buffers(
        &self,
        mut offset: u64,
        len: u64,
        block_size: u32,
    ) -> std::io::Result<()> {
        let zeroes = vec![0u8; 1 << 20];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            let mut iov = [libc::iovec {
                iov_base: zeroes.as_ptr() as *mut libc::c_void,
                iov_len: n,
            }];
            self.rw(&mut iov, offset, true, false, block_size)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let mode = nix::fcntl::FallocateFlags::from_bits_retain(mode);
        nix::fcntl::fallocate(&self.file, mode, offset as i64, len as i64)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn disk(bytes: &[u8], readonly: bool) -> (Disk, File) {
        let mut f = tempfile();
        f.write_all(bytes).unwrap();
        let d = Disk::new(
            f.try_clone().unwrap(),
            Options {
                readonly,
                queues: 2,
                queue_size: 128,
                writethrough: false,
                serial: "s".into(),
                format: crate::image::Format::Raw,
                read_error: Default::default(),
                write_error: Default::default(),
            },
        )
        .unwrap();
        (d, f)
    }

    fn tempfile() -> File {
        let flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        File::from(nix::sys::memfd::memfd_create(c"blockd-test", flags).unwrap())
    }

    #[test]
    fn direct_io_takes_unaligned_buffers_through_a_bounce() {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("blockd-direct-{}", std::process::id()));
        std::fs::write(&path, vec![3u8; 8192]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let Ok(f) = f else {
            // A filesystem without O_DIRECT: nothing to test here.
            let _ = std::fs::remove_file(&path);
            return;
        };
        let d = Disk::new(
            f,
            Options {
                readonly: false,
                queues: 1,
                queue_size: 64,
                writethrough: false,
                serial: "s".into(),
                format: crate::image::Format::Raw,
                read_error: Default::default(),
                write_error: Default::default(),
            },
        )
        .unwrap();
        assert!(d.is_direct());
        // A buffer at an odd address.
        let v = vec![9u8; 1024 + 1];
        let mut iov = [libc::iovec {
            iov_base: v[1..].as_ptr() as *mut _,
            iov_len: 1024,
        }];
        assert_eq!(d.rw(&mut iov, 512, true).unwrap(), 1024);
        let mut back = vec![0u8; 1024 + 1];
        let mut iov = [libc::iovec {
            iov_base: back[1..].as_mut_ptr() as *mut _,
            iov_len: 1024,
        }];
        assert_eq!(d.rw(&mut iov, 512, false).unwrap(), 1024);
        assert!(back[1..].iter().all(|&b| b == 9));
        // Part of two blocks (a guest that ignores the block size): read, changed, written.
        let mut v = vec![5u8; 100];
        let mut iov = [libc::iovec {
            iov_base: v.as_mut_ptr() as *mut _,
            iov_len: 100,
        }];
        assert_eq!(d.rw(&mut iov, 2000, true).unwrap(), 100);
        let mut back = vec![0u8; 30];
        let mut iov = [libc::iovec {
            iov_base: back.as_mut_ptr() as *mut _,
            iov_len: 30,
        }];
        assert_eq!(d.rw(&mut iov, 2090, false).unwrap(), 30);
        assert_eq!(&back[..10], &[5u8; 10]);
        assert_eq!(&back[10..], &[3u8; 20]);
        let all = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(all[..512].iter().all(|&b| b == 3) && all[512..1536].iter().all(|&b| b == 9));
        assert!(all[1536..2000].iter().all(|&b| b == 3));
        assert!(all[2000..2100].iter().all(|&b| b == 5));
        assert!(all[2100..].iter().all(|&b| b == 3));
    }

    #[test]
    fn config_space_describes_the_disk() {
        let (d, _) = disk(&[0u8; 4096 + 100], false);
        assert_eq!(d.size(), 4096);
        let c = d.config();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(c[CONFIG_WRITEBACK], 1);
        assert_eq!(c[56], 1);
        assert!(d.features() & F_DISCARD != 0 && d.features() & F_RO == 0);
        let (r, _) = disk(&[0u8; 512], true);
        assert!(r.features() & F_RO != 0 && r.features() & F_DISCARD == 0);
    }

    #[test]
    fn vectored_io_and_zeroing() {
        let (d, mut f) = disk(&[7u8; 8192], false);
        let a = [1u8; 100];
        let b = [2u8; 412];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            },
        ];
        assert_eq!(d.rw(&mut iov, 512, true).unwrap(), 512);
        d.write_zeroes(4096, 512, false).unwrap();
        d.discard(4608, 512).unwrap();
        let mut all = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut all).unwrap();
        assert!(all[..512].iter().all(|&x| x == 7));
        assert!(all[512..612].iter().all(|&x| x == 1));
        assert!(all[612..1024].iter().all(|&x| x == 2));
        assert!(all[4096..5120].iter().all(|&x| x == 0));
        assert!(all[5120..].iter().all(|&x| x == 7));
        assert!(d.contains(8192 - 512, 512) && !d.contains(8192 - 511, 512));
        assert!(!d.contains(u64::MAX, 2));
    }
}
