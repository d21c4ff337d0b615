//! migrated's command line: `migrated serve --control-fd N` (vmm-core starts it so) or
//! `migrated serve --listen PATH` / socket-activated (vmm-core run --migrated-socket connects; it
//! enters its sandbox before it serves), `migrated inspect FILE`, which reads a snapshot file
//! or a saved migration stream through every check a restore makes and prints what it holds,
//! and `migrated --print-seccomp`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use migrated::stream::{Reader, Section};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "migrated: live migration and snapshots")]
#[command(arg_required_else_help = true, args_conflicts_with_subcommands = true)]
struct Args {
    /// Print the seccomp allowlist of `serve`, a system call a line with its reason, and exit
    /// (the same flag as every other binary of the project).
    #[arg(long)]
    print_seccomp: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a snapshot file (or a saved stream) as a restore would, and print its contents.
    Inspect { file: PathBuf },
    /// Serve vmm-core, sandboxed: its control connection (an inherited, connected Unix
    /// socket), or every vmm-core that connects to a socket (`--listen PATH`, or, with
    /// neither, the one systemd passes: socket activation, `vmm-core run --migrated-socket`).
    Serve {
        #[arg(long, value_name = "FD", conflicts_with = "listen")]
        control_fd: Option<i32>,
        #[arg(long, value_name = "PATH")]
        listen: Option<PathBuf>,
        #[command(flatten)]
        sandbox: vmm_sandbox::Flags,
    },
    /// The same as --print-seccomp.
    #[command(hide = true)]
    PrintSeccomp,
}

/// migrated's system calls beyond the common base. It opens nothing: vmm-core hands it the
/// guest RAM memfd and each channel's descriptor.
fn allowlist() -> Vec<vmm_sandbox::seccomp::Allow> {
    use vmm_sandbox::seccomp::{allow, allow_if, Cond};
    vec![
        allow(
            "pwrite64",
            "the destination writes received pages into the memfd",
        ),
        allow(
            "fallocate",
            "the destination zeroes pages by punching holes in the memfd",
        ),
        allow(
            "lseek",
            "the source skips the memfd's holes (SEEK_DATA, SEEK_HOLE)",
        ),
        allow("fsync", "a snapshot file is made durable before it is done"),
        allow(
            "pread64",
            "a lazy restore reads the snapshot's sections where they lie",
        ),
        allow("fstat", "the memfd's size"),
        allow("newfstatat", "the memfd's size (glibc's fstat)"),
        allow("statx", "the memfd's size (std's metadata)"),
        allow_if(
            "setsockopt",
            "TCP_NODELAY on a migration connection, and post-copy's small SO_SNDBUF/SO_RCVBUF, only",
            vec![
                vec![
                    Cond::Eq(1, libc::IPPROTO_TCP as u64),
                    Cond::Eq(2, libc::TCP_NODELAY as u64),
                ],
                vec![
                    Cond::Eq(1, libc::SOL_SOCKET as u64),
                    Cond::Eq(2, libc::SO_SNDBUF as u64),
                ],
                vec![
                    Cond::Eq(1, libc::SOL_SOCKET as u64),
                    Cond::Eq(2, libc::SO_RCVBUF as u64),
                ],
            ],
        ),
        allow("pipe2", "tokio's signal pipe"),
        allow(
            "getsockname",
            "a channel socket's address family (unix or tcp)",
        ),
        allow_if(
            "ioctl",
            "userfaultfd ioctls (type 0xAA) only: post-copy places pages and wakes the threads that wait for them",
            vec![vec![Cond::Masked(1, 0xff00, 0xaa00)]],
        ),
    ]
}

fn main() {
    let args = Args::parse();
    vmm_sandbox::logging::init("migrated");
    let command = if args.print_seccomp {
        Command::PrintSeccomp
    } else {
        args.command.expect("clap requires a subcommand")
    };
    let r = match command {
        Command::Inspect { file } => inspect(&file),
        Command::Serve {
            control_fd,
            listen,
            sandbox,
        } => serve(control_fd, listen, &sandbox),
        Command::PrintSeccomp => {
            let list = vmm_sandbox::seccomp::with_base(allowlist());
            vmm_sandbox::seccomp::print(&vmm_sandbox::seccomp::describe(&list));
            Ok(())
        }
    };
    if let Err(e) = r {
        eprintln!("migrated: error: {e:#}");
        std::process::exit(2);
    }
}

