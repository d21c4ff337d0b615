//! The control API (proto/schema/blockd.capnp): named exports, added and removed at run time.

use crate::disk::{self, Disk};
use crate::exports::{self, Export};
use crate::image::Format;
use crate::throttle;
use capnp::capability::Rc as CapRc;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vhost::vhost_user::Listener;
use vmm_proto::blockd_capnp::blockd;
use vmm_proto::rpc::SideChannelError;

/// The exports, shared by every control connection.
pub type Exports = Rc<RefCell<BTreeMap<String, Export>>>;

pub struct Server {
    exports: Exports,
    /// The exports this connection added: they end with it (the client that added them is
    /// gone), so that a restarted vmm-core adds them again.
    mine: RefCell<Vec<String>>,
    /// The connection's side channel (descriptors for `add`).
    side: Option<OwnedFd>,
    queue_size: u16,
}

impl Server {
    /// Export `name`'s disk, or the error that names the export and where to look.
    fn disk(&self, name: &str) -> Result<Arc<Disk>, capnp::Error> {
        self.exports
            .borrow()
            .get(name)
            .map(|x| x.disk.clone())
            .ok_or_else(|| failed(format!("no export {name:?} (list shows what there is)")))
    }

    pub fn new(exports: Exports, side: Option<OwnedFd>, queue_size: u16) -> Server {
        Server {
            exports,
            mine: RefCell::new(Vec::new()),
            side,
            queue_size,
        }
    }
}

fn failed(msg: String) -> capnp::Error {
    capnp::Error::failed(msg)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Waits (up to 5 s) for the side channel's message for export `name`: its image and socket.
/// The image, the listening socket, (with `log`) the record/replay log, and the backing
/// chain's files.
type Fds = (File, OwnedFd, Option<File>, Vec<File>);

fn take_fds(
    side: &OwnedFd,
    name: &str,
    log: bool,
    backing: usize,
) -> Result<Fds, SideChannelError> {
    let mut buf = [0u8; 128];
    let (n, mut fds) = vmm_proto::rpc::side_message(side.as_fd(), &mut buf, 5)?;
    let want = if log { 3 } else { 2 } + backing;
    if &buf[..n] != name.as_bytes() || fds.len() != want {
        return Err(SideChannelError::Wrong(
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            fds.len(),
            if log {
                "the export's name with the image, the listening socket and the log"
            } else {
                "the export's name with the image and the listening socket"
            },
        ));
    }
    let chain: Vec<File> = fds
        .split_off(fds.len() - backing)
        .into_iter()
        .map(File::from)
        .collect();
    let log = log.then(|| File::from(fds.pop().expect("three")));
    let listener = fds.pop().expect("two");
    let image = File::from(fds.pop().expect("two"));
    Ok((image, listener, log, chain))
}

/// Runs `f` on a thread of its own (it may wait for a disk to quiesce, or copy for long),
/// so that the control connection keeps answering meanwhile.
async fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, capnp::Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("blockd-job".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| failed(format!("cannot start a thread ({e})")))?;
    rx.await
        .map_err(|_| failed("the job's thread ended without an answer".into()))
}

impl Server {
    /// One descriptor the side channel brings, under the message `what`.
    fn one_fd(&self, what: &str) -> Result<File, capnp::Error> {
        let side = self
            .side
            .as_ref()
            .ok_or_else(|| failed(format!("{what}: this connection has no side channel")))?;
        let mut buf = [0u8; 160];
        let (n, mut fds) = vmm_proto::rpc::side_message(side.as_fd(), &mut buf, 5)
            .map_err(|e| failed(format!("{what}: {e}")))?;
        if &buf[..n] != what.as_bytes() || fds.len() != 1 {
            return Err(failed(format!(
                "{what}: the side channel brought {:?} with {} descriptor(s), not that with one",
                String::from_utf8_lossy(&buf[..n]),
                fds.len()
            )));
        }
        Ok(File::from(fds.pop().expect("one")))
    }
}

impl blockd::Server for Server {
    async fn mark(
        self: CapRc<Self>,
        params: blockd::MarkParams,
        mut results: blockd::MarkResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_string()?;
        let disk = self.disk(&name)?;
        let rec = disk
            .recording
            .get()
            .ok_or_else(|| failed(format!("mark: export {name} is not recorded (no --record)")))?;
        disk.flush()
            .map_err(|e| failed(format!("mark: export {name}: cannot flush its image ({e})")))?;
        let at = rec
            .mark()
            .map_err(|e| failed(format!("mark: export {name}: {e}")))?;
        log::info!("export {name}: marked at byte {at} of its log (a snapshot)");
        results.get().set_log_bytes(at);
        Ok(())
    }

