//! Building one boot of the guest: guest RAM, the KVM VM with its in-kernel irqchip and PIT,
//! the platform's devices on the I/O bus, a virtio-blk function per disk on the PCI bus, and
//! the vCPUs (created, not yet running). An incoming VM's RAM and state go in before any vCPU
//! runs.

use super::console::{serial_out, ConsoleInput};
use super::{Resources, VmError};
use crate::api;
use crate::boot;
use crate::config::VmConfig;
use crate::control::VmEvent;
use crate::helpers::migrated::MigratedError;
use crate::kvm::Kvm;
use crate::memory::Memory;
use crate::vcpu::set::Vcpus;
use crate::vcpu::RunState;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_devices::bus::IoBus;
use vmm_devices::platform::cpu_hotplug::{self, CpuHotplug};
use vmm_devices::platform::pci_hotplug::{self, PciHotplug};
use vmm_devices::platform::{ged, power, pvpanic, serial};
use vmm_devices::virtio::pci::VirtioPci;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the TSS and identity-map pages KVM needs on Intel live: just below the BIOS area at
/// the top of the 32-bit hole, away from RAM and MMIO.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A virtio-pci function on the bus, by slot.
pub(super) type Transports = Vec<(u8, Arc<Mutex<VirtioPci>>)>;

/// One boot of the guest. Fields drop in this order: the vCPUs and devices before the VM, and
/// the VM before the memory it maps.
pub(super) struct Guest {
    pub vcpus: Vcpus,
    pub state: Arc<RunState>,
    pub bus: Arc<IoBus>,
    pub transports: Transports,
    /// Each disk's count of queue kicks that reached vmm-core (they should not).
    pub kicks_missed: KicksMissed,
    pub hotplug: Arc<Mutex<CpuHotplug>>,
    /// Bus 0 (devices come and go on it: PCI hotplug), its controller, and the MSI routes
    /// a new function's vectors get.
    pub pci: Arc<vmm_devices::pci::PciBus>,
    pub pci_hotplug: Arc<Mutex<PciHotplug>>,
    pub routing: Arc<vmm_devices::pci::msix::Routing>,
    pub ged: Arc<Mutex<ged::Ged>>,
    pub uart: Arc<Mutex<serial::SerialDevice>>,
    pub vm: Arc<VmFd>,
    pub memory: Memory,
}

/// What comes in with a migration or snapshot, once its state is in the devices.
pub(super) struct Incoming {
    pub uri: String,
    /// The flag that named it: --incoming or --restore.
    pub flag: &'static str,
    pub restore: crate::snapshot::Restore,
    /// The source switched to post-copy: RAM is still coming (through migrated's page
    /// server, which serves this VM's faults).
    pub postcopy: bool,
}

