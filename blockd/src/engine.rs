//! The asynchronous I/O engine: one io_uring per queue worker. A worker submits every read and
//! write it pops from its virtqueue at once, and answers each when its completion arrives (the
//! ring's eventfd is one more event in the worker's epoll loop), so one queue keeps as many
//! requests in flight as the guest gives it.

use crate::disk::Disk;
use crate::request::Pending;
use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct Engine {
    ring: IoUring,
    pub event: EventFd,
    /// In-flight requests by slot: the descriptor head and the request.
    slots: Vec<Option<(u16, Pending)>>,
    free: Vec<usize>,
    queued: usize,
    /// The disk's busy count (see `Disk::quiesce`): each transfer in flight counts.
    busy: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

// SAFETY: the iovecs inside pending requests point into the guest RAM mapping, which outlives
// the engine's use of them; an engine is only ever used by its queue's worker thread (the mutex
// around it is uncontended), so moving it between threads is sound.
unsafe impl Send for Engine {}

/// A completed transfer: the head, the request, and the bytes moved (or the error).
pub type Completion = (u16, Pending, std::io::Result<u64>);

impl Engine {
    pub fn new(depth: u32) -> std::io::Result<Engine> {
        let ring = IoUring::new(depth.next_power_of_two())?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Engine {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
            queued: 0,
            busy: None,
        })
    }

    /// Queues the transfer (submitted by `submit`).
    pub fn push(&mut self, disk: &Disk, head: u16, pending: Pending) -> Result<(), (u16, Pending)> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let io = &pending.io;
        let fd = types::Fd(disk.raw_fd());
        let entry = if io.write {
            opcode::Writev::new(fd, io.iovs.as_ptr(), io.iovs.len() as u32)
                .offset(io.offset)
                .rw_flags(disk.write_flags())
                .build()
        } else {
            opcode::Readv::new(fd, io.iovs.as_ptr(), io.iovs.len() as u32)
                .offset(io.offset)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the iovec array and the buffers it names stay valid until the completion:
        // the array lives in `pending`, kept in `slots` until then, and the buffers are guest
        // RAM.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The submission queue is full: submit what is there and try once more.
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.free.push(slot);
                return Err((head, pending));
            }
        }
        self.slots[slot] = Some((head, pending));
        self.queued += 1;
        disk.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.busy.get_or_insert_with(|| disk.busy.clone());
        Ok(())
    }

    /// No transfer in flight.
    pub fn idle(&self) -> bool {
        self.slots.len() == self.free.len()
    }

    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.queued > 0 {
            self.ring.submit()?;
            self.queued = 0;
        }
        Ok(())
    }

    /// Takes every completion there is, without waiting.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.event.read();
        let cq: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cq {
            let Some((head, pending)) = self.slots.get_mut(slot as usize).and_then(Option::take)
            else {
                continue;
            };
            self.free.push(slot as usize);
            if let Some(b) = &self.busy {
                b.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            let r = if res < 0 {
                Err(std::io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as u64)
            };
            out.push((head, pending, r));
        }
    }
}

impl Drop for Engine {
    /// Transfers still in flight when the connection goes no longer hold the disk busy.
    fn drop(&mut self) {
        if let Some(b) = &self.busy {
            let left = (self.slots.len() - self.free.len()) as u64;
            b.fetch_sub(left, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Finishes a short transfer synchronously (io_uring may return fewer bytes than asked).
pub fn complete_short(disk: &Disk, pending: &Pending, done: u64) -> std::io::Result<u64> {
    let mut rest = Vec::new();
    let mut skip = done as usize;
    for v in &pending.io.iovs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            iov_base: (v.iov_base as usize + skip) as *mut libc::c_void,
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    if rest.is_empty() {
        return Ok(done);
    }
    Ok(done + disk.rw(&mut rest, pending.io.offset + done, pending.io.write)?)
}
