//! A virtio-blk driver over the modern virtio-pci transport, as small as a test needs: PCI
//! enumeration through the type-1 ports, the virtio capabilities, MSI-X (vectors are set up and
//! their arrival checked in the LAPIC's IRR; completions are polled, interrupts stay off), split
//! virtqueues, and every request type.
//!
//! Scenario `blk` (tg.blk.* parameters):
//! - `tg.blk.seed=N`: the pattern's seed; each 8-byte word at disk byte offset `o` is
//!   `(o / 8 + seed) * 0x9E3779B97F4A7C15` (wrapping), which the host computes too;
//! - `tg.blk.check=1`: first verify that the disk holds the host's pattern (seed `tg.blk.host=N`);
//! - then, on each writable disk: write the pattern over the whole disk, flush, read it back and
//!   verify; discard and write-zeroes two ranges and read back zeroes; on read-only disks try one
//!   write and report its status.

use crate::io::{inl, outl, Line};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_BLK_MODERN: u32 = 0x1042;
/// A transitional virtio-blk (QEMU's default): it has the modern capabilities too, and its
/// subsystem ID names the device type (2, block).
const VIRTIO_BLK_TRANSITIONAL: u32 = 0x1001;
/// What the guest's page tables map (tests/guest/src/entry.rs): BARs must lie below.
const IDENTITY_MAPPED: u64 = 4 << 30;
pub const QUEUE_SIZE: u16 = 64;
const MAX_QUEUES: usize = 4;
const MAX_DISKS: usize = 4;
pub const CHUNK: usize = 64 * 1024;
/// Most writes `write_batch` puts in flight at once (3 descriptors each).
pub const BATCH: usize = 8;
pub const K: u64 = 0x9E37_79B9_7F4A_7C15;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_SEG_MAX: u64 = 1 << 2;
const F_SIZE_MAX: u64 = 1 << 1;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const F_CONFIG_WCE: u64 = 1 << 11;

/// Negotiate VIRTIO_BLK_F_CONFIG_WCE (set before `probe`).
pub static WANT_WCE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
/// Negotiate VIRTIO_F_EVENT_IDX (set before `probe`), as Linux's driver does: blk-seq (unless
/// tg.seq.event-idx=0) and the migration scenarios.
pub static WANT_EVENT_IDX: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

const LAPIC: u64 = 0xfee0_0000;
const MSI_VECTOR_BASE: u32 = 0x40;
/// The LAPIC vector of a disk's configuration-change interrupt.
const CONFIG_VECTOR: u32 = 0x5f;

/// A split virtqueue's memory, of QUEUE_SIZE entries (the rng's driver uses it too).
#[repr(C, align(4096))]
pub struct QueueMem {
    pub desc: [[u64; 2]; QUEUE_SIZE as usize],
    /// flags, idx, ring[64], used_event
    pub avail: [u16; 3 + QUEUE_SIZE as usize],
    _pad: [u8; 4096 - 16 * QUEUE_SIZE as usize - 2 * (3 + QUEUE_SIZE as usize)],
    /// flags+idx (one u32), then (id, len) pairs, then avail_event.
    pub used: [u32; 2 + 2 * QUEUE_SIZE as usize],
}

impl QueueMem {
    pub const EMPTY: QueueMem = QueueMem {
        desc: [[0; 2]; QUEUE_SIZE as usize],
        avail: [0; 3 + QUEUE_SIZE as usize],
        _pad: [0; 4096 - 16 * QUEUE_SIZE as usize - 2 * (3 + QUEUE_SIZE as usize)],
        used: [0; 2 + 2 * QUEUE_SIZE as usize],
    };
}

#[repr(C, align(4096))]
struct Dma {
    queues: [[QueueMem; MAX_QUEUES]; MAX_DISKS],
    /// Per disk and queue: header (16), status (1), id (20), discard segments (32).
    small: [[[u8; 128]; MAX_QUEUES]; MAX_DISKS],
    /// Per disk: header (16) and status (1) of each write of a batch.
    batch: [[[u8; 32]; BATCH]; MAX_DISKS],
    data: [u8; CHUNK],
}

