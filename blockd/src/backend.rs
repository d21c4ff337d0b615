//! The vhost-user-blk device behind one frontend connection. Each queue's worker thread (see
//! `connection`) takes only its own vring's lock, so the queues run in parallel.

use crate::disk::{self, Disk};
use crate::engine::{self, Engine};
use crate::faults;
use crate::inflight::QueueLog;
use crate::request::{self, Chain};
use crate::throttle::{Admit, Member, Timer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};

pub use vmm_vring::Memory;
pub use vmm_vring::Vring;

/// One connection's device. Cloned into each worker thread; the clones share everything.
#[derive(Clone)]
pub struct Backend(Arc<Inner>);

/// A queue's requests that wait for the throttle, and its place in the disk's group.
#[derive(Default)]
struct Held {
    queue: VecDeque<(u16, request::Pending)>,
    member: Option<Member>,
    /// Requests a fault rule delays, with when they may go.
    delayed: Vec<(Instant, u16, request::Pending)>,
    /// Requests that failed while the error policy stops the export: retried at resume.
    failed: VecDeque<(u16, request::Pending)>,
    /// Replaying: requests matched to their records, waiting for the ones the recording
    /// answered before them on this queue (by head, with their chain).
    replay: Vec<(u16, Chain, crate::replay::Matched)>,
    /// Replaying: since when a request waits there for one that has not come.
    replay_waiting: Option<Instant>,
    /// Replaying: the place of the next answer on this queue.
    replay_next: u64,
}

/// A worker's queue while it answers requests.
struct Q<'a> {
    vring: &'a Vring,
    queue: usize,
    event_idx: bool,
    mem: &'a GuestMemoryMmap<()>,
}

impl<'a> Q<'a> {
    fn new(vring: &'a Vring, queue: usize, event_idx: bool, mem: &'a GuestMemoryMmap<()>) -> Self {
        Q {
            vring,
            queue,
            event_idx,
            mem,
        }
    }
}

/// What the fault rules made of a request.
enum Injected {
    Go(request::Pending),
    /// Delayed: it waits in the queue's delayed list.
    Held,
    Failed(request::Pending, i32),
}

// SAFETY: as for the engine: the held requests' iovecs point into the guest RAM mapping, which
// outlives them (they are dropped with the connection's backend), and a queue's held requests
// are only ever touched by that queue's worker thread (the mutex is uncontended).
unsafe impl Send for Held {}

pub struct Inner {
    /// The export's name (fault rules may name it).
    name: String,
    disk: Arc<Disk>,
    /// One io_uring engine per queue (None: synchronous I/O).
    engines: Vec<Mutex<Option<Engine>>>,
    mem: RwLock<Option<Memory>>,
    /// Bumped each time the frontend's memory table changes (see `process_queue`).
    mem_gen: AtomicU64,
    event_idx: AtomicBool,
    /// Per queue: its part of the frontend's inflight area (INFLIGHT_SHMFD), once the ring
    /// started with one.
    logs: Vec<Mutex<Option<QueueLog>>>,
    /// The frontend's dirty log (SET_LOG_BASE), and whether it acked VHOST_F_LOG_ALL.
    dirty: RwLock<Option<Arc<vmm_vring::dirty::DirtyLog>>>,
    log_all: AtomicBool,
    /// Per queue: the timer that wakes it when throttled requests may go.
    timers: Vec<Arc<Timer>>,
    /// Per queue: reads and writes held back by the throttle, in order.
    held: Vec<Mutex<Held>>,
    /// Rate limit for complaints about a guest's malformed requests.
    last_complaint: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Backend {
    pub fn new(name: &str, disk: Arc<Disk>) -> std::io::Result<Backend> {
        let engines = (0..disk.options.queues)
            .map(|q| {
                Mutex::new(match Engine::new(u32::from(disk.options.queue_size)) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        log::warn!("queue {q}: no io_uring ({e}); its I/O is synchronous");
                        None
                    }
                })
            })
            .collect();
        let timers = (0..disk.options.queues)
            .map(|_| Timer::new().map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        *disk.timers.lock().unwrap() = timers.clone();
        let held = (0..disk.options.queues)
            .map(|_| Mutex::new(Held::default()))
            .collect();
        let logs = (0..disk.options.queues).map(|_| Mutex::new(None)).collect();
        Ok(Backend(Arc::new(Inner {
            name: name.to_string(),
            dirty: RwLock::new(None),
            log_all: AtomicBool::new(false),
            engines,
            timers,
            held,
            disk,
            mem: RwLock::new(None),
            mem_gen: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            logs,
            last_complaint: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        })))
    }

