//! The helpers (chardevd, blockd) run sandboxed by default: their own mount, PID, net, IPC and
//! UTS namespaces, an empty read-only root, no capabilities, no_new_privs, uid 65534, and a
//! seccomp allowlist whose default kills them. With --no-sandbox they run as started (for
//! debugging). A forbidden system call kills the helper by SIGSYS, vmm-core names the helper
//! and the call, and the VM goes on.

use std::time::Duration;
use vmm_tests::{children_of, process_name, socket_path, vmm_core_bin, vmmctl, wait_until, TestVm};

const T: Duration = Duration::from_secs(60);

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// vmm-core's helper, and the sandboxed process inside it (if it forked into one).
fn helper(vm: &TestVm, name: &str) -> (u32, Option<u32>) {
    let mut found = None;
    wait_until(T, name, || {
        found = vm.children().into_iter().find(|&p| process_name(p) == name);
        found.is_some()
    });
    let outer = found.unwrap();
    (outer, children_of(outer).first().copied())
}

fn chardevd(vm: &TestVm) -> (u32, Option<u32>) {
    helper(vm, "chardevd")
}

/// What every sandboxed helper must show in /proc.
fn assert_sandboxed(pid: u32, what: &str) {
    assert_eq!(
        status_field(pid, "Uid"),
        "65534\t65534\t65534\t65534",
        "{what}"
    );
    assert_eq!(
        status_field(pid, "Gid"),
        "65534\t65534\t65534\t65534",
        "{what}"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "{what}: a seccomp filter"
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps),
            "0000000000000000",
            "{what}: {caps}"
        );
    }
    // PID 1 of its own PID namespace.
    assert_eq!(
        status_field(pid, "NSpid").split_whitespace().last(),
        Some("1"),
        "{what}"
    );
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{what}: {kind} namespace"
        );
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "{what}: its root holds {root:?}");
}