static mut DMA: Dma = Dma {
    queues: [const { [QueueMem::EMPTY; MAX_QUEUES] }; MAX_DISKS],
    small: [[[0; 128]; MAX_QUEUES]; MAX_DISKS],
    batch: [[[0; 32]; BATCH]; MAX_DISKS],
    data: [0; CHUNK],
};

fn dma() -> *mut Dma {
    core::ptr::addr_of_mut!(DMA)
}

/// The data buffer, shared by all disks (requests are synchronous).
pub fn data_buf() -> *mut u8 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of_mut!((*dma()).data) as *mut u8 }
}

fn cfg_addr(slot: u8, reg: u8) -> u32 {
    0x8000_0000 | (u32::from(slot) << 11) | u32::from(reg & 0xfc)
}

pub fn cfg_read(slot: u8, reg: u8) -> u32 {
    outl(0xcf8, cfg_addr(slot, reg));
    inl(0xcfc)
}

pub fn cfg_write(slot: u8, reg: u8, v: u32) {
    outl(0xcf8, cfg_addr(slot, reg));
    outl(0xcfc, v);
}

pub fn r8(a: u64) -> u8 {
    // SAFETY: a device register in a BAR (identity mapped).
    unsafe { read_volatile(a as *const u8) }
}
pub fn r16(a: u64) -> u16 {
    // SAFETY: as r8.
    unsafe { read_volatile(a as *const u16) }
}
pub fn r32(a: u64) -> u32 {
    // SAFETY: as r8.
    unsafe { read_volatile(a as *const u32) }
}
pub fn w8(a: u64, v: u8) {
    // SAFETY: as r8.
    unsafe { write_volatile(a as *mut u8, v) }
}
pub fn w16(a: u64, v: u16) {
    // SAFETY: as r8.
    unsafe { write_volatile(a as *mut u16, v) }
}
pub fn w32(a: u64, v: u32) {
    // SAFETY: as r8.
    unsafe { write_volatile(a as *mut u32, v) }
}
pub fn w64(a: u64, v: u64) {
    w32(a, v as u32);
    w32(a + 4, (v >> 32) as u32);
}

pub struct Disk {
    pub index: usize,
    pub slot: u8,
    common: u64,
    notify: u64,
    notify_mult: u32,
    device: u64,
    pub features: u64,
    pub capacity: u64,
    /// The logical block size the device reports (VIRTIO_BLK_F_BLK_SIZE), else 512.
    pub blk_size: u32,
    pub queues: u16,
    notify_off: [u16; MAX_QUEUES],
    last_used: [u16; MAX_QUEUES],
    next_avail: [u16; MAX_QUEUES],
    pub requests: [u64; MAX_QUEUES],
    /// Notifications (kicks) sent to the device, and those its avail_event spared
    /// (VIRTIO_F_EVENT_IDX).
    pub kicks: u64,
    pub kicks_skipped: u64,
    pub msix_table: u64,
}

/// Finds every virtio-blk function on bus 0 and brings it up.
pub fn probe(found: &mut [Option<Disk>; MAX_DISKS]) -> usize {
    // Software-enable the LAPIC (spurious vector register), or it takes no fixed interrupts:
    // MSI-X messages then show up in its IRR (interrupts stay off, so they stay pending there).
    w32(LAPIC + 0xf0, r32(LAPIC + 0xf0) | 0x1ff);
    let mut n = 0;
    for slot in 0..32u8 {
        let id = cfg_read(slot, 0);
        if id == 0xffff_ffff {
            continue;
        }
        Line::new()
            .s("tg: pci 00:")
            .hex(slot as u64)
            .s(" id=")
            .hex(id as u64)
            .s(" class=")
            .hex((cfg_read(slot, 8) >> 8) as u64)
            .emit();
        let blk = match id >> 16 {
            VIRTIO_BLK_MODERN => true,
            VIRTIO_BLK_TRANSITIONAL => cfg_read(slot, 0x2c) >> 16 == 2,
            _ => false,
        };
        if id & 0xffff != VIRTIO_VENDOR || !blk || n == MAX_DISKS {
            continue;
        }
        match init(n, slot) {
            Ok(d) => {
                found[n] = Some(d);
                n += 1;
            }
            Err(why) => Line::new().s("tg: error blk init ").s(why).emit(),
        }
    }
    n
}

