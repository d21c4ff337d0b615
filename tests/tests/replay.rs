//! Record/replay at the device boundary (`--record DIR`, `--replay DIR`): a console session
//! typed over a unix-socket chardev, and the rng's bytes, given again without the world.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;
use vmm_tests::{process_name, vmmctl, wait_until, TempDir, TestVm};

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
    let api = dir.join("api.sock");
    let vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=rng tg.rng.bytes=20480")
        .args(["--rng", "urandom"])
        .args(["--replay", rec.to_str().unwrap()])
        .args(["--api-socket", api.to_str().unwrap()])
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
    // `replay status` says where the rng's log stands: read to its end.
    let (code, status, err) = vmmctl(&api, &["replay", "status"]);
    assert_eq!(code, 0, "{err}");
    let line = status
        .lines()
        .find(|l| l.starts_with("rng0: replaying, "))
        .unwrap_or_else(|| panic!("{status}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        numbers.len() >= 3 && numbers[1] == numbers[2] && numbers[1] > 16384,
        "{line}"
    );
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
    // --replay-writes apply with nothing to replay.
    let mut vm = TestVm::builder().args(["--replay-writes", "apply"]).spawn();
    assert_eq!(vm.wait_exit(T), 2);
    assert_eq!(
        vm.stderr().trim(),
        "error: --replay-writes apply: there is no --replay; give --replay DIR with it"
    );
    // A --record directory that cannot be made (/proc takes no new directory).
    let mut vm = TestVm::builder()
        .args(["--record", "/proc/vmm-test-record"])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2);
    assert_eq!(
        vm.stderr().trim(),
        "error: --record /proc/vmm-test-record: cannot make the directory (No such file or directory (os error 2)); give one this user can write"
    );
}

/// Adds blockd fault rules to the VM at `api` (each the arguments after `disk fault add`).
fn add_fault_rules(api: &std::path::Path, rules: &[&[&str]]) {
    for rule in rules {
        let mut args = vec!["disk", "fault", "add"];
        args.extend_from_slice(rule);
        let (code, out, err) = vmmctl(api, &args);
        assert_eq!(code, 0, "{out}{err}");
    }
}

/// A disk image of 16 MiB whose every 4 KiB block says which block it is.
fn patterned_image(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::write(&img, pattern()).unwrap();
    img
}

/// 16 MiB whose bytes tell their place.
fn pattern() -> Vec<u8> {
    (0..16u64 << 20)
        .map(|i| ((i >> 12) as u8).wrapping_mul(7) ^ (i as u8))
        .collect()
}

/// Runs the blk-digest workload: `setup` runs once the guest waits (with the API socket),
/// then the line that starts it is typed; returns the guest's digest line.
fn digest_run(
    dir: &TempDir,
    img: &std::path::Path,
    cmdline: &str,
    args: &[&str],
    setup: impl FnOnce(&std::path::Path, &TestVm),
) -> String {
    digest_run_on(
        dir,
        &format!("path={}", img.display()),
        cmdline,
        args,
        setup,
    )
}

/// `digest_run` with the --disk spec given whole.
fn digest_run_on(
    dir: &TempDir,
    disk: &str,
    cmdline: &str,
    args: &[&str],
    setup: impl FnOnce(&std::path::Path, &TestVm),
) -> String {
    let sock = dir.join("console.sock");
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let mut vm = TestVm::builder()
        .cmdline(cmdline)
        .args(["--disk", disk])
        .args(["--serial", &format!("unix={}", sock.display())])
        .args(["--api-socket", api.to_str().unwrap()])
        .args(args.iter().copied())
        .spawn();
    wait_until(T, "the console socket", || sock.exists());
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut seen = String::new();
    let mut wait_for = |want: &str| loop {
        let mut line = String::new();
        if let Err(e) = reader.read_line(&mut line) {
            panic!(
                "waiting for {want:?}: {e}; the console so far:\n{seen}\n{}",
                vm.stderr()
            );
        }
        assert!(
            !line.is_empty(),
            "the console closed:\n{seen}\n{}",
            vm.stderr()
        );
        seen.push_str(&line);
        if line.contains(want) {
            return line.trim_end().to_string();
        }
    };
    wait_for("tg: blk digest waiting");
    setup(&api, &vm);
    client.write_all(b"go\r").unwrap();
    let digest = wait_for("tg: blk digest ops=");
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    digest
}

