//! I/O fault rules (`Blockd.FaultRule`) as plain data, to pass between threads and to print.

use crate::blockd_capnp::fault_rule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Errno(i32),
    DelayMs(u32),
    Exit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: u32,
    pub export: String,
    pub read: bool,
    pub write: bool,
    pub flush: bool,
    pub start: u64,
    pub end: u64,
    pub action: Action,
    pub once: bool,
    pub probability: f64,
    pub hits: u64,
}

/// Every rule of a list.
pub fn read_list(list: capnp::struct_list::Reader<fault_rule::Owned>) -> capnp::Result<Vec<Rule>> {
    list.iter().map(Rule::read_from).collect()
}

impl Rule {
    pub fn read_from(r: fault_rule::Reader) -> capnp::Result<Rule> {
        use fault_rule::action;
        Ok(Rule {
            id: r.get_id(),
            export: r.get_export()?.to_string()?,
            read: r.get_read(),
            write: r.get_write(),
            flush: r.get_flush(),
            start: r.get_start(),
            end: r.get_end(),
            action: match r.get_action().which()? {
                action::Errno(e) => Action::Errno(e),
                action::DelayMs(ms) => Action::DelayMs(ms),
                action::Exit(()) => Action::Exit,
            },
            once: r.get_once(),
            probability: r.get_probability(),
            hits: r.get_hits(),
        })
    }

    pub fn write_to(&self, mut b: fault_rule::Builder) {
        b.set_id(self.id);
        b.set_export(&self.export);
        b.set_read(self.read);
        b.set_write(self.write);
        b.set_flush(self.flush);
        b.set_start(self.start);
        b.set_end(self.end);
        match self.action {
            Action::Errno(e) => b.reborrow().init_action().set_errno(e),
            Action::DelayMs(ms) => b.reborrow().init_action().set_delay_ms(ms),
            Action::Exit => b.reborrow().init_action().set_exit(()),
        }
        b.set_once(self.once);
        b.set_probability(self.probability);
        b.set_hits(self.hits);
    }
}

/// Errno names people write, and back.
pub const ERRNOS: [(&str, i32); 6] = [
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EROFS", libc::EROFS),
    ("EINVAL", libc::EINVAL),
    ("ENOMEM", libc::ENOMEM),
    ("EDQUOT", libc::EDQUOT),
];

/// An --errno that is neither a number nor a name of ERRNOS.
#[derive(Debug, thiserror::Error)]
#[error("--errno {0}: give a number or one of EIO, ENOSPC, EROFS, EINVAL, ENOMEM, EDQUOT")]
pub struct UnknownErrno(pub String);

pub fn parse_errno(s: &str) -> Result<i32, UnknownErrno> {
    ERRNOS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s))
        .map(|(_, v)| *v)
        .or_else(|| s.parse().ok())
        .ok_or_else(|| UnknownErrno(s.into()))
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ops: Vec<&str> = [
            (self.read, "read"),
            (self.write, "write"),
            (self.flush, "flush"),
        ]
        .iter()
        .filter(|o| o.0)
        .map(|o| o.1)
        .collect();
        let action = match self.action {
            Action::Errno(e) => match ERRNOS.iter().find(|x| x.1 == e) {
                Some((n, _)) => format!("errno={n}"),
                None => format!("errno={e}"),
            },
            Action::DelayMs(ms) => format!("delay={ms}ms"),
            Action::Exit => "exit".into(),
        };
        let range = if self.end == 0 {
            format!("{}-", self.start)
        } else {
            format!("{}-{}", self.start, self.end)
        };
        write!(
            f,
            "{:<4} {:<8} {:<16} bytes={range:<20} {action:<14} {} hits={}",
            self.id,
            if self.export.is_empty() {
                "*"
            } else {
                &self.export
            },
            ops.join(","),
            if self.once {
                "once".to_string()
            } else if self.probability > 0.0 && self.probability < 1.0 {
                format!("p={}", self.probability)
            } else {
                "always".to_string()
            },
            self.hits
        )
    }
}
