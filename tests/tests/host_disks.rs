//! Disks as a cloud host has them: a host block device (a loop device here; LVM and NVMe are
//! block devices too), a raw file and a qcow2 image each serve their right capacity and data,
//! and what is not a disk image (a directory, a character device) is refused in one line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmm_tests::{vmm_core_bin, TempDir, TestVm};

const T: Duration = Duration::from_secs(90);
use vmm_tests::blk_pattern as pattern;

/// A loop device over a file, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, sector_size: u32) -> Loop {
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(file)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "losetup: {}; loop devices need root and the loop module",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Runs the `blk` scenario on one disk whose image holds pattern 99: the guest checks that
/// pattern, then writes its own (seed 7) and zeroes three ranges. Returns the guest's line
/// about the disk and the VM's output.
fn run_blk(disk: &str) -> (String, String) {
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=7 tg.blk.host=99")
        .args(["--disk", disk])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}\n{}", vm.stdout(), vm.stderr());
    let out = vm.stdout();
    let line = out
        .lines()
        .find(|l| l.starts_with("tg: blk0 slot="))
        .unwrap_or_else(|| panic!("no disk seen:\n{out}"))
        .to_string();
    for (prefix, keys) in [
        ("tg: blk0 host-pattern", &["bad-words", "errors"][..]),
        ("tg: blk0 pattern", &["bad-words", "errors", "timeouts"][..]),
        (
            "tg: blk0 zeroes",
            &[
                "discard",
                "write-zeroes",
                "nonzero-words",
                "pattern-bad-words",
            ][..],
        ),
    ] {
        for k in keys {
            assert_eq!(
                vm.field(prefix, k).as_deref(),
                Some("0"),
                "{disk}: {prefix} {k}:\n{out}\n{}",
                vm.stderr()
            );
        }
    }
    (line, out)
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// The guest's pattern (seed 7) with the zeroed ranges, as it must be on the disk.
fn assert_guest_pattern(data: &[u8], what: &str) {
    vmm_tests::assert_blk_written(data, 7, what);
}

/// A loop device with 4096-byte logical blocks, opened with O_DIRECT (where the block size
/// binds): 8 MiB served as 16384 sectors, the block size passed to the guest, and the data
/// the host put there read back by the guest; what the guest wrote reaches the file under
/// the loop device. (st_size of a block device is 0: served by it, this was a 0-byte disk.)
#[test]
fn a_loop_device_serves_its_capacity_block_size_and_data() {
    let dir = TempDir::new("host-loop");
    let file = dir.join("backing.img");
    std::fs::write(&file, pattern(8 << 20, 99)).unwrap();
    let dev = Loop::attach(&file, 4096);
    let (line, _) = run_blk(&format!("path={},direct=on", dev.0.display()));
    assert_eq!(value(&line, "capacity"), "16384", "{line}");
    assert_eq!(value(&line, "blk-size"), "4096", "{line}");
    drop(dev);
    assert_guest_pattern(&std::fs::read(&file).unwrap(), "the loop device's file");
}

