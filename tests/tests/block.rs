//! Disks over vhost-user-blk: the test guest's virtio-pci block driver talks to blockd through
//! shared memory, KVM ioeventfds and irqfds; what it wrote is checked in the image files.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;
use vmm_tests::{
    check_seq_blocks, process_name, seq_acks, wait_until, TempDir, Terminated, TestVm,
};

const T: Duration = Duration::from_secs(90);
use vmm_tests::{blk_pattern as pattern, BLK_ZERO_RANGES as ZERO_RANGES};

fn write_image(path: &Path, bytes: u64, seed: u64) {
    std::fs::write(path, pattern(bytes, seed)).unwrap();
}

/// Checks the guest's pattern in an image, with the zeroed ranges zero.
fn check_guest_pattern(path: &Path, seed: u64) {
    let data = std::fs::read(path).unwrap();
    vmm_tests::assert_blk_written(&data, seed, &path.display().to_string());
}

fn field(vm: &TestVm, prefix: &str, key: &str) -> String {
    vm.field(prefix, key)
        .unwrap_or_else(|| panic!("no {key}= on the console line {prefix:?}:\n{}", vm.stdout()))
}

fn blockd_pids(vm: &TestVm) -> Vec<u32> {
    vm.children()
        .into_iter()
        .filter(|p| process_name(*p) == "blockd")
        .collect()
}

/// Whether `offset` starts a hole in the file (SEEK_HOLE finds a hole right there).
fn hole_at(path: &Path, offset: u64) -> bool {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on our own open fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, libc::SEEK_HOLE) };
    r == offset as i64
}

