//! The one logger of vmm-core and every helper: a line per record on stderr,
//! `WHO: LEVEL: message`, which journald keeps as it is. Each line goes out in one write, so
//! that lines from threads do not interleave and a line is whole even when the process ends
//! right after (a crash a fault rule asked for). On a terminal a line ends in `\r\n`, as a
//! console in raw mode needs.
//!
//! `VMM_LOG=error|warn|info|debug|trace` picks the level (default: info); a helper also reads
//! its own variable (`BLOCKD_LOG`, …), which wins. Dependencies' records show from `warn` up.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

struct Stderr {
    who: &'static str,
    /// The binary's own records: its crate's module paths start so.
    target: String,
    crlf: bool,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata) -> bool {
        let ours = m.target().starts_with("vmm_") || m.target().starts_with(&self.target);
        m.level() <= log::max_level() && (ours || m.level() <= Level::Warn)
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        let end = if self.crlf { "\r\n" } else { "\n" };
        let line = format!("{}: {level}: {}{end}", self.who, r.args());
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<Stderr> = OnceLock::new();

/// The level a variable names, if it names one.
fn level(var: &str) -> Option<LevelFilter> {
    match std::env::var(var).ok()?.as_str() {
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Starts logging for the binary `who` (its own level variable is `WHO_LOG`, upper case).
pub fn init(who: &'static str) {
    let own = format!("{}_LOG", who.to_uppercase().replace('-', "_"));
    let filter = level(&own)
        .or_else(|| level("VMM_LOG"))
        .unwrap_or(LevelFilter::Info);
    let logger = LOGGER.get_or_init(|| Stderr {
        who,
        target: who.replace('-', "_"),
        crlf: std::io::stderr().is_terminal(),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(filter);
    }
}
