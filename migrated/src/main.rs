//! migrated's command line. Built so far: `migrated inspect FILE`, which reads a snapshot file
//! or a saved migration stream through every check a restore makes and prints what it holds.

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
}

fn main() {
    let args = Args::parse();
    let r = match args.command {
        Command::Inspect { file } => inspect(&file),
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
