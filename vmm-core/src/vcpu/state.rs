//! A vCPU's whole state, as live migration and snapshots need it: saved from a paused vCPU and
//! restored into a new one, through its typed form in proto/schema/state.capnp.
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
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_proto::state::StateError;
use vmm_proto::state_capnp;

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
                log::error!("vCPU {id}: MSR {:#x} cannot be read", chunk[n]);
                return Err(VcpuError::Setup(
                    id,
                    "(saving) MSRs",
                    kvm_ioctls::Error::new(libc::EINVAL),
                ));
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

/// The host's XSAVE layout for component `feature` (CPUID leaf 0xD): (offset, size) in the
/// standard (non-compacted) format KVM_GET_XSAVE uses.
fn xsave_component(feature: u8) -> (usize, usize) {
    // Leaf 0xD sub-leaf n >= 2 describes state component n (all zero if the CPU lacks it).
    let r = std::arch::x86_64::__cpuid_count(0xd, u32::from(feature));
    (r.ebx as usize, r.eax as usize)
}

const XSAVE_BYTES: usize = 4096;
const XSAVE_HEADER: usize = 512;

fn xsave_bytes(x: &kvm_xsave) -> [u8; XSAVE_BYTES] {
    let mut b = [0u8; XSAVE_BYTES];
    for (i, w) in x.region.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    b
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().expect("in range")
}

fn write_segment(mut b: state_capnp::segment::Builder, s: &kvm_segment) {
    b.set_base(s.base);
    b.set_limit(s.limit);
    b.set_selector(s.selector);
    b.set_type(s.type_);
    b.set_present(s.present != 0);
    b.set_dpl(s.dpl);
    b.set_db(s.db != 0);
    b.set_s(s.s != 0);
    b.set_l(s.l != 0);
    b.set_g(s.g != 0);
    b.set_avl(s.avl != 0);
    b.set_unusable(s.unusable != 0);
}

fn read_segment(r: capnp::Result<state_capnp::segment::Reader>) -> capnp::Result<kvm_segment> {
    let r = r?;
    Ok(kvm_segment {
        base: r.get_base(),
        limit: r.get_limit(),
        selector: r.get_selector(),
        type_: r.get_type(),
        present: r.get_present().into(),
        dpl: r.get_dpl(),
        db: r.get_db().into(),
        s: r.get_s().into(),
        l: r.get_l().into(),
        g: r.get_g().into(),
        avl: r.get_avl().into(),
        unusable: r.get_unusable().into(),
        padding: 0,
    })
}

/// An XSAVE area in its saved form: the legacy region's fields, and each component in use.
fn write_xsave(x: &kvm_xsave, mut r: state_capnp::xsave::Builder) {
    let bytes = xsave_bytes(x);
    r.set_fcw(u16::from_le_bytes(le(&bytes, 0)));
    r.set_fsw(u16::from_le_bytes(le(&bytes, 2)));
    r.set_ftw(bytes[4]);
    r.set_fop(u16::from_le_bytes(le(&bytes, 6)));
    r.set_fip(u64::from_le_bytes(le(&bytes, 8)));
    r.set_fdp(u64::from_le_bytes(le(&bytes, 16)));
    r.set_mxcsr(u32::from_le_bytes(le(&bytes, 24)));
    r.set_mxcsr_mask(u32::from_le_bytes(le(&bytes, 28)));
    r.set_st(&bytes[32..160]);
    r.set_xmm(&bytes[160..416]);
    let xstate_bv = u64::from_le_bytes(le(&bytes, XSAVE_HEADER));
    r.set_xstate_bv(xstate_bv);
    r.set_xcomp_bv(u64::from_le_bytes(le(&bytes, XSAVE_HEADER + 8)));
    // Components 0 and 1 (x87, SSE) are the legacy region; the others are saved
    // when in use (a clear bit means the component is in its initial state).
    let present: Vec<(u8, usize, usize)> = (2..64u8)
        .filter(|f| xstate_bv & (1 << f) != 0)
        .map(|f| {
            let (off, size) = xsave_component(f);
            (f, off, size)
        })
        .filter(|&(_, off, size)| size > 0 && off + size <= XSAVE_BYTES)
        .collect();
    let mut l = r.init_components(present.len() as u32);
    for (i, (f, off, size)) in present.into_iter().enumerate() {
        let mut c = l.reborrow().get(i as u32);
        c.set_feature(f);
        c.set_data(&bytes[off..off + size]);
    }
}

