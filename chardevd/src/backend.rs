//! The backends and the Cap'n Proto objects that serve them.
//!
//! Flow-control policy: a file takes every byte (the caller waits for each write); the ring
//! keeps the newest bytes and counts what it drops; a Unix socket with no client connected
//! drops bytes and counts them, and a connected client gets every byte (the caller waits).

use capnp::capability::Rc;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm_proto::chardevd_capnp::{backend, chardevd, device, fault, input_sink};

/// Serves `open`; remembers the socket paths it listens on, to remove them when it ends.
#[derive(Default)]
pub struct Server {
    pub sockets: std::rc::Rc<RefCell<Vec<String>>>,
}

fn failed(msg: String) -> capnp::Error {
    capnp::Error::failed(msg)
}

impl chardevd::Server for Server {
    async fn open(
        self: Rc<Self>,
        params: chardevd::OpenParams,
        mut results: chardevd::OpenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p
            .get_name()?
            .to_string()
            .map_err(|e| failed(e.to_string()))?;
        let input = if p.has_input() {
            Some(p.get_input()?)
        } else {
            None
        };
        let mut listener = None;
        let kind = match p.get_backend()?.which()? {
            backend::Null(()) => Kind::Null,
            backend::File(f) => {
                let f = f?;
                let path = f
                    .get_path()?
                    .to_string()
                    .map_err(|e| failed(e.to_string()))?;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| failed(format!("{name}: file {path}: cannot open it ({e})")))?;
                if !f.get_append() {
                    file.set_len(0).map_err(|e| {
                        failed(format!("{name}: file {path}: cannot truncate it ({e})"))
                    })?;
                }
                Kind::File(file)
            }
            backend::Ring(size) => Kind::Ring {
                data: VecDeque::new(),
                size: size.max(1) as usize,
            },
            backend::UnixServer(path) => {
                let path = path?.to_string().map_err(|e| failed(e.to_string()))?;
                let _ = std::fs::remove_file(&path);
                listener = Some(tokio::net::UnixListener::bind(&path).map_err(|e| {
                    failed(format!("{name}: socket {path}: cannot listen on it ({e})"))
                })?);
                self.sockets.borrow_mut().push(path.clone());
                Kind::Socket { client: None }
            }
        };
        let dev = Rc::new(Device {
            name,
            kind: RefCell::new(kind),
            dropped: RefCell::new(0),
            input: RefCell::new(input),
            delay_ms: std::cell::Cell::new(0),
        });
        if let Some(listener) = listener {
            tokio::task::spawn_local(accept_clients(listener, std::rc::Rc::downgrade(&dev)));
        }
        results.get().set_device(capnp_rpc::new_client_from_rc(dev));
        Ok(())
    }
}

enum Kind {
    Null,
    File(std::fs::File),
    Ring {
        data: VecDeque<u8>,
        size: usize,
    },
    Socket {
        client: Option<tokio::net::unix::OwnedWriteHalf>,
    },
}

pub struct Device {
    name: String,
    kind: RefCell<Kind>,
    dropped: RefCell<u64>,
    input: RefCell<Option<input_sink::Client>>,
    /// Fault injection: every write waits this long first.
    delay_ms: std::cell::Cell<u32>,
}

/// Serves a socket backend's clients, one at a time: a new client replaces the old one. What
/// a client sends goes to the device's input sink.
async fn accept_clients(listener: tokio::net::UnixListener, dev: std::rc::Weak<Device>) {
    while let Ok((stream, _)) = listener.accept().await {
        let Some(device) = dev.upgrade() else { return };
        let (mut reader, writer) = stream.into_split();
        if let Kind::Socket { client } = &mut *device.kind.borrow_mut() {
            *client = Some(writer);
        }
        let dev = dev.clone();
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let Some(device) = dev.upgrade() else { return };
                let sink = device.input.borrow().clone();
                if let Some(sink) = sink {
                    let mut req = sink.input_request();
                    req.get().set_data(&buf[..n]);
                    let _ = req.send().promise.await;
                }
            }
        });
    }
}

impl device::Server for Device {
    async fn write(
        self: Rc<Self>,
        params: device::WriteParams,
        _: device::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        let delay = self.delay_ms.get();
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay.into())).await;
        }
        let mut socket_client = None;
        {
            let mut kind = self.kind.borrow_mut();
            match &mut *kind {
                Kind::Null => {}
                Kind::File(f) => f
                    .write_all(&data)
                    .map_err(|e| failed(format!("{}: write failed ({e})", self.name)))?,
                Kind::Ring { data: ring, size } => {
                    ring.extend(&data);
                    let excess = ring.len().saturating_sub(*size);
                    ring.drain(..excess);
                    *self.dropped.borrow_mut() += excess as u64;
                }
                Kind::Socket { client, .. } => match client.take() {
                    Some(c) => socket_client = Some(c),
                    None => *self.dropped.borrow_mut() += data.len() as u64,
                },
            }
        }
        if let Some(mut c) = socket_client {
            // A client that went away is dropped; the next one is accepted on a later write.
            if c.write_all(&data).await.is_ok() {
                if let Kind::Socket { client, .. } = &mut *self.kind.borrow_mut() {
                    *client = Some(c);
                }
            } else {
                *self.dropped.borrow_mut() += data.len() as u64;
            }
        }
        Ok(())
    }

    async fn read_ring(
        self: Rc<Self>,
        _: device::ReadRingParams,
        mut results: device::ReadRingResults,
    ) -> Result<(), capnp::Error> {
        let kind = self.kind.borrow();
        let Kind::Ring { data, .. } = &*kind else {
            return Err(failed(format!("{}: not a ring backend", self.name)));
        };
        let (a, b) = data.as_slices();
        let mut r = results.get();
        r.set_data(&[a, b].concat());
        r.set_dropped(*self.dropped.borrow());
        Ok(())
    }

    async fn set_input(
        self: Rc<Self>,
        params: device::SetInputParams,
        _: device::SetInputResults,
    ) -> Result<(), capnp::Error> {
        *self.input.borrow_mut() = Some(params.get()?.get_sink()?);
        Ok(())
    }

    async fn inject_fault(
        self: Rc<Self>,
        params: device::InjectFaultParams,
        _: device::InjectFaultResults,
    ) -> Result<(), capnp::Error> {
        match params.get()?.get_fault()?.which()? {
            fault::Clear(()) => self.delay_ms.set(0),
            fault::DelayWritesMs(ms) => self.delay_ms.set(ms),
            fault::DropConnection(()) => match &mut *self.kind.borrow_mut() {
                // Dropping the write half shuts the connection down; the client sees EOF.
                Kind::Socket { client } => {
                    if client.take().is_none() {
                        return Err(failed(format!("{}: no client is connected", self.name)));
                    }
                }
                _ => {
                    return Err(failed(format!(
                        "{}: its backend has no connection to drop",
                        self.name
                    )))
                }
            },
        }
        Ok(())
    }
}
