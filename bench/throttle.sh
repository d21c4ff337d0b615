#!/usr/bin/env bash
# What throttling costs when it does not bind: libblkio's client (tests/src/bin/blkio-bench.rs)
# against one blockd export, unthrottled and then throttled far above the load
# (iops=10000000,bps=100000000000), alternating ROUNDS times so that drift on the host hits
# both alike. Prints each run, the medians and the ratio throttled/unthrottled for IOPS and
# p50/p99 latency. Then one run at iops=200 to show the limit holding (the client sees ~200).
#
# usage: bench/throttle.sh [SECONDS_PER_RUN] [ROUNDS]     (default 3 and 5)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-3}
rounds=${2:-5}
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

    def run(qd):
        out = subprocess.run([f"{bindir}/blkio-bench", "--driver", "virtio-blk-vhost-user", "--path", sock,
                              "run", "--workload", "randread", "--bs", "4096", "--qd", str(qd),
                              "--seconds", secs], check=True, capture_output=True, text=True).stdout
        f = dict(kv.split("=") for kv in out.split())
        return float(f["iops"]), float(f["p50_us"]), float(f["p99_us"])

    for qd in (32, 1):
        res = {"off": [], "far above": []}
        for r in range(rounds):
            for mode, spec in (("off", "off"), ("far above", "iops=10000000,bps=100000000000")):
                throttle(spec)
                res[mode].append(run(qd))
                i, p50, p99 = res[mode][-1]
                print(f"qd={qd:<2} round {r+1} throttle {mode:<9}: iops={i:9.0f} p50={p50:8.1f}us p99={p99:8.1f}us")
        med = {m: [statistics.median(x[k] for x in v) for k in range(3)] for m, v in res.items()}
        o, t = med["off"], med["far above"]
        print(f"qd={qd} medians: unthrottled iops={o[0]:.0f} p50={o[1]:.1f}us p99={o[2]:.1f}us | "
              f"throttled far above iops={t[0]:.0f} p50={t[1]:.1f}us p99={t[2]:.1f}us")
        print(f"qd={qd} ratio throttled/unthrottled: iops {t[0]/o[0]:.3f}, p50 {t[1]/o[1]:.3f}, p99 {t[2]/o[2]:.3f}")
    throttle("iops=200")
    i, p50, p99 = run(8)
    print(f"iops=200, qd 8: the client sees iops={i:.0f} p50={p50:.0f}us (limit 200)")
finally:
    if blockd is not None:
        blockd.terminate()
        blockd.wait()
    shutil.rmtree(tmp, ignore_errors=True)
PY
