//! vmmctl: manage a running vmm-core through its API socket (`vmm-core run --api-socket PATH`).
//! Output is for people by default; `--json` prints one JSON object for programs.

mod peer;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmm_proto::vmm_capnp::{byte_sink, event_sink, vmm, RunState};

/// The key that detaches `vmmctl console`: Ctrl-], as in virsh and telnet.
const ESCAPE: u8 = 0x1d;

#[derive(Parser)]
#[command(name = "vmmctl", version, about = "Manage a running vmm-core")]
#[command(group(clap::ArgGroup::new("target").args(["socket", "vm", "blockd"])))]
struct Cli {
    /// The VM's API socket (vmm-core run --api-socket PATH). Default: $VMMCTL_SOCKET.
    #[arg(long, value_name = "PATH", global = true, env = "VMMCTL_SOCKET")]
    socket: Option<PathBuf>,
    /// The VM that systemd runs as vmm-core@NAME (its API socket is /run/vmm/NAME/api.sock).
    #[arg(long, value_name = "NAME", global = true, conflicts_with = "socket")]
    vm: Option<String>,
    /// Talk to a blockd directly, on its control socket (blockd --listen PATH): for its
    /// `disk` commands, over every export it serves (of several VMs, or of other frontends).
    #[arg(long, value_name = "PATH", global = true)]
    blockd: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the peer to answer, and for a quick command to complete (migrate,
    /// snapshot, events and console run as long as they take once the peer has answered);
    /// for `cpus set`, also how long the guest has to take or eject the vCPUs.
    #[arg(long, value_name = "SECONDS", global = true, default_value_t = 30.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Clone)]
enum Command {
    /// What the VM is and its state.
    Info,
    /// The VM's effective settings, as JSON keyed by `vmm-core run`'s flags (what a
    /// `--config` file may hold), defaults filled in.
    Config,
    /// Stop every vCPU.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Power the VM off: ask the guest (ACPI), or with --force stop it now.
    Shutdown {
        /// Stop the VM at once, as pulling the plug (the guest is not asked).
        #[arg(long)]
        force: bool,
    },
    /// Reset the VM; the guest boots again.
    Reboot,
    /// Print the VM's events as they happen, until it ends.
    Events,
    /// The VM's devices.
    Devices,
    /// How fast the guest writes to its RAM: pages written during --ms milliseconds (KVM's
    /// dirty log, as QEMU's calc-dirty-rate), and MiB/s.
    DirtyRate {
        /// How long to measure, in milliseconds (1 to 60000).
        #[arg(long, default_value_t = 1000, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..=60000))]
        ms: u32,
    },
    /// Live-migrate the VM to tcp:HOST:PORT, unix:PATH or exec:COMMAND (the destination runs
    /// `vmm-core run --incoming URI`); `migrate status` shows the current or last migration,
    /// `migrate cancel` stops one (the VM goes on here), `migrate postcopy` switches the one
    /// under way to post-copy, and `migrate recover URI` resumes a post-copy whose channel
    /// broke (on both hosts: the destination listens on URI, the source connects to it). A
    /// progress bar is drawn on a terminal.
    Migrate {
        /// tcp:HOST:PORT, unix:PATH, exec:COMMAND (the stream to the command's input, the
        /// destination's answer from its output), or status / cancel / postcopy / recover.
        target: String,
        /// For `migrate recover`: the new channel's URI.
        #[arg(value_name = "URI")]
        recover_uri: Option<String>,
        /// The longest pause allowed at the end, in ms (default 300, as QEMU). Pre-copy goes on
        /// until twice the time the pages left would take fits in three quarters of it (at
        /// least 5 ms are kept for the device state and the destination's answer).
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u32>,
        /// Pre-copy passes before the VM is paused even though the pause will be over
        /// --downtime-ms (default 30): the migration then completes, a warning is logged, and
        /// its status says "forced" (the limit could not be met while the guest dirtied its RAM
        /// this fast; raise the limit or --bandwidth, or quiet the guest).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_passes: Option<u32>,
        /// The most the stream may use: bytes per second, with K, M or G (e.g. 100M).
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
        /// TLS (QEMU's tls-creds): a directory with ca-cert.pem, client-cert.pem and
        /// client-key.pem; the destination must be started with --tls-creds too.
        #[arg(long, value_name = "DIR")]
        tls_creds: Option<String>,
        /// The name to check in the destination's certificate (default: the tcp host).
        #[arg(long, value_name = "NAME", requires = "tls_creds")]
        tls_hostname: Option<String>,
        /// Post-copy: after the first pass that does not fit --downtime-ms, the destination
        /// runs the VM at once and pulls the pages it still needs (so a guest that writes
        /// its RAM faster than the link carries it still moves). Once switched, the
        /// migration cannot be cancelled, and losing either host or the channel loses the VM.
        #[arg(long)]
        postcopy: bool,
        /// The most post-copy's background pages may use, as --bandwidth (default: the
        /// same as --bandwidth; QEMU's max-postcopy-bandwidth). The pages the destination
        /// faults on go at once, whatever the limit.
        #[arg(long, value_name = "RATE")]
        postcopy_bandwidth: Option<String>,
        /// LZ4-compress guest RAM in the stream (for slow links; it costs source CPU).
        #[arg(long)]
        compress: bool,
    },
    /// Save the VM to a file (it goes on, or stays paused if it was); `vmm-core run --restore
    /// file:PATH` starts it again.
    Snapshot {
        /// file:PATH (the file must not exist).
        uri: String,
        /// LZ4-compress guest RAM in the file.
        #[arg(long)]
        compress: bool,
        /// Record the guest's working set in the file: the pages it writes during MS
        /// milliseconds before the pause (KVM's dirty log). A `--restore --lazy` loads them
        /// first (as Firecracker's REAP work prefetches).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..=60000))]
        workset_ms: Option<u32>,
    },
    /// The vCPUs: each one's state (running, parked, absent) and KVM fd reuse count; or
    /// `cpus set N` to hot-add or hot-remove vCPUs until N are online.
    Cpus {
        #[command(subcommand)]
        action: Option<CpusAction>,
    },
    /// Attach to the serial console interactively (Ctrl-] detaches); with --dump, print
    /// what its ring holds (--serial ring=SIZE).
    Console {
        /// Print what the console's ring holds (--serial ring=SIZE) and exit, instead of
        /// attaching.
        #[arg(long)]
        dump: bool,
        /// The console (see `vmmctl devices`).
        #[arg(long, value_name = "NAME", default_value = "serial0")]
        device: String,
    },
    /// The VM's disks (served by blockd): `disk list`, or `disk stats [NAME]` for each
    /// operation's requests, bytes, errors and latency histogram.
    Disk {
        #[command(subcommand)]
        action: DiskAction,
    },
    /// Record/replay (vmm-core run --record DIR / --replay DIR): `replay status` says where
    /// each log stands (the console's inputs, each disk's requests).
    Replay {
        #[command(subcommand)]
        action: ReplayAction,
    },
    /// Fault injection on the console's backend in chardevd.
    ConsoleFault {
        #[command(subcommand)]
        rule: FaultRule,
        /// The console (see `vmmctl devices`).
        #[arg(long, value_name = "NAME", default_value = "serial0", global = true)]
        device: String,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum ReplayAction {
    /// Where each log stands: "console: replaying, 2 of 3 input(s) given", "disk0: ...".
    Status,
}

#[derive(Subcommand, Clone, Copy)]
enum CpusAction {
    /// Hot-add or hot-remove vCPUs until COUNT are online; waits for the guest (up to
    /// --timeout seconds).
    Set { count: u32 },
}

#[derive(Subcommand, Clone)]
enum DiskAction {
    /// Each disk: image, format, size, queues, and whether a frontend is connected.
    List,
    /// Statistics per operation, for every disk or the one named.
    Stats { name: Option<String> },
    /// Fault injection in blockd, like QEMU's blkdebug: `fault add` a rule that fails, delays
    /// or crashes on matching requests; `fault list`, `fault remove ID`, `fault clear`;
    /// `fault forbidden-syscall` makes blockd call something outside its seccomp allowlist.
    Fault {
        #[command(subcommand)]
        rule: DiskFault,
    },
    /// (--blockd) Retry what stopped exports hold (error policy stop) and serve again; for a
    /// VM's disks, `vmmctl resume` does this.
    Resume { name: Option<String> },
    /// Throttle a disk at run time, with QEMU's limits: SPEC is `iops=200`,
    /// `bps-wr=10485760,bps-wr-max=20971520,bps-wr-max-length=5`, `group=NAME,iops=400` (the
    /// group's disks share the budget), `group=NAME` (join with the group's limits), or `off`.
    /// Limits: bps, bps-rd, bps-wr, iops, iops-rd, iops-wr, each also with -max (burst rate)
    /// and -max-length (seconds).
    Throttle { name: String, spec: String },
    /// Grow a disk while the guest runs: SIZE is its new size (`20G`, `1536M`, bytes); a raw
    /// image file is extended, a qcow2 image's virtual size grows (reading as zeroes), a block
    /// device must have grown already (give its size). The guest is told (a virtio
    /// config-change interrupt) and sees the new capacity without a reboot.
    Resize {
        name: String,
        size: String,
        /// Shrink it (a raw file only): the data past the new end is lost.
        #[arg(long)]
        force: bool,
    },
    /// Add a disk. To a running VM: SPEC is what vmm-core's --disk takes
    /// (`path=FILE[,format=qcow2][,readonly=on][,queues=N]...` or `socket=PATH`); blockd serves
    /// it, it goes into the first free PCI slot and the guest is told (ACPI PCI hotplug). To a
    /// blockd of its own (--blockd): SPEC is the export's name, with --image and --vhost-socket;
    /// it is served until `disk remove`.
    Add {
        #[arg(value_name = "SPEC")]
        name: String,
        /// (--blockd) The image (vmmctl opens it and hands blockd the descriptor).
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
        /// (--blockd) Where the vhost-user frontend connects (vmmctl binds it).
        #[arg(long, value_name = "PATH")]
        vhost_socket: Option<PathBuf>,
        #[arg(long, default_value = "raw")]
        format: String,
        #[arg(long)]
        readonly: bool,
        #[arg(long, default_value_t = 1)]
        queues: u16,
    },
    /// Remove a disk. From a running VM: the guest is asked to eject it (ACPI eject request),
    /// and this returns once it did (within --timeout seconds; else the disk stays); blockd's
    /// export ends. From a blockd of its own (--blockd): stop serving the export.
    Remove { name: String },
    /// A live external snapshot of a VM's disk (libvirt's snapshot-create --disk-only): a new
    /// qcow2 overlay is made at --overlay over the disk's image, and the guest's writes go
    /// there from then on. The old image is read-only from then on and can be copied away.
    Snapshot {
        name: String,
        /// The new overlay's path (it must not exist yet).
        #[arg(long, value_name = "PATH")]
        overlay: String,
    },
    /// Merge a VM's disk's top overlay into the image below it while the guest runs; that
    /// image is then the disk's (libvirt's blockcommit --active --pivot). Shows how far it
    /// is as it goes. The overlay stays where it is, no longer used.
    Commit { name: String },
}

#[derive(Subcommand, Clone)]
enum DiskFault {
    /// Remove every rule.
    Clear,
    /// blockd makes a system call outside its seccomp allowlist (it dies, and is reported).
    ForbiddenSyscall,
    /// Add a rule: matching requests fail with --errno, wait --delay-ms, or make blockd
    /// --exit (a crash at a chosen moment).
    Add {
        /// Which requests: read, write, flush (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        ops: Vec<FaultOp>,
        /// Only requests overlapping these bytes: START-END or START- (to the end).
        #[arg(long, value_name = "START-END")]
        range: Option<String>,
        /// Only this disk (default: every disk).
        #[arg(long, value_name = "NAME")]
        disk: Option<String>,
        /// Fail them with this errno: a number or EIO, ENOSPC, EROFS, EINVAL, ENOMEM, EDQUOT.
        #[arg(long, group = "action")]
        errno: Option<String>,
        /// Do them this many milliseconds late.
        #[arg(long, group = "action")]
        delay_ms: Option<u32>,
        /// blockd exits at the first one.
        #[arg(long, group = "action")]
        exit: bool,
        /// Fire once, then the rule goes.
        #[arg(long)]
        once: bool,
        /// The chance (0 to 1) that a matching request fires the rule.
        #[arg(long)]
        probability: Option<f64>,
    },
    /// The rules, with how many times each fired.
    List,
    /// Remove rule ID.
    Remove { id: u32 },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum FaultOp {
    Read,
    Write,
    Flush,
}

/// `disk fault clear` and `disk fault forbidden-syscall` as blockd's Fault.
fn set_fault(mut f: vmm_proto::blockd_capnp::fault::Builder, rule: &DiskFault) {
    match rule {
        DiskFault::Clear => f.set_clear(()),
        _ => f.set_forbidden_syscall(()),
    }
}

/// The rule `disk fault add` describes.
fn fault_rule(f: &DiskFault) -> Result<vmm_proto::faults::Rule, Failure> {
    let DiskFault::Add {
        ops,
        range,
        disk,
        errno,
        delay_ms,
        exit,
        once,
        probability,
    } = f
    else {
        unreachable!("only for add")
    };
    let bad = |m: String| Failure(2, format!("disk fault add: {m}"));
    let (start, end) = match range {
        None => (0, 0),
        Some(r) => {
            let (a, b) = r
                .split_once('-')
                .ok_or_else(|| bad(format!("--range {r}: write START-END or START- (bytes)")))?;
            let num = |x: &str| {
                x.parse::<u64>()
                    .map_err(|_| bad(format!("--range {r}: {x:?} is not a byte offset")))
            };
            (num(a)?, if b.is_empty() { 0 } else { num(b)? })
        }
    };
    let action = match (errno, delay_ms, exit) {
        (Some(e), _, _) => vmm_proto::faults::Action::Errno(
            vmm_proto::faults::parse_errno(e).map_err(|e| bad(e.to_string()))?,
        ),
        (_, Some(ms), _) => vmm_proto::faults::Action::DelayMs(*ms),
        (_, _, true) => vmm_proto::faults::Action::Exit,
        _ => return Err(bad("give --errno E, --delay-ms N or --exit".into())),
    };
    Ok(vmm_proto::faults::Rule {
        id: 0,
        export: disk.clone().unwrap_or_default(),
        read: ops.contains(&FaultOp::Read),
        write: ops.contains(&FaultOp::Write),
        flush: ops.contains(&FaultOp::Flush),
        start,
        end,
        action,
        once: *once,
        probability: probability.unwrap_or(0.0),
        hits: 0,
    })
}

/// Where `disk fault` rules go: the VM's API (for its disks' blockd) or a blockd's own.
trait FaultTarget {
    /// `clear` or `forbidden-syscall`.
    async fn fault(&self, rule: &DiskFault) -> capnp::Result<()>;
    async fn add(&self, rule: &vmm_proto::faults::Rule) -> capnp::Result<u32>;
    async fn remove(&self, id: u32) -> capnp::Result<()>;
    async fn list(&self) -> capnp::Result<Vec<vmm_proto::faults::Rule>>;
}

impl FaultTarget for vmm::Client {
    async fn fault(&self, rule: &DiskFault) -> capnp::Result<()> {
        let mut req = self.disk_fault_request();
        set_fault(req.get().init_fault(), rule);
        req.send().promise.await.map(drop)
    }
    async fn add(&self, rule: &vmm_proto::faults::Rule) -> capnp::Result<u32> {
        let mut req = self.disk_fault_add_request();
        rule.write_to(req.get().init_rule());
        Ok(req.send().promise.await?.get()?.get_id())
    }
    async fn remove(&self, id: u32) -> capnp::Result<()> {
        let mut req = self.disk_fault_remove_request();
        req.get().set_id(id);
        req.send().promise.await.map(drop)
    }
    async fn list(&self) -> capnp::Result<Vec<vmm_proto::faults::Rule>> {
        let reply = self.disk_fault_rules_request().send().promise.await?;
        vmm_proto::faults::read_list(reply.get()?.get_rules()?)
    }
}

impl FaultTarget for vmm_proto::blockd_capnp::blockd::Client {
    async fn fault(&self, rule: &DiskFault) -> capnp::Result<()> {
        let mut req = self.inject_fault_request();
        set_fault(req.get().init_fault(), rule);
        req.send().promise.await.map(drop)
    }
    async fn add(&self, rule: &vmm_proto::faults::Rule) -> capnp::Result<u32> {
        let mut req = self.add_fault_rule_request();
        rule.write_to(req.get().init_rule());
        Ok(req.send().promise.await?.get()?.get_id())
    }
    async fn remove(&self, id: u32) -> capnp::Result<()> {
        let mut req = self.remove_fault_rule_request();
        req.get().set_id(id);
        req.send().promise.await.map(drop)
    }
    async fn list(&self) -> capnp::Result<Vec<vmm_proto::faults::Rule>> {
        let reply = self.list_fault_rules_request().send().promise.await?;
        vmm_proto::faults::read_list(reply.get()?.get_rules()?)
    }
}

/// `disk fault clear|forbidden-syscall|add|remove|list` against either target.
async fn run_fault(
    target: &impl FaultTarget,
    rule: &DiskFault,
    json: bool,
    fail: impl Fn(capnp::Error) -> Failure,
) -> Result<String, Failure> {
    Ok(match rule {
        DiskFault::Clear | DiskFault::ForbiddenSyscall => {
            target.fault(rule).await.map_err(fail)?;
            done(json, "done")
        }
        DiskFault::Add { .. } => {
            let id = target.add(&fault_rule(rule)?).await.map_err(fail)?;
            done(json, &format!("fault rule {id} added"))
        }
        DiskFault::Remove { id } => {
            target.remove(*id).await.map_err(fail)?;
            done(json, &format!("fault rule {id} removed"))
        }
        DiskFault::List => format_rules(&target.list().await.map_err(fail)?, json),
    })
}

fn format_rules(rules: &[vmm_proto::faults::Rule], json: bool) -> String {
    if json {
        let items: Vec<String> = rules
            .iter()
            .map(|r| format!("{{\"id\":{},\"rule\":{}}}", r.id, json_str(&r.to_string())))
            .collect();
        return format!("[{}]", items.join(","));
    }
    if rules.is_empty() {
        return "no fault rules".into();
    }
    let mut out =
        String::from("id   disk     ops              range                action         when\n");
    for r in rules {
        out.push_str(&format!("{r}\n"));
    }
    out.trim_end().to_string()
}

#[derive(Subcommand, Clone, Copy)]
enum FaultRule {
    /// Remove every rule.
    Clear,
    /// Disconnect the backend's client (a Unix-socket backend) now.
    DropConnection,
    /// Make every write to the backend wait MS milliseconds first.
    DelayWrites { ms: u32 },
    /// Make chardevd call something outside its seccomp allowlist (it dies, is reported and
    /// restarted).
    ForbiddenSyscall,
}

/// An error and the exit status it maps to: 2 for a socket we cannot use, 1 for a refused or
/// failed request.
struct Failure(u8, String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = vmm_proto::rpc::run_local(run(&cli))
        .unwrap_or_else(|e| Err(Failure(1, format!("cannot start: {e}"))));
    match result {
        Ok(out) => {
            if !out.is_empty() {
                peer::out(&out);
            }
            ExitCode::SUCCESS
        }
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Commands that run as long as they take once the VM has answered; every other command
/// completes within --timeout.
fn runs_long(command: &Command) -> bool {
    match command {
        Command::Migrate { target, .. } => {
            !matches!(target.as_str(), "status" | "cancel" | "postcopy")
        }
        Command::Snapshot { .. } | Command::Events => true,
        Command::Disk {
            action: DiskAction::Commit { .. },
        } => true,
        Command::Console { dump, .. } => !dump,
        _ => false,
    }
}

async fn run(cli: &Cli) -> Result<String, Failure> {
    if !(cli.timeout > 0.0 && cli.timeout <= 3600.0) {
        return Err(Failure(
            2,
            format!(
                "--timeout {}: give seconds above 0, up to 3600",
                cli.timeout
            ),
        ));
    }
    let wait = Duration::from_secs_f64(cli.timeout);
    if let Some(path) = &cli.blockd {
        return match &cli.command {
            Command::Disk { action } => blockd_direct(path, action, cli.json, wait).await,
            _ => Err(Failure(
                2,
                "--blockd serves the `disk` commands only; use --socket for the VM's own".into(),
            )),
        };
    }
    let (socket, named) = match (&cli.socket, &cli.vm) {
        (Some(s), _) => (s.clone(), format!("--socket {}", s.display())),
        (None, Some(name)) if name.is_empty() || name.contains('/') || name == "." || name == ".." => {
            return Err(Failure(
                2,
                format!("--vm {name:?}: not a VM's name; give the NAME of its unit vmm-core@NAME"),
            ))
        }
        (None, Some(name)) => {
            let s = peer::vm_socket(name);
            let named = format!("--vm {name} ({})", s.display());
            (s, named)
        }
        (None, None) => {
            return Err(Failure(
                2,
                "say which VM: --socket PATH (its --api-socket), --vm NAME (systemd's vmm-core@NAME) or $VMMCTL_SOCKET; or --blockd PATH for a blockd".into(),
            ))
        }
    };
    check_locally(&cli.command)?;
    let name = command_name(&cli.command);
    const API: &str = "a VM's API socket (vmm-core run --api-socket PATH)";
    const HINT: &str = "for a blockd's control socket use --blockd PATH";
    peer::check_is_socket(&named, &socket, API)?;
    let stream = peer::within(
        wait,
        async {
            tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| peer::connect_failed(&named, "vmm-core", e))
        },
        || peer::no_answer(&named, None, API, wait),
    )
    .await?;
    let listener = peer::Listener::of(&stream);
    if let Some(l) = &listener {
        l.check(&named, "vmm-core", API, HINT)?;
    }
    let (rpc, client): (_, vmm::Client) = vmm_proto::rpc::client(stream);
    let disconnect = rpc.get_disconnector();
    let mut connection = tokio::task::spawn_local(rpc);
    // The first answer says whether this is a VM at all.
    peer::within(
        wait,
        async {
            client
                .info_request()
                .send()
                .promise
                .await
                .map(drop)
                .map_err(|e| peer::probe_failed(&named, listener.as_ref(), API, HINT, e))
        },
        || peer::no_answer(&named, listener.as_ref(), API, wait),
    )
    .await?;
    let s = Session {
        client,
        json: cli.json,
        path: named,
        name,
    };
    let command = cli.command.clone();
    if runs_long(&command) {
        return s.long(command, cli.timeout, &mut connection).await;
    }
    // A guest has --timeout to take vCPUs, and dirty-rate measures for --ms: each gets its
    // time on top of the deadline.
    let extra = match &command {
        Command::Cpus { action: Some(_) }
        | Command::Disk {
            action: DiskAction::Remove { .. },
        } => wait,
        Command::DirtyRate { ms } => Duration::from_millis(u64::from(*ms)),
        _ => Duration::ZERO,
    };
    let out = peer::within(wait + extra, s.quick(command, cli.timeout), || {
        Failure(
            1,
            format!(
                "{name}: no answer in {} s (--timeout SECONDS waits longer)",
                (wait + extra).as_secs_f64()
            ),
        )
    })
    .await?;
    let _ = disconnect.await;
    Ok(out)
}

/// Refuses, before connecting, what no VM would accept: the `disk` commands that only a blockd of its own serves, a bad rate, a snapshot to a
/// non-file or a migration to a file.
fn check_locally(command: &Command) -> Result<(), Failure> {
    match command {
        Command::Disk {
            action: DiskAction::Resume { .. },
        } => Err(Failure(
            2,
            "disk resume is for a blockd of its own (--blockd PATH); for a VM, `vmmctl resume` resumes it and retries its disks".into(),
        )),
        Command::Disk {
            action:
                DiskAction::Add {
                    name,
                    image,
                    vhost_socket,
                    ..
                },
        } if image.is_some() || vhost_socket.is_some() => Err(Failure(
            2,
            format!("disk add {name}: --image and --vhost-socket are for a blockd of its own (--blockd PATH); to a VM, give the disk as vmm-core's --disk takes it: disk add path=FILE[,format=qcow2][,readonly=on]"),
        )),
        Command::Disk {
            action: DiskAction::Resize { name, size, .. },
        } if parse_disk_size(name, size).is_err() => parse_disk_size(name, size).map(drop),
        Command::Migrate {
            bandwidth: Some(b), ..
        } if parse_rate("--bandwidth", b).is_err() => parse_rate("--bandwidth", b).map(drop),
        Command::Migrate {
            postcopy_bandwidth: Some(b),
            ..
        } if parse_rate("--postcopy-bandwidth", b).is_err() => {
            parse_rate("--postcopy-bandwidth", b).map(drop)
        }
        Command::Migrate {
            target,
            postcopy: true,
            ..
        } if matches!(target.as_str(), "status" | "cancel" | "postcopy") => Err(Failure(
            2,
            format!("migrate {target} --postcopy: --postcopy starts a migration that may switch; to switch the one under way, `vmmctl migrate postcopy`"),
        )),
        Command::Migrate {
            target,
            recover_uri: None,
            ..
        } if target == "recover" => Err(Failure(
            2,
            "migrate recover: give the new channel's URI (the destination listens on it, the source connects to it), e.g. `vmmctl migrate recover tcp:HOST:PORT`".into(),
        )),
        Command::Migrate {
            target,
            recover_uri: Some(u),
            ..
        } if target != "recover" => Err(Failure(
            2,
            format!("migrate {target} {u}: one target only (a second URI is for `migrate recover URI`)"),
        )),
        Command::Migrate { target, .. } if target.starts_with("file:") => Err(Failure(
            2,
            format!("migrate {target}: a file is a snapshot; use `vmmctl snapshot {target}`"),
        )),
        Command::Snapshot { uri, .. } if !uri.starts_with("file:") || uri.len() == 5 => {
            Err(Failure(
                2,
                format!("snapshot {uri}: a snapshot goes to file:PATH; for a live destination use `vmmctl migrate`"),
            ))
        }
        _ => Ok(()),
    }
}

/// The command as its errors name it.
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Info => "info",
        Command::Config => "config",
        Command::Pause => "pause",
        Command::Resume => "resume",
        Command::Shutdown { .. } => "shutdown",
        Command::Reboot => "reboot",
        Command::Events => "events",
        Command::Devices => "devices",
        Command::Replay { .. } => "replay status",
        Command::DirtyRate { .. } => "dirty-rate",
        Command::Migrate { target, .. } if target == "status" => "migrate status",
        Command::Migrate { target, .. } if target == "cancel" => "migrate cancel",
        Command::Migrate { target, .. } if target == "postcopy" => "migrate postcopy",
        Command::Migrate { target, .. } if target == "recover" => "migrate recover",
        Command::Migrate { .. } => "migrate",
        Command::Snapshot { .. } => "snapshot",
        Command::Cpus { action: None } => "cpus",
        Command::Cpus { action: Some(_) } => "cpus set",
        Command::Console { .. } => "console",
        Command::ConsoleFault { .. } => "console-fault",
        Command::Disk { action } => match action {
            DiskAction::List => "disk list",
            DiskAction::Stats { .. } => "disk stats",
            DiskAction::Fault { .. } => "disk fault",
            DiskAction::Throttle { .. } => "disk throttle",
            DiskAction::Resize { .. } => "disk resize",
            DiskAction::Resume { .. } => "disk resume",
            DiskAction::Add { .. } => "disk add",
            DiskAction::Remove { .. } => "disk remove",
            DiskAction::Snapshot { .. } => "disk snapshot",
            DiskAction::Commit { .. } => "disk commit",
        },
    }
}

/// A request that carries nothing back but success.
enum Simple {
    Pause,
    Resume,
    Reboot,
    Shutdown(bool),
    MigrateCancel,
    MigratePostcopy,
}

/// One command's connection to the VM: each method sends its request and formats the answer.
struct Session {
    client: vmm::Client,
    json: bool,
    /// The API socket, as errors name it.
    path: String,
    /// The command, as errors name it.
    name: &'static str,
}

impl Session {
    /// A command that completes at once (the caller bounds it with --timeout).
    async fn quick(&self, command: Command, timeout: f64) -> Result<String, Failure> {
        match command {
            Command::Info => self.info().await,
            Command::Config => {
                let reply = self
                    .client
                    .config_request()
                    .send()
                    .promise
                    .await
                    .map_err(|e| self.fail(e))?;
                let json = reply
                    .get()
                    .and_then(|r| r.get_json())
                    .map_err(|e| self.fail(e))?;
                Ok(json.to_string().map_err(|e| self.fail(e.into()))?)
            }
            Command::Pause => self.simple(Simple::Pause).await,
            Command::Resume => self.simple(Simple::Resume).await,
            Command::Reboot => self.simple(Simple::Reboot).await,
            Command::Shutdown { force } => self.simple(Simple::Shutdown(force)).await,
            Command::DirtyRate { ms } => self.dirty_rate(ms).await,
            Command::Migrate { target, .. } if target == "status" => self.migrate_status().await,
            Command::Migrate { target, .. } if target == "postcopy" => {
                self.simple(Simple::MigratePostcopy).await
            }
            Command::Migrate { .. } => self.simple(Simple::MigrateCancel).await,
            Command::Cpus {
                action: Some(CpusAction::Set { count }),
            } => self.set_cpus(count, timeout).await,
            Command::Cpus { action: None } => self.cpus().await,
            Command::Disk {
                action: DiskAction::Fault { rule },
            } => self.disk_fault(&rule).await,
            Command::Disk {
                action: DiskAction::Throttle { name, spec },
            } => self.disk_throttle(&name, &spec).await,
            Command::Disk {
                action: DiskAction::Resize { name, size, force },
            } => self.disk_resize(&name, &size, force).await,
            Command::Disk {
                action: DiskAction::Add { name, .. },
            } => self.disk_add(&name).await,
            Command::Disk {
                action: DiskAction::Remove { name },
            } => self.disk_remove(&name, timeout).await,
            Command::Disk {
                action: DiskAction::Snapshot { name, overlay },
            } => self.disk_snapshot(&name, &peer::absolute(&overlay)).await,
            Command::Disk { action } => self.disks(&action).await,
            Command::Devices => self.devices().await,
            Command::Replay { .. } => self.replay_status().await,
            Command::Console { device, .. } => self.console_dump(&device).await,
            Command::ConsoleFault { rule, device } => self.console_fault(rule, &device).await,
            Command::Snapshot { .. } | Command::Events => unreachable!("runs_long"),
        }
    }

    /// A command that runs as long as it takes: a migration or snapshot (with its progress),
    /// the event stream, an attached console.
    async fn long(
        &self,
        command: Command,
        _timeout: f64,
        connection: &mut tokio::task::JoinHandle<Result<(), capnp::Error>>,
    ) -> Result<String, Failure> {
        match command {
            Command::Migrate {
                target,
                recover_uri: Some(uri),
                tls_creds,
                tls_hostname,
                ..
            } if target == "recover" => {
                let tls = (
                    tls_creds.as_deref().map(peer::absolute).unwrap_or_default(),
                    tls_hostname.unwrap_or_default(),
                );
                self.migrate_recover(&peer::absolute_uri(&uri), &tls).await
            }
            Command::Migrate {
                target,
                downtime_ms,
                max_passes,
                bandwidth,
                tls_creds,
                tls_hostname,
                postcopy,
                postcopy_bandwidth,
                compress,
                ..
            } => {
                let tls = (
                    tls_creds.as_deref().map(peer::absolute).unwrap_or_default(),
                    tls_hostname.unwrap_or_default(),
                );
                let bandwidth = bandwidth
                    .as_deref()
                    .map(|r| parse_rate("--bandwidth", r))
                    .transpose()?;
                let postcopy_bandwidth = postcopy_bandwidth
                    .as_deref()
                    .map(|r| parse_rate("--postcopy-bandwidth", r))
                    .transpose()?;
                let options = MigrateOptions {
                    downtime_ms: downtime_ms.unwrap_or(0),
                    max_passes: max_passes.unwrap_or(0),
                    bandwidth: bandwidth.unwrap_or(0),
                    tls: &tls,
                    compress,
                    postcopy,
                    postcopy_bandwidth: postcopy_bandwidth.unwrap_or(0),
                    workset_ms: 0,
                };
                self.migrate(&peer::absolute_uri(&target), &options).await
            }
            Command::Snapshot {
                uri,
                compress,
                workset_ms,
            } => {
                self.snapshot(&peer::absolute_uri(&uri), compress, workset_ms.unwrap_or(0))
                    .await
            }
            Command::Disk {
                action: DiskAction::Commit { name },
            } => self.disk_commit(&name).await,
            Command::Console { device, .. } => {
                let input = self.console_attach(&device).await?;
                let why = attach(&device, input, connection).await;
                eprintln!("\r\nvmmctl: {why}");
                Ok(String::new())
            }
            _ => {
                self.subscribe().await?;
                // Events arrive as calls to the Printer until the VMM ends the connection.
                let _ = connection.await;
                Ok(String::new())
            }
        }
    }

    /// A failed request as the exit status 1 and a line that names the command.
    fn fail(&self, e: capnp::Error) -> Failure {
        let msg = match e.kind {
            capnp::ErrorKind::Disconnected => format!(
                "{}: the VMM closed the connection before it answered (it ended, or was stopped)",
                self.path
            ),
            _ => vmm_proto::rpc::remote_message(&e),
        };
        Failure(1, format!("{}: {msg}", self.name))
    }

    async fn simple(&self, what: Simple) -> Result<String, Failure> {
        let c = &self.client;
        let (sent, said) = match what {
            Simple::Pause => (c.pause_request().send().promise.await.map(drop), "paused"),
            Simple::Resume => (c.resume_request().send().promise.await.map(drop), "resumed"),
            Simple::Reboot => (c.reboot_request().send().promise.await.map(drop), "reset"),
            Simple::Shutdown(force) => {
                let mut req = c.shutdown_request();
                req.get().set_force(force);
                let said = if force {
                    "stopped"
                } else {
                    "shutdown requested"
                };
                (req.send().promise.await.map(drop), said)
            }
            Simple::MigrateCancel => (
                c.migrate_cancel_request().send().promise.await.map(drop),
                "cancelled; the VM goes on here",
            ),
            Simple::MigratePostcopy => (
                c.migrate_postcopy_request().send().promise.await.map(drop),
                "the migration switches to post-copy now: the destination runs the VM, and its pages follow",
            ),
        };
        sent.map_err(|e| self.fail(e))?;
        Ok(done(self.json, said))
    }

    async fn info(&self) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let reply = self
            .client
            .info_request()
            .send()
            .promise
            .await
            .map_err(fail)?;
        let info = reply.get().and_then(|r| r.get_info()).map_err(fail)?;
        format_info(&info, self.json).map_err(fail)
    }

    async fn dirty_rate(&self, ms: u32) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let mut req = self.client.dirty_rate_request();
        req.get().set_ms(ms);
        let reply = req.send().promise.await.map_err(fail)?;
        let r = reply.get().map_err(fail)?;
        let (pages, ms, page) = (r.get_pages(), r.get_ms().max(1), r.get_page_size());
        let mib_s = (pages * u64::from(page)) as f64 / (1 << 20) as f64 * 1000.0 / f64::from(ms);
        Ok(if self.json {
            format!(
                "{{\"pages\":{pages},\"page_size\":{page},\"ms\":{ms},\"mib_per_s\":{mib_s:.1}}}"
            )
        } else {
            format!("{pages} pages of {page} bytes written in {ms} ms: {mib_s:.1} MiB/s")
        })
    }

    async fn migrate_status(&self) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let req = self.client.migrate_status_request();
        let reply = req.send().promise.await.map_err(fail)?;
        let st = reply.get().and_then(|r| r.get_status()).map_err(fail)?;
        format_migration(&st, self.json).map_err(fail)
    }

    async fn migrate_recover(&self, uri: &str, tls: &(String, String)) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let mut req = self.client.migrate_recover_request();
        req.get().set_uri(uri);
        let mut o = req.get().init_options();
        o.set_tls_creds(tls.0.as_str());
        o.set_tls_hostname(tls.1.as_str());
        let reply = req.send().promise.await.map_err(fail)?;
        let st = reply.get().and_then(|r| r.get_status()).map_err(fail)?;
        if self.json {
            return format_migration(&st, true).map_err(fail);
        }
        let phase = st
            .get_phase()
            .map_err(fail)?
            .to_str()
            .unwrap_or("")
            .to_string();
        Ok(if phase == "completed" {
            format!(
                "post-copy resumed on {uri} and is over: {} page(s) carried; the VM runs on the destination now",
                st.get_postcopy_pages()
            )
        } else {
            format!("post-copy resumes on {uri}: the source is back")
        })
    }