    /// Queue `q`'s throttle timer, to register with its worker's epoll loop.
    pub fn timer_fd(&self, q: usize) -> std::os::fd::RawFd {
        self.0.timers[q].raw_fd()
    }

    /// Queue `q`'s engine's completion eventfd, to register with its worker's epoll loop.
    pub fn engine_fd(&self, q: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.0.engines[q]
            .lock()
            .unwrap()
            .as_ref()
            .map(|e| e.event.as_raw_fd())
    }

    /// Answers the guest for every transfer the engine completed.
    fn reap(&self, vring: &Vring, queue: usize) -> std::io::Result<()> {
        let Some(atomic) = self.0.mem.read().unwrap().clone() else {
            return Ok(());
        };
        // Completions are answered even while the disk pauses; a short one's rest is done
        // on the image, so the disk counts busy until then.
        let _busy = self.0.disk.busy_anyway();
        let mem = atomic.memory();
        let mut done = Vec::new();
        if let Some(e) = self.0.engines[queue].lock().unwrap().as_mut() {
            e.reap(&mut done);
        }
        if done.is_empty() {
            return Ok(());
        }
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        let q = Q {
            vring,
            queue,
            event_idx,
            mem: &mem,
        };
        let mut held = self.0.held[queue].lock().unwrap();
        for (head, pending, result) in done {
            let result = match result {
                Ok(n) if n < pending.io.len && n > 0 => {
                    engine::complete_short(&self.0.disk, &pending, n)
                }
                r => r,
            };
            if let Some((d, why)) = self.settle(&q, head, pending, result, &mut held.failed) {
                if let Some(why) = why {
                    self.complain(queue, &why);
                }
                self.put_used(vring, queue, head, d.used);
            }
        }
        drop(held);
        self.notify(vring, event_idx)
    }

    /// Tells the guest the used ring moved: an interrupt, unless under EVENT_IDX the driver's
    /// used_event says it does not want one yet. Both are counted.
    fn notify(&self, vring: &Vring, event_idx: bool) -> std::io::Result<()> {
        // The recording has every answer the guest may see now.
        if let Some(rec) = self.0.disk.recording.get() {
            rec.flush();
        }
        let wanted = !event_idx || vring.needs_notification().unwrap_or(true);
        let stats = &self.0.disk.stats;
        if wanted {
            stats.interrupts.fetch_add(1, Ordering::Relaxed);
            vring.signal_used_queue()?;
        } else {
            stats.interrupts_suppressed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Hands queue `q` its part of the inflight area (None: not tracked).
    pub fn set_log(&self, q: usize, log: Option<QueueLog>) {
        *self.0.logs[q].lock().unwrap() = log;
    }

    /// Before the guest is told a request is done, what its answer wrote into guest memory
    /// (the chain's device-writable buffers: read data, status bytes, GET_ID strings) is
    /// marked in the frontend's dirty log while a migration logs (from a walk of the chain
    /// again), and the request goes into the recording while one is made (from what it
    /// noted as the request came).
    fn log_answer(&self, vring: &Vring, queue: usize, head: u16, len: u32) {
        if self.0.log_all.load(Ordering::Acquire) {
            let dirty = self.0.dirty.read().unwrap().clone();
            if let (Some(log), Some((_, chain))) = (dirty, self.chain_at(vring, head)) {
                for s in &chain.writable {
                    log.mark(s.addr, s.len);
                }
            }
        }
        let Some(rec) = self.0.disk.recording.get().filter(|r| !r.replaying()) else {
            return;
        };
        let Some(mem) = self.0.mem.read().unwrap().as_ref().map(|m| m.memory()) else {
            return;
        };
        rec.record_answered(&mem, queue as u16, head, len, || {
            self.chain_at(vring, head).map(|(_, chain)| chain.pieces())
        });
    }

    /// The chain at `head`, walked again from the descriptor table (with guest memory).
    fn chain_at(
        &self,
        vring: &Vring,
        head: u16,
    ) -> Option<(vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap<()>>, Chain)> {
        let mem = self.0.mem.read().unwrap().as_ref().map(|m| m.memory())?;
        let (table, size) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (q.desc_table(), q.size())
        };
        let chain = Chain::at_head(&*mem, GuestAddress(table), size, head).ok()?;
        Some((mem, chain))
    }

    /// The chain at `head`, read again from the descriptor table in `mem`. A chain that is
    /// not there is answered at once (with no status byte to write) and None is returned.
    fn chain_again(
        &self,
        vring: &Vring,
        queue: usize,
        mem: &GuestMemoryMmap<()>,
        head: u16,
    ) -> Option<Chain> {
        let (table, size) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (q.desc_table(), q.size())
        };
        match Chain::at_head(mem, GuestAddress(table), size, head) {
            Ok(c) => Some(c),
            Err(e) => {
                self.complain(queue, &format!("descriptor {head}: {e}"));
                self.put_used(vring, queue, head, 0);
                None
            }
        }
    }

