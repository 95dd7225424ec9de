"""The only package that talks to llama.cpp (through llama-cpp-python's low-level ctypes API).

A `LlamaModel` owns one GGUF model, one context and one sequence (seq 0). The rest of cospec_local
sees a small interface:

- `eval(tokens, n_logits)`: append `tokens` to the KV cache in one `llama_decode` (chunked only when
  longer than n_batch) and return logits for the LAST `n_logits` rows only. Asking for fewer rows
  matters: every output row costs a full pass of the output head (262k wide for Gemma).
- `rollback(n_keep)`: drop every cached position >= n_keep (`llama_memory_seq_rm`).
- `tokenize`, `token_bytes`, `detokenize`, metadata and special tokens.

Host memory is O(n_batch x n_vocab) for logits, never O(n_ctx x n_vocab): we never set logits_all.

The package alone imports llama_cpp, and only inside functions (importing it loads no library):
`_lib` (initialisation, log filter, libggml handle), `rpc` (RPC servers and devices), `build` (how
llama.cpp was built, CPU checks, threads), `weights` (GGUF check, load options, shared weights) and
`model` (`LlamaModel`). The rest of cospec_local imports from `cospec_local.backend` only.
"""

from .build import (
    KERNELS,
    BuildInfo,
    build_info,
    check_build_fits_cpu,
    default_threads,
    machine_cpu_flags,
    missing_cpu_features,
)
from .model import LlamaModel
from .rpc import RPC_CONNECT_TIMEOUT, connect_rpc, is_loopback, local_offload_devices, parse_endpoint, start_rpc_server
from .weights import EXACT_CPU_BATCH, EXACT_PREFILL_N_BATCH, GGUF_MAGIC, LoadOptions, check_gguf_file

__all__ = [
    "BuildInfo",
    "EXACT_CPU_BATCH",
    "EXACT_PREFILL_N_BATCH",
    "GGUF_MAGIC",
    "KERNELS",
    "LlamaModel",
    "LoadOptions",
    "RPC_CONNECT_TIMEOUT",
    "build_info",
    "check_build_fits_cpu",
    "check_gguf_file",
    "connect_rpc",
    "default_threads",
    "is_loopback",
    "local_offload_devices",
    "machine_cpu_flags",
    "missing_cpu_features",
    "parse_endpoint",
    "start_rpc_server",
]
