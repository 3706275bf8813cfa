#!/usr/bin/env bash
# The async-vs-sync table of `make bench`: one boot per fault setting, with the fio layer. In
# each, `aiodma-aio bench-suite` measures 4 KiB randread and randwrite on /dev/aiodma0 with sync
# at QD1 and libaio and io_uring at QD1/8/32, with its own engines and with fio; this script
# prints the rows of every boot as one table, then the QD32-over-QD1 speed-ups.
#
# The peer: for each fault setting, one more boot of the same kernel and initramfs runs the same
# suite on QEMU's virtio-blk (`aiodma bench peer`: microvm on the same KVM, a null-co disk whose
# per-request latency mirrors the delay fault), labelled vblk-*; the last lines compare the two.
# BENCH_PEER=0 skips it.
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

# The peer's per-request latency in microseconds: a delay fault's min= ("100us", "1ms"), else 0.
peer_latency_us() {
    local spec=$1 min
    case "$spec" in delay:*min=*) ;; *) echo 0; return ;; esac
    min=${spec#*min=}; min=${min%%,*}
    case "$min" in
        *us) echo "${min%us}" ;;
        *ms) echo $(( ${min%ms} * 1000 )) ;;
        *s) echo $(( ${min%s} * 1000000 )) ;;
        *ns) echo $(( ${min%ns} / 1000 )) ;;
        *) echo "$min" ;;
    esac
}
peer=${BENCH_PEER:-1}

# Run one boot ("$@"), its stdout to $out and stderr to $err; a boot that the emulated host
# broke (level 1 hung or died, or the peer's QEMU stopped on the emulator's stale EXITINTINFO:
# exit 124/3 with aiodma's verdict) runs once more, as the test harness does: that is the
# emulator failing, not what is measured.
boot() {
    local out=$1 err=$2 rc=0
    shift 2
    "$@" > "$out" 2> "$err" || rc=$?
    if { [ "$rc" = 3 ] && grep -q -e 'emulated host stopped without an exit status' \
            -e 'QEMU stopped its guest on a KVM internal error' "$err"; } ||
       { [ "$rc" = 124 ] && grep -q 'the emulated host did not finish within' "$err"; }; then
        echo "[bench] $(grep -m1 -o 'error: .*' "$err"); once more" >&2
        rc=0
        "$@" > "$out" 2> "$err" || rc=$?
    fi
    return "$rc"
}

n=0
pairs=()
labels=()
for fault in "${faults[@]}"; do
    label=$(label_of "$fault")
    flags=(--timeout "$limit" --initrd images/out/fio.cpio.gz)
    [ "$fault" = none ] || flags+=(--fault "$fault")
    echo "[bench] async vs sync, fault '$fault': 28 points of ${time} s in one boot" >&2
    if ! boot "$work/$n.out" "$work/$n.err" \
            "$aiodma" run "${flags[@]}" -- aiodma-aio bench-suite --time "$time" --label "$label"; then
        cat "$work/$n.err" "$work/$n.out" >&2
        echo "[bench] fault '$fault': the guest run failed" >&2
        exit 1
    fi
    labels[n]=$label
    n=$((n + 1))
    [ "$peer" = 1 ] || continue
    lat=$(peer_latency_us "$fault")
    plabel=vblk-${label#delay-}
    echo "[bench] peer: QEMU virtio-blk, ${lat} us per request, same suite" >&2
    if ! boot "$work/$n.out" "$work/$n.err" \
            "$aiodma" bench peer --timeout "$limit" --latency-us "$lat" --initrd images/out/fio.cpio.gz \
            -- aiodma-aio bench-suite --dev /dev/vda --time "$time" --label "$plabel" --no-header; then
        cat "$work/$n.err" "$work/$n.out" >&2
        echo "[bench] peer for fault '$fault': the guest run failed" >&2
        exit 1
    fi
    pairs+=("$label $plabel")
    labels[n]=$plabel
    n=$((n + 1))
done

if grep -q 'emulated host' "$work/0.err"; then
    echo "# measured in the emulated host (QEMU TCG + nested KVM): absolute numbers are emulation-bound"
fi
if [ "$peer" = 1 ]; then
    echo "# vblk-*: the peer, QEMU virtio-blk (null-co disk, the delay as its latency-ns) on the same guest kernel and KVM"
fi
grep -m1 '^fault ' "$work/0.out"
# Only the rows (first field: the boot's label), not whatever else the console printed.
for ((i = 0; i < n; i++)); do grep "^${labels[$i]} " "$work/$i.out" || true; done > "$work/rows"
cat "$work/rows"
for ((i = 0; i < n; i++)); do grep '^#' "$work/$i.out" || true; done

# aiodma next to the peer, same points: IOPS ratios (above 1: aiodma is faster).
for pair in "${pairs[@]}"; do
    read -r ours theirs <<< "$pair"
    awk -v a="$ours" -v b="$theirs" '
        $1 == a || $1 == b { iops[$1 " " $2 " " $3 " " $5 " " $6] = $7 }
        END {
            split("aiodma-aio fio", tools, " ")
            split("randread randwrite", rws, " ")
            for (t = 1; t <= 2; t++) for (r = 1; r <= 2; r++) {
                sync = tools[t] == "fio" ? "psync" : "sync"
                line = ""
                split(sync " libaio uring", engines, " ")
                for (e = 1; e <= 3; e++) {
                    qd = e == 1 ? 1 : 32
                    k = tools[t] " " engines[e] " " qd " " rws[r]
                    if ((a " " k) in iops && (b " " k) in iops && iops[b " " k] > 0)
                        line = line sprintf("%s%s QD%d %.2fx", line == "" ? "" : ", ",
                                            engines[e], qd, iops[a " " k] / iops[b " " k])
                }
                if (line != "")
                    printf "# %s vs %s (aiodma / QEMU virtio-blk IOPS) %s %s: %s\n",
                           a, b, tools[t], rws[r], line
            }
        }' "$work/rows"
done
