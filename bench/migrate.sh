#!/usr/bin/env bash
# Live-migration benchmark over loopback: a 1 GiB test guest that has dirtied 700 MiB, idle
# (it fills them once, then halts) and dirtying (it then keeps rewriting 64 MiB of them at a
# steady rate), migrated plain and with TLS (mutual authentication), by vmm-core and, when it
# is installed, by QEMU with the same guest in the same run (QEMU: -M microvm, TLS through
# tls-creds-x509 with the same certificates). Runs alternate between the two.
#
# Prints, for each case, the medians of total time, downtime (the pause), bytes sent and
# throughput (bytes / total time), the dirty rate the migration measured, and the ratio
# ours/QEMU of total time; then the ceiling: plain TCP and rustls loopback throughput
# (tests/src/bin/tls-bench.rs, migrated's own TLS code, one thread per end).
#
# Each side uses a 300 ms downtime limit and no bandwidth limit (QEMU's max-bandwidth is set
# to 1 TiB/s: its default is 32 MiB/s, which would measure the limit, not the code).
#
# Then post-copy (switched after the first pass, and at once) and a snapshot's restore, whole
# and --lazy (with and without the working set the snapshot records, --workset-ms 200): time
# to running, total time, pages, faults and the time from a page request to
# the page in place (p50/p99), with Firecracker's documented restore figure as a reference row.
#
# usage: bench/migrate.sh [ROUNDS] [all|precopy|postcopy]     (default 3 all)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-3}
part=${2:-all}
case "$part" in all|precopy|postcopy) ;; *) echo "bench/migrate.sh: part $part: give all, precopy or postcopy" >&2; exit 2;; esac
(cd "$root" && cargo build --release --quiet -p vmm-core -p chardevd -p migrated -p vmmctl \
    && cargo build --release --quiet -p vmm-tests --bin tls-bench)
(cd "$root/tests/guest" && cargo build --release --quiet 2>/dev/null)
bin="$root/target/release"
guest="$root/tests/guest/target/release/test-guest"
. "$root/bench/qemu10.sh"
work=$(mktemp -d /tmp/vmm-bench-migrate-XXXXXX)
trap 'rm -rf "$work"' EXIT

# Certificates in QEMU's tls-creds layout, for 127.0.0.1.
creds="$work/creds"
mkdir -p "$creds"
(
    cd "$creds"
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    key ca-key.pem
    openssl req -x509 -new -key ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=bench CA" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    for who in server client; do
        key "$who-key.pem"
        openssl req -new -key "$who-key.pem" -out "$who.csr" -subj "/O=vmm bench/CN=$who" 2>/dev/null
        if [ "$who" = server ]; then
            ext="subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
        else
            ext="extendedKeyUsage=clientAuth"
        fi
        printf "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n$ext\n" > "$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out "$who-cert.pem" -days 2 -extfile "$who.ext" 2>/dev/null
    done
)

echo "command: bench/migrate.sh $rounds $part"
echo "host: $(uname -r), $(nproc) CPUs, KVM-PVM: $([ -d /sys/module/kvm_pvm ] && echo yes || echo no)"
if [ -n "$qemu" ]; then
    echo "qemu: $($qemu --version | head -1) ($qemu)"
else
    echo "qemu: not installed (apt-get install qemu-system-x86 for a side-by-side run)"
fi

python3 - "$rounds" "$bin" "$guest" "$qemu" "$work" "$creds" "$part" <<'PY'
import json, os, signal, socket, statistics, subprocess, sys, time

rounds, bindir, guest, qemu, work, creds, part = int(sys.argv[1]), *sys.argv[2:]
vmm, vmmctl = f"{bindir}/vmm-core", f"{bindir}/vmmctl"
MEM = "1G"
CASES = {
    "idle": "tg.dirty.mib=700 tg.dirty.hot=0",
    "dirtying": "tg.dirty.mib=700 tg.dirty.hot=64 tg.dirty.gap=20000000",
}
procs = []