/// A virtio PCI function's register areas, found through its capabilities (virtio 1.2,
/// 4.1.4): common, notify (with its multiplier) and device configuration, and the MSI-X
/// capability's offset (0: none). Memory space and bus mastering are turned on.
pub struct Caps {
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub device: u64,
    pub msix_cap: u8,
}

/// The address of BAR `i` of `slot`, as the firmware (or the VMM) assigned it, 32 or 64 bits
/// wide.
pub fn bar(slot: u8, i: u32) -> Result<u64, &'static str> {
    if i > 5 {
        return Err("bad-bar-index");
    }
    let reg = 0x10 + 4 * i as u8;
    let lo = cfg_read(slot, reg);
    if lo & 1 != 0 {
        return Err("io-bar");
    }
    let hi = if (lo >> 1) & 3 == 2 && i < 5 {
        u64::from(cfg_read(slot, reg + 4)) << 32
    } else {
        0
    };
    match hi | u64::from(lo & !0xf) {
        0 => Err("bar-unassigned"),
        a if a >= IDENTITY_MAPPED => Err("bar-above-4g"),
        a => Ok(a),
    }
}

pub fn caps(slot: u8) -> Result<Caps, &'static str> {
    // Memory space and bus mastering on.
    let cmd = cfg_read(slot, 4);
    cfg_write(slot, 4, (cmd & 0xffff) | 0x6);
    let mut c = Caps {
        common: 0,
        notify: 0,
        notify_mult: 0,
        device: 0,
        msix_cap: 0,
    };
    let mut cap = (cfg_read(slot, 0x34) & 0xff) as u8;
    let mut guard = 0;
    while cap != 0 && guard < 48 {
        guard += 1;
        let head = cfg_read(slot, cap);
        let id = head & 0xff;
        let next = ((head >> 8) & 0xff) as u8;
        if id == 0x09 {
            let cfg_type = (head >> 24) & 0xff;
            // The first of each type is the one to use (virtio 1.2, 4.1.4.1).
            let wanted = match cfg_type {
                1 => c.common == 0,
                2 => c.notify == 0,
                4 => c.device == 0,
                _ => false,
            };
            if wanted {
                let at =
                    bar(slot, cfg_read(slot, cap + 4) & 0xff)? + u64::from(cfg_read(slot, cap + 8));
                match cfg_type {
                    1 => c.common = at,
                    2 => {
                        c.notify = at;
                        c.notify_mult = cfg_read(slot, cap + 16);
                    }
                    _ => c.device = at,
                }
            }
        } else if id == 0x11 {
            c.msix_cap = cap;
        }
        cap = next;
    }
    if c.common == 0 || c.notify == 0 {
        return Err("missing-virtio-capabilities");
    }
    Ok(c)
}

