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
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

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

/// The whole shared area, mapped.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    queues: u16,
    queue_size: u16,
    /// Kept so that GET_INFLIGHT_FD can hand it out.
    file: File,
}

// SAFETY: the mapping is plain shared memory; every access to it goes through atomics (see
// `QueueLog`), and the pointer stays valid until `Drop` unmaps it.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// A new, zeroed area for `queues` queues of up to `queue_size` descriptors
    /// (GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> Result<Region, String> {
        check_shape(queues, queue_size)?;
        // SAFETY: memfd_create with a NUL-terminated name; the fd it returns is owned by the File.
        let fd = unsafe { libc::memfd_create(c"blockd-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "cannot create the inflight area: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let len = usize::from(queues) * queue_area(queue_size);
        file.set_len(len as u64)
            .map_err(|e| format!("cannot size the inflight area to {len} bytes: {e}"))?;
        Region::map(file, 0, len, queues, queue_size)
    }

    /// The area the frontend hands back (SET_INFLIGHT_FD), checked against its stated shape.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, String> {
        check_shape(queues, queue_size)?;
        let need = usize::from(queues) * queue_area(queue_size);
        if size < need as u64 {
            return Err(format!(
                "the inflight area is {size} bytes; {queues} queue(s) of {queue_size} need {need}"
            ));
        }
        let real = file
            .metadata()
            .map_err(|e| format!("cannot stat the inflight area: {e}"))?
            .len();
        if offset.checked_add(need as u64).is_none_or(|end| end > real) {
            return Err(format!(
                "the inflight area's file is {real} bytes, too small for {need} bytes at offset {offset}"
            ));
        }
        Region::map(file, offset, need, queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        len: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, String> {
        if !offset.is_multiple_of(4096) {
            return Err(format!(
                "the inflight area's offset {offset} is not page-aligned"
            ));
        }
        // SAFETY: a new shared mapping of `len` bytes of a file we hold, at an address the
        // kernel chooses; nothing else in this process aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map the inflight area: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
            queues,
            queue_size,
            file,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> usize {
        self.len
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
        // SAFETY: q < queues, so the area lies inside the mapping.
        let base = unsafe { self.ptr.add(usize::from(q) * queue_area(self.queue_size)) };
        let mut log = QueueLog {
            _region: self.clone(),
            base,
            size: ring_size,
            counter: 0,
            resubmit: VecDeque::new(),
        };
        log.recover(used_idx);
        Some(log)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `map`; no QueueLog outlives the Region (each
        // holds an Arc to it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn check_shape(queues: u16, queue_size: u16) -> Result<(), String> {
    if queues == 0 || queue_size == 0 || queue_size > 32768 {
        return Err(format!(
            "an inflight area for {queues} queue(s) of {queue_size} descriptors makes no sense"
        ));
    }
    Ok(())
}

/// One queue's part of the area, used by that queue's worker only.
pub struct QueueLog {
    /// Keeps the mapping alive while the log points into it.
    _region: Arc<Region>,
    base: *mut u8,
    size: u16,
    counter: u64,
    /// Heads that were in flight when the previous blockd died, oldest first.
    resubmit: VecDeque<u16>,
}

// SAFETY: `base` points into `region`, which the log keeps alive; the log moves between threads
// only as a whole (it sits in a mutex).
unsafe impl Send for QueueLog {}

impl QueueLog {
    fn version(&self) -> &AtomicU16 {
        // SAFETY: offset 8 of the queue's area, 2-aligned (areas are 64-aligned in a page-aligned
        // mapping); the area outlives &self.
        unsafe { &*(self.base.add(8) as *const AtomicU16) }
    }

    fn desc_num(&self) -> &AtomicU16 {
        // SAFETY: as for `version`, at offset 10.
        unsafe { &*(self.base.add(10) as *const AtomicU16) }
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        // SAFETY: as for `version`, at offset 12.
        unsafe { &*(self.base.add(12) as *const AtomicU16) }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: as for `version`, at offset 14.
        unsafe { &*(self.base.add(14) as *const AtomicU16) }
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        debug_assert!(head < self.size);
        // SAFETY: head < size <= the area's queue_size, so the descriptor's state lies inside
        // the area.
        unsafe { &*(self.base.add(HEADER + DESC * usize::from(head)) as *const AtomicU8) }
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        // SAFETY: as for `inflight`, 8 bytes further, 8-aligned.
        unsafe { &*(self.base.add(HEADER + DESC * usize::from(head) + 8) as *const AtomicU64) }
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
        assert!(e.contains("2 queue(s) of 16 need"), "{e}");
        assert!(Region::create(0, 16).is_err());
    }
}
