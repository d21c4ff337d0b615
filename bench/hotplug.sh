#!/usr/bin/env bash
# vCPU hotplug benchmark: the test guest (tg.scenario=hotplug, a CPU-bound load running) with
# 1 vCPU of max 4; each cycle runs `vmmctl cpus set 4`, then `vmmctl cpus set 1`. Prints the
# median, min and max over the cycles of
#   - the time from starting `vmmctl cpus set 4` until the guest has reported all three new
#     CPUs online (its "tg: cpu added ... started=1" lines),
#   - the time from starting `vmmctl cpus set 1` until vmmctl returns (the guest has ejected
#     all three; their threads have ended and their KVM fds are parked),
# and the KVM_CREATE_VCPU count at the end (4 whatever the cycles: parked fds are reused).
# There is no QEMU column: the test guest speaks our hotplug controller, not QEMU's.
#
# usage: bench/hotplug.sh [CYCLES]      (default 20)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cycles=${1:-20}
(cd "$root" && cargo build --release --quiet -p vmm-core -p chardevd -p vmmctl)
(cd "$root/tests/guest" && cargo build --release --quiet 2>/dev/null)
echo "command: bench/hotplug.sh $cycles"
echo "host: $(uname -r), $(nproc) CPUs, KVM-PVM: $([ -d /sys/module/kvm_pvm ] && echo yes || echo no)"
exec python3 - "$cycles" "$root/target/release" "$root/tests/guest/target/release/test-guest" <<'PY'
import os, signal, statistics, subprocess, sys, tempfile, time

cycles, bindir, guest = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tmp = tempfile.mkdtemp(prefix="vmm-bench-hotplug-")
sock, console = os.path.join(tmp, "api.sock"), os.path.join(tmp, "console")
vm = subprocess.Popen([f"{bindir}/vmm-core", "run", "--kernel", guest, "--cpus", "1,max=4",
                       "--memory", "128M", "--cmdline", "tg.scenario=hotplug",
                       "--api-socket", sock, "--serial", f"file={console}"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

def lines(prefix):
    try:
        with open(console) as f:
            return sum(1 for l in f if l.startswith(prefix) and l.endswith("\n"))
    except FileNotFoundError:
        return 0

def wait(cond, what):
    deadline = time.time() + 60
    while not cond():
        if time.time() > deadline or vm.poll() is not None:
            vm.kill(); sys.exit(f"error: timed out waiting for {what}")
        time.sleep(0.001)

def vmmctl(*args):
    r = subprocess.run([f"{bindir}/vmmctl", "--socket", sock, *args], capture_output=True, text=True)
    if r.returncode != 0:
        vm.kill(); sys.exit(f"error: vmmctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout

try:
    wait(lambda: lines("tg: hotplug max=4") == 1, "the guest's hotplug loop")
    add, remove = [], []
    for c in range(1, cycles + 1):
        t0 = time.perf_counter()
        vmmctl("cpus", "set", "4")
        wait(lambda: lines("tg: cpu added") == 3 * c, "three CPUs online")
        add.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        vmmctl("cpus", "set", "1")
        remove.append((time.perf_counter() - t0) * 1e3)
        wait(lambda: lines("tg: cpu removed") == 3 * c, "three CPUs removed")
    created = vmmctl("cpus").strip().splitlines()[-1]
finally:
    vm.send_signal(signal.SIGINT); vm.wait(timeout=30)  # SIGTERM would ask the guest, and wait
    for p in (sock, console):
        try: os.unlink(p)
        except FileNotFoundError: pass
    os.rmdir(tmp)

def stats(xs):
    return f"median {statistics.median(xs):8.2f}  min {min(xs):8.2f}  max {max(xs):8.2f}"
print(f"\n{cycles} cycles, milliseconds")
print(f"cpus set 4 -> 3 CPUs online in the guest   {stats(add)}")
print(f"cpus set 1 -> 3 CPUs ejected and parked    {stats(remove)}")
print(created)
PY
