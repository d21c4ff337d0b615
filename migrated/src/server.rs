//! migrated's control API (proto/schema/migrated.capnp), one connection from vmm-core. The
//! I/O runs on blocking threads so that the RPC keeps answering (an abort reaches a transfer
//! that is blocked on the network).

use crate::channel::{self, Stream, Uri};
use crate::ram::Ram;
use crate::stream::{Config, Reader, Section, StreamError, Writer, Zeros, PAGE};
use crate::tls::{self, Tls};
use crate::wire::{
    cut_short, refuse_to, refused, ReceiveError, TransferError, ACKED, REFUSED, STARTED, VM_SECTION,
};
use capnp::capability::Rc as CapRc;
use std::io::{BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_proto::migrated_capnp::{migrated, shape};
use vmm_proto::rpc::SideChannelError;

struct Outgoing {
    uri: Uri,
    /// A live migration (the destination answers), not a snapshot file.
    live: bool,
    writer: Writer<BufWriter<Box<dyn Stream>>>,
    ram: Ram,
    /// Passes sent (after the first, pages that became zero go as ZERO runs).
    passes: u32,
    /// Bytes per second (0: no limit), and when the stream began.
    limit: u64,
    began: Instant,
    /// What `progress` reads while a call sends: bytes written and pages sent.
    sent: Arc<Sent>,
    /// Set by `switchNow`: the pass stops after its current run.
    switch: Arc<std::sync::atomic::AtomicBool>,
}

/// Bytes written to the stream and guest pages sent, updated as they go.
#[derive(Default)]
struct Sent {
    bytes: std::sync::atomic::AtomicU64,
    pages: std::sync::atomic::AtomicU64,
}

impl Outgoing {
    /// Holds the stream to its bandwidth limit: waits until what was written is what the
    /// limit allows since the start.
    fn pace(&self) {
        if self.limit == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.writer.bytes() as f64 / self.limit as f64);
        let elapsed = self.began.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

pub struct Server {
    side: OwnedFd,
    out: Arc<Mutex<Option<Outgoing>>>,
    /// Another handle on the outgoing connection, to cut it from `abort`.
    cut: Arc<Mutex<Option<Box<dyn Stream>>>>,
    /// The destination's connection, kept for the answer `started` sends back.
    back: Back,
    /// The outgoing stream's progress (`progress` reads it while `sendPages` holds `out`).
    sent: Arc<Sent>,
    /// `switchNow`'s flag, which the pass under way reads.
    switch: Arc<std::sync::atomic::AtomicBool>,
    /// A source whose post-copy broke, kept for `recover`.
    paused: Arc<Mutex<Option<PausedSource>>>,
    /// A source's connection whose header `peek` read, kept for `receive`.
    peeked: Arc<Mutex<Option<Peeked>>>,
    /// A stream that switched to post-copy, until the page server takes it.
    incoming: Mutex<Option<crate::postcopy::Incoming>>,
    /// The destination's page server during post-copy.
    pages: Mutex<Option<Arc<crate::postcopy::Server>>>,
}

fn write_summary(
    mut b: vmm_proto::migrated_capnp::postcopy_summary::Builder,
    s: &crate::postcopy::Summary,
) {
    b.set_pages(s.pages);
    b.set_requests(s.requests);
    b.set_p50_micros(s.p50_us);
    b.set_p99_micros(s.p99_us);
    b.set_max_micros(s.max_us);
    b.set_micros(s.micros);
    b.set_faults(s.faults);
    b.set_backend_faults(s.backend_faults);
}

/// Mappings as (address, bytes, memfd offset), each checked against guest RAM.
fn to_offsets(ram: &Ram, maps: &[(u64, u64, u64)]) -> Result<Vec<(u64, u64, u64)>, capnp::Error> {
    maps.iter()
        .map(|&(va, gpa, bytes)| {
            ram.offset(gpa, bytes)
                .map(|off| (va, bytes, off as u64))
                .ok_or_else(|| {
                    failed(format!(
                        "a mapping of {bytes:#x} bytes at guest address {gpa:#x} is outside guest RAM"
                    ))
                })
        })
        .collect()
}

/// A source's connection (its header read and kept for replay) and its channel's kind.
type Peeked = (Box<dyn Stream>, channel::Kind);

/// A connection whose first bytes were read already (the header `peek` read): they are read
/// again first, then the rest.
struct Replayed {
    head: std::io::Cursor<Vec<u8>>,
    rest: Box<dyn Stream>,
}

impl Read for Replayed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.head.position() as usize) < self.head.get_ref().len() {
            return self.head.read(buf);
        }
        self.rest.read(buf)
    }
}

impl Write for Replayed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.rest.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.rest.flush()
    }
}

