#!/usr/bin/env bash
# Builds the guest images into $VMM_IMAGES_DIR (default: ~/.cache/vmm/images):
#   test-guest.elf          the test guest (tests/guest), a PVH ELF
#   vmlinuz                 Debian's stock cloud kernel (bzImage), from apt-get download
#   vmlinux                 the ELF inside it (its LZ4 payload), which boots faster on KVM-PVM
#   initramfs.cpio{,.gz}    busybox-static, the virtio and pvpanic modules, and /init
# Nothing is installed into the host's /boot. A second run with nothing changed takes ~1 s.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${VMM_IMAGES_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm/images}
mkdir -p "$out"
say() { echo "build-images: $*" >&2; }

# --- the test guest ------------------------------------------------------------------------
(cd "$root/tests/guest" && cargo build --release --quiet 2>&1 | grep -v "sse2\|^ *= note\|^ *|\|^$\|generated 1 warning\|previously accepted" >&2 || true)
guest="$root/tests/guest/target/release/test-guest"
[ -f "$guest" ] || { say "error: the test guest did not build; run (cd tests/guest && cargo build --release)"; exit 1; }
cmp -s "$guest" "$out/test-guest.elf" || cp "$guest" "$out/test-guest.elf"

# --- the stock kernel and its initramfs ----------------------------------------------------
kmeta=linux-image-cloud-amd64
# One apt-cache call (each one loads apt's cache): the current kernel package and versions.
meta=$(apt-cache show --no-all-versions "$kmeta" busybox-static 2>/dev/null || true)
kpkg=$(awk -v m="$kmeta" '/^Package:/ {p=$2} p==m && /^Depends:/ {for (i=2;i<=NF;i++) if ($i ~ /^linux-image-[0-9]/) {print $i; exit}}' <<<"$meta")
kver=$(awk -v m="$kmeta" '/^Package:/ {p=$2} p==m && /^Version:/ {print $2; exit}' <<<"$meta")
bbver=$(awk '/^Package:/ {p=$2} p=="busybox-static" && /^Version:/ {print $2; exit}' <<<"$meta")
if [ -z "$kpkg" ] || [ -z "$bbver" ]; then
    say "error: apt knows no $kmeta or busybox-static: run 'apt-get update'; this builder uses Debian's kernel packages (Debian 12 is what it is tested on)"
    exit 1
fi
stamp="$kpkg $kver busybox-static $bbver $(cat "$0" "$root/tests/guest-linux/init" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
   [ -f "$out/vmlinuz" ] && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    say "up to date in $out ($kpkg $kver)"
    exit 0
fi
for tool in lz4 busybox; do
    command -v $tool >/dev/null || { say "error: $tool is missing; install it with: apt-get install -y lz4 busybox-static"; exit 1; }
done

work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
say "downloading $kpkg $kver and busybox-static $bbver"
mkdir -p "$work/dl" && chmod 1777 "$work/dl"   # apt downloads as its own _apt user
(cd "$work/dl" && apt-get download -q "$kpkg" busybox-static >/dev/null)
dpkg -x "$work"/dl/linux-image-*.deb "$work/k"
dpkg -x "$work"/dl/busybox-static_*.deb "$work/bb"
rel=$(ls "$work/k/lib/modules")
cp "$work/k/boot/vmlinuz-$rel" "$work/vmlinuz"

# vmlinux: the kernel ELF is the LZ4 (legacy format) payload inside the bzImage.
off=$(grep -obUaP '\x02\x21\x4c\x18' "$work/vmlinuz" | head -1 | cut -d: -f1)
tail -c +"$((off + 1))" "$work/vmlinuz" | lz4 -dc > "$work/vmlinux" 2>/dev/null || true
[ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ] ||
    { say "error: no LZ4-compressed ELF found in $kpkg's bzImage"; exit 1; }

# Modules, in the order their .modinfo depends= asks for.
mods="$work/k/lib/modules/$rel/kernel"
declare -A path=()
while IFS= read -r f; do
    n=$(basename "$f" .ko); path[${n//-/_}]=$f
done < <(find "$mods" -name '*.ko')
order=()
declare -A seen=()
visit() {
    local m=${1//-/_}
    [ -n "${seen[$m]:-}" ] && return
    seen[$m]=1
    [ -n "${path[$m]:-}" ] || { say "error: module $m is not in $kpkg"; exit 1; }
    local deps
    deps=$(tr '\0' '\n' < "${path[$m]}" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
    for d in $deps; do visit "$d"; done
    order+=("$m")
}
for m in virtio_pci virtio_blk virtio_console virtio_rng pvpanic_mmio; do visit "$m"; done

ir="$work/initramfs"
mkdir -p "$ir"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$work/bb/bin/busybox" "$ir/bin/busybox"
ln -s busybox "$ir/bin/sh"
cp "$root/tests/guest-linux/init" "$ir/init"
chmod 755 "$ir/init"
for m in "${order[@]}"; do cp "${path[$m]}" "$ir/lib/modules/$m.ko"; done
printf '%s\n' "${order[@]}" > "$ir/lib/modules/modules.order"
(cd "$ir" && find . | sort | busybox cpio -o -H newc 2>/dev/null) > "$work/initramfs.cpio"
gzip -9 -n -c "$work/initramfs.cpio" > "$work/initramfs.cpio.gz"

for f in vmlinuz vmlinux initramfs.cpio initramfs.cpio.gz; do mv "$work/$f" "$out/$f"; done
echo "$stamp" > "$out/stamp"
say "built in $out: $kpkg $kver, modules: ${order[*]}"