/// Brings up the virtio-blk function at `slot` as disk `index` (its DMA area).
pub fn init(index: usize, slot: u8) -> Result<Disk, &'static str> {
    let caps = caps(slot)?;
    if caps.device == 0 {
        return Err("missing-virtio-capabilities");
    }
    let bar = |i: u32| bar(slot, i);
    let msix_cap = caps.msix_cap;
    let mut d = Disk {
        index,
        slot,
        common: caps.common,
        notify: caps.notify,
        notify_mult: caps.notify_mult,
        device: caps.device,
        features: 0,
        capacity: 0,
        blk_size: 512,
        queues: 0,
        notify_off: [0; MAX_QUEUES],
        last_used: [0; MAX_QUEUES],
        next_avail: [0; MAX_QUEUES],
        requests: [0; MAX_QUEUES],
        kicks: 0,
        kicks_skipped: 0,
        msix_table: 0,
    };
    let c = d.common;
    w8(c + 0x14, 0);
    w8(c + 0x14, 1); // ACKNOWLEDGE
    w8(c + 0x14, 1 | 2); // DRIVER
    w32(c, 0);
    let lo = u64::from(r32(c + 4));
    w32(c, 1);
    let hi = u64::from(r32(c + 4));
    let offered = lo | (hi << 32);
    let wanted = F_VERSION_1
        | F_RO
        | F_BLK_SIZE
        | F_FLUSH
        | F_TOPOLOGY
        | F_MQ
        | F_DISCARD
        | F_WRITE_ZEROES
        | F_SEG_MAX
        | F_SIZE_MAX
        | if WANT_EVENT_IDX.load(Ordering::Relaxed) {
            F_EVENT_IDX
        } else {
            0
        }
        | if WANT_WCE.load(Ordering::Relaxed) {
            F_CONFIG_WCE
        } else {
            0
        };
    d.features = offered & wanted;
    if d.features & F_VERSION_1 == 0 {
        return Err("no-version-1");
    }
    w32(c + 8, 0);
    w32(c + 0xc, d.features as u32);
    w32(c + 8, 1);
    w32(c + 0xc, (d.features >> 32) as u32);
    w8(c + 0x14, 1 | 2 | 8);
    if r8(c + 0x14) & 8 == 0 {
        return Err("features-refused");
    }
    d.capacity = r32(d.device) as u64 | (u64::from(r32(d.device + 4)) << 32);
    if d.features & F_BLK_SIZE != 0 {
        d.blk_size = r32(d.device + 20);
    }
    let num_queues = r16(c + 0x12);
    d.queues = if d.features & F_MQ != 0 {
        r16(d.device + 34).min(num_queues)
    } else {
        1
    }
    .min(MAX_QUEUES as u16);

    // MSI-X: one vector per queue, aimed at the BSP's LAPIC.
    if msix_cap != 0 {
        // The table's BAR is the low 3 bits of its offset (BIR).
        let table = cfg_read(slot, msix_cap + 4);
        d.msix_table = bar(table & 7)? + u64::from(table & !7);
        for v in 0..d.queues as u64 {
            let e = d.msix_table + 16 * v;
            w32(e, LAPIC as u32);
            w32(e + 4, 0);
            w32(e + 8, MSI_VECTOR_BASE + v as u32);
            w32(e + 12, 0);
        }
        // The vector after the queues' tells of configuration changes (a disk that grew).
        let size = u64::from(cfg_read(slot, msix_cap) >> 16 & 0x7ff) + 1;
        if size > d.queues as u64 {
            let e = d.msix_table + 16 * d.queues as u64;
            w32(e, LAPIC as u32);
            w32(e + 4, 0);
            w32(e + 8, CONFIG_VECTOR);
            w32(e + 12, 0);
            w16(d.common + 0x10, d.queues);
        }
        let mc = cfg_read(slot, msix_cap);
        cfg_write(slot, msix_cap, mc | (1 << 31));
    }

    for q in 0..d.queues {
        w16(c + 0x16, q);
        let max = r16(c + 0x18);
        if max < QUEUE_SIZE {
            return Err("queue-too-small");
        }
        w16(c + 0x18, QUEUE_SIZE);
        // SAFETY: only addresses of the static DMA area are taken.
        let qm = unsafe { core::ptr::addr_of_mut!((*dma()).queues[index][q as usize]) };
        // Fresh rings: this memory may hold the rings of a disk ejected from this index.
        // SAFETY: the queue's memory is this driver's until the device is told where it is.
        unsafe { core::ptr::write_bytes(qm, 0, 1) };
        // SAFETY: as above.
        let (desc, avail, used) = unsafe {
            (
                core::ptr::addr_of_mut!((*qm).desc) as u64,
                core::ptr::addr_of_mut!((*qm).avail) as u64,
                core::ptr::addr_of_mut!((*qm).used) as u64,
            )
        };
        w64(c + 0x20, desc);
        w64(c + 0x28, avail);
        w64(c + 0x30, used);
        if msix_cap != 0 {
            w16(c + 0x1a, q);
            if r16(c + 0x1a) != q {
                return Err("msix-vector-refused");
            }
        }
        d.notify_off[q as usize] = r16(c + 0x1e);
        w16(c + 0x1c, 1);
    }
    w8(c + 0x14, 1 | 2 | 4 | 8); // DRIVER_OK
    if r8(c + 0x14) & 0x40 != 0 {
        return Err("device-needs-reset");
    }
    Ok(d)
}

