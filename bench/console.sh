#!/usr/bin/env bash
# Console throughput: the test guest writes BYTES (default 1 MiB) to its 8250 serial port,
# which goes to a file: through chardevd for vmm-core (--serial file=...), and
# through a file chardev for QEMU when it is installed. Runs alternate, in the same run.
# Throughput = BYTES / (time of a run with BYTES - time of the same run with 0 bytes), so
# boot and exit cost cancel out. Each file is checked to hold every byte.
#
# usage: bench/console.sh [RUNS] [BYTES]     (default 2 runs, 1048576 bytes)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-2}
bytes=${2:-1048576}
(cd "$root" && cargo build --release --quiet -p vmm-core -p chardevd)
(cd "$root/tests/guest" && cargo build --release --quiet 2>/dev/null)
vmm="$root/target/release/vmm-core"
guest="$root/tests/guest/target/release/test-guest"
. "$root/bench/qemu10.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "command: bench/console.sh $runs $bytes"
echo "host: $(uname -r), $(nproc) CPUs, KVM-PVM: $([ -d /sys/module/kvm_pvm ] && echo yes || echo no)"
if [ -n "$qemu" ]; then echo "qemu: $qemu_version ($qemu)"; else echo "qemu: not installed (bench/qemu10.sh installs QEMU 10.0.2 on Debian 12)"; fi

exec python3 - "$runs" "$bytes" "$vmm" "$guest" "$qemu" "$work" <<'PY'
import os, statistics, subprocess, sys, time
runs, nbytes, vmm, guest, qemu, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]

def ours(n):
    log = os.path.join(work, "ours.log")
    return log, [vmm, "run", "--kernel", guest, "--memory", "128M", "--cmdline", f"tg.spew={n}",
                 "--serial", f"file={log}"]

def theirs(n):
    log = os.path.join(work, "qemu.log")
    return log, [qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128M",
                 "-nodefaults", "-no-user-config", "-display", "none", "-bios", "/usr/share/qemu/qboot.rom",
                 "-chardev", f"file,id=c0,path={log}", "-serial", "chardev:c0",
                 "-kernel", guest, "-append", f"tg.spew={n}"]

def run(make, n):
    log, argv = make(n)
    t0 = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"error: {argv[0]} exited with {p.returncode}: {p.stderr.decode(errors='replace')[-500:]}")
    text = open(log, "rb").read()
    if f"tg: spew done bytes={n}".encode() not in text or len(text) < n:
        sys.exit(f"error: {log} does not hold the {n} bytes the guest wrote ({len(text)} bytes)")
    return dt

peers = [("vmm-core + chardevd", ours)] + ([("QEMU (file chardev)", theirs)] if qemu else [])
times = {name: {0: [], nbytes: []} for name, _ in peers}
for _ in range(runs):
    for n in (0, nbytes):
        for name, make in peers:
            times[name][n].append(run(make, n))

print(f"\n{runs} runs each; seconds (median) for 0 and {nbytes} bytes, and the throughput")
rates = {}
for name, _ in peers:
    t0, t1 = statistics.median(times[name][0]), statistics.median(times[name][nbytes])
    rates[name] = nbytes / (t1 - t0)
    print(f"{name:22} 0 B: {t0:7.3f}   {nbytes} B: {t1:8.3f}   -> {rates[name] / 1024:8.1f} KiB/s")
if len(rates) == 2:
    a, b = rates.values()
    print(f"ratio ours/QEMU (throughput): {a / b:.3f}")
PY
