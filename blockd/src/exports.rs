//! Named exports: each serves one image on its own vhost-user socket, in a thread that accepts
//! frontends one after another until the export is removed.

use crate::backend;
use crate::connection::Handler;
use crate::disk::{self, Disk};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::{BackendListener, Listener};

/// What `remove` needs to stop an export's thread.
#[derive(Default)]
pub struct Control {
    pub removed: AtomicBool,
    pub connected: AtomicBool,
    /// The connected frontend's socket, to cut it.
    conn: Mutex<Option<UnixStream>>,
    listener_fd: Mutex<Option<std::os::fd::RawFd>>,
}

impl Control {
    /// Ends the export: no new frontend, and the connected one (if any) is cut.
    pub fn stop(&self) {
        self.removed.store(true, Ordering::Release);
        if let Some(fd) = *self.listener_fd.lock().unwrap() {
            // The export's own listening socket, which its thread keeps open until it sees
            // `removed`: this wakes the thread's accept.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        if let Some(c) = self.conn.lock().unwrap().as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub struct Export {
    pub name: String,
    pub image: String,
    pub socket: String,
    pub disk: Arc<Disk>,
    pub control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Export {
    pub fn start(
        name: &str,
        image: &str,
        socket: &str,
        disk: Arc<Disk>,
        listener: Listener,
        once: bool,
    ) -> std::io::Result<Export> {
        disk::register(&disk);
        let control = Arc::new(Control::default());
        let (d, c, n) = (disk.clone(), control.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("export-{name}"))
            .spawn(move || serve(&n, d, listener, &c, once))?;
        log::info!(
            "export {name}: {image}, {} bytes{}, {} queue(s), on {socket}",
            disk.size(),
            if disk.options.readonly {
                " read-only"
            } else {
                ""
            },
            disk.options.queues
        );
        Ok(Export {
            name: name.to_string(),
            image: image.to_string(),
            socket: socket.to_string(),
            disk,
            control,
            thread: Some(thread),
        })
    }

    /// Waits for the export's thread (which ends with `--once`, or after `stop`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.control.stop();
            let _ = t.join();
        }
    }
}

/// Accepts frontends one after another and serves each until it leaves.
fn serve(name: &str, disk: Arc<Disk>, mut listener: Listener, control: &Control, once: bool) {
    *control.listener_fd.lock().unwrap() = Some(listener.as_raw_fd());
    while !control.removed.load(Ordering::Acquire) {
        let backend = match backend::Backend::new(name, disk.clone()) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("export {name}: cannot make the queues' throttle timers: {e}");
                return;
            }
        };
        let handler = match Handler::new(name, backend, no_memory()) {
            Ok(h) => Arc::new(Mutex::new(h)),
            Err(e) => {
                log::warn!("export {name}: cannot start the queues' workers: {e}");
                return;
            }
        };
        let accepted =
            BackendListener::new(&mut listener, handler.clone()).and_then(|mut l| loop {
                if let Some(r) = l.accept()? {
                    break Ok(r);
                }
            });
        let mut requests = match accepted {
            Ok(r) => r,
            Err(e) => {
                if !control.removed.load(Ordering::Acquire) {
                    log::warn!("export {name}: cannot accept a frontend: {e}");
                }
                return;
            }
        };
        *control.conn.lock().unwrap() = requests.try_clone_connection().ok();
        control.connected.store(true, Ordering::Release);
        log::info!("export {name}: frontend connected");
        let r = loop {
            if let Err(e) = requests.handle_request() {
                break e;
            }
        };
        control.connected.store(false, Ordering::Release);
        *control.conn.lock().unwrap() = None;
        drop(requests);
        handler.lock().unwrap().stop();
        drop(handler);
        // Whatever the guest left in caches (qcow2 metadata above all) goes to the image now.
        if !disk.options.readonly {
            if let Err(e) = disk.flush() {
                log::warn!("export {name}: cannot flush the image after the frontend left: {e}");
            }
        }
        match r {
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage => {
                log::info!("export {name}: frontend disconnected")
            }
            e if control.removed.load(Ordering::Acquire) => {
                log::info!("export {name}: removed ({e})")
            }
            e => log::warn!("export {name}: frontend connection ended: {e}"),
        }
        if once {
            return;
        }
    }
}

/// An empty guest memory until the frontend sends its table.
fn no_memory() -> backend::Memory {
    vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new())
}

/// The operations' names and statistics, in a fixed order.
pub fn op_stats(d: &Disk) -> [(&'static str, &disk::OpStats); 6] {
    let s = &d.stats;
    [
        ("read", &s.read),
        ("write", &s.write),
        ("flush", &s.flush),
        ("discard", &s.discard),
        ("write-zeroes", &s.write_zeroes),
        ("get-id", &s.get_id),
    ]
}
