@0xb3c0f5e2a4d19e77;
# vmm-core ↔ migrated: vmm-core drives a migration or snapshot step by step (it owns the VM's
# pause and state, and KVM's dirty log); migrated owns the channel and moves the RAM itself,
# reading and writing the guest-RAM memfd it is handed. RAM never passes through vmm-core.
#
# Descriptors travel on the side channel (see blockd.capnp): `open` and `receive` each take the
# guest-RAM memfd and the channel's descriptor, which vmm-core sends together just before the
# call (vmm-core opens every channel, and reads the tls-creds files; migrated, sandboxed, reaches
# no network, file or program by itself).

interface Migrated {
  # The source: takes the channel vmm-core opened to `uri` (tcp:HOST:PORT, unix:PATH, fd:N,
  # exec:COMMAND, file:PATH; the text is for messages and TLS's default name) and writes the
  # stream's header for a VM of this shape.
  open @0 (uri :Text, tls :Tls, shape :Shape, bandwidth :UInt64, kind :ChannelKind,
           compress :Bool) -> ();
  # (compress: LZ4-compress the RAM runs that shrink; the destination reads either)
  # (bandwidth: bytes per second the stream may use; 0 is no limit)

  # Sends the pages whose bits are set (bit n of word w is the 4 KiB page 64w+n of the memfd),
  # or every page when `all` (zero pages left out). Returns what it sent and how long it took.
  # A switch to post-copy (switchNow) stops it after the run it is on: `unsent` then holds
  # the pages it had still to send (as `bitmap`), and `interrupted` is set.
  sendPages @1 (bitmap :List(UInt64), all :Bool) -> (stats :PassStats, interrupted :Bool, unsent :List(UInt64));

  # The device state, then the end marker; for a live migration, waits until the destination
  # says it has all of it and will run the VM.
  # workset (a snapshot's, may be empty): the pages the guest was writing, recorded in the
  # file for a lazy restore to load first.
  finish @2 (state :Data, workset :List(UInt64)) -> (bytes :UInt64);

  # Drops the outgoing channel: the migration failed or was cancelled; the source goes on.
  abort @3 () -> ();

  # The destination: takes one whole stream from `uri` into the memfd and returns the device
  # state once every check has passed (a stream that fails one changes nothing but RAM).
  # waitMs: how long to wait for a source to connect (0: as long as it takes).
  # postcopy: the source switched to post-copy; the rest of RAM comes through the page server
  # (serveFaults), which must start before the VM runs.
  # lazy: a snapshot file is not read whole: its sections are indexed and the device state
  # returned (postcopy set), and the page server loads RAM from the file as it runs.
  receive @4 (uri :Text, tls :Tls, shape :Shape, kind :ChannelKind, waitMs :UInt32, peeked :Bool, lazy :Bool) -> (state :Data, bytes :UInt64, postcopy :Bool);

  # The destination restored the state (ok) or could not (why): the source hears it, and exits
  # or goes on.
  started @5 (ok :Bool, why :Text) -> ();

  # The source, while a call sends: bytes written to the stream since `open`, and guest pages
  # sent (each page of each pass counts), as they are written.
  progress @6 () -> (bytes :UInt64, pages :UInt64);

  # The destination, before it knows the VM's shape: takes the source's connection from `uri`
  # (as receive does) and reads the stream's header only, returning the source's settings
  # (Shape.spec). The connection is kept: the next receive (with peeked) goes on from there.
  peek @7 (uri :Text, tls :Tls, kind :ChannelKind, waitMs :UInt32) -> (spec :Text);

  # The source, instead of `finish`: the device state and the switch to post-copy (`pending`:
  # a bitmap of the pages still to send, as sendPages's). Returns once the destination has
  # every page. An error: the destination refused the VM before it ran it (the source may
  # resume). `broken` not empty: post-copy broke after the destination started the VM, whose
  # state is now split between the hosts (the source must not resume it).
  # bandwidth: bytes per second for the pages sent in the background (0: as `open`'s);
  # the pages the destination asks for go at once.
  postcopy @8 (state :Data, pending :List(UInt64), bandwidth :UInt64) -> (summary :PostcopySummary, broken :Text);

