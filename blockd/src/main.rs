//! blockd: serves a disk image to a guest over vhost-user-blk. The guest's requests and
//! completions go between the guest and blockd through shared memory and eventfds; vmm-core only
//! sets the device up.

use blockd::*;

use anyhow::Context;
use clap::Parser;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use vhost::vhost_user::Listener;
use vmm_sandbox::control::{control, inherited, Control};

#[derive(Parser, Debug)]
#[command(version, about = "vhost-user-blk backend for vmm-core")]
struct Args {
    /// Serve the control API (proto/schema/blockd.capnp) on this inherited, connected socket,
    /// as vmm-core starts blockd; exports are added over it. blockd ends when it closes.
    #[arg(long, value_name = "FD", conflicts_with_all = ["image", "image_fd", "listen"])]
    control_fd: Option<i32>,
    /// Serve the control API on this Unix socket path (mode 0600), or on the socket systemd
    /// passes (LISTEN_FDS) when the path is "systemd".
    #[arg(long, value_name = "PATH", conflicts_with_all = ["image", "image_fd"])]
    listen: Option<PathBuf>,
    /// One export, from the command line: the disk image.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["image_fd", "control_fd", "listen", "print_seccomp"])]
    image: Option<PathBuf>,
    /// The disk image as an inherited file descriptor (vmm-core opens it).
    #[arg(long, value_name = "FD", conflicts_with = "image")]
    image_fd: Option<i32>,
    /// Listen for the vhost-user frontend on this Unix socket path.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["listen_fd", "control_fd", "listen", "print_seccomp"])]
    socket: Option<PathBuf>,
    /// Listen on an inherited, bound and listening Unix socket.
    #[arg(long, value_name = "FD", conflicts_with = "socket")]
    listen_fd: Option<i32>,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO); writes fail with IOERR.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues (one worker thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Largest queue size the guest may choose (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// The image format: raw or qcow2.
    #[arg(long, default_value = "raw")]
    format: image::Format,
    /// Open --image with O_DIRECT (bypass the host page cache, as QEMU's cache.direct=on).
    #[arg(long)]
    direct: bool,
    /// Make every write durable before it completes, whatever the guest's cache setting.
    #[arg(long)]
    writethrough: bool,
    /// The disk's serial number (GET_ID), at most 20 bytes.
    #[arg(long, default_value = "blockd")]
    serial: String,
    /// What an I/O error on a read does: report (the guest gets IOERR), ignore, stop (hold
    /// it until resumed over RPC), enospc (stop on ENOSPC only). QEMU's rerror.
    #[arg(long, value_name = "POLICY", default_value = "report")]
    read_error: disk::Policy,
    /// The same for writes and flushes (QEMU's werror).
    #[arg(long, value_name = "POLICY", default_value = "report")]
    write_error: disk::Policy,
    /// Serve one frontend connection, then exit.
    #[arg(long)]
    once: bool,
    /// Record every request the export answers into this log (appended; made if missing), as
    /// vmm-core's --record does for its disks. A new log of an --image with no backing file
    /// starts from a copy of it, PATH.base (reads of blocks not written since are logged as
    /// checksums).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["control_fd", "listen"])]
    record: Option<PathBuf>,
    #[command(flatten)]
    sandbox: vmm_sandbox::Flags,
    /// Print the seccomp allowlist, a system call a line with its reason, and exit.
    #[arg(long)]
    print_seccomp: bool,
    /// Open /dev/userfaultfd at start (before the sandbox), so that a frontend other than
    /// vmm-core can take blockd into post-copy (vhost-user's POSTCOPY_ADVISE). vmm-core hands
    /// its blockd the device when the VM is incoming, so it needs no flag; without either,
    /// blockd holds no way to make a userfaultfd.
    #[arg(long)]
    userfaultfd: bool,
}

/// blockd's system calls beyond the common base.
fn allowlist() -> Vec<vmm_sandbox::seccomp::Allow> {
    use vmm_sandbox::seccomp::{allow, allow_if, Cond};
    vec![
        allow_if(
            "ioctl",
            "userfaultfd ioctls (type 0xAA) only: a post-copy destination's userfaultfd, made from /dev/userfaultfd, and its registrations",
            vec![vec![Cond::Masked(1, 0xff00, 0xaa00)]],
        ),
        allow("pread64", "image reads"),
        allow("pwrite64", "image writes"),
        allow("preadv", "image reads into guest buffers"),
        allow("pwritev", "image writes from guest buffers"),
        allow("preadv2", "image reads into guest buffers"),
        allow(
            "pwritev2",
            "image writes (RWF_DSYNC when the write cache is off)",
        ),
        allow("fdatasync", "FLUSH, and writes with the cache off"),
        allow("fsync", "qcow2 metadata made durable"),
        allow(
            "fallocate",
            "discard and write-zeroes (punch hole, zero range)",
        ),
        allow("lseek", "the image's size (a block device's end)"),
        allow_if(
            "ioctl",
            "BLKSSZGET: a block device's logical block size",
            vec![vec![Cond::Eq(1, 0x1268)]],
        ),
        allow("fstat", "the image's size and flags"),
        allow("newfstatat", "the image's size (glibc's fstat)"),
        allow("statx", "the image's size (std's metadata)"),
        allow(
            "fstatfs",
            "the image's filesystem (imago aligns qcow2 I/O to it)",
        ),
        allow("io_uring_setup", "the I/O engine: one ring per queue"),
        allow("io_uring_enter", "the I/O engine: submit and reap"),
        allow(
            "io_uring_register",
            "the I/O engine: its completion eventfd",
        ),
        allow("pipe2", "tokio's signal pipe"),
        allow(
            "memfd_create",
            "the inflight area a frontend asks for (GET_INFLIGHT_FD)",
        ),
        allow("ftruncate", "sizing the inflight area"),
        allow("timerfd_create", "each queue's throttle timer"),
        allow(
            "timerfd_settime",
            "arming it for when throttled requests may go",
        ),
    ]
}

/// Enters the sandbox, keeping only `keep` (and stdio) open.
fn confine(args: &Args, mut keep: Vec<i32>) -> anyhow::Result<()> {
    // Post-copy needs a userfaultfd that also waits on the kernel's faults, which an
    // unprivileged process can only make from /dev/userfaultfd: opened now when asked
    // (--userfaultfd), while blockd may. Otherwise only vmm-core hands it over, for an
    // incoming VM: a sandboxed blockd holds the device only when post-copy may come.
    let dev = if args.userfaultfd {
        let d = vmm_sandbox::uffd::Device::open();
        if d.is_none() {
            anyhow::bail!(
                "--userfaultfd: cannot open /dev/userfaultfd (it needs root or access to the device; vmm-core hands it over by itself)"
            );
        }
        d
    } else {
        None
    };
    if let Some(d) = &dev {
        keep.push(d.raw_fd());
    }
    if dev.is_some() {
        *connection::UFFD_DEVICE.lock().unwrap() = dev;
    }
    if args.sandbox.no_sandbox {
        return Ok(());
    }
    let jail = vmm_sandbox::jail::Jail {
        uid: args.sandbox.uid,
        gid: args.sandbox.gid,
        keep,
        // Guest RAM is mapped here, so the address space is not bounded; the descriptors
        // (per queue: kick, call, ring, epoll) are many.
        max_fds: 4096,
        max_address_space: u64::MAX,
        ..Default::default()
    };
    let line =
        vmm_sandbox::confine("blockd", &jail, allowlist(), args.sandbox.seccomp).map_err(|e| {
            anyhow::anyhow!(
                "cannot enter its sandbox: {e}; --no-sandbox runs it without one (for debugging)"
            )
        })?;
    log::info!("{line}");
    Ok(())
}

fn main() {
    let args = Args::parse();
    vmm_sandbox::logging::init("blockd");
    if let Err(e) = run(args) {
        eprintln!("blockd: error: {e:#}");
        std::process::exit(1);
    }
}

/// `--record PATH`: the log, opened for appending before the sandbox, and (a new log of a
/// flat image, of `size` bytes) the base copy made beside it: reads are then logged as
/// checksums.
fn open_recording<'a>(
    path: &'a std::path::Path,
    image: Option<&std::path::Path>,
    flat: bool,
    size: u64,
) -> anyhow::Result<(&'a std::path::Path, File, Option<u64>)> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("--record {}: cannot open it ({e})", path.display()))?;
    let base = match (image, flat) {
        (Some(image), true) => vmm_proto::image::base_copy(image, path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "--record {}: cannot copy the image beside it as {} ({e})",
                    path.display(),
                    vmm_proto::image::base_of(path).display()
                )
            })?
            .map(|b| {
                log::info!("recording on a base copy of the image: {}", b.display());
                size
            }),
        _ => None,
    };
    Ok((path, file, base))
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.print_seccomp {
        let list = vmm_sandbox::seccomp::with_base(allowlist());
        vmm_sandbox::seccomp::print(&vmm_sandbox::seccomp::describe(&list));
        return Ok(());
    }
    if !args.queue_size.is_power_of_two() || args.queue_size < 4 {
        anyhow::bail!(
            "--queue-size {}: must be a power of two, at least 4",
            args.queue_size
        );
    }
    if args.serial.len() > request::ID_BYTES {
        anyhow::bail!(
            "--serial {}: longer than {} bytes; shorten it",
            args.serial,
            request::ID_BYTES
        );
    }
    if args.control_fd.is_some() || args.listen.is_some() {
        return control_mode(&args);
    }
    let file = match (&args.image, args.image_fd) {
        (Some(path), _) => {
            let meta = std::fs::metadata(path).map_err(|e| {
                anyhow::anyhow!(
                    "--image {}: cannot open it ({e}); check the path",
                    path.display()
                )
            })?;
            vmm_proto::image::check(&meta)
                .map_err(|e| anyhow::anyhow!("--image {}: {e}", path.display()))?;
            std::fs::OpenOptions::new()
            .read(true)
            .write(!args.readonly)
            .custom_flags(if args.direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "--image {}: cannot open it ({e}); check the path, or pass --readonly for a read-only file",
                    path.display()
                )
            })?
        }
        (None, Some(fd)) => File::from(inherited(fd, "--image-fd", "blockd")?),
        (None, None) => unreachable!("clap requires one"),
    };
    // A qcow2 image's backing chain, opened now (the sandbox opens no path), read-only.
    let mut backing = Vec::new();
    if let (Some(path), image::Format::Qcow2) = (&args.image, args.format) {
        let chain = vmm_proto::image::check_qcow2(path, &file)
            .map_err(|e| anyhow::anyhow!("--image {}: {e}", path.display()))?;
        for layer in chain {
            let format = if layer.format == "qcow2" {
                image::Format::Qcow2
            } else {
                image::Format::Raw
            };
            backing.push((layer.file, format));
        }
    }
    let backing_fds: Vec<i32> = {
        use std::os::fd::AsRawFd;
        backing.iter().map(|(f, _)| f.as_raw_fd()).collect()
    };
    let options = disk::Options {
        readonly: args.readonly,
        queues: args.queues,
        queue_size: args.queue_size,
        writethrough: args.writethrough,
        serial: args.serial.clone(),
        format: args.format,
        read_error: args.read_error,
        write_error: args.write_error,
    };
    let disk = Arc::new(
        disk::Disk::with_backing(file, options, backing)
            .map_err(|e| anyhow::anyhow!("the image: {e}"))?,
    );
    if disk.looks_like_qcow2 {
        log::warn!("the image starts with the qcow2 magic but is served as raw, as asked; if it is qcow2, pass --format qcow2");
    }
    let listener = match (&args.socket, args.listen_fd) {
        (Some(path), _) => bind_listener(path).map_err(|e| {
            anyhow::anyhow!("--socket {}: cannot listen there ({e})", path.display())
        })?,
        (None, Some(fd)) => Listener::from(std::os::unix::net::UnixListener::from(inherited(
            fd,
            "--listen-fd",
            "blockd",
        )?)),
        (None, None) => unreachable!("clap requires one"),
    };
    let mut keep = {
        use std::os::fd::AsRawFd;
        vec![disk.raw_fd(), listener.as_raw_fd()]
    };
    let flat = backing_fds.is_empty();
    keep.extend(backing_fds);
    let record = args
        .record
        .as_deref()
        .map(|path| open_recording(path, args.image.as_deref(), flat, disk.size()))
        .transpose()?;
    if let Some((_, file, _)) = &record {
        use std::os::fd::AsRawFd;
        keep.push(file.as_raw_fd());
    }
    confine(&args, keep)?;
    // Before any thread starts: they inherit the blocked signals that sigwait takes.
    stop_on_signals();
    // The recording begins in the sandboxed process.
    if let Some((path, file, base)) = record {
        let rec = replay::Recording::to_record(file, base)
            .map_err(|e| anyhow::anyhow!("--record {}: {e}", path.display()))?;
        let _ = disk.recording.set(rec);
    }
    let image = args
        .image
        .as_ref()
        .map_or_else(|| "(inherited)".to_string(), |p| p.display().to_string());
    let socket = args
        .socket
        .as_ref()
        .map_or_else(|| "(inherited)".to_string(), |p| p.display().to_string());
    let export = exports::Export::start("disk", &image, &socket, disk, listener, args.once)
        .map_err(|e| anyhow::anyhow!("cannot start the export's thread: {e}"))?;
    // The export runs until the process ends (or, with --once, until its frontend leaves).
    export.join();
    Ok(())
}