impl Guest {
    /// The VM's devices, as a save or a restore reaches them.
    pub fn devices(&self) -> crate::snapshot::Devices<'_> {
        crate::snapshot::Devices {
            vm: &self.vm,
            uart: &self.uart,
            ged: &self.ged,
            hotplug: &self.hotplug,
            pci: &self.transports,
        }
    }

    /// Builds the VM and its devices, loads the kernel (or takes the incoming VM), and creates
    /// the boot vCPUs.
    pub fn build(
        kvm: &Kvm,
        config: &VmConfig,
        (tx, rx): (&Sender<VmEvent>, &Receiver<VmEvent>),
        console: &ConsoleInput,
        res: &Resources,
        incoming: Option<&str>,
    ) -> Result<(Guest, Vec<VcpuFd>, Option<Incoming>), VmError> {
        // The first boot's memory and VM were made while the helpers started.
        let (memory, vm) = match res.early.take() {
            Some(made) => made?,
            None => memory_and_vm(kvm, config.memory)?,
        };
        let vm = Arc::new(vm);
        // A VM coming in (a migration or a snapshot) brings its RAM and state; one that boots
        // gets the kernel.
        let entry = match incoming {
            None => {
                let entry = boot::load(&memory.guest, config, res.boot)?;
                log::debug!("guest entry: {entry:?}");
                Some(entry)
            }
            Some(_) => None,
        };
        let serial_irq = irq(&vm, serial::COM1_IRQ, "the serial interrupt")?;
        let serial_irq_restore = serial_irq.try_clone().map_err(VmError::EventFd)?;
        let uart = Arc::new(Mutex::new(serial::SerialDevice::new(
            serial_irq,
            serial_out(console),
        )));
        *console.target.lock().unwrap() = Some(uart.clone());
        let ged = Arc::new(Mutex::new(ged::Ged::new(irq(
            &vm,
            ged::GSI,
            "the GED interrupt",
        )?)));
        let hotplug = Arc::new(Mutex::new(CpuHotplug::new(config.cpus, config.max_cpus, {
            let tx = tx.clone();
            Box::new(move |e| {
                let _ = tx.send(VmEvent::Hotplug(e));
            })
        })));
        let pci_hotplug = Arc::new(Mutex::new(PciHotplug::new({
            let tx = tx.clone();
            Box::new(move |slots| {
                let _ = tx.send(VmEvent::PciEjected(slots));
            })
        })));
        let (pci, routing, transports, kicks_missed) = pci_bus(&vm, &memory, res)?;
        let bus = Arc::new(io_bus(pci.clone(), &uart, &ged, &hotplug, &pci_hotplug));
        let state = Arc::new(RunState::default());
        let vcpus = Vcpus::new(crate::vcpu::set::Common {
            bus: bus.clone(),
            mem: memory.guest.clone(),
            state: state.clone(),
            events: tx.clone(),
            pvm: config.pvm,
            print_boot_times: config.print_boot_times,
            max: config.max_cpus,
            base_cpuid: kvm
                .fd
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| VmError::Setup("CPUID", e))?,
            seccomp: config
                .sandbox
                .then(|| config.seccomp.parse().expect("clap checked it")),
        });
        let mut guest = Guest {
            vcpus,
            state,
            bus,
            transports,
            kicks_missed,
            hotplug,
            pci,
            pci_hotplug,
            routing,
            ged,
            uart,
            vm,
            memory,
        };
        let incoming = match incoming {
            Some(uri) => {
                let restore = guest.take_incoming(
                    uri,
                    config,
                    (tx, rx),
                    res,
                    serial_irq_restore,
                    serial_out(console),
                )?;
                Some(Incoming {
                    uri: uri.to_string(),
                    flag: config.incoming_flag,
                    restore: restore.0,
                    postcopy: restore.1,
                })
            }
            None => None,
        };
        let fds = guest.create_vcpus(kvm, config, res, entry, incoming.as_ref())?;
        if incoming.as_ref().is_some_and(|i| i.flag == "--restore") {
            guest.new_generation()?;
        }
        Ok((guest, fds, incoming))
    }

    /// A restored VM is a new instance of the one saved (there may be others from the same
    /// snapshot): it gets this process's generation ID, and the GED tells the guest, which
    /// runs its handler once its vCPUs (restored already) run.
    fn new_generation(&self) -> Result<(), VmError> {
        let id = crate::boot::vmgenid::write(&self.memory.guest)?;
        log::info!(
            "VM generation ID {} (a restored VM gets a new one)",
            crate::boot::vmgenid::format(&id)
        );
        self.ged
            .lock()
            .unwrap()
            .notify(ged::EVENT_VMGENID)
            .map_err(VmError::EventFd)
    }

    /// Every boot vCPU exists before any runs: the boot vCPU starts the others by IPI. An
    /// incoming VM's vCPUs get their saved state.
    fn create_vcpus(
        &mut self,
        kvm: &Kvm,
        config: &VmConfig,
        res: &Resources,
        entry: Option<boot::Entry>,
        incoming: Option<&Incoming>,
    ) -> Result<Vec<VcpuFd>, VmError> {
        let mut fds = Vec::new();
        match incoming {
            None => {
                for id in 0..config.cpus {
                    let entry = if id == 0 { entry } else { None };
                    fds.push(self.vcpus.prepare(&self.vm, id, entry)?.0);
                }
            }
            Some(inc) => {
                for v in &inc.restore.vcpus {
                    let (fd, _) = self.vcpus.prepare(&self.vm, v.id, None)?;
                    if let Err(e) = v.restore(&fd) {
                        let m = res.migrated.expect("an incoming VM has migrated");
                        let _ = crate::migration::started(m, false, crate::error_chain(&e));
                        return Err(VmError::incoming(inc.flag, &inc.uri, e));
                    }
                    fds.push(fd);
                }
            }
        }
        if self.state.msrs.get().is_none() {
            let msrs = crate::vcpu::state::saveable_msrs(&kvm.fd, &fds[0])?;
            let _ = self.state.msrs.set(msrs);
        }
        Ok(fds)
    }

    /// Takes an incoming VM (its RAM straight into the memfd, through migrated) and puts its
    /// state into the devices; the vCPUs' state comes back to be put on their fds.
    fn take_incoming(
        &self,
        uri: &str,
        config: &VmConfig,
        (tx, rx): (&Sender<VmEvent>, &Receiver<VmEvent>),
        res: &Resources,
        serial_irq: EventFd,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<(crate::snapshot::Restore, bool), VmError> {
        let m = res
            .migrated
            .ok_or_else(|| VmError::incoming(config.incoming_flag, uri, MigratedError::Gone))?;
        let memfd = self.memory.memfd.try_clone().map_err(VmError::EventFd)?;
        log::info!("{} {uri}: waiting for the VM", config.incoming_flag);
        let start = Instant::now();
        // The stream comes in on a thread of its own; meanwhile this one answers the API and
        // the signals (a destination waits as long as it takes, and must stay stoppable).
        {
            // (An Arc: the last Migrated to go ends the helper.)
            let (m, uri, tls, tx) = (
                std::sync::Arc::clone(m),
                uri.to_string(),
                config.incoming_tls.clone(),
                tx.clone(),
            );
            let (memory, cpus, wait) = (config.memory, config.max_cpus, config.incoming_timeout);
            let peeked = config.incoming_peeked;
            let lazy = config.lazy;
            std::thread::Builder::new()
                .name("incoming".into())
                .spawn(move || {
                    let got = crate::migration::receive(
                        &m, &uri, &tls, memfd, memory, cpus, wait, peeked, lazy,
                    )
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
                    let _ = tx.send(VmEvent::Arrived(got));
                })
                .map_err(|e| VmError::Thread("incoming", e))?;
        }
        let (bytes, n, postcopy) = match wait_for_arrival(rx)? {
            Ok(got) => got,
            Err(e) => return Err(VmError::Incoming(config.incoming_flag, uri.to_string(), e)),
        };
        if postcopy {
            if config.lazy {
                log::info!(
                    "{} {uri} --lazy: indexed in {} ms; the VM runs while its RAM loads from the snapshot",
                    config.incoming_flag,
                    start.elapsed().as_millis()
                );
            } else {
                log::info!(
                    "{} {uri}: {} MiB received in {} ms; the source switched to post-copy: the VM runs while the rest comes",
                    config.incoming_flag,
                    n >> 20,
                    start.elapsed().as_millis()
                );
            }
            // Every process that maps guest RAM waits for its missing pages from here on,
            // before any of them (a vCPU, blockd's queues) reads one.
            if let Err(e) = self.serve_postcopy(res, m) {
                let _ = crate::migration::started(m, false, crate::error_chain(&e));
                return Err(VmError::incoming(config.incoming_flag, uri, e));
            }
        } else {
            log::info!(
                "{} {uri}: {} MiB received in {} ms, every check passed",
                config.incoming_flag,
                n >> 20,
                start.elapsed().as_millis()
            );
        }
        let boot = crate::snapshot::Boot::of(config);
        let restored = crate::snapshot::Restore::read(
            &bytes,
            config.memory,
            config.max_cpus,
            &boot,
            config.cmdline_given,
        )
        .and_then(|r| {
            r.apply(&self.devices(), |s| {
                serial::SerialDevice::restored(serial_irq, serial_out, s)
            })?;
            Ok(r)
        });
        restored.map(|r| (r, postcopy)).map_err(|e| {
            let _ = crate::migration::started(m, false, crate::error_chain(&e));
            VmError::incoming(config.incoming_flag, uri, e)
        })
    }

    /// Post-copy: registers guest RAM on the userfaultfd and has migrated serve its faults.
    fn serve_postcopy(
        &self,
        res: &Resources,
        m: &crate::helpers::migrated::Migrated,
    ) -> Result<(), crate::migration::MigrationError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let uffd = match res.uffd {
            Some(Ok(u)) => u,
            Some(Err(e)) => return Err(crate::migration::MigrationError::Uffd(e.to_string())),
            None => {
                return Err(crate::migration::MigrationError::Uffd(
                    "no userfaultfd was made for this VM".into(),
                ))
            }
        };
        let mut maps = Vec::new();
        for r in self.memory.guest.iter() {
            let (va, len) = (r.as_ptr() as u64, r.len());
            uffd.register(va, len)
                .map_err(|e| crate::migration::MigrationError::Uffd(e.to_string()))?;
            maps.push((va, r.start_addr().0, len));
        }
        crate::migration::serve_faults(m, "vmm-core", &self.memory.memfd, uffd.fd(), maps, true)?;
        // Each device whose backend maps guest RAM itself (blockd) joins with a userfaultfd
        // of its own (vhost-user's POSTCOPY_ADVISE), before its queues start.
        for (_, t) in &self.transports {
            let mut t = t.lock().unwrap();
            let name = t.device_name().to_string();
            let joined = t
                .device_mut()
                .postcopy_advise()
                .map_err(|e| crate::migration::MigrationError::Uffd(e.to_string()))?;
            if let Some((file, maps)) = joined {
                use std::os::fd::AsFd;
                crate::migration::serve_faults(
                    m,
                    &format!("blockd ({name})"),
                    &self.memory.memfd,
                    file.as_fd(),
                    maps,
                    false,
                )?;
                t.device_mut()
                    .postcopy_served()
                    .map_err(|e| crate::migration::MigrationError::Uffd(e.to_string()))?;
                log::info!("{name}: its backend joined post-copy");
            }
        }
        Ok(())
    }

    /// Makes what `info` and `cpus` report match the vCPUs.
    pub fn publish_vcpus(&self, shared: &api::Shared) {
        let mut st = shared.status.lock().unwrap();
        st.vcpus = self.vcpus.status();
        st.vcpus_created = self.vcpus.created;
        st.cpus = self.vcpus.running.len() as u32;
    }
}

