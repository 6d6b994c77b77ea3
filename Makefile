# Two commands do all set-up: `make study` and `make test`. Both create the venv on first use.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROFILE ?= smoke
# pytest-xdist workers for `make test` (tests/conftest.py keeps what must share a worker together)
TEST_WORKERS ?= 2
LAB_IP   ?= 127.0.0.1
LAB_PORT ?= 8888
# offline by design: the hub is unreachable here, and a silent download elsewhere would break reproducibility
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: study test nbval-refresh lab lab-screenshot venv kernel clean-runs

study: $(STAMP)  ## run every notebook on the embedded default (params/$(PROFILE)/), write reports/$(PROFILE)/
	$(PY) -m spatialstudy.run --profile $(PROFILE)

test: $(STAMP)  ## pytest + nbval (notebooks at their ci defaults)
	TQDM_DISABLE=1 MPLBACKEND=Agg $(PY) -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder

nbval-refresh: $(STAMP)  ## after a deliberate ci-tier change: re-store the outputs nbval compares (NBVAL_CHECK_OUTPUT)
	$(PY) tools/nbval_refresh.py

# jupyter refuses to run as root unless told; containers often are root
LAB_ROOT_FLAG = $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)  ## JupyterLab on notebooks/ (kernel "Python (spatialstudy)", offline); open the URL it prints
	$(PY) -m jupyterlab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.root_dir=notebooks $(LAB_ROOT_FLAG)

lab-screenshot: $(STAMP)  ## re-take reports/figures/jupyterlab.png (the README's picture) with the front-end test
	SPATIALSTUDY_SCREENSHOT=reports/figures/jupyterlab.png TQDM_DISABLE=1 MPLBACKEND=Agg $(PY) -m pytest tests/test_lab.py -q

venv: $(STAMP)

# The stamp is rebuilt when pyproject.toml changes; torch first so the CPU wheel is the one resolved.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name spatialstudy --display-name "Python (spatialstudy)" >/dev/null
	touch $(STAMP)

clean-runs:  ## forget cached runs and pretrained bases
	rm -rf runs/
