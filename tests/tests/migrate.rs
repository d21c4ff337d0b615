//! Live migration and snapshots between real vmm-core processes on real KVM, with their
//! migrated helpers: the test guest's `migrate` load keeps a counter (its pass number),
//! rewrites 8 MiB each pass after checking it still holds the previous pass's words, and
//! writes a sequence-numbered block to its disk every few passes. After a move the counter
//! goes on from where it was, no check fails, every acknowledged block is on disk intact, and
//! the source has exited.

use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm_tests::mig::{destination_from, disk, first_pass, last_pass, source_cmdline, CMDLINE, T};
use vmm_tests::{
    check_seq_blocks, children_of, process_name, vmmctl, wait_until, NetNs, TempDir, TestCa, TestVm,
};

fn source(dir: &TempDir, img: &Path, sock: &Path) -> TestVm {
    source_from(TestVm::builder(), dir, img, sock)
}

fn source_from(b: vmm_tests::Builder, dir: &TempDir, img: &Path, sock: &Path) -> TestVm {
    source_cmdline(b, CMDLINE, dir, img, sock)
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
    extra: &[&str],
) {
    let src_console = dir.join("source.txt");
    let dst_console = dir.join("dest.txt");
    let mut args = vec!["migrate", connect];
    args.extend_from_slice(extra);
    let (code, out, err) = vmmctl(src_sock, &args);
    assert_eq!(
        code,
        0,
        "migrate: {out}{err}\n--- source log ---\n{}",
        src.stderr()
    );
    assert!(out.contains("the VM runs there now"), "{out}");
    // "... N MiB sent in T ms over P pass(es), the VM paused for D ms": the guest's 8 MiB at
    // least, and a pause within the whole.
    let num = |after: &str| -> u64 {
        let i = out
            .find(after)
            .unwrap_or_else(|| panic!("{after:?} in {out}"))
            + after.len();
        out[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (mib, total, paused) = (num("now: "), num("MiB sent in "), num("paused for "));
    // At least what the guest dirties (tg.dirty.mib, 8 by default).
    let dirtied: u64 = std::fs::read_to_string(&src_console)
        .unwrap_or_default()
        .split("tg.dirty.mib=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(8);
    assert!(mib >= dirtied && paused <= total, "{out}");
    // The pause the limit allowed: 300 ms unless the test set one.
    let limit = extra
        .iter()
        .position(|a| *a == "--downtime-ms")
        .map_or(300, |i| extra[i + 1].parse().unwrap());
    // The source exits by itself, with status 0.
    assert_eq!(src.wait_exit(T), 0, "the source's log:\n{}", src.stderr());
    // The pause stays within the limit, unless the passes ran out first (--max-passes): then
    // vmm-core pauses anyway and says so. (On a loaded 2-core host the guest's dirtying can
    // outrun a slow channel; the downtime itself is the subject of its own tests.)
    let forced = out.contains("(forced at --max-passes: over the downtime limit)");
    assert!(
        paused <= limit || forced,
        "paused {paused} ms, over the {limit} ms limit, and not said to be forced: {out}\n{}",
        src.stderr()
    );
    assert!(
        src.stderr()
            .contains("the VM migrated; it runs on the destination now"),
        "{}",
        src.stderr()
    );
    // blockd logged the pages it wrote (vhost-user's dirty log), so the last pass, with the
    // VM paused, sent what was dirtied since the pass before: not all of the 256 MiB
    // (65536 pages), as it must when a disk's backend cannot log.
    let log = src.stderr();
    assert!(
        log.contains("blockd: info: disk0: dirty page logging on"),
        "{log}"
    );
    if extra.contains(&"--compress") {
        assert!(log.contains("of RAM went compressed as"), "{log}");
    }
    let last: u64 = log
        .split("stop-and-copy: paused and saved in ")
        .nth(1)
        .and_then(|r| r.split("the last ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stop-and-copy line in the source's log:\n{log}"));
    assert!(last < 8192, "the last pass sent {last} pages:\n{log}");
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
    // A live migration moves the same VM: its generation ID stays (a restore changes it).
    assert!(
        !after.contains("tg: vmgenid changed"),
        "a migrated VM got a new generation ID:\n{after}"
    );
    // Every block the guest saw acknowledged, on either side, is on disk intact.
    drop(dst);
    let acked = check_seq_blocks(img, &all);
    assert!(acked >= 8, "only {acked} blocks were acknowledged:\n{all}");
}

/// The pause stays within a tight downtime limit (50 ms) on a guest that rewrites 2 MiB of
/// its RAM as fast as it can and writes its disk, the pause measured by the source from
/// stopping the vCPUs to the destination's answer.
#[test]
fn a_dirtying_guest_pauses_within_a_50_ms_downtime_limit() {
    let dir = TempDir::new("mig-50ms");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(
        TestVm::builder(),
        "console=ttyS0 tg.scenario=migrate tg.dirty.mib=2 tg.mig.every=4",
        &dir,
        &img,
        &src_sock,
    );
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = destination(&dir, &img, &uri, None, &[]);
    migrate_and_check(
        &dir,
        &img,
        src,
        &src_sock,
        dst,
        &uri,
        &["--downtime-ms", "50"],
    );
}

/// The same limit on an idle guest: nothing to converge, so the pause is the device state,
/// the last pages and the destination's answer.
#[test]
fn an_idle_guest_pauses_within_a_50_ms_downtime_limit() {
    let dir = TempDir::new("mig-idle-50ms");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let mut src = TestVm::builder()
        .memory("256M")
        .cmdline("console=ttyS0 tg.scenario=idle")
        .args(["--api-socket", src_sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .spawn();
    src.wait_for("tg: ready", T);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let _dst = destination(&dir, &img, &uri, None, &[]);
    let (code, out, err) = vmmctl(
        &src_sock,
        &["--json", "migrate", &uri, "--downtime-ms", "50"],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", src.stderr());
    let field = |k: &str| -> u64 {
        let at = out
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} in {out}"));
        out[at + k.len() + 3..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (paused, passes) = (field("downtime_ms"), field("passes"));
    assert!(
        paused <= 50,
        "paused {paused} ms, over the 50 ms limit: {out}"
    );
    assert!(passes >= 1, "{out}");
    assert_eq!(src.wait_exit(T), 0, "{}", src.stderr());
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
    let dst = destination(&dir, &img, &listen, Some(&ns), &[]);
    migrate_and_check(&dir, &img, src, &src_sock, dst, &listen, &[]);
}

#[test]
fn migrates_over_unix() {
    over_unix("mig-unix", &[]);
}

/// A blockd that takes 400 ms to start logging (as one on a loaded host may) while its guest
/// reads a block back into the same buffer at every pass: vmm-core waits until blockd logs
/// before its first pass, so no page blockd writes meanwhile is left stale at the destination
/// (the guest's check of that buffer there: `tg: mig error read N`).
#[test]
fn a_blockd_slow_to_start_logging_leaves_no_page_stale() {
    let dir = TempDir::new("mig-slow-log");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let b = TestVm::builder().env("BLOCKD_SLOW_LOG_ALL_MS", "400");
    let cmdline = "console=ttyS0 tg.scenario=migrate tg.dirty.mib=1 tg.mig.every=1";
    let src = source_cmdline(b, cmdline, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = destination(&dir, &img, &uri, None, &[]);
    // A limit the late start cannot break: what is checked is the data.
    let extra = ["--downtime-ms", "2000"];
    migrate_and_check(&dir, &img, src, &src_sock, dst, &uri, &extra);
}

/// A plain unix: migration, with `extra` arguments to `vmmctl migrate`.
fn over_unix(name: &str, extra: &[&str]) {
    let dir = TempDir::new(name);
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = destination(&dir, &img, &uri, None, &[]);
    migrate_and_check(&dir, &img, src, &src_sock, dst, &uri, extra);
}

/// fd:N: the two vmm-cores inherit the two ends of a socket pair (as an orchestrator that
/// made the connection would hand it over), and migrate through them.
#[test]
fn migrates_through_inherited_descriptors() {
    let dir = TempDir::new("mig-fd");
    let img = disk(&dir);
    let (src, src_sock, dst) = fd_pair(&dir, &img, &[]);
    migrate_and_check(&dir, &img, src, &src_sock, dst, "fd:5", &[]);
}

/// A source and a destination that inherited the two ends of one socket pair as fd 5 (the
/// destination started with `dst_extra`); the source's API socket.
fn fd_pair(dir: &TempDir, img: &Path, dst_extra: &[&str]) -> (TestVm, PathBuf, TestVm) {
    let src_sock = dir.join("src.sock");
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let src = source_from(
        TestVm::builder().inherit_fd(a.into(), 5),
        dir,
        img,
        &src_sock,
    );
    let dst = destination_from(
        TestVm::builder().inherit_fd(b.into(), 5),
        dir,
        img,
        "fd:5",
        None,
        dst_extra,
    );
    (src, src_sock, dst)
}

/// fd:N with TLS: the inherited socket pair carries a mutually authenticated TLS session
/// (tls-hostname names the destination, as there is no host in fd:N).
#[test]
fn migrates_through_inherited_descriptors_with_tls() {
    let dir = TempDir::new("mig-fd-tls");
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    let (src, src_sock, dst) = fd_pair(&dir, &img, &["--tls-creds", d_creds.to_str().unwrap()]);
    let creds = s_creds.to_str().unwrap().to_string();
    migrate_and_check(
        &dir,
        &img,
        src,
        &src_sock,
        dst,
        "fd:5",
        &["--tls-creds", &creds, "--tls-hostname", "dest.test"],
    );
}

/// A snapshot that cannot be written whole (its filesystem, a 1 MiB tmpfs this test mounts,
/// fills up) fails with the reason, leaves no partial file behind, and the VM goes on.
#[test]
fn a_snapshot_that_fails_midway_leaves_no_file_and_the_vm_goes_on() {
    let dir = TempDir::new("snap-full");
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "vmm-test-full"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "cannot mount a tmpfs on {}",
        small.display()
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let img = disk(&dir);
    let sock = dir.join("src.sock");
    let src = source(&dir, &img, &sock);
    let snap = small.join("snap");
    let (code, out, err) = vmmctl(&sock, &["snapshot", &format!("file:{}", snap.display())]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("No space left on device") && err.contains("the VM goes on here"),
        "{err}\n{}",
        src.stderr()
    );
    assert!(!snap.exists(), "the partial snapshot was left behind");
    let console = dir.join("source.txt");
    let at = last_pass(&std::fs::read_to_string(&console).unwrap());
    wait_until(T, "the guest to go on", || {
        last_pass(&std::fs::read_to_string(&console).unwrap_or_default()) >= at + 16
    });
    let (_, info, _) = vmmctl(&sock, &["info"]);
    assert!(info.contains("running"), "{info}");
    drop(src);
}

/// The stream compressed (LZ4), live.
#[test]
fn migrates_over_unix_compressed() {
    over_unix("mig-lz4", &["--compress"]);
}

/// The RAM a stream holds: (guest address, bytes) of every RAM section, in order.
fn stream_ram(path: &Path) -> Vec<(u64, Vec<u8>)> {
    use migrated::stream::{Reader, Section};
    let f = std::fs::File::open(path).unwrap();
    let mut r = Reader::new(std::io::BufReader::new(f)).unwrap();
    let mut ram = Vec::new();
    loop {
        match r.section().unwrap() {
            Section::Ram { gpa, data } => ram.push((gpa, data.to_vec())),
            Section::End => return ram,
            _ => {}
        }
    }
}

/// Where vmm-core keeps the VM generation ID (VMGenID), 16 bytes.
const VMGENID_ADDR: u64 = 0xff000;

/// The generation ID in `ram` (a stream's RAM sections), taken out (zeroed) so that the rest
/// compares.
fn take_generation_id(ram: &mut [(u64, Vec<u8>)]) -> [u8; 16] {
    let (gpa, data) = ram
        .iter_mut()
        .find(|(gpa, d)| (*gpa..*gpa + d.len() as u64).contains(&VMGENID_ADDR))
        .expect("the generation ID's page is in the stream (it is never zero)");
    let at = (VMGENID_ADDR - *gpa) as usize;
    let id: [u8; 16] = data[at..at + 16].try_into().unwrap();
    data[at..at + 16].fill(0);
    id
}

/// The ID as the test guest prints it: "id=HIGH:LOW", its two little-endian halves in hex.
fn guest_id(id: [u8; 16]) -> String {
    let half = |r: std::ops::Range<usize>| u64::from_le_bytes(id[r].try_into().unwrap());
    format!("id={:#018x}:{:#018x}", half(8..16), half(0..8))
}

fn restore(dir: &TempDir, snap: &Path, img: &Path, name: &str) -> (TestVm, std::path::PathBuf) {
    let sock = dir.join(&format!("{name}.sock"));
    let vm = TestVm::builder()
        .memory("256M")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join(&format!("{name}.txt")).display()),
        ])
        .args(["--restore", &format!("file:{}", snap.display())])
        .spawn();
    (vm, sock)
}

/// A snapshot of a paused guest, restored twice in new processes (each with a copy of the
/// disk as it was), gives two identical guests: both come up paused as the original was, with
/// the same RAM (a snapshot of each is byte for byte the original's RAM), and once resumed
/// both go on from the same pass and print the same lines. The original goes on too. The one
/// difference is the VM generation ID (VMGenID): each restore gets a new one, which the guest
/// sees, told by the GED; the original's is the one its guest saw at boot.
#[test]
fn a_snapshot_restored_twice_gives_two_identical_guests_with_new_generation_ids() {
    let dir = TempDir::new("snapshot");
    let img = disk(&dir);
    let sock = dir.join("src.sock");
    let src = source(&dir, &img, &sock);
    assert_eq!(vmmctl(&sock, &["pause"]).0, 0);
    let snap = dir.join("snap");
    // Compressed (LZ4): the restores read it, and their own plain snapshots below hold the
    // same RAM byte for byte.
    let (code, out, err) = vmmctl(
        &sock,
        &[
            "snapshot",
            "--compress",
            &format!("file:{}", snap.display()),
        ],
    );
    assert_eq!(code, 0, "snapshot: {out}{err}\n{}", src.stderr());
    assert!(
        src.stderr().contains("of RAM went compressed as"),
        "{}",
        src.stderr()
    );
    // The disk as the snapshot saw it, once for each copy of the guest.
    for n in ["a", "b"] {
        std::fs::copy(&img, dir.join(&format!("{n}.img"))).unwrap();
    }
    let at = last_pass(&std::fs::read_to_string(dir.join("source.txt")).unwrap());
    // A second snapshot to the same file is refused; nothing is overwritten.
    let (code, _, err) = vmmctl(&sock, &["snapshot", &format!("file:{}", snap.display())]);
    assert_ne!(code, 0);
    assert!(err.contains("the file exists"), "{err}");
    // The original is still paused, and goes on when resumed.
    let (_, info, _) = vmmctl(&sock, &["info"]);
    assert!(info.contains("paused"), "{info}");
    assert_eq!(vmmctl(&sock, &["resume"]).0, 0);
    wait_until(T, "the original to go on", || {
        last_pass(&std::fs::read_to_string(dir.join("source.txt")).unwrap()) >= at + 32
    });
    drop(src);

    let (a, a_sock) = restore(&dir, &snap, &dir.join("a.img"), "a");
    let (b, b_sock) = restore(&dir, &snap, &dir.join("b.img"), "b");
    for (vm, s) in [(&a, &a_sock), (&b, &b_sock)] {
        wait_until(T, "the restored VM's API", || s.exists());
        wait_until(T, "the restore", || vm.stderr().contains("the VM is here"));
        let (_, info, _) = vmmctl(s, &["info"]);
        assert!(
            info.contains("paused"),
            "restored VMs stay paused as saved: {info}"
        );
    }
    // Their RAM is the snapshot's, byte for byte, but for the VM generation ID: each restore
    // has an ID of its own (VMGenID), neither the original's nor the other's.
    let mut original = stream_ram(&snap);
    let mut ids = vec![take_generation_id(&mut original)];
    let booted = std::fs::read_to_string(dir.join("source.txt")).unwrap();
    assert!(
        booted.contains(&format!("tg: vmgenid addr=0xff000 {}", guest_id(ids[0]))),
        "the original guest saw another ID at boot than its RAM holds:\n{booted}"
    );
    for (n, s) in [("a", &a_sock), ("b", &b_sock)] {
        let again = dir.join(&format!("snap-{n}"));
        let (code, out, err) = vmmctl(s, &["snapshot", &format!("file:{}", again.display())]);
        assert_eq!(code, 0, "{out}{err}");
        let mut ram = stream_ram(&again);
        ids.push(take_generation_id(&mut ram));
        assert!(
            ram == original,
            "restored guest {n}'s RAM differs from the snapshot's"
        );
    }
    assert!(
        ids[0] != ids[1] && ids[0] != ids[2] && ids[1] != ids[2],
        "the original and the two restores must have three generation IDs: {ids:x?}"
    );
    for s in [&a_sock, &b_sock] {
        assert_eq!(vmmctl(s, &["resume"]).0, 0);
    }
    // Complete lines only: the guest may be writing the next one.
    let text = |n: &str| -> String {
        let t = std::fs::read_to_string(dir.join(&format!("{n}.txt"))).unwrap();
        t.rsplit_once('\n').map_or("", |(done, _)| done).to_string()
    };
    // Each guest saw its new ID, told by the GED; apart from that line, they are the same.
    let lines = |n: &str| -> Vec<String> {
        text(n)
            .lines()
            .filter(|l| !l.starts_with("tg: vmgenid changed"))
            .take(40)
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    };
    wait_until(T, "both restored guests to go on", || {
        lines("a").len() >= 40 && lines("b").len() >= 40
    });
    for (n, id) in [("a", ids[1]), ("b", ids[2])] {
        let seen = format!("tg: vmgenid changed {} ged=1", guest_id(id));
        assert_eq!(
            text(n).matches("tg: vmgenid changed").count(),
            1,
            "{n}:\n{}",
            text(n)
        );
        assert!(text(n).contains(&seen), "{n} wants {seen:?}:\n{}", text(n));
    }
    let (la, lb) = (lines("a"), lines("b"));
    assert_eq!(la, lb, "the two restored guests differ");
    let first = first_pass(&la.join("\n"));
    assert!(
        first > at && first <= at + 16,
        "the restored guest went on from pass {first}; the snapshot was at {at}"
    );
    let all = la.join("\n");
    assert!(
        !all.contains("tg: mig error") && !all.contains("tg: ready"),
        "{all}"
    );
    drop((a, b));
    let acked = check_seq_blocks(&dir.join("a.img"), &all);
    assert!(
        acked >= 8,
        "only {acked} acknowledged blocks were checked:\n{all}"
    );
}

/// The source guest's disk, and a snapshot of it (the source is gone after).
fn snapshot_of_source(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = disk(dir);
    let sock = dir.join("src.sock");
    let src = source(dir, &img, &sock);
    let snap = dir.join("snap");
    let (code, out, err) = vmmctl(&sock, &["snapshot", &format!("file:{}", snap.display())]);
    assert_eq!(code, 0, "{out}{err}");
    drop(src);
    (img, snap)
}

/// A snapshot with bytes flipped is refused at restore with one line that says where, and
/// nothing runs.
#[test]
fn a_corrupted_snapshot_is_refused() {
    let dir = TempDir::new("snapshot-bad");
    let (img, snap) = snapshot_of_source(&dir);
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    bytes[mid + 1000] ^= 0x01;
    std::fs::write(&snap, &bytes).unwrap();
    let (mut vm, _) = restore(&dir, &snap, &img, "bad");
    assert_eq!(vm.wait_exit(T), 2, "{}", vm.stderr());
    let err = vm.stderr();
    let line = error_line(&err);
    assert!(
        line.starts_with("error: --restore file:")
            && line.contains("fails its checksum; the stream is corrupt"),
        "{line}"
    );
    assert!(!err.contains("the VM is here"), "{err}");
}

/// `snap` written again section by section through migrated's own Writer (so every checksum
/// and the end marker's counts are right), with `change` deciding each section: None keeps
/// it; the extra sections it returns at the device state go in after it.
fn rewrite(snap: &Path, out: &Path, change: impl Fn(&mut Vec<u8>) -> Vec<(String, Vec<u8>)>) {
    use migrated::stream::{Reader, Section, Writer, Zeros};
    let bytes = std::fs::read(snap).unwrap();
    let mut r = Reader::new(&bytes[..]).unwrap();
    let mut w = Writer::new(Vec::new(), r.config()).unwrap();
    loop {
        match r.section().unwrap() {
            Section::Ram { gpa, data } => w.ram(gpa, data, Zeros::Skip).unwrap(),
            Section::Zero { gpa, pages } => w
                .ram(gpa, &vec![0u8; pages as usize * 4096], Zeros::Send)
                .unwrap(),
            Section::Device { name, state } => {
                let mut state = state.to_vec();
                let extra = change(&mut state);
                w.device(name, &state).unwrap();
                for (n, s) in extra {
                    w.device(&n, &s).unwrap();
                }
            }
            Section::End => break,
            other => panic!("a snapshot with {other:?}"),
        }
    }
    let (bytes, _) = w.finish().unwrap();
    std::fs::write(out, bytes).unwrap();
}

/// A snapshot that is well-formed, checksums and all, but whose content is wrong (what a
/// hostile or broken source could send): state for a device this build does not have, and a
/// vCPU state KVM refuses (a reserved CR4 bit). Each is refused at restore with one line that
/// says what, and nothing runs. (RAM past the end of the VM is refused by the stream's reader
/// itself: stream.rs's tests.)
#[test]
fn a_well_formed_snapshot_whose_content_is_wrong_is_refused() {
    let dir = TempDir::new("snapshot-wrong");
    let (img, snap) = snapshot_of_source(&dir);
    let unknown = dir.join("unknown-device");
    rewrite(&snap, &unknown, |_| {
        vec![("nosuchdev".to_string(), b"state".to_vec())]
    });
    let bad_cr4 = dir.join("bad-cr4");
    rewrite(&snap, &bad_cr4, |state| {
        use vmm_proto::state_capnp::vm_state;
        let msg = capnp::serialize::read_message(&mut &state[..], Default::default()).unwrap();
        let mut b = capnp::message::Builder::new_default();
        b.set_root(msg.get_root::<vm_state::Reader>().unwrap())
            .unwrap();
        {
            let root = b.get_root::<vm_state::Builder>().unwrap();
            let vcpus = root.get_vcpus().unwrap();
            let mut sregs = vcpus.get(0).get_sregs().unwrap();
            sregs.set_cr4(sregs.reborrow_as_reader().get_cr4() | 1 << 63);
        }
        *state = capnp::serialize::write_message_to_words(&b);
        Vec::new()
    });
    for (file, want) in [
        (&unknown, "state for a device \"nosuchdev\""),
        (&bad_cr4, "vCPU 0"),
    ] {
        let (mut vm, _) = restore(&dir, file, &img, "wrong");
        assert_eq!(vm.wait_exit(T), 2, "{}", vm.stderr());
        let err = vm.stderr();
        let line = error_line(&err);
        eprintln!("{line}");
        assert!(
            line.starts_with("error: --restore file:") && line.contains(want),
            "{line}"
        );
        assert!(!err.contains("the VM is here"), "{err}");
    }
}

/// The destination in a network namespace of its own, TLS with mutual authentication, and
/// tls-authz letting in the source's certificate subject.
#[test]
fn migrates_over_tcp_with_tls_to_another_network_namespace() {
    let dir = TempDir::new("mig-tls-tcp");
    let img = disk(&dir);
    let ns = NetNs::new(2);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &[&ns.ns_addr], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let listen = format!("tcp:{}:4712", ns.ns_addr);
    let dst = destination(
        &dir,
        &img,
        &listen,
        Some(&ns),
        &[
            "--tls-creds",
            d_creds.to_str().unwrap(),
            "--tls-authz",
            "CN=source.test",
        ],
    );
    let creds = s_creds.to_str().unwrap().to_string();
    migrate_and_check(
        &dir,
        &img,
        src,
        &src_sock,
        dst,
        &listen,
        &["--tls-creds", &creds],
    );
}

#[test]
fn migrates_over_unix_with_tls() {
    let dir = TempDir::new("mig-tls-unix");
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = destination(
        &dir,
        &img,
        &uri,
        None,
        &["--tls-creds", d_creds.to_str().unwrap()],
    );
    let creds = s_creds.to_str().unwrap().to_string();
    migrate_and_check(
        &dir,
        &img,
        src,
        &src_sock,
        dst,
        &uri,
        &["--tls-creds", &creds, "--tls-hostname", "dest.test"],
    );
}

/// The guest still runs on the source: its counter moves.
fn still_running(dir: &TempDir, sock: &Path) {
    let (_, info, _) = vmmctl(sock, &["info"]);
    assert!(info.contains("running"), "{info}");
    let at = last_pass(&std::fs::read_to_string(dir.join("source.txt")).unwrap());
    wait_until(T, "the source's guest to go on", || {
        last_pass(&std::fs::read_to_string(dir.join("source.txt")).unwrap()) >= at + 16
    });
}

/// exec: at both ends (socat over a unix socket), with TLS through the commands' pipes: the
/// destination reads the stream from its command's output and answers on its input.
#[test]
fn migrates_through_exec_commands_with_tls() {
    let dir = TempDir::new("mig-exec");
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let path = dir.join("relay.sock");
    let incoming = format!("exec:socat - UNIX-LISTEN:{}", path.display());
    let dst = destination(
        &dir,
        &img,
        &incoming,
        None,
        &["--tls-creds", d_creds.to_str().unwrap()],
    );
    wait_until(T, "socat to listen", || path.exists());
    let creds = s_creds.to_str().unwrap().to_string();
    let connect = format!("exec:socat - UNIX-CONNECT:{}", path.display());
    // Two socat relays copy the stream through pipes: on a loaded 2-core host that carries
    // as little as 25 MB/s, and the guest's dirtying outruns a 300 ms pause. The channel is
    // what this test is about: its pause limit is 1 s (still checked).
    migrate_and_check(
        &dir,
        &img,
        src,
        &src_sock,
        dst,
        &connect,
        &[
            "--tls-creds",
            &creds,
            "--tls-hostname",
            "dest.test",
            "--downtime-ms",
            "1000",
        ],
    );
}

/// A source with another CA's credentials, one that checks the wrong host name, a
/// plaintext source, and one whose certificate tls-authz does not list: each is refused
/// with a message that says why, the source goes on running, and the destination keeps
/// waiting, so the right source then migrates to it.
#[test]
fn tls_refusals_leave_the_source_running() {
    tls_refusals(
        "mig-tls-bad",
        "tcp:127.0.0.1:47213",
        "127.0.0.1",
        false,
        false,
    );
}

/// The same refusals through exec: (the source's command, socat, relays to the destination's
/// unix socket).
#[test]
fn tls_refusals_through_exec_leave_the_source_running() {
    tls_refusals("mig-tls-bad-exec", "", "dest.test", true, true);
}

/// The same refusals over unix:, where there is no host: the source names the destination
/// with --tls-hostname.
#[test]
fn tls_refusals_over_unix_leave_the_source_running() {
    tls_refusals("mig-tls-bad-unix", "", "dest.test", true, false);
}

/// Each refusal of the TLS matrix on `listen` (a unix socket in the test's directory when
/// empty, reached through an exec: command with `exec`), the destination's certificate for
/// `server_name`; then the good migration.
fn tls_refusals(name: &str, listen: &str, server_name: &str, name_it: bool, exec: bool) {
    let dir = TempDir::new(name);
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let other = TestCa::new("another CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &[server_name], "dest.test");
    let good = ca.creds(&dir.join("good"), &["x.test"], "source.test");
    let stranger = other.creds(&dir.join("stranger"), &["x.test"], "source.test");
    let unlisted = ca.creds(&dir.join("unlisted"), &["x.test"], "intruder.test");
    let expired = ca.creds_valid(&dir.join("expired"), &["x.test"], "source.test", false);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let unix = format!("unix:{}", dir.join("mig.sock").display());
    let listen = if listen.is_empty() {
        unix.as_str()
    } else {
        listen
    };
    let relay = format!(
        "exec:socat - UNIX-CONNECT:{}",
        dir.join("mig.sock").display()
    );
    let target = if exec { relay.as_str() } else { listen };
    // Over unix: the name to check, which tcp: takes from its host.
    let named: Vec<String> = if name_it {
        vec!["--tls-hostname".into(), server_name.into()]
    } else {
        vec![]
    };
    let dst = destination(
        &dir,
        &img,
        listen,
        None,
        &[
            "--tls-creds",
            d_creds.to_str().unwrap(),
            "--tls-authz",
            "CN=source.test",
        ],
    );
    let path = |p: &Path| p.to_str().unwrap().to_string();
    for (args, says) in [
        (
            [
                vec!["--tls-creds".to_string(), path(&stranger)],
                named.clone(),
            ]
            .concat(),
            "not signed by the CA in tls-creds",
        ),
        (
            vec![
                "--tls-creds".to_string(),
                path(&good),
                "--tls-hostname".to_string(),
                "wrong.test".to_string(),
            ],
            "pass tls-hostname with the name in its certificate",
        ),
        (vec![], "it may expect TLS"),
        (
            [
                vec!["--tls-creds".to_string(), path(&unlisted)],
                named.clone(),
            ]
            .concat(),
            "see its log",
        ),
        (
            [
                vec!["--tls-creds".to_string(), path(&expired)],
                named.clone(),
            ]
            .concat(),
            "refuse this source's certificate",
        ),
    ] {
        let mut a = vec!["migrate", target];
        a.extend(args.iter().map(String::as_str));
        let (code, out, err) = vmmctl(&src_sock, &a);
        assert_eq!(code, 1, "{a:?} should fail: {out}{err}");
        let line = err.lines().next().unwrap_or("");
        assert!(line.contains(says), "{a:?}: {line}");
        assert!(line.contains("the VM goes on here"), "{line}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        still_running(&dir, &src_sock);
    }
    // The destination said why for each, and waits on.
    for says in [
        "does not speak TLS",
        "\"CN=intruder.test\" is not in tls-authz",
        "the source's certificate is outside its validity period",
    ] {
        assert!(dst.stderr().contains(says), "{says}: {}", dst.stderr());
    }
    let creds = path(&good);
    let mut args = vec!["--tls-creds", creds.as_str()];
    args.extend(named.iter().map(String::as_str));
    migrate_and_check(&dir, &img, src, &src_sock, dst, target, &args);
}

/// The pid of a vmm-core's migrated.
fn migrated_of(vm: &TestVm) -> u32 {
    let mut found = None;
    wait_until(T, "migrated", || {
        found = children_of(vm.pid())
            .into_iter()
            .find(|&p| process_name(p) == "migrated");
        found.is_some()
    });
    found.unwrap()
}

/// A destination for `uri` (in `ns` if given, with `extra` arguments), listening.
fn destination(dir: &TempDir, img: &Path, uri: &str, ns: Option<&NetNs>, extra: &[&str]) -> TestVm {
    destination_from(TestVm::builder(), dir, img, uri, ns, extra)
}

/// migrated killed in the middle of a transfer, on the source and then on the destination:
/// each time the migration fails with a message, the source goes on running, and the next
/// attempt (to a new destination) succeeds.
#[test]
fn migrated_killed_mid_transfer_on_either_side_leaves_the_source_running() {
    let dir = TempDir::new("mig-kill");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    // A slow transfer (4 MiB/s: a few seconds for the first pass) to kill in the middle of.
    let slow = ["--bandwidth", "4M"];
    for side in ["source", "destination"] {
        let mut dst = destination(&dir, &img, &uri, None, &[]);
        let victim = match side {
            "source" => migrated_of(&src),
            _ => migrated_of(&dst),
        };
        let sock = src_sock.clone();
        let uri2 = uri.clone();
        let run = std::thread::spawn(move || {
            let mut a = vec!["migrate", uri2.as_str()];
            a.extend_from_slice(&slow);
            vmmctl(&sock, &a)
        });
        wait_until(T, "the transfer to be under way", || {
            let (_, st, _) = vmmctl(&src_sock, &["migrate", "status"]);
            st.contains("phase: pre-copy")
        });
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill on a pid this test found as the VM's own helper.
        assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
        let (code, out, err) = run.join().unwrap();
        assert_eq!(code, 1, "{side}: {out}{err}");
        assert!(err.contains("the VM goes on here"), "{side}: {err}");
        still_running(&dir, &src_sock);
        // The destination gives up with an error of its own.
        assert_ne!(dst.wait_exit(T), 0, "{side}: {}", dst.stderr());
        if side == "source" {
            assert!(err.contains("migrated died"), "{err}");
            wait_until(T, "another migrated", || migrated_of(&src) != victim);
        }
    }
    let dst = destination(&dir, &img, &uri, None, &[]);
    migrate_and_check(&dir, &img, src, &src_sock, dst, &uri, &[]);
}

/// --max-passes: a limit the dirtying guest cannot meet (1 ms) and two passes allowed. The
/// VM is paused after exactly two passes anyway; the migration completes, and both its
/// answer and its status say it was forced over the limit.
#[test]
fn max_passes_pauses_the_vm_over_the_limit_and_says_so() {
    let dir = TempDir::new("mig-max-passes");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let mut src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = destination(&dir, &img, &uri, None, &[]);
    let (code, out, err) = vmmctl(
        &src_sock,
        &["migrate", &uri, "--downtime-ms", "1", "--max-passes", "2"],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", src.stderr());
    assert!(
        out.contains("over 2 pass(es)") && out.contains("forced at --max-passes"),
        "{out}"
    );
    assert_eq!(src.wait_exit(T), 0, "{}", src.stderr());
    let log = src.stderr();
    assert!(
        log.contains("2 passes and the pause would still take about")
            && log.contains("over the 1 ms limit; pausing anyway (--max-passes)"),
        "{log}"
    );
    assert_eq!(
        log.matches("vmm-core: info: migration pass ").count(),
        2,
        "{log}"
    );
    // The guest goes on at the destination.
    let console = dir.join("dest.txt");
    wait_until(T, "the destination's guest to go on", || {
        last_pass(&std::fs::read_to_string(&console).unwrap_or_default()) > 0
    });
    drop(dst);
    // A bad --max-passes is refused before anything starts.
    let (code, _, err) = vmmctl(&src_sock, &["migrate", &uri, "--max-passes", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-passes"), "{err}");
}

/// `vmmctl migrate cancel` in the middle of a slow transfer: the source goes on running the
/// guest (its counter advances, `info` says running), and the destination, whose stream was
/// cut, ends without running it.
#[test]
fn a_cancelled_migration_leaves_the_source_running_and_the_destination_gone() {
    let dir = TempDir::new("mig-cancel");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = destination(&dir, &img, &uri, None, &[]);
    // 1 MiB/s: the first pass alone (the guest's 8 MiB and more) takes seconds.
    let migrating = std::process::Command::new(vmm_tests::vmmctl_bin())
        .args(["--socket", src_sock.to_str().unwrap()])
        .args(["migrate", &uri, "--bandwidth", "1M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut sent = 0;
    wait_until(T, "the transfer to be under way", || {
        let (_, out, _) = vmmctl(&src_sock, &["--json", "migrate", "status"]);
        sent = out
            .split("\"bytes\":")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        out.contains("\"phase\":\"pre-copy\"") && sent > 0
    });
    let (code, out, err) = vmmctl(&src_sock, &["migrate", "cancel"]);
    assert_eq!(code, 0, "{out}{err}");
    // The migrating vmmctl says it was cancelled, not that something failed.
    let result = migrating.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{result:?}");
    assert!(
        said.contains("migrate: cancelled (vmmctl migrate cancel); the VM goes on here"),
        "{said}"
    );
    // The destination ends, and never ran the guest.
    let code = dst.wait_exit(T);
    assert_ne!(code, 0, "the destination: {}", dst.stderr());
    let dst_console = std::fs::read_to_string(dir.join("dest.txt")).unwrap_or_default();
    assert!(
        !dst_console.contains("tg: mig pass"),
        "the destination ran the guest:\n{dst_console}"
    );
    // The source runs the guest on: its counter goes on after the cancel.
    let console = dir.join("source.txt");
    let at = last_pass(&std::fs::read_to_string(&console).unwrap());
    wait_until(T, "the source's guest to go on", || {
        last_pass(&std::fs::read_to_string(&console).unwrap_or_default()) >= at + 32
    });
    let (_, info, _) = vmmctl(&src_sock, &["info"]);
    assert!(info.contains("state:    running"), "{info}");
    let (_, status, _) = vmmctl(&src_sock, &["migrate", "status"]);
    assert!(status.starts_with("phase: cancelled"), "{status}");
    assert!(
        src.stderr()
            .contains("the migration was cancelled; the VM goes on here"),
        "{}",
        src.stderr()
    );
    drop(src);
}

/// The `error:` line of a vmm-core's log.
fn error_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"))
}

/// How the test, playing the source, reaches a destination.
enum Reach {
    Unix,
    Tcp(u16),
    /// The destination runs `exec:socat - UNIX-LISTEN:PATH`.
    Exec,
    /// The destination inherited one end of a socket pair as fd 5.
    Fd,
}

/// An unclean shutdown: a source that completes the TLS handshake, sends the first half of a
/// real stream and then cuts the connection without TLS close_notify (a truncation attack).
/// The destination refuses it, saying so, and runs nothing: over unix, tcp, exec and fd.
#[test]
fn a_tls_stream_cut_without_close_notify_is_refused() {
    for reach in [Reach::Unix, Reach::Tcp(47214), Reach::Exec, Reach::Fd] {
        cut_without_close_notify(reach);
    }
}

fn cut_without_close_notify(reach: Reach) {
    use std::io::Write;
    let name = match reach {
        Reach::Unix => "unix",
        Reach::Tcp(_) => "tcp",
        Reach::Exec => "exec",
        Reach::Fd => "fd",
    };
    let dir = TempDir::new(&format!("mig-tls-cut-{name}"));
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    // A real stream of this VM's shape: a snapshot of the usual source.
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let snap = dir.join("snap");
    let (code, out, err) = vmmctl(
        &src_sock,
        &["snapshot", &format!("file:{}", snap.display())],
    );
    assert_eq!(code, 0, "{out}{err}");
    drop(src);
    let stream = std::fs::read(&snap).unwrap();
    let path = dir.join("mig.sock");
    let tls_args = ["--tls-creds", d_creds.to_str().unwrap()];
    let (mut dst, raw) = match reach {
        Reach::Unix | Reach::Exec | Reach::Tcp(_) => {
            let uri = match reach {
                Reach::Unix => format!("unix:{}", path.display()),
                Reach::Exec => format!("exec:socat - UNIX-LISTEN:{}", path.display()),
                Reach::Tcp(port) => format!("tcp:127.0.0.1:{port}"),
                Reach::Fd => unreachable!(),
            };
            let dst = destination(&dir, &img, &uri, None, &tls_args);
            let raw: Box<dyn migrated::channel::Stream> = match reach {
                Reach::Tcp(port) => {
                    Box::new(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
                }
                _ => {
                    wait_until(T, "the destination's socket", || path.exists());
                    Box::new(std::os::unix::net::UnixStream::connect(&path).unwrap())
                }
            };
            (dst, raw)
        }
        Reach::Fd => {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let dst = destination_from(
                TestVm::builder().inherit_fd(b.into(), 5),
                &dir,
                &img,
                "fd:5",
                None,
                &tls_args,
            );
            (dst, Box::new(a) as Box<dyn migrated::channel::Stream>)
        }
    };
    let file = |f: &str| std::fs::read(s_creds.join(f)).unwrap();
    let tls = migrated::tls::Tls {
        dir: s_creds.display().to_string(),
        creds: migrated::tls::Creds {
            ca: file("ca-cert.pem"),
            cert: file("client-cert.pem"),
            key: file("client-key.pem"),
        },
        hostname: "dest.test".into(),
        authz: vec![],
    };
    let cut = raw.handle().unwrap();
    let channel = migrated::channel::Uri::Unix(path.clone());
    let mut s = migrated::tls::client(&channel, &tls, raw).unwrap();
    if let Err(e) = s.write_all(&stream[..stream.len() / 2]) {
        panic!("{name}: {e}\n{}", dst.stderr());
    }
    s.flush().unwrap();
    // The cut: the connection goes down under TLS, with no close_notify.
    cut.shutdown();
    std::mem::forget(s);
    let code = dst.wait_exit(T);
    assert_ne!(code, 0, "{name}: {}", dst.stderr());
    let err = dst.stderr();
    let line = error_line(&err);
    assert!(
        line.contains("without TLS close_notify") && line.contains("truncat"),
        "{name}: {line}"
    );
    assert!(!err.contains("the VM is here"), "{name}: {err}");
}

/// The TLS refusals over fd:N, where the destination has the one connection it inherited: each
/// refusal ends that destination (it says why and runs nothing), and the source goes on.
#[test]
fn tls_refusals_over_inherited_descriptors_leave_the_source_running() {
    let dir = TempDir::new("mig-tls-bad-fd");
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let other = TestCa::new("another CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let stranger = other.creds(&dir.join("stranger"), &["x.test"], "source.test");
    let good = ca.creds(&dir.join("good"), &["x.test"], "source.test");
    let unlisted = ca.creds(&dir.join("unlisted"), &["x.test"], "intruder.test");
    let expired = ca.creds_valid(&dir.join("expired"), &["x.test"], "source.test", false);
    let path = |p: &Path| p.to_str().unwrap().to_string();
    for (creds, hostname, source_says, dest_says) in [
        (
            Some(&stranger),
            "dest.test",
            "not signed by the CA in tls-creds",
            "",
        ),
        (
            Some(&good),
            "wrong.test",
            "pass tls-hostname with the name in its certificate",
            "",
        ),
        (None, "", "it may expect TLS", "does not speak TLS"),
        (
            Some(&unlisted),
            "dest.test",
            "see its log",
            "\"CN=intruder.test\" is not in tls-authz",
        ),
        (
            Some(&expired),
            "dest.test",
            "refuse this source's certificate",
            "the source's certificate is outside its validity period",
        ),
    ] {
        let (src, src_sock, mut dst) = fd_pair(
            &dir,
            &img,
            &[
                "--tls-creds",
                d_creds.to_str().unwrap(),
                "--tls-authz",
                "CN=source.test",
            ],
        );
        let mut args = vec!["migrate".to_string(), "fd:5".to_string()];
        if let Some(c) = creds {
            args.extend(["--tls-creds".to_string(), path(c)]);
            args.extend(["--tls-hostname".to_string(), hostname.to_string()]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = vmmctl(&src_sock, &a);
        assert_eq!(code, 1, "{a:?} should fail: {out}{err}");
        let line = err.lines().next().unwrap_or("");
        assert!(line.contains(source_says), "{a:?}: {line}");
        assert!(line.contains("the VM goes on here"), "{line}");
        still_running(&dir, &src_sock);
        // The destination had one connection: it ends, having said why, and ran nothing.
        assert_ne!(dst.wait_exit(T), 0, "{}", dst.stderr());
        assert!(
            dst.stderr().contains(dest_says),
            "{dest_says}: {}",
            dst.stderr()
        );
        assert!(!dst.stderr().contains("the VM is here"), "{}", dst.stderr());
        drop(src);
    }
}

/// QMP's run states. A destination waiting on --incoming says `incoming`, refuses what needs
/// a VM, and `shutdown --force` or SIGTERM end its wait at once (it used to hang, ignore
/// SIGTERM and give up after an undocumented 120 s); --incoming-timeout bounds the wait when
/// asked to. A migrating source goes `migrating`, then `postmigrate`, and the destination
/// says `running` once the VM is there.
#[test]
fn a_waiting_destination_says_incoming_and_stops_at_once() {
    let dir = TempDir::new("mig-states");
    let img = disk(&dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let api = dir.join("dst.sock");
    // With --memory the destination sets the VM up before the source comes, and serves its
    // API meanwhile (without, it learns the shape from the source first).
    let api_arg = ["--api-socket", api.to_str().unwrap(), "--memory", "256M"];
    let mut dst = destination(&dir, &img, &uri, None, &api_arg);
    let (code, out, err) = vmmctl(&api, &["info"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("state:    incoming\n"), "{out}");
    for cmd in [
        &["pause"][..],
        &["cpus", "set", "1"],
        &["migrate", "unix:/nonexistent"],
    ] {
        let (code, _, err) = vmmctl(&api, cmd);
        assert_eq!(code, 1, "{cmd:?}: {err}");
        assert!(
            err.contains("has not arrived yet (state incoming)"),
            "{cmd:?}: {err}"
        );
    }
    let asked = std::time::Instant::now();
    let (code, _, err) = vmmctl(&api, &["shutdown", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(dst.wait_exit(T), 0, "{}", dst.stderr());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );

    let mut dst = destination(&dir, &img, &uri, None, &api_arg);
    let asked = std::time::Instant::now();
    dst.signal(libc::SIGTERM);
    assert_eq!(dst.wait_exit(T), 143, "{}", dst.stderr());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );

    let mut dst = destination(&dir, &img, &uri, None, &["--incoming-timeout", "1"]);
    assert_eq!(dst.wait_exit(T), 2, "{}", dst.stderr());
    assert!(
        dst.stderr()
            .contains("no source connected within --incoming-timeout"),
        "{}",
        dst.stderr()
    );

    // A migration, watched through the states both sides report.
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let mut events = std::process::Command::new(vmm_tests::vmmctl_bin())
        .arg("--socket")
        .arg(&src_sock)
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(events.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert!(line.contains("subscribed to events"), "{line}");
    let dst = destination(&dir, &img, &uri, None, &api_arg);
    assert!(vmmctl(&api, &["info"]).1.starts_with("state:    incoming"));
    let (code, out, err) = vmmctl(&src_sock, &["migrate", &uri]);
    assert_eq!(
        code,
        0,
        "{out}{err}\n{}\n--- destination ---\n{}",
        src.stderr(),
        dst.stderr()
    );
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut events.stdout.take().unwrap(), &mut seen).unwrap();
    let _ = events.wait();
    let states: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.split_once(" state: ").map(|(_, s)| s))
        .collect();
    assert_eq!(states, ["migrating", "postmigrate"], "{seen}");
    assert!(vmmctl(&api, &["info"]).1.starts_with("state:    running"));
    drop((src, dst));
}

/// Progress is true while a pass runs (it stayed at 0 until a pass ended): with the stream
/// held to 4 MiB/s, `migrate status` shows the bytes growing during the first pass at about
/// that rate; the migration is cancelled then.
#[test]
fn migrate_status_counts_bytes_while_a_pass_runs() {
    let dir = TempDir::new("mig-progress");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source(&dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst = destination(&dir, &img, &uri, None, &[]);
    // The events, read on a thread of their own until the subscription ends.
    let mut events = vmm_tests::Terminated(
        std::process::Command::new(vmm_tests::vmmctl_bin())
            .arg("--socket")
            .arg(&src_sock)
            .arg("events")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut said = std::io::BufReader::new(events.0.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert!(line.contains("subscribed to events"), "{line}");
    let mut out = events.0.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        text
    });
    let migrating = std::process::Command::new(vmm_tests::vmmctl_bin())
        .arg("--socket")
        .arg(&src_sock)
        .args(["migrate", &uri, "--bandwidth", "4M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let field = |json: &str, key: &str| -> u64 {
        json.split(&format!("\"{key}\":"))
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {json}"))
    };
    let status = || vmmctl(&src_sock, &["--json", "migrate", "status"]).1;
    wait_until(T, "the first pass to send", || {
        let s = status();
        s.contains("\"phase\":\"pre-copy\"") && field(&s, "bytes") > 0
    });
    let first = status();
    std::thread::sleep(Duration::from_secs(1));
    let second = status();
    assert_eq!(field(&first, "passes"), 0, "{first}");
    assert_eq!(
        field(&second, "passes"),
        0,
        "still the first pass: {second}"
    );
    let (b1, b2) = (field(&first, "bytes"), field(&second, "bytes"));
    assert!(b2 > b1 + (2 << 20), "1 s at 4 MiB/s: {b1} then {b2}");
    let rate = field(&second, "bandwidth_bytes_per_s");
    assert!(
        ((2 << 20)..(8 << 20)).contains(&rate),
        "the rate while the pass runs: {rate} B/s (limit 4 MiB/s)"
    );
    assert!(field(&second, "ram_bytes") > 0, "{second}");
    assert_eq!(vmmctl(&src_sock, &["migrate", "cancel"]).0, 0);
    // A `migration` event each second said the same while the pass ran.
    drop(events);
    let seen = seen.join().unwrap();
    assert!(
        seen.lines()
            .any(|l| l.contains(" migration: pass 1: ") && l.contains(" MiB/s")),
        "{seen}"
    );
    let out = migrating.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop((src, dst));
}

/// The boot files and command line travel with the VM: a restore given no --cmdline takes
/// the one the VM came with, and a reset there boots with it (it used to boot the
/// restoring vmm-core's own); a --cmdline or --kernel that differs is refused, naming it.
#[test]
fn a_restored_vm_resets_into_the_command_line_it_came_with() {
    let dir = TempDir::new("mig-boot");
    let sock = dir.join("src.sock");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut src = TestVm::builder()
        .memory("64M")
        .cpus("1,max=2")
        .cmdline("console=ttyS0 tg.scenario=idle tg.mark=came-with-the-vm")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .spawn();
    src.wait_for("tg: ready", T);
    let snap = dir.join("vm.snap");
    let (code, _, err) = vmmctl(&sock, &["snapshot", &format!("file:{}", snap.display())]);
    assert_eq!(code, 0, "{err}");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(src.wait_exit(T), 0);

    // `run --restore file:P` and nothing else: the snapshot says what the VM is (kernel,
    // command line, memory, vCPUs, disks).
    let restore = |extra: &[&str]| {
        let api = dir.join("dst.sock");
        let mut c = std::process::Command::new(vmm_tests::vmm_core_bin());
        c.args(["run", "--restore", &format!("file:{}", snap.display())])
            .args(["--api-socket", api.to_str().unwrap()])
            .args(extra.iter().copied());
        (TestVm::spawn(c), api)
    };
    let (mut dst, api) = restore(&[]);
    wait_until(T, "the restored VM", || {
        api.exists() && vmmctl(&api, &["info"]).1.contains("state:    running")
    });
    let info = vmmctl(&api, &["info"]).1;
    assert!(info.contains("tg.mark=came-with-the-vm"), "{info}");
    assert!(
        info.contains("memory:   64 MiB") && info.contains("1 online, 2 max"),
        "{info}"
    );
    let disks = vmmctl(&api, &["disk", "list"]).1;
    assert!(disks.contains(&img.display().to_string()), "{disks}");
    assert_eq!(vmmctl(&api, &["reboot"]).0, 0);
    let line = dst.wait_for("tg: cmdline=", T);
    assert!(
        line.contains("tg.mark=came-with-the-vm"),
        "the reset booted with: {line}"
    );
    vmmctl(&api, &["shutdown", "--force"]);
    assert_eq!(dst.wait_exit(T), 0);

    let (mut other, _) = restore(&[
        "--cmdline",
        "console=ttyS0 tg.scenario=idle tg.mark=another",
    ]);
    assert_ne!(other.wait_exit(T), 0);
    let err = other.stderr();
    assert!(
        err.contains("--cmdline: the VM was booted with \"console=ttyS0 tg.scenario=idle tg.mark=came-with-the-vm\""),
        "{err}"
    );
    let kernel = dir.join("other-kernel.elf");
    std::fs::copy(vmm_tests::test_guest(), &kernel).unwrap();
    let (mut other, _) = restore(&["--kernel", kernel.to_str().unwrap()]);
    assert_ne!(other.wait_exit(T), 0);
    let err = other.stderr();
    assert!(
        err.contains(&format!(
            "--kernel: the VM was booted with {:?}, and a reset here would boot with {:?}",
            vmm_tests::test_guest().display().to_string(),
            kernel.display().to_string()
        )),
        "{err}"
    );
}

/// A live destination started with `--incoming` alone (no --kernel, --memory, --cpus,
/// --disk, --cmdline) learns the VM from its source: it takes the source's connection, reads
/// the stream's header (the source's settings), sets the VM up to match, and takes the rest
/// of the same stream. A stop while it waits for the source ends it at once.
#[test]
fn a_destination_given_only_incoming_learns_the_vm_from_its_source() {
    let dir = TempDir::new("mig-learn");
    let img = disk(&dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let dst_api = dir.join("dst.sock");
    let bare = |api: &Path| {
        let mut c = std::process::Command::new(vmm_tests::vmm_core_bin());
        c.args(["run", "--incoming", &uri])
            .args(["--api-socket", api.to_str().unwrap()])
            .args([
                "--serial",
                &format!("file={}", dir.join("dest.txt").display()),
            ]);
        TestVm::spawn(c)
    };
    // Waiting for its source, it stops on SIGTERM at once.
    let mut waiting = bare(&dst_api);
    wait_until(T, "the destination to wait", || {
        waiting
            .stderr()
            .contains("waiting for the source, to learn the VM's shape from it")
    });
    let asked = std::time::Instant::now();
    waiting.signal(libc::SIGTERM);
    assert_eq!(waiting.wait_exit(T), 143, "{}", waiting.stderr());
    assert!(asked.elapsed() < Duration::from_secs(5));

    let src_sock = dir.join("src.sock");
    let src = TestVm::builder()
        .memory("96M")
        .cpus("1,max=2")
        .cmdline("console=ttyS0 tg.scenario=ticker tg.mark=learned")
        .args(["--api-socket", src_sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join("source.txt").display()),
        ])
        .spawn();
    wait_until(T, "the source's ticks", || {
        std::fs::read_to_string(dir.join("source.txt")).is_ok_and(|t| t.contains("tg: tick 3\r\n"))
    });
    let mut dst = bare(&dst_api);
    wait_until(T, "the destination to wait", || {
        dst.stderr()
            .contains("waiting for the source, to learn the VM's shape from it")
    });
    let (code, out, err) = vmmctl(&src_sock, &["migrate", &uri]);
    assert_eq!(
        code,
        0,
        "{out}{err}\n{}\n--- destination ---\n{}",
        src.stderr(),
        dst.stderr()
    );
    let info = vmmctl(&dst_api, &["info"]).1;
    assert!(info.contains("state:    running"), "{info}");
    assert!(
        info.contains("memory:   96 MiB") && info.contains("1 online, 2 max"),
        "{info}"
    );
    assert!(info.contains("tg.mark=learned"), "{info}");
    let disks = vmmctl(&dst_api, &["disk", "list"]).1;
    assert!(disks.contains(&img.display().to_string()), "{disks}");
    // The guest goes on there: its ticks carry on in the destination's console.
    wait_until(T, "the destination's ticks", || {
        std::fs::read_to_string(dir.join("dest.txt"))
            .is_ok_and(|t| t.matches("tg: tick ").count() >= 3)
    });
    vmmctl(&dst_api, &["shutdown", "--force"]);
    assert_eq!(dst.wait_exit(T), 0);
    drop(src);
}
