//! vCPU hot-add and hot-remove through ACPI CPU hotplug, driven by `vmmctl cpus set`: the test
//! guest speaks the hotplug controller's registers directly (what Linux's ACPI methods do),
//! starts added CPUs with INIT/SIPI and ejects removed ones, with a CPU-bound load running
//! all the while. Removed vCPUs' KVM fds are parked and reused.

use std::time::{Duration, Instant};
use vmm_tests::{socket_path, user_work_reference, vmmctl, wait_until, TestVm};

const T: Duration = Duration::from_secs(60);
/// The load's chunk, in user_work iterations.
const CHUNK: u64 = 100_000;

/// Complete console lines that start with `what`.
fn count(vm: &TestVm, what: &str) -> usize {
    let out = vm.stdout();
    let done = out.rsplit_once('\n').map_or("", |(d, _)| d);
    done.lines().filter(|l| l.starts_with(what)).count()
}

/// `vmmctl --json cpus`: (id, state, reuses) for each vCPU, and KVM_CREATE_VCPU calls.
fn cpus(sock: &std::path::Path) -> (Vec<(u32, String, u32)>, u32) {
    let (code, out, err) = vmmctl(sock, &["--json", "cpus"]);
    assert_eq!(code, 0, "{err}");
    let num = |s: &str, key: &str| -> u32 {
        s.split(key)
            .nth(1)
            .unwrap()
            .split([',', '}'])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let list = out
        .split("\"cpus\":[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let cpus = list
        .split("},")
        .map(|c| {
            let state = c
                .split("\"state\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            (num(c, "\"id\":"), state.to_string(), num(c, "\"reuses\":"))
        })
        .collect();
    (cpus, num(&out, "\"created\":"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn twenty_add_remove_cycles_reuse_parked_vcpus_under_load() {
    let sock = socket_path("hotplug");
    let mut vm = TestVm::builder()
        .cpus("1,max=4")
        .cmdline(&format!("tg.scenario=hotplug tg.chunk={CHUNK}"))
        .args(["--api-socket", sock.to_str().unwrap()])
        .stdin_piped()
        .spawn();
    vm.wait_for("tg: hotplug max=4 online=1", T);
    let (mut to_online, mut to_removed) = (Vec::new(), Vec::new());
    for cycle in 1..=20usize {
        let t0 = Instant::now();
        let (code, out, err) = vmmctl(&sock, &["cpus", "set", "4"]);
        assert_eq!(code, 0, "cycle {cycle}: {out}{err}");
        wait_until(T, "three CPUs added and started", || {
            count(&vm, "tg: cpu added") == 3 * cycle
        });
        to_online.push(t0.elapsed());
        let out = vm.stdout();
        let adds: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("tg: cpu added"))
            .collect();
        assert!(adds.iter().all(|l| l.contains("started=1")), "{out}");
        assert!(adds.last().unwrap().ends_with("online=4"), "{out}");
        if cycle == 1 {
            let (list, created) = cpus(&sock);
            assert_eq!(created, 4, "the boot vCPU and three new ones");
            assert!(list.iter().all(|c| c.1 == "running"), "{list:?}");
        }

        let t0 = Instant::now();
        let (code, out, err) = vmmctl(&sock, &["cpus", "set", "1"]);
        assert_eq!(code, 0, "cycle {cycle}: {out}{err}");
        wait_until(T, "three CPUs removed", || {
            count(&vm, "tg: cpu removed") == 3 * cycle
        });
        to_removed.push(t0.elapsed());
        let out = vm.stdout();
        let removes: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("tg: cpu removed"))
            .collect();
        assert!(removes.iter().all(|l| l.contains("gone=1")), "{out}");
        assert!(removes.last().unwrap().ends_with("online=1"), "{out}");
    }
    // KVM_CREATE_VCPU ran once for each vCPU; every later add reused the parked fd.
    let (list, created) = cpus(&sock);
    assert_eq!(created, 4);
    assert_eq!(list[0], (0, "running".to_string(), 0));
    for id in 1..4 {
        assert_eq!(
            list[id as usize],
            (id, "parked".to_string(), 19),
            "{list:?}"
        );
    }
    assert!(vm.stderr().contains("its parked KVM fd reused (time 19)"));
    eprintln!(
        "hotplug: median over 20 cycles: vmmctl cpus set 4 -> 3 CPUs online in the guest {:?}; cpus set 1 -> 3 removed {:?}",
        median(to_online),
        median(to_removed)
    );

    // The load ran all the while, and every chunk computed the right value.
    vm.write_stdin(b"q");
    let line = vm.wait_for("tg: load chunks=", T);
    let field = |k: &str| {
        line.split(k)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let chunks: u64 = field("chunks=").parse().unwrap();
    assert!(chunks > 20, "{line}");
    let sum = u64::from_str_radix(field("sum=").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        sum,
        user_work_reference(CHUNK).wrapping_mul(chunks),
        "{line}"
    );
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn refusals_name_the_limit_and_the_vm_keeps_running() {
    let sock = socket_path("hotplug-refusals");
    let mut vm = TestVm::builder()
        .cpus("1,max=2")
        .cmdline("tg.scenario=hotplug tg.eject=refuse")
        .args(["--api-socket", sock.to_str().unwrap()])
        .stdin_piped()
        .spawn();
    vm.wait_for("tg: hotplug max=2 online=1", T);

    let (code, _, err) = vmmctl(&sock, &["cpus", "set", "3"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: cpus set: cannot have 3 vCPUs: this VM's maximum is 2 (start it with --cpus N,max=M to allow more)\n"
    );
    let (code, _, err) = vmmctl(&sock, &["cpus", "set", "2", "--timeout", "0"]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "error: --timeout 0: give seconds above 0, up to 3600\n"
    );
    let (code, _, err) = vmmctl(&sock, &["cpus", "set", "0"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: cpus set: cannot remove vCPU 0, the boot CPU: at least 1 vCPU stays online\n"
    );

    // This guest takes a CPU but never ejects one: the removal times out and the vCPU runs on.
    assert_eq!(vmmctl(&sock, &["cpus", "set", "2"]).0, 0);
    vm.wait_for("tg: cpu added apic=1 started=1 online=2", T);
    let (code, _, err) = vmmctl(&sock, &["cpus", "set", "1", "--timeout", "1"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: cpus set: vCPU 1: the guest did not eject it within 1000 ms, so it keeps running (is the CPU offline in the guest, and does it support CPU hot-remove?)\n"
    );
    vm.wait_for("tg: cpu eject refused apic=1", T);
    let (list, created) = cpus(&sock);
    assert_eq!(list[1].1, "running");
    assert_eq!(created, 2);
    let (_, info, _) = vmmctl(&sock, &["info"]);
    assert!(info.contains("vCPUs:    2 online, 2 max"), "{info}");

    // The VM is unharmed: its load finishes with the right result.
    vm.write_stdin(b"q");
    let line = vm.wait_for("tg: load chunks=", T);
    assert!(line.contains("iterations=200000"), "{line}");
    assert_eq!(vm.wait_exit(T), 0);
}
