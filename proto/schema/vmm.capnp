@0xd7a1c3f0b2e94a51;
# The management API of vmm-core, served on --api-socket (a Unix socket, mode 0600, peers
# checked with SO_PEERCRED). vmmctl speaks it; so can any orchestrator, from this file alone.

interface Vmm {
  info @0 () -> (info :VmInfo);
  # What the VM is and what state it is in.

  pause @1 () -> ();
  # Stops every vCPU; returns once none is running guest code.

  resume @2 () -> ();
  # Lets paused vCPUs run again.

  shutdown @3 (force :Bool) -> ();
  # force: stop the VM now (as pulling the plug); vmm-core then exits with status 0.
  # Without force: ask the guest to power off (ACPI power button).

  reboot @4 () -> ();
  # Reset the VM (as pressing the reset button): the guest boots again.

  devices @8 () -> (devices :List(DeviceInfo));
  # The VM's devices, by name.

  consoleDump @6 (device :Text) -> (data :Data, dropped :UInt64);
  # The console ring's contents (--serial ring=SIZE) and how many older bytes it dropped.
  # device: a console's name from `devices`; empty means serial0.

  consoleFault @7 (fault :ConsoleFault, device :Text) -> ();
  # Fault injection on the console's backend in chardevd, for users' fault tests.

  consoleAttach @9 (device :Text, output :ByteSink) -> (input :ByteSink);
  # Attaches to a console interactively: from now on a copy of the guest's output goes to
  # output, and what is written to input goes to the guest. Detach by releasing input (or
  # closing the connection). A viewer that falls more than 1 MiB behind misses bytes; it is
  # told how many in a note in the stream ("[vmm-core: N bytes skipped]").

  events @5 (sink :EventSink) -> ();
  # From now on, every event goes to sink, in order, until the VM ends or a call to sink
  # fails. A sink that falls more than 1024 events behind is dropped (and that is logged).
}

interface ByteSink {
  write @0 (data :Data) -> ();
}

struct DeviceInfo {
  name @0 :Text;      # e.g. serial0
  kind @1 :Text;      # e.g. "8250 UART"
  detail @2 :Text;    # where it is and what serves it, for people
}

interface EventSink {
  event @0 (event :Event) -> ();
}

struct Event {
  timeUnixMs @0 :UInt64;
  kind @1 :Text;
  # started, paused, resumed, reset, power-button, powered-off, guest-reset, guest-panic,
  # stopped, vcpu-failed, helper-started, helper-died, helper-restarted, console-backend
  detail @2 :Text;
}

struct VmInfo {
  state @0 :RunState;
  cpus @1 :UInt32;        # vCPUs online
  maxCpus @2 :UInt32;     # vCPUs the VM can have
  memoryBytes @3 :UInt64;
  kernel @4 :Text;
  cmdline @5 :Text;
  pid @6 :UInt32;         # vmm-core's process id
  uptimeMs @7 :UInt64;    # since vmm-core started
  boots @8 :UInt32;       # 1 + how many times the guest was reset and restarted
}

enum RunState {
  running @0;
  paused @1;
}

struct ConsoleFault {
  union {
    clear @0 :Void;             # remove every rule
    dropConnection @1 :Void;    # disconnect the backend's client now
    delayWritesMs @2 :UInt32;   # every write to the backend waits this long first
  }
}
