@0xb4e1c0d2a9f35e77;
# chardevd serves character-device backends to vmm-core: guest output goes to the backend,
# host input comes back to the guest. vmm-core connects on an inherited socket (or one that
# systemd listens on) and calls `open` for each device, again after chardevd restarts.
#
# chardevd opens no host path (so that it can run with an empty root): vmm-core opens what a
# backend needs and hands it over a side channel for file descriptors (Cap'n Proto RPC in Rust
# carries none). On each new control connection, before any RPC message, the client sends one
# byte (1) with SCM_RIGHTS carrying one descriptor, its end of a SOCK_SEQPACKET socket pair.
# Before an `open` whose backend takes descriptors, it sends on that pair one message, the
# device's name, with SCM_RIGHTS carrying them: stdio, its input then its output; file, the
# open file; unixServer, the listening socket; pty, the master. A unixClient backend asks on
# the pair for each connection: it sends "connect NAME" and gets back NAME with the connected
# socket, or "!" and why not.

interface Chardevd {
  open @0 (name :Text, backend :Backend, input :InputSink) -> (device :Device, description :Text);
  # input: where the backend's input goes from the first byte on (a client may connect and
  # type before anything else is called). description: what the backend is, for people
  # (for a pty, its path: "pty /dev/pts/3").

  rng @1 (name :Text, rate :UInt64, burst :UInt64, log :RngLog, egd :Bool) -> (description :Text);
  # A virtio-rng device served over vhost-user-rng. Before it, the side channel carries its
  # name with two descriptors: a listening Unix socket (vmm-core's frontend connects to it,
  # again after a restart) and the entropy source (the host's /dev/urandom, or a file); and
  # a third, the log (vmm_proto::record), when `log` records or replays.
  # rate: bytes a second (0: no limit); burst: the token bucket's size in bytes.
  # egd: the source is a connection to an entropy daemon, asked in the EGD protocol (as
  # QEMU's rng-egd): [0x02, n] for n bytes (1 to 255), which it sends back.
}

enum RngLog {
  none @0;
  record @1;    # every request's bytes are appended to the log
  replay @2;    # every request gets the log's next record instead of the source's bytes
}

struct Backend {
  union {
    null @0 :Void;
    file @1 :FileBackend;
    ring @2 :UInt32;        # keep the last this many bytes, readable with Device.readRing
    unixServer @3 :Text;    # the listening socket sent on the side channel (its path, for
                            # people); one client at a time
    stdio @4 :Void;         # the input and output sent on the side channel
    pty @5 :Text;           # the pty master sent on the side channel (the slave's path)
    unixClient @6 :UnixClient;
  }
}

struct UnixClient {
  path @0 :Text;            # where vmm-core connects (for people; see the side channel)
  reconnectMs @1 :UInt32;   # when it is not connected, try again this often
}

struct FileBackend {
  path @0 :Text;            # the file sent on the side channel (its path, for people)
  append @1 :Bool;          # vmm-core truncated it unless this is set
}

interface Device {
  write @0 (data :Data) -> ();
  # Guest output. Returns once the backend has taken it; the caller keeps at most one write
  # in flight, which is the flow control.

  readRing @1 () -> (data :Data, dropped :UInt64);
  # Ring backend: what it holds, and how many older bytes it dropped.

  setInput @2 (sink :InputSink) -> ();
  # Where input from the backend (a socket client's bytes) goes.

  injectFault @3 (fault :Fault) -> ();
  # Fault injection for users' tests; see Fault.
}

struct Fault {
  union {
    clear @0 :Void;             # remove every rule
    dropConnection @1 :Void;    # cut the socket backend's connection now (a client
                                # backend then reconnects)
    delayWritesMs @2 :UInt32;   # every write waits this long before the backend takes it
    forbiddenSyscall @3 :Void;  # chardevd makes a system call outside its seccomp allowlist
                                # (after answering), to test that it dies and is reported
  }
}

interface InputSink {
  input @0 (data :Data) -> ();
}
