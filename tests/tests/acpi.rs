//! The ACPI tables vmm-core generates, checked by a real ACPI implementation: ACPICA's iasl
//! (Debian's acpica-tools) disassembles each table, and the DSDT recompiles without errors.

use std::path::Path;
use std::process::Command;

fn iasl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("iasl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("iasl (Debian's acpica-tools; scripts/setup.sh installs it) cannot run: {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    text
}

#[test]
fn iasl_disassembles_every_table_and_recompiles_the_dsdt() {
    for (cpus, max) in [(1, 1), (2, 8)] {
        let tmp = vmm_tests::TempDir::new(&format!("acpi-{max}"));
        let dir = tmp.0.clone();
        let tables = [
            ("dsdt.dat", vmm_core::boot::acpi::dsdt(max)),
            ("facp.dat", vmm_core::boot::acpi::fadt(0x1000)),
            ("apic.dat", vmm_core::boot::acpi::madt(cpus, max)),
        ];
        for (name, bytes) in &tables {
            std::fs::write(dir.join(name), bytes).unwrap();
            let out = iasl(&dir, &["-d", name]);
            for bad in ["Error", "Warning", "Invalid", "Unknown"] {
                assert!(!out.contains(bad), "iasl -d {name} reports {bad:?}:\n{out}");
            }
            let dsl = std::fs::read_to_string(dir.join(name.replace(".dat", ".dsl"))).unwrap();
            assert!(
                !dsl.contains("**** "),
                "{name} disassembly flags a problem:\n{dsl}"
            );
        }
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for needle in [
            "_S5_",
            "ACPI0013",
            "_EVT",
            "PNP0C0C",
            "PNP0501",
            "QEMU0001",
            "ACPI0010",
            "CSCN",
            "CTFY",
            "VM_Gen_Counter",
            "Notify (\\_SB.VGEN, 0x80)",
            // ACPI PCI hotplug: the controller's registers, a slot object with its eject,
            // the scan the GED's PCI event calls, and its notifications.
            "OperationRegion (PCST, SystemIO, 0x0CE8, 0x0C)",
            "B0EJ,   32",
            "Device (S01F)",
            "Name (_SUN, 0x1F)",
            "Method (_EJ0, 1, NotSerialized)",
            "\\_SB.PCI0.PCNT ()",
            "Notify (S002, One)",
            "Notify (S002, 0x03)",
        ] {
            assert!(dsl.contains(needle), "the DSDT lacks {needle}:\n{dsl}");
        }
        // VMGenID's ADDR: the generation ID's address, low and high halves.
        let addr = dsl
            .split("Name (ADDR, Package")
            .nth(1)
            .unwrap_or_else(|| panic!("no VMGenID ADDR package:\n{dsl}"));
        let addr: String = addr.chars().take_while(|&c| c != '}').collect();
        assert!(
            addr.contains("0x000FF000") && addr.contains("Zero"),
            "ADDR {addr}"
        );
        // A processor device per possible vCPU, each with _STA, _MAT and _EJ0.
        // (And each of PCI bus 0's 31 slots has an _EJ0 too.)
        for (needle, n) in [
            ("\"ACPI0007\"", max),
            ("Method (_STA", max),
            ("Name (_MAT", max),
            ("Method (_EJ0", max + 31),
        ] {
            assert_eq!(
                dsl.matches(needle).count(),
                n as usize,
                "{needle} in:\n{dsl}"
            );
        }
        let out = iasl(&dir, &["-tc", "dsdt.dsl"]);
        assert!(
            out.contains("0 Errors, 0 Warnings"),
            "recompiling the DSDT:\n{out}"
        );
        let madt = std::fs::read_to_string(dir.join("apic.dsl")).unwrap();
        assert_eq!(
            madt.matches("Subtable Type : 00 [Processor Local APIC]")
                .count(),
            max as usize,
            "{madt}"
        );
    }
}