/// The guest's memory and the KVM VM, the memory registered. (Memory is created before the
/// VM so that it is dropped after it.)
fn memory_and_vm(kvm: &Kvm, size: u64) -> Result<(Memory, VmFd), VmError> {
    let memory = Memory::new(size)?;
    let vm = create_vm(kvm)?;
    memory.register(&vm)?;
    Ok((memory, vm))
}

/// The first boot's memory and VM, made on a thread of their own while vmm-core starts its
/// helpers: KVM_SET_USER_MEMORY_REGION waits for KVM's memory-slot readers (SRCU; 5 to 11 ms
/// under KVM-PVM, with under 1 ms of CPU), and KVM_CREATE_VM takes 1 to 3 ms; the helpers'
/// start is CPU-bound, so the two overlap. (A thread of vmm-core's set-up, with no system
/// call filter of its own: it makes nothing but these calls and ends with them; the first
/// build joins it.)
pub struct Early(Mutex<Option<std::thread::JoinHandle<Made>>>);

type Made = Result<(Memory, VmFd), VmError>;

impl Early {
    pub fn start(size: u64) -> Early {
        let made = std::thread::Builder::new()
            .name("vm-setup".into())
            .spawn(move || memory_and_vm(&Kvm::open()?, size));
        Early(Mutex::new(made.ok()))
    }