/// A descriptor as a crafted chain gives it: (address, length, flags, next).
pub type RawDesc = (u64, u32, u16, u16);

/// A buffer of a request: (address, length, device-writable).
type Buf = (u64, u32, bool);

impl Disk {
    fn small(&self, q: usize) -> u64 {
        // SAFETY: only the address is taken.
        unsafe { core::ptr::addr_of_mut!((*dma()).small[self.index][q]) as u64 }
    }

    /// Sends one request on queue `q` and polls for its completion. Returns the status byte
    /// and the used length, or None if the device never answered.
    pub fn request(&mut self, q: usize, kind: u32, sector: u64, bufs: &[Buf]) -> Option<(u8, u32)> {
        self.submit(q, kind, sector, bufs);
        self.complete(q)
    }

    /// Sends one request on queue `q` without waiting (`complete` waits; one request in flight
    /// per queue).
    pub fn submit(&mut self, q: usize, kind: u32, sector: u64, bufs: &[Buf]) {
        let small = self.small(q);
        let hdr = small;
        let status = small + 16;
        w32(hdr, kind);
        w32(hdr + 4, 0);
        w64(hdr + 8, sector);
        w8(status, 0xff);
        // SAFETY: only addresses of the static DMA area are taken.
        let qm = unsafe { core::ptr::addr_of_mut!((*dma()).queues[self.index][q]) };
        let mut chain: [Buf; 6] = [(0, 0, false); 6];
        chain[0] = (hdr, 16, false);
        let n = bufs.len().min(4);
        chain[1..1 + n].copy_from_slice(&bufs[..n]);
        chain[1 + n] = (status, 1, true);
        let total = n + 2;
        let head = 0u16;
        for (i, (addr, len, writable)) in chain[..total].iter().enumerate() {
            let flags =
                if i + 1 < total { DESC_NEXT } else { 0 } | if *writable { DESC_WRITE } else { 0 };
            let next = (i + 1) as u64;
            // SAFETY: the descriptor table is ours until the device takes the chain.
            unsafe {
                let d = core::ptr::addr_of_mut!((*qm).desc[i]);
                write_volatile(d as *mut u64, *addr);
                write_volatile(
                    (d as *mut u64).add(1),
                    u64::from(*len) | (u64::from(flags) << 32) | (next << 48),
                );
            }
        }
        let _ = head;
        self.push(q, qm);
    }

    /// Waits for the request `submit` sent on queue `q`: its status byte and used length, or
    /// None if the device never answered.
    pub fn complete(&mut self, q: usize) -> Option<(u8, u32)> {
        // SAFETY: only addresses of the static DMA area are taken.
        let qm = unsafe { core::ptr::addr_of_mut!((*dma()).queues[self.index][q]) };
        let r = self.wait_used(q, qm, 200_000_000)?;
        Some((r8(self.small(q) + 16), r.1))
    }

    pub fn read(&mut self, q: usize, sector: u64, buf: u64, len: u32) -> Option<(u8, u32)> {
        self.request(q, T_IN, sector, &[(buf, len, true)])
    }

    pub fn write(&mut self, q: usize, sector: u64, buf: u64, len: u32) -> Option<(u8, u32)> {
        self.request(q, T_OUT, sector, &[(buf, len, false)])
    }

    pub fn flush(&mut self, q: usize) -> Option<(u8, u32)> {
        self.request(q, T_FLUSH, 0, &[])
    }