  # The destination, after a receive that said postcopy: serves page faults on a
  # userfaultfd, sent on the side channel with the memfd (the guest RAM memfd, then the
  # userfaultfd). The first call (vmm-core's, `placer`) starts the page server and the rest
  # of the stream; later ones (blockd's descriptors) join it. `mappings`: where guest RAM
  # lies in the address space of the process that made the descriptor.
  serveFaults @9 (who :Text, mappings :List(Mapping), placer :Bool) -> ();

  # The destination: waits until every page came (or the rest cannot come: `broken` says
  # why), or the channel breaks: `paused` says why, and `pauses` counts the breaks (call
  # again with `seen` set to it to wait past this one).
  postcopyWait @10 (seen :UInt64) -> (summary :PostcopySummary, broken :Text, paused :Text, pauses :UInt64);

  # The destination: stops serving faults (every descriptor's memory is unregistered).
  postcopyEnd @11 () -> ();

  # The source: the pass under way (or the next) stops after its current run, for a switch
  # to post-copy (vmmctl migrate postcopy). Cleared by `open`.
  switchNow @12 () -> ();

  # Post-copy broke (the channel): resumes it on a new channel (QEMU's migrate-recover on
  # the destination, migrate -r on the source). The channel's descriptor comes on the side
  # channel as for `open` and `receive`. The destination takes the source's connection, says
  # which pages it has, and returns; the source connects, sends the pages the destination
  # lacks, and returns when post-copy is over, as `postcopy` does.
  recover @13 (uri :Text, tls :Tls, kind :ChannelKind, waitMs :UInt32) -> (summary :PostcopySummary, broken :Text);
}

struct Mapping {
  va @0 :UInt64;      # the mapping's address in its process
  gpa @1 :UInt64;
  bytes @2 :UInt64;
}

struct PostcopySummary {
  pages @0 :UInt64;      # pages the post-copy phase carried
  requests @1 :UInt64;   # faults that asked the source for a page
  p50Micros @2 :UInt64;  # from a request to its page in place
  p99Micros @3 :UInt64;
  maxMicros @4 :UInt64;
  micros @5 :UInt64;     # from the switch to the last page
  faults @6 :UInt64;     # page faults served (vmm-core's, the vCPUs' among them)
  backendFaults @7 :UInt64; # of them, those of device backends (blockd)
}

struct Shape {
  regions @0 :List(Region);     # guest RAM, in memfd order
  vcpus @1 :UInt32;
  spec @2 :Text;                # the source's run settings as a --config file (TOML), carried
                                # in the stream's header: `run --restore file:P` needs no more
}

struct Region {
  gpa @0 :UInt64;
  bytes @1 :UInt64;
}

# What the channel's descriptor is.
enum ChannelKind {
  stream @0;     # a connected stream socket (tcp, unix, or an exec: command's socket pair)
  listener @1;   # a listening socket: accept sources until one passes the checks
  file @2;       # a snapshot file (written by the source, read by the destination)
}

# QEMU's names: tls-creds (a directory with ca-cert.pem, server-cert.pem, server-key.pem,
# client-cert.pem, client-key.pem), tls-hostname, tls-authz. Empty creds: no TLS. vmm-core
# reads the files: the CA, and this side's certificate and key (server-* on the destination,
# client-* on the source).
struct Tls {
  creds @0 :Text;      # the directory, for messages
  hostname @1 :Text;
  authz @2 :List(Text);
  ca @3 :Data;
  cert @4 :Data;
  key @5 :Data;
}

struct PassStats {
  bytes @0 :UInt64;
  pages @1 :UInt64;
  zeroPages @2 :UInt64;
  micros @3 :UInt64;
}