    /// The memory and VM it made (None: taken already, or no thread could start).
    pub fn take(&self) -> Option<Made> {
        let made = self.0.lock().unwrap().take()?;
        Some(made.join().unwrap_or_else(|_| {
            Err(VmError::Thread(
                "vm-setup",
                std::io::Error::other("it panicked"),
            ))
        }))
    }
}

/// The KVM VM with the in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.fd.create_vm().map_err(VmError::CreateVm)?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| VmError::Setup("the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Setup("the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Setup("the in-kernel PIT", e))?;
    Ok(vm)
}

/// An eventfd that raises `gsi` in the guest (an irqfd).
fn irq(vm: &VmFd, gsi: u32, what: &'static str) -> Result<EventFd, VmError> {
    let fd = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&fd, gsi)
        .map_err(|e| VmError::Setup(what, e))?;
    Ok(fd)
}

/// Each disk's count of queue kicks that reached vmm-core.
pub(super) type KicksMissed = Vec<(String, Arc<AtomicU64>)>;

/// A disk's virtio-blk function, connected to its vhost-user backend (not on a bus yet).
pub(super) fn disk_transport(
    memory: &Memory,
    routing: &Arc<vmm_devices::pci::msix::Routing>,
    d: &crate::helpers::blockd::DiskBackend,
) -> Result<VirtioPci, VmError> {
    let kind = vmm_devices::virtio::vhost_user::Kind::Blk;
    vhost_user_transport(memory, routing, (&d.name, &d.socket), kind, d.queues, |e| {
        VmError::DiskSetup(d.name.clone(), e)
    })
}

