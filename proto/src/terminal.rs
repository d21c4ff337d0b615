//! A console's terminal: raw mode while a console is attached (so keys reach the guest), restored on
//! every way out, including a panic.

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, OutputFlags, SetArg, Termios};
use std::sync::Mutex;

static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Puts stdin's terminal into raw mode until dropped. `None` when stdin is not a terminal.
pub struct RawMode(());

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let t = tcgetattr(&stdin).ok()?;
        *SAVED.lock().unwrap() = Some(t.clone());
        let mut raw = t;
        cfmakeraw(&mut raw);
        // Keep output post-processing so that host log lines end cleanly.
        raw.output_flags |= OutputFlags::OPOST | OutputFlags::ONLCR;
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
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
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}
