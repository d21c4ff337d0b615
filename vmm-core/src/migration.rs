//! vmm-core's side of migration and snapshots: it starts migrated (at start-up, before the
//! main thread's filter forbids new processes) and drives it over RPC
//! (proto/schema/migrated.capnp). vmm-core owns the pause, the device state and KVM's dirty
//! log; migrated owns the transfer and moves guest RAM from and to the memfd itself.
//!
//! vmm-core opens the channel (vmm_proto::channel: it connects or listens, starts an exec:
//! command, creates or opens the snapshot file, reads the tls-creds files) on migrated's
//! client thread, and hands migrated the descriptor: migrated, sandboxed, reaches no network,
//! file or program by itself.

use crate::control::LoopError;
use crate::control::{MigrationRequest, Reply, VmEvent};
pub use crate::control::{PostcopyFailed, PostcopySummary};
use crate::helpers::migrated::{Migrated, MigratedError};
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Mutex;
use vmm_proto::channel::{self, ChannelError, Creds, Opened, Uri};

/// Why a migration, a snapshot or an incoming VM failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("cannot duplicate a descriptor for migrated ({0})")]
    Duplicate(std::io::Error),
    #[error("{0}: descriptor {1} is not one vmm-core inherited when it started (or it was used already); start vmm-core with the channel open as fd {1}")]
    NotInherited(String, i32),
    #[error(transparent)]
    Migrated(#[from] MigratedError),
    #[error("the VM is stopping")]
    VmStopping,
    #[error("the VM stopped before it answered")]
    NoAnswer,
    #[error(transparent)]
    Vm(#[from] LoopError),
    /// The migration failed before the destination ran the VM: it goes on here.
    #[error("{0}; the VM goes on here")]
    Resumed(Box<MigrationError>),
    #[error("post-copy: {0}")]
    Uffd(String),
    #[error("cancelled (vmmctl migrate cancel)")]
    Cancelled,
    #[error("{0}; and the VM could not go on here: {1}")]
    NotResumed(Box<MigrationError>, Box<MigrationError>),
    /// Post-copy broke after the destination started the VM: its RAM is split between the
    /// two hosts, so it cannot go on here either; it stays paused.
    #[error("post-copy broke after the destination started the VM: {0}; the VM's memory is split between the two hosts, so it stays paused here and cannot resume")]
    PostcopyBroken(String),
}

impl From<capnp::Error> for MigrationError {
    fn from(e: capnp::Error) -> Self {
        MigrationError::Migrated(e.into())
    }
}

/// Descriptors vmm-core inherited when it started: what an fd:N channel may name (each one
/// once; it is closed after use, as QEMU does).
static INHERITED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Inherited descriptors a destination's peek took for its incoming channel: the incoming
/// VM's settings still name them, and they are valid there (the peeked connection goes on).
static PEEKED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Notes the descriptors above 2 that are open now; call first thing in main.
pub fn note_inherited_fds() {
    let names: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&n| n > 2)
            .collect(),
        Err(_) => return,
    };
    let mut set = INHERITED.lock().unwrap();
    for n in names {
        // Still open: the directory's own descriptor, closed by now, is not.
        if std::fs::symlink_metadata(format!("/proc/self/fd/{n}")).is_ok() {
            set.insert(n);
        }
    }
}

/// Whether fd:N names a descriptor vmm-core inherited and has not used.
pub fn check_fd(uri: &str, n: i32) -> Result<(), MigrationError> {
    if INHERITED.lock().unwrap().contains(&n) || PEEKED.lock().unwrap().contains(&n) {
        Ok(())
    } else {
        Err(MigrationError::NotInherited(uri.to_string(), n))
    }
}

/// Takes the inherited descriptor of an fd:N channel (it is closed when the channel is).
fn take_fd(uri: &Uri, n: i32) -> Result<OwnedFd, MigrationError> {
    if !INHERITED.lock().unwrap().contains(&n) {
        return Err(MigrationError::NotInherited(uri.to_string(), n));
    }
    INHERITED.lock().unwrap().remove(&n);
    // Taken out of the set, so only this channel owns it now.
    vmm_sandbox::fd::take(n).ok_or_else(|| MigrationError::NotInherited(uri.to_string(), n))
}

