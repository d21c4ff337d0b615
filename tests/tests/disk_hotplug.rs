//! Disk hot-add and hot-remove on a running VM (`vmmctl disk add|remove`): ACPI PCI hotplug
//! through the GED, which the test guest handles on the controller's registers as an ACPI
//! driver would; blockd serves each added disk as a new export and ends it once the guest
//! ejected the disk. What the guest wrote is checked in the image files.

use std::path::Path;
use std::time::Duration;
use vmm_tests::{blk_pattern, TempDir, TestVm};

const T: Duration = Duration::from_secs(90);

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}; install qemu-utils (scripts/setup.sh does)"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest's data as qemu-img reads it (a raw copy of any format).
fn contents(dir: &TempDir, img: &Path) -> Vec<u8> {
    let raw = dir.join("contents.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(raw).unwrap()
}

/// Waits until the console shows `marker` `n` times.
fn wait_count(vm: &TestVm, marker: &str, n: usize) {
    let deadline = std::time::Instant::now() + T;
    while vm.stdout().matches(marker).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{marker:?} did not appear {n} times within {T:?}\n--- console ---\n{}\n--- log ---\n{}",
            vm.stdout(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A 4 MiB raw image hot-added (the guest's disk1); its path.
fn add_raw(dir: &TempDir, api: &Path, vm: &TestVm) -> std::path::PathBuf {
    let raw = dir.join("hot.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let out = ok(
        api,
        &["disk", "add", &format!("path={}", raw.display())],
        vm,
    );
    assert!(out.contains("disk1: added at PCI 00:02.0"), "{out}");
    raw
}

fn ok(api: &Path, args: &[&str], vm: &TestVm) -> String {
    let (code, out, err) = vmm_tests::vmmctl(api, args);
    assert_eq!(code, 0, "vmmctl {args:?}: {out}{err}\n{}", vm.stderr());
    out
}

/// The VM's API socket and a VM that runs the hotplug scenario with a boot disk (disk0).
fn start(dir: &TempDir, extra: &str) -> (std::path::PathBuf, TestVm) {
    let boot = dir.join("boot.raw");
    std::fs::write(&boot, vec![0u8; 1 << 20]).unwrap();
    let api = dir.join("api.sock");
    let vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=blk-hotplug tg.blk.seed=7 {extra}"
        ))
        .arg("--disk")
        .arg(format!("path={}", boot.display()))
        .args(["--api-socket", api.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: hotplug-blk ready disks=1", T);
    (api, vm)
}

/// A raw and a qcow2 disk hot-added: each goes into the first free slot, the guest brings it
/// up, writes and reads back its first 256 KiB; hot-removed, the guest ejects it, blockd's
/// export and socket are gone, the image lock is let go (the same image can come back, into
/// the same slot), and what the guest wrote is in the image. Bad specs and names are refused
/// in one line, and nothing changes.
#[test]
fn disks_hot_added_and_removed_keep_what_the_guest_wrote() {
    let dir = TempDir::new("disk-hotplug");
    let (api, mut vm) = start(&dir, "");
    let raw = dir.join("hot.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let qcow2 = dir.join("hot.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", qcow2.to_str().unwrap(), "8M"]);

    let missing = dir.join("missing.raw");
    for (args, want) in [
        (
            vec!["disk", "add", &format!("path={}", missing.display())],
            format!("path={}: cannot open it", missing.display()),
        ),
        (
            vec!["disk", "add", "nonsense"],
            "write path=FILE".to_string(),
        ),
        (
            vec!["disk", "add", "path=x", "--image", "y"],
            "--image and --vhost-socket are for a blockd of its own".to_string(),
        ),
        (
            vec!["disk", "remove", "disk9"],
            "no device disk9".to_string(),
        ),
    ] {
        let (code, out, err) = vmm_tests::vmmctl(&api, &args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: want {want:?} in {err}");
    }

    let out = ok(
        &api,
        &["disk", "add", &format!("path={}", raw.display())],
        &vm,
    );
    assert!(out.contains("disk1: added at PCI 00:02.0"), "{out}");
    vm.wait_for("tg: pci-event up=0x4 down=0x0", T);
    vm.wait_for("tg: hp-added slot=2 capacity=8192 status=0 data=ok", T);
    // A slot that is taken: refused in one line, and blockd lets the image go again.
    let (code, _, err) = vmm_tests::vmmctl(
        &api,
        &[
            "disk",
            "add",
            &format!("path={},format=qcow2,slot=2", qcow2.display()),
        ],
    );
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("disk2: PCI slot 2 is taken"), "{err}");
    let out = ok(
        &api,
        &[
            "disk",
            "add",
            &format!("path={},format=qcow2", qcow2.display()),
        ],
        &vm,
    );
    assert!(out.contains("disk2: added at PCI 00:03.0"), "{out}");
    vm.wait_for("tg: hp-added slot=3 capacity=16384 status=0 data=ok", T);
    let list = ok(&api, &["disk", "list"], &vm);
    assert!(
        list.contains("disk1") && list.contains(raw.to_str().unwrap()),
        "{list}"
    );
    assert!(
        list.contains("disk2") && list.contains(qcow2.to_str().unwrap()),
        "{list}"
    );
    let json = ok(&api, &["--json", "disk", "list"], &vm);
    let socket = json
        .split("\"socket\":\"")
        .nth(2)
        .and_then(|s| s.split('"').next())
        .expect("disk1's socket in the JSON list")
        .to_string();
    assert!(Path::new(&socket).exists(), "{socket}: {json}");

    let out = ok(&api, &["disk", "remove", "disk1"], &vm);
    assert!(out.contains("disk1: the guest ejected it"), "{out}");
    vm.wait_for("tg: hp-ejected slot=2", T);
    let list = ok(&api, &["disk", "list"], &vm);
    assert!(!list.contains("disk1"), "{list}");
    assert!(!Path::new(&socket).exists(), "{socket} is still there");
    assert_eq!(
        std::fs::read(&raw).unwrap()[..256 << 10],
        blk_pattern(256 << 10, 7)[..],
        "what the guest wrote to the raw disk"
    );
    // Its lock is gone: the same image comes back, into the slot it left.
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let out = ok(
        &api,
        &["disk", "add", &format!("path={}", raw.display())],
        &vm,
    );
    assert!(out.contains("disk1: added at PCI 00:02.0"), "{out}");
    wait_count(&vm, "tg: hp-added slot=2 capacity=8192 status=0 data=ok", 2);

    let out = ok(&api, &["disk", "remove", "disk2"], &vm);
    assert!(out.contains("disk2: the guest ejected it"), "{out}");
    vm.wait_for("tg: hp-ejected slot=3", T);
    assert_eq!(
        contents(&dir, &qcow2)[..256 << 10],
        blk_pattern(256 << 10, 7)[..],
        "what the guest wrote to the qcow2 disk"
    );
    ok(&api, &["shutdown"], &vm);
    vm.wait_for("tg: power button", T);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert_eq!(
        std::fs::read(&raw).unwrap()[..256 << 10],
        blk_pattern(256 << 10, 7)[..],
        "the raw disk added again"
    );
}

/// The guest ejects a disk with 8 writes in flight (submitted, not waited for; fault rules
/// fail four and make the others take 300 ms): the function leaves the bus, and every write is
/// still answered with its status; the bytes of those that succeeded are in the image. Then
/// the same slot takes a disk again.
#[test]
fn a_disk_ejected_with_writes_in_flight_answers_every_one() {
    let dir = TempDir::new("disk-hotplug-inflight");
    let (api, mut vm) = start(&dir, "tg.hp.inflight=1");
    let raw = add_raw(&dir, &api, &vm);
    vm.wait_for("tg: hp-added slot=2", T);
    // The first four writes fail, the others take 300 ms each: the eject comes while they are in
    // blockd's hands or still queued.
    // (The first rule that matches a request fires.)
    for rule in [
        &[
            "--ops",
            "write",
            "--disk",
            "disk1",
            "--errno",
            "EIO",
            "--range",
            "524288-540671",
        ][..],
        &["--ops", "write", "--disk", "disk1", "--delay-ms", "300"],
    ] {
        ok(&api, &[&["disk", "fault", "add"][..], rule].concat(), &vm);
    }
    ok(&api, &["disk", "remove", "disk1"], &vm);
    let line = vm.wait_for("tg: hp-ejected slot=2 in-flight=8", T);
    assert!(line.contains("answered=8 ok=4"), "{line}\n{}", vm.stderr());
    let written: u64 = vm
        .field("tg: hp-ejected slot=2", "ok")
        .and_then(|v| v.parse().ok())
        .expect("ok=");
    let data = std::fs::read(&raw).unwrap();
    let want = blk_pattern(4 << 20, 7);
    let landed = (0..8)
        .filter(|k| {
            let at = (1024 + 8 * k) * 512;
            data[at..at + 4096] == want[at..at + 4096]
        })
        .count() as u64;
    assert!(
        landed >= written,
        "{written} writes answered as done, {landed} in the image"
    );
    // The same slot takes a disk again.
    let out = ok(
        &api,
        &["disk", "add", &format!("path={}", raw.display())],
        &vm,
    );
    assert!(out.contains("disk1: added at PCI 00:02.0"), "{out}");
    wait_count(&vm, "tg: hp-added slot=2 capacity=8192", 2);
    ok(&api, &["shutdown"], &vm);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
}

/// A guest that does not eject the disk: the removal fails after --timeout with one line that
/// says so, the disk stays (listed, and served: it can be removed again later).
#[test]
fn a_disk_the_guest_does_not_eject_stays() {
    let dir = TempDir::new("disk-hotplug-ignored");
    let (api, mut vm) = start(&dir, "tg.hp.ignore=1");
    add_raw(&dir, &api, &vm);
    vm.wait_for("tg: hp-added slot=2", T);
    let (code, out, err) = vmm_tests::vmmctl(&api, &["--timeout", "2", "disk", "remove", "disk1"]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("disk1: the guest did not eject it within 2000 ms, so it stays"),
        "{err}"
    );
    vm.wait_for("tg: hp-eject-ignored slot=2", T);
    let list = ok(&api, &["disk", "list"], &vm);
    assert!(
        list.contains("disk1") && list.contains("connected"),
        "{list}"
    );
    // The boot disk is a disk like the others: it can be asked to go too.
    let (code, _, err) = vmm_tests::vmmctl(&api, &["--timeout", "1", "disk", "remove", "disk0"]);
    assert_ne!(code, 0);
    assert!(err.contains("disk0: the guest did not eject it"), "{err}");
    ok(&api, &["shutdown"], &vm);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
}

/// Hot-added disks go with a snapshot of the VM, as they are: disk1 and disk2 added, disk1
/// removed (a gap at slot 2). The snapshot lists the disks with their names and slots, so a
/// restore given no --disk opens them and puts each where the state has it; the guest goes on
/// with disk2 in slot 3, and the restored VM hot-removes it and takes a disk again. Restored
/// with other disks, the state is refused in one line that says what to give.
#[test]
fn hot_added_disks_go_with_a_snapshot_of_the_vm() {
    let dir = TempDir::new("disk-hotplug-snapshot");
    let (api, mut vm) = start(&dir, "");
    let first = add_raw(&dir, &api, &vm);
    vm.wait_for("tg: hp-added slot=2 capacity=8192 status=0 data=ok", T);
    let second = dir.join("second.raw");
    std::fs::write(&second, vec![0u8; 2 << 20]).unwrap();
    let out = ok(
        &api,
        &["disk", "add", &format!("path={}", second.display())],
        &vm,
    );
    assert!(out.contains("disk2: added at PCI 00:03.0"), "{out}");
    vm.wait_for("tg: hp-added slot=3 capacity=4096 status=0 data=ok", T);
    ok(&api, &["disk", "remove", "disk1"], &vm);
    vm.wait_for("tg: hp-ejected slot=2", T);
    ok(&api, &["pause"], &vm);
    let snap = dir.join("snap");
    ok(
        &api,
        &["snapshot", &format!("file:{}", snap.display())],
        &vm,
    );
    ok(&api, &["shutdown", "--force"], &vm);
    vm.wait_exit(T);
    let restore = |disks: &[&Path], api: &Path| {
        let mut b = TestVm::builder()
            .args(["--api-socket", api.to_str().unwrap()])
            .args(["--restore", &format!("file:{}", snap.display())]);
        for d in disks {
            b = b.arg("--disk").arg(format!("path={}", d.display()));
        }
        b.spawn()
    };
    let mut short = restore(&[&dir.join("boot.raw")], &dir.join("short.sock"));
    assert_ne!(short.wait_exit(T), 0);
    assert!(
        short
            .stderr()
            .contains("the state has 2 PCI device(s), this VM 1; give it the same --disk options"),
        "{}",
        short.stderr()
    );
    let api = dir.join("restored.sock");
    let mut vm = restore(&[], &api);
    vmm_tests::wait_until(T, "the restore", || {
        vm.stderr().contains("the VM is here") || vm.stderr().contains("error")
    });
    let list = ok(&api, &["disk", "list"], &vm);
    assert!(
        list.contains("disk2")
            && list.contains(second.to_str().unwrap())
            && !list.contains("disk1"),
        "{list}"
    );
    ok(&api, &["resume"], &vm);
    ok(&api, &["disk", "remove", "disk2"], &vm);
    vm.wait_for("tg: hp-ejected slot=3", T);
    std::fs::write(&first, vec![0u8; 4 << 20]).unwrap();
    let out = ok(
        &api,
        &["disk", "add", &format!("path={}", first.display())],
        &vm,
    );
    assert!(out.contains("disk1: added at PCI 00:02.0"), "{out}");
    vm.wait_for("tg: hp-added slot=2 capacity=8192 status=0 data=ok", T);
    ok(&api, &["shutdown"], &vm);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    for (img, what) in [(&first, "the restored guest's disk1"), (&second, "disk2")] {
        assert_eq!(
            std::fs::read(img).unwrap()[..256 << 10],
            blk_pattern(256 << 10, 7)[..],
            "what the guest wrote to {what}"
        );
    }
}
