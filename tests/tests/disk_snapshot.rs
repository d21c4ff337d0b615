//! Live external snapshots and commits of a running VM's disk (`vmmctl disk snapshot NAME
//! --overlay PATH`, `vmmctl disk commit NAME`), under the guest's sequence writer: each of its
//! 4 KiB blocks carries its sequence number and checksum, so what each layer holds is read
//! back from the files (with qemu-img, Debian's qemu-utils) and checked block by block.

use std::path::Path;
use std::time::{Duration, Instant};
use vmm_tests::{seq_acks, seq_block_intact, TempDir, TestVm};

const T: Duration = Duration::from_secs(90);
/// The guest's disk: 8 MiB, 2048 blocks, more than it writes (no block is written twice).
const BLOCKS: u64 = 2048;
const WRITES: u64 = 1600;

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}; install qemu-utils (scripts/setup.sh does)"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What an image holds by itself, without its backing chain, as raw bytes: a copy of it is
/// unhooked from its backing file (qemu-img rebase -u) and converted.
fn own_data(dir: &TempDir, img: &Path) -> Vec<u8> {
    let copy = dir.join("own.qcow2");
    std::fs::copy(img, &copy).unwrap();
    qemu_img(&["rebase", "-u", "-b", "", copy.to_str().unwrap()]);
    all_data(dir, &copy)
}

/// The data a disk image shows (through its chain), as raw bytes.
fn all_data(dir: &TempDir, img: &Path) -> Vec<u8> {
    let raw = dir.join("data.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

fn zero(data: &[u8], block: u64) -> bool {
    let at = (block * 4096) as usize;
    data[at..at + 4096].iter().all(|&b| b == 0)
}

/// The blocks in `data` that hold the sequence writer's block whole; panics on a block that
/// is neither that nor zeroes.
fn written(data: &[u8], what: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for b in 0..BLOCKS {
        if seq_block_intact(data, BLOCKS, b) {
            out.push(b);
        } else {
            assert!(
                zero(data, b),
                "{what}: block {b} is neither zeroes nor block {b} whole"
            );
        }
    }
    out
}

fn ok(api: &Path, args: &[&str], vm: &TestVm) -> String {
    let (code, out, err) = vmm_tests::vmmctl(api, args);
    assert_eq!(code, 0, "vmmctl {args:?}: {out}{err}\n{}", vm.stderr());
    out + &err
}

/// A VM whose guest runs the sequence writer (`count` blocks) on `disk`, with its API on
/// `api`.
fn seq_writer(api: &Path, count: u64, disk: &str) -> TestVm {
    TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=blk-seq tg.seq.count={count}"
        ))
        .args(["--api-socket", api.to_str().unwrap()])
        .args(["--disk", disk])
        .spawn()
}

fn last_ack(vm: &TestVm) -> u64 {
    seq_acks(&vm.stdout()).last().copied().unwrap_or(0)
}

