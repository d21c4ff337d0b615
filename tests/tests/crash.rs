//! Crash consistency: the image is served from crashfs (tests/src/bin/crashfs.rs), a FUSE file
//! system that keeps only what was fsync'd or fdatasync'd. The guest writes numbered blocks;
//! then the power is cut (vmm-core is SIGKILLed, its blockd with it, and crashfs keeps only its
//! durable copy). Every block the guest saw acknowledged as durable must be in that copy:
//! with the write cache off, every acknowledged write (a FUA write); with it on, every write
//! acknowledged before an acknowledged flush. For raw and qcow2; and once against a blockd
//! deliberately broken to acknowledge before syncing, where the check must find lost writes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmm_tests::{seq_acks, seq_block_intact, wait_until, CrashFs, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);
/// The image: 4 MiB, 1024 blocks of 4 KiB; the guest stops well before it wraps.
const SIZE: u64 = 4 << 20;

/// The seq numbers the guest was promised are durable: every acknowledged one with the cache
/// off; with it on, those up to the last acknowledged flush.
fn promised(console: &str, writeback: bool) -> Vec<u64> {
    let acked = seq_acks(console);
    if !writeback {
        return acked;
    }
    let flushed = console
        .lines()
        .filter_map(|l| l.strip_prefix("tg: flushed "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .max();
    match flushed {
        Some(f) => acked.into_iter().filter(|&s| s <= f).collect(),
        None => Vec::new(),
    }
}

/// Runs the guest on an image of `format` served by crashfs, cuts the power once it has had
/// `acks` acknowledgements, and returns (blocks promised durable, those lost).
fn crash(name: &str, format: &str, writeback: bool, broken: bool) -> (usize, Vec<u64>) {
    let dir = TempDir::new(name);
    let start = dir.join("start.img");
    match format {
        "raw" => std::fs::write(&start, vec![0u8; SIZE as usize]).unwrap(),
        _ => {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&start)
                .arg(SIZE.to_string())
                .output()
                .unwrap_or_else(|e| {
                    panic!("qemu-img: {e}; install qemu-utils (scripts/setup.sh does)")
                });
            assert!(out.status.success(), "{out:?}");
        }
    }
    let fs = CrashFs::start(Path::new(env!("CARGO_BIN_EXE_crashfs")), &dir, &start);
    let mut cmdline = "console=ttyS0 tg.scenario=blk-seq tg.seq.count=100000".to_string();
    if writeback {
        cmdline += " tg.seq.writeback=1 tg.seq.flush=8";
    }
    let mut b = TestVm::builder()
        .cmdline(&cmdline)
        .arg("--disk")
        .arg(format!("path={},format={format}", fs.image().display()));
    if broken {
        b = b.env("BLOCKD_BREAK_DURABILITY", "1");
    }
    let mut vm = b.spawn();
    vm.wait_for(
        if writeback {
            "tg: seq writeback=1"
        } else {
            "tg: seq writeback=0"
        },
        T,
    );
    vm.wait_for("tg: ack 300", T);
    // The power cut: vmm-core and (by its parent-death signal) blockd at once, then the disk.
    vm.signal(libc::SIGKILL);
    vm.wait_exit(T);
    // blockd dies with it: once nothing holds the image open, nothing more can reach it.
    let image = fs.image();
    wait_until(T, "the image's last holder (blockd) to be gone", || {
        !holds_open(&image)
    });
    let console = vm.stdout();
    let durable = fs.power_cut();
    let raw = if format == "raw" {
        durable
    } else {
        // What the guest sees in the durable qcow2: through qemu-img, which also checks it.
        let q = dir.join("durable.qcow2");
        std::fs::write(&q, &durable).unwrap();
        let check = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&q)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check after the power cut: {check:?}"
        );
        let r = dir.join("durable.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&q)
            .arg(&r)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read(&r).unwrap()
    };
    let promised = promised(&console, writeback);
    let lost: Vec<u64> = promised
        .iter()
        .copied()
        .filter(|&s| !seq_block_intact(&raw, SIZE / 4096, s))
        .collect();
    (promised.len(), lost)
}

/// Whether any process has `path` open.
fn holds_open(path: &Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path))
        })
    })
}

fn must_keep(name: &str, format: &str, writeback: bool) {
    let (promised, lost) = crash(name, format, writeback, false);
    assert!(
        promised >= 200,
        "only {promised} blocks were promised durable"
    );
    assert!(
        lost.is_empty(),
        "{} of {promised} blocks promised durable were lost in the power cut: {lost:?}",
        lost.len()
    );
}

#[test]
fn raw_keeps_every_write_acknowledged_with_the_cache_off() {
    must_keep("crash-raw-wt", "raw", false);
}

#[test]
fn raw_keeps_every_write_acknowledged_before_a_flush() {
    must_keep("crash-raw-wb", "raw", true);
}

#[test]
fn qcow2_keeps_every_write_acknowledged_with_the_cache_off() {
    must_keep("crash-qcow2-wt", "qcow2", false);
}

#[test]
fn qcow2_keeps_every_write_acknowledged_before_a_flush() {
    must_keep("crash-qcow2-wb", "qcow2", true);
}

/// The check itself can fail: a blockd that acknowledges before syncing loses writes, and the
/// check finds them.
#[test]
fn a_blockd_that_acknowledges_before_syncing_is_caught() {
    let (promised, lost) = crash("crash-broken", "raw", false, true);
    assert!(
        promised >= 200,
        "only {promised} blocks were promised durable"
    );
    assert!(
        !lost.is_empty(),
        "a blockd that never syncs lost none of {promised} acknowledged writes: the check cannot see a lost write"
    );
    eprintln!(
        "the broken blockd lost {} of {promised} acknowledged writes (e.g. {:?})",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
