//! virtio-rng over vhost-user-rng (virtio 1.2, 5.4): chardevd fills the guest's device-writable
//! buffers with bytes from an entropy source that vmm-core hands it (the host's /dev/urandom,
//! or a file), straight into guest memory, as blockd serves disks. Each request gets at most
//! 64 KiB, and an optional token bucket (bytes per second, with a burst) limits the rate, as
//! Firecracker's entropy device does. While a migration logs, the pages written are marked in
//! the frontend's dirty log.
//!
//! chardevd, not a helper of its own: an entropy source is a character source (QEMU's rng-egd
//! reads one from a chardev), and chardevd already runs sandboxed with no access to anything
//! but the descriptors vmm-core hands it.

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendListener, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};
use vmm_vring::dirty::DirtyLog;
use vmm_vring::{Memory, Vring};

const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Bytes a request gets at most (Firecracker's cap).
pub const MAX_REQUEST: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;

/// A token bucket: `rate` bytes a second, at most `burst` at once.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub rate: u64,
    pub burst: u64,
}

struct Bucket {
    limit: Limit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: Limit) -> Bucket {
        Bucket {
            limit,
            tokens: limit.burst as f64,
            at: Instant::now(),
        }
    }

    /// Whole bytes that may go now.
    fn available(&mut self) -> u64 {
        let now = Instant::now();
        let add = now.duration_since(self.at).as_secs_f64() * self.limit.rate as f64;
        self.tokens = (self.tokens + add).min(self.limit.burst as f64);
        self.at = now;
        self.tokens as u64
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }

    /// How long until a byte may go again.
    fn wait(&self) -> Duration {
        let short = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(short / self.limit.rate.max(1) as f64).max(Duration::from_millis(1))
    }
}

/// The log's kind (vmm_proto::record).
pub const LOG_KIND: &str = "rng";

/// Record/replay: each request's bytes go into the log, or come from it.
pub enum Log {
    None,
    Record(vmm_proto::record::Writer<File>),
    Replay(vmm_proto::record::Reader<File>),
}

/// What the queue's worker shares with the message handler.
struct Shared {
    name: String,
    source: Mutex<File>,
    /// The source is an EGD daemon's connection: asked for each piece.
    egd: bool,
    log: Mutex<Log>,
    /// Requests answered (by this chardevd), for the replay's messages.
    answered: std::sync::atomic::AtomicU64,
    /// A replay that diverged or ran out: no request is answered any more.
    stopped: AtomicBool,
    limit: Option<Limit>,
    dirty: Mutex<Option<DirtyLog>>,
    log_all: AtomicBool,
    /// The source ended (a file read to its end): said once.
    ended: AtomicBool,
}

