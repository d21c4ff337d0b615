//! The management API (proto/schema/vmm.capnp) on a Unix socket. One thread runs a
//! current-thread tokio runtime for every connection (capnp-rpc is !Send). Reads are answered
//! from shared status; anything that changes the VM goes to the VM's main loop as an event and
//! waits for its answer there.

use crate::control::{ApiRequest, Request, VmEvent};
use crate::events::Events;
use crate::helpers::blockd::BlockdError;
use futures::channel::oneshot;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_proto::vmm_capnp::{self, vmm};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-socket {0}: another process is serving it; stop it or choose another path")]
    InUse(PathBuf),
    #[error("--api-socket {0}: exists and is not a socket; choose another path")]
    NotASocket(PathBuf),
    #[error("--api-socket {0}: cannot listen on it ({1})")]
    Bind(PathBuf, std::io::Error),
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// One vCPU as `cpus` reports it.
#[derive(Debug, Clone)]
pub struct VcpuStatus {
    pub id: u32,
    /// running (a thread runs it), parked (its KVM fd waits for reuse), or absent.
    pub state: &'static str,
    /// How many times its parked KVM fd was reused by a hot-add.
    pub reuses: u32,
}

/// What `info` reports; the VM's main loop keeps it current.
/// Where the VM is in its life, besides running or paused (QMP's run states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Running or paused (`Status::paused` says which).
    #[default]
    Here,
    /// Waiting for a migration source, or reading a snapshot: no VM yet.
    Incoming,
    /// A live migration is sending it.
    Migrating,
    /// It runs on the destination now; this vmm-core is ending.
    PostMigrate,
    /// Being stopped: SIGTERM's wait for the guest to power off.
    Shutdown,
}

impl Phase {
    pub fn name(self, paused: bool) -> &'static str {
        match self {
            Phase::Here if paused => "paused",
            Phase::Here => "running",
            Phase::Incoming => "incoming",
            Phase::Migrating => "migrating",
            Phase::PostMigrate => "postmigrate",
            Phase::Shutdown => "shutdown",
        }
    }
}

impl Shared {
    /// Moves the VM to `phase`, with a `state` event naming the new state.
    pub fn set_phase(&self, phase: Phase) {
        let name = {
            let mut st = self.status.lock().unwrap();
            if st.phase == phase {
                return;
            }
            st.phase = phase;
            phase.name(st.paused)
        };
        self.events.emit("state", name);
    }
}

#[derive(Debug, Clone)]
pub struct Status {
    pub phase: Phase,
    pub paused: bool,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory: u64,
    pub kernel: String,
    pub cmdline: String,
    pub boots: u32,
    pub vcpus: Vec<VcpuStatus>,
    /// KVM_CREATE_VCPU calls in this boot of the VM.
    pub vcpus_created: u32,
    /// Pages the guest wrote while the dirty log was last on (`dirtyRate`).
    pub dirty_pages: u64,
}

pub struct Shared {
    /// The effective run settings, as `vmmctl config` prints them.
    pub config_json: std::sync::Mutex<String>,
    /// What the VM is (kernel, initramfs, command line, memory, vCPUs, disks) as a --config
    /// file: a snapshot carries it, and `run --restore` takes it.
    pub spec_toml: std::sync::Mutex<String>,
    /// The VM's disks' blockd (statistics for `disks`).
    pub blockd: Mutex<Option<crate::helpers::blockd::Blockd>>,
    pub status: Mutex<Status>,
    pub started: Instant,
    pub events: Arc<Events>,
    /// The console's chardevd device, when it has one.
    pub console: Mutex<Option<crate::helpers::chardevd::ControlSender>>,
    /// --record/--replay: where the console's log stands ("recording, 3 input(s)").
    pub console_replay: std::sync::OnceLock<Arc<crate::control::LogProgress>>,
    /// --record/--replay with an rng: where its log stands (chardevd reads or writes it; the
    /// offset is shared with this copy of its descriptor).
    pub rng_replay: std::sync::OnceLock<crate::control::SharedLog>,
    /// --record/--replay: how many bytes the guest has written to its console (a snapshot
    /// of a recording VM keeps it with its marks).
    pub console_written: std::sync::OnceLock<Arc<crate::control::ConsoleWritten>>,
    /// The console's output (for attached viewers) and where their input goes, when the
    /// console is served by chardevd.
    pub console_view: std::sync::OnceLock<(
        Arc<crate::helpers::chardevd::ConsoleBuffer>,
        crate::helpers::chardevd::InputFn,
    )>,
    /// migrated, started with the VM.
    pub migrated: std::sync::OnceLock<Arc<crate::helpers::migrated::Migrated>>,
    /// The current or last migration's progress.
    pub migration: crate::migration::Progress,
    /// --incoming's TLS settings (a post-copy recovery on the destination listens with them).
    pub incoming_tls: crate::migration::TlsOptions,
    /// Disk commits under way: a migration or snapshot waits for them.
    pub commits: Mutex<Vec<String>>,
}