/// Opens the channel for one side (on migrated's client thread, which may), and reads the
/// side's tls-creds files first.
async fn open_channel(
    uri: &str,
    tls: &TlsOptions,
    source: bool,
) -> Result<(Opened, Option<Creds>), MigrationError> {
    let uri = Uri::parse(uri)?;
    let creds = match tls.creds.as_str() {
        "" => None,
        dir => Some(channel::Creds::read(Path::new(dir), !source)?),
    };
    let opened = match (&uri, source) {
        (Uri::Fd(n), _) => channel::classify(&uri, take_fd(&uri, *n)?)?,
        (_, true) => channel::open_source(&uri).await?,
        (_, false) => channel::open_destination(&uri)?,
    };
    Ok((opened, creds))
}

/// The VM's RAM regions as migrated's shape: (gpa, bytes) in memfd order, and the vCPUs.
pub fn write_shape(
    mut b: vmm_proto::migrated_capnp::shape::Builder,
    memory: u64,
    vcpus: u32,
    spec: &str,
) {
    let ranges = vmm_devices::layout::ram_ranges(memory);
    b.set_vcpus(vcpus);
    b.set_spec(spec);
    let mut l = b.init_regions(ranges.len() as u32);
    for (i, (gpa, len, _)) in ranges.into_iter().enumerate() {
        let mut r = l.reborrow().get(i as u32);
        r.set_gpa(gpa);
        r.set_bytes(len);
    }
}

/// `vmmctl migrate status`: what the last or current migration is doing.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub phase: String,
    pub uri: String,
    pub passes: u32,
    pub bytes: u64,
    pub ram_bytes: u64,
    pub dirty_pages: u64,
    pub dirty_rate_pages: u64,
    pub bandwidth: u64,
    pub expected_downtime_ms: u64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub error: String,
    /// The pause came at max_passes, not because the pages left fit the limit.
    pub forced: bool,
    /// `vmmctl migrate cancel` asked for it to end.
    pub cancelled: bool,
    /// Post-copy: allowed from the start (--postcopy), asked for during pre-copy (`vmmctl
    /// migrate postcopy`), and what it did.
    pub postcopy_allowed: bool,
    pub postcopy_asked: bool,
    pub postcopy: Option<PostcopySummary>,
    /// This side is the destination (of a post-copy).
    pub destination: bool,
}

impl Status {
    /// A migration or snapshot is sending the VM (or, post-copy, the destination runs it
    /// while pages still come): the devices must stay what the stream says.
    pub fn under_way(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "setup" | "pre-copy" | "stop-and-copy" | "postcopy-active" | "postcopy-paused"
        )
    }
}

/// The least of the downtime limit kept for what the pause holds besides the last pages
/// (a quarter of the limit is kept, and at least this).
pub const RESERVE_MIN_MS: u64 = 5;

/// Pre-copy passes before the VM is paused even over the limit (QEMU iterates without end
/// unless auto-converge or post-copy is on; a bound and a clear report are kinder).
pub const DEFAULT_MAX_PASSES: u32 = 30;

/// A migration's knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub uri: String,
    pub downtime_ms: u64,
    /// Bytes per second; 0 is no limit.
    pub bandwidth: u64,
    pub max_passes: u32,
    pub tls: TlsOptions,
    /// LZ4-compress RAM runs.
    pub compress: bool,
    /// The VM's run settings as a --config file, carried in the stream's header.
    pub spec: String,
    /// Switch to post-copy after the first pass that does not meet the downtime limit.
    pub postcopy: bool,
    /// Bytes per second for post-copy's background pages (0: `bandwidth`).
    pub postcopy_bandwidth: u64,
    /// A snapshot: ms of dirty logging before the pause, to record the working set (0: none).
    pub workset_ms: u32,
}

/// QEMU's tls-creds (a directory; empty: no TLS), tls-hostname and tls-authz.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub creds: String,
    pub hostname: String,
    pub authz: Vec<String>,
}

fn write_tls(
    mut b: vmm_proto::migrated_capnp::tls::Builder,
    t: &TlsOptions,
    creds: Option<&Creds>,
) {
    let Some(c) = creds else {
        return;
    };
    b.set_creds(t.creds.as_str());
    b.set_ca(&c.ca);
    b.set_cert(&c.cert);
    b.set_key(&c.key);
    b.set_hostname(t.hostname.as_str());
    let mut l = b.init_authz(t.authz.len() as u32);
    for (i, a) in t.authz.iter().enumerate() {
        l.set(i as u32, a.as_str());
    }
}

pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// One request to the main thread, and its answer.
async fn ask<T>(
    tx: &std::sync::mpsc::Sender<VmEvent>,
    make: impl FnOnce(Reply<T>) -> MigrationRequest,
) -> Result<T, MigrationError> {
    let (reply, answer) = futures::channel::oneshot::channel();
    tx.send(VmEvent::Migration(make(reply)))
        .map_err(|_| MigrationError::VmStopping)?;
    Ok(answer.await.map_err(|_| MigrationError::NoAnswer)??)
}

fn or(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x |= y;
    }
}

fn count(b: &[u64]) -> u64 {
    b.iter().map(|w| u64::from(w.count_ones())).sum()
}

struct PassStats {
    bytes: u64,
    pages: u64,
    micros: u64,
    /// A switch to post-copy stopped the pass: the pages it had still to send.
    unsent: Option<Vec<u64>>,
}

async fn send_pages(m: &Migrated, bitmap: Option<Vec<u64>>) -> Result<PassStats, MigrationError> {
    m.call(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.send_pages_request();
            match &bitmap {
                None => req.get().set_all(true),
                Some(b) => {
                    let mut l = req.get().init_bitmap(b.len() as u32);
                    for (i, w) in b.iter().enumerate() {
                        l.set(i as u32, *w);
                    }
                }
            }
            let r = req.send().promise.await?;
            let r = r.get()?;
            let s = r.get_stats()?;
            let unsent = if r.get_interrupted() {
                Some(r.get_unsent()?.iter().collect())
            } else {
                None
            };
            Ok(PassStats {
                bytes: s.get_bytes(),
                pages: s.get_pages() + s.get_zero_pages(),
                micros: s.get_micros().max(1),
                unsent,
            })
        })
    })
    .await
}

/// What migrated has sent so far in this stream: (bytes, guest pages).
async fn sent_so_far(m: &Migrated) -> Result<(u64, u64), MigrationError> {
    m.call(|conn| {
        Box::pin(async move {
            let r = conn.client.progress_request().send().promise.await?;
            let r = r.get()?;
            Ok((r.get_bytes(), r.get_pages()))
        })
    })
    .await
}

/// `send_pages`, with the status kept true while the pass runs: every 250 ms the bytes and
/// pages migrated has sent so far, and the rate since the last look (a pass of a large VM
/// takes seconds; counting only at its end showed 0 until then). A `migration` event each
/// second says the same.
async fn send_pages_watched(
    m: &Migrated,
    bitmap: Option<Vec<u64>>,
    progress: &Progress,
    events: &crate::events::Events,
) -> Result<PassStats, MigrationError> {
    let mut call = std::pin::pin!(send_pages(m, bitmap));
    let mut last = (std::time::Instant::now(), progress.lock().unwrap().bytes);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            r = &mut call => {
                if let Ok((bytes, pages)) = sent_so_far(m).await {
                    let mut s = progress.lock().unwrap();
                    s.bytes = bytes;
                    s.ram_bytes = pages * vmm_devices::layout::PAGE_SIZE;
                }
                return r;
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                let Ok((bytes, pages)) = sent_so_far(m).await else { continue };
                let now = std::time::Instant::now();
                let rate = (bytes.saturating_sub(last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3)) as u64;
                last = (now, bytes);
                let line = {
                    let mut s = progress.lock().unwrap();
                    s.bytes = bytes;
                    s.ram_bytes = pages * vmm_devices::layout::PAGE_SIZE;
                    s.bandwidth = rate;
                    format!("pass {}: {} MiB sent, {} MiB/s", s.passes + 1, bytes >> 20, rate >> 20)
                };
                ticks += 1;
                if ticks.is_multiple_of(4) {
                    events.emit("migration", line);
                }
            }
        }
    }
}

/// Opens the channel (the guest RAM memfd goes to migrated first).
async fn open(
    m: &Migrated,
    memfd: std::fs::File,
    opts: &Options,
    memory: u64,
    vcpus: u32,
) -> Result<(), MigrationError> {
    let (uri, tls, bandwidth, compress, spec) = (
        opts.uri.clone(),
        opts.tls.clone(),
        opts.bandwidth,
        opts.compress,
        opts.spec.clone(),
    );
    m.call(move |conn| {
        Box::pin(async move {
            let (opened, creds) = open_channel(&uri, &tls, true).await?;
            let kind = conn.hand_over(&memfd, opened)?;
            let mut req = conn.client.open_request();
            req.get().set_uri(uri.as_str());
            req.get().set_kind(kind);
            req.get().set_bandwidth(bandwidth);
            req.get().set_compress(compress);
            write_tls(req.get().init_tls(), &tls, creds.as_ref());
            write_shape(req.get().init_shape(), memory, vcpus, &spec);
            req.send().promise.await?;
            Ok(())
        })
    })
    .await
}