    /// The frontend's dirty log (SET_LOG_BASE); it is written while VHOST_F_LOG_ALL is acked.
    pub fn set_dirty_log(&self, log: vmm_vring::dirty::DirtyLog) {
        *self.0.dirty.write().unwrap() = Some(Arc::new(log));
    }

    /// VHOST_F_LOG_ALL acked (a migration logs) or not (it ended, or was cancelled).
    pub fn set_log_all(&self, on: bool) {
        if on != self.0.log_all.swap(on, Ordering::AcqRel) {
            log::info!(
                "{}: dirty page logging {}",
                self.0.name,
                if on { "on" } else { "off" }
            );
        }
    }

    /// Returns a descriptor to the guest, with the inflight area kept in step: the head is
    /// named before the used index moves and cleared after, so that a crash in between is
    /// repaired at the next start.
    fn put_used(&self, vring: &Vring, queue: usize, head: u16, len: u32) {
        let log = self.0.logs[queue].lock().unwrap();
        if let Some(l) = log.as_ref() {
            l.answering(head);
        }
        self.log_answer(vring, queue, head, len);
        if let Err(e) = vring.add_used(head, len) {
            self.complain(queue, &format!("cannot return descriptor {head} ({e})"));
            return;
        }
        if let Some(l) = log.as_ref() {
            l.answered(head, vring.get_ref().get_queue().next_used());
        }
    }

    /// The next request: first what a previous blockd left in flight, then the available
    /// ring. Each is marked in flight as it is taken.
    fn next_request(
        &self,
        vring: &Vring,
        queue: usize,
        mem: &GuestMemoryMmap<()>,
    ) -> Option<(u16, Chain)> {
        let mut log = self.0.logs[queue].lock().unwrap();
        loop {
            let resubmit = log.as_mut().and_then(|l| l.take_resubmit());
            let next = match resubmit {
                Some(head) => {
                    let (table, size) = {
                        let state = vring.get_ref();
                        let q = state.get_queue();
                        (q.desc_table(), q.size())
                    };
                    match Chain::at_head(mem, GuestAddress(table), size, head) {
                        Ok(chain) => Some((head, chain)),
                        Err(e) => {
                            // The guest rewrote a descriptor it had not got back: nothing to
                            // resubmit, and no status byte to answer on.
                            self.complain(queue, &format!("cannot resubmit: {e}"));
                            drop(log);
                            self.put_used(vring, queue, head, 0);
                            log = self.0.logs[queue].lock().unwrap();
                            continue;
                        }
                    }
                }
                None => {
                    let mut state = vring.get_mut();
                    match state.get_queue_mut().iter(mem) {
                        Ok(mut it) => it.next().map(|chain| {
                            let head = chain.head_index();
                            (head, Chain::from_descriptors(chain))
                        }),
                        Err(e) => {
                            self.complain(queue, &format!("the available ring is corrupt ({e})"));
                            None
                        }
                    }
                }
            };
            if let (Some((head, _)), Some(l)) = (&next, log.as_mut()) {
                l.begin(*head);
            }
            return next;
        }
    }

