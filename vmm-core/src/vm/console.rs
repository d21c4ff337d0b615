//! The console as vmm-core's side of it: input for the guest's UART (from the terminal, from
//! chardevd, from attached viewers), the terminal's escape keys, and where the UART's output
//! goes.

use super::VmError;
use crate::api;
use crate::config::serial::Backend;
use crate::config::VmConfig;
use crate::control::VmEvent;
use crate::helpers::chardevd;
use std::io::Read;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_devices::platform::serial;
use vmm_proto::terminal;

/// The serial device that console input goes to (replaced when the guest restarts), and the
/// buffer its output goes to when the console is served by chardevd.
#[derive(Default)]
pub(super) struct ConsoleInput {
    pub target: Mutex<Option<Arc<Mutex<serial::SerialDevice>>>>,
    pub output: std::sync::OnceLock<Arc<chardevd::ConsoleBuffer>>,
    /// chardevd's first start, waited for before the first vCPU runs.
    pub helper_ready: Mutex<Option<chardevd::Ready>>,
}

/// Queues input for the guest's UART, holding back while its FIFO is full.
pub(super) fn feed_uart(console: &ConsoleInput, bytes: &[u8]) {
    let mut off = 0;
    let mut waits = 0;
    while off < bytes.len() {
        let target = console.target.lock().unwrap().clone();
        let Some(target) = target else {
            // The guest is being (re)built; its UART comes shortly.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        off += target.lock().unwrap().enqueue(&bytes[off..]);
        if off < bytes.len() {
            waits += 1;
            if waits > 1000 {
                log::warn!(
                    "console input: the guest is not reading; {} bytes dropped",
                    bytes.len() - off
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The terminal's escape keys: Ctrl-A x quits, Ctrl-A Ctrl-A sends a literal Ctrl-A, and
/// Ctrl-A followed by anything else sends nothing.
#[derive(Default)]
pub(super) struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// The bytes for the guest, and whether Ctrl-A x was typed (what follows it is dropped).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut bytes = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return (bytes, true),
                    0x01 => bytes.push(0x01),
                    _ => {}
                }
            } else if b == 0x01 {
                self.pending = true;
            } else {
                bytes.push(b);
            }
        }
        (bytes, false)
    }
}

/// Feeds stdin to the guest's UART (--serial direct). With a terminal, the escape keys work
/// (see EscapeFilter). A full FIFO holds input back rather than dropping it.
pub(super) fn console_input(console: Arc<ConsoleInput>, tx: Sender<VmEvent>, escapes: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    let mut filter = EscapeFilter::default();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (bytes, escape) = if escapes {
            filter.feed(&buf[..n])
        } else {
            (buf[..n].to_vec(), false)
        };
        feed_uart(&console, &bytes);
        if escape {
            let _ = tx.send(VmEvent::ConsoleEscape);
            return;
        }
    }
}

/// The UART's writer: chardevd's buffer when it serves the console, else stdout.
pub(super) fn serial_out(console: &ConsoleInput) -> Box<dyn std::io::Write + Send> {
    match console.output.get() {
        Some(buffer) => Box::new(chardevd::BufferWriter(buffer.clone())),
        None => Box::new(serial::RawStdout),
    }
}

/// A console on stdio (in vmm-core, or served by chardevd) takes the terminal (raw mode,
/// restored when the guard drops). With `--serial direct`, a thread feeds stdin to the UART.
pub(super) fn take_terminal(
    config: &VmConfig,
    console: &Arc<ConsoleInput>,
    tx: &Sender<VmEvent>,
) -> Result<Option<terminal::RawMode>, VmError> {
    let on_stdio = matches!(config.serial, None | Some(Backend::Stdio));
    let raw = if on_stdio {
        terminal::RawMode::enter()
    } else {
        None
    };
    if config.serial.is_none() {
        let (console, tx, escapes) = (console.clone(), tx.clone(), raw.is_some());
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                crate::threads::filter_service_thread("vmm-core (the console input thread)");
                console_input(console, tx, escapes)
            })
            .map_err(|e| VmError::Thread("console input", e))?;
    }
    if raw.is_some() {
        log::info!("console attached; Ctrl-A x quits");
    }
    Ok(raw)
}

/// Starts chardevd's supervisor for the console, and the thread that feeds its input to the
/// UART. Input is queued for that thread: feeding the UART may have to wait (for the guest to
/// read, or for the VM to exist), and the supervisor must not. Input from the terminal (stdio)
/// has the escape keys; from viewers attached through the API (their own escape is in vmmctl)
/// and other backends it goes as it is.
pub(super) fn start_chardevd(
    source: crate::helpers::Source,
    backend: &Backend,
    console: &Arc<ConsoleInput>,
    shared: &api::Shared,
    tx: &Sender<VmEvent>,
    escapes: bool,
    rng: Option<chardevd::Rng>,
) -> Result<chardevd::Supervisor, VmError> {
    let buffer = Arc::new(chardevd::ConsoleBuffer::new(chardevd::BUFFER_BYTES));
    let _ = console.output.set(buffer.clone());
    let (in_tx, in_rx) = std::sync::mpsc::channel::<(Vec<u8>, bool)>();
    let input_to = console.clone();
    let quit = tx.clone();
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::threads::filter_service_thread("vmm-core (the console input thread)");
            let mut filter = EscapeFilter::default();
            for (bytes, from_terminal) in in_rx {
                let (bytes, escape) = if escapes && from_terminal {
                    filter.feed(&bytes)
                } else {
                    (bytes, false)
                };
                feed_uart(&input_to, &bytes);
                if escape {
                    let _ = quit.send(VmEvent::ConsoleEscape);
                }
            }
        })
        .map_err(|e| VmError::Thread("console input", e))?;
    let attached_tx = in_tx.clone();
    let input: chardevd::InputFn = Arc::new(move |bytes: &[u8]| {
        let _ = in_tx.send((bytes.to_vec(), true));
    });
    let attached: chardevd::InputFn = Arc::new(move |bytes: &[u8]| {
        let _ = attached_tx.send((bytes.to_vec(), false));
    });
    let _ = shared.console_view.set((buffer.clone(), attached));
    let (supervisor, ready) = chardevd::start(
        source,
        backend.clone(),
        buffer,
        input,
        shared.events.clone(),
        rng,
    )?;
    *console.helper_ready.lock().unwrap() = Some(ready);
    *shared.console.lock().unwrap() = Some(supervisor.control.clone());
    Ok(supervisor)
}

/// Lets the last output reach chardevd (2 s at most) before the VMM ends it.
pub(super) fn drain(console: &ConsoleInput) {
    if let Some(buffer) = console.output.get() {
        buffer.wait_drained(Duration::from_secs(2));
        let dropped = buffer.dropped();
        if dropped > 0 {
            log::warn!("console: {dropped} bytes of guest output were dropped while chardevd could not take them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EscapeFilter;

    #[test]
    fn escape_keys() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ab"), (b"ab".to_vec(), false));
        // Ctrl-A Ctrl-A is a literal Ctrl-A, across calls too.
        assert_eq!(f.feed(b"c\x01"), (b"c".to_vec(), false));
        assert_eq!(f.feed(b"\x01d"), (b"\x01d".to_vec(), false));
        // Ctrl-A and another key send nothing.
        assert_eq!(f.feed(b"\x01qe"), (b"e".to_vec(), false));
        assert_eq!(f.feed(b"f\x01xg"), (b"f".to_vec(), true));
    }
}
