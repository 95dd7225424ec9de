# cospec-local: `make chat` and `make test` do all set-up on a fresh machine.
#
# llama-cpp-python is built from source. The default (native) build crashes on CPUs that advertise
# AMX (see README), so without a CMAKE_ARGS of your own we build with portable x86-64 flags.
# The default also builds llama.cpp's RPC backend (--rpc, `cospec-local rpc-server`). Your own CMAKE_ARGS
# (CUDA, Metal, ...) always win: add -DGGML_RPC=ON to them to keep RPC. Built wheels are cached per CMAKE_ARGS value in
# $(WHEEL_CACHE), so a second set-up does not rebuild, and a CUDA build never reuses a CPU wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_CPP_VERSION := 0.3.36
ARCH := $(shell uname -m)
ifeq ($(origin CMAKE_ARGS), undefined)
  ifeq ($(ARCH),x86_64)
    CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_LLAMAFILE=OFF -DGGML_RPC=ON
  else
    CMAKE_ARGS := -DGGML_RPC=ON
  endif
endif
WHEEL_CACHE ?= $(HOME)/.cache/cospec-local/wheels
WHEEL_KEY := $(shell printf '%s|%s|%s' '$(LLAMA_CPP_VERSION)' '$(CMAKE_ARGS)' '$(ARCH)' | sha256sum | cut -c1-16)
WHEEL_DIR := $(WHEEL_CACHE)/$(WHEEL_KEY)

.PHONY: chat test setup llama-cpp models policy bench clean

chat: setup
	$(VENV)/bin/cospec-local chat

test: setup
	$(PY) -m pytest -q tests

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(VENV)/.llama-cpp-$(WHEEL_KEY)
	$(PY) -m pip install -q -e '.[test,train,plot,server]'
	$(PY) -c "import cospec_local; print('default pair:', cospec_local.default_pair())"
	touch $@

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Build (or take from the per-flags cache) the llama-cpp-python wheel and install it.
$(VENV)/.llama-cpp-$(WHEEL_KEY): | $(VENV)/bin/python
	@if ! ls $(WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) with CMAKE_ARGS='$(CMAKE_ARGS)' (several minutes)"; \
	  mkdir -p $(WHEEL_DIR).tmp && \
	  CMAKE_ARGS='$(CMAKE_ARGS)' $(PY) -m pip wheel --no-cache-dir --no-deps -w $(WHEEL_DIR).tmp \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  rm -rf $(WHEEL_DIR) && mv $(WHEEL_DIR).tmp $(WHEEL_DIR); \
	fi
	$(PY) -m pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/llama_cpp_python-*.whl
	rm -f $(VENV)/.llama-cpp-*
	touch $@

llama-cpp: $(VENV)/.llama-cpp-$(WHEEL_KEY)

models: setup
	$(PY) -m models.train_family

# The shipped CoSpec policy (models/family/README.md); the library ships a copy as its default.
policy: setup
	$(VENV)/bin/cospec-local train-policy --draft models/family/draft.gguf --target models/family/target.gguf \
	  --threads 1 --ctx-size 512 --out models/family/policy.onnx --epochs 8 --lr 0.003 \
	  --compare-supervised 200 --init-supervised
	cp models/family/policy.onnx cospec_local/data/cospec_policy.onnx

bench: setup
	$(VENV)/bin/cospec-local bench

clean:
	rm -rf $(VENV) build *.egg-info
