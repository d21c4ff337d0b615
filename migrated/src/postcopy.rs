//! Post-copy: the destination runs the VM before it has all of its RAM.
//!
//! The source pauses the VM and sends its device state and a POSTCOPY section: a bitmap of the
//! pages still to come (those the guest wrote since the last pass; the rest is at the
//! destination already). The destination punches those pages out of its memfd, vmm-core
//! registers its mapping of guest RAM on a userfaultfd and hands it here, restores the state,
//! says STARTED and runs the vCPUs. From then on:
//!
//! - the source sends the pages still to come in the background, and first any page the
//!   destination asks for (REQUEST, on the same connection the other way);
//! - the destination's page server waits on every userfaultfd (vmm-core's, and each of
//!   blockd's, which vhost-user's POSTCOPY_ADVISE made): a fault on a page still to come asks
//!   the source for it, a fault on a page that is there (or that the stream will never carry,
//!   being zero at the source) is resolved at once;
//! - pages are placed with UFFDIO_COPY through vmm-core's descriptor (the page enters the
//!   memfd, so every process that maps it sees it) and the other descriptors' waiters are
//!   woken;
//! - after the last page the source writes the end marker; the destination checks the whole
//!   stream's counts and answers COMPLETE, and the source's VM is gone.
//!
//! No guest ever reads a page that has not come: until it comes, a fault waits. If the stream
//! breaks, the waits go on (vmm-core keeps its descriptor, so the kernel never resolves them
//! with zeroes), and vmm-core stops the VM with the reason.

use crate::channel::{Stream, Uri};
use crate::ram::Ram;
use crate::stream::{Reader, Section, Writer, Zeros, PAGE};
use crate::wire::{
    refused, transfer_failed, TransferError, COMPLETE, RECOVER, REFUSED, REQUEST, STARTED,
};
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmm_sandbox::uffd::Uffd;

/// Why post-copy broke, or why a recovery cannot start. Clone (its I/O errors shared), as
/// the page server's state is read by every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PostcopyError {
    #[error("{}: {}", .0, transfer_failed(.1))]
    Channel(Uri, Arc<std::io::Error>),
    #[error("{0}: the connection's reading half ended")]
    ReadingHalfEnded(Uri),
    #[error("{0}: the destination answered the end with something else than COMPLETE")]
    NotComplete(Uri),
    #[error("{0}: the destination did not confirm it has every page ({1})")]
    Unconfirmed(Uri, Arc<std::io::Error>),
    #[error("{0}: the destination said it had every page before the last was sent")]
    EarlyComplete(Uri),
    #[error("{0}: the destination sent a start or a recovery in the middle of post-copy")]
    OutOfPlace(Uri),
    #[error("{0}: the destination sent {1:#x} during post-copy, not a page request")]
    NotARequest(Uri, u8),
    #[error("{0}")]
    Refused(Arc<TransferError>),
    #[error("memfd offset {0:#x} is outside vmm-core's mapping")]
    OutsideMapping(u64),
    #[error("cannot place {0} bytes at {1:#x} ({2})")]
    Place(u64, u64, nix::Error),
    #[error("{0} ended without page {1:#x}, which was to come")]
    Missing(&'static str, u64),
    #[error("a lazy restore has no source to recover from")]
    NoSource,
    #[error("post-copy is not paused: nothing to recover")]
    NotPaused,
    #[error("{0}")]
    Stream(Arc<crate::stream::StreamError>),
    #[error("{0} ({1})")]
    Io(&'static str, Arc<std::io::Error>),
    #[error("RAM at {0:#x} is outside this VM's memory")]
    RamOutside(u64),
    #[error("zero pages at {0:#x} are outside this VM's memory")]
    ZeroOutside(u64),
    #[error("the stream sent a section other than pages during post-copy")]
    NotPages,
    #[error("cannot read the snapshot at byte {0} ({1})")]
    ReadSnapshot(u64, Arc<std::io::Error>),
    #[error("the section at byte {0} is not RAM, as its head said")]
    NotRam(u64),
}

impl From<crate::stream::StreamError> for PostcopyError {
    fn from(e: crate::stream::StreamError) -> Self {
        PostcopyError::Stream(Arc::new(e))
    }
}

/// An I/O error on the channel to `uri`.
fn channel(uri: &Uri) -> impl Fn(std::io::Error) -> PostcopyError + '_ {
    move |e| PostcopyError::Channel(uri.clone(), Arc::new(e))
}

/// An I/O error while doing `what`.
fn io(what: &'static str) -> impl Fn(std::io::Error) -> PostcopyError {
    move |e| PostcopyError::Io(what, Arc::new(e))
}

/// Pages per background run (256 KiB): requests wait at most one run behind it.
const RUN_PAGES: u64 = 64;

/// A writing half that the page server and the answers share.
pub type Back = Arc<Mutex<Box<dyn Write + Send>>>;

fn bit(b: &[u64], p: u64) -> bool {
    b.get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

fn clear(b: &mut [u64], p: u64) {
    if let Some(w) = b.get_mut((p / 64) as usize) {
        *w &= !(1 << (p % 64));
    }
}

/// What post-copy did, on either side.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Pages the post-copy phase carried (RAM and zero).
    pub pages: u64,
    /// Page requests (the destination's faults on pages still to come).
    pub requests: u64,
    /// From a request to its page being in place: median, 99th percentile, most.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// From the switch to the last page.
    pub micros: u64,
    /// Page faults served, and of them those of device backends (not vmm-core's).
    pub faults: u64,
    pub backend_faults: u64,
}