/// Copies `data` into `out`, which must be exactly as long.
fn exact(out: &mut [u8], data: &[u8], part: &'static str) -> Result<(), StateError> {
    if data.len() != out.len() {
        return Err(StateError::Size {
            part,
            got: data.len(),
            want: out.len(),
        });
    }
    out.copy_from_slice(data);
    Ok(())
}

impl VcpuState {
    /// Writes the state into its Cap'n Proto form.
    pub fn write(&self, mut b: state_capnp::vcpu_state::Builder) {
        b.set_id(self.id);
        b.set_mp_state(self.mp_state.mp_state);
        {
            let mut r = b.reborrow().init_regs();
            let g = &self.regs;
            r.set_rax(g.rax);
            r.set_rbx(g.rbx);
            r.set_rcx(g.rcx);
            r.set_rdx(g.rdx);
            r.set_rsi(g.rsi);
            r.set_rdi(g.rdi);
            r.set_rsp(g.rsp);
            r.set_rbp(g.rbp);
            r.set_r8(g.r8);
            r.set_r9(g.r9);
            r.set_r10(g.r10);
            r.set_r11(g.r11);
            r.set_r12(g.r12);
            r.set_r13(g.r13);
            r.set_r14(g.r14);
            r.set_r15(g.r15);
            r.set_rip(g.rip);
            r.set_rflags(g.rflags);
        }
        {
            let s = &self.sregs;
            let mut r = b.reborrow().init_sregs();
            write_segment(r.reborrow().init_cs(), &s.cs);
            write_segment(r.reborrow().init_ds(), &s.ds);
            write_segment(r.reborrow().init_es(), &s.es);
            write_segment(r.reborrow().init_fs(), &s.fs);
            write_segment(r.reborrow().init_gs(), &s.gs);
            write_segment(r.reborrow().init_ss(), &s.ss);
            write_segment(r.reborrow().init_tr(), &s.tr);
            write_segment(r.reborrow().init_ldt(), &s.ldt);
            let mut t = r.reborrow().init_gdt();
            t.set_base(s.gdt.base);
            t.set_limit(s.gdt.limit);
            let mut t = r.reborrow().init_idt();
            t.set_base(s.idt.base);
            t.set_limit(s.idt.limit);
            r.set_cr0(s.cr0);
            r.set_cr2(s.cr2);
            r.set_cr3(s.cr3);
            r.set_cr4(s.cr4);
            r.set_cr8(s.cr8);
            r.set_efer(s.efer);
            r.set_apic_base(s.apic_base);
            let mut l = r.init_interrupt_bitmap(s.interrupt_bitmap.len() as u32);
            for (i, w) in s.interrupt_bitmap.iter().enumerate() {
                l.set(i as u32, *w);
            }
        }
        match &self.fpu {
            Fpu::Xsave(x) => write_xsave(x, b.reborrow().init_fpu().init_xsave()),
            Fpu::Legacy(f) => {
                let mut r = b.reborrow().init_fpu().init_legacy();
                r.set_fcw(f.fcw);
                r.set_fsw(f.fsw);
                r.set_ftwx(f.ftwx);
                r.set_last_opcode(f.last_opcode);
                r.set_last_ip(f.last_ip);
                r.set_last_dp(f.last_dp);
                r.set_mxcsr(f.mxcsr);
                r.set_fpr(f.fpr.as_flattened());
                r.set_xmm(f.xmm.as_flattened());
            }
        }
        if let Some(x) = &self.xcrs {
            let n = (x.nr_xcrs as usize).min(x.xcrs.len());
            let mut l = b.reborrow().init_xcrs(n as u32);
            for (i, xcr) in x.xcrs[..n].iter().enumerate() {
                let mut e = l.reborrow().get(i as u32);
                e.set_index(xcr.xcr);
                e.set_value(xcr.value);
            }
        }
        {
            let d = &self.debug_regs;
            let mut r = b.reborrow().init_debug_regs();
            let mut l = r.reborrow().init_db(4);
            for (i, v) in d.db.iter().enumerate() {
                l.set(i as u32, *v);
            }
            r.set_dr6(d.dr6);
            r.set_dr7(d.dr7);
            r.set_flags(d.flags);
        }
        let lapic: Vec<u8> = self.lapic.regs.iter().map(|&c| c as u8).collect();
        b.set_lapic(&lapic);
        let mut l = b.reborrow().init_msrs(self.msrs.len() as u32);
        for (i, m) in self.msrs.iter().enumerate() {
            let mut e = l.reborrow().get(i as u32);
            e.set_index(m.index);
            e.set_data(m.data);
        }
        let e = &self.events;
        let mut r = b.init_events();
        r.set_exception_injected(e.exception.injected != 0);
        r.set_exception_nr(e.exception.nr);
        r.set_exception_has_error_code(e.exception.has_error_code != 0);
        r.set_exception_pending(e.exception.pending != 0);
        r.set_exception_error_code(e.exception.error_code);
        r.set_exception_has_payload(e.exception_has_payload != 0);
        r.set_exception_payload(e.exception_payload);
        r.set_interrupt_injected(e.interrupt.injected != 0);
        r.set_interrupt_nr(e.interrupt.nr);
        r.set_interrupt_soft(e.interrupt.soft != 0);
        r.set_interrupt_shadow(e.interrupt.shadow);
        r.set_nmi_injected(e.nmi.injected != 0);
        r.set_nmi_pending(e.nmi.pending != 0);
        r.set_nmi_masked(e.nmi.masked != 0);
        r.set_sipi_vector(e.sipi_vector);
        r.set_flags(e.flags);
        r.set_smi_smm(e.smi.smm != 0);
        r.set_smi_pending(e.smi.pending != 0);
        r.set_smi_inside_nmi(e.smi.smm_inside_nmi != 0);
        r.set_latched_init(e.smi.latched_init);
        r.set_triple_fault_pending(e.triple_fault.pending != 0);
    }

