@0xd117a17d7d200a2b;
# What a running VM is, for snapshots and live migration: typed, so that a stream from another
# build or host is checked field by field rather than copied as kernel structs. Each part is
# saved and restored next to its owner (vmm-core/src/vcpu/state.rs, vmm-core/src/kvm_state.rs).
#
# Versioning: fields are only ever added (Cap'n Proto reads older and newer structs), and
# `format` in the stream's header says which generation wrote it; a reader refuses a
# generation it does not know.

struct VcpuState {
  id @0 :UInt32;
  mpState @1 :UInt32;          # KVM_MP_STATE_*: RUNNABLE, UNINITIALIZED (an AP before SIPI), HALTED...
  regs @2 :Regs;
  sregs @3 :Sregs;
  fpu :union {
    xsave @4 :Xsave;
    legacy @5 :LegacyFpu;      # hosts without XSAVE
  }
  xcrs @6 :List(Xcr);          # empty when the host has none
  debugRegs @7 :DebugRegs;
  lapic @8 :Data;              # the LAPIC's 1 KiB register page, in the LAPIC's own layout
  msrs @9 :List(Msr);
  events @10 :Events;
}

struct Regs {
  rax @0 :UInt64;  rbx @1 :UInt64;  rcx @2 :UInt64;  rdx @3 :UInt64;
  rsi @4 :UInt64;  rdi @5 :UInt64;  rsp @6 :UInt64;  rbp @7 :UInt64;
  r8 @8 :UInt64;   r9 @9 :UInt64;   r10 @10 :UInt64; r11 @11 :UInt64;
  r12 @12 :UInt64; r13 @13 :UInt64; r14 @14 :UInt64; r15 @15 :UInt64;
  rip @16 :UInt64; rflags @17 :UInt64;
}

struct Segment {
  base @0 :UInt64;
  limit @1 :UInt32;
  selector @2 :UInt16;
  type @3 :UInt8;
  present @4 :Bool;
  dpl @5 :UInt8;
  db @6 :Bool;
  s @7 :Bool;
  l @8 :Bool;
  g @9 :Bool;
  avl @10 :Bool;
  unusable @11 :Bool;
}

struct DescriptorTable {
  base @0 :UInt64;
  limit @1 :UInt16;
}

struct Sregs {
  cs @0 :Segment; ds @1 :Segment; es @2 :Segment; fs @3 :Segment;
  gs @4 :Segment; ss @5 :Segment; tr @6 :Segment; ldt @7 :Segment;
  gdt @8 :DescriptorTable;
  idt @9 :DescriptorTable;
  cr0 @10 :UInt64; cr2 @11 :UInt64; cr3 @12 :UInt64; cr4 @13 :UInt64; cr8 @14 :UInt64;
  efer @15 :UInt64;
  apicBase @16 :UInt64;
  interruptBitmap @17 :List(UInt64);   # the pending external interrupt, one bit per vector
}

# The XSAVE area, taken apart: the legacy FXSAVE region's fields, the header, and each state
# component by its feature number, so that a host whose CPU lays components out at other
# offsets places them where its own CPUID (leaf 0xD) says.
struct Xsave {
  fcw @0 :UInt16;
  fsw @1 :UInt16;
  ftw @2 :UInt8;                # abridged tag word
  fop @3 :UInt16;
  fip @4 :UInt64;
  fdp @5 :UInt64;
  mxcsr @6 :UInt32;
  mxcsrMask @7 :UInt32;
  st @8 :Data;                  # ST0-ST7 / MM0-MM7, 16 bytes each
  xmm @9 :Data;                 # XMM0-XMM15, 16 bytes each
  xstateBv @10 :UInt64;
  xcompBv @11 :UInt64;
  components @12 :List(XsaveComponent);
}

struct XsaveComponent {
  feature @0 :UInt8;            # the XCR0 bit: 2 AVX, 5-7 AVX-512, 9 PKRU...
  data @1 :Data;
}

