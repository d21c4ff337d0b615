//! Command-line arguments and their validation. Every bad input becomes one line that names the
//! input and what to do, and `vmm-core run` exits with status 2.

pub mod disk;
pub mod file;
pub mod serial;

use crate::kvm::Host;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Linux's x86 COMMAND_LINE_SIZE, which includes the terminating NUL.
pub const DEFAULT_CMDLINE_MAX: usize = 2048;
pub const MIN_MEMORY: u64 = 16 << 20;
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Kernel parameters that let Debian's kernel boot on KVM-PVM (see GUEST.md): PVM cannot
/// emulate xrstor or cmpxchg16b, and cannot hide CPUID features, so the kernel is told not to
/// use them (ssse3 cx16 pcid popcnt xsave rdrand fsgsbase invpcid rdseed smap umip pku rdpid
/// arch_capabilities).
pub const PVM_CMDLINE: &str =
    "noxsave clearcpuid=137,141,145,151,154,158,288,298,306,308,514,515,534,605";

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Take these settings from a TOML file whose keys are this command's flags without the
    /// dashes (kernel = "/path", cmdline = "console=ttyS0", disk = ["path=a.img", ...],
    /// no-sandbox = true). Flags given here too override the file's values and add to its
    /// lists. The systemd unit runs `vmm-core run --config /etc/vmm/VM.toml`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kernel: a bzImage, or an ELF (booted through its PVH note when it has one).
    /// Default: the stock kernel from the image cache, or the test guest on a KVM-PVM host.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// vCPUs online at boot, and optionally the most that can be online: N or N,max=M.
    #[arg(long, value_name = "N[,max=M]", default_value = "1")]
    pub cpus: String,
    /// Guest RAM: a number with K, M, G or T (a bare number is MiB, as QEMU's -m).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// What a guest reset does: exit (status 0) or restart the guest.
    #[arg(long, value_enum, default_value = "exit")]
    pub on_reset: OnReset,
    /// On SIGTERM (systemctl stop), press the ACPI power button and give the guest this many
    /// seconds to power off (then exit 0) before the VM is stopped (status 143). 0 stops at
    /// once; so do a second SIGTERM, SIGINT and SIGHUP. A paused VM or one not yet running
    /// (waiting on --incoming) stops at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub stop_timeout: u32,
    /// The serial console's backend, served by the chardevd helper: stdio | pty |
    /// file=PATH[,append] | ring=BYTES | unix=PATH (listen) | unix-connect=PATH[,reconnect=MS] |
    /// null. `direct` keeps it on stdio inside vmm-core, with no helper (for debugging).
    #[arg(long, value_name = "SPEC", default_value = "stdio")]
    pub serial: String,
    /// The chardevd executable (default: the one next to vmm-core).
    #[arg(long, value_name = "PATH")]
    pub chardevd: Option<PathBuf>,
    /// Connect to a chardevd that runs already (chardevd --listen PATH, or its systemd socket)
    /// instead of starting one; reconnect if the connection drops.
    #[arg(long, value_name = "PATH", conflicts_with = "chardevd")]
    pub chardevd_socket: Option<PathBuf>,
    /// A disk, served by a blockd helper over vhost-user-blk (repeat for more):
    /// path=FILE (a regular file or a block device) with ,format=raw|qcow2 ,readonly=on
    /// ,queues=N (1-16) ,serial=ID ,direct=on (O_DIRECT) ,rerror=/werror=report|ignore|stop|enospc
    /// and throttle.bps|bps-rd|bps-wr|iops|iops-rd|iops-wr[-max|-max-length]=N
    /// ,throttle.group=NAME; or socket=PATH[,queues=N] for a vhost-user-blk backend that
    /// runs already.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// A virtio-rng device (the guest's entropy source), served over vhost-user-rng by
    /// chardevd: urandom (the host's /dev/urandom), file=PATH (its bytes, in order: a file,
    /// a FIFO or a character device such as /dev/hwrng) or egd=PATH (an entropy daemon on a
    /// unix socket, asked as QEMU's rng-egd asks it, in the EGD protocol), with ,rate=BYTES (a
    /// second; 0 or none: no limit) and ,burst=BYTES (default: the rate); or socket=PATH for
    /// a backend that runs already (such as rust-vmm's vhost-device-rng).
    #[arg(long, value_name = "SPEC")]
    pub rng: Option<String>,
    /// The blockd executable (default: the one next to vmm-core).
    #[arg(long, value_name = "PATH")]
    pub blockd: Option<PathBuf>,
    /// Use a blockd that runs already (blockd --listen PATH, or its systemd socket) instead
    /// of starting one: vmm-core adds the VM's disks to it as exports.
    #[arg(long, value_name = "PATH", conflicts_with = "blockd")]
    pub blockd_socket: Option<PathBuf>,
    /// Serve the management API (vmmctl) on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Start the helpers without their sandbox (namespaces, empty root, no capabilities,
    /// another uid), to debug.
    #[arg(long)]
    pub no_sandbox: bool,
    /// What a helper's system call outside its seccomp allowlist does: kill (the helper
    /// reports it, vmm-core logs it and emits an event, and the helper dies by SIGSYS) or log
    /// (the kernel logs it and lets it through: for developing allowlists).
    #[arg(long, value_name = "MODE", default_value = "kill", value_parser = ["kill", "log"], env = "VMM_SECCOMP")]
    pub seccomp: String,
    /// Take the VM from a migration source or a snapshot instead of booting: tcp:HOST:PORT or
    /// unix:PATH (listen for the source), exec:COMMAND (the stream from the command's output,
    /// the answer to its input), or file:PATH (a snapshot). The VM's memory, vCPUs, disks,
    /// kernel and command line come with it (a live destination without --memory reads them
    /// from the source's stream first); flags given here must describe the same VM, and a
    /// difference is refused, naming the flag.
    #[arg(long, value_name = "URI")]
    pub incoming: Option<String>,
    /// How long --incoming waits for a source to connect, in seconds (0, the default: as
    /// long as it takes, as QEMU). SIGTERM, SIGINT and `vmmctl shutdown` end the wait.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 0,
        requires = "incoming"
    )]
    pub incoming_timeout: u32,
    /// Restore a snapshot: the same as --incoming file:PATH.
    #[arg(long, value_name = "file:PATH", conflicts_with = "incoming")]
    pub restore: Option<String>,
    /// With --restore: run the VM at once and load its RAM from the snapshot as it runs
    /// (each page the guest touches first, then the rest in the background; a page never
    /// read is never waited for). The snapshot file must stay until the load is over
    /// (`vmmctl migrate status` says when).
    #[arg(long, requires = "restore")]
    pub lazy: bool,
    /// Record what the devices give the guest into DIR (made if missing): the console's
    /// input (serial0.log, with where the guest's output stood), the rng's bytes (rng0.log)
    /// and each disk's requests and answers (disk0.log, with disk0.log.base, a copy of the
    /// image as the recording began). A replay gives them again.
    #[arg(long, value_name = "DIR", conflicts_with = "replay")]
    pub record: Option<PathBuf>,
    /// Replay a recording (--record DIR): the console's input, the rng's bytes and the disks'
    /// answers come from the logs in DIR instead of the world (live console input is
    /// ignored; the disks' images are not touched).
    #[arg(long, value_name = "DIR")]
    pub replay: Option<PathBuf>,
    /// What a replay does with the guest's writes to its disks: check them against the
    /// recording (the image is not touched; reads come from the log or a working copy of the
    /// recording's base), or apply them to the image itself as well, which must then hold
    /// what the recording's base held (a read that finds other bytes stops the replay).
    #[arg(long, value_name = "MODE", value_parser = ["check", "apply"], default_value = "check")]
    pub replay_writes: String,
    /// TLS for --incoming (QEMU's tls-creds): a directory with ca-cert.pem, server-cert.pem
    /// and server-key.pem; the source must present a certificate signed by the same CA.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<String>,
    /// With --tls-creds: a source certificate subject to let in, as "CN=name,O=org" (repeat
    /// for more; QEMU's tls-authz). Without it, any certificate the CA signed is let in.
    #[arg(long, value_name = "SUBJECT")]
    pub tls_authz: Vec<String>,
    /// The migrated executable (default: the one next to vmm-core).
    #[arg(long, value_name = "PATH")]
    pub migrated: Option<PathBuf>,
    /// Connect to a migrated that runs already (migrated serve --listen PATH, or its systemd
    /// socket) instead of starting one; reconnect if the connection drops.
    #[arg(long, value_name = "PATH", conflicts_with = "migrated")]
    pub migrated_socket: Option<PathBuf>,
    /// How much vmm-core and its helpers log: error, warn, info, debug or trace (default:
    /// $VMM_LOG, else info). The helpers get the same level.
    #[arg(long, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: Option<String>,
    /// Print start-up timestamps (unix ns) and CPU time per phase on stderr, for bench/boot.sh.
    #[arg(long, hide = true)]
    pub print_boot_times: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReset {
    Exit,
    Restart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub kernel_format: KernelFormat,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// The command line as the user gave it (or the default), without the KVM-PVM additions:
    /// what a migration or snapshot carries.
    pub user_cmdline: String,
    /// Whether --cmdline was given (else an incoming VM's own is taken for its resets).
    pub cmdline_given: bool,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory: u64,
    pub on_reset: OnReset,
    /// How long SIGTERM waits for the guest to power off after pressing the power button.
    pub stop_timeout: std::time::Duration,
    pub print_boot_times: bool,
    pub pvm: bool,
    pub api_socket: Option<PathBuf>,
    /// None: the console is stdio, in vmm-core.
    pub serial: Option<serial::Backend>,
    pub chardevd: PathBuf,
    pub chardevd_socket: Option<PathBuf>,
    pub sandbox: bool,
    /// kill or log.
    pub seccomp: String,
    pub disks: Vec<disk::DiskSpec>,
    /// The virtio-rng device and who serves it (--rng).
    pub rng: Option<RngSpec>,
    /// --rng as given.
    pub rng_spec: Option<String>,
    pub blockd: PathBuf,
    pub blockd_socket: Option<PathBuf>,
    pub incoming: Option<String>,
    /// The flag that gave `incoming`, for messages: --incoming or --restore.
    pub incoming_flag: &'static str,
    /// How long --incoming waits for a source (zero: as long as it takes).
    pub incoming_timeout: std::time::Duration,
    /// The source's connection was taken already (to learn the VM's shape from it).
    pub incoming_peeked: bool,
    /// --restore --lazy: RAM loads from the snapshot while the VM runs.
    pub lazy: bool,
    /// --record DIR or --replay DIR.
    pub recording: Option<Recording>,
    pub incoming_tls: crate::migration::TlsOptions,
    pub migrated: PathBuf,
    pub migrated_socket: Option<PathBuf>,
    /// The --serial and --disk values as given (for `vmmctl config`).
    pub serial_spec: String,
    pub disk_specs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--kernel {0}: no such file; build the images with scripts/build-images.sh or pass --kernel PATH")]
    KernelMissing(PathBuf),
    #[error("--kernel {0}: cannot read it ({1})")]
    KernelUnreadable(PathBuf, std::io::Error),
    #[error(
        "--kernel {0}: neither a bzImage nor an ELF; pass a bzImage (vmlinuz) or a vmlinux/PVH ELF"
    )]
    KernelFormat(PathBuf),
    #[error("--kernel {0}: an ELF for another machine (e_machine {1}); it must be an x86_64 ELF")]
    KernelArch(PathBuf, u16),
    #[error("--initramfs {0}: no such file; build the images with scripts/build-images.sh or pass --initramfs PATH")]
    InitramfsMissing(PathBuf),
    #[error("--initramfs {0}: cannot read it ({1})")]
    InitramfsUnreadable(PathBuf, std::io::Error),
    #[error("--memory {0}: not a size; write it like 512M or 2G")]
    MemoryMalformed(String),
    #[error("--memory {0}: too small; the VM needs at least {min} MiB", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(String),
    #[error("--memory {0}: more than this host's {1} MiB of RAM; ask for less")]
    MemoryTooLarge(String, u64),
    #[error("--memory {0}: not a whole number of 4 KiB pages")]
    MemoryUnaligned(String),
    #[error("--cpus {0}: not a vCPU count; write it like 4 or 2,max=8")]
    CpusMalformed(String),
    #[error("--cpus {0}: a VM needs at least one vCPU")]
    CpusZero(String),
    #[error("--cpus {0}: max ({1}) is below the number online at boot ({2})")]
    CpusMaxBelowBoot(String, u32, u32),
    #[error("--cmdline: {len} bytes with the terminating NUL, but this kernel takes at most {max}{extra}; shorten it")]
    CmdlineTooLong {
        len: usize,
        max: usize,
        extra: String,
    },
    #[error("{0}")]
    Incoming(String),
    #[error("--cmdline: contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    Disk(#[from] disk::DiskSpecError),
    #[error("--rng {0}: {1}; write urandom, file=PATH or egd=PATH (with ,rate=BYTES ,burst=BYTES), or socket=PATH for a vhost-user-rng backend that runs already")]
    Rng(String, String),
    #[error("--rng {0}: an rng that runs outside vmm-core's helpers cannot be recorded or replayed; give --rng urandom, file=PATH or egd=PATH")]
    RngNotRecorded(String),
    #[error("--replay {0}: not a directory; give the directory a run with --record DIR wrote")]
    Replay(PathBuf),
    #[error("--restore {0} --replay: {1}")]
    ReplayFrom(String, String),
    #[error("--replay-writes apply: there is no --replay; give --replay DIR with it")]
    ReplayWritesAlone,
    #[error("--record {dir}: cannot make the directory ({err}); give one this user can write", dir = .0.display(), err = .1)]
    Record(PathBuf, std::io::Error),
    #[error("--rng {0}: chardevd serves the rng, and --serial direct starts none; give --rng socket=PATH or another --serial")]
    RngNeedsChardevd(String),
    #[error("--serial {0}: not a console backend; write stdio, pty, file=PATH[,append], ring=BYTES, unix=PATH, unix-connect=PATH[,reconnect=MS], null or direct")]
    Serial(String),
}

