# The two commands a newcomer needs: `make demo` and `make test`. Each sets up libtorch first
# (a lean CPU libtorch 2.11.0 from PyPI, cached outside the repo; see scripts/setup-libtorch.sh).
SHELL := /bin/bash
LIBTORCH_DIR = $(shell scripts/setup-libtorch.sh)
export LIBTORCH = $(LIBTORCH_DIR)

.PHONY: demo test build libtorch lint

libtorch:
	@echo "libtorch: $(LIBTORCH)"

build: libtorch
	cargo build --release

demo: build
	./target/release/dreampipe --device cpu run pipelines/demo.yaml

test: libtorch
	scripts/setup-chromium.sh
	cargo test

lint: libtorch
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