/// A virtio PCI function whose device (`kind`, with `queues`) is served over vhost-user:
/// (its name, the backend's socket); `failed` names a backend that cannot serve it.
fn vhost_user_transport(
    memory: &Memory,
    routing: &Arc<vmm_devices::pci::msix::Routing>,
    (name, socket): (&str, &std::path::Path),
    kind: vmm_devices::virtio::vhost_user::Kind,
    queues: u16,
    failed: impl FnOnce(vmm_devices::virtio::VirtioError) -> VmError,
) -> Result<VirtioPci, VmError> {
    let memfd = memory.memfd.try_clone().map_err(VmError::EventFd)?;
    let dev = vmm_devices::virtio::vhost_user::VhostUserDevice::connect(
        name,
        socket,
        kind,
        queues,
        memory.guest.clone(),
        memfd,
    )
    .map_err(failed)?;
    VirtioPci::new(Box::new(dev), routing.clone()).map_err(VmError::EventFd)
}

/// The PCI bus and its devices: a virtio-blk function per disk and the virtio-rng function,
/// each served over vhost-user.
#[allow(clippy::type_complexity)]
fn pci_bus(
    vm: &Arc<VmFd>,
    memory: &Memory,
    res: &Resources,
) -> Result<
    (
        Arc<vmm_devices::pci::PciBus>,
        Arc<vmm_devices::pci::msix::Routing>,
        Transports,
        KicksMissed,
    ),
    VmError,
> {
    let routing = Arc::new(vmm_devices::pci::msix::Routing::new(vm.clone()));
    let pci = vmm_devices::pci::PciBus::default();
    let mut kicks_missed = Vec::new();
    let mut transports = Vec::new();
    // Disks that ask for a slot (slot=) take it first; the others fill the rest in order.
    let disks = res.disks.lock().unwrap();
    let mut ordered: Vec<_> = disks.iter().collect();
    ordered.sort_by_key(|d| d.slot.is_none());
    for d in ordered {
        let transport = disk_transport(memory, &routing, d)?;
        kicks_missed.push((d.name.clone(), transport.notify_exits.clone()));
        let transport = Arc::new(Mutex::new(transport));
        *d.device.lock().unwrap() = Some(Arc::downgrade(&transport));
        let slot = pci
            .add_at(transport.clone(), d.slot)
            .ok_or_else(|| match d.slot {
                Some(s) => VmError::SlotTaken(d.name.clone(), s),
                None => VmError::NoPciSlot(d.name.clone()),
            })?;
        transports.push((slot, transport));
        log::debug!("{}: virtio-blk at PCI 00:{slot:02x}.0", d.name);
    }
    if let Some((socket, slot)) = res.rng {
        let kind = vmm_devices::virtio::vhost_user::Kind::Rng;
        let transport = vhost_user_transport(memory, &routing, ("rng0", socket), kind, 1, |e| {
            VmError::RngSetup(socket.to_path_buf(), e)
        })?;
        let transport = Arc::new(Mutex::new(transport));
        *slot.lock().unwrap() = Some(Arc::downgrade(&transport));
        let slot = pci
            .add(transport.clone())
            .ok_or_else(|| VmError::NoPciSlot("rng0".into()))?;
        transports.push((slot, transport));
        log::info!(
            "rng0: virtio-rng at PCI 00:{slot:02x}.0, served by {}",
            socket.display()
        );
    }
    Ok((Arc::new(pci), routing, transports, kicks_missed))
}