/// A migration channel (vmm_proto::channel); a snapshot file must exist, and fd:N must be
/// a descriptor vmm-core inherited.
fn check_uri(arg: &str, uri: String) -> Result<String, ConfigError> {
    use vmm_proto::channel::Uri;
    let bad = |e: String| ConfigError::Incoming(format!("{arg} {e}"));
    let parsed = Uri::parse(&uri).map_err(|e| {
        let e = e.to_string();
        ConfigError::Incoming(format!(
            "{arg} {uri}{}",
            e.strip_prefix(&format!("{uri:?}")).unwrap_or(&e)
        ))
    })?;
    match &parsed {
        Uri::File(p) => {
            if let Err(e) = File::open(p) {
                return Err(bad(format!(
                    "{uri}: cannot open the snapshot ({e}); check the path"
                )));
            }
        }
        Uri::Fd(n) => crate::migration::check_fd(&uri, *n).map_err(|e| bad(e.to_string()))?,
        _ => {}
    }
    Ok(uri)
}

/// Where scripts/build-images.sh leaves its output: $VMM_IMAGES_DIR, or ~/.cache/vmm/images.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMM_IMAGES_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("vmm").join("images")
}

/// Record/replay at the device boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recording {
    Record(PathBuf),
    /// The directory, whether the guest's writes are done on its disks' images
    /// (--replay-writes=apply), and with --restore, where the snapshot says each log stood.
    Replay(
        PathBuf,
        bool,
        Option<std::sync::Arc<crate::record_marks::RecordMarks>>,
    ),
}