/// A raw file and a qcow2 image (qemu-img's) on the same path: capacity and data.
#[test]
fn a_raw_file_and_a_qcow2_image_serve_their_capacity_and_data() {
    let dir = TempDir::new("host-files");
    let raw = dir.join("disk.raw");
    std::fs::write(&raw, pattern(8 << 20, 99)).unwrap();
    let (line, _) = run_blk(&format!("path={}", raw.display()));
    assert_eq!(value(&line, "capacity"), "16384", "{line}");
    assert_eq!(value(&line, "blk-size"), "512", "{line}");
    assert_guest_pattern(&std::fs::read(&raw).unwrap(), "the raw file");

    // The same bytes as qcow2: the guest finds pattern 99 through blockd's qcow2 reader.
    std::fs::write(&raw, pattern(8 << 20, 99)).unwrap();
    let qcow2 = dir.join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .expect("qemu-img (qemu-utils) must be installed; scripts/setup.sh does");
    assert!(status.success());
    let (line, _) = run_blk(&format!("path={},format=qcow2", qcow2.display()));
    assert_eq!(value(&line, "capacity"), "16384", "{line}");
    let back = dir.join("back.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&back)
        .status()
        .unwrap();
    assert!(status.success());
    assert_guest_pattern(&std::fs::read(&back).unwrap(), "the qcow2 image");
}

/// A directory and a character device are refused before anything starts, in one line that
/// names the disk, what it is, and what to give instead; by vmm-core and by blockd alone.
#[test]
fn a_directory_or_a_character_device_is_refused_in_one_line() {
    let dir = TempDir::new("host-refused");
    for (path, kind) in [
        (dir.join(""), "a directory"),
        (PathBuf::from("/dev/null"), "a character device"),
    ] {
        for readonly in ["", ",readonly=on"] {
            let disk = format!("path={}{readonly}", path.display());
            let out = Command::new(vmm_core_bin())
                .args(["run", "--kernel"])
                .arg(vmm_tests::test_guest())
                .args(["--disk", &disk])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{disk}: {err}");
            assert_eq!(
                err.trim_end(),
                format!(
                    "error: --disk path={}: {kind}: not a disk image; give a regular file (raw or qcow2) or a block device",
                    path.display()
                ),
                "{disk}"
            );
        }
        let out = Command::new(vmm_tests::blockd_bin())
            .arg("--image")
            .arg(&path)
            .args(["--socket", dir.join("b.sock").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!(
                "--image {}: {kind}: not a disk image",
                path.display()
            )),
            "{err}"
        );
        assert!(!dir.join("b.sock").exists());
    }
}

/// QEMU's own vhost-user-blk frontend (Debian's qemu-system-x86, q35, SeaBIOS placing the
/// BARs) drives a sandboxed blockd: the test guest, whose virtio driver follows the spec
/// (each capability's BAR, 64-bit BARs, a transitional device ID, the MSI-X table's BIR),
/// checks the host's pattern through two queues and writes its own, which reaches the image.
#[test]
fn qemus_vhost_user_blk_frontend_drives_blockd() {
    vmm_tests::require_kvm();
    let dir = TempDir::new("host-qemu");
    let img = dir.join("disk.img");
    std::fs::write(&img, pattern(8 << 20, 99)).unwrap();
    let sock = dir.join("blk.sock");
    let log = dir.join("blockd.log");
    let _blockd = vmm_tests::Terminated(
        Command::new(vmm_tests::blockd_bin())
            .arg("--image")
            .arg(&img)
            .arg("--socket")
            .arg(&sock)
            .args(["--queues", "2", "--once"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    vmm_tests::wait_until(T, "blockd's socket", || sock.exists());
    let guest = vmm_tests::test_guest();
    let chardev = format!("socket,id=blk0,path={}", sock.display());
    let out = Command::new("timeout")
        .args(["-s", "KILL", "300", "qemu-system-x86_64", "-nodefaults"])
        .args(["-M", "q35,accel=kvm", "-cpu", "host,-arch-capabilities", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem", "-chardev", &chardev])
        .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"])
        .arg("-kernel")
        .arg(&guest)
        .args([
            "-append",
            "console=ttyS0 tg.scenario=blk tg.blk.seed=7 tg.blk.host=99",
        ])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-no-reboot")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("qemu-system-x86_64 (Debian's qemu-system-x86) must be installed; scripts/setup.sh does");
    let text = String::from_utf8_lossy(&out.stdout);
    let said = format!(
        "{text}\nqemu: {}\nblockd: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(out.status.success(), "qemu: {:?}\n{said}", out.status);
    assert!(text.contains("tg: blk disks=1"), "{said}");
    let line = text
        .lines()
        .find(|l| l.starts_with("tg: blk0 slot="))
        .unwrap_or_else(|| panic!("{said}"));
    assert_eq!(value(line, "capacity"), "16384", "{said}");
    assert_eq!(value(line, "queues"), "2", "{said}");
    assert_eq!(value(line, "id"), "blockd", "{said}");
    for (prefix, key) in [
        ("tg: blk0 host-pattern", "bad-words"),
        ("tg: blk0 host-pattern", "errors"),
        ("tg: blk0 pattern", "bad-words"),
        ("tg: blk0 pattern", "errors"),
        ("tg: blk0 zeroes", "nonzero-words"),
    ] {
        let l = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}: {said}"));
        assert_eq!(value(l, key), "0", "{prefix} {key}: {said}");
    }
    // Both queues carried requests.
    let q = text
        .lines()
        .find(|l| l.starts_with("tg: blk0 queue-requests"))
        .unwrap_or_else(|| panic!("{said}"));
    let n: Vec<u64> = q
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(n.len() >= 2 && n[0] > 0 && n[1] > 0, "{q}");
    assert!(text.contains("tg: poweroff"), "{said}");
    assert_guest_pattern(
        &std::fs::read(&img).unwrap(),
        "the image QEMU's guest wrote",
    );
}

/// Image locks (as QEMU's): a second VM that would write an image another VM writes is
/// refused before it starts, naming the holder; so is a reader of an image being written,
/// and a writer of one being read; any number of VMs share an image read-only.
#[test]
fn two_vms_on_one_image_the_second_is_refused_naming_the_first() {
    let dir = TempDir::new("host-locks");
    let img = dir.join("shared.img");
    std::fs::write(&img, pattern(2 << 20, 5)).unwrap();
    let disk = |ro: bool| {
        format!(
            "path={}{}",
            img.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let vm = |ro: bool| {
        TestVm::builder()
            .cmdline("tg.scenario=idle")
            .memory("64M")
            .args(["--disk", &disk(ro)])
            .spawn()
    };
    let refused = |ro: bool, holder: u32, says: &str| {
        let mut second = vm(ro);
        assert_eq!(second.wait_exit(T), 2, "{}", second.stderr());
        let err = second.stderr();
        let line = err
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {err}"));
        assert!(
            line.starts_with(&format!("error: --disk path={}: in use by ", img.display())),
            "{line}"
        );
        assert!(line.contains(&format!("vmm-core (PID {holder})")), "{line}");
        assert!(line.contains(says), "{line}");
        assert!(
            !second.stdout().contains("tg: hello"),
            "the refused VM did not boot"
        );
    };

    let mut writer = vm(false);
    writer.wait_for("tg: ready", T);
    refused(
        false,
        writer.pid(),
        "writes to it; two VMs writing one image corrupt it",
    );
    refused(
        true,
        writer.pid(),
        "writes to it; a read-only disk would change under this VM",
    );
    writer.signal(libc::SIGINT);
    assert_eq!(writer.wait_exit(T), 130);

    // Readers share; a writer is refused while they read.
    let mut a = vm(true);
    let mut b = vm(true);
    a.wait_for("tg: ready", T);
    b.wait_for("tg: ready", T);
    refused(
        false,
        a.pid(),
        "reads it (readonly=on); writing would change it under that reader",
    );
    for v in [&mut a, &mut b] {
        v.signal(libc::SIGINT);
        assert_eq!(v.wait_exit(T), 130);
    }
    // With the readers gone, a writer may have it again.
    let mut again = vm(false);
    again.wait_for("tg: ready", T);
    again.signal(libc::SIGINT);
    assert_eq!(again.wait_exit(T), 130);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        pattern(2 << 20, 5),
        "nothing wrote it"
    );
}

/// qcow2 images that `qemu-img` made and blockd cannot serve are refused before anything
/// starts, each with one line that names the cause: zstd compression, extended L2 entries,
/// a backing file that is missing, and a loop in the backing chain.
#[test]
fn qcow2_images_blockd_cannot_serve_are_refused_naming_the_cause() {
    let dir = TempDir::new("qcow2-refused");
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "zstd.qcow2",
            "16M",
        ],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "l2.qcow2",
            "16M",
        ],
    );
    qemu(
        "qemu-img",
        &dir,
        &["create", "-q", "-f", "raw", "base.raw", "16M"],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
        ],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "gone.raw",
            "-F",
            "raw",
            "-u",
            "lost.qcow2",
            "16M",
        ],
    );
    qemu(
        "qemu-img",
        &dir,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "16M"],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "rebase", "-q", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    );
    let p = |n: &str| dir.join(n).display().to_string();
    for (image, cause) in [
        (
            "zstd.qcow2",
            "a qcow2 image compressed with zstd; blockd reads zlib-compressed clusters only"
                .to_string(),
        ),
        (
            "l2.qcow2",
            "a qcow2 image with extended L2 entries (subclusters), which blockd does not read"
                .to_string(),
        ),
        (
            "lost.qcow2",
            format!(
                "its backing file {} (named by {}) does not exist",
                p("gone.raw"),
                p("lost.qcow2")
            ),
        ),
        (
            "a.qcow2",
            format!(
                "its backing chain has a loop: {} -> {} -> {}",
                p("a.qcow2"),
                p("b.qcow2"),
                p("a.qcow2")
            ),
        ),
    ] {
        let disk = format!("path={},format=qcow2", p(image));
        let out = Command::new(vmm_core_bin())
            .args(["run", "--kernel"])
            .arg(vmm_tests::test_guest())
            .args(["--disk", &disk])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{disk}: {err}");
        let line = err.trim_end();
        assert_eq!(line.lines().count(), 1, "{disk}: {err}");
        assert!(
            line.starts_with(&format!("error: --disk {disk}: {cause}")),
            "{disk}: wanted {cause:?}:\n{err}"
        );
    }
}

/// Runs `qemu-img` (or `qemu-io`) in `dir`; panics with its output if it fails.
fn qemu(tool: &str, dir: &TempDir, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool)
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} (Debian's qemu-utils; scripts/setup.sh installs it): {e}")
        });
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    out
}

