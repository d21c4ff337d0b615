//! migrated, the migration helper, as vmm-core reaches it: its client thread (a current-thread
//! runtime, since capnp-rpc is !Send) runs each call as a job on the live connection, and is
//! its supervisor: when migrated dies it starts another (or reconnects to systemd's), so the
//! next migration works.

use futures::future::LocalBoxFuture;
use std::cell::RefCell;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use vmm_proto::channel::{self, Opened};
use vmm_proto::migrated_capnp::{migrated, ChannelKind};

/// What went wrong between vmm-core and migrated.
#[derive(Debug, thiserror::Error)]
pub enum MigratedError {
    /// migrated refused or failed the call: its own message.
    #[error("{0}")]
    Remote(String),
    #[error("migrated died during the call (it is restarted; try again)")]
    Died,
    #[error("migrated is gone (its client thread ended)")]
    Gone,
    #[error("migrated: cannot hand it guest RAM and the channel ({0})")]
    HandOver(std::io::Error),
    #[error(transparent)]
    Helper(#[from] super::HelperError),
    #[error("migrated: cannot start its client thread ({0})")]
    Thread(std::io::Error),
}

impl From<capnp::Error> for MigratedError {
    fn from(e: capnp::Error) -> Self {
        match vmm_proto::rpc::RemoteError::from(e) {
            vmm_proto::rpc::RemoteError::Disconnected(_) => MigratedError::Died,
            vmm_proto::rpc::RemoteError::Failed(m) => MigratedError::Remote(m),
        }
    }
}

/// A connection to migrated, used on its client thread.
pub struct Conn {
    pub client: migrated::Client,
    side: OwnedFd,
    /// What vmm-core keeps of the channel migrated uses (an exec: command, a socket path, a
    /// snapshot file being written). Dropped (the command killed, the partial file removed)
    /// when the transfer fails, or when migrated dies.
    channel: RefCell<Option<channel::Guard>>,
}

impl Conn {
    /// Hands migrated the guest RAM memfd and the channel for the call that follows; vmm-core
    /// keeps the channel's guard (and closes its own copy of the descriptor).
    pub(crate) fn hand_over(
        &self,
        memfd: &std::fs::File,
        opened: Opened,
    ) -> Result<ChannelKind, MigratedError> {
        vmm_proto::fdpass::send(self.side.as_fd(), &[1], &[memfd.as_fd(), opened.fd.as_fd()])
            .map_err(MigratedError::HandOver)?;
        self.channel.replace(Some(opened.guard));
        Ok(opened.kind.into())
    }

    /// Only the channel (a peek, or a post-copy recovery: no guest RAM goes with it); it
    /// goes twice, in the memfd's place too. vmm-core keeps the channel's guard.
    pub(crate) fn hand_channel(&self, opened: Opened) -> Result<ChannelKind, MigratedError> {
        self.hand_fds(opened.fd.as_fd(), opened.fd.as_fd())?;
        self.channel.replace(Some(opened.guard));
        Ok(opened.kind.into())
    }

    /// Only the guest RAM memfd, for a receive that goes on with the connection a peek took
    /// (the channel's guard stays as the peek left it; the memfd goes twice, in the
    /// channel's place too).
    pub(crate) fn hand_memfd(&self, memfd: &std::fs::File) -> Result<(), MigratedError> {
        self.hand_fds(memfd.as_fd(), memfd.as_fd())
    }

    /// Two descriptors for the call that follows (the memfd and a userfaultfd).
    pub(crate) fn hand_fds(
        &self,
        a: std::os::fd::BorrowedFd,
        b: std::os::fd::BorrowedFd,
    ) -> Result<(), MigratedError> {
        vmm_proto::fdpass::send(self.side.as_fd(), &[1], &[a, b]).map_err(MigratedError::HandOver)
    }

    /// The transfer completed: an exec: command may finish, a snapshot file stays.
    pub(crate) fn channel_done(&self) {
        if let Some(g) = self.channel.take() {
            g.complete();
        }
    }