/// The devices every VM has: name, kind, and where it is.
const FIXED_DEVICES: &[(&str, &str, &str)] = &[
    (
        "pvpanic0",
        "pvpanic",
        "I/O 0x505 (ACPI QEMU0001): the guest reports a panic",
    ),
    (
        "power0",
        "ACPI power button",
        "GED (ACPI0013) at I/O 0x610, GSI 9; PM registers at I/O 0x600",
    ),
];

/// The consoles by name; only serial0 so far.
const CONSOLES: &[&str] = &["serial0"];

/// The listening socket, removed again when the VMM ends.
pub struct ApiSocket {
    path: PathBuf,
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The API thread's system calls beyond the helpers' common base (it is, like them, a tokio
/// server on Unix sockets).
pub fn allowlist() -> Vec<vmm_sandbox::seccomp::Allow> {
    use vmm_sandbox::seccomp::allow;
    vec![
        allow(
            "geteuid",
            "peers with another uid are refused (SO_PEERCRED)",
        ),
        allow("pipe2", "tokio's signal pipe"),
        allow(
            "lseek",
            "where the rng's record/replay log stands (the offset chardevd shares)",
        ),
        allow(
            "wait4",
            "tokio's process driver (part of its I/O driver) reaps, on SIGCHLD, children another runtime of vmm-core dropped (its orphan queue is process-wide)",
        ),
    ]
}

/// Binds the socket (mode 0600) and starts serving it on its own thread.
pub fn start(
    path: &Path,
    shared: Arc<Shared>,
    events: Sender<VmEvent>,
    seccomp: Option<vmm_sandbox::seccomp::Mode>,
) -> Result<ApiSocket, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        // A socket nobody listens on, left over from a VMM that was killed: replaced.
    }
    let listener =
        vmm_proto::unix::bind(path, 0o600).map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
    let guard = ApiSocket {
        path: path.to_path_buf(),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Some(mode) = seccomp {
                let list = vmm_sandbox::seccomp::with_base(allowlist());
                if let Err(e) =
                    vmm_sandbox::seccomp::install("vmm-core (the API thread)", &list, mode)
                {
                    log::error!("API: cannot install its seccomp filter ({e}); it does not serve");
                    return;
                }
            }
            serve(listener, shared, events)
        })
        .map_err(ApiError::Thread)?;
    Ok(guard)
}

fn serve(listener: std::os::unix::net::UnixListener, shared: Arc<Shared>, events: Sender<VmEvent>) {
    let ran = vmm_proto::rpc::run_local(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("API: cannot use the socket: {e}");
                return;
            }
        };
        let me = nix::unistd::geteuid().as_raw();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("API: accept failed: {e}");
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
                Ok(cred) => {
                    log::warn!("API: refused a connection from uid {} (only uid {me} and root may manage this VM)", cred.uid());
                    continue;
                }
                Err(e) => {
                    log::warn!("API: refused a connection whose peer cannot be identified: {e}");
                    continue;
                }
            }
            let client: vmm::Client = capnp_rpc::new_client(VmmServer {
                shared: shared.clone(),
                events: events.clone(),
            });
            let rpc = vmm_proto::rpc::server(stream, client.client);
            tokio::task::spawn_local(async move {
                if let Err(e) = rpc.await {
                    log::warn!("API: connection closed: {e}");
                }
            });
        }
    });
    if let Err(e) = ran {
        log::error!("API: cannot start its runtime: {e}");
    }
}

/// Where an attached viewer's keystrokes go: the guest's console input.
struct ViewerInput(crate::helpers::chardevd::InputFn);

impl vmm_capnp::byte_sink::Server for ViewerInput {
    async fn write(
        self: capnp::capability::Rc<Self>,
        params: vmm_capnp::byte_sink::WriteParams,
        _: vmm_capnp::byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        (self.0)(params.get()?.get_data()?);
        Ok(())
    }
}

struct VmmServer {
    shared: Arc<Shared>,
    events: Sender<VmEvent>,
}

/// A failure as the API's client reads it: the whole chain, on one line.
fn failed(e: &dyn std::error::Error) -> capnp::Error {
    capnp::Error::failed(crate::error_chain(e))
}

impl VmmServer {
    async fn ask(&self, request: Request) -> Result<(), capnp::Error> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(VmEvent::Api(ApiRequest { request, reply }))
            .map_err(|_| capnp::Error::failed("the VM is shutting down".into()))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(failed(&e)),
            Err(_) => Err(capnp::Error::failed(
                "the VM stopped before answering".into(),
            )),
        }
    }
}