#[test]
fn chardevd_runs_in_its_own_namespaces_with_no_privileges_and_an_empty_root() {
    let sock = socket_path("sandbox");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    let (_, inner) = chardevd(&vm);
    let pid = inner.expect("the sandboxed chardevd, a child of the one vmm-core started");
    assert_sandboxed(pid, "chardevd");
    // And it serves: the console reached the test through it.
    assert!(vm.stdout().contains("tg: ready"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn with_no_sandbox_chardevd_runs_as_started_and_still_serves() {
    let tmp = vmm_tests::TempDir::new("no-sandbox");
    let file = tmp.join("console.log");
    let sock = socket_path("no-sandbox");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--no-sandbox", "--api-socket", sock.to_str().unwrap()])
        .args(["--serial", &format!("file={}", file.display())])
        .spawn();
    wait_until(T, "the console in the file", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("tg: ready"))
    });
    let (outer, inner) = chardevd(&vm);
    assert_eq!(inner, None, "no sandboxed child");
    assert_eq!(
        status_field(outer, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(ns(&outer.to_string(), "mnt"), ns("self", "mnt"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// blockd too: checked while it serves a guest's disk.
#[test]
fn blockd_runs_sandboxed_with_a_seccomp_filter_while_it_serves() {
    let dir = vmm_tests::TempDir::new("sandbox-blockd");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let sock = socket_path("sandbox-blockd");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.seed=2 tg.blk.halt-after-write=1")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .spawn();
    vm.wait_for("tg: blk0 written-unflushed", T);
    assert!(vm
        .stdout()
        .contains("tg: blk0 written-unflushed bytes=2097152 errors=0"));
    let (_, inner) = helper(&vm, "blockd");
    let pid = inner.expect("the sandboxed blockd");
    assert_sandboxed(pid, "blockd");
    assert!(
        vm.stderr().contains("blockd: info: sandboxed:"),
        "{}",
        vm.stderr()
    );
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// migrated too, with its own network namespace: vmm-core opens every channel and hands it
/// the descriptor. A snapshot goes through the sandboxed migrated (no SIGSYS, the same
/// process after it), and the file it wrote passes every check a restore makes.
#[test]
fn migrated_runs_sandboxed_and_writes_a_snapshot_through_a_handed_descriptor() {
    let dir = vmm_tests::TempDir::new("sandbox-migrated");
    let sock = socket_path("sandbox-migrated");
    let mut vm = TestVm::builder()
        .memory("128M")
        .cmdline("tg.scenario=idle")
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    let (outer, inner) = helper(&vm, "migrated");
    let pid = inner.expect("the sandboxed migrated");
    assert_sandboxed(pid, "migrated");
    let snap = dir.join("snap.bin");
    let uri = format!("file:{}", snap.display());
    let (code, out, err) = vmmctl(&sock, &["snapshot", &uri]);
    assert_eq!(
        code,
        0,
        "snapshot: {out}{err}
{}",
        vm.stderr()
    );
    assert_eq!(
        helper(&vm, "migrated"),
        (outer, Some(pid)),
        "the same migrated"
    );
    assert!(!vm.stderr().contains("SIGSYS"), "{}", vm.stderr());
    let check = std::process::Command::new(vmm_tests::vmm_core_bin().with_file_name("migrated"))
        .arg("inspect")
        .arg(&snap)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(said.contains("every checksum good, complete"), "{said}");
    // A second snapshot to the same name is refused (vmm-core creates the file, never over
    // an existing one), and the first file is left as it was.
    let len = std::fs::metadata(&snap).unwrap().len();
    let (code, _, err) = vmmctl(&sock, &["snapshot", &uri]);
    assert_ne!(code, 0);
    assert!(err.contains("the file exists"), "{err}");
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), len);
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// No process that vmm-core starts, nor any of their descendants, runs outside a sandbox:
/// each helper's jail leaves a waiting parent in the host's PID namespace (the sandboxed
/// helper's parent), and it too has no capability, an unprivileged uid, no_new_privs, a
/// seccomp filter and an empty root. Walked while all three helpers run and serve.
#[test]
fn every_process_under_vmm_core_is_confined() {
    let dir = vmm_tests::TempDir::new("walk");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = socket_path("walk");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .spawn();
    vm.wait_for("tg: ready", T);
    // A snapshot, so that migrated has served too.
    let uri = format!("file:{}", dir.join("snap").display());
    let (code, _, err) = vmmctl(&sock, &["snapshot", &uri]);
    assert_eq!(code, 0, "{err}");
    let all = descendants(vm.pid());
    let names: Vec<String> = all.iter().map(|&p| process_name(p)).collect();
    for helper in ["blockd", "chardevd", "migrated"] {
        assert_eq!(
            names.iter().filter(|n| *n == helper).count(),
            2,
            "{helper}: its jail's waiting parent and the sandboxed helper, in {names:?}"
        );
    }
    for (&pid, name) in all.iter().zip(&names) {
        let what = format!("{name} ({pid})");
        for key in ["Uid", "Gid"] {
            let ids = status_field(pid, key);
            assert!(
                ids.split_whitespace().all(|id| id != "0"),
                "{what}: {key} {ids}"
            );
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
        assert_eq!(status_field(pid, "Seccomp"), "2", "{what}");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(pid, caps),
                "0000000000000000",
                "{what}: {caps}"
            );
        }
        for kind in ["mnt", "net", "ipc", "uts"] {
            assert_ne!(
                ns(&pid.to_string(), kind),
                ns("self", kind),
                "{what}: the host's {kind} namespace"
            );
        }
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .collect();
        assert!(root.is_empty(), "{what}: its root holds {root:?}");
    }
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// A forbidden system call, injected by a fault rule: chardevd dies by SIGSYS, vmm-core
/// names it and the call, restarts it, and the console goes on.
#[test]
fn chardevd_killed_by_seccomp_is_reported_and_restarted() {
    let sock = socket_path("seccomp-chardevd");
    let tmp = vmm_tests::TempDir::new("seccomp-chardevd");
    let file = tmp.join("console.log");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=ticker")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--serial", &format!("file={}", file.display())])
        .spawn();
    let ticks = || std::fs::read_to_string(&file).map_or(0, |t| t.matches("tg: tick ").count());
    wait_until(T, "ticks", || ticks() >= 2);
    let (first, _) = chardevd(&vm);
    let (code, _, err) = vmmctl(&sock, &["console-fault", "forbidden-syscall"]);
    assert_eq!(code, 0, "{err}");
    let deadline = std::time::Instant::now() + T;
    while !vm.stderr().contains(
        "chardevd made a system call outside its seccomp allowlist, ptrace (101), and was killed by SIGSYS",
    ) {
        assert!(
            std::time::Instant::now() < deadline,
            "no report from vmm-core:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        vm.stderr()
            .contains("chardevd: seccomp: forbidden system call ptrace (101); killed by SIGSYS"),
        "{}",
        vm.stderr()
    );
    // A new chardevd, and the console goes on through it.
    let deadline = std::time::Instant::now() + T;
    while !vm.stderr().contains("restarted chardevd") {
        assert!(
            std::time::Instant::now() < deadline,
            "chardevd was not restarted:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (second, _) = chardevd(&vm);
    assert_ne!(first, second);
    let before = ticks();
    wait_until(T, "more ticks", || ticks() > before + 1);
    let (code, out, _) = vmmctl(&sock, &["info"]);
    assert_eq!(code, 0);
    assert!(out.contains("running"), "{out}");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// The same for blockd: it dies by SIGSYS, vmm-core reports it, starts another and
/// reconnects the disk; the VM keeps running.
#[test]
fn blockd_killed_by_seccomp_is_reported_and_the_vm_survives() {
    let dir = vmm_tests::TempDir::new("seccomp-blockd");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = socket_path("seccomp-blockd");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=blk tg.blk.halt-after-write=1")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .spawn();
    vm.wait_for("tg: blk0 written-unflushed", T);
    let (outer, inner) = helper(&vm, "blockd");
    let inner = inner.expect("the sandboxed blockd");
    let (code, _, err) = vmmctl(&sock, &["disk", "fault", "forbidden-syscall"]);
    assert_eq!(code, 0, "{err}");
    wait_until(T, "vmm-core's report", || {
        vm.stderr().contains(
            "blockd made a system call outside its seccomp allowlist, ptrace (101), and was killed by SIGSYS",
        )
    });
    // It is dead: the sandboxed process is gone, and the one vmm-core started (which waited
    // for it) has ended too, by the jail's report of a SIGSYS death (status 159).
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'))
        })
    };
    wait_until(T, "blockd's end", || gone(inner) && gone(outer));
    // The jail's note comes through vmm-core's copy of blockd's stderr, maybe a moment later.
    wait_until(T, "the jail's note of the SIGSYS death", || {
        vm.stderr().contains("killed by signal 31 (SIGSYS")
    });
    wait_until(T, "vmm-core to restart blockd", || {
        vm.stderr()
            .contains("restarted blockd (restart 1); disks reconnected: disk0")
    });
    assert!(vm
        .stderr()
        .contains("lost blockd: the VM's disks stall until it is back"));
    let (code, out, err) = vmmctl(&sock, &["disk", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("disk0") && out.contains("connected"), "{out}");
    let (again, _) = helper(&vm, "blockd");
    assert_ne!(again, outer, "the same blockd");
    let (code, out, _) = vmmctl(&sock, &["info"]);
    assert_eq!(code, 0);
    assert!(out.contains("running"), "{out}");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// vmm-core's threads run under seccomp filters by role: the vCPU threads under their own
/// (KVM ioctls, the transport's vhost-user messages and eventfds, memory, signals) stacked on
/// the main thread's, the API thread under another, the main thread under its own (building
/// the VM at each boot, ending the helpers), and the service threads (signals, console
/// input, the helpers' stderr) under the common base. Only the three helper supervisors, which
/// start helpers (a child inherits its parent thread's filter), run without one. /proc shows
/// it per thread, and the VM still reboots and serves under them.
#[test]
fn vmm_core_threads_run_under_seccomp_filters_by_role() {
    let sock = socket_path("seccomp-vcpu");
    let dir = vmm_tests::TempDir::new("seccomp-threads");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let console = dir.join("console.log");
    let mut vm = TestVm::builder()
        .cpus("2")
        .cmdline("tg.scenario=idle")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .args(["--serial", &format!("file={}", console.display())])
        .args(["--on-reset", "restart"])
        .spawn();
    let ready = |n: usize| {
        wait_until(T, "the guest's ready line", || {
            std::fs::read_to_string(&console).is_ok_and(|t| t.matches("tg: ready").count() >= n)
        })
    };
    ready(1);
    let pid = vm.pid();
    let mut seen = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        let comm = comm.trim().to_string();
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .trim()
                .to_string()
        };
        let (mode, filters) = (field("Seccomp:"), field("Seccomp_filters:"));
        if comm.starts_with("kvm-") {
            // KVM's own kernel worker (kvm-nx-lpage-recovery), counted as a task of ours; it
            // makes no system calls.
            continue;
        }
        let want = match comm.as_str() {
            c if c.starts_with("vcpu") => ("2", "2"),
            "chardevd-superv" | "blockd-client" | "migrated-client" => ("0", "0"),
            _ => ("2", "1"),
        };
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            want,
            "thread {comm} ({tid}): Seccomp, Seccomp_filters"
        );
        *seen.entry(comm).or_insert(0) += 1;
    }
    for role in [
        "vmm-core",
        "api",
        "signals",
        "console-in",
        "chardevd-stderr",
        "blockd-stderr",
    ] {
        assert!(seen.contains_key(role), "no {role} thread in {seen:?}");
    }
    assert_eq!(seen.get("vcpu0"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("vcpu1"), Some(&1), "{seen:?}");
    // A reboot builds the VM again under the main thread's filter (the kernel and initramfs
    // are read through descriptors opened at start-up), and the API still serves.
    let (code, _, err) = vmmctl(&sock, &["reboot"]);
    assert_eq!(code, 0, "{err}");
    ready(2);
    let (code, out, _) = vmmctl(&sock, &["info"]);
    assert_eq!(code, 0);
    assert!(out.contains("running"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("boots:") && l.ends_with(" 2")),
        "{out}"
    );
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
    assert!(
        !vm.stderr().contains("forbidden system call"),
        "{}",
        vm.stderr()
    );
}

/// Every process under `pid`, children first found first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = children_of(pid);
    while let Some(p) = todo.pop() {
        todo.extend(children_of(p));
        out.push(p);
    }
    out
}

/// Whether a process runs no more: gone, or a zombie (ours to reap: the test is their
/// subreaper).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Kills (by PID) and reaps the processes a failed test left behind: our vmm-core's helpers,
/// reparented to this test (their subreaper).
struct Leftovers(Vec<u32>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for &p in &self.0 {
            if !gone(p) {
                // SAFETY: kill on a helper our own vmm-core started (found under its PID); a
                // stopped one ends too.
                unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
            }
            // SAFETY: waitpid on one PID reaps it if it is our child (it has been killed, so
            // this returns), and fails at once if it is not.
            unsafe { libc::waitpid(p as libc::pid_t, std::ptr::null_mut(), 0) };
        }
    }
}

/// A vmm-core killed by SIGKILL (it cleans nothing up) leaves no helper behind: chardevd,
/// blockd and migrated, and the sandboxed process each forked, all die with it, sandboxed or
/// not. Each helper is stopped (SIGSTOP) first, so that none can end by itself when its
/// control connection closes: only the parent-death signal (SIGKILL) can end them. (The test
/// is the helpers' subreaper and vmm-core has a process group of its own, so the stopped
/// helpers' group is not orphaned, which would have the kernel send them SIGHUP.)
#[test]
fn helpers_die_when_vmm_core_is_killed() {
    // SAFETY: prctl only marks this (test) process as a subreaper.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    for sandbox in [true, false] {
        let dir = vmm_tests::TempDir::new("helpers-die");
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let mut b = TestVm::builder()
            .cmdline("tg.scenario=echo")
            .own_process_group()
            .args(["--disk", &format!("path={}", img.display())]);
        if !sandbox {
            b = b.arg("--no-sandbox");
        }
        let mut vm = b.spawn();
        vm.wait_for("tg: ready", T);
        let mut helpers = Vec::new();
        wait_until(T, "chardevd, blockd and migrated", || {
            helpers = descendants(vm.pid());
            let names: Vec<String> = helpers.iter().map(|&p| process_name(p)).collect();
            ["chardevd", "blockd", "migrated"]
                .iter()
                .all(|h| names.iter().filter(|n| n == h).count() == if sandbox { 2 } else { 1 })
        });
        let _leftovers = Leftovers(helpers.clone());
        for &p in &helpers {
            // SAFETY: SIGSTOP to a helper our vmm-core started (found under its PID).
            assert_eq!(unsafe { libc::kill(p as libc::pid_t, libc::SIGSTOP) }, 0);
        }
        vm.signal(libc::SIGKILL);
        assert_eq!(vm.wait_exit(T), 128 + libc::SIGKILL);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && !helpers.iter().all(|&p| gone(p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left: Vec<String> = helpers
            .iter()
            .filter(|&&p| !gone(p))
            .map(|&p| format!("{} (pid {p})", process_name(p)))
            .collect();
        assert!(
            left.is_empty(),
            "sandbox {sandbox}: still running 10 s after vmm-core was killed: {left:?}"
        );
    }
}

/// Every binary answers the same `--print-seccomp` flag with its allowlist: a header that
/// counts the distinct system calls, then a call a line with its reason, the counted ones
/// really listed, and calls each binary must have (and one none may have) where expected.
#[test]
fn every_binary_prints_its_seccomp_allowlist_with_the_same_flag() {
    for (name, must) in [
        ("vmm-core", "ioctl"),
        ("blockd", "io_uring_enter"),
        ("chardevd", "read"),
        ("migrated", "pwrite64"),
    ] {
        let out = std::process::Command::new(vmm_core_bin().with_file_name(name))
            .arg("--print-seccomp")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{name} --print-seccomp: {out:?}");
        // vmm-core lists one allowlist per thread role, each under its own header.
        let mut lists = 0;
        for block in text.split("# ").filter(|b| !b.trim().is_empty()) {
            let (header, rest) = block.split_once('\n').unwrap_or((block, ""));
            let count: usize = header
                .split(" system calls allowed")
                .next()
                .and_then(|h| h.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{name}: no count in {header:?}"));
            let mut calls: Vec<&str> = rest
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            calls.dedup();
            assert_eq!(calls.len(), count, "{name}: {header}\n{rest}");
            assert!(!calls.contains(&"ptrace"), "{name} allows ptrace");
            lists += 1;
        }
        assert!(lists >= 1, "{name}: {text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(must)),
            "{name} does not list {must}:\n{text}"
        );
    }
}