/// The port-I/O bus with the platform's devices, and MMIO to the PCI bus.
fn io_bus(
    pci: Arc<vmm_devices::pci::PciBus>,
    uart: &Arc<Mutex<serial::SerialDevice>>,
    ged: &Arc<Mutex<ged::Ged>>,
    hotplug: &Arc<Mutex<CpuHotplug>>,
    pci_hotplug: &Arc<Mutex<PciHotplug>>,
) -> IoBus {
    let mut bus = IoBus::default();
    bus.insert(
        vmm_devices::pci::CONFIG_ADDRESS_PORT,
        8,
        Arc::new(Mutex::new(vmm_devices::pci::Type1(pci.clone()))),
    );
    bus.mmio = Some(pci);
    bus.insert(ged::PORT, 1, ged.clone());
    bus.insert(cpu_hotplug::PORT, cpu_hotplug::LEN, hotplug.clone());
    bus.insert(pci_hotplug::PORT, pci_hotplug::LEN, pci_hotplug.clone());
    bus.insert(serial::COM1_BASE, 8, uart.clone());
    bus.insert(
        power::SLEEP_CONTROL_PORT,
        power::PORTS,
        Arc::new(Mutex::new(power::PowerDevice)),
    );
    bus.insert(
        power::I8042_COMMAND_PORT,
        1,
        Arc::new(Mutex::new(power::I8042)),
    );
    bus.insert(pvpanic::PORT, 1, Arc::new(Mutex::new(pvpanic::PvPanic)));
    bus
}

/// What the main thread does while an incoming VM is on its way: a stop signal, the console
/// escape or `vmmctl shutdown` ends the wait (the VM was never here); requests that need a
/// VM are refused; the arrival (or its failure) ends the wait.
fn wait_for_arrival(rx: &Receiver<VmEvent>) -> Result<crate::control::Arrival, VmError> {
    use crate::control::{ApiRequest, LoopError, MigrationRequest as M, Request};
    loop {
        let event = rx
            .recv()
            .expect("the signal thread holds a sender for the life of the process");
        match event {
            VmEvent::Arrived(got) => return Ok(got),
            VmEvent::Signal(_) | VmEvent::ConsoleEscape => return Err(VmError::Interrupted(event)),
            VmEvent::Api(ApiRequest {
                request: request @ Request::Shutdown { .. },
                reply,
            }) => {
                log::info!("stopped while waiting for the incoming VM (management API)");
                let _ = reply.send(Ok(()));
                let (reply, _) = futures::channel::oneshot::channel();
                return Err(VmError::Interrupted(VmEvent::Api(ApiRequest {
                    request,
                    reply,
                })));
            }
            VmEvent::Api(ApiRequest { reply, .. }) => {
                let _ = reply.send(Err(LoopError::NotArrived));
            }
            VmEvent::Migration(req) => match req {
                M::DirtyLog(_, r) | M::Continue(r) => {
                    let _ = r.send(Err(LoopError::NotArrived));
                }
                M::TakeDirty(r) => {
                    let _ = r.send(Err(LoopError::NotArrived));
                }
                M::Save(r) => {
                    let _ = r.send(Err(LoopError::NotArrived));
                }
                M::Memfd(r) => {
                    let _ = r.send(Err(LoopError::NotArrived));
                }
                M::Leave => {}
            },
            VmEvent::DiskStopped(disk, why) => {
                log::warn!("{disk} stopped before the VM arrived: {why}")
            }
            VmEvent::Disk(crate::control::DiskChange::Add(_, r)) => {
                let _ = r.send(Err(LoopError::NotArrived));
            }
            VmEvent::Disk(crate::control::DiskChange::Remove { reply, .. }) => {
                let _ = reply.send(Err(LoopError::NotArrived));
            }
            VmEvent::DumpVcpus
            | VmEvent::Vcpu(_)
            | VmEvent::Hotplug(_)
            | VmEvent::PciEjected(_)
            | VmEvent::PostcopyDone(_)
            | VmEvent::PostcopyPaused(_) => {}
        }
    }
}
