//! A snapshot of a VM that records (--record DIR) says where each of its logs stands, so that
//! `run --restore file:SNAP --replay DIR` goes on from there: the console's and the rng's logs
//! (vmm-core and chardevd write them unbuffered; their queues stopped), each disk's (blockd
//! flushes its image and log and says), and for a disk recorded on a base copy, the image as
//! it is now, kept beside its log (`LOG.at-BYTES`): a replay from the snapshot works on a
//! copy of that.

use crate::api::Shared;
use crate::config::{Recording, VmConfig};
use crate::record_marks::RecordMarks;

/// Where each log stands now (the VM paused, its queues stopped).
pub(super) fn take(config: &VmConfig, shared: &Shared) -> Result<RecordMarks, String> {
    let Some(rec @ Recording::Record(_)) = &config.recording else {
        return Err("not recording".into());
    };
    let mut marks = RecordMarks {
        console_written: shared.console_written.get().map_or(0, |w| w.get()),
        ..Default::default()
    };
    for name in ["serial0", crate::helpers::chardevd::RNG] {
        let log = rec.log(name);
        if let Ok(m) = std::fs::metadata(&log) {
            marks.logs.push((name.to_string(), m.len()));
        }
    }
    let blockd = shared.blockd.lock().unwrap();
    for (i, d) in config.disks.iter().enumerate() {
        let Some(path) = &d.path else {
            continue;
        };
        let name = format!("disk{i}");
        let log = rec.log(&name);
        let keep = vmm_proto::image::base_of(&log)
            .exists()
            .then(|| (path.clone(), log));
        let bytes = blockd
            .as_ref()
            .ok_or("blockd is not running")?
            .mark(&name, keep)
            .map_err(|e| format!("{name}: {e}"))?;
        marks.logs.push((name, bytes));
    }
    Ok(marks)
}