/// The disk and console workload runs under random fault rules (EIO and delays on reads and
/// writes) while recording. Replayed with no rule, on an image overwritten since, the guest
/// sees the same statuses and data (its digest is the same), and the image is not written.
#[test]
fn a_disk_workload_under_random_faults_replays_identically_without_them() {
    let dir = TempDir::new("replay-disk");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    let cmdline = "console=ttyS0 tg.scenario=blk-digest tg.blk.count=150 tg.blk.seed=7";
    let recorded = digest_run(
        &dir,
        &img,
        cmdline,
        &["--record", rec.to_str().unwrap()],
        |api, _| {
            add_fault_rules(
                api,
                &[
                    &[
                        "--ops",
                        "read,write",
                        "--errno",
                        "EIO",
                        "--probability",
                        "0.2",
                    ][..],
                    &["--ops", "read", "--delay-ms", "3", "--probability", "0.3"][..],
                ],
            );
        },
    );
    let errors: u64 = recorded
        .split("errors=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        errors > 5 && errors < 100,
        "the fault rules fired {errors} times: {recorded}"
    );
    // The recording started from a copy of the image beside its log, and kept the bytes of
    // no read of blocks that copy holds: its log is smaller than what the guest read.
    let base = rec.join("disk0.log.base");
    let original = std::fs::read(&base).unwrap();
    assert!(
        original == pattern(),
        "the copy is not the image as the recording began"
    );
    // 150 requests of 4 KiB, two in three reads: about 400 KiB read.
    let log_bytes = std::fs::metadata(rec.join("disk0.log")).unwrap().len();
    assert!(
        log_bytes < 150 * 4096 / 8,
        "{log_bytes} bytes of log for 150 requests: reads' bytes were kept"
    );
    let recorded_image = std::fs::read(&img).unwrap();
    // The image changes after the recording: a replay does not read it.
    std::fs::write(&img, vec![0xabu8; 16 << 20]).unwrap();
    let replayed = digest_run(
        &dir,
        &img,
        cmdline,
        &["--replay", rec.to_str().unwrap()],
        |_, _| {},
    );
    assert_eq!(replayed, recorded);
    let after = std::fs::read(&img).unwrap();
    assert!(
        after.iter().all(|&b| b == 0xab),
        "the replay wrote the image"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        original,
        "the replay wrote the copy"
    );
    // --replay-writes=apply on the image as the recording began: the guest's writes land
    // there, and it ends as the recording left it.
    std::fs::write(&img, pattern()).unwrap();
    let applied = digest_run(
        &dir,
        &img,
        cmdline,
        &[
            "--replay",
            rec.to_str().unwrap(),
            "--replay-writes",
            "apply",
        ],
        |_, _| {},
    );
    assert_eq!(applied, recorded);
    assert!(
        std::fs::read(&img).unwrap() == recorded_image,
        "the image after a replay that applies the writes is not the recorded run's"
    );
    // A copy that no longer holds what was read stops the replay at the first such read,
    // saying so (reads do come from it).
    std::fs::write(&base, vec![0xcdu8; 16 << 20]).unwrap();
    let (_vm, err) = replay_until_it_diverges(
        cmdline,
        &img,
        &rec,
        &[
            "--api-socket",
            dir.join("replay-bad-base.sock").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("is to come from the working copy of the recording's base copy, which does not hold what was read there when recording"),
        "{err}"
    );
}

/// A replay of `rec` on `img` with `cmdline` (and `args`), until a disk says it diverged: the
/// VM (still running) and its log.
fn replay_until_it_diverges(
    cmdline: &str,
    img: &std::path::Path,
    rec: &std::path::Path,
    args: &[&str],
) -> (TestVm, String) {
    let vm = TestVm::builder()
        .cmdline(cmdline)
        .args(["--disk", &format!("path={}", img.display())])
        .args(["--replay", rec.to_str().unwrap()])
        .args(args.iter().copied())
        .spawn();
    wait_until(T, "the divergence", || {
        vm.stderr().contains("replay diverged")
    });
    let err = vm.stderr();
    (vm, err)
}

/// A guest that sends other requests than the recorded ones (another seed) stops the replay
/// at the first that differs, with a line that names the queue, the index, what was recorded
/// and what came.
#[test]
fn a_disk_replay_that_diverges_names_the_first_differing_request() {
    let dir = TempDir::new("replay-disk-diverge");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    digest_run(
        &dir,
        &img,
        "console=ttyS0 tg.scenario=blk-digest tg.blk.count=10 tg.blk.seed=7",
        &["--record", rec.to_str().unwrap()],
        |_, _| {},
    );
    let out = dir.join("replayed.txt");
    let api = dir.join("replay-api.sock");
    let (_vm, err) = replay_until_it_diverges(
        "console=ttyS0 tg.scenario=blk-digest tg.blk.count=10 tg.blk.seed=9",
        &img,
        &rec,
        &[
            "--serial",
            &format!("file={}", out.display()),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    let line = err
        .lines()
        .find(|l| l.contains("replay diverged"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("replay diverged at queue 0, request 0: the recording has a ")
            && line.contains(" at sector ")
            && line.contains(", the guest sent a "),
        "{line}"
    );
    // Where the replay stands: the console's one input given, no disk request answered,
    // and why the disk stopped.
    let (code, status, err) = vmmctl(&api, &["replay", "status"]);
    assert_eq!(code, 0, "{err}");
    let mut lines = status.lines();
    assert_eq!(
        lines.next(),
        Some("console: replaying, 1 of 1 input(s) given"),
        "{status}"
    );
    let disk = lines.next().unwrap_or_default();
    assert!(
        disk.starts_with(
            "disk0: replaying, 0 request(s) answered; stopped: replay diverged at queue 0, request 0:"
        ),
        "{status}"
    );
}

/// Delays a fault rule injected while recording come back in the replay with no rule set:
/// 20 requests each held 100 ms take at least 2 s again.
#[test]
fn delays_injected_while_recording_come_back_in_the_replay() {
    let dir = TempDir::new("replay-disk-delays");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    let cmdline = "console=ttyS0 tg.scenario=blk-digest tg.blk.count=20 tg.blk.seed=5";
    let recorded = digest_run(
        &dir,
        &img,
        cmdline,
        &["--record", rec.to_str().unwrap()],
        |api, _| {
            let args = [
                "disk",
                "fault",
                "add",
                "--ops",
                "read,write",
                "--delay-ms",
                "100",
            ];
            let (code, out, err) = vmmctl(api, &args);
            assert_eq!(code, 0, "{out}{err}");
        },
    );
    let start = std::time::Instant::now();
    let replayed = digest_run(
        &dir,
        &img,
        cmdline,
        &["--replay", rec.to_str().unwrap()],
        |_, _| {},
    );
    let took = start.elapsed();
    assert_eq!(replayed, recorded);
    assert!(
        took >= Duration::from_secs(2),
        "20 requests delayed 100 ms each replayed in {took:?}"
    );
}

/// A blockd killed as a recording starts (before the workload) is restarted by vmm-core with
/// the same log, and what the new one records there replays: the guest sees what it saw.
#[test]
fn a_blockd_restarted_while_recording_goes_on_in_the_same_log() {
    let dir = TempDir::new("replay-disk-restart");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    let log = rec.join("disk0.log");
    let cmdline = "console=ttyS0 tg.scenario=blk-digest tg.blk.count=150 tg.blk.seed=11";
    let mut before = 0;
    let recorded = digest_run(
        &dir,
        &img,
        cmdline,
        &["--record", rec.to_str().unwrap()],
        |api, vm| {
            let pids: Vec<u32> = vm
                .children()
                .into_iter()
                .filter(|p| process_name(*p) == "blockd")
                .collect();
            assert_eq!(pids.len(), 1, "{pids:?}");
            wait_until(T, "the log", || log.exists());
            before = std::fs::metadata(&log).unwrap().len();
            // SAFETY: kill on the PID of blockd, which the test's vmm-core started.
            unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
            wait_until(T, "the disk back with a new blockd", || {
                let (_, out, _) = vmmctl(api, &["disk", "list"]);
                vm.stderr().contains("restarted blockd") && out.contains(" connected ")
            });
        },
    );
    let after = std::fs::metadata(&log).unwrap().len();
    assert!(
        after > before + 150 * 40,
        "the log grew from {before} to {after} bytes for 150 requests"
    );
    let replayed = digest_run(
        &dir,
        &img,
        cmdline,
        &["--replay", rec.to_str().unwrap()],
        |_, _| {},
    );
    assert_eq!(replayed, recorded);
}

/// A snapshot taken in the middle of a recorded disk workload (under fault rules) says where
/// each log stood, and keeps the image as it was then beside the disk's log. Restored with
/// `--replay` and no rule, on an image overwritten since, the guest goes on from the snapshot
/// and ends with the recorded run's digest; a snapshot taken without recording is refused
/// for a replay in one line.
#[test]
fn a_replay_goes_on_from_a_snapshot_taken_while_recording() {
    let dir = TempDir::new("replay-from-snapshot");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    let snap = dir.join("snap");
    let cmdline = "console=ttyS0 tg.scenario=blk-digest tg.blk.count=600 tg.blk.seed=13";
    let recorded = digest_run(
        &dir,
        &img,
        cmdline,
        &["--record", rec.to_str().unwrap(), "--memory", "64M"],
        |api, _| {
            add_fault_rules(
                api,
                &[
                    &[
                        "--ops",
                        "read,write",
                        "--errno",
                        "EIO",
                        "--probability",
                        "0.2",
                    ][..],
                    &["--ops", "read", "--delay-ms", "4", "--probability", "0.5"][..],
                ],
            );
            // Once the workload is under way (the line that starts it comes after this),
            // pause, snapshot and go on.
            let (api, snap) = (api.to_path_buf(), snap.clone());
            let log = rec.join("disk0.log");
            std::thread::spawn(move || {
                wait_until(T, "the workload under way", || {
                    std::fs::metadata(&log).is_ok_and(|m| m.len() > 4000)
                });
                for args in [
                    &["pause"][..],
                    &["snapshot", &format!("file:{}", snap.display())][..],
                    &["resume"][..],
                ] {
                    let (code, out, err) = vmmctl(&api, args);
                    assert_eq!(code, 0, "{args:?}: {out}{err}");
                }
            });
        },
    );
    // The snapshot came mid-way: the image as it was then is beside the log, marked at a
    // place before the log's end.
    let end = std::fs::metadata(rec.join("disk0.log")).unwrap().len();
    let marked: Vec<u64> = std::fs::read_dir(&rec)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("disk0.log.at-")?.parse().ok()
        })
        .collect();
    assert_eq!(marked.len(), 1, "{marked:?}");
    assert!(
        marked[0] > 4000 && marked[0] < end,
        "the snapshot marks byte {} of a log of {end}",
        marked[0]
    );
    std::fs::write(&img, vec![0xabu8; 16 << 20]).unwrap();
    let out = dir.join("restored.txt");
    let api = dir.join("restored.sock");
    let mut vm = TestVm::builder()
        .args(["--restore", &format!("file:{}", snap.display())])
        .args(["--replay", rec.to_str().unwrap()])
        .args(["--serial", &format!("file={}", out.display())])
        .args(["--api-socket", api.to_str().unwrap()])
        .spawn();
    wait_until(T, "the restored VM", || {
        vm.stderr().contains("the VM is here")
    });
    let (code, o, e) = vmmctl(&api, &["resume"]);
    assert_eq!(code, 0, "{o}{e}");
    assert_eq!(vm.wait_exit(T), 0, "{}", vm.stderr());
    let console = std::fs::read_to_string(&out).unwrap();
    let digest = console
        .lines()
        .find(|l| l.contains("tg: blk digest ops="))
        .unwrap_or_else(|| panic!("no digest after the restore:\n{console}\n{}", vm.stderr()));
    assert_eq!(digest.trim_end(), recorded);
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0xab),
        "the replay wrote the image"
    );

    // A snapshot of a VM that does not record says nowhere where a log stood.
    let plain = dir.join("plain-snap");
    let api = dir.join("plain.sock");
    let vm = TestVm::builder()
        .cmdline("console=ttyS0 tg.scenario=echo")
        .args(["--memory", "64M", "--api-socket", api.to_str().unwrap()])
        .spawn();
    wait_until(T, "the API", || api.exists());
    assert_eq!(vmmctl(&api, &["pause"]).0, 0);
    let (code, o, e) = vmmctl(&api, &["snapshot", &format!("file:{}", plain.display())]);
    assert_eq!(code, 0, "{o}{e}");
    drop(vm);
    let mut vm = TestVm::builder()
        .args(["--restore", &format!("file:{}", plain.display())])
        .args(["--replay", rec.to_str().unwrap()])
        .spawn();
    assert_eq!(vm.wait_exit(T), 2, "{}", vm.stderr());
    let err = vm.stderr();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("the snapshot was not taken while recording"),
        "{err}"
    );
}

