#!/usr/bin/env bash
# Sets up (packages, guest images), builds vmm-core, and boots a VM with the default guest:
# Debian's stock kernel to a shell on hardware KVM; the test guest on a KVM-PVM host, where
# Linux user space cannot run (vmm-core says so). Extra arguments go to `vmm-core run`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
(cd "$root" && cargo build --release --quiet -p vmm-core -p chardevd -p vmmctl)
exec "$root/target/release/vmm-core" run "$@"
