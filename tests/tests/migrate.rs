//! Live migration and snapshots between real vmm-core processes on real KVM, with their
//! migrated helpers: the test guest's `migrate` load keeps a counter (its pass number),
//! rewrites 8 MiB each pass after checking it still holds the previous pass's words, and
//! writes a sequence-numbered block to its disk every few passes. After a move the counter
//! goes on from where it was, no check fails, every acknowledged block is on disk intact, and
//! the source has exited.

use std::path::Path;
use std::time::Duration;
use vmm_tests::{check_seq_blocks, vmmctl, wait_until, NetNs, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);
const CMDLINE: &str = "console=ttyS0 tg.scenario=migrate tg.dirty.mib=8 tg.mig.every=4";

/// The last "tg: mig pass N" the guest printed.
fn last_pass(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("tg: mig pass "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

fn first_pass(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("tg: mig pass "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .next()
        .unwrap_or(0)
}

fn source(dir: &TempDir, img: &Path, sock: &Path) -> TestVm {
    let vm = TestVm::builder()
        .memory("256M")
        .cmdline(CMDLINE)
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

fn disk(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    img
}

/// Moves the guest from `src` to a destination listening on `listen` (reached at `connect`),
/// and checks everything the issue asks of a move.
fn migrate_and_check(
    dir: &TempDir,
    img: &Path,
    mut src: TestVm,
    src_sock: &Path,
    dst: TestVm,
    connect: &str,
) {
    let src_console = dir.join("source.txt");
    let dst_console = dir.join("dest.txt");
    let (code, out, err) = vmmctl(src_sock, &["migrate", connect]);
    assert_eq!(
        code,
        0,
        "migrate: {out}{err}\n--- source log ---\n{}",
        src.stderr()
    );
    assert!(out.contains("the VM runs there now"), "{out}");
    // The source exits by itself, with status 0.
    assert_eq!(src.wait_exit(T), 0, "the source's log:\n{}", src.stderr());
    assert!(
        src.stderr()
            .contains("the VM migrated; it runs on the destination now"),
        "{}",
        src.stderr()
    );
    let before = std::fs::read_to_string(&src_console).unwrap();
    let was = last_pass(&before);
    // The destination's console goes on: the counter carries on from where it was.
    wait_until(T, "the destination's guest to go on", || {
        last_pass(&std::fs::read_to_string(&dst_console).unwrap_or_default()) >= was + 64
    });
    let after = std::fs::read_to_string(&dst_console).unwrap();
    let first = first_pass(&after);
    assert!(
        first > was && first <= was + 16 + 16,
        "the counter went from {was} (source) to {first} (destination): it must go on, not restart"
    );
    assert!(
        !after.contains("tg: ready"),
        "the guest booted again:\n{after}"
    );
    let all = format!("{before}{after}");
    assert!(!all.contains("tg: mig error"), "a check failed:\n{all}");
    // Every block the guest saw acknowledged, on either side, is on disk intact.
    drop(dst);
    let acked = check_seq_blocks(img, &all);
    assert!(acked >= 8, "only {acked} blocks were acknowledged:\n{all}");
}

/// The destination runs in a network namespace of its own, reached over a veth pair.
#[test]
fn migrates_over_tcp_to_another_network_namespace() {
    let dir = TempDir::new("mig-tcp");
    let img = disk(&dir);
    let ns = NetNs::new(1);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let listen = format!("tcp:{}:4711", ns.ns_addr);
    let dst = TestVm::builder()
        .memory("256M")
        .cmdline(CMDLINE)
        .in_netns(&ns)
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join("dest.txt").display()),
        ])
        .args(["--incoming", &listen])
        .spawn();
    dst_waits(&dst);
    migrate_and_check(&dir, &img, src, &src_sock, dst, &listen);
}

#[test]
fn migrates_over_unix() {
    let dir = TempDir::new("mig-unix");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = TestVm::builder()
        .memory("256M")
        .cmdline(CMDLINE)
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join("dest.txt").display()),
        ])
        .args(["--incoming", &uri])
        .spawn();
    dst_waits(&dst);
    migrate_and_check(&dir, &img, src, &src_sock, dst, &uri);
}

fn dst_waits(dst: &TestVm) {
    wait_until(T, "the destination to listen", || {
        dst.stderr().contains("waiting for the source on")
    });
}
