//! virtio-rng: vmm-core's vhost-user-rng frontend (`--rng socket=PATH`) with rust-vmm's
//! vhost-device-rng as the backend, and the test guest's virtio-rng driver.

use std::process::{Command, Stdio};
use std::time::Duration;
use vmm_tests::{tool, wait_until, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);

/// FNV-1a, as the test guest digests what it read.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |d, &b| {
        (d ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// vhost-device-rng serves a file of known bytes; the guest reads 96 KiB in 4 KiB requests
/// and its digest is that of the file's first 96 KiB: every byte the guest saw is the one
/// the backend served, in order.
#[test]
fn the_guest_reads_what_vhost_device_rng_serves() {
    let dir = TempDir::new("rng-vdr");
    let source = dir.join("source");
    let bytes: Vec<u8> = (0..1u64 << 20)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    std::fs::write(&source, &bytes).unwrap();
    let sock = dir.join("rng.sock");
    let mut backend = Command::new(tool("vhost-device-rng"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--rng-source")
        .arg(&source)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vhost-device-rng");
    // It suffixes the socket's name with its number (one socket: 0).
    let sock0 = dir.join("rng.sock0");
    wait_until(T, "vhost-device-rng's socket", || sock0.exists());
    let want = 96 << 10;
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=rng tg.rng.bytes={want}"
        ))
        .args(["--rng", &format!("socket={}", sock0.display())])
        .spawn();
    let status = vm.wait_exit(T);
    let _ = backend.kill();
    let _ = backend.wait();
    let out = vm.stdout();
    assert_eq!(status, 0, "{out}\n{}", vm.stderr());
    let line = format!(
        "tg: rng bytes={want} requests=24 fnv={:#x}",
        fnv(&bytes[..want])
    );
    assert!(out.contains(&line), "wanted {line:?}:\n{out}");
    assert!(
        vm.stderr().contains("rng0: virtio-rng at PCI 00:"),
        "{}",
        vm.stderr()
    );
}

/// A malformed --rng, and a socket no backend listens on, get one line each naming the flag,
/// and nothing runs.
#[test]
fn a_bad_rng_spec_or_a_missing_backend_is_refused_in_one_line() {
    let dir = TempDir::new("rng-bad");
    for (spec, wanted) in [
        (
            "file=/dev/urandom",
            "--rng file=/dev/urandom: not an rng backend; write socket=PATH",
        ),
        (
            &*format!("socket={}", dir.join("none.sock").display()),
            "start the vhost-user-rng backend first",
        ),
    ] {
        let mut vm = TestVm::builder()
            .cmdline("console=ttyS0 tg.scenario=rng")
            .args(["--rng", spec])
            .spawn();
        let status = vm.wait_exit(T);
        let err = vm.stderr();
        assert_ne!(status, 0, "{err}");
        assert!(err.contains(wanted), "{spec}: wanted {wanted:?}:\n{err}");
        assert!(
            !vm.stdout().contains("tg: ready"),
            "the guest ran:\n{}",
            vm.stdout()
        );
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "one error line:\n{err}");
    }
}
