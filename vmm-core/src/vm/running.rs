//! A booted guest while it runs: the main thread waits for events and carries out what only
//! it can (pause and resume, vCPU hotplug, the steps of a migration), until one ends the run.
//! Each kind of event has one handler; a handler returns the event when it ends the run.

use super::build::{Guest, Transports};
use crate::api;
use crate::config::VmConfig;
use crate::control::{
    ApiRequest, DiskChange, LoopError, MigrationRequest, Reply, Request, Saved, VcpuEvent, VmEvent,
};
use crate::memory::MemoryError;
use crate::snapshot::SaveError;
use crate::vcpu::kick;
use crate::vcpu::set::Origin;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};
use vmm_devices::dirty_log::SharedDirtyLog;
use vmm_devices::platform::cpu_hotplug::HotplugEvent;
use vmm_devices::platform::ged;

/// A disk's hot-remove that waits for the guest to eject it.
struct DiskRemoval {
    name: String,
    slot: u8,
    deadline: Instant,
    timeout_ms: u32,
    reply: Reply<()>,
}

/// A vCPU change that waits for the guest.
struct CpuChange {
    /// The vCPUs the guest has yet to take (adding) or eject (removing).
    waiting: BTreeSet<u32>,
    adding: bool,
    deadline: Instant,
    timeout_ms: u32,
    reply: Reply<()>,
}

fn id_list(ids: &BTreeSet<u32>) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guest and what the main loop keeps while it runs.
pub(super) struct Running<'a> {
    pub guest: Guest,
    config: &'a VmConfig,
    shared: &'a api::Shared,
    /// kvmclock as the pause stopped it: guest time does not pass while paused.
    paused_clock: Option<kvm_bindings::kvm_clock_data>,
    change: Option<CpuChange>,
    /// Whether a migration paused the VM (and a failed one resumes it).
    migration_paused: bool,
    /// Whether KVM's dirty log is on for a migration.
    dirty_logging: bool,
    /// The vhost-user backends' dirty log, while a migration logs.
    backend_log: Option<SharedDirtyLog>,
    /// When SIGTERM pressed the power button: the time by which the guest must be off.
    stopping: Option<Instant>,
    /// A live migration's last pass let go of the image locks (for a destination on this
    /// host); a failed migration takes them back.
    images_released: bool,
    /// An incoming VM in post-copy: what ends it once every page is here.
    pub postcopy: Option<Postcopy<'a>>,
    /// The guest's own end (a reset, power-off or panic) that came during post-copy: it
    /// ends the run once every page is here.
    deferred: Option<VmEvent>,
    /// The VM's disks (hot-add and hot-remove change them; each boot has them all).
    disks: &'a std::sync::Mutex<Vec<crate::helpers::blockd::DiskBackend>>,
    removals: Vec<DiskRemoval>,
}

/// What a destination in post-copy holds until every page is here.
pub(super) struct Postcopy<'a> {
    pub migrated: std::sync::Arc<crate::helpers::migrated::Migrated>,
    pub uffd: &'a vmm_sandbox::uffd::Uffd,
    /// A lazy restore (the pages come from a snapshot file, not a source).
    pub lazy: bool,
}

