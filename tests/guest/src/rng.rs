//! A virtio-rng driver (virtio 1.2, 5.4): one request queue of device-writable buffers the
//! device fills with entropy. The `rng` scenario reads `tg.rng.bytes` bytes (default 65536)
//! in requests of `tg.rng.chunk` bytes (default 4096, at most 128 KiB) and prints how many
//! came, in how many requests, the most one request got, and their FNV-1a digest, so a test
//! can compare them with what the backend served.

use crate::blk::{caps, cfg_read, r16, r8, w16, w64, w8, QueueMem, QUEUE_SIZE};
use crate::io::Line;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_RNG_MODERN: u32 = 0x1044;
const VIRTIO_RNG_TRANSITIONAL: u32 = 0x1005;
const F_VERSION_1: u64 = 1 << 32;
/// The largest request this driver makes (twice what a device should give at once).
const MAX_CHUNK: usize = 128 * 1024;
const DESC_WRITE: u16 = 2;

#[repr(C, align(4096))]
struct Dma {
    ring: QueueMem,
    data: [u8; MAX_CHUNK],
}

static mut DMA: Dma = Dma {
    ring: QueueMem::EMPTY,
    data: [0; MAX_CHUNK],
};

struct Rng {
    notify: u64,
    next_avail: u16,
    last_used: u16,
}

fn dma() -> *mut Dma {
    core::ptr::addr_of_mut!(DMA)
}

/// Finds the virtio-rng function and sets its queue up.
fn find() -> Result<Rng, &'static str> {
    let slot = (0..32u8)
        .find(|&s| {
            let id = cfg_read(s, 0);
            id & 0xffff == VIRTIO_VENDOR
                && (id >> 16 == VIRTIO_RNG_MODERN
                    || (id >> 16 == VIRTIO_RNG_TRANSITIONAL && cfg_read(s, 0x2c) >> 16 == 4))
        })
        .ok_or("no-device")?;
    let c = caps(slot)?;
    let common = c.common;
    w8(common + 0x14, 0);
    w8(common + 0x14, 1); // ACKNOWLEDGE
    w8(common + 0x14, 1 | 2); // DRIVER
    crate::blk::w32(common, 1);
    let hi = u64::from(crate::blk::r32(common + 4)) << 32;
    if hi & F_VERSION_1 == 0 {
        return Err("no-version-1");
    }
    crate::blk::w32(common + 8, 0);
    crate::blk::w32(common + 0xc, 0);
    crate::blk::w32(common + 8, 1);
    crate::blk::w32(common + 0xc, (F_VERSION_1 >> 32) as u32);
    w8(common + 0x14, 1 | 2 | 8);
    if r8(common + 0x14) & 8 == 0 {
        return Err("features-refused");
    }
    w16(common + 0x16, 0);
    if r16(common + 0x18) < QUEUE_SIZE {
        return Err("queue-too-small");
    }
    w16(common + 0x18, QUEUE_SIZE);
    // SAFETY: only addresses of the static DMA area are taken.
    let (desc, avail, used) = unsafe {
        (
            core::ptr::addr_of_mut!((*dma()).ring.desc) as u64,
            core::ptr::addr_of_mut!((*dma()).ring.avail) as u64,
            core::ptr::addr_of_mut!((*dma()).ring.used) as u64,
        )
    };
    w64(common + 0x20, desc);
    w64(common + 0x28, avail);
    w64(common + 0x30, used);
    // No MSI-X vector: this driver polls the used ring.
    if c.msix_cap != 0 {
        w16(common + 0x1a, 0xffff);
    }
    let notify = c.notify + u64::from(r16(common + 0x1e)) * u64::from(c.notify_mult);
    w16(common + 0x1c, 1);
    w8(common + 0x14, 1 | 2 | 4 | 8); // DRIVER_OK
    if r8(common + 0x14) & 0x40 != 0 {
        return Err("device-needs-reset");
    }
    Ok(Rng {
        notify,
        next_avail: 0,
        last_used: 0,
    })
}

impl Rng {
    /// One request for `len` bytes; how many the device wrote (None: no answer in time).
    fn request(&mut self, len: u32) -> Option<u32> {
        let d = dma();
        let slot = (self.next_avail % QUEUE_SIZE) as usize;
        // SAFETY: the static DMA area, which only this driver and the device touch; the
        // device reads the descriptor and avail ring only after the index is published.
        unsafe {
            let data = core::ptr::addr_of_mut!((*d).data) as u64;
            write_volatile(core::ptr::addr_of_mut!((*d).ring.desc[slot][0]), data);
            write_volatile(
                core::ptr::addr_of_mut!((*d).ring.desc[slot][1]),
                u64::from(len) | (u64::from(DESC_WRITE) << 32),
            );
            write_volatile(
                core::ptr::addr_of_mut!((*d).ring.avail[2 + slot]),
                slot as u16,
            );
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            write_volatile(core::ptr::addr_of_mut!((*d).ring.avail[1]), self.next_avail);
            fence(Ordering::SeqCst);
        }
        w16(self.notify, 0);
        for _ in 0..2_000_000_000u64 {
            // SAFETY: the used ring's index and entries, written by the device.
            let idx =
                unsafe { (read_volatile(core::ptr::addr_of!((*d).ring.used[0])) >> 16) as u16 };
            if idx != self.last_used {
                let e = (self.last_used % QUEUE_SIZE) as usize;
                self.last_used = self.last_used.wrapping_add(1);
                fence(Ordering::SeqCst);
                // SAFETY: as above.
                return Some(unsafe {
                    read_volatile(core::ptr::addr_of!((*d).ring.used[2 + 2 * e]))
                });
            }
            core::hint::spin_loop();
        }
        None
    }
}

/// The `rng` scenario.
pub fn scenario(cmdline: &str) {
    let want = crate::param(cmdline, "tg.rng.bytes=")
        .and_then(crate::parse_u64)
        .unwrap_or(65536);
    let chunk = crate::param(cmdline, "tg.rng.chunk=")
        .and_then(crate::parse_u64)
        .unwrap_or(4096)
        .clamp(1, MAX_CHUNK as u64) as u32;
    let mut rng = match find() {
        Ok(r) => r,
        Err(why) => {
            Line::new().s("tg: rng error ").s(why).emit();
            return;
        }
    };
    let mut got = 0u64;
    let mut digest = 0xcbf2_9ce4_8422_2325u64;
    let mut requests = 0u64;
    let mut most = 0u32;
    Line::new().s("tg: rng start").emit();
    while got < want {
        let len = chunk.min((want - got) as u32);
        let Some(n) = rng.request(len) else {
            Line::new()
                .s("tg: rng error no-answer after ")
                .u(got)
                .emit();
            return;
        };
        requests += 1;
        most = most.max(n);
        if n > len {
            Line::new()
                .s("tg: rng error device wrote ")
                .u(n as u64)
                .s(" of ")
                .u(len as u64)
                .emit();
            return;
        }
        for i in 0..n as usize {
            // SAFETY: the data buffer the device just wrote.
            let b = unsafe { read_volatile(core::ptr::addr_of!((*dma()).data[i])) };
            digest = (digest ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        got += u64::from(n);
    }
    Line::new()
        .s("tg: rng bytes=")
        .u(got)
        .s(" requests=")
        .u(requests)
        .s(" most=")
        .u(most as u64)
        .s(" fnv=")
        .hex(digest)
        .emit();
}
