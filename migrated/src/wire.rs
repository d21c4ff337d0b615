//! What the two ends of a migration say to each other besides the stream itself (the
//! destination's answers), and why a transfer fails: shared by the pre-copy and snapshot
//! code (server.rs) and post-copy's (postcopy.rs).

use crate::channel::{self, Uri};
use crate::stream::StreamError;
use crate::tls;
use std::io::{Read, Write};
use vmm_proto::rpc::SideChannelError;

/// The device-state section's name.
pub const VM_SECTION: &str = "vm";

/// The destination's answer after the end marker: it runs the VM, or why it cannot (REFUSED,
/// a u16 length and the reason, which may also come instead of a pass's acknowledgement).
pub(crate) const STARTED: u8 = 1;
pub(crate) const REFUSED: u8 = 0;
/// The destination has every page of a pass (ACKED, then the pass number as a u32).
pub(crate) const ACKED: u8 = 2;

// Post-copy's, after the switch:
/// The destination asks for a page run (REQUEST, then gpa u64 and pages u32).
pub const REQUEST: u8 = 3;
/// The destination has every page and the stream's end passed its checks.
pub const COMPLETE: u8 = 4;
/// A destination resuming post-copy on a new channel: RECOVER, a u32 word count, and the
/// bitmap of the pages it has (the source sends the others it was to send).
pub const RECOVER: u8 = 5;

/// Why a migration, snapshot or restore failed here: one line that names the channel.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    SideChannel(#[from] SideChannelError),
    #[error("{0}")]
    Ram(#[from] crate::ram::RamError),
    #[error("{0}")]
    Channel(#[from] channel::ChannelError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("no migration is open")]
    NotOpen,
    #[error("{}: {}", .0, transfer_failed(.1))]
    Transfer(Uri, #[source] std::io::Error),
    #[error("guest RAM: {0}")]
    Holes(#[source] std::io::Error),
    #[error("{0}: cannot send the header ({1})")]
    Header(Uri, #[source] std::io::Error),
    #[error("{0}: cannot sync it ({1})")]
    Sync(Uri, #[source] std::io::Error),
    #[error("{0}: the destination refused the VM: {1}")]
    Refused(Uri, String),
    #[error("{0}: the peer answered, but not as a migration destination; point the migration at the address given to the destination's `vmm-core run --incoming` (not its API socket)")]
    NotADestination(Uri),
    #[error("{0}: the destination answered pass {1} with {2:#x} (pass {3}); it is not a migrated of this build")]
    BadAck(Uri, u32, u8, u32),
    #[error(
        "{0}: the destination answered with TLS; it may expect TLS (tls-creds): pass --tls-creds"
    )]
    ExpectsTls(Uri),
    #[error("{0}: cannot resume post-copy: {1}")]
    Recover(Uri, String),
    #[error("{0}: post-copy needs a live channel, not a snapshot file")]
    NotLive(Uri),
    #[error("{0}: no source connection was peeked at (peek comes first)")]
    NotPeeked(Uri),
    #[error("{0}: the destination did not confirm it has the VM ({1}); it is not running it")]
    Unconfirmed(Uri, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Receive(Uri, #[source] ReceiveError),
    #[error("cannot tell the source the VM runs here ({0}); the source may resume it, so this VM must not run")]
    Confirm(#[source] std::io::Error),
}

/// Why an incoming stream could not be taken into this VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("RAM at {0:#x} is outside this VM's memory")]
    RamOutside(u64),
    #[error("zero pages at {0:#x} are outside this VM's memory")]
    ZeroOutside(u64),
    #[error("cannot write guest RAM ({0})")]
    Write(#[source] std::io::Error),
    #[error("cannot zero guest RAM ({0})")]
    Zero(#[source] std::io::Error),
    #[error("the stream has state for a device {0:?} that this build does not know")]
    UnknownDevice(String),
    #[error("cannot acknowledge pass {0} to the source ({1})")]
    Ack(u32, #[source] std::io::Error),
    #[error("the stream ended without the VM's device state")]
    NoState,
}

/// A failed write to the destination, said so that it points at the cause.
pub(crate) fn transfer_failed(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe | UnexpectedEof => format!(
            "the destination closed the connection ({e}); it may expect TLS (tls-creds), refuse this source's certificate, or have failed: see its log"
        ),
        _ => format!("the transfer failed ({e})"),
    }
}

/// The error for a REFUSED answer: the destination's reason, or, when what followed is no
/// reason a migrated would write (empty, not text), that the peer is no migration destination
/// at all (a VM's API socket answers a stream with a Cap'n Proto error, whose first byte is 0).
pub(crate) fn refused(uri: Uri, s: &mut dyn Read) -> TransferError {
    let mut len = [0u8; 2];
    if s.read_exact(&mut len).is_ok() {
        let mut m = vec![0u8; u16::from_le_bytes(len).into()];
        if s.read_exact(&mut m).is_ok() {
            match String::from_utf8(m) {
                Ok(r) if !r.trim().is_empty() && !r.chars().any(|c| c.is_control()) => {
                    return TransferError::Refused(uri, r)
                }
                _ => return TransferError::NotADestination(uri),
            }
        }
    }
    TransferError::Refused(uri, "(it gave no reason)".to_string())
}

/// A write the peer cut short (it closed the connection): what it said before it closed, if
/// anything: a destination's REFUSED and reason, or a VM API socket's Cap'n Proto error (its
/// first byte 0: the peer is no destination). Otherwise the write's own error.
pub(crate) fn cut_short(uri: Uri, s: &mut dyn Read, e: std::io::Error) -> TransferError {
    use std::io::ErrorKind::*;
    if !matches!(e.kind(), BrokenPipe | ConnectionReset) {
        return TransferError::Transfer(uri, e);
    }
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) if b[0] == REFUSED => refused(uri, s),
        Ok(1) if b[0] == 0 => TransferError::NotADestination(uri),
        _ => TransferError::Transfer(uri, e),
    }
}

/// Tells the source why the VM is refused (REFUSED, a u16 length and the reason).
pub(crate) fn refuse_to(s: &mut dyn Write, why: &str) {
    let m = &why.as_bytes()[..why.len().min(4000)];
    let mut b = vec![REFUSED];
    b.extend_from_slice(&(m.len() as u16).to_le_bytes());
    b.extend_from_slice(m);
    let _ = s.write_all(&b).and_then(|()| s.flush());
}
