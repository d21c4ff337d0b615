#!/usr/bin/env bash
# What throttling costs when it does not bind: libblkio's client (tests/src/bin/blkio-bench.rs)
# against one blockd export, unthrottled and throttled far above the load
# (iops=10000000,bps=100000000000). This host's speed drifts by 2x within a minute, so the
# runs come in pairs, back to back, in alternating order (ABBA), and the figure that counts is
# the median over the pairs of each pair's ratio (throttled/unthrottled), for IOPS and p50/p99
# latency. blockd's CPU time per request (from /proc, both modes) is printed too: it is what
# the throttle's bookkeeping adds, and it drifts less than the host's speed.
# Then one run at iops=200 shows the limit holding (the client sees ~200).
#
# usage: bench/throttle.sh [SECONDS_PER_RUN] [PAIRS]     (default 2 and 15)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-2}
rounds=${2:-15}
(cd "$root" && cargo build --release --quiet -p blockd -p vmmctl && cargo build --release --quiet -p vmm-tests --bin blkio-bench)
echo "command: bench/throttle.sh $secs $rounds"
echo "host: $(uname -r), $(nproc) CPUs"
exec python3 - "$secs" "$rounds" "$root/target/release" <<'PY'
import os, shutil, statistics, subprocess, sys, tempfile, time

secs, rounds, bindir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tmp = tempfile.mkdtemp(prefix="vmm-bench-throttle-", dir="/var/tmp")
img, ctl, sock = (os.path.join(tmp, n) for n in ("disk.raw", "ctl.sock", "disk.sock"))
blockd = None
try:
    subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", "count=256", "status=none"], check=True)
    blockd = subprocess.Popen([f"{bindir}/blockd", "--listen", ctl], stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(ctl):
            break
        time.sleep(0.05)
    ctlcmd = [f"{bindir}/vmmctl", "--blockd", ctl, "disk"]
    subprocess.run(ctlcmd + ["add", "d0", "--image", img, "--vhost-socket", sock], check=True,
                   stdout=subprocess.DEVNULL)

    def throttle(spec):
        subprocess.run(ctlcmd + ["throttle", "d0", spec], check=True, stdout=subprocess.DEVNULL)

    # The sandbox forks: blockd proper is the child (PID 1 of its PID namespace).
    kids = open(f"/proc/{blockd.pid}/task/{blockd.pid}/children").read().split()
    server = int(kids[0]) if kids else blockd.pid

    def cpu_ticks():
        # utime + stime of the whole process (exited worker threads included), in clock ticks.
        f = open(f"/proc/{server}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])

    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")

    def run(qd):
        before = cpu_ticks()
        out = subprocess.run([f"{bindir}/blkio-bench", "--driver", "virtio-blk-vhost-user", "--path", sock,
                              "run", "--workload", "randread", "--bs", "4096", "--qd", str(qd),
                              "--seconds", secs], check=True, capture_output=True, text=True).stdout
        cpu = (cpu_ticks() - before) * tick_us
        f = dict(kv.split("=") for kv in out.split())
        iops = float(f["iops"])
        return iops, float(f["p50_us"]), float(f["p99_us"]), cpu / (iops * float(secs))

    modes = (("off", "off"), ("far above", "iops=10000000,bps=100000000000"))
    names = ("iops", "p50", "p99", "blockd cpu/req")
    for qd in (32, 1):
        throttle("off")
        run(qd)  # warm-up, not counted
        res = {"off": [], "far above": []}
        ratios = []
        for r in range(rounds):
            pair = {}
            for mode, spec in (modes if r % 2 == 0 else modes[::-1]):
                throttle(spec)
                pair[mode] = run(qd)
                res[mode].append(pair[mode])
                i, p50, p99, cpu = pair[mode]
                print(f"qd={qd:<2} pair {r+1:<2} throttle {mode:<9}: iops={i:9.0f} p50={p50:8.1f}us "
                      f"p99={p99:8.1f}us blockd-cpu={cpu:6.2f}us/req")
            ratios.append([pair["far above"][k] / pair["off"][k] for k in range(4)])
        med = {m: [statistics.median(x[k] for x in v) for k in range(4)] for m, v in res.items()}
        o, t = med["off"], med["far above"]
        print(f"qd={qd} medians: unthrottled iops={o[0]:.0f} p50={o[1]:.1f}us p99={o[2]:.1f}us "
              f"cpu={o[3]:.2f}us/req | throttled far above iops={t[0]:.0f} p50={t[1]:.1f}us "
              f"p99={t[2]:.1f}us cpu={t[3]:.2f}us/req")
        for k, n in enumerate(names):
            rs = sorted(x[k] for x in ratios)
            q1, q3 = rs[len(rs) // 4], rs[(3 * len(rs)) // 4]
            print(f"qd={qd} {n:<15} throttled/unthrottled, median of {len(rs)} pairs: "
                  f"{statistics.median(rs):.3f} (quartiles {q1:.3f}..{q3:.3f})")
    throttle("iops=200")
    i, p50, p99, _ = run(8)
    print(f"iops=200, qd 8: the client sees iops={i:.0f} p50={p50:.0f}us (limit 200)")
finally:
    if blockd is not None:
        blockd.terminate()
        blockd.wait()
    shutil.rmtree(tmp, ignore_errors=True)
PY