impl Recording {
    /// The log of device `name` in the directory.
    pub fn log(&self, name: &str) -> PathBuf {
        match self {
            Recording::Record(d) | Recording::Replay(d, ..) => d.join(format!("{name}.log")),
        }
    }

    /// Opens device `name`'s log: for appending (made if missing, with its directory) when
    /// recording, for reading when replaying.
    pub fn open(&self, name: &str) -> std::io::Result<std::fs::File> {
        match self {
            Recording::Record(d) => {
                std::fs::create_dir_all(d)?;
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(self.log(name))
            }
            Recording::Replay(_, _, None) => std::fs::File::open(self.log(name)),
            Recording::Replay(_, _, Some(marks)) => {
                // From a snapshot: read on from where the log stood when it was taken.
                use std::io::Seek;
                let mut f = std::fs::File::open(self.log(name))?;
                let at = marks.of(name).ok_or_else(|| {
                    std::io::Error::other(
                        "the snapshot has no mark for this log (the device was not recorded when it was taken)",
                    )
                })?;
                let len = f.metadata()?.len();
                if at > len {
                    return Err(std::io::Error::other(format!(
                        "the snapshot marks byte {at} of this log, which has {len}: not the recording the snapshot was taken in"
                    )));
                }
                f.seek(std::io::SeekFrom::Start(at))?;
                Ok(f)
            }
        }
    }

