#!/usr/bin/env bash
# Print the path of an fio source tree: upstream's tarball from the Debian source package of the
# fio this machine has installed (same version as the packaged binary), fetched through a private
# apt configuration (the machine's Debian mirror, deb-src, verified against Debian's archive
# keyring). The system's apt configuration is never modified.
#
# FIO_SRC=<dir> uses a local fio tree instead.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [ -n "${FIO_SRC:-}" ]; then
    [ -f "$FIO_SRC/configure" ] && [ -f "$FIO_SRC/fio.c" ] \
        || bad_input "FIO_SRC=$FIO_SRC is not an fio source tree (no configure/fio.c)"
    (cd "$FIO_SRC" && pwd)
    exit 0
fi

start=$(now_ns)
version=$(dpkg-query -W -f='${Version}' fio 2>/dev/null) \
    || bad_input "fio is not installed as a Debian package (run images/deps.sh), or set FIO_SRC"
upstream=${version%-*}
src="$AIODMA_CACHE/src/fio-$upstream"
if [ -f "$src/.aiodma-complete" ]; then
    step_done fio-src cached "$start"
    echo "$src"
    exit 0
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mirror=$(debian_mirror | head -n1)
[ -n "$mirror" ] || bad_input "no Debian mirror configured in $APT_ETC (needed to fetch fio's source); set FIO_SRC=<fio tree> instead"
[ -r "$KEYRING" ] || die "missing $KEYRING (Debian package debian-archive-keyring)"
apt_dir="$AIODMA_CACHE/apt-src"
private_apt "$apt_dir" deb-src "$mirror" "$codename"
apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update (deb-src $codename) failed (mirror from /etc/apt)"
dl=$(mktemp -d "$AIODMA_CACHE/dl.XXXXXX")
trap 'rm -rf "$dl"' EXIT
log "downloading the source of fio=$version"
# apt checks every file against the signed Sources index.
(cd "$dl" && apt-get "${apt_opts[@]}" -qq source --download-only "fio=$version" >&2) \
    || die "apt-get source fio=$version failed"
tmp="$src.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
tarball=$(ls "$dl"/fio_"$upstream".orig.tar.* | grep -v '\.asc$' | head -n1)
tar -xf "$tarball" -C "$tmp" --strip-components=1
[ -f "$tmp/configure" ] || die "fio's source tarball has no configure"
touch "$tmp/.aiodma-complete"
rm -rf "$src" && mv "$tmp" "$src"
step_done fio-src fetched "$start"
echo "$src"
