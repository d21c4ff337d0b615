@0xdba0c8930c6c307a;
# blockd serves disk images as named vhost-user-blk exports. vmm-core (or an orchestrator)
# connects on a control socket, adds an export per disk and gets back the vhost-user socket
# that the VMM's frontend then connects to; the block data never passes through this RPC.
#
# File descriptors travel on a side channel, as for chardevd (see chardevd.capnp): on each new
# control connection, before any RPC message, the client sends one byte (1) with SCM_RIGHTS
# carrying its end of a SOCK_SEQPACKET pair. For an `add` with fdsOnSideChannel, the client
# first sends on that pair one message, the export's name, with SCM_RIGHTS carrying the open
# image and the bound, listening vhost-user socket. blockd then opens no host path at all.

interface Blockd {
  add @0 (export :Export) -> (socket :Text);
  # Serves an image; returns the vhost-user socket's path.

  remove @1 (name :Text) -> ();
  # Stops serving it (a connected frontend is disconnected) and flushes the image.

  list @2 () -> (exports :List(ExportInfo));
  # Every export, with its statistics.

  injectFault @3 (fault :Fault) -> ();
  # Fault injection for users' tests; see Fault.

  setThrottle @4 (name :Text, throttle :Throttle) -> ();
  # Throttles export `name` at run time (effective at once). With a group name, the export
  # joins that group: all its members share one budget, round-robin between them. The
  # limits given become the group's; with none given, an existing group's are kept. With
  # neither a group nor limits, the export is no longer throttled.

  addFaultRule @5 (rule :FaultRule) -> (id :UInt32);
  # Adds an I/O fault rule (like QEMU's blkdebug); returns its id.

  removeFaultRule @6 (id :UInt32) -> ();
  listFaultRules @7 () -> (rules :List(FaultRule));

  watch @8 (watcher :Watcher) -> ();
  # Tells `watcher` whenever an export stops on an I/O error (error policy stop or enospc).
  # vmm-core watches, and pauses the VM.

  resume @9 (name :Text) -> (retried :UInt32);
  # Retries the requests a stopped export holds and serves again (empty name: every export).

  userfaultfdDevice @10 () -> ();
  # /dev/userfaultfd, opened by the client, comes on the side channel first (one message,
  # "userfaultfd", with its descriptor): blockd makes the userfaultfd a post-copy destination's
  # POSTCOPY_ADVISE asks for from it. (An unprivileged blockd, as under its systemd unit,
  # cannot open the device; a descriptor's access was checked when it was opened.)

  mark @11 (name :Text) -> (logBytes :UInt64);
  # Export `name`, recording, at a snapshot (its queues stopped): the image is flushed (a copy
  # of it now holds what the guest wrote) and the log too; returns where the log stands
  # (its length in bytes), from which a replay of that snapshot goes on.

  resize @12 (name :Text, bytes :UInt64, force :Bool) -> (old :UInt64);
  # Export `name` grows to `bytes` (a raw file is extended, a qcow2 image's virtual size
  # grows; a block device must have grown to it already); returns the size it had. Shrinking
  # is refused unless `force` (raw files only). The frontend tells the guest (a virtio
  # config-change interrupt) and reads the config space again.

  snapshot @13 (name :Text, overlay :Text, backingName :Text) -> ();
  # A live external snapshot: export `name` gets a new qcow2 overlay on top, and the guest's
  # writes go there from then on; the old top is read-only from then on. The overlay, an
  # empty file opened read-write, comes on the side channel first (one message,
  # "snapshot:NAME", with its descriptor); blockd formats it, its header naming the old top
  # as `backingName`. `overlay` is its path, for `list` to show.

  commit @14 (name :Text, base :Text) -> (bytes :UInt64);
  # Export `name`'s top overlay is merged into the layer below it while the guest runs, and
  # that layer becomes the export's top. The base, opened read-write, comes on the side
  # channel first ("commit:NAME", with its descriptor); `base` is its path, for `list`.
  # Returns, when done, the bytes copied; meanwhile `list` shows how far it is (job).
}

interface Watcher {
  stopped @0 (export :Text, reason :Text) -> ();
}

struct FaultRule {
  id @0 :UInt32;              # given by blockd
  export @1 :Text;            # empty: every export
  read @2 :Bool;              # which requests it matches
  write @3 :Bool;
  flush @4 :Bool;
  start @5 :UInt64;           # reads and writes must overlap bytes [start, end)
  end @6 :UInt64;             # 0: to the end of the disk
  action :union {
    errno @7 :Int32;          # fail the request with this errno (5 EIO, 28 ENOSPC, ...)
    delayMs @8 :UInt32;       # do it after this many milliseconds
    exit @9 :Void;            # blockd exits at once (a crash at a chosen moment)
  }
  once @10 :Bool;             # fire once, then the rule goes
  probability @11 :Float64;   # between 0 and 1: the chance it fires; 0 or 1: always
  hits @12 :UInt64;           # how many times it fired (listFaultRules)
}

