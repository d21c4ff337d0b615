# Sourced by the benchmark scripts: makes QEMU 10.0.2 the reference they compare against,
# as users do (Debian 12's own QEMU is 7.2, without multifd and with an older block layer).
#
# On Debian 12 (bookworm), QEMU 10.0.2 comes from bookworm-backports: the suite is added to
# apt's sources and qemu-system-x86, qemu-system-common and qemu-utils are installed from it,
# all three together (a qemu-utils of another version Breaks qemu-system-common), without
# their recommends (a GUI). Elsewhere, or with VMM_BENCH_QEMU=installed, the QEMU that is
# installed is measured, and its version is printed beside the figures as always.
#
# Sets: qemu (qemu-system-x86_64's path, or empty), qemu_version (its version line).
qemu10_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    local have
    have=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
    if [ -n "$have" ] && dpkg --compare-versions "$have" ge "1:10.0.2"; then
        return 0
    fi
    if [ "${VMM_BENCH_QEMU:-}" = installed ]; then
        return 0
    fi
    if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
        echo "note: QEMU 10.0.2 is the reference, and this host is not Debian 12 (bookworm), whose backports carry it; measuring the installed QEMU (${have:-none})" >&2
        return 0
    fi
    local list=/etc/apt/sources.list.d/bookworm-backports.sources
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "adding bookworm-backports to apt's sources ($list), for QEMU 10.0.2" >&2
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" \
            "Suites: bookworm-backports" "Components: main" \
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" | $sudo tee "$list" >/dev/null
    fi
    echo "installing QEMU 10.0.2 from bookworm-backports (qemu-system-x86, qemu-system-common, qemu-utils)" >&2
    $sudo apt-get update -q >/dev/null
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-system-common qemu-utils >/dev/null; then
        echo "error: cannot install QEMU 10.0.2 from bookworm-backports (see apt's output above); set VMM_BENCH_QEMU=installed to measure the QEMU that is installed" >&2
        exit 1
    fi
}
qemu10_install
qemu=$(command -v qemu-system-x86_64 || true)
qemu_version=$([ -n "$qemu" ] && "$qemu" --version | head -1 || echo "not installed")
