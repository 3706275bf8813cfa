#!/usr/bin/env bash
# Print the path of a Linux 7.3 source tree, fetching Debian's linux-source-7.3 if needed.
#
# KERNEL_SRC=<dir> uses a local tree instead (checked to be a kernel tree).
# Otherwise the newest linux-source-7.3 from the trixie-backports suite is downloaded through a
# temporary apt configuration: the mirror is the one this machine already uses for Debian, the
# suite is added only in a private sources directory, and the download is verified against
# Debian's archive keyring. The system's apt configuration is never modified.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SERIES=${KERNEL_SERIES:-7.3}
SUITE=${KERNEL_SUITE:-trixie-backports}
PKG=linux-source-$SERIES

check_tree() {
    local dir=$1
    [ -f "$dir/Makefile" ] && [ -f "$dir/Kconfig" ] && [ -d "$dir/rust/kernel" ] \
        && grep -q '^VERSION = ' "$dir/Makefile" \
        || bad_input "KERNEL_SRC=$dir is not a Linux source tree with Rust support (no Makefile/Kconfig/rust/kernel)"
}

if [ -n "${KERNEL_SRC:-}" ]; then
    [ -d "$KERNEL_SRC" ] || bad_input "KERNEL_SRC=$KERNEL_SRC does not exist"
    src=$(cd "$KERNEL_SRC" && pwd)
    check_tree "$src"
    echo "$src"
    exit 0
fi

start=$(now_ns)
mirror=$(debian_mirror | head -n1)
[ -n "$mirror" ] || bad_input "no Debian mirror configured in $APT_ETC (needed to fetch $PKG); set KERNEL_SRC=<linux tree> instead"
[ -r "$KEYRING" ] || die "missing $KEYRING (Debian package debian-archive-keyring)"

apt_dir="$AIODMA_CACHE/apt"
private_apt "$apt_dir" deb "$mirror" "$SUITE"
# Refresh the private package list at most once a day.
if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null)" ]; then
    apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update for $SUITE failed (mirror from /etc/apt)"
fi
version=$(apt-cache "${apt_opts[@]}" madison "$PKG" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
    | sort -V | tail -n1)
[ -n "$version" ] || die "$PKG not found in $SUITE on the configured Debian mirror"

src="$AIODMA_CACHE/src/linux-$version"
if [ -f "$src/.aiodma-complete" ]; then
    step_done kernel-src cached "$start"
    echo "$src"
    exit 0
fi
deb_dir=$(mktemp -d "$AIODMA_CACHE/dl.XXXXXX")
trap 'rm -rf "$deb_dir"' EXIT
log "downloading $PKG=$version from $SUITE (~170 MB)"
(cd "$deb_dir" && apt-get "${apt_opts[@]}" -qq download "$PKG=$version" >&2) \
    || die "apt-get download $PKG=$version failed"
deb=$(ls "$deb_dir"/*.deb)
tmp="$src.tmp.$$"  # per process: concurrent builds sharing a cache do not collide
rm -rf "$tmp" && mkdir -p "$tmp"
dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' \
    | tar -xJ -C "$tmp" --strip-components=1
check_tree "$tmp"
touch "$tmp/.aiodma-complete"
rm -rf "$src" && mv "$tmp" "$src"
step_done kernel-src fetched "$start"
echo "$src"
