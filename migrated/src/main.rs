//! migrated's command line: `migrated serve --control-fd N` (vmm-core starts it so), and
//! `migrated inspect FILE`, which reads a snapshot file or a saved migration stream through
//! every check a restore makes and prints what it holds.

use clap::{Parser, Subcommand};
use migrated::stream::{Reader, Section};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "migrated: live migration and snapshots")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a snapshot file (or a saved stream) as a restore would, and print its contents.
    Inspect { file: PathBuf },
    /// Serve vmm-core's control connection (an inherited, connected Unix socket).
    Serve {
        #[arg(long)]
        control_fd: i32,
    },
}

fn main() {
    let args = Args::parse();
    log_init();
    let r = match args.command {
        Command::Inspect { file } => inspect(&file),
        Command::Serve { control_fd } => serve(control_fd),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn inspect(path: &std::path::Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut r =
        Reader::new(std::io::BufReader::new(f)).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{}: a VM with {}", path.display(), r.config());
    let (mut ram, mut zero) = (0u64, 0u64);
    let mut devices: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        match r
            .section()
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            Section::Ram { data, .. } => ram += data.len() as u64,
            Section::Zero { pages, .. } => zero += pages,
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

fn serve(fd: i32) -> Result<(), String> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--control-fd {fd}: not an open descriptor"));
    }
    // SAFETY: an inherited connected socket that nothing else in this process owns.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the RPC runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, migrated::server::serve(stream));
    Ok(())
}

fn log_init() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) && r.target().starts_with("migrated") {
                let line = format!(
                    "migrated: {}: {}\n",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}
