@0xd7a1c3f0b2e94a51;
# The management API of vmm-core, served on --api-socket (a Unix socket, mode 0600, peers
# checked with SO_PEERCRED). vmmctl speaks it; so can any orchestrator, from this file alone.

using Blockd = import "blockd.capnp";

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

  setCpus @10 (count :UInt32, timeoutMs :UInt32) -> ();
  # Hot-adds or hot-removes vCPUs (ACPI CPU hotplug) until `count` are online. Returns once the
  # guest has taken the new ones, or ejected the removed ones. A removed vCPU's KVM fd is
  # parked and reused when its id is added again. Refused: more than maxCpus, fewer than 1
  # (vCPU 0 is the boot CPU), or while another change runs. timeoutMs (0: 10 s): a guest that
  # does not answer in time gets an error, and the vCPU keeps running.

  cpus @11 () -> (cpus :List(CpuInfo), created :UInt32);
  # Every possible vCPU, and how many times KVM_CREATE_VCPU was called in this boot.

  disks @12 () -> (disks :List(Blockd.ExportInfo));
  # The VM's disks as blockd serves them, with their statistics.

  diskFault @13 (fault :Blockd.Fault) -> ();
  # Fault injection in the VM's blockd, for users' fault tests.

  diskThrottle @14 (name :Text, throttle :Blockd.Throttle) -> ();
  # Throttles the disk at run time (see Blockd.setThrottle).

  diskFaultAdd @15 (rule :Blockd.FaultRule) -> (id :UInt32);
  diskFaultRemove @16 (id :UInt32) -> ();
  diskFaultRules @17 () -> (rules :List(Blockd.FaultRule));

  # How fast the guest writes to its RAM: KVM's dirty log is on for `ms` milliseconds and the
  # pages written meanwhile are counted (as QEMU's calc-dirty-rate in dirty-bitmap mode).
  # Live migration's pre-copy rests on the same log.
  dirtyRate @18 (ms :UInt32) -> (pages :UInt64, ms :UInt32, pageSize :UInt32);
  # I/O fault rules in the VM's blockd (see Blockd.addFaultRule).

  # Live migration to tcp:HOST:PORT or unix:PATH (pre-copy), or a snapshot to file:PATH.
  # Returns once it is over: the VM runs on the destination (this vmm-core exits), or, on
  # failure, it goes on here and the error says why. vmm-core's migrated helper moves RAM.
  migrate @19 (uri :Text, options :MigrateOptions) -> (status :MigrationStatus);  # as it ended
  migrateStatus @20 () -> (status :MigrationStatus);
  migrateCancel @21 () -> ();
  # Switches the live migration under way to post-copy at the end of its current pass (QEMU's
  # migrate-start-postcopy): the destination runs the VM and pulls the pages it still needs.
  # Once switched, a migration cannot be cancelled, and losing either host loses the VM.
  migratePostcopy @23 () -> ();
  # Post-copy broke (its channel): resumes it on a new channel, on both hosts (QEMU's
  # migrate-recover and migrate -r). On the destination, `uri` is where it waits for the
  # source (returns once the source is back); on the source, where it reaches the
  # destination (returns once post-copy is over, and the VM has left). TLS options as for
  # migrate.
  migrateRecover @24 (uri :Text, options :MigrateOptions) -> (status :MigrationStatus);

  # The effective run settings as a JSON object whose keys are `vmm-core run`'s flags
  # (what a --config file may hold), defaults filled in.
  config @22 () -> (json :Text);

  diskResize @25 (name :Text, bytes :UInt64, force :Bool) -> (old :UInt64);
  # Grows disk `name` to `bytes` on a running VM (blockd grows the image; a block device must
  # have grown already) and tells the guest (a virtio config-change interrupt). Shrinking is
  # refused unless `force`. Returns the size it had.

  diskAdd @26 (spec :Text) -> (name :Text, slot :UInt8);
  # Hot-adds a disk to the running VM: `spec` is what --disk takes (path=FILE,... or
  # socket=PATH,...). blockd serves it as a new export, its virtio-blk function goes in the
  # first free PCI slot of bus 0, and the guest is told (ACPI PCI hotplug through the GED).
  # Returns its name (diskN) and slot.

  diskRemove @27 (name :Text, timeoutMs :UInt32) -> ();
  # Hot-removes disk `name`: the guest is asked to eject it (ACPI eject request) and the call
  # returns once it did: the function is off the bus and blockd's export ended. A guest that
  # does not eject it within `timeoutMs` gets an error, and the disk stays.

  diskSnapshot @28 (name :Text, overlay :Text) -> ();
  # A live external snapshot of disk `name` (libvirt's snapshot-create --disk-only): a new
  # qcow2 overlay is made at `overlay` (which must not exist), over the disk's image, and the
  # guest's writes go there from then on. The old image is read-only from then on (under a
  # shared lock) and can be copied away. Snapshots and migrations carry the new chain.

  diskCommit @29 (name :Text) -> (bytes :UInt64, base :Text);
  # Merges disk `name`'s top overlay into the image below it while the guest runs (libvirt's
  # blockcommit --active --pivot), which then is the disk's image. Returns when done, with the
  # bytes copied and the base's path; meanwhile `disks` shows how far it is (job). The
  # overlay is left where it is, no longer used.

  events @5 (sink :EventSink) -> ();
  # From now on, every event goes to sink, in order, until the VM ends or a call to sink
  # fails. A sink that falls more than 1024 events behind is dropped (and that is logged).
}

