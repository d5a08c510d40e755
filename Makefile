# The two commands a newcomer needs: `make demo` and `make test`. Each sets up libtorch first
# (a lean CPU libtorch 2.11.0 from PyPI, cached outside the repo; see scripts/setup-libtorch.sh).
SHELL := /bin/bash
LIBTORCH_DIR := $(shell scripts/setup-libtorch.sh)
ifeq ($(LIBTORCH_DIR),)
$(error libtorch setup failed (see the setup-libtorch message above))
endif
export LIBTORCH := $(LIBTORCH_DIR)

.PHONY: demo test build libtorch lint

libtorch:
	@echo "libtorch: $(LIBTORCH)"

build: libtorch
	cargo build --release

# One torch thread unless OMP_NUM_THREADS says otherwise: the demo's tensors are tiny, and on a
# busy 2-core machine OpenMP's spinning threads made it 5-10x slower (see tests/recipes.rs).
demo: build
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} ./target/release/dreampipe --device cpu run pipelines/demo.yaml

test: libtorch
	scripts/setup-chromium.sh
	cargo test

lint: libtorch
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
