//! The virtio-pci modern transport (virtio 1.2, 4.1): common, notify, ISR and device
//! configuration structures in BAR 0, found through vendor capabilities, and MSI-X.
//!
//! Once the driver is ready, each queue's notify address is a KVM ioeventfd (the kick) and its
//! MSI-X vector's GSI has an irqfd (the call): neither a request nor a completion exits to
//! vmm-core. A write to a notify address that still reaches us (before DRIVER_OK) is counted.

use super::{QueueSetup, VirtioDevice, VirtioError, F_VERSION_1};
use crate::pci::msix::{self, MsixTable, Routing};
use crate::pci::{ConfigSpace, PciDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmm_proto::state::StateError;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Debug, Clone, Copy, Default)]
struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

pub struct VirtioPci {
    cfg: ConfigSpace,
    msix_cap: usize,
    msix: MsixTable,
    device: Box<dyn VirtioDevice>,
    routing: Arc<Routing>,
    /// One GSI per MSI-X vector.
    gsis: Vec<u32>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    /// Bumped at each change of the device's configuration the device makes itself.
    config_generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Where the kicks' ioeventfds are registered (BAR 0's address then).
    ioevents_at: Option<u64>,
    /// The GSI each queue's call eventfd is an irqfd on.
    irqfds: Vec<Option<u32>>,
    active: bool,
    /// Where each queue goes on, while a snapshot has the queues stopped.
    stopped: Option<Vec<(u16, u16)>>,
    /// Notify writes that exited to vmm-core (not taken by an ioeventfd).
    pub notify_exits: Arc<AtomicU64>,
}

impl VirtioPci {
    /// The backend's configuration changed (a disk grew): the device reads it again, and
    /// the driver is told (the generation moves, and a config-change interrupt on its
    /// vector, virtio 1.2 4.1.4.3). Returns whether anything changed.
    pub fn config_changed(&mut self) -> Result<bool, VirtioError> {
        if !self.device.refresh_config()? {
            return Ok(false);
        }
        self.config_generation = self.config_generation.wrapping_add(1);
        let v = self.config_vector;
        if v != NO_VECTOR && self.msix.deliverable(v) {
            let e = self.msix.entries[usize::from(v)];
            let msi = kvm_bindings::kvm_msi {
                address_lo: e.addr as u32,
                address_hi: (e.addr >> 32) as u32,
                data: e.data,
                ..Default::default()
            };
            if let Err(e) = self.routing.vm().signal_msi(msi) {
                log::warn!("{}: cannot signal the config change ({e})", self.name());
            }
        } else {
            log::info!(
                "{}: its configuration changed; the driver has no config vector to be told on (it sees the new generation when it reads)",
                self.name()
            );
        }
        Ok(true)
    }

    /// The function leaves the bus (hot-remove, once the guest ejected it): its backend
    /// answers what the driver queued, then stops its queues, and its ioeventfds, irqfds
    /// and MSI routes go. (It is off the bus
    /// already, so nothing uses the GSIs it gave back.)
    pub fn unplug(&mut self) {
        if self.active {
            // A guest may eject a device with requests still queued: each is answered
            // first (10 s at most), so that none is lost.
            let left = self.device.drain(std::time::Duration::from_secs(10));
            if left > 0 {
                log::warn!(
                    "{}: its backend did not answer {left} request(s) within 10 s; they are dropped with the device",
                    self.name()
                );
            }
        }
        self.reset();
        if let Err(e) = self.routing.release(&self.gsis) {
            log::warn!("{}: cannot remove its interrupt routes ({e})", self.name());
        }
    }

    /// The device's backend restarted: set it up again as the driver left it.
    pub fn reconnect(&mut self) -> Result<(), VirtioError> {
        self.device.reconnect()
    }

