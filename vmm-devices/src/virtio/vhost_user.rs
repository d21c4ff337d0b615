//! A virtio device whose queues are served by a vhost-user backend: virtio-blk (blockd, or
//! any compliant vhost-user-blk backend) or virtio-rng (vhost-user-rng: chardevd, or rust-vmm's
//! vhost-device-rng). vmm-core negotiates, hands over the guest RAM memfd, the vring
//! addresses, and the kick and call eventfds; the data path then bypasses it.

use super::{QueueSetup, VirtioDevice, VirtioError};
use crate::layout::GuestMemory;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_proto::state::StateError;

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// vhost's "log all writes": acked while a migration logs dirty pages.
const VHOST_F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
/// The virtio-blk configuration space through `write_zeroes_may_unmap` (virtio 1.2, 5.2.4).
pub const CONFIG_SIZE: usize = 60;
const VIRTIO_BLK_F_MQ: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;

/// Which virtio device the backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk: a configuration space (capacity, queues, write cache) from the backend.
    Blk,
    /// virtio-rng: one queue, no configuration space.
    Rng,
}

impl Kind {
    fn device_type(self) -> u16 {
        (match self {
            Kind::Blk => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            Kind::Rng => virtio_bindings::virtio_ids::VIRTIO_ID_RNG,
        }) as u16
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Blk => "vhost-user-blk",
            Kind::Rng => "vhost-user-rng",
        }
    }
}

pub struct VhostUserDevice {
    name: String,
    kind: Kind,
    socket: PathBuf,
    frontend: Frontend,
    /// The backend's virtio features (without the vhost-user protocol bit).
    features: u64,
    config: Vec<u8>,
    queues: u16,
    queue_size: u16,
    mem: GuestMemory,
    memfd: std::fs::File,
    started: Vec<usize>,
    /// What the driver started the device with (features, queues with their eventfds), to
    /// set a restarted backend up again.
    active: Option<(u64, Vec<Ring>)>,
    /// Whether the backend keeps an inflight area (INFLIGHT_SHMFD).
    tracks_inflight: bool,
    /// The backend's inflight area while the device runs: handed back to a restarted
    /// backend so that it resubmits what its predecessor had taken.
    inflight: Option<(VhostUserInflight, std::fs::File)>,
    /// Whether the backend offers the dirty log (LOG_SHMFD and VHOST_F_LOG_ALL).
    can_log: bool,
    /// The migration's dirty log while it runs (handed again to a restarted backend).
    log: Option<(std::fs::File, u64)>,
    /// Whether the backend joins post-copy (PAGEFAULT).
    can_postcopy: bool,
    /// Post-copy: the backend has the memory table (sent with POSTCOPY_LISTEN): the rings'
    /// start must not send another.
    postcopy_table: bool,
}

/// A started queue, as the backend needs it.
struct Ring {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: vmm_sys_util::eventfd::EventFd,
    call: vmm_sys_util::eventfd::EventFd,
}

/// virtio-blk's config byte for the write cache (VIRTIO_BLK_F_CONFIG_WCE).
const CONFIG_WRITEBACK: usize = 32;

fn err(
    socket: &Path,
    what: &'static str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> VirtioError {
    VirtioError::Backend {
        socket: socket.to_path_buf(),
        what,
        why: e.into(),
    }
}

/// What the handshake learnt.
struct Shake {
    frontend: Frontend,
    features: u64,
    config: Vec<u8>,
    tracks_inflight: bool,
    can_log: bool,
    can_postcopy: bool,
}

