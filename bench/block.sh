#!/usr/bin/env bash
# Block I/O benchmark, measured from the host (guest-side figures under KVM-PVM say nothing
# about hardware KVM; see ../shared/GUEST.md). One client, libblkio's (tests/src/bin/blkio-bench.rs,
# on the `blkio` crate), measures in the same run:
#   - blockd over vhost-user-blk (O_DIRECT on the image: --direct),
#   - qemu-storage-daemon's vhost-user-blk export of the same file (cache.direct=on), when
#     installed (Debian: qemu-system-common),
#   - libblkio's io_uring driver straight on the file (O_DIRECT): this machine's ceiling;
#   - a second blockd that records every request (--record, as vmm-core's --record DIR):
#     the cost of recording, as rec/blockd (the target: at most 10% lost), measured back to
#     back with blockd in every round: the median of the rounds' ratios.
# Workloads: 4k random read and write at queue depth 32 and 1, 1 MiB sequential read and
# write at depth 4. Prints IOPS, MB/s, p50/p99 latency, the ratios ours/qsd and
# ours/ceiling, and each server's CPU time per request: the utime+stime its process (and,
# for blockd, the jailed child that serves) spent over the run, over the requests done.
# qemu-storage-daemon is QEMU 10.0.2's, installed from bookworm-backports (bench/qemu10.sh).
#
# Both servers run throughout; each round measures every workload on each target in turn, the
# order rotating, and the table shows medians over the rounds.
#
# usage: bench/block.sh [SECONDS_PER_RUN] [IMAGE_MIB] [ROUNDS]     (default 5, 1024 and 3)
#        WORKLOADS="write:1048576:4 randread:4096:32" bench/block.sh ...   (only these)
#        IN_MEMORY=1 bench/block.sh ...   (the image on /dev/shm, no O_DIRECT anywhere: no disk
#        in the way, so the servers' CPU cost per request is what differs; for rec/ours)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-5}
mib=${2:-1024}
rounds=${3:-3}
(cd "$root" && cargo build --release --quiet -p blockd && cargo build --release --quiet -p vmm-tests --bin blkio-bench)
. "$root/bench/qemu10.sh"
echo "command: ${WORKLOADS:+WORKLOADS=\"$WORKLOADS\" }bench/block.sh $secs $mib $rounds"
where=/var/tmp; [ "${IN_MEMORY:-0}" = 1 ] && where=/dev/shm
echo "host: $(uname -r), $(nproc) CPUs; image ${mib} MiB on $(df -T $where | awk 'NR==2{print $2}')${IN_MEMORY:+ (IN_MEMORY: page cache, no O_DIRECT)}"
qsd=$(command -v qemu-storage-daemon || true)
echo "qemu-storage-daemon: $([ -n "$qsd" ] && "$qsd" --version | head -1 || echo "not installed")"
echo "blockd: $(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)"
exec python3 - "$secs" "$mib" "$rounds" "$root/target/release" <<'PY'
import os, shutil, signal, statistics, subprocess, sys, tempfile, time

secs, mib, rounds, bindir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
in_memory = os.environ.get("IN_MEMORY") == "1"
tmp = tempfile.mkdtemp(prefix="vmm-bench-block-", dir="/dev/shm" if in_memory else "/var/tmp")
direct = [] if in_memory else ["--direct"]
img = os.path.join(tmp, "disk.raw")
procs = []

def cleanup():
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    shutil.rmtree(tmp, ignore_errors=True)

def wait_socket(path, proc, what):
    for _ in range(200):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with status {proc.returncode}")
        time.sleep(0.05)
    sys.exit(f"{what} did not create {path}")