    /// Reads the state back, checking what a stream from elsewhere could get wrong: sizes of
    /// the LAPIC page, the FPU registers and each XSAVE component (against this host's CPUID).
    pub fn read(r: state_capnp::vcpu_state::Reader) -> Result<VcpuState, StateError> {
        let id = r.get_id();
        Self::read_parts(r).map_err(|e| StateError::Vcpu(id, Box::new(e)))
    }

    fn read_parts(r: state_capnp::vcpu_state::Reader) -> Result<VcpuState, StateError> {
        let e = StateError::read;
        Ok(VcpuState {
            id: r.get_id(),
            mp_state: kvm_mp_state {
                mp_state: r.get_mp_state(),
            },
            regs: read_regs(r.get_regs().map_err(e("registers"))?),
            sregs: read_sregs(r.get_sregs().map_err(e("special registers"))?)?,
            fpu: read_fpu(r.get_fpu())?,
            xcrs: read_xcrs(r.get_xcrs().map_err(e("XCRs"))?)?,
            debug_regs: read_debug_regs(r.get_debug_regs().map_err(e("debug registers"))?)?,
            lapic: read_lapic(r.get_lapic().map_err(e("the LAPIC"))?)?,
            msrs: r
                .get_msrs()
                .map_err(e("MSRs"))?
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.get_index(),
                    data: m.get_data(),
                    ..Default::default()
                })
                .collect(),
            events: read_events(r.get_events().map_err(e("pending events"))?),
        })
    }
}

fn read_regs(g: state_capnp::regs::Reader) -> kvm_regs {
    kvm_regs {
        rax: g.get_rax(),
        rbx: g.get_rbx(),
        rcx: g.get_rcx(),
        rdx: g.get_rdx(),
        rsi: g.get_rsi(),
        rdi: g.get_rdi(),
        rsp: g.get_rsp(),
        rbp: g.get_rbp(),
        r8: g.get_r8(),
        r9: g.get_r9(),
        r10: g.get_r10(),
        r11: g.get_r11(),
        r12: g.get_r12(),
        r13: g.get_r13(),
        r14: g.get_r14(),
        r15: g.get_r15(),
        rip: g.get_rip(),
        rflags: g.get_rflags(),
    }
}