fn inspect(path: &std::path::Path) -> anyhow::Result<()> {
    let at = || path.display().to_string();
    let f = std::fs::File::open(path).with_context(at)?;
    let mut r = Reader::new(std::io::BufReader::new(f)).with_context(at)?;
    println!("{}: a VM with {}", path.display(), r.config());
    let (mut ram, mut zero) = (0u64, 0u64);
    let mut devices: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        match r.section().with_context(at)? {
            Section::Ram { data, .. } => ram += data.len() as u64,
            Section::Zero { pages, .. } => zero += pages,
            Section::Pass(_) | Section::Postcopy(_) => {}
            Section::Workset(w) => {
                let n: u32 = w.iter().map(|w| w.count_ones()).sum();
                println!("working set: {n} page(s) (a lazy restore loads them first)");
            }
            Section::Device { name, state } => {
                devices.insert(name.to_string(), state.len());
            }
            Section::End => break,
        }
    }
    println!(
        "RAM: {} MiB of non-zero pages; {zero} page(s) sent as zero",
        ram >> 20
    );
    for (name, len) in devices {
        println!("device {name}: {len} bytes of state");
    }
    println!("{} bytes, every checksum good, complete", r.position());
    Ok(())
}

use vmm_sandbox::control::Control;

fn serve(
    control_fd: Option<i32>,
    listen: Option<PathBuf>,
    sandbox: &vmm_sandbox::Flags,
) -> anyhow::Result<()> {
    let control = vmm_sandbox::control::control("migrated", control_fd, listen.as_deref())?;
    if !sandbox.no_sandbox {
        let jail = vmm_sandbox::jail::Jail {
            uid: sandbox.uid,
            gid: sandbox.gid,
            keep: control.jail_keep(),
            // Guest RAM is mapped here (read-only), so the address space is not bounded.
            max_address_space: u64::MAX,
            ..Default::default()
        };
        // From here on migrated runs sandboxed (in the child, if it forked).
        let line = vmm_sandbox::confine("migrated", &jail, allowlist(), sandbox.seccomp).context(
            "cannot enter its sandbox (--no-sandbox runs it without one, for debugging)",
        )?;
        log::info!("{line}");
    }
    let no_sandbox = sandbox.no_sandbox;
    vmm_proto::rpc::run_local(async move {
        let (listener, path) = match control {
            // vmm-core closing the control socket (or dying) is how migrated is told to end.
            Control::Connection(stream) => {
                migrated::server::serve(stream).await;
                return Ok(());
            }
            Control::Listener(l, path) => (l, path),
        };
        // Handlers first: as PID 1 of its own PID namespace, a signal with no handler would
        // not reach it at all.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("a SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("a SIGINT handler")?;
        listener
            .set_nonblocking(true)
            .context("the control socket")?;
        let listener =
            tokio::net::UnixListener::from_std(listener).context("the control socket")?;
        log::info!("listening for vmm-core");
        // Under systemd (Type=notify): what depends on migrated may start now.
        if let Err(e) = vmm_sandbox::systemd::notify("READY=1") {
            log::warn!("cannot tell systemd it is ready: {e}");
        }
        let sig = loop {
            tokio::select! {
                got = listener.accept() => {
                    if let Ok(stream) = got.and_then(|(s, _)| s.into_std()) {
                        tokio::task::spawn_local(migrated::server::serve(stream));
                    }
                }
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
            }
        };
        let _ = vmm_sandbox::systemd::notify("STOPPING=1");
        log::info!("{sig}: stopping");
        // Sandboxed, the path is out of reach (see vmm_sandbox::control::Control).
        if let Some(p) = path.filter(|_| no_sandbox) {
            let _ = std::fs::remove_file(p);
        }
        Ok::<(), anyhow::Error>(())
    })
    .context("cannot start the RPC runtime")?
}
