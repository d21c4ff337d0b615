//! vmm-core: parse the command line, build and run the VM, map the outcome to an exit status.

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;
use vmm_core::config::RunArgs;

#[derive(Parser)]
#[command(
    name = "vmm-core",
    version,
    about = "The core process of a disaggregated KVM VMM"
)]
#[command(arg_required_else_help = true, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Print the seccomp allowlist of each of vmm-core's thread roles (a system call a line,
    /// with its reason), and exit (the same flag as every helper's).
    #[arg(long)]
    print_seccomp: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off, resets or panics.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// The same as --print-seccomp.
    #[command(hide = true)]
    PrintSeccomp,
}

fn main() -> ExitCode {
    // Before anything opens a descriptor: what an fd:N migration channel may name.
    vmm_core::migration::note_inherited_fds();
    vmm_sandbox::logging::init("vmm-core");
    // `run --config FILE`: the file's settings become flags ahead of the command line's.
    let command = Cli::command();
    let run = command.find_subcommand("run").expect("a run subcommand");
    let argv = match vmm_core::config::file::expand(std::env::args_os().collect(), run) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let matches = Cli::command().get_matches_from(argv);
    // What the command line (or a --config file) said of the VM's shape, as opposed to the
    // defaults: a live destination learns the rest from the source.
    let given = matches
        .subcommand_matches("run")
        .map(|m| {
            let said =
                |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            vmm_core::ShapeGiven {
                memory: said("memory"),
                cpus: said("cpus"),
            }
        })
        .unwrap_or_default();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let command = if cli.print_seccomp {
        Command::PrintSeccomp
    } else {
        cli.command.expect("clap requires a subcommand")
    };
    let args = match command {
        Command::Run(args) => {
            if let Some(level) = args
                .log_level
                .as_deref()
                .and_then(vmm_sandbox::logging::parse_level)
            {
                log::set_max_level(level);
            }
            *args
        }
        Command::PrintSeccomp => {
            use vmm_sandbox::seccomp::{base, describe, with_base};
            for (role, list) in [
                (
                    "the main thread (builds the VM at each boot, ends the helpers)",
                    with_base(vmm_core::vm::main_allowlist()),
                ),
                (
                    "each vCPU thread (on top of the main thread's, which it starts under)",
                    vmm_core::vcpu::allowlist(),
                ),
                ("the API thread", with_base(vmm_core::api::allowlist())),
                (
                    "the service threads (signals, console input, helpers' stderr)",
                    base(),
                ),
            ] {
                vmm_sandbox::seccomp::print(&format!("# {role}: {}\n", describe(&list)));
            }
            return ExitCode::SUCCESS;
        }
    };
    match vmm_core::run(args, given) {
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
