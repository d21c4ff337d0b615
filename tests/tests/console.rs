//! The serial console as users reach it: through chardevd by default (stdio), on a pty, as a
//! client of a Unix socket that reconnects, attached interactively with `vmmctl console`, and
//! named in the device list.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_tests::{process_name, socket_path, vmmctl, vmmctl_bin, wait_until, TestVm};

const T: Duration = Duration::from_secs(60);

/// Collects what a reader yields, on a thread of its own.
fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let to = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => to.lock().unwrap().extend_from_slice(&buf[..n]),
                // A pty reads EIO once its other side is gone.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    out
}

fn text(c: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&c.lock().unwrap()).into_owned()
}

fn wait_text(c: &Arc<Mutex<Vec<u8>>>, what: &str) {
    wait_until(T, what, || text(c).contains(what));
}

/// The default console is served by chardevd on vmm-core's own stdin and stdout (the
/// descriptors travel over the side channel), and keeps working after chardevd is killed.
#[test]
fn the_default_console_is_stdio_through_chardevd_and_survives_its_death() {
    let sock = socket_path("default-console");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=echo")
        .args(["--api-socket", sock.to_str().unwrap()])
        .stdin_piped()
        .spawn();
    vm.wait_for("tg: ready", T);
    let helpers: Vec<u32> = vm
        .children()
        .into_iter()
        .filter(|&p| process_name(p) == "chardevd")
        .collect();
    assert_eq!(helpers.len(), 1, "one chardevd child: {:?}", vm.children());
    let (code, out, _) = vmmctl(&sock, &["devices"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("serial0") && l.ends_with("chardevd: stdio")),
        "{out}"
    );

    vm.write_stdin(b"typed on stdin\r");
    assert_eq!(vm.wait_for("tg: echo typed", T), "tg: echo typed on stdin");

    // SAFETY: kill on a PID that is our VM's child, which it has not reaped (it is running).
    unsafe { libc::kill(helpers[0] as libc::pid_t, libc::SIGKILL) };
    wait_until(T, "chardevd restarted", || {
        vm.stderr().contains("restarted chardevd")
    });
    vm.write_stdin(b"after the restart\r");
    assert_eq!(
        vm.wait_for("tg: echo after", T),
        "tg: echo after the restart"
    );
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// `--serial pty`: chardevd opens a pseudo-terminal and says where; a program on it reads the
/// guest's output and types to it.
#[test]
fn a_pty_console_carries_output_and_input() {
    let sock = socket_path("pty-console");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=echo")
        .args(["--serial", "pty", "--api-socket", sock.to_str().unwrap()])
        .spawn();
    wait_until(T, "the pty's path in the log", || {
        vm.stderr().contains("serial0: console on pty /dev/")
    });
    let log = vm.stderr();
    let path = log
        .split("serial0: console on pty ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let (_, devices, _) = vmmctl(&sock, &["devices"]);
    assert!(
        devices.contains(&format!("chardevd: pty {path}")),
        "{devices}"
    );
    // Nothing goes to vmm-core's stdout.
    let pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap();
    let seen = collect(pty.try_clone().unwrap());
    (&pty).write_all(b"ping over the pty\r").unwrap();
    wait_text(&seen, "tg: echo ping over the pty");
    assert!(vm.stdout().is_empty(), "{}", vm.stdout());
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// `--serial unix-connect=PATH`: chardevd connects to a listener that comes up after the VM
/// started, and after the connection is cut (fault injection) connects again.
#[test]
fn a_unix_client_console_connects_late_and_reconnects_after_a_cut() {
    let tmp = vmm_tests::TempDir::new("unix-connect");
    let path = tmp.join("console.sock");
    let sock = socket_path("unix-connect");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=echo")
        .args([
            "--serial",
            &format!("unix-connect={},reconnect=50", path.display()),
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .spawn();
    wait_until(T, "the API socket", || sock.exists());
    // Only now does anything listen.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let accept = || {
        listener.set_nonblocking(true).unwrap();
        let mut conn = None;
        wait_until(T, "chardevd to connect", || {
            conn = listener.accept().ok().map(|(c, _)| c);
            conn.is_some()
        });
        let conn = conn.unwrap();
        conn.set_nonblocking(false).unwrap();
        conn
    };
    let mut first = accept();
    let seen = collect(first.try_clone().unwrap());
    first.write_all(b"first line\r").unwrap();
    wait_text(&seen, "tg: echo first line");

    let (code, out, err) = vmmctl(&sock, &["console-fault", "drop-connection"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut second = accept();
    let seen2 = collect(second.try_clone().unwrap());
    second.write_all(b"second line\r").unwrap();
    wait_text(&seen2, "tg: echo second line");
    assert!(
        !text(&seen).contains("second line"),
        "the cut connection got later output"
    );
    assert!(vm.stderr().contains("reconnected to"), "{}", vm.stderr());
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// `vmmctl console` attaches interactively: it shows the guest's output, sends what is typed,
/// detaches on Ctrl-] with the VM still running, and ends when the VM ends.
#[test]
fn vmmctl_console_attaches_detaches_and_sees_the_vm_end() {
    let sock = socket_path("attach");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=echo")
        .args(["--serial", "null", "--api-socket", sock.to_str().unwrap()])
        .spawn();
    wait_until(T, "the API socket", || sock.exists());
    let attach = || {
        let mut c = Command::new(vmmctl_bin())
            .args(["--socket", sock.to_str().unwrap(), "console"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = collect(c.stdout.take().unwrap());
        let err = collect(c.stderr.take().unwrap());
        (c, out, err)
    };
    let (mut c, out, err) = attach();
    wait_text(&err, "attached to serial0");
    c.stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello viewer\r")
        .unwrap();
    wait_text(&out, "tg: echo hello viewer");
    c.stdin.as_mut().unwrap().write_all(&[0x1d]).unwrap();
    let status = c.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    wait_text(&err, "vmmctl: detached");
    assert!(vmmctl(&sock, &["info"]).1.contains("state:    running"));

    // Attached again, it sees the VM end.
    let (mut c, out, err) = attach();
    wait_text(&err, "attached to serial0");
    c.stdin.as_mut().unwrap().write_all(b"once more\r").unwrap();
    wait_text(&out, "tg: echo once more");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
    assert_eq!(c.wait().unwrap().code(), Some(0));
    wait_text(&err, "the console closed: the VM ended");
}

/// A device name that does not exist, or is not a console, is refused with the names there
/// are; the VM and its console go on.
#[test]
fn an_unknown_device_name_is_refused_and_the_vm_goes_on() {
    let sock = socket_path("unknown-device");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args([
            "--serial",
            "ring=4096",
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .spawn();
    wait_until(T, "the API socket", || sock.exists());
    let (code, _, err) = vmmctl(&sock, &["console", "--dump", "--device", "serial7"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: console: no device \"serial7\"; this VM has pvpanic0, power0, serial0 (vmmctl devices lists them)\n"
    );
    let (code, _, err) = vmmctl(
        &sock,
        &["console-fault", "--device", "pvpanic0", "drop-connection"],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: console-fault: device \"pvpanic0\" is not a console; the consoles are: serial0\n"
    );
    let (code, _, err) = vmmctl(&sock, &["console", "--device", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: console: no device \"nope\""),
        "{err}"
    );

    // The VM and chardevd are unaffected: the ring still answers, with the guest's output.
    wait_until(T, "the guest's output in the ring", || {
        vmmctl(&sock, &["console", "--dump"])
            .1
            .contains("tg: ready")
    });
    let (code, json, _) = vmmctl(&sock, &["--json", "devices"]);
    assert_eq!(code, 0);
    assert!(
        json.starts_with('[') && json.contains("{\"name\":\"serial0\",\"kind\":\"8250 UART\""),
        "{json}"
    );
    assert!(vmmctl(&sock, &["info"]).1.contains("state:    running"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}