/// A 16 MiB raw image whose every 4 KiB block says which block it is.
fn patterned(path: &Path) -> Vec<u8> {
    let bytes: Vec<u8> = (0..16u64 << 20)
        .map(|i| ((i >> 12) as u8).wrapping_mul(13) ^ (i as u8))
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// The test guest's disk workload (reads and writes at sectors from `seed`) on `disk`; its
/// digest line (every status and every byte read).
fn digest_on(disk: &str, seed: u32) -> String {
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=blk-digest tg.blk.wait=0 tg.blk.count=120 tg.blk.seed={seed}"
        ))
        .args(["--disk", disk])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{disk}: {}", vm.stderr());
    let out = vm.stdout();
    let line = out
        .lines()
        .find(|l| l.starts_with("tg: blk digest ops="))
        .unwrap_or_else(|| panic!("{disk}:\n{out}"))
        .to_string();
    assert!(line.contains(" errors=0 "), "{disk}: {line}");
    line
}

/// qcow2 overlays made by qemu-img, on a raw base, on a qcow2 base, and a chain of three: the
/// guest sees what a flat copy of the chain holds (the same digest of every byte read, with
/// the same writes), the writes land in the top layer only (the layers below are unchanged),
/// `qemu-img check` finds the overlay clean and `qemu-img compare` finds it equal to the flat
/// copy that took the same writes.
#[test]
fn qcow2_overlays_read_through_their_chain_and_write_their_top() {
    let dir = TempDir::new("qcow2-chains");
    let p = |n: &str| dir.join(n).display().to_string();
    let base = patterned(&dir.join("base.raw"));
    qemu(
        "qemu-img",
        &dir,
        &["convert", "-q", "-O", "qcow2", "base.raw", "base.qcow2"],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "on-raw.qcow2",
        ],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "on-qcow2.qcow2",
        ],
    );
    // Three: base.raw <- mid.qcow2 (with a megabyte of its own) <- top.qcow2.
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    );
    qemu(
        "qemu-io",
        &dir,
        &["-f", "qcow2", "-c", "write -q -P 0x5a 1M 1M", "mid.qcow2"],
    );
    qemu(
        "qemu-img",
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let mid_before = std::fs::read(dir.join("mid.qcow2")).unwrap();
    for (top, seed) in [
        ("on-raw.qcow2", 11),
        ("on-qcow2.qcow2", 12),
        ("top.qcow2", 13),
    ] {
        // What the chain holds, flat, takes the same workload.
        let flat = format!("{top}.flat");
        qemu(
            "qemu-img",
            &dir,
            &["convert", "-q", "-O", "raw", top, &flat],
        );
        let expected = digest_on(&format!("path={}", p(&flat)), seed);
        let got = digest_on(&format!("path={},format=qcow2", p(top)), seed);
        assert_eq!(
            got, expected,
            "{top}: the guest saw other data than the flat copy's"
        );
        qemu("qemu-img", &dir, &["check", "-q", top]);
        qemu("qemu-img", &dir, &["compare", "-q", top, &flat]);
    }
    assert!(
        std::fs::read(dir.join("base.raw")).unwrap() == base,
        "the raw base was written"
    );
    assert!(
        std::fs::read(dir.join("mid.qcow2")).unwrap() == mid_before,
        "the middle layer was written"
    );
    qemu(
        "qemu-img",
        &dir,
        &["compare", "-q", "base.qcow2", "base.raw"],
    );
}