    /// GET_ID: the serial, up to 20 bytes, into `out`; returns its length.
    pub fn get_id(&mut self, out: &mut [u8; 20]) -> Option<(u8, usize)> {
        let buf = self.small(0) + 32;
        let (status, used) = self.request(0, T_GET_ID, 0, &[(buf, 20, true)])?;
        for (i, b) in out.iter_mut().enumerate() {
            *b = r8(buf + i as u64);
        }
        let n = out
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(20)
            .min(used.saturating_sub(1) as usize);
        Some((status, n))
    }

    /// DISCARD or WRITE_ZEROES (with or without UNMAP) of one range.
    pub fn zero(
        &mut self,
        kind_discard: bool,
        unmap: bool,
        sector: u64,
        sectors: u32,
    ) -> Option<(u8, u32)> {
        let seg = self.small(0) + 64;
        w64(seg, sector);
        w32(seg + 8, sectors);
        w32(seg + 12, u32::from(unmap));
        let kind = if kind_discard {
            T_DISCARD
        } else {
            T_WRITE_ZEROES
        };
        self.request(0, kind, 0, &[(seg, 16, false)])
    }

    /// Sends a chain exactly as given: (address, length, flags, next) per descriptor, head 0.
    /// The header (if the chain points at it) is `kind`/`sector` and the status byte the one
    /// after it. Returns (status byte, used length), or None if no answer came.
    pub fn request_raw(&mut self, kind: u32, sector: u64, descs: &[RawDesc]) -> Option<(u8, u32)> {
        let q = 0;
        let small = self.small(q);
        w32(small, kind);
        w32(small + 4, 0);
        w64(small + 8, sector);
        w8(small + 16, 0xff);
        // SAFETY: only addresses of the static DMA area are taken.
        let qm = unsafe { core::ptr::addr_of_mut!((*dma()).queues[self.index][q]) };
        for (i, (addr, len, flags, next)) in descs.iter().enumerate().take(QUEUE_SIZE as usize) {
            // SAFETY: the descriptor table is ours until the device takes the chain.
            unsafe {
                let d = core::ptr::addr_of_mut!((*qm).desc[i]) as *mut u64;
                write_volatile(d, *addr);
                write_volatile(
                    d.add(1),
                    u64::from(*len) | (u64::from(*flags) << 32) | (u64::from(*next) << 48),
                );
            }
        }
        self.push_and_wait(q, qm, 20_000_000)
    }

    /// Writes 4 KiB blocks all at once on queue `q`: block `i` from `buf + 4096 * i` to sector
    /// `sectors[i]` (at most BATCH). The device may complete them in any order; `done(i,
    /// status)` is called as each completes. Returns how many completed before the timeout.
    pub fn write_batch(
        &mut self,
        q: usize,
        sectors: &[u64],
        buf: u64,
        done: impl FnMut(usize, u8),
    ) -> usize {
        let n = self.submit_batch(q, sectors, buf);
        self.reap_batch(q, n, 200_000_000, done)
    }

