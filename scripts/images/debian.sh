#!/usr/bin/env bash
# Build the root filesystem of the Debian test image: a minbase bookworm with
# python3 (so sandboxfs can run its Python helper inside), user alice (uid 1000)
# and /workspace.
#
# Usage: debian.sh inputs        print what, besides this file, defines the image
#        debian.sh rootfs DIR    fill the empty directory DIR with the root filesystem
#
# SANDBOXFS_DEBIAN_MIRROR overrides the mirror, which by default is the one apt
# uses on this machine. The mirror is not part of the image key, because any
# mirror serves the same suite.
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
INCLUDE=python3
DEFAULT_MIRROR=http://deb.debian.org/debian

die() {
    echo "debian.sh: $*" >&2
    exit 1
}

# Print the first non-security URI of the deb822 sources file, else of the
# one-line sources.list, else the default mirror.
apt_mirror() {
    local uri=""
    local deb822=/etc/apt/sources.list.d/debian.sources
    local oneline=/etc/apt/sources.list

    if [[ -r $deb822 ]]; then
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$deb822")
    fi
    if [[ -z $uri && -r $oneline ]]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {
                   for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$oneline")
    fi
    echo "${uri:-$DEFAULT_MIRROR}"
}

print_inputs() {
    echo "$SUITE $VARIANT $INCLUDE"
}

add_user_alice() {
    local rootfs=$1
    chroot "$rootfs" useradd --create-home --uid 1000 --user-group --shell /bin/bash alice
}

# Drop package lists, downloaded packages and the host files that debootstrap copied
# in. Docker provides /etc/hostname and /etc/resolv.conf to each container.
clean_rootfs() {
    local rootfs=$1
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/archives/partial/* \
        "$rootfs"/var/log/bootstrap.log "$rootfs"/etc/hostname
    : >"$rootfs/etc/resolv.conf"
}

build_rootfs() {
    local rootfs=$1 mirror
    [[ -d $rootfs ]] || die "rootfs directory $rootfs does not exist"
    command -v debootstrap >/dev/null || die "debootstrap is not installed; run scripts/testbed deps"
    mirror=${SANDBOXFS_DEBIAN_MIRROR:-$(apt_mirror)}

    echo "debian.sh: debootstrap $SUITE ($VARIANT, +$INCLUDE) from $mirror; this can take several minutes" >&2
    debootstrap --variant="$VARIANT" --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" ||
        die "debootstrap $SUITE from $mirror failed; see the messages above"

    add_user_alice "$rootfs"
    install -d -m 0777 "$rootfs/workspace"
    clean_rootfs "$rootfs"
}

case "${1:-}" in
    inputs) print_inputs ;;
    rootfs) [[ $# -eq 2 ]] || die "usage: debian.sh rootfs DIR"; build_rootfs "$2" ;;
    *) die "usage: debian.sh inputs | debian.sh rootfs DIR" ;;
esac
