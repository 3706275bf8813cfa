# Shared helpers for the image scripts: step timing, logging, hashing.
# Sourced, never executed.

AIODMA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AIODMA_CACHE=${AIODMA_CACHE:-$HOME/.cache/aiodma}
export AIODMA_ROOT AIODMA_CACHE

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }
# bad_input: the user (environment, machine set-up) must fix something; exit 2 like bad flags.
bad_input() { printf '[images] error: %s\n' "$*" >&2; exit 2; }

# step NAME STATUS START_EPOCH_NS: one progress line per build step.
step_done() {
    local name=$1 status=$2 start=$3
    local now ms
    now=$(date +%s%N)
    ms=$(( (now - start) / 1000000 ))
    printf '[images] %-12s %-8s %d.%03d s\n' "$name" "$status" $((ms / 1000)) $((ms % 1000)) >&2
}

now_ns() { date +%s%N; }

# hash_inputs: sha256 over the given strings and files (path and content), first 16 hex digits.
# Directories are walked in sorted order so the key is stable across clones.
hash_inputs() {
    local item
    {
        for item in "$@"; do
            if [ -d "$item" ]; then
                (cd "$item" && find . -type f ! -path './target/*' ! -name '*.o' ! -name '*.ko' \
                    ! -name '*.cmd' ! -name '*.mod*' ! -name 'Module.symvers' ! -name 'modules.order' \
                    -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
            elif [ -f "$item" ]; then
                printf 'file %s\n' "$(basename "$item")"
                sha256sum < "$item"
            else
                printf 'str %s\n' "$item"
            fi
        done
    } | sha256sum | cut -c1-16
}

# link_out NAME TARGET: publish a cached artifact at images/out/NAME.
link_out() {
    mkdir -p "$AIODMA_ROOT/images/out"
    ln -sfn "$2" "$AIODMA_ROOT/images/out/$1"
}
