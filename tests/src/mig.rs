//! What the migration tests share: the test guest's `migrate` scenario on a source, a
//! destination waiting for it, and reading the guest's pass counter from a console.

use crate::{wait_until, NetNs, TempDir, TestVm};
use std::path::Path;
use std::time::Duration;

pub const T: Duration = Duration::from_secs(60);
pub const CMDLINE: &str = "console=ttyS0 tg.scenario=migrate tg.dirty.mib=8 tg.mig.every=4";

/// The last "tg: mig pass N" the guest printed.
pub fn last_pass(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("tg: mig pass "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

pub fn first_pass(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("tg: mig pass "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .next()
        .unwrap_or(0)
}

/// The source, its guest started with `cmdline` (a migrate scenario).
pub fn source_cmdline(
    b: crate::Builder,
    cmdline: &str,
    dir: &TempDir,
    img: &Path,
    sock: &Path,
) -> TestVm {
    // A loop's earlier source left its console here: start from none, so that the wait
    // below is for this source's guest (not the last one's output, with migrated not up yet).
    let _ = std::fs::remove_file(dir.join("source.txt"));
    let vm = b
        .memory("256M")
        .cmdline(cmdline)
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join("source.txt").display()),
        ])
        .spawn();
    let console = dir.join("source.txt");
    wait_until(T, "the source's guest to be under way", || {
        last_pass(&std::fs::read_to_string(&console).unwrap_or_default()) >= 32
    });
    vm
}

pub fn disk(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    img
}

pub fn dst_waits(dst: &TestVm) {
    wait_until(T, "the destination to listen", || {
        dst.stderr().contains("waiting for the source on")
    });
}

pub fn destination_from(
    b: crate::Builder,
    dir: &TempDir,
    img: &Path,
    uri: &str,
    ns: Option<&NetNs>,
    extra: &[&str],
) -> TestVm {
    // No --memory and no --cmdline: the destination reads them from the source's stream
    // before it sets the VM up (and its resets boot with that command line).
    let mut b = b
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join("dest.txt").display()),
        ])
        .args(["--incoming", uri])
        .args(extra.iter().copied());
    if let Some(ns) = ns {
        b = b.in_netns(ns);
    }
    let dst = b.spawn();
    dst_waits(&dst);
    dst
}
