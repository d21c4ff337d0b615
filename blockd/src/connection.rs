//! blockd's side of the vhost-user protocol: a request handler of our own (the vhost crate's
//! `VhostUserBackendReqHandlerMut`) and one worker thread per queue.
//!
//! vhost-user-backend's handler cannot be extended (its constructor is private) and refuses
//! INFLIGHT_SHMFD, which blockd needs to resubmit what it had in flight when it died. This
//! handler keeps the crate's vrings (`VringRwLock`) and the vhost crate's message parsing; what
//! it adds is the inflight area, handed to each queue when its ring starts.

use crate::backend::{Backend, Memory, Vring};
use crate::inflight::{self, Region};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The feature bit that says the frontend speaks the protocol extensions.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const EVENT_IDX: u64 = crate::disk::F_EVENT_IDX;
/// vhost's "log all writes" feature: set by the frontend while a migration logs dirty pages.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
/// Memory regions a frontend may add one by one (CONFIGURE_MEM_SLOTS). vmm-core sends one per
/// RAM region, libblkio one per buffer pool; 64 leaves room.
const MAX_MEM_SLOTS: u64 = 64;

/// Event ids in a worker's epoll set.
const EV_KICK: u64 = 0;
const EV_WAKE: u64 = 1;
const EV_EXIT: u64 = 2;
const EV_ENGINE: u64 = 3;
const EV_TIMER: u64 = 4;

/// A frontend virtual address range and where it lies in guest physical memory.
struct Mapping {
    va: u64,
    size: u64,
    gpa: u64,
}

/// One queue's worker thread.
struct Worker {
    epoll: Arc<Epoll>,
    wake: EventFd,
    exit: EventFd,
    /// The kick fd while it is in the epoll set.
    kick: Option<RawFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct Handler {
    name: String,
    backend: Backend,
    vrings: Vec<Vring>,
    mem: Memory,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    workers: Vec<Worker>,
    inflight: Option<Arc<Region>>,
    /// Post-copy (vhost-user's PAGEFAULT): this connection's userfaultfd, from ADVISE to END.
    postcopy: Option<Postcopy>,
}

/// /dev/userfaultfd: opened before the jail dropped the privileges it needs (by main), or
/// handed over by vmm-core (`userfaultfdDevice`).
pub static UFFD_DEVICE: std::sync::Mutex<Option<vmm_sandbox::uffd::Device>> =
    std::sync::Mutex::new(None);

/// A connection in post-copy: its userfaultfd and the ranges of this process registered on
/// it. While one exists, requests touch their buffers before the kernel does (see
/// request::PREFAULT).
struct Postcopy {
    uffd: vmm_sandbox::uffd::Uffd,
    registered: Vec<(u64, u64)>,
    listening: bool,
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        for &(va, len) in &self.registered {
            let _ = self.uffd.unregister(va, len);
        }
        if self.listening {
            crate::request::PREFAULT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn failed(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(std::io::Error::other(e.to_string()))
}

impl Handler {
    /// The handler for one frontend connection, with its workers running.
    pub fn new(name: &str, backend: Backend, mem: Memory) -> std::io::Result<Handler> {
        let queues = backend.num_queues();
        let mut vrings = Vec::with_capacity(queues);
        for _ in 0..queues {
            vrings.push(
                Vring::new(mem.clone(), backend.max_queue_size() as u16)
                    .map_err(std::io::Error::other)?,
            );
        }
        let mut h = Handler {
            name: name.to_string(),
            backend,
            vrings,
            mem,
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            workers: Vec::new(),
            inflight: None,
            postcopy: None,
        };
        for q in 0..queues {
            let w = h.spawn(q)?;
            h.workers.push(w);
        }
        Ok(h)
    }

    fn spawn(&self, q: usize) -> std::io::Result<Worker> {
        let epoll = Arc::new(Epoll::new()?);
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let add = |fd: RawFd, id: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))
        };
        add(wake.as_raw_fd(), EV_WAKE)?;
        add(exit.as_raw_fd(), EV_EXIT)?;
        add(self.backend.timer_fd(q), EV_TIMER)?;
        if let Some(fd) = self.backend.engine_fd(q) {
            add(fd, EV_ENGINE)?;
        }
        let (ep, backend, vring) = (epoll.clone(), self.backend.clone(), self.vrings[q].clone());
        let (wake2, exit2) = (wake.try_clone()?, exit.try_clone()?);
        let thread = std::thread::Builder::new()
            .name(format!("{}-q{q}", self.name))
            .spawn(move || work(&ep, &backend, &vring, q, &wake2, &exit2))?;
        Ok(Worker {
            epoll,
            wake,
            exit,
            kick: None,
            thread: Some(thread),
        })
    }

