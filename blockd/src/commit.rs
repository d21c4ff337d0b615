//! Live external snapshots and commits of a running disk (libvirt's `snapshot-create
//! --disk-only` and `blockcommit --active`).
//!
//! A snapshot stacks a new qcow2 overlay on the disk: the disk pauses (its requests wait on
//! their rings) until nothing is in flight, the old top is flushed, and the overlay, over the
//! old top and its chain, becomes the image the guest writes. The old top is read-only from
//! then on and can be copied away.
//!
//! A commit merges the top overlay down into the layer below it while the guest runs: what
//! the overlay holds is copied into the base, then what the guest wrote meanwhile, again and
//! again until little is left; then the disk pauses, the rest is copied, the base is flushed
//! and becomes the image the guest writes. Only ranges the overlay holds are written to the
//! base, and those are the ones the overlay hides, so the guest never sees the base change.
//! A write is counted once it is done: a pass that copies a range before a write to it ends
//! sees that write counted for the next pass.

use crate::disk::{Disk, Layers};
use crate::image::{Alloc, Format, Qcow2Image};
use crate::job::CHUNK;
use std::fs::File;
use std::time::Duration;

/// Copies go in pieces of at most this size.
const PIECE: u64 = 1 << 20;
/// How long the guest's requests may be held while a snapshot or commit swaps the image.
const PAUSE: Duration = Duration::from_secs(10);
/// A commit pauses the disk for its last pass once at most this much is left to copy...
const LAST_PASS: usize = 64;
/// ...or after this many passes (a guest that writes faster than the copy goes).
const MAX_PASSES: u32 = 30;

/// Stacks a new qcow2 overlay (`overlay`: an empty file, opened read-write) on the disk:
/// its header names the old top as `backing_name`. Guest writes go to it from then on.
/// Returns how long the disk held the guest's requests.
pub fn snapshot(disk: &Disk, overlay: File, backing_name: &str) -> Result<Duration, String> {
    refuse_busy(disk)?;
    let (format, size) = disk.with_layers(|l| (l.format, disk.size()));
    Qcow2Image::create_overlay(&overlay, size, backing_name, format)
        .map_err(|e| format!("cannot make the overlay a qcow2 image ({e})"))?;
    // Most of the flush is done before the pause; the one inside takes what came since.
    disk.flush()
        .map_err(|e| format!("cannot flush the image before the snapshot ({e})"))?;
    let q = disk.quiesce(PAUSE)?;
    disk.with_layers_mut(&q, |l| -> Result<(), String> {
        l.flush()
            .map_err(|e| format!("cannot flush the image before the snapshot ({e})"))?;
        let mut chain = vec![(clone(l.top())?, l.format)];
        for (f, fmt) in l.backing() {
            chain.push((clone(f)?, *fmt));
        }
        let new = Layers::open(overlay, Format::Qcow2, true, chain)
            .map_err(|e| format!("cannot open the new overlay ({e})"))?;
        *l = new;
        Ok(())
    })?;
    Ok(q.held())
}

fn clone(f: &File) -> Result<File, String> {
    f.try_clone()
        .map_err(|e| format!("cannot duplicate a descriptor ({e})"))
}

/// Refuses a snapshot or commit on a disk that cannot take one now.
fn refuse_busy(disk: &Disk) -> Result<(), String> {
    if disk.options.readonly {
        return Err("the disk is read-only: there are no writes to move".into());
    }
    if disk.recording.get().is_some() {
        return Err(
            "it is recorded or replayed (--record, --replay), and a recording holds one image"
                .into(),
        );
    }
    if disk.job.lock().unwrap().is_some() {
        return Err("a commit is under way on it".into());
    }
    Ok(())
}