impl Stream for Replayed {
    fn shutdown(&self) {
        self.rest.shutdown()
    }
    fn handle(&self) -> std::io::Result<Box<dyn Stream>> {
        self.rest.handle()
    }
    fn shrink_buffers(&self) {
        self.rest.shrink_buffers()
    }
    fn split(self: Box<Self>) -> std::io::Result<channel::Halves> {
        let (r, w) = self.rest.split()?;
        Ok((Box::new(self.head.chain(r)), w))
    }
}

/// Reads what a reader is given, and keeps it.
struct Recording<'a> {
    inner: &'a mut dyn Stream,
    seen: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// The source's connection on `uri`: the one stream there is (exec:, fd:, file:), or the
/// first source on a listener that passes TLS (a stray connection is turned away).
fn source_stream(
    uri: &Uri,
    fd: OwnedFd,
    kind: channel::Kind,
    tls: Option<&tls::Tls>,
    wait: u32,
) -> Result<Box<dyn Stream>, TransferError> {
    let deadline = (wait > 0).then(|| Instant::now() + Duration::from_millis(wait.into()));
    if kind != channel::Kind::Listener {
        if kind == channel::Kind::Stream {
            log::info!("waiting for the source on {uri}");
        }
        let mut stream = channel::stream(uri, fd, kind)?;
        if let Some(t) = tls {
            stream = tls::server(uri, t, stream)?;
        }
        return Ok(stream);
    }
    let mut listener = channel::Listener::new(uri, fd)?;
    loop {
        let s = listener.accept(uri, deadline)?;
        match tls {
            None => return Ok(s),
            // A peer that fails the handshake (or tls-authz) is turned away and the
            // next one is waited for: a stray connection cannot end the migration.
            Some(t) => match tls::server(uri, t, s) {
                Ok(s) => return Ok(s),
                Err(e) => log::warn!("refused a source: {e}"),
            },
        }
    }
}

fn failed(msg: String) -> capnp::Error {
    capnp::Error::failed(msg)
}

impl Server {
    pub fn new(side: OwnedFd) -> Server {
        Server {
            side,
            out: Default::default(),
            cut: Default::default(),
            back: Default::default(),
            sent: Default::default(),
            peeked: Default::default(),
            incoming: Default::default(),
            pages: Default::default(),
            switch: Default::default(),
            paused: Default::default(),
        }
    }

    /// The guest RAM memfd and the channel's descriptor, which vmm-core sent on the side
    /// channel for this call.
    fn fds(&self) -> Result<(OwnedFd, OwnedFd), SideChannelError> {
        let mut buf = [0u8; 16];
        let (n, mut fds) = vmm_proto::rpc::side_message(self.side.as_fd(), &mut buf, 5)?;
        match (fds.len(), fds.pop(), fds.pop()) {
            (2, Some(channel), Some(memfd)) => Ok((memfd, channel)),
            (k, ..) => Err(SideChannelError::Wrong(
                String::from_utf8_lossy(&buf[..n]).into_owned(),
                k,
                "the guest RAM memfd and the channel",
            )),
        }
    }
}

fn read_shape(s: shape::Reader) -> Result<(Vec<(u64, u64)>, Config), capnp::Error> {
    let regions: Vec<(u64, u64)> = s
        .get_regions()?
        .iter()
        .map(|r| (r.get_gpa(), r.get_bytes()))
        .collect();
    let config = Config {
        regions: regions.clone(),
        vcpus: s.get_vcpus(),
        spec: s.get_spec()?.to_str()?.to_string(),
    };
    Ok((regions, config))
}

fn read_tls(
    t: vmm_proto::migrated_capnp::tls::Reader,
    uri: &Uri,
    kind: channel::Kind,
) -> Result<Option<Tls>, capnp::Error> {
    let dir = t.get_creds()?.to_str()?;
    if dir.is_empty() {
        return Ok(None);
    }
    if kind == channel::Kind::File {
        return Err(failed(format!(
            "{uri}: a snapshot file has no peer to authenticate; TLS is for live channels"
        )));
    }
    Ok(Some(Tls {
        dir: dir.to_string(),
        creds: tls::Creds {
            ca: t.get_ca()?.to_vec(),
            cert: t.get_cert()?.to_vec(),
            key: t.get_key()?.to_vec(),
        },
        hostname: t.get_hostname()?.to_str()?.to_string(),
        authz: t
            .get_authz()?
            .iter()
            .map(|a| Ok(a?.to_str()?.to_string()))
            .collect::<Result<_, capnp::Error>>()?,
    }))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, capnp::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| failed(format!("migrated: a worker failed: {e}")))?
        .map_err(|e| failed(e.to_string()))
}

