#!/usr/bin/env bash
# Build the root filesystem of the trixie test image. It is Debian trixie with
# sshd, HTCondor 23.9.6 (minicondor, a personal pool, with its htcondor2 Python
# bindings), Apptainer 1.4.5 from sid, fuse3 with python3-pyfuse3 and python3-trio
# (so that sandboxfs runs on the submit node as `python3 -m sandboxfs`) and user
# alice (uid 1000). Two SIF images are in /opt/sif: python.sif (trixie minbase
# with python3) and busybox.sif (busybox only, no python3). Both have a /workspace
# directory with mode 0777. Apptainer 1.4.5 and HTCondor 23.9.6 need glibc 2.38 or
# newer, which Debian 12 hosts lack, so they run in this image.
#
# The container command is /usr/local/sbin/sandboxfs-testbed-init (see
# trixie/sandboxfs-testbed-init for its environment variables).
#
# Usage: trixie.sh inputs        print what, besides this file, defines the image
#        trixie.sh rootfs DIR    fill the empty directory DIR with the root filesystem
#
# SANDBOXFS_DEBIAN_MIRROR overrides the mirror, which by default is the one apt
# uses on this machine. The mirror is not part of the image key, because any
# mirror serves the same suites.
set -euo pipefail

SUITE=trixie
APPTAINER_SUITE=sid
VARIANT=minbase
INCLUDE=python3
# Debian's condor package ships the htcondor2 bindings; trixie has no python3-htcondor.
PACKAGES=(openssh-server openssh-client busybox-static squashfs-tools procps iproute2
    ca-certificates sudo minicondor fuse3 python3-pyfuse3 python3-trio)
APPTAINER_PACKAGE=apptainer
DEFAULT_MIRROR=http://deb.debian.org/debian
FILES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/trixie" && pwd)
SIF_BUILD_DIR=/var/tmp/sif-build
SIF_DIR=/opt/sif

log() {
    echo "trixie.sh: $*" >&2
}

