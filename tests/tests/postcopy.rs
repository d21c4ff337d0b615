//! Post-copy migration between real vmm-core processes on real KVM: the destination runs the
//! VM before all of its RAM has come, its page faults (the vCPUs' through vmm-core's
//! userfaultfd, blockd's through its own, which vhost-user's POSTCOPY_ADVISE made) served by
//! migrated from the source. The test guest's `migrate` load checks every word it wrote in
//! the previous pass, so a page that came late, stale or as zeroes is found; every block it
//! saw acknowledged must be on disk intact.

use std::path::Path;
use vmm_tests::mig::{destination_from, disk, first_pass, last_pass, source_cmdline, CMDLINE, T};
use vmm_tests::{check_seq_blocks, vmmctl, wait_until, NetNs, TempDir, TestCa, TestVm};

/// A number after `after` in `text`.
fn num(text: &str, after: &str) -> u64 {
    let i = text
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} in {text}"))
        + after.len();
    text[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("a number after {after:?} in {text}"))
}

/// A JSON field's number in `vmmctl --json migrate status` (flat search: the names are
/// unique in it).
fn json_num(json: &str, key: &str) -> u64 {
    num(json, &format!("\"{key}\":"))
}

/// Runs `vmmctl migrate connect --postcopy ...`, then checks what post-copy must give: the
/// source exits by itself, the guest goes on at the destination from where it was with
/// every word of its last pass intact, the destination says post-copy completed, and every
/// acknowledged block is on disk.
fn postcopy_and_check(
    dir: &TempDir,
    img: &Path,
    (mut src, src_sock): (TestVm, &Path),
    (dst, dst_sock): (TestVm, &Path),
    connect: &str,
    extra: &[&str],
) {
    let mut args = vec!["migrate", connect, "--postcopy"];
    args.extend_from_slice(extra);
    let (code, out, err) = vmmctl(src_sock, &args);
    assert_eq!(
        code,
        0,
        "{args:?}: {out}{err}\n--- source ---\n{}\n--- destination ---\n{}",
        src.stderr(),
        dst.stderr()
    );
    assert!(out.contains("the VM runs there now"), "{out}");
    // It did switch: post-copy carried pages (the guest rewrites 8 MiB per pass, far more
    // than a 1 ms pause could send).
    let carried = num(&out, "post-copy carried ");
    assert!(carried > 0, "{out}");
    assert_eq!(src.wait_exit(T), 0, "the source's log:\n{}", src.stderr());
    let log = src.stderr();
    assert!(log.contains("switching to post-copy"), "{log}");
    assert!(
        log.contains("the VM migrated; it runs on the destination now"),
        "{log}"
    );
    let before = std::fs::read_to_string(dir.join("source.txt")).unwrap();
    let was = last_pass(&before);
    let dst_console = dir.join("dest.txt");
    wait_until(T, "the destination's guest to go on", || {
        last_pass(&std::fs::read_to_string(&dst_console).unwrap_or_default()) >= was + 64
    });
    let after = std::fs::read_to_string(&dst_console).unwrap();
    let first = first_pass(&after);
    assert!(
        first > was && first <= was + 32,
        "the counter went from {was} (source) to {first} (destination): it must go on"
    );
    assert!(
        !after.contains("tg: ready"),
        "the guest booted again:\n{after}"
    );
    let all = format!("{before}{after}");
    assert!(!all.contains("tg: mig error"), "a check failed:\n{all}");
    // The destination's own account: every page came.
    let (code, status, err) = vmmctl(dst_sock, &["--json", "migrate", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(status.contains("\"phase\":\"completed\""), "{status}");
    assert_eq!(json_num(&status, "pages"), carried, "{status}\n{out}");
    assert!(
        dst.stderr().contains("post-copy complete: "),
        "{}",
        dst.stderr()
    );
    drop(dst);
    let acked = check_seq_blocks(img, &all);
    assert!(acked >= 8, "only {acked} blocks were acknowledged:\n{all}");
}

fn dest_with_api(
    dir: &TempDir,
    img: &Path,
    uri: &str,
    ns: Option<&NetNs>,
    extra: &[&str],
) -> (TestVm, std::path::PathBuf) {
    let sock = dir.join("dst.sock");
    let mut args = vec!["--api-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let dst = destination_from(TestVm::builder(), dir, img, uri, ns, &args);
    (dst, sock)
}

/// Post-copy over tcp into another network namespace: the switch after the first pass (a
/// 1 ms limit no pause can meet), the guest's data whole on the destination.
#[test]
fn postcopy_over_tcp_moves_a_dirtying_guest_whole() {
    let dir = TempDir::new("pc-tcp");
    let img = disk(&dir);
    let ns = NetNs::new(3);
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let listen = format!("tcp:{}:4712", ns.ns_addr);
    let (dst, dst_sock) = dest_with_api(&dir, &img, &listen, Some(&ns), &[]);
    postcopy_and_check(
        &dir,
        &img,
        (src, &src_sock),
        (dst, &dst_sock),
        &listen,
        &["--downtime-ms", "1"],
    );
}

/// Post-copy over unix with mutual TLS: the page requests go back over the same TLS
/// session the pages come on.
#[test]
fn postcopy_over_unix_with_tls_moves_a_dirtying_guest_whole() {
    let dir = TempDir::new("pc-tls");
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (dst, dst_sock) = dest_with_api(
        &dir,
        &img,
        &uri,
        None,
        &["--tls-creds", d_creds.to_str().unwrap()],
    );
    postcopy_and_check(
        &dir,
        &img,
        (src, &src_sock),
        (dst, &dst_sock),
        &uri,
        &[
            "--downtime-ms",
            "1",
            "--tls-creds",
            s_creds.to_str().unwrap(),
            "--tls-hostname",
            "dest.test",
        ],
    );
}

/// Post-copy through exec: commands at both ends (socat over a unix socket), with TLS
/// through their pipes: the page requests go back through the commands too.
#[test]
fn postcopy_through_exec_commands_with_tls_moves_a_dirtying_guest_whole() {
    let dir = TempDir::new("pc-exec");
    let img = disk(&dir);
    let ca = TestCa::new("test CA");
    let d_creds = ca.creds(&dir.join("d-creds"), &["dest.test"], "dest.test");
    let s_creds = ca.creds(&dir.join("s-creds"), &["source.test"], "source.test");
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let path = dir.join("relay.sock");
    let incoming = format!("exec:socat - UNIX-LISTEN:{}", path.display());
    let (dst, dst_sock) = dest_with_api(
        &dir,
        &img,
        &incoming,
        None,
        &["--tls-creds", d_creds.to_str().unwrap()],
    );
    wait_until(T, "socat to listen", || path.exists());
    let connect = format!("exec:socat - UNIX-CONNECT:{}", path.display());
    postcopy_and_check(
        &dir,
        &img,
        (src, &src_sock),
        (dst, &dst_sock),
        &connect,
        &[
            "--downtime-ms",
            "1",
            "--tls-creds",
            s_creds.to_str().unwrap(),
            "--tls-hostname",
            "dest.test",
        ],
    );
}

/// blockd's own faults are served. `vmmctl migrate postcopy` switches early in the first
/// pass (most of RAM still on the source), and the background pages crawl at 64 KiB/s, so
/// the guest's disk requests reach pages that are not here yet: the canary buffer high in
/// RAM (tg.mig.canary) is touched first by blockd, whose read fills its first sector and
/// must leave the rest of the page as the guest wrote it on the source. The destination
/// counts the faults its backends' userfaultfds took.
#[test]
fn postcopy_serves_blockds_own_faults_and_its_disk_io_lands_intact() {
    let dir = TempDir::new("pc-blockd");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let cmdline = format!("{CMDLINE} tg.mig.canary=192");
    let mut src = source_cmdline(TestVm::builder(), &cmdline, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (dst, dst_sock) = dest_with_api(&dir, &img, &uri, None, &[]);
    let migrating = {
        let sock = src_sock.clone();
        let uri = uri.clone();
        std::thread::spawn(move || {
            vmmctl(
                &sock,
                &[
                    "migrate",
                    &uri,
                    "--bandwidth",
                    "4M",
                    "--postcopy-bandwidth",
                    "64K",
                ],
            )
        })
    };
    wait_until(T, "the first pass to be under way", || {
        vmmctl(&src_sock, &["migrate", "status"])
            .1
            .contains("phase: pre-copy")
    });
    let (code, out, err) = vmmctl(&src_sock, &["migrate", "postcopy"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("switches to post-copy now"), "{out}");
    let (code, out, err) = migrating.join().unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", src.stderr());
    assert!(out.contains("post-copy carried "), "{out}");
    assert_eq!(src.wait_exit(T), 0, "{}", src.stderr());
    assert!(
        src.stderr()
            .contains("switching to post-copy during pass 1, as asked"),
        "{}",
        src.stderr()
    );
    let before = std::fs::read_to_string(dir.join("source.txt")).unwrap();
    let was = last_pass(&before);
    let dst_console = dir.join("dest.txt");
    wait_until(T, "the destination's guest to go on", || {
        last_pass(&std::fs::read_to_string(&dst_console).unwrap_or_default()) >= was + 64
    });
    let (_, status, _) = vmmctl(&dst_sock, &["--json", "migrate", "status"]);
    assert!(status.contains("\"phase\":\"completed\""), "{status}");
    let backend = json_num(&status, "backend_faults");
    assert!(
        backend > 0,
        "blockd took no fault of its own:\n{status}\n{}",
        dst.stderr()
    );
    assert!(json_num(&status, "requests") > 0, "{status}");
    let after = std::fs::read_to_string(&dst_console).unwrap();
    let all = format!("{before}{after}");
    assert!(
        !all.contains("tg: mig error"),
        "a check failed (a canary lost: blockd read a page that had not come):\n{all}"
    );
    drop(dst);
    let acked = check_seq_blocks(&img, &all);
    assert!(acked >= 8, "only {acked} blocks were acknowledged:\n{all}");
}

/// A guest that writes its RAM faster than the link carries it: pre-copy alone never gets
/// under the 50 ms limit and pauses the VM at --max-passes, far over it ("forced"); with
/// --postcopy the same migration completes with a pause within the limit.
#[test]
fn a_guest_dirtying_faster_than_the_link_moves_only_with_postcopy() {
    let dir = TempDir::new("pc-converge");
    let img = disk(&dir);
    let limits = [
        "--bandwidth",
        "16M",
        "--downtime-ms",
        "50",
        "--max-passes",
        "3",
    ];
    // Pre-copy alone.
    let src_sock = dir.join("src.sock");
    let mut src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (dst, _) = dest_with_api(&dir, &img, &uri, None, &[]);
    let mut args = vec!["migrate", uri.as_str()];
    args.extend_from_slice(&limits);
    let (code, out, err) = vmmctl(&src_sock, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("forced at --max-passes"), "{out}");
    let precopy_paused = num(&out, "paused for ");
    assert!(
        precopy_paused > 50,
        "pre-copy met the limit after all ({out}); the test guest must dirty more"
    );
    assert_eq!(src.wait_exit(T), 0);
    drop(dst);
    // The same with post-copy.
    let _ = std::fs::remove_file(dir.join("dest.txt"));
    let mut src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let (dst, dst_sock) = dest_with_api(&dir, &img, &uri, None, &[]);
    args.push("--postcopy");
    let (code, out, err) = vmmctl(&src_sock, &args);
    assert_eq!(code, 0, "{out}{err}\n{}\n{}", src.stderr(), dst.stderr());
    assert!(!out.contains("forced"), "{out}");
    assert!(out.contains("post-copy carried "), "{out}");
    // The limit, or (on a host loaded by other tests, where the switch itself is slow) far
    // under what pre-copy needed: the pause no longer holds the dirty pages.
    let paused = num(&out, "paused for ");
    assert!(
        paused <= 50 || paused * 4 <= precopy_paused,
        "post-copy paused the VM {paused} ms, pre-copy {precopy_paused} ms: {out}"
    );
    assert_eq!(src.wait_exit(T), 0);
    let dst_console = dir.join("dest.txt");
    wait_until(T, "the destination's guest to go on", || {
        last_pass(&std::fs::read_to_string(&dst_console).unwrap_or_default()) >= 64
    });
    let after = std::fs::read_to_string(&dst_console).unwrap();
    assert!(!after.contains("tg: mig error"), "{after}");
    let (_, status, _) = vmmctl(&dst_sock, &["--json", "migrate", "status"]);
    assert!(status.contains("\"phase\":\"completed\""), "{status}");
}

/// Losing the source during post-copy loses the VM, and the destination says so: it pauses
/// (a channel that broke could be recovered; it cannot tell a dead source from a cut link),
/// names what can be done, and `shutdown --force` ends it at once without waiting for its
/// vCPUs, which wait for pages that will never come (under PVM they cannot even be kicked).
/// No guest code runs on a page that did not come.
#[test]
fn a_source_killed_during_postcopy_pauses_the_destination_and_a_forced_stop_ends_it() {
    let dir = TempDir::new("pc-kill");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (mut dst, dst_sock) = dest_with_api(&dir, &img, &uri, None, &[]);
    let migrating = {
        let sock = src_sock.clone();
        let uri = uri.clone();
        std::thread::spawn(move || {
            vmmctl(
                &sock,
                &[
                    "migrate",
                    &uri,
                    "--postcopy",
                    "--downtime-ms",
                    "1",
                    "--bandwidth",
                    "4M",
                    "--postcopy-bandwidth",
                    "16K",
                ],
            )
        })
    };
    // Before the switch, the status warns what post-copy risks.
    wait_until(T, "the first pass to be under way", || {
        vmmctl(&src_sock, &["migrate", "status"])
            .1
            .contains("phase: pre-copy")
    });
    let (code, out, err) = vmmctl(&src_sock, &["migrate", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("warning: post-copy is on: once it switches, the destination runs the VM while its pages still come, and losing either host or the channel loses the VM"),
        "{out}"
    );
    wait_until(T, "post-copy to be under way", || {
        dst.stderr().contains("the VM is here")
    });
    // The source goes, with the pages the destination still needs.
    src.signal(libc::SIGKILL);
    let (code, out, err) = migrating.join().unwrap();
    assert_ne!(code, 0, "{out}{err}");
    // vmm-core says what the operator can do.
    wait_until(T, "the destination to pause post-copy", || {
        dst.stderr()
            .contains("if the source is gone, the VM is lost (`vmmctl shutdown --force`)")
    });
    assert!(
        dst.stderr().contains("vmm-core: error: post-copy paused: "),
        "{}",
        dst.stderr()
    );
    // A pause would wait for vCPUs that wait for pages: refused, saying why.
    let (code, out, err) = vmmctl(&dst_sock, &["pause"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("post-copy is paused (its channel broke)"),
        "{err}"
    );
    let (code, out, err) = vmmctl(&dst_sock, &["shutdown", "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    let t = std::time::Instant::now();
    assert_ne!(dst.wait_exit(T), 0, "{}", dst.stderr());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    let log = dst.stderr();
    assert!(
        log.contains("the VM stopped before post-copy was over: the pages still missing were at the source only, so it is lost"),
        "{log}"
    );
    let after = std::fs::read_to_string(dir.join("dest.txt")).unwrap_or_default();
    assert!(!after.contains("tg: mig error"), "{after}");
}

/// Restores `snap` lazily: the VM runs at once, its RAM loading from the file as it goes.
fn lazy_restore(dir: &TempDir, snap: &Path, img: &Path) -> (TestVm, std::path::PathBuf) {
    let sock = dir.join("lazy.sock");
    let _ = std::fs::remove_file(dir.join("dest.txt"));
    let vm = TestVm::builder()
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(["--disk", &format!("path={}", img.display())])
        .args([
            "--serial",
            &format!("file={}", dir.join("dest.txt").display()),
        ])
        .args(["--restore", &format!("file:{}", snap.display()), "--lazy"])
        .spawn();
    (vm, sock)
}

/// A snapshot taken while the guest rewrites its RAM and writes its disk, restored lazily:
/// the guest goes on from the snapshot's pass with every word of it intact (pages loaded on
/// its faults, the rest in the background), the load completes, and every block it saw
/// acknowledged is on disk.
#[test]
fn a_lazy_restore_runs_at_once_and_loads_the_whole_snapshot() {
    let dir = TempDir::new("pc-lazy");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let snap = dir.join("snap");
    // With the working set: the pages the guest writes in 100 ms before the pause.
    let (code, out, err) = vmmctl(
        &src_sock,
        &[
            "snapshot",
            &format!("file:{}", snap.display()),
            "--workset-ms",
            "100",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let ws = num(&src.stderr(), "working set: ");
    // The guest rewrites its 8 MiB (2048 pages) on and on: a good part of them in 100 ms,
    // even on a loaded host.
    assert!(ws >= 256, "a working set of {ws} pages:\n{}", src.stderr());
    drop(src);
    let before = std::fs::read_to_string(dir.join("source.txt")).unwrap();
    let (vm, sock) = lazy_restore(&dir, &snap, &img);
    let console = dir.join("dest.txt");
    let was = last_pass(&before);
    wait_until(T, "the restored guest to go on", || {
        last_pass(&std::fs::read_to_string(&console).unwrap_or_default()) >= was + 64
    });
    wait_until(T, "the load to complete", || {
        vmmctl(&sock, &["migrate", "status"])
            .1
            .contains("phase: completed")
    });
    let (_, status, _) = vmmctl(&sock, &["--json", "migrate", "status"]);
    // Every page the snapshot holds was loaded, and the guest's own faults were served.
    let pages = json_num(&status, "pages");
    assert!(pages >= 2048, "only {pages} pages loaded: {status}");
    assert!(json_num(&status, "faults") > 0, "{status}");
    let log = vm.stderr();
    assert!(
        log.contains("--lazy: indexed in ")
            && log.contains("lazy restore complete, every page loaded: "),
        "{log}"
    );
    // The working set's sections went first.
    assert!(
        num(&log, "lazy restore: the ") > 0
            && log.contains("section(s) holding the recorded working set first"),
        "{log}"
    );
    let after = std::fs::read_to_string(&console).unwrap();
    let first = first_pass(&after);
    assert!(first <= was + 16 && first > 0, "from {was} to {first}");
    assert!(!after.contains("tg: mig error"), "a check failed:\n{after}");
    assert!(
        !after.contains("tg: ready"),
        "the guest booted again:\n{after}"
    );
    drop(vm);
    let acked = check_seq_blocks(&img, &format!("{before}{after}"));
    assert!(acked >= 8, "only {acked} blocks acknowledged");
}

/// A snapshot whose RAM is corrupt where a lazy restore has not read it yet: the load finds
/// the bad checksum, and vmm-core ends with the reason rather than let the guest run on a
/// page it could not load (never a zero page in its place).
#[test]
fn a_lazy_restore_of_a_corrupt_snapshot_ends_with_the_reason() {
    let dir = TempDir::new("pc-lazy-bad");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let snap = dir.join("snap");
    let (code, out, err) = vmmctl(
        &src_sock,
        &["snapshot", &format!("file:{}", snap.display())],
    );
    assert_eq!(code, 0, "{out}{err}");
    drop(src);
    // A byte in the middle of the file: inside a RAM section's pages, which the index does
    // not read.
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&snap, &bytes).unwrap();
    let (mut vm, _) = lazy_restore(&dir, &snap, &img);
    assert_eq!(vm.wait_exit(T), 1, "{}", vm.stderr());
    let log = vm.stderr();
    assert!(
        log.contains("lazy restore failed: ")
            && log.contains("fails its checksum; the stream is corrupt")
            && log.contains("the pages still missing cannot be loaded, so this VM cannot go on"),
        "{log}"
    );
    let after = std::fs::read_to_string(dir.join("dest.txt")).unwrap_or_default();
    assert!(!after.contains("tg: mig error"), "{after}");
}

/// A unix-socket relay between a source and a destination, which the test cuts.
struct Relay {
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl Relay {
    /// Listens on `at` and joins the first connection to `to`.
    fn start(at: &Path, to: &Path) -> Relay {
        use std::os::unix::net::{UnixListener, UnixStream};
        let listener = UnixListener::bind(at).unwrap();
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (to, kept) = (to.to_path_buf(), streams.clone());
        std::thread::spawn(move || {
            let (a, _) = listener.accept().unwrap();
            let b = UnixStream::connect(&to).unwrap();
            kept.lock()
                .unwrap()
                .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
            let pump = |mut from: UnixStream, mut into: UnixStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                })
            };
            pump(a.try_clone().unwrap(), b.try_clone().unwrap());
            pump(b, a);
        });
        Relay { streams }
    }

    /// Cuts both connections at once (as a network failure would).
    fn cut(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The channel cut in the middle of post-copy: neither side loses a page. The source keeps
/// the VM paused and says so (postcopy-paused); the destination's VM waits for its missing
/// pages; `vmmctl migrate recover URI` on both hosts resumes post-copy on a new channel, and
/// the guest's data check passes on the destination.
#[test]
fn a_channel_cut_during_postcopy_is_recovered_on_a_new_channel() {
    let dir = TempDir::new("pc-recover");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let mut src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (dst, dst_sock) = dest_with_api(&dir, &img, &uri, None, &[]);
    let relay = Relay::start(&dir.join("relay.sock"), &dir.join("mig.sock"));
    let via = format!("unix:{}", dir.join("relay.sock").display());
    let migrating = {
        let sock = src_sock.clone();
        std::thread::spawn(move || {
            vmmctl(
                &sock,
                &[
                    "migrate",
                    &via,
                    "--bandwidth",
                    "4M",
                    "--postcopy-bandwidth",
                    "64K",
                ],
            )
        })
    };
    wait_until(T, "the first pass to be under way", || {
        vmmctl(&src_sock, &["migrate", "status"])
            .1
            .contains("phase: pre-copy")
    });
    assert_eq!(vmmctl(&src_sock, &["migrate", "postcopy"]).0, 0);
    wait_until(T, "the destination to run the VM", || {
        dst.stderr().contains("the VM is here")
    });
    // Some pages on their way, most still at the source (64 KiB/s in the background).
    std::thread::sleep(std::time::Duration::from_millis(300));
    relay.cut();
    let (code, out, err) = migrating.join().unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("post-copy broke after the destination started the VM")
            && err.contains("stays paused here and cannot resume"),
        "{err}"
    );
    let (_, st, _) = vmmctl(&src_sock, &["migrate", "status"]);
    assert!(st.contains("phase: postcopy-paused"), "{st}");
    wait_until(T, "the destination to pause post-copy", || {
        vmmctl(&dst_sock, &["migrate", "status"])
            .1
            .contains("phase: postcopy-paused")
    });
    assert!(
        dst.stderr().contains("post-copy paused: "),
        "{}",
        dst.stderr()
    );
    // A new channel: the destination listens, the source connects.
    let new = format!("unix:{}", dir.join("recover.sock").display());
    let listening = {
        let (sock, new) = (dst_sock.clone(), new.clone());
        std::thread::spawn(move || vmmctl(&sock, &["migrate", "recover", &new]))
    };
    wait_until(T, "the destination to listen again", || {
        dir.join("recover.sock").exists() || listening.is_finished()
    });
    assert!(
        !listening.is_finished(),
        "{:?}\n{}",
        listening.join().unwrap(),
        dst.stderr()
    );
    let (code, out, err) = vmmctl(&src_sock, &["migrate", "recover", &new]);
    assert_eq!(code, 0, "{out}{err}\n{}\n{}", src.stderr(), dst.stderr());
    assert!(
        out.contains("post-copy resumed on") && out.contains("and is over"),
        "{out}"
    );
    let (code, out, err) = listening.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("post-copy resumes on"), "{out}");
    assert_eq!(src.wait_exit(T), 0, "{}", src.stderr());
    wait_until(T, "post-copy to complete", || {
        vmmctl(&dst_sock, &["migrate", "status"])
            .1
            .contains("phase: completed")
    });
    let before = std::fs::read_to_string(dir.join("source.txt")).unwrap();
    let was = last_pass(&before);
    let console = dir.join("dest.txt");
    wait_until(T, "the destination's guest to go on", || {
        last_pass(&std::fs::read_to_string(&console).unwrap_or_default()) >= was + 64
    });
    let after = std::fs::read_to_string(&console).unwrap();
    let all = format!("{before}{after}");
    assert!(!all.contains("tg: mig error"), "a check failed:\n{all}");
    assert!(
        dst.stderr().contains("post-copy resumes on a new channel"),
        "{}",
        dst.stderr()
    );
    drop(dst);
    let acked = check_seq_blocks(&img, &all);
    assert!(acked >= 8, "only {acked} blocks acknowledged");
}

/// A blockd that cannot open /dev/userfaultfd (an unprivileged user's, as under its systemd
/// unit) still joins post-copy on the destination: vmm-core opens the device and hands it
/// over, and blockd makes its userfaultfd from that.
#[test]
fn an_unprivileged_blockd_joins_postcopy_with_the_device_vmm_core_hands_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("pc-unpriv");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    // blockd as nobody, on a socket in a directory it may write.
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ctl = run.join("blockd.sock");
    struct Ends(std::process::Child);
    impl Drop for Ends {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _blockd = Ends(
        std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(vmm_tests::blockd_bin())
            .args(["--listen", ctl.to_str().unwrap()])
            .stderr(std::fs::File::create(dir.join("blockd.log")).unwrap())
            .spawn()
            .expect("setpriv (util-linux) must be installed"),
    );
    wait_until(T, "the unprivileged blockd to listen", || ctl.exists());
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (dst, dst_sock) = dest_with_api(
        &dir,
        &img,
        &uri,
        None,
        &["--blockd-socket", ctl.to_str().unwrap()],
    );
    postcopy_and_check(
        &dir,
        &img,
        (src, &src_sock),
        (dst, &dst_sock),
        &uri,
        &["--downtime-ms", "1"],
    );
    let log = std::fs::read_to_string(dir.join("blockd.log")).unwrap();
    assert!(
        log.contains("disk0: post-copy: a userfaultfd for the frontend"),
        "{log}"
    );
}

/// The guest powers off during post-copy (the ACPI power button on the destination): its
/// end waits for the last page, so that the source sees post-copy complete and exits, and
/// the destination then powers off.
#[test]
fn a_guest_that_powers_off_during_postcopy_waits_for_the_last_page() {
    let dir = TempDir::new("pc-poweroff");
    let img = disk(&dir);
    let src_sock = dir.join("src.sock");
    let mut src = source_cmdline(TestVm::builder(), CMDLINE, &dir, &img, &src_sock);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (mut dst, dst_sock) = dest_with_api(&dir, &img, &uri, None, &[]);
    let migrating = {
        let (sock, uri) = (src_sock.clone(), uri.clone());
        std::thread::spawn(move || {
            vmmctl(
                &sock,
                &[
                    "migrate",
                    &uri,
                    "--postcopy",
                    "--downtime-ms",
                    "1",
                    "--postcopy-bandwidth",
                    "256K",
                ],
            )
        })
    };
    wait_until(T, "the destination to run the VM", || {
        dst.stderr().contains("the VM is here")
    });
    let (code, out, err) = vmmctl(&dst_sock, &["shutdown"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = migrating.join().unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", dst.stderr());
    assert_eq!(src.wait_exit(T), 0, "{}", src.stderr());
    assert_eq!(dst.wait_exit(T), 0, "{}", dst.stderr());
    let log = dst.stderr();
    let (done, off) = (
        log.find("post-copy complete: "),
        log.find("guest powered off"),
    );
    assert!(
        log.contains("that happens once every page is here")
            && done.is_some()
            && off.is_some()
            && done < off,
        "{log}"
    );
    let after = std::fs::read_to_string(dir.join("dest.txt")).unwrap();
    assert!(after.contains("tg: power button"), "{after}");
    assert!(!after.contains("tg: mig error"), "{after}");
}
