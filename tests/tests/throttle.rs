//! Throttling in blockd (QEMU's limits and throttle groups), measured with an independent
//! client: libblkio's vhost-user-blk driver (tests/src/bin/blkio-bench.rs) against exports of
//! a sandboxed blockd, set up and throttled with `vmmctl --blockd`. The rates are blockd's
//! request counts (vmmctl disk list --json) and the client's own figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm_tests::{wait_until, TempDir};

const T: Duration = Duration::from_secs(20);

/// A blockd on a control socket, with `n` exports of 64 MiB ("d0", "d1", ...).
struct Blockd {
    child: Child,
    dir: TempDir,
    ctl: PathBuf,
}

impl Blockd {
    fn start(name: &str, n: usize) -> Blockd {
        let dir = TempDir::new(name);
        let ctl = dir.join("ctl.sock");
        // Its log goes to a file, shown when a test fails.
        let log = std::fs::File::create(dir.join("blockd.log")).unwrap();
        let child = Command::new(vmm_tests::blockd_bin())
            .arg("--listen")
            .arg(&ctl)
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start blockd");
        wait_until(T, "blockd's control socket", || ctl.exists());
        let b = Blockd { child, dir, ctl };
        for i in 0..n {
            let img = b.dir.join(&format!("d{i}.img"));
            std::fs::File::create(&img)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
            let (code, _, err) = b.ctl(&[
                "disk",
                "add",
                &format!("d{i}"),
                "--image",
                img.to_str().unwrap(),
                "--vhost-socket",
                b.sock(i).to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{err}");
        }
        b
    }

    fn sock(&self, i: usize) -> PathBuf {
        self.dir.join(&format!("d{i}.sock"))
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(vmm_tests::vmmctl_bin())
            .arg("--blockd")
            .arg(&self.ctl)
            .args(args)
            .output()
            .expect("run vmmctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn throttle(&self, disk: &str, spec: &str) {
        let (code, _, err) = self.ctl(&["disk", "throttle", disk, spec]);
        assert_eq!(code, 0, "throttle {disk} {spec}: {err}");
    }

    /// Reads and writes blockd has done on export `i`.
    fn requests(&self, i: usize) -> u64 {
        let (code, out, err) = self.ctl(&["--json", "disk", "list"]);
        assert_eq!(code, 0, "{err}");
        let at = out
            .find(&format!("\"name\":\"d{i}\""))
            .unwrap_or_else(|| panic!("no d{i} in {out}"));
        let rest = &out[at..];
        let count = |op: &str| -> u64 {
            let k = rest
                .find(&format!("{{\"op\":\"{op}\",\"requests\":"))
                .unwrap();
            let v = &rest[k + op.len() + 20..];
            v[..v.find(',').unwrap()].parse().unwrap()
        };
        count("read") + count("write")
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("blockd.log")).unwrap_or_default();
            eprintln!("--- blockd's log ---\n{log}");
        }
        // SAFETY: SIGTERM to the blockd this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// libblkio's client: 4k random I/O at queue depth 8 for `secs` seconds; its IOPS.
fn client(sock: &Path, workload: &str, secs: f64) -> Child {
    client_bs(sock, workload, 4096, secs)
}

/// The same with `bs`-byte requests.
fn client_bs(sock: &Path, workload: &str, bs: u32, secs: f64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_blkio-bench"))
        .args(["--driver", "virtio-blk-vhost-user", "--path"])
        .arg(sock)
        .args([
            "run",
            "--workload",
            workload,
            "--bs",
            &bs.to_string(),
            "--qd",
            "8",
        ])
        .args(["--seconds", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blkio-bench")
}

fn iops(c: Child) -> f64 {
    let out = c.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let v = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("iops="))
        .unwrap_or_else(|| panic!("no iops in {text}"));
    v.parse().unwrap()
}

#[test]
fn a_disk_limited_to_200_iops_gives_its_client_200() {
    let b = Blockd::start("throttle-one", 1);
    b.throttle("d0", "iops=200");
    let (code, out, _) = b.ctl(&["disk", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("throttle=iops=200"), "{out}");
    let before = b.requests(0);
    let got = iops(client(&b.sock(0), "randread", 5.0));
    let done = b.requests(0) - before;
    // 200 ± 10%, by the client's clock and by blockd's count (which includes the client's
    // set-up reads and the first burst of avg/10 = 20).
    assert!((180.0..=220.0).contains(&got), "the client saw {got} IOPS");
    assert!(
        (900..=1100).contains(&done),
        "blockd did {done} requests in 5 s"
    );
}

/// Bytes per second a 16 KiB client got in `secs` seconds of `workload`.
fn bytes_per_s(sock: &Path, workload: &str, secs: f64) -> f64 {
    iops(client_bs(sock, workload, 16384, secs)) * 16384.0
}

/// `got` is within 5% of `want` (bytes per second).
fn within_5_percent(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= want * 0.05,
        "{what}: {:.3} MiB/s, not {:.3} MiB/s ± 5%",
        got / 1048576.0,
        want / 1048576.0
    );
}

/// A bps limit, and bps-rd/bps-wr for each direction, measured end to end: the client gets the
/// configured rate within 5% (the bucket lets a tenth of a second's worth through at once, so
/// 5 s runs carry 2% on top).
#[test]
fn bps_limits_and_the_read_write_split_give_the_configured_rates() {
    let b = Blockd::start("throttle-bps", 1);
    b.throttle("d0", "bps=4194304");
    within_5_percent(
        "bps=4M, reads",
        bytes_per_s(&b.sock(0), "randread", 5.0),
        4194304.0,
    );
    b.throttle("d0", "bps-rd=4194304,bps-wr=2097152");
    within_5_percent(
        "bps-rd=4M",
        bytes_per_s(&b.sock(0), "randread", 5.0),
        4194304.0,
    );
    within_5_percent(
        "bps-wr=2M",
        bytes_per_s(&b.sock(0), "randwrite", 5.0),
        2097152.0,
    );
}

/// A burst (QEMU's bps-max and bps-max-length): bps=2M, bps-max=8M for 2 s. From an idle
/// disk the client gets 8 MiB/s until the bucket of max x length (16 MiB), which fills at
/// max - avg = 6 MiB/s, is full (2.67 s); then 2 MiB/s.
#[test]
fn a_burst_goes_at_the_max_rate_then_falls_to_the_average() {
    let b = Blockd::start("throttle-burst", 1);
    b.throttle("d0", "bps=2097152,bps-max=8388608,bps-max-length=2");
    // 2 s of the burst (the small bucket lets max/10 through at once: 5% over 2 s).
    let burst = bytes_per_s(&b.sock(0), "randread", 2.0);
    within_5_percent("the burst", burst, 8388608.0 * 1.05);
    // What is left of the burst goes first (16 MiB less what the first run put in the bucket
    // above what leaked out at 2 MiB/s), then 2 MiB/s.
    let left = 16.0 * 1048576.0 - (burst * 2.0 - 2097152.0 * 2.0);
    within_5_percent(
        "after the burst",
        bytes_per_s(&b.sock(0), "randread", 6.0),
        2097152.0 + left / 6.0,
    );
}

#[test]
fn two_disks_in_a_group_of_400_iops_get_about_200_each() {
    let b = Blockd::start("throttle-group", 2);
    b.throttle("d0", "group=tenant,iops=400");
    b.throttle("d1", "group=tenant");
    let (_, out, _) = b.ctl(&["disk", "list"]);
    assert_eq!(
        out.matches("throttle=group=tenant,iops=400").count(),
        2,
        "{out}"
    );
    // Equal load, one reading and one writing: the group's budget is shared round-robin.
    let c0 = client(&b.sock(0), "randread", 5.0);
    let c1 = client(&b.sock(1), "randwrite", 5.0);
    let (a, c) = (iops(c0), iops(c1));
    assert!(
        (360.0..=440.0).contains(&(a + c)),
        "together {a} + {c} IOPS, not 400 ± 10%"
    );
    assert!(
        (a - c).abs() <= 0.25 * a.min(c),
        "unfair: {a} against {c} IOPS"
    );
    assert!(
        (150.0..=250.0).contains(&a) && (150.0..=250.0).contains(&c),
        "{a}, {c}"
    );
}

/// The limit changes from 400 to 100 IOPS while the client runs; from one second after the
/// change, blockd serves 100 ± 10%. Then throttling is turned off and the rate jumps.
#[test]
fn a_change_at_run_time_takes_effect_within_a_second() {
    let b = Blockd::start("throttle-change", 1);
    b.throttle("d0", "iops=400");
    let c = client(&b.sock(0), "randread", 7.0);
    std::thread::sleep(Duration::from_millis(1500));
    let rate = |from: u64, secs: f64| (b.requests(0) - from) as f64 / secs;
    let r0 = b.requests(0);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let before = rate(r0, t0.elapsed().as_secs_f64());
    b.throttle("d0", "iops=100");
    std::thread::sleep(Duration::from_secs(1));
    let r1 = b.requests(0);
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after = rate(r1, t1.elapsed().as_secs_f64());
    b.throttle("d0", "off");
    std::thread::sleep(Duration::from_millis(300));
    let r2 = b.requests(0);
    let t2 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let off = rate(r2, t2.elapsed().as_secs_f64());
    iops(c);
    assert!((360.0..=440.0).contains(&before), "before: {before}/s");
    assert!(
        (90.0..=110.0).contains(&after),
        "from 1 s after the change: {after}/s"
    );
    assert!(off > 1000.0, "with throttling off: {off}/s");
}

#[test]
fn bad_throttle_settings_get_one_line_errors_and_change_nothing() {
    let b = Blockd::start("throttle-bad", 1);
    b.throttle("d0", "iops=300");
    for (spec, want) in [
        ("iops=abc", "iops=abc: give a whole number"),
        ("iops-total=5", "iops-total: no such limit"),
        (
            "iops=100,iops-rd=50",
            "iops cannot be set together with iops-rd or iops-wr",
        ),
        ("iops=100,iops-max=50", "iops-max=50 is below iops=100"),
        (
            "iops=100,iops-max-length=5",
            "iops-max-length=5 needs iops-max",
        ),
        (
            "group=nosuch",
            "throttle group nosuch does not exist; give it limits to create it",
        ),
    ] {
        let (code, _, err) = b.ctl(&["disk", "throttle", "d0", spec]);
        assert_ne!(code, 0, "{spec} was accepted");
        assert!(err.contains(want), "{spec}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (code, _, err) = b.ctl(&["disk", "throttle", "d9", "iops=5"]);
    assert_eq!(code, 1);
    assert!(err.contains("no export \"d9\""), "{err}");
    let (_, out, _) = b.ctl(&["disk", "list"]);
    assert!(out.contains("throttle=iops=300 "), "{out}");
}

/// Writes per second blockd did for the VM's disk0 over about `secs`, by its own count, timed
/// from the middle of one query to the middle of the next.
fn vm_writes_per_s(sock: &Path, secs: u64) -> f64 {
    let writes = || -> (u64, Instant) {
        let start = Instant::now();
        let (code, out, err) = vmm_tests::vmmctl(sock, &["--json", "disk", "list"]);
        let mid = start + start.elapsed() / 2;
        assert_eq!(code, 0, "{err}");
        let key = "{\"op\":\"write\",\"requests\":";
        let k = out
            .find(key)
            .unwrap_or_else(|| panic!("no write count in {out}"));
        let v = &out[k + key.len()..];
        (v[..v.find(',').unwrap()].parse().unwrap(), mid)
    };
    let (before, t0) = writes();
    std::thread::sleep(Duration::from_secs(secs));
    let (after, t1) = writes();
    (after - before) as f64 / (t1 - t0).as_secs_f64()
}

/// Checks that a guest writing as fast as it can gets `limit` writes/s (±10%). The throttle is
/// a ceiling: no window may go over it. A guest on a loaded host (PVM emulates its kernel) may
/// fall behind in one window, so up to three windows are measured and one must reach it.
fn assert_vm_writes_at(sock: &Path, limit: f64) {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = vm_writes_per_s(sock, 3);
        seen.push(got);
        assert!(
            got <= limit * 1.1,
            "{got} writes/s at iops={limit}: over the limit (windows: {seen:?})"
        );
        if got >= limit * 0.9 {
            return;
        }
    }
    panic!("writes/s at iops={limit} stayed below it in every window: {seen:?}");
}

/// The same through a VM's API: vmm-core passes `disk throttle` to its blockd, and `disk
/// list` shows the setting; the guest, writing as fast as it can, gets the limit given at
/// start and the one set at run time on the blockd that replaced a killed one.
#[test]
fn vmmctl_throttles_a_vms_disk_through_vmm_core() {
    let dir = TempDir::new("throttle-vm");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = vmm_tests::socket_path("throttle-vm");
    let mut vm = vmm_tests::TestVm::builder()
        .cmdline("tg.scenario=blk-seq tg.seq.count=100000000")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args([
            "--disk",
            &format!("path={},throttle.iops=100,throttle.group=vm", img.display()),
        ])
        .spawn();
    vm.wait_for("tg: ack 20", T);
    // The throttle given at start, as listed and as the guest gets it.
    let (_, out, _) = vmm_tests::vmmctl(&sock, &["disk", "list"]);
    assert!(out.contains("throttle=group=vm,iops=100 "), "{out}");
    assert_vm_writes_at(&sock, 100.0);
    let (code, out, err) = vmm_tests::vmmctl(
        &sock,
        &[
            "disk",
            "throttle",
            "disk0",
            "bps=1048576,bps-max=4194304,bps-max-length=3",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("disk0: throttle bps=1048576,bps-max=4194304,bps-max-length=3"),
        "{out}"
    );
    let (_, out, _) = vmm_tests::vmmctl(&sock, &["disk", "list"]);
    assert!(
        out.contains("throttle=bps=1048576,bps-max=4194304,bps-max-length=3 "),
        "{out}"
    );
    // blockd dies; the one vmm-core starts in its place gets the disk's throttle as it was.
    vm.kill_helper("blockd", 1);
    let (_, out, _) = vmm_tests::vmmctl(&sock, &["disk", "list"]);
    assert!(
        out.contains("throttle=bps=1048576,bps-max=4194304,bps-max-length=3 "),
        "{out}"
    );
    // A limit set at run time on the new blockd: the guest gets it.
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["disk", "throttle", "disk0", "iops=50"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert_vm_writes_at(&sock, 50.0);
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["disk", "throttle", "disk7", "iops=5"]);
    assert_eq!(code, 1);
    assert!(err.contains("no export \"disk7\""), "{err}");
    let (code, _, err) = vmm_tests::vmmctl(&sock, &["disk", "throttle", "disk0", "bps-max=5"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bps-max=5 needs bps (the average rate) set too"),
        "{err}"
    );
    vmm_tests::vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}