async fn finish(m: &Migrated, state: Vec<u8>, workset: Vec<u64>) -> Result<u64, MigrationError> {
    m.call(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.finish_request();
            req.get().set_state(&state);
            let mut l = req.get().init_workset(workset.len() as u32);
            for (i, w) in workset.iter().enumerate() {
                l.set(i as u32, *w);
            }
            let r = req.send().promise.await?;
            let bytes = r.get()?.get_bytes();
            conn.channel_done();
            Ok(bytes)
        })
    })
    .await
}

/// `vmmctl migrate postcopy`: the pass under way stops after its current run, and the
/// migration switches to post-copy.
pub async fn switch_now(m: &Migrated) -> Result<(), MigrationError> {
    m.call(|conn| {
        Box::pin(async move {
            conn.client.switch_now_request().send().promise.await?;
            Ok(())
        })
    })
    .await
}

/// Cuts the channel of the migration under way: it fails, and the VM goes on here.
pub async fn cancel(m: &Migrated) {
    abort(m).await
}

async fn abort(m: &Migrated) {
    let _: Result<(), MigrationError> = m
        .call(|conn| {
            Box::pin(async move {
                // The command dies and the partial snapshot goes first: a transfer blocked
                // on the channel then fails at once.
                conn.channel_failed();
                conn.client.abort_request().send().promise.await?;
                Ok(())
            })
        })
        .await;
}

/// Where the progress goes: `vmmctl migrate status` reads it.
pub type Progress = std::sync::Arc<std::sync::Mutex<Status>>;

/// Sends the VM to `opts.uri`: a snapshot for file:, else a live pre-copy migration. On
/// success the VM has left (a snapshot: it goes on, or stays paused as it was). On failure
/// before the destination confirmed, the VM goes on here and the error says why.
pub async fn send(
    m: &Migrated,
    tx: &std::sync::mpsc::Sender<VmEvent>,
    progress: &Progress,
    events: &crate::events::Events,
    opts: Options,
    memory: u64,
    vcpus: u32,
) -> Result<(), MigrationError> {
    let start = std::time::Instant::now();
    let live = !opts.uri.starts_with("file:");
    let set = |f: &dyn Fn(&mut Status)| f(&mut progress.lock().unwrap());
    *progress.lock().unwrap() = Status {
        phase: "setup".into(),
        uri: opts.uri.clone(),
        postcopy_allowed: opts.postcopy,
        ..Default::default()
    };
    let memfd = ask(tx, MigrationRequest::Memfd).await?;
    let r = transfer(
        m, tx, progress, events, &opts, memfd, memory, vcpus, live, start,
    )
    .await;
    if live {
        let _ = ask(tx, |r| MigrationRequest::DirtyLog(false, r)).await;
    }
    match r {
        Ok(downtime) => {
            set(&|s| {
                s.phase = "completed".into();
                s.total_ms = start.elapsed().as_millis() as u64;
                s.downtime_ms = downtime;
            });
            if live {
                let _ = tx.send(VmEvent::Migration(MigrationRequest::Leave));
            } else {
                ask(tx, MigrationRequest::Continue).await?;
            }
            Ok(())
        }
        Err(e @ MigrationError::PostcopyBroken(_)) => {
            set(&|s| {
                s.phase = "postcopy-paused".into();
                s.error = crate::error_chain(&e);
                s.total_ms = start.elapsed().as_millis() as u64;
            });
            log::error!("{}: {e}", opts.uri);
            Err(e)
        }
        Err(e) => {
            abort(m).await;
            let resumed = ask(tx, MigrationRequest::Continue).await;
            let cancelled = progress.lock().unwrap().cancelled;
            // A cancel makes the transfer fail (its channel is cut): say what happened.
            let e = if cancelled {
                MigrationError::Cancelled
            } else {
                e
            };
            set(&|s| {
                s.phase = if cancelled { "cancelled" } else { "failed" }.into();
                s.error = crate::error_chain(&e);
                s.total_ms = start.elapsed().as_millis() as u64;
            });
            if cancelled {
                log::info!(
                    "{}: the migration was cancelled; the VM goes on here",
                    opts.uri
                );
            }
            match resumed {
                Ok(()) => Err(MigrationError::Resumed(Box::new(e))),
                Err(r) => Err(MigrationError::NotResumed(Box::new(e), Box::new(r))),
            }
        }
    }
}

