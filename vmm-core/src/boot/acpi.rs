//! ACPI tables generated in Rust (the acpi_tables crate): RSDP, XSDT, FADT (hardware-reduced,
//! with a sleep control register for power-off and a reset register), MADT and DSDT.

use super::{vmgenid, BootError, ACPI_START};
use crate::config::VmConfig;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};
use vmm_devices::layout::{GuestMemory, IOAPIC_ADDR, LAPIC_ADDR};
use vmm_devices::platform::{cpu_hotplug, ged, pci_hotplug, power, pvpanic, serial};

const OEM_ID: [u8; 6] = *b"VMMCOR";

fn table_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A table from its signature, revision and body; length and checksum filled in.
fn sdt(signature: [u8; 4], revision: u8, oem_table: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(signature, 36, revision, OEM_ID, oem_table, 1);
    t.append_slice(body);
    t.as_slice().to_vec()
}

/// MADT: one local APIC per possible vCPU (those not online at boot are "online capable", so
/// Linux counts them as hot-pluggable), the IOAPIC, IRQ0 -> GSI2, and LINT1 as NMI.
pub fn madt(cpus: u32, max_cpus: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259 PICs
    for id in 0..max_cpus {
        let flags: u32 = if id < cpus { 1 } else { 2 }; // enabled, or online capable
        if id < 255 {
            b.extend_from_slice(&[0, 8, id as u8, id as u8]);
            b.extend_from_slice(&flags.to_le_bytes());
        } else {
            b.extend_from_slice(&[9, 16, 0, 0]);
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
    }
    b.extend_from_slice(&[1, 12, 0, 0]);
    b.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (PIT) arrives on GSI 2, as on PC hardware.
    b.extend_from_slice(&[2, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: all processors, LINT1.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(*b"APIC", 5, *b"VMMMADT ", &b)
}

/// DSDT: \_S5 for power-off, the COM1 UART, the pvpanic device, the GED and power button,
/// the VMGenID device, and a processor device per possible vCPU with the CPU hotplug methods.
pub fn dsdt(max_cpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&power::SLP_TYP_S5, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    // Temporaries in one statement live until it ends, so each device is built and written
    // in one expression.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::Zero {}),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(serial::COM1_BASE, serial::COM1_BASE, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, serial::COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    aml::Device::new(
        "_SB_.PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    pvpanic::PORT,
                    pvpanic::PORT,
                    1,
                    1,
                )]),
            ),
            &aml::Name::new("_STA".into(), &0x0fu8),
        ],
    )
    .to_aml_bytes(&mut body);
    // The Generic Event Device: _EVT reads the pending events, clears them, and notifies.
    let gdat = aml::Path::new("GDAT");
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::Zero {}),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    ged::GSI,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemIO,
                &ged::PORT,
                &1u8,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &gdat),
                    &aml::Store::new(&gdat, &aml::Local(0)),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(
                                // Zero: a null target; only the result matters.
                                &aml::Zero {},
                                &aml::Local(0),
                                &ged::EVENT_POWER_BUTTON,
                            ),
                            &ged::EVENT_POWER_BUTTON,
                        ),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::Zero {}, &aml::Local(0), &ged::EVENT_CPU_HOTPLUG),
                            &ged::EVENT_CPU_HOTPLUG,
                        ),
                        vec![&aml::MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![])],
                    ),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::Zero {}, &aml::Local(0), &ged::EVENT_VMGENID),
                            &ged::EVENT_VMGENID,
                        ),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.VGEN"), &0x80u8)],
                    ),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::Zero {}, &aml::Local(0), &ged::EVENT_PCI_HOTPLUG),
                            &ged::EVENT_PCI_HOTPLUG,
                        ),
                        vec![&aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![])],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::Zero {}),
        ],
    )
    .to_aml_bytes(&mut body);
    // VMGenID, as QEMU and Firecracker describe it: Windows and Linux's vmgenid driver match
    // the _CID (ACPICA upper-cases it to the driver's VM_GEN_COUNTER); the _HID is this VMM's
    // own, a valid ACPI ID. ADDR is the ID's address (low and high 32 bits).
    let (lo, hi) = (vmgenid::ADDR as u32, (vmgenid::ADDR >> 32) as u32);
    aml::Device::new(
        "_SB_.VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMMC0001"),
            &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new("ADDR".into(), &aml::Package::new(vec![&lo, &hi])),
        ],
    )
    .to_aml_bytes(&mut body);
    pci_aml(&mut body);
    cpus_aml(max_cpus, &mut body);
    sdt(*b"DSDT", 6, *b"VMMDSDT ", &body)
}