#[test]
fn two_disks_two_queues_pattern_zeroes_sparse_and_a_read_only_disk() {
    let dir = TempDir::new("block-pattern");
    let (d0, d1, d2) = (dir.join("d0.img"), dir.join("d1.img"), dir.join("ro.img"));
    // The host writes a pattern (seed 99) that the guest checks first.
    write_image(&d0, 8 << 20, 99);
    write_image(&d1, 2 << 20, 99);
    write_image(&d2, 1 << 20, 99);
    let ro_before = std::fs::read(&d2).unwrap();
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=7 tg.blk.host=99")
        .arg("--disk")
        .arg(format!("path={},queues=2", d0.display()))
        .arg("--disk")
        .arg(format!("path={},queues=2,serial=second-disk", d1.display()))
        .arg("--disk")
        .arg(format!("path={},readonly=on", d2.display()))
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let out = vm.stdout();
    assert!(out.contains("tg: blk disks=3"), "{out}");
    assert!(out.contains("tg: blk done"), "{out}");

    // What the guest saw.
    for (i, id, queues) in [
        (0, "disk0", "2"),
        (1, "second-disk", "2"),
        (2, "disk2", "1"),
    ] {
        let p = format!("tg: blk{i} slot=");
        assert_eq!(field(&vm, &p, "id"), id);
        assert_eq!(field(&vm, &p, "queues"), queues);
        assert_eq!(field(&vm, &p, "id-status"), "0");
        let h = format!("tg: blk{i} host-pattern");
        assert_eq!(field(&vm, &h, "bad-words"), "0", "{out}");
        assert_eq!(field(&vm, &h, "errors"), "0", "{out}");
    }
    assert_eq!(field(&vm, "tg: blk0 slot=", "capacity"), "16384");
    for i in 0..2 {
        let p = format!("tg: blk{i} pattern");
        for k in ["bad-words", "errors", "timeouts"] {
            assert_eq!(field(&vm, &p, k), "0", "{k}: {out}");
        }
        let z = format!("tg: blk{i} zeroes");
        for k in [
            "discard",
            "write-zeroes",
            "write-zeroes-unmap",
            "nonzero-words",
            "pattern-bad-words",
        ] {
            assert_eq!(field(&vm, &z, k), "0", "{k}: {out}");
        }
        // A request past the end fails with IOERR, and the disk keeps working.
        let b = format!("tg: blk{i} beyond-end");
        assert_eq!(field(&vm, &b, "status"), "1");
        assert!(out.contains(&format!(
            "tg: blk{i} beyond-end status=1 then-read status=0"
        )));
        // Both queues carried requests, and each queue's MSI-X vector reached the LAPIC.
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("tg: blk{i} queue-requests")))
            .unwrap();
        let nums: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(nums.len(), 4, "{line}");
        assert!(nums[0] > 10 && nums[1] > 10, "{line}");
        assert_eq!(&nums[2..], &[1, 1], "MSI-X not seen: {line}");
    }
    assert!(
        out.contains("tg: blk2 ro write-status=1 write-zeroes-status=1 read-status=0"),
        "{out}"
    );

    // What reached the disks.
    check_guest_pattern(&d0, 7);
    check_guest_pattern(&d1, 7);
    assert!(
        std::fs::read(&d2).unwrap() == ro_before,
        "the read-only image changed"
    );
    // Discard and write-zeroes with unmap leave holes; plain write-zeroes may not.
    assert!(hole_at(&d0, 8 * 512), "no hole where the guest discarded");
    assert!(
        hole_at(&d0, 80 * 512),
        "no hole after write-zeroes with unmap"
    );

    // The data path bypassed vmm-core: no queue kick reached it, and it handled far fewer
    // MMIO exits than there were requests.
    let err = vm.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("exits handled by vmm-core this boot"))
        .unwrap_or_else(|| panic!("no exit counts in the log:\n{err}"));
    assert!(
        line.ends_with("disk0 0, disk1 0, disk2 0"),
        "kicks reached vmm-core: {line}"
    );
    let mmio: u64 = line
        .split(" port I/O, ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let requests: u64 = out
        .lines()
        .filter(|l| l.contains(" queue-requests "))
        .flat_map(|l| {
            l.split(" msix")
                .next()
                .unwrap()
                .split_whitespace()
                .filter_map(|w| w.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(requests > 400, "{requests} requests");
    assert!(
        mmio * 3 < requests,
        "{mmio} MMIO exits for {requests} requests: the data path goes through vmm-core"
    );
}

/// With the write cache off every completed write is durable: the image is served from
/// crashfs, which keeps only what was synced; blockd is killed the moment the guest has its
/// completions, then the power is cut, and the durable copy holds every write. (A killed
/// process's writes survive in the page cache whether or not it synced them: only the
/// durable copy can tell.)
#[test]
fn writes_with_the_cache_off_are_durable_when_blockd_is_killed() {
    let dir = TempDir::new("block-fua");
    let start = dir.join("start.img");
    std::fs::write(&start, vec![0u8; 2 << 20]).unwrap();
    let fs = vmm_tests::CrashFs::start(Path::new(env!("CARGO_BIN_EXE_crashfs")), &dir, &start);
    let vm = TestVm::builder()
        .cmdline(
            "console=ttyS0 tg.scenario=blk tg.blk.seed=3 tg.blk.wce=0 tg.blk.halt-after-write=1",
        )
        .arg("--disk")
        .arg(format!("path={}", fs.image().display()))
        .spawn();
    vm.wait_for("tg: blk0 written-unflushed", T);
    assert_eq!(field(&vm, "tg: blk0 writeback=", "writeback"), "0");
    assert_eq!(field(&vm, "tg: blk0 written-unflushed", "errors"), "0");
    // The moment the guest has its completions, blockd dies without any chance to flush.
    let pids = blockd_pids(&vm);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: kill on the PID of blockd, which our vmm-core started.
    unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), "blockd to die", || {
        // Gone, or a zombie that vmm-core has not reaped yet.
        std::fs::read_to_string(format!("/proc/{}/stat", pids[0])).map_or(true, |s| {
            s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'))
        })
    });
    drop(vm);
    let durable = fs.power_cut();
    assert!(
        durable == pattern(2 << 20, 3),
        "completed writes are missing from what was made durable"
    );
}

#[test]
fn malformed_descriptor_chains_get_errors_and_blockd_keeps_serving() {
    let dir = TempDir::new("block-bad");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk-bad")
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .spawn();
    vm.wait_for("tg: blk-bad answered=", T);
    let before = blockd_pids(&vm);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let out = vm.stdout();
    // (case, status): IOERR for what is malformed, UNSUPP for an unknown type, and no status
    // at all where the chain has no writable byte to put one in.
    for (case, status) in [
        ("header-outside-ram", "1"),
        ("data-outside-ram", "1"),
        ("short-header", "1"),
        ("odd-length", "1"),
        ("unknown-type", "2"),
        ("beyond-capacity", "1"),
        ("sector-overflow", "1"),
        ("no-status", "255"),
        ("next-out-of-range", "255"),
        ("bad-indirect", "255"),
    ] {
        let p = format!("tg: blk-bad case={case} ");
        assert_eq!(field(&vm, &p, "answered"), "1", "{case}: {out}");
        assert_eq!(field(&vm, &p, "status"), status, "{case}: {out}");
    }
    assert!(
        out.contains("tg: blk-bad answered=11 after write-status=0 read-status=0 bad-words=0"),
        "{out}"
    );
    assert_eq!(before.len(), 1, "blockd died: {}", vm.stderr());
    assert!(vm
        .stderr()
        .contains("blockd: warn: queue 0: the guest's request failed"));
    // The good write after the bad ones reached the image.
    let mut f = std::fs::File::open(&img).unwrap();
    let mut first = vec![0u8; 65536];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut first).unwrap();
    assert!(first == pattern(65536, 5));
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}; install qemu-utils (scripts/setup.sh does)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn qcow2_pattern_round_trip_and_qemu_img_check_is_clean() {
    let dir = TempDir::new("block-qcow2");
    let img = dir.join("disk.qcow2");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    assert!(ok, "{out}");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=11")
        .arg("--disk")
        .arg(format!("path={},format=qcow2,queues=2", img.display()))
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let out = vm.stdout();
    assert_eq!(field(&vm, "tg: blk0 slot=", "capacity"), "16384", "{out}");
    for k in ["bad-words", "errors", "timeouts"] {
        assert_eq!(field(&vm, "tg: blk0 pattern", k), "0", "{k}: {out}");
    }
    for k in [
        "discard",
        "write-zeroes",
        "write-zeroes-unmap",
        "nonzero-words",
        "pattern-bad-words",
    ] {
        assert_eq!(field(&vm, "tg: blk0 zeroes", k), "0", "{k}: {out}");
    }
    // blockd flushed its metadata when the VM ended: the image is consistent...
    let (ok, check) = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(ok && check.contains("No errors were found"), "{check}");
    // ...and holds what the guest wrote.
    let raw = dir.join("disk.raw");
    let (ok, conv) = qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{conv}");
    check_guest_pattern(&raw, 11);
}

