//! virtio-blk requests: parsed from a descriptor chain that a guest may have built to harm us,
//! checked, and executed straight on guest memory (the data never passes through a buffer).
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable memory, the data,
//! and a one-byte status in the last device-writable byte. The spec fixes no framing, so the
//! header and the status may be split over descriptors however the driver likes.

use crate::disk::{self, Disk, SECTOR_SHIFT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use virtio_bindings::virtio_blk as blk;

pub const T_IN: u32 = blk::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = blk::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = blk::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = blk::VIRTIO_BLK_T_WRITE_ZEROES;

pub const S_OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;
const HEADER: usize = 16;
const SEGMENT: usize = 16;
const WZ_FLAG_UNMAP: u32 = 1;

/// A contiguous piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u64,
}

/// Pieces of guest memory as (guest address, length).
pub type Pieces = Vec<(u64, u64)>;

/// The chain, split into what the device reads and what it writes.
#[derive(Debug, Default)]
pub struct Chain {
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    /// A readable descriptor after a writable one (a spec violation).
    pub misordered: bool,
}

impl Chain {
    /// Its readable and writable pieces, as (guest address, length).
    pub fn pieces(&self) -> (Pieces, Pieces) {
        let p = |v: &[Seg]| v.iter().map(|s| (s.addr, s.len)).collect();
        (p(&self.readable), p(&self.writable))
    }

    pub fn from_descriptors(descs: impl Iterator<Item = Descriptor>) -> Chain {
        let mut c = Chain::default();
        for d in descs {
            let seg = Seg {
                addr: d.addr().0,
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                c.writable.push(seg);
            } else {
                if !c.writable.is_empty() {
                    c.misordered = true;
                }
                c.readable.push(seg);
            }
        }
        c
    }

    /// The chain that starts at descriptor `head` of the table at `table` (`size` entries),
    /// following indirect tables, with the checks virtio-queue's iterator makes: every index in
    /// range, no loop, no indirect table inside another, and an indirect table's length a
    /// multiple of 16. Used for requests a restarted blockd resubmits, which do not come from
    /// the available ring.
    pub fn at_head<M: GuestMemoryBackend>(
        mem: &M,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Result<Chain, ChainError> {
        let read = |table: GuestAddress, i: u16| -> Result<Descriptor, ChainError> {
            let at = table
                .0
                .checked_add(u64::from(i) * SEGMENT as u64)
                .ok_or(ChainError::AddressOverflow(i))?;
            mem.read_obj::<Descriptor>(GuestAddress(at))
                .map_err(|e| ChainError::NotInMemory(i, at, e))
        };
        if head >= size {
            return Err(ChainError::HeadBeyond(head, size));
        }
        let mut out = Vec::new();
        let (mut table, mut size, mut i, mut indirect) = (table, size, head, false);
        // Descriptors read from the current table: more than it holds means a loop.
        let mut steps = 0usize;
        loop {
            if steps >= usize::from(size) {
                return Err(ChainError::Loops(head));
            }
            steps += 1;
            let d = read(table, i)?;
            if d.refers_to_indirect_table() {
                if indirect {
                    return Err(ChainError::NestedIndirect(head));
                }
                let len = d.len() as usize;
                if len == 0 || !len.is_multiple_of(SEGMENT) || len / SEGMENT > usize::from(u16::MAX)
                {
                    return Err(ChainError::IndirectLength(head, len));
                }
                (table, size, i, indirect) = (d.addr(), (len / SEGMENT) as u16, 0, true);
                steps = 0;
                continue;
            }
            out.push(d);
            if !d.has_next() {
                break;
            }
            i = d.next();
            if i >= size {
                return Err(ChainError::NextBeyond(head, i, size));
            }
        }
        Ok(Chain::from_descriptors(out.into_iter()))
    }
}

/// A descriptor chain a resubmitted request cannot be read from.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {0}'s address overflows")]
    AddressOverflow(u16),
    #[error("descriptor {0} at {1:#x} is not in guest memory ({2})")]
    NotInMemory(u16, u64, #[source] vm_memory::GuestMemoryError),
    #[error("head {0} is beyond the ring's {1} descriptors")]
    HeadBeyond(u16, u16),
    #[error("the chain at head {0} loops")]
    Loops(u16),
    #[error("the chain at head {0} nests indirect tables")]
    NestedIndirect(u16),
    #[error("the chain at head {0} has an indirect table of {1} bytes")]
    IndirectLength(u16, usize),
    #[error("the chain at head {0} points to descriptor {1} of {2}")]
    NextBeyond(u16, u16, u16),
}

/// Takes `n` bytes off the front of a list of segments.
fn take(segs: &mut Vec<Seg>, mut n: u64) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    let mut i = 0;
    while n > 0 {
        let s = segs.get_mut(i)?;
        let k = s.len.min(n);
        out.push(Seg {
            addr: s.addr,
            len: k,
        });
        s.addr = s.addr.checked_add(k)?;
        s.len -= k;
        n -= k;
        if s.len == 0 {
            i += 1;
        }
    }
    segs.drain(..i);
    Some(out)
}

