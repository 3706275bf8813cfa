#!/usr/bin/env bash
# The soak campaign (`make soak`): one boot of the test guest with 2 vCPUs and 2 queues under a
# mixed fault plan, running `aiodma-aio soak` (guest-driver/tools/src/soak.rs) under
# /bin/aiodma-checked; then the soak's summary, the faults the device injected by kind (from
# --metrics) and how to replay the run. Exit status: the guest's (0 passed; 1 the soak found a
# lost, duplicated, stale or corrupt result or a hang; 99 a kernel splat; 124 out of time).
#
#   images/soak.sh                               (after `make image vmm`)
#   SOAK_REQUESTS=100000 SOAK_SEED=7 images/soak.sh
#   SOAK_DEBUG=1 images/soak.sh                  the debug kernel (KASAN, lockdep, ...), 512 MiB
#   SOAK_FAULTS='error:p=0.01 drop:p=0.001' ...  another plan (space-separated --fault rules)
#   SOAK_REPLAY=DIR/faults.jsonl ...             replay a run's fault log instead of the plan
#
# Other knobs: SOAK_DRIVER_TIMEOUT_MS (aiodma.timeout_ms, default 1000: requests the device
# never completes fail and reset it after that long), SOAK_TIMEOUT (the VM's limit in seconds;
# default from the request count), SOAK_ARGS (more `aiodma-aio soak` options, e.g. '--procs 3'),
# SOAK_CTL_EVERY (mean seconds between events made through the runtime-control socket: a
# reset, a hang, a drop or a used-id; default 30; 0 for none), SOAK_DIR (where the logs go; default target/soak/SEED).
set -euo pipefail
cd "$(dirname "$0")/.."

aiodma=${AIODMA:-target/release/aiodma}
requests=${SOAK_REQUESTS:-1000000}
seed=${SOAK_SEED:-$(date +%s)}
timeout_ms=${SOAK_DRIVER_TIMEOUT_MS:-1000}
ctl_every=${SOAK_CTL_EVERY:-30}
dir=${SOAK_DIR:-target/soak/$seed${SOAK_REPLAY:+-replay}}
for v in requests seed timeout_ms ctl_every; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "[soak] SOAK_${v^^} must be a number, not '${!v}'" >&2; exit 2; }
done

# The fault plan: every kind a correct driver must survive without losing data. Probabilities
# are per device request. `hang` and the counters of every rule restart with each device
# lifetime (a reset), so `hang:after=` fires only in a lifetime that lasts that long. Rules with
# op= draw from the injector's random stream only for their op, so the workload's mix of reads
# and writes moves the stream and the lifetimes differ from each other.
# Not `corrupt`: nothing can detect it until the driver checks the device's CRCs (README, Soak).
default_faults=(
    'delay:p=0.01,min=20us,max=2ms'
    'error:p=0.001,op=read'
    'error:p=0.001,op=write'
    'error:p=0.002,op=flush'
    'status:p=0.001,code=9,op=write'
    'short:p=0.002,len=1000,op=read'
    'irq-lost:p=0.001,op=read'
    'irq-spurious:p=0.001'
    'used-dup:p=0.0005'
    'used-len:p=0.0005'
    'used-id:p=0.0001'
    'drop:p=0.0001'
    'reset:p=0.0002'
    'hang:after=3000'
)
if [ -n "${SOAK_FAULTS:-}" ]; then
    read -r -a faults <<< "$SOAK_FAULTS"
else
    faults=("${default_faults[@]}")
fi

# The run's files are pinned to what images/out points at now, so a rebuild while the soak runs
# (other work in the same tree) does not change what it tests.
if [ "${SOAK_DEBUG:-0}" = 1 ]; then
    kernel=images/out/bzImage-debug initrd=images/out/initramfs-debug.cpio.gz memory=512 label=debug
else
    kernel=images/out/bzImage initrd=images/out/initramfs.cpio.gz memory=256 label=test