logs = {}

def start(argv, log):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(log, "wb"))
    procs.append(p)
    logs[p.pid] = log
    return p

def end(p):
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

def wait_for(what, cond, p=None, secs=120):
    t = time.time() + secs
    while time.time() < t:
        if cond():
            return
        if p is not None and p.poll() is not None:
            tail = "\n".join(text(logs.get(p.pid, "")).splitlines()[-8:])
            sys.exit(f"error: waiting for {what}: the process ended with status {p.returncode}; its log ends:\n{tail}")
        time.sleep(0.02)
    sys.exit(f"error: timed out waiting for {what}")

def text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def ours(case, tls, n, compress=False):
    d = f"{work}/ours-{case}-{tls}-{compress}-{n}"
    os.makedirs(d)
    cmdline = f"console=ttyS0 tg.scenario=dirty {CASES[case]}"
    common = ["run", "--kernel", guest, "--memory", MEM, "--cmdline", cmdline]
    src = start([vmm, *common, "--serial", f"file={d}/src.txt", "--api-socket", f"{d}/src.sock"],
                f"{d}/src.log")
    uri = f"tcp:127.0.0.1:{free_port()}"
    dst_tls = ["--tls-creds", creds] if tls else []
    dst = start([vmm, *common, "--serial", f"file={d}/dst.txt", "--incoming", uri, *dst_tls],
                f"{d}/dst.log")
    try:
        wait_for("the guest to fill its memory", lambda: "tg: dirty filled" in text(f"{d}/src.txt"), src)
        wait_for("the destination to listen", lambda: "waiting for the source" in text(f"{d}/dst.log"), dst)
        if case == "dirtying":
            time.sleep(1)  # the rewriting under way
        r = subprocess.run([vmmctl, "--socket", f"{d}/src.sock", "--json", "migrate", uri,
                            *(["--tls-creds", creds] if tls else []),
                            *(["--compress"] if compress else [])],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            sys.exit(f"error: vmm-core's migration failed: {r.stderr.strip()}\n{text(f'{d}/src.log')}")
        st = json.loads(r.stdout)
        wait_for("the destination to run the guest", lambda: "the VM is here" in text(f"{d}/dst.log"), dst)
        return {"total_ms": st["total_ms"], "downtime_ms": st["downtime_ms"], "bytes": st["bytes"],
                "dirty_mib_s": st["dirty_rate_pages_per_s"] * 4096 / 2**20}
    finally:
        end(src)
        end(dst)

def log_time(log, marker):
    """The UTC time (seconds since the epoch) of the first log line holding `marker`."""
    import datetime
    for line in text(log).splitlines():
        if marker in line:
            stamp = line.split(" ", 1)[0].rstrip("Z")
            return datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc).timestamp()
    return None

