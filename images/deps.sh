#!/usr/bin/env bash
# Install everything the image build and the VMM need. Idempotent: a second run only checks.
#
# On Debian (and derivatives) missing packages are installed with apt-get; elsewhere a missing
# tool is named and the script fails, so the user knows exactly what to install.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# tool -> Debian package that provides it (Debian's fio pins the version whose source the
# guest's static fio is built from). LLVM 19 builds the debug kernel and its module
# (images/build.sh: `make LLVM=-19`, the tools below), because KASAN and Rust together need
# clang; the test kernel stays GCC.
declare -A TOOL_PKG=(
    [gcc]=gcc [make]=make [flex]=flex [bison]=bison [bc]=bc [cpio]=cpio [kmod]=kmod
    [busybox]=busybox-static [fio]=fio [xz]=xz-utils [qemu-system-x86_64]=qemu-system-x86
    [gpgv]=gpgv [curl]=curl
    [clang-19]=clang-19 [ld.lld-19]=lld-19 [llvm-ar-19]=llvm-19 [llvm-nm-19]=llvm-19
    [llvm-objcopy-19]=llvm-19 [llvm-objdump-19]=llvm-19 [llvm-readelf-19]=llvm-19
    [llvm-strip-19]=llvm-19
)
# headers/libraries (checked through dpkg on Debian, through the file elsewhere)
declare -A FILE_PKG=(
    [/usr/include/libelf.h]=libelf-dev
    [/usr/include/openssl/ssl.h]=libssl-dev
    [/usr/lib/llvm-19/lib/libclang.so]=libclang-19-dev
    [/usr/share/keyrings/debian-archive-keyring.gpg]=debian-archive-keyring
    [/usr/lib/x86_64-linux-gnu/libc.a]=libc6-dev
    [/usr/lib/x86_64-linux-gnu/libaio.a]=libaio-dev
    [/usr/lib/x86_64-linux-gnu/libz.a]=zlib1g-dev
)
BINDGEN_MIN=0.71.1

is_debian() { [ -r "${AIODMA_DEBIAN_VERSION_FILE:-/etc/debian_version}" ] && command -v apt-get >/dev/null; }

start=$(now_ns)
missing_pkgs=()
missing_desc=()
for tool in "${!TOOL_PKG[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || { missing_pkgs+=("${TOOL_PKG[$tool]}"); missing_desc+=("$tool"); }
done
# busybox must be the static build: it runs inside the guest without any library.
if command -v busybox >/dev/null 2>&1 && ldd "$(command -v busybox)" >/dev/null 2>&1; then
    missing_pkgs+=(busybox-static); missing_desc+=("static busybox")
fi
for f in "${!FILE_PKG[@]}"; do
    [ -e "$f" ] || { missing_pkgs+=("${FILE_PKG[$f]}"); missing_desc+=("$f"); }
done

if [ ${#missing_pkgs[@]} -gt 0 ]; then
    # Several tools come from one package (llvm-19): name each package once.
    mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
    if ! is_debian; then
        bad_input "missing ${missing_desc[*]} (Debian packages: ${missing_pkgs[*]}); install them and re-run"
    fi
    [ "$(id -u)" -eq 0 ] || die "missing ${missing_pkgs[*]}; run 'sudo $0' to install them"
    log "installing: ${missing_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
else
    log "system packages present"
fi

command -v rustup >/dev/null || bad_input "missing rustup (the kernel's Rust needs rustup's rust-src component)"
command -v cargo >/dev/null || bad_input "missing cargo"
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
    log "rustup component add rust-src"
    rustup component add rust-src
fi
# rustfmt and clippy-driver: `make lint` runs the kernel's rustfmt check and CLIPPY=1 build on the
# module (images/build.sh lint), besides cargo fmt and cargo clippy.
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        log "rustup component add $component"
        rustup component add "$component"
    fi
done
if ! rustup target list --installed 2>/dev/null | grep -q '^x86_64-unknown-linux-musl$'; then
    log "rustup target add x86_64-unknown-linux-musl (static guest tools)"
    rustup target add x86_64-unknown-linux-musl
fi

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
bindgen_version() { bindgen --version 2>/dev/null | awk '{print $2}'; }
if ! command -v bindgen >/dev/null || ! version_ge "$(bindgen_version)" "$BINDGEN_MIN"; then
    log "cargo install --locked bindgen-cli (need >= $BINDGEN_MIN; takes about a minute)"
    cargo install --locked --quiet bindgen-cli
fi
command -v bindgen >/dev/null || die "bindgen installed but not on PATH (add ~/.cargo/bin to PATH)"
step_done deps checked "$start"