/// The PCI root bridge (bus 0: config ports 0xCF8-0xCFF, the I/O space around them and the 32-bit
/// MMIO window BARs are assigned from), with ACPI PCI hotplug (what Linux's acpiphp drives, as
/// on QEMU's i440fx): a device object per slot with `_ADR`, `_SUN` and `_EJ0` (which ejects it
/// through the controller's B0EJ), and `PCNT`, which the GED's PCI event calls: it notifies
/// each slot a device came to (device check) or is to leave (eject request). And a motherboard
/// device that reserves the ECAM area, which Linux wants before it trusts MCFG.
fn pci_aml(body: &mut Vec<u8>) {
    use vmm_devices::pci::{ECAM_BASE, ECAM_SIZE, MEM32_BASE, MEM32_END};
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![
            &aml::AddressSpace::new_bus_number(0u16, 0u16),
            &aml::IO::new(0xcf8, 0xcf8, 1, 8),
            &aml::AddressSpace::new_io(0u16, 0xcf7u16, None),
            &aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None),
            &aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                MEM32_BASE as u32,
                MEM32_END as u32,
                None,
            ),
        ]),
    );
    let [region, field, reserve] = pci_hotplug_registers();
    let slots: Vec<Raw> = (1..32u32).map(pci_slot).collect();
    let pcnt = pcnt_method();
    let mut children: Vec<&dyn Aml> = Vec::new();
    let (hid, cid) = (
        aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
        aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
    );
    let (uid, seg, bbn) = (
        aml::Name::new("_UID".into(), &aml::Zero {}),
        aml::Name::new("_SEG".into(), &aml::Zero {}),
        aml::Name::new("_BBN".into(), &aml::Zero {}),
    );
    children.extend([&hid as &dyn Aml, &cid, &uid, &seg, &bbn, &crs]);
    children.extend([&region as &dyn Aml, &field, &reserve, &pcnt]);
    children.extend(slots.iter().map(|s| s as &dyn Aml));
    aml::Device::new("_SB_.PCI0".into(), children).to_aml_bytes(body);
    aml::Device::new(
        "_SB_.MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::Zero {}),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    false,
                    ECAM_BASE as u32,
                    ECAM_SIZE as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The PCI hotplug controller's registers (pci_hotplug::PORT): PCIU (slots added; reading
/// clears it), PCID (slots to eject) and B0EJ (eject); and a device that reserves its ports.
fn pci_hotplug_registers() -> [Raw; 3] {
    let region = aml::OpRegion::new(
        "PCST".into(),
        aml::OpRegionSpace::SystemIO,
        &pci_hotplug::PORT,
        &pci_hotplug::LEN,
    );
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let reserve = raw(&aml::Device::new(
        "PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &"PCI Hotplug resources"),
            &aml::Name::new("_STA".into(), &0x0bu8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    pci_hotplug::PORT,
                    pci_hotplug::PORT,
                    1,
                    pci_hotplug::LEN as u8,
                )]),
            ),
        ],
    ));
    [raw(&region), raw(&field), reserve]
}

/// Slot `n` of bus 0: its device (function 0) and how the guest ejects it.
fn pci_slot(n: u32) -> Raw {
    let bit = 1u32 << n;
    raw(&aml::Device::new(
        format!("S{n:03X}").as_str().into(),
        vec![
            &aml::Name::new("_ADR".into(), &(n << 16)),
            &aml::Name::new("_SUN".into(), &n),
            &aml::Method::new(
                "_EJ0".into(),
                1,
                false,
                vec![&aml::Store::new(&aml::Path::new("B0EJ"), &bit)],
            ),
        ],
    ))
}