    /// Puts writes of 4 KiB at `sectors[i]` (at most BATCH) in flight on queue `q`, from
    /// `buf + 4096 * i`, with one kick; returns how many. `reap_batch` waits for them.
    pub fn submit_batch(&mut self, q: usize, sectors: &[u64], buf: u64) -> usize {
        let n = sectors.len().min(BATCH);
        // SAFETY: only addresses of the static DMA area are taken.
        let qm = unsafe { core::ptr::addr_of_mut!((*dma()).queues[self.index][q]) };
        // SAFETY: as above.
        let small = unsafe { core::ptr::addr_of_mut!((*dma()).batch[self.index]) } as u64;
        let idx = self.next_avail[q];
        for (i, &sector) in sectors[..n].iter().enumerate() {
            let hdr = small + 32 * i as u64;
            w32(hdr, T_OUT);
            w32(hdr + 4, 0);
            w64(hdr + 8, sector);
            w8(hdr + 16, 0xff);
            let chain = [
                (hdr, 16u64, DESC_NEXT),
                (buf + 4096 * i as u64, 4096, DESC_NEXT),
                (hdr + 16, 1, DESC_WRITE),
            ];
            for (k, (addr, len, flags)) in chain.iter().enumerate() {
                let d = 3 * i + k;
                let next = (d + 1) as u64;
                // SAFETY: the descriptor table is ours until the device takes the chains.
                unsafe {
                    let p = core::ptr::addr_of_mut!((*qm).desc[d]) as *mut u64;
                    write_volatile(p, *addr);
                    write_volatile(p.add(1), len | (u64::from(*flags) << 32) | (next << 48));
                }
            }
            // SAFETY: the available ring is the driver's to write.
            unsafe {
                let avail = core::ptr::addr_of_mut!((*qm).avail) as *mut u16;
                let slot = (idx.wrapping_add(i as u16) % QUEUE_SIZE) as usize;
                write_volatile(avail.add(2 + slot), (3 * i) as u16);
            }
        }
        // EVENT_IDX: one interrupt for the batch, when its last request is used.
        set_used_event(qm, self.last_used[q].wrapping_add(n as u16 - 1));
        fence(Ordering::SeqCst);
        // SAFETY: as above; one index update publishes the whole batch.
        unsafe {
            let avail = core::ptr::addr_of_mut!((*qm).avail) as *mut u16;
            write_volatile(avail.add(1), idx.wrapping_add(n as u16));
        }
        self.next_avail[q] = idx.wrapping_add(n as u16);
        fence(Ordering::SeqCst);
        self.kick(q, qm, idx, idx.wrapping_add(n as u16));
        n
    }

    /// Waits for the `n` writes `submit_batch` put on queue `q` (each wait given up after
    /// `max_spins`): `done(i, status)` as each completes. Returns how many completed.
    pub fn reap_batch(
        &mut self,
        q: usize,
        n: usize,
        max_spins: u64,
        mut done: impl FnMut(usize, u8),
    ) -> usize {
        // SAFETY: only addresses of the static DMA area are taken.
        let qm = unsafe { core::ptr::addr_of_mut!((*dma()).queues[self.index][q]) };
        // SAFETY: as above.
        let small = unsafe { core::ptr::addr_of_mut!((*dma()).batch[self.index]) } as u64;
        let mut got = 0;
        while got < n {
            let mut spins = 0u64;
            while used_idx(qm) == self.last_used[q] {
                spins += 1;
                if spins > max_spins {
                    return got;
                }
                core::hint::spin_loop();
            }
            fence(Ordering::SeqCst);
            let slot = (self.last_used[q] % QUEUE_SIZE) as usize;
            // SAFETY: the device has published this used element.
            let id = unsafe {
                read_volatile((core::ptr::addr_of!((*qm).used) as *const u32).add(1 + 2 * slot))
            } as usize;
            self.last_used[q] = self.last_used[q].wrapping_add(1);
            self.requests[q] += 1;
            let i = id / 3;
            let status = if id.is_multiple_of(3) && i < n {
                r8(small + 32 * i as u64 + 16)
            } else {
                // Not a head this batch used: the device is broken.
                0xfe
            };
            done(i, status);
            got += 1;
        }
        got
    }

    /// The header and status buffers of queue 0 (for crafted chains).
    pub fn header_and_status(&self) -> (u64, u64) {
        let s = self.small(0);
        (s, s + 16)
    }

    fn push_and_wait(&mut self, q: usize, qm: *mut QueueMem, max_spins: u64) -> Option<(u8, u32)> {
        self.push(q, qm);
        self.wait_used(q, qm, max_spins)
    }

    /// Publishes the chain at descriptor 0 of queue `q` and kicks.
    fn push(&mut self, q: usize, qm: *mut QueueMem) {
        let idx = self.next_avail[q];
        // EVENT_IDX: an interrupt for this one request.
        set_used_event(qm, self.last_used[q]);
        // SAFETY: the available ring is the driver's to write.
        unsafe {
            let avail = core::ptr::addr_of_mut!((*qm).avail) as *mut u16;
            write_volatile(avail.add(2 + (idx % QUEUE_SIZE) as usize), 0);
            fence(Ordering::SeqCst);
            write_volatile(avail.add(1), idx.wrapping_add(1));
        }
        self.next_avail[q] = idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.kick(q, qm, idx, idx.wrapping_add(1));
    }