    /// A replay from a snapshot: where the snapshot says each log stood.
    pub fn marks(&self) -> Option<&crate::record_marks::RecordMarks> {
        match self {
            Recording::Replay(_, _, Some(m)) => Some(m),
            _ => None,
        }
    }
}

/// The virtio-rng device's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RngSpec {
    /// A vhost-user-rng backend that runs already.
    Socket(PathBuf),
    /// chardevd serves it from the host's /dev/urandom (None) or a file, `rate` bytes a
    /// second at most (0: no limit) with bursts of `burst`.
    Chardevd {
        /// None: the host's /dev/urandom.
        file: Option<PathBuf>,
        /// The source is an EGD daemon's unix socket at `file`.
        egd: bool,
        rate: u64,
        burst: u64,
    },
}

/// Parses `--rng`.
fn parse_rng(spec: &str) -> Result<RngSpec, ConfigError> {
    let bad = |why: &str| ConfigError::Rng(spec.to_string(), why.to_string());
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or_default();
    let mut file = None;
    let mut egd = false;
    match first.split_once('=') {
        Some(("socket", p)) if !p.is_empty() => {
            if parts.next().is_some() {
                return Err(bad(
                    "a socket= backend takes no other key (it limits its own rate)",
                ));
            }
            return Ok(RngSpec::Socket(PathBuf::from(p)));
        }
        Some(("file", p)) if !p.is_empty() => file = Some(PathBuf::from(p)),
        Some(("egd", p)) if !p.is_empty() => {
            file = Some(PathBuf::from(p));
            egd = true;
        }
        None if first == "urandom" => {}
        _ => return Err(bad("not an entropy source")),
    }
    let (mut rate, mut burst) = (0, None);
    for part in parts {
        let size = |v: &str| vmm_proto::size::parse(v, 1).map_err(|e| bad(&format!("{part}: {e}")));
        match part.split_once('=') {
            Some(("rate", v)) => rate = size(v)?,
            Some(("burst", v)) => burst = Some(size(v)?),
            _ => return Err(bad(&format!("{part}: not rate=BYTES or burst=BYTES"))),
        }
    }
    if burst.is_some() && rate == 0 {
        return Err(bad("burst= needs rate="));
    }
    Ok(RngSpec::Chardevd {
        file,
        egd,
        rate,
        burst: burst.unwrap_or(rate),
    })
}

