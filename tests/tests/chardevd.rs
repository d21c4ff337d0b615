//! The serial console served by the chardevd helper: backends, input both ways, and a helper
//! killed in the middle of continuous output.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;
use vmm_tests::{socket_path, vmmctl, wait_until, TestVm};

const T: Duration = Duration::from_secs(60);

/// The tick numbers in a console log, in order.
/// The tick numbers the console holds, each counted only where its line is complete: a line
/// the guest was still writing when the file was read (or the VM stopped) does not count, nor
/// does one cut by a killed chardevd, whose replay then follows on the same line ("tg: tick
/// 1tg: tick 14"): "tg: tick 1" of "tg: tick 15" cannot pass for a tick.
fn ticks(text: &str) -> Vec<u64> {
    text.split("tg: tick ")
        .skip(1)
        .filter_map(|seg| {
            let n = seg.bytes().take_while(u8::is_ascii_digit).count();
            let rest = &seg[n..];
            if rest.starts_with("\r\n") || rest.starts_with('\n') {
                seg[..n].parse().ok()
            } else {
                None
            }
        })
        .collect()
}

fn chardevd_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| {
            l.split("chardevd (pid ")
                .nth(1)?
                .split(')')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn console_output_reaches_a_file_backend() {
    let tmp = vmm_tests::TempDir::new("console-file");
    let file = tmp.join("console.log");
    std::fs::write(&file, "stale contents\n").unwrap();
    let mut vm = TestVm::builder()
        .args(["--serial", &format!("file={}", file.display())])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("stale contents"),
        "the file is truncated when opened"
    );
    assert!(text.starts_with("tg: hello\r\n"), "{text}");
    assert!(
        text.contains("tg: ready\r\n") && text.ends_with("tg: poweroff\r\n"),
        "{text}"
    );
    assert!(
        vm.stdout().is_empty(),
        "nothing on stdout: the console went to chardevd"
    );
}

#[test]
fn kill_9_chardevd_during_output_loses_no_byte() {
    let tmp = vmm_tests::TempDir::new("kill9");
    let file = tmp.join("console.log");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=ticker")
        .args(["--serial", &format!("file={}", file.display())])
        .spawn();
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    wait_until(T, "first ticks", || ticks(&read()).len() >= 5);
    for round in 1..=2 {
        let pid = *chardevd_pids(&vm.stderr())
            .last()
            .expect("chardevd's pid in the log");
        // SAFETY: kill on a helper our own vmm-core started; its pid came from its log.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_until(T, "a restarted chardevd", || {
            chardevd_pids(&vm.stderr()).len() > round
        });
        let before = ticks(&read()).len();
        wait_until(T, "ticks after the restart", || {
            ticks(&read()).len() >= before + 5
        });
    }
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
    let log = vm.stderr();
    assert_eq!(log.matches("chardevd died").count(), 2, "{log}");
    assert_eq!(log.matches("0 bytes lost meanwhile").count(), 2, "{log}");
    // Every tick is there, in order: nothing was lost across two kills. A write chardevd took
    // but did not acknowledge before dying is written again, so a run of lines may appear a
    // second time (e.g. 25 26 25 26): a tick at or below the highest so far is such a replay;
    // any other tick must be the next one.
    let seen = ticks(&read());
    let mut last = 0;
    for &t in &seen {
        if t <= last {
            continue;
        }
        assert_eq!(t, last + 1, "tick {t} came after {last}: lost in {seen:?}");
        last = t;
    }
    assert!(last >= 10, "too few ticks: {seen:?}");
}

#[test]
fn a_line_written_to_a_unix_socket_backend_reaches_the_guest_and_is_echoed() {
    let sock = socket_path("console");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=echo")
        .args(["--serial", &format!("unix={}", sock.display())])
        .spawn();
    wait_until(T, "the console socket", || sock.exists());
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    // Type only once the guest reads its console (before, its UART reset would eat the line).
    while !line.contains("tg: ready") {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the console closed");
    }
    client.write_all(b"ping from the host\r").unwrap();
    while !line.contains("tg: echo") {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the console closed");
    }
    assert_eq!(line.trim_end(), "tg: echo ping from the host");
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
    // vmm-core made the socket (chardevd opens no host path) and removes it as it exits.
    wait_until(T, "the console socket to go", || !sock.exists());
}

