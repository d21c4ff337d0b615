//! The test guest on vmm-core: vCPUs, memory, ACPI tables, CPL3 work, and how a run ends.

use std::time::Duration;
use vmm_tests::{host_is_pvm, user_work_reference, TestVm};

const T: Duration = Duration::from_secs(60);

#[test]
fn one_vcpu_boots_to_ready_and_power_off_exits_0() {
    let mut vm = TestVm::builder().cpus("1").memory("128M").spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let out = vm.stdout();
    assert!(out.contains("tg: poweroff"), "{out}");
    assert!(vm.stderr().contains("guest powered off"), "{}", vm.stderr());
    assert_eq!(vm.field("tg: smp", "online").as_deref(), Some("1"));
}

#[test]
fn four_vcpus_all_report_in() {
    let mut vm = TestVm::builder().cpus("4").memory("128M").spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let out = vm.stdout();
    assert_eq!(vm.field("tg: smp", "online").as_deref(), Some("4"), "{out}");
    let mut apics: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("tg: cpu online"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("apic="))
                .map(String::from)
        })
        .collect();
    apics.sort();
    assert_eq!(
        apics,
        ["1", "2", "3"],
        "each AP reports its own APIC id:\n{out}"
    );
}

fn e820_matches(memory: &str, bytes: u64) {
    let mut vm = TestVm::builder().memory(memory).spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0);
    let total: u64 = vm.field("tg: memory", "total").unwrap().parse().unwrap();
    let usable: u64 = vm.field("tg: memory", "usable").unwrap().parse().unwrap();
    assert_eq!(total, bytes, "e820 entries sum to the RAM given");
    // Only the EBDA/BIOS area below 1 MiB (0x9fc00..0x100000) is not usable RAM.
    assert_eq!(usable, bytes - 0x60400);
    assert_eq!(
        vm.field("tg: memory", "check").as_deref(),
        Some("ok"),
        "{}",
        vm.stdout()
    );
}

#[test]
fn e820_sums_match_128m() {
    e820_matches("128M", 128 << 20);
}

#[test]
fn e820_sums_match_2g() {
    e820_matches("2G", 2 << 30);
}

#[test]
fn e820_sums_match_5g_above_the_hole() {
    let mut vm = TestVm::builder().memory("5G").spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0);
    assert_eq!(
        vm.field("tg: memory", "total").unwrap(),
        (5u64 << 30).to_string()
    );
    assert!(
        vm.stdout()
            .contains("tg: e820 addr=0x100000000 size=0x80000000 type=1"),
        "{}",
        vm.stdout()
    );
}

#[test]
fn madt_lists_max_cpus_and_only_boot_cpus_start() {
    let mut vm = TestVm::builder().cpus("2,max=6").spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0);
    assert_eq!(vm.field("tg: madt", "cpus").as_deref(), Some("6"));
    assert_eq!(vm.field("tg: madt", "enabled").as_deref(), Some("2"));
    assert_eq!(vm.field("tg: smp", "online").as_deref(), Some("2"));
}

#[test]
fn acpi_tables_give_s5_and_hw_reduced_fadt() {
    let mut vm = TestVm::builder().spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0);
    assert_eq!(vm.field("tg: acpi", "fadt").as_deref(), Some("1"));
    assert_eq!(vm.field("tg: acpi", "hw-reduced").as_deref(), Some("1"));
    assert_eq!(vm.field("tg: acpi", "s5").as_deref(), Some("5"));
}

#[test]
fn cpl3_work_matches_the_host_and_cmdline_arrives() {
    let mut vm = TestVm::builder()
        .cmdline("tg.work=1234567 marker=abc")
        .spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0);
    assert!(
        vm.stdout()
            .contains("tg: cmdline=tg.work=1234567 marker=abc"),
        "{}",
        vm.stdout()
    );
    let result = vm.field("tg: user-work", "result").unwrap();
    assert_eq!(result, format!("{:#x}", user_work_reference(1_234_567)));
}