/// A disk that is a qcow2 overlay on a raw base (as `qemu-img create -b` makes it) records on
/// a copy of its top layer: reads are logged as checksums (the log stays small), and the
/// replay, on a working copy of that layer over the same base, gives the guest what it saw,
/// with the overlay untouched.
#[test]
fn a_recording_on_a_qcow2_overlay_keeps_its_reads_as_checksums_and_replays() {
    let dir = TempDir::new("replay-overlay");
    let base = patterned_image(&dir);
    let overlay = dir.join("overlay.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}; install qemu-utils (scripts/setup.sh does)"));
    assert!(out.status.success(), "{out:?}");
    let rec = dir.join("rec");
    let cmdline = "console=ttyS0 tg.scenario=blk-digest tg.blk.count=150 tg.blk.seed=17";
    let recorded = digest_run(
        &dir,
        &overlay,
        cmdline,
        &["--record", rec.to_str().unwrap()],
        |api, _| {
            add_fault_rules(
                api,
                &[&[
                    "--ops",
                    "read,write",
                    "--errno",
                    "EIO",
                    "--probability",
                    "0.2",
                ]],
            );
        },
    );
    assert!(rec.join("disk0.log.base").exists());
    let log_bytes = std::fs::metadata(rec.join("disk0.log")).unwrap().len();
    assert!(
        log_bytes < 150 * 4096 / 8,
        "{log_bytes} bytes of log for 150 requests: reads' bytes were kept"
    );
    let before = std::fs::read(&overlay).unwrap();
    let replayed = digest_run(
        &dir,
        &overlay,
        cmdline,
        &["--replay", rec.to_str().unwrap()],
        |_, _| {},
    );
    assert_eq!(replayed, recorded);
    assert!(
        std::fs::read(&overlay).unwrap() == before,
        "the replay wrote the overlay"
    );
}