/// Two VMs run at once on overlays of one read-only base (each takes a shared lock on it):
/// both run their workload, each overlay ends equal to a flat copy that took the same writes,
/// and the base is unchanged.
#[test]
fn two_vms_share_one_read_only_base_with_their_own_overlays() {
    let dir = TempDir::new("qcow2-shared-base");
    let p = |n: &str| dir.join(n).display().to_string();
    let base = patterned(&dir.join("base.raw"));
    for ov in ["a.qcow2", "b.qcow2"] {
        qemu(
            "qemu-img",
            &dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", ov,
            ],
        );
    }
    let spawn = |ov: &str, seed: u32| {
        TestVm::builder()
            .cmdline(&format!(
                "console=ttyS0 tg.scenario=blk-digest tg.blk.wait=0 tg.blk.count=120 tg.blk.seed={seed}"
            ))
            .args(["--disk", &format!("path={},format=qcow2", p(ov))])
            .spawn()
    };
    let (mut a, mut b) = (spawn("a.qcow2", 21), spawn("b.qcow2", 22));
    assert_eq!(a.wait_exit(T), 0, "{}", a.stderr());
    assert_eq!(b.wait_exit(T), 0, "{}", b.stderr());
    for (ov, seed, vm) in [("a.qcow2", 21, &a), ("b.qcow2", 22, &b)] {
        std::fs::copy(dir.join("base.raw"), dir.join(&format!("{ov}.flat"))).unwrap();
        let expected = digest_on(&format!("path={}", p(&format!("{ov}.flat"))), seed);
        assert!(
            vm.stdout().contains(&expected),
            "{ov}: wanted {expected}:\n{}",
            vm.stdout()
        );
        qemu(
            "qemu-img",
            &dir,
            &["compare", "-q", ov, &format!("{ov}.flat")],
        );
    }
    assert!(
        std::fs::read(dir.join("base.raw")).unwrap() == base,
        "the shared base was written"
    );
}

