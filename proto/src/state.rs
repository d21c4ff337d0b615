//! Why saved state (schema/state.capnp) cannot be taken: each reader says which part failed
//! and why, and the parts nest ("vCPU 1: the XMM registers is 12 bytes, 256 expected").

/// One line on a part of a saved VM that a restore refuses; nothing was applied by then.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}: {1}")]
    Read(&'static str, capnp::Error),
    #[error("{0} is not UTF-8")]
    NotText(&'static str),
    #[error("{part} is {got} bytes, {want} expected")]
    Size {
        part: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{part} has {got} {unit}, {want} expected")]
    Count {
        part: &'static str,
        unit: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{part} has {got} {unit}, at most {max}")]
    TooMany {
        part: &'static str,
        unit: &'static str,
        got: usize,
        max: usize,
    },
    #[error("{0} is of a kind this build does not know")]
    UnknownKind(&'static str),
    #[error("XSAVE component {0} has no place on this host (its CPU lacks the feature)")]
    XsaveComponent(u32),
    #[error("the state is of a VM with {} MiB and at most {} vCPUs, this one has {} MiB and {}; start it with the same --memory and --cpus", .saved.0 >> 20, .saved.1, .here.0 >> 20, .here.1)]
    Shape { saved: (u64, u32), here: (u64, u32) },
    #[error("{flag}: the VM was booted with {saved:?}, and a reset here would boot with {here:?}; start this vmm-core with {flag} {saved:?} (a VM that moves keeps what it boots)")]
    Boot {
        flag: &'static str,
        saved: String,
        here: String,
    },
    #[error("the state has vCPUs {0:?}, this VM takes ids below {1}")]
    VcpuIds(Vec<u32>, u32),
    #[error("the state has {0} PCI device(s), this VM {1}; give it the same --disk options")]
    PciCount(usize, usize),
    #[error("the state has {0} at PCI 00:{1:02x}.0; this VM has nothing there")]
    PciEmpty(String, u8),
    #[error("PCI 00:{1:02x}.0 is {0} in the state, {2} here; give the disks in the same order")]
    PciOther(String, u8, String),
    #[error("the CPU hotplug controller's state is for {0} vCPUs, this VM has --max-cpus {1}")]
    HotplugSlots(usize, usize),
    #[error("the serial port's state holds {0} unread input bytes, more than its FIFO takes")]
    SerialFifo(usize),
    #[error("the serial port's state: {0}")]
    Serial(String),
    #[error("its configuration space differs at read-only byte {0:#x} ({1:#04x}, this device has {2:#04x}): another kind of device")]
    ConfigReadOnly(usize, u8, u8),
    #[error("its BAR {0} ({1:#x} bytes at {2:#x}) does not fit this device's BARs")]
    Bar(usize, u64, u64),
    #[error("it has {0} queue(s) and {1} MSI-X vector(s), this device {2} and {3}; give the destination's disk the same num-queues")]
    Queues(usize, usize, usize, usize),
    #[error("its queue {0} has size {1} and vector {2} (this device: at most {3}, {4} vectors)")]
    Queue(usize, u16, u16, u16, usize),
    #[error("the guest's driver uses features {0:#x} that this device's backend does not offer")]
    Features(u64),
    #[error("the disk differs from the one saved (capacity or geometry); start the destination with the same image")]
    OtherDisk,
    #[error("vCPU {0}: {1}")]
    Vcpu(u32, Box<StateError>),
    #[error("{0}: {1}")]
    In(String, Box<StateError>),
    /// Putting a part in place failed (a KVM ioctl, the device's backend): its own error.
    #[error(transparent)]
    Apply(Box<dyn std::error::Error + Send + Sync>),
}

impl StateError {
    /// `|e| StateError::Read(part, e)`, for map_err.
    pub fn read(part: &'static str) -> impl Fn(capnp::Error) -> StateError {
        move |e| StateError::Read(part, e)
    }

    /// This error, inside the named part.
    pub fn within(self, part: impl Into<String>) -> StateError {
        StateError::In(part.into(), Box::new(self))
    }
}