    /// The transfer failed: the command is killed, a partial snapshot removed.
    pub(crate) fn channel_failed(&self) {
        drop(self.channel.take());
    }
}

type Job = Box<dyn FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, ()> + Send>;

/// migrated, as the rest of vmm-core reaches it.
pub struct Migrated {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    child: std::sync::Arc<std::sync::Mutex<Option<std::process::Child>>>,
    /// Set when vmm-core ends it: no restart then.
    ending: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Migrated {
    /// Runs `f` on migrated's client thread and waits for its answer (from async code).
    pub async fn call<T, E>(
        &self,
        f: impl FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, Result<T, E>> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<MigratedError> + Send + 'static,
    {
        let (tx, rx) = futures::channel::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                let _ = tx.send(f(conn).await);
            })
        });
        self.jobs.send(job).map_err(|_| MigratedError::Gone)?;
        rx.await.map_err(|_| MigratedError::Died)?
    }

    /// The same, from a thread that is not async (the main thread).
    pub fn call_blocking<T, E>(
        &self,
        f: impl FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, Result<T, E>> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<MigratedError> + Send + 'static,
    {
        futures::executor::block_on(self.call(f))
    }

    /// The helper's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }
}

impl Migrated {
    /// Ends migrated for good (vmm-core is ending).
    pub fn end(&self) {
        self.ending
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Migrated {
    fn drop(&mut self) {
        self.end();
    }
}

/// Starts migrated, and the thread that talks to it. That thread is its supervisor (as
/// blockd's and chardevd's are): when migrated dies it starts another, so the next
/// migration works; a call that was under way fails and says so.
pub fn start(
    source: super::Source,
    report: super::SeccompReport,
    on_death: Box<dyn Fn(String) + Send>,
) -> Result<Migrated, MigratedError> {
    let (first, child) = super::obtain(super::MIGRATED, &source, report.clone())?;
    match (&child, &source) {
        (Some(c), _) => log::info!("started migrated (pid {})", c.id()),
        (None, super::Source::Connect(p)) => {
            log::info!("connected to migrated at {}", p.display())
        }
        (None, _) => {}
    }
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let ending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (slot, stop) = (child.clone(), ending.clone());
    super::client_thread("migrated-client", move || async move {
        let mut control = Some(first);
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let ours = match control.take() {
                Some(c) => c,
                None => match super::obtain(super::MIGRATED, &source, report.clone()) {
                    Ok((c, child)) => {
                        match &child {
                            Some(ch) => {
                                log::warn!("migrated: started another (pid {})", ch.id())
                            }
                            None => log::warn!("migrated: connected again"),
                        }
                        let old = std::mem::replace(&mut *slot.lock().unwrap(), child);
                        if let Some(mut old) = old {
                            let _ = old.wait();
                        }
                        c
                    }
                    Err(e) => {
                        log::error!("{e}; trying again in {} ms", backoff.as_millis());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let side = match vmm_proto::rpc::open_side_channel(&ours) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("migrated: cannot set up its side channel ({e})");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let stream = match vmm_proto::rpc::tokio_stream(ours) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("migrated: {e}");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let (rpc, client): (_, migrated::Client) = vmm_proto::rpc::client(stream);
            let mut connection = tokio::task::spawn_local(rpc);
            let conn = Rc::new(Conn {
                client,
                side,
                channel: RefCell::new(None),
            });
            loop {
                tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => {
                            tokio::task::spawn_local(job(conn.clone()));
                        }
                        None => {
                            connection.abort();
                            return;
                        }
                    },
                    _ = &mut connection => break,
                }
            }
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            // migrated is gone: reap it, say so, and start another (or reconnect to
            // the socket, where systemd starts another).
            let status = slot
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.wait().ok())
                .map_or("its connection closed".to_string(), |s| s.to_string());
            on_death(status);
            backoff = std::time::Duration::from_millis(100);
        }
    })
    .map_err(MigratedError::Thread)?;
    Ok(Migrated {
        jobs: tx,
        child,
        ending,
    })
}