fn read_sregs(s: state_capnp::sregs::Reader) -> Result<kvm_sregs, StateError> {
    let seg = |x| read_segment(x).map_err(StateError::read("a segment register"));
    let dt = |t: capnp::Result<state_capnp::descriptor_table::Reader>| {
        t.map(|t| kvm_dtable {
            base: t.get_base(),
            limit: t.get_limit(),
            padding: [0; 3],
        })
        .map_err(StateError::read("a descriptor table"))
    };
    let mut interrupt_bitmap = [0u64; 4];
    let bits = s
        .get_interrupt_bitmap()
        .map_err(StateError::read("the interrupt bitmap"))?;
    if bits.len() as usize != interrupt_bitmap.len() {
        return Err(StateError::Count {
            part: "the interrupt bitmap",
            unit: "words",
            got: bits.len() as usize,
            want: 4,
        });
    }
    for (i, w) in interrupt_bitmap.iter_mut().enumerate() {
        *w = bits.get(i as u32);
    }
    Ok(kvm_sregs {
        cs: seg(s.get_cs())?,
        ds: seg(s.get_ds())?,
        es: seg(s.get_es())?,
        fs: seg(s.get_fs())?,
        gs: seg(s.get_gs())?,
        ss: seg(s.get_ss())?,
        tr: seg(s.get_tr())?,
        ldt: seg(s.get_ldt())?,
        gdt: dt(s.get_gdt())?,
        idt: dt(s.get_idt())?,
        cr0: s.get_cr0(),
        cr2: s.get_cr2(),
        cr3: s.get_cr3(),
        cr4: s.get_cr4(),
        cr8: s.get_cr8(),
        efer: s.get_efer(),
        apic_base: s.get_apic_base(),
        interrupt_bitmap,
    })
}

fn read_fpu(f: state_capnp::vcpu_state::fpu::Reader) -> Result<Fpu, StateError> {
    use state_capnp::vcpu_state::fpu::Which;
    match f
        .which()
        .map_err(|_| StateError::UnknownKind("the FPU state"))?
    {
        Which::Xsave(x) => read_xsave(x.map_err(StateError::read("the XSAVE area"))?),
        Which::Legacy(f) => read_legacy_fpu(f.map_err(StateError::read("the FPU state"))?),
    }
}

fn read_xsave(x: state_capnp::xsave::Reader) -> Result<Fpu, StateError> {
    let e = StateError::read;
    let mut bytes = [0u8; XSAVE_BYTES];
    bytes[0..2].copy_from_slice(&x.get_fcw().to_le_bytes());
    bytes[2..4].copy_from_slice(&x.get_fsw().to_le_bytes());
    bytes[4] = x.get_ftw();
    bytes[6..8].copy_from_slice(&x.get_fop().to_le_bytes());
    bytes[8..16].copy_from_slice(&x.get_fip().to_le_bytes());
    bytes[16..24].copy_from_slice(&x.get_fdp().to_le_bytes());
    bytes[24..28].copy_from_slice(&x.get_mxcsr().to_le_bytes());
    bytes[28..32].copy_from_slice(&x.get_mxcsr_mask().to_le_bytes());
    let st = x.get_st().map_err(e("ST registers"))?;
    exact(&mut bytes[32..160], st, "the ST registers")?;
    let xmm = x.get_xmm().map_err(e("XMM registers"))?;
    exact(&mut bytes[160..416], xmm, "the XMM registers")?;
    bytes[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&x.get_xstate_bv().to_le_bytes());
    bytes[XSAVE_HEADER + 8..XSAVE_HEADER + 16].copy_from_slice(&x.get_xcomp_bv().to_le_bytes());
    for c in x.get_components().map_err(e("XSAVE components"))? {
        let f = c.get_feature();
        let data = c.get_data().map_err(e("an XSAVE component"))?;
        let (off, size) = xsave_component(f);
        if !(2..64).contains(&f) || size == 0 || off + size > XSAVE_BYTES {
            return Err(StateError::XsaveComponent(u32::from(f)));
        }
        exact(&mut bytes[off..off + size], data, "an XSAVE component")?;
    }
    let mut area = kvm_xsave::default();
    for (i, w) in area.region.iter_mut().enumerate() {
        *w = u32::from_le_bytes(le(&bytes, i * 4));
    }
    Ok(Fpu::Xsave(Box::new(area)))
}

