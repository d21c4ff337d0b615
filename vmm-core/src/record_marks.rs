//! Where each of a recording's logs stood when a snapshot was taken (proto/schema/state.capnp's
//! RecordMarks): written into the VM state by a snapshot, read back by `--restore --replay`.
//! It imports nothing of the crate (the config and the snapshot both use it).

use vmm_proto::state::StateError;
use vmm_proto::state_capnp::vm_state;

/// Where each of a recording's logs stood at a snapshot (proto/schema/state.capnp's
/// RecordMarks): a replay of the snapshot goes on from there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordMarks {
    /// (device, its log's length in bytes then).
    pub logs: Vec<(String, u64)>,
    /// Bytes the guest had written to its console.
    pub console_written: u64,
}

impl RecordMarks {
    /// Where `name`'s log stood (None: the device had no log then).
    pub fn of(&self, name: &str) -> Option<u64> {
        self.logs.iter().find(|(n, _)| n == name).map(|(_, b)| *b)
    }

    pub fn write(&self, mut b: vmm_proto::state_capnp::record_marks::Builder) {
        b.set_console_written(self.console_written);
        let mut l = b.init_logs(self.logs.len() as u32);
        for (i, (name, bytes)) in self.logs.iter().enumerate() {
            let mut m = l.reborrow().get(i as u32);
            m.set_name(name);
            m.set_bytes(*bytes);
        }
    }

    /// The marks a VM state holds (None: it was not taken while recording).
    pub fn read(state: &[u8]) -> Result<Option<RecordMarks>, StateError> {
        let msg = capnp::serialize::read_message(&mut &state[..], Default::default())
            .map_err(StateError::read("the VM's state is not readable"))?;
        let e = StateError::read("the recording's marks");
        let r = msg.get_root::<vm_state::Reader>().map_err(&e)?;
        if !r.has_recording() {
            return Ok(None);
        }
        let m = r.get_recording().map_err(&e)?;
        let mut logs = Vec::new();
        for l in m.get_logs().map_err(&e)?.iter() {
            let name = l
                .get_name()
                .map_err(&e)?
                .to_string()
                .map_err(|_| StateError::NotText("a recording mark's name"))?;
            logs.push((name, l.get_bytes()));
        }
        Ok(Some(RecordMarks {
            logs,
            console_written: m.get_console_written(),
        }))
    }
}
