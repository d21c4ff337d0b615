//! The management API through vmmctl: info, pause/resume, reboot, shutdown, and what happens
//! to peers and messages that must be refused.

use std::io::Write;
use std::time::{Duration, Instant};
use vmm_tests::{socket_path, vmmctl, TestVm};

const T: Duration = Duration::from_secs(60);

fn ticker(name: &str, cpus: &str) -> (TestVm, std::path::PathBuf) {
    let sock = socket_path(name);
    let vm = TestVm::builder()
        .cpus(cpus)
        .cmdline("tg.scenario=ticker")
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: tick 3", T);
    (vm, sock)
}

fn ticks(vm: &TestVm) -> usize {
    vm.stdout().matches("tg: tick ").count()
}

fn wait_ticks(vm: &TestVm, at_least: usize) {
    let deadline = Instant::now() + T;
    while ticks(vm) < at_least {
        assert!(
            Instant::now() < deadline,
            "the guest made no progress:\n{}",
            vm.stdout()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn info_reports_the_vm_for_people_and_programs() {
    let (mut vm, sock) = ticker("info", "2,max=4");
    let (code, out, err) = vmmctl(&sock, &["info"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state:    running"), "{out}");
    assert!(out.contains("vCPUs:    2 online, 4 max"), "{out}");
    assert!(out.contains(&format!("pid:      {}", vm.pid())), "{out}");
    let (code, json, _) = vmmctl(&sock, &["--json", "info"]);
    assert_eq!(code, 0);
    assert!(
        json.starts_with(
            "{\"state\":\"running\",\"cpus\":2,\"max_cpus\":4,\"memory_bytes\":536870912,"
        ),
        "{json}"
    );
    assert!(json.contains("\"boots\":1,\"generation_id\":\""), "{json}");
    // The VM generation ID the API gives is the one the guest reads (VMGenID): the GUID's
    // bytes, which the test guest prints as two little-endian halves.
    let guid = out
        .lines()
        .find_map(|l| l.strip_prefix("generation id: "))
        .unwrap_or_else(|| panic!("{out}"));
    let bytes: Vec<u8> = (0..16)
        .map(|i| {
            let hex = guid.replace('-', "");
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect();
    let half = |r: std::ops::Range<usize>| u64::from_le_bytes(bytes[r].try_into().unwrap());
    let seen = format!(
        "tg: vmgenid addr=0xff000 id={:#018x}:{:#018x}",
        half(8..16),
        half(0..8)
    );
    assert!(vm.stdout().contains(&seen), "{seen:?}:\n{}", vm.stdout());
    let (code, _, _) = vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(code, 0);
    assert_eq!(vm.wait_exit(T), 0);
    assert!(!sock.exists(), "the socket is removed when the VMM exits");
}

#[test]
fn pause_stops_guest_progress_and_resume_continues_it() {
    let (mut vm, sock) = ticker("pause", "2");
    let (code, out, err) = vmmctl(&sock, &["pause"]);
    assert_eq!((code, out.trim()), (0, "paused"), "{err}");
    // A tick written just before the pause may still be on its way through our pipe reader.
    std::thread::sleep(Duration::from_millis(300));
    let at_pause = ticks(&vm);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(&vm), at_pause, "no tick while paused");
    assert!(vmmctl(&sock, &["info"]).1.contains("state:    paused"));
    let (code, _, _) = vmmctl(&sock, &["resume"]);
    assert_eq!(code, 0);
    wait_ticks(&vm, at_pause + 3);
    assert!(vmmctl(&sock, &["info"]).1.contains("state:    running"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn reboot_boots_the_guest_again() {
    let (mut vm, sock) = ticker("reboot", "1");
    let (code, out, _) = vmmctl(&sock, &["reboot"]);
    assert_eq!((code, out.trim()), (0, "reset"));
    let deadline = Instant::now() + T;
    while vm.stdout().matches("tg: hello").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second boot:\n{}",
            vm.stdout()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(vmmctl(&sock, &["--json", "info"]).1.contains("\"boots\":2"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn forced_shutdown_stops_the_vm_with_status_0() {
    let (mut vm, sock) = ticker("shutdown", "1");
    let (code, out, _) = vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!((code, out.trim()), (0, "stopped"));
    assert_eq!(vm.wait_exit(T), 0);
    assert!(
        vm.stderr().contains("stopped through the management API"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn graceful_shutdown_presses_the_power_button_and_the_guest_powers_off() {
    let sock = socket_path("powerbutton");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=wait-powerbutton")
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    let (code, out, err) = vmmctl(&sock, &["shutdown"]);
    assert_eq!((code, out.trim()), (0, "shutdown requested"), "{err}");
    vm.wait_for("tg: power button", T);
    assert_eq!(vm.wait_exit(T), 0);
    assert!(vm.stderr().contains("guest powered off"), "{}", vm.stderr());
}

#[test]
fn the_socket_is_0600_and_a_peer_with_another_uid_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (mut vm, sock) = ticker("peercred", "1");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Open the file mode so that only the SO_PEERCRED check stands in the way.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-vmmctl", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = dir.join("vmmctl");
    std::fs::copy(vmm_tests::vmmctl_bin(), &ctl).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&ctl)
        .arg("--socket")
        .arg(&sock)
        .arg("info")
        .output()
        .expect("setpriv");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "error: --socket {}: the listener (vmm-core, PID {}) runs as another user and hung up",
            sock.display(),
            vm.pid()
        )),
        "{out:?}"
    );
    assert!(
        vm.stderr().contains("refused a connection from uid 65534"),
        "{}",
        vm.stderr()
    );
    // The VM and the API go on.
    assert_eq!(vmmctl(&sock, &["info"]).0, 0);
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn a_malformed_message_closes_only_that_connection() {
    let (mut vm, sock) = ticker("garbage", "1");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    // A segment table claiming 0xffffffff segments, then noise.
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8])
        .unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let before = ticks(&vm);
    wait_ticks(&vm, before + 2);
    let (code, out, _) = vmmctl(&sock, &["info"]);
    assert_eq!(code, 0);
    assert!(out.contains("state:    running"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn vmmctl_names_a_socket_it_cannot_use() {
    let (code, _, err) = vmmctl(std::path::Path::new("/nonexistent/api.sock"), &["info"]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "error: --socket /nonexistent/api.sock: no such socket; is vmm-core running with this path?"
    );
}

#[test]
fn api_socket_in_a_missing_directory_is_bad_input() {
    let mut vm = TestVm::builder()
        .args(["--api-socket", "/nonexistent/dir/api.sock"])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2);
    let err = vm.stderr();
    assert!(
        err.contains("error: --api-socket /nonexistent/dir/api.sock: cannot listen on it"),
        "{err}"
    );
    let _ = std::io::stdout().flush();
}

#[test]
fn events_stream_what_happens_to_the_vm_until_it_ends() {
    let (mut vm, sock) = ticker("events", "1");
    let mut sub = std::process::Command::new(vmm_tests::vmmctl_bin())
        .arg("--socket")
        .arg(&sock)
        .args(["--json", "events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until vmmctl says it is subscribed: from then on no event can be missed.
    let mut err = std::io::BufReader::new(sub.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("subscribed to events"), "{line}");
    for cmd in [
        &["pause"][..],
        &["resume"],
        &["reboot"],
        &["shutdown", "--force"],
    ] {
        let (code, _, err) = vmmctl(&sock, cmd);
        assert_eq!(code, 0, "{cmd:?}: {err}");
    }
    assert_eq!(vm.wait_exit(T), 0);
    // vmmctl events ends when the VMM closes the connection.
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let kinds: Vec<&str> = lines
        .lines()
        .filter_map(|l| l.split("\"kind\":\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        kinds,
        ["paused", "resumed", "reset", "started", "stopped"],
        "{lines}"
    );
    assert!(lines.contains("\"detail\":\"boot 2\""), "{lines}");
}

/// `vmmctl dirty-rate` counts, through KVM's dirty log, the pages the guest writes: a guest
/// rewriting 8 MiB over and over writes all 2048 of those pages (and hardly any other) in
/// half a second; an idle guest writes almost none. Live migration's pre-copy rests on the
/// same log.
#[test]
fn dirty_rate_counts_the_pages_the_guest_writes() {
    let dirty_pages = |scenario: &str, ready: &str| {
        let sock = socket_path(&format!("dirty-{scenario}"));
        let mut vm = TestVm::builder()
            .cmdline(&format!("tg.scenario={scenario} tg.dirty.mib=8"))
            .args(["--api-socket", sock.to_str().unwrap()])
            .spawn();
        vm.wait_for(ready, T);
        let (code, out, err) = vmmctl(&sock, &["dirty-rate", "--ms", "500"]);
        assert_eq!(code, 0, "{err}");
        let (code, json, err) = vmmctl(&sock, &["--json", "dirty-rate", "--ms", "100"]);
        assert_eq!(code, 0, "{err}");
        assert!(json.starts_with("{\"pages\":"), "{json}");
        let (code, _, _) = vmmctl(&sock, &["shutdown", "--force"]);
        assert_eq!(code, 0);
        assert_eq!(vm.wait_exit(T), 0);
        // "N pages of 4096 bytes written in M ms: X MiB/s"
        let pages: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
        let ms: u64 = out
            .split(" in ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (500..2000).contains(&ms),
            "the log was on for {ms} ms: {out}"
        );
        eprintln!("{scenario}: {out}");
        pages
    };
    let busy = dirty_pages("dirty", "tg: dirty pass 16");
    assert!(
        (2048..2048 + 64).contains(&busy),
        "a guest rewriting 8 MiB wrote {busy} pages in 500 ms"
    );
    let idle = dirty_pages("idle", "tg: ready");
    assert!(idle < 64, "an idle guest wrote {idle} pages in 500 ms");
    let (code, _, err) = {
        let sock = socket_path("dirty-bad");
        let mut vm = TestVm::builder()
            .cmdline("tg.scenario=idle")
            .args(["--api-socket", sock.to_str().unwrap()])
            .spawn();
        vm.wait_for("tg: ready", T);
        let r = vmmctl(&sock, &["dirty-rate", "--ms", "90000"]);
        vmmctl(&sock, &["shutdown", "--force"]);
        assert_eq!(vm.wait_exit(T), 0);
        r
    };
    // Refused by vmmctl before it asks (as every other bad value: status 2).
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: invalid value '90000' for '--ms <MS>': 90000 is not in 1..=60000"),
        "{err}"
    );
}
