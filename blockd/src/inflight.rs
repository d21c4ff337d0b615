//! vhost-user INFLIGHT_SHMFD: the requests blockd has taken from each queue and not yet
//! answered, kept in memory the frontend holds on to, so that a restarted blockd resubmits them.
//!
//! The layout is the specification's for split rings
//! (<https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#inflight-i-o-tracking>),
//! one area per queue:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! A request is marked in flight (with a rising counter) when it is taken from the available
//! ring. When it is answered, `last_batch_head` names it before the used index moves, and its
//! mark is cleared and `used_idx` updated after, so a crash between the two is repaired at the
//! next start. The file is shared with the frontend only, never with the guest.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

const HEADER: usize = 16;
const DESC: usize = 16;
/// Each queue's area starts on a 64-byte boundary.
const ALIGN: usize = 64;
/// The layout's version, stored in each queue's header once that queue has used it.
const VERSION: u16 = 1;

/// The size of one queue's area for a ring of `queue_size` descriptors.
pub fn queue_area(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Why an inflight area cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("an inflight area for {0} queue(s) of {1} descriptors makes no sense")]
    Shape(u16, u16),
    #[error("cannot create the inflight area: {0}")]
    Create(#[source] nix::Error),
    #[error("cannot size the inflight area to {0} bytes: {1}")]
    Size(usize, #[source] std::io::Error),
    #[error("the inflight area is {size} bytes; {queues} queue(s) of {queue_size} need {need}")]
    TooSmall {
        size: u64,
        queues: u16,
        queue_size: u16,
        need: usize,
    },
    #[error("cannot stat the inflight area: {0}")]
    Stat(#[source] std::io::Error),
    #[error(
        "the inflight area's file is {real} bytes, too small for {need} bytes at offset {offset}"
    )]
    FileTooSmall { real: u64, need: usize, offset: u64 },
    #[error("the inflight area's offset {0} is not page-aligned")]
    Unaligned(u64),
    #[error("cannot map the inflight area: {0}")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// The whole shared area, mapped.
pub struct Region {
    map: MmapRegion<()>,
    queues: u16,
    queue_size: u16,
    /// Kept so that GET_INFLIGHT_FD can hand it out.
    file: File,
}

impl Region {
    /// A new, zeroed area for `queues` queues of up to `queue_size` descriptors
    /// (GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        check_shape(queues, queue_size)?;
        let fd = nix::sys::memfd::memfd_create(
            c"blockd-inflight",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(InflightError::Create)?;
        let file = File::from(fd);
        let len = usize::from(queues) * queue_area(queue_size);
        file.set_len(len as u64)
            .map_err(|e| InflightError::Size(len, e))?;
        Region::map(file, 0, len, queues, queue_size)
    }

    /// The area the frontend hands back (SET_INFLIGHT_FD), checked against its stated shape.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        check_shape(queues, queue_size)?;
        let need = usize::from(queues) * queue_area(queue_size);
        if size < need as u64 {
            return Err(InflightError::TooSmall {
                size,
                queues,
                queue_size,
                need,
            });
        }
        let real = file.metadata().map_err(InflightError::Stat)?.len();
        if offset.checked_add(need as u64).is_none_or(|end| end > real) {
            return Err(InflightError::FileTooSmall { real, need, offset });
        }
        Region::map(file, offset, need, queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        len: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        if !offset.is_multiple_of(4096) {
            return Err(InflightError::Unaligned(offset));
        }
        let shared = file.try_clone().map_err(InflightError::Stat)?;
        let map = MmapRegion::from_file(FileOffset::new(shared, offset), len)
            .map_err(InflightError::Map)?;
        Ok(Region {
            map,
            queues,
            queue_size,
            file,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> usize {
        self.map.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Queue `q`'s log, recovered for a ring of `ring_size` whose used index the guest shows as
    /// `used_idx`. Returns the log and the index the ring goes on from (`used_idx` plus the
    /// requests in flight), or None when the area has no room for that queue.
    pub fn queue(self: &Arc<Self>, q: u16, ring_size: u16, used_idx: u16) -> Option<QueueLog> {
        if q >= self.queues || ring_size > self.queue_size || ring_size == 0 {
            return None;
        }
        let mut log = QueueLog {
            region: self.clone(),
            base: usize::from(q) * queue_area(self.queue_size),
            size: ring_size,
            counter: 0,
            resubmit: VecDeque::new(),
        };
        log.recover(used_idx);
        Some(log)
    }
}

fn check_shape(queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if queues == 0 || queue_size == 0 || queue_size > 32768 {
        return Err(InflightError::Shape(queues, queue_size));
    }
    Ok(())
}

/// One queue's part of the area, used by that queue's worker only.
pub struct QueueLog {
    region: Arc<Region>,
    /// Where the queue's area starts in the mapping.
    base: usize,
    size: u16,
    counter: u64,
    /// Heads that were in flight when the previous blockd died, oldest first.
    resubmit: VecDeque<u16>,
}

impl QueueLog {
    /// The atomic at `offset` in the queue's area: areas are 64-aligned in a page-aligned
    /// mapping and every field is naturally aligned, and `queue` checked that the area (and
    /// `recover`/`begin`/`answered` that the head) lies inside it.
    fn at<T: vm_memory::AtomicInteger>(&self, offset: usize) -> &T {
        self.region
            .map
            .get_atomic_ref::<T>(self.base + offset)
            .expect("an aligned field inside the inflight area")
    }

    fn version(&self) -> &AtomicU16 {
        self.at(8)
    }

    fn desc_num(&self) -> &AtomicU16 {
        self.at(10)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.at(12)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.at(14)
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        debug_assert!(head < self.size);
        self.at(HEADER + DESC * usize::from(head))
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER + DESC * usize::from(head) + 8)
    }

    /// Reads the area as the previous blockd left it and prepares the resubmission list;
    /// a new area (version 0) is initialised.
    fn recover(&mut self, ring_used: u16) {
        let fresh = self.version().load(Ordering::Acquire) != VERSION
            || self.desc_num().load(Ordering::Acquire) != self.size;
        if fresh {
            for h in 0..self.size {
                self.inflight(h).store(0, Ordering::Relaxed);
                self.counter_of(h).store(0, Ordering::Relaxed);
            }
            self.desc_num().store(self.size, Ordering::Relaxed);
            self.last_batch_head().store(0, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            return;
        }
        // The previous blockd died between moving the used index and clearing the request it
        // answered: that request is done.
        if self.used_idx().load(Ordering::Acquire) != ring_used {
            let last = self.last_batch_head().load(Ordering::Acquire);
            if last < self.size {
                self.inflight(last).store(0, Ordering::Release);
            }
            self.used_idx().store(ring_used, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter_of(h).load(Ordering::Acquire), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c);
        self.resubmit = heads.into_iter().map(|(_, h)| h).collect();
    }

    /// How many requests the previous blockd left in flight (at recovery).
    pub fn in_flight_at_start(&self) -> usize {
        self.resubmit.len()
    }

    /// The next request the previous blockd left unanswered, oldest first.
    pub fn take_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// `head` was taken from the available ring (or resubmitted).
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.counter += 1;
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.inflight(head).store(1, Ordering::Release);
    }

    /// `head` is about to go into the used ring.
    pub fn answering(&self, head: u16) {
        if head >= self.size {
            return;
        }
        self.last_batch_head().store(head, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// `head` is in the used ring, whose index is now `used_idx`.
    pub fn answered(&self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        fence(Ordering::SeqCst);
        self.inflight(head).store(0, Ordering::Release);
        self.used_idx().store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resubmits_what_was_in_flight_oldest_first() {
        let r = Arc::new(Region::create(2, 8).unwrap());
        assert_eq!(r.len(), 2 * queue_area(8));
        let mut log = r.queue(1, 8, 0).unwrap();
        assert_eq!(log.in_flight_at_start(), 0);
        // Five requests taken; 3 and 1 answered (out of order); 4, 0 and 2 still in flight.
        for h in [4, 0, 3, 1, 2] {
            log.begin(h);
        }
        for (h, idx) in [(3, 1), (1, 2)] {
            log.answering(h);
            log.answered(h, idx);
        }
        drop(log);
        // A restarted blockd finds them, in the order they were taken.
        let mut log = r.queue(1, 8, 2).unwrap();
        assert_eq!(log.in_flight_at_start(), 3);
        let order: Vec<u16> = std::iter::from_fn(|| log.take_resubmit()).collect();
        assert_eq!(order, vec![4, 0, 2]);
        // The other queue's area is untouched.
        assert_eq!(r.queue(0, 8, 0).unwrap().in_flight_at_start(), 0);
    }

    #[test]
    fn a_crash_between_used_index_and_clearing_is_repaired() {
        let r = Arc::new(Region::create(1, 4).unwrap());
        let mut log = r.queue(0, 4, 0).unwrap();
        log.begin(2);
        log.begin(3);
        // Answering 2: the used index moved to 1, then the process died before clearing.
        log.answering(2);
        drop(log);
        let mut log = r.queue(0, 4, 1).unwrap();
        let order: Vec<u16> = std::iter::from_fn(|| log.take_resubmit()).collect();
        assert_eq!(order, vec![3]);
    }

    #[test]
    fn shared_through_the_file_and_checked() {
        let r = Region::create(1, 16).unwrap();
        let f = r.file().try_clone().unwrap();
        let len = r.len() as u64;
        let r2 = Arc::new(Region::open(f, 0, len, 1, 16).unwrap());
        let r = Arc::new(r);
        let mut a = r.queue(0, 16, 0).unwrap();
        a.begin(7);
        let mut b = r2.queue(0, 16, 0).unwrap();
        assert_eq!(b.take_resubmit(), Some(7));
        let f = r.file().try_clone().unwrap();
        let e = Region::open(f, 0, len, 2, 16).err().unwrap();
        assert!(e.to_string().contains("2 queue(s) of 16 need"), "{e}");
        assert!(Region::create(0, 16).is_err());
    }
}
