# cospec-local: `make chat` and `make test` do all set-up on a fresh machine.
#
# llama-cpp-python is built from source, for THIS machine's CPU, with no CMAKE_ARGS of your own:
# - x86-64 Linux: a non-native build whose instruction sets are read from /proc/cpuinfo, so it
#   enables exactly what the CPU has (AVX2 only, AVX-512, ...). AMX stays off: llama.cpp's AMX
#   kernels crashed here (SIGSEGV in ggml_backend_amx_mul_mat, see README).
# - other systems (aarch64 Linux, macOS, where Metal is on by default): llama.cpp's native build.
# Every default build turns llamafile's sgemm off (its batched kernels break the bit-exact
# verification the README promises) and builds the RPC backend (--rpc, `cospec-local rpc-server`).
# Your own CMAKE_ARGS (CUDA, Metal, ...) always win: add -DGGML_RPC=ON to them to keep RPC.
# Built wheels are cached in $(WHEEL_CACHE) under a key of the flags AND this CPU's identity, so a
# wheel never runs on a CPU it was not built for (a home directory shared between two machines).
# The sdist is kept: its vendor/llama.cpp/models (real vocabularies and chat templates) is test data.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_CPP_VERSION := 0.3.36
ARCH := $(shell uname -m)
OS := $(shell uname -s)
ifeq ($(OS),Darwin)
  CPU_ID := $(shell sysctl -n machdep.cpu.brand_string machdep.cpu.features machdep.cpu.leaf7_features 2>/dev/null)
else
  CPU_FLAGS := $(shell grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2)
  CPU_ID := $(CPU_FLAGS)
endif
# ON when the CPU has every flag in $(1), else OFF.
cpu_has = $(if $(strip $(foreach f,$(1),$(if $(filter $(f),$(CPU_FLAGS)),,missing))),OFF,ON)
ifeq ($(origin CMAKE_ARGS), undefined)
  ifeq ($(OS)-$(ARCH),Linux-x86_64)
    AVX512 := $(call cpu_has,avx512f avx512cd avx512vl avx512dq avx512bw)
    avx512_ext = $(if $(filter ON,$(AVX512)),$(call cpu_has,$(1)),OFF)
    CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_SSE42=$(call cpu_has,sse4_2) -DGGML_AVX=$(call cpu_has,avx) \
      -DGGML_AVX2=$(call cpu_has,avx2) -DGGML_BMI2=$(call cpu_has,bmi2) -DGGML_FMA=$(call cpu_has,fma) \
      -DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX_VNNI=$(call cpu_has,avx_vnni) -DGGML_AVX512=$(AVX512) \
      -DGGML_AVX512_VBMI=$(call avx512_ext,avx512vbmi) -DGGML_AVX512_VNNI=$(call avx512_ext,avx512_vnni) \
      -DGGML_AVX512_BF16=$(call avx512_ext,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF -DGGML_LLAMAFILE=OFF -DGGML_RPC=ON
  else
    CMAKE_ARGS := -DGGML_LLAMAFILE=OFF -DGGML_RPC=ON
  endif
endif
CACHE_ROOT ?= $(HOME)/.cache/cospec-local
WHEEL_CACHE ?= $(CACHE_ROOT)/wheels
SDIST := $(CACHE_ROOT)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
# vendor/llama.cpp/models of the sdist, unpacked: the real-family tests read it (tests/families.py).
LLAMA_CPP_MODELS := $(CACHE_ROOT)/llama.cpp-$(LLAMA_CPP_VERSION)/models
export COSPEC_LLAMA_CPP_MODELS := $(LLAMA_CPP_MODELS)
# (hashed by Python: macOS has no sha256sum)
WHEEL_KEY := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256("|".join(sys.argv[1:]).encode()).hexdigest()[:16])' \
  '$(LLAMA_CPP_VERSION)' '$(strip $(CMAKE_ARGS))' '$(OS)' '$(ARCH)' '$(strip $(CPU_ID))')
WHEEL_DIR := $(WHEEL_CACHE)/$(WHEEL_KEY)

.PHONY: chat test setup llama-cpp models policy bench clean print-build

chat: setup
	$(VENV)/bin/cospec-local chat

test: setup
	$(PY) -m pytest -q tests

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(VENV)/.llama-cpp-$(WHEEL_KEY) $(LLAMA_CPP_MODELS)/.unpacked
	$(PY) -m pip install -q -e '.[test,train,plot,server]'
	$(PY) -c "import cospec_local; print('default pair:', cospec_local.default_pair())"
	touch $@

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(SDIST):
	mkdir -p $(dir $@)
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(dir $@) llama-cpp-python==$(LLAMA_CPP_VERSION)

$(LLAMA_CPP_MODELS)/.unpacked: | $(SDIST)
	rm -rf $(dir $(LLAMA_CPP_MODELS)) && mkdir -p $(dir $(LLAMA_CPP_MODELS))
	tar -xzf $(SDIST) -C $(dir $(LLAMA_CPP_MODELS)) --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/models
	touch $@

# Build (or take from the per-flags-and-CPU cache) the llama-cpp-python wheel and install it.
$(VENV)/.llama-cpp-$(WHEEL_KEY): | $(VENV)/bin/python $(SDIST)
	@if ! ls $(WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) with CMAKE_ARGS='$(strip $(CMAKE_ARGS))' (several minutes)"; \
	  rm -rf $(WHEEL_DIR).tmp && mkdir -p $(WHEEL_DIR).tmp && \
	  CMAKE_ARGS='$(strip $(CMAKE_ARGS))' $(PY) -m pip wheel --no-cache-dir --no-deps -w $(WHEEL_DIR).tmp $(SDIST) && \
	  echo '$(strip $(CMAKE_ARGS))' > $(WHEEL_DIR).tmp/CMAKE_ARGS && \
	  rm -rf $(WHEEL_DIR) && mv $(WHEEL_DIR).tmp $(WHEEL_DIR); \
	fi
	$(PY) -m pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/llama_cpp_python-*.whl
	rm -f $(VENV)/.llama-cpp-*
	touch $@

llama-cpp: $(VENV)/.llama-cpp-$(WHEEL_KEY)

# What a build would use here (tests pass CPU_FLAGS=... to check the detection for other CPUs).
print-build:
	@echo 'CMAKE_ARGS=$(strip $(CMAKE_ARGS))'
	@echo 'WHEEL_KEY=$(WHEEL_KEY)'

models: setup
	$(PY) -m models.train_family

# The shipped CoSpec policy (models/family/README.md); the library ships a copy as its default.
policy: setup
	$(VENV)/bin/cospec-local train-policy --draft models/family/draft.gguf --target models/family/target.gguf \
	  --threads 1 --ctx-size 512 --out models/family/policy.onnx --epochs 8 --lr 0.01 --held-out 150 \
	  --compare-supervised 200 --init-supervised
	cp models/family/policy.onnx cospec_local/data/cospec_policy.onnx

bench: setup
	$(VENV)/bin/cospec-local bench

clean:
	rm -rf $(VENV) build *.egg-info
