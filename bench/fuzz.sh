#!/usr/bin/env bash
# Fuzzing: each target in fuzz/ (libFuzzer through libfuzzer-sys, coverage-guided) runs for
# SECONDS on one core, starting from the seeds kept in fuzz/corpus/TARGET and the corpus the
# earlier runs on this machine grew (target/fuzz/corpus/TARGET, carried over). Prints, for each
# target: executions, coverage (libFuzzer's cov: edges and ft: features), the corpus size,
# the crashes found (their inputs are kept in target/fuzz/artifacts/TARGET), and the CPU time
# all runs on this machine have given it (target/fuzz/ledger).
#
# Stable Rust builds the targets: coverage instrumentation is a -C option (sancov-module, as
# cargo-fuzz passes it), and no sanitizer is used (Rust's own checks, overflow checks and
# debug assertions on, stand in for AddressSanitizer in safe code).
#
# usage: bench/fuzz.sh [SECONDS] [TARGET...]     (default 3600 s each, every target)
# Exits 1 if any target crashed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-3600}
shift || true
case "$secs" in ''|*[!0-9]*) echo "bench/fuzz.sh: SECONDS $secs: give a whole number of seconds" >&2; exit 2;; esac
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$root/fuzz/Cargo.toml" | grep -v '^vmm-fuzz$')
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets <<<"$all"
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$all" || { echo "bench/fuzz.sh: no target $t; the targets are: $(echo $all)" >&2; exit 2; }
done
out="$root/target/fuzz"
mkdir -p "$out"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# An explicit --target keeps the instrumentation off build scripts and proc-macros.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet --manifest-path "$root/fuzz/Cargo.toml" --target-dir "$out/build" --target "$host"
echo "command: bench/fuzz.sh $secs ${targets[*]}"
echo "host: $(uname -r), $(nproc) CPUs; $(rustc --version)"
printf '%-10s %8s %12s %8s %8s %8s %8s %8s %14s\n' target seconds executions exec/s cov ft corpus crashes "CPU-h in all"
crashed=0
for t in "${targets[@]}"; do
    corpus="$out/corpus/$t" artifacts="$out/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    log="$out/$t.log"
    before=$(find "$artifacts" -type f | wc -l)
    start=$(date +%s)
    # libFuzzer exits non-zero on a crash; the table says so.
    "$out/build/$host/release/$t" -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" "$corpus" "$root/fuzz/corpus/$t" >"$log" 2>&1 || true
    if [ -z "$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")" ]; then
        echo "bench/fuzz.sh: $t did not run; its log ends:" >&2
        tail -5 "$log" >&2
        exit 1
    fi
    spent=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$( (grep -o 'cov: [0-9]*' "$log" || true) | tail -1 | cut -d' ' -f2)
    ft=$( (grep -o 'ft: [0-9]*' "$log" || true) | tail -1 | cut -d' ' -f2)
    size=$(find "$corpus" -type f | wc -l)
    crashes=$(( $(find "$artifacts" -type f | wc -l) - before ))
    echo "$t $spent" >>"$out/ledger"
    total=$(awk -v t="$t" '$1 == t { s += $2 } END { printf "%.2f", s / 3600 }' "$out/ledger")
    printf '%-10s %8s %12s %8s %8s %8s %8s %8s %14s\n' "$t" "$spent" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$size" "$crashes" "$total"
    if [ "$crashes" -gt 0 ] || grep -q "^==[0-9]*== ERROR\|panicked at" "$log"; then
        crashed=1
        echo "  $t crashed: see $log; the input is in $artifacts" >&2
        grep -m3 "panicked at\|ERROR" "$log" | sed 's/^/    /' >&2
    fi
done
exit $crashed
