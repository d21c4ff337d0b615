//! chardevd: serves character-device backends (null, file, ring, Unix socket server) to
//! vmm-core over Cap'n Proto (proto/schema/chardevd.capnp). vmm-core starts it with a
//! connected control socket (`--control-fd`) and restarts it if it dies.

mod backend;

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use clap::Parser;
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use vmm_proto::chardevd_capnp::chardevd;

#[derive(Parser)]
#[command(
    name = "chardevd",
    version,
    about = "Console and character-device helper for vmm-core"
)]
struct Args {
    /// A connected control socket inherited from vmm-core; chardevd exits when it closes.
    #[arg(long, value_name = "FD")]
    control_fd: i32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    if unsafe { libc::fcntl(args.control_fd, libc::F_GETFD) } < 0 {
        eprintln!("chardevd: error: --control-fd {}: not an open descriptor; chardevd is started by vmm-core", args.control_fd);
        return ExitCode::from(2);
    }
    // SAFETY: the descriptor is open (checked above) and handed to us to own.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(args.control_fd) };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chardevd: error: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        if let Err(e) = stream.set_nonblocking(true) {
            eprintln!("chardevd: error: control socket: {e}");
            return ExitCode::from(1);
        }
        let stream = match tokio::net::UnixStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("chardevd: error: control socket: {e}");
                return ExitCode::from(1);
            }
        };
        let (reader, writer) = stream.into_split();
        let network = twoparty::VatNetwork::new(
            reader.compat(),
            writer.compat_write(),
            Side::Server,
            Default::default(),
        );
        let server = backend::Server::default();
        let sockets = server.sockets.clone();
        let client: chardevd::Client = capnp_rpc::new_client(server);
        let rpc = RpcSystem::new(Box::new(network), Some(client.client));
        // vmm-core closing the control socket (or dying) is how chardevd is told to end.
        let _ = rpc.await;
        for path in sockets.borrow().iter() {
            let _ = std::fs::remove_file(path);
        }
        ExitCode::SUCCESS
    })
}
