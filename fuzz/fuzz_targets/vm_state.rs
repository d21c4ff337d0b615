//! A VM's device and vCPU state (Cap'n Proto, proto/schema/state.capnp) from an untrusted
//! migration source or snapshot, decoded as vmm-core's restore decodes it
//! (`snapshot::Restore::read`: shape, boot files, every vCPU's registers, the KVM state). It
//! may refuse anything, but never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_core::snapshot::{Boot, Restore};
use vmm_proto::state_capnp::vm_state;

/// The shape and boot files the state claims, so that the restore gets past its checks of
/// them (which a destination of the same shape and files passes) to the state itself.
fn claimed(data: &[u8]) -> Option<(u64, u32, Boot)> {
    let opts = capnp::message::ReaderOptions {
        traversal_limit_in_words: Some(1 << 20),
        nesting_limit: 64,
    };
    let msg = capnp::serialize::read_message(&mut &data[..], opts).ok()?;
    let r = msg.get_root::<vm_state::Reader>().ok()?;
    let text = |t: capnp::Result<capnp::text::Reader>| -> Option<String> {
        Some(t.ok()?.to_str().ok()?.to_string())
    };
    let b = r.get_boot().ok()?;
    let boot = Boot {
        kernel: text(b.get_kernel())?,
        initramfs: text(b.get_initramfs())?,
        cmdline: text(b.get_cmdline())?,
    };
    Some((r.get_memory(), r.get_max_cpus(), boot))
}

fuzz_target!(|data: &[u8]| {
    if let Some((memory, cpus, boot)) = claimed(data) {
        let _ = Restore::read(data, memory, cpus, &boot, true);
    }
    let other = Boot {
        kernel: "/boot/vmlinuz".into(),
        initramfs: String::new(),
        cmdline: "console=ttyS0".into(),
    };
    let _ = Restore::read(data, 32 << 20, 1, &other, false);
});