    async fn resize(
        self: CapRc<Self>,
        params: blockd::ResizeParams,
        mut results: blockd::ResizeResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let bytes = p.get_bytes();
        let old = self
            .disk(&name)?
            .resize(bytes, p.get_force())
            .map_err(|e| failed(format!("resize {name} to {bytes} bytes: {e}")))?;
        log::info!("export {name}: resized from {old} to {bytes} bytes");
        results.get().set_old(old);
        Ok(())
    }

    async fn snapshot(
        self: CapRc<Self>,
        params: blockd::SnapshotParams,
        _: blockd::SnapshotResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let overlay = p.get_overlay()?.to_string()?;
        let backing = p.get_backing_name()?.to_string()?;
        let disk = self.disk(&name)?;
        let file = self.one_fd(&format!("snapshot:{name}"))?;
        let d = disk.clone();
        let r = on_thread(move || crate::commit::snapshot(&d, file, &backing)).await?;
        let held = r.map_err(|e| failed(format!("snapshot {name}: {e}")))?;
        log::info!(
            "export {name}: live snapshot: its writes go to {overlay} now (requests held {:.1} ms)",
            held.as_secs_f64() * 1e3
        );
        *disk.shown.lock().unwrap() = Some(overlay);
        Ok(())
    }

    async fn commit(
        self: CapRc<Self>,
        params: blockd::CommitParams,
        mut results: blockd::CommitResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let base = p.get_base()?.to_string()?;
        let disk = self.disk(&name)?;
        let file = self.one_fd(&format!("commit:{name}"))?;
        let d = disk.clone();
        log::info!("export {name}: commit into {base} starts");
        let r = on_thread(move || crate::commit::commit(&d, file)).await?;
        let (bytes, held) = r.map_err(|e| failed(format!("commit {name}: {e}")))?;
        log::info!(
            "export {name}: committed ({bytes} bytes copied; requests held {:.1} ms for the last pass); its top is {base} now",
            held.as_secs_f64() * 1e3
        );
        *disk.shown.lock().unwrap() = Some(base);
        results.get().set_bytes(bytes);
        Ok(())
    }

    async fn userfaultfd_device(
        self: CapRc<Self>,
        _: blockd::UserfaultfdDeviceParams,
        _: blockd::UserfaultfdDeviceResults,
    ) -> Result<(), capnp::Error> {
        let side = self.side.as_ref().ok_or_else(|| {
            failed("userfaultfdDevice: this connection has no side channel".into())
        })?;
        let mut buf = [0u8; 32];
        let (n, mut fds) = vmm_proto::rpc::side_message(side.as_fd(), &mut buf, 5)
            .map_err(|e| failed(format!("userfaultfdDevice: {e}")))?;
        if &buf[..n] != b"userfaultfd" || fds.len() != 1 {
            return Err(failed(format!(
                "userfaultfdDevice: the side channel brought {:?} with {} descriptor(s), not \"userfaultfd\" with /dev/userfaultfd's",
                String::from_utf8_lossy(&buf[..n]),
                fds.len()
            )));
        }
        let dev = vmm_sandbox::uffd::Device::from_fd(fds.pop().expect("one"));
        *crate::connection::UFFD_DEVICE.lock().unwrap() = Some(dev);
        Ok(())
    }

