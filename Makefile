# The README's two commands: `make demo` and `make test`. Both set everything up
# first; set-up is idempotent and cheap when nothing changed (stamps below).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
# uv links packages from its cache, so a fresh clone gets torch in seconds once
# the cache is warm. Bootstrapped with pip when missing.
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUST_SRC := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml Cargo.lock
# Bytecode is compiled on first import, only for the modules a process imports (about a
# quarter of the venv's files): compiling all of them at install took 35 s of a fresh
# clone's set-up, and with PYTHONDONTWRITEBYTECODE set every process compiled its imports
# again (the floor venv's most of all).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test checks test-fast test-floor test-hf-floor demo docs wheel-check bench fuzz clean

setup: $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: requirements.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python python3 $(VENV)
	$(UV) pip install --quiet --python $(PY) -r requirements.lock
	@touch $@

# Rebuilt only when Rust sources change; Python sources are used in place.
$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(RUST_SRC) pyproject.toml
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --profile local --quiet --uv
	@touch $@

requirements.lock: pyproject.toml
	$(UV) pip compile pyproject.toml --extra test --universal --python-version 3.10 -q -o $@

# The oldest torch and transformers that pyproject.toml allows (the lock holds the
# newest), in one venv: the transformers tests, and one test per torch API that changed
# across releases (FSDP2 with a rank whose experts get no token, checked against one
# process; FSDP2 + DCP resume on another world size; expert parallelism + DCP resume;
# the private_api probes and fallbacks). Same packages otherwise, linked from the uv
# cache; the extension built by `setup` is used in place.
TORCH_FLOOR := 2.12.0
HF_FLOOR := 5.20.0
FLOOR_VENV := .venv-floor
$(FLOOR_VENV)/.stamp: requirements.lock Makefile
	$(UV) venv --quiet --allow-existing --python python3 $(FLOOR_VENV)
	$(UV) pip install --quiet --python $(FLOOR_VENV)/bin/python -r requirements.lock
	$(UV) pip install --quiet --python $(FLOOR_VENV)/bin/python \
		"torch==$(TORCH_FLOOR)" "transformers==$(HF_FLOOR)"
	@touch $@

# The transformers files in one process each; of the multi-process tests, those marked
# `floor` (one per torch API that changed across releases).
FLOOR_TESTS := tests/test_hf_families.py tests/test_hf_shards.py tests/test_eval.py \
	tests/test_chat_template.py tests/test_private_api.py tests/test_train_fsdp.py \
	tests/test_train_ep.py
test-floor: setup $(FLOOR_VENV)/.stamp
	PYTHONPATH=python $(FLOOR_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_N) \
		-m "floor or not multiprocess" $(FLOOR_TESTS)

test-hf-floor: test-floor  # the former name

# cargo test includes the fuzz targets (rust/core/src/fuzzing.rs), 1000 cases each; the
# binding crate has no tests of its own (pytest tests it), clippy checks it.
# pytest runs over 2 workers (pytest-xdist): the multi-process tests' ranks leave a core
# idle much of the time (they wait on each other), so the other worker's tests use it.
PYTEST_N := -n 2 --dist loadgroup
# The Rust checks leave part of a core idle (build steps wait on each other): the floor
# venv's bytecode is compiled there, once and at the lowest priority, rather than by both
# of its pytest workers at once (tests/precompile.py).
test: setup $(FLOOR_VENV)/.stamp
	@nice -n 19 $(MAKE) --no-print-directory $(FLOOR_VENV)/.bytecode & warm=$$!; \
		$(MAKE) --no-print-directory checks; status=$$?; wait $$warm; exit $$status
	@$(MAKE) --no-print-directory test-floor
	$(PY) -m pytest $(PYTEST_N) --durations=15  # last, so that its summary closes the output

checks: setup
	cargo test -p esft-core --quiet
	@# The core stays pure: no Python types in its dependency tree.
	@if cargo tree -p esft-core --prefix none | grep -qE '^(pyo3|numpy) '; then \
		echo 'esft-core depends on pyo3/numpy'; exit 1; fi
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches docs .github
	@# The package's layers and no import cycle ([tool.importlinter] in pyproject.toml).
	$(VENV)/bin/lint-imports

$(FLOOR_VENV)/.bytecode: $(FLOOR_VENV)/.stamp
	@PYTHONPATH=python $(FLOOR_VENV)/bin/python tests/precompile.py $(FLOOR_TESTS) \
		>/dev/null 2>&1 || true
	@touch $@

# The edit loop: the Rust unit tests and pytest without the tests that start several
# ranks or run the demo (pytest markers `multiprocess` and `demo`, pyproject.toml).
test-fast: setup
	cargo test -p esft-core --quiet
	$(PY) -m pytest $(PYTEST_N) -m "not multiprocess and not demo"

# A longer fuzz run on the stable toolchain: the header, index, official-log and
# expert-config parsers on mutations of fuzz/corpus/<target>/ (make test runs 1000 cases).
FUZZ_CASES ?= 100000
FUZZ_SEED ?= $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fuzz:
	@echo "fuzzing with ESFT_FUZZ_SEED=$(FUZZ_SEED)"
	ESFT_FUZZ_SEED=$(FUZZ_SEED) ESFT_FUZZ_CASES=$(FUZZ_CASES) cargo test --release --quiet -p esft-core --lib fuzz_

demo: setup
	$(VENV)/bin/esft-rs demo -o demo-out

# docs/cli.md and docs/api.md are generated from the code (tests/test_docs.py checks them).
docs: setup
	$(PY) docs/generate.py docs

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
	rm -rf $(VENV) $(FLOOR_VENV) .venv-hf-floor target dist