/// PCNT: the slots added since the last scan get a device check (1), those to be ejected an
/// eject request (3).
fn pcnt_method() -> Raw {
    let paths: Vec<aml::Path> = (1..32u32)
        .map(|n| aml::Path::new(&format!("S{n:03X}")))
        .collect();
    let bits: Vec<u32> = (1..32u32).map(|n| 1 << n).collect();
    let tests = |local: u8| -> Vec<Raw> {
        bits.iter()
            .map(|b| {
                raw(&aml::Equal::new(
                    &aml::And::new(&aml::Zero {}, &aml::Local(local), b),
                    b,
                ))
            })
            .collect()
    };
    let (added, leaving) = (tests(0), tests(1));
    let check: Vec<aml::Notify> = paths.iter().map(|p| aml::Notify::new(p, &1u8)).collect();
    let eject: Vec<aml::Notify> = paths.iter().map(|p| aml::Notify::new(p, &3u8)).collect();
    let mut ifs: Vec<aml::If> = Vec::new();
    for i in 0..paths.len() {
        ifs.push(aml::If::new(&added[i], vec![&check[i]]));
        ifs.push(aml::If::new(&leaving[i], vec![&eject[i]]));
    }
    let (pciu, pcid) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let (up, down) = (
        aml::Store::new(&aml::Local(0), &pciu),
        aml::Store::new(&aml::Local(1), &pcid),
    );
    let mut body: Vec<&dyn Aml> = vec![&up, &down];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    raw(&aml::Method::new("PCNT".into(), 0, true, body))
}

/// MCFG: ECAM for segment 0, bus 0.
pub fn mcfg() -> Vec<u8> {
    let mut m = acpi_tables::mcfg::MCFG::new(OEM_ID, *b"VMMMCFG ", 1);
    m.add_ecam(vmm_devices::pci::ECAM_BASE, 0, 0, 0);
    table_bytes(&m)
}

/// AML already serialised: what a statement's temporaries leave behind.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(a: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    Raw(v)
}

/// CTFY(id, event): Notify the processor device of vCPU `id`.
fn ctfy_method(max: u32) -> Raw {
    let paths: Vec<aml::Path> = (0..max)
        .map(|id| aml::Path::new(&format!("C{id:03X}")))
        .collect();
    let ids: Vec<u32> = (0..max).collect();
    let notifies: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &aml::Arg(1)))
        .collect();
    let tests: Vec<aml::Equal> = ids
        .iter()
        .map(|id| aml::Equal::new(&aml::Arg(0), id))
        .collect();
    let ifs: Vec<aml::If> = tests
        .iter()
        .zip(&notifies)
        .map(|(t, n)| aml::If::new(t, vec![n]))
        .collect();
    raw(&aml::Method::new(
        "CTFY".into(),
        2,
        false,
        ifs.iter().map(|i| i as &dyn acpi_tables::Aml).collect(),
    ))
}

/// The CPU hotplug controller's registers (cpu_hotplug::PORT): CSEL selects a vCPU, then
/// CEN_, CINS, CRMV and CEJ0 are its status bits.
fn hotplug_registers() -> [Raw; 3] {
    let region = aml::OpRegion::new(
        "PRST".into(),
        aml::OpRegionSpace::SystemIO,
        &cpu_hotplug::PORT,
        &cpu_hotplug::LEN,
    );
    let select_field = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"CSEL", 32)],
    );
    let status_field = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Reserved(32),
            aml::FieldEntry::Named(*b"CEN_", 1),
            aml::FieldEntry::Named(*b"CINS", 1),
            aml::FieldEntry::Named(*b"CRMV", 1),
            aml::FieldEntry::Named(*b"CEJ0", 1),
            aml::FieldEntry::Reserved(4),
        ],
    );
    [raw(&region), raw(&select_field), raw(&status_field)]
}

