#!/usr/bin/env bash
# Boot benchmark: the test guest under vmm-core, and under QEMU when it is installed, in the
# same run, alternating. Prints median/min/max of
#   - process start to the first KVM_RUN (vmm-core only: the VMM's own start-up, helpers
#     spawned and jailed), with vmm-core's CPU time by then, the helpers' CPU time by the
#     ready marker, and each start-up phase's end (time and CPU: --print-boot-times),
#   - process start to the guest's ready marker ("tg: ready" on the serial console),
# the ratio ours/QEMU to the ready marker, and vmm-core's resident memory beyond the guest RAM
# it touched (VmRSS - RssShmem, sampled at the ready marker), and that of its helpers. The
# console goes through chardevd, as it does by default.
#
# QEMU gets -cpu host,-arch-capabilities: QEMU 7.2 aborts on that MSR under KVM-PVM.
#
# usage: bench/boot.sh [RUNS]      (default 20; VMM_BENCH_CPUS, VMM_BENCH_MEMORY override)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-20}
cpus=${VMM_BENCH_CPUS:-1}
memory=${VMM_BENCH_MEMORY:-128M}

(cd "$root" && cargo build --release --quiet -p vmm-core -p chardevd -p migrated -p vmmctl)
(cd "$root/tests/guest" && cargo build --release --quiet 2>/dev/null)
vmm="$root/target/release/vmm-core"
guest="$root/tests/guest/target/release/test-guest"
. "$root/bench/qemu10.sh"

echo "command: bench/boot.sh $runs   (cpus=$cpus memory=$memory)"
echo "host: $(uname -r), $(nproc) CPUs, KVM-PVM: $([ -d /sys/module/kvm_pvm ] && echo yes || echo no)"
echo "vmm-core: $vmm"
if [ -n "$qemu" ]; then echo "qemu: $qemu_version ($qemu)"; else echo "qemu: not installed (bench/qemu10.sh installs QEMU 10.0.2 on Debian 12)"; fi

exec python3 - "$runs" "$cpus" "$memory" "$vmm" "$guest" "$qemu" <<'PY'
import os, signal, statistics, subprocess, sys, threading, time

runs, cpus, memory, vmm, guest, qemu = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
cmdline = "tg.scenario=idle tg.work=100000"
MARKER = b"tg: ready"

def rss_beyond_guest(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssShmem"):
                fields[k] = int(v.split()[0])
    return fields["VmRSS"] - fields["RssShmem"]

def helpers_rss(pid):
    """KiB resident in the process's children (vmm-core's chardevd)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            for c in f.read().split():
                total += rss_beyond_guest(int(c))
    return total

def task_cpu_ms(pid):
    """CPU ms of a process's live threads (the scheduler's own count, to the microsecond:
    /proc/PID/stat's ticks round a helper's few ms down to 0)."""
    total = 0.0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/sched") as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        total += float(line.split(":")[1])
        except OSError:
            pass
    return total

def children_cpu_ms(pid):
    """CPU ms of the process's children and theirs (the helpers and their jailed
    processes), so far."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    for c in f.read().split():
                        stack.append(int(c))
                        total += task_cpu_ms(int(c))
            except OSError:
                pass
    return total

def boot(argv, want_first_run):
    """Starts argv, returns (ms to first KVM_RUN or None, ms to ready, KiB beyond guest RAM)."""
    t0 = time.time_ns()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    buf = b""
    deadline = time.time() + 60
    while MARKER not in buf:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk or time.time() > deadline:
            p.kill(); p.wait()
            sys.exit(f"error: {argv[0]} exited or timed out before {MARKER!r}:\n{buf.decode(errors='replace')}")
        buf += chunk
    t_ready = time.time_ns()
    rss = rss_beyond_guest(p.pid)
    helpers = helpers_rss(p.pid)
    helpers_cpu = children_cpu_ms(p.pid)
    # SIGINT: both stop at once (vmm-core would ask the guest on SIGTERM, and wait).
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    reader.join(timeout=5)
    phases = {}
    if want_first_run:
        # "boot-time PHASE unix-ns=N cpu-us=C": each phase's end (the first time it ends),
        # in ms since the process started, and vmm-core's CPU ms by then.
        for line in b"".join(err).decode(errors="replace").splitlines():
            if "boot-time " not in line:
                continue
            words = line.split("boot-time ", 1)[1].split()
            kv = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            if words[0] not in phases and "unix-ns" in kv:
                phases[words[0]] = ((int(kv["unix-ns"]) - t0) / 1e6, int(kv.get("cpu-us", 0)) / 1e3)
        if "first-kvm-run" not in phases:
            sys.exit("error: vmm-core printed no first-KVM_RUN time")
    return phases, (t_ready - t0) / 1e6, rss, helpers, helpers_cpu

ours_cmd = [vmm, "run", "--kernel", guest, "--cpus", cpus, "--memory", memory,
            "--cmdline", cmdline, "--print-boot-times"]
qemu_cmd = [qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", memory, "-smp", cpus,
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-bios", "/usr/share/qemu/qboot.rom", "-kernel", guest, "-append", cmdline] if qemu else None

ours, theirs = [], []
boot(ours_cmd, True)  # warm the page cache once for each
if qemu_cmd: boot(qemu_cmd, False)
for i in range(runs):
    ours.append(boot(ours_cmd, True))
    if qemu_cmd:
        theirs.append(boot(qemu_cmd, False))

def stats(xs):
    return f"median {statistics.median(xs):8.2f}  min {min(xs):8.2f}  max {max(xs):8.2f}"

print(f"\n{runs} runs each, milliseconds")
print(f"vmm-core  start -> first KVM_RUN   {stats([o[0]['first-kvm-run'][0] for o in ours])}")
print(f"          its CPU by then (ms)     {stats([o[0]['first-kvm-run'][1] for o in ours])}"
      f"   (vmm-core's own, all threads; the helpers' by the ready marker: "
      f"median {statistics.median([o[4] for o in ours]):.1f})")
names = [n for n in ours[0][0] if all(n in o[0] for o in ours)]
print("          phases (each one's end, medians: ms since start / vmm-core CPU ms):")
print("            " + ", ".join(
    f"{n} {statistics.median([o[0][n][0] for o in ours]):.2f}/{statistics.median([o[0][n][1] for o in ours]):.2f}"
    for n in names))
print(f"vmm-core  start -> ready marker    {stats([o[1] for o in ours])}")
if theirs:
    print(f"QEMU      start -> ready marker    {stats([t[1] for t in theirs])}")
    ratio = statistics.median([o[1] for o in ours]) / statistics.median([t[1] for t in theirs])
    print(f"ratio ours/QEMU to ready (medians): {ratio:.3f}")
rss = [o[2] for o in ours]
print(f"\nvmm-core resident memory beyond guest RAM (VmRSS - RssShmem), KiB: {stats(rss)}")
print(f"  and its helpers (chardevd), KiB:                               {stats([o[3] for o in ours])}")
if theirs:
    print(f"QEMU      resident memory beyond guest RAM (VmRSS - RssShmem), KiB: {stats([t[2] for t in theirs])}")
PY
