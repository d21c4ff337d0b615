//! The whole VM's state in one typed message (proto/schema/state.capnp's VmState): taken from a
//! paused VM, and put into a new one before its vCPUs run. Each part is saved and restored by
//! its owner; this file only puts the parts together and checks they fit before any applies.

use crate::kvm_state::KvmState;
use crate::vcpu::state::VcpuState;
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};
use vmm_devices::platform::cpu_hotplug::CpuHotplug;
use vmm_devices::platform::{ged, serial};
use vmm_devices::virtio::pci::VirtioPci;
use vmm_devices::virtio::VirtioError;
use vmm_proto::state::StateError;
use vmm_proto::state_capnp::vm_state;

/// Why the paused VM's state could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Kvm(#[from] crate::kvm_state::KvmStateError),
    #[error("PCI 00:{0:02x}.0: {1}")]
    Pci(u8, VirtioError),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error("the vCPUs did not save their state within 10 s")]
    Timeout,
    #[error("the recording's marks: {0}")]
    Marks(String),
}

/// The VM's devices, as a save or a restore reaches them.
pub struct Devices<'a> {
    pub vm: &'a VmFd,
    pub uart: &'a Mutex<serial::SerialDevice>,
    pub ged: &'a Mutex<ged::Ged>,
    pub hotplug: &'a Mutex<CpuHotplug>,
    /// The virtio-pci functions, by slot.
    pub pci: &'a [(u8, Arc<Mutex<VirtioPci>>)],
}

/// What a save needs besides the devices.
pub struct Taken<'a> {
    pub vcpus: Vec<VcpuState>,
    /// kvmclock as it stopped at the pause (None: read it now).
    pub clock: Option<kvm_bindings::kvm_clock_data>,
    pub memory: u64,
    pub max_cpus: u32,
    pub paused: bool,
    pub boot: Boot,
    /// Recording: where each log stands, taken once the queues stopped.
    pub marks: Option<&'a dyn Fn() -> Result<crate::record_marks::RecordMarks, String>>,
}

/// What a reset boots: the kernel and initramfs (absolute paths; "" for none) and the
/// command line. A VM that moves keeps them: the place it lands must boot the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub kernel: String,
    pub initramfs: String,
    pub cmdline: String,
}

impl Boot {
    pub fn of(config: &crate::config::VmConfig) -> Boot {
        Boot {
            kernel: config.kernel.display().to_string(),
            initramfs: config
                .initramfs
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cmdline: config.user_cmdline.clone(),
        }
    }

