//! The CPU hotplug controller: a small port-I/O register block that the DSDT's CPU methods
//! (and our test guest, directly) use to learn which vCPUs are present and which change.
//!
//! | offset | size | read | write |
//! |---|---|---|---|
//! | 0 | 4 | the selected vCPU id | select a vCPU |
//! | 4 | 1 | the selected vCPU's status: bit 0 enabled, bit 1 inserting, bit 2 removing | 1s in bit 1 or 2 clear that bit (the guest has seen the event); bit 3 ejects the vCPU (ACPI _EJ0) |
//! | 8 | 4 | how many vCPUs the VM can have (`max`) | - |
//!
//! A change is signalled through the GED (ged::EVENT_CPU_HOTPLUG). An eject is honoured only
//! for a vCPU the VMM asked to remove; any other is logged and ignored.

use crate::bus::Notify;
use crate::bus::{Action, PioDevice};
use vmm_proto::state::StateError;

pub const PORT: u16 = 0x0cd8;
pub const LEN: u16 = 12;
pub const STATUS_ENABLED: u8 = 1 << 0;
pub const STATUS_INSERTING: u8 = 1 << 1;
pub const STATUS_REMOVING: u8 = 1 << 2;
pub const STATUS_EJECT: u8 = 1 << 3;

/// What the guest did with the controller, for the VM's main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotplugEvent {
    /// The guest saw that this vCPU was inserted.
    InsertSeen(u32),
    /// The guest ejected this vCPU, which the VMM had asked to remove.
    Ejected(u32),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub enabled: bool,
    pub inserting: bool,
    pub removing: bool,
    /// The VMM asked to remove this vCPU and waits for the guest to eject it.
    pub eject_wanted: bool,
}

pub struct CpuHotplug {
    selected: u32,
    pub slots: Vec<Slot>,
    events: Notify<HotplugEvent>,
}

impl CpuHotplug {
    /// `max` vCPUs, of which the first `online` are enabled.
    pub fn new(online: u32, max: u32, events: Notify<HotplugEvent>) -> CpuHotplug {
        CpuHotplug {
            selected: 0,
            slots: (0..max)
                .map(|id| Slot {
                    enabled: id < online,
                    ..Slot::default()
                })
                .collect(),
            events,
        }
    }

    fn status(&self) -> u8 {
        self.slots.get(self.selected as usize).map_or(0, |s| {
            (u8::from(s.enabled) * STATUS_ENABLED)
                | (u8::from(s.inserting) * STATUS_INSERTING)
                | (u8::from(s.removing) * STATUS_REMOVING)
        })
    }
}

impl CpuHotplug {
    pub fn save(&self, mut b: vmm_proto::state_capnp::cpu_hotplug::Builder) {
        b.set_selected(self.selected);
        let mut l = b.init_slots(self.slots.len() as u32);
        for (i, s) in self.slots.iter().enumerate() {
            let mut e = l.reborrow().get(i as u32);
            e.set_enabled(s.enabled);
            e.set_inserting(s.inserting);
            e.set_removing(s.removing);
            e.set_eject_wanted(s.eject_wanted);
        }
    }

    /// Puts a saved state into a controller made for the same `--max-cpus`.
    pub fn restore(
        &mut self,
        r: vmm_proto::state_capnp::cpu_hotplug::Reader,
    ) -> Result<(), StateError> {
        let slots = r
            .get_slots()
            .map_err(StateError::read("the CPU hotplug controller's state"))?;
        if slots.len() as usize != self.slots.len() {
            return Err(StateError::HotplugSlots(
                slots.len() as usize,
                self.slots.len(),
            ));
        }
        for (s, e) in self.slots.iter_mut().zip(slots.iter()) {
            *s = Slot {
                enabled: e.get_enabled(),
                inserting: e.get_inserting(),
                removing: e.get_removing(),
                eject_wanted: e.get_eject_wanted(),
            };
        }
        self.selected = r.get_selected();
        Ok(())
    }
}

fn put_u32(v: u32, data: &mut [u8]) {
    for (d, b) in data.iter_mut().zip(v.to_le_bytes()) {
        *d = b;
    }
}