fn wait_ack(vm: &TestVm, n: u64) {
    let deadline = Instant::now() + T;
    while last_ack(vm) < n {
        assert!(
            Instant::now() < deadline,
            "no ack {n} within {T:?}\n--- console ---\n{}\n--- log ---\n{}",
            vm.stdout(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Under the guest's writes (throttled to 400 a second, so that they span the test): a
/// snapshot onto ov1.qcow2 leaves base.raw holding exactly the blocks written before it (a
/// prefix of the sequence, every block acknowledged before the call among them), and a
/// second onto ov2.qcow2 does the same to ov1. Then ov2 is committed into ov1 (a qcow2
/// base) and ov1 into base.raw while the guest writes: in the end base.raw alone holds every
/// block the guest wrote, each overlay holds the blocks written while it was the top, and
/// `qemu-img check` finds both overlays clean.
#[test]
fn live_snapshots_split_the_writes_and_commits_merge_them_back() {
    let dir = TempDir::new("disk-snapshot");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; (BLOCKS * 4096) as usize]).unwrap();
    let (ov1, ov2) = (dir.join("ov1.qcow2"), dir.join("ov2.qcow2"));
    let api = dir.join("api.sock");
    let mut vm = seq_writer(
        &api,
        WRITES,
        &format!("path={},throttle.iops=400", base.display()),
    );
    wait_ack(&vm, 100);
    let before1 = last_ack(&vm);
    let out = ok(
        &api,
        &[
            "disk",
            "snapshot",
            "disk0",
            "--overlay",
            ov1.to_str().unwrap(),
        ],
        &vm,
    );
    assert!(out.contains("disk0: its writes go to"), "{out}");
    wait_ack(&vm, before1 + 200);
    // The old top holds a prefix of the sequence, with everything acknowledged before the
    // snapshot, and nothing after it.
    let in_base = written(
        &std::fs::read(&base).unwrap(),
        "base.raw after the snapshot",
    );
    let m1 = in_base.len() as u64;
    assert_eq!(
        in_base,
        (0..m1).collect::<Vec<_>>(),
        "base.raw: not a prefix"
    );
    assert!(
        m1 > before1,
        "base.raw lacks acknowledged blocks: {m1} <= {before1}"
    );
    // The config a snapshot or migration carries names the overlay.
    let config = ok(&api, &["config"], &vm);
    assert!(
        config.contains(&format!("path={},format=qcow2", ov1.display())),
        "{config}"
    );
    let (_, list, _) = vmm_tests::vmmctl(&api, &["disk", "list"]);
    assert!(list.contains(ov1.to_str().unwrap()), "{list}");

    let before2 = last_ack(&vm);
    ok(
        &api,
        &[
            "disk",
            "snapshot",
            "disk0",
            "--overlay",
            ov2.to_str().unwrap(),
        ],
        &vm,
    );
    wait_ack(&vm, before2 + 200);
    let in_ov1 = written(&own_data(&dir, &ov1), "ov1.qcow2 after the second snapshot");
    let m2 = before2.max(*in_ov1.last().unwrap()) + 1;
    for b in m1..=before2 {
        assert!(
            in_ov1.contains(&b),
            "ov1.qcow2 lacks block {b} (written while it was the top)"
        );
    }
    // A block in ov1 that was written after the second snapshot would be a lost write.
    assert!(
        in_ov1.iter().all(|&b| b < m2),
        "ov1.qcow2 took writes after the snapshot: {:?}",
        &in_ov1[in_ov1.len().saturating_sub(5)..]
    );
    // The old top, read-only now, is a consistent qcow2 image.
    qemu_img(&["check", "-q", ov1.to_str().unwrap()]);

    // Commits while the guest writes: ov2 into ov1 (qcow2), then ov1 into base.raw.
    let out = ok(&api, &["disk", "commit", "disk0"], &vm);
    assert!(
        out.contains(&format!("committed into {}", ov1.display())),
        "{out}"
    );
    // At least the 200 blocks ov2 took before the commit began were copied.
    let copied: u64 = out
        .split(" (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {out}"));
    assert!(copied >= 200 * 4096, "{copied} bytes copied: {out}");
    let out = ok(&api, &["disk", "commit", "disk0"], &vm);
    assert!(
        out.contains(&format!("committed into {}", base.display())),
        "{out}"
    );
    let config = ok(&api, &["config"], &vm);
    assert!(
        config.contains(&format!("path={},format=raw", base.display())),
        "{config}"
    );
    // A raw image has nothing below it.
    let (code, _, err) = vmm_tests::vmmctl(&api, &["disk", "commit", "disk0"]);
    assert_eq!(code, 1);
    assert!(err.contains("has no backing file"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    wait_ack(&vm, WRITES - 1);
    // How long each switch held the guest's requests (blockd's log), for the record.
    for l in vm.stderr().lines().filter(|l| l.contains("requests held")) {
        println!("{l}");
    }
    let out = vm.stdout();
    assert!(!out.contains("tg: seq error"), "{out}");
    vmm_tests::vmmctl(&api, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());

    // base.raw alone has every block, whole.
    let all = std::fs::read(&base).unwrap();
    assert_eq!(
        written(&all, "base.raw at the end"),
        (0..WRITES).collect::<Vec<_>>(),
        "base.raw after the commits"
    );
    for ov in [&ov1, &ov2] {
        qemu_img(&["check", "-q", ov.to_str().unwrap()]);
    }
    // ov2 held what came after the second snapshot, up to the commit.
    let in_ov2 = written(&own_data(&dir, &ov2), "ov2.qcow2");
    assert!(
        in_ov2.contains(&(m2 + 1)) && in_ov2.iter().all(|&b| b + 16 >= m2),
        "ov2.qcow2: {:?}..",
        &in_ov2[..in_ov2.len().min(5)]
    );
    // The whole chain from ov2 still reads as the disk did when ov2 stopped being its top.
    let chain = all_data(&dir, &ov2);
    assert!(written(&chain, "the chain from ov2").len() as u64 >= m2);
}

/// What cannot be snapshotted or committed is refused in one line that names it, and
/// nothing changes: an overlay path that exists (it is not overwritten), a directory that
/// does not exist, a disk that does not exist, a read-only disk, a commit with nothing
/// below; and `--blockd` is pointed to the VM's API.
#[test]
fn bad_snapshots_and_commits_get_one_line_errors_and_change_nothing() {
    let dir = TempDir::new("disk-snapshot-bad");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let ro = dir.join("ro.raw");
    std::fs::write(&ro, vec![0u8; 1 << 20]).unwrap();
    let taken = dir.join("taken.qcow2");
    std::fs::write(&taken, b"precious").unwrap();
    let api = dir.join("api.sock");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk-seq tg.seq.count=100000000")
        .args(["--api-socket", api.to_str().unwrap()])
        .args([
            "--disk",
            &format!("path={},throttle.iops=100", base.display()),
        ])
        .args(["--disk", &format!("path={},readonly=on", ro.display())])
        .spawn();
    wait_ack(&vm, 5);
    let nowhere = dir.join("no/such/dir/ov.qcow2");
    let ro_ov = dir.join("ro-ov.qcow2");
    for (args, want) in [
        (
            vec![
                "disk",
                "snapshot",
                "disk0",
                "--overlay",
                taken.to_str().unwrap(),
            ],
            "cannot create it (File exists",
        ),
        (
            vec![
                "disk",
                "snapshot",
                "disk0",
                "--overlay",
                nowhere.to_str().unwrap(),
            ],
            "cannot create it (No such file or directory",
        ),
        (
            vec!["disk", "snapshot", "disk7", "--overlay", "x.qcow2"],
            "disk disk7: no such disk",
        ),
        (
            vec![
                "disk",
                "snapshot",
                "disk1",
                "--overlay",
                ro_ov.to_str().unwrap(),
            ],
            "disk disk1: it is read-only",
        ),
        (vec!["disk", "commit", "disk0"], "has no backing file"),
        (vec!["disk", "commit", "disk9"], "disk disk9: no such disk"),
    ] {
        let (code, out, err) = vmm_tests::vmmctl(&api, &args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: wanted {want:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&taken).unwrap(), b"precious");
    assert!(!ro_ov.exists());
    let config = ok(&api, &["config"], &vm);
    assert!(
        config.contains(&format!("path={}", base.display())) && !config.contains("qcow2"),
        "{config}"
    );
    // The guest writes on, to base.raw.
    let n = last_ack(&vm);
    wait_ack(&vm, n + 20);
    vmm_tests::vmmctl(&api, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert!(vmm_tests::check_seq_blocks(&base, &vm.stdout()) > n);
}

/// A commit of an overlay that holds 256 MiB (made by qemu-img and qemu-io) while the guest
/// writes: `vmmctl disk commit` shows its progress as it goes, `disk list` shows the job,
/// and in the end base.raw holds the overlay's data with the guest's writes on top.
#[test]
fn a_long_commit_shows_its_progress_and_ends_with_the_data_merged() {
    let dir = TempDir::new("disk-commit-long");
    let base = dir.join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(320 << 20).unwrap();
    drop(f);
    let ov = dir.join("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        ov.to_str().unwrap(),
    ]);
    let io = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -q -P 0x5a 0 256M",
            ov.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-io (qemu-utils)");
    assert!(io.status.success(), "{io:?}");
    let api = dir.join("api.sock");
    let mut vm = seq_writer(
        &api,
        100_000_000,
        &format!("path={},format=qcow2,throttle.iops=200", ov.display()),
    );
    wait_ack(&vm, 20);
    let commit = std::process::Command::new(vmm_tests::vmmctl_bin())
        .args(["--socket", api.to_str().unwrap(), "disk", "commit", "disk0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut job, mut job_json) = (String::new(), false);
    let deadline = Instant::now() + T;
    while job.is_empty() && Instant::now() < deadline {
        let (_, list, _) = vmm_tests::vmmctl(&api, &["disk", "list"]);
        if let Some(at) = list.find("(commit: pass ") {
            job = list[at..].lines().next().unwrap().to_string();
            let (_, json, _) = vmm_tests::vmmctl(&api, &["--json", "disk", "list"]);
            assert!(json.contains("\"job\":\""), "{json}");
            job_json |= json.contains("\"job\":\"commit: pass ");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = commit.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}\n{}", vm.stderr());
    assert!(job.contains("MiB copied"), "disk list never showed the job");
    // (The JSON's query came a moment later: the job may have ended by then, rarely.)
    if !job_json {
        println!("disk list --json came after the commit's end");
    }
    assert!(
        stderr.contains("disk0: commit: pass 1, "),
        "no progress shown: {stderr}"
    );
    assert!(
        stdout.contains(&format!("committed into {}", base.display())),
        "{stdout}"
    );
    let n = last_ack(&vm);
    wait_ack(&vm, n + 20);
    vmm_tests::vmmctl(&api, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let data = std::fs::read(&base).unwrap();
    let acked = seq_acks(&vm.stdout());
    let last = *acked.last().unwrap();
    let blocks = data.len() as u64 / 4096;
    assert!(last < blocks, "the guest wrapped around");
    for b in 0..blocks {
        let at = (b * 4096) as usize;
        let block = &data[at..at + 4096];
        // (The write after the last acknowledged one may have landed as the VM stopped.)
        if b == last + 1 && seq_block_intact(&data, blocks, b) {
            continue;
        }
        if b <= last {
            assert!(
                seq_block_intact(&data, blocks, b),
                "block {b}: not the guest's"
            );
        } else if b < (256 << 20) / 4096 {
            assert!(
                block.iter().all(|&x| x == 0x5a),
                "block {b}: not the overlay's"
            );
        } else {
            assert!(block.iter().all(|&x| x == 0), "block {b}: not zeroes");
        }
    }
}

/// After a live snapshot the disk is its overlay chain everywhere: a blockd killed and
/// restarted serves the chain (the guest's writes go on, into the overlay), and a snapshot
/// of the VM carries it, so a restore given no --disk opens the overlay over its base. In
/// the end the base holds only blocks written before the live snapshot, and the chain every
/// block either VM had acknowledged.
#[test]
fn the_overlay_chain_survives_a_blockd_restart_and_goes_with_a_snapshot_of_the_vm() {
    let dir = TempDir::new("disk-snapshot-carry");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; (BLOCKS * 4096) as usize]).unwrap();
    let ov = dir.join("ov.qcow2");
    let api = dir.join("api.sock");
    let mut vm = seq_writer(
        &api,
        100_000_000,
        &format!("path={},throttle.iops=200", base.display()),
    );
    wait_ack(&vm, 30);
    ok(
        &api,
        &[
            "disk",
            "snapshot",
            "disk0",
            "--overlay",
            ov.to_str().unwrap(),
        ],
        &vm,
    );
    // Killed at once, maybe while the overlay takes its first L2 table (whose refcount
    // vmm-core repairs before the next blockd serves it; see host_disks.rs).
    vm.kill_helper("blockd", 1);
    let n = last_ack(&vm);
    wait_ack(&vm, n + 30);
    let list = ok(&api, &["disk", "list"], &vm);
    assert!(list.contains(ov.to_str().unwrap()), "{list}");
    ok(&api, &["pause"], &vm);
    let snap = dir.join("snap");
    ok(
        &api,
        &["snapshot", &format!("file:{}", snap.display())],
        &vm,
    );
    ok(&api, &["shutdown", "--force"], &vm);
    vm.wait_exit(T);
    let first = vm.stdout();
    let in_base = written(&std::fs::read(&base).unwrap(), "base.raw");

    let api = dir.join("restored.sock");
    let mut vm = TestVm::builder()
        .args(["--api-socket", api.to_str().unwrap()])
        .args(["--restore", &format!("file:{}", snap.display())])
        .spawn();
    vmm_tests::wait_until(T, "the restore", || {
        vm.stderr().contains("the VM is here") || vm.stderr().contains("error")
    });
    let list = ok(&api, &["disk", "list"], &vm);
    assert!(
        list.contains(ov.to_str().unwrap()) && list.contains("qcow2"),
        "{list}"
    );
    ok(&api, &["resume"], &vm);
    let n = seq_acks(&first).last().copied().unwrap();
    wait_ack(&vm, n + 30);
    ok(&api, &["shutdown", "--force"], &vm);
    vm.wait_exit(T);
    let second = vm.stdout();

    // The base: what came before the live snapshot, untouched since.
    assert_eq!(
        written(&std::fs::read(&base).unwrap(), "base.raw at the end"),
        in_base
    );
    let m = in_base.len() as u64;
    assert_eq!(
        in_base,
        (0..m).collect::<Vec<_>>(),
        "base.raw: not a prefix"
    );
    assert!(m >= 30, "{m}");
    // blockd was killed while it wrote: a cluster it had counted but not yet mapped may leak
    // (qemu-img check's status 3, as after a QEMU crash), but nothing may be corrupt (2).
    let check = std::process::Command::new("qemu-img")
        .args(["check", ov.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    match check.status.code() {
        Some(0) => {}
        Some(3) => assert!(
            said.contains("Leaked cluster") && !said.contains("ERROR"),
            "{said}"
        ),
        _ => panic!("qemu-img check ov.qcow2: {said}\n{}", vm.stderr()),
    }
    let chain = all_data(&dir, &ov);
    let acked: Vec<u64> = seq_acks(&first)
        .into_iter()
        .chain(seq_acks(&second))
        .collect();
    assert!(*acked.last().unwrap() > m + 60);
    for seq in acked {
        assert!(seq_block_intact(&chain, BLOCKS, seq), "block {seq}: lost");
    }
}