struct LegacyFpu {
  fcw @0 :UInt16;
  fsw @1 :UInt16;
  ftwx @2 :UInt8;
  lastOpcode @3 :UInt16;
  lastIp @4 :UInt64;
  lastDp @5 :UInt64;
  mxcsr @6 :UInt32;
  fpr @7 :Data;                 # 8 x 16 bytes
  xmm @8 :Data;                 # 16 x 16 bytes
}

struct Xcr {
  index @0 :UInt32;
  value @1 :UInt64;
}

struct DebugRegs {
  db @0 :List(UInt64);          # DR0-DR3
  dr6 @1 :UInt64;
  dr7 @2 :UInt64;
  flags @3 :UInt64;
}

struct Msr {
  index @0 :UInt32;
  data @1 :UInt64;
}

struct Events {
  exceptionInjected @0 :Bool;
  exceptionNr @1 :UInt8;
  exceptionHasErrorCode @2 :Bool;
  exceptionPending @3 :Bool;
  exceptionErrorCode @4 :UInt32;
  exceptionHasPayload @5 :Bool;
  exceptionPayload @6 :UInt64;
  interruptInjected @7 :Bool;
  interruptNr @8 :UInt8;
  interruptSoft @9 :Bool;
  interruptShadow @10 :UInt8;
  nmiInjected @11 :Bool;
  nmiPending @12 :Bool;
  nmiMasked @13 :Bool;
  sipiVector @14 :UInt32;
  flags @15 :UInt32;            # KVM_VCPUEVENT_VALID_*: which of the fields are meant
  smiSmm @16 :Bool;
  smiPending @17 :Bool;
  smiInsideNmi @18 :Bool;
  latchedInit @19 :UInt8;
  tripleFaultPending @20 :Bool;
}

# The in-kernel irqchip, PIT and kvmclock.
struct KvmState {
  picMaster @0 :Pic;
  picSlave @1 :Pic;
  ioapic @2 :Ioapic;
  pit @3 :Pit;
  clockNs @4 :UInt64;           # kvmclock, in guest nanoseconds
}

struct Pic {
  lastIrr @0 :UInt8;
  irr @1 :UInt8;
  imr @2 :UInt8;
  isr @3 :UInt8;
  priorityAdd @4 :UInt8;
  irqBase @5 :UInt8;
  readRegSelect @6 :UInt8;
  poll @7 :UInt8;
  specialMask @8 :UInt8;
  initState @9 :UInt8;
  autoEoi @10 :UInt8;
  rotateOnAutoEoi @11 :UInt8;
  specialFullyNestedMode @12 :UInt8;
  init4 @13 :UInt8;
  elcr @14 :UInt8;
  elcrMask @15 :UInt8;
}

struct Ioapic {
  baseAddress @0 :UInt64;
  ioregsel @1 :UInt32;
  id @2 :UInt32;
  irr @3 :UInt32;
  redirection @4 :List(UInt64);   # the 24 redirection table entries
}

struct Pit {
  channels @0 :List(PitChannel);  # 3
  flags @1 :UInt32;
}

struct PitChannel {
  count @0 :UInt32;
  latchedCount @1 :UInt16;
  countLatched @2 :UInt8;
  statusLatched @3 :UInt8;
  status @4 :UInt8;
  readState @5 :UInt8;
  writeState @6 :UInt8;
  writeLatch @7 :UInt8;
  rwMode @8 :UInt8;
  mode @9 :UInt8;
  bcd @10 :UInt8;
  gate @11 :UInt8;
  countLoadTime @12 :Int64;
}

# vmm-core's own devices.

