#!/usr/bin/env bash
# Build the test guest: kernel, out-of-tree module, guest tools, initramfs and the fio layer.
#
#   images/build.sh [all|kernel|module|tools|initramfs|fio|debug|lint]      (default: all)
#
# `debug` builds the debug variant (kernel.config + kernel-debug.config: KASAN, lockdep,
# atomic-sleep checks, list and slab debugging, ...) with its own module and initramfs, published
# with a `-debug` suffix; `all` includes it. The debug kernel and its module are built with
# LLVM 19 (`make LLVM=-19`: clang-19, ld.lld-19, llvm-*-19), the test kernel with GCC. `lint` runs the kernel's own gates on the module (rustfmt
# and clippy, see lint_module); `make lint` calls it.
#
# Every artifact lives in $AIODMA_CACHE (default ~/.cache/aiodma), in a directory named by a hash
# of everything that affects it, so a fresh clone on the same machine reuses it and a change to
# any input rebuilds exactly the artifacts downstream of it. images/out/ holds stable links.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

IMAGES="$AIODMA_ROOT/images"
JOBS=${JOBS:-$(nproc)}
GUEST_TARGET=x86_64-unknown-linux-musl
GUEST_TOOLS=(aiodma-guest aiodma-aio)

# The debug variant's C toolchain, as the kernel's LLVM= make variable: the suffix of clang-19,
# ld.lld-19, llvm-ar-19, ... (Debian's versioned LLVM packages, images/deps.sh). With GCC,
# init/Kconfig's `config RUST` (`depends on !KASAN || CC_IS_CLANG`) would drop Rust, and with
# it our module, as soon as KASAN is on; a clang-built kernel can have both.
DEBUG_LLVM=-19

# kmake ARGS...: make for the current variant's kernel tree. Everything built against one kernel
# tree (its configuration, the kernel, its modules, our module with M=) must use the same
# toolchain: Kbuild then also gives the module's C and Rust the flags the kernel was built with
# (KASAN's -fsanitize=kernel-address and -Zsanitizer=kernel-address among them).
kmake() {
    if [ "$VARIANT" = debug ]; then make LLVM="$DEBUG_LLVM" "$@"; else make "$@"; fi
}

# What of the toolchain goes into the kernel's cache key. The test kernel's string is unchanged
# since before the debug variant moved to LLVM, so its cached build stays valid.
toolchain_id() {
    if [ "$VARIANT" = debug ]; then
        printf '%s|%s|LLVM=%s|%s|%s' "$(rustc --version)" "$(bindgen --version 2>&1 | head -n1)" \
            "$DEBUG_LLVM" "$("clang$DEBUG_LLVM" --version | head -n1)" \
            "$("ld.lld$DEBUG_LLVM" --version | head -n1)"
    else
        printf '%s|%s|%s|%s' "$(rustc --version)" "$(bindgen --version 2>&1 | head -n1)" \
            "$(gcc --version | head -n1)" "$(ld --version | head -n1)"
    fi
}

