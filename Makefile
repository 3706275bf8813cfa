# aiodma entry points. Every target does its own set-up (dependencies, kernel source, caches).
#
#   make run      build everything, boot the test guest and run the demo
#   make test     build everything and run every test (what CI runs)
#   make image    kernel + module + tools + initramfs + fio layer (cached in ~/.cache/aiodma)
#   make module   the guest kernel module only (fast)
#   make vmm      the aiodma binary
#   make bench    benchmarks (boot time and memory next to QEMU; async vs sync I/O table)
#   make lint     rustfmt + clippy (workspace), and the kernel's rustfmt + CLIPPY=1 build of the module
#   make fuzz     fuzz the device for FUZZ_TIME seconds (default 600), growing device/fuzz/corpus
#   make soak     the soak campaign: SOAK_REQUESTS checked requests under a mixed fault plan
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
AIODMA := target/release/aiodma
# What `make run` shows inside the guest; override with `make run DEMO='...'`.
DEMO ?= /bin/aiodma-demo

.PHONY: all deps image module vmm run test bench lint clean-cache
all: image vmm

deps:
	@bash images/deps.sh

image: deps
	@bash images/build.sh all

module: deps
	@bash images/build.sh module

vmm: deps
	@$(CARGO) build --release --locked -p aiodma-vmm

run: image vmm
	@$(AIODMA) run -- $(DEMO)

# Benchmarks print tables; numbers measured in the emulated host say so. The async-vs-sync
# table boots once per fault setting: BENCH_TIME (s per point), BENCH_FAULTS (see the script).
bench: image vmm
	@$(AIODMA) bench boot
	@AIODMA=$(AIODMA) bash images/bench-aio.sh

# The module gets the kernel's own gates (images/build.sh lint): rustfmt with the kernel's
# .rustfmt.toml and a CLIPPY=1 build against the test kernel (built first if missing).
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	@bash images/build.sh lint

# Every test binary runs (--no-fail-fast); the last line totals them, e.g. "tests: 98 passed, 0 failed".
test: image vmm lint
	@mkdir -p target
	@set -o pipefail; $(CARGO) test --workspace --release --locked --no-fail-fast 2>&1 | tee target/test.log; \
	status=$$?; \
	awk '/^test result:/ { p += $$4; f += $$6 } END { printf "tests: %d passed, %d failed\n", p, f }' target/test.log; \
	exit $$status

# Every cargo-fuzz target of the device for its share of FUZZ_TIME seconds (nightly and cargo-fuzz
# are installed if missing); new inputs are merged into device/fuzz/corpus/<target>/, minimized,
# and `make test` replays that corpus on stable. Prints executions and coverage per target.
FUZZ_TIME ?= 600
.PHONY: fuzz
fuzz:
	@bash device/fuzz/run.sh $(FUZZ_TIME)

# The soak campaign (images/soak.sh): one boot, 2 vCPUs and 2 queues, `aiodma-aio soak` for
# SOAK_REQUESTS requests (default 1000000) under a mixed fault plan, seeded by SOAK_SEED (default:
# the time; printed, with the fault log to replay the run). SOAK_DEBUG=1: the debug kernel.
SOAK_REQUESTS ?= 1000000
.PHONY: soak
soak: image vmm
	@SOAK_REQUESTS=$(SOAK_REQUESTS) $(if $(SOAK_SEED),SOAK_SEED=$(SOAK_SEED)) AIODMA=$(AIODMA) \
		bash images/soak.sh

clean-cache:
	rm -rf "$${AIODMA_CACHE:-$$HOME/.cache/aiodma}" images/out
