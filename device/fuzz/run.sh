#!/usr/bin/env bash
# `make fuzz`: run every cargo-fuzz target of the device for its share of a time budget, merge
# what it found into the corpus kept in the repository, and report executions and coverage.
#
#   bash device/fuzz/run.sh [SECONDS]        (default: $FUZZ_TIME, else 600)
#
# Environment: FUZZ_TARGETS (default "parse device"), FUZZ_JOBS (libFuzzer processes per
# target, default 1: the machines are shared), FUZZ_KEEP_LOGS=1 keeps the libFuzzer logs in
# device/fuzz/target/fuzz-work/.
#
# Installs what it needs: a nightly toolchain (cargo-fuzz builds with -Zsanitizer=address and
# SanitizerCoverage) and cargo-fuzz. The corpus (device/fuzz/corpus/<target>/) is minimized with
# `cargo fuzz cmin` after each run, so it stays small; it replays on stable in
# `cargo test -p aiodma-device` (fuzz::tests::corpus_replays). A crash leaves its input in
# device/fuzz/artifacts/<target>/ and libFuzzer starts again for the rest of the target's time
# (at most 50 times), so one finding does not end the campaign; the summary lists each distinct
# finding once, and the script exits non-zero. The `device` target passes over findings already
# reported (fuzz::OPEN_FINDINGS; AIODMA_FUZZ_STRICT=1 stops on them). Corpus inputs that fail when
# replayed on stable
# are moved to device/fuzz/crashes/<target>/ (reproducers), so the corpus keeps passing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
device=$(dirname "$here")
total=${1:-${FUZZ_TIME:-600}}
read -r -a targets <<<"${FUZZ_TARGETS:-parse device}"
jobs=${FUZZ_JOBS:-1}
export PATH="$HOME/.cargo/bin:$PATH"

if ! [[ "$total" =~ ^[0-9]+$ ]] || ((total < ${#targets[@]})); then
	echo "fuzz: time budget '$total' is not a number of seconds (at least one per target)" >&2
	exit 2
fi

# Share of the budget per target: the device target is slow per execution and has far more
# state to explore, so it gets three shares to the parser's one.
share() {
	case "$1" in
	device) echo 3 ;;
	*) echo 1 ;;
	esac
}
# Inputs longer than this add nothing: a device program is at most 160 operations, the parser
# reads a header and 16 KiB of guest memory.
max_len() {
	case "$1" in
	device) echo 4096 ;;
	*) echo 16400 ;;
	esac
}

if ! rustup toolchain list | grep -q '^nightly'; then
	echo "fuzz: installing the nightly toolchain (minimal profile)"
	rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz"
	cargo install --locked cargo-fuzz
fi

work="$here/target/fuzz-work"
mkdir -p "$work"
cd "$device"

shares=0
for t in "${targets[@]}"; do shares=$((shares + $(share "$t"))); done

