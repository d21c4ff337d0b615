//! Running under systemd: the unit files in systemd/ pass `systemd-analyze verify`, and
//! vmm-core and chardevd speak sd_notify (READY=1 once they serve, STOPPING=1 on the way out),
//! with chardevd stopping cleanly on SIGTERM. (Socket activation: tests/chardevd.rs.)

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use vmm_tests::{vmm_core_bin, wait_until, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);

fn notify_socket(tmp: &TempDir) -> (UnixDatagram, String) {
    let path = tmp.join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    (sock, path.display().to_string())
}

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let tmp = TempDir::new("units");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let bin_dir = vmm_core_bin().parent().unwrap().display().to_string();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // An instance of each template (VM "vm1"), run from the build's binaries.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin", &bin_dir);
        let instance = tmp.join(&name.replace("@.", "@vm1."));
        std::fs::write(&instance, text).unwrap();
        files.push(instance);
    }
    files.sort();
    assert_eq!(files.len(), 7, "{files:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .expect("systemd-analyze (Debian's systemd package) must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify:\n{text}");
    // Only complaints about the host outside the units (no systemd running here) may remain.
    let unit_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("vm1.") || l.contains("vmm"))
        .collect();
    assert!(unit_lines.is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn chardevd_reports_ready_and_stops_cleanly_on_sigterm() {
    let tmp = TempDir::new("notify-chardevd");
    let (notify, notify_path) = notify_socket(&tmp);
    let listen = tmp.join("chardevd.sock");
    let console = tmp.join("console.sock");
    let mut chardevd = Command::new(vmm_core_bin().with_file_name("chardevd"))
        .arg("--listen")
        .arg(&listen)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(next(&notify), "READY=1");
    // Ready means serving: a VM uses it at once.
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--chardevd-socket", listen.to_str().unwrap()])
        .args(["--serial", &format!("unix={}", console.display())])
        .spawn();
    // vmm-core makes the console's socket itself; wait until it has connected to chardevd.
    wait_until(T, "vmm-core connected", || {
        vm.stderr().contains("connected to chardevd at")
    });
    assert!(console.exists());

    // SAFETY: kill on the PID of our own child, not yet reaped.
    unsafe { libc::kill(chardevd.id() as libc::pid_t, libc::SIGTERM) };
    let status = chardevd.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a clean stop exits 0");
    assert_eq!(next(&notify), "STOPPING=1");
    // The sandboxed chardevd cannot reach its socket's path to remove it, nor can its
    // jail's unprivileged waiting parent: the file stays, dead, until the next start.
    let refused = std::os::unix::net::UnixStream::connect(&listen).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // The VM runs on, trying to reconnect; the console's socket is vmm-core's and stays.
    wait_until(T, "vmm-core to notice", || {
        vm.stderr().contains("lost chardevd")
    });
    assert!(console.exists());
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T), 143);
    assert!(!console.exists(), "vmm-core removes it as it exits");
}

/// migrated as systemd runs it (migrated@.service): it listens, says READY=1, serves the
/// vmm-core that connects (a snapshot goes through it), stops cleanly on SIGTERM, and the
/// vmm-core reconnects to the next one on the same socket, as after systemd's restart.
#[test]
fn migrated_serves_a_socket_reports_ready_and_vmm_core_reconnects_after_it_stops() {
    let tmp = TempDir::new("notify-migrated");
    let (notify, notify_path) = notify_socket(&tmp);
    let listen = tmp.join("migrated.sock");
    let start = || {
        Command::new(vmm_core_bin().with_file_name("migrated"))
            .args(["serve", "--listen"])
            .arg(&listen)
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut migrated = start();
    assert_eq!(next(&notify), "READY=1");
    let api = tmp.join("api.sock");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--migrated-socket", listen.to_str().unwrap()])
        .args(["--api-socket", api.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    assert!(
        vm.stderr().contains("connected to migrated at"),
        "{}",
        vm.stderr()
    );
    let snapshot = |name: &str| {
        let file = tmp.join(name);
        let (code, out, err) =
            vmm_tests::vmmctl(&api, &["snapshot", &format!("file:{}", file.display())]);
        assert_eq!(code, 0, "{out}{err}\n{}", vm.stderr());
        assert!(std::fs::metadata(&file).unwrap().len() > 0);
    };
    snapshot("one.snap");

    // SAFETY: kill on the PID of our own child, not yet reaped.
    unsafe { libc::kill(migrated.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(
        migrated.wait().unwrap().code(),
        Some(0),
        "a clean stop exits 0"
    );
    assert_eq!(next(&notify), "STOPPING=1");
    wait_until(T, "vmm-core to notice", || {
        vm.stderr().contains("lost migrated")
    });
    // The next one on the same socket (systemd's restart; the dead socket file the sandboxed
    // one left is replaced): vmm-core connects again.
    let mut again = start();
    assert_eq!(next(&notify), "READY=1");
    wait_until(T, "vmm-core to reconnect", || {
        vm.stderr().contains("migrated: connected again")
    });
    snapshot("two.snap");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T), 143);
    // SAFETY: as above.
    unsafe { libc::kill(again.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(again.wait().unwrap().code(), Some(0));
}

#[test]
fn vmm_core_reports_ready_once_the_guest_runs() {
    let tmp = TempDir::new("notify-vmm");
    let (notify, notify_path) = notify_socket(&tmp);
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .env("NOTIFY_SOCKET", notify_path)
        .spawn();
    assert_eq!(next(&notify), "READY=1");
    vm.wait_for("tg: ready", T);
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T), 143);
    assert_eq!(next(&notify), "STOPPING=1");
}
