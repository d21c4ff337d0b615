//! The VM-wide state KVM keeps in the kernel: the in-kernel irqchip (both 8259 PICs and the
//! IOAPIC), the PIT, and kvmclock. Saved from a paused VM and restored into a new one, for
//! snapshots and live migration (issue 7's first part; the stream format is still to come).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

pub struct KvmState {
    /// The master PIC, the slave PIC and the IOAPIC, in that order.
    pub irqchips: [kvm_irqchip; 3],
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "the master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "the slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "the IOAPIC"),
];

#[derive(Debug, thiserror::Error)]
#[error("KVM state: cannot {0} {1}")]
pub struct StateError(&'static str, &'static str, #[source] kvm_ioctls::Error);

impl KvmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<KvmState, StateError> {
        let mut irqchips: [kvm_irqchip; 3] = Default::default();
        for (chip, (id, what)) in irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            vm.get_irqchip(chip)
                .map_err(|e| StateError("save", what, e))?;
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| StateError("save", "the PIT", e))?;
        let clock = vm
            .get_clock()
            .map_err(|e| StateError("save", "kvmclock", e))?;
        Ok(KvmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Puts the state into a new VM (with its irqchip and PIT created, before its vCPUs run).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for (chip, (_, what)) in self.irqchips.iter().zip(CHIPS) {
            vm.set_irqchip(chip)
                .map_err(|e| StateError("restore", what, e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| StateError("restore", "the PIT", e))?;
        // Only the clock's value goes back: the flags KVM_GET_CLOCK reports (stable, realtime)
        // describe the source host and are not inputs.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| StateError("restore", "kvmclock", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::Kvm;

    fn vm(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        vm
    }

    /// The irqchip, PIT and clock saved from one VM read back the same from another, on this
    /// host's real KVM.
    #[test]
    fn irqchip_pit_and_clock_survive_save_and_restore_into_another_vm() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let a = vm(&kvm);
        // Program the IOAPIC's pin 4 (vector 0x34, level, masked off) and the master PIC's mask.
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        a.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: chip_id says the union holds the IOAPIC's state.
        unsafe { ioapic.chip.ioapic.redirtbl[4].bits = 0x0000_0000_0000_8034 };
        a.set_irqchip(&ioapic).unwrap();
        let mut pic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        a.get_irqchip(&mut pic).unwrap();
        pic.chip.pic.imr = 0xb5;
        a.set_irqchip(&pic).unwrap();
        let mut pit = a.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        a.set_pit2(&pit).unwrap();
        a.set_clock(&kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        })
        .unwrap();
        let saved = KvmState::save(&a).unwrap();

        let b = vm(&kvm);
        saved.restore(&b).unwrap();
        let back = KvmState::save(&b).unwrap();
        // SAFETY: as above, per chip_id.
        unsafe {
            assert_eq!(back.irqchips[2].chip.ioapic.redirtbl[4].bits, 0x8034);
            assert_eq!(back.irqchips[0].chip.pic.imr, 0xb5);
            assert_eq!(
                back.irqchips[1].chip.pic.imr,
                saved.irqchips[1].chip.pic.imr
            );
        }
        assert_eq!(back.pit.channels[0].count, 0x1234);
        // The clock went on from where it was saved (it runs: a little later, not earlier).
        assert!(
            back.clock.clock >= saved.clock.clock
                && back.clock.clock - saved.clock.clock < 1_000_000_000,
            "saved {} restored {}",
            saved.clock.clock,
            back.clock.clock
        );
        assert!(saved.clock.clock >= 5_000_000_000);
    }
}