/// Serves the control API: exports come and go over RPC.
fn control_mode(args: &Args) -> anyhow::Result<()> {
    let control = control("blockd", args.control_fd, args.listen.as_deref())?;
    {
        if let Control::Listener(l, _) = &control {
            l.set_nonblocking(true).context("--listen")?;
        }
        confine(args, control.jail_keep())?;
    }
    stop_on_signals();
    let exports: rpc::Exports = Default::default();
    let queue_size = args.queue_size;
    let listener = match control {
        Control::Connection(stream) => {
            vmm_proto::rpc::run_local(rpc::serve(stream, exports.clone(), queue_size))
                .context("cannot start the RPC runtime")?;
            // vmm-core is gone: stop every export (each flushes its image).
            exports.borrow_mut().clear();
            return Ok(());
        }
        Control::Listener(l, _) => l,
    };
    let _ = vmm_sandbox::systemd::notify("READY=1");
    vmm_proto::rpc::run_local(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("cannot use the control socket: {e}");
                return;
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(std) = stream.into_std() else { continue };
                    let _ = std.set_nonblocking(false);
                    tokio::task::spawn_local(rpc::serve(std, exports.clone(), queue_size));
                }
                Err(e) => log::warn!("control socket: {e}"),
            }
        }
    })
    .context("cannot start the RPC runtime")?;
    Ok(())
}

/// SIGTERM and SIGINT flush the image and end blockd with status 0 (systemd's and vmm-core's
/// way to stop it). The signals are blocked here, before any other thread exists, and taken by
/// one thread with sigwait.
fn stop_on_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    extern "C" fn unused(_: libc::c_int) {}
    let handled = SigAction::new(
        SigHandler::Handler(unused),
        SaFlags::empty(),
        SigSet::empty(),
    );
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: a handler is installed only so that the signals count as handled: as PID 1
        // of its own PID namespace, blockd would otherwise never receive them. They stay
        // blocked in every thread and are taken by sigwait, so the handler (which does
        // nothing) never runs.
        let _ = unsafe { sigaction(sig, &handled) };
        set.add(sig);
    }
    if let Err(e) = set.thread_block() {
        log::warn!("cannot block SIGTERM and SIGINT ({e}); they would end blockd unflushed");
        return;
    }
    std::thread::spawn(move || {
        let sig = set.wait().map_or(0, |s| s as i32);
        if let Err(e) = disk::flush_all() {
            log::warn!("cannot flush an image before exiting: {e}");
            std::process::exit(1);
        }
        log::info!("stopping (signal {sig}); the images are flushed");
        std::process::exit(0);
    });
}