    pub fn new(device: Box<dyn VirtioDevice>, routing: Arc<Routing>) -> std::io::Result<VirtioPci> {
        let kind = device.device_type();
        let n = device.num_queues();
        // Block is class 01.80 (mass storage, other), as QEMU reports it.
        let class = match kind {
            2 => 0x01_80_00,
            _ => 0xff_00_00,
        };
        let mut cfg = ConfigSpace::new(0x1af4, 0x1040 + kind, class, 0x1af4, 0x40);
        cfg.add_bar(0, BAR_SIZE);
        let vendor_cap = |cfg_type: u8, offset: u64, len: u64, extra: &[u8]| {
            let mut c = vec![CAP_VENDOR, 0, 16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            c.extend_from_slice(&(offset as u32).to_le_bytes());
            c.extend_from_slice(&(len as u32).to_le_bytes());
            c.extend_from_slice(extra);
            c
        };
        cfg.add_capability(&vendor_cap(CFG_COMMON, COMMON, COMMON_LEN, &[]), &[]);
        cfg.add_capability(
            &vendor_cap(
                CFG_NOTIFY,
                NOTIFY,
                NOTIFY_LEN,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        cfg.add_capability(&vendor_cap(CFG_ISR, ISR, 4, &[]), &[]);
        cfg.add_capability(&vendor_cap(CFG_DEVICE, DEVICE, DEVICE_LEN, &[]), &[]);
        // One vector per queue plus one for configuration changes.
        let vectors = n + 1;
        let mut msix_cap = vec![CAP_MSIX, 0];
        msix_cap.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_cap.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        msix_cap.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_off = cfg.add_capability(&msix_cap, &[0, 0, 0, 0xc0]);
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..n {
            kicks.push(EventFd::new(EFD_NONBLOCK)?);
            calls.push(EventFd::new(EFD_NONBLOCK)?);
        }
        let gsis = routing.allocate(vectors);
        Ok(VirtioPci {
            cfg,
            msix_cap: msix_off,
            msix: MsixTable::new(vectors),
            routing,
            gsis,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            config_generation: 0,
            queue_select: 0,
            queues: vec![
                Queue {
                    size: device.max_queue_size(),
                    vector: NO_VECTOR,
                    ..Default::default()
                };
                usize::from(n)
            ],
            kicks,
            calls,
            ioevents_at: None,
            irqfds: vec![None; usize::from(n)],
            active: false,
            notify_exits: Arc::new(AtomicU64::new(0)),
            stopped: None,
            device,
        })
    }

    fn name(&self) -> String {
        self.device.name().to_string()
    }

    /// Whether the driver started it (its backend serves queues).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device's name (a disk's).
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// The enabled queues, as the device starts them.
    fn setups<'a>(
        queues: &[Queue],
        kicks: &'a [EventFd],
        calls: &'a [EventFd],
    ) -> Vec<QueueSetup<'a>> {
        queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| QueueSetup {
                index: i as u16,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &kicks[i],
                call: &calls[i],
            })
            .collect()
    }

    /// Saves the function with the VM paused. Its queues stop once their requests in flight
    /// have completed, and stay stopped until `resume_queues` (or for good, when the VM
    /// leaves this process).
    pub fn save(
        &mut self,
        slot: u8,
        mut b: vmm_proto::state_capnp::virtio_pci::Builder,
    ) -> Result<(), VirtioError> {
        if self.active && self.stopped.is_none() {
            self.stopped = Some(self.device.stop_queues()?);
        }
        let bases = self.stopped.clone().unwrap_or_default();
        b.set_slot(slot);
        b.set_name(self.device.name());
        self.cfg.save(b.reborrow().init_config());
        b.set_device_feature_select(self.device_feature_select);
        b.set_driver_feature_select(self.driver_feature_select);
        b.set_driver_features(self.driver_features);
        b.set_status(self.status);
        b.set_config_vector(self.config_vector);
        b.set_queue_select(self.queue_select);
        b.set_active(self.active);
        b.set_device_config(&self.device.config_bytes());
        let mut qs = b.reborrow().init_queues(self.queues.len() as u32);
        for (i, q) in self.queues.iter().enumerate() {
            let mut e = qs.reborrow().get(i as u32);
            e.set_size(q.size);
            e.set_vector(q.vector);
            e.set_enabled(q.enabled);
            e.set_desc(q.desc);
            e.set_avail(q.avail);
            e.set_used(q.used);
            let base = bases.iter().find(|(n, _)| usize::from(*n) == i);
            e.set_base(base.map_or(0, |(_, b)| *b));
        }
        b.set_msix_enabled(self.msix.enabled);
        b.set_msix_masked(self.msix.function_masked);
        let mut m = b.init_msix(self.msix.entries.len() as u32);
        for (i, v) in self.msix.entries.iter().enumerate() {
            let mut e = m.reborrow().get(i as u32);
            e.set_addr(v.addr);
            e.set_data(v.data);
            e.set_masked(v.masked);
        }
        Ok(())
    }

    /// The VM goes on after a snapshot: its queues start again where they stopped.
    pub fn resume_queues(&mut self) -> Result<(), VirtioError> {
        let Some(bases) = self.stopped.take() else {
            return Ok(());
        };
        let features = self.driver_features;
        let setups = Self::setups(&self.queues, &self.kicks, &self.calls);
        let r = self.device.start_queues(features, &setups, &bases);
        drop(setups);
        r
    }

