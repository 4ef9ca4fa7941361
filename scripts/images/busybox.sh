#!/usr/bin/env bash
# Build the root filesystem of the busybox test image: a static busybox, the
# applet symlinks, root and alice (uid 1000), and /workspace. It has no python3,
# so sandboxfs has to use its shell fallback there.
#
# Usage: busybox.sh inputs        print what, besides this file, defines the image
#        busybox.sh rootfs DIR    fill the empty directory DIR with the root filesystem
set -euo pipefail

BUSYBOX=/bin/busybox

die() {
    echo "busybox.sh: $*" >&2
    exit 1
}

require_busybox_static() {
    local status
    status=$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)
    [[ $status == "install ok installed" ]] ||
        die "package busybox-static is not installed; run scripts/testbed deps"
    [[ -x $BUSYBOX ]] || die "$BUSYBOX is missing although busybox-static is installed"
}

print_inputs() {
    require_busybox_static
    sha256sum "$BUSYBOX" | cut -d' ' -f1
}

create_directories() {
    local rootfs=$1
    install -d -m 0755 "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,home}
    install -d -m 0700 "$rootfs/root"
    install -d -m 1777 "$rootfs/tmp"
    install -d -m 0777 "$rootfs/workspace"
    install -d -m 0755 -o 1000 -g 1000 "$rootfs/home/alice"
}

# Run outside a chroot, `busybox --install -s DIR` puts every link flat into DIR and
# points it at the binary's host path. So each applet is linked here to /bin/busybox,
# at the path that `busybox --list-full` gives for it.
install_applets() {
    local rootfs=$1 applet

    install -m 0755 "$BUSYBOX" "$rootfs/bin/busybox"
    while read -r applet; do
        [[ $applet == bin/busybox ]] && continue
        ln -sfn /bin/busybox "$rootfs/$applet"
    done < <("$BUSYBOX" --list-full)
}

write_accounts() {
    local rootfs=$1

    cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:alice:/home/alice:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
alice:x:1000:
nogroup:x:65534:
EOF
    chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
}

build_rootfs() {
    local rootfs=$1
    require_busybox_static
    [[ -d $rootfs ]] || die "rootfs directory $rootfs does not exist"

    create_directories "$rootfs"
    install_applets "$rootfs"
    write_accounts "$rootfs"
}

case "${1:-}" in
    inputs) print_inputs ;;
    rootfs) [[ $# -eq 2 ]] || die "usage: busybox.sh rootfs DIR"; build_rootfs "$2" ;;
    *) die "usage: busybox.sh inputs | busybox.sh rootfs DIR" ;;
esac