/// Connects, negotiates the protocol, and learns the backend's features and config space.
fn handshake(socket: &Path, kind: Kind, queues: u16) -> Result<Shake, VirtioError> {
    let mut fe = Frontend::connect(socket, u64::from(queues))
        .map_err(|e| err(socket, "cannot connect", e))?;
    fe.set_owner().map_err(|e| err(socket, "SET_OWNER", e))?;
    let features = fe
        .get_features()
        .map_err(|e| err(socket, "GET_FEATURES", e))?;
    if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Err(err(
            socket,
            "features",
            format!(
                "no VHOST_USER_F_PROTOCOL_FEATURES; vmm-core's {} frontend needs them (SET_VRING_ENABLE{})",
                kind.name(),
                if kind == Kind::Blk { ", CONFIG" } else { "" }
            ),
        ));
    }
    let offered = fe
        .get_protocol_features()
        .map_err(|e| err(socket, "GET_PROTOCOL_FEATURES", e))?;
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::PAGEFAULT;
    if kind == Kind::Blk && !offered.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(err(socket, "protocol features", "the backend lacks CONFIG"));
    }
    fe.set_protocol_features(offered & wanted)
        .map_err(|e| err(socket, "SET_PROTOCOL_FEATURES", e))?;
    let backend_queues = if offered.contains(VhostUserProtocolFeatures::MQ) {
        fe.get_queue_num()
            .map_err(|e| err(socket, "GET_QUEUE_NUM", e))?
    } else {
        1
    };
    if backend_queues < u64::from(queues) {
        return Err(err(
            socket,
            "queues",
            format!("it serves {backend_queues} queue(s), {queues} were asked for"),
        ));
    }
    let config = match kind {
        Kind::Blk => {
            let (_, config) = fe
                .get_config(
                    0,
                    CONFIG_SIZE as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &[0u8; CONFIG_SIZE],
                )
                .map_err(|e| err(socket, "GET_CONFIG", e))?;
            let mut config = config.to_vec();
            // The guest sees the queue count vmm-core was asked for.
            config[34..36].copy_from_slice(&queues.to_le_bytes());
            config
        }
        Kind::Rng => Vec::new(),
    };
    let can_log =
        features & VHOST_F_LOG_ALL != 0 && offered.contains(VhostUserProtocolFeatures::LOG_SHMFD);
    // What the guest sees: the vhost-user bits are between vmm-core and the backend.
    let mut features = features & !(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL);
    if kind == Kind::Blk && queues == 1 {
        features &= !VIRTIO_BLK_F_MQ;
    }
    Ok(Shake {
        frontend: fe,
        features,
        config,
        tracks_inflight: offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        can_log,
        can_postcopy: offered.contains(VhostUserProtocolFeatures::PAGEFAULT),
    })
}

impl VhostUserDevice {
    /// Connects and learns what the backend offers: features, queue count, config space.
    pub fn connect(
        name: &str,
        socket: &Path,
        kind: Kind,
        queues: u16,
        mem: GuestMemory,
        memfd: std::fs::File,
    ) -> Result<VhostUserDevice, VirtioError> {
        let shake = handshake(socket, kind, queues)?;
        Ok(VhostUserDevice {
            name: name.to_string(),
            kind,
            socket: socket.to_path_buf(),
            frontend: shake.frontend,
            features: shake.features,
            config: shake.config,
            tracks_inflight: shake.tracks_inflight,
            inflight: None,
            can_log: shake.can_log,
            log: None,
            can_postcopy: shake.can_postcopy,
            postcopy_table: false,
            queues,
            queue_size: 256,
            mem,
            memfd,
            started: Vec::new(),
            active: None,
        })
    }

