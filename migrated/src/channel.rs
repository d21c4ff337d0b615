//! One channel abstraction: a byte stream to or from `tcp:HOST:PORT`, `unix:PATH`,
//! `exec:COMMAND` or `file:PATH`, as QEMU names them. The source connects (or creates the
//! file, or starts the command); the destination listens (or opens the file, or starts the
//! command) and takes one connection.
//!
//! `exec:COMMAND` runs `sh -c COMMAND` and talks through its standard input and output: the
//! source writes the stream to its input and reads the destination's answer from its output;
//! the destination reads the stream from its output and answers on its input. So the command
//! must carry both directions, e.g. `exec:ssh dst socat - UNIX-CONNECT:/run/vm/mig.sock` on
//! the source, or `--incoming 'exec:socat - TCP-LISTEN:4444'` on the destination.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Tcp(String),
    Unix(PathBuf),
    Exec(String),
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
            "exec" => Ok(Uri::Exec(rest.to_string())),
            "file" => Ok(Uri::File(PathBuf::from(rest))),
            "fd" => Err(format!(
                "{s:?}: the fd channel is not built yet; use tcp:, unix:, exec: or file:"
            )),
            other => Err(format!(
                "{s:?}: unknown channel kind {other:?}; use tcp:HOST:PORT, unix:PATH, exec:COMMAND or file:PATH"
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
            Uri::Exec(c) => write!(f, "exec:{c}"),
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
    /// Bytes written but not yet taken by the peer, where the channel can tell.
    fn unsent(&self) -> Option<usize> {
        None
    }
}

/// A socket's send queue (TIOCOUTQ: for TCP, what the peer has not acknowledged).
fn outq(s: &impl AsRawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int into `n`.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then_some(n.max(0) as usize)
}

impl Stream for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn unsent(&self) -> Option<usize> {
        outq(self)
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for UnixStream {
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn unsent(&self) -> Option<usize> {
        outq(self)
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

/// The destination's receive buffer, of a fixed, modest size instead of the kernel's
/// autotuning (which grows it to several MiB on loopback): what is queued in it when the VM
/// pauses is what the destination has still to take in during the pause. The source, for its
/// part, waits for its own send queue to drain after each pass (`Stream::unsent`).
pub const RECEIVE_BUFFER: usize = 1 << 20;

fn bound_buffers(s: &impl AsRawFd) {
    let size = RECEIVE_BUFFER as libc::c_int;
    // SAFETY: setsockopt with a c_int option value on a socket we own.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
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
        Uri::Unix(p) => {
            let s = UnixStream::connect(p).map_err(|e| {
                format!("{uri}: cannot connect ({e}); is the destination started with --incoming {uri}?")
            })?;
            Ok(Box::new(s))
        }
        Uri::Exec(cmd) => Ok(Box::new(Exec::start(cmd)?)),
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
    Exec(Option<String>),
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
            // Before any connection, so that the window it offers is small from the start.
            bound_buffers(&l);
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
        Uri::Exec(cmd) => Listener::Exec(Some(cmd.clone())),
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
                    bound_buffers(&s);
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    bound_buffers(&s);
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::Exec(cmd) => {
                    return match cmd.take() {
                        Some(c) => Ok(Box::new(Exec::start(&c)?)),
                        None => Err(format!("{uri}: the command's stream was taken already")),
                    }
                }
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

/// `exec:COMMAND`: `sh -c COMMAND` with its standard input and output as the stream (its
/// standard error goes to migrated's, which vmm-core logs).
pub struct Exec {
    child: std::sync::Arc<std::sync::Mutex<std::process::Child>>,
    input: Option<std::process::ChildStdin>,
    output: std::process::ChildStdout,
    command: String,
}

impl Exec {
    fn start(command: &str) -> Result<Exec, String> {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        // Its own process group, so that ending it ends what the shell started too.
        let mut child = Command::new("/bin/sh")
            .args(["-c", command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("exec:{command}: cannot start it with /bin/sh ({e})"))?;
        let (input, output) = (child.stdin.take(), child.stdout.take());
        let output = output.ok_or_else(|| format!("exec:{command}: no pipe to its output"))?;
        log::info!("exec:{command}: started (pid {})", child.id());
        Ok(Exec {
            child: std::sync::Arc::new(std::sync::Mutex::new(child)),
            input,
            output,
            command: command.to_string(),
        })
    }
}

impl Read for Exec {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.output.read(b)
    }
}

impl Write for Exec {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match &mut self.input {
            Some(i) => i.write(b),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.input.as_mut().map_or(Ok(()), |i| i.flush())
    }
}

/// Kills the command's process group (the shell and what it started).
fn kill_group(child: &std::sync::Mutex<std::process::Child>) {
    let pid = child.lock().unwrap().id() as i32;
    // SAFETY: a signal to the process group this channel made (its leader is our child,
    // not yet reaped, so the id is still ours).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}

/// Kills the command: a transfer blocked on its pipes then fails.
struct ExecHandle(std::sync::Arc<std::sync::Mutex<std::process::Child>>);

impl Read for ExecHandle {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Write for ExecHandle {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for ExecHandle {
    fn shutdown(&self) {
        kill_group(&self.0);
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(ExecHandle(self.0.clone())))
    }
}

impl Stream for Exec {
    fn shutdown(&self) {
        kill_group(&self.child);
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(ExecHandle(self.child.clone())))
    }
}

impl Drop for Exec {
    /// Closes its input (the end of the stream), gives it 5 s to finish, then kills it; it is
    /// always reaped.
    fn drop(&mut self) {
        drop(self.input.take());
        let mut c = self.child.lock().unwrap();
        let pid = c.id() as i32;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() {
                        log::warn!("exec:{}: it ended with {st}", self.command);
                    }
                    return;
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    log::warn!(
                        "exec:{}: still running after the stream; killed",
                        self.command
                    );
                    // SAFETY: as in kill_group: our unreaped child's process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    let _ = c.wait();
                    return;
                }
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
            Uri::parse("exec:gzip -c").unwrap(),
            Uri::Exec("gzip -c".into())
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
            ("fd:3", "not built yet"),
        ] {
            let e = Uri::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn exec_streams_through_the_command_and_a_handle_ends_it() {
        let mut e = Exec::start("cat").unwrap();
        e.write_all(b"through cat").unwrap();
        e.flush().unwrap();
        let mut got = [0u8; 11];
        e.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through cat");
        // Another thread's handle kills it: a blocked read ends.
        let h = e.handle().unwrap();
        let t = std::thread::spawn(move || e.read(&mut [0u8; 8]));
        std::thread::sleep(Duration::from_millis(50));
        h.shutdown();
        assert_eq!(t.join().unwrap().unwrap(), 0);
    }
}
