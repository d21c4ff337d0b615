#!/usr/bin/env bash
# Installs what building and running the VMM needs on Debian/Ubuntu, then builds the guest
# images. Safe to run again: it only installs what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "setup: $*" >&2; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null; then
    say "error: this script needs apt-get (Debian or Ubuntu); install busybox-static, lz4, util-linux, capnproto, acpica-tools, qemu-utils, qemu-system-common, qemu-system-x86, systemd-container, socat and fuse3 by hand"
    exit 1
fi
# qemu-utils: qemu-img, which the qcow2 tests use to create and check images.
# qemu-system-common: qemu-storage-daemon, the independent vhost-user-blk backend that the
# interoperability test drives with vmm-core's frontend (and bench/block.sh compares with).
# socat: the command at both ends of the exec: migration test.
# fuse3: /dev/fuse and fusermount3, for the crash-consistency check (tests/src/bin/crashfs.rs).
# g++: libFuzzer (C++), which libfuzzer-sys builds for the fuzz targets (bench/fuzz.sh).
packages=(busybox-static lz4 util-linux capnproto acpica-tools qemu-utils qemu-system-common socat fuse3 g++)
# Installed for real ("dpkg -s" also answers for a removed package's leftover configuration).
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
# The image builder asks apt which kernel is current; an empty package list knows none.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    say "installing ${missing[*]:-nothing new} (apt-get update first)"
    $sudo apt-get update -q >/dev/null
    [ ${#missing[@]} -eq 0 ] || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
# A qemu-utils newer than the distribution's (e.g. from backports) Breaks its
# qemu-system-common, so apt removes it to install the latter: install it again, at the
# distribution's version, so that qemu-img is there.
gone=()
for p in "${packages[@]}"; do
    installed "$p" || gone+=("$p")
done
if [ ${#gone[@]} -gt 0 ]; then
    say "installing ${gone[*]} again (another install removed it)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${gone[@]}" >/dev/null
fi
# qemu-system-x86: QEMU's own vhost-user-blk frontend, which the interoperability test points
# at blockd. Its version must be qemu-system-common's (Debian's, or the backports' one that
# bench/ installs), and its recommends (a GUI) are not needed.
# systemd-container: systemd-nspawn, which boots a real systemd for the units' tests.
if ! installed qemu-system-x86 || ! installed systemd-container; then
    common=$(dpkg-query -W -f='${Version}' qemu-system-common)
    say "installing qemu-system-x86 ($common) and systemd-container"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "qemu-system-x86=$common" systemd-container >/dev/null
fi
if ! command -v cargo >/dev/null; then
    say "error: cargo is missing; install Rust with rustup (https://rustup.rs), then run this again"
    exit 1
fi
# rust-vmm's vhost-device-rng: an independent vhost-user-rng backend, which the virtio-rng
# test drives with vmm-core's frontend. Built once into target/tools (about a minute).
tools="$root/target/tools"
if [ ! -x "$tools/bin/vhost-device-rng" ]; then
    say "building vhost-device-rng 0.1.0 (rust-vmm) into $tools"
    cargo install --quiet --locked vhost-device-rng --version 0.1.0 --root "$tools"
fi
if [ ! -e /dev/kvm ]; then
    say "warning: /dev/kvm is missing; VMs and the KVM tests cannot run on this host"
fi
"$root/scripts/build-images.sh"