    /// Hands the backend guest memory and the rings; each ring starts at `base(ring)`.
    fn start_rings(
        &mut self,
        features: u64,
        rings: &[Ring],
        base: impl Fn(&Ring) -> u16,
    ) -> Result<(), VirtioError> {
        self.frontend
            .set_features(features | VHOST_USER_F_PROTOCOL_FEATURES | self.log_bit())
            .map_err(|e| self.e("SET_FEATURES", e))?;
        self.send_log_base()?;
        if !self.postcopy_table {
            let regions = self.regions();
            self.frontend
                .set_mem_table(&regions)
                .map_err(|e| self.e("SET_MEM_TABLE", e))?;
        }
        if self.tracks_inflight {
            // The area comes from the backend at the device's first start and goes back to
            // it (or to its successor) before the rings at every start.
            if self.inflight.is_none() {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.queues,
                    queue_size: self.queue_size,
                };
                let got = self
                    .frontend
                    .get_inflight_fd(&ask)
                    .map_err(|e| self.e("GET_INFLIGHT_FD", e))?;
                self.inflight = Some(got);
            }
            let (area, file) = self.inflight.as_ref().expect("set above");
            self.frontend
                .set_inflight_fd(area, file.as_raw_fd())
                .map_err(|e| self.e("SET_INFLIGHT_FD", e))?;
        }
        for q in rings {
            let i = usize::from(q.index);
            let n = u64::from(q.size);
            let config = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.host_address(q.desc, 16 * n, "descriptor table", q.index)?,
                avail_ring_addr: self.host_address(
                    q.avail,
                    6 + 2 * n,
                    "available ring",
                    q.index,
                )?,
                used_ring_addr: self.host_address(q.used, 6 + 8 * n, "used ring", q.index)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size)
                .map_err(|e| self.e("SET_VRING_NUM", e))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(|e| self.e("SET_VRING_ADDR", e))?;
            self.frontend
                .set_vring_base(i, base(q))
                .map_err(|e| self.e("SET_VRING_BASE", e))?;
            self.frontend
                .set_vring_call(i, &q.call)
                .map_err(|e| self.e("SET_VRING_CALL", e))?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .map_err(|e| self.e("SET_VRING_KICK", e))?;
            self.frontend
                .set_vring_enable(i, true)
                .map_err(|e| self.e("SET_VRING_ENABLE", e))?;
            self.started.push(i);
        }
        Ok(())
    }

    /// The guest's write-cache setting (virtio-blk's config byte) to the backend.
    fn send_writeback(&mut self, wce: u8) -> Result<(), VirtioError> {
        self.frontend
            .set_config(
                CONFIG_WRITEBACK as u32,
                VhostUserConfigFlags::WRITABLE,
                &[wce],
            )
            .map_err(|e| self.e("SET_CONFIG", e))
    }

    /// Guest RAM as the backend maps it: each region from the memfd.
    fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: r.file_offset().map_or(0, |f| f.start()),
                mmap_handle: self.memfd.as_raw_fd(),
            })
            .collect()
    }

    /// VHOST_F_LOG_ALL while a migration logs.
    fn log_bit(&self) -> u64 {
        if self.log.is_some() && self.can_log {
            VHOST_F_LOG_ALL
        } else {
            0
        }
    }

    fn send_log_base(&self) -> Result<(), VirtioError> {
        if let (Some((file, bytes)), true) = (&self.log, self.can_log) {
            let region = vhost::VhostUserDirtyLogRegion {
                mmap_size: *bytes,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            };
            self.frontend
                .set_log_base(0, Some(region))
                .map_err(|e| self.e("SET_LOG_BASE", e))?;
        }
        Ok(())
    }

    fn host_address(
        &self,
        gpa: u64,
        len: u64,
        what: &'static str,
        q: u16,
    ) -> Result<u64, VirtioError> {
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), len as usize)
            .map_err(|_| VirtioError::NotInRam {
                queue: q,
                what,
                gpa,
                len,
            })?;
        Ok(slice.ptr_guard().as_ptr() as u64)
    }

    /// The queues as the backend needs them, with their eventfds.
    fn rings(&self, queues: &[QueueSetup]) -> Result<Vec<Ring>, VirtioError> {
        queues
            .iter()
            .map(|q| {
                Ok(Ring {
                    index: q.index,
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    kick: q
                        .kick
                        .try_clone()
                        .map_err(|e| self.e("the kick eventfd", e))?,
                    call: q
                        .call
                        .try_clone()
                        .map_err(|e| self.e("the call eventfd", e))?,
                })
            })
            .collect()
    }

    fn e(
        &self,
        what: &'static str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> VirtioError {
        err(&self.socket, what, e)
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        self.kind.device_type()
    }

    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn refresh_config(&mut self) -> Result<bool, VirtioError> {
        if self.kind != Kind::Blk {
            return Ok(false);
        }
        let (_, now) = self
            .frontend
            .get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::WRITABLE,
                &[0u8; CONFIG_SIZE],
            )
            .map_err(|e| self.e("GET_CONFIG", e))?;
        // The capacity (sectors, the first 8 bytes) is what a backend changes under a running
        // guest; the rest stays as the guest and vmm-core set it.
        let changed = self.config.get(..8) != now.get(..8);
        if changed {
            self.config[..8].copy_from_slice(&now[..8]);
        }
        Ok(changed)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let off = offset as usize;
        if off + data.len() > self.config.len() {
            return;
        }
        if let Err(e) =
            self.frontend
                .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            log::warn!("{}: {}", self.name, self.e("SET_CONFIG", e));
            return;
        }
        self.config[off..off + data.len()].copy_from_slice(data);
    }

    fn activate(&mut self, features: u64, queues: &[QueueSetup]) -> Result<(), VirtioError> {
        let rings = self.rings(queues)?;
        self.start_rings(features, &rings, |_| 0)?;
        self.active = Some((features, rings));
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), VirtioError> {
        if self.postcopy_table {
            // Its successor has no userfaultfd: it would read pages still on the source as
            // zeroes. (A backend is not handed to post-copy after it started.)
            return Err(self.e(
                "reconnect",
                "the backend restarted during post-copy, and a new one cannot join it; the disk stays stopped until post-copy is over",
            ));
        }
        let Shake {
            frontend: fe,
            features,
            config,
            tracks_inflight,
            can_log,
            can_postcopy,
        } = handshake(&self.socket, self.kind, self.queues)?;
        self.can_postcopy = can_postcopy;
        // A backend that cannot log (another one than before) makes logs_dirty false, and a
        // migration's last pass resends all of RAM.
        self.can_log = can_log;
        if features != self.features {
            return Err(self.e(
                "features",
                format!(
                    "the restarted backend offers {features:#x}, not {:#x} as before",
                    self.features
                ),
            ));
        }
        self.frontend = fe;
        self.started.clear();
        if tracks_inflight != self.tracks_inflight {
            // A different backend: its predecessor's area means nothing to it.
            self.inflight = None;
            self.tracks_inflight = tracks_inflight;
        }
        // The guest's write-cache setting, which the new backend does not know.
        let wce = self.config.get(CONFIG_WRITEBACK).copied();
        if let Some(wce) = wce.filter(|&w| config.get(CONFIG_WRITEBACK) != Some(&w)) {
            self.send_writeback(wce)?;
        }
        let Some((features, rings)) = self.active.take() else {
            // The driver has not started the device: nothing more to set up.
            return Ok(());
        };
        // Each ring goes on from the guest's used index: a request the dead backend took but
        // did not complete is taken again (a completed one is in the used ring already). A
        // backend with the inflight area finds those requests there instead, in the order they
        // were taken, which also holds when they completed out of order.
        let mem = self.mem.clone();
        let used_idx = |r: &Ring| {
            use vm_memory::Bytes;
            mem.read_obj::<u16>(GuestAddress(r.used + 2)).unwrap_or(0)
        };
        let result = self.start_rings(features, &rings, used_idx);
        // Requests the guest queued while the backend was away: make the backend look.
        for r in &rings {
            let _ = r.kick.write(1);
        }
        self.active = Some((features, rings));
        result
    }

    fn set_dirty_log(&mut self, log: Option<&crate::dirty_log::SharedDirtyLog>) -> bool {
        let was = self.log.is_some();
        self.log = match log.map(|l| (l.file().try_clone(), l.bytes())) {
            Some((Ok(f), bytes)) => Some((f, bytes)),
            Some((Err(e), _)) => {
                log::warn!("{}: cannot share the dirty log ({e})", self.name);
                None
            }
            None => None,
        };
        if !self.can_log || (!was && self.log.is_none()) {
            return false;
        }
        if let Some((features, _)) = &self.active {
            let features = *features;
            // SET_FEATURES has no reply of its own: GET_FEATURES after it returns once the
            // backend has taken it (it answers messages in order). Until then it may write
            // guest pages unlogged, and a pass that began meanwhile would leave them stale
            // at the destination (QEMU waits for a reply here too while logging).
            let r = self.send_log_base().and_then(|()| {
                self.frontend
                    .set_features(features | VHOST_USER_F_PROTOCOL_FEATURES | self.log_bit())
                    .and_then(|()| self.frontend.get_features().map(|_| ()))
                    .map_err(|e| self.e("SET_FEATURES", e))
            });
            if let Err(e) = r {
                log::warn!(
                    "{}: {e}; a migration resends all of RAM at the end",
                    self.name
                );
                self.log = None;
                return false;
            }
        }
        self.log.is_some()
    }

    fn logs_dirty(&self) -> bool {
        self.log.is_some() && self.can_log
    }

    fn postcopy_advise(&mut self) -> Result<Option<super::PostcopyBackend>, VirtioError> {
        if !self.can_postcopy {
            return Err(self.e(
                "POSTCOPY_ADVISE",
                "the backend does not offer PAGEFAULT, so it cannot join post-copy (its reads of pages still on the source would see zeroes)",
            ));
        }
        let uffd = self.frontend.postcopy_advise().map_err(|e| {
            self.e(
                "POSTCOPY_ADVISE",
                format!("{e}: the backend made no userfaultfd (it needs /dev/userfaultfd or CAP_SYS_PTRACE; its log says why)"),
            )
        })?;
        self.frontend
            .postcopy_listen()
            .map_err(|e| self.e("POSTCOPY_LISTEN", e))?;
        let regions = self.regions();
        let bases = self
            .frontend
            .set_mem_table(&regions)
            .map_err(|e| self.e("SET_MEM_TABLE (post-copy)", e))?
            .ok_or_else(|| {
                self.e(
                    "SET_MEM_TABLE (post-copy)",
                    "no mapping addresses came back",
                )
            })?;
        self.postcopy_table = true;
        let maps = regions
            .iter()
            .zip(bases)
            .map(|(r, va)| (va, r.guest_phys_addr, r.memory_size))
            .collect();
        Ok(Some((uffd, maps)))
    }

    fn postcopy_served(&mut self) -> Result<(), VirtioError> {
        self.frontend
            .postcopy_ack_mem_regions(vhost::vhost_user::message::FrontendReq::SET_MEM_TABLE)
            .map_err(|e| self.e("the post-copy memory table's ack", e))
    }

    fn postcopy_end(&mut self) -> Result<(), VirtioError> {
        self.postcopy_table = false;
        self.frontend
            .postcopy_end()
            .map_err(|e| self.e("POSTCOPY_END", e))
    }

    fn used_rings(&self) -> Vec<(u64, u64)> {
        self.active.as_ref().map_or(Vec::new(), |(_, rings)| {
            rings
                .iter()
                .map(|r| (r.used, 6 + 8 * u64::from(r.size)))
                .collect()
        })
    }

    fn drain(&mut self, limit: std::time::Duration) -> u64 {
        use vm_memory::Bytes;
        let Some((_, rings)) = &self.active else {
            return 0;
        };
        let deadline = std::time::Instant::now() + limit;
        loop {
            // The rings run: what the driver made available (and kicked) the backend takes
            // and answers.
            let mut left = 0u64;
            for r in rings {
                let avail: u16 = self.mem.read_obj(GuestAddress(r.avail + 2)).unwrap_or(0);
                let used: u16 = self.mem.read_obj(GuestAddress(r.used + 2)).unwrap_or(0);
                left += u64::from(avail.wrapping_sub(used));
            }
            if left == 0 || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn stop_queues(&mut self) -> Result<Vec<(u16, u16)>, VirtioError> {
        use vm_memory::Bytes;
        let Some((_, rings)) = &self.active else {
            return Ok(Vec::new());
        };
        let mut bases = Vec::new();
        for r in rings {
            let i = usize::from(r.index);
            // GET_VRING_BASE stops the ring: the backend takes no more requests, and says
            // which it would take next. What it took before completes on its own.
            let next = self
                .frontend
                .get_vring_base(i)
                .map_err(|e| self.e("GET_VRING_BASE", e))? as u16;
            self.started.retain(|&s| s != i);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let used: u16 = self
                    .mem
                    .read_obj(GuestAddress(r.used + 2))
                    .map_err(|e| VirtioError::UsedRing(i as u16, e))?;
                if used == next {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(VirtioError::Stuck {
                        device: self.name.clone(),
                        queue: i as u16,
                        requests: next.wrapping_sub(used),
                        socket: self.socket.clone(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            bases.push((r.index, next));
        }
        Ok(bases)
    }

    fn start_queues(
        &mut self,
        features: u64,
        queues: &[QueueSetup],
        bases: &[(u16, u16)],
    ) -> Result<(), VirtioError> {
        let rings = self.rings(queues)?;
        let base = |r: &Ring| {
            bases
                .iter()
                .find(|(i, _)| *i == r.index)
                .map_or(0, |(_, b)| *b)
        };
        let result = self.start_rings(features, &rings, base);
        // Requests queued while the rings were stopped, and completions whose interrupt the
        // stopped ring did not send: the backend looks, and the driver looks.
        for r in &rings {
            let _ = r.kick.write(1);
            let _ = r.call.write(1);
        }
        self.active = Some((features, rings));
        result
    }

    fn config_bytes(&self) -> Vec<u8> {
        self.config.clone()
    }

    fn restore_config(&mut self, bytes: &[u8]) -> Result<(), VirtioError> {
        if bytes.len() != self.config.len() {
            return Err(StateError::Size {
                part: "its configuration space in the state",
                got: bytes.len(),
                want: self.config.len(),
            }
            .within(self.name.clone())
            .into());
        }
        if self.kind == Kind::Rng {
            // No configuration space: the (empty) sizes matched.
            return Ok(());
        }
        // Only the write-cache setting is the guest's to change; the rest (capacity,
        // geometry) is the disk's, and the destination's disk must match.
        if bytes[..CONFIG_WRITEBACK] != self.config[..CONFIG_WRITEBACK] {
            return Err(StateError::OtherDisk.within(self.name.clone()).into());
        }
        let wce = bytes[CONFIG_WRITEBACK];
        if wce != self.config[CONFIG_WRITEBACK] {
            self.send_writeback(wce)?;
            self.config[CONFIG_WRITEBACK] = wce;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // The next start gets a fresh area: nothing of the old rings is to be resubmitted.
        self.inflight = None;
        for i in std::mem::take(&mut self.started) {
            if let Err(e) = self.frontend.set_vring_enable(i, false) {
                log::warn!("{}: {}", self.name, self.e("SET_VRING_ENABLE", e));
            }
            // GET_VRING_BASE stops the ring in the backend.
            if let Err(e) = self.frontend.get_vring_base(i) {
                log::warn!("{}: {}", self.name, self.e("GET_VRING_BASE", e));
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}
