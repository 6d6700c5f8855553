#!/usr/bin/env bash
# Python on an emulated aarch64 (Graviton-like) CPU, from an x86_64 Linux host, for functional checks.
#
#   ARM_PROFILE=g3 tools/arm-python.sh -m utils.experiments.arm_check      # any python arguments
#   tools/arm-python.sh --setup                                 # only build (or verify) the cache
#
# Route: qemu-user (no binfmt_misc, no chroot). An arm64 Debian userland unpacked by
# `mmdebstrap --variant=extract`, the aarch64 wheels of requirements-aarch64.txt installed by the
# host's pip (--platform, --no-deps: pip evaluates dependency markers for the host), and
# qemu-aarch64-static running the userland's python3.11 with QEMU_LD_PREFIX. Absolute guest paths are
# looked up under the prefix first, so each profile gets its own prefix (symlinks to the userland plus
# a /proc/cpuinfo and MIDR_EL1 files naming its Neoverse core): profiles never share mutable files.
# Everything lives in $ARM_DIR (default ~/.cache/opensora-cpu-study/arm/: one cache per machine, which every clone
# of the study reuses; nothing in it depends on the clone); the wheels are reinstalled only when
# requirements-aarch64.txt changes (sha256 stamp). Building the cache needs root (apt, mmdebstrap).
# Emulated timings are not performance: 300-3000x slower than native, and unevenly so.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARM_DIR=${ARM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/opensora-cpu-study/arm}
ARM_PROFILE=${ARM_PROFILE:-g3}
HOST_PYTHON=${ARM_HOST_PYTHON:-python3}
LOCK=$REPO/requirements-aarch64.txt
ROOTFS=$ARM_DIR/rootfs
SITE=$ARM_DIR/site
SUITE=bookworm                                   # its python3 is 3.11, the cp311 of the lock
DEBS=python3,libstdc++6,libgomp1,ca-certificates  # torch needs libstdc++ (it bundles its own OpenMP)

# Each profile: the QEMU CPU model and the MIDR_EL1 of the Neoverse core it stands for. QEMU 7.2 has
# no Neoverse V1/V2 model: `max` has SVE, SVE2, BF16, I8MM and SME with 512-bit vectors, so the vector
# length is set to the Graviton's and SME (which no Graviton has) is switched off. `max` cannot drop
# SVE2, so g3 is a V1 plus SVE2.
case $ARM_PROFILE in
    g2) QEMU_CPU=neoverse-n1;            MIDR=0x00000000413fd0c1 ;;  # Graviton2: Neoverse N1 r3p1
    g3) QEMU_CPU=max,sve256=on,sme=off;  MIDR=0x00000000411fd401 ;;  # Graviton3: Neoverse V1 r1p1
    g4) QEMU_CPU=max,sve128=on,sme=off;  MIDR=0x00000000410fd4f1 ;;  # Graviton4: Neoverse V2 r0p1
    *) echo "ARM_PROFILE=$ARM_PROFILE is not a profile; accepted: g2 (Neoverse N1), g3 (V1), g4 (V2)" >&2; exit 2 ;;
esac

say() { echo "arm-python: $*" >&2; }

need_root() {
    [ "$(id -u)" = 0 ] || { say "$1 needs root (run as root, or build $ARM_DIR once as root)"; exit 1; }
}

install_tools() {
    command -v qemu-aarch64-static >/dev/null && command -v mmdebstrap >/dev/null && return
    need_root "installing qemu-user-static and mmdebstrap with apt-get"
    say "installing qemu-user-static and mmdebstrap (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static mmdebstrap >/dev/null
}

build_rootfs() {
    local stamp="$SUITE $DEBS"
    [ -f "$ROOTFS/.stamp" ] && [ "$(cat "$ROOTFS/.stamp")" = "$stamp" ] && return
    need_root "unpacking the arm64 userland (mmdebstrap)"
    say "unpacking an arm64 $SUITE userland ($DEBS)"
    local mirror=()  # the host's Debian mirror where it has one, else mmdebstrap's default
    [ -f /etc/apt/sources.list.d/debian.sources ] && mirror=(/etc/apt/sources.list.d/debian.sources)
    rm -rf "$ROOTFS.tmp" "$ROOTFS"
    mmdebstrap --quiet --mode=root --variant=extract --architectures=arm64 --include="$DEBS" \
        "$SUITE" "$ROOTFS.tmp" "${mirror[@]}"
    # extract runs no postinst, so the stdlib has no bytecode; any 3.11 writes the same format
    if "$HOST_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        "$HOST_PYTHON" -m compileall -q -j0 "$ROOTFS.tmp/usr/lib/python3.11" >/dev/null || true
    fi
    echo "$stamp" > "$ROOTFS.tmp/.stamp"
    mv "$ROOTFS.tmp" "$ROOTFS"
    rm -rf "$ARM_DIR"/prefix-*  # they link into the userland
}

