//! Running under systemd: the unit files in systemd/ pass `systemd-analyze verify` and run a
//! VM under a real systemd (booted by systemd-nspawn in a container); vmm-core and the helpers
//! speak sd_notify (READY=1 once they serve, STOPPING=1 on the way out), with chardevd and
//! migrated stopping cleanly on SIGTERM. (Socket activation by hand: tests/chardevd.rs.)

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
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
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
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
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
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
    assert_eq!(next(&notify), "STOPPING=1");
}

/// A container whose PID 1 is a real systemd, booted by systemd-nspawn (Debian's
/// systemd-container) on a volatile copy of this host's root, with /dev/kvm, the build's
/// binaries (read-only, at /opt/vmm/bin) and a directory of the test's (at /var/lib/vmm).
/// Powered off and reaped when dropped.
struct Container {
    nspawn: std::process::Child,
    systemd: u32,
}

impl Container {
    fn boot(images: &Path) -> Container {
        let name = format!("vmmt{}", std::process::id());
        let bin = vmm_core_bin().parent().unwrap().display().to_string();
        let nspawn = Command::new("systemd-nspawn")
            .args(["-D", "/", "--volatile=yes", "--register=no", "--keep-unit"])
            .args(["--bind=/dev/kvm", &format!("--bind-ro={bin}:/opt/vmm/bin")])
            .arg(format!("--bind={}:/var/lib/vmm", images.display()))
            .args(["-M", &name, "-b", "systemd.firstboot=off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (Debian's systemd-container) must be installed; scripts/setup.sh does");
        let mut c = Container { nspawn, systemd: 0 };
        let pid = c.nspawn.id();
        wait_until(T, "the container's systemd", || {
            c.systemd = vmm_tests::children_of(pid)
                .into_iter()
                .find(|&p| vmm_tests::process_name(p) == "systemd")
                .unwrap_or(0);
            c.systemd != 0
        });
        wait_until(T, "the container's systemd to finish booting", || {
            let (_, state) = c.run(&["systemctl", "is-system-running"]);
            matches!(state.trim(), "running" | "degraded")
        });
        c
    }

    /// A path inside the container, from here.
    fn path(&self, inside: &str) -> std::path::PathBuf {
        Path::new(&format!("/proc/{}/root", self.systemd)).join(inside.trim_start_matches('/'))
    }

    /// Runs a command in the container's namespaces: its exit code and output.
    fn run(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.systemd.to_string(),
                "-m",
                "-u",
                "-i",
                "-n",
                "-p",
            ])
            .args(args)
            .output()
            .expect("nsenter (util-linux) must be installed");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// `systemctl show -p KEY --value UNIT`.
    fn show(&self, unit: &str, key: &str) -> String {
        self.run(&["systemctl", "show", "-p", key, "--value", unit])
            .1
            .trim()
            .to_string()
    }