interface ByteSink {
  write @0 (data :Data) -> ();
}

struct CpuInfo {
  id @0 :UInt32;
  state @1 :Text;     # running, parked (its KVM fd waits for reuse) or absent
  reuses @2 :UInt32;  # how many hot-adds reused its parked KVM fd
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
  # stopped, vcpu-failed, helper-started, helper-died, helper-restarted, console-backend,
  # cpu-added, cpu-removed, cpu-change-failed
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
  replay @10 :Text;       # --record/--replay: where the console's log stands (empty: neither)
  generationId @9 :Text;  # the VM generation ID (VMGenID), a GUID; new in each restored VM
  rngReplay @11 :Text;    # --record/--replay: where the rng's log stands (empty: neither)
}

# The VM's state, as QMP names them.
enum RunState {
  running @0;
  paused @1;
  incoming @2;      # waiting for a migration source or reading a snapshot (--incoming, --restore)
  migrating @3;     # running while a live migration sends it
  postmigrate @4;   # it runs on the destination now; this vmm-core is ending
  shutdown @5;      # being stopped (SIGTERM's wait for the guest, or ending)
}

struct ConsoleFault {
  union {
    clear @0 :Void;             # remove every rule
    dropConnection @1 :Void;    # disconnect the backend's client now
    delayWritesMs @2 :UInt32;   # every write to the backend waits this long first
    forbiddenSyscall @3 :Void;  # chardevd makes a forbidden system call (seccomp test)
  }
}

struct MigrateOptions {
  downtimeMs @0 :UInt32;      # the longest pause allowed at the end (0: 300 ms, as QEMU)
  bandwidth @1 :UInt64;       # bytes per second (0: no limit)
  tlsCreds @2 :Text;          # QEMU's tls-creds: a directory (see migrated.capnp); empty: no TLS
  tlsHostname @3 :Text;       # QEMU's tls-hostname
  compress @4 :Bool;          # LZ4-compress RAM runs in the stream (a snapshot's too)
  maxPasses @5 :UInt32;       # pre-copy passes before the VM is paused even though the pause
                              # will be over downtimeMs (0: 30); the status then says forced
  postcopy @6 :Bool;          # switch to post-copy after the first pass that does not fit
                              # downtimeMs (a live channel only)
  postcopyBandwidth @7 :UInt64; # bytes per second for the pages post-copy sends in the
                              # background (QEMU's max-postcopy-bandwidth; 0: as bandwidth);
                              # the pages the destination faults on go at once
  worksetMs @8 :UInt32;       # a snapshot: record the pages the guest writes during this
                              # long before the pause (KVM's dirty log) as its working set,
                              # which a lazy restore loads first (0: none)
}

struct MigrationStatus {
  phase @0 :Text;             # none, setup, pre-copy, stop-and-copy, postcopy-active, completed,
                              # failed, cancelled, postcopy-paused (post-copy broke: the VM
                              # is split between the hosts and stays paused)
  uri @1 :Text;
  passes @2 :UInt32;
  bytes @3 :UInt64;           # stream bytes sent
  ramBytes @4 :UInt64;        # guest RAM covered (zero pages count without being sent)
  dirtyPages @5 :UInt64;      # pages dirty after the last pass
  dirtyRate @6 :UInt64;       # pages per second during the last pass
  bandwidth @7 :UInt64;       # bytes per second in the last pass
  expectedDowntimeMs @8 :UInt64;
  downtimeMs @9 :UInt64;      # when completed
  totalMs @10 :UInt64;
  error @11 :Text;
  memoryBytes @12 :UInt64;    # the VM's RAM, to draw progress against
  forced @13 :Bool;           # the pause came at maxPasses, not because it fit downtimeMs
  postcopyAllowed @14 :Bool;  # the migration may switch to post-copy (or was asked to)
  postcopyPages @15 :UInt64;  # post-copy: pages carried after the switch
  postcopyRequests @16 :UInt64; # the destination's faults that asked the source for a page
  faultP50Micros @17 :UInt64; # the destination: from a request to its page in place
  faultP99Micros @18 :UInt64;
  postcopyMs @19 :UInt64;     # from the switch to the last page
  faults @20 :UInt64;         # the destination: page faults served during post-copy
  backendFaults @21 :UInt64;  # of them, device backends' (blockd's own userfaultfd)
}
