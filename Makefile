# Two entry points: `make demo` (the DFND pipeline on real images) and `make test`.
# Both build what they need: a virtualenv in .venv with dfkd installed, and the Debian
# data packages when run as root.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-torch-low bench bench-scale study debian-data clean

# torch and torchvision at the exact versions of constraints.txt (setup.cfg declares a range)
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

debian-data:
	@bash pipelines/debian-data.sh

demo: $(VENV)/.installed debian-data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash pipelines/demo.sh

test: $(VENV)/.installed debian-data
	$(PY) -m pytest -q

# The suite at the low end of setup.cfg's range (torch>=2.5, torchvision>=0.20), in a venv of its
# own: PyTorch first, then dfkd without constraints.txt, so that pip keeps that PyTorch (the check
# that installing dfkd does not replace a user's). TORCH_INDEX: e.g. https://download.pytorch.org/whl/cpu
# for the 200 MB CPU wheels (PyPI's Linux wheel of 2.5.1 is the CUDA one, with ~2.5 GB of nvidia-*).
TORCH_LOW       ?= 2.5.1
TORCHVISION_LOW ?= 0.20.1
TORCH_INDEX     ?=
LOW_VENV        ?= .venv-torch-low
test-torch-low: debian-data
	$(PYTHON) -m venv $(LOW_VENV)
	PIP_CONSTRAINT= $(LOW_VENV)/bin/pip install -q torch==$(TORCH_LOW) torchvision==$(TORCHVISION_LOW) \
	    $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	PIP_CONSTRAINT= $(LOW_VENV)/bin/pip install -q -e '.[test]'
	$(LOW_VENV)/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('$(TORCH_LOW)'), \
	    torch.__version__; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	$(LOW_VENV)/bin/python -m pytest -q

study: $(VENV)/.installed debian-data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash pipelines/study.sh

bench: $(VENV)/.installed debian-data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash bench/run.sh

# select's peak memory against pool size (20k and 200k generated PNGs), then 2 torchrun ranks
# against 1 process on the demo (select, distill, resume after a kill); needs `make demo` first.
bench-scale: $(VENV)/.installed
	$(PY) bench/select_memory.py --work runs/bench-memory
	$(PY) bench/ranks.py --teacher runs/demo/teacher/model.yaml --pool data/demo/wild --test data/demo/test

clean:
	rm -rf $(VENV) $(LOW_VENV) runs