try:
    # A fully allocated image, so that reads hit the disk and not holes.
    subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={mib}",
                    "status=none"] + ([] if in_memory else ["oflag=direct"]), check=True)
    workloads = [("randread", 4096, 32), ("randwrite", 4096, 32), ("randread", 4096, 1),
                 ("randwrite", 4096, 1), ("read", 1 << 20, 4), ("write", 1 << 20, 4)]
    if os.environ.get("WORKLOADS"):
        # WORKLOADS="write:1048576:4 randread:4096:32": only these (kind:bytes:depth).
        workloads = [(w, int(b), int(q)) for w, b, q in
                     (x.split(":") for x in os.environ["WORKLOADS"].split())]

    def cpu_ticks(pid):
        """utime+stime of `pid` and its children (blockd serves from a jailed child), in ticks."""
        total = 0
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        for p in [pid] + kids:
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total

    tick = os.sysconf("SC_CLK_TCK")

    def one(driver, path, key, direct=False, server=None):
        w, bs, qd = key
        cmd = [f"{bindir}/blkio-bench", "--driver", driver, "--path", path]
        if direct:
            cmd.append("--direct")
        cmd += ["run", "--workload", w, "--bs", str(bs), "--qd", str(qd), "--seconds", secs]
        before = cpu_ticks(server.pid) if server else 0
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        r = dict(kv.split("=") for kv in line.split())
        if server:
            requests = float(r["iops"]) * float(secs)
            r["cpu_us"] = (cpu_ticks(server.pid) - before) / tick * 1e6 / max(requests, 1)
        return r

    def served(argv, sock, what):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        procs.append(p)
        wait_socket(sock, p, what)
        return p

    # Both servers run for the whole measurement, and each round measures every workload
    # on each target in turn (the order rotating), so that drift on the host (page cache,
    # the disk's own state, other load) hits them alike; medians over the rounds are shown.
    targets = {}
    sock = os.path.join(tmp, "blockd.sock")
    servers = {}
    servers["blockd"] = served([f"{bindir}/blockd", "--image", img, "--socket", sock] + direct, sock, "blockd")
    targets["blockd"] = ("virtio-blk-vhost-user", sock, False)
    rsock = os.path.join(tmp, "blockd-rec.sock")
    servers["rec"] = served([f"{bindir}/blockd", "--image", img, "--socket", rsock] + direct + [
            "--record", os.path.join(tmp, "disk.log")], rsock, "blockd --record")
    targets["rec"] = ("virtio-blk-vhost-user", rsock, False)
    qsd = shutil.which("qemu-storage-daemon")
    if qsd:
        qsock = os.path.join(tmp, "qsd.sock")
        servers["qsd"] = served([qsd, "--blockdev",
                f"driver=file,node-name=file0,filename={img}," + ("cache.direct=off" if in_memory else "cache.direct=on,aio=native"),
                "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,writable=on,"
                f"addr.type=unix,addr.path={qsock}"], qsock, "qemu-storage-daemon")
        targets["qsd"] = ("virtio-blk-vhost-user", qsock, False)
    else:
        print("qemu-storage-daemon is not installed (apt-get install qemu-system-common): no qsd column")
    targets["io_uring"] = ("io_uring", img, not in_memory)
    # The recording blockd copied the image beside its log as it started (its base copy):
    # that copy's write-back is the recording's start-up cost, not its cost per request, so
    # it is done before anything is measured.
    t0 = time.monotonic()
    os.sync()
    print(f"sync after the servers started (the recording's base copy): {time.monotonic() - t0:.1f} s")

    runs = {t: {k: [] for k in workloads} for t in targets}
    # blockd and its recording twin run back to back in every round (which of them goes
    # first alternates), so that rec/ours compares runs seconds apart: it is the
    # median of the rounds' own ratios.
    units = [("blockd", "rec")] + [(t,) for t in targets if t not in ("blockd", "rec")]
    for r in range(rounds):
        for k, key in enumerate(workloads):
            at = (r + k) % len(units)
            order = [t for u in units[at:] + units[:at]
                     for t in (u if (r + k) % 2 == 0 else u[::-1])]
            for t in order:
                driver, path, direct = targets[t]
                runs[t][key].append(one(driver, path, key, direct, servers.get(t)))
    med = lambda xs: statistics.median(xs)
    results = {t: {key: {m: med([float(x[m]) for x in runs[t][key]])
                         for m in ("iops", "mbps", "p50_us", "p99_us")}
                   for key in workloads} for t in targets}
    print(f"medians of {rounds} round(s) of {secs} s per workload and target")

    cols = [c for c in ("blockd", "rec", "qsd", "io_uring") if c in results]
    print()
    print(f"{'workload':<22}" + "".join(f"{c+' IOPS':>14}{c+' MB/s':>12}{'p50/p99 us':>18}" for c in cols)
          + f"{'ours/qsd':>10}{'ours/ceil':>10}{'rec/ours':>10}"
          + "".join(f"{c + ' CPU us/req':>20}" for c in servers))
    for key in workloads:
        w, bs, qd = key
        name = f"{w} {bs//1024}k qd{qd}"
        row = f"{name:<22}"
        for c in cols:
            r = results[c][key]
            row += f"{r['iops']:>14.0f}{r['mbps']:>12.1f}{r['p50_us']:>9.1f}/{r['p99_us']:<8.1f}"
        ours = results["blockd"][key]["iops"]
        row += f"{ours / results['qsd'][key]['iops']:>10.2f}" if "qsd" in results else f"{'-':>10}"
        row += f"{ours / results['io_uring'][key]['iops']:>10.2f}"
        row += f"{med([float(a['iops']) / float(b['iops']) for a, b in zip(runs['rec'][key], runs['blockd'][key])]):>10.2f}"
        for c in servers:
            row += f"{med([x['cpu_us'] for x in runs[c][key]]):>20.2f}"
        print(row)
    log = os.path.join(tmp, "disk.log")
    print(f"\nthe recording: {os.path.getsize(log) / 2**20:.0f} MiB of log for every run of the rec column")
finally:
    cleanup()
PY
