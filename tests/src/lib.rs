//! The `TestVm` fixture: starts vmm-core (a real process, on real KVM) with a guest, collects
//! its console and log, waits for guest markers, and ends every process it started.

pub mod mig;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The test guest ELF that tests/build.rs built.
pub fn test_guest() -> PathBuf {
    PathBuf::from(env!("TEST_GUEST_ELF"))
}

/// vmm-core from the same target directory as this test binary (or $VMM_CORE_BIN).
pub fn vmm_core_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMM_CORE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join("vmm-core");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build --workspace` (the README's test command does)",
        bin.display()
    );
    bin
}

/// vmmctl from the same target directory as vmm-core.
pub fn vmmctl_bin() -> PathBuf {
    vmm_core_bin().with_file_name("vmmctl")
}

/// blockd from the same target directory as vmm-core.
pub fn blockd_bin() -> PathBuf {
    vmm_core_bin().with_file_name("blockd")
}

/// A tool scripts/setup.sh builds into target/tools/bin (such as rust-vmm's vhost-device-rng).
pub fn tool(name: &str) -> PathBuf {
    let bin = vmm_core_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join("tools/bin")
        .join(name);
    assert!(
        bin.exists(),
        "{} does not exist: scripts/setup.sh installs it (the README's test command runs it)",
        bin.display()
    );
    bin
}

/// Runs `vmmctl --socket SOCKET ARGS`; returns (exit code, stdout, stderr).
pub fn vmmctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vmmctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmmctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The PIDs of a process's children (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// A process's name (its comm), or "" once it is gone.
pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Waits until `f` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh path for a test's API socket (the VMM removes the socket when it exits).
pub fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-test-{}-{name}.sock", std::process::id()))
}

/// Where scripts/build-images.sh leaves the stock kernel and initramfs.
pub fn images_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMM_IMAGES_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("vmm").join("images")
}

/// Fails the test (never skips it) when KVM cannot be opened.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs KVM, but /dev/kvm cannot be opened: {e}");
    }
}

/// The host's /dev/kvm is KVM-PVM (software nested virtualisation); see GUEST.md.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[derive(Default)]
struct Captured {
    stdout: String,
    stderr: String,
    closed: usize,
}

/// A running vmm-core and what it has printed so far.
pub struct TestVm {
    child: Child,
    captured: Arc<(Mutex<Captured>, Condvar)>,
    status: Option<ExitStatus>,
    /// Paths the VMM would remove on a clean exit (its API socket), removed on drop.
    cleanup: Vec<PathBuf>,
    /// vmm-core's standard input, when the builder asked for a pipe.
    stdin: Option<std::process::ChildStdin>,
    /// Its own XDG_RUNTIME_DIR (where vmm-core makes its run directory), removed on drop:
    /// a vmm-core a test kills cannot remove what it made there.
    runtime: Option<PathBuf>,
}

pub struct Builder {
    args: Vec<String>,
    kernel: PathBuf,
    stdin: bool,
    env: Vec<(String, String)>,
    netns: Option<String>,
    fds: Vec<(std::os::fd::OwnedFd, i32)>,
    own_group: bool,
}

impl Builder {
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = path.into();
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn cpus(self, spec: &str) -> Self {
        self.arg("--cpus").arg(spec)
    }

    pub fn memory(self, spec: &str) -> Self {
        self.arg("--memory").arg(spec)
    }

    pub fn cmdline(self, c: &str) -> Self {
        self.arg("--cmdline").arg(c)
    }

    /// Set an environment variable for vmm-core.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Give vmm-core a pipe as standard input (see `TestVm::write_stdin`), not /dev/null.
    pub fn stdin_piped(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// vmm-core inherits `fd` as its descriptor `n` (for an fd:N migration channel).
    pub fn inherit_fd(mut self, fd: std::os::fd::OwnedFd, n: i32) -> Self {
        self.fds.push((fd, n));
        self
    }

    /// Starts vmm-core in a process group of its own (its helpers join it).
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// Runs vmm-core inside a network namespace (see `NetNs`).
    pub fn in_netns(mut self, ns: &NetNs) -> Self {
        self.netns = Some(ns.name.clone());
        self
    }

    pub fn spawn(self) -> TestVm {
        require_kvm();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(vmm_core_bin());
                c
            }
            None => Command::new(vmm_core_bin()),
        };
        static RUNTIMES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let runtime = std::env::temp_dir().join(format!(
            "vmm-test-rt-{}-{}",
            std::process::id(),
            RUNTIMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&runtime).expect("a runtime directory for vmm-core");
        cmd.arg("run")
            .arg("--kernel")
            .arg(&self.kernel)
            .args(&self.args)
            .env("XDG_RUNTIME_DIR", &runtime)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if self.own_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let fds: Vec<(i32, i32)> = self
            .fds
            .iter()
            .map(|(fd, n)| (std::os::fd::AsRawFd::as_raw_fd(fd), *n))
            .collect();
        if !fds.is_empty() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only dup2 (async-signal-safe) in the child: each descriptor lands on its
            // number without close-on-exec. (Our copies stay open until spawn returns.)
            unsafe {
                cmd.pre_exec(move || {
                    for &(fd, n) in &fds {
                        let r = if fd == n {
                            libc::fcntl(fd, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, n)
                        };
                        if r < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut vm = TestVm::spawn_with(cmd, self.stdin);
        vm.runtime = Some(runtime);
        vm.cleanup = self
            .args
            .windows(2)
            .filter(|w| w[0] == "--api-socket")
            .map(|w| PathBuf::from(&w[1]))
            .collect();
        vm
    }
}

impl TestVm {
    /// A VM with the test guest; add arguments, then `spawn`.
    pub fn builder() -> Builder {
        Builder {
            args: Vec::new(),
            kernel: test_guest(),
            stdin: false,
            env: Vec::new(),
            netns: None,
            fds: Vec::new(),
            own_group: false,
        }
    }

    /// Starts any vmm-core command line, capturing stdout (the console) and stderr (the log).
    pub fn spawn(cmd: Command) -> TestVm {
        TestVm::spawn_with(cmd, false)
    }

    fn spawn_with(mut cmd: Command, piped_stdin: bool) -> TestVm {
        cmd.stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // If the test process dies without dropping us (killed by a timeout), vmm-core goes
        // too, and its helpers with it.
        // SAFETY: prctl is async-signal-safe and only sets this child's parent-death signal.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("cannot start vmm-core");
        let stdin = child.stdin.take();
        let captured = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (mut pipe, is_err) in [
            (Box::new(out) as Box<dyn Read + Send>, false),
            (Box::new(err), true),
        ] {
            let captured = captured.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = pipe.read(&mut buf).unwrap_or(0);
                    let (lock, cv) = &*captured;
                    let mut c = lock.lock().unwrap();
                    if n == 0 {
                        c.closed += 1;
                        cv.notify_all();
                        return;
                    }
                    let s = String::from_utf8_lossy(&buf[..n]);
                    if is_err {
                        c.stderr.push_str(&s)
                    } else {
                        c.stdout.push_str(&s)
                    }
                    cv.notify_all();
                }
            });
        }
        TestVm {
            child,
            captured,
            status: None,
            cleanup: Vec::new(),
            runtime: None,
            stdin,
        }
    }

    /// Writes to vmm-core's standard input (the builder must have asked for `stdin_piped`).
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self
            .stdin
            .as_mut()
            .expect("build the VM with stdin_piped()");
        stdin.write_all(bytes).expect("write to vmm-core's stdin");
    }

    /// The PIDs of vmm-core's child processes (its helpers).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the VM's one helper named `name` (its child, by PID) and waits until
    /// vmm-core says it started the `restart`th one in its place.
    pub fn kill_helper(&self, name: &str, restart: u32) {
        let pids: Vec<u32> = self
            .children()
            .into_iter()
            .filter(|p| process_name(*p) == name)
            .collect();
        assert_eq!(pids.len(), 1, "{name}: {pids:?}");
        // SAFETY: SIGKILL to a helper this test's vmm-core started (its child, by PID).
        unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
        let said = format!("restarted {name} (restart {restart})");
        wait_until(Duration::from_secs(60), &said, || {
            self.stderr().contains(&said)
        });
    }

    pub fn stdout(&self) -> String {
        self.captured.0.lock().unwrap().stdout.clone()
    }

    pub fn stderr(&self) -> String {
        self.captured.0.lock().unwrap().stderr.clone()
    }

    /// Waits until the console shows `marker`; returns the console's line that holds it, once
    /// that line is complete (or the VMM has exited).
    pub fn wait_for(&self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.captured;
        let mut c = lock.lock().unwrap();
        loop {
            if let Some(pos) = c.stdout.find(marker) {
                let start = c.stdout[..pos].rfind('\n').map_or(0, |i| i + 1);
                let end = c.stdout[pos..].find('\n').map(|i| pos + i);
                if let Some(end) = end.or((c.closed == 2).then_some(c.stdout.len())) {
                    return c.stdout[start..end].trim_end().to_string();
                }
            }
            let now = Instant::now();
            if now >= deadline || c.closed == 2 {
                panic!(
                    "{marker:?} did not appear within {timeout:?}{}\n--- console ---\n{}\n--- log ---\n{}",
                    if c.closed == 2 { " (vmm-core exited)" } else { "" },
                    c.stdout,
                    c.stderr
                );
            }
            c = cv.wait_timeout(c, deadline - now).unwrap().0;
        }
    }

    /// Waits for vmm-core to exit; returns its exit code (or 128+signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("waitpid") {
                self.status = Some(s);
                // Let the readers drain the pipes (for 5 s at most: a helper that outlived
                // vmm-core may hold them open).
                let (lock, cv) = &*self.captured;
                let mut c = lock.lock().unwrap();
                let drained = Instant::now() + Duration::from_secs(5);
                while c.closed < 2 && Instant::now() < drained {
                    c = cv.wait_timeout(c, Duration::from_millis(100)).unwrap().0;
                }
                use std::os::unix::process::ExitStatusExt;
                return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            }
            if Instant::now() >= deadline {
                panic!(
                    "vmm-core did not exit within {timeout:?}\n--- console ---\n{}\n--- log ---\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal to this vmm-core (by its PID, which we started).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on the PID of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// The value of `key=` on the first console line holding `prefix`.
    pub fn field(&self, prefix: &str, key: &str) -> Option<String> {
        let out = self.stdout();
        let line = out.lines().find(|l| l.contains(prefix))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim().to_string())
    }
}

impl Drop for TestVm {
    /// A VM the test left running gets SIGINT first (SIGTERM would ask the guest and wait),
    /// so that vmm-core ends its helpers and removes what it made (sockets, its run
    /// directory); SIGKILL after 10 s.
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for p in &self.cleanup {
            let _ = std::fs::remove_file(p);
        }
        if let Some(rt) = &self.runtime {
            let _ = std::fs::remove_dir_all(rt);
        }
    }
}

/// The `blk` scenario's zeroed ranges (first sector, sectors): discard, write-zeroes,
/// write-zeroes with unmap (tests/guest/src/main.rs).
pub const BLK_ZERO_RANGES: [(u64, u64); 3] = [(8, 16), (40, 16), (80, 16)];

/// The `blk` scenario's data pattern of `bytes` bytes for `seed`: what the host writes for the
/// guest to check (tg.blk.host) and what the guest writes (tg.blk.seed).
pub fn blk_pattern(bytes: u64, seed: u64) -> Vec<u8> {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..bytes / 8)
        .flat_map(|w| (w.wrapping_add(seed)).wrapping_mul(K).to_le_bytes())
        .collect()
}

/// Asserts `data` holds what the `blk` scenario writes with `seed`: its pattern, with the
/// zeroed ranges zero (`what` names it in the failure).
pub fn assert_blk_written(data: &[u8], seed: u64, what: &str) {
    let mut want = blk_pattern(data.len() as u64, seed);
    for (sector, n) in BLK_ZERO_RANGES {
        want[(sector * 512) as usize..((sector + n) * 512) as usize].fill(0);
    }
    let first_bad = data.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "{what}: differs from the guest's pattern");
}

/// A helper process a test started (a blockd, a client): SIGTERM and reaped when the test
/// ends, passed or not.
pub struct Terminated(pub std::process::Child);

impl Drop for Terminated {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: SIGTERM to a child this test started and has not reaped (try_wait just
            // found it running, so its PID is still its own).
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// A temporary directory (world-readable, unique per process and name), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(d)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test guest's CPL3 workload, computed on the host to check what the guest computed.
pub fn user_work_reference(iterations: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..iterations {
        x ^= i;
        x = x.wrapping_mul(0x0000_0100_0000_01b3);
        x ^= x >> 29;
    }
    x
}

pub const SEQ_MAGIC: u64 = 0x5345_515f_424c_4b21;
const SEQ_K: u64 = 0x9E37_79B9_7F4A_7C15;

/// The sequence numbers the guest logged as acknowledged, in the order it logged them.
pub fn seq_acks(out: &str) -> Vec<u64> {
    // Only whole lines: the last one may still be arriving.
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.strip_prefix("tg: ack "))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

/// Whether block `seq` of a `blk-seq` run is in `data` (a raw image of `blocks` 4 KiB
/// blocks, where block `seq % blocks` holds it) whole: magic, sequence number, words, checksum.
pub fn seq_block_intact(data: &[u8], blocks: u64, seq: u64) -> bool {
    let at = ((seq % blocks) * 4096) as usize;
    let Some(block) = data.get(at..at + 4096) else {
        return false;
    };
    let word = |j: usize| u64::from_le_bytes(block[j * 8..j * 8 + 8].try_into().unwrap());
    let mut sum = 0u64;
    for j in 3..512u64 {
        let w = ((seq << 32) | j).wrapping_mul(SEQ_K);
        if word(j as usize) != w {
            return false;
        }
        sum = sum.rotate_left(5) ^ w;
    }
    word(0) == SEQ_MAGIC && word(1) == seq && word(2) == sum
}

/// Every acknowledged block of the guest's `blk-seq` run is in the image with its magic,
/// sequence number, words and checksum; returns how many were checked.
pub fn check_seq_blocks(img: &Path, out: &str) -> u64 {
    let data = std::fs::read(img).unwrap();
    let mut acked = 0;
    for seq in seq_acks(out) {
        let block = &data[(seq as usize) * 4096..(seq as usize + 1) * 4096];
        let word = |j: usize| u64::from_le_bytes(block[j * 8..j * 8 + 8].try_into().unwrap());
        assert_eq!(word(0), SEQ_MAGIC, "block {seq}: no magic");
        assert_eq!(word(1), seq, "block {seq}: wrong sequence number");
        let mut sum = 0u64;
        for j in 3..512u64 {
            let w = ((seq << 32) | j).wrapping_mul(SEQ_K);
            assert_eq!(word(j as usize), w, "block {seq}: word {j}");
            sum = sum.rotate_left(5) ^ w;
        }
        assert_eq!(word(2), sum, "block {seq}: checksum");
        acked += 1;
    }
    acked
}

/// A network namespace of the test's own, joined to this one by a veth pair: this side has
/// `10.231.N.1/30`, the namespace `10.231.N.2/30` (N picks the subnet, one per test).
/// Deleted on drop.
pub struct NetNs {
    pub name: String,
    pub host_addr: String,
    pub ns_addr: String,
    veth: String,
}

impl NetNs {
    pub fn new(n: u8) -> NetNs {
        let name = format!("vmmt{}-{n}", std::process::id());
        let veth = format!("vt{}{n}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (host_addr, ns_addr) = (format!("10.231.{n}.1"), format!("10.231.{n}.2"));
        let peer = format!("{veth}p");
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            name: name.clone(),
            host_addr: host_addr.clone(),
            ns_addr: ns_addr.clone(),
            veth: veth.clone(),
        };
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_addr}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A certificate authority for TLS tests (rcgen, on ring).
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { params, key, pem }
    }

    /// A leaf certificate, valid now or (with `now` false) expired in 2001.
    fn leaf_valid(&self, cn: &str, names: &[&str], now: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if !now {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A tls-creds directory (QEMU's layout): this CA, a server certificate for `server_names`
    /// (CN server.test), and a client certificate with subject CN=`client_cn`.
    pub fn creds(&self, dir: &Path, server_names: &[&str], client_cn: &str) -> PathBuf {
        self.creds_valid(dir, server_names, client_cn, true)
    }

    /// The same, with both certificates expired (in 2001) unless `now`.
    pub fn creds_valid(
        &self,
        dir: &Path,
        server_names: &[&str],
        client_cn: &str,
        now: bool,
    ) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let (sc, sk) = self.leaf_valid("server.test", server_names, now);
        let (cc, ck) = self.leaf_valid(client_cn, &[], now);
        for (f, t) in [
            ("ca-cert.pem", &self.pem),
            ("server-cert.pem", &sc),
            ("server-key.pem", &sk),
            ("client-cert.pem", &cc),
            ("client-key.pem", &ck),
        ] {
            std::fs::write(dir.join(f), t).unwrap();
        }
        dir.to_path_buf()
    }
}

/// A mounted crashfs, ended (and unmounted) on drop.
pub struct CrashFs {
    child: Child,
    mnt: PathBuf,
    out: PathBuf,
}

impl CrashFs {
    /// crashfs serving a copy of `image` (the binary: the test's CARGO_BIN_EXE_crashfs).
    pub fn start(crashfs: &Path, dir: &TempDir, image: &Path) -> CrashFs {
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let out = dir.join("durable.img");
        let child = Command::new(crashfs)
            .arg(&mnt)
            .arg(&out)
            .arg(image)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start crashfs");
        let fs = CrashFs { child, mnt, out };
        wait_until(Duration::from_secs(60), "crashfs to serve", || {
            fs.image().exists()
        });
        fs
    }

    pub fn image(&self) -> PathBuf {
        self.mnt.join("disk.img")
    }

    /// The power cut: crashfs writes out what was durable and ends.
    pub fn power_cut(mut self) -> Vec<u8> {
        // SAFETY: SIGTERM to the crashfs this test started, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "crashfs: {status}");
        std::fs::read(&self.out).unwrap()
    }
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in power_cut.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        // crashfs unmounts as it ends, but not while the killed blockd's process still holds
        // the image open (seen under load): then the mount outlives it and its directory
        // cannot be removed. Detached lazily here, so the test leaves nothing behind.
        let mounted = std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(4) == Some(&*self.mnt.to_string_lossy()))
        });
        if mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// One side's TLS settings for the benchmark tools (tls-bench, stream-bench), from CREDS_DIR
/// in QEMU's tls-creds layout; a bad directory ends the tool with its error.
pub fn bench_tls(creds: &str, server: bool) -> migrated::tls::Tls {
    match migrated::tls::Creds::read(Path::new(creds), server) {
        Ok(c) => migrated::tls::Tls {
            dir: creds.to_string(),
            creds: c,
            ..Default::default()
        },
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// Reads `r` to its end (an end without TLS close_notify counts as one), discarding what it
/// reads; the bytes read. For the benchmark tools' receiving ends.
pub fn drain(r: &mut impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}