/// The processor devices and the CPU hotplug methods, over the controller's registers
/// (devices/cpu_hotplug.rs):
/// - CSTA(id): _STA of a vCPU, 0xF when enabled;
/// - CEJX(id): eject it (its _EJ0, run by the guest once it has offlined the CPU);
/// - CSCN(): the GED's CPU event: for each vCPU being inserted or removed, notify its device
///   (device check, or eject request) and clear the bit;
/// - CTFY(id, code): Notify the processor device `id`.
fn cpus_aml(max_cpus: u32, body: &mut Vec<u8>) {
    let name = |id: u32| format!("C{id:03X}");
    let csel = aml::Path::new("CSEL");
    let (cen, cins, crmv, cej) = (
        aml::Path::new("CEN_"),
        aml::Path::new("CINS"),
        aml::Path::new("CRMV"),
        aml::Path::new("CEJ0"),
    );
    let acquire = aml::Acquire::new("CPLK".into(), 0xffff);
    let release = aml::Release::new("CPLK".into());
    let max = max_cpus;

    let csta = raw(&aml::Method::new(
        "CSTA".into(),
        1,
        true,
        vec![
            &acquire,
            &aml::Store::new(&csel, &aml::Arg(0)),
            &aml::Store::new(&aml::Local(0), &aml::Zero {}),
            &aml::If::new(
                &aml::Equal::new(&cen, &aml::One {}),
                vec![&aml::Store::new(&aml::Local(0), &0x0fu8)],
            ),
            &release,
            &aml::Return::new(&aml::Local(0)),
        ],
    ));
    let cej0 = raw(&aml::Method::new(
        "CEJX".into(),
        1,
        true,
        vec![
            &acquire,
            &aml::Store::new(&csel, &aml::Arg(0)),
            &aml::Store::new(&cej, &aml::One {}),
            &release,
        ],
    ));
    let notify_insert = aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &aml::One {}]);
    let notify_remove = aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &3u8]);
    let cscn = raw(&aml::Method::new(
        "CSCN".into(),
        0,
        true,
        vec![
            &acquire,
            &aml::Store::new(&aml::Local(0), &aml::Zero {}),
            &aml::While::new(
                &aml::LessThan::new(&aml::Local(0), &max),
                vec![
                    &aml::Store::new(&csel, &aml::Local(0)),
                    &aml::If::new(
                        &aml::Equal::new(&cins, &aml::One {}),
                        vec![&notify_insert, &aml::Store::new(&cins, &aml::One {})],
                    ),
                    &aml::Else::new(vec![&aml::If::new(
                        &aml::Equal::new(&crmv, &aml::One {}),
                        vec![&notify_remove, &aml::Store::new(&crmv, &aml::One {})],
                    )]),
                    &aml::Add::new(&aml::Local(0), &aml::Local(0), &aml::One {}),
                ],
            ),
            &release,
        ],
    ));
    let ctfy = ctfy_method(max);
    let ids: Vec<u32> = (0..max).collect();

    // Each processor device: _HID ACPI0007, _UID its id (as in the MADT), _STA and _EJ0
    // through the methods above, and _MAT its MADT entry (enabled), for the guest to map it.
    let mats: Vec<aml::BufferData> = ids
        .iter()
        .map(|&id| {
            aml::BufferData::new(if id < 255 {
                vec![0, 8, id as u8, id as u8, 1, 0, 0, 0]
            } else {
                let mut e = vec![9, 16, 0, 0];
                e.extend_from_slice(&id.to_le_bytes());
                e.extend_from_slice(&1u32.to_le_bytes());
                e.extend_from_slice(&id.to_le_bytes());
                e
            })
        })
        .collect();
    let sta_calls: Vec<aml::MethodCall> = ids
        .iter()
        .map(|id| aml::MethodCall::new("CSTA".into(), vec![id]))
        .collect();
    let sta_returns: Vec<aml::Return> = sta_calls.iter().map(|c| aml::Return::new(c)).collect();
    let stas: Vec<aml::Method> = sta_returns
        .iter()
        .map(|r| aml::Method::new("_STA".into(), 0, false, vec![r]))
        .collect();
    let ej_calls: Vec<aml::MethodCall> = ids
        .iter()
        .map(|id| aml::MethodCall::new("CEJX".into(), vec![id]))
        .collect();
    let ejs: Vec<aml::Method> = ej_calls
        .iter()
        .map(|c| aml::Method::new("_EJ0".into(), 1, false, vec![c]))
        .collect();
    let hid = aml::Name::new("_HID".into(), &"ACPI0007");
    let uids: Vec<aml::Name> = ids
        .iter()
        .map(|id| aml::Name::new("_UID".into(), id))
        .collect();
    let mat_names: Vec<aml::Name> = mats
        .iter()
        .map(|m| aml::Name::new("_MAT".into(), m))
        .collect();
    let devices: Vec<aml::Device> = (0..max as usize)
        .map(|i| {
            aml::Device::new(
                name(i as u32).as_str().into(),
                vec![&hid, &uids[i], &stas[i], &mat_names[i], &ejs[i]],
            )
        })
        .collect();

    let mut children: Vec<&dyn acpi_tables::Aml> = Vec::new();
    let container_hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let container_cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let [region, select_field, status_field] = hotplug_registers();
    let mutex = aml::Mutex::new("CPLK".into(), 0);
    children.extend([
        &container_hid as &dyn acpi_tables::Aml,
        &container_cid,
        &region,
        &select_field,
        &status_field,
        &mutex,
        &csta,
        &cej0,
        &cscn,
        &ctfy,
    ]);
    children.extend(devices.iter().map(|d| d as &dyn acpi_tables::Aml));
    aml::Device::new("_SB_.CPUS".into(), children).to_aml_bytes(body);
}

