//! Port I/O, the 8250 serial port, and whole-line output that CPUs do not interleave.

use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the guest owns every port it touches.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nostack)) }
}

pub fn outw(port: u16, v: u16) {
    // SAFETY: as for outb.
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") v, options(nostack)) }
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as for outb.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack)) }
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for outb.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack)) };
    v
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nostack)) };
    v
}

pub fn serial_init() {
    outb(COM1 + 1, 0x00); // no interrupts: the guest polls
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR, RTS
}

fn serial_put(b: u8) {
    // Wait for THR empty; bounded so that a missing UART cannot hang the guest.
    let mut spins = 0;
    while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
        spins += 1;
    }
    outb(COM1, b);
}

/// Writes `n` bytes of 64-character lines to COM1 the way an 8250 driver with a FIFO does:
/// wait for the transmitter to empty, then fill the 16-byte FIFO.
pub fn serial_spew(n: u64) {
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n";
    let mut sent = 0u64;
    while sent < n {
        let mut spins = 0;
        while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        let burst = (n - sent).min(16);
        for _ in 0..burst {
            outb(COM1, line[(sent % line.len() as u64) as usize]);
            sent += 1;
        }
    }
}

/// Waits for a byte from COM1 (polling the line status register's data-ready bit).
pub fn serial_get() -> u8 {
    while inb(COM1 + 5) & 0x01 == 0 {}
    inb(COM1)
}

/// A byte from COM1 if one is waiting.
pub fn serial_try_get() -> Option<u8> {
    (inb(COM1 + 5) & 0x01 != 0).then(|| inb(COM1))
}

static LOCK: AtomicBool = AtomicBool::new(false);

/// One output line, built without core::fmt (whose precompiled code uses SSE) and written
/// under a lock so that lines from different CPUs do not mix.
pub struct Line {
    buf: [u8; 200],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line {
            buf: [0; 200],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    pub fn s(mut self, s: &str) -> Self {
        for b in s.bytes() {
            self.push(b);
        }
        self
    }

    pub fn u(mut self, mut v: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.push(digits[n]);
        }
        self
    }

    /// `v` as 0x and 16 hex digits (a fixed width: a line's length does not depend on it).
    pub fn hex16(mut self, v: u64) -> Self {
        self.push(b'0');
        self.push(b'x');
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            self.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
        self
    }

    pub fn hex(mut self, v: u64) -> Self {
        self.push(b'0');
        self.push(b'x');
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                self.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    pub fn emit(self) {
        while LOCK
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {}
        for i in 0..self.len {
            serial_put(self.buf[i]);
        }
        serial_put(b'\r');
        serial_put(b'\n');
        LOCK.store(false, Ordering::Release);
    }
}