/// `backing=` gives an overlay's backing file in place of the one its header names (QEMU's
/// -blockdev backing=): an overlay whose base was moved is refused in one line naming the
/// missing file; given the base where it is now, the guest sees what a flat copy of that
/// chain holds and the base is not written. A raw disk with backing= is refused in one line.
#[test]
fn backing_given_on_the_command_line_takes_the_place_of_the_headers() {
    let dir = TempDir::new("qcow2-backing-given");
    let p = |n: &str| dir.join(n).display().to_string();
    let base = patterned(&dir.join("base.raw"));
    qemu(
        "qemu-img",
        &dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
        ],
    );
    std::fs::rename(dir.join("base.raw"), dir.join("moved.raw")).unwrap();
    std::fs::write(dir.join("flat.raw"), &base).unwrap();
    std::fs::write(dir.join("plain.raw"), [0u8; 4096]).unwrap();
    let refused = |disk: &str| {
        let out = Command::new(vmm_core_bin())
            .args(["run", "--kernel"])
            .arg(vmm_tests::test_guest())
            .args(["--disk", disk])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        assert_eq!(out.status.code(), Some(2), "{disk}: {err}");
        assert_eq!(err.lines().count(), 1, "{disk}: {err}");
        err
    };
    let err = refused(&format!("path={},format=qcow2", p("ov.qcow2")));
    assert!(
        err.contains(&format!("its backing file {} (named by", p("base.raw"))),
        "{err}"
    );
    let err = refused(&format!(
        "path={},backing={}",
        p("plain.raw"),
        p("moved.raw")
    ));
    assert!(
        err.contains("backing= is a qcow2 overlay's; add format=qcow2"),
        "{err}"
    );
    let expected = digest_on(&format!("path={}", p("flat.raw")), 31);
    let got = digest_on(
        &format!(
            "path={},format=qcow2,backing={}",
            p("ov.qcow2"),
            p("moved.raw")
        ),
        31,
    );
    assert_eq!(
        got, expected,
        "the guest saw other data than the flat copy's"
    );
    // qemu-img follows the header: pointed at the moved base, the overlay is clean and equal
    // to the flat copy that took the same writes.
    qemu(
        "qemu-img",
        &dir,
        &[
            "rebase",
            "-q",
            "-u",
            "-b",
            "moved.raw",
            "-F",
            "raw",
            "ov.qcow2",
        ],
    );
    qemu("qemu-img", &dir, &["check", "-q", "ov.qcow2"]);
    qemu("qemu-img", &dir, &["compare", "-q", "ov.qcow2", "flat.raw"]);
    assert!(
        std::fs::read(dir.join("moved.raw")).unwrap() == base,
        "the base was written"
    );
}