# The 8250 UART (vm-superio's registers, and the bytes the guest has not read yet).
struct Serial {
  baudDivisorLow @0 :UInt8;
  baudDivisorHigh @1 :UInt8;
  interruptEnable @2 :UInt8;
  interruptIdentification @3 :UInt8;
  lineControl @4 :UInt8;
  lineStatus @5 :UInt8;
  modemControl @6 :UInt8;
  modemStatus @7 :UInt8;
  scratch @8 :UInt8;
  inBuffer @9 :Data;
}

# The ACPI Generic Event Device: the events the guest has not acknowledged.
struct Ged {
  pending @0 :UInt8;
}

# The CPU hotplug controller: the selected vCPU and each vCPU slot's status.
struct CpuHotplug {
  selected @0 :UInt32;
  slots @1 :List(CpuSlot);
}

struct CpuSlot {
  enabled @0 :Bool;
  inserting @1 :Bool;
  removing @2 :Bool;
  ejectWanted @3 :Bool;
}

# A PCI function's configuration space: its 256 bytes and where the guest put its BARs.
struct PciConfig {
  bytes @0 :Data;
  bars @1 :List(PciBar);
}

struct PciBar {
  index @0 :UInt8;
  addr @1 :UInt64;
  size @2 :UInt64;
}

# A virtio-pci (modern) function: the transport's registers, its queues and MSI-X table, and
# where each ring's backend goes on.
struct VirtioPci {
  slot @0 :UInt8;
  name @1 :Text;                 # the device (a disk's name); the destination must have it
  config @2 :PciConfig;
  deviceFeatureSelect @3 :UInt32;
  driverFeatureSelect @4 :UInt32;
  driverFeatures @5 :UInt64;
  status @6 :UInt8;
  configVector @7 :UInt16;
  queueSelect @8 :UInt16;
  queues @9 :List(VirtioQueue);
  msix @10 :List(MsixEntry);
  msixEnabled @11 :Bool;
  msixMasked @12 :Bool;
  active @13 :Bool;              # DRIVER_OK reached and the backend started
  deviceConfig @14 :Data;        # the device's configuration space as the guest last set it
}

struct VirtioQueue {
  size @0 :UInt16;
  vector @1 :UInt16;
  enabled @2 :Bool;
  desc @3 :UInt64;
  avail @4 :UInt64;
  used @5 :UInt64;
  # The next available-ring index the backend takes (GET_VRING_BASE once its requests in
  # flight completed, so it equals the used index).
  base @6 :UInt16;
}

struct MsixEntry {
  addr @0 :UInt64;
  data @1 :UInt32;
  masked @2 :Bool;
}

# The whole VM's state, taken while it is paused; RAM travels in the stream's RAM sections.
struct VmState {
  memory @0 :UInt64;
  maxCpus @1 :UInt32;
  vcpus @2 :List(VcpuState);
  kvm @3 :KvmState;
  serial @4 :Serial;
  ged @5 :Ged;
  cpuHotplug @6 :CpuHotplug;
  pci @7 :List(VirtioPci);
  paused @8 :Bool;               # paused by the user (a restore stays paused too)
  boot @9 :BootSpec;             # what a reset boots (the source's, checked on arrival)
  recording @10 :RecordMarks;    # taken while recording (--record): where each log stood
}

# Where each of a recording's logs stood when a snapshot was taken: `vmm-core run --restore
# file:SNAP --replay DIR` goes on from there.
struct RecordMarks {
  logs @0 :List(LogMark);
  consoleWritten @1 :UInt64;     # bytes the guest had written to its console (where input
                                 # stands in the console's log)
}

struct LogMark {
  name @0 :Text;                 # the device: serial0, rng0, disk0, ...
  bytes @1 :UInt64;              # its log's length then (a disk recorded on a base copy has
                                 # the image as it was then beside it: LOG.at-BYTES)
}

# The files and command line the VM boots from at a reset: a VM that moves keeps them.
struct BootSpec {
  kernel @0 :Text;     # absolute path
  initramfs @1 :Text;  # absolute path, or empty
  cmdline @2 :Text;    # the command line the kernel gets
}
