//! A vCPU's whole state, as live migration and snapshots need it: saved from a paused vCPU and
//! restored into a new one (issue 7's first part; the stream format is still to come).
//!
//! What is saved: general and special registers, the XSAVE area (which holds the FPU, SSE and
//! AVX state; the legacy FPU call is used only where KVM has no XSAVE), the XCRs, every MSR that
//! KVM reports and this host lets be read, the LAPIC, pending events (exceptions, interrupts,
//! NMIs, SMIs), the MP state and the debug registers.
//!
//! The order of the restore follows what KVM needs: the MP state before the registers (an AP
//! waiting for SIPI ignores its registers), XSAVE and XCRs before the MSRs that depend on
//! them, the LAPIC before the events (a pending interrupt needs its LAPIC), and the events last.

use super::VcpuError;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

/// MSRs read or written per ioctl.
const MSR_CHUNK: usize = 64;

/// The MSRs KVM lists (KVM_GET_MSR_INDEX_LIST) that a vCPU of this host lets be read: some
/// listed ones fail on some hosts (KVM-PVM among them), and KVM_GET_MSRS stops at the first
/// failure, so each is tried once, at start.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VcpuError::Setup(0, "(listing) MSRs", e))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one entry fits");
        if vcpu.get_msrs(&mut one).is_ok_and(|n| n == 1) {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// The floating-point and vector state: XSAVE where KVM has it, else the legacy FPU area.
pub enum Fpu {
    Xsave(Box<kvm_xsave>),
    Legacy(Box<kvm_fpu>),
}

pub struct VcpuState {
    pub id: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: Fpu,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (paused, or never started).
    pub fn save(vcpu: &VcpuFd, id: u32, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let err = |what| move |e| VcpuError::Setup(id, what, e);
        let mp_state = vcpu.get_mp_state().map_err(err("(saving) the MP state"))?;
        let regs = vcpu.get_regs().map_err(err("(saving) registers"))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(err("(saving) special registers"))?;
        let fpu = match vcpu.get_xsave() {
            Ok(x) => Fpu::Xsave(Box::new(x)),
            Err(_) => Fpu::Legacy(Box::new(
                vcpu.get_fpu().map_err(err("(saving) the FPU state"))?,
            )),
        };
        let xcrs = vcpu.get_xcrs().ok();
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(err("(saving) debug registers"))?;
        let lapic = vcpu.get_lapic().map_err(err("(saving) the LAPIC"))?;
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for chunk in msr_indices.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m = Msrs::from_entries(&entries).expect("a chunk fits");
            let n = vcpu.get_msrs(&mut m).map_err(err("(saving) MSRs"))?;
            if n != chunk.len() {
                let failed = chunk[n];
                return Err(VcpuError::Setup(
                    id,
                    "(saving) MSRs",
                    kvm_ioctls::Error::new(libc::EINVAL),
                ))
                .inspect_err(|_| log::error!("vCPU {id}: MSR {failed:#x} cannot be read"));
            }
            msrs.extend_from_slice(&m.as_slice()[..n]);
        }
        let events = vcpu
            .get_vcpu_events()
            .map_err(err("(saving) pending events"))?;
        Ok(VcpuState {
            id,
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Puts the state into a vCPU (created with the same CPUID, not yet run).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuError> {
        let id = self.id;
        let err = |what| move |e| VcpuError::Setup(id, what, e);
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("the MP state"))?;
        vcpu.set_regs(&self.regs).map_err(err("registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(err("special registers"))?;
        match &self.fpu {
            // SAFETY: the area came from KVM_GET_XSAVE on this host (or a stream checked to
            // have its size), so it is the 4 KiB kvm_xsave KVM_SET_XSAVE reads.
            Fpu::Xsave(x) => unsafe { vcpu.set_xsave(x) }.map_err(err("the XSAVE area"))?,
            Fpu::Legacy(f) => vcpu.set_fpu(f).map_err(err("the FPU state"))?,
        }
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(err("XCRs"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(err("debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(err("the LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let m = Msrs::from_entries(chunk).expect("a chunk fits");
            let n = vcpu.set_msrs(&m).map_err(err("MSRs"))?;
            if n != chunk.len() {
                log::error!(
                    "vCPU {id}: MSR {:#x} = {:#x} was refused",
                    chunk[n].index,
                    chunk[n].data
                );
                return Err(VcpuError::Setup(
                    id,
                    "MSRs",
                    kvm_ioctls::Error::new(libc::EINVAL),
                ));
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("pending events"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

    fn vm_with_vcpu(kvm: &Kvm) -> (kvm_ioctls::VmFd, VcpuFd) {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu)
    }

    /// A state saved from one vCPU and restored into another vCPU (of another VM) reads back
    /// the same, on this host's real KVM.
    #[test]
    fn a_vcpu_state_survives_save_and_restore_into_another_vm() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let (_vm1, a) = vm_with_vcpu(&kvm);
        let msrs = saveable_msrs(&kvm, &a).unwrap();
        assert!(msrs.len() > 10, "saveable MSRs: {msrs:x?}");
        // Give the source something to remember.
        super::super::configure(
            &a,
            0,
            1,
            None,
            Some(crate::boot::Entry::Linux64 { entry: 0x10_0000 }),
        )
        .unwrap();
        let mut regs = a.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = 0x0fed_cba9_8765_4321;
        a.set_regs(&regs).unwrap();
        let mut dr = a.get_debug_regs().unwrap();
        dr.db[1] = 0xdead_b000;
        a.set_debug_regs(&dr).unwrap();
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xc000_0082, // LSTAR
            data: 0xffff_ffff_8100_0000,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(a.set_msrs(&m).unwrap(), 1);
        let saved = VcpuState::save(&a, 0, &msrs).unwrap();
        eprintln!(
            "{} MSRs saved; {}",
            saved.msrs.len(),
            if matches!(saved.fpu, Fpu::Xsave(_)) {
                "XSAVE"
            } else {
                "legacy FPU"
            }
        );

        let (_vm2, b) = vm_with_vcpu(&kvm);
        saved.restore(&b).unwrap();
        let back = VcpuState::save(&b, 0, &msrs).unwrap();
        assert_eq!(back.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(back.regs.r15, 0x0fed_cba9_8765_4321);
        assert_eq!(back.regs.rip, 0x10_0000);
        assert_eq!(back.sregs.cr3, saved.sregs.cr3);
        assert_eq!(back.sregs.cr0, saved.sregs.cr0);
        assert_eq!(back.sregs.efer, saved.sregs.efer);
        assert_eq!(back.debug_regs.db[1], 0xdead_b000);
        assert_eq!(back.mp_state.mp_state, saved.mp_state.mp_state);
        assert_eq!(back.lapic.regs[..], saved.lapic.regs[..]);
        m = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xc000_0082,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(b.get_msrs(&mut m).unwrap(), 1);
        assert_eq!(m.as_slice()[0].data, 0xffff_ffff_8100_0000);
        // Every MSR but the time stamp counter (which runs) reads back as saved.
        const TSC: u32 = 0x10;
        for (s, r) in saved.msrs.iter().zip(&back.msrs) {
            assert_eq!(s.index, r.index);
            if s.index != TSC {
                assert_eq!(s.data, r.data, "MSR {:#x}", s.index);
            }
        }
        match (&saved.fpu, &back.fpu) {
            (Fpu::Xsave(s), Fpu::Xsave(r)) => assert_eq!(s.region[..], r.region[..]),
            (Fpu::Legacy(s), Fpu::Legacy(r)) => assert_eq!(s.mxcsr, r.mxcsr),
            _ => panic!("the FPU state changed kind"),
        }
    }
}