/// FADT for a hardware-reduced platform: power-off through the sleep control register, reset
/// through the reset register, no VGA and no CMOS RTC.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, *b"VMMFACP ", 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // The power button is a control-method device (PNP0C0C, notified by the GED).
        .flag(Flags::PwrButton)
        .dsdt_64(dsdt_addr);
    f.sleep_control_reg = io(power::SLEEP_CONTROL_PORT);
    f.sleep_status_reg = io(power::SLEEP_STATUS_PORT);
    f.reset_reg = io(power::RESET_PORT);
    f.reset_value = power::RESET_VALUE;
    // IA-PC boot architecture flags: VGA not present (bit 2), CMOS RTC not present (bit 5).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMMCORE\0").into();
    table_bytes(&f.finalize())
}

/// Writes all tables into the legacy BIOS area and returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, config: &VmConfig) -> Result<u64, BootError> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(config.max_cpus);
    let dsdt_addr = align(xsdt_addr + 36 + 8 * 3);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(config.cpus, config.max_cpus);
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let mcfg = mcfg();
    let end = mcfg_addr + mcfg.len() as u64;
    assert!(
        end <= vmgenid::ADDR,
        "ACPI tables overflow the BIOS area below the VM generation ID"
    );

    let mut xsdt = XSDT::new(OEM_ID, *b"VMMXSDT ", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let w = |what, data: &[u8], addr| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| BootError::GuestWrite(what, e))
    };
    w("the RSDP", &table_bytes(&rsdp), rsdp_addr)?;
    w("the XSDT", &table_bytes(&xsdt), xsdt_addr)?;
    w("the DSDT", &dsdt, dsdt_addr)?;
    w("the FADT", &fadt, fadt_addr)?;
    w("the MADT", &madt, madt_addr)?;
    w("the MCFG", &mcfg, mcfg_addr)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(t: &[u8]) -> u8 {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_are_well_formed() {
        for t in [madt(2, 8), dsdt(8), fadt(0x1000)] {
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert_eq!(checksum(&t), 0);
        }
    }

    #[test]
    fn madt_lists_max_cpus_and_enables_the_boot_ones() {
        let t = madt(2, 5);
        let (mut count, mut enabled) = (0, 0);
        let mut off = 44;
        while off < t.len() {
            if t[off] == 0 {
                count += 1;
                enabled += t[off + 4] & 1;
            }
            off += t[off + 1] as usize;
        }
        assert_eq!((count, enabled), (5, 2));
    }

    #[test]
    fn dsdt_has_s5() {
        let t = dsdt(4);
        let pos = t.windows(4).position(|w| w == b"_S5_").unwrap();
        assert_eq!(t[pos + 4], 0x12); // PackageOp
    }
}