/// The refcount block entry (offset in the file, 16-bit) of the L2 table that a qcow2
/// image's first L1 entry points to (qemu-img's defaults: 16-bit refcounts).
fn l2_refcount_at(img: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).unwrap();
    let u64_at = |b: &[u8], i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(h[20..24].try_into().unwrap());
    assert_eq!(
        u32::from_be_bytes(h[96..100].try_into().unwrap()),
        4,
        "16-bit refcounts"
    );
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, u64_at(&h, 40)).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table");
    let c = l2 >> cluster_bits;
    let per_block = (1u64 << cluster_bits) * 8 / 16;
    f.read_exact_at(&mut e, u64_at(&h, 48) + (c / per_block) * 8)
        .unwrap();
    (u64::from_be_bytes(e) & !0x1ff) + (c % per_block) * 2
}

/// What a blockd killed while imago hooks a new L2 table in can leave (the L1 entry written,
/// the table's refcount not: made here by zeroing that refcount in a qemu-img overlay, which
/// `qemu-img check` then calls an error) is repaired before blockd serves the image: vmm-core
/// says so, the guest's writes land, and `qemu-img check` finds the image clean.
#[test]
fn an_l2_table_left_uncounted_is_counted_before_blockd_serves_the_image() {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("qcow2-repair");
    let p = |n: &str| dir.join(n).display().to_string();
    patterned(&dir.join("base.raw"));
    qemu(
        "qemu-img",
        &dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
        ],
    );
    qemu(
        "qemu-io",
        &dir,
        &["-f", "qcow2", "-c", "write -q -P 0x11 0 4k", "ov.qcow2"],
    );
    let at = l2_refcount_at(&dir.join("ov.qcow2"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("ov.qcow2"))
        .unwrap();
    f.write_all_at(&[0, 0], at).unwrap();
    drop(f);
    let broken = Command::new("qemu-img")
        .args(["check", &p("ov.qcow2")])
        .output()
        .unwrap();
    assert_eq!(broken.status.code(), Some(2), "{broken:?}");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk-seq tg.seq.count=64")
        .args(["--disk", &format!("path={},format=qcow2", p("ov.qcow2"))])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert!(
        vm.stderr()
            .contains("set 1 refcount(s) that a killed blockd had left at 0"),
        "{}",
        vm.stderr()
    );
    qemu("qemu-img", &dir, &["check", "-q", "ov.qcow2"]);
    qemu(
        "qemu-img",
        &dir,
        &["convert", "-q", "-O", "raw", "ov.qcow2", "flat.raw"],
    );
    let flat = std::fs::read(dir.join("flat.raw")).unwrap();
    assert_eq!(
        vmm_tests::check_seq_blocks(&dir.join("flat.raw"), &vm.stdout()),
        64
    );
    assert_eq!(flat.len(), 16 << 20);
}