def postcopy(n, at_once):
    """Post-copy of the dirtying guest: after the first pass (--postcopy), or switched at once
    (`migrate postcopy` as soon as the first pass is under way)."""
    d = f"{work}/ours-postcopy-{at_once}-{n}"
    os.makedirs(d)
    cmdline = f"console=ttyS0 tg.scenario=dirty {CASES['dirtying']}"
    common = ["run", "--kernel", guest, "--memory", MEM, "--cmdline", cmdline]
    src = start([vmm, *common, "--serial", f"file={d}/src.txt", "--api-socket", f"{d}/src.sock"],
                f"{d}/src.log")
    uri = f"tcp:127.0.0.1:{free_port()}"
    dst = start([vmm, *common, "--serial", f"file={d}/dst.txt", "--incoming", uri,
                 "--api-socket", f"{d}/dst.sock"], f"{d}/dst.log")
    try:
        wait_for("the guest to fill its memory", lambda: "tg: dirty filled" in text(f"{d}/src.txt"), src)
        wait_for("the destination to listen", lambda: "waiting for the source" in text(f"{d}/dst.log"), dst)
        time.sleep(1)
        args = [vmmctl, "--socket", f"{d}/src.sock", "--json", "migrate", uri]
        t0 = time.time()
        if at_once:
            m = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for("the first pass", lambda: '"phase":"pre-copy"' in subprocess.run(
                [vmmctl, "--socket", f"{d}/src.sock", "--json", "migrate", "status"],
                capture_output=True, text=True).stdout, m)
            subprocess.run([vmmctl, "--socket", f"{d}/src.sock", "migrate", "postcopy"], check=True,
                           capture_output=True)
            out, err = m.communicate(timeout=300)
            rc = m.returncode
        else:
            r = subprocess.run([*args, "--postcopy", "--downtime-ms", "1"], capture_output=True,
                               text=True, timeout=300)
            out, err, rc = r.stdout, r.stderr, r.returncode
        if rc != 0:
            sys.exit(f"error: post-copy failed: {err.strip()}\n{text(f'{d}/src.log')}\n{text(f'{d}/dst.log')}")
        st = json.loads(out)
        wait_for("post-copy to complete", lambda: '"phase":"completed"' in subprocess.run(
            [vmmctl, "--socket", f"{d}/dst.sock", "--json", "migrate", "status"],
            capture_output=True, text=True).stdout, dst)
        dq = json.loads(subprocess.run([vmmctl, "--socket", f"{d}/dst.sock", "--json", "migrate", "status"],
                                       capture_output=True, text=True).stdout)["postcopy"]
        here = log_time(f"{d}/dst.log", "the VM is here")
        return {"to_running_ms": (here - t0) * 1000, "total_ms": st["total_ms"],
                "downtime_ms": st["downtime_ms"], "pages": dq["pages"], "faults": dq["faults"],
                "requests": dq["requests"], "p50_us": dq["fault_p50_us"], "p99_us": dq["fault_p99_us"],
                "postcopy_ms": dq["ms"]}
    finally:
        end(src)
        end(dst)

def restore(n, mode):
    """A snapshot of the dirtying guest (700 MiB, 64 MiB of it rewritten on and on), restored
    whole or --lazy: from vmm-core's start to the VM running, and (lazy) until every page is
    loaded, with the guest's faults meanwhile."""
    lazy, ws = mode != "whole", mode == "lazy, working set"
    d = f"{work}/ours-restore-{mode.replace(' ', '').replace(',', '-')}-{n}"
    os.makedirs(d)
    snap = f"{work}/snap-{ws}-{n}"
    if not os.path.exists(snap):
        cmdline = f"console=ttyS0 tg.scenario=dirty {CASES['dirtying']}"
        src = start([vmm, "run", "--kernel", guest, "--memory", MEM, "--cmdline", cmdline,
                     "--serial", f"file={d}/src.txt", "--api-socket", f"{d}/src.sock"], f"{d}/src.log")
        wait_for("the guest to fill its memory", lambda: "tg: dirty filled" in text(f"{d}/src.txt"), src)
        time.sleep(1)
        subprocess.run([vmmctl, "--socket", f"{d}/src.sock", "snapshot", f"file:{snap}",
                        *(["--workset-ms", "200"] if ws else [])], check=True, capture_output=True)
        end(src)
    t0 = time.time()
    vm = start([vmm, "run", "--restore", f"file:{snap}", *(["--lazy"] if lazy else []),
                "--serial", f"file={d}/dst.txt", "--api-socket", f"{d}/dst.sock"], f"{d}/dst.log")
    try:
        wait_for("the VM to run", lambda: "the VM is here" in text(f"{d}/dst.log"), vm)
        here = log_time(f"{d}/dst.log", "the VM is here")
        r = {"to_running_ms": (here - t0) * 1000}
        if lazy:
            wait_for("the load to complete", lambda: "lazy restore complete" in text(f"{d}/dst.log"), vm)
            dq = json.loads(subprocess.run([vmmctl, "--socket", f"{d}/dst.sock", "--json", "migrate", "status"],
                                           capture_output=True, text=True).stdout)["postcopy"]
            indexed = log_time(f"{d}/dst.log", "--lazy: indexed in")
            r.update({"total_ms": (log_time(f"{d}/dst.log", "lazy restore complete") - t0) * 1000,
                      "pages": dq["pages"], "faults": dq["faults"], "p50_us": dq["fault_p50_us"],
                      "p99_us": dq["fault_p99_us"], "index_to_running_ms": (here - indexed) * 1000})
        else:
            r["total_ms"] = r["to_running_ms"]
        return r
    finally:
        end(vm)