#[test]
fn an_unwritable_backend_path_is_refused_before_the_guest_runs() {
    let mut vm = TestVm::builder()
        .args(["--serial", "file=/nonexistent/dir/console.log"])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2);
    let err = vm.stderr();
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert_eq!(
        line,
        "error: --serial file=/nonexistent/dir/console.log: cannot open it (No such file or directory (os error 2)); check that its directory exists and is writable"
    );
    assert!(vm.stdout().is_empty());
}

#[test]
fn a_missing_chardevd_binary_is_named() {
    let mut vm = TestVm::builder()
        .args(["--serial", "null", "--chardevd", "/nonexistent/chardevd"])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2);
    assert!(
        vm.stderr()
            .contains("error: --chardevd /nonexistent/chardevd: cannot start it"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn ring_dump_through_vmmctl_and_its_drop_count_equal_what_is_missing() {
    // The same guest output in full, from a file backend...
    let tmp = vmm_tests::TempDir::new("ring");
    let file = tmp.join("full.log");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--serial", &format!("file={}", file.display())])
        .spawn();
    wait_until(T, "ready in the file", || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains("tg: ready\r\n")
    });
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
    let full = std::fs::read(&file).unwrap();

    // ...and through a 256-byte ring.
    let sock = socket_path("ring");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args([
            "--serial",
            "ring=256",
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .spawn();
    let dump = || {
        let out = std::process::Command::new(vmm_tests::vmmctl_bin())
            .arg("--socket")
            .arg(&sock)
            .args(["console", "--dump"])
            .output()
            .unwrap();
        (
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    wait_until(T, "ready in the ring", || {
        sock.exists() && dump().0.ends_with(b"tg: ready\r\n")
    });
    let (data, err) = dump();
    let dropped: usize = err
        .split("dropped ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drop count in {err:?}"));
    assert_eq!(data.len(), 256);
    assert_eq!(
        dropped + data.len(),
        full.len(),
        "dropped + kept = everything the guest wrote"
    );
    // The two runs' guests differ in their VM generation ID (each vmm-core draws one): its
    // 37 characters are left out of the comparison, in both.
    let mut full = full;
    let mut data = data;
    let tail = full.len() - 256;
    if let Some(at) = full
        .windows(24)
        .position(|w| w == b"vmgenid addr=0xff000 id=")
        .map(|p| p + 24)
    {
        for i in at..at + 37 {
            full[i] = b'X';
            if i >= tail {
                data[i - tail] = b'X';
            }
        }
    }
    assert_eq!(data, full[tail..], "the ring keeps the newest bytes");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn injected_faults_drop_the_client_and_delay_writes_without_losing_output() {
    let tmp = vmm_tests::TempDir::new("faults");
    let console = tmp.join("console.sock");
    let sock = socket_path("faults");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=ticker")
        .args([
            "--serial",
            &format!("unix={}", console.display()),
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .spawn();
    wait_until(T, "the console socket", || {
        console.exists() && sock.exists()
    });
    let client = std::os::unix::net::UnixStream::connect(&console).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    wait_until(T, "a tick on the socket", || {
        line.clear();
        reader.read_line(&mut line).is_ok() && line.starts_with("tg: tick")
    });
    // How fast ticks come undelayed: the slowest of five gaps.
    let mut gap = Duration::ZERO;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        line.clear();
        reader.read_line(&mut line).unwrap();
        gap = gap.max(t.elapsed());
    }
    let (code, _, err) = vmmctl(&sock, &["console-fault", "drop-connection"]);
    assert_eq!(code, 0, "{err}");
    // The client sees the connection end; the VM does not notice.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut rest).unwrap();

    // Each write to the backend now waits 300 ms: the first tick a new client gets comes that
    // much after it connects, where undelayed ticks come every `gap`.
    let delay = Duration::from_millis(300);
    assert!(
        gap < delay / 2,
        "ticks come every {gap:?} undelayed: too slow to see a {delay:?} delay"
    );
    let (code, _, err) = vmmctl(&sock, &["console-fault", "delay-writes", "300"]);
    assert_eq!(code, 0, "{err}");
    let client = std::os::unix::net::UnixStream::connect(&console).unwrap();
    let connected = std::time::Instant::now();
    client.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(client);
    line.clear();
    reader.read_line(&mut line).unwrap();
    let first = connected.elapsed();
    assert!(
        first >= delay - Duration::from_millis(20),
        "the first line came {first:?} after connecting, with writes delayed {delay:?}"
    );
    let mut seen = Vec::new();
    while seen.len() < 10 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if let Some(n) = line
            .strip_prefix("tg: tick ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            seen.push(n);
        }
    }
    // Delayed, not lost: consecutive ticks.
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    assert_eq!(vmmctl(&sock, &["console-fault", "clear"]).0, 0);
    assert!(vmmctl(&sock, &["info"]).1.contains("state:    running"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn console_requests_on_a_direct_console_are_refused_clearly() {
    let sock = socket_path("direct-console");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--serial", "direct", "--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    for args in [&["console", "--dump"][..], &["console"][..]] {
        let (code, _, err) = vmmctl(&sock, args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.starts_with("error: console: the console is on stdio inside vmm-core (--serial direct); start the VM with another --serial"),
            "{err}"
        );
    }
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// A chardevd that something else runs (`chardevd --listen`, as a systemd service would):
/// vmm-core connects to it, and when it is killed and started again, reconnects.
#[test]
fn vmm_core_reconnects_to_a_chardevd_it_did_not_start() {
    let tmp = vmm_tests::TempDir::new("listen");
    let listen = tmp.join("chardevd.sock");
    let file = tmp.join("console.log");
    let chardevd = vmm_tests::vmm_core_bin().with_file_name("chardevd");
    let start = || {
        let child = std::process::Command::new(&chardevd)
            .arg("--listen")
            .arg(&listen)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_until(T, "chardevd listening", || {
            std::os::unix::net::UnixStream::connect(&listen).is_ok()
        });
        child
    };
    let mut helper = start();
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=ticker")
        .args(["--serial", &format!("file={}", file.display())])
        .args(["--chardevd-socket", listen.to_str().unwrap()])
        .spawn();
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    wait_until(T, "ticks", || ticks(&read()).len() >= 5);
    helper.kill().unwrap();
    helper.wait().unwrap();
    let before = ticks(&read()).len();
    let mut helper = start();
    wait_until(T, "ticks after reconnecting", || {
        ticks(&read()).len() >= before + 5
    });
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(T), 130);
    helper.kill().unwrap();
    helper.wait().unwrap();
    let log = vm.stderr();
    assert!(log.contains("reconnected to chardevd at"), "{log}");
    assert!(log.contains("0 bytes lost meanwhile"), "{log}");
    let mut seen = ticks(&read());
    seen.dedup();
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, expected, "every tick is kept across the reconnect");
}

/// systemd socket activation: chardevd takes the listening socket systemd passes
/// (LISTEN_FDS), here from systemd-socket-activate.
#[test]
fn chardevd_serves_a_socket_passed_by_systemd() {
    let tmp = vmm_tests::TempDir::new("activate");
    let listen = tmp.join("chardevd.sock");
    let file = tmp.join("console.log");
    let chardevd = vmm_tests::vmm_core_bin().with_file_name("chardevd");
    let mut activator = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&listen)
        .arg(&chardevd)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package) must be installed");
    wait_until(T, "the activation socket", || listen.exists());
    let mut vm = TestVm::builder()
        .args(["--serial", &format!("file={}", file.display())])
        .args(["--chardevd-socket", listen.to_str().unwrap()])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("tg: ready\r\n") && text.ends_with("tg: poweroff\r\n"),
        "{text}"
    );
    activator.kill().unwrap();
    activator.wait().unwrap();
}

#[test]
fn a_chardevd_socket_nobody_serves_is_named() {
    let mut vm = TestVm::builder()
        .args([
            "--serial",
            "null",
            "--chardevd-socket",
            "/nonexistent/chardevd.sock",
        ])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2);
    assert!(
        vm.stderr()
            .contains("error: --chardevd-socket /nonexistent/chardevd.sock: cannot connect"),
        "{}",
        vm.stderr()
    );
}
