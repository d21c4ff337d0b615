//! One logging story in every process: the same level words, one level (VMM_LOG or
//! vmm-core's --log-level) that vmm-core passes to its helpers, the UTC time in front of each
//! line when stderr is not journald (the priority in front under journald: tests/systemd.rs),
//! and an unknown level word said, not silently taken as info.

use std::time::Duration;
use vmm_tests::{vmmctl, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);

/// Runs a VM with a disk and a snapshot (so that vmm-core, blockd, chardevd and migrated all
/// have something to say), with `env` and `args`; returns its stderr.
fn run(name: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let dir = TempDir::new(name);
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("api.sock");
    let mut b = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .memory("64M")
        .args(["--disk", &format!("path={}", img.display())])
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(args.iter().copied());
    for (k, v) in env {
        b = b.env(k, *v);
    }
    let mut vm = b.spawn();
    vm.wait_for("tg: ready", T);
    let snap = format!("file:{}", dir.join("snap").display());
    assert_eq!(vmmctl(&sock, &["snapshot", &snap]).0, 0);
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
    vm.stderr()
}

#[test]
fn one_level_for_every_process_and_the_time_in_front() {
    let all = run("log-info", &[], &[]);
    for who in ["vmm-core", "blockd", "chardevd", "migrated"] {
        assert!(all.contains(&format!("{who}: info: ")), "{who}:\n{all}");
    }
    // Every line of the log has the time in front: 2026-12-06T23:55:41.123Z vmm-core: ...
    for line in all.lines().filter(|l| l.contains(": info: ")) {
        let (time, rest) = line.split_once("Z ").unwrap_or_else(|| panic!("{line}"));
        assert_eq!(time.len(), 23, "{line}");
        assert_eq!(&time[10..11], "T", "{line}");
        assert!(time[..4].parse::<u32>().is_ok_and(|y| y >= 2024), "{line}");
        assert!(!rest.is_empty());
        assert!(!line.ends_with('\r'), "no \\r\\n off a terminal: {line:?}");
    }
    for (name, env, args) in [
        ("log-warn-env", &[("VMM_LOG", "warn")][..], &[][..]),
        ("log-warn-flag", &[], &["--log-level", "warn"][..]),
    ] {
        let quiet = run(name, env, args);
        let info: Vec<&str> = quiet.lines().filter(|l| l.contains(": info: ")).collect();
        assert!(
            info.is_empty(),
            "{name}: info lines at warn:\n{}",
            info.join("\n")
        );
    }
    let said = run("log-verbose", &[("VMM_LOG", "verbose")], &[]);
    assert!(
        said.contains("vmm-core: warn: VMM_LOG=verbose is not a log level; using info"),
        "{said}"
    );
    assert!(said.contains("blockd: info: "), "info it is:\n{said}");
}
