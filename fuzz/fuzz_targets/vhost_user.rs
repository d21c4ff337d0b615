//! A frontend that wants to harm blockd: any sequence of vhost-user messages, with memfds and
//! eventfds attached where the input says, into blockd's device (`connection::Handler`, behind
//! the vhost crate's message handling, as blockd serves each frontend). Memory tables, vring
//! sizes and addresses, kicks, inflight areas, log bases and post-copy messages all come from
//! the input, and the queues' workers run on what they set up. blockd may refuse any message
//! (it then drops the frontend, as here), but never panic or fault.
#![no_main]

use blockd::backend::Backend;
use blockd::connection::Handler;
use blockd::disk::{Disk, Options, Policy};
use blockd::image::Format;
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use vhost::vhost_user::BackendReqHandler;

/// A 1 MiB raw image in a memfd, shared by every run.
fn disk() -> Arc<Disk> {
    static DISK: OnceLock<Arc<Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let file = std::fs::File::from(memfd("blk-fuzz-image"));
        file.set_len(1 << 20).expect("ftruncate");
        let options = Options {
            readonly: false,
            queues: 2,
            queue_size: 16,
            writethrough: false,
            serial: "fuzz".into(),
            format: Format::Raw,
            read_error: Policy::Report,
            write_error: Policy::Report,
        };
        Arc::new(Disk::new(file, options).expect("the image"))
    })
    .clone()
}

fn memfd(name: &str) -> OwnedFd {
    nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).expect("memfd")
}

/// The descriptors a message carries: bit 0 a memfd of guest RAM (its size and first bytes
/// from the input), bit 1 an eventfd, bit 2 a second eventfd.
fn fds(which: u8, size: u16, fill: &[u8]) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    if which & 1 != 0 {
        let fd = memfd("blk-fuzz-ram");
        let mut f = std::fs::File::from(fd);
        // 4 KiB to 256 MiB (sparse): a table may claim more than this holds.
        f.set_len(u64::from(size.max(1)) << 12).expect("ftruncate");
        f.write_all(fill).expect("fill");
        out.push(f.into());
    }
    for bit in [2u8, 4] {
        if which & bit != 0 {
            let e = nix::sys::eventfd::EventFd::from_value_and_flags(
                0,
                nix::sys::eventfd::EfdFlags::EFD_CLOEXEC
                    | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
            )
            .expect("eventfd");
            out.push(e.into());
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let disk = disk();
    let Ok(backend) = Backend::new("fuzz", disk) else {
        return;
    };
    let no_memory = vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new());
    let Ok(handler) = Handler::new("fuzz", backend, no_memory) else {
        return;
    };
    let handler = Arc::new(Mutex::new(handler));
    let (mut ours, theirs) = UnixStream::pair().expect("a socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    let mut requests = BackendReqHandler::from_stream(theirs, handler.clone());
    // Messages: request (1 byte), which descriptors (1), the memfd's size in pages (2),
    // payload length (1, in 4-byte words), the payload.
    let mut rest = data;
    let mut reply = [0u8; 4096];
    while rest.len() >= 5 {
        let (request, which) = (u32::from(rest[0] % 50), rest[1]);
        let size = u16::from_le_bytes([rest[2], rest[3]]);
        let len = (usize::from(rest[4]) * 4).min(rest.len() - 5);
        let payload = &rest[5..5 + len];
        rest = &rest[5 + len..];
        let mut msg = Vec::with_capacity(12 + len);
        msg.extend_from_slice(&request.to_le_bytes());
        // Version 1, and a reply asked for (REPLY_ACK) on odd requests.
        let flags: u32 = 1 | if request % 2 == 1 { 1 << 3 } else { 0 };
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(len as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        let fds = fds(which, size, &payload[..payload.len().min(64)]);
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs = if raw.is_empty() { &[][..] } else { &cmsg[..] };
        if sendmsg::<()>(
            ours.as_raw_fd(),
            &[IoSlice::new(&msg)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .is_err()
        {
            break;
        }
        drop(fds);
        if requests.handle_request().is_err() {
            break;
        }
        while ours.read(&mut reply).is_ok_and(|n| n > 0) {}
    }
    drop(requests);
    handler.lock().unwrap().stop();
});