/// The source's settings (`VmConfig::spec_toml`, from a stream's header) put into `args`
/// where the command line left them out: the memory, the vCPUs (unless `cpus_given`), the
/// disks (if none is given), the kernel, initramfs and command line (if not given).
pub fn apply_spec(args: &mut RunArgs, spec: &str, cpus_given: bool) {
    let Ok(doc) = spec.parse::<toml_edit::DocumentMut>() else {
        log::warn!("the source's settings are not readable; the defaults apply");
        return;
    };
    let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_string);
    if let Some(m) = text("memory") {
        args.memory = m;
    }
    if let Some(c) = text("cpus").filter(|_| !cpus_given) {
        args.cpus = c;
    }
    if args.disk.is_empty() {
        if let Some(list) = doc.get("disk").and_then(|v| v.as_array()) {
            args.disk = list
                .iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect();
        }
    }
    if args.rng.is_none() {
        args.rng = text("rng");
    }
    if args.kernel.is_none() {
        args.kernel = text("kernel").map(PathBuf::from);
    }
    if args.initramfs.is_none() {
        args.initramfs = text("initramfs").map(PathBuf::from);
    }
    if args.cmdline.is_none() {
        args.cmdline = text("cmdline");
    }
}

impl VmConfig {
    /// What the VM is, as a --config file (TOML; JSON's string escapes are TOML's): the
    /// kernel, initramfs, command line, memory, vCPUs and disks. A snapshot carries it in
    /// its header, and `run --restore file:P` takes it, so that no flag need be repeated.
    pub fn spec_toml(&self) -> String {
        self.spec_toml_with(&self.disk_specs)
    }

