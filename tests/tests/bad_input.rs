//! Every bad input gives one line on stderr that names the input, and exit status 2, before
//! any guest runs.

use std::process::Command;
use vmm_tests::{require_kvm, test_guest, vmm_core_bin};

/// Runs `vmm-core run ARGS` and returns (status, the single error line).
fn run_bad(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(vmm_core_bin())
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vmm-core");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors: Vec<&str> = stderr
        .lines()
        // vmm-core's log, and its helpers' notes (a disk's blockd, migrated and chardevd
        // start before a setting vmm-core refuses can be known).
        .filter(|l| {
            // Log lines carry the time in front (2026-12-06T23:55:41.123Z ).
            let l = match l.split_once("Z ") {
                Some((t, rest)) if t.len() == 23 && t.as_bytes()[10] == b'T' => rest,
                _ => l,
            };
            !l.starts_with("vmm-core: ")
                && !l.starts_with("blockd: info: ")
                && !l.starts_with("migrated: info: ")
                && !l.starts_with("chardevd: info: ")
        })
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line expected, got:\n{stderr}"
    );
    assert!(errors[0].starts_with("error: "), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "no guest output expected: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.code().unwrap_or(-1), errors[0].to_string())
}

fn guest() -> String {
    test_guest().display().to_string()
}

fn expect(args: &[&str], wanted: &[&str]) {
    let (code, line) = run_bad(args, &[]);
    assert_eq!(code, 2, "{line}");
    for w in wanted {
        assert!(line.contains(w), "{line:?} should mention {w:?}");
    }
}

#[test]
fn missing_kernel() {
    expect(
        &["--kernel", "/nonexistent/vmlinuz"],
        &["--kernel /nonexistent/vmlinuz", "no such file"],
    );
}

#[test]
fn kernel_that_is_neither_bzimage_nor_elf() {
    let dir = tempdir();
    let f = dir.join("junk");
    std::fs::write(&f, vec![0x42u8; 8192]).unwrap();
    expect(
        &["--kernel", f.to_str().unwrap()],
        &["neither a bzImage nor an ELF"],
    );
    drop(dir);
}

#[test]
fn kernel_elf_for_another_machine() {
    let dir = tempdir();
    let f = dir.join("aarch64.elf");
    let mut elf = std::fs::read(test_guest()).unwrap();
    elf[18] = 183; // EM_AARCH64
    elf[19] = 0;
    std::fs::write(&f, elf).unwrap();
    expect(
        &["--kernel", f.to_str().unwrap()],
        &["e_machine 183", "x86_64"],
    );
    drop(dir);
}

