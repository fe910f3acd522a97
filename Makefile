# The README's two commands: `make demo` and `make test`. Both set everything up
# first; set-up is idempotent and cheap when nothing changed (stamps below).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
# uv links packages from its cache, so a fresh clone gets torch in seconds once
# the cache is warm. Bootstrapped with pip when missing.
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUST_SRC := $(shell find rust/src -name '*.rs') Cargo.toml Cargo.lock

.PHONY: setup test demo wheel-check bench clean

setup: $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: requirements.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python python3 $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(PY) -r requirements.lock
	@touch $@

# Rebuilt only when Rust sources change; Python sources are used in place.
$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(RUST_SRC) pyproject.toml
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --quiet --uv
	@touch $@

requirements.lock: pyproject.toml
	$(UV) pip compile pyproject.toml --extra test --universal --python-version 3.10 -q -o $@

test: setup
	cargo test --quiet
	cargo clippy --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(PY) -m pytest

demo: setup
	$(PY) -c "from esft_rs.testing import *; write_checkpoint('demo-out/base', random_tensors(MoEShape()), shards=2)"
	$(VENV)/bin/esft-rs inspect demo-out/base --no-tensors

# Shows that a release wheel installs into a clean virtualenv and runs.
wheel-check: setup
	rm -rf dist /tmp/esft-wheel-venv
	$(VENV)/bin/maturin build --release --quiet -o dist
	$(UV) venv --quiet --python python3 /tmp/esft-wheel-venv
	$(UV) pip install --quiet --python /tmp/esft-wheel-venv/bin/python dist/*.whl
	/tmp/esft-wheel-venv/bin/esft-rs --help

bench: setup
	for b in benches/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) target dist