/// Merges the top overlay into the layer below it (`base`: that layer's file, opened
/// read-write), which then becomes the disk's top. Returns the bytes copied and how long the
/// last pass held the guest's requests.
pub fn commit(disk: &Disk, base: File) -> Result<(u64, Duration), String> {
    refuse_busy(disk)?;
    let (base_format, rest) = disk.with_layers(|l| -> Result<_, String> {
        if l.qcow2().is_none() || l.backing().is_empty() {
            return Err("its image has no backing file: there is nothing to commit into".into());
        }
        let rest = l.backing()[1..]
            .iter()
            .map(|(f, fmt)| Ok((clone(f)?, *fmt)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok((l.backing()[0].1, rest))
    })?;
    let below = Layers::open(base, base_format, true, rest)
        .map_err(|e| format!("cannot open the backing file for writing ({e})"))?;
    let size = disk.size();
    let base_size = below
        .size()
        .map_err(|e| format!("cannot read the backing file's size ({e})"))?;
    if base_size < size {
        grow(&below, size).map_err(|e| {
            format!("cannot grow the backing file from {base_size} to {size} bytes ({e})")
        })?;
    }
    disk.begin_job();
    let r = run(disk, &below, size).and_then(|()| finish(disk, below, size));
    let job = disk.end_job();
    r.map(|held| (job.map_or(0, |j| j.done), held))
}

/// Grows a raw file or qcow2 image to `size` bytes.
fn grow(l: &Layers, size: u64) -> std::io::Result<()> {
    match l.qcow2() {
        Some(q) => q.grow(size),
        None => l.top().set_len(size),
    }
}

/// The passes while the guest runs: everything the top holds, then what the guest wrote
/// meanwhile, until little is left.
fn run(disk: &Disk, below: &Layers, size: u64) -> Result<(), String> {
    // What the top holds, in ranges.
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < size {
        let (what, n) = disk
            .with_layers(|l| l.qcow2().expect("checked").allocation(at, size - at))
            .map_err(|e| format!("cannot read the overlay's allocation at byte {at} ({e})"))?;
        if n == 0 {
            break;
        }
        if what != Alloc::Below {
            ranges.push((at, n));
        }
        at += n;
    }
    {
        let mut j = disk.job.lock().unwrap();
        let j = j.as_mut().expect("set by commit");
        j.total = ranges.iter().map(|r| r.1).sum();
        j.pass = 1;
    }
    log::info!(
        "commit: {} bytes in {} ranges to copy",
        ranges.iter().map(|r| r.1).sum::<u64>(),
        ranges.len()
    );
    for (start, len) in ranges {
        copy(disk, below, start, len)?;
    }
    loop {
        let dirty = {
            let mut j = disk.job.lock().unwrap();
            let j = j.as_mut().expect("set by commit");
            if j.dirty.len() <= LAST_PASS || j.pass >= MAX_PASSES {
                return Ok(());
            }
            j.pass += 1;
            j.total += j.dirty.len() as u64 * CHUNK;
            std::mem::take(&mut j.dirty)
        };
        for c in dirty {
            let start = c * CHUNK;
            copy(disk, below, start, CHUNK.min(size.saturating_sub(start)))?;
        }
    }
}

/// The last pass, with the disk quiesced: the chunks left are copied, the base is flushed,
/// and it becomes the top.
fn finish(disk: &Disk, below: Layers, size: u64) -> Result<Duration, String> {
    // What the passes copied is made durable before the pause; the flush inside takes the
    // last chunks only.
    below
        .flush()
        .map_err(|e| format!("cannot flush the base ({e})"))?;
    let q = disk.quiesce(PAUSE)?;
    let last = disk
        .job
        .lock()
        .unwrap()
        .as_mut()
        .map(|j| std::mem::take(&mut j.dirty))
        .unwrap_or_default();
    disk.with_layers_mut(&q, |top| -> Result<(), String> {
        for c in last {
            let start = c * CHUNK;
            let len = CHUNK.min(size.saturating_sub(start));
            copy_held(top, &below, disk.block_size, start, len)?;
            if let Some(j) = disk.job.lock().unwrap().as_mut() {
                j.done += len;
                j.total += len;
            }
        }
        below
            .flush()
            .map_err(|e| format!("cannot flush the base ({e})"))?;
        *top = below;
        Ok(())
    })?;
    Ok(q.held())
}

/// Copies what the top holds in `len` bytes at `start` into the base.
fn copy(disk: &Disk, below: &Layers, start: u64, len: u64) -> Result<(), String> {
    disk.with_layers(|top| copy_held(top, below, disk.block_size, start, len))?;
    if let Some(j) = disk.job.lock().unwrap().as_mut() {
        j.done += len;
    }
    Ok(())
}

/// Copies what `top` itself holds (its data, its zeroes) in `len` bytes at `start` into
/// `below`; what it does not hold is left alone.
fn copy_held(
    top: &Layers,
    below: &Layers,
    block_size: u32,
    start: u64,
    len: u64,
) -> Result<(), String> {
    let q = top.qcow2().expect("a commit's top is qcow2");
    let mut buf = vec![0u8; PIECE as usize];
    let mut at = start;
    let end = start + len;
    while at < end {
        let (what, n) = q
            .allocation(at, (end - at).min(PIECE))
            .map_err(|e| format!("cannot read the overlay's allocation at byte {at} ({e})"))?;
        if n == 0 {
            break;
        }
        match what {
            Alloc::Below => {}
            Alloc::Zero => below
                .write_zeroes(at, n, false, false, block_size)
                .map_err(|e| format!("cannot write zeroes into the base at byte {at} ({e})"))?,
            Alloc::Data => {
                let mut iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: n as usize,
                }];
                top.rw(&mut iov, at, false, false, block_size)
                    .map_err(|e| format!("cannot read the overlay at byte {at} ({e})"))?;
                let mut iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: n as usize,
                }];
                below
                    .rw(&mut iov, at, true, false, block_size)
                    .map_err(|e| format!("cannot write into the base at byte {at} ({e})"))?;
            }
        }
        at += n;
    }
    Ok(())
}