/// The transfer proper; returns the downtime in ms.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    m: &Migrated,
    tx: &std::sync::mpsc::Sender<VmEvent>,
    progress: &Progress,
    events: &crate::events::Events,
    opts: &Options,
    memfd: std::fs::File,
    memory: u64,
    vcpus: u32,
    live: bool,
    start: std::time::Instant,
) -> Result<u64, MigrationError> {
    let set = |f: &dyn Fn(&mut Status)| f(&mut progress.lock().unwrap());
    open(m, memfd, opts, memory, vcpus).await?;
    let mut pending: Option<Vec<u64>> = None;
    if live {
        ask(tx, |r| MigrationRequest::DirtyLog(true, r)).await?;
        set(&|s| s.phase = "pre-copy".into());
        let mut bitmap: Option<Vec<u64>> = None;
        let mut pass = 0u32;
        loop {
            let sent = send_pages_watched(m, bitmap.take(), progress, events).await?;
            pass += 1;
            // Bytes per second, from what this pass took.
            let bw = (sent.bytes.max(1) * 1_000_000) / sent.micros;
            let mut dirty = ask(tx, MigrationRequest::TakeDirty).await?;
            if let Some(unsent) = sent.unsent {
                // `vmmctl migrate postcopy` stopped the pass: what it had still to send and
                // what the guest wrote meanwhile follow after the switch.
                or(&mut dirty, &unsent);
                log::info!(
                    "{}: switching to post-copy during pass {pass}, as asked",
                    opts.uri
                );
                set(&|s| s.passes = pass);
                return postcopy(m, tx, progress, opts, dirty, memory).await;
            }
            let n = count(&dirty);
            let rate = n * 1_000_000 / sent.micros;
            let expected_ms = n * vmm_devices::layout::PAGE_SIZE * 1000 / bw.max(1);
            set(&|s| {
                s.passes = pass;
                s.dirty_pages = n;
                s.dirty_rate_pages = rate;
                s.bandwidth = bw;
                s.expected_downtime_ms = expected_ms;
            });
            log::info!(
                "migration pass {pass}: {} KiB in {} ms; {n} page(s) dirty, expected downtime {expected_ms} ms",
                sent.bytes >> 10,
                sent.micros / 1000
            );
            // The pause is the last pages, which go slower than a pre-copy pass's (scattered,
            // the disk's pages with them: measured here at up to 1.3x, more on a loaded host),
            // and what it holds besides: saving the vCPUs and devices, the device state and
            // the destination's restore and answer (5-7 ms here). Both are kept: twice the
            // estimate and a quarter of the limit (at least RESERVE_MIN_MS).
            let reserve = (opts.downtime_ms / 4).max(RESERVE_MIN_MS);
            if expected_ms * 2 + reserve <= opts.downtime_ms {
                pending = Some(dirty);
                break;
            }
            if opts.postcopy || progress.lock().unwrap().postcopy_asked {
                log::info!(
                    "{}: pass {pass} leaves {n} page(s), about {expected_ms} ms at this rate: switching to post-copy",
                    opts.uri
                );
                return postcopy(m, tx, progress, opts, dirty, memory).await;
            }
            if pass >= opts.max_passes {
                log::warn!(
                    "{}: {pass} passes and the pause would still take about {} ms, over the {} ms limit; pausing anyway (--max-passes)",
                    opts.uri,
                    expected_ms * 2 + reserve,
                    opts.downtime_ms
                );
                set(&|s| s.forced = true);
                pending = Some(dirty);
                break;
            }
            bitmap = Some(dirty);
        }
    }
    // A snapshot's working set: the pages the guest writes in the last moments before the
    // pause.
    let workset = if !live && opts.workset_ms > 0 {
        ask(tx, |r| MigrationRequest::DirtyLog(true, r)).await?;
        tokio::time::sleep(std::time::Duration::from_millis(opts.workset_ms.into())).await;
        let mut w = ask(tx, MigrationRequest::TakeDirty).await;
        let _ = ask(tx, |r| MigrationRequest::DirtyLog(false, r)).await;
        if let Ok(w) = &mut w {
            w.resize(
                (memory / vmm_devices::layout::PAGE_SIZE).div_ceil(64) as usize,
                0,
            );
            log::info!(
                "{}: working set: {} page(s) written in {} ms",
                opts.uri,
                count(w),
                opts.workset_ms
            );
        }
        w?
    } else {
        Vec::new()
    };
    set(&|s| s.phase = "stop-and-copy".into());
    let stop = std::time::Instant::now();
    let saved = ask(tx, MigrationRequest::Save).await?;
    let last = if !live || saved.unlogged_writers {
        // Everything: a snapshot, or RAM a backend may have written unseen.
        None
    } else {
        let mut b = pending.unwrap_or_default();
        or(&mut b, saved.dirty.as_deref().unwrap_or(&[]));
        Some(b)
    };
    let saved_ms = stop.elapsed().as_millis();
    let sent = send_pages_watched(m, last, progress, events).await?;
    let last_ms = stop.elapsed().as_millis() - saved_ms;
    let bytes = finish(m, saved.state, workset).await?;
    let downtime = stop.elapsed().as_millis() as u64;
    log::info!(
        "stop-and-copy: paused and saved in {saved_ms} ms, the last {} page(s) in {last_ms} ms, the device state and the destination's answer in {} ms",
        sent.pages,
        u128::from(downtime) - saved_ms - last_ms
    );
    set(&|s| s.bytes = bytes);
    log::info!(
        "{}: {} MiB sent in {} ms; the VM was paused for {downtime} ms",
        opts.uri,
        bytes >> 20,
        start.elapsed().as_millis()
    );
    Ok(downtime)
}