// ---------------------------------------------------------------------------------------
// The source

/// What the destination's half of the connection says during post-copy.
enum FromDest {
    Request(u64, u32),
    /// The destination restored the state and runs the VM.
    Started,
    Complete,
    /// A destination that resumes post-copy on a new channel: the pages it has.
    Recover(Vec<u64>),
    /// A byte no destination sends.
    Other(u8),
    Refused(TransferError),
    Failed(std::io::Error),
}

/// Reads the destination's messages until COMPLETE or the end.
fn read_requests(uri: Uri, mut r: Box<dyn Read + Send>, tx: std::sync::mpsc::Sender<FromDest>) {
    loop {
        let mut kind = [0u8; 1];
        if let Err(e) = r.read_exact(&mut kind) {
            let _ = tx.send(FromDest::Failed(e));
            return;
        }
        let msg = match kind[0] {
            REQUEST => {
                let mut b = [0u8; 12];
                match r.read_exact(&mut b) {
                    Ok(()) => FromDest::Request(
                        u64::from_le_bytes(b[..8].try_into().unwrap()),
                        u32::from_le_bytes(b[8..].try_into().unwrap()),
                    ),
                    Err(e) => FromDest::Failed(e),
                }
            }
            STARTED => FromDest::Started,
            COMPLETE => FromDest::Complete,
            RECOVER => {
                let mut n = [0u8; 4];
                let words = r.read_exact(&mut n).and_then(|()| {
                    let n = u32::from_le_bytes(n) as usize;
                    let mut b = vec![0u8; n.min(1 << 24) * 8];
                    r.read_exact(&mut b)?;
                    Ok(b.chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                        .collect())
                });
                match words {
                    Ok(w) => FromDest::Recover(w),
                    Err(e) => FromDest::Failed(e),
                }
            }
            REFUSED => FromDest::Refused(refused(uri.clone(), r.as_mut())),
            other => FromDest::Other(other),
        };
        let last = !matches!(
            msg,
            FromDest::Request(..) | FromDest::Started | FromDest::Recover(_)
        );
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

/// The source's end of the switch: how it went.
pub enum Switched {
    /// The destination refused the VM before it ran it (the source may resume).
    Refused(TransferError),
    /// The destination runs the VM; what post-copy did, or why it broke (the VM then lives
    /// nowhere whole: the source must not resume it).
    Ran(Result<Summary, PostcopyError>),
}

/// What the source's post-copy needs: its RAM, where its progress goes, and the limit for
/// its background pages.
pub struct Source<'a> {
    pub uri: Uri,
    pub ram: &'a Ram,
    /// Bytes per second (0: none) for the background pages.
    pub limit: u64,
    /// Bytes written and pages sent (what `progress` reads).
    pub bytes: &'a AtomicU64,
    pub pages: &'a AtomicU64,
}

/// A connection's writing half (buffered) and the destination's messages from its reading
/// half, which a thread of its own reads.
type Duplex = (
    Writer<BufWriter<Box<dyn Write + Send>>>,
    std::sync::mpsc::Receiver<FromDest>,
);

/// Splits the stream under `writer` and starts reading the destination's messages.
fn duplex<W>(
    uri: &Uri,
    writer: Writer<W>,
    into: impl FnOnce(W) -> std::io::Result<Box<dyn Stream>>,
) -> Result<Duplex, TransferError>
where
    W: Write,
{
    let io = |e: std::io::Error| TransferError::Transfer(uri.clone(), e);
    let mut reader = None;
    let w = writer
        .with_sink(|b| {
            let (r, w) = into(b)?.split()?;
            reader = Some(r);
            Ok(BufWriter::with_capacity(RUN_PAGES as usize * PAGE, w))
        })
        .map_err(io)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let r = reader.expect("split");
    let ru = uri.clone();
    std::thread::Builder::new()
        .name("requests".into())
        .spawn(move || read_requests(ru, r, tx))
        .map_err(io)?;
    Ok((w, rx))
}

/// Sends the device state and the switch, then (once the destination runs the VM) every
/// page still to come, asked-for pages first.
pub fn send(
    s: &Source,
    mut writer: Writer<BufWriter<Box<dyn Stream>>>,
    state: &[u8],
    mut pending: Vec<u64>,
) -> Result<Switched, TransferError> {
    let uri = s.uri.clone();
    let io = |e: std::io::Error| TransferError::Transfer(uri.clone(), e);
    writer.get_ref().get_ref().shrink_buffers();
    writer.device(crate::wire::VM_SECTION, state).map_err(io)?;
    writer.postcopy(&pending).map_err(io)?;
    writer.get_mut().flush().map_err(io)?;
    // From here the destination's half of the connection carries page requests (its
    // device backends may fault while it restores the state), then its answer.
    let (mut w, rx) = duplex(&uri, writer, |b| b.into_inner().map_err(|e| e.into_error()))?;
    let mut out = Sender::new(&mut w, s.ram, &mut pending);
    // The destination restores the state and answers before it runs a vCPU; the pages it
    // asks for meanwhile go at once (if it then refuses the VM, the source resumes it).
    loop {
        match rx.recv() {
            Ok(FromDest::Request(gpa, n)) => out.request(gpa, n).map_err(io)?,
            Ok(FromDest::Started) => break,
            Ok(FromDest::Refused(e)) => return Ok(Switched::Refused(e)),
            Ok(FromDest::Failed(e)) => return Err(TransferError::Unconfirmed(uri.clone(), e)),
            Ok(FromDest::Complete | FromDest::Recover(_)) => {
                return Err(TransferError::BadAck(uri.clone(), 0, COMPLETE, 0))
            }
            Ok(FromDest::Other(0x15 | 0x16)) => return Err(TransferError::ExpectsTls(uri.clone())),
            Ok(FromDest::Other(b)) => return Err(TransferError::BadAck(uri.clone(), 0, b, 0)),
            Err(_) => {
                return Err(TransferError::Unconfirmed(
                    uri.clone(),
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
        }
    }
    log::info!("{uri}: the destination runs the VM; post-copy sends the rest");
    Ok(Switched::Ran(send_rest(s, out, &rx)))
}

/// A source resuming a post-copy that broke, on a new channel to the destination: a new
/// stream's header, then (once the destination said which pages it has) the pages of
/// `original` (what was to come at the switch) that it lacks, as `send` sends them.
pub fn resume(
    s: &Source,
    stream: Box<dyn Stream>,
    config: &crate::stream::Config,
    original: &[u64],
) -> Result<Result<Summary, PostcopyError>, TransferError> {
    let uri = s.uri.clone();
    let io = |e: std::io::Error| TransferError::Transfer(uri.clone(), e);
    let mut writer = Writer::new(BufWriter::with_capacity(1 << 16, stream), config)
        .map_err(|e| TransferError::Header(uri.clone(), e))?;
    writer.get_mut().flush().map_err(io)?;
    let (mut w, rx) = duplex(&uri, writer, |b| b.into_inner().map_err(|e| e.into_error()))?;
    let here = loop {
        match rx.recv() {
            Ok(FromDest::Recover(here)) => break here,
            // Requests before its bitmap are for pages the bitmap will say it lacks.
            Ok(FromDest::Request(..)) => continue,
            Ok(FromDest::Refused(e)) => return Err(e),
            Ok(FromDest::Failed(e)) => return Err(TransferError::Unconfirmed(uri.clone(), e)),
            Ok(FromDest::Other(0x15 | 0x16)) => return Err(TransferError::ExpectsTls(uri.clone())),
            Ok(_) => return Err(TransferError::NotADestination(uri.clone())),
            Err(_) => {
                return Err(TransferError::Unconfirmed(
                    uri.clone(),
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
        }
    };
    let mut pending: Vec<u64> = original
        .iter()
        .enumerate()
        .map(|(i, w)| w & !here.get(i).copied().unwrap_or(0))
        .collect();
    log::info!(
        "{uri}: post-copy resumes: the destination lacks {} page(s)",
        pending
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
    );
    let out = Sender::new(&mut w, s.ram, &mut pending);
    Ok(send_rest(s, out, &rx))
}

/// After the switch: the pages still pending, asked-for ones first, then the end and the
/// destination's COMPLETE. Err: post-copy broke, and why.
fn send_rest<W: Write>(
    s: &Source,
    mut out: Sender<'_, W>,
    rx: &std::sync::mpsc::Receiver<FromDest>,
) -> Result<Summary, PostcopyError> {
    let uri = &s.uri;
    let started = Instant::now();
    let total = (s.ram.len() / PAGE) as u64;
    let mut cursor = 0u64;
    let mut background = 0u64;
    loop {
        // Asked-for pages first.
        out.serve_requests(rx, uri, Duration::ZERO)?;
        // Then the next run in the background.
        while cursor < total && !bit(out.pending, cursor) {
            cursor += 1;
        }
        if cursor >= total {
            break;
        }
        let sent = out.run(cursor, RUN_PAGES, false).map_err(channel(uri))?;
        cursor += sent.max(1);
        s.bytes.store(out.w.bytes(), Relaxed);
        s.pages.fetch_add(sent, Relaxed);
        background += sent * PAGE as u64;
        if s.limit > 0 {
            // The background keeps to the limit; requests are served while it waits.
            let due = Duration::from_secs_f64(background as f64 / s.limit as f64);
            while let Some(wait) = due.checked_sub(started.elapsed()) {
                out.serve_requests(rx, uri, wait)?;
            }
        }
    }
    let (pages, requests) = (out.pages, out.requests);
    out.w.end().map_err(channel(uri))?;
    s.bytes.store(out.w.bytes(), Relaxed);
    // The destination checks the end's counts and answers; late requests (for pages that
    // were on their way) are dropped.
    loop {
        match rx.recv() {
            Ok(FromDest::Request(..)) => continue,
            Ok(FromDest::Complete) => break,
            Ok(FromDest::Started | FromDest::Other(_) | FromDest::Recover(_)) => {
                return Err(PostcopyError::NotComplete(uri.clone()))
            }
            Ok(FromDest::Refused(e)) => return Err(PostcopyError::Refused(Arc::new(e))),
            Ok(FromDest::Failed(e)) => {
                return Err(PostcopyError::Unconfirmed(uri.clone(), Arc::new(e)))
            }
            Err(_) => return Err(PostcopyError::ReadingHalfEnded(uri.clone())),
        }
    }
    let micros = started.elapsed().as_micros() as u64;
    log::info!(
        "{uri}: post-copy done: {pages} page(s) in {} ms, {requests} asked for",
        micros / 1000
    );
    Ok(Summary {
        pages,
        requests,
        micros,
        ..Default::default()
    })
}

/// Writes runs of pending pages.
struct Sender<'a, W: Write> {
    w: &'a mut Writer<W>,
    ram: &'a Ram,
    pending: &'a mut Vec<u64>,
    buf: Vec<u8>,
    pages: u64,
    requests: u64,
}

impl<'a, W: Write> Sender<'a, W> {
    fn new(w: &'a mut Writer<W>, ram: &'a Ram, pending: &'a mut Vec<u64>) -> Self {
        Sender {
            w,
            ram,
            pending,
            buf: Vec::with_capacity(RUN_PAGES as usize * PAGE),
            pages: 0,
            requests: 0,
        }
    }

    /// Sends the pending pages among `n` pages from page `first` as one run (stopping at the
    /// first page not pending, or the end of its region); returns how many went.
    fn run(&mut self, first: u64, n: u64, flush: bool) -> std::io::Result<u64> {
        let off = first * PAGE as u64;
        let gpa = self.ram.gpa(off);
        let mut count = 0;
        while count < n
            && bit(self.pending, first + count)
            && self
                .ram
                .offset(gpa, (count + 1) * PAGE as u64)
                .is_some_and(|o| o as u64 == off)
        {
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        self.buf.clear();
        self.buf.extend_from_slice(
            &self.ram.bytes()[off as usize..(off + count * PAGE as u64) as usize],
        );
        self.w.ram(gpa, &self.buf, Zeros::Send)?;
        for p in first..first + count {
            clear(self.pending, p);
        }
        self.pages += count;
        if flush {
            self.w.get_mut().flush()?;
        }
        Ok(count)
    }

    /// Sends what the destination asked for since the last look, waiting up to `wait` for a
    /// first request. Err: post-copy broke, and why.
    fn serve_requests(
        &mut self,
        rx: &std::sync::mpsc::Receiver<FromDest>,
        uri: &Uri,
        wait: Duration,
    ) -> Result<(), PostcopyError> {
        let mut first = if wait.is_zero() {
            rx.try_recv().map_err(|e| match e {
                TryRecvError::Empty => None,
                TryRecvError::Disconnected => Some(()),
            })
        } else {
            rx.recv_timeout(wait).map_err(|e| match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => None,
                std::sync::mpsc::RecvTimeoutError::Disconnected => Some(()),
            })
        };
        loop {
            match first {
                Ok(FromDest::Request(gpa, n)) => self.request(gpa, n).map_err(channel(uri))?,
                Ok(FromDest::Complete) => return Err(PostcopyError::EarlyComplete(uri.clone())),
                Ok(FromDest::Refused(e)) => return Err(PostcopyError::Refused(Arc::new(e))),
                Ok(FromDest::Failed(e)) => return Err(channel(uri)(e)),
                Ok(FromDest::Started | FromDest::Recover(_)) => {
                    return Err(PostcopyError::OutOfPlace(uri.clone()))
                }
                Ok(FromDest::Other(b)) => return Err(PostcopyError::NotARequest(uri.clone(), b)),
                Err(None) => return Ok(()),
                Err(Some(())) => return Err(PostcopyError::ReadingHalfEnded(uri.clone())),
            }
            first = rx.try_recv().map_err(|e| match e {
                TryRecvError::Empty => None,
                TryRecvError::Disconnected => Some(()),
            });
        }
    }

    /// Sends what the destination asked for (the pages of it still pending) at once.
    fn request(&mut self, gpa: u64, n: u32) -> std::io::Result<()> {
        self.requests += 1;
        let Some(off) = self.ram.offset(gpa, u64::from(n) * PAGE as u64) else {
            log::warn!(
                "the destination asked for {n} page(s) at {gpa:#x}, outside the VM's RAM; ignored"
            );
            return Ok(());
        };
        let first = off as u64 / PAGE as u64;
        let mut p = first;
        while p < first + u64::from(n) {
            let sent = self.run(p, first + u64::from(n) - p, false)?;
            p += sent.max(1);
        }
        self.w.get_mut().flush()
    }
}

// ---------------------------------------------------------------------------------------
// The destination

/// A VM that runs before its RAM is all here: the rest comes through the page server,
/// from the source or from a snapshot file.
pub struct Incoming {
    pub uri: Uri,
    /// The VM's shape (a recovery's new stream must be of it).
    pub config: crate::stream::Config,
    pub rest: Rest,
    pub pending: Vec<u64>,
    pub ram: Ram,
}

/// Where the pages still to come are.
pub enum Rest {
    /// The source sends them on the stream, and is asked for the ones a fault needs first.
    Stream {
        reader: Reader<BufReader<Box<dyn Read + Send>>>,
        back: Back,
    },
    /// A snapshot file (lazy restore): read a section at a time, a faulted page's first.
    File {
        file: std::fs::File,
        index: crate::stream::Index,
    },
}

/// How the page server asks for a page that is still to come.
enum Ask {
    Source(Back),
    Loader(std::sync::mpsc::Sender<u64>),
}

/// A userfaultfd and the mappings of guest RAM it covers: (address, bytes, memfd offset).
struct Mapped {
    who: String,
    uffd: Uffd,
    maps: Vec<(u64, u64, u64)>,
    /// Faults read from this descriptor.
    faults: AtomicU64,
}

impl Mapped {
    fn va(&self, off: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|(_, b, o)| off >= *o && off < o + b)
            .map(|(va, _, o)| va + off - o)
    }
    fn off(&self, va: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|(a, b, _)| va >= *a && va < a + b)
            .map(|(a, _, o)| o + va - a)
    }
}

/// The page server's shared state.
struct Pages {
    uri: Uri,
    config: crate::stream::Config,
    pending: Vec<u64>,
    /// Pages in place (bit per page).
    here: Vec<AtomicU64>,
    /// [0] places pages (vmm-core's); the others are woken.
    uffds: Mutex<Vec<Arc<Mapped>>>,
    ask: Ask,
    ram: Ram,
    /// Pages asked for and when.
    asked: Mutex<HashMap<u64, Instant>>,
    latencies: Mutex<Vec<u32>>,
    placed: AtomicU64,
    stop: AtomicBool,
    began: Instant,
    /// Where post-copy stands; waiters hear each change.
    state: Mutex<State>,
    changed: Condvar,
    /// Set while the channel is broken: faults are noted, not asked for (a recovery asks).
    paused: AtomicBool,
}

/// Where the destination's post-copy stands.
#[derive(Clone)]
pub enum State {
    Running,
    /// The channel broke (why): a recovery on a new channel goes on. The number counts the
    /// pauses, so that a waiter hears each once.
    Paused(String, u64),
    /// Every page came, or the rest cannot come (why).
    Done(Result<Summary, PostcopyError>),
}

impl Pages {
    fn is_here(&self, p: u64) -> bool {
        self.here
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(Relaxed) & (1 << (p % 64)) != 0)
    }

    fn mark(&self, first: u64, n: u64) {
        for p in first..first + n {
            if let Some(w) = self.here.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Relaxed);
            }
        }
    }

    fn placer(&self) -> Arc<Mapped> {
        self.uffds.lock().unwrap()[0].clone()
    }

    /// Wakes every descriptor but the placer's over [off, off+len).
    fn wake_others(&self, off: u64, len: u64) {
        for m in self.uffds.lock().unwrap().iter().skip(1) {
            if let Some(va) = m.va(off) {
                let _ = m.uffd.wake(va, len);
            }
        }
    }

    /// Puts `data` (or zero pages: None) at memfd offset `off`.
    fn place(&self, off: u64, len: u64, data: Option<&[u8]>) -> Result<(), PostcopyError> {
        let m = self.placer();
        let va = m.va(off).ok_or(PostcopyError::OutsideMapping(off))?;
        // The kernel stops at a page that is there already (placed for a fault: a zero page,
        // or a lazy restore's single page): EAGAIN with what it placed before, or EEXIST when
        // it is the first. Such a page is skipped, and the rest goes on.
        let mut done = 0u64;
        while done < len {
            let r = match data {
                Some(d) => m.uffd.copy(va + done, &d[done as usize..]),
                None => m.uffd.zero(va + done, len - done),
            };
            match r {
                Ok(()) => break,
                Err((nix::Error::EAGAIN, n)) if n > 0 => done += n,
                Err((nix::Error::EEXIST, _)) => done += PAGE as u64,
                Err((e, _)) => return Err(PostcopyError::Place(len - done, va + done, e)),
            }
        }
        let first = off / PAGE as u64;
        let n = len / PAGE as u64;
        self.mark(first, n);
        self.wake_others(off, len);
        let now = Instant::now();
        let mut asked = self.asked.lock().unwrap();
        if !asked.is_empty() {
            for p in first..first + n {
                if let Some(t) = asked.remove(&p) {
                    let us = now.duration_since(t).as_micros().min(u128::from(u32::MAX));
                    self.latencies.lock().unwrap().push(us as u32);
                }
            }
        }
        Ok(())
    }

    /// One fault at `addr` on `m`.
    fn fault(&self, m: &Mapped, addr: u64) {
        let va = addr & !(PAGE as u64 - 1);
        let Some(off) = m.off(va) else {
            log::error!(
                "{}: a page fault at {addr:#x}, outside guest RAM; it stays unresolved",
                m.who
            );
            return;
        };
        let p = off / PAGE as u64;
        if self.is_here(p) {
            let _ = m.uffd.wake(va, PAGE as u64);
            return;
        }
        if !bit(&self.pending, p) {
            // Not to come: it is here in the memfd, or zero at the source (a hole).
            if let Err(e) = self.place(off, PAGE as u64, None) {
                log::error!("{}: {e}", m.who);
            }
            let _ = m.uffd.wake(va, PAGE as u64);
            return;
        }
        let first = {
            let mut asked = self.asked.lock().unwrap();
            let new = !asked.contains_key(&p);
            asked.entry(p).or_insert_with(Instant::now);
            new
        };
        if first {
            match &self.ask {
                // While paused, a recovery asks for it.
                Ask::Source(_) if self.paused.load(Relaxed) => {}
                Ask::Source(back) => self.ask_source(back, p),
                Ask::Loader(tx) => {
                    let _ = tx.send(p);
                }
            }
        }
        // The page may have come meanwhile: its waker may have run before this fault queued.
        if self.is_here(p) {
            let _ = m.uffd.wake(va, PAGE as u64);
        }
    }

    /// Asks the source for page `p` (REQUEST).
    fn ask_source(&self, back: &Back, p: u64) {
        let gpa = self.ram.gpa(p * PAGE as u64);
        let mut msg = [0u8; 13];
        msg[0] = REQUEST;
        msg[1..9].copy_from_slice(&gpa.to_le_bytes());
        msg[9..].copy_from_slice(&1u32.to_le_bytes());
        let mut b = back.lock().unwrap();
        if let Err(e) = b.write_all(&msg).and_then(|()| b.flush()) {
            log::warn!("{}: cannot ask the source for {gpa:#x} ({e})", self.uri);
        }
    }

    /// Every page that was to come is here (`from` names where they came from).
    fn all_here(&self, from: &'static str) -> Result<(), PostcopyError> {
        for (i, w) in self.pending.iter().enumerate() {
            let missing = w & !self.here[i].load(Relaxed);
            if missing != 0 {
                let page = i as u64 * 64 + u64::from(missing.trailing_zeros());
                return Err(PostcopyError::Missing(
                    from,
                    self.ram.gpa(page * PAGE as u64),
                ));
            }
        }
        Ok(())
    }

    fn finish(&self, r: Result<Summary, PostcopyError>) {
        *self.state.lock().unwrap() = State::Done(r);
        self.changed.notify_all();
    }

    /// The channel broke: faults wait for a recovery.
    fn pause(&self, why: String) {
        self.paused.store(true, Relaxed);
        let mut st = self.state.lock().unwrap();
        let n = match &*st {
            State::Paused(_, n) => n + 1,
            _ => 1,
        };
        *st = State::Paused(why, n);
        self.changed.notify_all();
    }

    fn summary(&self) -> Summary {
        let mut l = self.latencies.lock().unwrap().clone();
        l.sort_unstable();
        let at = |q: f64| {
            l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
                .map_or(0, |&v| u64::from(v))
        };
        let uffds = self.uffds.lock().unwrap();
        let faults: Vec<u64> = uffds.iter().map(|m| m.faults.load(Relaxed)).collect();
        for m in uffds.iter() {
            log::info!(
                "{}: post-copy: {} fault(s) served for {}",
                self.uri,
                m.faults.load(Relaxed),
                m.who
            );
        }
        Summary {
            faults: faults.iter().sum(),
            backend_faults: faults.iter().skip(1).sum(),
            pages: self.placed.load(Relaxed),
            requests: l.len() as u64,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: l.last().map_or(0, |&v| u64::from(v)),
            micros: self.began.elapsed().as_micros() as u64,
        }
    }
}

/// The destination's page server: started with vmm-core's userfaultfd, joined by blockd's.
pub struct Server {
    pages: Arc<Pages>,
}

impl Server {
    /// Starts serving faults on `uffd` (vmm-core's, which places pages) and reading the rest
    /// of the stream.
    pub fn start(inc: Incoming, uffd: Uffd, maps: Vec<(u64, u64, u64)>) -> std::io::Result<Server> {
        let words = inc.pending.len();
        let (tx, rx) = std::sync::mpsc::channel();
        let (ask, rest) = match inc.rest {
            Rest::Stream { reader, back } => (Ask::Source(back.clone()), Ok((reader, back))),
            Rest::File { file, index } => (Ask::Loader(tx), Err((file, index))),
        };
        let pages = Arc::new(Pages {
            uri: inc.uri.clone(),
            config: inc.config,
            pending: inc.pending,
            here: (0..words).map(|_| AtomicU64::new(0)).collect(),
            uffds: Mutex::new(vec![Arc::new(Mapped {
                who: "vmm-core".into(),
                uffd,
                maps,
                faults: AtomicU64::new(0),
            })]),
            ask,
            ram: inc.ram,
            asked: Default::default(),
            latencies: Default::default(),
            placed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            began: Instant::now(),
            state: Mutex::new(State::Running),
            changed: Condvar::new(),
            paused: AtomicBool::new(false),
        });
        let p = pages.clone();
        std::thread::Builder::new()
            .name("faults".into())
            .spawn(move || serve_faults(&p))?;
        let p = pages.clone();
        std::thread::Builder::new()
            .name("postcopy".into())
            .spawn(move || match rest {
                Ok((mut reader, back)) => rest_of_stream(&p, &mut reader, &back),
                Err((file, index)) => {
                    let r = load_rest(&p, &file, &index, &rx);
                    if let Err(e) = &r {
                        log::error!("{}: the rest of RAM cannot come: {e}", p.uri);
                    }
                    p.finish(r.map(|()| p.summary()));
                }
            })?;
        Ok(Server { pages })
    }

    /// Another process's descriptor (blockd's): its faults are served too.
    pub fn add(&self, who: &str, uffd: Uffd, maps: Vec<(u64, u64, u64)>) {
        self.pages.uffds.lock().unwrap().push(Arc::new(Mapped {
            who: who.into(),
            uffd,
            maps,
            faults: AtomicU64::new(0),
        }));
    }

    /// Waits until every page is here, the rest cannot come, or the channel breaks (a pause
    /// numbered above `seen`).
    pub fn wait(&self, seen: u64) -> State {
        let mut st = self.pages.state.lock().unwrap();
        loop {
            match &*st {
                State::Done(_) => return st.clone(),
                State::Paused(_, n) if *n > seen => return st.clone(),
                _ => st = self.pages.changed.wait(st).unwrap(),
            }
        }
    }

    /// A recovery: the source's new connection (its stream's header read here). The
    /// source hears which pages are here, the pages that faults wait for are asked for
    /// again, and the rest of the stream comes on it.
    pub fn recover(&self, stream: Box<dyn Stream>) -> Result<(), PostcopyError> {
        let p = &self.pages;
        let back = match &p.ask {
            Ask::Source(back) => back.clone(),
            Ask::Loader(_) => return Err(PostcopyError::NoSource),
        };
        if !matches!(*p.state.lock().unwrap(), State::Paused(..)) {
            return Err(PostcopyError::NotPaused);
        }
        let (r, w) = stream.split().map_err(io("cannot split the new channel"))?;
        let mut reader = Reader::new(BufReader::with_capacity(1 << 20, r))
            .and_then(|r| r.check_config(&p.config).map(|()| r))?;
        *back.lock().unwrap() = w;
        let here: Vec<u64> = p.here.iter().map(|w| w.load(Relaxed)).collect();
        {
            let mut b = back.lock().unwrap();
            let mut msg = vec![RECOVER];
            msg.extend_from_slice(&(here.len() as u32).to_le_bytes());
            for w in &here {
                msg.extend_from_slice(&w.to_le_bytes());
            }
            b.write_all(&msg)
                .and_then(|()| b.flush())
                .map_err(io("cannot tell the source which pages are here"))?;
        }
        p.paused.store(false, Relaxed);
        *p.state.lock().unwrap() = State::Running;
        // The faults that waited meanwhile.
        let waiting: Vec<u64> = p.asked.lock().unwrap().keys().copied().collect();
        for pg in waiting {
            if !p.is_here(pg) {
                p.ask_source(&back, pg);
            }
        }
        let pages = p.clone();
        std::thread::Builder::new()
            .name("postcopy".into())
            .spawn(move || rest_of_stream(&pages, &mut reader, &back))
            .map_err(io("cannot start the post-copy thread"))?;
        log::info!("{}: post-copy resumes on a new channel", p.uri);
        Ok(())
    }

    pub fn ram(&self) -> &Ram {
        &self.pages.ram
    }

    /// Stops serving faults (vmm-core and blockd have unregistered their memory).
    pub fn stop(&self) {
        self.pages.changed.notify_all();
        self.pages.stop.store(true, Relaxed);
    }
}

/// The rest of a source's stream: every page placed and COMPLETE said, or, when the
/// channel breaks (or the stream fails a check: a recovery resends), a pause until a new
/// channel comes.
fn rest_of_stream(
    p: &Arc<Pages>,
    reader: &mut Reader<BufReader<Box<dyn Read + Send>>>,
    back: &Back,
) {
    match receive_rest(p, reader, back) {
        Ok(()) => p.finish(Ok(p.summary())),
        Err(e) => {
            let why = format!("{}: {e}", p.uri);
            log::error!("post-copy paused: {why}; the VM waits for `vmmctl migrate recover URI`");
            let mut b = back.lock().unwrap();
            crate::wire::refuse_to(b.as_mut(), &e.to_string());
            drop(b);
            p.pause(why);
        }
    }
}

/// Reads the rest of the stream and places its pages; answers COMPLETE at its end.
fn receive_rest(
    p: &Pages,
    reader: &mut Reader<BufReader<Box<dyn Read + Send>>>,
    back: &Back,
) -> Result<(), PostcopyError> {
    loop {
        match reader.section()? {
            Section::Ram { gpa, data } => {
                let off = p
                    .ram
                    .offset(gpa, data.len() as u64)
                    .ok_or(PostcopyError::RamOutside(gpa))?;
                p.place(off as u64, data.len() as u64, Some(data))?;
                p.placed.fetch_add((data.len() / PAGE) as u64, Relaxed);
            }
            Section::Zero { gpa, pages } => {
                let len = pages * PAGE as u64;
                let off = p
                    .ram
                    .offset(gpa, len)
                    .ok_or(PostcopyError::ZeroOutside(gpa))?;
                p.place(off as u64, len, None)?;
                p.placed.fetch_add(pages, Relaxed);
            }
            Section::End => break,
            Section::Device { .. }
            | Section::Pass(_)
            | Section::Postcopy(_)
            | Section::Workset(_) => return Err(PostcopyError::NotPages),
        }
    }
    p.all_here("the stream")?;
    let mut b = back.lock().unwrap();
    b.write_all(&[COMPLETE])
        .and_then(|()| b.flush())
        .map_err(io("cannot tell the source every page came"))
}

/// Lazy restore: loads the snapshot's RAM sections into place, a faulted page's section
/// first, then the rest in file order (each section checked as it is read).
fn load_rest(
    p: &Pages,
    file: &std::fs::File,
    index: &crate::stream::Index,
    faulted: &std::sync::mpsc::Receiver<u64>,
) -> Result<(), PostcopyError> {
    let mut section_of = vec![u32::MAX; p.pending.len() * 64];
    for (i, &(_, _, first, pages)) in index.runs.iter().enumerate() {
        for pg in first..first + pages {
            section_of[pg as usize] = i as u32;
        }
    }
    let mut l = Loader {
        p,
        file,
        index,
        faulted,
        section_of,
        loaded: vec![false; index.runs.len()],
        pool: Vec::new(),
    };
    // The working set the snapshot records first (as Firecracker's REAP work prefetches),
    // then the rest in file order.
    let hot = |run: &(u64, u64, u64, u64)| {
        index.workset.as_ref().is_some_and(|ws| {
            (run.2..run.2 + run.3).any(|pg| {
                ws.get((pg / 64) as usize)
                    .is_some_and(|w| w & (1 << (pg % 64)) != 0)
            })
        })
    };
    let mut order: Vec<usize> = (0..index.runs.len())
        .filter(|&i| hot(&index.runs[i]))
        .collect();
    if !order.is_empty() {
        log::info!(
            "{}: lazy restore: the {} section(s) holding the recorded working set first",
            p.uri,
            order.len()
        );
    }
    order.extend((0..index.runs.len()).filter(|&i| !hot(&index.runs[i])));
    for i in order {
        l.serve_faults(None)?;
        l.load(i, None)?;
    }
    p.all_here("the snapshot")
}

/// Pages placed at a time while a section loads: faults are looked at between them.
const LOAD_CHUNK: usize = 256;

struct Loader<'a> {
    p: &'a Pages,
    file: &'a std::fs::File,
    index: &'a crate::stream::Index,
    faulted: &'a std::sync::mpsc::Receiver<u64>,
    /// Each page's section (u32::MAX: none, a zero page).
    section_of: Vec<u32>,
    loaded: Vec<bool>,
    /// Buffers kept for reuse (one per section being placed at once): glibc frees a
    /// thread's large blocks by shrinking its heap, which reads a /proc file that the
    /// sandbox does not let migrated open.
    pool: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Loader<'_> {
    /// Section `i`, read and checked into `buf`: its memfd offset, its pages in `out`.
    fn read(&self, i: usize, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<u64, PostcopyError> {
        use std::os::unix::fs::FileExt;
        let (at, len, _, _) = self.index.runs[i];
        buf.resize(len as usize, 0);
        self.file
            .read_exact_at(&mut buf[..], at)
            .map_err(|e| PostcopyError::ReadSnapshot(at, Arc::new(e)))?;
        let mut r = Reader::resume(&buf[..], self.index.config.clone(), at);
        match r.section()? {
            Section::Ram { gpa, data } => {
                let off = self
                    .p
                    .ram
                    .offset(gpa, data.len() as u64)
                    .ok_or(PostcopyError::RamOutside(gpa))?;
                out.clear();
                out.extend_from_slice(data);
                Ok(off as u64)
            }
            _ => Err(PostcopyError::NotRam(at)),
        }
    }

    /// Loads section `i` (once), placing it a chunk at a time and serving faults between;
    /// page `first` (a fault's) before the rest.
    fn load(&mut self, i: usize, first: Option<u64>) -> Result<(), PostcopyError> {
        if std::mem::replace(&mut self.loaded[i], true) {
            return Ok(());
        }
        let (mut buf, mut data) = self.pool.pop().unwrap_or_default();
        let r = self.read(i, &mut buf, &mut data).and_then(|off| {
            if let Some(pg) = first {
                let at = pg * PAGE as u64;
                let from = (at - off) as usize;
                self.p
                    .place(at, PAGE as u64, Some(&data[from..from + PAGE]))?;
            }
            for (n, chunk) in data.chunks(LOAD_CHUNK * PAGE).enumerate() {
                self.serve_faults(Some((off, &data)))?;
                let at = off + (n * LOAD_CHUNK * PAGE) as u64;
                self.p.place(at, chunk.len() as u64, Some(chunk))?;
                self.p
                    .placed
                    .fetch_add((chunk.len() / PAGE) as u64, Relaxed);
            }
            Ok(())
        });
        self.pool.push((buf, data));
        r
    }

    /// The pages faults wait for: from `current` (a section being placed: memfd offset and
    /// pages) at once, from other sections by loading them first.
    fn serve_faults(&mut self, current: Option<(u64, &[u8])>) -> Result<(), PostcopyError> {
        while let Ok(pg) = self.faulted.try_recv() {
            if self.p.is_here(pg) {
                continue;
            }
            let at = pg * PAGE as u64;
            if let Some((off, data)) = current {
                if at >= off && at < off + data.len() as u64 {
                    let from = (at - off) as usize;
                    self.p
                        .place(at, PAGE as u64, Some(&data[from..from + PAGE]))?;
                    continue;
                }
            }
            if let Some(&j) = self.section_of.get(pg as usize).filter(|&&j| j != u32::MAX) {
                self.load(j as usize, Some(pg))?;
            }
        }
        Ok(())
    }
}

/// Waits on every descriptor and resolves its faults, until stopped.
fn serve_faults(p: &Pages) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut addrs = Vec::new();
    while !p.stop.load(Relaxed) {
        let list: Vec<Arc<Mapped>> = p.uffds.lock().unwrap().clone();
        let mut fds: Vec<PollFd> = list
            .iter()
            .map(|m| PollFd::new(m.uffd.fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::from(20u8)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                log::error!("{}: cannot wait for page faults ({e})", p.uri);
                return;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        for (m, ready) in list.iter().zip(ready) {
            if !ready {
                continue;
            }
            addrs.clear();
            if let Err(e) = m.uffd.faults(&mut addrs) {
                log::error!("{}: cannot read its page faults ({e})", m.who);
                continue;
            }
            m.faults.fetch_add(addrs.len() as u64, Relaxed);
            for &a in &addrs {
                p.fault(m, a);
            }
        }
    }
}

/// The answer's writing half, as the page server shares it.
pub fn back(w: Box<dyn Write + Send>) -> Back {
    Arc::new(Mutex::new(w))
}