/// A source whose post-copy broke after the destination started the VM: what it needs to
/// go on over a new channel (`recover`).
struct PausedSource {
    uri: Uri,
    ram: Ram,
    limit: u64,
    config: Config,
    /// The pages that were to come at the switch.
    original: Vec<u64>,
}

/// What a pass sent: bytes, pages, zero pages, and, when a switch to post-copy stopped it,
/// the pages it had still to send.
type PassSent = (u64, u64, u64, Option<Vec<u64>>);

/// Sends the pages of `bitmap` (or all).
fn send_pages(o: &mut Outgoing, bitmap: Option<&[u64]>) -> Result<PassSent, TransferError> {
    let before = o.writer.bytes();
    let (p0, z0) = o.writer.counts();
    let zeros = if o.passes == 0 {
        Zeros::Skip
    } else {
        Zeros::Send
    };
    let total = (o.ram.len() / PAGE) as u64;
    let uri = o.uri.clone();
    let io = |e: std::io::Error| TransferError::Transfer(uri.clone(), e);
    // The first pass of all RAM: the destination's is zero, so the memfd's holes (never
    // written) need not even be read.
    let holes;
    let bitmap = match (bitmap, zeros) {
        (None, Zeros::Skip) => {
            let mut b = vec![0u64; total.div_ceil(64) as usize];
            for (start, end) in o.ram.data_ranges().map_err(TransferError::Holes)? {
                for p in start / PAGE as u64..end.div_ceil(PAGE as u64).min(total) {
                    b[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            holes = b;
            Some(&holes[..])
        }
        (b, _) => b,
    };
    // Runs of set bits, each within one region.
    let set = |p: u64| {
        bitmap.is_none_or(|b| {
            b.get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        })
    };
    let regions = o.ram.regions.clone();
    // Runs of up to 4 MiB; under a bandwidth limit 256 KiB, so that the pacing (and the
    // progress it shows) goes in small steps, not a second's worth at a time.
    let run_max: u64 = if o.limit > 0 { 64 } else { 1024 };
    let mut unsent: Option<Vec<u64>> = None;
    for (gpa, bytes, off) in regions {
        let first = off / PAGE as u64;
        let end = first + bytes / PAGE as u64;
        let mut p = first;
        while p < end.min(total) {
            if !set(p) {
                p += 1;
                continue;
            }
            if let Some(u) = unsent.as_mut() {
                u[(p / 64) as usize] |= 1 << (p % 64);
                p += 1;
                continue;
            }
            if o.switch.load(std::sync::atomic::Ordering::Relaxed) {
                // Post-copy from here: what is left of the pass goes with it.
                unsent = Some(vec![0u64; total.div_ceil(64) as usize]);
                continue;
            }
            let mut q = p + 1;
            while q < end && set(q) && q - p < run_max {
                q += 1;
            }
            let live = &o.ram.bytes()[(p * PAGE as u64) as usize..(q * PAGE as u64) as usize];
            if let Err(e) = o
                .writer
                .ram_live(gpa + (p - first) * PAGE as u64, live, zeros)
            {
                // The peer closed: what it said first names why.
                return Err(cut_short(uri, o.writer.get_mut().get_mut().as_mut(), e));
            }
            o.sent
                .bytes
                .store(o.writer.bytes(), std::sync::atomic::Ordering::Relaxed);
            o.sent
                .pages
                .fetch_add(q - p, std::sync::atomic::Ordering::Relaxed);
            o.pace();
            p = q;
        }
    }
    o.passes += 1;
    if let Some(u) = unsent {
        // No pass marker: the switch follows at once.
        let (p1, z1) = o.writer.counts();
        return Ok((o.writer.bytes() - before, p1 - p0, z1 - z0, Some(u)));
    }
    if o.live {
        // The pass is over when the destination has written all of it into guest RAM: its
        // time gives the real bandwidth, and nothing of it is in flight when the VM pauses.
        let n = o.passes;
        if let Err(e) = o.writer.pass(n).and_then(|()| o.writer.get_mut().flush()) {
            // The peer closed: what it said first names why.
            return Err(cut_short(uri, o.writer.get_mut().get_mut().as_mut(), e));
        }
        let s = o.writer.get_mut().get_mut();
        let mut ack = [0u8; 5];
        s.read_exact(&mut ack[..1]).map_err(io)?;
        if ack[0] == REFUSED {
            return Err(refused(uri, s.as_mut()));
        }
        // A TLS record (an alert, 0x15, or a handshake, 0x16): the destination speaks TLS
        // and this source sent it plain text.
        if matches!(ack[0], 0x15 | 0x16) {
            return Err(TransferError::ExpectsTls(uri));
        }
        s.read_exact(&mut ack[1..]).map_err(io)?;
        let got = u32::from_le_bytes(ack[1..].try_into().unwrap());
        if ack[0] != ACKED || got != n {
            return Err(TransferError::BadAck(uri, n, ack[0], got));
        }
    }
    let (p1, z1) = o.writer.counts();
    Ok((o.writer.bytes() - before, p1 - p0, z1 - z0, None))
}

/// What an incoming stream gave: the device state and the bytes read, and, when the source
/// switched to post-copy, the rest of the stream for the page server.
struct Taken {
    state: Vec<u8>,
    bytes: u64,
    postcopy: Option<crate::postcopy::Incoming>,
}

/// Takes a stream into RAM: whole, or up to the switch to post-copy.
pub fn receive(
    mut r: Reader<std::io::BufReader<Box<dyn Read + Send>>>,
    back: &crate::postcopy::Back,
    ram: &Ram,
) -> Result<(Vec<u8>, u64, Option<ReaderAndPending>), ReceiveError> {
    let mut state = None;
    loop {
        match r.section()? {
            Section::Ram { gpa, data } => {
                let off = ram
                    .offset(gpa, data.len() as u64)
                    .ok_or(ReceiveError::RamOutside(gpa))?;
                ram.write_at(off as u64, data)
                    .map_err(ReceiveError::Write)?;
            }
            Section::Zero { gpa, pages } => {
                let n = pages * PAGE as u64;
                let off = ram.offset(gpa, n).ok_or(ReceiveError::ZeroOutside(gpa))?;
                ram.zero(off as u64, n).map_err(ReceiveError::Zero)?;
            }
            Section::Device { name, state: s } if name == VM_SECTION => {
                state = Some(s.to_vec());
            }
            Section::Device { name, .. } => {
                return Err(ReceiveError::UnknownDevice(name.to_string()))
            }
            Section::Pass(n) => {
                // Every page before the marker is in guest RAM: say so, and the source
                // goes on with its next pass.
                let mut ack = [ACKED, 0, 0, 0, 0];
                ack[1..].copy_from_slice(&n.to_le_bytes());
                let mut s = back.lock().unwrap();
                s.write_all(&ack)
                    .and_then(|()| s.flush())
                    .map_err(|e| ReceiveError::Ack(n, e))?;
            }
            // Only a lazy restore uses it.
            Section::Workset(_) => {}
            Section::Postcopy(pending) => {
                let state = state.ok_or(ReceiveError::NoState)?;

                // The pages to come must fault until they come: out of the memfd with them
                // (a page written by an earlier pass is stale now).
                for p in 0..(ram.len() / PAGE) as u64 {
                    if pending[(p / 64) as usize] & (1 << (p % 64)) != 0 {
                        ram.zero(p * PAGE as u64, PAGE as u64)
                            .map_err(ReceiveError::Zero)?;
                    }
                }
                let at = r.position();
                return Ok((state, at, Some((r, pending))));
            }
            Section::End => break,
        }
    }
    let state = state.ok_or(ReceiveError::NoState)?;
    Ok((state, r.position(), None))
}

/// The rest of a stream that switched to post-copy, and its pages to come.
pub type ReaderAndPending = (Reader<std::io::BufReader<Box<dyn Read + Send>>>, Vec<u64>);

impl migrated::Server for Server {
    async fn open(
        self: CapRc<Self>,
        params: migrated::OpenParams,
        _: migrated::OpenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let uri = Uri::parse(p.get_uri()?.to_str()?).map_err(|e| failed(e.to_string()))?;
        let kind = channel::Kind::from(p.get_kind()?);
        let tls = read_tls(p.get_tls()?, &uri, kind)?;
        let (regions, config) = read_shape(p.get_shape()?)?;
        let limit = p.get_bandwidth();
        let compress = p.get_compress();
        let (memfd, fd) = self.fds().map_err(|e| failed(e.to_string()))?;
        let (out, cut) = (self.out.clone(), self.cut.clone());
        let sent = self.sent.clone();
        let switch = self.switch.clone();
        switch.store(false, std::sync::atomic::Ordering::Relaxed);
        sent.bytes.store(0, std::sync::atomic::Ordering::Relaxed);
        sent.pages.store(0, std::sync::atomic::Ordering::Relaxed);
        blocking(move || {
            let ram = Ram::map(&memfd, &regions)?;
            let mut stream = channel::stream(&uri, fd, kind)?;
            *cut.lock().unwrap() = stream.handle().ok();
            if let Some(t) = &tls {
                stream = tls::client(&uri, t, stream)?;
            }
            let writer = Writer::new(BufWriter::with_capacity(1 << 20, stream), &config)
                .map_err(|e| TransferError::Header(uri.clone(), e))?
                .compressing(compress);
            log::info!(
                "{uri}: sending a VM with {config}{}",
                if compress {
                    ", RAM compressed (LZ4)"
                } else {
                    ""
                }
            );
            *out.lock().unwrap() = Some(Outgoing {
                uri,
                live: kind != channel::Kind::File,
                writer,
                ram,
                passes: 0,
                limit,
                began: Instant::now(),
                sent,
                switch,
            });
            Ok(())
        })
        .await
    }

    async fn send_pages(
        self: CapRc<Self>,
        params: migrated::SendPagesParams,
        mut results: migrated::SendPagesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let bitmap: Option<Vec<u64>> = if p.get_all() {
            None
        } else {
            Some(p.get_bitmap()?.iter().collect())
        };
        let out = self.out.clone();
        let start = Instant::now();
        let (bytes, pages, zero, unsent) = blocking(move || {
            let mut g = out.lock().unwrap();
            let o = g.as_mut().ok_or(TransferError::NotOpen)?;
            send_pages(o, bitmap.as_deref())
        })
        .await?;
        if let Some(u) = unsent {
            results.get().set_interrupted(true);
            let mut l = results.get().init_unsent(u.len() as u32);
            for (i, w) in u.iter().enumerate() {
                l.set(i as u32, *w);
            }
        }
        let mut s = results.get().init_stats();
        s.set_bytes(bytes);
        s.set_pages(pages);
        s.set_zero_pages(zero);
        s.set_micros(start.elapsed().as_micros() as u64);
        Ok(())
    }

    async fn finish(
        self: CapRc<Self>,
        params: migrated::FinishParams,
        mut results: migrated::FinishResults,
    ) -> Result<(), capnp::Error> {
        let state = params.get()?.get_state()?.to_vec();
        let workset: Vec<u64> = params.get()?.get_workset()?.iter().collect();
        let (out, cut) = (self.out.clone(), self.cut.clone());
        let bytes = blocking(move || {
            let o = out.lock().unwrap().take().ok_or(TransferError::NotOpen)?;
            let (uri, live) = (o.uri.clone(), o.live);
            let io = |e: std::io::Error| TransferError::Transfer(uri.clone(), e);
            let mut w = o.writer;
            if !workset.is_empty() {
                w.workset(&workset).map_err(io)?;
            }
            w.device(VM_SECTION, &state).map_err(io)?;
            let (raw, packed) = w.compression();
            if raw > 0 {
                log::info!(
                    "{uri}: {} MiB of RAM went compressed as {} MiB",
                    raw >> 20,
                    packed >> 20
                );
            }
            let (buf, bytes) = w.finish().map_err(io)?;
            let mut stream = buf.into_inner().map_err(|e| io(e.into_error()))?;
            if !live {
                // A snapshot: on disk before it is called done.
                stream.flush().map_err(io)?;
                stream
                    .sync()
                    .map_err(|e| TransferError::Sync(uri.clone(), e))?;
                cut.lock().unwrap().take();
                return Ok(bytes);
            }
            // The destination checks the whole stream, restores, and answers.
            let mut answer = [0u8; 1];
            let r = stream.read_exact(&mut answer);
            cut.lock().unwrap().take();
            match r {
                Ok(()) if answer[0] == STARTED => Ok(bytes),
                Ok(()) => Err(refused(uri, stream.as_mut())),
                Err(e) => Err(TransferError::Unconfirmed(uri, e)),
            }
        })
        .await?;
        results.get().set_bytes(bytes);
        Ok(())
    }

    async fn abort(
        self: CapRc<Self>,
        _: migrated::AbortParams,
        _: migrated::AbortResults,
    ) -> Result<(), capnp::Error> {
        if let Some(s) = self.cut.lock().unwrap().take() {
            s.shutdown();
        }
        // A transfer blocked on the connection fails now and lets go of it.
        let out = self.out.clone();
        blocking(move || {
            if let Some(o) = out.lock().unwrap().take() {
                log::info!("{}: the migration was abandoned", o.uri);
            }
            Ok(())
        })
        .await
    }

    async fn receive(
        self: CapRc<Self>,
        params: migrated::ReceiveParams,
        mut results: migrated::ReceiveResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let uri = Uri::parse(p.get_uri()?.to_str()?).map_err(|e| failed(e.to_string()))?;
        let kind = channel::Kind::from(p.get_kind()?);
        let tls = read_tls(p.get_tls()?, &uri, kind)?;
        let (regions, config) = read_shape(p.get_shape()?)?;
        let wait = p.get_wait_ms();
        let (memfd, fd) = self.fds().map_err(|e| failed(e.to_string()))?;
        let back = self.back.clone();
        let peeked = p.get_peeked().then(|| self.peeked.lock().unwrap().take());
        let lazy = p.get_lazy();
        if lazy && kind != channel::Kind::File {
            return Err(failed(format!(
                "{uri}: a lazy restore is from a snapshot file (file:PATH)"
            )));
        }
        let taken = blocking(move || {
            let ram = Ram::map(&memfd, &regions)?;
            if lazy {
                return take_lazy(fd, ram, &config, &uri);
            }
            let (stream, kind) = match peeked {
                Some(Some(peeked)) => peeked,
                Some(None) => return Err(TransferError::NotPeeked(uri.clone())),
                None => (source_stream(&uri, fd, kind, tls.as_ref(), wait)?, kind),
            };
            take(stream, ram, &config, &uri, kind, &back)
        })
        .await?;
        results.get().set_state(&taken.state);
        results.get().set_bytes(taken.bytes);
        results.get().set_postcopy(taken.postcopy.is_some());
        *self.incoming.lock().unwrap() = taken.postcopy;
        Ok(())
    }

    async fn postcopy(
        self: CapRc<Self>,
        params: migrated::PostcopyParams,
        mut results: migrated::PostcopyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let state = p.get_state()?.to_vec();
        let pending: Vec<u64> = p.get_pending()?.iter().collect();
        let bandwidth = p.get_bandwidth();
        let (out, cut, sent) = (self.out.clone(), self.cut.clone(), self.sent.clone());
        let paused = self.paused.clone();
        let switched = blocking(move || {
            let o = out.lock().unwrap().take().ok_or(TransferError::NotOpen)?;
            if !o.live {
                return Err(TransferError::NotLive(o.uri));
            }
            let Outgoing {
                uri,
                writer,
                ram,
                limit,
                ..
            } = o;
            let config = writer.config().clone();
            let original = pending.clone();
            let limit = if bandwidth > 0 { bandwidth } else { limit };
            let source = crate::postcopy::Source {
                uri: uri.clone(),
                ram: &ram,
                limit,
                bytes: &sent.bytes,
                pages: &sent.pages,
            };
            let r = crate::postcopy::send(&source, writer, &state, pending);
            cut.lock().unwrap().take();
            if let Ok(crate::postcopy::Switched::Ran(Err(e))) = &r {
                // The VM runs at the destination, which lacks pages only this side has:
                // kept for a recovery on a new channel.
                log::error!("{uri}: post-copy broke: {e}; the VM stays paused here until `vmmctl migrate recover URI`");
                *paused.lock().unwrap() = Some(PausedSource {
                    uri,
                    ram,
                    limit,
                    config,
                    original,
                });
            }
            r
        })
        .await?;
        match switched {
            crate::postcopy::Switched::Refused(e) => Err(failed(e.to_string())),
            crate::postcopy::Switched::Ran(r) => {
                let (summary, broken) = match r {
                    Ok(s) => (s, String::new()),
                    Err(e) => (Default::default(), e.to_string()),
                };
                write_summary(results.get().init_summary(), &summary);
                results.get().set_broken(&broken);
                Ok(())
            }
        }
    }

    async fn serve_faults(
        self: CapRc<Self>,
        params: migrated::ServeFaultsParams,
        _: migrated::ServeFaultsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let who = p.get_who()?.to_str()?.to_string();
        let placer = p.get_placer();
        let (_memfd, fd) = self.fds().map_err(|e| failed(e.to_string()))?;
        let uffd = vmm_sandbox::uffd::Uffd::from_fd(fd);
        let mut maps = Vec::new();
        for m in p.get_mappings()?.iter() {
            let (va, gpa, bytes) = (m.get_va(), m.get_gpa(), m.get_bytes());
            maps.push((va, gpa, bytes));
        }
        if placer {
            let inc = self
                .incoming
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| failed("no stream switched to post-copy here".into()))?;
            let maps = to_offsets(&inc.ram, &maps)?;
            let server = crate::postcopy::Server::start(inc, uffd, maps)
                .map_err(|e| failed(format!("cannot start the page server ({e})")))?;
            *self.pages.lock().unwrap() = Some(Arc::new(server));
        } else {
            let g = self.pages.lock().unwrap();
            let server = g
                .as_ref()
                .ok_or_else(|| failed("the page server has not started".into()))?;
            let maps = to_offsets(server.ram(), &maps)?;
            server.add(&who, uffd, maps);
        }
        Ok(())
    }

    async fn postcopy_wait(
        self: CapRc<Self>,
        params: migrated::PostcopyWaitParams,
        mut results: migrated::PostcopyWaitResults,
    ) -> Result<(), capnp::Error> {
        let server = self
            .pages
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| failed("the page server has not started".into()))?;
        let seen = params.get()?.get_seen();
        let r = blocking(move || Ok(server.wait(seen))).await?;
        match r {
            crate::postcopy::State::Done(Ok(s)) => write_summary(results.get().init_summary(), &s),
            crate::postcopy::State::Done(Err(e)) => results.get().set_broken(e.to_string()),
            crate::postcopy::State::Paused(why, n) => {
                results.get().set_paused(&why);
                results.get().set_pauses(n);
            }
            crate::postcopy::State::Running => {}
        }
        Ok(())
    }

    async fn recover(
        self: CapRc<Self>,
        params: migrated::RecoverParams,
        mut results: migrated::RecoverResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let uri = Uri::parse(p.get_uri()?.to_str()?).map_err(|e| failed(e.to_string()))?;
        let kind = channel::Kind::from(p.get_kind()?);
        let wait = p.get_wait_ms();
        let (_placeholder, fd) = self.fds().map_err(|e| failed(e.to_string()))?;
        let source = self.paused.lock().unwrap().take();
        if let Some(ps) = source {
            // The source: connect, and send what the destination lacks.
            let tls = read_tls(p.get_tls()?, &uri, kind)?;
            let (paused, sent) = (self.paused.clone(), self.sent.clone());
            let r = blocking(move || {
                let r = (|| {
                    let mut stream = channel::stream(&uri, fd, kind)?;
                    if let Some(t) = &tls {
                        stream = tls::client(&uri, t, stream)?;
                    }
                    let source = crate::postcopy::Source {
                        uri: uri.clone(),
                        ram: &ps.ram,
                        limit: ps.limit,
                        bytes: &sent.bytes,
                        pages: &sent.pages,
                    };
                    crate::postcopy::resume(&source, stream, &ps.config, &ps.original)
                })();
                match r {
                    Ok(Ok(summary)) => Ok(Ok(summary)),
                    // Still paused: it may be tried again.
                    Ok(Err(e)) => {
                        log::error!("{}: post-copy broke again: {e}", ps.uri);
                        *paused.lock().unwrap() = Some(ps);
                        Ok(Err(e))
                    }
                    Err(e) => {
                        *paused.lock().unwrap() = Some(ps);
                        Err(e)
                    }
                }
            })
            .await?;
            match r {
                Ok(s) => write_summary(results.get().init_summary(), &s),
                Err(e) => results.get().set_broken(e.to_string()),
            }
            return Ok(());
        }
        // The destination: take the source's new connection.
        let server = self
            .pages
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| failed("no post-copy here to recover".into()))?;
        let tls = read_tls(p.get_tls()?, &uri, kind)?;
        blocking(move || {
            let stream = source_stream(&uri, fd, kind, tls.as_ref(), wait)?;
            server
                .recover(stream)
                .map_err(|e| TransferError::Recover(uri.clone(), e.to_string()))
        })
        .await
    }

    async fn switch_now(
        self: CapRc<Self>,
        _: migrated::SwitchNowParams,
        _: migrated::SwitchNowResults,
    ) -> Result<(), capnp::Error> {
        self.switch
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn postcopy_end(
        self: CapRc<Self>,
        _: migrated::PostcopyEndParams,
        _: migrated::PostcopyEndResults,
    ) -> Result<(), capnp::Error> {
        if let Some(s) = self.pages.lock().unwrap().take() {
            s.stop();
        }
        Ok(())
    }

    async fn progress(
        self: CapRc<Self>,
        _: migrated::ProgressParams,
        mut results: migrated::ProgressResults,
    ) -> Result<(), capnp::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        results.get().set_bytes(self.sent.bytes.load(Relaxed));
        results.get().set_pages(self.sent.pages.load(Relaxed));
        Ok(())
    }

    async fn peek(
        self: CapRc<Self>,
        params: migrated::PeekParams,
        mut results: migrated::PeekResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let uri = Uri::parse(p.get_uri()?.to_str()?).map_err(|e| failed(e.to_string()))?;
        let kind = channel::Kind::from(p.get_kind()?);
        let tls = read_tls(p.get_tls()?, &uri, kind)?;
        let wait = p.get_wait_ms();
        let (_placeholder, fd) = self.fds().map_err(|e| failed(e.to_string()))?;
        let peeked = self.peeked.clone();
        let spec = blocking(move || {
            let mut stream = source_stream(&uri, fd, kind, tls.as_ref(), wait)?;
            let mut rec = Recording {
                inner: stream.as_mut(),
                seen: Vec::new(),
            };
            let spec = Reader::new(&mut rec)
                .map(|r| r.config().spec.clone())
                .map_err(|e| TransferError::Receive(uri.clone(), ReceiveError::from(e)))?;
            let head = std::io::Cursor::new(rec.seen);
            *peeked.lock().unwrap() = Some((Box::new(Replayed { head, rest: stream }), kind));
            Ok(spec)
        })
        .await?;
        results.get().set_spec(&spec);
        Ok(())
    }

    async fn started(
        self: CapRc<Self>,
        params: migrated::StartedParams,
        _: migrated::StartedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (ok, why) = (p.get_ok(), p.get_why()?.to_str()?.to_string());
        let back = self.back.clone();
        blocking(move || {
            let Some(s) = back.lock().unwrap().take() else {
                return Ok(());
            };
            let mut s = s.lock().unwrap();
            if ok {
                s.write_all(&[STARTED])
                    .and_then(|()| s.flush())
                    .map_err(TransferError::Confirm)?;
            } else {
                refuse_to(s.as_mut(), &why);
            }
            Ok(())
        })
        .await
    }
}

