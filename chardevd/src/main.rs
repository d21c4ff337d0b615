//! chardevd: serves character-device backends (stdio, pty, file, ring, Unix socket server and
//! client, null) to vmm-core over Cap'n Proto (proto/schema/chardevd.capnp). vmm-core starts it
//! with a connected control socket (`--control-fd`) and restarts it if it dies, or connects to
//! one that runs already (`--listen`, or a systemd socket).

mod backend;
mod rng;

use clap::Parser;
use std::process::ExitCode;
use vmm_proto::chardevd_capnp::chardevd;

#[derive(Parser)]
#[command(
    name = "chardevd",
    version,
    about = "Console and character-device helper for vmm-core"
)]
struct Args {
    /// A connected control socket inherited from vmm-core; chardevd exits when it closes.
    #[arg(long, value_name = "FD", conflicts_with = "listen")]
    control_fd: Option<i32>,
    /// Serve every vmm-core that connects to this socket (as under systemd), until killed.
    /// With neither option, a socket that systemd passes (LISTEN_FDS) is used.
    #[arg(long, value_name = "PATH")]
    listen: Option<std::path::PathBuf>,
    #[command(flatten)]
    sandbox: vmm_sandbox::Flags,
    /// Print the seccomp allowlist, a system call a line with its reason, and exit.
    #[arg(long)]
    print_seccomp: bool,
}

/// chardevd's system calls beyond the common base.
fn allowlist() -> Vec<vmm_sandbox::seccomp::Allow> {
    use vmm_sandbox::seccomp::allow;
    vec![
        allow("pwrite64", "file backends written at an offset"),
        allow("lseek", "file backends in append mode"),
        allow("fstat", "the type of a received descriptor"),
        allow(
            "newfstatat",
            "the type of a received descriptor (glibc's fstat)",
        ),
        allow("pipe2", "tokio's signal pipe"),
    ]
}

use vmm_sandbox::control::Control;

/// Serves one vmm-core connection until it closes.
async fn serve(stream: std::os::unix::net::UnixStream) {
    let Ok(stream) = vmm_proto::rpc::tokio_stream(stream) else {
        return;
    };
    let side = match vmm_proto::rpc::accept_side_channel(&stream).await {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("refused a control connection: {e}; only vmm-core speaks this protocol (see proto/schema/chardevd.capnp)");
            return;
        }
    };
    let server = match backend::Server::new(side) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("refused a control connection: its side channel: {e}");
            return;
        }
    };
    let client: chardevd::Client = capnp_rpc::new_client(server);
    let _ = vmm_proto::rpc::server(stream, client.client).await;
}

fn main() -> ExitCode {
    let args = Args::parse();
    vmm_sandbox::logging::init("chardevd");
    if args.print_seccomp {
        let list = vmm_sandbox::seccomp::with_base(allowlist());
        vmm_sandbox::seccomp::print(&vmm_sandbox::seccomp::describe(&list));
        return ExitCode::SUCCESS;
    }
    let control =
        match vmm_sandbox::control::control("chardevd", args.control_fd, args.listen.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}");
                return ExitCode::from(2);
            }
        };
    if !args.sandbox.no_sandbox {
        let jail = vmm_sandbox::jail::Jail {
            uid: args.sandbox.uid,
            gid: args.sandbox.gid,
            keep: control.jail_keep(),
            ..Default::default()
        };
        // From here on chardevd runs sandboxed (in the child, if it forked).
        match vmm_sandbox::confine("chardevd", &jail, allowlist(), args.sandbox.seccomp) {
            Ok(line) => log::info!("{line}"),
            Err(e) => {
                log::error!("cannot enter its sandbox: {e}; --no-sandbox runs it without one (for debugging)");
                return ExitCode::from(1);
            }
        }
    }
    let no_sandbox = args.sandbox.no_sandbox;
    let ran = vmm_proto::rpc::run_local(async move {
        let mut listen_path: Option<std::path::PathBuf> = None;
        // Handlers first, before anyone is told chardevd is ready: as PID 1 of its own PID
        // namespace, a signal with no handler would not reach it at all.
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        let work = async {
            match control {
                Control::Connection(stream) => {
                    // vmm-core closing the control socket (or dying) is how chardevd is told to
                    // end.
                    serve(stream).await;
                    ExitCode::SUCCESS
                }
                Control::Listener(listener, path) => {
                    listen_path = path;
                    if listener.set_nonblocking(true).is_err() {
                        return ExitCode::from(1);
                    }
                    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                        return ExitCode::from(1);
                    };
                    log::info!("listening for vmm-core");
                    // Under systemd (Type=notify): it may start what depends on us now.
                    if let Err(e) = vmm_sandbox::systemd::notify("READY=1") {
                        log::warn!("cannot tell systemd it is ready: {e}");
                    }
                    while let Ok((stream, _)) = listener.accept().await {
                        let Ok(stream) = stream.into_std() else {
                            continue;
                        };
                        tokio::task::spawn_local(serve(stream));
                    }
                    ExitCode::from(1)
                }
            }
        };
        let stop = async {
            match signals {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                    }
                }
                _ => std::future::pending().await,
            }
        };
        let code = tokio::select! {
            code = work => code,
            sig = stop => {
                // A clean stop: say so, remove the socket we listen on, exit 0.
                let _ = vmm_sandbox::systemd::notify("STOPPING=1");
                log::info!("{sig}: stopping");
                ExitCode::SUCCESS
            }
        };
        // Sandboxed, the path is out of reach (see vmm_sandbox::control::Control).
        if let Some(p) = listen_path.filter(|_| no_sandbox) {
            let _ = std::fs::remove_file(p);
        }
        code
    });
    ran.unwrap_or_else(|e| {
        log::error!("cannot start: {e}");
        ExitCode::from(1)
    })
}
