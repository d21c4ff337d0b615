#!/usr/bin/env bash
# Block I/O benchmark, measured from the host (guest-side figures under KVM-PVM say nothing
# about hardware KVM; see ../shared/GUEST.md). One client, libblkio's (tests/src/bin/blkio-bench.rs,
# on the `blkio` crate), measures in the same run:
#   - blockd over vhost-user-blk (O_DIRECT on the image: --direct),
#   - qemu-storage-daemon's vhost-user-blk export of the same file (cache.direct=on), when
#     installed (Debian: qemu-system-common),
#   - libblkio's io_uring driver straight on the file (O_DIRECT): this machine's ceiling.
# Workloads: 4k random read and write at queue depth 32 and 1, 1 MiB sequential read and
# write at depth 4. Prints IOPS, MB/s, p50/p99 latency, and the ratios ours/qsd and
# ours/ceiling.
#
# usage: bench/block.sh [SECONDS_PER_RUN] [IMAGE_MIB]     (default 5 and 1024)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-5}
mib=${2:-1024}
(cd "$root" && cargo build --release --quiet -p blockd && cargo build --release --quiet -p vmm-tests --bin blkio-bench)
echo "command: bench/block.sh $secs $mib"
echo "host: $(uname -r), $(nproc) CPUs; image ${mib} MiB on $(df -T /var/tmp | awk 'NR==2{print $2}')"
exec python3 - "$secs" "$mib" "$root/target/release" <<'PY'
import os, shutil, signal, subprocess, sys, tempfile, time

secs, mib, bindir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tmp = tempfile.mkdtemp(prefix="vmm-bench-block-", dir="/var/tmp")
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
    subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={mib}", "oflag=direct",
                    "status=none"], check=True)
    workloads = [("randread", 4096, 32), ("randwrite", 4096, 32), ("randread", 4096, 1),
                 ("randwrite", 4096, 1), ("read", 1 << 20, 4), ("write", 1 << 20, 4)]

    def bench(driver, path, direct=False):
        out = {}
        for w, bs, qd in workloads:
            cmd = [f"{bindir}/blkio-bench", "--driver", driver, "--path", path]
            if direct:
                cmd.append("--direct")
            cmd += ["run", "--workload", w, "--bs", str(bs), "--qd", str(qd), "--seconds", secs]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
            out[(w, bs, qd)] = dict(kv.split("=") for kv in line.split())
        return out

    def served(argv, sock, what):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        procs.append(p)
        wait_socket(sock, p, what)
        return p

    results = {}
    sock = os.path.join(tmp, "blockd.sock")
    p = served([f"{bindir}/blockd", "--image", img, "--socket", sock, "--direct"], sock, "blockd")
    results["blockd"] = bench("virtio-blk-vhost-user", sock)
    p.terminate(); p.wait()

    qsd = shutil.which("qemu-storage-daemon")
    if qsd:
        sock = os.path.join(tmp, "qsd.sock")
        p = served([qsd, "--blockdev",
                    f"driver=file,node-name=file0,filename={img},cache.direct=on,aio=native",
                    "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,writable=on,"
                    f"addr.type=unix,addr.path={sock}"], sock, "qemu-storage-daemon")
        results["qsd"] = bench("virtio-blk-vhost-user", sock)
        p.terminate(); p.wait()
    else:
        print("qemu-storage-daemon is not installed (apt-get install qemu-system-common): no qsd column")

    results["io_uring"] = bench("io_uring", img, direct=True)

    cols = [c for c in ("blockd", "qsd", "io_uring") if c in results]
    print()
    print(f"{'workload':<22}" + "".join(f"{c+' IOPS':>14}{c+' MB/s':>12}{'p50/p99 us':>18}" for c in cols)
          + f"{'ours/qsd':>10}{'ours/ceil':>10}")
    for key in workloads:
        w, bs, qd = key
        name = f"{w} {bs//1024}k qd{qd}"
        row = f"{name:<22}"
        for c in cols:
            r = results[c][key]
            row += f"{float(r['iops']):>14.0f}{float(r['mbps']):>12.1f}{r['p50_us'] + '/' + r['p99_us']:>18}"
        ours = float(results["blockd"][key]["iops"])
        row += f"{ours / float(results['qsd'][key]['iops']):>10.2f}" if "qsd" in results else f"{'-':>10}"
        row += f"{ours / float(results['io_uring'][key]['iops']):>10.2f}"
        print(row)
finally:
    cleanup()
PY
