//! virtio-rng: chardevd's vhost-user-rng backend (`--rng urandom|file=PATH[,rate=..]`), and
//! vmm-core's frontend with rust-vmm's vhost-device-rng as the backend (`--rng socket=PATH`),
//! read by the test guest's virtio-rng driver.

use std::process::{Command, Stdio};
use std::time::Duration;
use vmm_tests::{process_name, tool, vmmctl, wait_until, TempDir, TestVm};

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
    let (source, bytes) = known_bytes(&dir);
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
    let want: usize = 96 << 10;
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
        "tg: rng bytes={want} requests=24 most=4096 fnv={:#x}",
        fnv(&bytes[..want])
    );
    assert!(out.contains(&line), "wanted {line:?}:\n{out}");
    assert!(
        vm.stderr().contains("rng0: virtio-rng at PCI 00:"),
        "{}",
        vm.stderr()
    );
}

/// A file of known bytes.
fn known_bytes(dir: &TempDir) -> (std::path::PathBuf, Vec<u8>) {
    let source = dir.join("source");
    let bytes: Vec<u8> = (0..1u64 << 20)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    std::fs::write(&source, &bytes).unwrap();
    (source, bytes)
}

/// chardevd serves the guest a file's bytes in order, straight into guest memory, and no
/// request gets more than 64 KiB: the guest asks for 128 KiB at a time.
#[test]
fn chardevd_serves_a_files_bytes_in_order_64_kib_at_most() {
    let dir = TempDir::new("rng-file");
    let (source, bytes) = known_bytes(&dir);
    let want = 512 << 10;
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=rng tg.rng.bytes={want} tg.rng.chunk=131072"
        ))
        .args(["--rng", &format!("file={}", source.display())])
        .spawn();
    let status = vm.wait_exit(T);
    let out = vm.stdout();
    assert_eq!(status, 0, "{out}\n{}", vm.stderr());
    let line = format!(
        "tg: rng bytes={want} requests=8 most=65536 fnv={:#x}",
        fnv(&bytes[..want])
    );
    assert!(out.contains(&line), "wanted {line:?}:\n{out}");
    assert!(
        vm.stderr()
            .contains("rng0: vhost-user-rng, no rate limit, served by chardevd"),
        "{}",
        vm.stderr()
    );
}

/// An entropy daemon on a unix socket, asked in the EGD protocol as QEMU's rng-egd asks it
/// ([0x02, n] for n bytes): the test's own daemon serves known bytes and counts what it was
/// asked; the guest reads them in order.
#[test]
fn chardevd_asks_an_egd_daemon_for_the_guests_bytes() {
    use std::io::{Read, Write};
    let dir = TempDir::new("rng-egd");
    let (_, bytes) = known_bytes(&dir);
    let sock = dir.join("egd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let served = bytes.clone();
    let daemon = std::thread::spawn(move || -> (u64, u64) {
        let (mut c, _) = listener.accept().unwrap();
        let (mut asked, mut sent) = (0u64, 0usize);
        let mut cmd = [0u8; 2];
        while c.read_exact(&mut cmd).is_ok() {
            assert_eq!(cmd[0], 0x02, "not a blocking read command: {cmd:?}");
            let n = usize::from(cmd[1]);
            assert!(n > 0, "a request for 0 bytes");
            if c.write_all(&served[sent..sent + n]).is_err() {
                break;
            }
            sent += n;
            asked += 1;
        }
        (asked, sent as u64)
    });
    let want = 64 << 10;
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=rng tg.rng.bytes={want}"
        ))
        .args(["--rng", &format!("egd={}", sock.display())])
        .spawn();
    let status = vm.wait_exit(T);
    let out = vm.stdout();
    assert_eq!(status, 0, "{out}\n{}", vm.stderr());
    let line = format!(
        "tg: rng bytes={want} requests=16 most=4096 fnv={:#x}",
        fnv(&bytes[..want])
    );
    assert!(out.contains(&line), "wanted {line:?}:\n{out}");
    assert!(
        vm.stderr()
            .contains("rng0: vhost-user-rng, no rate limit, from an EGD daemon"),
        "{}",
        vm.stderr()
    );
    drop(vm);
    let (asked, sent) = daemon.join().unwrap();
    assert_eq!(sent, want as u64);
    // 4 KiB requests, at most 255 bytes a command: 17 commands each.
    assert_eq!(asked, 16 * 17, "{asked} commands for {sent} bytes");
}

/// The host's /dev/urandom by default: two guests read 64 KiB each, and get different bytes.
#[test]
fn urandom_gives_each_guest_bytes_of_its_own() {
    let mut digests = Vec::new();
    for _ in 0..2 {
        let mut vm = TestVm::builder()
            .cmdline("console=ttyS0 tg.scenario=rng tg.rng.bytes=65536")
            .args(["--rng", "urandom"])
            .spawn();
        assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
        let out = vm.stdout();
        let line = out
            .lines()
            .find(|l| l.starts_with("tg: rng bytes=65536 requests=16 most=4096 fnv="))
            .unwrap_or_else(|| panic!("{out}"))
            .to_string();
        digests.push(line);
    }
    assert_ne!(digests[0], digests[1], "two guests read the same bytes");
}

