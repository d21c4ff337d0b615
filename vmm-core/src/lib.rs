//! vmm-core holds what must stay together: the KVM VM, vCPU threads, guest memory (a memfd),
//! interrupts, ACPI and the devices the platform needs. See ARCHITECTURE.md.

pub mod api;
pub mod boot;
pub mod boot_times;
pub mod config;
pub mod control;
pub mod disk_backend;
pub mod events;
pub mod helpers;
pub mod kvm;
pub mod kvm_state;
pub mod memory;
pub mod migration;
pub mod record_marks;
pub mod snapshot;
pub mod threads;
pub mod vcpu;
pub mod vm;

use std::fmt;

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off through ACPI.
    PowerOff,
    /// The guest asked for a reset and the VMM was told to exit on reset.
    Reset,
    /// The guest reported a panic (pvpanic).
    Panic,
    /// The VMM was asked to stop.
    Stopped(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    /// Ctrl-A x on the console.
    ConsoleEscape,
    /// `shutdown --force` through the management API.
    Api,
    /// The VM migrated away: it runs on the destination now.
    Migrated,
}

impl Outcome {
    /// 0 power-off, 0 reset (as QEMU's -no-reboot and Firecracker), 0 the console escape (as
    /// QEMU's Ctrl-A x), 3 guest panic, 128 + the signal's number for a signal.
    pub fn exit_status(&self) -> u8 {
        match self {
            Outcome::PowerOff
            | Outcome::Reset
            | Outcome::Stopped(
                StopReason::ConsoleEscape | StopReason::Api | StopReason::Migrated,
            ) => 0,
            Outcome::Panic => 3,
            Outcome::Stopped(StopReason::Signal(sig)) => 128 + *sig as u8,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::PowerOff => write!(f, "guest powered off"),
            Outcome::Reset => write!(
                f,
                "guest requested a reset; exiting (pass --on-reset restart to reboot it instead)"
            ),
            Outcome::Panic => write!(f, "guest panicked (pvpanic); exiting with status 3"),
            Outcome::Stopped(StopReason::ConsoleEscape) => {
                write!(f, "stopped by the console escape (Ctrl-A x)")
            }
            Outcome::Stopped(StopReason::Migrated) => {
                write!(f, "the VM migrated; it runs on the destination now")
            }
            Outcome::Stopped(StopReason::Api) => {
                write!(f, "stopped through the management API (shutdown --force)")
            }
            Outcome::Stopped(StopReason::Signal(sig)) => {
                let name = match *sig {
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGINT => "SIGINT",
                    libc::SIGHUP => "SIGHUP",
                    _ => "a signal",
                };
                write!(f, "stopped by {name}")
            }
        }
    }
}

/// Everything that can stop `vmm-core run` before the guest decides how it ends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
}

impl Error {
    /// 2 for bad input or a host that cannot run this VM, 1 for a failure while running.
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Api(_) => 2,
            Error::Kvm(e) if e.is_user_error() => 2,
            Error::Vm(e) if e.is_user_error() => 2,
            _ => 1,
        }
    }
}

/// "outer: inner: innermost", the one line a user sees.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let msg = inner.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = inner.source();
    }
    s
}

/// Validates the arguments, then builds and runs the VM until it ends.
/// Which of the VM's shape the command line gave (else a live destination learns it from the
/// source).
#[derive(Debug, Clone, Copy, Default)]
pub struct ShapeGiven {
    pub memory: bool,
    pub cpus: bool,
}

pub fn run(args: config::RunArgs, given: ShapeGiven) -> Result<Outcome, Error> {
    // Drawn before any thread's system call filter is on.
    boot::vmgenid::init().map_err(vm::VmError::Boot)?;
    let host = kvm::Host::detect();
    let live = args
        .incoming
        .as_deref()
        .is_some_and(|u| !u.starts_with("file:"));
    if live && !given.memory {
        // The source says what the VM is: its header is read before anything is set up.
        let provisional = config::VmConfig::from_args(args.clone(), &host)?;
        let (migrated, spec) = vm::peek_incoming(&provisional)?;
        let mut args = args;
        config::apply_spec(&mut args, &spec, given.cpus);
        let mut config = config::VmConfig::from_args(args, &host)?;
        config.incoming_peeked = true;
        let kvm = kvm::Kvm::open_checked(config.cpus, config.max_cpus)?;
        return Ok(vm::run(&kvm, &config, Some(migrated))?);
    }
    let config = config::VmConfig::from_args(args, &host)?;
    let kvm = kvm::Kvm::open_checked(config.cpus, config.max_cpus)?;
    Ok(vm::run(&kvm, &config, None)?)
}
