//! The 8250 UART on COM1 (vm-superio), its interrupt through an irqfd, and the host side of
//! the console: stdout unbuffered, input from stdin with back-pressure on a full FIFO.

use crate::bus::{Action, PioDevice};
use std::io::{self, Write};
use vm_superio::{Serial, Trigger};
use vmm_proto::state::StateError;
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
            // Past std's buffer: straight to the descriptor.
            match nix::unistd::write(io::stdout(), buf) {
                Ok(n) => return Ok(n),
                Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
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

impl SerialDevice {
    /// Writes the UART's state (registers and unread input) into its Cap'n Proto form.
    pub fn save(&self, mut b: vmm_proto::state_capnp::serial::Builder) {
        let s = self.uart.state();
        b.set_baud_divisor_low(s.baud_divisor_low);
        b.set_baud_divisor_high(s.baud_divisor_high);
        b.set_interrupt_enable(s.interrupt_enable);
        b.set_interrupt_identification(s.interrupt_identification);
        b.set_line_control(s.line_control);
        b.set_line_status(s.line_status);
        b.set_modem_control(s.modem_control);
        b.set_modem_status(s.modem_status);
        b.set_scratch(s.scratch);
        b.set_in_buffer(&s.in_buffer);
    }

    /// A UART in a saved state, with its own interrupt and output.
    pub fn restored(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        r: vmm_proto::state_capnp::serial::Reader,
    ) -> Result<SerialDevice, StateError> {
        let input = r
            .get_in_buffer()
            .map_err(StateError::read("the serial port's state"))?;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r.get_baud_divisor_low(),
            baud_divisor_high: r.get_baud_divisor_high(),
            interrupt_enable: r.get_interrupt_enable(),
            interrupt_identification: r.get_interrupt_identification(),
            line_control: r.get_line_control(),
            line_status: r.get_line_status(),
            modem_control: r.get_modem_control(),
            modem_status: r.get_modem_status(),
            scratch: r.get_scratch(),
            in_buffer: input.to_vec(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => StateError::SerialFifo(input.len()),
            e => StateError::Serial(format!("{e:?}")),
        })?;
        Ok(SerialDevice { uart })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An output that the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Registers and unread input go through the saved form into another UART, which keeps
    /// its own output.
    #[test]
    fn state_survives_save_and_restore() {
        let mut a = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        a.write(3, &[0x80]); // DLAB on
        a.write(0, &[0x0c]); // 9600 baud
        a.write(3, &[0x03]); // 8N1, DLAB off
        a.write(1, &[0x01]); // receive interrupt on
        a.write(7, &[0x5a]); // scratch
        assert_eq!(a.enqueue(b"hi"), 2);
        let mut msg = capnp::message::Builder::new_default();
        a.save(msg.init_root());
        let reader = vmm_proto::through_bytes(&msg);

        let out = Shared::default();
        let mut b = SerialDevice::restored(
            EventFd::new(0).unwrap(),
            Box::new(out.clone()),
            reader.get_root().unwrap(),
        )
        .unwrap();
        let mut r = [0u8];
        b.read(7, &mut r);
        assert_eq!(r[0], 0x5a, "scratch");
        b.read(1, &mut r);
        assert_eq!(r[0], 0x01, "interrupt enable");
        b.read(3, &mut r);
        assert_eq!(r[0], 0x03, "line control");
        b.read(0, &mut r);
        assert_eq!(r[0], b'h');
        b.read(0, &mut r);
        assert_eq!(r[0], b'i');
        b.write(0, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
    }
}