fi
for f in "$aiodma" "$kernel" "$initrd"; do
    [ -e "$f" ] || { echo "[soak] $f is missing: run 'make image vmm' first" >&2; exit 2; }
done
kernel=$(readlink -f "$kernel")
initrd=$(readlink -f "$initrd")
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -n "${SOAK_REPLAY:-}" ]; then
    # A copy: the log being replayed may be the one this run is about to write.
    cp "$SOAK_REPLAY" "$dir/replayed.jsonl.new" && mv "$dir/replayed.jsonl.new" "$dir/replayed.jsonl"
fi
rm -f "$dir/faults.jsonl" "$dir/metrics.json" "$dir/console.log" "$dir/ctl.log"

# Time: boot, the workload at a pessimistic 100 requests/s, the drain and the checks. The guest
# stops starting new work well before the VM's limit, so a slow run still ends with a summary.
limit=${SOAK_TIMEOUT:-$(( requests / 100 + 900 ))}
guest_secs=$(( limit > 600 ? limit - 300 : limit / 2 ))

fault_args=()
if [ -n "${SOAK_REPLAY:-}" ]; then
    fault_args=(--fault-replay "$dir/replayed.jsonl")
    plan="replay of $SOAK_REPLAY"
else
    for f in "${faults[@]}"; do fault_args+=(--fault "$f"); done
    plan="${faults[*]}"
fi

# Runtime control, when this aiodma has it: resets and hangs requested from outside the fault
# plan at seeded random moments, each on its own (the driver must recover every time).
sock=
# (Not when replaying: the log already holds the faults that fired, the injected ones included.)
if [ "$ctl_every" -gt 0 ] && [ -z "${SOAK_REPLAY:-}" ] \
    && "$aiodma" run --help 2>/dev/null | grep -q -- '--api-sock'; then
    sock=$dir/api.sock
fi

guest=(/bin/aiodma-checked aiodma-aio soak --seed "$seed" --requests "$requests"
       --seconds "$guest_secs")
if [ -n "${SOAK_ARGS:-}" ]; then
    read -r -a extra <<< "$SOAK_ARGS"
    guest+=("${extra[@]}")
fi
cmd=("$aiodma" run --cpus 2 --queues 2 --memory "$memory" --kernel "$kernel"
     --base-initrd "$initrd" --timeout "$limit" --append "aiodma.timeout_ms=$timeout_ms"
     --fault-seed "$seed" "${fault_args[@]}" --fault-log "$dir/faults.jsonl"
     --metrics "$dir/metrics.json")
[ -n "$sock" ] && cmd+=(--api-sock "$sock")
cmd+=(-- "${guest[@]}")

echo "[soak] seed $seed, $requests requests, $label kernel, driver timeout ${timeout_ms} ms, VM limit ${limit} s"
echo "[soak] faults: $plan"
echo "[soak] logs: $dir (console.log, aiodma.log, faults.jsonl, metrics.json${sock:+, ctl.log})"

# The injector: waits for the soak to start in the guest, then every SOAK_CTL_EVERY seconds
# on average (seeded, so a run's schedule is the same for its seed) makes one event: a reset or a
# hang requested directly, or a `drop` or `used-id` through a rule added for a moment (p=1,
# times=1: the next request). These do not depend on the plan's random stream, which
# restarts at every device reset, so with resets every few hundred requests its rarest kinds fire
# in every lifetime or in none, by seed. The injector asks nothing before the soak started: in
# the emulated host a request that times out while level 1 still boots leaves the relay without
# its link for the rest of the run (every request then gets 503).
inject() {
    RANDOM=$(( seed % 32768 ))
    ctl() { "$aiodma" ctl --sock "$sock" --timeout 10 "$@" 2>> "$dir/ctl.log"; }
    until grep -q '^soak: seed' "$dir/console.log" 2> /dev/null; do
        sleep 1
    done
    while sleep $(( ctl_every / 2 + RANDOM % (ctl_every + 1) )); do
        kinds=(reset hang drop used-id)
        what=${kinds[RANDOM % 4]}
        case $what in
            reset | hang) ctl "$what" > /dev/null || break ;;
            *)
                added=$(ctl fault add "$what:p=1,times=1") || break
                index=${added//[^0-9]/}
                # A drop holds its lifetime until the driver's timeout, so half a second gives
                # one; a used-id lie is caught and reset at once, and each new lifetime fires
                # the rule again: it goes right away.
                [ "$what" = drop ] && sleep 0.5
                ctl fault rm "$index" > /dev/null || break
                ;;
        esac
        echo "$(date +%T) $what" >> "$dir/ctl.log"
    done
}