    async fn migrate(&self, target: &str, options: &MigrateOptions<'_>) -> Result<String, Failure> {
        let st = migrate(&self.client, target, options, self.json)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(if self.json {
            st
        } else {
            format!("migrated to {target}; the VM runs there now: {st}")
        })
    }

    async fn snapshot(
        &self,
        uri: &str,
        compress: bool,
        workset_ms: u32,
    ) -> Result<String, Failure> {
        let tls = Default::default();
        let options = MigrateOptions {
            downtime_ms: 0,
            max_passes: 0,
            bandwidth: 0,
            tls: &tls,
            compress,
            postcopy: false,
            postcopy_bandwidth: 0,
            workset_ms,
        };
        let st = migrate(&self.client, uri, &options, self.json)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(if self.json {
            st
        } else {
            format!("saved to {uri}: {st}")
        })
    }

    async fn set_cpus(&self, count: u32, timeout: f64) -> Result<String, Failure> {
        let mut req = self.client.set_cpus_request();
        req.get().set_count(count);
        req.get().set_timeout_ms((timeout * 1000.0).ceil() as u32);
        req.send().promise.await.map_err(|e| self.fail(e))?;
        let s = if count == 1 { "" } else { "s" };
        Ok(done(self.json, &format!("{count} vCPU{s} online")))
    }