/// Checks a console name from a request ("" is serial0).
fn console_name(name: capnp::text::Reader<'_>) -> Result<(), capnp::Error> {
    let name = name
        .to_str()
        .map_err(|e| capnp::Error::failed(e.to_string()))?;
    if name.is_empty() || CONSOLES.contains(&name) {
        return Ok(());
    }
    let all: Vec<String> = FIXED_DEVICES
        .iter()
        .map(|d| d.0)
        .chain(CONSOLES.iter().copied())
        .map(String::from)
        .collect();
    Err(capnp::Error::failed(if all.iter().any(|d| d == name) {
        format!(
            "device {name:?} is not a console; the consoles are: {}",
            CONSOLES.join(", ")
        )
    } else {
        format!(
            "no device {name:?}; this VM has {} (vmmctl devices lists them)",
            all.join(", ")
        )
    }))
}

impl VmmServer {
    /// migrated, once the VM's set-up started it.
    fn migrated(&self) -> Result<Arc<crate::helpers::migrated::Migrated>, capnp::Error> {
        self.shared.migrated.get().cloned().ok_or_else(|| {
            capnp::Error::failed(
                "the VM is still being set up (migrated has not started yet); try again in a moment"
                    .into(),
            )
        })
    }

    /// The current (or last) migration, as `migrateStatus` and `migrate` answer it.
    fn write_migration(&self, mut r: vmm_proto::vmm_capnp::migration_status::Builder) {
        let st = self.shared.migration.lock().unwrap().clone();
        r.set_phase(if st.phase.is_empty() {
            "none"
        } else {
            st.phase.as_str()
        });
        r.set_uri(st.uri.as_str());
        r.set_passes(st.passes);
        r.set_bytes(st.bytes);
        r.set_ram_bytes(st.ram_bytes);
        r.set_dirty_pages(st.dirty_pages);
        r.set_dirty_rate(st.dirty_rate_pages);
        r.set_bandwidth(st.bandwidth);
        r.set_expected_downtime_ms(st.expected_downtime_ms);
        r.set_downtime_ms(st.downtime_ms);
        r.set_forced(st.forced);
        r.set_total_ms(st.total_ms);
        r.set_error(st.error.as_str());
        r.set_memory_bytes(self.shared.status.lock().unwrap().memory);
        r.set_postcopy_allowed(st.postcopy_allowed || st.postcopy_asked);
        if let Some(p) = &st.postcopy {
            r.set_postcopy_pages(p.pages);
            r.set_postcopy_requests(p.requests);
            r.set_fault_p50_micros(p.p50_us);
            r.set_fault_p99_micros(p.p99_us);
            r.set_postcopy_ms(p.ms);
            r.set_faults(p.faults);
            r.set_backend_faults(p.backend_faults);
        }
    }

    fn console(&self, control: crate::helpers::chardevd::Control) -> Result<(), capnp::Error> {
        let sender = self.shared.console.lock().unwrap().clone().ok_or_else(|| {
            capnp::Error::failed(
                "the console is on stdio inside vmm-core (--serial direct); start the VM with another --serial to serve it through chardevd".into(),
            )
        })?;
        sender
            .send(control)
            .map_err(|_| capnp::Error::failed("the console's supervisor has ended".into()))
    }
}

impl VmmServer {
    /// Runs `f` on the VM's blockd (it waits for blockd's answer, off this thread); `f` may
    /// change the disks themselves (hot-add, hot-remove).
    async fn on_blockd_mut<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::helpers::blockd::Blockd) -> Result<T, BlockdError> + Send + 'static,
    ) -> Result<T, capnp::Error> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || match shared.blockd.lock().unwrap().as_mut() {
            Some(b) => f(b),
            None => Err(BlockdError::NoBlockd),
        })
        .await
        .map_err(|e| capnp::Error::failed(e.to_string()))?
        .map_err(|e| failed(&e))
    }

    /// Refuses a snapshot or commit of disk `name` while a migration or snapshot of the VM
    /// runs (the destination opens the images the stream names) or a commit of it runs.
    fn disk_image_may_change(&self, name: &str) -> Result<(), capnp::Error> {
        let st = self.shared.migration.lock().unwrap();
        if st.under_way() {
            return Err(capnp::Error::failed(format!(
                "{name}: a migration or snapshot of the VM is under way ({}); change its images when it is done",
                st.phase
            )));
        }
        if self
            .shared
            .commits
            .lock()
            .unwrap()
            .iter()
            .any(|n| n == name)
        {
            return Err(capnp::Error::failed(format!(
                "{name}: a commit of it is under way; wait for it to end"
            )));
        }
        Ok(())
    }

    /// As on_blockd_mut, for a command that leaves the disks as they are.
    async fn on_blockd<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::helpers::blockd::Blockd) -> Result<T, BlockdError> + Send + 'static,
    ) -> Result<T, capnp::Error> {
        self.on_blockd_mut(move |b| f(b)).await
    }
}