    /// Ends the workers and waits for them.
    pub fn stop(&mut self) {
        for w in &mut self.workers {
            let _ = w.exit.write(1);
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn vring(&self, index: u32) -> Result<&Vring> {
        self.vrings.get(index as usize).ok_or(Error::InvalidParam)
    }

    fn gpa(&self, va: u64, what: &str) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.va && va - m.va < m.size)
            .map(|m| va - m.va + m.gpa)
            .ok_or_else(|| failed(format!("the {what} at {va:#x} is in no memory region")))
    }

    /// Puts the queue's kick fd in its worker's epoll set while the ring is started and
    /// enabled, and takes it out otherwise; a newly live ring is looked at once.
    fn update(&mut self, q: usize) -> Result<()> {
        let (kick, live) = {
            let state = self.vrings[q].get_ref();
            let kick = state.kick_fd();
            (kick, state.get_queue().ready() && state.is_enabled())
        };
        let want = if live { kick } else { None };
        if self.workers[q].kick == want {
            return Ok(());
        }
        self.forget_kick(q);
        let w = &mut self.workers[q];
        if let Some(fd) = want {
            w.epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, EV_KICK),
                )
                .map_err(Error::ReqHandlerError)?;
            w.kick = Some(fd);
            // Requests queued before the ring went live (or left in flight by a previous
            // blockd) are not announced by a kick.
            let _ = w.wake.write(1);
        }
        Ok(())
    }

    /// Takes the kick fd out of the worker's set before the vring's file is replaced.
    fn forget_kick(&mut self, q: usize) {
        let w = &mut self.workers[q];
        if let Some(old) = w.kick.take() {
            let _ = w.epoll.ctl(
                ControlOperation::Delete,
                old,
                EpollEvent::new(EventSet::IN, EV_KICK),
            );
        }
    }

    /// Starts the ring once it has its kick fd: with an inflight area, the requests the
    /// previous blockd had taken are found and the ring goes on after them.
    fn maybe_start(&mut self, q: usize) -> Result<()> {
        let vring = &self.vrings[q];
        {
            let state = vring.get_ref();
            if state.get_queue().ready() || state.kick_fd().is_none() {
                return Ok(());
            }
        }
        let log = match &self.inflight {
            Some(region) => {
                let size = vring.get_ref().get_queue().size();
                let used = vring.queue_used_idx().map_err(failed)?;
                match region.queue(q as u16, size, used) {
                    Some(log) => {
                        let n = log.in_flight_at_start();
                        vring.set_queue_next_used(used);
                        vring.set_queue_next_avail(used.wrapping_add(n as u16));
                        if n > 0 {
                            log::info!(
                                "export {}: queue {q}: resubmitting {n} request(s) left in flight",
                                self.name
                            );
                        }
                        Some(log)
                    }
                    None => {
                        log::warn!(
                            "export {}: queue {q} (of {size}) does not fit the inflight area of {} queue(s); it is not tracked",
                            self.name,
                            region.queues()
                        );
                        None
                    }
                }
            }
            None => None,
        };
        self.backend.set_log(q, log);
        vring.set_queue_ready(true);
        self.update(q)
    }

    fn adopt(&mut self, region: Region) {
        self.inflight = Some(Arc::new(region));
    }

    fn region_of(&self, r: &VhostUserMemoryRegion, file: File) -> Result<GuestRegionMmap<()>> {
        let (gpa, size, offset) = (r.guest_phys_addr, r.memory_size, r.mmap_offset);
        // A mapping past the end of its file faults (SIGBUS) where it is read: a region the
        // file cannot hold is refused now (found by fuzz/vhost_user).
        let have = file.metadata().map_err(failed)?.len();
        match offset.checked_add(size) {
            Some(need) if need <= have => {}
            _ => {
                return Err(failed(format!(
                    "the memory region at {gpa:#x} (+{size:#x}, at offset {offset:#x} of its file) lies past the end of the file the frontend sent ({have:#x} bytes)"
                )))
            }
        }
        let map = r.mmap_region::<()>(file)?;
        GuestRegionMmap::new(map, GuestAddress(gpa)).ok_or_else(|| {
            failed(format!(
                "the memory region at {gpa:#x} (+{size:#x}) overflows"
            ))
        })
    }

    fn publish(&mut self, mem: GuestMemoryMmap<()>) {
        self.mem.lock().unwrap().replace(mem);
        self.backend.update_memory(self.mem.clone());
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A queue's worker: kicks, throttle timers and io_uring completions, until told to exit.
fn work(epoll: &Epoll, backend: &Backend, vring: &Vring, q: usize, wake: &EventFd, exit: &EventFd) {
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("queue {q}: its worker cannot wait for events ({e}); it stops");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                EV_EXIT => {
                    let _ = exit.read();
                    return;
                }
                EV_KICK => match vring.read_kick() {
                    Ok(true) => backend.on_kick(vring, q),
                    Ok(false) => {}
                    Err(e) => log::warn!("queue {q}: cannot read its kick ({e})"),
                },
                EV_WAKE => {
                    let _ = wake.read();
                    backend.on_kick(vring, q);
                }
                EV_TIMER => backend.on_timer(vring, q),
                EV_ENGINE => backend.on_engine(vring, q),
                _ => {}
            }
        }
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(Error::InvalidOperation("the device has an owner already"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        for q in 0..self.vrings.len() {
            self.vrings[q].set_enabled(false);
            self.update(q)?;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.backend.features() | PROTOCOL_FEATURES | LOG_ALL)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let offered = self.backend.features() | PROTOCOL_FEATURES | LOG_ALL;
        if features & !offered != 0 {
            return Err(failed(format!(
                "the frontend acked features {:#x} that blockd does not offer",
                features & !offered
            )));
        }
        self.acked_features = features;
        // Without the protocol extensions there is no SET_VRING_ENABLE: rings start enabled.
        if features & PROTOCOL_FEATURES == 0 {
            for q in 0..self.vrings.len() {
                self.vrings[q].set_enabled(true);
                self.update(q)?;
            }
        }
        let event_idx = features & EVENT_IDX != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features & !LOG_ALL);
        if features & LOG_ALL != 0 {
            crate::disk::slow_log_all();
        }
        self.backend.set_log_all(features & LOG_ALL != 0);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let listening = postcopy_listening == Some(true);
        let mut regions: Vec<GuestRegionMmap<()>> = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            regions.push(self.region_of(r, file)?);
            mappings.push(Mapping {
                va: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        // Post-copy: each new mapping goes on the userfaultfd before anything reads it, and
        // the frontend hears where it lies in this process (to serve its faults).
        let bases = if listening {
            let pc = self.postcopy.as_mut().ok_or(Error::InvalidOperation(
                "a post-copy memory table without POSTCOPY_ADVISE",
            ))?;
            let mut bases = Vec::with_capacity(regions.len());
            for r in &regions {
                use vm_memory::GuestMemoryRegion;
                let (va, len) = (r.as_ptr() as u64, r.len());
                pc.uffd.register(va, len).map_err(failed)?;
                pc.registered.push((va, len));
                bases.push(va);
            }
            Some(bases)
        } else {
            None
        };
        let mut regions = regions;
        regions.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| failed(format!("the frontend's memory table cannot be used: {e}")))?;
        self.publish(mem);
        self.mappings = mappings;
        Ok(bases)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = self.backend.max_queue_size();
        let vring = self.vring(index)?;
        if num == 0 || num as usize > max || !num.is_power_of_two() {
            return Err(failed(format!(
                "queue {index}: a size of {num}; it must be a power of two up to {max}"
            )));
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let desc = self.gpa(descriptor, "descriptor table")?;
        let avail = self.gpa(available, "available ring")?;
        let used = self.gpa(used, "used ring")?;
        let vring = self.vring(index)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|e| failed(format!("queue {index}: {e}")))?;
        // The used index goes on from where the guest sees it (after a reboot, from 0).
        let idx = vring.queue_used_idx().map_err(failed)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let q = index as usize;
        let vring = self.vring(index)?.clone();
        // GET_VRING_BASE stops the ring.
        vring.set_queue_ready(false);
        self.update(q)?;
        let next = vring.queue_next_avail();
        self.forget_kick(q);
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = usize::from(index);
        let vring = self.vring(u32::from(index))?.clone();
        self.forget_kick(q);
        vring.set_kick(fd);
        self.maybe_start(q)?;
        self.update(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?.set_call(fd);
        self.maybe_start(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        // blockd never reports a ring error: the descriptor is checked and closed.
        self.vring(u32::from(index))?;
        drop(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        // REPLY_ACK and CONFIGURE_MEM_SLOTS are what libblkio requires of a vhost-user-blk
        // backend; INFLIGHT_SHMFD lets a restarted blockd resubmit what it had in flight.
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::PAGEFAULT)
    }

    /// POSTCOPY_ADVISE: a userfaultfd of this process for the frontend's page server.
    fn postcopy_advice(&mut self) -> Result<File> {
        let dev = UFFD_DEVICE.lock().unwrap();
        let uffd = vmm_sandbox::uffd::Uffd::from_device(dev.as_ref()).map_err(|e| {
            log::error!("{}: cannot join post-copy: {e}", self.name);
            failed(e)
        })?;
        let file = File::from(uffd.fd().try_clone_to_owned().map_err(failed)?);
        self.postcopy = Some(Postcopy {
            uffd,
            registered: Vec::new(),
            listening: false,
        });
        log::info!("{}: post-copy: a userfaultfd for the frontend", self.name);
        Ok(file)
    }

    /// POSTCOPY_LISTEN: memory mapped from now on goes on the userfaultfd, and requests
    /// touch their buffers first (a kernel copy into a missing page would not wait).
    fn postcopy_listen(&mut self) -> Result<()> {
        let pc = self.postcopy.as_mut().ok_or(Error::InvalidOperation(
            "POSTCOPY_LISTEN without POSTCOPY_ADVISE",
        ))?;
        if !pc.listening {
            pc.listening = true;
            crate::request::PREFAULT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// The frontend serves faults on the regions it was told of: the rings may run.
    fn postcopy_ack_mem_regions(&mut self) -> Result<()> {
        Ok(())
    }

    /// POSTCOPY_END: every page is here; the memory leaves the userfaultfd.
    fn postcopy_end(&mut self) -> Result<()> {
        if self.postcopy.take().is_some() {
            log::info!("{}: post-copy over", self.name);
        }
        Ok(())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if self.acked_features & PROTOCOL_FEATURES == 0 {
            return Err(Error::InvalidOperation(
                "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(Error::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("blockd is not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("blockd shares no objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        let region = Region::create(msg.num_queues, msg.queue_size).map_err(failed)?;
        let file = region.file().try_clone().map_err(Error::ReqHandlerError)?;
        let reply = VhostUserInflight {
            mmap_size: region.len() as u64,
            mmap_offset: 0,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        log::debug!(
            "export {}: inflight area of {} bytes ({} queue(s) of {}, {} bytes each)",
            self.name,
            region.len(),
            msg.num_queues,
            msg.queue_size,
            inflight::queue_area(msg.queue_size)
        );
        self.adopt(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        let region = Region::open(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(failed)?;
        self.adopt(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening == Some(true) {
            return Err(Error::InvalidOperation(
                "blockd takes post-copy memory as one SET_MEM_TABLE, not ADD_MEM_REG",
            ));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(failed(format!(
                "the frontend added more than {MAX_MEM_SLOTS} memory regions"
            )));
        }
        let r = Arc::new(self.region_of(region, fd)?);
        let mem = {
            use vm_memory::GuestAddressSpace;
            self.mem.memory().insert_region(r).map_err(failed)?
        };
        self.publish(mem);
        self.mappings.push(Mapping {
            va: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (mem, _) = {
            use vm_memory::GuestAddressSpace;
            self.mem
                .memory()
                .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
                .map_err(failed)?
        };
        self.publish(mem);
        self.mappings
            .retain(|m| !(m.gpa == region.guest_phys_addr && m.size == region.memory_size));
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation(
            "blockd has no device state to transfer",
        ))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation(
            "blockd has no device state to transfer",
        ))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation(
            "blockd has no shared memory regions",
        ))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let area = vmm_vring::dirty::DirtyLog::map(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| failed(format!("cannot map the dirty log ({e})")))?;
        self.backend.set_dirty_log(area);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;

    fn handler() -> Handler {
        let disk = Arc::new(Disk::in_memory());
        let backend = Backend::new("t", disk).unwrap();
        let mem = vm_memory::GuestMemoryAtomic::new(GuestMemoryMmap::new());
        Handler::new("t", backend, mem).unwrap()
    }

    fn tempfile_of(len: u64) -> File {
        let fd =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        f
    }

    /// A frontend's memory table whose region claims more than its file holds (or wraps
    /// around with its offset) is refused with the reason, and nothing is mapped: read later,
    /// such a mapping would kill blockd with SIGBUS (fuzz/vhost_user found it).
    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let mut h = handler();
        let region = |size: u64, offset: u64| VhostUserMemoryRegion {
            guest_phys_addr: 0,
            memory_size: size,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: offset,
        };
        for (size, offset) in [(0x20000, 0), (0x10000, 0x1000), (0x1000, u64::MAX)] {
            let e = h
                .set_mem_table(&[region(size, offset)], vec![tempfile_of(0x10000)], None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("lies past the end of the file"), "{e}");
        }
        assert!(h.mappings.is_empty());
        // The same region within its file is taken.
        h.set_mem_table(&[region(0x10000, 0)], vec![tempfile_of(0x10000)], None)
            .unwrap();
        assert_eq!(h.mappings.len(), 1);
        h.stop();
    }
}
