#!/usr/bin/env bash
# Sets up (packages, guest images), then runs every check and test: formatting, clippy with
# warnings as errors, the build, and the whole test suite (unit, integration on real KVM, and
# the stock-kernel boot, ~7 minutes on a KVM-PVM host), then each fuzz target for 30 s.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
(cd tests/guest && cargo fmt -- --check)
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "test: cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The test guest has its own flags (no SSE); rustc's note that this changes the float ABI is
# expected, so its output is shown only when clippy fails.
if ! out=$(cd tests/guest && cargo clippy --release --quiet -- -D warnings 2>&1); then
    echo "$out" >&2
    exit 1
fi
echo "test: cargo build" >&2
cargo build --workspace --quiet
# The generated Cap'n Proto code is also committed (for builds without capnp): it must match
# what the schemas generate now.
CAPNP_UPDATE_VENDORED=1 cargo build --quiet -p vmm-proto
if ! git diff --quiet -- proto/src/generated; then
    echo "test: proto/src/generated is stale; commit what CAPNP_UPDATE_VENDORED=1 cargo build -p vmm-proto wrote" >&2
    exit 1
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace
else
    echo "test: cargo-nextest is not installed; using cargo test" >&2
    cargo test --workspace
fi
# The fuzz targets keep building and their seeds keep passing: a short run of each (bench/fuzz.sh
# runs them for as long as it is asked to).
echo "test: fuzz targets, ${VMM_FUZZ_SMOKE_SECS:-30} s each" >&2
"$root/bench/fuzz.sh" "${VMM_FUZZ_SMOKE_SECS:-30}"