impl vmm::Server for VmmServer {
    async fn info(
        self: capnp::capability::Rc<Self>,
        _: vmm::InfoParams,
        mut results: vmm::InfoResults,
    ) -> Result<(), capnp::Error> {
        let s = self.shared.status.lock().unwrap().clone();
        let mut info = results.get().init_info();
        info.set_state(match s.phase {
            Phase::Here if s.paused => vmm_capnp::RunState::Paused,
            Phase::Here => vmm_capnp::RunState::Running,
            Phase::Incoming => vmm_capnp::RunState::Incoming,
            Phase::Migrating => vmm_capnp::RunState::Migrating,
            Phase::PostMigrate => vmm_capnp::RunState::Postmigrate,
            Phase::Shutdown => vmm_capnp::RunState::Shutdown,
        });
        info.set_cpus(s.cpus);
        info.set_max_cpus(s.max_cpus);
        info.set_memory_bytes(s.memory);
        info.set_kernel(&s.kernel);
        info.set_cmdline(&s.cmdline);
        info.set_pid(std::process::id());
        info.set_uptime_ms(self.shared.started.elapsed().as_millis() as u64);
        info.set_boots(s.boots);
        if let Some(r) = self.shared.console_replay.get() {
            info.set_replay(r.status());
        }
        if let Some(r) = self.shared.rng_replay.get() {
            info.set_rng_replay(r.status());
        }
        if let Ok(id) = crate::boot::vmgenid::init() {
            info.set_generation_id(crate::boot::vmgenid::format(&id));
        }
        Ok(())
    }

    async fn pause(
        self: capnp::capability::Rc<Self>,
        _: vmm::PauseParams,
        _: vmm::PauseResults,
    ) -> Result<(), capnp::Error> {
        self.ask(Request::Pause).await
    }

