//! MSI-X: the table and PBA a device exposes in a BAR, and the VM's GSI routing table that turns
//! each vector into a KVM MSI route, so that an irqfd on the vector's GSI interrupts the guest
//! without an exit to vmm-core.

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
/// Message control bits (the upper byte of the capability's second word).
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const FUNCTION_MASK: u16 = 1 << 14;
/// GSIs below this belong to the IOAPIC and PIC.
const FIRST_MSI_GSI: u32 = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub data: u32,
    pub masked: bool,
}

pub struct MsixTable {
    pub entries: Vec<Entry>,
    pub enabled: bool,
    pub function_masked: bool,
}

impl MsixTable {
    pub fn new(n: u16) -> MsixTable {
        MsixTable {
            entries: vec![
                Entry {
                    addr: 0,
                    data: 0,
                    masked: true
                };
                usize::from(n)
            ],
            enabled: false,
            function_masked: false,
        }
    }

    fn word(&self, index: usize, word: usize) -> u32 {
        let e = &self.entries[index];
        match word {
            0 => e.addr as u32,
            1 => (e.addr >> 32) as u32,
            2 => e.data,
            _ => u32::from(e.masked) * CTRL_MASKED,
        }
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        if index >= self.entries.len() || !(data.len() == 4 || data.len() == 8) {
            data.fill(0);
            return;
        }
        let lo = self.word(index, word);
        data[..4].copy_from_slice(&lo.to_le_bytes());
        if data.len() == 8 {
            data[4..].copy_from_slice(&self.word(index, (word + 1).min(3)).to_le_bytes());
        }
    }

    /// Returns the entry that changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        let index = (offset / ENTRY_SIZE) as usize;
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        if index >= self.entries.len() || !(data.len() == 4 || data.len() == 8) {
            return None;
        }
        let before = self.entries[index];
        let mut put = |word: usize, v: u32| {
            let e = &mut self.entries[index];
            match word {
                0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(v),
                1 => e.addr = (e.addr & 0xffff_ffff) | (u64::from(v) << 32),
                2 => e.data = v,
                _ => e.masked = v & CTRL_MASKED != 0,
            }
        };
        put(word, u32::from_le_bytes(data[..4].try_into().unwrap()));
        if data.len() == 8 && word < 3 {
            put(word + 1, u32::from_le_bytes(data[4..].try_into().unwrap()));
        }
        (before != self.entries[index]).then_some(index)
    }

    /// Whether the vector can interrupt the guest now.
    pub fn deliverable(&self, vector: u16) -> bool {
        self.enabled
            && !self.function_masked
            && self
                .entries
                .get(usize::from(vector))
                .is_some_and(|e| !e.masked)
    }
}

/// The next GSI never used, those a removed device gave back, and each MSI GSI's (address,
/// data).
type MsiRoutes = (u32, Vec<u32>, BTreeMap<u32, (u64, u32)>);

/// The VM's GSI routing: the IOAPIC and PIC's default routes, plus one MSI route per vector
/// of every MSI-X device.
pub struct Routing {
    vm: Arc<VmFd>,
    msi: Mutex<MsiRoutes>,
}

impl Routing {
    pub fn new(vm: Arc<VmFd>) -> Routing {
        Routing {
            vm,
            msi: Mutex::new((FIRST_MSI_GSI, Vec::new(), BTreeMap::new())),
        }
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// `n` GSIs for a device's vectors: those given back first, then new ones.
    pub fn allocate(&self, n: u16) -> Vec<u32> {
        let mut m = self.msi.lock().unwrap();
        let mut out = Vec::with_capacity(usize::from(n));
        while out.len() < usize::from(n) {
            match m.1.pop() {
                Some(g) => out.push(g),
                None => {
                    out.push(m.0);
                    m.0 += 1;
                }
            }
        }
        out
    }

    /// A device left the bus: its GSIs' routes go (the table is committed without them) and
    /// the numbers are free for the next device.
    pub fn release(&self, gsis: &[u32]) -> Result<(), kvm_ioctls::Error> {
        let mut m = self.msi.lock().unwrap();
        for g in gsis {
            m.2.remove(g);
        }
        m.1.extend_from_slice(gsis);
        self.commit(&m.2)
    }

    /// Points `gsi` at an MSI address and data and commits the table.
    pub fn set_msi(&self, gsi: u32, addr: u64, data: u32) -> Result<(), kvm_ioctls::Error> {
        let mut m = self.msi.lock().unwrap();
        if m.2.get(&gsi) == Some(&(addr, data)) {
            return Ok(());
        }
        m.2.insert(gsi, (addr, data));
        self.commit(&m.2)
    }

    /// KVM_SET_GSI_ROUTING with the default routes and these MSI routes.
    fn commit(&self, routes: &BTreeMap<u32, (u64, u32)>) -> Result<(), kvm_ioctls::Error> {
        let mut entries = default_routes();
        for (&gsi, &(addr, data)) in routes {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.vm.set_gsi_routing(&table)
    }
}

/// What KVM sets up with the in-kernel irqchip: GSIs 0-15 to the PIC and the IOAPIC, 16-23 to
/// the IOAPIC. KVM_SET_GSI_ROUTING replaces the whole table, so these go in every time.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    let route = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..24 {
        if gsi < 8 {
            v.push(route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_reads_back_writes_and_reports_changes() {
        let mut t = MsixTable::new(2);
        assert!(!t.deliverable(0));
        assert_eq!(t.write(16, &0xfee0_0000u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(16 + 8, &0x41u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(16 + 8, &0x41u32.to_le_bytes()), None);
        t.write(16 + 12, &0u32.to_le_bytes());
        let mut b = [0u8; 8];
        t.read(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_0000);
        t.enabled = true;
        assert!(t.deliverable(1) && !t.deliverable(0) && !t.deliverable(7));
        t.function_masked = true;
        assert!(!t.deliverable(1));
        assert_eq!(t.write(64, &[0; 4]), None);
    }

    #[test]
    fn default_routes_cover_pic_and_ioapic() {
        let r = default_routes();
        assert_eq!(r.len(), 16 + 24);
    }
}