/// Writes sent eight at a time complete out of order while recording (a fault rule delays
/// some, fails others); the guest's digest takes the order they completed in. Replayed with
/// no rule, each request is matched to its record whatever the order it comes in, and the
/// answers come back in the recorded order: the digest is the same.
#[test]
fn requests_in_flight_together_complete_in_the_recorded_order_on_replay() {
    let dir = TempDir::new("replay-order");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    let cmdline =
        "console=ttyS0 tg.scenario=blk-digest tg.blk.count=120 tg.blk.seed=19 tg.blk.batch=8";
    let recorded = digest_run(
        &dir,
        &img,
        cmdline,
        &["--record", rec.to_str().unwrap()],
        |api, _| {
            add_fault_rules(
                api,
                &[
                    &["--ops", "write", "--delay-ms", "3", "--probability", "0.4"][..],
                    &[
                        "--ops",
                        "read,write",
                        "--errno",
                        "EIO",
                        "--probability",
                        "0.1",
                    ][..],
                ],
            );
        },
    );
    let replayed = digest_run(
        &dir,
        &img,
        cmdline,
        &["--replay", rec.to_str().unwrap()],
        |_, _| {},
    );
    assert_eq!(replayed, recorded);
    // Without the rules, the same guest's writes complete in another order (so the digest
    // above does say the order was replayed).
    let plain = digest_run(&dir, &img, cmdline, &[], |_, _| {});
    assert_ne!(plain, recorded, "the fault rules changed nothing");
}

/// A write on one queue and a read of the same block on another, sent together while
/// recording (a fault rule delays some writes, so that the read often comes first and is
/// logged as a checksum of the copy). Replayed with no rule, the working copy is read and
/// written in the recorded order across the queues: the read sees what it saw, and the digest
/// is the same.
#[test]
fn a_read_and_a_write_on_two_queues_replay_in_the_recorded_order() {
    let dir = TempDir::new("replay-xq");
    let img = patterned_image(&dir);
    let rec = dir.join("rec");
    let disk = format!("path={},queues=2", img.display());
    let cmdline =
        "console=ttyS0 tg.scenario=blk-digest tg.blk.count=200 tg.blk.seed=23 tg.blk.xq=1";
    let recorded = digest_run_on(
        &dir,
        &disk,
        cmdline,
        &["--record", rec.to_str().unwrap()],
        |api, _| {
            add_fault_rules(
                api,
                &[&["--ops", "write", "--delay-ms", "3", "--probability", "0.5"]],
            );
        },
    );
    let replayed = digest_run_on(
        &dir,
        &disk,
        cmdline,
        &["--replay", rec.to_str().unwrap()],
        |_, _| {},
    );
    assert_eq!(replayed, recorded);
}
