//! The VM's vCPUs over its life: created at boot, hot-added and hot-removed through the CPU
//! hotplug controller. KVM cannot destroy a vCPU, so a removed one's thread ends and its
//! `VcpuFd` is parked; the next hot-add of that id puts the parked fd back into its power-on
//! state (captured when it was created) and runs it again, without KVM_CREATE_VCPU.

use super::{Pristine, RunState, VcpuContext, VcpuError};
use crate::boot::Entry;
use crate::control::VmEvent;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_devices::bus::IoBus;
use vmm_devices::layout::GuestMemory;

pub struct VcpuThread {
    pub handle: JoinHandle<VcpuFd>,
    unplug: Arc<AtomicBool>,
}

/// What every vCPU thread shares.
pub struct Common {
    pub bus: Arc<IoBus>,
    pub mem: GuestMemory,
    pub state: Arc<RunState>,
    pub events: Sender<VmEvent>,
    pub pvm: bool,
    pub print_boot_times: bool,
    pub max: u32,
    pub base_cpuid: CpuId,
    pub seccomp: Option<vmm_sandbox::seccomp::Mode>,
}

pub struct Vcpus {
    pub common: Common,
    pub running: BTreeMap<u32, VcpuThread>,
    parked: BTreeMap<u32, VcpuFd>,
    pristine: BTreeMap<u32, Pristine>,
    reuses: BTreeMap<u32, u32>,
    /// KVM_CREATE_VCPU calls.
    pub created: u32,
}

/// How a vCPU came to be for a hot-add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Created,
    /// A parked fd, reused for the n-th time.
    Reused(u32),
}

impl Vcpus {
    pub fn new(common: Common) -> Vcpus {
        Vcpus {
            common,
            running: BTreeMap::new(),
            parked: BTreeMap::new(),
            pristine: BTreeMap::new(),
            reuses: BTreeMap::new(),
            created: 0,
        }
    }

    /// A configured vCPU for `id`, not yet running: the parked one put back into its power-on
    /// state, or a new one.
    pub fn prepare(
        &mut self,
        vm: &VmFd,
        id: u32,
        entry: Option<Entry>,
    ) -> Result<(VcpuFd, Origin), VcpuError> {
        if let Some(fd) = self.parked.remove(&id) {
            let restored = self
                .pristine
                .get(&id)
                .expect("a parked vCPU has its power-on state")
                .restore(&fd, id)
                .and_then(|()| super::configure(&fd, id, self.common.max, None, entry));
            if let Err(e) = restored {
                self.parked.insert(id, fd);
                return Err(e);
            }
            let n = self.reuses.entry(id).or_default();
            *n += 1;
            return Ok((fd, Origin::Reused(*n)));
        }
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        self.created += 1;
        // The boot vCPU is never removed; the others may come back, from this state.
        if id != 0 {
            self.pristine.insert(id, Pristine::capture(&fd, id)?);
        }
        super::configure(
            &fd,
            id,
            self.common.max,
            Some(&self.common.base_cpuid),
            entry,
        )?;
        Ok((fd, Origin::Created))
    }

    /// Runs a prepared vCPU on a thread of its own.
    pub fn spawn(&mut self, id: u32, fd: VcpuFd) -> std::io::Result<()> {
        let unplug = Arc::new(AtomicBool::new(false));
        let c = &self.common;
        let ctx = VcpuContext {
            id,
            seccomp: c.seccomp,
            unplug: unplug.clone(),
            bus: c.bus.clone(),
            mem: c.mem.clone(),
            state: c.state.clone(),
            events: c.events.clone(),
            pvm: c.pvm,
            print_boot_times: c.print_boot_times,
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || super::run(fd, ctx))?;
        self.running.insert(id, VcpuThread { handle, unplug });
        Ok(())
    }

    /// Ends a hot-removed vCPU's thread and parks its fd.
    pub fn park(&mut self, id: u32) {
        let Some(t) = self.running.remove(&id) else {
            return;
        };
        t.unplug.store(true, Ordering::Release);
        match super::kick::end_thread(t.handle) {
            Ok(fd) => {
                self.parked.insert(id, fd);
            }
            Err(_) => log::warn!("vCPU {id}: its thread panicked; its KVM fd is lost"),
        }
    }

    pub fn handles(&self) -> Vec<&JoinHandle<VcpuFd>> {
        self.running.values().map(|t| &t.handle).collect()
    }

    /// Every possible vCPU as the API reports it.
    pub fn status(&self) -> Vec<crate::api::VcpuStatus> {
        (0..self.common.max)
            .map(|id| crate::api::VcpuStatus {
                id,
                state: if self.running.contains_key(&id) {
                    "running"
                } else if self.parked.contains_key(&id) {
                    "parked"
                } else {
                    "absent"
                },
                reuses: self.reuses.get(&id).copied().unwrap_or(0),
            })
            .collect()
    }
}
