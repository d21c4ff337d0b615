#!/usr/bin/env bash
# Sets up (packages, guest images), builds vmm-core and its helpers, and boots a VM with the
# default guest: Debian's stock kernel to a shell on hardware KVM; the test guest on a KVM-PVM
# host, where Linux user space cannot run (vmm-core says so). The VM gets a scratch disk
# (a sparse 64 MiB raw image in the image cache, served by blockd) unless you give a --disk.
# Extra arguments go to `vmm-core run`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
(cd "$root" && cargo build --release --quiet -p vmm-core -p chardevd -p blockd -p migrated -p vmmctl)
disk=()
if [[ " $* " != *" --disk "* ]]; then
    images=${VMM_IMAGES_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm/images}
    mkdir -p "$images"
    [ -e "$images/scratch.img" ] || truncate -s 64M "$images/scratch.img"
    disk=(--disk "path=$images/scratch.img")
fi
exec "$root/target/release/vmm-core" run "${disk[@]}" "$@"
