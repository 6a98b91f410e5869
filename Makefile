# simba-ttm: `make test` installs what is missing (uv, the locked environment) and runs the suite.
SHELL := /bin/bash
# uv from PATH, else the one pip installs into this Python (`python3 -m uv`).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PY := .venv/bin/python

.PHONY: uv install test lint demo bench bench-train bench-eval clean

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

# --compile-bytecode: write every package's .pyc at install. Where PYTHONDONTWRITEBYTECODE is set (these CI
# machines), Python never caches bytecode itself, and each new process (every Ray worker and actor) recompiled
# torch, Ray, transformers and MLflow from source: seconds per process. A no-op resync takes ~2 s.
install: uv
	$(UV) sync --locked --group dev --compile-bytecode

# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job end to end on the embedded defaults (configs/debug.yaml): minutes on a 2-core CPU.
demo: install
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(PY) -m ray_jobs.demo

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: install
	$(PY) bench/generate.py

# Training-step tokens/s and MFU of both decoders (~3 minutes on 2 idle cores; bench/train_step.py --quick: ~1).
bench-train: install
	$(PY) bench/train_step.py

# Evaluation throughput: embedder clips/s (CLAP, PaSST, VGGish) and generation frames/s of both decoders at batch
# 1, 8 and 32 (random weights; a few minutes on 2 idle cores, most of it compiling; bench/evaluate.py --quick: less).
bench-eval: install
	$(PY) bench/evaluate.py

clean:
	rm -rf .venv .pytest_cache
