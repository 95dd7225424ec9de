"""Loading a model: the GGUF file check, the load options and the weights shared by every context
made from them."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .build import KERNELS
from .rpc import _rpc_devices, connect_rpc, local_offload_devices

GGUF_MAGIC = b"GGUF"
EXACT_CPU_BATCH = 7
EXACT_PREFILL_N_BATCH = 64


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Return `path` as a Path if it is an existing GGUF file, else raise ModelLoadError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"model path is not a file: {p}")
    with p.open("rb") as f:
        magic = f.read(4)
        header = f.read(12)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"not a GGUF file (bad magic {magic!r}): {p}")
    version = int.from_bytes(header[:4], "little")
    if len(header) == 12 and version >= 2 and int.from_bytes(header[4:12], "little") == 0:
        raise ModelLoadError(
            f"{p} is a vocabulary-only GGUF (no weights): it holds a tokenizer and cannot generate; "
            "pass a full model (weights included)"
        )
    return p


@dataclass(frozen=True)
class LoadOptions:
    """How to load one model: context size, threads and GPU offload."""

    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_batch: int = 512
    verbose: bool = False
    # Which kernels llama.cpp runs (`KERNELS`):
    # - "exact" (the default): no weight repacking and no flash attention, verification batches of
    #   at most EXACT_CPU_BATCH rows and exact prefill (below). llama.cpp's repacked-weight GEMM
    #   kernels round batches differently from the single-token GEMV path (logits up to ~1.0 apart
    #   on Gemma 3 270M, enough to flip near-tie argmaxes), and its CPU flash-attention kernel
    #   takes a tiled path for 8+ queries and a split-KV path for single queries over 512+ cached
    #   tokens. Without them a batch's rows equal single-token decoding bit for bit.
    # - "fast": llama.cpp's own choice (repacked weights, flash attention auto, full batches):
    #   greedy output then equals target-only up to near-ties, as in llama.cpp itself. See the
    #   README for what each cost on the machines measured.
    kernels: str = "exact"
    # Evaluate long inputs (prompt prefill) in batches of at most `exact_batch` tokens. Such
    # batches compute every KV entry exactly as single-token decoding does, so a cache is the same
    # whichever way it was filled: reusing a cached prefix (a chat's earlier turns, a server slot's
    # last conversation) then gives the same output as a fresh run. With large prefill batches it
    # does not (Gemma 3 270M, greedy: 12 of 32 chat replies changed with a reused prefix). Measured
    # cost on this CPU: prefill at 436 instead of 618 tok/s (Gemma 3 270M, 2 threads).
    exact_prefill: bool = True
    # llama.cpp RPC servers ('host:port') whose devices take this model's offloaded layers
    # (`n_gpu_layers`); empty: this machine's own devices only.
    rpc: tuple[str, ...] = ()
    # Load the model's multi-token-prediction (MTP, "nextn") layers where its GGUF has them (one
    # extra layer of weights; Qwen3.5/3.6), so they can draft (`--draft-source mtp`).
    load_mtp: bool = True


class _Weights:
    """One loaded llama_model (the weights), shared by every context made from it. Freed when the
    last context using it closes."""

    def __init__(self, lib, path: Path, options: LoadOptions):
        params = lib.llama_model_default_params()
        params.n_gpu_layers = options.n_gpu_layers
        if options.kernels not in KERNELS:
            raise ValueError(f"unknown kernels {options.kernels!r}; choose one of {', '.join(KERNELS)}")
        params.use_extra_bufts = options.kernels == "fast"
        # Which devices take offloaded layers: the given RPC servers', or only local ones (a model
        # without --rpc stays on this machine even when another model registered a server).
        self.devices = None
        if options.rpc or _rpc_devices:
            chosen = connect_rpc(options.rpc) if options.rpc else local_offload_devices()
            self.devices = (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)  # NULL-terminated; kept alive
            params.devices = ctypes.cast(self.devices, ctypes.c_void_p)
        self.loaded_mtp = options.load_mtp and hasattr(params, "load_mtp")
        if self.loaded_mtp:
            params.load_mtp = True
        self.lib = lib
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {path} (run with --verbose for its log)")
        self.users = 0
        self.grammar_tokenizer = None  # llguidance's tokenizer, built on first use (LlamaModel.grammar_tokenizer)

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.ptr:
            self.lib.llama_model_free(self.ptr)
            self.ptr = None
