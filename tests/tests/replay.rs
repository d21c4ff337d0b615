//! Record/replay at the device boundary (`--record DIR`, `--replay DIR`): a console session
//! typed over a unix-socket chardev, and the rng's bytes, given again without the world.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;
use vmm_tests::{wait_until, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);

/// The console's output from "tg: ready" on (before it, the guest prints its generation ID,
/// which differs from run to run by design).
fn from_ready(out: &str) -> String {
    let i = out
        .find("tg: ready")
        .unwrap_or_else(|| panic!("no tg: ready in:\n{out}"));
    out[i..].replace('\r', "")
}

/// Lines typed over a unix-socket console are recorded; a replay with no one typing gives
/// them again, each once the guest's output is where it was when it was typed, and the
/// guest's output is byte for byte the recorded session's.
#[test]
fn a_console_session_replays_byte_identical() {
    let dir = TempDir::new("replay-console");
    let rec = dir.join("rec");
    let sock = dir.join("console.sock");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=echo")
        .args(["--serial", &format!("unix={}", sock.display())])
        .args(["--record", rec.to_str().unwrap()])
        .spawn();
    wait_until(T, "the console socket", || sock.exists());
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut session = String::new();
    let mut wait_for = |want: &str, session: &mut String| loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the console closed:\n{session}");
        session.push_str(&line);
        if line.contains(want) {
            return;
        }
    };
    wait_for("tg: ready", &mut session);
    for typed in ["hello from the host", "a second line, typed later", "quit"] {
        std::thread::sleep(Duration::from_millis(100));
        client.write_all(format!("{typed}\r").as_bytes()).unwrap();
        wait_for(&format!("tg: echo {typed}"), &mut session);
    }
    wait_for("tg: poweroff", &mut session);
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    assert!(rec.join("serial0.log").exists());

    let out = dir.join("replayed.txt");
    let mut replayed = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=echo")
        .args(["--serial", &format!("file={}", out.display())])
        .args(["--replay", rec.to_str().unwrap()])
        .spawn();
    assert_eq!(replayed.wait_exit(T), 0, "{}", replayed.stderr());
    let again = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        from_ready(&again),
        from_ready(&session),
        "the replayed session differs from the recorded one"
    );
    assert!(
        replayed
            .stderr()
            .contains("serial0: replay: all 3 recorded input(s) given"),
        "{}",
        replayed.stderr()
    );
}

/// The guest reads 64 KiB from the host's /dev/urandom while recording; replayed, it reads
/// the same 64 KiB (its digest is the same), which a run without the recording does not.
#[test]
fn the_rng_replays_the_bytes_it_served() {
    let dir = TempDir::new("replay-rng");
    let rec = dir.join("rec");
    let run = |args: &[&str]| -> String {
        let mut vm = TestVm::builder()
            .cmdline("console=ttyS0 tg.scenario=rng tg.rng.bytes=65536")
            .args(["--rng", "urandom"])
            .args(args.iter().copied())
            .spawn();
        assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
        let out = vm.stdout();
        out.lines()
            .find(|l| l.starts_with("tg: rng bytes=65536 "))
            .unwrap_or_else(|| panic!("{out}"))
            .to_string()
    };
    let recorded = run(&["--record", rec.to_str().unwrap()]);
    let replayed = run(&["--replay", rec.to_str().unwrap()]);
    assert_eq!(replayed, recorded);
    let fresh = run(&[]);
    assert_ne!(fresh, recorded, "urandom gave the same bytes twice");
}

/// A guest that asks the replayed rng for more than was recorded gets no answer past the
/// recording's end, and chardevd names the first request the recording does not have.
#[test]
fn a_replay_that_diverges_names_the_first_request_it_cannot_answer() {
    let dir = TempDir::new("replay-rng-diverge");
    let rec = dir.join("rec");
    let mut vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=rng tg.rng.bytes=16384")
        .args(["--rng", "urandom"])
        .args(["--record", rec.to_str().unwrap()])
        .spawn();
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    // Four requests of 4 KiB were recorded; this guest asks for a fifth.
    let vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=rng tg.rng.bytes=20480")
        .args(["--rng", "urandom"])
        .args(["--replay", rec.to_str().unwrap()])
        .spawn();
    wait_until(T, "the divergence", || {
        vm.stderr().contains("replay diverged")
    });
    let err = vm.stderr();
    assert!(
        err.contains(
            "rng0: replay diverged: the recording ends before request 4; the rng answers no more requests"
        ),
        "{err}"
    );
    assert!(!vm.stdout().contains("tg: rng bytes="), "{}", vm.stdout());
}

/// A --replay directory that does not exist, and a log that is not one, get one line each.
#[test]
fn a_bad_replay_directory_or_log_is_refused_in_one_line() {
    let dir = TempDir::new("replay-bad");
    let mut vm = TestVm::builder()
        .args(["--replay", dir.join("none").to_str().unwrap()])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2);
    assert!(
        vm.stderr().contains("--replay ") && vm.stderr().contains("not a directory"),
        "{}",
        vm.stderr()
    );
    let rec = dir.join("rec");
    std::fs::create_dir(&rec).unwrap();
    std::fs::write(rec.join("serial0.log"), b"not a log at all").unwrap();
    let mut vm = TestVm::builder()
        .args(["--replay", rec.to_str().unwrap()])
        .spawn();
    assert_ne!(vm.wait_exit(T), 0);
    let err = vm.stderr();
    assert!(
        err.contains("serial0.log: not a record/replay log (no VMMRLOG header)"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
}
