//! The 8250 UART on COM1 (vm-superio), its interrupt through an irqfd, and the host side of
//! the console: stdout unbuffered, input from stdin with back-pressure on a full FIFO.

use super::{Action, PioDevice};
use std::io::{self, Write};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by signalling an eventfd that KVM routes to GSI 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Writes each byte straight to fd 1: the guest's partial lines (prompts) must show at once.
pub struct RawStdout;

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: fd 1 is valid for the life of the process; buf is a valid slice.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct SerialDevice {
    pub uart: Uart,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n > 0 {
            if let Err(e) = self.uart.enqueue_raw_bytes(&bytes[..n]) {
                log::warn!("console input dropped: {e:?}");
            }
        }
        n
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Action {
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::debug!("serial write: {e:?}");
        }
        Action::None
    }
}