    /// As `spec_toml`, with these disks (the VM's as they are now, after hot-add or
    /// hot-remove) in place of the --disk options it started with.
    pub fn spec_toml_with(&self, disk_specs: &[String]) -> String {
        use vmm_proto::json::string as q;
        let mut t = format!("kernel = {}\n", q(&self.kernel.display().to_string()));
        if let Some(i) = &self.initramfs {
            t += &format!("initramfs = {}\n", q(&i.display().to_string()));
        }
        t += &format!("cmdline = {}\n", q(&self.user_cmdline));
        t += &format!("memory = \"{}M\"\n", self.memory >> 20);
        t += &format!("cpus = \"{},max={}\"\n", self.cpus, self.max_cpus);
        // Paths made absolute: the restore may run elsewhere.
        let absolute = |spec: &str| -> String {
            spec.split(',')
                .map(|part| match part.split_once('=') {
                    Some((k @ ("path" | "socket" | "file" | "backing"), p)) => format!(
                        "{k}={}",
                        std::path::absolute(p).map_or(p.to_string(), |a| a.display().to_string())
                    ),
                    _ => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let disks: Vec<String> = disk_specs.iter().map(|d| q(&absolute(d))).collect();
        t += &format!("disk = [{}]\n", disks.join(", "));
        if let Some(r) = &self.rng_spec {
            t += &format!("rng = {}\n", q(&absolute(r)));
        }
        t
    }

    /// The effective settings as a JSON object keyed by `run`'s flags (a --config file's
    /// keys), for `vmmctl config`.
    pub fn to_json(&self) -> String {
        self.to_json_with(&self.disk_specs)
    }

    /// As `to_json`, with the disks as they are now (hot-added, removed, on new images).
    pub fn to_json_with(&self, disk_specs: &[String]) -> String {
        use vmm_proto::json::string as j;
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("null".into(), |p| j(&p.display().to_string()))
        };
        let disks: Vec<String> = disk_specs.iter().map(|d| j(d)).collect();
        let fields = [
            ("kernel", j(&self.kernel.display().to_string())),
            ("initramfs", path(&self.initramfs)),
            ("cmdline", j(&self.user_cmdline)),
            ("cpus", j(&format!("{},max={}", self.cpus, self.max_cpus))),
            ("memory", j(&format!("{}M", self.memory >> 20))),
            (
                "on-reset",
                j(match self.on_reset {
                    OnReset::Exit => "exit",
                    OnReset::Restart => "restart",
                }),
            ),
            ("stop-timeout", self.stop_timeout.as_secs().to_string()),
            ("serial", j(&self.serial_spec)),
            ("disk", format!("[{}]", disks.join(","))),
            ("rng", self.rng_spec.as_deref().map_or("null".into(), j)),
            ("api-socket", path(&self.api_socket)),
            ("chardevd-socket", path(&self.chardevd_socket)),
            ("blockd-socket", path(&self.blockd_socket)),
            ("migrated-socket", path(&self.migrated_socket)),
            ("no-sandbox", (!self.sandbox).to_string()),
            ("seccomp", j(&self.seccomp)),
            (
                "incoming",
                self.incoming.as_deref().map_or("null".into(), j),
            ),
            (
                "incoming-timeout",
                self.incoming_timeout.as_secs().to_string(),
            ),
            ("log-level", j(vmm_sandbox::logging::current_level())),
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", j(k)))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    /// The same VM booting with `user` as its command line (an incoming VM's own), with this
    /// host's KVM-PVM additions.
    pub fn with_cmdline(&self, user: &str) -> VmConfig {
        let mut c = self.clone();
        c.user_cmdline = user.to_string();
        c.cmdline = if self.pvm {
            format!("{} {}", user.trim_end(), PVM_CMDLINE)
                .trim()
                .to_string()
        } else {
            user.to_string()
        };
        c
    }

    pub fn from_args(args: RunArgs, host: &Host) -> Result<VmConfig, ConfigError> {
        let (cpus, max_cpus) = parse_cpus(&args.cpus)?;
        let memory = parse_memory(&args.memory)?;
        let (serial, rng, recording) = console_rng_and_recording(&args)?;
        if let Some(total) = host.mem_total {
            if memory > total {
                return Err(ConfigError::MemoryTooLarge(
                    args.memory.clone(),
                    total >> 20,
                ));
            }
        }

        let (kernel, initramfs) = match args.kernel {
            Some(k) => (k, args.initramfs),
            None => default_images(host, args.initramfs),
        };
        // Absolute: a migration or snapshot carries them, and compares them where it lands.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let (kernel, initramfs) = (absolute(kernel), initramfs.map(absolute));
        let kernel_format = probe_kernel(&kernel)?;
        if let Some(initrd) = &initramfs {
            File::open(initrd).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ConfigError::InitramfsMissing(initrd.clone()),
                _ => ConfigError::InitramfsUnreadable(initrd.clone(), e),
            })?;
        }

        match (&args.tls_creds, &args.incoming) {
            (Some(c), None) => {
                return Err(ConfigError::Incoming(format!(
                    "--tls-creds {c}: TLS is for a VM coming in; add --incoming tcp:HOST:PORT (or unix:, exec:), or drop it"
                )))
            }
            (None, _) if !args.tls_authz.is_empty() => {
                return Err(ConfigError::Incoming(format!(
                    "--tls-authz {}: it lists the sources TLS lets in; add --tls-creds DIR",
                    args.tls_authz[0]
                )))
            }
            // The files are read again when the VM comes in; a missing one is said now.
            (Some(dir), Some(_)) => {
                vmm_proto::channel::Creds::read(Path::new(dir), true)
                    .map_err(|e| ConfigError::Incoming(format!("--{e}")))?;
            }
            _ => {}
        }
        let incoming_flag = if args.restore.is_some() {
            "--restore"
        } else {
            "--incoming"
        };
        let incoming = match (args.incoming, args.restore) {
            (Some(uri), _) => Some(check_uri("--incoming", uri)?),
            (None, Some(r)) if !r.starts_with("file:") => {
                return Err(ConfigError::Incoming(format!(
                    "--restore {r}: a snapshot is file:PATH; for a live source use --incoming {r}"
                )))
            }
            (None, Some(r)) => Some(check_uri("--restore", r)?),
            (None, None) => None,
        };
        let cmdline_given = args.cmdline.is_some();
        let mut cmdline = args.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let user_len = cmdline.len();
        let user_cmdline = cmdline.clone();
        if host.pvm {
            cmdline = format!("{} {}", cmdline.trim_end(), PVM_CMDLINE)
                .trim()
                .to_string();
        }
        let max = cmdline_limit(&kernel, kernel_format);
        if cmdline.len() + 1 > max {
            let extra = if host.pvm {
                format!(
                    " (the KVM-PVM workarounds add {} bytes to your {user_len})",
                    cmdline.len() - user_len
                )
            } else {
                String::new()
            };
            return Err(ConfigError::CmdlineTooLong {
                len: cmdline.len() + 1,
                max,
                extra,
            });
        }

        Ok(VmConfig {
            kernel,
            kernel_format,
            initramfs,
            cmdline,
            user_cmdline,
            cmdline_given,
            cpus,
            max_cpus,
            memory,
            on_reset: args.on_reset,
            stop_timeout: std::time::Duration::from_secs(args.stop_timeout.into()),
            print_boot_times: args.print_boot_times,
            pvm: host.pvm,
            api_socket: args.api_socket,
            serial,
            chardevd_socket: args.chardevd_socket,
            sandbox: !args.no_sandbox,
            seccomp: args.seccomp,
            disks: args
                .disk
                .iter()
                .map(|d| disk::parse_disk(d))
                .collect::<Result<_, _>>()?,
            rng,
            rng_spec: args.rng.clone(),
            blockd: args.blockd.unwrap_or_else(|| sibling("blockd")),
            blockd_socket: args.blockd_socket,
            incoming,
            serial_spec: args.serial.clone(),
            disk_specs: args.disk.clone(),
            incoming_flag,
            incoming_timeout: std::time::Duration::from_secs(args.incoming_timeout.into()),
            incoming_peeked: false,
            lazy: args.lazy,
            recording,
            incoming_tls: crate::migration::TlsOptions {
                creds: args.tls_creds.unwrap_or_default(),
                hostname: String::new(),
                authz: args.tls_authz,
            },
            migrated: args.migrated.unwrap_or_else(|| sibling("migrated")),
            migrated_socket: args.migrated_socket,
            chardevd: args.chardevd.unwrap_or_else(|| {
                std::env::current_exe()
                    .map(|p| p.with_file_name("chardevd"))
                    .unwrap_or_else(|_| PathBuf::from("chardevd"))
            }),
        })
    }
}

/// The console, the rng and the recording, as `console_rng_and_recording` checked them.
type DeviceSpecs = (Option<serial::Backend>, Option<RngSpec>, Option<Recording>);

/// --serial, --rng and --record/--replay, checked against each other: chardevd serves the
/// rng, and only the helpers' devices are recorded.
fn console_rng_and_recording(args: &RunArgs) -> Result<DeviceSpecs, ConfigError> {
    let serial = serial::parse_serial(&args.serial)?;
    let rng = args.rng.as_deref().map(parse_rng).transpose()?;
    let given = || args.rng.clone().unwrap_or_default();
    if serial.is_none() && matches!(rng, Some(RngSpec::Chardevd { .. })) {
        return Err(ConfigError::RngNeedsChardevd(given()));
    }
    if args.replay_writes == "apply" && args.replay.is_none() {
        return Err(ConfigError::ReplayWritesAlone);
    }
    let recording = match (&args.record, &args.replay) {
        (None, None) => None,
        _ if matches!(rng, Some(RngSpec::Socket(_))) => {
            return Err(ConfigError::RngNotRecorded(given()))
        }
        (Some(d), _) => {
            std::fs::create_dir_all(d).map_err(|e| ConfigError::Record(d.clone(), e))?;
            Some(Recording::Record(d.clone()))
        }
        (None, Some(d)) if !d.is_dir() => return Err(ConfigError::Replay(d.clone())),
        (None, Some(d)) => Some(Recording::Replay(
            d.clone(),
            args.replay_writes == "apply",
            replay_from(args.restore.as_deref())?,
        )),
    };
    Ok((serial, rng, recording))
}

/// --replay with --restore file:SNAP: where the snapshot says each log stood (it must have
/// been taken while recording).
fn replay_from(
    restore: Option<&str>,
) -> Result<Option<std::sync::Arc<crate::record_marks::RecordMarks>>, ConfigError> {
    let Some(r) = restore else {
        return Ok(None);
    };
    let bad = |why: String| ConfigError::ReplayFrom(r.to_string(), why);
    let Some(path) = r.strip_prefix("file:") else {
        return Err(bad(
            "a replay goes on from a snapshot file (file:PATH), not a live channel".into(),
        ));
    };
    let state = file::snapshot_state(Path::new(path))
        .map_err(|e| bad(format!("cannot read the snapshot's state ({e})")))?
        .ok_or_else(|| bad("not a snapshot with a VM state in it".into()))?;
    crate::record_marks::RecordMarks::read(&state)
        .map_err(|e| bad(e.to_string()))?
        .map(std::sync::Arc::new)
        .ok_or_else(|| bad("the snapshot was not taken while recording (no --record), so it says nowhere where a log stood; replay from the recording's start (without --restore), or snapshot a VM run with --record".into()))
        .map(Some)
}

/// With no --kernel: Debian's stock kernel and our initramfs on hardware KVM; on KVM-PVM,
/// where no Linux user space can run, the test guest.
fn default_images(host: &Host, initramfs: Option<PathBuf>) -> (PathBuf, Option<PathBuf>) {
    let dir = images_dir();
    if host.pvm {
        log::info!(
            "this host's /dev/kvm is KVM-PVM (software nested virtualisation), where Linux user \
             space cannot run; booting the test guest {} (pass --kernel to choose)",
            dir.join("test-guest.elf").display()
        );
        (dir.join("test-guest.elf"), initramfs)
    } else {
        let initramfs = initramfs.unwrap_or_else(|| dir.join("initramfs.cpio.gz"));
        (dir.join("vmlinuz"), Some(initramfs))
    }
}

fn probe_kernel(path: &Path) -> Result<KernelFormat, ConfigError> {
    let mut f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ConfigError::KernelMissing(path.to_path_buf()),
        _ => ConfigError::KernelUnreadable(path.to_path_buf(), e),
    })?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut f, &mut head)
        .map_err(|e| ConfigError::KernelUnreadable(path.to_path_buf(), e))?;
    if n >= 20 && head[..4] == *b"\x7fELF" {
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if head[4] != 2 || machine != 62 {
            return Err(ConfigError::KernelArch(path.to_path_buf(), machine));
        }
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelFormat(path.to_path_buf()))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A bzImage states its limit (cmdline_size, boot protocol 2.06+); otherwise Linux's default.
fn cmdline_limit(path: &Path, format: KernelFormat) -> usize {
    if format != KernelFormat::BzImage {
        return DEFAULT_CMDLINE_MAX;
    }
    let read = || -> std::io::Result<usize> {
        let mut f = File::open(path)?;
        let mut v = [0u8; 2];
        f.seek(SeekFrom::Start(0x206))?;
        f.read_exact(&mut v)?;
        if u16::from_le_bytes(v) < 0x206 {
            return Ok(256);
        }
        let mut size = [0u8; 4];
        f.seek(SeekFrom::Start(0x238))?;
        f.read_exact(&mut size)?;
        Ok(u32::from_le_bytes(size) as usize + 1)
    };
    read().unwrap_or(DEFAULT_CMDLINE_MAX)
}

