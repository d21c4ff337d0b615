@0xb4e1c0d2a9f35e77;
# chardevd serves character-device backends to vmm-core: guest output goes to the backend,
# host input comes back to the guest. vmm-core connects on an inherited socket (or one that
# systemd listens on) and calls `open` for each device, again after chardevd restarts.

interface Chardevd {
  open @0 (name :Text, backend :Backend, input :InputSink) -> (device :Device);
  # input: where the backend's input goes from the first byte on (a client may connect and
  # type before anything else is called).
}

struct Backend {
  union {
    null @0 :Void;
    file @1 :FileBackend;
    ring @2 :UInt32;        # keep the last this many bytes, readable with Device.readRing
    unixServer @3 :Text;    # listen on this socket path; one client at a time
  }
}

struct FileBackend {
  path @0 :Text;
  append @1 :Bool;          # false: truncate when opened for the first time
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
    dropConnection @1 :Void;    # disconnect the socket backend's client now
    delayWritesMs @2 :UInt32;   # every write waits this long before the backend takes it
  }
}

interface InputSink {
  input @0 (data :Data) -> ();
}