impl PioDevice for CpuHotplug {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        match offset {
            0..=3 => put_u32(self.selected >> (8 * offset), data),
            4 => data[0] = self.status(),
            8..=11 => put_u32((self.slots.len() as u32) >> (8 * (offset - 8)), data),
            _ => {}
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Action {
        match offset {
            0 => {
                let mut b = [0u8; 4];
                for (d, s) in b.iter_mut().zip(data) {
                    *d = *s;
                }
                self.selected = u32::from_le_bytes(b);
            }
            4 => {
                let id = self.selected;
                let v = data[0];
                let Some(slot) = self.slots.get_mut(id as usize) else {
                    return Action::None;
                };
                if v & STATUS_INSERTING != 0 && slot.inserting {
                    slot.inserting = false;
                    (self.events)(HotplugEvent::InsertSeen(id));
                }
                if v & STATUS_REMOVING != 0 {
                    slot.removing = false;
                }
                if v & STATUS_EJECT != 0 {
                    if slot.eject_wanted && slot.enabled {
                        slot.enabled = false;
                        slot.eject_wanted = false;
                        (self.events)(HotplugEvent::Ejected(id));
                    } else {
                        log::warn!(
                            "vCPU {id}: the guest ejected it, but no removal of it was asked for; ignored"
                        );
                    }
                }
            }
            _ => {}
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(c: &mut CpuHotplug, id: u32) -> u8 {
        c.write(0, &id.to_le_bytes());
        let mut b = [0u8];
        c.read(4, &mut b);
        b[0]
    }

    /// The selection and every slot go through the saved form; a VM with another
    /// --max-cpus refuses the state.
    #[test]
    fn state_survives_save_and_restore() {
        let ignore = || -> Notify<HotplugEvent> { Box::new(|_| {}) };
        let mut a = CpuHotplug::new(2, 4, ignore());
        a.slots[3].enabled = true;
        a.slots[3].inserting = true;
        a.slots[1].eject_wanted = true;
        a.slots[1].removing = true;
        a.write(0, &3u32.to_le_bytes());
        let mut msg = capnp::message::Builder::new_default();
        a.save(msg.init_root());
        let reader = vmm_proto::through_bytes(&msg);
        let mut b = CpuHotplug::new(1, 4, ignore());
        b.restore(reader.get_root().unwrap()).unwrap();
        assert_eq!(b.slots, a.slots);
        let mut r = [0u8];
        b.read(4, &mut r);
        assert_eq!(
            r[0],
            STATUS_ENABLED | STATUS_INSERTING,
            "vCPU 3 stays selected"
        );
        let mut c = CpuHotplug::new(1, 8, ignore());
        assert_eq!(
            c.restore(reader.get_root().unwrap())
                .unwrap_err()
                .to_string(),
            "the CPU hotplug controller's state is for 4 vCPUs, this VM has --max-cpus 8"
        );
    }

    #[test]
    fn insert_and_eject_follow_the_protocol() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = CpuHotplug::new(
            1,
            4,
            Box::new(move |e| {
                let _ = tx.send(e);
            }),
        );
        let mut n = [0u8; 4];
        c.read(8, &mut n);
        assert_eq!(u32::from_le_bytes(n), 4);
        assert_eq!(select(&mut c, 0), STATUS_ENABLED);
        assert_eq!(select(&mut c, 2), 0);

        c.slots[2].enabled = true;
        c.slots[2].inserting = true;
        assert_eq!(select(&mut c, 2), STATUS_ENABLED | STATUS_INSERTING);
        c.write(4, &[STATUS_INSERTING]);
        assert_eq!(select(&mut c, 2), STATUS_ENABLED);
        assert!(matches!(rx.try_recv(), Ok(HotplugEvent::InsertSeen(2))));

        // An eject nobody asked for is ignored (the check Cloud Hypervisor #8611 lacked).
        select(&mut c, 0);
        c.write(4, &[STATUS_EJECT]);
        assert_eq!(select(&mut c, 0), STATUS_ENABLED);
        assert!(rx.try_recv().is_err());

        c.slots[2].removing = true;
        c.slots[2].eject_wanted = true;
        assert_eq!(select(&mut c, 2), STATUS_ENABLED | STATUS_REMOVING);
        c.write(4, &[STATUS_REMOVING]);
        c.write(4, &[STATUS_EJECT]);
        assert_eq!(select(&mut c, 2), 0);
        assert!(matches!(rx.try_recv(), Ok(HotplugEvent::Ejected(2))));
    }
}