/// blockd SIGKILLed during a qcow2 overlay's first writes, ten times, each at another moment:
/// the restarted blockd serves on, every block the guest saw acknowledged is in the image,
/// and `qemu-img check` finds no error (leaked clusters, status 3, are allowed: as after a
/// QEMU crash, a cluster counted but not yet mapped stays counted).
#[test]
fn a_blockd_killed_during_a_qcow2_overlays_first_writes_leaves_no_cluster_taken_twice() {
    let mut repaired = 0;
    for round in 0..10u64 {
        let dir = TempDir::new("qcow2-kill");
        let p = |n: &str| dir.join(n).display().to_string();
        std::fs::write(dir.join("base.raw"), vec![0u8; 8 << 20]).unwrap();
        qemu(
            "qemu-img",
            &dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
            ],
        );
        let api = dir.join("api.sock");
        let mut vm = TestVm::builder()
            .cmdline("console=ttyS0 tg.scenario=blk-seq tg.seq.count=100000000")
            .args(["--api-socket", api.to_str().unwrap()])
            .args([
                "--disk",
                &format!("path={},format=qcow2,throttle.iops=200", p("ov.qcow2")),
            ])
            .spawn();
        vm.wait_for("tg: seq writeback=", T);
        std::thread::sleep(Duration::from_micros(round * 300));
        vm.kill_helper("blockd", 1);
        let acked = || vmm_tests::seq_acks(&vm.stdout()).len();
        let n = acked();
        vmm_tests::wait_until(T, "30 more acknowledgements", || acked() >= n + 30);
        vmm_tests::vmmctl(&api, &["shutdown", "--force"]);
        vm.wait_exit(T);
        if vm.stderr().contains("that a killed blockd had left at 0") {
            repaired += 1;
        }
        let check = Command::new("qemu-img")
            .args(["check", &p("ov.qcow2")])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&check.stdout);
        assert!(
            matches!(check.status.code(), Some(0 | 3)) && !said.contains("ERROR"),
            "round {round}: qemu-img check: {said}\n{}",
            vm.stderr()
        );
        qemu(
            "qemu-img",
            &dir,
            &["convert", "-q", "-O", "raw", "ov.qcow2", "flat.raw"],
        );
        vmm_tests::check_seq_blocks(&dir.join("flat.raw"), &vm.stdout());
    }
    println!("rounds in which vmm-core repaired a refcount: {repaired} of 10");
}
