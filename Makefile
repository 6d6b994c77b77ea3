# Two commands do all set-up: `make study` and `make test`. Both create the venv on first use.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROFILE ?= smoke
# offline by design: the hub is unreachable here, and a silent download elsewhere would break reproducibility
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: study test nbval-refresh venv kernel clean-runs

study: $(STAMP)  ## run every notebook on the embedded default (params/$(PROFILE)/), write reports/$(PROFILE)/
	$(PY) -m spatialstudy.run --profile $(PROFILE)

test: $(STAMP)  ## pytest + nbval (notebooks at their ci defaults)
	TQDM_DISABLE=1 MPLBACKEND=Agg $(PY) -m pytest

nbval-refresh: $(STAMP)  ## after a deliberate ci-tier change: re-store the outputs nbval compares (NBVAL_CHECK_OUTPUT)
	$(PY) tools/nbval_refresh.py

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