install_site() {
    local stamp
    stamp=$(sha256sum "$LOCK" | cut -d' ' -f1)
    [ -f "$SITE/.stamp" ] && [ "$(cat "$SITE/.stamp")" = "$stamp" ] && return
    "$HOST_PYTHON" -m pip --version >/dev/null 2>&1 || {
        say "$HOST_PYTHON has no pip; set ARM_HOST_PYTHON to a Python with pip (e.g. .venv/bin/python)"; exit 1; }
    say "installing the aarch64 wheels of requirements-aarch64.txt"
    rm -rf "$SITE.tmp"
    # every manylinux tag the userland's glibc (2.36) accepts: pip does not widen an explicit --platform
    local glibc platforms=(--platform manylinux2014_aarch64)
    for glibc in $(seq 17 36); do platforms+=(--platform "manylinux_2_${glibc}_aarch64"); done
    "$HOST_PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: --root-user-action=ignore \
        "${platforms[@]}" --python-version 3.11.2 --implementation cp --abi cp311 --abi abi3 --abi none \
        --target "$SITE.tmp" -r "$LOCK" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; } >&2  # local index noise
    echo "$stamp" > "$SITE.tmp/.stamp"
    rm -rf "$SITE"
    mv "$SITE.tmp" "$SITE"
}

# The profile's prefix: the userland's top-level entries as symlinks, plus the identification files
# QEMU does not emulate (it shows the host's /proc/cpuinfo; cpuinfo, oneDNN and ACL read MIDR_EL1).
make_prefix() {
    local prefix=$ARM_DIR/prefix-$ARM_PROFILE
    local stamp="$QEMU_CPU $MIDR $(nproc)"
    [ -f "$prefix/.stamp" ] && [ "$(cat "$prefix/.stamp")" = "$stamp" ] && { PREFIX=$prefix; return; }
    rm -rf "$prefix.tmp" "$prefix"
    # the Features line: the HWCAPs QEMU gives this CPU model (what cpuinfo, oneDNN and ACL read)
    local features
    features=$(QEMU_LD_PREFIX="$ROOTFS" QEMU_CPU="$QEMU_CPU" PYTHONPATH="$REPO" \
        qemu-aarch64-static "$ROOTFS/usr/bin/python3.11" -S -m utils.experiments.arm_check --hwcaps)
    mkdir -p "$prefix.tmp/proc"
    local entry cpu
    for entry in "$ROOTFS"/*; do
        case ${entry##*/} in proc|sys|dev|tmp) ;; *) ln -s "$entry" "$prefix.tmp/${entry##*/}" ;; esac
    done
    local implementer=0x${MIDR:10:2} variant=0x${MIDR:12:1} part=0x${MIDR:14:3} revision=${MIDR:17:1}
    for ((cpu = 0; cpu < $(nproc); cpu++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 2100.00\nFeatures\t: %s\nCPU implementer\t: %s\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
            "$cpu" "$features" "$implementer" "$variant" "$part" "$revision" >> "$prefix.tmp/proc/cpuinfo"
        mkdir -p "$prefix.tmp/sys/devices/system/cpu/cpu$cpu/regs/identification"
        echo "$MIDR" > "$prefix.tmp/sys/devices/system/cpu/cpu$cpu/regs/identification/midr_el1"
    done
    echo "$stamp" > "$prefix.tmp/.stamp"
    mv "$prefix.tmp" "$prefix"
    PREFIX=$prefix
}

setup() {
    [ -f "$LOCK" ] || { say "$LOCK is missing"; exit 1; }
    mkdir -p "$ARM_DIR"
    install_tools
    build_rootfs
    install_site
    make_prefix
}

if [ "${1:-}" = "--setup" ]; then
    setup
    exit 0
fi
setup
# ARM_PYTHON: how a check starts another emulated interpreter (qemu-user cannot exec an aarch64 binary
# without binfmt_misc, but it can exec this host script)
# OMP_WAIT_POLICY: an OpenMP thread spinning for work is emulated instructions too (passive: about 1.6x
# faster under qemu here); the fingerprint records it.
exec env QEMU_LD_PREFIX="$PREFIX" QEMU_CPU="$QEMU_CPU" PYTHONPATH="$REPO:$SITE" PYTHONNOUSERSITE=1 \
    OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" \
    ARM_PROFILE="$ARM_PROFILE" ARM_QEMU_CPU="$QEMU_CPU" ARM_PYTHON="$REPO/tools/arm-python.sh" \
    qemu-aarch64-static "$ROOTFS/usr/bin/python3.11" "$@"