    /// The queue was kicked (or woken): take its requests.
    pub fn on_kick(&self, vring: &Vring, q: usize) {
        {
            // A stopped or disabled ring is not looked at (a timer may fire after the stop).
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                return;
            }
        }
        // A snapshot or commit swaps the image: requests wait on the ring meanwhile.
        let Some(_busy) = self.0.disk.enter() else {
            return;
        };
        // Errors here would end the worker for good; a guest's bad queue only gets logged.
        if let Err(e) = self.process_queue(vring, q) {
            log::warn!("queue {q}: cannot signal the guest: {e}");
        }
    }

    /// Takes the request at `head` into the replay: matched to its record, it is answered
    /// once every request its queue's recording answered before it is (so the guest sees
    /// completions in the recorded order), after the delay a fault rule had injected. False:
    /// it differs from the recording, and the export stopped saying how.
    fn replay_one(
        &self,
        q: &Q,
        rec: &crate::replay::Recording,
        head: u16,
        chain: Chain,
        held: &mut Held,
    ) -> std::io::Result<bool> {
        let (readable, writable) = chain.pieces();
        let segs = crate::replay::Segments {
            readable: &readable,
            writable: &writable,
        };
        match rec.matched(q.mem, q.queue as u16, &segs) {
            Ok(m) => held.replay.push((head, chain, m)),
            Err(why) => return Ok(self.diverged(why)),
        }
        let mut answered = false;
        while let Some(at) = held
            .replay
            .iter()
            .position(|(_, _, m)| m.ord == held.replay_next)
        {
            let (head, chain, m) = held.replay.swap_remove(at);
            held.replay_next += 1;
            held.replay_waiting = None;
            match self.replay_answer(q, rec, chain, m) {
                Ok((used, delay_ms)) => {
                    if delay_ms > 0 {
                        std::thread::sleep(Duration::from_millis(delay_ms.into()));
                    }
                    self.put_used(q.vring, q.queue, head, used);
                    answered = true;
                }
                Err(why) => return Ok(self.diverged(why)),
            }
        }
        if answered {
            self.notify(q.vring, q.event_idx)?;
        }
        if !held.replay.is_empty() {
            held.replay_waiting.get_or_insert_with(Instant::now);
        }
        Ok(true)
    }

    /// Replaying, requests that wait for one the recording answered before them on this
    /// queue: after 30 s without it, the guest diverged (it sends something else, or
    /// nothing); until then the queue's timer comes back to look. False: it diverged.
    fn replay_waits(&self, q: &Q, held: &Held) -> bool {
        const WAIT: Duration = Duration::from_secs(30);
        let Some(since) = held.replay_waiting.filter(|_| !held.replay.is_empty()) else {
            return true;
        };
        let waited = since.elapsed();
        if waited < WAIT {
            self.0.timers[q.queue].arm(WAIT - waited);
            return true;
        }
        !self.diverged(crate::replay::Diverged::new(format!(
            "queue {}: {} request(s) wait for the one the recording answered before them on this queue (its answer {} from where the replay began), which the guest has not sent in {} s",
            q.queue,
            held.replay.len(),
            held.replay_next,
            WAIT.as_secs()
        )))
    }

    /// Answers a matched request from the recording (a write done on the working copy, a
    /// read's bytes from it or the log).
    fn replay_answer(
        &self,
        q: &Q,
        rec: &crate::replay::Recording,
        chain: Chain,
        m: crate::replay::Matched,
    ) -> Result<(u32, u32), crate::replay::Diverged> {
        let (readable, writable) = chain.pieces();
        let segs = crate::replay::Segments {
            readable: &readable,
            writable: &writable,
        };
        let disk = &self.0.disk;
        let apply = || match request::prepare(disk, q.mem, chain) {
            request::Prepared::Io(p) => p.io.run(disk).map(|_| ()).map_err(|e| e.to_string()),
            request::Prepared::Done(d, _) if d.status == 0 => Ok(()),
            request::Prepared::Done(d, why) => Err(why.unwrap_or(format!("status {}", d.status))),
        };
        let read = |offset, buf: &mut [u8]| {
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            disk.rw(&mut iov, offset, false)
        };
        rec.complete(m, read, q.mem, q.queue as u16, &segs, apply)
    }

    /// The replay diverged: the export stops, saying why. (Always false: the queue stops.)
    fn diverged(&self, why: crate::replay::Diverged) -> bool {
        self.0
            .disk
            .stop(&self.0.name, format!("replay diverged at {why}"));
        false
    }

    /// The queue's throttle timer fired: held requests may go now.
    pub fn on_timer(&self, vring: &Vring, q: usize) {
        self.0.timers[q].clear();
        self.on_kick(vring, q);
    }

    /// The queue's io_uring completed transfers.
    pub fn on_engine(&self, vring: &Vring, q: usize) {
        if let Err(e) = self.reap(vring, q) {
            log::warn!("queue {q}: cannot signal the guest: {e}");
        }
    }

    fn complain(&self, queue: usize, why: &str) {
        let mut last = self.0.last_complaint.lock().unwrap();
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.0.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let more = self.0.suppressed.swap(0, Ordering::Relaxed);
        let more = if more > 0 {
            format!(" ({more} more since the last report)")
        } else {
            String::new()
        };
        log::warn!("queue {queue}: the guest's request failed: {why}{more}");
    }

    fn process_queue(&self, vring: &Vring, queue: usize) -> std::io::Result<()> {
        let Some(atomic) = self.0.mem.read().unwrap().clone() else {
            return Ok(());
        };
        let mut gen = self.0.mem_gen.load(Ordering::SeqCst);
        let mut mem = atomic.memory();
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        let has_engine = self.0.engines[queue].lock().unwrap().is_some();
        // Reads and writes for the engine, submitted together once the queue is drained.
        let mut batch: Vec<(u16, request::Pending)> = Vec::new();
        // The throttle: this queue's membership follows the disk's group.
        let group = self.0.disk.throttle.lock().unwrap().clone();
        let throttled = group.is_some();
        let timer = &self.0.timers[queue];
        // Whether the throttle lets `p` go now (and counts it); if not, the timer is armed
        // for when it may, or the group wakes this queue for its turn.
        let admitted = |held: &Held, p: &request::Pending| match &held.member {
            // Flushes carry no data and are not throttled (as in QEMU).
            _ if p.io.flush => true,
            None => true,
            Some(m) => match m.admit(p.io.write, p.io.len) {
                Admit::Go => true,
                Admit::Wait(Some(d)) => {
                    timer.arm(d);
                    false
                }
                Admit::Wait(None) => false,
            },
        };
        let mut held = self.0.held[queue].lock().unwrap();
        match (&held.member, group) {
            (Some(m), Some(g)) if Arc::ptr_eq(&m.group, &g) => {}
            (_, Some(g)) => held.member = Some(g.join(self.0.timers[queue].clone())),
            (_, None) => held.member = None,
        }
        // Stopped by the error policy: nothing moves until `resume`.
        if self.0.disk.stopped.lock().unwrap().is_some() {
            return Ok(());
        }
        // Resumed: what failed is retried first, in order, through the fault rules again.
        self.retry_failed(&Q::new(vring, queue, event_idx, &mem), &mut held)?;
        let mut rounds = 0u32;
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let (round, mut took) = (rounds, false);
            rounds += 1;
            loop {
                // Pop one chain at a time, so that the vring lock is not held during I/O
                // (the frontend's control path may need it).
                let next = self.next_request(vring, queue, &mem);
                let Some((head, mut chain)) = next else { break };
                took = true;
                if self.0.mem_gen.load(Ordering::SeqCst) != gen {
                    // The frontend changed the memory table since `mem` was taken, and it may
                    // have put this request in the new part (it does once we acked the
                    // change): read the chain again, with the memory as it is now.
                    gen = self.0.mem_gen.load(Ordering::SeqCst);
                    mem = atomic.memory();
                    let Some(c) = self.chain_again(vring, queue, &mem, head) else {
                        continue;
                    };
                    chain = c;
                }
                let q = Q::new(vring, queue, event_idx, &mem);
                if let Some(rec) = self.0.disk.recording.get() {
                    if rec.replaying() {
                        if self.replay_one(&q, rec, head, chain, &mut held)? {
                            continue;
                        }
                        return Ok(());
                    }
                    rec.submitted(&mem, queue as u16, head, &chain);
                }
                let (done, why) = match request::prepare(&self.0.disk, &*mem, chain) {
                    request::Prepared::Done(d, why) => (d, why),
                    request::Prepared::Io(p) => {
                        if let Some(rec) = self.0.disk.recording.get() {
                            if !p.io.flush {
                                rec.begins(queue as u16, head, p.io.write, p.io.offset, p.io.len);
                            }
                        }
                        let p = match self.inject(q.queue, head, p, &mut held.delayed) {
                            Injected::Go(p) => p,
                            Injected::Held => continue,
                            Injected::Failed(p, errno) => {
                                let e = std::io::Error::from_raw_os_error(errno);
                                self.complete(&q, head, p, Err(e), &mut held.failed)?;
                                continue;
                            }
                        };
                        if !held.queue.is_empty() || (throttled && !admitted(&held, &p)) {
                            held.queue.push_back((head, p));
                            continue;
                        }
                        if has_engine && self.for_engine(&p) {
                            batch.push((head, p));
                            continue;
                        }
                        let r = p.io.run(&self.0.disk);
                        self.complete(&q, head, p, r, &mut held.failed)?;
                        continue;
                    }
                };
                self.answer(vring, queue, head, done, why, event_idx)?;
            }
            if !event_idx {
                break;
            }
            // A round run because the ring said it had more took none: its index is corrupt or
            // hostile. Stop rather than spin (fuzz/vhost_user found it); a kick looks again.
            if round > 0 && !took {
                let _ = vring.enable_notification();
                break;
            }
            // Re-enable notifications; if the driver added buffers meanwhile, go again.
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        let q = Q::new(vring, queue, event_idx, &mem);
        if self.0.disk.recording.get().is_some_and(|r| r.replaying())
            && !self.replay_waits(&q, &held)
        {
            return Ok(());
        }
        // Delayed requests whose time has come join the held ones.
        release_delayed(&mut held, timer);
        // Held requests go, in order, as far as the throttle lets them.
        while let Some((_, p)) = held.queue.front() {
            if !admitted(&held, p) {
                break;
            }
            let (head, p) = held.queue.pop_front().expect("checked");
            if has_engine && self.for_engine(&p) {
                batch.push((head, p));
            } else {
                let r = p.io.run(&self.0.disk);
                self.complete(&q, head, p, r, &mut held.failed)?;
            }
        }
        drop(held);
        if self.submit(&q, batch)? {
            // Completions that are there already are answered at once.
            self.reap(vring, queue)?;
        }
        Ok(())
    }

    /// Hands the batch to the queue's engine. False if there was none to reap: a lone
    /// request on an idle engine was done here instead.
    fn submit(&self, q: &Q, mut batch: Vec<(u16, request::Pending)>) -> std::io::Result<bool> {
        let mut eng = self.0.engines[q.queue].lock().unwrap();
        let Some(e) = eng.as_mut() else {
            return Ok(true);
        };
        if batch.len() == 1 && e.idle() {
            // A lone request (queue depth 1): doing it here saves two wake-ups per request,
            // the ring's submission and its completion eventfd.
            drop(eng);
            let (head, p) = batch.pop().unwrap();
            let r = p.io.run(&self.0.disk);
            let mut held = self.0.held[q.queue].lock().unwrap();
            self.complete(q, head, p, r, &mut held.failed)?;
            return Ok(false);
        }
        for (head, p) in batch {
            if let Err((head, p)) = e.push(&self.0.disk, head, p) {
                let r = p.io.run(&self.0.disk);
                let mut held = self.0.held[q.queue].lock().unwrap();
                self.complete(q, head, p, r, &mut held.failed)?;
            }
        }
        e.submit()?;
        Ok(true)
    }

    /// After a `resume`: the requests that failed while the export was stopped go first, in
    /// order, through the fault rules again.
    fn retry_failed(&self, q: &Q, held: &mut Held) -> std::io::Result<()> {
        if held.failed.is_empty() {
            return Ok(());
        }
        let failed: Vec<_> = held.failed.drain(..).collect();
        self.0
            .disk
            .held_failed
            .fetch_sub(failed.len() as u32, Ordering::AcqRel);
        let mut retry = Vec::new();
        for (head, p) in failed {
            match self.inject(q.queue, head, p, &mut held.delayed) {
                Injected::Go(p) => retry.push((head, p)),
                Injected::Held => {}
                Injected::Failed(p, errno) => {
                    let e = std::io::Error::from_raw_os_error(errno);
                    self.complete(q, head, p, Err(e), &mut held.failed)?;
                }
            }
        }
        for r in retry.into_iter().rev() {
            held.queue.push_front(r);
        }
        Ok(())
    }

    /// Applies the fault rules to a request about to be done.
    fn inject(
        &self,
        queue: usize,
        head: u16,
        p: request::Pending,
        delayed: &mut Vec<(Instant, u16, request::Pending)>,
    ) -> Injected {
        let op = if p.io.flush {
            faults::Op::Flush
        } else if p.io.write {
            faults::Op::Write
        } else {
            faults::Op::Read
        };
        match faults::check(&self.0.name, op, p.io.offset, p.io.len) {
            None => Injected::Go(p),
            Some((_, faults::Action::Errno(e))) => Injected::Failed(p, e),
            Some((_, faults::Action::DelayMs(ms))) => {
                if let Some(rec) = self.0.disk.recording.get() {
                    rec.delayed(queue as u16, head, ms);
                }
                delayed.push((Instant::now() + Duration::from_millis(ms.into()), head, p));
                Injected::Held
            }
            Some((id, faults::Action::Exit)) => {
                log::error!(
                    "export {}: fault rule {id}: blockd exits at this {op:?}, as asked",
                    self.0.name
                );
                // SAFETY: _exit ends the process at once, without unwinding or flushing:
                // a crash at a chosen moment, which is what the rule asks for.
                unsafe { libc::_exit(70) }
            }
        }
    }

    /// Whether the engine can take `p` (a plain read or write).
    fn for_engine(&self, p: &request::Pending) -> bool {
        !p.io.flush && self.0.disk.plain_io(&p.io.iovs, p.io.offset)
    }

    /// Applies the error policy to a finished transfer: None when the export stops and holds
    /// the request (in `failed`), else the answer for the guest.
    fn settle(
        &self,
        q: &Q,
        head: u16,
        p: request::Pending,
        result: std::io::Result<u64>,
        failed: &mut VecDeque<(u16, request::Pending)>,
    ) -> Option<(request::Done, request::Why)> {
        let result = match result {
            Err(e) => {
                let disk = &self.0.disk;
                let policy = if p.io.write || p.io.flush {
                    disk.options.write_error
                } else {
                    disk.options.read_error
                };
                let what = if p.io.flush {
                    "a flush".to_string()
                } else {
                    format!(
                        "a {} of {} bytes at byte {}",
                        if p.io.write { "write" } else { "read" },
                        p.io.len,
                        p.io.offset
                    )
                };
                if policy.stops_on(&e) {
                    disk.stop(&self.0.name, format!("{what} failed: {e}"));
                    disk.held_failed.fetch_add(1, Ordering::AcqRel);
                    failed.push_back((head, p));
                    return None;
                }
                if policy == crate::disk::Policy::Ignore {
                    self.complain(
                        q.queue,
                        &format!("{what} failed: {e}; ignored, as the error policy says"),
                    );
                    Ok(p.io.len)
                } else {
                    Err(e)
                }
            }
            ok => ok,
        };
        Some(p.finish(&self.0.disk, q.mem, result))
    }

    /// Answers the guest for a finished transfer, unless the error policy holds it.
    fn complete(
        &self,
        q: &Q,
        head: u16,
        p: request::Pending,
        result: std::io::Result<u64>,
        failed: &mut VecDeque<(u16, request::Pending)>,
    ) -> std::io::Result<()> {
        match self.settle(q, head, p, result, failed) {
            Some((done, why)) => self.answer(q.vring, q.queue, head, done, why, q.event_idx),
            None => Ok(()),
        }
    }

    fn answer(
        &self,
        vring: &Vring,
        queue: usize,
        head: u16,
        done: request::Done,
        why: request::Why,
        event_idx: bool,
    ) -> std::io::Result<()> {
        if let Some(why) = why {
            self.complain(queue, &why);
        }
        self.put_used(vring, queue, head, done.used);
        self.notify(vring, event_idx)
    }
}

