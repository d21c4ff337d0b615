//! A console's terminal: raw mode while a console is attached (so keys reach the guest), restored on
//! every way out, including a panic.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin's terminal into raw mode until dropped. `None` when stdin is not a terminal.
pub struct RawMode(());

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and t is a valid termios.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap() = Some(t);
        let mut raw = t;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so that host log lines end cleanly.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: fd 0 is a terminal and raw is a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        Some(RawMode(()))
    }
}

/// Puts the terminal back as it was, if we changed it.
pub fn restore() {
    if let Ok(mut saved) = SAVED.lock() {
        if let Some(t) = saved.take() {
            // SAFETY: t is the termios read from this terminal earlier.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}
