//! chardevd runs sandboxed by default: its own mount, PID, net, IPC and UTS namespaces, an
//! empty read-only root, no capabilities, no_new_privs, and uid 65534. With --no-sandbox it
//! runs as started (for debugging).

use std::time::Duration;
use vmm_tests::{children_of, process_name, socket_path, vmmctl, wait_until, TestVm};

const T: Duration = Duration::from_secs(60);

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// vmm-core's chardevd, and the sandboxed process inside it (if it forked into one).
fn chardevd(vm: &TestVm) -> (u32, Option<u32>) {
    let mut found = None;
    wait_until(T, "chardevd", || {
        found = vm
            .children()
            .into_iter()
            .find(|&p| process_name(p) == "chardevd");
        found.is_some()
    });
    let outer = found.unwrap();
    (outer, children_of(outer).first().copied())
}

#[test]
fn chardevd_runs_in_its_own_namespaces_with_no_privileges_and_an_empty_root() {
    let sock = socket_path("sandbox");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();
    vm.wait_for("tg: ready", T);
    let (_, inner) = chardevd(&vm);
    let pid = inner.expect("the sandboxed chardevd, a child of the one vmm-core started");
    assert_eq!(status_field(pid, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    // PID 1 of its own PID namespace.
    assert_eq!(
        status_field(pid, "NSpid").split_whitespace().last(),
        Some("1")
    );
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "its root holds {root:?}");
    // And it serves: the console reached the test through it.
    assert!(vm.stdout().contains("tg: ready"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}

#[test]
fn with_no_sandbox_chardevd_runs_as_started_and_still_serves() {
    let tmp = vmm_tests::TempDir::new("no-sandbox");
    let file = tmp.join("console.log");
    let sock = socket_path("no-sandbox");
    let mut vm = TestVm::builder()
        .cmdline("tg.scenario=idle")
        .args(["--no-sandbox", "--api-socket", sock.to_str().unwrap()])
        .args(["--serial", &format!("file={}", file.display())])
        .spawn();
    wait_until(T, "the console in the file", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("tg: ready"))
    });
    let (outer, inner) = chardevd(&vm);
    assert_eq!(inner, None, "no sandboxed child");
    assert_eq!(
        status_field(outer, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(ns(&outer.to_string(), "mnt"), ns("self", "mnt"));
    vmmctl(&sock, &["shutdown", "--force"]);
    assert_eq!(vm.wait_exit(T), 0);
}
