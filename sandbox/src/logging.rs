//! The one logger of vmm-core and every helper: a line per record on stderr,
//! `WHO: LEVEL: message`, with the same level words everywhere (error, warn, info, debug,
//! trace). Each line goes out in one write, so that lines from threads do not interleave and
//! a line is whole even when the process ends right after (a crash a fault rule asked for).
//!
//! Where the line goes decides its front:
//! - into journald (systemd's `JOURNAL_STREAM` names stderr's device and inode): a `<N>`
//!   syslog priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug), so that
//!   `journalctl -p warning` works; journald adds the time;
//! - anywhere else: the UTC time, `2026-12-06T23:55:41.123Z `;
//! - from a helper vmm-core started (`VMM_LOG_STYLE=bare`): nothing, as vmm-core passes each
//!   line on with its own front (`relay`).
//!
//! A console in raw mode keeps the terminal's newline translation (ONLCR), so lines end in
//! `\n` everywhere.
//!
//! `VMM_LOG=error|warn|info|debug|trace` (or vmm-core's `--log-level`, which it passes on to
//! its helpers) picks the level; the default is info. A helper's own variable (`BLOCKD_LOG`,
//! …) wins over it. An unknown word is said once and info is used. Dependencies' records
//! show from `warn` up.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::sync::OnceLock;

/// What goes in front of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A syslog priority, for journald.
    Journal,
    /// The UTC time.
    Timestamped,
    /// Nothing: vmm-core relays the line.
    Bare,
}

struct Stderr {
    who: &'static str,
    /// The binary's own records: its crate's module paths start so.
    target: String,
    style: Style,
}

/// The level word every binary writes.
pub fn word(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC; the civil calendar from days, as in
/// Howard Hinnant's date algorithms).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The front of a line at `level` in `style`.
fn front(style: Style, level: Level) -> String {
    match style {
        Style::Journal => format!("<{}>", priority(level)),
        Style::Timestamped => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{}.{:03}Z ", utc(now.as_secs()), now.subsec_millis())
        }
        Style::Bare => String::new(),
    }
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
        let line = format!(
            "{}{}: {}: {}\n",
            front(self.style, r.level()),
            self.who,
            word(r.level()),
            r.args()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<Stderr> = OnceLock::new();

/// The style for this process's stderr.
fn detect() -> Style {
    if std::env::var("VMM_LOG_STYLE").as_deref() == Ok("bare") {
        return Style::Bare;
    }
    // JOURNAL_STREAM=DEV:INODE is stderr's when systemd connected it to journald (a child
    // that inherited the variable but not the stream does not match).
    let journal = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (dev, ino) = v.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    if let Some((dev, ino)) = journal {
        if let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) {
            if st.st_dev == dev && st.st_ino == ino {
                return Style::Journal;
            }
        }
    }
    Style::Timestamped
}

/// A level word, if it is one.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s {
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// The level a variable names; an unknown word is said (once, on stderr) and ignored.
fn level(var: &str, who: &str) -> Option<LevelFilter> {
    let v = std::env::var(var).ok()?;
    let l = parse_level(&v);
    if l.is_none() {
        eprintln!(
            "{who}: warn: {var}={v} is not a log level; using info (write error, warn, info, debug or trace)"
        );
    }
    l
}

/// Starts logging for the binary `who` (its own level variable is `WHO_LOG`, upper case).
pub fn init(who: &'static str) {
    let own = format!("{}_LOG", who.to_uppercase().replace('-', "_"));
    let filter = level(&own, who)
        .or_else(|| level("VMM_LOG", who))
        .unwrap_or(LevelFilter::Info);
    let logger = LOGGER.get_or_init(|| Stderr {
        who,
        target: who.replace('-', "_"),
        style: detect(),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(filter);
    }
}

/// The level in force (what vmm-core passes on to its helpers as VMM_LOG).
pub fn current_level() -> &'static str {
    match log::max_level() {
        LevelFilter::Off | LevelFilter::Error => "error",
        LevelFilter::Warn => "warn",
        LevelFilter::Info => "info",
        LevelFilter::Debug => "debug",
        LevelFilter::Trace => "trace",
    }
}

/// A line a helper wrote (`WHO: LEVEL: message`, bare), with this process's front: a
/// helper's line reaches journald with its own priority. A line with no level word (a
/// seccomp report, written from a signal handler) counts as an error.
pub fn relay(line: &str) -> String {
    let style = LOGGER.get().map_or(Style::Timestamped, |l| l.style);
    let level = line
        .split_once(": ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(w, _)| match w {
            "error" => Some(Level::Error),
            "warn" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            "trace" => Some(Level::Trace),
            _ => None,
        })
        .unwrap_or(Level::Error);
    format!("{}{line}", front(style, level))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_the_calendar_s() {
        assert_eq!(utc(0), "1970-01-01T00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(utc(1_796_599_245), "2026-12-06T23:20:45");
    }

    #[test]
    fn fronts_say_the_priority_or_the_time() {
        assert_eq!(front(Style::Journal, Level::Warn), "<4>");
        assert_eq!(front(Style::Journal, Level::Debug), "<7>");
        assert_eq!(front(Style::Bare, Level::Error), "");
        let t = front(Style::Timestamped, Level::Info);
        assert!(
            t.ends_with("Z ") && t.len() == "2026-12-06T23:20:45.123Z ".len(),
            "{t}"
        );
        assert_eq!(parse_level("warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("verbose"), None);
    }
}