/// What the protocol handler (`connection`) asks of the device.
impl Backend {
    pub fn num_queues(&self) -> usize {
        usize::from(self.0.disk.options.queues)
    }

    pub fn max_queue_size(&self) -> usize {
        usize::from(self.0.disk.options.queue_size)
    }

    /// The virtio features (without vhost-user's protocol bit).
    pub fn features(&self) -> u64 {
        self.0.disk.features()
    }

    pub fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    pub fn acked_features(&self, features: u64) {
        // Without VIRTIO_BLK_F_CONFIG_WCE acked, the cache mode is whatever blockd was told.
        if features & disk::F_CONFIG_WCE == 0 {
            self.0.disk.set_writeback(true);
        }
    }

    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.0.disk.config();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        c[start..end].to_vec()
    }

    pub fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == disk::CONFIG_WRITEBACK && buf.len() == 1 {
            self.0.disk.set_writeback(buf[0] != 0);
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "only the writeback byte (offset {}) of the config space is writable",
                disk::CONFIG_WRITEBACK
            ),
        ))
    }

    pub fn update_memory(&self, mem: Memory) {
        *self.0.mem.write().unwrap() = Some(mem);
        self.0.mem_gen.fetch_add(1, Ordering::SeqCst);
    }
}

/// Delayed requests whose time has come join the held ones; the timer is armed for the next.
fn release_delayed(held: &mut Held, timer: &crate::throttle::Timer) {
    if held.delayed.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut i = 0;
    while i < held.delayed.len() {
        if held.delayed[i].0 <= now {
            let (_, head, p) = held.delayed.swap_remove(i);
            held.queue.push_back((head, p));
        } else {
            i += 1;
        }
    }
    if let Some(next) = held.delayed.iter().map(|d| d.0).min() {
        timer.arm(next.saturating_duration_since(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryAtomic};

    /// An available index that says more than the ring holds (0x8000 ahead of a 16-entry
    /// ring), with EVENT_IDX: each look at the ring says there is more, and none can be taken.
    /// The worker stops after a round that takes nothing instead of spinning for ever (a
    /// guest or frontend could hang a queue and its worker's shutdown so: fuzz/vhost_user).
    #[test]
    fn an_available_index_past_the_ring_is_not_spun_on() {
        let backend = Backend::new("t", Arc::new(Disk::in_memory())).unwrap();
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mem = GuestMemoryAtomic::new(ram.clone());
        backend.update_memory(mem.clone());
        backend.set_event_idx(true);
        let vring = Arc::new(Vring::new(mem, 16).unwrap());
        vring.set_queue_size(16);
        vring.set_queue_info(0, 0x100, 0x200).unwrap();
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        ram.write_obj(0x8000u16, GuestAddress(0x102)).unwrap();
        let (done, worker) = std::sync::mpsc::channel();
        let v = vring.clone();
        std::thread::spawn(move || {
            backend.on_kick(&v, 0);
            let _ = done.send(());
        });
        assert!(
            worker.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the worker still spins on the ring after 20 s"
        );
    }
}
