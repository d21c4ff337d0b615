//! vmm-core: parse the command line, build and run the VM, map the outcome to an exit status.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use vmm_core::{config::RunArgs, logger};

#[derive(Parser)]
#[command(
    name = "vmm-core",
    version,
    about = "The core process of a disaggregated KVM VMM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off, resets or panics.
    Run(RunArgs),
}

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    let Command::Run(args) = cli.command;
    match vmm_core::run(args) {
        Ok(outcome) => {
            log::info!("{outcome}");
            ExitCode::from(outcome.exit_status())
        }
        Err(e) => {
            eprintln!("error: {}", vmm_core::error_chain(&e));
            ExitCode::from(e.exit_status())
        }
    }
}
