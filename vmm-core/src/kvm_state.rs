//! The VM-wide state KVM keeps in the kernel: the in-kernel irqchip (both 8259 PICs and the
//! IOAPIC), the PIT, and kvmclock. Saved from a paused VM and restored into a new one, for
//! snapshots and live migration (issue 7's first part; the stream format is still to come).

use kvm_bindings::{
    kvm_clock_data, kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_channel_state,
    kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use vmm_proto::state::StateError;
use vmm_proto::state_capnp;

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
pub struct KvmStateError(&'static str, &'static str, #[source] kvm_ioctls::Error);

impl KvmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<KvmState, KvmStateError> {
        let mut irqchips: [kvm_irqchip; 3] = Default::default();
        for (chip, (id, what)) in irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            vm.get_irqchip(chip)
                .map_err(|e| KvmStateError("save", what, e))?;
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| KvmStateError("save", "the PIT", e))?;
        let clock = vm
            .get_clock()
            .map_err(|e| KvmStateError("save", "kvmclock", e))?;
        Ok(KvmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Puts the state into a new VM (with its irqchip and PIT created, before its vCPUs run).
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        for (chip, (_, what)) in self.irqchips.iter().zip(CHIPS) {
            vm.set_irqchip(chip)
                .map_err(|e| KvmStateError("restore", what, e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| KvmStateError("restore", "the PIT", e))?;
        // Only the clock's value goes back: the flags KVM_GET_CLOCK reports (stable, realtime)
        // describe the source host and are not inputs.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| KvmStateError("restore", "kvmclock", e))?;
        Ok(())
    }
}

fn write_pic(mut b: state_capnp::pic::Builder, p: &kvm_pic_state) {
    b.set_last_irr(p.last_irr);
    b.set_irr(p.irr);
    b.set_imr(p.imr);
    b.set_isr(p.isr);
    b.set_priority_add(p.priority_add);
    b.set_irq_base(p.irq_base);
    b.set_read_reg_select(p.read_reg_select);
    b.set_poll(p.poll);
    b.set_special_mask(p.special_mask);
    b.set_init_state(p.init_state);
    b.set_auto_eoi(p.auto_eoi);
    b.set_rotate_on_auto_eoi(p.rotate_on_auto_eoi);
    b.set_special_fully_nested_mode(p.special_fully_nested_mode);
    b.set_init4(p.init4);
    b.set_elcr(p.elcr);
    b.set_elcr_mask(p.elcr_mask);
}

fn read_pic(r: state_capnp::pic::Reader) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: r.get_last_irr(),
        irr: r.get_irr(),
        imr: r.get_imr(),
        isr: r.get_isr(),
        priority_add: r.get_priority_add(),
        irq_base: r.get_irq_base(),
        read_reg_select: r.get_read_reg_select(),
        poll: r.get_poll(),
        special_mask: r.get_special_mask(),
        init_state: r.get_init_state(),
        auto_eoi: r.get_auto_eoi(),
        rotate_on_auto_eoi: r.get_rotate_on_auto_eoi(),
        special_fully_nested_mode: r.get_special_fully_nested_mode(),
        init4: r.get_init4(),
        elcr: r.get_elcr(),
        elcr_mask: r.get_elcr_mask(),
    }
}

impl KvmState {
    /// Writes the state into its Cap'n Proto form.
    pub fn write(&self, mut b: state_capnp::kvm_state::Builder) {
        // SAFETY: chip_id, set by `save` (or `read`), says the first two irqchips hold PICs.
        let (master, slave) = unsafe { (&self.irqchips[0].chip.pic, &self.irqchips[1].chip.pic) };
        write_pic(b.reborrow().init_pic_master(), master);
        write_pic(b.reborrow().init_pic_slave(), slave);
        // SAFETY: as above; the third is the IOAPIC.
        let io = unsafe { &self.irqchips[2].chip.ioapic };
        let mut r = b.reborrow().init_ioapic();
        r.set_base_address(io.base_address);
        r.set_ioregsel(io.ioregsel);
        r.set_id(io.id);
        r.set_irr(io.irr);
        let mut l = r.init_redirection(io.redirtbl.len() as u32);
        for (i, e) in io.redirtbl.iter().enumerate() {
            // SAFETY: a redirection entry is one u64 (`bits`) or its bit fields.
            l.set(i as u32, unsafe { e.bits });
        }
        let mut p = b.reborrow().init_pit();
        p.set_flags(self.pit.flags);
        let mut l = p.init_channels(3);
        for (i, c) in self.pit.channels.iter().enumerate() {
            let mut w = l.reborrow().get(i as u32);
            w.set_count(c.count);
            w.set_latched_count(c.latched_count);
            w.set_count_latched(c.count_latched);
            w.set_status_latched(c.status_latched);
            w.set_status(c.status);
            w.set_read_state(c.read_state);
            w.set_write_state(c.write_state);
            w.set_write_latch(c.write_latch);
            w.set_rw_mode(c.rw_mode);
            w.set_mode(c.mode);
            w.set_bcd(c.bcd);
            w.set_gate(c.gate);
            w.set_count_load_time(c.count_load_time);
        }
        b.set_clock_ns(self.clock.clock);
    }

    /// Reads the state back, checking the sizes a stream from elsewhere could get wrong.
    pub fn read(r: state_capnp::kvm_state::Reader) -> Result<KvmState, StateError> {
        Self::read_parts(r).map_err(|e| e.within("KVM state"))
    }

    fn read_parts(r: state_capnp::kvm_state::Reader) -> Result<KvmState, StateError> {
        let e = StateError::read;
        let mut irqchips: [kvm_irqchip; 3] = Default::default();
        for (chip, (id, _)) in irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
        }
        irqchips[0].chip.pic = read_pic(r.get_pic_master().map_err(e("the master PIC"))?);
        irqchips[1].chip.pic = read_pic(r.get_pic_slave().map_err(e("the slave PIC"))?);
        let io = r.get_ioapic().map_err(e("the IOAPIC"))?;
        let mut ioapic = kvm_ioapic_state {
            base_address: io.get_base_address(),
            ioregsel: io.get_ioregsel(),
            id: io.get_id(),
            irr: io.get_irr(),
            ..Default::default()
        };
        let table = io.get_redirection().map_err(e("the IOAPIC"))?;
        if table.len() as usize != ioapic.redirtbl.len() {
            return Err(StateError::Count {
                part: "the IOAPIC",
                unit: "redirection entries",
                got: table.len() as usize,
                want: ioapic.redirtbl.len(),
            });
        }
        for (i, entry) in ioapic.redirtbl.iter_mut().enumerate() {
            entry.bits = table.get(i as u32);
        }
        irqchips[2].chip.ioapic = ioapic;
        let p = r.get_pit().map_err(e("the PIT"))?;
        let channels = p.get_channels().map_err(e("the PIT"))?;
        if channels.len() != 3 {
            return Err(StateError::Count {
                part: "the PIT",
                unit: "channels",
                got: channels.len() as usize,
                want: 3,
            });
        }
        let mut pit = kvm_pit_state2 {
            flags: p.get_flags(),
            ..Default::default()
        };
        for (c, w) in pit.channels.iter_mut().zip(channels.iter()) {
            *c = kvm_pit_channel_state {
                count: w.get_count(),
                latched_count: w.get_latched_count(),
                count_latched: w.get_count_latched(),
                status_latched: w.get_status_latched(),
                status: w.get_status(),
                read_state: w.get_read_state(),
                write_state: w.get_write_state(),
                write_latch: w.get_write_latch(),
                rw_mode: w.get_rw_mode(),
                mode: w.get_mode(),
                bcd: w.get_bcd(),
                gate: w.get_gate(),
                count_load_time: w.get_count_load_time(),
            };
        }
        Ok(KvmState {
            irqchips,
            pit,
            clock: kvm_clock_data {
                clock: r.get_clock_ns(),
                ..Default::default()
            },
        })
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
        // Through the stream's form: a Cap'n Proto message, as bytes.
        let mut msg = capnp::message::Builder::new_default();
        saved.write(msg.init_root());
        let reader = vmm_proto::through_bytes(&msg);
        let decoded = KvmState::read(reader.get_root().unwrap()).unwrap();

        let b = vm(&kvm);
        decoded.restore(&b).unwrap();
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