fn read_legacy_fpu(f: state_capnp::legacy_fpu::Reader) -> Result<Fpu, StateError> {
    let mut fpu = kvm_fpu {
        fcw: f.get_fcw(),
        fsw: f.get_fsw(),
        ftwx: f.get_ftwx(),
        last_opcode: f.get_last_opcode(),
        last_ip: f.get_last_ip(),
        last_dp: f.get_last_dp(),
        mxcsr: f.get_mxcsr(),
        ..Default::default()
    };
    let fpr = f.get_fpr().map_err(StateError::read("FPU registers"))?;
    exact(fpu.fpr.as_flattened_mut(), fpr, "the FPU registers")?;
    let xmm = f.get_xmm().map_err(StateError::read("XMM registers"))?;
    exact(fpu.xmm.as_flattened_mut(), xmm, "the XMM registers")?;
    Ok(Fpu::Legacy(Box::new(fpu)))
}

fn read_xcrs(
    list: capnp::struct_list::Reader<state_capnp::xcr::Owned>,
) -> Result<Option<kvm_xcrs>, StateError> {
    if list.is_empty() {
        return Ok(None);
    }
    let mut x = kvm_xcrs::default();
    if list.len() as usize > x.xcrs.len() {
        return Err(StateError::TooMany {
            part: "the state",
            unit: "XCRs",
            got: list.len() as usize,
            max: x.xcrs.len(),
        });
    }
    x.nr_xcrs = list.len();
    for (slot, xcr) in x.xcrs.iter_mut().zip(list.iter()) {
        slot.xcr = xcr.get_index();
        slot.value = xcr.get_value();
    }
    Ok(Some(x))
}

fn read_debug_regs(d: state_capnp::debug_regs::Reader) -> Result<kvm_debugregs, StateError> {
    let db = d.get_db().map_err(StateError::read("debug registers"))?;
    if db.len() != 4 {
        return Err(StateError::Count {
            part: "the state",
            unit: "debug address registers",
            got: db.len() as usize,
            want: 4,
        });
    }
    Ok(kvm_debugregs {
        db: [db.get(0), db.get(1), db.get(2), db.get(3)],
        dr6: d.get_dr6(),
        dr7: d.get_dr7(),
        flags: d.get_flags(),
        ..Default::default()
    })
}

fn read_lapic(page: &[u8]) -> Result<kvm_lapic_state, StateError> {
    let mut lapic = kvm_lapic_state::default();
    if page.len() != lapic.regs.len() {
        return Err(StateError::Size {
            part: "the LAPIC page",
            got: page.len(),
            want: lapic.regs.len(),
        });
    }
    for (d, s) in lapic.regs.iter_mut().zip(page) {
        *d = *s as std::os::raw::c_char;
    }
    Ok(lapic)
}