    async fn dirty_rate(
        self: capnp::capability::Rc<Self>,
        params: vmm::DirtyRateParams,
        mut results: vmm::DirtyRateResults,
    ) -> Result<(), capnp::Error> {
        let ms = match params.get()?.get_ms() {
            0 => 1000,
            ms if ms > 60_000 => {
                return Err(capnp::Error::failed(format!(
                    "dirty-rate --ms {ms}: at most 60000 (a minute)"
                )))
            }
            ms => ms,
        };
        self.ask(Request::DirtyLog { on: true }).await?;
        let start = Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(ms.into())).await;
        let off = self.ask(Request::DirtyLog { on: false }).await;
        let elapsed = start.elapsed().as_millis() as u32;
        off?;
        let pages = self.shared.status.lock().unwrap().dirty_pages;
        let mut r = results.get();
        r.set_pages(pages);
        r.set_ms(elapsed);
        r.set_page_size(4096);
        Ok(())
    }

    async fn migrate(
        self: capnp::capability::Rc<Self>,
        params: vmm::MigrateParams,
        mut results: vmm::MigrateResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let uri = p.get_uri()?.to_str()?.to_string();
        let o = p.get_options()?;
        if let Err(e) = vmm_proto::channel::Uri::parse(&uri) {
            return Err(failed(&e));
        }
        if self.shared.status.lock().unwrap().phase == Phase::Incoming {
            return Err(capnp::Error::failed(
                "the VM has not arrived yet (state incoming): there is nothing to send".into(),
            ));
        }
        let m = self.migrated()?;
        {
            let mut st = self.shared.migration.lock().unwrap();
            if let Some(n) = self.shared.commits.lock().unwrap().first() {
                return Err(capnp::Error::failed(format!(
                    "a commit of disk {n} is under way; migrate or save when it is done (the destination opens the images as they will be)"
                )));
            }
            if st.under_way() && st.phase != "postcopy-paused" {
                return Err(capnp::Error::failed(format!(
                    "a migration to {} is under way; wait for it or `vmmctl migrate cancel`",
                    st.uri
                )));
            }
            if st.phase == "postcopy-paused" {
                return Err(capnp::Error::failed(format!(
                    "post-copy to {} broke after the destination started the VM; the VM's memory is split between the two hosts, so it cannot go elsewhere from here",
                    st.uri
                )));
            }
            if o.get_postcopy() && uri.starts_with("file:") {
                return Err(capnp::Error::failed(format!(
                    "{uri}: --postcopy needs a live channel (tcp, unix, fd, exec); a snapshot is written whole"
                )));
            }
            st.phase = "setup".into();
        }
        let (memory, max_cpus) = {
            let s = self.shared.status.lock().unwrap();
            (s.memory, s.max_cpus)
        };
        let opts = crate::migration::Options {
            spec: self.shared.spec_toml.lock().unwrap().clone(),
            uri,
            downtime_ms: match o.get_downtime_ms() {
                0 => crate::migration::DEFAULT_DOWNTIME_MS,
                ms => ms.into(),
            },
            bandwidth: o.get_bandwidth(),
            max_passes: match o.get_max_passes() {
                0 => crate::migration::DEFAULT_MAX_PASSES,
                n => n,
            },
            compress: o.get_compress(),
            postcopy: o.get_postcopy(),
            postcopy_bandwidth: o.get_postcopy_bandwidth(),
            workset_ms: o.get_workset_ms(),
            tls: crate::migration::TlsOptions {
                creds: o.get_tls_creds()?.to_str()?.to_string(),
                hostname: o.get_tls_hostname()?.to_str()?.to_string(),
                authz: Vec::new(),
            },
        };
        let live = !opts.uri.starts_with("file:");
        if live {
            self.shared.set_phase(Phase::Migrating);
        }
        let sent = crate::migration::send(
            &m,
            &self.events,
            &self.shared.migration,
            &self.shared.events,
            opts,
            memory,
            max_cpus,
        )
        .await;
        if live {
            self.shared.set_phase(match sent {
                Ok(()) => Phase::PostMigrate,
                Err(_) => Phase::Here,
            });
        }
        sent.map_err(|e| failed(&e))?;
        self.write_migration(results.get().init_status());
        Ok(())
    }

    async fn config(
        self: capnp::capability::Rc<Self>,
        _: vmm::ConfigParams,
        mut results: vmm::ConfigResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_json(self.shared.config_json.lock().unwrap().as_str());
        Ok(())
    }

    async fn migrate_status(
        self: capnp::capability::Rc<Self>,
        _: vmm::MigrateStatusParams,
        mut results: vmm::MigrateStatusResults,
    ) -> Result<(), capnp::Error> {
        self.write_migration(results.get().init_status());
        Ok(())
    }

    async fn migrate_postcopy(
        self: capnp::capability::Rc<Self>,
        _: vmm::MigratePostcopyParams,
        _: vmm::MigratePostcopyResults,
    ) -> Result<(), capnp::Error> {
        {
            let mut st = self.shared.migration.lock().unwrap();
            match st.phase.as_str() {
                "setup" | "pre-copy" if st.uri.starts_with("file:") => {
                    return Err(capnp::Error::failed(format!(
                        "{}: a snapshot is written whole; post-copy is for a live migration",
                        st.uri
                    )))
                }
                "setup" | "pre-copy" => st.postcopy_asked = true,
                "postcopy-active" => {
                    return Err(capnp::Error::failed(
                        "the migration is in post-copy already".into(),
                    ))
                }
                p => {
                    return Err(capnp::Error::failed(format!(
                        "no pre-copy migration to switch (the last one is {})",
                        if p.is_empty() { "none" } else { p }
                    )))
                }
            }
        }
        // The pass under way stops after its current run (as QEMU's migrate-start-postcopy,
        // which does not wait for the pass either).
        let m = self.migrated()?;
        crate::migration::switch_now(&m)
            .await
            .map_err(|e| failed(&e))
    }

    async fn migrate_recover(
        self: capnp::capability::Rc<Self>,
        params: vmm::MigrateRecoverParams,
        mut results: vmm::MigrateRecoverResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let uri = p.get_uri()?.to_str()?.to_string();
        let o = p.get_options()?;
        if let Err(e) = vmm_proto::channel::Uri::parse(&uri) {
            return Err(failed(&e));
        }
        let destination = {
            let st = self.shared.migration.lock().unwrap();
            if st.phase != "postcopy-paused" {
                return Err(capnp::Error::failed(format!(
                    "no post-copy to recover (the migration is {}); recover is for a post-copy whose channel broke",
                    if st.phase.is_empty() { "none" } else { st.phase.as_str() }
                )));
            }
            st.destination
        };
        let m = self.migrated()?;
        let tls = crate::migration::TlsOptions {
            creds: o.get_tls_creds()?.to_str()?.to_string(),
            hostname: o.get_tls_hostname()?.to_str()?.to_string(),
            authz: Vec::new(),
        };
        let tls = if destination && tls.creds.is_empty() {
            // The destination listens with the credentials it was started with.
            self.shared.incoming_tls.clone()
        } else {
            tls
        };
        let done = crate::migration::recover(&m, &uri, &tls, !destination, &self.shared.migration)
            .await
            .map_err(|e| failed(&e))?;
        if done.is_some() {
            // The source: every page is at the destination; this vmm-core ends.
            self.shared.set_phase(Phase::PostMigrate);
            let _ = self.events.send(crate::control::VmEvent::Migration(
                crate::control::MigrationRequest::Leave,
            ));
        }
        self.write_migration(results.get().init_status());
        Ok(())
    }

    async fn migrate_cancel(
        self: capnp::capability::Rc<Self>,
        _: vmm::MigrateCancelParams,
        _: vmm::MigrateCancelResults,
    ) -> Result<(), capnp::Error> {
        let phase = self.shared.migration.lock().unwrap().phase.clone();
        if phase == "postcopy-active" {
            return Err(capnp::Error::failed(
                "the migration is in post-copy: the destination runs the VM, and a cancel would lose it; wait for it to complete".into(),
            ));
        }
        if !matches!(phase.as_str(), "setup" | "pre-copy") {
            return Err(capnp::Error::failed(format!(
                "no migration to cancel (the last one is {})",
                if phase.is_empty() {
                    "none"
                } else {
                    phase.as_str()
                }
            )));
        }
        let m = self.migrated()?;
        self.shared.migration.lock().unwrap().cancelled = true;
        crate::migration::cancel(&m).await;
        Ok(())
    }

    async fn resume(
        self: capnp::capability::Rc<Self>,
        _: vmm::ResumeParams,
        _: vmm::ResumeResults,
    ) -> Result<(), capnp::Error> {
        self.ask(Request::Resume).await
    }

    async fn shutdown(
        self: capnp::capability::Rc<Self>,
        params: vmm::ShutdownParams,
        _: vmm::ShutdownResults,
    ) -> Result<(), capnp::Error> {
        let force = params.get()?.get_force();
        self.ask(Request::Shutdown { force }).await
    }

    async fn reboot(
        self: capnp::capability::Rc<Self>,
        _: vmm::RebootParams,
        _: vmm::RebootResults,
    ) -> Result<(), capnp::Error> {
        self.ask(Request::Reboot).await
    }

    async fn set_cpus(
        self: capnp::capability::Rc<Self>,
        params: vmm::SetCpusParams,
        _: vmm::SetCpusResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let timeout_ms = match p.get_timeout_ms() {
            0 => 10_000,
            t => t,
        };
        self.ask(Request::SetCpus {
            count: p.get_count(),
            timeout_ms,
        })
        .await
    }

    async fn cpus(
        self: capnp::capability::Rc<Self>,
        _: vmm::CpusParams,
        mut results: vmm::CpusResults,
    ) -> Result<(), capnp::Error> {
        let s = self.shared.status.lock().unwrap().clone();
        let mut r = results.get();
        r.set_created(s.vcpus_created);
        let mut list = r.init_cpus(s.vcpus.len() as u32);
        for (i, v) in s.vcpus.iter().enumerate() {
            let mut c = list.reborrow().get(i as u32);
            c.set_id(v.id);
            c.set_state(v.state);
            c.set_reuses(v.reuses);
        }
        Ok(())
    }

    async fn devices(
        self: capnp::capability::Rc<Self>,
        _: vmm::DevicesParams,
        mut results: vmm::DevicesResults,
    ) -> Result<(), capnp::Error> {
        let serial = match self.shared.console_view.get() {
            Some((buffer, _)) => format!(
                "COM1 (I/O 0x3f8, IRQ 4); chardevd: {}",
                buffer.description.lock().unwrap()
            ),
            None => "COM1 (I/O 0x3f8, IRQ 4); stdio inside vmm-core (--serial direct)".into(),
        };
        let mut all = vec![("serial0", "8250 UART", serial)];
        all.extend(FIXED_DEVICES.iter().map(|d| (d.0, d.1, d.2.to_string())));
        let mut list = results.get().init_devices(all.len() as u32);
        for (i, (name, kind, detail)) in all.iter().enumerate() {
            let mut d = list.reborrow().get(i as u32);
            d.set_name(*name);
            d.set_kind(*kind);
            d.set_detail(detail);
        }
        Ok(())
    }

    async fn disk_fault(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskFaultParams,
        _: vmm::DiskFaultResults,
    ) -> Result<(), capnp::Error> {
        use vmm_proto::blockd_capnp::fault;
        let f = match params.get()?.get_fault()?.which()? {
            fault::ForbiddenSyscall(()) => crate::helpers::blockd::Fault::ForbiddenSyscall,
            fault::Clear(()) => crate::helpers::blockd::Fault::Clear,
        };
        self.on_blockd(move |b| b.fault(f)).await
    }

    async fn disk_throttle(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskThrottleParams,
        _: vmm::DiskThrottleResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let spec = vmm_proto::throttle::Spec::read(p.get_throttle()?)?;
        self.on_blockd(move |b| b.throttle(&name, spec)).await
    }

    async fn disk_resize(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskResizeParams,
        mut results: vmm::DiskResizeResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let (bytes, force) = (p.get_bytes(), p.get_force());
        let n = name.clone();
        let old = self.on_blockd(move |b| b.resize(&n, bytes, force)).await?;
        self.ask(Request::DiskResized { name }).await?;
        results.get().set_old(old);
        Ok(())
    }

    async fn disk_snapshot(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskSnapshotParams,
        _: vmm::DiskSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let overlay = std::path::PathBuf::from(p.get_overlay()?.to_str()?);
        self.disk_image_may_change(&name)?;
        let (n, o) = (name.clone(), overlay.clone());
        self.on_blockd_mut(move |b| b.snapshot(&n, &o)).await?;
        let path = std::path::absolute(&overlay).unwrap_or(overlay);
        self.ask(Request::DiskImage {
            name,
            path,
            format: "qcow2",
        })
        .await
    }

    async fn disk_commit(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskCommitParams,
        mut results: vmm::DiskCommitResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_string()?;
        self.disk_image_may_change(&name)?;
        let n = name.clone();
        let done = self.on_blockd_mut(move |b| b.commit(&n)).await?;
        self.shared.commits.lock().unwrap().push(name.clone());
        let answer = done.await;
        self.shared.commits.lock().unwrap().retain(|n| *n != name);
        let (locks, r) = answer.map_err(|_| {
            capnp::Error::failed(format!(
                "{name}: blockd's client ended before the commit did"
            ))
        })?;
        let n = name.clone();
        self.on_blockd_mut(move |b| {
            b.put_locks(&n, locks);
            Ok(())
        })
        .await?;
        let (bytes, base, format) = r.map_err(|e| failed(&e))?;
        self.ask(Request::DiskImage {
            name,
            path: base.clone(),
            format,
        })
        .await?;
        results.get().set_bytes(bytes);
        results.get().set_base(base.display().to_string());
        Ok(())
    }

    async fn disk_add(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskAddParams,
        mut results: vmm::DiskAddResults,
    ) -> Result<(), capnp::Error> {
        let text = params.get()?.get_spec()?.to_string()?;
        let spec = crate::config::disk::parse_disk(&text).map_err(|e| failed(&e))?;
        let backend = self
            .on_blockd_mut(move |b| b.add_disk(&spec, &text))
            .await?;
        let name = backend.name.clone();
        let (reply, answer) = oneshot::channel();
        let sent = self
            .events
            .send(VmEvent::Disk(crate::control::DiskChange::Add(
                backend, reply,
            )));
        let plugged = match (sent, answer.await) {
            (Ok(()), Ok(Ok(slot))) => Ok(slot),
            (Ok(()), Ok(Err(e))) => Err(failed(&e)),
            _ => Err(capnp::Error::failed(
                "the VM stopped before the disk was plugged in".into(),
            )),
        };
        match plugged {
            Ok(slot) => {
                results.get().set_name(&name);
                results.get().set_slot(slot);
                Ok(())
            }
            Err(e) => {
                // Not in the guest: blockd lets it go again.
                let n = name.clone();
                if let Err(undo) = self.on_blockd_mut(move |b| b.remove_disk(&n)).await {
                    log::warn!("{name}: cannot end its export after a failed hot-add: {undo}");
                }
                Err(e)
            }
        }
    }

    async fn disk_remove(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskRemoveParams,
        _: vmm::DiskRemoveResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_string()?;
        let timeout_ms = p.get_timeout_ms();
        let (reply, answer) = oneshot::channel();
        self.events
            .send(VmEvent::Disk(crate::control::DiskChange::Remove {
                name: name.clone(),
                timeout_ms,
                reply,
            }))
            .map_err(|_| capnp::Error::failed("the VM is shutting down".into()))?;
        match answer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(failed(&e)),
            Err(_) => {
                return Err(capnp::Error::failed(
                    "the VM stopped before the guest ejected the disk".into(),
                ))
            }
        }
        self.on_blockd_mut(move |b| b.remove_disk(&name)).await
    }

    async fn disk_fault_add(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskFaultAddParams,
        mut results: vmm::DiskFaultAddResults,
    ) -> Result<(), capnp::Error> {
        let rule = vmm_proto::faults::Rule::read_from(params.get()?.get_rule()?)?;
        let id = self.on_blockd(move |b| b.add_rule(rule)).await?;
        results.get().set_id(id);
        Ok(())
    }

    async fn disk_fault_remove(
        self: capnp::capability::Rc<Self>,
        params: vmm::DiskFaultRemoveParams,
        _: vmm::DiskFaultRemoveResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id();
        self.on_blockd(move |b| b.remove_rule(id)).await
    }

    async fn disk_fault_rules(
        self: capnp::capability::Rc<Self>,
        _: vmm::DiskFaultRulesParams,
        mut results: vmm::DiskFaultRulesResults,
    ) -> Result<(), capnp::Error> {
        let rules = self.on_blockd(|b| b.rules()).await?;
        let mut out = results.get().init_rules(rules.len() as u32);
        for (i, r) in rules.iter().enumerate() {
            r.write_to(out.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn disks(
        self: capnp::capability::Rc<Self>,
        _: vmm::DisksParams,
        mut results: vmm::DisksResults,
    ) -> Result<(), capnp::Error> {
        let shared = self.shared.clone();
        // blockd answers through its client thread; wait for it off this thread.
        let list =
            tokio::task::spawn_blocking(move || match shared.blockd.lock().unwrap().as_ref() {
                Some(b) => b.list(),
                None => Ok(Vec::new()),
            })
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .map_err(|e| failed(&e))?;
        let mut out = results.get().init_disks(list.len() as u32);
        for (i, d) in list.iter().enumerate() {
            let mut x = out.reborrow().get(i as u32);
            x.set_name(&d.name);
            x.set_image(&d.image);
            x.set_format(&d.format);
            x.set_readonly(d.readonly);
            x.set_queues(d.queues);
            x.set_size(d.size);
            x.set_socket(&d.socket);
            x.set_connected(d.connected);
            x.set_writeback(d.writeback);
            x.set_direct(d.direct);
            x.set_invalid(d.invalid);
            x.set_interrupts(d.interrupts);
            x.set_interrupts_suppressed(d.interrupts_suppressed);
            x.set_replay(&d.replay);
            x.set_job(&d.job);
            d.throttle.write(x.reborrow().init_throttle());
            x.set_stopped(&d.stopped);
            x.set_read_error(&d.read_error);
            x.set_write_error(&d.write_error);
            let mut ops = x.init_ops(d.ops.len() as u32);
            for (j, o) in d.ops.iter().enumerate() {
                let mut y = ops.reborrow().get(j as u32);
                y.set_op(&o.op);
                y.set_requests(o.requests);
                y.set_bytes(o.bytes);
                y.set_errors(o.errors);
                let mut b = y.init_latency(o.latency.len() as u32);
                for (k, (up, n)) in o.latency.iter().enumerate() {
                    let mut z = b.reborrow().get(k as u32);
                    z.set_up_to_us(*up);
                    z.set_count(*n);
                }
            }
        }
        Ok(())
    }

    async fn console_attach(
        self: capnp::capability::Rc<Self>,
        params: vmm::ConsoleAttachParams,
        mut results: vmm::ConsoleAttachResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        console_name(p.get_device()?)?;
        let sink = p.get_output()?;
        let (buffer, input) = self.shared.console_view.get().ok_or_else(|| {
            capnp::Error::failed(
                "the console is on stdio inside vmm-core (--serial direct); start the VM with another --serial to attach to it".into(),
            )
        })?;
        let mut attached = buffer.attach();
        tokio::task::spawn_local(async move {
            while let Some(chunk) = attached.output.recv().await {
                let mut req = sink.write_request();
                req.get().set_data(&chunk);
                let sent = req.send().promise.await;
                attached.done(chunk.len());
                if sent.is_err() {
                    break;
                }
            }
        });
        results
            .get()
            .set_input(capnp_rpc::new_client(ViewerInput(input.clone())));
        Ok(())
    }

    async fn console_dump(
        self: capnp::capability::Rc<Self>,
        params: vmm::ConsoleDumpParams,
        mut results: vmm::ConsoleDumpResults,
    ) -> Result<(), capnp::Error> {
        console_name(params.get()?.get_device()?)?;
        let (reply, answer) = oneshot::channel();
        self.console(crate::helpers::chardevd::Control::DumpRing(reply))?;
        let (data, dropped) = answer
            .await
            .map_err(|_| capnp::Error::failed("chardevd did not answer".into()))?
            .map_err(|e| failed(&e))?;
        let mut r = results.get();
        r.set_data(&data);
        r.set_dropped(dropped);
        Ok(())
    }

    async fn console_fault(
        self: capnp::capability::Rc<Self>,
        params: vmm::ConsoleFaultParams,
        _: vmm::ConsoleFaultResults,
    ) -> Result<(), capnp::Error> {
        use crate::helpers::chardevd::Fault;
        use vmm_proto::vmm_capnp::console_fault;
        console_name(params.get()?.get_device()?)?;
        let fault = match params.get()?.get_fault()?.which()? {
            console_fault::Clear(()) => Fault::Clear,
            console_fault::DropConnection(()) => Fault::DropConnection,
            console_fault::DelayWritesMs(ms) => Fault::DelayWritesMs(ms),
            console_fault::ForbiddenSyscall(()) => Fault::ForbiddenSyscall,
        };
        let (reply, answer) = oneshot::channel();
        self.console(crate::helpers::chardevd::Control::Fault(fault, reply))?;
        answer
            .await
            .map_err(|_| capnp::Error::failed("chardevd did not answer".into()))?
            .map_err(|e| failed(&e))
    }

    async fn events(
        self: capnp::capability::Rc<Self>,
        params: vmm::EventsParams,
        _: vmm::EventsResults,
    ) -> Result<(), capnp::Error> {
        use futures::StreamExt;
        let sink = params.get()?.get_sink()?;
        let mut queue = self.shared.events.subscribe();
        let shared = self.shared.clone();
        tokio::task::spawn_local(async move {
            while let Some(e) = queue.next().await {
                let mut req = sink.event_request();
                {
                    let mut ev = req.get().init_event();
                    ev.set_time_unix_ms(e.time_unix_ms);
                    ev.set_kind(e.kind);
                    ev.set_detail(&e.detail);
                }
                let sent = req.send().promise.await;
                shared.events.delivered();
                if sent.is_err() {
                    break;
                }
            }
            // Whatever is still queued will not be delivered.
            while queue.try_recv().is_ok() {
                shared.events.delivered();
            }
        });
        Ok(())
    }
}