struct Limit {
  avg @0 :UInt64;             # units (bytes or requests) per second; 0: no limit
  max @1 :UInt64;             # burst rate; 0: bursts of avg/10 units only
  burstLength @2 :UInt64;     # seconds the burst rate may last (1 if 0)
}

struct Throttle {
  group @0 :Text;             # the group's name (empty: the export's own budget)
  bpsTotal @1 :Limit;         # QEMU's throttling.bps-total, and so on
  bpsRead @2 :Limit;
  bpsWrite @3 :Limit;
  iopsTotal @4 :Limit;
  iopsRead @5 :Limit;
  iopsWrite @6 :Limit;
}

struct Fault {
  union {
    clear @0 :Void;             # remove every rule
    forbiddenSyscall @1 :Void;  # blockd makes a system call outside its seccomp allowlist
                                # (after answering), to test that it dies and is reported
  }
}

struct Export {
  name @0 :Text;
  image @1 :Text;             # the image's path (blockd opens it, unless fdsOnSideChannel)
  format @2 :Text;            # raw | qcow2
  readonly @3 :Bool;
  queues @4 :UInt16;          # request queues, one worker each
  serial @5 :Text;            # GET_ID, at most 20 bytes
  socket @6 :Text;            # where to listen (blockd binds it, unless fdsOnSideChannel)
  fdsOnSideChannel @7 :Bool;
  writethrough @8 :Bool;      # every write durable before it completes
  persist @9 :Bool;           # outlives the control connection that added it (an operator's
                              # export); without it, an export ends with that connection
  readError @10 :Text;        # what an I/O error on a read does, as QEMU's rerror: report
                              # (the guest gets IOERR; the default), ignore (the request
                              # completes as if it worked), stop (the export holds it and
                              # stops, the watcher is told; `resume` retries it), enospc (stop
                              # on ENOSPC, report anything else)
  writeError @11 :Text;       # the same for writes and flushes (QEMU's werror)
  log @12 :DiskLog;           # record or replay its requests: the log comes as a third
                              # descriptor on the side channel (after the image and socket)
  backing @13 :List(Text);    # a qcow2 image's backing chain, nearest first: each file's
                              # format (raw, qcow2); the files follow the others on the side
                              # channel, read-only, in the same order
}

enum DiskLog {
  none @0;
  record @1;
  replay @2;
  recordOnBase @3;            # record, with a copy of the image as it was at the start (made
                              # by vmm-core beside the log): a read that no write raced is
                              # logged as a checksum, its bytes to come from a working copy
                              # of that copy on replay
  replayOnCopy @4;            # replay, the image being a working copy of the recording's
                              # base copy: the guest's writes are done there, so that reads
                              # logged as checksums find their bytes
}

struct ExportInfo {
  name @0 :Text;
  image @1 :Text;
  format @2 :Text;
  readonly @3 :Bool;
  queues @4 :UInt16;
  size @5 :UInt64;            # bytes
  socket @6 :Text;
  connected @7 :Bool;         # a frontend is connected now
  writeback @8 :Bool;         # the write cache is on (the guest may turn it off)
  direct @9 :Bool;            # the image is open with O_DIRECT
  ops @10 :List(OpStats);
  invalid @11 :UInt64;        # requests refused as malformed
  throttle @12 :Throttle;     # its group and the group's limits (all limits 0: not throttled)
  stopped @13 :Text;          # why it stopped on an I/O error (empty: it serves)
  readError @14 :Text;        # its error policies
  writeError @15 :Text;
  interrupts @16 :UInt64;     # used-ring notifications sent to the guest
  interruptsSuppressed @17 :UInt64;  # left out: the driver's used_event (EVENT_IDX) asked for none
  replay @18 :Text;           # record/replay: "recording, N request(s)" or "replaying, N
                              # request(s) answered" (empty: neither)
  job @19 :Text;              # a commit under way: its pass and the MiB copied (empty: none)
}

struct OpStats {
  op @0 :Text;                # read, write, flush, discard, write-zeroes, get-id
  requests @1 :UInt64;
  bytes @2 :UInt64;
  errors @3 :UInt64;
  latency @4 :List(Bucket);   # request latency inside blockd, from pop to completion
}

struct Bucket {
  upToUs @0 :UInt64;          # the bucket holds latencies up to this many microseconds (the
                              # last bucket's bound is 0: everything above)
  count @1 :UInt64;
}