/// Takes `n` bytes off the end. None if there are not that many, or if the last piece runs
/// past the end of the address space (a guest's descriptor may claim anything).
fn take_back(segs: &mut Vec<Seg>, mut n: u64) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    while n > 0 {
        let s = segs.last_mut()?;
        let k = s.len.min(n);
        out.insert(
            0,
            Seg {
                addr: s.addr.checked_add(s.len - k)?,
                len: k,
            },
        );
        s.len -= k;
        n -= k;
        if s.len == 0 {
            segs.pop();
        }
    }
    Some(out)
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

fn read_bytes<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], out: &mut [u8]) -> bool {
    let mut at = 0;
    for s in segs {
        let n = s.len as usize;
        if mem
            .read_slice(&mut out[at..at + n], GuestAddress(s.addr))
            .is_err()
        {
            return false;
        }
        at += n;
    }
    true
}

fn write_bytes<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], mut data: &[u8]) -> bool {
    for s in segs {
        let n = (s.len as usize).min(data.len());
        if mem.write_slice(&data[..n], GuestAddress(s.addr)).is_err() {
            return false;
        }
        data = &data[n..];
    }
    true
}

/// The outcome of one request: the status written, and the bytes written into the chain
/// (the used length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub status: u8,
    pub used: u32,
}

/// Why a request failed, for the log (rate-limited by the caller).
pub type Why = Option<String>;

/// A read or write ready to go to the image: the guest's buffers as iovecs (pointers into the
/// guest RAM mapping, checked to lie inside it).
pub struct Io {
    pub write: bool,
    /// A FLUSH: no data; `write` is false and `len` 0.
    pub flush: bool,
    pub iovs: Vec<libc::iovec>,
    pub offset: u64,
    pub len: u64,
}

impl Io {
    /// Does the transfer (or the flush) synchronously.
    pub fn run(&self, disk: &Disk) -> std::io::Result<u64> {
        if self.flush {
            disk.flush().map(|()| 0)
        } else {
            disk.rw(&mut self.iovs.clone(), self.offset, self.write)
        }
    }
}

/// A request whose data transfer is still to be done (by the caller, synchronously or through
/// io_uring), then finished with `finish`.
pub struct Pending {
    pub io: Io,
    status: Vec<Seg>,
    start: std::time::Instant,
}

pub enum Prepared {
    /// Answered already (everything but reads and writes, and every malformed request).
    Done(Done, Why),
    Io(Pending),
}

enum Step {
    Status(u8, u64, Why),
    Io(Io),
}

fn answer<M: GuestMemoryBackend>(mem: &M, status_seg: &[Seg], status: u8, data_in: u64) -> Done {
    let ok = write_bytes(mem, status_seg, &[status]);
    let used = if ok { data_in as u32 + 1 } else { 0 };
    Done { status, used }
}

/// Parses a request and does it, unless it is a read or write (see `Pending`). Never panics
/// and never touches memory outside the guest's RAM, whatever the chain holds.
pub fn prepare<M: GuestMemoryBackend>(disk: &Disk, mem: &M, mut chain: Chain) -> Prepared {
    let start = std::time::Instant::now();
    // The status byte is the last writable byte; without one there is nothing to answer on.
    let Some(status_seg) = take_back(&mut chain.writable, 1) else {
        disk.stats
            .invalid
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Prepared::Done(
            Done {
                status: S_IOERR,
                used: 0,
            },
            Some("the chain has no writable status byte (or its last writable descriptor runs past the end of the address space)".into()),
        );
    };
    match run(disk, mem, &mut chain) {
        Step::Status(status, data_in, why) => {
            Prepared::Done(answer(mem, &status_seg, status, data_in), why)
        }
        Step::Io(io) => Prepared::Io(Pending {
            io,
            status: status_seg,
            start,
        }),
    }
}