    fn journal(&self, unit: &str) -> String {
        self.run(&["journalctl", "-u", unit, "-o", "cat", "--no-pager"])
            .1
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks systemd-nspawn to power the container off.
        // SAFETY: kill on the PID of our own child, not yet reaped.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The units in systemd/, started by a real systemd: `systemctl start vmm-core@vm1` brings up
/// the helpers' sockets, socket activation starts blockd, chardevd and migrated on vmm-core's
/// first connections, and READY=1 (start returning) comes once vmm-core is connected to all
/// three and the guest runs. The VM's settings come from /etc/vmm/vm1.toml, its image from
/// /var/lib/vmm/vm1 and its console goes to /var/log/vmm/vm1 (ProtectSystem=strict leaves
/// those writable). `systemctl kill -s KILL blockd@vm1` while the guest writes: systemd
/// restarts blockd, vmm-core adds the disk again, and every write the guest saw acknowledged
/// is in the image when it powers off, after which the unit is inactive, not failed.
#[test]
fn the_units_run_a_vm_under_a_real_systemd() {
    const COUNT: u64 = 3000;
    vmm_tests::require_kvm();
    let images = TempDir::new("nspawn");
    std::fs::copy(vmm_tests::test_guest(), images.join("guest.elf")).unwrap();
    std::fs::create_dir(images.join("vm1")).unwrap();
    let img = images.join("vm1/disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let c = Container::boot(&images.join(""));

    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin", "/opt/vmm/bin");
        let to = c
            .path("/etc/systemd/system")
            .join(path.file_name().unwrap());
        std::fs::write(to, text).unwrap();
    }
    std::fs::create_dir_all(c.path("/etc/vmm")).unwrap();
    std::fs::write(
        c.path("/etc/vmm/vm1.toml"),
        format!(
            "kernel = \"/var/lib/vmm/guest.elf\"\nmemory = \"128M\"\n\
             cmdline = \"console=ttyS0 tg.scenario=blk-seq tg.seq.count={COUNT} tg.seq.depth=8\"\n\
             disk = [\"path=/var/lib/vmm/vm1/disk.img\"]\n\
             serial = \"file=/var/log/vmm/vm1/console.log\"\n"
        ),
    )
    .unwrap();
    assert_eq!(c.run(&["systemctl", "daemon-reload"]).0, 0);
    for unit in [
        "blockd@vm1.service",
        "blockd@vm1.socket",
        "vmm-core@vm1.service",
    ] {
        assert_eq!(
            c.show(unit, "ActiveState"),
            "inactive",
            "{unit} before the start"
        );
    }

    let (code, out) = c.run(&["systemctl", "start", "vmm-core@vm1"]);
    assert_eq!(code, 0, "{out}\n{}", c.journal("vmm-core@vm1"));
    // Started means READY=1: by then vmm-core was connected to every helper, each of which
    // socket activation had started.
    let journal = c.journal("vmm-core@vm1");
    for helper in ["blockd", "chardevd", "migrated"] {
        assert!(
            journal.contains(&format!(
                "connected to {helper} at /run/vmm/vm1/{helper}.sock"
            )),
            "{journal}"
        );
        let unit = format!("{helper}@vm1.service");
        assert_eq!(c.show(&unit, "ActiveState"), "active", "{unit}");
        assert_eq!(c.show(&unit, "TriggeredBy"), format!("{helper}@vm1.socket"));
    }
    let main = c.show("vmm-core@vm1.service", "MainPID");
    assert_eq!(
        std::fs::read_to_string(c.path(&format!("/proc/{main}/comm")))
            .map(|s| s.trim().to_string())
            .ok(),
        Some("vmm-core".to_string()),
        "MainPID {main}"
    );
    let console = c.path("/var/log/vmm/vm1/console.log");
    let text = || std::fs::read_to_string(&console).unwrap_or_default();
    wait_until(T, "the guest's first acknowledged writes", || {
        vmm_tests::seq_acks(&text()).len() >= 50
    });

    let old = c.show("blockd@vm1.service", "MainPID");
    let (code, out) = c.run(&["systemctl", "kill", "-s", "KILL", "blockd@vm1.service"]);
    assert_eq!(code, 0, "{out}");
    let acks_at_kill = vmm_tests::seq_acks(&text()).len();
    wait_until(T, "systemd to restart blockd", || {
        c.show("blockd@vm1.service", "NRestarts") == "1"
            && c.show("blockd@vm1.service", "ActiveState") == "active"
    });
    assert_ne!(c.show("blockd@vm1.service", "MainPID"), old);
    wait_until(T, "vmm-core to add the disk again", || {
        c.journal("vmm-core@vm1")
            .contains("disks reconnected: disk0")
    });
    // journald took each line's priority from its `<N>` prefix (JOURNAL_STREAM): at
    // warning and above, the death and restart of blockd and none of the info lines, of
    // vmm-core or of the helpers' lines it passes on.
    let warnings = c
        .run(&[
            "journalctl",
            "-u",
            "vmm-core@vm1",
            "-p",
            "warning",
            "-o",
            "cat",
            "--no-pager",
        ])
        .1;
    assert!(
        warnings.contains("vmm-core: error: lost blockd"),
        "{warnings}"
    );
    assert!(
        warnings.contains("vmm-core: warn: restarted blockd (restart 1)"),
        "{warnings}"
    );
    assert!(!warnings.contains(": info: "), "{warnings}");
    let infos = c.journal("vmm-core@vm1");
    assert!(
        infos.contains("vmm-core: info: connected to blockd at"),
        "{infos}"
    );
    assert!(
        !infos.contains("<6>"),
        "the prefix is journald's, not the text's: {infos}"
    );
    let blockd = c
        .run(&[
            "journalctl",
            "-u",
            "blockd@vm1",
            "-p",
            "info",
            "-o",
            "cat",
            "--no-pager",
        ])
        .1;
    assert!(
        blockd.contains("blockd: info: "),
        "the helper's own unit: {blockd}"
    );
    wait_until(
        Duration::from_secs(240),
        "the guest to finish and power off",
        || c.show("vmm-core@vm1.service", "ActiveState") != "active",
    );
    let out = text();
    assert_eq!(
        c.show("vmm-core@vm1.service", "ActiveState"),
        "inactive",
        "{}\n{out}",
        c.journal("vmm-core@vm1")
    );
    assert!(
        out.contains(&format!(
            "tg: seq done count={COUNT} depth=8 writeback=0 errors=0 timeouts=0"
        )),
        "{out}"
    );
    assert!(
        acks_at_kill < COUNT as usize,
        "the kill came while the guest wrote ({acks_at_kill} acknowledged)"
    );
    assert_eq!(vmm_tests::check_seq_blocks(&img, &out), COUNT);
}