/// Serves each connection to `listener` in turn (a frontend that reconnects, as vmm-core's
/// after a restart, gets a fresh device), until the listener fails.
pub fn serve(
    name: String,
    listener: UnixListener,
    source: File,
    egd: bool,
    limit: Option<Limit>,
    log: Log,
) {
    let replaying = matches!(log, Log::Replay(_));
    let shared = Arc::new(Shared {
        name,
        source: Mutex::new(source),
        egd,
        log: Mutex::new(log),
        answered: std::sync::atomic::AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        // A replay gives the recorded bytes as fast as they are asked for.
        limit: if replaying { None } else { limit },
        dirty: Mutex::new(None),
        log_all: AtomicBool::new(false),
        ended: AtomicBool::new(false),
    });
    let mut listener = vhost::vhost_user::Listener::from(listener);
    loop {
        let handler = match Handler::new(shared.clone()) {
            Ok(h) => Arc::new(Mutex::new(h)),
            Err(e) => {
                log::error!(
                    "{}: cannot start its worker ({e}); the rng stops",
                    shared.name
                );
                return;
            }
        };
        let accepted =
            BackendListener::new(&mut listener, handler.clone()).and_then(|mut l| loop {
                if let Some(r) = l.accept()? {
                    break Ok(r);
                }
            });
        let mut requests = match accepted {
            Ok(r) => r,
            Err(e) => {
                log::error!(
                    "{}: cannot accept a frontend ({e}); the rng stops",
                    shared.name
                );
                return;
            }
        };
        log::info!("{}: frontend connected", shared.name);
        let e = loop {
            if let Err(e) = requests.handle_request() {
                break e;
            }
        };
        drop(requests);
        handler.lock().unwrap().stop();
        match e {
            Error::Disconnected | Error::PartialMessage => {
                log::info!("{}: frontend disconnected", shared.name)
            }
            e => log::warn!("{}: frontend connection ended: {e}", shared.name),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(std::io::Error::other(e.to_string()))
}

/// A frontend virtual address range and where it lies in guest physical memory.
struct Mapping {
    va: u64,
    size: u64,
    gpa: u64,
}

struct Handler {
    shared: Arc<Shared>,
    vring: Vring,
    mem: Memory,
    mappings: Vec<Mapping>,
    acked_features: u64,
    /// The worker: told to look (a kick, a new kick fd) or to exit.
    wake: Arc<EventFd>,
    exit: Arc<EventFd>,
    /// A new kick descriptor for the worker (Some(None): none any more), taken by it.
    kick: Arc<Mutex<Option<Option<OwnedFd>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handler {
    fn new(shared: Arc<Shared>) -> std::io::Result<Handler> {
        let mem = Memory::new(GuestMemoryMmap::new());
        let vring = Vring::new(mem.clone(), QUEUE_SIZE).map_err(std::io::Error::other)?;
        let event = || EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map(Arc::new);
        let (wake, exit) = (event()?, event()?);
        let kick = Arc::new(Mutex::new(None));
        let worker = Worker {
            shared: shared.clone(),
            vring: vring.clone(),
            wake: wake.clone(),
            exit: exit.clone(),
            kick: kick.clone(),
            mem: mem.clone(),
            bucket: shared.limit.map(Bucket::new),
            buf: vec![0u8; MAX_REQUEST],
        };
        let thread = std::thread::Builder::new()
            .name("rng".into())
            .spawn(move || worker.run())?;
        Ok(Handler {
            shared,
            vring,
            mem,
            mappings: Vec::new(),
            acked_features: 0,
            wake,
            exit,
            kick,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn check(&self, index: u32) -> Result<()> {
        if index != 0 {
            return Err(failed(format!("queue {index}: virtio-rng has one queue")));
        }
        Ok(())
    }

    fn gpa(&self, va: u64, what: &str) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.va && va - m.va < m.size)
            .map(|m| va - m.va + m.gpa)
            .ok_or_else(|| failed(format!("the {what} at {va:#x} is in no memory region")))
    }

    /// The worker looks at the ring (started, enabled and kicked).
    fn poke(&self) {
        let _ = self.wake.write(1);
    }

    fn maybe_start(&mut self) {
        let start = {
            let s = self.vring.get_ref();
            !s.get_queue().ready() && s.kick_fd().is_some()
        };
        if start {
            self.vring.set_queue_ready(true);
        }
        self.poke();
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The queue's worker: waits for kicks (or for the token bucket), then answers every request
/// the ring holds.
struct Worker {
    shared: Arc<Shared>,
    vring: Vring,
    wake: Arc<EventFd>,
    exit: Arc<EventFd>,
    /// A new kick descriptor for the worker (Some(None): none any more), taken by it.
    kick: Arc<Mutex<Option<Option<OwnedFd>>>>,
    /// Guest memory as the frontend's table maps it (swapped whole by the handler).
    mem: Memory,
    bucket: Option<Bucket>,
    buf: Vec<u8>,
}

impl Worker {
    fn run(mut self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut timeout: Option<Duration> = None;
        let mut kick: Option<OwnedFd> = None;
        loop {
            if let Some(new) = self.kick.lock().unwrap().take() {
                kick = new;
            }
            let mut fds = vec![
                PollFd::new(self.exit.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(k) = &kick {
                fds.push(PollFd::new(k.as_fd(), PollFlags::POLLIN));
            }
            let wait = timeout.map_or(PollTimeout::NONE, |d| {
                PollTimeout::from(d.as_millis().clamp(1, 60_000) as u16)
            });
            match poll(&mut fds, wait) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    log::error!("{}: cannot wait for the guest ({e})", self.shared.name);
                    return;
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            if ready(&fds[0]) {
                return;
            }
            let _ = self.wake.read();
            drop(fds);
            if kick.is_some() {
                let _ = self.vring.read_kick();
            }
            timeout = self.answer();
        }
    }

    /// Answers what the ring holds; Some(wait): the bucket is empty, look again then.
    fn answer(&mut self) -> Option<Duration> {
        {
            let s = self.vring.get_ref();
            if !s.get_queue().ready() || !s.is_enabled() {
                return None;
            }
        }
        let mut answered = false;
        let mut wait = None;
        loop {
            let allowed = match &mut self.bucket {
                Some(b) => {
                    let n = b.available();
                    if n == 0 {
                        wait = Some(b.wait());
                        break;
                    }
                    n
                }
                None => u64::MAX,
            };
            let mem = self.mem.memory();
            let chain = self
                .vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let segments: Vec<(GuestAddress, usize)> = chain
                .clone()
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let room: usize = segments.iter().map(|s| s.1).sum::<usize>().min(MAX_REQUEST);
            let room = room.min(usize::try_from(allowed).unwrap_or(usize::MAX));
            let Some(n) = self.produce(room) else {
                // A replay that cannot go on: the request stays unanswered.
                break;
            };
            let mut len = 0usize;
            for (addr, cap) in segments {
                if len == n {
                    break;
                }
                let k = cap.min(n - len);
                if mem.write_slice(&self.buf[len..len + k], addr).is_err() {
                    log::warn!(
                        "{}: a buffer at {:#x} outside guest memory; the request gets what came before it",
                        self.shared.name,
                        addr.0
                    );
                    break;
                }
                self.mark(addr.0, k as u64);
                len += k;
            }
            let len = len as u32;
            self.shared.answered.fetch_add(1, Ordering::Relaxed);
            if let Some(b) = &mut self.bucket {
                b.take(u64::from(len));
            }
            if let Err(e) = self.vring.add_used(head, len) {
                log::warn!(
                    "{}: cannot return descriptor {head} ({e})",
                    self.shared.name
                );
                break;
            }
            answered = true;
        }
        if answered {
            let _ = self.vring.signal_used_queue();
        }
        wait
    }

    /// A request's bytes (at most `room`) into the buffer: from the source (recorded when
    /// recording), or the recording's next request when replaying. None: the replay stops.
    fn produce(&mut self, room: usize) -> Option<usize> {
        if self.shared.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let index = self.shared.answered.load(Ordering::Relaxed);
        let mut log = self.shared.log.lock().unwrap();
        let n = match &mut *log {
            Log::Replay(r) => {
                let why = match r.next_record() {
                    Ok(Some(rec)) if rec.len() <= room => {
                        self.buf[..rec.len()].copy_from_slice(&rec);
                        return Some(rec.len());
                    }
                    Ok(Some(rec)) => format!(
                        "request {index} has room for {room} bytes, and the recording gave it {}",
                        rec.len()
                    ),
                    Ok(None) => format!("the recording ends before request {index}"),
                    Err(e) => format!("request {index}: {e}"),
                };
                log::error!(
                    "{}: replay diverged: {why}; the rng answers no more requests",
                    self.shared.name
                );
                self.shared.stopped.store(true, Ordering::Relaxed);
                return None;
            }
            _ => {
                drop(log);
                let n = self.fill(room);
                log = self.shared.log.lock().unwrap();
                n
            }
        };
        if let Log::Record(w) = &mut *log {
            if let Err(e) = w.record(&self.buf[..n]) {
                log::error!("{}: cannot record request {index} ({e})", self.shared.name);
            }
        }
        Some(n)
    }

    /// Reads up to `n` bytes of entropy into the buffer.
    fn fill(&mut self, n: usize) -> usize {
        if self.shared.egd {
            return self.fill_egd(n);
        }
        let mut src = self.shared.source.lock().unwrap();
        let mut got = 0;
        while got < n {
            match src.read(&mut self.buf[got..n]) {
                Ok(0) => {
                    if !self.shared.ended.swap(true, Ordering::Relaxed) {
                        log::error!(
                            "{}: the entropy source ended; requests get what it gave",
                            self.shared.name
                        );
                    }
                    break;
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("{}: cannot read the entropy source ({e})", self.shared.name);
                    break;
                }
            }
        }
        got
    }

    /// `n` bytes from an EGD daemon: [0x02, k] asks for k bytes (at most 255), which it sends
    /// (QEMU's rng-egd asks the same way).
    fn fill_egd(&mut self, n: usize) -> usize {
        let mut src = self.shared.source.lock().unwrap();
        let mut got = 0;
        while got < n {
            let k = (n - got).min(255);
            let asked = src
                .write_all(&[0x02, k as u8])
                .and_then(|()| src.read_exact(&mut self.buf[got..got + k]));
            if let Err(e) = asked {
                if !self.shared.ended.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "{}: the entropy daemon does not answer ({e}); requests get what it gave",
                        self.shared.name
                    );
                }
                break;
            }
            got += k;
        }
        got
    }

    /// While a migration logs: the pages written.
    fn mark(&self, gpa: u64, len: u64) {
        if self.shared.log_all.load(Ordering::Acquire) {
            if let Some(log) = self.shared.dirty.lock().unwrap().as_ref() {
                log.mark(gpa, len);
            }
        }
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.vring.set_enabled(false);
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(VERSION_1 | PROTOCOL_FEATURES | LOG_ALL)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let offered = VERSION_1 | PROTOCOL_FEATURES | LOG_ALL;
        if features & !offered != 0 {
            return Err(failed(format!(
                "the frontend acked features {:#x} that chardevd's rng does not offer",
                features & !offered
            )));
        }
        self.acked_features = features;
        if features & PROTOCOL_FEATURES == 0 {
            self.vring.set_enabled(true);
        }
        let on = features & LOG_ALL != 0;
        if on != self.shared.log_all.swap(on, Ordering::AcqRel) {
            log::info!(
                "{}: dirty page logging {}",
                self.shared.name,
                if on { "on" } else { "off" }
            );
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening == Some(true) {
            return Err(Error::InvalidOperation(
                "chardevd's rng does not join post-copy",
            ));
        }
        let mut regions: Vec<GuestRegionMmap<()>> = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let map = r.mmap_region::<()>(file)?;
            let (gpa, size) = (r.guest_phys_addr, r.memory_size);
            regions.push(GuestRegionMmap::new(map, GuestAddress(gpa)).ok_or_else(|| {
                failed(format!(
                    "the memory region at {gpa:#x} (+{size:#x}) overflows"
                ))
            })?);
            mappings.push(Mapping {
                va: r.user_addr,
                size,
                gpa,
            });
        }
        regions.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mem = GuestMemoryMmap::from_regions(regions).map_err(failed)?;
        self.mem.lock().unwrap().replace(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.check(index)?;
        if num == 0 || num > u32::from(QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(failed(format!(
                "a queue size of {num}; it must be a power of two up to {QUEUE_SIZE}"
            )));
        }
        self.vring.set_queue_size(num as u16);
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
        self.check(index)?;
        let desc = self.gpa(descriptor, "descriptor table")?;
        let avail = self.gpa(available, "available ring")?;
        let used = self.gpa(used, "used ring")?;
        self.vring
            .set_queue_info(desc, avail, used)
            .map_err(|e| failed(format!("the queue: {e}")))?;
        let idx = self.vring.queue_used_idx().map_err(failed)?;
        self.vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.check(index)?;
        self.vring.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.check(index)?;
        // GET_VRING_BASE stops the ring: the worker takes no more requests. One it holds is
        // still answered (the frontend waits for the used index to reach this base).
        self.vring.set_queue_ready(false);
        let next = self.vring.queue_next_avail();
        *self.kick.lock().unwrap() = Some(None);
        self.vring.set_kick(None);
        self.vring.set_call(None);
        self.poke();
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.check(u32::from(index))?;
        let dup = fd
            .as_ref()
            .map(|f| f.as_fd().try_clone_to_owned())
            .transpose()
            .map_err(Error::ReqHandlerError)?;
        *self.kick.lock().unwrap() = Some(dup);
        self.vring.set_kick(fd);
        self.maybe_start();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.check(u32::from(index))?;
        self.vring.set_call(fd);
        self.maybe_start();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.check(u32::from(index))?;
        drop(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD)
    }

    fn set_protocol_features(&mut self, _features: u64) -> Result<()> {
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(1)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.check(index)?;
        if self.acked_features & PROTOCOL_FEATURES == 0 {
            return Err(Error::InvalidOperation(
                "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        self.vring.set_enabled(enable);
        self.poke();
        Ok(())
    }

    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        Err(Error::InvalidOperation(
            "virtio-rng has no configuration space",
        ))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("an rng is not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("an rng shares no objects"))
    }

    fn get_inflight_fd(&mut self, _msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        Err(Error::InvalidOperation("an rng keeps no inflight area"))
    }

    fn set_inflight_fd(&mut self, _msg: &VhostUserInflight, _file: File) -> Result<()> {
        Err(Error::InvalidOperation("an rng keeps no inflight area"))
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(Error::InvalidOperation("memory comes as one SET_MEM_TABLE"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        Err(Error::InvalidOperation("memory comes as one SET_MEM_TABLE"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(Error::InvalidOperation("memory comes as one SET_MEM_TABLE"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation(
            "an rng has no device state to transfer",
        ))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation(
            "an rng has no device state to transfer",
        ))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation(
            "an rng has no shared memory regions",
        ))
    }

    fn postcopy_advice(&mut self) -> Result<File> {
        Err(Error::InvalidOperation(
            "chardevd's rng does not join post-copy",
        ))
    }

    fn postcopy_listen(&mut self) -> Result<()> {
        Err(Error::InvalidOperation(
            "chardevd's rng does not join post-copy",
        ))
    }

    fn postcopy_end(&mut self) -> Result<()> {
        Ok(())
    }

    fn postcopy_ack_mem_regions(&mut self) -> Result<()> {
        Ok(())
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let area = DirtyLog::map(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| failed(format!("cannot map the dirty log ({e})")))?;
        *self.shared.dirty.lock().unwrap() = Some(area);
        Ok(())
    }
}
