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

# Debian's archive keyring, which every private apt download is verified against.
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Where the machine's apt configuration lives (overridable for tests).
APT_ETC=${AIODMA_APT_ETC:-/etc/apt}

# The URI of this machine's Debian archive: the first source entry whose suite is the release's
# own codename (not -security/-updates), from deb822 .sources files or one-line sources.list.
debian_mirror() {
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || return 1
    local f
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk -v cn="$codename" '
            BEGIN { RS=""; FS="\n" }
            {
                uris=""; suites=""; types=""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)   { sub(/^URIs:[ \t]*/, "", $i); uris=$i }
                    if ($i ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", $i); suites=" " $i " " }
                    if ($i ~ /^Types:/)  { types=$i }
                }
                if (types ~ /deb( |$)/ && suites ~ (" " cn " ")) { split(uris, u, " "); print u[1]; exit }
            }' "$f"
    done
    for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk -v cn="$codename" '$1 == "deb" {
            i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i+1) == cn) { print $i; exit } }' "$f"
    done
}

# private_apt DIR TYPE MIRROR SUITE: an apt configuration of its own under DIR (one source
# entry: TYPE deb or deb-src, MIRROR, SUITE, main, Debian's keyring), in the array apt_opts. The
# system's apt configuration is never read for sources nor modified.
private_apt() {
    local dir=$1 type=$2 mirror=$3 suite=$4
    mkdir -p "$dir/sources" "$dir/lists/partial" "$dir/archives/partial"
    rm -f "$dir"/sources/*.sources
    cat > "$dir/sources/aiodma.sources" <<SRC
Types: $type
URIs: $mirror
Suites: $suite
Components: main
Signed-By: $KEYRING
SRC
    apt_opts=(
        -o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$dir/sources"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache::archives=$dir/archives"
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Get::List-Cleanup=0"
        -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
    )
}