/// The switch to post-copy: pauses the VM, sends its state and the pages still to come, and
/// returns (the downtime in ms) once the destination has every page. A failure before the
/// destination ran the VM is an error the caller answers by resuming here; one after is
/// `PostcopyBroken`, and the VM stays paused.
async fn postcopy(
    m: &Migrated,
    tx: &std::sync::mpsc::Sender<VmEvent>,
    progress: &Progress,
    opts: &Options,
    dirty: Vec<u64>,
    memory: u64,
) -> Result<u64, MigrationError> {
    let set = |f: &dyn Fn(&mut Status)| f(&mut progress.lock().unwrap());
    set(&|s| s.phase = "postcopy-active".into());
    let stop = std::time::Instant::now();
    let saved = ask(tx, MigrationRequest::Save).await?;
    let pages = memory / vmm_devices::layout::PAGE_SIZE;
    let words = pages.div_ceil(64) as usize;
    let mut pending = if saved.unlogged_writers {
        // RAM a backend may have written unseen: all of it goes again.
        let mut b = vec![u64::MAX; words];
        if !pages.is_multiple_of(64) {
            b[words - 1] = (1 << (pages % 64)) - 1;
        }
        b
    } else {
        let mut b = dirty;
        or(&mut b, saved.dirty.as_deref().unwrap_or(&[]));
        b
    };
    pending.resize(words, 0);
    let n = count(&pending);
    log::info!(
        "{}: paused; post-copy: the destination runs the VM now, {n} page(s) follow",
        opts.uri
    );
    let state = saved.state;
    let bandwidth = opts.postcopy_bandwidth;
    let (summary, broken) = m
        .call(move |conn| {
            Box::pin(async move {
                let mut req = conn.client.postcopy_request();
                req.get().set_state(&state);
                req.get().set_bandwidth(bandwidth);
                let mut l = req.get().init_pending(pending.len() as u32);
                for (i, w) in pending.iter().enumerate() {
                    l.set(i as u32, *w);
                }
                let r = req.send().promise.await?;
                let r = r.get()?;
                let broken = String::from_utf8_lossy(r.get_broken()?.as_bytes()).into_owned();
                conn.channel_done();
                Ok::<_, MigrationError>((PostcopySummary::read(r.get_summary()?), broken))
            })
        })
        .await?;
    if !broken.is_empty() {
        return Err(MigrationError::PostcopyBroken(broken));
    }
    // The pause until the destination ran the VM; the post-copy phase after it.
    let downtime = (stop.elapsed().as_millis() as u64).saturating_sub(summary.ms);
    log::info!("{}: post-copy complete: {summary}", opts.uri);
    set(&|s| s.postcopy = Some(summary.clone()));
    Ok(downtime)
}