impl Pending {
    /// Records the transfer's result and answers the guest.
    pub fn finish<M: GuestMemoryBackend>(
        &self,
        disk: &Disk,
        mem: &M,
        result: std::io::Result<u64>,
    ) -> (Done, Why) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = if self.io.flush {
            &disk.stats.flush
        } else if self.io.write {
            &disk.stats.write
        } else {
            &disk.stats.read
        };
        stats.record_latency(self.start);
        let (status, data_in, why) = match result {
            Ok(n) if n == self.io.len => {
                stats.bytes.fetch_add(n, Relaxed);
                (S_OK, if self.io.write { 0 } else { n }, None)
            }
            Ok(n) => {
                stats.errors.fetch_add(1, Relaxed);
                (
                    S_IOERR,
                    0,
                    Some(format!(
                        "short transfer at byte {}: {n} of {} bytes",
                        self.io.offset, self.io.len
                    )),
                )
            }
            Err(e) => {
                stats.errors.fetch_add(1, Relaxed);
                let why = if self.io.flush {
                    format!("flush: {e}")
                } else {
                    format!("I/O error at byte {}: {e}", self.io.offset)
                };
                (S_IOERR, 0, Some(why))
            }
        };
        (answer(mem, &self.status, status, data_in), why)
    }
}

/// Parses and executes one request synchronously (as a queue without io_uring does; the tests
/// and the fuzz targets drive requests through it).
pub fn execute<M: GuestMemoryBackend>(disk: &Disk, mem: &M, chain: Chain) -> (Done, Why) {
    match prepare(disk, mem, chain) {
        Prepared::Done(done, why) => (done, why),
        Prepared::Io(mut p) => {
            let r = p.io.run(disk);
            p.io.iovs.clear();
            p.finish(disk, mem, r)
        }
    }
}

fn run<M: GuestMemoryBackend>(disk: &Disk, mem: &M, chain: &mut Chain) -> Step {
    let mut io = None;
    let (status, data_in, why) = parse(disk, mem, chain, &mut io);
    match io {
        Some(io) => Step::Io(io),
        None => Step::Status(status, data_in, why),
    }
}

