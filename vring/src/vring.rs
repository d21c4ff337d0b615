//! One virtqueue as a vhost-user backend (blockd, chardevd) holds it: the split ring (virtio-queue's
//! `Queue`), its kick and call eventfds, and whether the frontend enabled it. Shared by the
//! connection's handler (which sets it up from the frontend's messages) and the queue's worker
//! (which serves it), under a read-write lock.
//!
//! (vhost-user-backend's `VringRwLock` did this before; that crate is no longer a dependency:
//! its post-copy support needs the userfaultfd crate, which needs bindgen and libclang to
//! build, while blockd's own handler does post-copy with vmm_sandbox::uffd.)

use crate::Memory;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

pub struct State {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    mem: Memory,
}

impl State {
    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The kick eventfd's descriptor, once the frontend gave one.
    pub fn kick_fd(&self) -> Option<RawFd> {
        self.kick.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

#[derive(Clone)]
pub struct Vring(Arc<RwLock<State>>);

impl Vring {
    pub fn new(mem: Memory, max_size: u16) -> Result<Vring, Error> {
        Ok(Vring(Arc::new(RwLock::new(State {
            queue: Queue::new(max_size)?,
            kick: None,
            call: None,
            enabled: false,
            mem,
        }))))
    }

    pub fn get_ref(&self) -> RwLockReadGuard<'_, State> {
        self.0.read().unwrap()
    }

    pub fn get_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.0.write().unwrap()
    }

    /// Puts a used element (the chain at `head`, `len` bytes written) on the used ring.
    pub fn add_used(&self, head: u16, len: u32) -> Result<(), Error> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.add_used(&*mem, head, len)
    }

    /// Interrupts the guest (writes the call eventfd), if the frontend gave one.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        match self.get_ref().call.as_ref() {
            Some(mut call) => call.write_all(&1u64.to_ne_bytes()),
            None => Ok(()),
        }
    }

    pub fn enable_notification(&self) -> Result<bool, Error> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.enable_notification(&*mem)
    }

    pub fn disable_notification(&self) -> Result<(), Error> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.disable_notification(&*mem)
    }

    pub fn needs_notification(&self) -> Result<bool, Error> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.needs_notification(&*mem)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.get_mut().enabled = enabled;
    }

    /// The ring's three parts, at guest physical addresses.
    pub fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), Error> {
        let mut s = self.get_mut();
        s.queue.try_set_desc_table_address(GuestAddress(desc))?;
        s.queue.try_set_avail_ring_address(GuestAddress(avail))?;
        s.queue.try_set_used_ring_address(GuestAddress(used))
    }

    pub fn queue_next_avail(&self) -> u16 {
        self.get_ref().queue.next_avail()
    }

    pub fn set_queue_next_avail(&self, base: u16) {
        self.get_mut().queue.set_next_avail(base);
    }

    pub fn set_queue_next_used(&self, idx: u16) {
        self.get_mut().queue.set_next_used(idx);
    }

    /// The used ring's index as the guest sees it.
    pub fn queue_used_idx(&self) -> Result<u16, Error> {
        let s = self.get_ref();
        let mem = s.mem.memory();
        s.queue.used_idx(&*mem, Ordering::Acquire).map(|w| w.0)
    }

    pub fn set_queue_size(&self, num: u16) {
        self.get_mut().queue.set_size(num);
    }

    pub fn set_queue_event_idx(&self, on: bool) {
        self.get_mut().queue.set_event_idx(on);
    }

    pub fn set_queue_ready(&self, ready: bool) {
        self.get_mut().queue.set_ready(ready);
    }

    pub fn set_kick(&self, file: Option<File>) {
        self.get_mut().kick = file;
    }

    pub fn set_call(&self, file: Option<File>) {
        self.get_mut().call = file;
    }

    /// Takes the kick (reads the eventfd's count); says whether the queue is enabled.
    pub fn read_kick(&self) -> std::io::Result<bool> {
        let s = self.get_ref();
        if let Some(mut kick) = s.kick.as_ref() {
            let mut count = [0u8; 8];
            match kick.read(&mut count) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(s.enabled)
    }
}