/// The destination's post-copy: migrated serves the faults on `uffd` (whose process maps
/// guest RAM as `maps`: address, guest address, bytes); vmm-core's places the pages.
pub fn serve_faults(
    m: &Migrated,
    who: &str,
    memfd: &std::fs::File,
    uffd: std::os::fd::BorrowedFd,
    maps: Vec<(u64, u64, u64)>,
    placer: bool,
) -> Result<(), MigrationError> {
    let who = who.to_string();
    let memfd = memfd.try_clone().map_err(MigrationError::Duplicate)?;
    let uffd = uffd
        .try_clone_to_owned()
        .map_err(MigrationError::Duplicate)?;
    m.call_blocking(move |conn| {
        Box::pin(async move {
            use std::os::fd::AsFd;
            conn.hand_fds(memfd.as_fd(), uffd.as_fd())?;
            let mut req = conn.client.serve_faults_request();
            req.get().set_who(who.as_str());
            req.get().set_placer(placer);
            let mut l = req.get().init_mappings(maps.len() as u32);
            for (i, (va, gpa, bytes)) in maps.iter().enumerate() {
                let mut e = l.reborrow().get(i as u32);
                e.set_va(*va);
                e.set_gpa(*gpa);
                e.set_bytes(*bytes);
            }
            req.send().promise.await?;
            Ok(())
        })
    })
}

/// How the destination's post-copy went, as `postcopy_wait` hears it.
pub enum PostcopyWait {
    /// Every page is here, or the rest cannot come (why).
    Done(Result<PostcopySummary, crate::control::PostcopyFailed>),
    /// The channel broke (why); the count of breaks so far, to wait past this one.
    Paused(String, u64),
}

/// The destination: waits until every page came, the rest cannot come, or the channel
/// breaks for the `seen + 1`th time.
pub fn postcopy_wait(m: &Migrated, seen: u64) -> PostcopyWait {
    type Got = (PostcopySummary, String, String, u64);
    let r: Result<Got, MigrationError> = m.call_blocking(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.postcopy_wait_request();
            req.get().set_seen(seen);
            let r = req.send().promise.await?;
            let r = r.get()?;
            let text = |t: capnp::text::Reader| String::from_utf8_lossy(t.as_bytes()).into_owned();
            Ok((
                PostcopySummary::read(r.get_summary()?),
                text(r.get_broken()?),
                text(r.get_paused()?),
                r.get_pauses(),
            ))
        })
    });
    match r {
        Ok((_, _, paused, n)) if !paused.is_empty() => PostcopyWait::Paused(paused, n),
        Ok((s, b, _, _)) if b.is_empty() => PostcopyWait::Done(Ok(s)),
        Ok((_, b, _, _)) => PostcopyWait::Done(Err(PostcopyFailed::Broken(b))),
        Err(e) => PostcopyWait::Done(Err(PostcopyFailed::Unreachable(crate::error_chain(&e)))),
    }
}

/// `vmmctl migrate recover URI`: post-copy goes on over a new channel. The destination
/// (`source` false) listens on `uri` (or takes fd:N) and returns once the source is back;
/// the source connects and returns when post-copy is over (Err: it broke again, or could
/// not start).
pub async fn recover(
    m: &Migrated,
    uri: &str,
    tls: &TlsOptions,
    source: bool,
    progress: &Progress,
) -> Result<Option<PostcopySummary>, MigrationError> {
    let (uri, tls) = (uri.to_string(), tls.clone());
    let (summary, broken) = m
        .call(move |conn| {
            Box::pin(async move {
                let (opened, creds) = open_channel(&uri, &tls, source).await?;
                let kind = conn.hand_channel(opened)?;
                let mut req = conn.client.recover_request();
                req.get().set_uri(uri.as_str());
                req.get().set_kind(kind);
                write_tls(req.get().init_tls(), &tls, creds.as_ref());
                let got = async {
                    let r = req.send().promise.await?;
                    let r = r.get()?;
                    Ok::<_, MigrationError>((
                        PostcopySummary::read(r.get_summary()?),
                        String::from_utf8_lossy(r.get_broken()?.as_bytes()).into_owned(),
                    ))
                }
                .await;
                match &got {
                    Ok((_, b)) if b.is_empty() => conn.channel_done(),
                    _ => conn.channel_failed(),
                }
                got
            })
        })
        .await?;
    if !broken.is_empty() {
        return Err(MigrationError::PostcopyBroken(broken));
    }
    if !source {
        progress.lock().unwrap().phase = "postcopy-active".into();
        return Ok(None);
    }
    let mut st = progress.lock().unwrap();
    st.phase = "completed".into();
    st.error.clear();
    st.postcopy = Some(summary.clone());
    Ok(Some(summary))
}