/// "N" or "N,max=M" (also "boot=N,max=M").
pub fn parse_cpus(s: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::CpusMalformed(s.to_string());
    let mut boot = None;
    let mut max = None;
    for (i, part) in s.split(',').enumerate() {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("max=") {
            max = Some(v.parse::<u32>().map_err(|_| bad())?);
        } else if let Some(v) = part.strip_prefix("boot=") {
            boot = Some(v.parse::<u32>().map_err(|_| bad())?);
        } else if i == 0 {
            boot = Some(part.parse::<u32>().map_err(|_| bad())?);
        } else {
            return Err(bad());
        }
    }
    let boot = boot.ok_or_else(bad)?;
    if boot == 0 {
        return Err(ConfigError::CpusZero(s.to_string()));
    }
    let max = max.unwrap_or(boot);
    if max < boot {
        return Err(ConfigError::CpusMaxBelowBoot(s.to_string(), max, boot));
    }
    Ok((boot, max))
}

/// Sizes like 512M, 2G, 2GiB, 131072K; a bare number is MiB (as QEMU's `-m`).
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let bytes = vmm_proto::size::parse(s, 1 << 20)
        .map_err(|_| ConfigError::MemoryMalformed(s.to_string()))?;
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(s.to_string()));
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::MemoryUnaligned(s.to_string()));
    }
    Ok(bytes)
}

