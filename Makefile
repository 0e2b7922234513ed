# Two entry points: `make demo` (the DFND pipeline on real images) and `make test`.
# Both build what they need: a virtualenv in .venv with dfkd installed, and the Debian
# data packages when run as root.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench bench-scale study debian-data clean

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
	rm -rf $(VENV) runs
