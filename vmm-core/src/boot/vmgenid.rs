//! VMGenID: a 128-bit VM generation ID in guest memory, at the address the DSDT's VMGenID
//! device names. A guest reads it to learn that it was restored from a snapshot (or cloned):
//! Linux's vmgenid driver then reseeds its RNG, so two clones of one snapshot do not draw the
//! same random numbers. Each vmm-core process has one ID of its own, written at boot and over
//! a restored VM's (a live migration moves the same VM, and keeps its ID, as QEMU does); the
//! GED tells the guest when it changed.

use super::BootError;
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress};
use vmm_devices::layout::GuestMemory;

/// In the reserved BIOS area, after the ACPI tables (16 bytes; a page kept for it).
pub const ADDR: u64 = 0xf_f000;

static ID: OnceLock<[u8; 16]> = OnceLock::new();

/// Draws this process's ID (the getrandom system call: no device file, which a sandboxed or
/// containerised vmm-core may lack), once.
pub fn init() -> Result<[u8; 16], BootError> {
    if let Some(id) = ID.get() {
        return Ok(*id);
    }
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id)
        .map_err(|e| BootError::GenerationId(std::io::Error::other(e.to_string())))?;
    Ok(*ID.get_or_init(|| id))
}

/// Writes this process's ID into guest memory (and returns it).
pub fn write(mem: &GuestMemory) -> Result<[u8; 16], BootError> {
    let id = init()?;
    mem.write_slice(&id, GuestAddress(ADDR))
        .map_err(|e| BootError::GuestWrite("the VM generation ID", e))?;
    Ok(id)
}

/// The ID as Linux's vmgenid driver and QEMU's query-vm-generation-id print it (a GUID).
pub fn format(id: &[u8; 16]) -> String {
    let h = |r: std::ops::Range<usize>| -> String {
        id[r].iter().map(|b| format!("{b:02x}")).collect()
    };
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_id_a_process_formatted_as_a_guid() {
        let a = init().unwrap();
        assert_eq!(a, init().unwrap(), "one ID for the process");
        assert_ne!(a, [0u8; 16]);
        let s = format(&[
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 1, 2, 3, 4, 5, 6, 7,
        ]);
        assert_eq!(s, "01234567-89ab-cdef-0001-020304050607");
    }
}