/// A helper executable next to vmm-core's own.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_forms() {
        assert_eq!(parse_cpus("4").unwrap(), (4, 4));
        assert_eq!(parse_cpus("2,max=8").unwrap(), (2, 8));
        assert_eq!(parse_cpus("boot=1,max=3").unwrap(), (1, 3));
        assert!(matches!(parse_cpus("0"), Err(ConfigError::CpusZero(_))));
        assert!(matches!(
            parse_cpus("4,max=2"),
            Err(ConfigError::CpusMaxBelowBoot(..))
        ));
        assert!(matches!(
            parse_cpus("four"),
            Err(ConfigError::CpusMalformed(_))
        ));
        assert!(matches!(
            parse_cpus("1,min=2"),
            Err(ConfigError::CpusMalformed(_))
        ));
    }

    #[test]
    fn serial_forms() {
        use serial::Backend;
        assert_eq!(serial::parse_serial("direct").unwrap(), None);
        assert_eq!(serial::parse_serial("stdio").unwrap(), Some(Backend::Stdio));
        assert_eq!(serial::parse_serial("pty").unwrap(), Some(Backend::Pty));
        assert_eq!(serial::parse_serial("null").unwrap(), Some(Backend::Null));
        assert_eq!(
            serial::parse_serial("file=/tmp/c.log,append").unwrap(),
            Some(Backend::File {
                path: "/tmp/c.log".into(),
                append: true
            })
        );
        assert_eq!(
            serial::parse_serial("ring=64K").unwrap(),
            Some(Backend::Ring(65536))
        );
        assert_eq!(
            serial::parse_serial("unix=/run/c.sock").unwrap(),
            Some(Backend::UnixServer("/run/c.sock".into()))
        );
        assert_eq!(
            serial::parse_serial("unix-connect=/run/c.sock").unwrap(),
            Some(Backend::UnixClient {
                path: "/run/c.sock".into(),
                reconnect_ms: 500
            })
        );
        assert_eq!(
            serial::parse_serial("unix-connect=/run/c.sock,reconnect=100").unwrap(),
            Some(Backend::UnixClient {
                path: "/run/c.sock".into(),
                reconnect_ms: 100
            })
        );
        for bad in [
            "",
            "chardevd,null",
            "file=",
            "ring=0",
            "ring=lots",
            "tcp=1",
            "unix-connect=",
            "unix-connect=/a,reconnect=0",
            "unix-connect=/a,reconnect=soon",
            "unix-connect=/a,later",
        ] {
            assert!(
                matches!(serial::parse_serial(bad), Err(ConfigError::Serial(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn memory_forms() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("128").unwrap(), 128 << 20);
        assert_eq!(parse_memory("65536K").unwrap(), 64 << 20);
        assert!(matches!(
            parse_memory("lots"),
            Err(ConfigError::MemoryMalformed(_))
        ));
        assert!(matches!(
            parse_memory("12X"),
            Err(ConfigError::MemoryMalformed(_))
        ));
        assert!(matches!(
            parse_memory("1M"),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            parse_memory("16777217B"),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        assert!(matches!(
            parse_memory("99999999999T"),
            Err(ConfigError::MemoryMalformed(_))
        ));
    }
}
