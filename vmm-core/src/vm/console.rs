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
    /// --record or --replay: the console's input log.
    pub log: std::sync::OnceLock<ConsoleLog>,
    /// How many bytes the guest has written to its console (counted while recording or
    /// replaying).
    pub written: Arc<crate::control::ConsoleWritten>,
    /// Where the log stands, for `vmmctl replay status`.
    pub progress: Arc<crate::control::LogProgress>,
}

/// Record/replay of the console's input. A record is where the guest's output stood (bytes
/// written so far, u64 LE) and the bytes given; a replay gives each once the guest's output
/// has reached the same place, so input typed after a prompt comes after the prompt again.
pub(super) enum ConsoleLog {
    Record(Mutex<vmm_proto::record::Writer<std::fs::File>>),
    Replay,
}

/// The log's name, and its kind in its header.
const LOG: &str = "serial0";
const KIND: &str = "console";

/// Opens the console's log for --record or --replay (a replay's thread gives the recorded
/// input as the guest's output reaches its place).
pub(super) fn setup_recording(
    config: &VmConfig,
    console: &Arc<ConsoleInput>,
) -> Result<(), VmError> {
    use crate::config::Recording;
    let Some(rec) = &config.recording else {
        return Ok(());
    };
    let flag = match rec {
        Recording::Record(_) => "--record",
        Recording::Replay(..) => "--replay",
    };
    let bad = |e: String| VmError::Recording(format!("{flag} {}: {e}", rec.log(LOG).display()));
    let file = rec.open(LOG).map_err(|e| bad(e.to_string()))?;
    match rec {
        Recording::Record(_) => {
            let w =
                vmm_proto::record::Writer::append(file, KIND).map_err(|e| bad(e.to_string()))?;
            let _ = console.log.set(ConsoleLog::Record(Mutex::new(w)));
            log::info!(
                "serial0: recording its input into {}",
                rec.log(LOG).display()
            );
        }
        Recording::Replay(_, _, marks) => {
            // (From a snapshot's mark: `open` put the offset there, and the guest had written
            // so much then.)
            if let Some(m) = marks {
                console.written.add(m.console_written);
            }
            let reader =
                vmm_proto::record::Reader::resume(file, KIND).map_err(|e| bad(e.to_string()))?;
            // How many there are, for the status (a second reader counts them).
            let total = rec
                .open(LOG)
                .ok()
                .and_then(|f| vmm_proto::record::Reader::resume(f, KIND).ok())
                .map_or(0, |mut r| {
                    let mut n = 0u64;
                    while let Ok(Some(_)) = r.next_record() {
                        n += 1;
                    }
                    n
                });
            console.progress.replaying(total);
            let _ = console.log.set(ConsoleLog::Replay);
            let console = console.clone();
            std::thread::Builder::new()
                .name("console-replay".into())
                .spawn(move || {
                    crate::threads::filter_service_thread("vmm-core (the console replay thread)");
                    replay(&console, reader)
                })
                .map_err(|e| VmError::Thread("console replay", e))?;
            log::info!(
                "serial0: replaying its input from {}",
                rec.log(LOG).display()
            );
        }
    }
    Ok(())
}

/// Gives the recorded input, each record once the guest's output has reached its place.
fn replay(console: &ConsoleInput, mut reader: vmm_proto::record::Reader<impl Read>) {
    let mut n = 0u64;
    loop {
        let rec = match reader.next_record() {
            Ok(Some(r)) if r.len() >= 8 => r,
            Ok(Some(_)) => {
                log::error!("serial0: replay: record {n} is too short to be one; the rest of the recorded input is not given");
                return;
            }
            Ok(None) => {
                log::info!("serial0: replay: all {n} recorded input(s) given");
                return;
            }
            Err(e) => {
                log::error!("serial0: replay: {e}; the rest of the recorded input is not given");
                return;
            }
        };
        let at = u64::from_le_bytes(rec[..8].try_into().unwrap());
        console.written.wait_for(at);
        feed_uart(console, &rec[8..]);
        n += 1;
        console.progress.one_more();
    }
}

/// Gives the guest input from the world (a terminal, chardevd, a viewer): recorded while
/// recording; while replaying, the recording's input is given instead and this is dropped.
pub(super) fn deliver(console: &ConsoleInput, bytes: &[u8]) {
    match console.log.get() {
        Some(ConsoleLog::Record(w)) => {
            let at = console.written.get();
            let mut rec = at.to_le_bytes().to_vec();
            rec.extend_from_slice(bytes);
            if let Err(e) = w.lock().unwrap().record(&rec) {
                log::error!("serial0: cannot record its input ({e}); the recording misses it");
            } else {
                console.progress.one_more();
            }
        }
        Some(ConsoleLog::Replay) => {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::warn!("serial0: console input ignored while the recording's is replayed");
            }
            return;
        }
        None => {}
    }
    feed_uart(console, bytes);
}

/// The UART's writer, counting what the guest writes (for record/replay).
struct Counting {
    inner: Box<dyn std::io::Write + Send>,
    written: Arc<crate::control::ConsoleWritten>,
}

impl std::io::Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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
        deliver(&console, &bytes);
        if escape {
            let _ = tx.send(VmEvent::ConsoleEscape);
            return;
        }
    }
}

/// The UART's writer: chardevd's buffer when it serves the console, else stdout.
pub(super) fn serial_out(console: &ConsoleInput) -> Box<dyn std::io::Write + Send> {
    let inner: Box<dyn std::io::Write + Send> = match console.output.get() {
        Some(buffer) => Box::new(chardevd::BufferWriter(buffer.clone())),
        None => Box::new(serial::RawStdout),
    };
    match console.log.get() {
        Some(_) => Box::new(Counting {
            inner,
            written: console.written.clone(),
        }),
        None => inner,
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
                deliver(&input_to, &bytes);
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