impl<'a> Running<'a> {
    pub fn new(
        guest: Guest,
        config: &'a VmConfig,
        shared: &'a api::Shared,
        paused_clock: Option<kvm_bindings::kvm_clock_data>,
        disks: &'a std::sync::Mutex<Vec<crate::helpers::blockd::DiskBackend>>,
    ) -> Running<'a> {
        Running {
            guest,
            config,
            shared,
            paused_clock,
            change: None,
            migration_paused: false,
            dirty_logging: false,
            backend_log: None,
            stopping: None,
            images_released: false,
            postcopy: None,
            deferred: None,
            disks,
            removals: Vec::new(),
        }
    }

    /// Waits for events until one ends the run, and returns it.
    pub fn run(&mut self, rx: &Receiver<VmEvent>) -> VmEvent {
        loop {
            let Some(event) = self.next_event(rx) else {
                continue;
            };
            let end = match event {
                VmEvent::DiskStopped(disk, reason) => self.disk_stopped(disk, reason),
                VmEvent::Migration(req) => self.migration(req),
                VmEvent::DumpVcpus => self.dump_vcpus(),
                VmEvent::Hotplug(event) => self.hotplug(event),
                VmEvent::Disk(change) => self.disk_change(change),
                VmEvent::PciEjected(slots) => self.pci_ejected(slots),
                VmEvent::Api(req) => self.api(req),
                VmEvent::Signal(sig) => self.signal(sig),
                // Only an incoming VM's wait takes it (build.rs).
                VmEvent::Arrived(_) => None,
                VmEvent::PostcopyDone(r) => self.postcopy_done(r),
                VmEvent::PostcopyPaused(why) => self.postcopy_paused(why),
                VmEvent::Vcpu(crate::control::VcpuEvent::Action(_, a))
                    if self.postcopy.is_some()
                        && matches!(
                            a,
                            vmm_devices::bus::Action::Reset
                                | vmm_devices::bus::Action::PowerOff
                                | vmm_devices::bus::Action::Panic
                        ) =>
                {
                    // The guest's own end waits for the last page: the source can then end
                    // too, and a reset's new boot does not leave post-copy half done.
                    log::info!("the guest asked to end or reset during post-copy; that happens once every page is here");
                    self.deferred.get_or_insert(event);
                    None
                }
                VmEvent::Vcpu(_) | VmEvent::ConsoleEscape => Some(event),
            };
            if let Some(event) = end {
                return event;
            }
        }
    }

    /// Post-copy ended. Every page here: guest RAM leaves the userfaultfd (its holes are
    /// zero pages now, as at the source), and migrated stops serving faults. Broken: the
    /// VM's RAM is incomplete and the pages that are missing are on the source only. A vCPU
    /// that waits for one cannot be stopped (under PVM not even kicked) until it comes, so
    /// vmm-core ends at once; its userfaultfd goes with it, and no guest code ever ran on a
    /// page that was not there.
    fn postcopy_done(
        &mut self,
        r: Result<crate::migration::PostcopySummary, crate::control::PostcopyFailed>,
    ) -> Option<VmEvent> {
        let pc = self.postcopy.take()?;
        match r {
            Ok(summary) => {
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                for region in self.guest.memory.guest.iter() {
                    if let Err(e) = pc.uffd.unregister(region.as_ptr() as u64, region.len()) {
                        log::warn!("post-copy: cannot unregister guest RAM ({e})");
                    }
                }
                for (_, t) in &self.guest.transports {
                    let mut t = t.lock().unwrap();
                    if let Err(e) = t.device_mut().postcopy_end() {
                        log::warn!("{}: {e}", t.device_name());
                    }
                }
                crate::migration::postcopy_end(&pc.migrated);
                let what = if pc.lazy {
                    "lazy restore complete, every page loaded"
                } else {
                    "post-copy complete"
                };
                log::info!("{what}: {summary}");
                self.shared
                    .events
                    .emit("migration", format!("{what}: {summary}"));
                let mut st = self.shared.migration.lock().unwrap();
                st.phase = "completed".into();
                st.total_ms = summary.ms;
                st.postcopy = Some(summary);
                self.deferred.take()
            }
            Err(why) => {
                let line = if pc.lazy {
                    format!(
                        "lazy restore failed: {why}; the pages still missing cannot be loaded, so this VM cannot go on; vmm-core ends"
                    )
                } else {
                    format!(
                        "post-copy failed: {why}; the pages still missing are at the source only, so this VM cannot go on; vmm-core ends"
                    )
                };
                log::error!("{line}");
                self.shared.events.emit("postcopy-failed", line);
                self.shared.events.flush(Duration::from_millis(500));
                std::process::exit(1);
            }
        }
    }

    /// Post-copy's channel broke: the VM waits (a vCPU that faults on a missing page
    /// waits for it) until `vmmctl migrate recover URI` gives a new channel.
    fn postcopy_paused(&mut self, why: String) -> Option<VmEvent> {
        let line = format!(
            "post-copy paused: {why}; `vmmctl migrate recover URI` on both hosts resumes it (this one listens, the source connects); if the source is gone, the VM is lost (`vmmctl shutdown --force`)"
        );
        log::error!("{line}");
        self.shared.events.emit("postcopy-paused", line);
        let mut st = self.shared.migration.lock().unwrap();
        st.phase = "postcopy-paused".into();
        st.error = why;
        None
    }

    /// Whether the VM may have vCPUs waiting for pages that only a source has (a
    /// destination in post-copy): stopping them cannot wait for them.
    pub fn pages_missing(&self) -> bool {
        self.postcopy.is_some()
    }

    /// The next event; None when a vCPU change timed out instead (it is answered here). The
    /// end of a graceful stop's wait is a SIGTERM that stops the VM.
    fn next_event(&mut self, rx: &Receiver<VmEvent>) -> Option<VmEvent> {
        let deadline = [
            self.change.as_ref().map(|c| c.deadline),
            self.stopping,
            self.removals.iter().map(|r| r.deadline).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        let next = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => {
                if self.stopping.is_some_and(|d| d <= Instant::now()) {
                    log::warn!(
                        "the guest did not power off within {} s of SIGTERM (--stop-timeout); stopping it",
                        self.config.stop_timeout.as_secs()
                    );
                    return Some(VmEvent::Signal(libc::SIGTERM));
                }
                if self
                    .change
                    .as_ref()
                    .is_some_and(|c| c.deadline <= Instant::now())
                {
                    self.cpu_change_timed_out();
                }
                self.disk_removals_timed_out();
                None
            }
            Err(_) => panic!("the signal thread holds a sender for the life of the process"),
        }
    }

    /// Presses the ACPI power button (the GED's event), saying so in the log and as an event.
    fn press_power_button(&self, how: &str) -> std::io::Result<()> {
        self.guest
            .ged
            .lock()
            .unwrap()
            .notify(ged::EVENT_POWER_BUTTON)?;
        log::info!("pressed the ACPI power button {how}");
        self.shared
            .events
            .emit("power-button", format!("pressed {how}"));
        Ok(())
    }

    /// SIGTERM asks the guest to power off (the ACPI power button, as `systemctl stop` of a
    /// libvirt domain does) and waits up to --stop-timeout. A second signal, SIGINT, SIGHUP, a
    /// paused VM (it cannot answer) or a zero timeout stop the VM at once.
    fn signal(&mut self, sig: i32) -> Option<VmEvent> {
        let paused = self.shared.status.lock().unwrap().paused;
        let timeout = self.config.stop_timeout;
        if sig != libc::SIGTERM || self.stopping.is_some() || paused || timeout.is_zero() {
            return Some(VmEvent::Signal(sig));
        }
        if let Err(e) = self.press_power_button("on SIGTERM") {
            log::warn!("SIGTERM: cannot press the ACPI power button ({e}); stopping the VM now");
            return Some(VmEvent::Signal(sig));
        }
        log::info!(
            "SIGTERM: the guest has {} s to power off (--stop-timeout; another SIGTERM stops it now)",
            timeout.as_secs()
        );
        self.shared.set_phase(api::Phase::Shutdown);
        self.stopping = Some(Instant::now() + timeout);
        None
    }

    /// Stops every vCPU, and guest time too, as QEMU does: a guest should not see the pause as
    /// time that passed (or it reports soft lockups).
    fn pause(&mut self) {
        kick::pause(&self.guest.state, &self.guest.vcpus.handles());
        if self.paused_clock.is_none() {
            match self.guest.vm.get_clock() {
                Ok(clock) => self.paused_clock = Some(clock),
                Err(e) => log::warn!("cannot read kvmclock at pause: {e}"),
            }
        }
        self.shared.status.lock().unwrap().paused = true;
    }

    /// Guest time goes on from where the pause stopped it.
    fn restore_clock(&mut self) {
        if let Some(mut clock) = self.paused_clock.take() {
            clock.flags = 0;
            if let Err(e) = self.guest.vm.set_clock(&clock) {
                log::warn!("cannot restore kvmclock at resume: {e}");
            }
        }
    }

    fn cpu_change_timed_out(&mut self) {
        let c = self.change.take().expect("a deadline comes from a change");
        let err = if c.adding {
            LoopError::NotTaken(id_list(&c.waiting), c.timeout_ms)
        } else {
            let mut hp = self.guest.hotplug.lock().unwrap();
            for id in &c.waiting {
                let slot = &mut hp.slots[*id as usize];
                slot.removing = false;
                slot.eject_wanted = false;
            }
            LoopError::NotEjected(id_list(&c.waiting), c.timeout_ms)
        };
        log::warn!("{err}");
        self.shared
            .events
            .emit("cpu-change-failed", err.to_string());
        let _ = c.reply.send(Err(err));
    }

    /// A disk comes: its function goes on the bus and the guest hears of it (the GED's PCI
    /// event); or one is to go: the guest is asked to eject it.
    fn disk_change(&mut self, change: DiskChange) -> Option<VmEvent> {
        // The state a migration or snapshot sends must have the devices the destination
        // was given.
        let status = self.shared.migration.lock().unwrap().clone();
        if status.under_way() {
            let err = || LoopError::Migrating(status.phase.clone());
            match change {
                DiskChange::Add(_, reply) => {
                    let _ = reply.send(Err(err()));
                }
                DiskChange::Remove { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
            }
            return None;
        }
        match change {
            DiskChange::Add(d, reply) => {
                let _ = reply.send(self.disk_add(d));
            }
            DiskChange::Remove {
                name,
                timeout_ms,
                reply,
            } => match self.disk_remove(&name) {
                Ok(slot) => self.removals.push(DiskRemoval {
                    name,
                    slot,
                    deadline: Instant::now() + Duration::from_millis(timeout_ms.into()),
                    timeout_ms,
                    reply,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
        None
    }

    fn disk_add(&mut self, d: crate::helpers::blockd::DiskBackend) -> Result<u8, LoopError> {
        let g = &mut self.guest;
        let transport =
            super::build::disk_transport(&g.memory, &g.routing, &d).map_err(LoopError::failed)?;
        let missed = transport.notify_exits.clone();
        let transport = std::sync::Arc::new(std::sync::Mutex::new(transport));
        let Some(slot) = g.pci.add_at(transport.clone(), d.slot) else {
            transport.lock().unwrap().unplug();
            return Err(match d.slot {
                Some(s) => LoopError::SlotTaken(d.name.clone(), s),
                None => LoopError::NoPciSlot(d.name.clone()),
            });
        };
        *d.device.lock().unwrap() = Some(std::sync::Arc::downgrade(&transport));
        g.transports.push((slot, transport));
        g.kicks_missed.push((d.name.clone(), missed));
        g.pci_hotplug.lock().unwrap().inserted(slot);
        log::info!(
            "{}: virtio-blk hot-added at PCI 00:{slot:02x}.0 ({}); telling the guest",
            d.name,
            d.image
        );
        self.shared
            .events
            .emit("disk-added", format!("{} at PCI 00:{slot:02x}.0", d.name));
        self.disks.lock().unwrap().push(d);
        self.publish_spec();
        let g = &self.guest;
        g.ged
            .lock()
            .unwrap()
            .notify(ged::EVENT_PCI_HOTPLUG)
            .map_err(LoopError::Interrupt)?;
        Ok(slot)
    }

    /// Asks the guest to eject disk `name`; its slot.
    fn disk_remove(&mut self, name: &str) -> Result<u8, LoopError> {
        let g = &self.guest;
        let slot = g
            .transports
            .iter()
            .find(|(_, t)| t.lock().unwrap().device_name() == name)
            .map(|(s, _)| *s)
            .ok_or_else(|| LoopError::NoDevice(name.to_string()))?;
        if !self.disks.lock().unwrap().iter().any(|d| d.name == name) {
            return Err(LoopError::NotRemovable(name.to_string()));
        }
        if self.removals.iter().any(|r| r.name == name) {
            return Err(LoopError::DiskRemoving(name.to_string()));
        }
        g.pci_hotplug.lock().unwrap().ask_eject(slot, true);
        g.ged
            .lock()
            .unwrap()
            .notify(ged::EVENT_PCI_HOTPLUG)
            .map_err(LoopError::Interrupt)?;
        log::info!("{name}: asking the guest to eject it (PCI 00:{slot:02x}.0)");
        Ok(slot)
    }

    /// The guest ejected these slots' functions: each leaves the bus, its backend stops its
    /// queues and is disconnected, and the removal that waited is answered.
    fn pci_ejected(&mut self, slots: u32) -> Option<VmEvent> {
        for slot in (0..32u8).filter(|s| slots & (1 << s) != 0) {
            let g = &mut self.guest;
            g.pci.remove(slot);
            let Some(i) = g.transports.iter().position(|(s, _)| *s == slot) else {
                continue;
            };
            let (_, t) = g.transports.remove(i);
            let name = {
                let mut t = t.lock().unwrap();
                t.unplug();
                t.device_name().to_string()
            };
            drop(t);
            g.kicks_missed.retain(|(n, _)| *n != name);
            self.disks.lock().unwrap().retain(|d| d.name != name);
            self.publish_spec();
            log::info!("{name}: the guest ejected it; PCI 00:{slot:02x}.0 is empty");
            self.shared.events.emit("disk-removed", name.clone());
            if let Some(i) = self.removals.iter().position(|r| r.slot == slot) {
                let _ = self.removals.remove(i).reply.send(Ok(()));
            }
        }
        None
    }

    /// The disks changed: what a snapshot or migration carries (the settings a restore or
    /// destination takes when it is given no --disk) lists them as they are now, each with
    /// its name and slot, so that every disk is where the state has it.
    fn publish_spec(&self) {
        let specs: Vec<String> = self
            .disks
            .lock()
            .unwrap()
            .iter()
            .map(|d| {
                let slot = self
                    .guest
                    .transports
                    .iter()
                    .find(|(_, t)| t.lock().unwrap().device_name() == d.name)
                    .map(|(s, _)| *s);
                let kept: Vec<&str> = d
                    .spec
                    .split(',')
                    .filter(|p| !p.starts_with("name=") && !p.starts_with("slot="))
                    .collect();
                let mut spec = format!("{},name={}", kept.join(","), d.name);
                if let Some(s) = slot {
                    spec += &format!(",slot={s}");
                }
                spec
            })
            .collect();
        *self.shared.spec_toml.lock().unwrap() = self.config.spec_toml_with(&specs);
        *self.shared.config_json.lock().unwrap() = self.config.to_json_with(&specs);
    }

    /// Removals the guest did not do in time: it is no longer asked, and the disk stays.
    fn disk_removals_timed_out(&mut self) {
        let now = Instant::now();
        let (late, waiting) = std::mem::take(&mut self.removals)
            .into_iter()
            .partition(|r| r.deadline <= now);
        self.removals = waiting;
        for r in late {
            self.guest
                .pci_hotplug
                .lock()
                .unwrap()
                .ask_eject(r.slot, false);
            let err = LoopError::DiskNotEjected(r.name, r.timeout_ms);
            log::warn!("{err}");
            let _ = r.reply.send(Err(err));
        }
    }

    /// As QEMU's werror/rerror=stop: the VM pauses until someone resumes it.
    /// A replay that diverged stops the disk the same way: the guest went another way than
    /// the recording, and the VM pauses where it did.
    fn disk_stopped(&mut self, disk: String, reason: String) -> Option<VmEvent> {
        self.pause();
        let diverged = reason.starts_with("replay diverged");
        if diverged {
            log::error!(
                "{disk}: {reason}; the VM is paused where the guest left the recording (`vmmctl shutdown --force` ends it)"
            );
        } else {
            log::error!(
                "{disk}: {reason}; the VM is paused (its error policy is stop); fix the cause, then `vmmctl resume` retries the request"
            );
        }
        let events = &self.shared.events;
        events.emit("disk-stopped", format!("{disk}: {reason}"));
        events.emit(
            "paused",
            if diverged {
                format!("{disk}: the replay diverged")
            } else {
                format!("{disk} stopped on an I/O error")
            },
        );
        None
    }

    fn dump_vcpus(&mut self) -> Option<VmEvent> {
        self.guest
            .state
            .dump_generation
            .fetch_add(1, Ordering::AcqRel);
        kick::kick_all(&self.guest.vcpus.handles());
        None
    }

    fn hotplug(&mut self, event: HotplugEvent) -> Option<VmEvent> {
        let id = match event {
            HotplugEvent::InsertSeen(id) => {
                log::info!("vCPU {id}: the guest took it");
                self.shared.events.emit("cpu-added", format!("vCPU {id}"));
                id
            }
            HotplugEvent::Ejected(id) => {
                self.guest.vcpus.park(id);
                log::info!("vCPU {id}: the guest ejected it; its KVM fd is parked");
                self.shared.events.emit("cpu-removed", format!("vCPU {id}"));
                self.guest.publish_vcpus(self.shared);
                id
            }
        };
        if let Some(c) = &mut self.change {
            c.waiting.remove(&id);
            if c.waiting.is_empty() {
                let _ = self.change.take().expect("checked").reply.send(Ok(()));
            }
        }
        None
    }

    fn api(&mut self, req: ApiRequest) -> Option<VmEvent> {
        let reply = req.reply;
        match req.request {
            Request::SetCpus { count, timeout_ms } => self.set_cpus(count, timeout_ms, reply),
            Request::DirtyLog { on } => {
                let _ = reply.send(self.dirty_rate_log(on).map_err(LoopError::failed));
            }
            Request::DiskResized { name } => {
                let _ = reply.send(self.disk_resized(&name));
            }
            Request::DiskImage { name, path, format } => {
                self.disk_image(&name, &path, format);
                let _ = reply.send(Ok(()));
            }
            // A vCPU waiting for a page the broken channel cannot bring would hold the pause
            // (and this loop) forever.
            Request::Pause if self.shared.migration.lock().unwrap().phase == "postcopy-paused" => {
                let _ = reply.send(Err(LoopError::PostcopyPaused));
            }
            Request::Pause => {
                self.pause();
                log::info!("paused through the management API");
                self.shared.events.emit("paused", "");
                let _ = reply.send(Ok(()));
            }
            Request::Resume => {
                self.resume();
                let _ = reply.send(Ok(()));
            }
            Request::Shutdown { force: false } => {
                let pressed = self.press_power_button("through the management API");
                let _ = reply.send(pressed.map_err(LoopError::Interrupt));
            }
            request @ (Request::Shutdown { force: true } | Request::Reboot) => {
                let _ = reply.send(Ok(()));
                let (reply, _) = futures::channel::oneshot::channel();
                return Some(VmEvent::Api(ApiRequest { request, reply }));
            }
        }
        None
    }

    /// Disk `name`'s image is another now (a live snapshot's overlay, or the base a commit
    /// merged into): what a snapshot or migration carries says so.
    fn disk_image(&self, name: &str, path: &std::path::Path, format: &str) {
        if let Some(d) = self
            .disks
            .lock()
            .unwrap()
            .iter_mut()
            .find(|d| d.name == name)
        {
            let kept: Vec<&str> = d
                .spec
                .split(',')
                .filter(|p| {
                    !["path=", "format=", "backing="]
                        .iter()
                        .any(|k| p.starts_with(k))
                })
                .collect();
            d.spec = format!("path={},format={format},{}", path.display(), kept.join(","))
                .trim_end_matches(',')
                .to_string();
            d.image = path.display().to_string();
        }
        self.publish_spec();
    }

    /// Disk `name` grew: its device reads its configuration again and tells the guest.
    fn disk_resized(&self, name: &str) -> Result<(), LoopError> {
        let t = self
            .guest
            .transports
            .iter()
            .find(|(_, t)| t.lock().unwrap().device_name() == name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| LoopError::NoDevice(name.to_string()))?;
        let changed = t
            .lock()
            .unwrap()
            .config_changed()
            .map_err(LoopError::failed)?;
        log::info!(
            "{name}: {}",
            if changed {
                "its new size is in its configuration; the guest was told"
            } else {
                "its configuration did not change"
            }
        );
        Ok(())
    }

    /// `vmmctl dirty-rate`: KVM's dirty log on (cleared), or off with the count of pages the
    /// guest wrote meanwhile.
    fn dirty_rate_log(&self, on: bool) -> Result<(), MemoryError> {
        let (memory, vm) = (&self.guest.memory, &self.guest.vm);
        if on {
            memory.log_dirty(vm, true)?;
            memory.take_dirty(vm).map(|_| ())
        } else {
            let pages = memory.take_dirty(vm)?;
            self.shared.status.lock().unwrap().dirty_pages = pages;
            memory.log_dirty(vm, false)
        }
    }

    /// `vmmctl resume`: the vCPUs, guest time and stopped queues go on, and disks that stopped
    /// on an I/O error retry what they hold.
    fn resume(&mut self) {
        self.restore_clock();
        resume_queues(&self.guest.transports);
        self.migration_paused = false;
        kick::resume(&self.guest.state);
        self.shared.status.lock().unwrap().paused = false;
        let retried = match self.shared.blockd.lock().unwrap().as_ref() {
            Some(b) => b.resume(),
            None => Ok(0),
        };
        match retried {
            Ok(0) => {}
            Ok(n) => log::info!("disks: retrying {n} request(s) that stopped the VM"),
            Err(e) => log::warn!("disks: cannot have blockd retry: {e}"),
        }
        log::info!("resumed through the management API");
        self.shared.events.emit("resumed", "");
    }

    fn set_cpus(&mut self, count: u32, timeout_ms: u32, reply: Reply<()>) {
        if self.change.is_some() {
            let _ = reply.send(Err(LoopError::CpuChangeBusy));
            return;
        }
        match self.start_cpu_change(count) {
            Err(msg) => {
                let _ = reply.send(Err(msg));
            }
            Ok((waiting, _)) if waiting.is_empty() => {
                let _ = reply.send(Ok(()));
            }
            Ok((waiting, adding)) => {
                self.change = Some(CpuChange {
                    waiting,
                    adding,
                    deadline: Instant::now() + Duration::from_millis(timeout_ms.into()),
                    timeout_ms,
                    reply,
                });
            }
        }
        self.guest.publish_vcpus(self.shared);
    }

    /// Starts hot-adding or hot-removing vCPUs until `count` are online: returns the ids the
    /// guest must now take or eject, and whether they are being added; or why the change is
    /// refused.
    fn start_cpu_change(&mut self, count: u32) -> Result<(BTreeSet<u32>, bool), LoopError> {
        let max = self.config.max_cpus;
        if count == 0 {
            return Err(LoopError::BootCpu);
        }
        if count > max {
            return Err(LoopError::AboveMax(count, max));
        }
        let online = self.guest.vcpus.running.len() as u32;
        let ids = if count > online {
            self.hot_add(count - online)?
        } else {
            self.hot_remove(online.saturating_sub(count))
        };
        if !ids.is_empty() {
            self.guest
                .ged
                .lock()
                .unwrap()
                .notify(ged::EVENT_CPU_HOTPLUG)
                .map_err(LoopError::Interrupt)?;
        }
        Ok((ids, count > online))
    }

    /// Starts `n` more vCPUs (created, or parked ones reused) and marks them inserting.
    fn hot_add(&mut self, n: u32) -> Result<BTreeSet<u32>, LoopError> {
        let g = &mut self.guest;
        let absent: Vec<u32> = (0..self.config.max_cpus)
            .filter(|id| !g.vcpus.running.contains_key(id))
            .take(n as usize)
            .collect();
        let mut ids = BTreeSet::new();
        for id in absent {
            let (fd, origin) = g
                .vcpus
                .prepare(&g.vm, id, None)
                .map_err(LoopError::failed)?;
            g.vcpus
                .spawn(id, fd)
                .map_err(|e| LoopError::VcpuThread(id, e))?;
            match origin {
                Origin::Created => log::info!("vCPU {id}: created; asking the guest to take it"),
                Origin::Reused(n) => log::info!(
                    "vCPU {id}: its parked KVM fd reused (time {n}); asking the guest to take it"
                ),
            }
            let mut hp = g.hotplug.lock().unwrap();
            let slot = &mut hp.slots[id as usize];
            slot.enabled = true;
            slot.inserting = true;
            ids.insert(id);
        }
        Ok(ids)
    }

    /// Asks the guest to eject the `n` highest vCPUs (never vCPU 0).
    fn hot_remove(&mut self, n: u32) -> BTreeSet<u32> {
        let going: Vec<u32> = self
            .guest
            .vcpus
            .running
            .keys()
            .rev()
            .copied()
            .filter(|&id| id != 0)
            .take(n as usize)
            .collect();
        let mut hp = self.guest.hotplug.lock().unwrap();
        for &id in &going {
            log::info!("vCPU {id}: asking the guest to eject it");
            let slot = &mut hp.slots[id as usize];
            slot.removing = true;
            slot.eject_wanted = true;
        }
        going.into_iter().collect()
    }

    fn migration(&mut self, req: MigrationRequest) -> Option<VmEvent> {
        use MigrationRequest as M;
        match req {
            M::Memfd(reply) => {
                let _ = reply.send(
                    self.guest
                        .memory
                        .memfd
                        .try_clone()
                        .map_err(LoopError::Memfd),
                );
            }
            M::DirtyLog(on, reply) => {
                let _ = reply.send(self.migration_dirty_log(on).map_err(LoopError::failed));
            }
            M::TakeDirty(reply) => {
                let _ = reply.send(self.take_dirty().map_err(LoopError::failed));
            }
            M::Save(reply) => {
                let _ = reply.send(self.save());
            }
            M::Continue(reply) => {
                self.migration_continue();
                let _ = reply.send(Ok(()));
            }
            M::Leave => return Some(VmEvent::Migration(M::Leave)),
        }
        None
    }

    /// KVM's dirty log on or off for a migration, and the vhost-user backends' with it: they
    /// log their own writes into a shared bitmap (LOG_SHMFD); a backend that cannot makes the
    /// last pass resend everything (see save).
    fn migration_dirty_log(&mut self, on: bool) -> Result<(), MemoryError> {
        let (memory, vm) = (&self.guest.memory, &self.guest.vm);
        let r = memory.log_dirty(vm, on).and_then(|()| {
            if on {
                memory.take_dirty_bitmap(vm).map(|_| ())
            } else {
                Ok(())
            }
        });
        self.dirty_logging = on && r.is_ok();
        self.backend_log = match self.dirty_logging {
            true => SharedDirtyLog::new(memory.size)
                .map_err(|e| log::warn!("cannot make the vhost-user dirty log ({e}); a migration resends all of RAM at the end"))
                .ok(),
            false => None,
        };
        for (_, t) in &self.guest.transports {
            t.lock()
                .unwrap()
                .device_mut()
                .set_dirty_log(self.backend_log.as_ref());
        }
        r
    }

    /// The pages written since the last take: KVM's log and the backends'.
    fn take_dirty(&self) -> Result<Vec<u64>, MemoryError> {
        self.guest
            .memory
            .take_dirty_bitmap(&self.guest.vm)
            .map(|mut b| {
                if let Some(l) = &self.backend_log {
                    l.take_into(&mut b);
                }
                b
            })
    }

    /// Pauses the VM (unless the user had), saves its state, and with the dirty log on takes
    /// the pages written since the last pass, the used rings among them.
    fn save(&mut self) -> Result<Saved, LoopError> {
        // A disk the guest is asked to eject may leave at any moment: the state would not
        // say whether the destination has it.
        if let Some(r) = self.removals.first() {
            return Err(LoopError::DiskRemoving(r.name.clone()));
        }
        let was_paused = self.shared.status.lock().unwrap().paused;
        if !was_paused {
            self.pause();
            self.migration_paused = true;
        }
        // A snapshot of a VM that records says where each log stands.
        let snapshot = self
            .shared
            .migration
            .lock()
            .unwrap()
            .uri
            .starts_with("file:");
        let recording = matches!(
            self.config.recording,
            Some(crate::config::Recording::Record(_))
        );
        let take = || super::marks::take(self.config, self.shared);
        let marks = (snapshot && recording)
            .then_some(&take as &dyn Fn() -> Result<crate::record_marks::RecordMarks, String>);
        let state = save_vm(
            &self.guest,
            self.paused_clock,
            self.config,
            was_paused,
            marks,
        )
        .map_err(LoopError::failed)?;
        let mut dirty = match self.dirty_logging {
            true => Some(self.take_dirty().map_err(LoopError::failed)?),
            false => None,
        };
        let mut unlogged_writers = false;
        for (_, t) in &self.guest.transports {
            let t = t.lock().unwrap();
            if !t.is_active() {
                continue;
            }
            let dev = t.device();
            unlogged_writers |= !dev.logs_dirty();
            // The used rings the backend wrote go whatever the logs say (a backend logs only
            // what it writes for requests).
            if let Some(b) = dirty.as_mut() {
                for (gpa, len) in dev.used_rings() {
                    vmm_devices::dirty_log::mark_gpa(b, self.guest.memory.size, gpa, len);
                }
            }
        }
        // A live migration (the dirty log is on): the destination may be on this host, and
        // takes the images' locks before it runs; the queues are stopped, nothing writes.
        if self.dirty_logging {
            if let Some(blockd) = self.shared.blockd.lock().unwrap().as_ref() {
                blockd.release_images();
                self.images_released = true;
            }
        }
        Ok(Saved {
            state,
            dirty,
            unlogged_writers,
        })
    }

    /// The VM goes on here: the queues start again, and the vCPUs run unless the user had
    /// paused the VM.
    fn migration_continue(&mut self) {
        if std::mem::take(&mut self.images_released) {
            if let Some(blockd) = self.shared.blockd.lock().unwrap().as_ref() {
                if let Err(e) = blockd.lock_images() {
                    log::error!(
                        "the migration failed, and the VM goes on here without its image lock: {e}"
                    );
                    self.shared.events.emit("image-lock-lost", e.to_string());
                }
            }
        }
        resume_queues(&self.guest.transports);
        if std::mem::take(&mut self.migration_paused) {
            self.restore_clock();
            kick::resume(&self.guest.state);
            self.shared.status.lock().unwrap().paused = false;
        }
    }

    /// Stops every vCPU. Later events from vCPUs that were stopping anyway are reported, not
    /// acted on. Requests from people (API calls, signals, the console escape) carry over: if
    /// the guest boots again they apply to it; if the VMM ends, the API caller hears that it
    /// stopped.
    pub fn stop(self, tx: &Sender<VmEvent>, rx: &Receiver<VmEvent>) -> Guest {
        let mut guest = self.guest;
        let threads = std::mem::take(&mut guest.vcpus.running);
        kick::stop_all(
            &guest.state,
            threads.into_values().map(|t| t.handle).collect(),
        );
        let mut carried = Vec::new();
        while let Ok(other) = rx.try_recv() {
            match other {
                VmEvent::Vcpu(VcpuEvent::Failed(id, msg)) => {
                    log::warn!("vCPU {id} while stopping: {msg}")
                }
                // The next boot has its own vCPUs and PCI functions.
                VmEvent::Vcpu(_) | VmEvent::Hotplug(_) | VmEvent::PciEjected(_) => {}
                other => carried.push(other),
            }
        }
        for e in carried {
            let _ = tx.send(e);
        }
        guest
    }
}

/// Starts the virtio queues a snapshot or migration stopped.
fn resume_queues(transports: &Transports) {
    for (slot, t) in transports {
        if let Err(e) = t.lock().unwrap().resume_queues() {
            log::error!("PCI 00:{slot:02x}.0: cannot start its queues again: {e}");
        }
    }
}

/// Saves the paused VM: each vCPU saves its own state on its thread, then the devices.
fn save_vm(
    guest: &Guest,
    clock: Option<kvm_bindings::kvm_clock_data>,
    config: &VmConfig,
    paused: bool,
    marks: Option<&dyn Fn() -> Result<crate::record_marks::RecordMarks, String>>,
) -> Result<Vec<u8>, SaveError> {
    let state = &guest.state;
    let ids: Vec<u32> = guest
        .vcpus
        .running
        .iter()
        .filter(|(_, t)| !t.handle.is_finished())
        .map(|(id, _)| *id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut p = state.pause.lock().unwrap();
    p.saved.clear();
    p.save_generation += 1;
    state.pause_changed.notify_all();
    while ids.iter().any(|id| !p.saved.contains_key(id)) {
        if Instant::now() > deadline {
            return Err(SaveError::Timeout);
        }
        p = state
            .pause_changed
            .wait_timeout(p, Duration::from_millis(10))
            .unwrap()
            .0;
    }
    let mut saved = std::mem::take(&mut p.saved);
    drop(p);
    let vcpus = ids
        .iter()
        .map(|id| saved.remove(id).expect("checked above"))
        .collect::<Result<Vec<_>, crate::vcpu::VcpuError>>()?;
    crate::snapshot::save(
        &guest.devices(),
        &crate::snapshot::Taken {
            vcpus,
            clock,
            memory: config.memory,
            max_cpus: config.max_cpus,
            paused,
            boot: crate::snapshot::Boot::of(config),
            marks,
        },
    )
}