/// The destination: every process's memory is unregistered; migrated stops serving faults.
pub fn postcopy_end(m: &Migrated) {
    let _: Result<(), MigrationError> = m.call_blocking(|conn| {
        Box::pin(async move {
            conn.client.postcopy_end_request().send().promise.await?;
            Ok(())
        })
    });
}

/// The destination before it knows the VM's shape: migrated takes the source's connection
/// and reads the stream's header; returns the source's settings (a --config file's text).
/// The connection stays with migrated for `receive` (with `peeked`).
pub fn peek(
    m: &Migrated,
    uri: &str,
    tls: &TlsOptions,
    wait: std::time::Duration,
) -> Result<String, MigrationError> {
    let uri = uri.to_string();
    let tls = tls.clone();
    let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    if let Ok(Uri::Fd(n)) = Uri::parse(&uri) {
        PEEKED.lock().unwrap().insert(n);
    }
    m.call_blocking(move |conn| {
        Box::pin(async move {
            let (opened, creds) = open_channel(&uri, &tls, false).await?;
            let kind = conn.hand_channel(opened)?;
            let mut req = conn.client.peek_request();
            req.get().set_uri(uri.as_str());
            req.get().set_kind(kind);
            req.get().set_wait_ms(wait_ms);
            write_tls(req.get().init_tls(), &tls, creds.as_ref());
            let got = async {
                let r = req.send().promise.await?;
                let spec = r.get()?.get_spec()?;
                Ok(String::from_utf8_lossy(spec.as_bytes()).into_owned())
            }
            .await;
            if got.is_err() {
                conn.channel_failed();
            }
            got
        })
    })
}

/// The destination's side: takes the stream into the memfd; returns the state. `peeked`: the
/// connection a `peek` took goes on.
#[allow(clippy::too_many_arguments)]
pub fn receive(
    m: &Migrated,
    uri: &str,
    tls: &TlsOptions,
    memfd: std::fs::File,
    memory: u64,
    vcpus: u32,
    wait: std::time::Duration,
    peeked: bool,
    lazy: bool,
) -> Result<(Vec<u8>, u64, bool), MigrationError> {
    let uri = uri.to_string();
    let tls = tls.clone();
    let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    m.call_blocking(move |conn| {
        Box::pin(async move {
            let (kind, creds) = if peeked {
                conn.hand_memfd(&memfd)?;
                (vmm_proto::migrated_capnp::ChannelKind::Stream, None)
            } else {
                let (opened, creds) = open_channel(&uri, &tls, false).await?;
                (conn.hand_over(&memfd, opened)?, creds)
            };
            let mut req = conn.client.receive_request();
            req.get().set_uri(uri.as_str());
            req.get().set_kind(kind);
            req.get().set_wait_ms(wait_ms);
            req.get().set_peeked(peeked);
            req.get().set_lazy(lazy);
            if peeked {
                write_tls(req.get().init_tls(), &TlsOptions::default(), None);
            } else {
                write_tls(req.get().init_tls(), &tls, creds.as_ref());
            }
            write_shape(req.get().init_shape(), memory, vcpus, "");
            let got = async {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok((r.get_state()?.to_vec(), r.get_bytes(), r.get_postcopy()))
            }
            .await;
            if got.is_err() {
                conn.channel_failed();
            }
            got
        })
    })
}

/// Tells the source (through migrated) whether this destination runs the VM.
pub fn started(m: &Migrated, ok: bool, why: String) -> Result<(), MigrationError> {
    m.call_blocking(move |conn| {
        Box::pin(async move {
            let mut req = conn.client.started_request();
            req.get().set_ok(ok);
            req.get().set_why(why.as_str());
            let r = req.send().promise.await;
            // The answer is written: an exec: command may finish with it.
            conn.channel_done();
            r.map(|_| ()).map_err(MigrationError::from)
        })
    })
}
