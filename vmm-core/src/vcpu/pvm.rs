//! KVM-PVM (software nested virtualisation) cannot emulate a few CPL0 instructions and stops
//! with KVM_EXIT_INTERNAL_ERROR. Three of them the VMM can complete exactly (GUEST.md):
//! `int3` (deliver #BP through the guest's IDT), `fwait` (nothing to wait for: skip it) and
//! `clac`/`stac` (flip RFLAGS.AC). Anything else is reported with RIP and instruction bytes.

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vmm_devices::layout::GuestMemory;

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_AC: u64 = 1 << 18;
const EFER_LMA: u64 = 1 << 10;

/// The instructions we complete ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    Int3,
    Fwait,
    Clac,
    Stac,
}

pub fn decode(bytes: &[u8]) -> Option<Fixup> {
    match bytes {
        [0xcc, ..] => Some(Fixup::Int3),
        [0x9b, ..] => Some(Fixup::Fwait),
        [0x0f, 0x01, 0xca, ..] => Some(Fixup::Clac),
        [0x0f, 0x01, 0xcb, ..] => Some(Fixup::Stac),
        _ => None,
    }
}

/// Translates a guest-virtual address with the vCPU's current page tables.
fn gpa(vcpu: &VcpuFd, gva: u64) -> Option<u64> {
    let t = vcpu.translate_gva(gva).ok()?;
    (t.valid != 0).then_some(t.physical_address)
}

/// Calls `f(gpa, range)` for each page-sized piece of `len` bytes at guest-virtual `gva`.
fn per_page(
    vcpu: &VcpuFd,
    gva: u64,
    len: usize,
    mut f: impl FnMut(u64, std::ops::Range<usize>) -> Option<()>,
) -> Option<()> {
    let mut done = 0;
    while done < len {
        let a = gva + done as u64;
        let chunk = ((0x1000 - (a & 0xfff)) as usize).min(len - done);
        f(gpa(vcpu, a)?, done..done + chunk)?;
        done += chunk;
    }
    Some(())
}

fn read_virt(vcpu: &VcpuFd, mem: &GuestMemory, gva: u64, buf: &mut [u8]) -> Option<()> {
    per_page(vcpu, gva, buf.len(), |gpa, r| {
        mem.read_slice(&mut buf[r], GuestAddress(gpa)).ok()
    })
}

fn write_virt(vcpu: &VcpuFd, mem: &GuestMemory, gva: u64, buf: &[u8]) -> Option<()> {
    per_page(vcpu, gva, buf.len(), |gpa, r| {
        mem.write_slice(&buf[r], GuestAddress(gpa)).ok()
    })
}

/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: the exit carries the bytes KVM fetched.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The instruction bytes from an emulation-failure exit: data[0] holds the flags, data[1]'s low
/// byte the count, and the bytes follow from data[1]'s second byte on.
pub fn exit_instruction_bytes(ndata: u32, data: &[u64]) -> Option<Vec<u8>> {
    if ndata < 2 || data.len() < 3 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = (raw[0] as usize).min(15).min(raw.len() - 1);
    (len > 0).then(|| raw[1..1 + len].to_vec())
}

/// Why a vCPU stopped on an exit it cannot go on from.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    #[error("internal error, and reading {0} failed: {1}")]
    Registers(&'static str, kvm_ioctls::Error),
    #[error("cannot set registers after {0:?}: {1}")]
    Fixup(Fixup, kvm_ioctls::Error),
    #[error("int3 at RIP {0:#x}: cannot deliver #BP for KVM-PVM: {1}")]
    Breakpoint(u64, &'static str),
    #[error("{what} at RIP {rip:#x} (CPL {cpl}, code: {code}; suberror {suberror}, data [{data}]){}", if *.pvm { "; this host is KVM-PVM, which cannot emulate every kernel instruction (see GUEST.md)" } else { "" })]
    Internal {
        what: &'static str,
        rip: u64,
        cpl: u16,
        code: String,
        suberror: u32,
        data: String,
        pvm: bool,
    },
}

pub fn handle_internal_error(
    vcpu: &mut VcpuFd,
    mem: &GuestMemory,
    pvm: bool,
) -> Result<(), ExitError> {
    let run = vcpu.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is the
    // one KVM filled in.
    let (suberror, ndata, data) = unsafe {
        let i = run.__bindgen_anon_1.internal;
        (i.suberror, i.ndata, i.data)
    };
    let regs = vcpu
        .get_regs()
        .map_err(|e| ExitError::Registers("registers", e))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| ExitError::Registers("segment registers", e))?;
    // Prefer the bytes KVM executed: another vCPU may rewrite the code meanwhile (Linux patches
    // live kernel text through a temporary int3, text_poke_bp).
    let kvm_bytes = if suberror == KVM_INTERNAL_ERROR_EMULATION {
        exit_instruction_bytes(ndata, &data)
    } else {
        None
    };
    let mut bytes = [0u8; 15];
    let readable = match &kvm_bytes {
        Some(b) => {
            bytes[..b.len()].copy_from_slice(b);
            true
        }
        None => read_virt(vcpu, mem, regs.rip, &mut bytes).is_some(),
    };
    let cpl = sregs.cs.selector & 3;

    if pvm && readable && suberror == KVM_INTERNAL_ERROR_EMULATION && cpl == 0 {
        if let Some(fix) = decode(&bytes) {
            let mut regs = regs;
            match fix {
                Fixup::Fwait => regs.rip += 1,
                Fixup::Clac => {
                    regs.rflags &= !RFLAGS_AC;
                    regs.rip += 3;
                }
                Fixup::Stac => {
                    regs.rflags |= RFLAGS_AC;
                    regs.rip += 3;
                }
                Fixup::Int3 => {
                    deliver_breakpoint(vcpu, mem, &mut regs, &sregs)?;
                }
            }
            log::debug!("completed {fix:?} at RIP {:#x} for KVM-PVM", regs.rip);
            return vcpu.set_regs(&regs).map_err(|e| ExitError::Fixup(fix, e));
        }
    }

    let code = if readable {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        "unreadable".to_string()
    };
    let what = match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "KVM could not emulate the instruction",
        2 => "KVM hit a double fault while delivering an event (simultaneous exceptions)",
        3 => "KVM could not deliver an event",
        _ => "KVM internal error",
    };
    let extra = data
        .iter()
        .take(ndata.min(4) as usize)
        .map(|d| format!("{d:#x}"))
        .collect::<Vec<_>>();
    Err(ExitError::Internal {
        what,
        rip: regs.rip,
        cpl,
        code,
        suberror,
        data: extra.join(", "),
        pvm,
    })
}

