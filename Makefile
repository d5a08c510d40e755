# The two commands a newcomer needs: `make demo` and `make test`. Each sets up libtorch first
# (a lean CPU libtorch 2.11.0 from PyPI, cached outside the repo; see scripts/setup-libtorch.sh).
SHELL := /bin/bash
LIBTORCH_DIR := $(shell scripts/setup-libtorch.sh)
ifeq ($(LIBTORCH_DIR),)
$(error libtorch setup failed (see the setup-libtorch message above))
endif
export LIBTORCH := $(LIBTORCH_DIR)

.PHONY: demo demo-tiny test test-kernels build libtorch lint

libtorch:
	@echo "libtorch: $(LIBTORCH)"

build: libtorch
	cargo build --release

# One torch thread unless OMP_NUM_THREADS says otherwise: the demo's tensors are tiny, and on a
# busy 2-core machine OpenMP's spinning threads made it 5-10x slower (see tests/torch/recipes.rs).
demo: build
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} ./target/release/dreampipe --device cpu run pipelines/world/demo.yaml

# The whole chain (class images, textual inversion, DreamBooth, grid, the paper's metrics) on the
# random-weight tiny model in seconds: the mechanics without the learning.
demo-tiny: build
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} ./target/release/dreampipe --device cpu run pipelines/demo.yaml

# The whole suite, every failure reported (not just the first failing test binary); exits
# non-zero if anything failed. Test binaries: `goldens` and `torch` (root package, libtorch),
# `cli` (crates/front), `kinds` (crates/kinds), `core` (crates/core), besides the unit tests.
# The Slurm executor's tests (tests/torch/runner_slurm.rs) run on a real one-node Slurm that
# scripts/start-slurm.sh installs (Debian packages, root) and starts.
test: libtorch
	scripts/setup-chromium.sh
	scripts/start-slurm.sh
	cargo test --no-fail-fast

# The tests that compare with goldens made on another CPU, again under ATen's other CPU kernel
# sets (ATEN_CPU_CAPABILITY; an older CPU picks `default` or `avx2` by itself). CI runs it.
# They are the test binary `goldens` (tests/goldens/), and the kind-version guard in `torch`.
KERNEL_SETS := default avx2
test-kernels: libtorch
	@failed=""; for capability in $(KERNEL_SETS); do \
	  echo "== golden tests under ATEN_CPU_CAPABILITY=$$capability"; \
	  ATEN_CPU_CAPABILITY=$$capability cargo test --test goldens \
	    || failed="$$failed $$capability"; \
	  ATEN_CPU_CAPABILITY=$$capability cargo test --test torch kind_versions \
	    || failed="$$failed $$capability(kind_versions)"; \
	done; \
	if [ -n "$$failed" ]; then echo "golden tests failed under:$$failed"; exit 1; fi

lint: libtorch
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