    /// Polls queue `q` for its next used element: (status byte, used length).
    fn wait_used(&mut self, q: usize, qm: *mut QueueMem, max_spins: u64) -> Option<(u8, u32)> {
        let mut spins = 0u64;
        while used_idx(qm) == self.last_used[q] {
            spins += 1;
            if spins > max_spins {
                return None;
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        let slot = (self.last_used[q] % QUEUE_SIZE) as usize;
        // SAFETY: the device has published this used element.
        let len = unsafe {
            read_volatile((core::ptr::addr_of!((*qm).used) as *const u32).add(1 + 2 * slot + 1))
        };
        self.last_used[q] = self.last_used[q].wrapping_add(1);
        self.requests[q] += 1;
        Some((r8(self.small(q) + 16), len))
    }

    /// Turns the device's write cache off (VIRTIO_BLK_F_CONFIG_WCE): every write is then
    /// durable when it completes. Returns the writeback byte read back.
    pub fn write_through(&mut self) -> u8 {
        w8(self.device + 32, 0);
        r8(self.device + 32)
    }

    /// Turns the device's write cache on (CONFIG_WCE); returns the writeback byte it reads back.
    pub fn write_back(&mut self) -> u8 {
        w8(self.device + 32, 1);
        r8(self.device + 32)
    }

    /// Whether an MSI-X interrupt for queue q's vector is pending in the BSP's LAPIC.
    pub fn irq_seen(&self, q: usize) -> bool {
        let v = MSI_VECTOR_BASE + q as u32;
        let irr = r32(LAPIC + 0x200 + u64::from(v / 32) * 0x10);
        irr & (1 << (v % 32)) != 0
    }

    /// Whether a configuration-change interrupt is pending in the BSP's LAPIC.
    pub fn config_irq_seen(&self) -> bool {
        let v = CONFIG_VECTOR;
        r32(LAPIC + 0x200 + u64::from(v / 32) * 0x10) & (1 << (v % 32)) != 0
    }

    /// The configuration's generation and the capacity (sectors) it says now.
    pub fn read_capacity(&mut self) -> (u8, u64) {
        let g = r8(self.common + 0x15);
        self.capacity = r32(self.device) as u64 | (u64::from(r32(self.device + 4)) << 32);
        (g, self.capacity)
    }

    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }
}

impl Disk {
    /// Tells the device that the available index went from `old` to `new`: unless, under
    /// EVENT_IDX, the device's avail_event says it does not need to hear of it.
    fn kick(&mut self, q: usize, qm: *mut QueueMem, old: u16, new: u16) {
        if self.features & F_EVENT_IDX != 0 {
            // SAFETY: the used ring's avail_event (the u16 after its ring) is the device's.
            let event = unsafe {
                read_volatile(
                    (core::ptr::addr_of!((*qm).used) as *const u32).add(1 + 2 * QUEUE_SIZE as usize)
                        as *const u16,
                )
            };
            // vring_need_event: new passed event since old.
            if new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old) {
                self.kicks_skipped += 1;
                return;
            }
        }
        self.kicks += 1;
        w16(
            self.notify + u64::from(self.notify_off[q]) * u64::from(self.notify_mult),
            q as u16,
        );
    }
}

/// The avail ring's used_event: the device interrupts once the used index passes it.
fn set_used_event(qm: *mut QueueMem, at: u16) {
    // SAFETY: used_event (the u16 after the avail ring) is the driver's to write.
    unsafe {
        write_volatile(
            (core::ptr::addr_of_mut!((*qm).avail) as *mut u16).add(2 + QUEUE_SIZE as usize),
            at,
        );
    }
}

fn used_idx(qm: *mut QueueMem) -> u16 {
    // SAFETY: the used ring's idx (the second u16) is written by the device; read it volatile.
    unsafe { read_volatile((core::ptr::addr_of!((*qm).used) as *const u16).add(1)) }
}