class Qmp:
    def __init__(self, path, p):
        wait_for(f"QEMU's QMP socket {path}", lambda: os.path.exists(path), p)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "return" in m:
                return m["return"]
            if "error" in m:
                sys.exit(f"error: QEMU {name}: {m['error']['desc']}")

def theirs(case, tls, n):
    d = f"{work}/qemu-{case}-{tls}-{n}"
    os.makedirs(d)
    cmdline = f"console=ttyS0 tg.scenario=dirty {CASES[case]}"
    common = [qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", MEM,
              "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
              "-bios", "/usr/share/qemu/qboot.rom", "-kernel", guest, "-append", cmdline]
    obj = lambda end: ["-object", f"tls-creds-x509,id=tls0,dir={creds},endpoint={end},verify-peer=on"] if tls else []
    src = start([*common, "-serial", f"file:{d}/src.txt", "-qmp", f"unix:{d}/src.qmp,server=on,wait=off",
                 *obj("client")], f"{d}/src.log")
    dst = start([*common, "-serial", f"file:{d}/dst.txt", "-qmp", f"unix:{d}/dst.qmp,server=on,wait=off",
                 "-incoming", "defer", *obj("server")], f"{d}/dst.log")
    try:
        wait_for("QEMU's guest to fill its memory", lambda: "tg: dirty filled" in text(f"{d}/src.txt"), src)
        uri = f"tcp:127.0.0.1:{free_port()}"
        dq, sq = Qmp(f"{d}/dst.qmp", dst), Qmp(f"{d}/src.qmp", src)
        params = {"tls-creds": "tls0"} if tls else {}
        dq.cmd("migrate-set-parameters", **params)
        dq.cmd("migrate-incoming", uri=uri)
        if case == "dirtying":
            time.sleep(1)
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 300}, **params)
        sq.cmd("migrate", uri=uri)
        while True:
            st = sq.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            rate = st.get("ram", {}).get("dirty-pages-rate", 0)
            time.sleep(0.02)
        if st["status"] != "completed":
            sys.exit(f"error: QEMU's migration {st['status']}: {st.get('error-desc', '')}\n{text(f'{d}/dst.log')}")
        return {"total_ms": st["total-time"], "downtime_ms": st["downtime"],
                "bytes": st["ram"]["transferred"], "dirty_mib_s": rate * 4096 / 2**20}
    finally:
        end(src)
        end(dst)

