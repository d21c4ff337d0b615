//! vmmctl as an operator's scripts use it: a closed pipe ends it quietly, a socket of the
//! wrong kind (or none at all, or one that never answers) is named in one line without a hang,
//! global flags go anywhere, the socket may come from $VMMCTL_SOCKET, and relative paths are
//! the caller's.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm_tests::{vmmctl, vmmctl_bin, wait_until, TempDir, TestVm};

const T: Duration = Duration::from_secs(60);

fn idle_vm(dir: &TempDir) -> (TestVm, std::path::PathBuf) {
    let sock = dir.join("api.sock");
    let vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .memory("64M")
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    (vm, sock)
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(vmmctl_bin())
        .args(args)
        .env_remove("VMMCTL_SOCKET")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vmmctl info | head -1` and `vmmctl events | head -1`: the reader goes away, and vmmctl
/// ends with status 0 and nothing on stderr (it used to panic: "failed printing to stdout").
#[test]
fn a_closed_pipe_ends_vmmctl_quietly() {
    let dir = TempDir::new("vmmctl-pipe");
    let (mut vm, sock) = idle_vm(&dir);
    // A pipe whose reading end is closed before vmmctl writes.
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(vmmctl_bin())
        .arg("--socket")
        .arg(&sock)
        .arg("info")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    let mut events = Command::new(vmmctl_bin())
        .arg("--socket")
        .arg(&sock)
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(events.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("subscribed to events"), "{line}");
    drop(events.stdout.take());
    assert_eq!(vmmctl(&sock, &["pause"]).0, 0);
    assert_eq!(vmmctl(&sock, &["resume"]).0, 0);
    let status = events.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(status.code(), Some(0), "{rest}");
    assert_eq!(rest, "");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// Each wrong socket gets one line that says what it is and what to give, with status 2,
/// and none hangs: a blockd's control socket given as a VM's and the other way round, a
/// regular file, a directory, a listener that never answers (--timeout 1), a VM name
/// systemd does not run, and no socket at all.
#[test]
fn the_wrong_kind_of_socket_is_named_and_nothing_hangs() {
    let dir = TempDir::new("vmmctl-peers");
    let (mut vm, sock) = idle_vm(&dir);
    let ctl = dir.join("blockd.sock");
    let mut blockd = Command::new(vmm_tests::blockd_bin())
        .arg("--listen")
        .arg(&ctl)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(T, "blockd's socket", || ctl.exists());
    let mute = dir.join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let (s, c, f, m) = (
        sock.to_str().unwrap(),
        ctl.to_str().unwrap(),
        file.to_str().unwrap(),
        mute.to_str().unwrap(),
    );
    let d = dir.join("");
    let d = d.to_str().unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--socket", c, "info"],
            format!("error: --socket {c}: that is blockd's socket (PID "),
        ),
        (
            vec!["--blockd", s, "disk", "list"],
            format!(
                "error: --blockd {s}: that is vmm-core's socket (PID {})",
                vm.pid()
            ),
        ),
        (
            vec!["--socket", f, "info"],
            format!("error: --socket {f}: a regular file, not a socket; give a VM's API socket"),
        ),
        (
            vec!["--socket", d, "info"],
            format!("error: --socket {d}: a directory, not a socket"),
        ),
        (
            vec!["--socket", m, "--timeout", "1", "info"],
            format!("error: --socket {m}: no answer in 1 s (the listener is "),
        ),
        (
            vec!["--vm", "no-such-vm", "info"],
            "error: --vm no-such-vm (/run/vmm/no-such-vm/api.sock): no such socket".into(),
        ),
        (vec!["info"], "error: say which VM: --socket PATH".into()),
        (
            vec!["--vm", "../etc", "info"],
            "error: --vm \"../etc\": not a VM's name; give the NAME of its unit vmm-core@NAME"
                .into(),
        ),
    ];
    for (args, want) in cases {
        let start = Instant::now();
        let (code, out, err) = run(&args, &[]);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            start.elapsed()
        );
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.starts_with(&want), "{args:?}:\n{err}\nwanted: {want}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
    // Global flags after the command, and the socket from the environment.
    let (code, out, err) = run(&["info", "--json", "--socket", s], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("{\"state\":"), "{out}");
    let (code, out, err) = run(&["info"], &[("VMMCTL_SOCKET", s)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("state:"), "{out}");
    // The VM went on through all of it.
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
    let _ = blockd.kill();
    let _ = blockd.wait();
}

/// A migration pointed at a VM's API socket instead of a destination's --incoming address is
/// named as such (it used to say "the destination refused the VM: ;"), and the VM goes on.
#[test]
fn a_migration_to_an_api_socket_says_it_is_no_destination() {
    let dir = TempDir::new("vmmctl-wrong-dest");
    let (mut vm, sock) = idle_vm(&dir);
    let other = TempDir::new("vmmctl-wrong-dest2");
    let (mut vm2, sock2) = idle_vm(&other);
    let (code, _, err) = vmmctl(&sock, &["migrate", &format!("unix:{}", sock2.display())]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the peer answered, but not as a migration destination; point the migration at the address given to the destination's `vmm-core run --incoming`"),
        "{err}"
    );
    assert!(vmmctl(&sock, &["info"]).1.contains("state:    running"));
    for (s, v) in [(&sock, &mut vm), (&sock2, &mut vm2)] {
        vmmctl(s, &["shutdown", "--force"]);
        assert_eq!(v.wait_exit(T), 0);
    }
}

/// `vmmctl snapshot file:NAME` with a relative NAME writes it in the caller's directory (it
/// used to land in vmm-core's).
#[test]
fn a_relative_snapshot_path_is_the_callers() {
    let dir = TempDir::new("vmmctl-relative");
    let (mut vm, sock) = idle_vm(&dir);
    let caller = TempDir::new("vmmctl-caller");
    let out = Command::new(vmmctl_bin())
        .arg("--socket")
        .arg(&sock)
        .args(["snapshot", "file:rel.snap"])
        .current_dir(caller.join(""))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let want = caller.join("rel.snap");
    assert!(
        text.contains(&format!("saved to file:{}", want.display())),
        "{text}"
    );
    assert!(std::fs::metadata(&want).unwrap().len() > 0);
    assert!(!Path::new("rel.snap").exists());
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// `vmm-core run --config FILE` (TOML, the flags' names) with a flag on the command line
/// that overrides the file, and `vmmctl config` printing the effective settings as JSON.
#[test]
fn a_config_file_runs_a_vm_and_vmmctl_config_prints_what_is_in_force() {
    let dir = TempDir::new("vmmctl-config");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("api.sock");
    let file = dir.join("vm.toml");
    std::fs::write(
        &file,
        format!(
            "kernel = {:?}\ncmdline = \"console=ttyS0 tg.scenario=idle tg.mark=from-the-file\"\n\
             memory = \"128M\"\ncpus = \"1,max=2\"\ndisk = [\"path={},readonly=on\"]\n\
             api-socket = {:?}\nstop-timeout = 5\n",
            vmm_tests::test_guest().display().to_string(),
            img.display(),
            sock.display().to_string()
        ),
    )
    .unwrap();
    let mut vm = TestVm::spawn({
        let mut c = Command::new(vmm_tests::vmm_core_bin());
        c.arg("run")
            .arg("--config")
            .arg(&file)
            .args(["--memory", "96M"]);
        c
    });
    vm.wait_for("tg: ready", T);
    assert!(
        vm.stdout().contains("tg.mark=from-the-file"),
        "{}",
        vm.stdout()
    );
    let (code, json, err) = vmmctl(&sock, &["config"]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "\"cmdline\":\"console=ttyS0 tg.scenario=idle tg.mark=from-the-file\"",
        "\"memory\":\"96M\"",
        "\"cpus\":\"1,max=2\"",
        &format!("\"disk\":[\"path={},readonly=on\"]", img.display()),
        "\"stop-timeout\":5",
        "\"on-reset\":\"exit\"",
        "\"log-level\":\"info\"",
    ] {
        assert!(json.contains(want), "{want} in {json}");
    }
    assert!(
        json.trim().starts_with('{') && json.trim().ends_with('}'),
        "{json}"
    );
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

/// The smaller things an operator met: help texts say what each flag does (and every --disk
/// key), a byte rate takes a size suffix as --bandwidth does, one vCPU is "1 vCPU", and a
/// migration URI error offers no file: (that is a snapshot's).
#[test]
fn help_texts_units_and_plurals_are_right() {
    let help = |args: &[&str]| {
        let out = Command::new(vmmctl_bin()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(help(&["shutdown", "--help"]).contains("Stop the VM at once"));
    assert!(help(&["console", "--help"]).contains("Print what the console's ring holds"));
    assert!(help(&["dirty-rate", "--help"]).contains("How long to measure, in milliseconds"));
    let run = Command::new(vmm_tests::vmm_core_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let run = String::from_utf8_lossy(&run.stdout);
    for key in [
        "format=raw|qcow2",
        "direct=on",
        "rerror=/werror=",
        "throttle.group=NAME",
        "--stop-timeout",
        "--incoming-timeout",
        "--config",
        "--log-level",
    ] {
        assert!(run.contains(key), "{key} in vmm-core run --help");
    }

    let dir = TempDir::new("vmmctl-small");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("api.sock");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .memory("64M")
        .cpus("1,max=2")
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .spawn();
    vm.wait_for("tg: ready", T);
    let (code, out, err) = vmmctl(&sock, &["disk", "throttle", "disk0", "bps-wr=10M"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bps-wr=10485760"), "{out}");
    let (code, out, err) = vmmctl(&sock, &["cpus", "set", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "1 vCPU online");
    let (code, _, err) = vmmctl(&sock, &["migrate", "ftp:host"]);
    assert_eq!(code, 1);
    assert!(err.contains("use tcp:HOST:PORT, unix:PATH, fd:N or exec:COMMAND (file:PATH for a snapshot or a restore)"), "{err}");
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}