/// The destination's writing half to its source, kept for the answer `started` sends.
type Back = Arc<Mutex<Option<crate::postcopy::Back>>>;

/// Receives the stream (whole, or up to a switch to post-copy); a live source's connection
/// is kept for the answer (or told at once why the VM was refused).
fn take(
    stream: Box<dyn Stream>,
    ram: Ram,
    config: &Config,
    uri: &Uri,
    kind: channel::Kind,
    back: &Back,
) -> Result<Taken, TransferError> {
    let io = |e| TransferError::Transfer(uri.clone(), e);
    let handle = stream.handle().ok();
    let (r, w) = stream.split().map_err(io)?;
    let w = crate::postcopy::back(w);
    let got = Reader::new(std::io::BufReader::with_capacity(1 << 20, r))
        .and_then(|r| r.check_config(config).map(|()| r))
        .map_err(ReceiveError::from)
        .and_then(|r| receive(r, &w, &ram))
        .map_err(|e| TransferError::Receive(uri.clone(), e));
    if kind != channel::Kind::File {
        match &got {
            Ok(_) => *back.lock().unwrap() = Some(w.clone()),
            Err(e) => refuse_to(w.lock().unwrap().as_mut(), &e.to_string()),
        }
    }
    let (state, bytes, rest) = got?;
    if let (Some(h), Some(_)) = (&handle, &rest) {
        h.shrink_buffers();
    }
    let postcopy = rest.map(|(reader, pending)| crate::postcopy::Incoming {
        uri: uri.clone(),
        config: config.clone(),
        rest: crate::postcopy::Rest::Stream { reader, back: w },
        pending,
        ram,
    });
    Ok(Taken {
        state,
        bytes,
        postcopy,
    })
}