    /// Takes a saved function's state into this (new, unstarted) one, and starts its queues
    /// where the saved ones stopped.
    pub fn restore(
        &mut self,
        r: vmm_proto::state_capnp::virtio_pci::Reader,
    ) -> Result<(), VirtioError> {
        let e = StateError::read("its state");
        let queues = r.get_queues().map_err(&e)?;
        let msix = r.get_msix().map_err(&e)?;
        if queues.len() as usize != self.queues.len()
            || msix.len() as usize != self.msix.entries.len()
        {
            return Err(StateError::Queues(
                queues.len() as usize,
                msix.len() as usize,
                self.queues.len(),
                self.msix.entries.len(),
            )
            .into());
        }
        let max = self.device.max_queue_size();
        let mut qs = Vec::new();
        let mut bases = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            if q.get_size() > max
                || (q.get_vector() != NO_VECTOR
                    && usize::from(q.get_vector()) >= msix.len() as usize)
            {
                return Err(StateError::Queue(
                    i,
                    q.get_size(),
                    q.get_vector(),
                    max,
                    msix.len() as usize,
                )
                .into());
            }
            qs.push(Queue {
                size: q.get_size(),
                vector: q.get_vector(),
                enabled: q.get_enabled(),
                desc: q.get_desc(),
                avail: q.get_avail(),
                used: q.get_used(),
            });
            bases.push((i as u16, q.get_base()));
        }
        let unknown = r.get_driver_features() & !self.offered();
        if unknown != 0 {
            return Err(StateError::Features(unknown).into());
        }
        self.cfg.restore(r.get_config().map_err(&e)?)?;
        self.device
            .restore_config(r.get_device_config().map_err(&e)?)?;
        self.device_feature_select = r.get_device_feature_select();
        self.driver_feature_select = r.get_driver_feature_select();
        self.driver_features = r.get_driver_features();
        self.status = r.get_status();
        self.config_vector = r.get_config_vector();
        self.queue_select = r.get_queue_select();
        self.queues = qs;
        self.msix.enabled = r.get_msix_enabled();
        self.msix.function_masked = r.get_msix_masked();
        for (i, m) in msix.iter().enumerate() {
            self.msix.entries[i] = msix::Entry {
                addr: m.get_addr(),
                data: m.get_data(),
                masked: m.get_masked(),
            };
            self.route_vector(i);
        }
        if r.get_active() {
            self.set_ioevents(self.cfg.bar_addr(0));
            let features = self.driver_features;
            let setups = Self::setups(&self.queues, &self.kicks, &self.calls);
            let started = self.device.start_queues(features, &setups, &bases);
            drop(setups);
            started?;
            self.active = true;
            self.update_interrupts();
        }
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.set_ioevents(None);
        for q in 0..self.irqfds.len() {
            self.set_irqfd(q, None);
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        let max = self.device.max_queue_size();
        for q in &mut self.queues {
            *q = Queue {
                size: max,
                vector: NO_VECTOR,
                ..Default::default()
            };
        }
        // Drain stale signals so that a new driver does not see old kicks.
        for e in self.kicks.iter().chain(self.calls.iter()) {
            let _ = e.read();
        }
    }