die() {
    echo "trixie.sh: $*" >&2
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

# The files under trixie/ are copied into the image, so their hashes are inputs.
print_inputs() {
    echo "$SUITE $VARIANT $INCLUDE ${PACKAGES[*]} $APPTAINER_SUITE $APPTAINER_PACKAGE"
    (cd "$FILES_DIR" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
}

# --- configure-rootfs: steps run in a private mount namespace -------------

in_root() {
    DEBIAN_FRONTEND=noninteractive chroot "$ROOTFS" "$@"
}

# A policy-rc.d that exits 101 keeps the packages' maintainer scripts from
# starting sshd and condor inside the build.
block_service_starts() {
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
}

# The mirror's sid Release file can be past its Valid-Until date while trixie's
# has none, so the sid source skips that check. The pins keep every package on
# trixie except apptainer, whose dependencies trixie satisfies.
write_apt_sources() {
    local mirror=$1
    cat >"$ROOTFS/etc/apt/sources.list.d/sid.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $APPTAINER_SUITE
Components: main
Check-Valid-Until: no
EOF
    cat >"$ROOTFS/etc/apt/preferences.d/apptainer-from-sid" <<EOF
Package: *
Pin: release n=$APPTAINER_SUITE
Pin-Priority: 100

Package: $APPTAINER_PACKAGE
Pin: release n=$APPTAINER_SUITE
Pin-Priority: 990
EOF
    echo 'Acquire::Languages "none";' >"$ROOTFS/etc/apt/apt.conf.d/90no-translations"
}

install_packages() {
    in_root apt-get update -q || die "apt-get update in the trixie root failed"
    in_root apt-get install -q -y --no-install-recommends "${PACKAGES[@]}" ||
        die "installing ${PACKAGES[*]} from $SUITE failed"
    in_root apt-get install -q -y --no-install-recommends "$APPTAINER_PACKAGE" ||
        die "installing $APPTAINER_PACKAGE from $APPTAINER_SUITE failed"
    log "installed $(in_root dpkg-query -W -f='${Package} ${Version}, ' libc6 "$APPTAINER_PACKAGE" minicondor \
        python3-pyfuse3 python3-trio)"
    in_root python3 -c 'import htcondor2, pyfuse3, trio' ||
        die "python3 in the trixie root cannot import htcondor2, pyfuse3 and trio"
}

# With `root default capabilities = full`, Apptainer 1.4.5 run as root in a Docker
# container fails with "Requesting capability set ... while permitted capability
# set is ...", because the container lacks CAP_SYS_RESOURCE. So root gets no
# capabilities unless it requests them with --add-caps.
configure_apptainer() {
    local conf=$ROOTFS/etc/apptainer/apptainer.conf
    sed -i 's/^root default capabilities = full$/root default capabilities = no/' "$conf"
    grep -qx 'root default capabilities = no' "$conf" ||
        die "could not set 'root default capabilities = no' in $conf"
}

# The password field '*' allows no password but, unlike useradd's '!', does not
# lock the account, so sshd accepts alice's public key.
add_user_alice() {
    in_root useradd --create-home --uid 1000 --user-group --shell /bin/bash alice
    in_root usermod --password '*' alice
}

# One ed25519 host key, made now, so tests can pin it in a known_hosts file.
configure_sshd() {
    rm -f "$ROOTFS"/etc/ssh/ssh_host_*
    in_root ssh-keygen -q -t ed25519 -N '' -C sandboxfs-testbed -f /etc/ssh/ssh_host_ed25519_key
    install -m 0644 "$FILES_DIR/sshd_config" "$ROOTFS/etc/ssh/sshd_config.d/sandboxfs-testbed.conf"
}

install_testbed_files() {
    install -m 0755 "$FILES_DIR/sandboxfs-testbed-init" "$ROOTFS/usr/local/sbin/sandboxfs-testbed-init"
    install -m 0644 "$FILES_DIR/condor_config" "$ROOTFS/etc/condor/config.d/90-sandboxfs-testbed"
}

# Copy the fresh minbase root (before sshd, condor and apptainer are added) as the
# root of python.sif. Apptainer mounts its own /dev and provides /etc/hostname and
# /etc/resolv.conf, so the copy keeps neither the device nodes nor the build host's files.
make_python_sif_root() {
    local dir=$ROOTFS$SIF_BUILD_DIR/python
    mkdir -p "$dir"
    tar -C "$ROOTFS" --one-file-system --exclude=".$SIF_BUILD_DIR" -cf - . | tar -C "$dir" -xf - ||
        die "copying the minbase root to $dir failed"
    rm -rf "$dir"/dev/* "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/locale/* "$dir"/var/log/* \
        "$dir"/etc/hostname
    : >"$dir/etc/resolv.conf"
    install -d -m 0777 "$dir/workspace"
}

# Outside a chroot, `busybox --install -s` would point the links at the host path,
# so it runs chrooted into the SIF root.
make_busybox_sif_root() {
    local dir=$ROOTFS$SIF_BUILD_DIR/busybox
    install -d -m 0755 "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,root,home}
    install -d -m 1777 "$dir/tmp"
    install -d -m 0777 "$dir/workspace"
    install -m 0755 "$ROOTFS/usr/bin/busybox" "$dir/bin/busybox"
    chroot "$dir" /bin/busybox --install -s
    # Apptainer adds the calling user to the image's passwd and group files, and
    # warns when they are missing. The image has no bash, so the shells become /bin/sh.
    grep -E '^(root|alice|nogroup|nobody):' "$ROOTFS/etc/passwd" | sed 's|:/bin/bash$|:/bin/sh|' >"$dir/etc/passwd"
    grep -E '^(root|alice|nogroup|nobody):' "$ROOTFS/etc/group" >"$dir/etc/group"
}

build_sif_images() {
    local image
    install -d -m 0755 "$ROOTFS$SIF_DIR"
    for image in python busybox; do
        in_root apptainer build "$SIF_DIR/$image.sif" "$SIF_BUILD_DIR/$image/" ||
            die "apptainer build $SIF_DIR/$image.sif failed"
    done
    rm -rf "${ROOTFS:?}$SIF_BUILD_DIR"
}

# Drop package lists, downloaded packages, documentation and the host files that
# debootstrap copied in. Docker provides /etc/hostname and /etc/resolv.conf.
clean_rootfs() {
    rm -f "$ROOTFS/usr/sbin/policy-rc.d"
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/archives/partial/* \
        "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/* \
        "$ROOTFS"/var/log/bootstrap.log "$ROOTFS"/etc/hostname
    : >"$ROOTFS/etc/resolv.conf"
}

# Runs in its own mount namespace, so every mount made here disappears when it
# exits, also after a failure. Apptainer finds the mount point of /tmp through
# /proc/self/mountinfo, which works in a chroot only if the root is a mount point,
# so the root is bind-mounted onto itself first.
configure_rootfs() {
    ROOTFS=$1
    local mirror=$2
    make_python_sif_root
    mount --make-rprivate /
    mount --bind "$ROOTFS" "$ROOTFS"
    mount -t proc proc "$ROOTFS/proc"

    block_service_starts
    write_apt_sources "$mirror"
    install_packages
    configure_apptainer
    add_user_alice
    configure_sshd
    install_testbed_files
    make_busybox_sif_root
    build_sif_images
    clean_rootfs
}

build_rootfs() {
    local rootfs=$1 mirror
    [[ -d $rootfs ]] || die "rootfs directory $rootfs does not exist"
    command -v debootstrap >/dev/null || die "debootstrap is not installed; run scripts/testbed deps"
    rootfs=$(cd "$rootfs" && pwd)
    mirror=${SANDBOXFS_DEBIAN_MIRROR:-$(apt_mirror)}

    log "debootstrap $SUITE ($VARIANT, +$INCLUDE) from $mirror; this can take several minutes"
    debootstrap --variant="$VARIANT" --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" ||
        die "debootstrap $SUITE from $mirror failed; see the messages above"

    unshare --mount "${BASH_SOURCE[0]}" configure-rootfs "$rootfs" "$mirror" ||
        die "configuring the trixie root in $rootfs failed; see the messages above"
}

case "${1:-}" in
    inputs) print_inputs ;;
    rootfs) [[ $# -eq 2 ]] || die "usage: trixie.sh rootfs DIR"; build_rootfs "$2" ;;
    # Internal: the second half of `rootfs`, run by unshare.
    configure-rootfs)
        [[ $# -eq 3 ]] || die "usage: trixie.sh configure-rootfs DIR MIRROR"
        configure_rootfs "$2" "$3"
        ;;
    *) die "usage: trixie.sh inputs | trixie.sh rootfs DIR" ;;
esac