/// Lazy restore: indexes the snapshot file (its header, section heads and device state,
/// each checked), and leaves its RAM to the page server.
fn take_lazy(fd: OwnedFd, ram: Ram, config: &Config, uri: &Uri) -> Result<Taken, TransferError> {
    let bad = |e: StreamError| TransferError::Receive(uri.clone(), ReceiveError::from(e));
    let file = std::fs::File::from(fd);
    let index = crate::stream::Index::read(&file).map_err(bad)?;
    let probe = Reader::resume(std::io::empty(), index.config.clone(), 0);
    probe.check_config(config).map_err(bad)?;
    let mut state = None;
    for (name, s) in &index.devices {
        if name != VM_SECTION {
            return Err(TransferError::Receive(
                uri.clone(),
                ReceiveError::UnknownDevice(name.clone()),
            ));
        }
        state = Some(s.clone());
    }
    let state = state.ok_or(TransferError::Receive(uri.clone(), ReceiveError::NoState))?;
    let mut pending = vec![0u64; config.bitmap_words()];
    for &(_, _, first, pages) in &index.runs {
        for p in first..first + pages {
            pending[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    log::info!(
        "{uri}: lazy restore: {} RAM section(s) indexed; the VM runs while they load",
        index.runs.len()
    );
    Ok(Taken {
        state,
        bytes: index.bytes,
        postcopy: Some(crate::postcopy::Incoming {
            uri: uri.clone(),
            config: config.clone(),
            rest: crate::postcopy::Rest::File { file, index },
            pending,
            ram,
        }),
    })
}

/// Serves one control connection (vmm-core's) until it ends.
pub async fn serve(stream: std::os::unix::net::UnixStream) {
    let Ok(stream) = vmm_proto::rpc::tokio_stream(stream) else {
        return;
    };
    let side = match vmm_proto::rpc::accept_side_channel(&stream).await {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("refused a control connection: {e}; see proto/schema/migrated.capnp");
            return;
        }
    };
    let server = std::rc::Rc::new(Server::new(side));
    let client: migrated::Client = capnp_rpc::new_client_from_rc(server);
    let _ = vmm_proto::rpc::server(stream, client.client).await;
}
