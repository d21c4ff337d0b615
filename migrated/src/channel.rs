//! One channel abstraction: a byte stream to or from `tcp:HOST:PORT`, `unix:PATH` or
//! `file:PATH`, as QEMU names them. The source connects (or creates the file); the
//! destination listens (or opens the file) and takes one connection.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Tcp(String),
    Unix(PathBuf),
    File(PathBuf),
}

impl Uri {
    pub fn parse(s: &str) -> Result<Uri, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: not a channel; use tcp:HOST:PORT, unix:PATH or file:PATH")
        })?;
        if rest.is_empty() {
            return Err(format!(
                "{s:?}: the {kind} channel needs an address after '{kind}:'"
            ));
        }
        match kind {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
                    format!("{s:?}: a tcp channel is tcp:HOST:PORT (the port is missing)")
                })?;
                port.parse::<u16>().map_err(|_| {
                    format!("{s:?}: the port {port:?} is not a number from 0 to 65535")
                })?;
                if host.is_empty() {
                    return Err(format!("{s:?}: the host is missing (tcp:HOST:PORT)"));
                }
                Ok(Uri::Tcp(rest.to_string()))
            }
            "unix" => Ok(Uri::Unix(PathBuf::from(rest))),
            "file" => Ok(Uri::File(PathBuf::from(rest))),
            "fd" | "exec" => Err(format!(
                "{s:?}: the {kind} channel is not built yet; use tcp:, unix: or file:"
            )),
            other => Err(format!(
                "{s:?}: unknown channel kind {other:?}; use tcp:HOST:PORT, unix:PATH or file:PATH"
            )),
        }
    }

    /// Whether the other end answers (a live migration), or it is a file (a snapshot).
    pub fn is_live(&self) -> bool {
        !matches!(self, Uri::File(_))
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A connected channel: reads and writes, and a way to shut it down from another thread.
pub trait Stream: Read + Write + Send {
    /// Ends the connection both ways, so that a blocked read or write on it returns.
    fn shutdown(&self);
    /// Another handle on the same connection (to shut it down from elsewhere).
    fn handle(&self) -> io::Result<Box<dyn Stream>>;
}

impl Stream for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for UnixStream {
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for std::fs::File {
    fn shutdown(&self) {}
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// The source's end: connects, or creates the snapshot file (it must not exist).
pub fn connect(uri: &Uri) -> Result<Box<dyn Stream>, String> {
    match uri {
        Uri::Tcp(addr) => {
            let s = TcpStream::connect(addr).map_err(|e| {
                format!("{uri}: cannot connect ({e}); is the destination started with --incoming {uri}?")
            })?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Uri::Unix(p) => Ok(Box::new(UnixStream::connect(p).map_err(|e| {
            format!("{uri}: cannot connect ({e}); is the destination started with --incoming {uri}?")
        })?)),
        Uri::File(p) => Ok(Box::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => format!(
                        "{uri}: the file exists; a snapshot never overwrites one, so remove it or pick another name"
                    ),
                    _ => format!("{uri}: cannot create it ({e})"),
                })?,
        )),
    }
}

/// The destination's end: a listening socket (or the snapshot file to read).
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    File(Option<std::fs::File>),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Listens on `uri` (or opens the snapshot file).
pub fn listen(uri: &Uri) -> Result<Listener, String> {
    let l = match uri {
        Uri::Tcp(addr) => {
            let l =
                TcpListener::bind(addr).map_err(|e| format!("{uri}: cannot listen there ({e})"))?;
            l.set_nonblocking(true).map_err(|e| format!("{uri}: {e}"))?;
            Listener::Tcp(l)
        }
        Uri::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l =
                UnixListener::bind(p).map_err(|e| format!("{uri}: cannot listen there ({e})"))?;
            l.set_nonblocking(true).map_err(|e| format!("{uri}: {e}"))?;
            Listener::Unix(l, p.clone())
        }
        Uri::File(p) => Listener::File(Some(
            std::fs::File::open(p).map_err(|e| format!("{uri}: cannot open it ({e})"))?,
        )),
    };
    if uri.is_live() {
        log::info!("waiting for the source on {uri}");
    }
    Ok(l)
}

impl Listener {
    /// The next source (waiting until `deadline`), or the file.
    pub fn accept(
        &mut self,
        uri: &Uri,
        deadline: std::time::Instant,
    ) -> Result<Box<dyn Stream>, String> {
        loop {
            let got: io::Result<Box<dyn Stream>> = match self {
                Listener::Tcp(l) => l.accept().and_then(|(s, peer)| {
                    log::info!("{uri}: a source connected from {peer}");
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::File(f) => {
                    return f
                        .take()
                        .map(|f| Box::new(f) as Box<dyn Stream>)
                        .ok_or_else(|| format!("{uri}: the file was read already"))
                }
            };
            match got {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(format!("{uri}: no source connected in time"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("{uri}: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_or_say_why_not() {
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Uri::parse("tcp:[::1]:4444").unwrap(),
            Uri::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            Uri::parse("unix:/run/m.sock").unwrap(),
            Uri::Unix("/run/m.sock".into())
        );
        assert_eq!(
            Uri::parse("file:/tmp/s").unwrap(),
            Uri::File("/tmp/s".into())
        );
        for (bad, says) in [
            ("127.0.0.1:4444", "unknown channel kind"),
            ("tcp:127.0.0.1", "port"),
            ("tcp:host:99999", "not a number"),
            ("file:", "needs an address"),
            ("nonsense", "not a channel"),
            ("exec:gzip", "not built yet"),
        ] {
            let e = Uri::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