try:
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    if part in ("all", "precopy"):
        results = {}
        for case in CASES:
            for tls in (False, True):
                for n in range(rounds):
                    order = [("ours", ours), ("qemu", theirs)] if qemu else [("ours", ours)]
                    if n % 2:
                        order.reverse()
                    for who, f in order:
                        results.setdefault((case, tls, who), []).append(f(case, tls, n))
        # The stream LZ4-compressed (--compress), ours only: it trades source CPU for bytes, which
        # pays on slow links, not on loopback.
        lz4 = [ours("idle", False, n, compress=True) for n in range(rounds)]
        print(f"\nmedians of {rounds} run(s); 1 GiB guest, 700 MiB dirtied; loopback TCP")
        print(f"{'case':<18}{'vmm':<6}{'total ms':>9}{'downtime ms':>12}{'MiB sent':>9}{'MB/s':>7}{'dirty MiB/s':>12}")
        for case in CASES:
            for tls in (False, True):
                name = f"{case} {'tls' if tls else 'plain'}"
                for who in ("ours", "qemu"):
                    rs = results.get((case, tls, who))
                    if not rs:
                        continue
                    total, down, sent = med(rs, "total_ms"), med(rs, "downtime_ms"), med(rs, "bytes")
                    print(f"{name:<18}{who:<6}{total:>9.0f}{down:>12.0f}{sent / 2**20:>9.0f}"
                          f"{sent / 1e3 / max(total, 1):>7.0f}{med(rs, 'dirty_mib_s'):>12.0f}")
                q = results.get((case, tls, "qemu"))
                if q:
                    o = results[(case, tls, "ours")]
                    ratio = med(o, "total_ms") / max(med(q, "total_ms"), 1)
                    print(f"{name:<18}ratio ours/qemu total time: {ratio:.2f}x")
        total, down, sent = med(lz4, "total_ms"), med(lz4, "downtime_ms"), med(lz4, "bytes")
        print(f"{'idle plain lz4':<18}{'ours':<6}{total:>9.0f}{down:>12.0f}{sent / 2**20:>9.0f}"
              f"{sent / 1e3 / max(total, 1):>7.0f}{med(lz4, 'dirty_mib_s'):>12.0f}"
              "   (--compress; no QEMU run)")
    if part in ("all", "postcopy"):
        # Post-copy and lazy restore (ours; the faults are counted and timed on the destination).
        pc = {k: [postcopy(n, k == "at once") for n in range(rounds)] for k in ("after pass 1", "at once")}
        rs = {k: [restore(n, k) for n in range(rounds)] for k in ("whole", "lazy", "lazy, working set")}
        print(f"\npost-copy and restore of the dirtying guest (medians of {rounds}; ours):")
        print(f"{'case':<24}{'to running ms':>14}{'total ms':>9}{'pause ms':>9}{'pages':>8}{'faults':>7}{'asked':>6}{'p50 us':>7}{'p99 us':>7}")
        for k, runs in pc.items():
            print(f"{'postcopy ' + k:<24}{med(runs, 'to_running_ms'):>14.0f}{med(runs, 'total_ms'):>9.0f}"
                  f"{med(runs, 'downtime_ms'):>9.0f}{med(runs, 'pages'):>8.0f}{med(runs, 'faults'):>7.0f}"
                  f"{med(runs, 'requests'):>6.0f}{med(runs, 'p50_us'):>7.0f}{med(runs, 'p99_us'):>7.0f}")
        for k, runs in rs.items():
            lazy = k != "whole"
            extra = (f"{'':>9}{med(runs, 'pages'):>8.0f}{med(runs, 'faults'):>7.0f}{'':>6}"
                     f"{med(runs, 'p50_us'):>7.0f}{med(runs, 'p99_us'):>7.0f}") if lazy else ""
            print(f"{'restore ' + k:<24}{med(runs, 'to_running_ms'):>14.0f}{med(runs, 'total_ms'):>9.0f}{extra}")
        lz = rs["lazy"]
        print(f"{'lazy: index to running':<24}{med(lz, 'index_to_running_ms'):>14.1f}"
              "   (the restore proper: snapshot indexed, state applied, vCPUs started)")
        print(f"{'Firecracker (reference)':<24}{'< 5':>14}"
              "   (its documented snapshot restore to running; its figure, not a run here)")
        print("to running: from the command (postcopy) or vmm-core's start (restore: process, helpers and"
              " their sandboxes included) to the VM running on the destination")
    print()
    sys.stdout.flush()
    subprocess.run([f"{bindir}/tls-bench", creds, "1024"], check=True)
finally:
    for p in procs:
        end(p)
PY