/// rate=64K: after the first burst (64 KiB at once), the guest gets 64 KiB a second; 704 KiB
/// take 10 s within 5%, measured on the host from the guest's first request to its last
/// answer.
#[test]
fn a_rate_limit_of_64_kib_a_second_holds_within_5_percent_over_10_s() {
    let dir = TempDir::new("rng-rate");
    let console = dir.join("console.txt");
    let want = 704 << 10;
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=rng tg.rng.bytes={want} tg.rng.chunk=4096"
        ))
        .args(["--rng", "urandom,rate=64K"])
        .args(["--serial", &format!("file={}", console.display())])
        .spawn();
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    wait_until(T, "the guest's first request", || {
        read().contains("tg: rng start")
    });
    let start = std::time::Instant::now();
    wait_until(T, "the guest's last answer", || {
        read().contains("tg: rng bytes=")
    });
    let took = start.elapsed().as_secs_f64();
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert!(
        read().contains(&format!("tg: rng bytes={want} ")),
        "{}",
        read()
    );
    assert!(
        (9.5..=10.5).contains(&took),
        "{want} bytes at 64 KiB/s after a 64 KiB burst took {took:.2} s, not 10 s within 5%"
    );
}

/// chardevd killed while the guest reads: vmm-core restarts it, the rng device reconnects to
/// the new one on the same socket, and the guest gets every byte it asked for.
#[test]
fn the_rng_survives_chardevd_killed_mid_read() {
    let dir = TempDir::new("rng-kill");
    let console = dir.join("console.txt");
    let want = 3 << 20;
    let mut vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=rng tg.rng.bytes={want}"
        ))
        .args(["--rng", "urandom,rate=1M"])
        .args(["--serial", &format!("file={}", console.display())])
        .spawn();
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    wait_until(T, "the guest's first request", || {
        read().contains("tg: rng start")
    });
    std::thread::sleep(Duration::from_millis(700));
    let helpers: Vec<u32> = vm
        .children()
        .into_iter()
        .filter(|&p| process_name(p) == "chardevd")
        .collect();
    assert_eq!(helpers.len(), 1, "one chardevd: {:?}", vm.children());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helpers[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        !read().contains("tg: rng bytes="),
        "the guest was done before chardevd was killed"
    );
    wait_until(T, "the guest's last answer", || {
        read().contains("tg: rng bytes=")
    });
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let log = vm.stderr();
    assert!(
        log.contains("rng0: reconnected to the restarted chardevd"),
        "{log}"
    );
    assert!(
        read().contains(&format!("tg: rng bytes={want} ")),
        "{}",
        read()
    );
}

/// A snapshot taken while the guest reads (its request in flight) and restored in a new
/// process with no flag but --restore: the restore serves the rng as the snapshot says
/// (urandom, 64 KiB/s), and the guest finishes reading every byte.
#[test]
fn a_restored_guest_finishes_reading_from_the_rng_it_came_with() {
    let dir = TempDir::new("rng-restore");
    let (sock, console) = (dir.join("api.sock"), dir.join("source.txt"));
    let want = 256 << 10;
    let vm = TestVm::builder()
        .cmdline(&format!(
            "console=ttyS0 tg.scenario=rng tg.rng.bytes={want}"
        ))
        .args(["--rng", "urandom,rate=64K"])
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--serial", &format!("file={}", console.display())])
        .spawn();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until(T, "the guest's first request", || {
        read(&console).contains("tg: rng start")
    });
    std::thread::sleep(Duration::from_millis(500));
    let snap = dir.join("snap");
    let (code, out, err) = vmmctl(&sock, &["snapshot", &format!("file:{}", snap.display())]);
    assert_eq!(code, 0, "{out}{err}\n{}", vm.stderr());
    assert!(!read(&console).contains("tg: rng bytes="), "done too soon");
    drop(vm);
    let restored_console = dir.join("restored.txt");
    let mut restored = vmm_tests::TestVm::spawn({
        let mut c = Command::new(vmm_tests::vmm_core_bin());
        c.arg("run")
            .args(["--restore", &format!("file:{}", snap.display())])
            .args(["--serial", &format!("file={}", restored_console.display())]);
        c
    });
    assert_eq!(restored.wait_exit(T), 0, "{}", restored.stderr());
    assert!(
        restored
            .stderr()
            .contains("rng0: vhost-user-rng, 65536 bytes/s, bursts of 65536"),
        "{}",
        restored.stderr()
    );
    assert!(
        read(&restored_console).contains(&format!("tg: rng bytes={want} ")),
        "{}",
        read(&restored_console)
    );
}

/// A malformed --rng, and a socket no backend listens on, get one line each naming the flag,
/// and nothing runs.
#[test]
fn a_bad_rng_spec_or_a_missing_backend_is_refused_in_one_line() {
    let dir = TempDir::new("rng-bad");
    for (spec, wanted) in [
        (
            "random",
            "--rng random: not an entropy source; write urandom, file=PATH or egd=PATH",
        ),
        (
            "urandom,rate=fast",
            "--rng urandom,rate=fast: rate=fast: \"fast\" is not a size",
        ),
        ("urandom,burst=1M", "burst= needs rate="),
        (
            "socket=/x.sock,rate=1K",
            "a socket= backend takes no other key",
        ),
        (
            &*format!("file={}", dir.join("none").display()),
            "No such file or directory",
        ),
        (
            &*format!("socket={}", dir.join("none.sock").display()),
            "start the vhost-user-rng backend first",
        ),
        (
            &*format!("egd={}", dir.join("none.sock").display()),
            "cannot connect to the entropy daemon there (No such file or directory (os error 2)); start it first",
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