    async fn cpus(&self) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let reply = self
            .client
            .cpus_request()
            .send()
            .promise
            .await
            .map_err(fail)?;
        let r = reply.get().map_err(fail)?;
        let mut rows = Vec::new();
        for c in r.get_cpus().map_err(fail)?.iter() {
            rows.push((
                c.get_id(),
                text(c.get_state()).map_err(fail)?,
                c.get_reuses(),
            ));
        }
        if self.json {
            let items: Vec<String> = rows
                .iter()
                .map(|(id, state, reuses)| {
                    format!(
                        "{{\"id\":{id},\"state\":{},\"reuses\":{reuses}}}",
                        json_str(state)
                    )
                })
                .collect();
            return Ok(format!(
                "{{\"cpus\":[{}],\"created\":{}}}",
                items.join(","),
                r.get_created()
            ));
        }
        let mut out = String::from("vCPU  state    KVM fd reuses\n");
        for (id, state, reuses) in &rows {
            out.push_str(&format!("{id:<5} {state:<8} {reuses}\n"));
        }
        out.push_str(&format!(
            "KVM_CREATE_VCPU calls in this boot: {}",
            r.get_created()
        ));
        Ok(out)
    }

    async fn disk_fault(&self, rule: &DiskFault) -> Result<String, Failure> {
        run_fault(&self.client, rule, self.json, |e| self.fail(e)).await
    }

    async fn disk_throttle(&self, name: &str, spec: &str) -> Result<String, Failure> {
        let spec = vmm_proto::throttle::Spec::parse(spec)
            .map_err(|m| Failure(2, format!("disk throttle {name}: {m}")))?;
        let mut req = self.client.disk_throttle_request();
        req.get().set_name(name);
        spec.write(req.get().init_throttle());
        req.send().promise.await.map_err(|e| self.fail(e))?;
        Ok(done(self.json, &format!("{name}: throttle {spec}")))
    }

    async fn disk_add(&self, spec: &str) -> Result<String, Failure> {
        let mut req = self.client.disk_add_request();
        req.get().set_spec(spec);
        let reply = req.send().promise.await.map_err(|e| self.fail(e))?;
        let r = reply.get().map_err(|e| self.fail(e))?;
        let name = r
            .get_name()
            .map_err(|e| self.fail(e))?
            .to_string()
            .map_err(|e| self.fail(e.into()))?;
        let slot = r.get_slot();
        Ok(if self.json {
            format!("{{\"name\":{},\"slot\":{slot}}}", json_str(&name))
        } else {
            format!("{name}: added at PCI 00:{slot:02x}.0; the guest was told")
        })
    }

    async fn disk_remove(&self, name: &str, timeout: f64) -> Result<String, Failure> {
        let mut req = self.client.disk_remove_request();
        req.get().set_name(name);
        req.get().set_timeout_ms((timeout * 1000.0).ceil() as u32);
        req.send().promise.await.map_err(|e| self.fail(e))?;
        Ok(done(
            self.json,
            &format!("{name}: the guest ejected it; removed"),
        ))
    }

    async fn disk_snapshot(&self, name: &str, overlay: &str) -> Result<String, Failure> {
        let mut req = self.client.disk_snapshot_request();
        req.get().set_name(name);
        req.get().set_overlay(overlay);
        req.send().promise.await.map_err(|e| self.fail(e))?;
        Ok(done(
            self.json,
            &format!("{name}: its writes go to {overlay} now; the image below is read-only"),
        ))
    }

    /// Commits, printing how far it is as it changes, twice a second at most (on stderr,
    /// unless --json).
    async fn disk_commit(&self, name: &str) -> Result<String, Failure> {
        let mut req = self.client.disk_commit_request();
        req.get().set_name(name);
        let answer = req.send().promise;
        tokio::pin!(answer);
        let mut shown = String::new();
        let reply = loop {
            tokio::select! {
                r = &mut answer => break r.map_err(|e| self.fail(e))?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let job = self.disk_job(name).await.unwrap_or_default();
                    if !self.json && !job.is_empty() && job != shown {
                        eprintln!("{name}: {job}");
                        shown = job;
                    }
                }
            }
        };
        let r = reply.get().map_err(|e| self.fail(e))?;
        let bytes = r.get_bytes();
        let base = text(r.get_base()).map_err(|e| self.fail(e))?;
        Ok(done(
            self.json,
            &format!("{name}: committed into {base} ({bytes} bytes copied); that is its image now"),
        ))
    }

    /// Disk `name`'s job as `disks` shows it (empty: none).
    async fn disk_job(&self, name: &str) -> Result<String, capnp::Error> {
        let reply = self.client.disks_request().send().promise.await?;
        for d in reply.get()?.get_disks()?.iter() {
            if d.get_name()?.to_str()? == name {
                return Ok(d.get_job()?.to_str()?.to_string());
            }
        }
        Ok(String::new())
    }

    async fn disk_resize(&self, name: &str, size: &str, force: bool) -> Result<String, Failure> {
        let bytes = parse_disk_size(name, size)?;
        let mut req = self.client.disk_resize_request();
        req.get().set_name(name);
        req.get().set_bytes(bytes);
        req.get().set_force(force);
        let reply = req.send().promise.await.map_err(|e| self.fail(e))?;
        let old = reply.get().map_err(|e| self.fail(e))?.get_old();
        Ok(done(
            self.json,
            &format!("{name}: resized from {old} to {bytes} bytes; the guest was told"),
        ))
    }

    /// Where the console's and each disk's record/replay logs stand.
    async fn replay_status(&self) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let info = self
            .client
            .info_request()
            .send()
            .promise
            .await
            .map_err(fail)?;
        let console = text(info.get().and_then(|r| r.get_info()?.get_replay())).map_err(fail)?;
        let rng = text(info.get().and_then(|r| r.get_info()?.get_rng_replay())).map_err(fail)?;
        let reply = self
            .client
            .disks_request()
            .send()
            .promise
            .await
            .map_err(fail)?;
        let list = reply.get().and_then(|r| r.get_disks()).map_err(fail)?;
        let mut rows = Vec::new();
        if !console.is_empty() {
            rows.push(("console".to_string(), console, String::new()));
        }
        if !rng.is_empty() {
            rows.push(("rng0".to_string(), rng, String::new()));
        }
        for d in list.iter() {
            let replay = text(d.get_replay()).map_err(fail)?;
            if !replay.is_empty() {
                let stopped = text(d.get_stopped()).map_err(fail)?;
                rows.push((text(d.get_name()).map_err(fail)?, replay, stopped));
            }
        }
        if self.json {
            let items: Vec<String> = rows
                .iter()
                .map(|(n, r, s)| {
                    format!(
                        "{{\"device\":{},\"status\":{},\"stopped\":{}}}",
                        json_str(n),
                        json_str(r),
                        json_str(s)
                    )
                })
                .collect();
            return Ok(format!("[{}]", items.join(",")));
        }
        if rows.is_empty() {
            return Ok(
                "no recording and no replay (vmm-core run --record DIR or --replay DIR)"
                    .to_string(),
            );
        }
        Ok(rows
            .iter()
            .map(|(n, r, s)| {
                if s.is_empty() {
                    format!("{n}: {r}")
                } else {
                    format!("{n}: {r}; stopped: {s}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// `disk list` and `disk stats [NAME]`.
    async fn disks(&self, action: &DiskAction) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let reply = self
            .client
            .disks_request()
            .send()
            .promise
            .await
            .map_err(fail)?;
        let list = reply.get().and_then(|r| r.get_disks()).map_err(fail)?;
        let only = match action {
            DiskAction::Stats { name } => name.clone(),
            _ => None,
        };
        if let Some(n) = &only {
            let mut names = Vec::new();
            for d in list.iter() {
                names.push(text(d.get_name()).map_err(fail)?);
            }
            if !names.contains(n) {
                let has = if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                };
                return Err(Failure(
                    1,
                    format!("disk stats: no disk {n:?}; this VM has {has}"),
                ));
            }
        }
        format_disks(&list, action, only.as_deref(), self.json).map_err(fail)
    }

    async fn devices(&self) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let reply = self
            .client
            .devices_request()
            .send()
            .promise
            .await
            .map_err(fail)?;
        let list = reply.get().and_then(|r| r.get_devices()).map_err(fail)?;
        let mut lines = Vec::new();
        for d in list.iter() {
            let (name, kind, detail) = (
                text(d.get_name()).map_err(fail)?,
                text(d.get_kind()).map_err(fail)?,
                text(d.get_detail()).map_err(fail)?,
            );
            lines.push(if self.json {
                format!(
                    "{{\"name\":{},\"kind\":{},\"detail\":{}}}",
                    json_str(&name),
                    json_str(&kind),
                    json_str(&detail)
                )
            } else {
                format!("{name:<10} {kind:<18} {detail}")
            });
        }
        Ok(if self.json {
            format!("[{}]", lines.join(","))
        } else {
            lines.join("\n")
        })
    }

    /// Attaches Stdout to the console; the answer is where its input goes.
    async fn console_attach(&self, device: &str) -> Result<byte_sink::Client, Failure> {
        let fail = |e| self.fail(e);
        let mut req = self.client.console_attach_request();
        req.get().set_device(device);
        req.get().set_output(capnp_rpc::new_client(Stdout));
        let reply = req.send().promise.await.map_err(fail)?;
        reply.get().and_then(|r| r.get_input()).map_err(fail)
    }

    async fn console_dump(&self, device: &str) -> Result<String, Failure> {
        let fail = |e| self.fail(e);
        let mut req = self.client.console_dump_request();
        req.get().set_device(device);
        let reply = req.send().promise.await.map_err(fail)?;
        let r = reply.get().map_err(fail)?;
        let data = r.get_data().map_err(fail)?;
        if self.json {
            return Ok(format!(
                "{{\"data\":{},\"dropped\":{}}}",
                json_str(&String::from_utf8_lossy(data)),
                r.get_dropped()
            ));
        }
        use std::io::Write;
        let _ = std::io::stdout().write_all(data);
        if r.get_dropped() > 0 {
            eprintln!("vmmctl: the ring dropped {} older bytes", r.get_dropped());
        }
        Ok(String::new())
    }

    async fn console_fault(&self, rule: FaultRule, device: &str) -> Result<String, Failure> {
        let mut req = self.client.console_fault_request();
        req.get().set_device(device);
        let mut f = req.get().init_fault();
        match rule {
            FaultRule::Clear => f.set_clear(()),
            FaultRule::DropConnection => f.set_drop_connection(()),
            FaultRule::DelayWrites { ms } => f.set_delay_writes_ms(ms),
            FaultRule::ForbiddenSyscall => f.set_forbidden_syscall(()),
        }
        req.send().promise.await.map_err(|e| self.fail(e))?;
        Ok(done(self.json, "done"))
    }

    /// Subscribes a Printer to the VM's events.
    async fn subscribe(&self) -> Result<(), Failure> {
        let mut req = self.client.events_request();
        req.get()
            .set_sink(capnp_rpc::new_client(Printer { json: self.json }));
        req.send().promise.await.map_err(|e| self.fail(e))?;
        // The VMM registers the subscription before it answers, so from here on nothing
        // is missed; say so on stderr, where it does not mix with the events.
        eprintln!("vmmctl: subscribed to events; they print until the VM ends");
        Ok(())
    }
}

/// Runs an attached console until Ctrl-] or until the VM ends; says which. Standard input
/// goes to the guest (the terminal in raw mode, so every key does); the VM's output comes to
/// Stdout. When standard input ends, the console stays attached, showing output.
async fn attach(
    device: &str,
    input: byte_sink::Client,
    connection: &mut tokio::task::JoinHandle<capnp::Result<()>>,
) -> String {
    let raw = vmm_proto::terminal::RawMode::enter();
    eprintln!(
        "vmmctl: attached to {device}; the escape key is Ctrl-]{}",
        if raw.is_some() { "" } else { " (byte 0x1d)" }
    );
    let (tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    // A blocking reader of its own: standard input may be a terminal, a pipe or a file.
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
    let mut stdin_open = true;
    let why = loop {
        tokio::select! {
            keys = keys.recv(), if stdin_open => {
                let Some(mut bytes) = keys else {
                    stdin_open = false;
                    continue;
                };
                let escape = bytes.iter().position(|&b| b == ESCAPE);
                if let Some(at) = escape {
                    bytes.truncate(at);
                }
                if !bytes.is_empty() {
                    let mut req = input.write_request();
                    req.get().set_data(&bytes);
                    if let Err(e) = req.send().promise.await {
                        break format!("the console closed ({})", e.extra);
                    }
                }
                if escape.is_some() {
                    break "detached".to_string();
                }
            }
            _ = &mut *connection => break "the console closed: the VM ended".to_string(),
        }
    };
    drop(raw);
    why
}

/// Where an attached console's output goes: standard output, as it comes.
struct Stdout;

impl byte_sink::Server for Stdout {
    async fn write(
        self: capnp::capability::Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        match out
            .write_all(params.get()?.get_data()?)
            .and_then(|()| out.flush())
        {
            // The reader went away (`vmmctl console | head`): end quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            r => r.map_err(|e| capnp::Error::failed(format!("standard output: {e}"))),
        }
    }
}

/// Receives events from the VMM and prints one line each.
struct Printer {
    json: bool,
}

impl event_sink::Server for Printer {
    async fn event(
        self: capnp::capability::Rc<Self>,
        params: event_sink::EventParams,
        _: event_sink::EventResults,
    ) -> Result<(), capnp::Error> {
        let e = params.get()?.get_event()?;
        let kind = e
            .get_kind()?
            .to_str()
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let detail = e
            .get_detail()?
            .to_str()
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let ms = e.get_time_unix_ms();
        peer::out(&if self.json {
            format!(
                "{{\"time_unix_ms\":{ms},\"kind\":{},\"detail\":{}}}",
                json_str(kind),
                json_str(detail)
            )
        } else {
            format!(
                "{}.{:03} {kind}{}{detail}",
                ms / 1000,
                ms % 1000,
                if detail.is_empty() { "" } else { ": " }
            )
        });
        Ok(())
    }
}

fn done(json: bool, what: &str) -> String {
    if json {
        format!("{{\"result\":{}}}", json_str(what))
    } else {
        what.to_string()
    }
}

fn format_info(
    info: &vmm_proto::vmm_capnp::vm_info::Reader,
    json: bool,
) -> Result<String, capnp::Error> {
    let state = match info.get_state()? {
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Incoming => "incoming",
        RunState::Migrating => "migrating",
        RunState::Postmigrate => "postmigrate",
        RunState::Shutdown => "shutdown",
    };
    let kernel = info
        .get_kernel()?
        .to_str()
        .map_err(|e| capnp::Error::failed(e.to_string()))?;
    let cmdline = info
        .get_cmdline()?
        .to_str()
        .map_err(|e| capnp::Error::failed(e.to_string()))?;
    let generation = info
        .get_generation_id()?
        .to_str()
        .map_err(|e| capnp::Error::failed(e.to_string()))?;
    Ok(if json {
        format!(
            "{{\"state\":{},\"cpus\":{},\"max_cpus\":{},\"memory_bytes\":{},\"kernel\":{},\"cmdline\":{},\"pid\":{},\"uptime_ms\":{},\"boots\":{},\"generation_id\":{}}}",
            json_str(state),
            info.get_cpus(),
            info.get_max_cpus(),
            info.get_memory_bytes(),
            json_str(kernel),
            json_str(cmdline),
            info.get_pid(),
            info.get_uptime_ms(),
            info.get_boots(),
            json_str(generation)
        )
    } else {
        format!(
            "state:    {state}\nvCPUs:    {} online, {} max\nmemory:   {} MiB\nkernel:   {kernel}\ncmdline:  {cmdline}\npid:      {}\nuptime:   {:.1} s\nboots:    {}\ngeneration id: {generation}",
            info.get_cpus(),
            info.get_max_cpus(),
            info.get_memory_bytes() >> 20,
            info.get_pid(),
            info.get_uptime_ms() as f64 / 1000.0,
            info.get_boots()
        )
    })
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    vmm_proto::json::string(s)
}

fn text(t: capnp::Result<capnp::text::Reader>) -> capnp::Result<String> {
    t.and_then(|t| {
        t.to_string()
            .map_err(|e| capnp::Error::failed(e.to_string()))
    })
}

/// `disk list` and `disk stats`, for people or (--json) programs.
fn format_disks(
    list: &capnp::struct_list::Reader<vmm_proto::blockd_capnp::export_info::Owned>,
    action: &DiskAction,
    only: Option<&str>,
    json: bool,
) -> capnp::Result<String> {
    let mut out = Vec::new();
    for d in list.iter() {
        let name = text(d.get_name())?;
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let (image, format, socket) = (
            text(d.get_image())?,
            text(d.get_format())?,
            text(d.get_socket())?,
        );
        let throttle = vmm_proto::throttle::Spec::read(d.get_throttle()?)?;
        let mut ops = Vec::new();
        for o in d.get_ops()?.iter() {
            let buckets: Vec<(u64, u64)> = o
                .get_latency()?
                .iter()
                .map(|b| (b.get_up_to_us(), b.get_count()))
                .collect();
            ops.push((
                text(o.get_op())?,
                o.get_requests(),
                o.get_bytes(),
                o.get_errors(),
                buckets,
            ));
        }
        if json {
            let ops_json: Vec<String> = ops
                .iter()
                .map(|(op, r, b, e, lat)| {
                    let l: Vec<String> = lat
                        .iter()
                        .map(|(up, n)| format!("{{\"up_to_us\":{up},\"count\":{n}}}"))
                        .collect();
                    format!(
                        "{{\"op\":{},\"requests\":{r},\"bytes\":{b},\"errors\":{e},\"latency\":[{}]}}",
                        json_str(op),
                        l.join(",")
                    )
                })
                .collect();
            out.push(format!(
                "{{\"name\":{},\"image\":{},\"format\":{},\"readonly\":{},\"queues\":{},\"size\":{},\"socket\":{},\"connected\":{},\"writeback\":{},\"direct\":{},\"invalid\":{},\"interrupts\":{},\"interrupts_suppressed\":{},\"throttle\":{},\"stopped\":{},\"job\":{},\"read_error\":{},\"write_error\":{},\"ops\":[{}]}}",
                json_str(&name),
                json_str(&image),
                json_str(&format),
                d.get_readonly(),
                d.get_queues(),
                d.get_size(),
                json_str(&socket),
                d.get_connected(),
                d.get_writeback(),
                d.get_direct(),
                d.get_invalid(),
                d.get_interrupts(),
                d.get_interrupts_suppressed(),
                json_str(&throttle.to_string()),
                json_str(&text(d.get_stopped())?),
                json_str(&text(d.get_job())?),
                json_str(&text(d.get_read_error())?),
                json_str(&text(d.get_write_error())?),
                ops_json.join(",")
            ));
            continue;
        }
        match action {
            DiskAction::List
            | DiskAction::Fault { .. }
            | DiskAction::Throttle { .. }
            | DiskAction::Resize { .. }
            | DiskAction::Add { .. }
            | DiskAction::Resume { .. }
            | DiskAction::Snapshot { .. }
            | DiskAction::Commit { .. }
            | DiskAction::Remove { .. } => out.push(format!(
                "{name:<8} {format:<6} {:>10} {}{} queues={} {} throttle={throttle} {image}{}",
                human(d.get_size()),
                if d.get_readonly() { "ro" } else { "rw" },
                if d.get_direct() { ",direct" } else { "" },
                d.get_queues(),
                if d.get_connected() {
                    "connected"
                } else {
                    "idle"
                },
                match (text(d.get_stopped())?, text(d.get_job())?) {
                    (why, _) if !why.is_empty() => format!(" STOPPED: {why}"),
                    (_, job) if !job.is_empty() => format!(" ({job})"),
                    _ => String::new(),
                },
            )),
            DiskAction::Stats { .. } => {
                let mut t = format!(
                    "{name}: {image} ({format}), write cache {}, {} malformed request(s), {} interrupt(s) sent, {} spared by EVENT_IDX\n",
                    if d.get_writeback() { "on" } else { "off" },
                    d.get_invalid(),
                    d.get_interrupts(),
                    d.get_interrupts_suppressed()
                );
                t.push_str("  op            requests        bytes  errors  latency (count up to each bound)\n");
                for (op, r, b, e, lat) in &ops {
                    let hist: Vec<String> = lat
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(up, n)| {
                            if *up == 0 {
                                format!(">{}:{n}", us(lat[lat.len().saturating_sub(2)].0))
                            } else {
                                format!("{}:{n}", us(*up))
                            }
                        })
                        .collect();
                    t.push_str(&format!(
                        "  {op:<12} {r:>10} {:>12} {e:>7}  {}\n",
                        human(*b),
                        if hist.is_empty() {
                            "-".to_string()
                        } else {
                            hist.join(" ")
                        }
                    ));
                }
                out.push(t.trim_end().to_string());
            }
        }
    }
    Ok(if json {
        format!("[{}]", out.join(","))
    } else if out.is_empty() {
        "no disks".to_string()
    } else {
        out.join("\n")
    })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn us(v: u64) -> String {
    if v >= 1000 {
        format!("{}ms", v / 1000)
    } else {
        format!("{v}us")
    }
}

/// `vmmctl --blockd PATH disk ...`: the disk commands, straight to a blockd of its own.
async fn blockd_direct(
    path: &std::path::Path,
    action: &DiskAction,
    json: bool,
    wait: Duration,
) -> Result<String, Failure> {
    let b = BlockdSession::connect(path, json, wait).await?;
    peer::within(wait, blockd_action(&b, action, json), || {
        Failure(
            1,
            format!(
                "disk: no answer in {} s (--timeout SECONDS waits longer)",
                wait.as_secs_f64()
            ),
        )
    })
    .await
}

async fn blockd_action(
    b: &BlockdSession,
    action: &DiskAction,
    json: bool,
) -> Result<String, Failure> {
    let fail = |e| b.fail(e);
    let server = &b.server;
    match action {
        DiskAction::Add {
            name,
            image,
            vhost_socket,
            format,
            readonly,
            queues,
        } => {
            let (Some(image), Some(vhost_socket)) = (image, vhost_socket) else {
                return Err(Failure(
                    2,
                    format!("disk add {name}: a blockd of its own needs --image PATH and --vhost-socket PATH"),
                ));
            };
            b.add(name, image, vhost_socket, format, *readonly, *queues)
                .await
        }
        DiskAction::Remove { name } => {
            let mut req = server.remove_request();
            req.get().set_name(name);
            req.send().promise.await.map_err(fail)?;
            Ok(done(json, &format!("{name}: removed")))
        }
        DiskAction::Snapshot { .. } | DiskAction::Commit { .. } => Err(Failure(
            2,
            "disk snapshot and disk commit are for a VM's API (vmm-core makes the overlay, opens the base and moves the image locks); give --api-socket, not --blockd".into(),
        )),
        DiskAction::Resize { name, size, force } => {
            let bytes = parse_disk_size(name, size)?;
            let mut req = server.resize_request();
            req.get().set_name(name);
            req.get().set_bytes(bytes);
            req.get().set_force(*force);
            let reply = req.send().promise.await.map_err(fail)?;
            let old = reply.get().map_err(fail)?.get_old();
            Ok(done(
                json,
                &format!("{name}: resized from {old} to {bytes} bytes (the frontend is not told: tell it yourself)"),
            ))
        }
        DiskAction::Throttle { name, spec } => {
            let spec = vmm_proto::throttle::Spec::parse(spec)
                .map_err(|m| Failure(2, format!("disk throttle {name}: {m}")))?;
            let mut req = server.set_throttle_request();
            req.get().set_name(name);
            spec.write(req.get().init_throttle());
            req.send().promise.await.map_err(fail)?;
            Ok(done(json, &format!("{name}: throttle {spec}")))
        }
        DiskAction::Fault { rule } => b.fault(rule).await,
        DiskAction::Resume { name } => {
            let mut req = server.resume_request();
            req.get().set_name(name.as_deref().unwrap_or(""));
            let reply = req.send().promise.await.map_err(fail)?;
            let n = reply.get().map_err(fail)?.get_retried();
            Ok(done(json, &format!("resumed; retrying {n} request(s)")))
        }
        DiskAction::List | DiskAction::Stats { .. } => {
            let reply = server.list_request().send().promise.await.map_err(fail)?;
            let list = reply.get().and_then(|r| r.get_exports()).map_err(fail)?;
            let only = match action {
                DiskAction::Stats { name } => name.clone(),
                _ => None,
            };
            format_disks(&list, action, only.as_deref(), json).map_err(fail)
        }
    }
}

/// A connection to a blockd's control socket, with its side channel for descriptors.
struct BlockdSession {
    server: vmm_proto::blockd_capnp::blockd::Client,
    side: std::os::fd::OwnedFd,
    json: bool,
    /// The socket, as errors name it.
    shown: String,
}

impl BlockdSession {
    async fn connect(
        path: &std::path::Path,
        json: bool,
        wait: Duration,
    ) -> Result<BlockdSession, Failure> {
        const BLOCKD: &str = "a blockd control socket (blockd --listen PATH)";
        const HINT: &str = "for a VM's API socket use --socket PATH";
        let shown = path.display().to_string();
        let named = format!("--blockd {shown}");
        peer::check_is_socket(&named, path, BLOCKD)?;
        let stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| peer::connect_failed(&named, "blockd", e))?;
        let listener = peer::Listener::of(&stream);
        if let Some(l) = &listener {
            l.check(&named, "blockd", BLOCKD, HINT)?;
        }
        let side = vmm_proto::rpc::open_side_channel(&stream).map_err(|e| {
            Failure(
                2,
                format!("{named}: cannot open the side channel ({e}); is it {BLOCKD}?"),
            )
        })?;
        let stream = vmm_proto::rpc::tokio_stream(stream)
            .map_err(|e| Failure(2, format!("{named}: {e}")))?;
        let (rpc, server): (_, vmm_proto::blockd_capnp::blockd::Client) =
            vmm_proto::rpc::client(stream);
        tokio::task::spawn_local(rpc);
        peer::within(
            wait,
            async {
                server
                    .list_request()
                    .send()
                    .promise
                    .await
                    .map(drop)
                    .map_err(|e| peer::probe_failed(&named, listener.as_ref(), BLOCKD, HINT, e))
            },
            || peer::no_answer(&named, listener.as_ref(), BLOCKD, wait),
        )
        .await?;
        Ok(BlockdSession {
            server,
            side,
            json,
            shown,
        })
    }

    fn fail(&self, e: capnp::Error) -> Failure {
        let msg = match e.kind {
            capnp::ErrorKind::Disconnected => {
                format!("--blockd {}: blockd closed the connection", self.shown)
            }
            _ => vmm_proto::rpc::remote_message(&e),
        };
        Failure(1, format!("disk: {msg}"))
    }

    /// `disk add`: vmmctl opens the image and binds the socket, and hands both to blockd.
    async fn add(
        &self,
        name: &str,
        image: &std::path::Path,
        vhost_socket: &std::path::Path,
        format: &str,
        readonly: bool,
        queues: u16,
    ) -> Result<String, Failure> {
        use std::os::fd::AsFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(image)
            .map_err(|e| {
                Failure(
                    2,
                    format!("--image {}: cannot open it ({e})", image.display()),
                )
            })?;
        let _ = std::fs::remove_file(vhost_socket);
        let listener = std::os::unix::net::UnixListener::bind(vhost_socket).map_err(|e| {
            Failure(
                2,
                format!(
                    "--vhost-socket {}: cannot listen there ({e})",
                    vhost_socket.display()
                ),
            )
        })?;
        vmm_proto::fdpass::send(
            self.side.as_fd(),
            name.as_bytes(),
            &[file.as_fd(), listener.as_fd()],
        )
        .map_err(|e| Failure(1, format!("disk add: cannot hand blockd the image ({e})")))?;
        let mut req = self.server.add_request();
        {
            let mut e = req.get().init_export();
            e.set_name(name);
            e.set_image(image.display().to_string());
            e.set_format(format);
            e.set_readonly(readonly);
            e.set_queues(queues);
            e.set_socket(vhost_socket.display().to_string());
            e.set_fds_on_side_channel(true);
            e.set_persist(true);
        }
        req.send().promise.await.map_err(|e| self.fail(e))?;
        Ok(done(
            self.json,
            &format!("{name}: served on {}", vhost_socket.display()),
        ))
    }

    /// `disk fault ...` on every export of this blockd.
    async fn fault(&self, rule: &DiskFault) -> Result<String, Failure> {
        run_fault(&self.server, rule, self.json, |e| self.fail(e)).await
    }
}

/// `disk resize NAME SIZE`: bytes, "20G" (K, M, G, T are powers of 1024).
fn parse_disk_size(name: &str, s: &str) -> Result<u64, Failure> {
    match vmm_proto::size::parse(s, 1) {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) | Err(vmm_proto::size::SizeError::Malformed(_)) => Err(Failure(
            2,
            format!("disk resize {name} {s}: not a size; write bytes, or 20G, 1536M and the like"),
        )),
        Err(vmm_proto::size::SizeError::TooLarge(_)) => {
            Err(Failure(2, format!("disk resize {name} {s}: too large")))
        }
    }
}