# One boot; its status in $rc.
boot() {
    local ctl_pid=
    rm -f "$dir/console.log" "$dir/aiodma.log" "$dir/faults.jsonl" "$dir/metrics.json"
    if [ -n "$sock" ]; then
        inject &
        ctl_pid=$!
    fi
    rc=0
    "${cmd[@]}" 2> >(grep -v 'seccomp: .* filter on thread' | tee "$dir/aiodma.log" >&2) \
        | tee "$dir/console.log" | grep --line-buffered -E '^soak: |aiodma-checked' \
        || rc=${PIPESTATUS[0]}
    if [ -n "$ctl_pid" ]; then
        kill "$ctl_pid" 2> /dev/null || true
        wait "$ctl_pid" 2> /dev/null || true
    fi
}

start=$(date +%s)
boot
# A run the emulator broke (level 1 hung or triple-faulted: exit 124 or 3 with aiodma's verdict
# on the emulated host) runs once more, as the test harness does: that is not what is measured.
if { [ "$rc" = 124 ] || [ "$rc" = 3 ]; } && grep -qE \
    'emulated host did not finish within|emulated host stopped without an exit status' \
    "$dir/aiodma.log"; then
    echo "[soak] the emulated host failed (exit $rc: $(grep -m1 -E 'emulated host (did not|stopped)' "$dir/aiodma.log")); once more"
    echo "$(date +%T) --- the emulated host failed; second boot" >> "$dir/ctl.log"
    boot
fi
secs=$(( $(date +%s) - start ))

# Faults by kind, from the device's metrics (the pretty-printed "faults" object).
fired=
if [ -s "$dir/metrics.json" ]; then
    fired=$(awk '/"faults": \{/ { on = 1; next } on && /\}/ { exit }
                 on { gsub(/[",]/, ""); sub(/: /, "="); gsub(/ /, ""); if ($0 !~ /=0$/) printf "%s ", $0 }' \
            "$dir/metrics.json")
    resets=$(awk '/"resets":/ { gsub(/[^0-9]/, ""); print; exit }' "$dir/metrics.json")
fi
ctl_count=0
ctl_kinds=
if [ -f "$dir/ctl.log" ]; then
    ctl_count=$(grep -cE '^[0-9:]+ (reset|hang|drop|used-id)$' "$dir/ctl.log" || true)
    ctl_kinds=$(awk '/^[0-9:]+ (reset|hang|drop|used-id)$/ { n[$2]++ }
                     END { for (k in n) printf " %s=%d", k, n[k] }' "$dir/ctl.log")
fi

echo "[soak] ---"
grep -E '^soak: [0-9]+ requests' "$dir/console.log" | tail -1 | sed 's/^/[soak] /' \
    || echo "[soak] no summary line from the guest (see $dir/console.log)"
echo "[soak] faults injected: ${fired:-none recorded}(device resets: ${resets:-?}; made through the socket: $ctl_count${ctl_kinds:+:$ctl_kinds})"
echo "[soak] $secs s, guest exit status $rc"
echo "[soak] fault log: $dir/faults.jsonl; replay: SOAK_SEED=$seed SOAK_REQUESTS=$requests${SOAK_DEBUG:+ SOAK_DEBUG=$SOAK_DEBUG} SOAK_REPLAY=$dir/faults.jsonl images/soak.sh"
if [ "$rc" = 0 ]; then
    echo "[soak] PASSED"
else
    echo "[soak] FAILED (seed $seed)"
fi
exit "$rc"