# The debug variant needs the LLVM tools (images/deps.sh installs them).
check_toolchain() {
    [ "$VARIANT" = debug ] || return 0
    local tool missing=()
    for tool in clang ld.lld llvm-ar llvm-nm llvm-objcopy llvm-objdump llvm-readelf llvm-strip; do
        command -v "$tool$DEBUG_LLVM" >/dev/null || missing+=("$tool$DEBUG_LLVM")
    done
    [ ${#missing[@]} -eq 0 ] || bad_input "the debug kernel is built with LLVM=$DEBUG_LLVM; missing ${missing[*]} (run images/deps.sh)"
}

# require_config CONFIG LINE WHY: fail loudly unless LINE is in the .config.
require_config() {
    grep -qxF "$2" "$1" || die "kernel config: $2 did not survive olddefconfig (got: $(grep -E "^(# )?${2%%=*}[= ]" "$1" || echo unset)): $3; see $1"
}

# Fail loudly when Kconfig dropped an option of the fragment (it does so silently when a
# dependency is missing).
verify_config() {
    local config=$1 fragment=$2 line opt bad=()
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                grep -qxF "$line" "$config" || bad+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo unset))")
                ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                if grep -qE "^${opt}=" "$config"; then bad+=("$line (got: $(grep -E "^${opt}=" "$config"))"); fi
                ;;
        esac
    done < "$fragment"
    if [ ${#bad[@]} -gt 0 ]; then
        printf '[images] kernel config: option did not stick: %s\n' "${bad[@]}" >&2
        die "kernel config check failed (${#bad[@]} options); see $config"
    fi
}

# The variant being built: "" (the test guest and emulated host) or "debug".
VARIANT=${VARIANT:-}
suffix() { if [ -n "$VARIANT" ]; then echo "-$VARIANT"; fi; }
fragments() {
    echo "$IMAGES/kernel.config"
    if [ "$VARIANT" = debug ]; then echo "$IMAGES/kernel-debug.config"; fi
}

# kernel_key KSRC: the cache key of a kernel build from that tree.
kernel_key() {
    # shellcheck disable=SC2046
    hash_inputs "$(basename "$1")" "$(make -s -C "$1" kernelversion)" $(fragments) "$(toolchain_id)"
}

build_kernel() {
    local start ksrc kbuild
    start=$(now_ns)
    check_toolchain
    ksrc=$("$IMAGES/kernel-src.sh")
    kbuild="$AIODMA_CACHE/kernel/$(kernel_key "$ksrc")"
    local frag
    if [ -f "$kbuild/.aiodma-complete" ]; then
        step_done "kernel$(suffix)" cached "$start"
    else
        log "building Linux $(make -s -C "$ksrc" kernelversion)$(suffix) in $kbuild (about $([ "$VARIANT" = debug ] && echo "11 min with clang-19 and KASAN" || echo "4 min") on 2 cores)"
        rm -rf "$kbuild" && mkdir -p "$kbuild"
        local logf="$kbuild/build.log"
        # shellcheck disable=SC2046
        {
            kmake -C "$ksrc" O="$kbuild" tinyconfig \
            && "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$kbuild" "$kbuild/.config" $(fragments) \
            && kmake -C "$ksrc" O="$kbuild" olddefconfig
        } > "$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "kernel configuration failed (log: $logf)"; }
        for frag in $(fragments); do verify_config "$kbuild/.config" "$frag"; done
        if [ "$VARIANT" = debug ]; then
            # The point of the LLVM build, checked on its own: Rust (our module) and KASAN in one
            # kernel. Kconfig drops either silently if the compiler cannot have both.
            require_config "$kbuild/.config" CONFIG_CC_IS_CLANG=y "make LLVM=$DEBUG_LLVM did not select clang"
            require_config "$kbuild/.config" CONFIG_RUST=y "with KASAN, Rust needs a clang-built kernel (init/Kconfig: depends on !KASAN || CC_IS_CLANG)"
            require_config "$kbuild/.config" CONFIG_KASAN=y "see lib/Kconfig.kasan for its dependencies"
        fi
        kmake -C "$ksrc" O="$kbuild" -j"$JOBS" bzImage modules >> "$logf" 2>&1 \
            || { tail -n 40 "$logf" >&2; die "kernel build failed (log: $logf)"; }
        touch "$kbuild/.aiodma-complete"
        step_done "kernel$(suffix)" built "$start"
    fi
    link_out "bzImage$(suffix)" "$kbuild/arch/x86/boot/bzImage"
    link_out "kernel$(suffix).config" "$kbuild/.config"
    link_out "System$(suffix).map" "$kbuild/System.map"
    KSRC=$ksrc KBUILD=$kbuild
}

build_module() {
    [ -n "${KBUILD:-}" ] || build_kernel
    local start key out
    start=$(now_ns)
    key=$(hash_inputs "$(basename "$KBUILD")" "$AIODMA_ROOT/guest-driver/module" \
        "$AIODMA_ROOT/device/src/abi.rs")
    out="$AIODMA_CACHE/module/$key"
    if [ -f "$out/aiodma.ko" ]; then
        step_done "module$(suffix)" cached "$start"
    else
        rm -rf "$out" && mkdir -p "$out"
        # MO= keeps every build product out of the source tree. kmake: the kernel's toolchain.
        kmake -C "$KSRC" O="$KBUILD" M="$AIODMA_ROOT/guest-driver/module" MO="$out" modules \
            > "$out/build.log" 2>&1 || { cat "$out/build.log" >&2; rm -f "$out/aiodma.ko"; die "module build failed"; }
        step_done "module$(suffix)" built "$start"
    fi
    link_out "aiodma$(suffix).ko" "$out/aiodma.ko"
    MODULE=$out/aiodma.ko
}

build_tools() {
    local start
    start=$(now_ns)
    # cargo's own incremental build decides what to rebuild; static musl binaries run in the guest.
    (cd "$AIODMA_ROOT" && cargo build --quiet --release --locked --target "$GUEST_TARGET" \
        -p aiodma-guest-tools) || die "guest tools build failed"
    TOOLS_DIR="$AIODMA_ROOT/target/$GUEST_TARGET/release"
    step_done tools cargo "$start"
}

# The base initramfs: busybox, /init, the guest tools, the module. Small on purpose: under
# emulation every megabyte costs boot time. It also carries /l1init, the entry of the same image
# in its emulated-host role (level 1).
build_initramfs() {
    [ -n "${MODULE:-}" ] || build_module
    [ -n "${TOOLS_DIR:-}" ] || build_tools
    local start key out busybox tool
    start=$(now_ns)
    busybox=$(command -v busybox)
    local inputs=("$busybox" "$IMAGES/init" "$IMAGES/l1init" "$IMAGES/demo" "$IMAGES/checked" "$MODULE")
    for tool in "${GUEST_TOOLS[@]}"; do inputs+=("$TOOLS_DIR/$tool"); done
    # The debug kernel's misbehaving test modules (kernel-debug.config), which the tests load to
    # prove that aiodma-checked's gates fail a run: a kmemleak report, a UBSAN report, KASAN
    # reports (KASAN's KUnit suite, with KUnit itself as a module, which must load first).
    local extra_modules=() option ko
    for option in SAMPLE_KMEMLEAK:samples/kmemleak/kmemleak-test.ko TEST_UBSAN:lib/test_ubsan.ko \
        KUNIT:lib/kunit/kunit.ko KASAN_KUNIT_TEST:mm/kasan/kasan_test.ko; do
        ko=$KBUILD/${option#*:}
        grep -qx "CONFIG_${option%%:*}=m" "$KBUILD/.config" || continue
        [ -f "$ko" ] || die "missing $ko (CONFIG_${option%%:*}=m)"
        extra_modules+=("$ko")
    done
    inputs+=("${extra_modules[@]}")
    key=$(hash_inputs "${inputs[@]}" "$(basename "$(dirname "$MODULE")")" "${GUEST_TOOLS[*]}")
    out="$AIODMA_CACHE/initramfs/$key"
    if [ -f "$out/initramfs.cpio.gz" ]; then
        step_done "initramfs$(suffix)" cached "$start"
    else
        local stage
        stage=$(mktemp -d)
        mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,mnt,lib/modules,etc,root}
        install -m 0755 "$busybox" "$stage/bin/busybox"
        local applet
        for applet in $("$busybox" --list); do
            [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
        done
        install -m 0755 "$IMAGES/init" "$stage/init"
        install -m 0755 "$IMAGES/l1init" "$stage/l1init"
        install -m 0755 "$IMAGES/demo" "$stage/bin/aiodma-demo"
        install -m 0755 "$IMAGES/checked" "$stage/bin/aiodma-checked"
        install -m 0644 "$MODULE" "$stage/lib/modules/aiodma.ko"
        local extra
        for extra in "${extra_modules[@]}"; do install -m 0644 "$extra" "$stage/lib/modules/"; done
        for tool in "${GUEST_TOOLS[@]}"; do install -m 0755 "$TOOLS_DIR/$tool" "$stage/bin/$tool"; done
        echo 'root:x:0:0:root:/root:/bin/sh' > "$stage/etc/passwd"
        mkdir -p "$out"
        (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
            | gzip -9n > "$out/initramfs.cpio.gz.tmp"
        (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort) > "$out/contents.txt"
        rm -rf "$stage"
        mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
        step_done "initramfs$(suffix)" built "$start"
    fi
    link_out "initramfs$(suffix).cpio.gz" "$out/initramfs.cpio.gz"
}

# fio for the guest, built from source as one static binary without the optional engines
# (rdma, rbd, gluster, nfs, pmem, xnvme, …; psync, libaio and io_uring are what the jobs use),
# plus the job files: a small layer, appended to the initramfs only when needed (Linux unpacks
# concatenated cpio archives). Debian's fio is dynamically linked against 60 libraries (33 MB).
FIO_CONFIGURE=(--build-static --disable-native --disable-numa --disable-rdma --disable-rados
    --disable-rbd --disable-http --disable-gfapi --disable-libnfs --disable-pmem --disable-xnvme
    --disable-libzbc --disable-tcmalloc --disable-dfs --disable-shm)
build_fio_layer() {
    local start src key out
    start=$(now_ns)
    src=$(bash "$IMAGES/fio-src.sh")
    key=$(hash_inputs "$(basename "$src")" "${FIO_CONFIGURE[*]}" "$(gcc -dumpfullversion)" \
        /usr/lib/x86_64-linux-gnu/libaio.a /usr/lib/x86_64-linux-gnu/libz.a \
        /usr/lib/x86_64-linux-gnu/libc.a "$IMAGES/fio")
    out="$AIODMA_CACHE/fio/$key"
    if [ -f "$out/fio.cpio.gz" ]; then
        step_done fio-layer cached "$start"
    else
        local build stage logf
        build=$(mktemp -d "$AIODMA_CACHE/fio-build.XXXXXX")
        logf="$build.log"
        # fio builds in its source directory: build in a copy.
        cp -a "$src/." "$build/"
        (cd "$build" && ./configure "${FIO_CONFIGURE[@]}" && make -j"$JOBS" fio) > "$logf" 2>&1 \
            || { tail -n 30 "$logf" >&2; die "fio build failed (log: $logf)"; }
        ldd "$build/fio" > /dev/null 2>&1 && die "fio was linked dynamically (log: $logf)"
        stage=$(mktemp -d)
        mkdir -p "$stage/usr/bin" "$stage/etc/fio"
        install -m 0755 -s "$build/fio" "$stage/usr/bin/fio"
        cp "$IMAGES"/fio/*.fio "$stage/etc/fio/"
        mkdir -p "$out"
        (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
            | gzip -6n > "$out/fio.cpio.gz.tmp"
        (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort) > "$out/contents.txt"
        rm -rf "$stage" "$build" "$logf"
        mv "$out/fio.cpio.gz.tmp" "$out/fio.cpio.gz"
        step_done fio-layer built "$start"
    fi
    link_out fio.cpio.gz "$out/fio.cpio.gz"
}

# The kernel's own gates on the module, as the kernel applies them to its in-tree Rust:
#  - `make rustfmtcheck` is `rustfmt --check` over every .rs file with the tree's .rustfmt.toml,
#    found by rustfmt next to the files; the module lives outside the tree (where rustfmt would
#    find this workspace's rustfmt.toml instead), so the kernel's file is passed explicitly. The
#    rustfmt is the one on PATH, the same `RUSTFMT = rustfmt` the kernel's Makefile uses.
#  - `make CLIPPY=1` compiles the Rust with clippy-driver instead of rustc, with the kernel's
#    lint set (its .clippy.toml through CLIPPY_CONF_DIR); the module's Kbuild adds -Dwarnings,
#    so every finding fails the build. Against the test kernel's build, into a scratch MO=
#    directory: the module cache is not touched.
# A clean result is remembered by a hash of its inputs, so a second `make lint` skips both.
lint_module() {
    [ -n "${KBUILD:-}" ] || build_kernel
    local start mod key out rs_status=0 clippy_status=0
    start=$(now_ns)
    mod="$AIODMA_ROOT/guest-driver/module"
    key=$(hash_inputs "$(basename "$KBUILD")" "$mod" "$AIODMA_ROOT/device/src/abi.rs" \
        "$KSRC/.rustfmt.toml" "$(rustfmt --version)" "$(clippy-driver --version)")
    out="$AIODMA_CACHE/lint/$key"
    if [ -f "$out/clean" ]; then
        step_done module-lint cached "$start"
        return
    fi
    rm -rf "$out" && mkdir -p "$out/build"
    # The crate root reaches its `mod` files too, so a file's diff can come twice: print each
    # "Diff in FILE:LINE:" block once.
    (cd "$mod" && rustfmt --check --color never --config-path "$KSRC/.rustfmt.toml" ./*.rs) > "$out/rustfmt.log" 2>&1 \
        || rs_status=$?
    if [ "$rs_status" -ne 0 ]; then
        awk 'BEGIN { keep = 1 } /^Diff in / { keep = !seen[$0]++ } keep' "$out/rustfmt.log" >&2
        log "module rustfmt: these files differ from the kernel's rustfmt style (run rustfmt --config-path $KSRC/.rustfmt.toml on them):"
        grep '^Diff in ' "$out/rustfmt.log" | sed -E 's/^Diff in (.*):[0-9]+:$/    \1/' | sort -u >&2 || true
    fi
    make -C "$KSRC" O="$KBUILD" M="$mod" MO="$out/build" CLIPPY=1 modules > "$out/clippy.log" 2>&1 \
        || clippy_status=$?
    if [ "$clippy_status" -ne 0 ]; then
        cat "$out/clippy.log" >&2
        log "module clippy (CLIPPY=1 build, -Dwarnings): $(grep -E '^(error|warning)(\[|:)' "$out/clippy.log" | grep -vc 'aborting due to') diagnostics above (log: $out/clippy.log)"
    fi
    if [ "$rs_status" -ne 0 ] || [ "$clippy_status" -ne 0 ]; then
        die "module lint failed (rustfmt: $([ "$rs_status" -eq 0 ] && echo clean || echo differs), clippy: $([ "$clippy_status" -eq 0 ] && echo clean || echo findings))"
    fi
    rm -rf "$out/build"
    touch "$out/clean"
    step_done module-lint clean "$start"
}

what=${1:-all}
case "$what" in
    all)
        build_kernel; build_module; build_tools; build_initramfs; build_fio_layer
        (VARIANT=debug; build_kernel; build_module; build_initramfs)
        ;;
    debug) build_tools; VARIANT=debug; build_kernel; build_module; build_initramfs ;;
    kernel) build_kernel ;;
    module) build_module ;;
    tools) build_tools ;;
    initramfs) build_initramfs ;;
    fio) build_fio_layer ;;
    lint) lint_module ;;
    *) echo "usage: $0 [all|kernel|module|tools|initramfs|fio|debug|lint]" >&2; exit 2 ;;
esac