fn read_events(v: state_capnp::events::Reader) -> kvm_vcpu_events {
    let mut events = kvm_vcpu_events::default();
    events.exception.injected = v.get_exception_injected().into();
    events.exception.nr = v.get_exception_nr();
    events.exception.has_error_code = v.get_exception_has_error_code().into();
    events.exception.pending = v.get_exception_pending().into();
    events.exception.error_code = v.get_exception_error_code();
    events.exception_has_payload = v.get_exception_has_payload().into();
    events.exception_payload = v.get_exception_payload();
    events.interrupt.injected = v.get_interrupt_injected().into();
    events.interrupt.nr = v.get_interrupt_nr();
    events.interrupt.soft = v.get_interrupt_soft().into();
    events.interrupt.shadow = v.get_interrupt_shadow();
    events.nmi.injected = v.get_nmi_injected().into();
    events.nmi.pending = v.get_nmi_pending().into();
    events.nmi.masked = v.get_nmi_masked().into();
    events.sipi_vector = v.get_sipi_vector();
    events.flags = v.get_flags();
    events.smi.smm = v.get_smi_smm().into();
    events.smi.pending = v.get_smi_pending().into();
    events.smi.smm_inside_nmi = v.get_smi_inside_nmi().into();
    events.smi.latched_init = v.get_latched_init();
    events.triple_fault.pending = v.get_triple_fault_pending().into();
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

    fn encode(state: &VcpuState) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        state.write(msg.init_root());
        capnp::serialize::write_message_to_words(&msg)
    }

    fn decode(bytes: &[u8]) -> Result<VcpuState, StateError> {
        let reader = capnp::serialize::read_message_from_flat_slice(
            &mut &bytes[..],
            capnp::message::ReaderOptions::new(),
        )
        .unwrap();
        VcpuState::read(reader.get_root().unwrap())
    }

    /// A stream whose parts have the wrong size, or name an XSAVE component this CPU lacks,
    /// is refused with an error that names the part.
    #[test]
    fn a_wrong_sized_or_foreign_part_is_refused() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let (_vm, a) = vm_with_vcpu(&kvm);
        let saved = VcpuState::save(&a, 3, &[]).unwrap();
        let mut msg = capnp::message::Builder::new_default();
        saved.write(msg.init_root::<state_capnp::vcpu_state::Builder>());
        msg.get_root::<state_capnp::vcpu_state::Builder>()
            .unwrap()
            .set_lapic(&[0u8; 100]);
        let e = decode(&capnp::serialize::write_message_to_words(&msg))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "vCPU 3: the LAPIC page is 100 bytes, 1024 expected"
        );
        let mut msg = capnp::message::Builder::new_default();
        saved.write(msg.init_root::<state_capnp::vcpu_state::Builder>());
        let root = msg.get_root::<state_capnp::vcpu_state::Builder>().unwrap();
        if let Ok(state_capnp::vcpu_state::fpu::Which::Xsave(Ok(x))) = root.get_fpu().which() {
            let mut c = x.init_components(1).get(0);
            c.set_feature(63);
            c.set_data(&[1, 2, 3]);
            let e = decode(&capnp::serialize::write_message_to_words(&msg))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("XSAVE component 63 has no place on this host"),
                "{e}"
            );
        }
    }

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
        // The upper halves of the YMM registers (XSAVE component 2), where the CPU has AVX.
        let (avx_at, avx_len) = xsave_component(2);
        let with_avx = avx_len == 256;
        if with_avx {
            let mut x = a.get_xsave().unwrap();
            let mut bytes = xsave_bytes(&x);
            for (i, b) in bytes[avx_at..avx_at + avx_len].iter_mut().enumerate() {
                *b = i as u8 ^ 0x5a;
            }
            bytes[XSAVE_HEADER] |= 1 << 2;
            for (i, w) in x.region.iter_mut().enumerate() {
                *w = u32::from_le_bytes(le(&bytes, i * 4));
            }
            // SAFETY: a 4 KiB area read from this vCPU with one component filled in.
            unsafe { a.set_xsave(&x) }.unwrap();
        }
        let saved = VcpuState::save(&a, 0, &msrs).unwrap();
        eprintln!(
            "{} MSRs saved; XSAVE: {}; AVX state set: {with_avx}",
            saved.msrs.len(),
            matches!(saved.fpu, Fpu::Xsave(_))
        );

        // Through the stream's form: a Cap'n Proto message, as bytes.
        let bytes = encode(&saved);
        let decoded = decode(&bytes).unwrap();
        let (_vm2, b) = vm_with_vcpu(&kvm);
        decoded.restore(&b).unwrap();
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
            (Fpu::Xsave(s), Fpu::Xsave(r)) => {
                assert_eq!(s.region[..], r.region[..]);
                if with_avx {
                    let b = xsave_bytes(r);
                    assert_eq!(b[avx_at + 7], 7 ^ 0x5a, "YMM7's upper half came back");
                    assert_ne!(b[XSAVE_HEADER] & (1 << 2), 0);
                }
            }
            (Fpu::Legacy(s), Fpu::Legacy(r)) => assert_eq!(s.mxcsr, r.mxcsr),
            _ => panic!("the FPU state changed kind"),
        }
    }
}
