//! A commit's account of a disk (see commit.rs): what the guest changed since the last
//! pass took it, and how far the copy is. The disk keeps it, and counts every write in it.

use std::collections::BTreeSet;

/// The unit in which guest writes are tracked during a commit.
pub const CHUNK: u64 = 64 << 10;

/// A commit under way.
#[derive(Debug, Default)]
pub struct Job {
    /// Chunks the guest changed since the last pass took them.
    pub dirty: BTreeSet<u64>,
    /// Bytes copied so far, and to copy in all (as known now: it grows as the guest writes).
    pub done: u64,
    pub total: u64,
    pub pass: u32,
}

impl Job {
    /// The guest changed `len` bytes at `offset`.
    pub fn written(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / CHUNK, (offset + len - 1) / CHUNK);
        self.dirty.extend(first..=last);
    }

    /// What `disk list` shows.
    pub fn describe(&self) -> String {
        format!(
            "commit: pass {}, {:.1} of {:.1} MiB copied",
            self.pass,
            self.done as f64 / (1 << 20) as f64,
            self.total as f64 / (1 << 20) as f64
        )
    }
}
