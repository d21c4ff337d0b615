//! blockd: serves a disk image to a guest over vhost-user-blk. The guest's requests and
//! completions go between the guest and blockd through shared memory and eventfds; vmm-core only
//! sets the device up.

mod backend;
mod disk;
mod engine;
mod image;
mod request;

use clap::Parser;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;

#[derive(Parser, Debug)]
#[command(version, about = "vhost-user-blk backend for vmm-core")]
struct Args {
    /// The disk image (raw).
    #[arg(long, value_name = "PATH", required_unless_present = "image_fd")]
    image: Option<PathBuf>,
    /// The disk image as an inherited file descriptor (vmm-core opens it).
    #[arg(long, value_name = "FD", conflicts_with = "image")]
    image_fd: Option<i32>,
    /// Listen for the vhost-user frontend on this Unix socket path.
    #[arg(long, value_name = "PATH", required_unless_present = "listen_fd")]
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
    /// Serve one frontend connection, then exit.
    #[arg(long)]
    once: bool,
}

fn main() {
    let args = Args::parse();
    log_init();
    if let Err(e) = run(args) {
        eprintln!("blockd: {e}");
        std::process::exit(1);
    }
}

fn log_init() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) && r.target().starts_with("blockd") {
                eprintln!(
                    "blockd: {}: {}",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let _ = log::set_logger(&LOGGER);
    let level = match std::env::var("BLOCKD_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    log::set_max_level(level);
}

fn run(args: Args) -> Result<(), String> {
    if !args.queue_size.is_power_of_two() || args.queue_size < 4 {
        return Err(format!(
            "--queue-size {}: must be a power of two, at least 4",
            args.queue_size
        ));
    }
    if args.serial.len() > request::ID_BYTES {
        return Err(format!(
            "--serial {}: longer than {} bytes; shorten it",
            args.serial,
            request::ID_BYTES
        ));
    }
    let file = match (&args.image, args.image_fd) {
        (Some(path), _) => std::fs::OpenOptions::new()
            .read(true)
            .write(!args.readonly)
            .custom_flags(if args.direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|e| {
                format!(
                    "--image {}: cannot open it ({e}); check the path, or pass --readonly for a read-only file",
                    path.display()
                )
            })?,
        (None, Some(fd)) => {
            check_fd(fd, "--image-fd")?;
            // SAFETY: the fd was inherited for us (checked open above) and nothing else owns it.
            unsafe { File::from_raw_fd(fd) }
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let options = disk::Options {
        readonly: args.readonly,
        queues: args.queues,
        queue_size: args.queue_size,
        writethrough: args.writethrough,
        serial: args.serial.clone(),
        format: args.format,
    };
    let disk = Arc::new(disk::Disk::new(file, options).map_err(|e| format!("the image: {e}"))?);
    let mut listener = match (&args.socket, args.listen_fd) {
        (Some(path), _) => Listener::new(path, true)
            .map_err(|e| format!("--socket {}: cannot listen there ({e})", path.display()))?,
        (None, Some(fd)) => {
            check_fd(fd, "--listen-fd")?;
            // SAFETY: an inherited listening socket that nothing else in this process owns.
            unsafe { Listener::from_raw_fd(fd) }
        }
        (None, None) => unreachable!("clap requires one"),
    };
    stop_on_signals(disk.clone());
    log::info!(
        "serving {} bytes{}, {} queue(s)",
        disk.size,
        if args.readonly { " read-only" } else { "" },
        args.queues
    );
    loop {
        let backend = backend::Backend::new(disk.clone());
        let mut daemon =
            VhostUserDaemon::new("blockd-vhost".to_string(), backend.clone(), no_memory())
                .map_err(|e| format!("cannot start the vhost-user device: {e}"))?;
        // Each queue's worker also waits for its io_uring's completions.
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.engine_fd(q) {
                handler
                    .register_listener(
                        fd,
                        vmm_sys_util::epoll::EventSet::IN,
                        backend.engine_event_id(),
                    )
                    .map_err(|e| format!("queue {q}: cannot watch its io_uring: {e}"))?;
            }
        }
        daemon
            .start(&mut listener)
            .map_err(|e| format!("cannot accept a frontend: {e}"))?;
        log::info!("frontend connected");
        let r = daemon.wait();
        backend.stop_workers();
        drop(daemon);
        // Whatever the guest left in caches (qcow2 metadata above all) goes to the image now.
        if !disk.options.readonly {
            if let Err(e) = disk.flush() {
                log::warn!("cannot flush the image after the frontend left: {e}");
            }
        }
        match r {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("frontend connection ended: {e}"),
        }
        if args.once {
            return Ok(());
        }
    }
}

/// An empty guest memory until the frontend sends its table.
fn no_memory() -> backend::Memory {
    vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new())
}

/// SIGTERM and SIGINT flush the image and end blockd with status 0 (systemd's and vmm-core's
/// way to stop it). The signals are blocked here, before any other thread exists, and taken by
/// one thread with sigwait.
fn stop_on_signals(disk: Arc<disk::Disk>) {
    // SAFETY: sigset manipulation on a local set, then masking this (the only) thread's signals.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on a valid set; sig receives the signal number.
        unsafe { libc::sigwait(&set, &mut sig) };
        if !disk.options.readonly {
            if let Err(e) = disk.flush() {
                log::warn!("cannot flush the image before exiting: {e}");
                std::process::exit(1);
            }
        }
        log::info!("stopping (signal {sig}); the image is flushed");
        std::process::exit(0);
    });
}

fn check_fd(fd: i32, what: &str) -> Result<(), String> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "{what} {fd}: not an open descriptor of this process"
        ));
    }
    Ok(())
}