/// Delivers #BP (vector 3) through the guest's 64-bit IDT, exactly as the CPU would for `int3`
/// at CPL0: same stack unless the gate names an IST, 16-byte alignment, a five-word frame with
/// RIP after the instruction.
fn deliver_breakpoint(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    regs: &mut kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> Result<(), ExitError> {
    let rip = regs.rip;
    let fail = |why: &'static str| ExitError::Breakpoint(rip, why);
    if sregs.efer & EFER_LMA == 0 {
        return Err(fail("the guest is not in long mode"));
    }
    if sregs.idt.limit < 3 * 16 + 15 {
        return Err(fail("the IDT has no gate 3"));
    }
    let mut gate = [0u8; 16];
    read_virt(vcpu, mem, sregs.idt.base + 3 * 16, &mut gate)
        .ok_or_else(|| fail("the IDT is unreadable"))?;
    let attr = gate[5];
    if attr & 0x80 == 0 {
        return Err(fail("gate 3 is not present"));
    }
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    if selector != sregs.cs.selector {
        return Err(fail("gate 3 switches code segment"));
    }
    let handler = u16::from_le_bytes([gate[0], gate[1]]) as u64
        | (u16::from_le_bytes([gate[6], gate[7]]) as u64) << 16
        | (u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]) as u64) << 32;
    let ist = gate[4] & 7;
    let mut rsp = if ist != 0 {
        let mut v = [0u8; 8];
        read_virt(
            vcpu,
            mem,
            sregs.tr.base + 0x24 + 8 * (ist as u64 - 1),
            &mut v,
        )
        .ok_or_else(|| fail("the TSS is unreadable"))?;
        u64::from_le_bytes(v)
    } else {
        regs.rsp
    };
    rsp &= !0xf;
    let frame = [
        regs.rip + 1,
        sregs.cs.selector as u64,
        regs.rflags,
        regs.rsp,
        sregs.ss.selector as u64,
    ];
    rsp -= 40;
    let bytes: Vec<u8> = frame.iter().flat_map(|w| w.to_le_bytes()).collect();
    write_virt(vcpu, mem, rsp, &bytes).ok_or_else(|| fail("the stack is not writable"))?;
    regs.rsp = rsp;
    regs.rip = handler;
    regs.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF);
    if attr & 0xf == 0xe {
        regs.rflags &= !RFLAGS_IF; // interrupt gate
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_the_instructions_we_can_complete() {
        assert_eq!(decode(&[0xcc, 0x90]), Some(Fixup::Int3));
        assert_eq!(decode(&[0x9b]), Some(Fixup::Fwait));
        assert_eq!(decode(&[0x0f, 0x01, 0xca]), Some(Fixup::Clac));
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]), Some(Fixup::Stac));
        assert_eq!(decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), None); // lock cmpxchg16b
        assert_eq!(decode(&[0x0f, 0xae, 0x2f]), None); // xrstor
    }

    #[test]
    fn instruction_bytes_come_from_the_exit_when_kvm_gives_them() {
        // As seen on KVM-PVM: flags 1, 15 bytes fetched, starting with int3.
        let data = [
            0x1,
            0x3d0900ba38cc0f,
            0x88850fdb85,
            0x1000,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let b = exit_instruction_bytes(4, &data).unwrap();
        assert_eq!(b.len(), 15);
        assert_eq!(&b[..4], &[0xcc, 0x38, 0xba, 0x00]);
        assert_eq!(decode(&b), Some(Fixup::Int3));
        assert_eq!(exit_instruction_bytes(4, &[0, 0, 0]), None); // no bytes flag
        assert_eq!(exit_instruction_bytes(1, &data), None);
    }
}