declare -A summary
crashed=()
for t in "${targets[@]}"; do
	secs=$((total * $(share "$t") / shares))
	((secs > 0)) || secs=1
	corpus="$here/corpus/$t"
	new="$work/$t/new"
	log="$work/$t/run.log"
	rm -rf "${work:?}/$t"
	mkdir -p "$corpus" "$new"
	seeds=()
	if [[ "$t" == device ]]; then
		# Structured programs (bring-up, requests, resets) give the fuzzer a head start.
		cargo run --quiet --release --manifest-path "$here/Cargo.toml" --bin seed -- "$work/$t/seeds" 64 >/dev/null
		seeds=("$work/$t/seeds")
	fi
	echo "fuzz: $t for ${secs}s (corpus: $(find "$corpus" -type f | wc -l) inputs)"
	cargo +nightly fuzz build "$t"
	start=$(date +%s)
	deadline=$((start + secs))
	args=(-print_final_stats=1 -timeout=20 -rss_limit_mb=4096 -max_len="$(max_len "$t")")
	# The device target keeps devices (and their threads) from one input to the next; LeakSanitizer
	# then reported the event-loop buffers of those live threads as leaked (never when the input
	# runs alone), so leak checks are off for it. ASan's other checks stay on.
	[[ "$t" == device ]] && args+=(-detect_leaks=0)
	# libFuzzer's -jobs mode forks workers that log to fuzz-N.log in the current directory.
	((jobs > 1)) && args+=(-jobs="$jobs" -workers="$jobs")
	execs=0
	runs=0
	: >"$log"
	while left=$((deadline - $(date +%s))) && ((left >= 5 && runs < 50)); do
		runs=$((runs + 1))
		status=0
		# The new inputs go to $new; the kept corpus and the seeds are read only.
		cargo +nightly fuzz run "$t" "$new" "$corpus" "${seeds[@]}" -- "${args[@]}" \
			-max_total_time="$left" >"$log.$runs" 2>&1 || status=$?
		if ((jobs > 1)); then
			cat fuzz-*.log >>"$log.$runs" 2>/dev/null || true
			rm -f fuzz-*.log
		fi
		# Executions: the final statistics, or (after a crash, which prints none) the last
		# status line's counter.
		n=$(awk '/stat::number_of_executed_units/ {n += $2} END {print n + 0}' "$log.$runs")
		((n > 0)) || n=$(grep -Eo '^#[0-9]+' "$log.$runs" | tail -1 | tr -d '#' || true)
		execs=$((execs + ${n:-0}))
		cat "$log.$runs" >>"$log"
		if ((status == 0)); then
			break
		fi
		finding=$(grep -m1 -E 'invariant broken:|ERROR: (AddressSanitizer|LeakSanitizer)|ERROR: libFuzzer: (timeout|out-of-memory)' "$log.$runs" | cut -c1-200 || true)
		if [[ -z "$finding" ]]; then
			finding=$(grep -m1 -A1 'panicked at' "$log.$runs" | tail -1 | cut -c1-200 || true)
		fi
		echo "fuzz: $t run $runs stopped (exit $status): ${finding:-see $log}"
		printf '%s\n' "${finding:-exit $status}" >>"$work/$t/findings"
		grep -h 'Test unit written to' "$log.$runs" >>"$work/$t/findings.files" || true
	done
	wall=$(($(date +%s) - start))
	rate=$((execs / (wall > 0 ? wall : 1)))
	rss=$(awk '/stat::peak_rss_mb/ {if ($2 > n) n = $2} END {print n + 0}' "$log")
	cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
	if [[ -s "$work/$t/findings" ]]; then
		crashed+=("$t")
		echo "fuzz: $t findings (count, first line):"
		sort "$work/$t/findings" | uniq -c | sed 's/^/  /'
		sed 's/^/  /' "$work/$t/findings.files" 2>/dev/null || true
		mkdir -p "$here/artifacts"
		cp "$log" "$here/artifacts/$t.log" 2>/dev/null || true
	fi
	# Merge: the kept corpus plus what this run found, minimized to the inputs that keep the
	# coverage.
	before=$(find "$corpus" -type f | wc -l)
	merged="$work/$t/merged"
	mkdir -p "$merged"
	cp -n "$corpus"/* "$new"/* "$merged"/ 2>/dev/null || true
	cargo +nightly fuzz cmin "$t" "$merged" -- -max_len="$(max_len "$t")" -timeout=20 \
		>"$work/$t/cmin.log" 2>&1 || echo "fuzz: cmin of $t failed (see $work/$t/cmin.log); corpus kept as it was"
	if [[ -n "$(ls -A "$merged")" ]] && grep -q 'MERGE-OUTER: .* new files' "$work/$t/cmin.log"; then
		find "$corpus" -type f -delete
		cp "$merged"/* "$corpus"/
	fi
	# The kept corpus replays in `make test`: inputs that fail on stable (a new finding; three
	# passes, as some depend on timing) go to crashes/<target>/ instead. Inputs that only run
	# into an open finding (fuzz::OPEN_FINDINGS, reported already) stay.
	cargo build --quiet --release --manifest-path "$here/Cargo.toml" --bin replay
	: >"$work/$t/replay.err"
	for _ in 1 2 3; do
		"$here/target/release/replay" "$t" "$corpus" 2>>"$work/$t/replay.err" >/dev/null || true
	done
	{ grep -o "^$corpus/[^:]*" "$work/$t/replay.err" || true; } | sort -u | while read -r bad; do
		mkdir -p "$here/crashes/$t"
		mv "$bad" "$here/crashes/$t/"
		echo "fuzz: $t: $(basename "$bad") fails on replay; moved to crashes/$t/"
	done
	after=$(find "$corpus" -type f | wc -l)
	size=$(($(du -sb "$corpus" | cut -f1) / 1024))
	summary[$t]=$(printf '%-7s %6ss %11s execs %7s exec/s  %-22s corpus %4s -> %4s inputs (%s KiB)  rss %s MB  runs %s' \
		"$t" "$wall" "$execs" "$rate" "${cov:-cov: ?}" "$before" "$after" "$size" "$rss" "$runs")
done

echo
echo "fuzz summary (coverage: libFuzzer's edges 'cov' and features 'ft' at the end of the run)"
for t in "${targets[@]}"; do echo "  ${summary[$t]}"; done
total_kb=$(($(du -sb "$here/corpus" | cut -f1) / 1024))
echo "  corpus total: ${total_kb} KiB in $here/corpus"
if ((total_kb > 2048)); then
	echo "fuzz: warning: the corpus is over 2 MiB" >&2
fi
[[ "${FUZZ_KEEP_LOGS:-0}" == 1 ]] || find "$work" -name '*.log*' -delete
if ((${#crashed[@]})); then
	echo "fuzz: crashes in: ${crashed[*]} (inputs in $here/artifacts/; replay on stable with" \
		"'cargo run --release --manifest-path device/fuzz/Cargo.toml --bin replay -- TARGET FILE')" >&2
	exit 1
fi