    /// (Re)registers the kick ioeventfds at the BAR's current address, or removes them.
    fn set_ioevents(&mut self, at: Option<u64>) {
        if self.ioevents_at == at {
            return;
        }
        let vm = self.routing.vm();
        if let Some(old) = self.ioevents_at.take() {
            for (q, k) in self.kicks.iter().enumerate() {
                let addr =
                    IoEventAddress::Mmio(old + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER));
                if let Err(e) = vm.unregister_ioevent(k, &addr, NoDatamatch) {
                    log::warn!("{}: cannot remove queue {q}'s ioeventfd: {e}", self.name());
                }
            }
        }
        if let Some(base) = at {
            for (q, k) in self.kicks.iter().enumerate() {
                let addr =
                    IoEventAddress::Mmio(base + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER));
                if let Err(e) = vm.register_ioevent(k, &addr, NoDatamatch) {
                    log::warn!(
                        "{}: cannot register queue {q}'s ioeventfd ({e}); its kicks will exit to vmm-core",
                        self.name()
                    );
                }
            }
            self.ioevents_at = Some(base);
        }
    }

    fn set_irqfd(&mut self, q: usize, gsi: Option<u32>) {
        if self.irqfds[q] == gsi {
            return;
        }
        let vm = self.routing.vm();
        if let Some(old) = self.irqfds[q].take() {
            if let Err(e) = vm.unregister_irqfd(&self.calls[q], old) {
                log::warn!("{}: cannot remove queue {q}'s irqfd: {e}", self.name());
            }
        }
        if let Some(new) = gsi {
            match vm.register_irqfd(&self.calls[q], new) {
                Ok(()) => self.irqfds[q] = Some(new),
                Err(e) => log::warn!("{}: cannot route queue {q}'s interrupt: {e}", self.name()),
            }
        }
    }

    /// Makes every queue's irqfd match its vector's MSI-X state.
    fn update_interrupts(&mut self) {
        for q in 0..self.queues.len() {
            let v = self.queues[q].vector;
            let want = (self.active && self.msix.deliverable(v)).then(|| self.gsis[usize::from(v)]);
            self.set_irqfd(q, want);
        }
    }

    fn route_vector(&self, v: usize) {
        let e = self.msix.entries[v];
        if let Err(e) = self.routing.set_msi(self.gsis[v], e.addr, e.data) {
            log::warn!("{}: cannot route MSI-X vector {v}: {e}", self.name());
        }
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select));
        let v: u64 = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.offered() & 0xffff_ffff,
                1 => self.offered() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let qs = usize::from(self.queue_select);
        let ready = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0;
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if !ready => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            0x10 => {
                self.config_vector = if (v as u16) < self.msix.entries.len() as u16 {
                    v as u16
                } else {
                    NO_VECTOR
                }
            }
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            _ if qs >= self.queues.len() => {}
            0x18 if !self.active => {
                let size = v as u16;
                // Split queues: a power of two no larger than the device's maximum.
                if size.is_power_of_two() && size <= self.device.max_queue_size() {
                    self.queues[qs].size = size;
                }
            }
            0x1a => {
                let vector = v as u16;
                self.queues[qs].vector = if usize::from(vector) < self.msix.entries.len() {
                    vector
                } else {
                    NO_VECTOR
                };
                self.update_interrupts();
            }
            0x1c if !self.active => self.queues[qs].enabled = v & 1 == 1,
            0x20 if !self.active => set_part(&mut self.queues[qs].desc, data, 0),
            0x24 if !self.active => set_part(&mut self.queues[qs].desc, data, 4),
            0x28 if !self.active => set_part(&mut self.queues[qs].avail, data, 0),
            0x2c if !self.active => set_part(&mut self.queues[qs].avail, data, 4),
            0x30 if !self.active => set_part(&mut self.queues[qs].used, data, 0),
            0x34 if !self.active => set_part(&mut self.queues[qs].used, data, 4),
            _ => {}
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered();
            if unknown != 0 || self.driver_features & F_VERSION_1 == 0 {
                log::warn!(
                    "{}: the driver asked for features {:#x} (offered {:#x}; VERSION_1 is required); FEATURES_OK refused",
                    self.name(),
                    self.driver_features,
                    self.offered()
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        self.status = status;
        if status & STATUS_DRIVER_OK != 0 && !self.active {
            if status & STATUS_FEATURES_OK == 0 {
                log::warn!("{}: DRIVER_OK without FEATURES_OK", self.name());
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            self.set_ioevents(self.cfg.bar_addr(0));
            let setups = Self::setups(&self.queues, &self.kicks, &self.calls);
            let result = self.device.activate(self.driver_features, &setups);
            let started = setups.len();
            drop(setups);
            match result {
                Ok(()) => {
                    self.active = true;
                    self.update_interrupts();
                    log::info!(
                        "{}: the driver is ready ({} queue(s), features {:#x})",
                        self.name(),
                        started,
                        self.driver_features
                    );
                }
                Err(e) => {
                    log::warn!("{}: cannot start the device: {e}", self.name());
                    self.status |= STATUS_NEEDS_RESET;
                }
            }
        }
    }
}

fn set_part(field: &mut u64, data: &[u8], at: usize) {
    let mut b = field.to_le_bytes();
    let n = data.len().min(8 - at);
    b[at..at + n].copy_from_slice(&data[..n]);
    *field = u64::from_le_bytes(b);
}

impl PciDevice for VirtioPci {
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        let ctrl = self.msix_cap + 2;
        if offset <= ctrl + 1 && offset + len > ctrl {
            let b = self.cfg.bytes(ctrl, 2);
            let mc = u16::from_le_bytes([b[0], b[1]]);
            let (enabled, masked) = (mc & msix::MSIX_ENABLE != 0, mc & msix::FUNCTION_MASK != 0);
            if (enabled, masked) != (self.msix.enabled, self.msix.function_masked) {
                self.msix.enabled = enabled;
                self.msix.function_masked = masked;
                self.update_interrupts();
            }
        }
    }

    fn bars_changed(&mut self) {
        if self.active {
            self.set_ioevents(self.cfg.bar_addr(0));
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_read(o - COMMON, data),
            // No INTx: interrupts are MSI-X only, so the ISR never has a bit set.
            o if (ISR..ISR + 4).contains(&o) => data.fill(0),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.read(o - MSIX_TABLE, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o - COMMON, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE, data)
            }
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => {
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                self.notify_exits.fetch_add(1, Ordering::Relaxed);
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                if let Some(v) = self.msix.write(o - MSIX_TABLE, data) {
                    self.route_vector(v);
                    self.update_interrupts();
                }
            }
            _ => {}
        }
    }
}
