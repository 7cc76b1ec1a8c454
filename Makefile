# Two commands do all the set-up on a fresh Debian 12 / Python 3.11 machine:
#   make demo   - phantom CT series analysed end to end (prints the result, writes JSON + PNG)
#   make test   - installs the test dependencies and runs the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctjoint-installed
MODELS := jcs2d deepsc3d
ONNX := $(foreach m,$(MODELS),build/onnx/$(m).onnx)
DEMO_DIR := out/demo

.PHONY: demo test lint typecheck install onnx proto clean

$(STAMP): pyproject.toml
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  need=""; for p in python3-venv; do dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	  if [ -n "$$need" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first and pinned, so the CPU build is taken rather than a multi-GB CUDA one.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[client,gateway,export,test]'
	touch $@

install: $(STAMP)

# Exported ONNX is produced from the bundled weights by the set-up, never committed.
build/onnx/%.onnx: export/weights/%_tiny.pt $(STAMP)
	$(BIN)/ctjoint export onnx --model $* --out $@

onnx: $(ONNX)

demo: install onnx
	$(BIN)/ctjoint phantom $(DEMO_DIR)/case --kind covid19 --seed 2026 --size 512 --slices 100
	$(BIN)/ctjoint analyze $(DEMO_DIR)/case/series --model jcs2d \
	  --json $(DEMO_DIR)/result_jcs2d.json --png $(DEMO_DIR)/overlay_jcs2d.png
	$(BIN)/ctjoint analyze $(DEMO_DIR)/case/series --model deepsc3d \
	  --json $(DEMO_DIR)/result_deepsc3d.json --png $(DEMO_DIR)/overlay_deepsc3d.png

test: install onnx
	$(BIN)/python -m pytest -q -n 2

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) typecheck

# mypy reads the package through a symlink view (ctjoint/, ctjoint/gateway -> gateway/, ...),
# the same mapping setuptools' package-dir makes at install time.
typecheck: install
	rm -rf .typecheck && mkdir -p .typecheck/ctjoint
	for f in ctjoint/*.py ctjoint/py.typed ctjoint/v1; do ln -s ../../$$f .typecheck/ctjoint/; done
	for d in gateway client export; do ln -s ../../$$d .typecheck/ctjoint/$$d; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p ctjoint

# The gRPC contract: generated code is committed (imports read `from ctjoint.v1 import ...`);
# tests/test_gateway_proto.py regenerates into a temporary folder and fails if these are stale.
proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
	  ctjoint/v1/scan.proto

clean:
	rm -rf build out .typecheck