/// `migrate --bandwidth`: bytes per second, "100M" (K, M, G are powers of 1024).
fn parse_rate(flag: &str, s: &str) -> Result<u64, Failure> {
    let bad = |why: &str| Failure(2, format!("migrate {flag} {s}: {why}"));
    match vmm_proto::size::parse(s, 1) {
        Ok(0) | Err(vmm_proto::size::SizeError::Malformed(_)) => {
            Err(bad("not a rate; write bytes per second like 100M or 1G"))
        }
        Err(vmm_proto::size::SizeError::TooLarge(_)) => Err(bad("too large")),
        Ok(n) => Ok(n),
    }
}

/// What `migrate` and `snapshot` ask for: 0 means the VMM's default.
struct MigrateOptions<'a> {
    downtime_ms: u32,
    max_passes: u32,
    bandwidth: u64,
    /// The credentials' directory and the name to check (empty: no TLS).
    tls: &'a (String, String),
    compress: bool,
    postcopy: bool,
    postcopy_bandwidth: u64,
    workset_ms: u32,
}

/// Runs a migration (or snapshot), drawing its progress on a terminal meanwhile.
async fn migrate(
    client: &vmm::Client,
    uri: &str,
    options: &MigrateOptions<'_>,
    json: bool,
) -> Result<String, capnp::Error> {
    use std::io::IsTerminal;
    let mut req = client.migrate_request();
    req.get().set_uri(uri);
    let mut o = req.get().init_options();
    o.set_downtime_ms(options.downtime_ms);
    o.set_max_passes(options.max_passes);
    o.set_bandwidth(options.bandwidth);
    o.set_tls_creds(options.tls.0.as_str());
    o.set_tls_hostname(options.tls.1.as_str());
    o.set_compress(options.compress);
    o.set_postcopy(options.postcopy);
    o.set_postcopy_bandwidth(options.postcopy_bandwidth);
    o.set_workset_ms(options.workset_ms);
    let call = req.send().promise;
    let draw = !json && std::io::stderr().is_terminal();
    let mut call = std::pin::pin!(call);
    loop {
        let tick = tokio::time::sleep(std::time::Duration::from_millis(200));
        tokio::select! {
            r = &mut call => {
                if draw {
                    eprint!("\r\x1b[K");
                }
                let r = r?;
                let st = r.get()?.get_status()?;
                if json {
                    return format_migration(&st, true);
                }
                let postcopy = if st.get_postcopy_ms() > 0 || st.get_postcopy_pages() > 0 {
                    format!(
                        "; post-copy carried {} page(s) in {} ms, {} asked for by the destination",
                        st.get_postcopy_pages(),
                        st.get_postcopy_ms(),
                        st.get_postcopy_requests()
                    )
                } else {
                    String::new()
                };
                return Ok(format!(
                    "{} MiB sent in {} ms over {} pass(es), the VM paused for {} ms{}{postcopy}",
                    st.get_bytes() >> 20,
                    st.get_total_ms(),
                    st.get_passes(),
                    st.get_downtime_ms(),
                    if st.get_forced() {
                        " (forced at --max-passes: over the downtime limit)"
                    } else {
                        ""
                    }
                ));
            }
            _ = tick, if draw => {
                if let Ok(reply) = client.migrate_status_request().send().promise.await {
                    if let Ok(st) = reply.get().and_then(|r| r.get_status()) {
                        let total = st.get_memory_bytes().max(1);
                        let done = st.get_ram_bytes().min(total);
                        let width = 30;
                        let filled = (done * width / total) as usize;
                        // The time the rest of the first pass takes at the current rate.
                        let eta = match (st.get_passes(), st.get_bandwidth()) {
                            (0, rate) if rate > 0 => format!(", ETA {} s", (total - done).div_ceil(rate)),
                            _ => String::new(),
                        };
                        eprint!(
                            "\r\x1b[K{:<14} [{}{}] {:>3}% {:>5} MiB sent, pass {}, {} MiB/s{eta}",
                            st.get_phase().ok().and_then(|p| p.to_str().ok()).unwrap_or(""),
                            "#".repeat(filled),
                            " ".repeat(width as usize - filled),
                            done * 100 / total,
                            st.get_bytes() >> 20,
                            st.get_passes() + 1,
                            st.get_bandwidth() >> 20
                        );
                    }
                }
            }
        }
    }
}

