#!/usr/bin/env bash
# The async-vs-sync table of `make bench`: one boot per fault setting, with the fio layer. In
# each, `aiodma-aio bench-suite` measures 4 KiB randread and randwrite on /dev/aiodma0 with sync
# at QD1 and libaio and io_uring at QD1/8/32, with its own engines and with fio; this script
# prints the rows of every boot as one table, then the QD32-over-QD1 speed-ups.
#
#   images/bench-aio.sh                      (after `make image vmm`)
#   BENCH_TIME=5 images/bench-aio.sh         seconds per point (default 2; 28 points per boot)
#   BENCH_FAULTS='none delay:min=1ms,max=1ms,every=1' images/bench-aio.sh
#                                            fault settings, one boot each ("none": no fault)
set -euo pipefail
cd "$(dirname "$0")/.."

aiodma=${AIODMA:-target/release/aiodma}
time=${BENCH_TIME:-2}
# A stuck guest ends its boot after this many seconds instead of holding the table forever.
limit=${BENCH_TIMEOUT:-1800}
read -r -a faults <<< "${BENCH_FAULTS:-none delay:min=100us,max=100us,every=1}"
for f in "$aiodma" images/out/fio.cpio.gz; do
    [ -e "$f" ] || { echo "[bench] $f is missing: run 'make image vmm' first" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The first column: "none", or the fault's kind and its min= ("delay-100us").
label_of() {
    local spec=$1 min=
    [ "$spec" = none ] && { echo none; return; }
    case "$spec" in *min=*) min=${spec#*min=}; min=-${min%%,*} ;; esac
    echo "${spec%%:*}$min"
}

n=0
for fault in "${faults[@]}"; do
    label=$(label_of "$fault")
    flags=(--timeout "$limit" --initrd images/out/fio.cpio.gz)
    [ "$fault" = none ] || flags+=(--fault "$fault")
    echo "[bench] async vs sync, fault '$fault': 28 points of ${time} s in one boot" >&2
    if ! "$aiodma" run "${flags[@]}" -- aiodma-aio bench-suite --time "$time" --label "$label" \
            > "$work/$n.out" 2> "$work/$n.err"; then
        cat "$work/$n.err" "$work/$n.out" >&2
        echo "[bench] fault '$fault': the guest run failed" >&2
        exit 1
    fi
    n=$((n + 1))
done

if grep -q 'emulated host' "$work/0.err"; then
    echo "# measured in the emulated host (QEMU TCG + nested KVM): absolute numbers are emulation-bound"
fi
grep -m1 '^fault ' "$work/0.out"
for ((i = 0; i < n; i++)); do grep -v -e '^fault ' -e '^#' -e '^$' "$work/$i.out" || true; done
for ((i = 0; i < n; i++)); do grep '^#' "$work/$i.out" || true; done