    /// The first difference between what the VM was booted with (`saved`) and what a reset
    /// here would boot, named by its flag. The files must be the same (this vmm-core opened
    /// its own before the VM came, and opens none later); the command line, when --cmdline
    /// was not given here, comes with the VM (`cmdline_given`).
    fn check(saved: &Boot, here: &Boot, cmdline_given: bool) -> Result<(), StateError> {
        let mut fields = vec![
            ("--kernel", &saved.kernel, &here.kernel),
            ("--initramfs", &saved.initramfs, &here.initramfs),
        ];
        if cmdline_given {
            fields.push(("--cmdline", &saved.cmdline, &here.cmdline));
        }
        for (flag, a, b) in fields {
            if a != b {
                return Err(StateError::Boot {
                    flag,
                    saved: a.clone(),
                    here: b.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Saves the paused VM's state (the virtio queues stop here, once what they hold completed).
pub fn save(d: &Devices, t: &Taken<'_>) -> Result<Vec<u8>, SaveError> {
    let mut kvm = KvmState::save(d.vm)?;
    if let Some(c) = t.clock {
        kvm.clock = c;
    }
    let mut msg = capnp::message::Builder::new_default();
    let mut b = msg.init_root::<vm_state::Builder>();
    b.set_memory(t.memory);
    b.set_max_cpus(t.max_cpus);
    b.set_paused(t.paused);
    {
        let mut boot = b.reborrow().init_boot();
        boot.set_kernel(&t.boot.kernel);
        boot.set_initramfs(&t.boot.initramfs);
        boot.set_cmdline(&t.boot.cmdline);
    }
    {
        let mut l = b.reborrow().init_vcpus(t.vcpus.len() as u32);
        for (i, v) in t.vcpus.iter().enumerate() {
            v.write(l.reborrow().get(i as u32));
        }
    }
    kvm.write(b.reborrow().init_kvm());
    d.uart.lock().unwrap().save(b.reborrow().init_serial());
    d.ged.lock().unwrap().save(b.reborrow().init_ged());
    d.hotplug
        .lock()
        .unwrap()
        .save(b.reborrow().init_cpu_hotplug());
    let mut l = b.reborrow().init_pci(d.pci.len() as u32);
    for (i, (slot, dev)) in d.pci.iter().enumerate() {
        let mut dev = dev.lock().unwrap();
        dev.save(*slot, l.reborrow().get(i as u32))
            .map_err(|e| SaveError::Pci(*slot, e))?;
    }
    // The queues stopped with what they held answered: every log is where the guest is.
    if let Some(take) = t.marks {
        let marks = take().map_err(SaveError::Marks)?;
        marks.write(b.init_recording());
    }
    Ok(capnp::serialize::write_message_to_words(&msg))
}

/// A saved state, read and checked against this VM's shape before anything is applied.
pub struct Restore {
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmState,
    pub paused: bool,
    /// The command line the VM was booted with (its resets boot with it), if the state says.
    pub cmdline: Option<String>,
    msg: capnp::message::Reader<capnp::serialize::OwnedSegments>,
}

impl Restore {
    pub fn read(
        bytes: &[u8],
        memory: u64,
        max_cpus: u32,
        boot: &Boot,
        cmdline_given: bool,
    ) -> Result<Restore, StateError> {
        let opts = capnp::message::ReaderOptions {
            traversal_limit_in_words: Some(64 << 20),
            nesting_limit: 64,
        };
        let msg = capnp::serialize::read_message(&mut &bytes[..], opts)
            .map_err(StateError::read("the VM's state is not readable"))?;
        let mut cmdline = None;
        let (vcpus, kvm, paused) = {
            let r = msg
                .get_root::<vm_state::Reader>()
                .map_err(StateError::read("the VM's state"))?;
            if r.get_memory() != memory || r.get_max_cpus() != max_cpus {
                return Err(StateError::Shape {
                    saved: (r.get_memory(), r.get_max_cpus()),
                    here: (memory, max_cpus),
                });
            }
            // A state from before the boot files travelled has none: nothing to compare.
            if r.has_boot() {
                let b = r.get_boot().map_err(StateError::read("the boot files"))?;
                let text = |t: capnp::Result<capnp::text::Reader>| -> Result<String, StateError> {
                    t.and_then(|t| Ok(t.to_str()?.to_string()))
                        .map_err(StateError::read("the boot files"))
                };
                let saved = Boot {
                    kernel: text(b.get_kernel())?,
                    initramfs: text(b.get_initramfs())?,
                    cmdline: text(b.get_cmdline())?,
                };
                Boot::check(&saved, boot, cmdline_given)?;
                cmdline = Some(saved.cmdline);
            }
            let vcpus = r
                .get_vcpus()
                .map_err(StateError::read("the vCPUs' state"))?
                .iter()
                .map(VcpuState::read)
                .collect::<Result<Vec<_>, StateError>>()?;
            if vcpus.is_empty() || vcpus.iter().any(|v| v.id >= max_cpus) {
                return Err(StateError::VcpuIds(
                    vcpus.iter().map(|v| v.id).collect(),
                    max_cpus,
                ));
            }
            let kvm = KvmState::read(r.get_kvm().map_err(StateError::read("the KVM state"))?)?;
            (vcpus, kvm, r.get_paused())
        };
        Ok(Restore {
            vcpus,
            kvm,
            paused,
            cmdline,
            msg,
        })
    }

    /// Puts the VM-wide and device state in place (the vCPUs' comes after, on their fds).
    pub fn apply(
        &self,
        d: &Devices,
        new_uart: impl FnOnce(
            vmm_proto::state_capnp::serial::Reader,
        ) -> Result<serial::SerialDevice, StateError>,
    ) -> Result<(), StateError> {
        let e = StateError::read("the VM's state");
        let r = self.msg.get_root::<vm_state::Reader>().map_err(&e)?;
        let pci = r.get_pci().map_err(&e)?;
        if pci.len() as usize != d.pci.len() {
            return Err(StateError::PciCount(pci.len() as usize, d.pci.len()));
        }
        self.kvm
            .restore(d.vm)
            .map_err(|e| StateError::Apply(Box::new(e)))?;
        *d.uart.lock().unwrap() = new_uart(r.get_serial().map_err(&e)?)?;
        d.ged.lock().unwrap().restore(r.get_ged().map_err(&e)?);
        d.hotplug
            .lock()
            .unwrap()
            .restore(r.get_cpu_hotplug().map_err(&e)?)?;
        for p in pci.iter() {
            let slot = p.get_slot();
            let name = p
                .get_name()
                .map_err(&e)?
                .to_str()
                .map_err(|_| StateError::NotText("a PCI device's name"))?;
            let dev = d
                .pci
                .iter()
                .find(|(s, _)| *s == slot)
                .map(|(_, d)| d)
                .ok_or_else(|| StateError::PciEmpty(name.into(), slot))?;
            let mut dev = dev.lock().unwrap();
            if dev.device_name() != name {
                return Err(StateError::PciOther(
                    name.into(),
                    slot,
                    dev.device_name().to_string(),
                ));
            }
            dev.restore(p).map_err(|e| match e {
                VirtioError::State(e) => e.within(name),
                e => StateError::Apply(Box::new(e)).within(name),
            })?;
        }
        Ok(())
    }
}