#[test]
fn truncated_kernels() {
    require_kvm();
    let dir = tempdir();
    // An ELF cut off inside its program headers.
    let elf = dir.join("short.elf");
    std::fs::write(&elf, &std::fs::read(test_guest()).unwrap()[..100]).unwrap();
    // A bzImage header with nothing after it.
    let bz = dir.join("short.bzimage");
    let mut header = vec![0u8; 0x400];
    header[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&bz, header).unwrap();
    for k in [&elf, &bz] {
        let (code, line) = run_bad(&["--kernel", k.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{line}");
        assert!(
            line.contains(&format!("--kernel {}: cannot load it", k.display())),
            "{line}"
        );
    }
    drop(dir);
}

#[test]
fn initramfs_larger_than_guest_ram() {
    require_kvm();
    let dir = tempdir();
    let initrd = dir.join("big.cpio");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (code, line) = run_bad(
        &[
            "--kernel",
            &guest(),
            "--memory",
            "32M",
            "--initramfs",
            initrd.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("--initramfs") && line.contains("more --memory"),
        "{line}"
    );
    drop(dir);
}

#[test]
fn missing_initramfs() {
    expect(
        &["--kernel", &guest(), "--initramfs", "/nonexistent/initrd"],
        &["--initramfs /nonexistent/initrd", "no such file"],
    );
}

#[test]
fn malformed_memory() {
    expect(
        &["--kernel", &guest(), "--memory", "lots"],
        &["--memory lots", "not a size"],
    );
}

#[test]
fn too_little_memory() {
    expect(
        &["--kernel", &guest(), "--memory", "1M"],
        &["--memory 1M", "too small"],
    );
}

#[test]
fn more_memory_than_the_host_has() {
    expect(
        &["--kernel", &guest(), "--memory", "64T"],
        &["--memory 64T", "more than this host's"],
    );
}

#[test]
fn zero_cpus() {
    expect(
        &["--kernel", &guest(), "--cpus", "0"],
        &["--cpus 0", "at least one vCPU"],
    );
}

#[test]
fn cpus_above_the_kvm_limit() {
    require_kvm();
    expect(
        &["--kernel", &guest(), "--cpus", "5000"],
        &["--cpus 5000", "KVM limit of", "KVM_CAP_MAX_VCPUS"],
    );
}

#[test]
fn max_cpus_above_the_kvm_limit() {
    require_kvm();
    expect(
        &["--kernel", &guest(), "--cpus", "1,max=100000"],
        &["--cpus 1,max=100000", "KVM_CAP_MAX_VCPUS"],
    );
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(3000);
    expect(
        &["--kernel", &guest(), "--cmdline", &long],
        &[
            "--cmdline",
            "bytes with the terminating NUL",
            "at most 2048",
        ],
    );
}

#[test]
fn missing_kvm_capability() {
    require_kvm();
    let (code, line) = run_bad(
        &["--kernel", &guest()],
        &[("VMM_FAULT_HIDE_KVM_CAPS", "KVM_CAP_IRQFD")],
    );
    assert_eq!(code, 2);
    assert!(
        line.contains("/dev/kvm") && line.contains("KVM_CAP_IRQFD"),
        "{line}"
    );
}

/// /dev/kvm absent: vmm-core in a mount namespace whose /dev is an empty tmpfs.
#[test]
fn dev_kvm_missing() {
    require_kvm();
    let script = format!(
        "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && exec {} run --kernel {}",
        vmm_core_bin().display(),
        guest()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: /dev/kvm: no such device"),
        "{stderr}"
    );
}

/// /dev/kvm not permitted: an unprivileged uid, with a kernel it can read.
#[test]
fn dev_kvm_not_permitted() {
    require_kvm();
    let dir = tempdir();
    let kernel = dir.join("guest.elf");
    std::fs::copy(test_guest(), &kernel).unwrap();
    let bin = dir.join("vmm-core");
    std::fs::copy(vmm_core_bin(), &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setpriv (util-linux) must be installed");
    drop(dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: /dev/kvm: permission denied"),
        "{stderr}"
    );
}

/// A world-readable temporary directory, unique per test (each test removes its own).
/// A directory of its own for one test, removed when it ends, passed or failed.
fn tempdir() -> vmm_tests::TempDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    vmm_tests::TempDir::new(&format!("bad-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

#[test]
fn disk_that_cannot_be_opened() {
    expect(
        &[
            "--kernel",
            &guest(),
            "--disk",
            "path=/nonexistent/dir/disk.img",
        ],
        &[
            "--disk path=/nonexistent/dir/disk.img",
            "cannot open it",
            "readonly=on",
        ],
    );
}

/// A throttle blockd refuses (QEMU's rules) stops the start, naming the disk and the rule.
#[test]
fn a_throttle_blockd_refuses() {
    let dir = vmm_tests::TempDir::new("bad-throttle");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("path={},throttle.iops-max=5", img.display());
    expect(
        &["--kernel", &guest(), "--disk", &spec],
        &[
            "disk0: blockd refused its throttle iops-max=5",
            "iops-max=5 needs iops (the average rate) set too",
        ],
    );
}

#[test]
fn malformed_disk_specs() {
    for (spec, wanted) in [
        ("path=/x.img,queues=0", "queues=0"),
        ("path=/x.img,queues=99", "from 1 to 16"),
        ("path=/x.img,readonly=perhaps", "readonly=on or off"),
        ("/x.img", "not key=value"),
        ("readonly=on", "no path= or socket="),
        ("path=/x.img,size=1G", "unknown or empty key \"size\""),
        ("path=/x.img,werror=retry", "werror=retry: write report"),
        (
            "path=/x.img,throttle.iops=fast",
            "throttle.iops=fast: give a whole number",
        ),
        (
            "path=/x.img,throttle.iopz=5",
            "throttle.iopz: no such limit",
        ),
        (
            "socket=/x.sock,throttle.iops=5",
            "a socket= backend throttles by itself",
        ),
    ] {
        expect(
            &["--kernel", &guest(), "--disk", spec],
            &[&format!("--disk {spec}"), wanted],
        );
    }
}

#[test]
fn migration_channels_and_tls_options() {
    expect(
        &["--kernel", &guest(), "--incoming", "fd:5"],
        &["--incoming fd:5", "not one vmm-core inherited"],
    );
    // TLS is for taking a VM in.
    expect(
        &["--kernel", &guest(), "--tls-creds", "/tmp"],
        &["--incoming"],
    );
    expect(
        &["--kernel", &guest(), "--tls-authz", "CN=x"],
        &["--tls-creds"],
    );
    expect(
        &[
            "--kernel",
            &guest(),
            "--incoming",
            "tcp:127.0.0.1:1",
            "--tls-creds",
            "/nonexistent",
        ],
        &["tls-creds /nonexistent: not a directory"],
    );
}