    async fn add(
        self: CapRc<Self>,
        params: blockd::AddParams,
        mut results: blockd::AddResults,
    ) -> Result<(), capnp::Error> {
        let e = params.get()?.get_export()?;
        let name = e.get_name()?.to_str()?.to_string();
        if !valid_name(&name) {
            return Err(failed(format!(
                "export name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        if self.exports.borrow().contains_key(&name) {
            return Err(failed(format!(
                "export {name} exists already; remove it first or pick another name"
            )));
        }
        let format: Format = match e.get_format()?.to_str()? {
            "" => Format::Raw,
            f => f
                .parse()
                .map_err(|m| failed(format!("export {name}: format {m}")))?,
        };
        let queues = e.get_queues().max(1);
        if queues > 64 {
            return Err(failed(format!(
                "export {name}: {queues} queues; at most 64"
            )));
        }
        let serial = e.get_serial()?.to_str()?.to_string();
        if serial.len() > crate::request::ID_BYTES {
            return Err(failed(format!(
                "export {name}: serial {serial:?} is longer than 20 bytes"
            )));
        }
        let image = e.get_image()?.to_str()?.to_string();
        let socket = e.get_socket()?.to_str()?.to_string();
        let readonly = e.get_readonly();
        use vmm_proto::blockd_capnp::DiskLog;
        let log_mode = e.get_log()?;
        let mut backing_formats = Vec::new();
        for f in e.get_backing()?.iter() {
            let f = f?.to_str()?;
            backing_formats.push(
                f.parse::<Format>()
                    .map_err(|m| failed(format!("export {name}: a backing file's format {m}")))?,
            );
        }
        let (file, listener, log, chain) = if e.get_fds_on_side_channel() {
            let side = self.side.as_ref().ok_or_else(|| {
                failed(format!(
                    "export {name}: fdsOnSideChannel, but this connection has no side channel"
                ))
            })?;
            let (file, l, log, chain) = take_fds(
                side,
                &name,
                log_mode != DiskLog::None,
                backing_formats.len(),
            )
            .map_err(|m| failed(format!("export {name}: {m}")))?;
            let listener = Listener::from(std::os::unix::net::UnixListener::from(l));
            (file, listener, log, chain)
        } else {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!readonly)
                .open(&image)
                .map_err(|err| failed(format!("export {name}: cannot open {image} ({err})")))?;
            if socket.is_empty() {
                return Err(failed(format!(
                    "export {name}: give the socket path to listen on"
                )));
            }
            let listener = crate::bind_listener(std::path::Path::new(&socket)).map_err(|err| {
                failed(format!("export {name}: cannot listen on {socket} ({err})"))
            })?;
            if log_mode != DiskLog::None || !backing_formats.is_empty() {
                return Err(failed(format!(
                    "export {name}: a record/replay log and backing files come on the side channel"
                )));
            }
            (file, listener, None, Vec::new())
        };
        let options = disk::Options {
            readonly,
            queues,
            queue_size: self.queue_size,
            writethrough: e.get_writethrough(),
            serial: if serial.is_empty() {
                name.clone()
            } else {
                serial
            },
            format,
            read_error: e
                .get_read_error()?
                .to_str()?
                .parse()
                .map_err(|m| failed(format!("export {name}: readError {m}")))?,
            write_error: e
                .get_write_error()?
                .to_str()?
                .parse()
                .map_err(|m| failed(format!("export {name}: writeError {m}")))?,
        };
        let disk = Arc::new(
            Disk::with_backing(
                file,
                options,
                chain.into_iter().zip(backing_formats).collect(),
            )
            .map_err(|err| failed(format!("export {name}: {image}: {err}")))?,
        );
        if let Some(file) = log {
            let rec = match log_mode {
                DiskLog::Replay => crate::replay::Recording::to_replay(file, false),
                DiskLog::ReplayOnCopy => crate::replay::Recording::to_replay(file, true),
                DiskLog::RecordOnBase => {
                    crate::replay::Recording::to_record(file, Some(disk.size()))
                }
                _ => crate::replay::Recording::to_record(file, None),
            }
            .map_err(|err| failed(format!("export {name}: its log: {err}")))?;
            log::info!(
                "export {name}: {}",
                match log_mode {
                    DiskLog::Replay => "replaying a recording of its requests (the image is not touched)",
                    DiskLog::ReplayOnCopy => "replaying a recording of its requests, the guest's writes done on the image it was given (vmm-core's working copy of the recording's base, or with --replay-writes=apply the disk's image)",
                    DiskLog::RecordOnBase => "recording its requests (reads as checksums of what a replay's copy will hold)",
                    _ => "recording its requests",
                }
            );
            let _ = disk.recording.set(rec);
        }
        if disk.looks_like_qcow2 {
            log::warn!("export {name}: {image} starts with the qcow2 magic but is served as raw, as asked; if it is qcow2, add format=qcow2 to its --disk");
        }
        let export = Export::start(&name, &image, &socket, disk, listener, false)
            .map_err(|err| failed(format!("export {name}: cannot start its thread ({err})")))?;
        self.exports.borrow_mut().insert(name.clone(), export);
        if !e.get_persist() {
            self.mine.borrow_mut().push(name);
        }
        results.get().set_socket(&socket);
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: blockd::RemoveParams,
        _: blockd::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_str()?.to_string();
        let export = self
            .exports
            .borrow_mut()
            .remove(&name)
            .ok_or_else(|| failed(format!("no export {name:?} (list shows what there is)")))?;
        export.control.stop();
        drop(export);
        log::info!("export {name}: removed");
        Ok(())
    }

    async fn inject_fault(
        self: CapRc<Self>,
        params: blockd::InjectFaultParams,
        _: blockd::InjectFaultResults,
    ) -> Result<(), capnp::Error> {
        self.fault(params).await
    }

    async fn set_throttle(
        self: CapRc<Self>,
        params: blockd::SetThrottleParams,
        _: blockd::SetThrottleResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_str()?.to_string();
        let t = p.get_throttle()?;
        let spec = vmm_proto::throttle::Spec::read(t)?;
        let group = spec.group.clone();
        let limits = throttle::Limits::from_spec(&spec);
        limits
            .validate()
            .map_err(|m| failed(format!("export {name}: throttle: {m}")))?;
        let disk = self.disk(&name)?;
        let current = disk.throttle.lock().unwrap().clone();
        let next = if group.is_empty() {
            match current {
                _ if limits.is_off() => None,
                // The export's own budget: new limits, levels kept.
                Some(g) if g.name.is_empty() => {
                    g.set_limits(limits);
                    Some(g)
                }
                _ => Some(throttle::Group::new("", limits)),
            }
        } else {
            if !valid_name(&group) {
                return Err(failed(format!(
                    "throttle group {group:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
            match throttle::named(&group) {
                Some(g) => {
                    if !limits.is_off() {
                        g.set_limits(limits);
                    }
                    Some(g)
                }
                None if limits.is_off() => {
                    return Err(failed(format!(
                        "throttle group {group} does not exist; give it limits to create it"
                    )))
                }
                None => Some(throttle::create(&group, limits)),
            }
        };
        match &next {
            None => log::info!("export {name}: throttling off"),
            Some(g) => log::info!("export {name}: throttled: {}", g.limits().to_spec(&g.name)),
        }
        *disk.throttle.lock().unwrap() = next;
        // Requests held under the old settings are looked at again now.
        for t in disk.timers.lock().unwrap().iter() {
            t.arm(std::time::Duration::ZERO);
        }
        Ok(())
    }

    async fn add_fault_rule(
        self: CapRc<Self>,
        params: blockd::AddFaultRuleParams,
        mut results: blockd::AddFaultRuleResults,
    ) -> Result<(), capnp::Error> {
        let rule = vmm_proto::faults::Rule::read_from(params.get()?.get_rule()?)?;
        crate::faults::validate(&rule).map_err(|m| failed(format!("fault rule: {m}")))?;
        if !rule.export.is_empty() && !self.exports.borrow().contains_key(&rule.export) {
            return Err(failed(format!(
                "fault rule: no export {:?} (list shows what there is)",
                rule.export
            )));
        }
        let id = crate::faults::add(rule);
        log::info!("fault rule {id} added");
        results.get().set_id(id);
        Ok(())
    }

    async fn remove_fault_rule(
        self: CapRc<Self>,
        params: blockd::RemoveFaultRuleParams,
        _: blockd::RemoveFaultRuleResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id();
        if !crate::faults::remove(id) {
            return Err(failed(format!(
                "no fault rule {id} (listFaultRules shows what there is)"
            )));
        }
        log::info!("fault rule {id} removed");
        Ok(())
    }

    async fn list_fault_rules(
        self: CapRc<Self>,
        _: blockd::ListFaultRulesParams,
        mut results: blockd::ListFaultRulesResults,
    ) -> Result<(), capnp::Error> {
        let rules = crate::faults::list();
        let mut out = results.get().init_rules(rules.len() as u32);
        for (i, r) in rules.iter().enumerate() {
            r.write_to(out.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn watch(
        self: CapRc<Self>,
        params: blockd::WatchParams,
        _: blockd::WatchResults,
    ) -> Result<(), capnp::Error> {
        let watcher = params.get()?.get_watcher()?;
        WATCHERS.with(|w| w.borrow_mut().push(watcher));
        let mut reports = crate::disk::STOP_REPORTS.lock().unwrap();
        if reports.is_none() {
            // One task tells every watcher (of any connection) about each stop.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
            *reports = Some(tx);
            tokio::task::spawn_local(async move {
                while let Some((export, reason)) = rx.recv().await {
                    let watchers = WATCHERS.with(|w| w.borrow().clone());
                    let mut alive = Vec::new();
                    for w in watchers {
                        let mut req = w.stopped_request();
                        req.get().set_export(&export);
                        req.get().set_reason(&reason);
                        if req.send().promise.await.is_ok() {
                            alive.push(w);
                        }
                    }
                    WATCHERS.with(|w| *w.borrow_mut() = alive);
                }
            });
        }
        Ok(())
    }

    async fn resume(
        self: CapRc<Self>,
        params: blockd::ResumeParams,
        mut results: blockd::ResumeResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_string()?;
        let exports = self.exports.borrow();
        if !name.is_empty() && !exports.contains_key(&name) {
            return Err(failed(format!(
                "no export {name:?} (list shows what there is)"
            )));
        }
        let mut retried = 0;
        for (n, x) in exports.iter() {
            if name.is_empty() || *n == name {
                let was = x.disk.stopped.lock().unwrap().is_some();
                let held = x.disk.resume();
                if was {
                    log::info!("export {n}: resumed; retrying {held} request(s)");
                }
                retried += held;
            }
        }
        results.get().set_retried(retried);
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: blockd::ListParams,
        mut results: blockd::ListResults,
    ) -> Result<(), capnp::Error> {
        let exports = self.exports.borrow();
        let mut list = results.get().init_exports(exports.len() as u32);
        for (i, x) in exports.values().enumerate() {
            fill_info(list.reborrow().get(i as u32), x);
        }
        Ok(())
    }
}

impl Server {
    async fn fault(&self, params: blockd::InjectFaultParams) -> Result<(), capnp::Error> {
        use vmm_proto::blockd_capnp::fault;
        match params.get()?.get_fault()?.which()? {
            fault::Clear(()) => crate::faults::clear(),
            fault::ForbiddenSyscall(()) => {
                // Answer first, then make the call.
                tokio::task::spawn_local(async {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    vmm_sandbox::seccomp::forbidden_call();
                });
            }
        }
        Ok(())
    }
}

thread_local! {
    /// Who is told when an export stops on an I/O error (see `watch`).
    static WATCHERS: RefCell<Vec<vmm_proto::blockd_capnp::watcher::Client>> =
        const { RefCell::new(Vec::new()) };
}

pub fn fill_info(mut info: vmm_proto::blockd_capnp::export_info::Builder, x: &Export) {
    if let Some(why) = x.disk.stopped.lock().unwrap().as_ref() {
        info.set_stopped(why);
    }
    info.set_read_error(x.disk.options.read_error.as_str());
    info.set_write_error(x.disk.options.write_error.as_str());
    if let Some(g) = x.disk.throttle.lock().unwrap().clone() {
        g.limits()
            .to_spec(&g.name)
            .write(info.reborrow().init_throttle());
    }
    let d = &x.disk;
    info.set_name(&x.name);
    match d.shown.lock().unwrap().as_deref() {
        Some(top) => info.set_image(top),
        None => info.set_image(&x.image),
    }
    if let Some(j) = d.job.lock().unwrap().as_ref() {
        info.set_job(j.describe());
    }
    info.set_format(match d.format() {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    });
    info.set_readonly(d.options.readonly);
    info.set_queues(d.options.queues);
    info.set_size(d.size());
    info.set_socket(&x.socket);
    info.set_connected(x.control.connected.load(Ordering::Acquire));
    info.set_writeback(!d.writethrough());
    info.set_direct(d.is_direct());
    info.set_invalid(d.stats.invalid.load(Ordering::Relaxed));
    info.set_interrupts(d.stats.interrupts.load(Ordering::Relaxed));
    info.set_interrupts_suppressed(d.stats.interrupts_suppressed.load(Ordering::Relaxed));
    if let Some(r) = d.recording.get() {
        info.set_replay(r.status());
    }
    let ops = exports::op_stats(d);
    let mut list = info.init_ops(ops.len() as u32);
    for (i, (op, s)) in ops.iter().enumerate() {
        let mut o = list.reborrow().get(i as u32);
        o.set_op(op);
        o.set_requests(s.requests.load(Ordering::Relaxed));
        o.set_bytes(s.bytes.load(Ordering::Relaxed));
        o.set_errors(s.errors.load(Ordering::Relaxed));
        let mut buckets = o.init_latency(s.latency.len() as u32);
        for (j, c) in s.latency.iter().enumerate() {
            let mut b = buckets.reborrow().get(j as u32);
            b.set_up_to_us(disk::LATENCY_BOUNDS_US.get(j).copied().unwrap_or(0));
            b.set_count(c.load(Ordering::Relaxed));
        }
    }
}

/// Serves one control connection until it closes.
pub async fn serve(stream: std::os::unix::net::UnixStream, exports: Exports, queue_size: u16) {
    let Ok(stream) = vmm_proto::rpc::tokio_stream(stream) else {
        return;
    };
    let side = match vmm_proto::rpc::accept_side_channel(&stream).await {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("refused a control connection: {e}; see proto/schema/blockd.capnp");
            return;
        }
    };
    let server = std::rc::Rc::new(Server::new(exports.clone(), side, queue_size));
    let client: blockd::Client = capnp_rpc::new_client_from_rc(server.clone());
    let _ = vmm_proto::rpc::server(stream, client.client).await;
    // The client is gone: so are the exports it added (each flushes its image).
    for name in server.mine.borrow_mut().drain(..) {
        if let Some(x) = exports.borrow_mut().remove(&name) {
            x.control.stop();
            drop(x);
            log::info!("export {name}: removed with the connection that added it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// add (blockd opens the path), list, a bad add, remove, list: over a real socket pair.
    #[test]
    fn exports_come_and_go_over_rpc() {
        let dir = std::env::temp_dir().join(format!("blockd-rpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("d.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let vsock = dir.join("d.sock");
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let exports: Exports = Default::default();
            vmm_proto::rpc::run_local(serve(theirs, exports.clone(), 64)).unwrap();
            let left = exports.borrow().len();
            left
        });
        let (image_s, vsock_s) = (image.display().to_string(), vsock.display().to_string());
        vmm_proto::rpc::run_local(async move {
            let (side, theirs_side) = vmm_proto::fdpass::seqpacket_pair().unwrap();
            vmm_proto::fdpass::send(
                ours.as_fd(),
                &[vmm_proto::fdpass::SIDE_CHANNEL_PREAMBLE],
                &[theirs_side.as_fd()],
            )
            .unwrap();
            let stream = vmm_proto::rpc::tokio_stream(ours).unwrap();
            let (rpc, client): (_, blockd::Client) = vmm_proto::rpc::client(stream);
            let conn = tokio::task::spawn_local(rpc);
            let add = |name: &str, image: &str| {
                let mut r = client.add_request();
                let mut e = r.get().init_export();
                e.set_name(name);
                e.set_image(image);
                e.set_socket(&vsock_s);
                e.set_queues(2);
                r
            };
            let reply = add("d0", &image_s).send().promise.await.unwrap();
            assert_eq!(
                reply.get().unwrap().get_socket().unwrap().to_str().unwrap(),
                vsock_s
            );
            let err = match add("d0", &image_s).send().promise.await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("a second d0 was accepted"),
            };
            assert!(err.contains("export d0 exists already"), "{err}");
            let err = match add("bad name", &image_s).send().promise.await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("a bad name was accepted"),
            };
            assert!(err.contains("use 1 to 64 letters"), "{err}");
            let err = match add("d1", "/nonexistent/x.img").send().promise.await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("a missing image was accepted"),
            };
            assert!(
                err.contains("export d1: cannot open /nonexistent/x.img"),
                "{err}"
            );

            let list = client.list_request().send().promise.await.unwrap();
            let exports = list.get().unwrap().get_exports().unwrap();
            assert_eq!(exports.len(), 1);
            let x = exports.get(0);
            assert_eq!(x.get_name().unwrap().to_str().unwrap(), "d0");
            assert_eq!(x.get_size(), 1 << 20);
            assert_eq!(x.get_queues(), 2);
            assert!(!x.get_connected());
            assert_eq!(x.get_ops().unwrap().len(), 6);

            let mut rm = client.remove_request();
            rm.get().set_name("d0");
            rm.send().promise.await.unwrap();
            let list = client.list_request().send().promise.await.unwrap();
            assert_eq!(list.get().unwrap().get_exports().unwrap().len(), 0);
            let mut rm = client.remove_request();
            rm.get().set_name("d0");
            let err = rm.send().promise.await.err().unwrap().to_string();
            assert!(err.contains("no export \"d0\""), "{err}");
            drop(side);
            drop(client);
            conn.abort();
        })
        .unwrap();
        assert_eq!(server.join().unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