fn format_migration(
    st: &vmm_proto::vmm_capnp::migration_status::Reader,
    json: bool,
) -> Result<String, capnp::Error> {
    let text = |t: capnp::Result<capnp::text::Reader>| -> Result<String, capnp::Error> {
        Ok(t?.to_str()?.to_string())
    };
    let (phase, uri, error) = (
        text(st.get_phase())?,
        text(st.get_uri())?,
        text(st.get_error())?,
    );
    if json {
        return Ok(format!(
            "{{\"phase\":{phase:?},\"uri\":{uri:?},\"passes\":{},\"bytes\":{},\"ram_bytes\":{},\"dirty_pages\":{},\"dirty_rate_pages_per_s\":{},\"bandwidth_bytes_per_s\":{},\"expected_downtime_ms\":{},\"downtime_ms\":{},\"total_ms\":{},\"forced\":{},\"postcopy\":{{\"allowed\":{},\"pages\":{},\"requests\":{},\"fault_p50_us\":{},\"fault_p99_us\":{},\"ms\":{},\"faults\":{},\"backend_faults\":{}}},\"error\":{error:?}}}",
            st.get_passes(),
            st.get_bytes(),
            st.get_ram_bytes(),
            st.get_dirty_pages(),
            st.get_dirty_rate(),
            st.get_bandwidth(),
            st.get_expected_downtime_ms(),
            st.get_downtime_ms(),
            st.get_total_ms(),
            st.get_forced(),
            st.get_postcopy_allowed(),
            st.get_postcopy_pages(),
            st.get_postcopy_requests(),
            st.get_fault_p50_micros(),
            st.get_fault_p99_micros(),
            st.get_postcopy_ms(),
            st.get_faults(),
            st.get_backend_faults()
        ));
    }
    let mut out = format!("phase: {phase}");
    if phase == "none" {
        return Ok(out);
    }
    out += &format!(
        "\nuri: {uri}\npasses: {}\nsent: {} MiB ({} MiB of RAM)\ndirty: {} pages, {} pages/s\nbandwidth: {} MiB/s\nexpected downtime: {} ms",
        st.get_passes(),
        st.get_bytes() >> 20,
        st.get_ram_bytes() >> 20,
        st.get_dirty_pages(),
        st.get_dirty_rate(),
        st.get_bandwidth() >> 20,
        st.get_expected_downtime_ms()
    );
    if phase == "completed" {
        out += &format!(
            "\ndowntime: {} ms\ntotal: {} ms",
            st.get_downtime_ms(),
            st.get_total_ms()
        );
    }
    if st.get_forced() {
        out += "\nforced: the pause came at --max-passes, over the downtime limit";
    }
    if st.get_postcopy_allowed() && matches!(phase.as_str(), "setup" | "pre-copy") {
        out += "\nwarning: post-copy is on: once it switches, the destination runs the VM while its pages still come, and losing either host or the channel loses the VM";
    }
    if st.get_postcopy_pages() > 0 || phase == "postcopy-active" {
        out += &format!(
            "\npost-copy: {} page(s) carried in {} ms, {} asked for (from a request to its page: p50 {} us, p99 {} us)",
            st.get_postcopy_pages(),
            st.get_postcopy_ms(),
            st.get_postcopy_requests(),
            st.get_fault_p50_micros(),
            st.get_fault_p99_micros()
        );
        if st.get_faults() > 0 {
            out += &format!(
                "\nfaults served: {} ({} of them device backends')",
                st.get_faults(),
                st.get_backend_faults()
            );
        }
    }
    if !error.is_empty() {
        out += &format!("\nerror: {error}");
    }
    Ok(out)
}