#[test]
fn guest_reset_exits_0_and_says_so() {
    let mut vm = TestVm::builder().cmdline("tg.scenario=reset").spawn();
    vm.wait_for("tg: resetting", T);
    assert_eq!(vm.wait_exit(T), 0);
    assert!(
        vm.stderr().contains("guest requested a reset"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn on_reset_restart_boots_the_guest_again() {
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=reset")
        .args(["--on-reset", "restart"])
        .spawn();
    let deadline = std::time::Instant::now() + T;
    while vm.stdout().matches("tg: hello").count() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no third boot:\n{}",
            vm.stdout()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
    assert!(vm.stderr().contains("restarting it"), "{}", vm.stderr());
}

#[test]
fn guest_panic_exits_3_with_a_message() {
    let mut vm = TestVm::builder().cmdline("tg.scenario=panic").spawn();
    vm.wait_for("tg: panicking", T);
    assert_eq!(vm.wait_exit(T), 3);
    assert!(vm.stderr().contains("guest panicked"), "{}", vm.stderr());
}

/// SIGTERM (`systemctl stop`) presses the ACPI power button: a guest that acts on it powers
/// off and vmm-core exits 0; one that does not is stopped after --stop-timeout (143), or at
/// once on a second SIGTERM; SIGINT stops at once (130).
#[test]
fn sigterm_asks_the_guest_to_power_off_then_stops_it() {
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=wait-powerbutton")
        .spawn();
    vm.wait_for("tg: ready", T);
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert!(vm.stdout().contains("tg: power button"), "{}", vm.stdout());
    let err = vm.stderr();
    assert!(
        err.contains("pressed the ACPI power button on SIGTERM")
            && err.contains("SIGTERM: the guest has 30 s to power off"),
        "{err}"
    );
    assert!(err.contains("guest powered off"), "{err}");

    // A guest that ignores the button: stopped when --stop-timeout runs out.
    let mut vm = TestVm::builder()
        .cpus("2")
        .cmdline("tg.scenario=idle")
        .args(["--stop-timeout", "1"])
        .spawn();
    vm.wait_for("tg: ready", T);
    let sent = std::time::Instant::now();
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T), 143);
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(950), "stopped after {took:?}");
    let err = vm.stderr();
    assert!(
        err.contains("the guest did not power off within 1 s of SIGTERM"),
        "{err}"
    );
    assert!(err.contains("stopped by SIGTERM"), "{err}");

    // A second SIGTERM does not wait for the default 30 s; nor does SIGINT.
    for (signals, status) in [
        (&[libc::SIGTERM, libc::SIGTERM][..], 143),
        (&[libc::SIGINT][..], 130),
    ] {
        let mut vm = TestVm::builder().cmdline("tg.scenario=idle").spawn();
        vm.wait_for("tg: ready", T);
        let sent = std::time::Instant::now();
        for &sig in signals {
            vm.signal(sig);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(vm.wait_exit(T), status, "{}", vm.stderr());
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "{:?}",
            sent.elapsed()
        );
    }
}

#[test]
fn int3_fwait_and_clac_stac_complete_at_cpl0() {
    // On KVM-PVM the VMM completes these; on hardware KVM the CPU does. Either way the guest
    // must see the architectural result.
    let mut vm = TestVm::builder().cmdline("tg.scenario=pvm-fixups").spawn();
    vm.wait_for("tg: ready", T);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert_eq!(
        vm.field("tg: fixups", "int3").as_deref(),
        Some("1"),
        "{}",
        vm.stdout()
    );
    let ac = vm.field("tg: fixups", "stac-clac").unwrap();
    // 2: stac set AC and clac cleared it; 255: the CPU has no SMAP, so nothing to test. The
    // guest sees SMAP where the host has it (KVM passes it through; KVM-PVM shows the host's
    // CPUID as it is), so the host's flags say which answer is right.
    let host_smap = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "smap"));
    assert_eq!(
        ac,
        if host_smap { "2" } else { "255" },
        "stac-clac={ac} with the host's smap flag {host_smap}"
    );
}

#[test]
fn an_instruction_kvm_cannot_emulate_is_reported_with_rip_and_bytes() {
    let mut vm = TestVm::builder().cmdline("tg.scenario=bad-insn").spawn();
    vm.wait_for("tg: executing lock cmpxchg16b", T);
    let code = vm.wait_exit(T);
    if host_is_pvm() {
        assert_eq!(code, 1, "{}", vm.stderr());
        let err = vm.stderr();
        let line = err
            .lines()
            .find(|l| l.starts_with("error: "))
            .expect("an error line");
        assert!(
            line.contains("could not emulate the instruction at RIP 0x"),
            "{line}"
        );
        assert!(line.contains("code: f0 48 0f c7"), "{line}");
        assert!(!vm.stdout().contains("tg: bad-insn executed"));
    } else {
        // Hardware KVM runs it natively.
        assert_eq!(code, 0);
        assert!(vm.stdout().contains("tg: bad-insn executed"));
    }
}
