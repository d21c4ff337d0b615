//! x86_64 system call names and numbers, from the `syscalls` crate's tables (generated from
//! Linux's own headers), for the allowlists and for reports of seccomp violations.

use syscalls::Sysno;

/// The name of system call `nr`, or None. Safe to call in a signal handler: a table lookup.
pub fn name(nr: i64) -> Option<&'static str> {
    usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map(|s| s.name())
}

/// The number of the system call `name`.
pub fn number(name: &str) -> Option<i64> {
    name.parse::<Sysno>().ok().map(|s| i64::from(s.id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_libc() {
        assert_eq!(name(libc::SYS_read), Some("read"));
        assert_eq!(name(libc::SYS_io_uring_setup), Some("io_uring_setup"));
        assert_eq!(number("pread64"), Some(libc::SYS_pread64));
        assert_eq!(number("close_range"), Some(libc::SYS_close_range));
        assert_eq!(name(100_000), None);
        assert_eq!(number("no_such_call"), None);
    }
}
