//! Opening /dev/kvm, checking that the host can run the VM we were asked for, and what kind of
//! host this is (hardware KVM, or KVM-PVM software nested virtualisation).

use kvm_ioctls::{Cap, Kvm as KvmFd};

/// Facts about the host that shape the VM.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The kvm_pvm module is loaded: /dev/kvm is KVM-PVM (see GUEST.md).
    pub pvm: bool,
    /// MemTotal from /proc/meminfo, in bytes.
    pub mem_total: Option<u64>,
}

impl Host {
    pub fn detect() -> Host {
        let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
        let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        Host { pvm, mem_total }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm: no such device; this host needs KVM (load kvm_intel or kvm_amd, or enable nested virtualisation)")]
    NoDevice,
    #[error("/dev/kvm: permission denied; run as root or add this user to the 'kvm' group")]
    PermissionDenied,
    #[error("/dev/kvm: cannot open it ({0})")]
    Open(std::io::Error),
    #[error("/dev/kvm: KVM API version {0}, but 12 is required")]
    ApiVersion(i32),
    #[error("/dev/kvm: this host's KVM lacks {0} ({1}), which vmm-core needs")]
    MissingCap(&'static str, &'static str),
    #[error("--cpus {arg}: above this host's KVM limit of {limit} vCPUs (KVM_CAP_MAX_VCPUS)")]
    TooManyVcpus { arg: String, limit: usize },
    #[error("--cpus {arg}: vCPU id {id} is above this host's highest vCPU id {limit} (KVM_CAP_MAX_VCPU_ID)")]
    VcpuIdTooHigh { arg: String, id: u32, limit: usize },
}

impl KvmError {
    pub fn is_user_error(&self) -> bool {
        true
    }
}

/// /dev/kvm, opened and checked for what this VM needs.
pub struct Kvm {
    pub fd: KvmFd,
}

/// The capabilities vmm-core uses, with the KVM names a user can look up.
const REQUIRED_CAPS: &[(Cap, &str, &str)] = &[
    (Cap::Irqchip, "an in-kernel irqchip", "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "irqfd", "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "ioeventfd", "KVM_CAP_IOEVENTFD"),
    (
        Cap::UserMemory,
        "user memory regions",
        "KVM_CAP_USER_MEMORY",
    ),
    (Cap::Pit2, "the in-kernel PIT", "KVM_CAP_PIT2"),
    (Cap::SetTssAddr, "a TSS address", "KVM_CAP_SET_TSS_ADDR"),
    (
        Cap::ImmediateExit,
        "immediate exit",
        "KVM_CAP_IMMEDIATE_EXIT",
    ),
    (Cap::ExtCpuid, "extended CPUID", "KVM_CAP_EXT_CPUID"),
];

impl Kvm {
    /// Opens /dev/kvm and checks capabilities and vCPU limits before any VM or vCPU exists.
    /// `cpus` and `max_cpus` as --cpus gave them.
    pub fn open_checked(cpus: u32, max_cpus: u32) -> Result<Kvm, KvmError> {
        let kvm = Self::open()?;
        kvm.check_caps()?;
        kvm.check_vcpus(&format_cpus(cpus, max_cpus), max_cpus)?;
        Ok(kvm)
    }

    pub fn open() -> Result<Kvm, KvmError> {
        // The errno tells "missing" from "not permitted".
        let fd = KvmFd::new_with_path(c"/dev/kvm").map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::NoDevice,
            libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
            errno => KvmError::Open(std::io::Error::from_raw_os_error(errno)),
        })?;
        let version = fd.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        Ok(Kvm { fd })
    }

    /// Fault injection: `VMM_FAULT_HIDE_KVM_CAPS=KVM_CAP_IRQFD,...` makes those capabilities
    /// look absent, so that tests and users can see how a host without them is reported.
    pub fn check_caps(&self) -> Result<(), KvmError> {
        let hidden = std::env::var("VMM_FAULT_HIDE_KVM_CAPS").unwrap_or_default();
        for &(cap, what, name) in REQUIRED_CAPS {
            let hide = hidden
                .split(',')
                .any(|h| h.trim().eq_ignore_ascii_case(name));
            if hide || !self.fd.check_extension(cap) {
                return Err(KvmError::MissingCap(what, name));
            }
        }
        Ok(())
    }

    /// vCPU ids are 0..max; each must fit KVM_CAP_MAX_VCPU_ID and the count KVM_CAP_MAX_VCPUS.
    pub fn check_vcpus(&self, arg: &str, max_cpus: u32) -> Result<(), KvmError> {
        let limits = VcpuLimits {
            max_vcpus: self.fd.get_max_vcpus(),
            max_vcpu_id: self.fd.get_max_vcpu_id(),
            nr_vcpus: self.fd.get_nr_vcpus(),
        };
        limits.check(arg, max_cpus)
    }
}

/// --cpus as a user would write it.
pub fn format_cpus(cpus: u32, max_cpus: u32) -> String {
    if cpus == max_cpus {
        cpus.to_string()
    } else {
        format!("{cpus},max={max_cpus}")
    }
}

/// KVM's three vCPU numbers, as QEMU checks them (kvm_init, since QEMU 2.7).
#[derive(Debug, Clone, Copy)]
pub struct VcpuLimits {
    /// KVM_CAP_MAX_VCPUS: the most vCPUs a VM can have.
    pub max_vcpus: usize,
    /// KVM_CAP_MAX_VCPU_ID: vCPU ids must be below this.
    pub max_vcpu_id: usize,
    /// KVM_CAP_NR_VCPUS: the recommended most.
    pub nr_vcpus: usize,
}

impl VcpuLimits {
    pub fn check(&self, arg: &str, max_cpus: u32) -> Result<(), KvmError> {
        if max_cpus as usize > self.max_vcpus {
            return Err(KvmError::TooManyVcpus {
                arg: arg.to_string(),
                limit: self.max_vcpus,
            });
        }
        let highest_id = max_cpus - 1;
        if highest_id as usize >= self.max_vcpu_id {
            return Err(KvmError::VcpuIdTooHigh {
                arg: arg.to_string(),
                id: highest_id,
                limit: self.max_vcpu_id.saturating_sub(1),
            });
        }
        if max_cpus as usize > self.nr_vcpus {
            log::warn!(
                "--cpus {arg}: above this host's recommended {} vCPUs (KVM_CAP_NR_VCPUS); it may run slowly",
                self.nr_vcpus
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_limits_give_friendly_errors() {
        let l = VcpuLimits {
            max_vcpus: 1024,
            max_vcpu_id: 1024,
            nr_vcpus: 8,
        };
        assert!(l.check("4", 4).is_ok());
        assert!(l.check("16", 16).is_ok()); // only a warning above NR_VCPUS
        let e = l.check("5000", 5000).unwrap_err().to_string();
        assert_eq!(
            e,
            "--cpus 5000: above this host's KVM limit of 1024 vCPUs (KVM_CAP_MAX_VCPUS)"
        );
        let l = VcpuLimits {
            max_vcpus: 1024,
            max_vcpu_id: 512,
            nr_vcpus: 8,
        };
        let e = l.check("1,max=600", 600).unwrap_err().to_string();
        assert!(
            e.contains("vCPU id 599") && e.contains("KVM_CAP_MAX_VCPU_ID"),
            "{e}"
        );
    }
}