/// libblkio's virtio-blk-vhost-user driver, an independent vhost-user-blk client, writes and
/// verifies a pattern through blockd; the host then finds it in the image.
#[test]
fn blkio_client_writes_and_verifies_through_blockd() {
    let dir = TempDir::new("block-blkio");
    let img = dir.join("disk.img");
    let sock = dir.join("blockd.sock");
    std::fs::write(&img, vec![0xa5u8; 16 << 20]).unwrap();
    let mut blockd = std::process::Command::new(vmm_tests::blockd_bin())
        .args([
            "--image",
            img.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ])
        .args(["--queues", "2", "--once"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "blockd's socket", || sock.exists());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkio-bench"))
        .args([
            "--driver",
            "virtio-blk-vhost-user",
            "--path",
            sock.to_str().unwrap(),
        ])
        .args(["verify", "--seed", "21"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("verify capacity=16777216 bad-words=0 zeroes=ok"),
        "{text}"
    );
    // blockd (--once) ends when the client disconnects, having flushed.
    let status = blockd.wait().unwrap();
    assert!(status.success(), "blockd: {status}");
    let data = std::fs::read(&img).unwrap();
    let mut want = pattern(16 << 20, 21);
    want[..4096].fill(0);
    want[8192..12288].fill(0);
    assert!(
        data == want,
        "the image does not hold what the client wrote"
    );
}

#[test]
fn vmmctl_disk_list_and_stats_count_what_the_guest_did() {
    let dir = TempDir::new("block-stats");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let sock = vmm_tests::socket_path("block-stats");
    let vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=4 tg.blk.halt-after-write=1")
        .arg("--disk")
        .arg(format!("path={},queues=2", img.display()))
        .arg("--api-socket")
        .arg(sock.to_str().unwrap())
        .spawn();
    vm.wait_for("tg: blk0 written-unflushed", T);
    let (code, out, err) = vmm_tests::vmmctl(&sock, &["disk", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("disk0"), "{out}");
    assert!(
        out.contains("4.0 MiB") && out.contains("queues=2") && out.contains("connected"),
        "{out}"
    );
    assert!(out.contains(img.to_str().unwrap()), "{out}");

    let (code, json, err) = vmm_tests::vmmctl(&sock, &["--json", "disk", "stats", "disk0"]);
    assert_eq!(code, 0, "{err}");
    // The guest wrote 4 MiB in 64 KiB requests (after its GET_ID).
    let write = json
        .split("{\"op\":\"write\",")
        .nth(1)
        .unwrap_or_else(|| panic!("{json}"));
    let num = |key: &str| -> u64 {
        write
            .split(&format!("\"{key}\":"))
            .nth(1)
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {json}"))
    };
    assert_eq!(num("requests"), 64, "{json}");
    assert_eq!(num("bytes"), 4 << 20, "{json}");
    assert_eq!(num("errors"), 0, "{json}");
    let latency = write
        .split("\"latency\":[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let counted: u64 = latency
        .split("\"count\":")
        .skip(1)
        .map(|s| s.split('}').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        counted, 64,
        "every write is in the latency histogram: {latency}"
    );
    assert!(json.contains("\"op\":\"get-id\",\"requests\":1"), "{json}");

    let (code, human, _) = vmm_tests::vmmctl(&sock, &["disk", "stats"]);
    assert_eq!(code, 0);
    assert!(human.contains("write cache on"), "{human}");
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["disk", "stats", "disk7"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no disk \"disk7\"; this VM has disk0"),
        "{err}"
    );
}

/// systemd socket activation: blockd takes the listening socket systemd passes (LISTEN_FDS),
/// here from systemd-socket-activate; vmm-core adds its disk to that blockd.
#[test]
fn blockd_serves_a_socket_passed_by_systemd() {
    let dir = TempDir::new("block-activate");
    let listen = dir.join("blockd.sock");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let mut activator = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&listen)
        .arg(vmm_tests::blockd_bin())
        .args(["--listen", "systemd"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package) must be installed");
    wait_until(T, "the activation socket", || listen.exists());
    for seed in [31, 32] {
        // Twice: a second VM (or a restarted vmm-core) adds its disk again.
        let mut vm = TestVm::builder()
            .cmdline(&format!("console=ttyS0 tg.scenario=blk tg.blk.seed={seed}"))
            .args(["--blockd-socket", listen.to_str().unwrap()])
            .args(["--disk", &format!("path={}", img.display())])
            .spawn();
        assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
        assert!(
            vm.stderr().contains("connected to blockd at"),
            "{}",
            vm.stderr()
        );
        assert_eq!(field(&vm, "tg: blk0 pattern", "bad-words"), "0");
        check_guest_pattern(&img, seed);
    }
    activator.kill().unwrap();
    activator.wait().unwrap();
}

/// The same disk path with the helpers' sandbox off (--no-sandbox, for debugging): blockd runs
/// as started, and the data is the same.
#[test]
fn disks_work_the_same_with_the_sandbox_off() {
    let dir = TempDir::new("block-nosandbox");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=41")
        .arg("--no-sandbox")
        .args(["--disk", &format!("path={},queues=2", img.display())])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert!(
        !vm.stderr().contains("blockd: info: sandboxed"),
        "{}",
        vm.stderr()
    );
    for k in ["bad-words", "errors", "timeouts"] {
        assert_eq!(field(&vm, "tg: blk0 pattern", k), "0", "{k}");
    }
    check_guest_pattern(&img, 41);
}

/// vmm-core's vhost-user frontend drives another vhost-user-blk backend, QEMU's:
/// qemu-storage-daemon exports a raw file, and the guest's pattern lands in it.
#[test]
fn vmm_core_drives_qemu_storage_daemons_vhost_user_blk_export() {
    let dir = TempDir::new("block-qsd");
    let img = dir.join("disk.img");
    let sock = dir.join("qsd.sock");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let mut qsd = std::process::Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=file,node-name=file0,filename={},discard=unmap",
                img.display()
            ),
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,writable=on,num-queues=2,addr.type=unix,addr.path={}",
                sock.display()
            ),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon (Debian's qemu-system-common; scripts/setup.sh installs it)");
    wait_until(T, "qemu-storage-daemon's socket", || sock.exists());
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=51")
        .args(["--disk", &format!("socket={},queues=2", sock.display())])
        .spawn();
    let code = vm.wait_exit(T);
    let _ = qsd.kill();
    let _ = qsd.wait();
    assert_eq!(code, 0, "{}\n{}", vm.stdout(), vm.stderr());
    assert_eq!(field(&vm, "tg: blk0 slot=", "queues"), "2");
    for k in ["bad-words", "errors", "timeouts"] {
        assert_eq!(
            field(&vm, "tg: blk0 pattern", k),
            "0",
            "{k}: {}",
            vm.stdout()
        );
    }
    for k in [
        "discard",
        "write-zeroes",
        "nonzero-words",
        "pattern-bad-words",
    ] {
        assert_eq!(
            field(&vm, "tg: blk0 zeroes", k),
            "0",
            "{k}: {}",
            vm.stdout()
        );
    }
    check_guest_pattern(&img, 51);
}

/// A blockd of the test's own, serving its export API on a control socket in `dir` (its
/// stderr to `stderr`), ended with the test; and that socket.
fn own_blockd(dir: &TempDir, stderr: std::process::Stdio) -> (Terminated, std::path::PathBuf) {
    let ctl = dir.join("blockd.sock");
    let blockd = Terminated(
        std::process::Command::new(vmm_tests::blockd_bin())
            .arg("--listen")
            .arg(&ctl)
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    wait_until(T, "blockd's control socket", || ctl.exists());
    (blockd, ctl)
}

/// `vmmctl --blockd CTL disk fault add ARGS`; the new rule's id.
fn add_rule(ctl: &Path, args: &[&str]) -> String {
    let (code, out, err) = blockd_ctl(ctl, &[&["disk", "fault", "add"][..], args].concat());
    assert_eq!(code, 0, "{err}");
    out.trim()
        .trim_start_matches("fault rule ")
        .trim_end_matches(" added")
        .to_string()
}

/// Export `d0`: `image` served on the vhost-user socket `vhost`, by a blockd of the test's own.
fn add_export(ctl: &Path, image: &Path, vhost: &Path) {
    let (code, _, err) = blockd_ctl(
        ctl,
        &[
            "disk",
            "add",
            "d0",
            "--image",
            image.to_str().unwrap(),
            "--vhost-socket",
            vhost.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
}

/// `vmmctl --blockd SOCKET ARGS` against a blockd of the test's own.
fn blockd_ctl(ctl: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(vmm_tests::vmmctl_bin())
        .arg("--blockd")
        .arg(ctl)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// QEMU's werror=enospc: an injected ENOSPC on the guest's writes stops the disk, and the VM
/// pauses with an event naming the disk and the reason. `vmmctl resume` retries the write:
/// while the rule stays it fails again and the VM pauses again; once the rule is removed the
/// write completes, the guest sees no error, and the image holds exactly its pattern.
#[test]
fn enospc_with_policy_stop_pauses_the_vm_and_resume_completes_the_write() {
    let dir = TempDir::new("block-enospc");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let (_blockd, ctl) = own_blockd(&dir, std::process::Stdio::piped());
    // The rule is there before the guest writes: ENOSPC on any write touching 1 MiB + 4 KiB.
    let id = add_rule(
        &ctl,
        &[
            "--ops",
            "write",
            "--range",
            "1048576-1052672",
            "--errno",
            "ENOSPC",
        ],
    );
    let sock = vmm_tests::socket_path("block-enospc");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=61")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--blockd-socket", ctl.to_str().unwrap()])
        .arg("--disk")
        .arg(format!("path={},werror=enospc", img.display()))
        .spawn();
    let paused = |n: usize| {
        wait_until(T, "the VM to pause on the disk's error", || {
            vm.stderr()
                .matches("the VM is paused (its error policy is stop)")
                .count()
                >= n
                && vmm_tests::vmmctl(&sock, &["info"]).1.contains("paused")
        })
    };
    paused(1);
    let log = vm.stderr();
    assert!(
        log.contains("disk0: a write of ")
            && log.contains("failed: No space left on device (os error 28); the VM is paused"),
        "{log}"
    );
    let (_, list, _) = blockd_ctl(&ctl, &["disk", "list"]);
    assert!(
        list.contains(
            "STOPPED: a write of 65536 bytes at byte 1048576 failed: No space left on device"
        ),
        "{list}"
    );
    // vmm-core's view says the same.
    let (_, list, _) = vmm_tests::vmmctl(&sock, &["disk", "list"]);
    assert!(list.contains("STOPPED: a write of 65536 bytes"), "{list}");
    let (_, json, _) = vmm_tests::vmmctl(&sock, &["--json", "disk", "list"]);
    assert!(json.contains("\"write_error\":\"enospc\""), "{json}");
    let (_, rules, _) = vmm_tests::vmmctl(&sock, &["disk", "fault", "list"]);
    assert!(
        rules.contains("write") && rules.contains("errno=ENOSPC") && rules.contains("hits=1"),
        "{rules}"
    );
    // Resumed with the rule still there: the retried write fails again; the VM pauses again.
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["resume"]);
    assert_eq!(code, 0, "{err}");
    paused(2);
    // The cause goes; resume completes the write and the guest carries on to the end.
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["disk", "fault", "remove", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["resume"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let out = vm.stdout();
    for k in ["bad-words", "errors", "timeouts"] {
        assert_eq!(field(&vm, "tg: blk0 pattern", k), "0", "{k}: {out}");
    }
    assert!(
        vm.stderr().contains("retrying 1 request(s)"),
        "{}",
        vm.stderr()
    );
    check_guest_pattern(&img, 61);
}

/// Fault rules (blkdebug's kind) with the default error policy, report: a flush failed once
/// with EIO reaches the guest as one I/O error and nothing else changes; a read delayed by
/// 200 ms shows in blockd's latency histogram; once-rules are gone after firing.
#[test]
fn fault_rules_fail_and_delay_requests_and_the_guest_sees_the_error() {
    let dir = TempDir::new("block-faults");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let (_blockd, ctl) = own_blockd(&dir, std::process::Stdio::null());
    for rule in [
        &["--ops", "flush", "--errno", "EIO", "--once"][..],
        &[
            "--ops",
            "read",
            "--range",
            "0-4096",
            "--delay-ms",
            "200",
            "--once",
        ][..],
    ] {
        add_rule(&ctl, rule);
    }
    let (_, rules, _) = blockd_ctl(&ctl, &["disk", "fault", "list"]);
    assert_eq!(rules.lines().count(), 3, "{rules}");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=71")
        .args(["--blockd-socket", ctl.to_str().unwrap()])
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .spawn();
    // The guest keeps its disk open until it powers off; look at blockd's figures meanwhile.
    vm.wait_for("tg: blk0 pattern", T);
    let (_, stats, _) = blockd_ctl(&ctl, &["disk", "stats"]);
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    assert_eq!(
        field(&vm, "tg: blk0 pattern", "errors"),
        "1",
        "{}",
        vm.stdout()
    );
    assert_eq!(field(&vm, "tg: blk0 pattern", "bad-words"), "0");
    let flush = stats
        .lines()
        .find(|l| l.trim_start().starts_with("flush"))
        .unwrap();
    let cols: Vec<&str> = flush.split_whitespace().collect();
    assert_eq!(cols[4], "1", "flush errors: {stats}");
    let read = stats
        .lines()
        .find(|l| l.trim_start().starts_with("read"))
        .unwrap();
    assert!(read.contains(">100ms:1"), "the delayed read: {stats}");
    let (_, rules, _) = blockd_ctl(&ctl, &["disk", "fault", "list"]);
    assert_eq!(rules.trim(), "no fault rules");
    check_guest_pattern(&img, 71);
}

/// An exit rule: blockd ends at the first matching request (a crash at a chosen moment, for
/// crash tests), and says which rule did it.
#[test]
fn an_exit_rule_ends_blockd_at_the_next_write() {
    let dir = TempDir::new("block-exit-rule");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let log = dir.join("blockd.log");
    let (mut blockd, ctl) = own_blockd(&dir, std::fs::File::create(&log).unwrap().into());
    let vhost = dir.join("d0.sock");
    add_export(&ctl, &img, &vhost);
    add_rule(&ctl, &["--disk", "d0", "--ops", "write", "--exit"]);
    // libblkio's client waits for its write for ever once blockd is gone; it is ended below.
    let _client = Terminated(
        std::process::Command::new(env!("CARGO_BIN_EXE_blkio-bench"))
            .args(["--driver", "virtio-blk-vhost-user", "--path"])
            .arg(&vhost)
            .args([
                "run",
                "--workload",
                "randwrite",
                "--bs",
                "4096",
                "--qd",
                "1",
            ])
            .args(["--seconds", "60"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The client writes as soon as it is connected (it runs far longer than that takes, so a
    // loaded machine cannot end it before its first write).
    let deadline = std::time::Instant::now() + T;
    let mut status = None;
    while status.is_none() && std::time::Instant::now() < deadline {
        status = blockd.0.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("blockd did not exit; its log:\n{err}"));
    assert_eq!(status.code(), Some(70), "{err}");
    assert!(
        err.contains("export d0: fault rule 1: blockd exits at this Write, as asked"),
        "{err}"
    );
}

/// The crash test: the guest writes 2000 sequence-numbered, checksummed 4 KiB blocks with its
/// write cache off (each write durable when it completes, as FUA), eight at a time so that
/// blockd completes them out of order, and logs each acknowledged one. Meanwhile blockd is
/// killed with SIGKILL ten times at random moments; vmm-core starts another each time, adds
/// the export again and reconnects the disk, handing it the inflight area, from which it
/// resubmits what its predecessor had taken. Every acknowledged block is then on disk with the
/// right sequence number and checksum, and the guest saw no I/O error and no timeout, only
/// stalls.
#[test]
fn blockd_killed_ten_times_loses_no_acknowledged_write() {
    const COUNT: u64 = 2000;
    let dir = TempDir::new("block-crash");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=blk-seq tg.seq.count={COUNT} tg.seq.depth=8"
        ))
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .spawn();
    wait_until(T, "the guest's first acknowledged writes", || {
        vm.stdout().matches("tg: ack ").count() >= 20
    });
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut killed = Vec::new();
    for k in 1..=10 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(100 + rng % 400));
        assert!(
            !vm.stdout().contains("tg: seq done"),
            "the guest finished before kill {k}; the test needs a longer run"
        );
        let pids = blockd_pids(&vm);
        assert_eq!(pids.len(), 1, "blockd processes before kill {k}: {pids:?}");
        // SAFETY: SIGKILL to the blockd our vmm-core started (its child, by PID).
        unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
        killed.push(vm.stdout().matches("tg: ack ").count());
        wait_until(T, "vmm-core to restart blockd", || {
            vm.stderr().contains(&format!(
                "restarted blockd (restart {k}); disks reconnected: disk0"
            ))
        });
    }
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let out = vm.stdout();
    assert!(
        out.contains(&format!(
            "tg: seq done count={COUNT} depth=8 writeback=0 errors=0 timeouts=0"
        )),
        "{out}"
    );
    // Each kill came while the guest was writing (acks before it, and more after).
    assert!(
        killed.windows(2).all(|w| w[0] <= w[1]) && killed[9] < COUNT as usize,
        "acks at each kill: {killed:?}"
    );
    let mut acks = seq_acks(&out);
    assert_eq!(check_seq_blocks(&img, &out), COUNT, "acknowledged blocks");
    acks.sort_unstable();
    acks.dedup();
    assert_eq!(acks.len() as u64, COUNT, "each block acknowledged once");
    eprintln!(
        "resubmissions after the ten kills: {}",
        vm.stderr().matches("left in flight").count()
    );
}

/// Out-of-order completion across a crash: of a batch of eight writes, a fault rule holds the
/// fourth back while the other seven complete; blockd is killed then. The restarted blockd
/// finds exactly that one request in the inflight area and resubmits it (going on from the
/// guest's used index alone would take one of the completed writes again and lose the held
/// one). The guest sees each write completed once, with no error.
#[test]
fn a_restarted_blockd_resubmits_exactly_what_was_in_flight() {
    const COUNT: u64 = 200;
    let dir = TempDir::new("block-inflight");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = vmm_tests::socket_path("block-inflight");
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=blk-seq tg.seq.count={COUNT} tg.seq.depth=8"
        ))
        .args(["--api-socket", sock.to_str().unwrap()])
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .spawn();
    wait_until(T, "the guest's first acknowledged writes", || {
        seq_acks(&vm.stdout()).len() >= 16
    });
    // The fourth write of a batch at least two ahead waits ten minutes.
    let now = seq_acks(&vm.stdout()).len() as u64;
    let batch = (now / 8 + 3) * 8;
    let held = batch + 3;
    assert!(batch + 8 <= COUNT);
    let range = format!("{}-{}", held * 4096, (held + 1) * 4096);
    let (code, _, err) = vmm_tests::vmmctl(
        &sock,
        &[
            "disk",
            "fault",
            "add",
            "--disk",
            "disk0",
            "--ops",
            "write",
            "--range",
            &range,
            "--delay-ms",
            "600000",
        ],
    );
    assert_eq!(code, 0, "{err}");
    wait_until(T, "the held write's batch to complete but for it", || {
        let acks = seq_acks(&vm.stdout());
        (batch..batch + 8).all(|s| s == held || acks.contains(&s))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !seq_acks(&vm.stdout()).contains(&held),
        "write {held} completed despite its delay rule"
    );
    let pids = blockd_pids(&vm);
    assert_eq!(pids.len(), 1, "blockd processes: {pids:?}");
    // SAFETY: SIGKILL to the blockd our vmm-core started (its child, by PID).
    unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let (out, log) = (vm.stdout(), vm.stderr());
    assert!(
        log.contains("restarted blockd (restart 1); disks reconnected: disk0"),
        "{log}"
    );
    assert!(
        out.contains(&format!(
            "tg: seq done count={COUNT} depth=8 writeback=0 errors=0 timeouts=0"
        )),
        "{out}"
    );
    let acks = seq_acks(&out);
    // The held write was acknowledged after the rest of its batch, once.
    let pos = |s: u64| acks.iter().position(|&a| a == s).unwrap();
    assert!(pos(held) > pos(batch + 7), "ack order: {acks:?}");
    let mut sorted = acks.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, (0..COUNT).collect::<Vec<_>>(), "acks: {acks:?}");
    assert_eq!(check_seq_blocks(&img, &out), COUNT);
    assert_eq!(
        log.matches("queue 0: resubmitting 1 request(s) left in flight")
            .count(),
        1,
        "{log}"
    );
}

/// rerror=stop on the read side: an EIO on a read stops the disk and pauses the VM; with the
/// rule removed, resume retries the read, and the guest reads back exactly what it wrote.
#[test]
fn a_read_error_with_rerror_stop_pauses_until_resume_retries_it() {
    let dir = TempDir::new("block-rerror");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let (_blockd, ctl) = own_blockd(&dir, std::process::Stdio::null());
    // Reads of the guest's second chunk fail (its first read of the disk, after writing).
    let id = add_rule(
        &ctl,
        &["--ops", "read", "--range", "65536-69632", "--errno", "EIO"],
    );
    let sock = vmm_tests::socket_path("block-rerror");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=81")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--blockd-socket", ctl.to_str().unwrap()])
        .arg("--disk")
        .arg(format!("path={},rerror=stop", img.display()))
        .spawn();
    wait_until(T, "the VM to pause on the read error", || {
        vm.stderr()
            .contains("the VM is paused (its error policy is stop)")
            && vmm_tests::vmmctl(&sock, &["info"]).1.contains("paused")
    });
    assert!(
        vm.stderr().contains("disk0: a read of ")
            && vm
                .stderr()
                .contains("failed: Input/output error (os error 5)"),
        "{}",
        vm.stderr()
    );
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["disk", "fault", "remove", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["resume"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    for k in ["bad-words", "errors", "timeouts"] {
        assert_eq!(
            field(&vm, "tg: blk0 pattern", k),
            "0",
            "{k}: {}",
            vm.stdout()
        );
    }
    check_guest_pattern(&img, 81);
}

/// QEMU's werror=ignore and rerror=ignore: a write and a read that fail (injected EIO) complete
/// for the guest as if they had worked. The guest sees no error; what it read back shows the
/// write never reached the disk (its 64 KiB are zeroes in the image) and the failed read
/// brought nothing; the rules fired.
#[test]
fn ignore_policies_complete_failed_requests_for_the_guest() {
    let dir = TempDir::new("block-ignore");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let (_blockd, ctl) = own_blockd(&dir, std::process::Stdio::null());
    for (op, range) in [("write", "1048576-1052672"), ("read", "2097152-2101248")] {
        add_rule(&ctl, &["--ops", op, "--range", range, "--errno", "EIO"]);
    }
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=71")
        .args(["--blockd-socket", ctl.to_str().unwrap()])
        .arg("--disk")
        .arg(format!(
            "path={},werror=ignore,rerror=ignore",
            img.display()
        ))
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let out = vm.stdout();
    assert_eq!(field(&vm, "tg: blk0 pattern", "errors"), "0", "{out}");
    // The 64 KiB write at 1 MiB failed: its 8192 words read back as zeroes; the 64 KiB read
    // at 2 MiB failed too, and brought none of the pattern (the buffer kept what it held).
    let bad: u64 = field(&vm, "tg: blk0 pattern", "bad-words").parse().unwrap();
    assert!(bad > 8192 && bad <= 2 * 8192, "bad-words={bad}: {out}");
    let data = std::fs::read(&img).unwrap();
    let mut want = pattern(data.len() as u64, 71);
    for (sector, n) in ZERO_RANGES {
        want[(sector * 512) as usize..((sector + n) * 512) as usize].fill(0);
    }
    want[1 << 20..(1 << 20) + 65536].fill(0);
    assert!(
        data == want,
        "the image is not the guest's pattern with the failed write's 64 KiB left out"
    );
    let (_, rules, _) = blockd_ctl(&ctl, &["disk", "fault", "list"]);
    assert!(
        rules.matches("errno=EIO").count() == 2 && !rules.contains("hits=0"),
        "{rules}"
    );
}

/// blockd's interrupt counts for export disk0 of a blockd of the test's own: (sent, spared).
fn interrupts(ctl: &Path) -> (u64, u64) {
    let (code, out, err) = blockd_ctl(ctl, &["--json", "disk", "list"]);
    assert_eq!(code, 0, "{err}");
    let num = |k: &str| -> u64 {
        let key = format!("\"{k}\":");
        let at = out.find(&key).unwrap_or_else(|| panic!("no {k} in {out}")) + key.len();
        out[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("interrupts"), num("interrupts_suppressed"))
}

/// VIRTIO_F_EVENT_IDX: the guest writes 400 blocks in batches of 8 and, through used_event,
/// asks for one interrupt a batch. blockd's statistics show it sent about one a batch and
/// spared the rest (50 and 349 here); without EVENT_IDX negotiated, every completion round
/// interrupts (398 here) and none is spared. How many rounds blockd needs depends on the host's
/// load (a busy host lets requests pile up and complete together), so the bounds are on what
/// holds whatever the rounds: with EVENT_IDX at most about one interrupt a batch, whatever the
/// number of rounds, and some spared; without it, none spared and at least one a batch.
#[test]
fn event_idx_spares_the_interrupts_the_driver_did_not_ask_for() {
    for event_idx in [true, false] {
        let dir = TempDir::new(&format!("block-event-idx-{event_idx}"));
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        // An export of the test's own, which outlives the VM with its statistics.
        let (_blockd, ctl) = own_blockd(&dir, std::process::Stdio::null());
        let vhost = dir.join("d0.sock");
        add_export(&ctl, &img, &vhost);
        let mut vm = TestVm::builder()
            .cmdline(&format!(
                "console=ttyS0 tg.scenario=blk-seq tg.seq.count=400 tg.seq.depth=8 tg.seq.event-idx={}",
                u8::from(event_idx)
            ))
            .arg("--disk")
            .arg(format!("socket={}", vhost.display()))
            .spawn();
        let done = vm.wait_for("tg: seq done", T);
        assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
        assert!(
            done.contains("errors=0 timeouts=0")
                && done.contains(&format!("event-idx={}", u8::from(event_idx))),
            "{done}"
        );
        let (sent, spared) = interrupts(&ctl);
        eprintln!("EVENT_IDX {event_idx}: {sent} interrupts sent, {spared} spared; {done}");
        if event_idx {
            assert!(
                sent <= 100 && spared > 0,
                "with EVENT_IDX, 400 writes in batches of 8: {sent} interrupts sent, {spared} spared"
            );
        } else {
            // One a completion round: nearly one a request on an idle host.
            assert!(
                sent >= 50 && spared == 0,
                "without EVENT_IDX: {sent} interrupts sent, {spared} spared"
            );
        }
        drop(vm);
    }
}

/// A disk grown while the guest runs (`vmmctl disk resize`), raw and qcow2: blockd grows the
/// image, the guest gets a configuration-change interrupt (its generation moves), sees the
/// new capacity without a reboot, and writes and reads its last block, past the old end;
/// the bytes are in the image. A shrink without --force, a size that is not one, and a disk
/// that does not exist are refused in one line each, and nothing changes.
#[test]
fn a_disk_grown_online_is_seen_by_the_guest_and_used_past_its_old_end() {
    let dir = TempDir::new("resize");
    for format in ["raw", "qcow2"] {
        let img = dir.join(&format!("disk.{format}"));
        if format == "raw" {
            std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
        } else {
            let (ok, out) =
                qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
            assert!(ok, "{out}");
        }
        let api = dir.join(&format!("{format}.sock"));
        let mut vm = TestVm::builder()
            .cmdline("console=ttyS0 tg.scenario=blk-resize")
            .arg("--disk")
            .arg(format!("path={},format={format}", img.display()))
            .args(["--api-socket", api.to_str().unwrap()])
            .spawn();
        vm.wait_for("tg: resize capacity=32768 generation=0 waiting", T);
        let vmmctl = |args: &[&str]| vmm_tests::vmmctl(&api, args);
        for (args, want) in [
            (&["disk", "resize", "disk0", "8M"][..], "--force"),
            (&["disk", "resize", "disk0", "lots"][..], "not a size"),
            (
                &["disk", "resize", "disk9", "32M"][..],
                "no export \"disk9\"",
            ),
        ] {
            let (code, out, err) = vmmctl(args);
            assert_ne!(code, 0, "{args:?}: {out}");
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            assert!(err.contains(want), "{args:?}: {err}");
        }
        let (code, out, err) = vmmctl(&["disk", "resize", "disk0", "24M"]);
        assert_eq!(code, 0, "{out}{err}\n{}", vm.stderr());
        assert!(
            out.contains("disk0: resized from 16777216 to 25165824 bytes"),
            "{out}"
        );
        vm.wait_for("tg: resize config-irq capacity=49152 generation=1", T);
        vm.wait_for(
            "tg: resize sector=49144 write-status=0 read-status=0 data=ok",
            T,
        );
        assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
        // The block past the old end is in the image.
        let data = match format {
            "raw" => {
                assert_eq!(std::fs::metadata(&img).unwrap().len(), 24 << 20);
                std::fs::read(&img).unwrap()[(24 << 20) - 4096..].to_vec()
            }
            _ => {
                let (ok, out) = qemu_img(&["check", img.to_str().unwrap()]);
                assert!(ok, "qemu-img check: {out}");
                let (ok, info) = qemu_img(&["info", img.to_str().unwrap()]);
                assert!(ok && info.contains("virtual size: 24 MiB"), "{info}");
                let raw = dir.join("converted.raw");
                let (ok, out) = qemu_img(&[
                    "convert",
                    "-O",
                    "raw",
                    img.to_str().unwrap(),
                    raw.to_str().unwrap(),
                ]);
                assert!(ok, "{out}");
                std::fs::read(&raw).unwrap()[(24 << 20) - 4096..].to_vec()
            }
        };
        assert!(
            data.iter().enumerate().all(|(j, &b)| b == (j as u8) ^ 0x5a),
            "{format}: the guest's last block is not in the image"
        );
    }
}

/// Sends one vhost-user message (version 1 header, the payload, descriptors attached).
fn vhost_user_send(s: &std::os::unix::net::UnixStream, request: u32, payload: &[u8], fds: &[i32]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs = if fds.is_empty() { &[][..] } else { &rights[..] };
    sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(&msg)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

/// A frontend that wants to harm blockd (issue 22's malicious peers): its memory table has a
/// region larger than the file sent with it (mapped, it would kill blockd with SIGBUS where it
/// is read), or two regions that overlap. blockd refuses each table, says why in one line, and
/// drops that frontend; it does not crash, and the export then serves a well-behaved client
/// (libblkio) whose data checks out.
#[test]
fn a_frontend_whose_memory_table_is_wrong_is_dropped_and_blockd_serves_the_next() {
    let dir = TempDir::new("block-bad-table");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    let log = dir.join("blockd.log");
    let (mut blockd, ctl) = own_blockd(&dir, std::fs::File::create(&log).unwrap().into());
    let vhost = dir.join("d0.sock");
    add_export(&ctl, &img, &vhost);
    const SET_OWNER: u32 = 3;
    const SET_MEM_TABLE: u32 = 5;
    let ram = || {
        let fd = nix::sys::memfd::memfd_create("bad-table", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
        let f = std::fs::File::from(fd);
        f.set_len(0x10000).unwrap();
        f
    };
    // (guest address, size, offset in its 64 KiB file) for each region.
    for (what, regions, why) in [
        (
            "a region past the end of its file",
            vec![(0u64, 0x100000u64, 0u64)],
            "lies past the end of the file",
        ),
        (
            "overlapping regions",
            vec![(0, 0x10000, 0), (0x8000, 0x10000, 0)],
            "memory table cannot be used: Some of the memory regions intersect",
        ),
    ] {
        let before = std::fs::read_to_string(&log).unwrap_or_default().len();
        let s = std::os::unix::net::UnixStream::connect(&vhost).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        vhost_user_send(&s, SET_OWNER, &[], &[]);
        let mut table = Vec::new();
        table.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        let files: Vec<std::fs::File> = regions.iter().map(|_| ram()).collect();
        for (i, (gpa, size, offset)) in regions.iter().enumerate() {
            for v in [
                *gpa,
                *size,
                0x7f00_0000_0000 + (i as u64) * 0x100_0000,
                *offset,
            ] {
                table.extend_from_slice(&v.to_le_bytes());
            }
        }
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        vhost_user_send(&s, SET_MEM_TABLE, &table, &fds);
        // Dropped: the connection ends, with no answer.
        let mut buf = [0u8; 64];
        let got = (&s).read(&mut buf);
        // (A timeout is a failure: blockd took the table.)
        assert!(
            matches!(&got, Ok(0))
                || got
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{what}: blockd did not drop the frontend: {got:?}"
        );
        assert!(
            blockd.0.try_wait().unwrap().is_none(),
            "{what}: blockd died"
        );
        let deadline = std::time::Instant::now() + T;
        while !std::fs::read_to_string(&log).unwrap_or_default()[before..].contains(why) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no {why:?} in blockd's log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
    // A well-behaved client after them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkio-bench"))
        .args([
            "--driver",
            "virtio-blk-vhost-user",
            "--path",
            vhost.to_str().unwrap(),
        ])
        .args(["verify", "--seed", "23"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("bad-words=0"), "{text}");
    assert!(blockd.0.try_wait().unwrap().is_none(), "blockd died");
}