/// Checks the request and does it, except the data transfer of a read or write, which it
/// leaves in `io` (the status it returns then means nothing).
/// Connections in post-copy (see connection.rs): while any is, each request's data buffers
/// are read once per page here, in this thread, before the kernel copies to or from them. A
/// page still on the source then faults in user mode, which blockd's userfaultfd makes wait
/// for it; a copy by the kernel (pwritev, io_uring) into a missing page would not.
pub static PREFAULT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Reads one byte of every page of `segs` (whatever is outside guest memory is skipped: the
/// request is refused for it below).
fn touch<M: GuestMemoryBackend>(mem: &M, segs: &[Seg]) {
    const PAGE: u64 = 4096;
    for s in segs {
        let end = s.addr.saturating_add(s.len);
        let mut at = s.addr;
        while at < end {
            let _ = mem.read_obj::<u8>(GuestAddress(at));
            at = (at / PAGE + 1) * PAGE;
        }
    }
}

/// A read or write: checks it against the disk and guest memory, and leaves the transfer
/// in `io` for the caller.
fn data_transfer<M: GuestMemoryBackend>(
    disk: &Disk,
    mem: &M,
    chain: &Chain,
    write: bool,
    sector: u64,
    io: &mut Option<Io>,
) -> (u8, u64, Why) {
    use std::sync::atomic::Ordering::Relaxed;
    let invalid = |why: String| {
        disk.stats.invalid.fetch_add(1, Relaxed);
        (S_IOERR, 0, Some(why))
    };
    let segs = if write {
        &chain.readable
    } else {
        &chain.writable
    };
    let len = total(segs);
    let stats = if write {
        &disk.stats.write
    } else {
        &disk.stats.read
    };
    stats.requests.fetch_add(1, Relaxed);
    if !len.is_multiple_of(disk::SECTOR_SIZE) || len > u64::from(u32::MAX) {
        stats.errors.fetch_add(1, Relaxed);
        return invalid(format!(
            "a data length of {len} bytes is not a whole number of sectors"
        ));
    }
    let Some(offset) = sector.checked_mul(disk::SECTOR_SIZE) else {
        stats.errors.fetch_add(1, Relaxed);
        return invalid(format!("sector {sector} is beyond the disk"));
    };
    if !disk.contains(offset, len) {
        stats.errors.fetch_add(1, Relaxed);
        return invalid(format!(
            "sectors {sector}+{} are beyond the disk's {}",
            len >> SECTOR_SHIFT,
            disk.size() >> SECTOR_SHIFT
        ));
    }
    if write && disk.options.readonly {
        stats.errors.fetch_add(1, Relaxed);
        return (S_IOERR, 0, Some("a write to a read-only disk".into()));
    }
    if PREFAULT.load(Relaxed) > 0 {
        touch(mem, segs);
    }
    let mut iovs = Vec::with_capacity(segs.len());
    for s in segs.iter() {
        for slice in mem.get_slices(GuestAddress(s.addr), s.len as usize) {
            match slice {
                Ok(v) => iovs.push(libc::iovec {
                    iov_base: v.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                    iov_len: v.len(),
                }),
                Err(_) => {
                    stats.errors.fetch_add(1, Relaxed);
                    return invalid(format!(
                        "a data buffer at {:#x}+{:#x} is outside guest memory",
                        s.addr, s.len
                    ));
                }
            }
        }
    }
    *io = Some(Io {
        write,
        flush: false,
        iovs,
        offset,
        len,
    });
    (S_OK, 0, None)
}

fn parse<M: GuestMemoryBackend>(
    disk: &Disk,
    mem: &M,
    chain: &mut Chain,
    io: &mut Option<Io>,
) -> (u8, u64, Why) {
    use std::sync::atomic::Ordering::Relaxed;
    let invalid = |why: String| {
        disk.stats.invalid.fetch_add(1, Relaxed);
        (S_IOERR, 0, Some(why))
    };
    if chain.misordered {
        return invalid("a device-readable descriptor follows a writable one".into());
    }
    let Some(hdr_segs) = take(&mut chain.readable, HEADER as u64) else {
        return invalid("the request header is shorter than 16 bytes".into());
    };
    let mut hdr = [0u8; HEADER];
    if !read_bytes(mem, &hdr_segs, &mut hdr) {
        return invalid("the request header is outside guest memory".into());
    }
    let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let readonly = disk.options.readonly;
    match kind {
        T_IN | T_OUT => data_transfer(disk, mem, chain, kind == T_OUT, sector, io),
        T_FLUSH => {
            // Done by the caller, like a transfer (fault rules and the error policy apply).
            disk.stats.flush.requests.fetch_add(1, Relaxed);
            *io = Some(Io {
                write: false,
                flush: true,
                iovs: Vec::new(),
                offset: 0,
                len: 0,
            });
            (S_OK, 0, None)
        }
        T_GET_ID => {
            disk.stats.get_id.requests.fetch_add(1, Relaxed);
            let mut id = [0u8; ID_BYTES];
            let serial = disk.options.serial.as_bytes();
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial[..n]);
            let room = total(&chain.writable).min(ID_BYTES as u64) as usize;
            if !write_bytes(mem, &chain.writable, &id[..room]) {
                return invalid("the GET_ID buffer is outside guest memory".into());
            }
            (S_OK, room as u64, None)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let discard = kind == T_DISCARD;
            let stats = if discard {
                &disk.stats.discard
            } else {
                &disk.stats.write_zeroes
            };
            stats.requests.fetch_add(1, Relaxed);
            if readonly {
                stats.errors.fetch_add(1, Relaxed);
                return (
                    S_IOERR,
                    0,
                    Some("discard or write-zeroes on a read-only disk".into()),
                );
            }
            let len = total(&chain.readable);
            let count = len / SEGMENT as u64;
            if !len.is_multiple_of(SEGMENT as u64)
                || count == 0
                || count > u64::from(disk::MAX_DISCARD_SEG)
            {
                stats.errors.fetch_add(1, Relaxed);
                return invalid(format!(
                    "{len} bytes of discard/write-zeroes segments; expected 1 to {} segments of 16 bytes",
                    disk::MAX_DISCARD_SEG
                ));
            }
            let mut raw = vec![0u8; len as usize];
            if !read_bytes(mem, &chain.readable, &mut raw) {
                return invalid("discard/write-zeroes segments outside guest memory".into());
            }
            // Check every segment before acting on any.
            let mut ranges = Vec::new();
            for seg in raw.chunks_exact(SEGMENT) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                let allowed = if discard { 0 } else { WZ_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    stats.errors.fetch_add(1, Relaxed);
                    disk.stats.invalid.fetch_add(1, Relaxed);
                    return (
                        S_UNSUPP,
                        0,
                        Some(format!("unsupported segment flags {flags:#x}")),
                    );
                }
                let offset = sector.checked_mul(disk::SECTOR_SIZE);
                let bytes = u64::from(sectors) << SECTOR_SHIFT;
                match offset {
                    Some(o) if sectors <= disk::MAX_DISCARD_SECTORS && disk.contains(o, bytes) => {
                        ranges.push((o, bytes, flags & WZ_FLAG_UNMAP != 0))
                    }
                    _ => {
                        stats.errors.fetch_add(1, Relaxed);
                        return invalid(format!(
                            "sectors {sector}+{sectors} are beyond the disk or the per-segment limit"
                        ));
                    }
                }
            }
            let start = std::time::Instant::now();
            for (offset, bytes, unmap) in ranges {
                disk.zeroing(offset, bytes, true);
                let r = if discard {
                    disk.discard(offset, bytes)
                } else {
                    disk.write_zeroes(offset, bytes, unmap)
                };
                disk.zeroing(offset, bytes, false);
                if let Err(e) = r {
                    stats.errors.fetch_add(1, Relaxed);
                    return (S_IOERR, 0, Some(format!("at byte {offset}: {e}")));
                }
                stats.bytes.fetch_add(bytes, Relaxed);
            }
            stats.record_latency(start);
            (S_OK, 0, None)
        }
        other => {
            disk.stats.invalid.fetch_add(1, Relaxed);
            (S_UNSUPP, 0, Some(format!("unknown request type {other}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Options;
    use std::io::{Read, Seek, Write};
    use vm_memory::GuestMemoryMmap;

    fn setup(readonly: bool) -> (Disk, std::fs::File, GuestMemoryMmap) {
        let flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        let mut f =
            std::fs::File::from(nix::sys::memfd::memfd_create(c"blockd-test", flags).unwrap());
        f.write_all(&[0x55u8; 64 * 512]).unwrap();
        let d = Disk::new(
            f.try_clone().unwrap(),
            Options {
                readonly,
                queues: 1,
                queue_size: 64,
                writethrough: false,
                serial: "blockd-serial-0123456789".into(),
                format: crate::image::Format::Raw,
                read_error: Default::default(),
                write_error: Default::default(),
            },
        )
        .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (d, f, mem)
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn seg(addr: u64, len: u64) -> Seg {
        Seg { addr, len }
    }

    #[test]
    fn write_then_read_with_split_header_and_status() {
        let (d, mut f, mem) = setup(false);
        header(&mem, 0x1000, T_OUT, 3);
        mem.write_slice(&[0xabu8; 1024], GuestAddress(0x2000))
            .unwrap();
        // The header split 5 + 11, data over two descriptors, status alone.
        let chain = Chain {
            readable: vec![
                seg(0x1000, 5),
                seg(0x1005, 11),
                seg(0x2000, 300),
                seg(0x212c, 724),
            ],
            writable: vec![seg(0x3000, 1)],
            misordered: false,
        };
        let (done, why) = execute(&d, &mem, chain);
        assert_eq!((done.status, done.used, why), (S_OK, 1, None));
        let mut all = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut all).unwrap();
        assert!(all[3 * 512..5 * 512].iter().all(|&b| b == 0xab));
        assert!(all[..3 * 512].iter().all(|&b| b == 0x55));

        header(&mem, 0x1000, T_IN, 2);
        // Data and status share the last descriptor.
        let chain = Chain {
            readable: vec![seg(0x1000, 16)],
            writable: vec![seg(0x4000, 1024 + 1)],
            misordered: false,
        };
        let (done, _) = execute(&d, &mem, chain);
        assert_eq!((done.status, done.used), (S_OK, 1025));
        let mut back = [0u8; 1025];
        mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0x55));
        assert!(back[512..1024].iter().all(|&b| b == 0xab));
        assert_eq!(back[1024], S_OK);
    }

    #[test]
    fn malformed_requests_get_errors_not_crashes() {
        let (d, _f, mem) = setup(false);
        let status = |chain: Chain| {
            let (done, why) = execute(&d, &mem, chain);
            assert!(why.is_some() || done.status == S_OK);
            done.status
        };
        // Beyond the end of the disk.
        header(&mem, 0x1000, T_IN, 63);
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0x4000, 1024), seg(0x5000, 1)],
                misordered: false
            }),
            S_IOERR
        );
        // Sector overflow.
        header(&mem, 0x1000, T_OUT, u64::MAX);
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 16), seg(0x2000, 512)],
                writable: vec![seg(0x5000, 1)],
                misordered: false
            }),
            S_IOERR
        );
        // Data outside guest memory.
        header(&mem, 0x1000, T_IN, 0);
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0xffff_0000, 512), seg(0x5000, 1)],
                misordered: false
            }),
            S_IOERR
        );
        // Short header, odd lengths, unknown type, misordered chain.
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 8)],
                writable: vec![seg(0x5000, 1)],
                misordered: false
            }),
            S_IOERR
        );
        header(&mem, 0x1000, T_OUT, 0);
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 16), seg(0x2000, 100)],
                writable: vec![seg(0x5000, 1)],
                misordered: false
            }),
            S_IOERR
        );
        header(&mem, 0x1000, 77, 0);
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0x5000, 1)],
                misordered: false
            }),
            S_UNSUPP
        );
        header(&mem, 0x1000, T_FLUSH, 0);
        assert_eq!(
            status(Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0x5000, 1)],
                misordered: true
            }),
            S_IOERR
        );
        // No status byte at all: nothing is written.
        let (done, _) = execute(
            &d,
            &mem,
            Chain {
                readable: vec![seg(0x1000, 16)],
                ..Default::default()
            },
        );
        assert_eq!(done.used, 0);
        // A last writable descriptor that runs past the end of the address space (found by
        // fuzz/blk_request: the status byte's address overflowed, to a low guest address).
        mem.write_slice(&[0x55], GuestAddress(0xff)).unwrap();
        let (done, why) = execute(
            &d,
            &mem,
            Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(u64::MAX - 0xff, 0x200)],
                misordered: false,
            },
        );
        assert_eq!((done.status, done.used), (S_IOERR, 0), "{why:?}");
        assert!(why.unwrap().contains("past the end of the address space"));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xff)).unwrap(), 0x55);
        // Status outside memory.
        let (done, _) = execute(
            &d,
            &mem,
            Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0xffff_ffff_0000, 1)],
                misordered: false,
            },
        );
        assert_eq!(done.used, 0);
        assert!(d.stats.invalid.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_zeroing() {
        let (d, mut f, mem) = setup(true);
        header(&mem, 0x1000, T_OUT, 0);
        mem.write_slice(&[1u8; 512], GuestAddress(0x2000)).unwrap();
        let (done, _) = execute(
            &d,
            &mem,
            Chain {
                readable: vec![seg(0x1000, 16), seg(0x2000, 512)],
                writable: vec![seg(0x5000, 1)],
                misordered: false,
            },
        );
        assert_eq!(done.status, S_IOERR);
        let mut all = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0x55));
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let (d, mut f, mem) = setup(false);
        header(&mem, 0x1000, T_GET_ID, 0);
        let (done, _) = execute(
            &d,
            &mem,
            Chain {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0x4000, 20), seg(0x5000, 1)],
                misordered: false,
            },
        );
        assert_eq!((done.status, done.used), (S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x4000)).unwrap();
        assert_eq!(&id, b"blockd-serial-012345");

        let mut segs = Vec::new();
        for (sector, n, flags) in [(0u64, 2u32, 0u32), (10, 1, 0)] {
            segs.extend_from_slice(&sector.to_le_bytes());
            segs.extend_from_slice(&n.to_le_bytes());
            segs.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write_slice(&segs, GuestAddress(0x2000)).unwrap();
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            header(&mem, 0x1000, kind, 0);
            let (done, why) = execute(
                &d,
                &mem,
                Chain {
                    readable: vec![seg(0x1000, 16), seg(0x2000, 32)],
                    writable: vec![seg(0x5000, 1)],
                    misordered: false,
                },
            );
            assert_eq!(done.status, S_OK, "{why:?}");
        }
        let mut all = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut all).unwrap();
        assert!(all[..1024].iter().all(|&b| b == 0));
        assert!(all[1024..5120].iter().all(|&b| b == 0x55));
        assert!(all[5120..5632].iter().all(|&b| b == 0));
        // An unmap flag on discard is not allowed.
        mem.write_slice(&1u32.to_le_bytes(), GuestAddress(0x2000 + 12))
            .unwrap();
        header(&mem, 0x1000, T_DISCARD, 0);
        let (done, _) = execute(
            &d,
            &mem,
            Chain {
                readable: vec![seg(0x1000, 16), seg(0x2000, 16)],
                writable: vec![seg(0x5000, 1)],
                misordered: false,
            },
        );
        assert_eq!(done.status, S_UNSUPP);
    }
}
