"""The only module that talks to llama.cpp (through llama-cpp-python's low-level ctypes API).

A `LlamaModel` owns one GGUF model, one context and one sequence (seq 0). The rest of the package
sees a small interface:

- `eval(tokens, n_logits)`: append `tokens` to the KV cache in one `llama_decode` (chunked only when
  longer than n_batch) and return logits for the LAST `n_logits` rows only. Asking for fewer rows
  matters: every output row costs a full pass of the output head (262k wide for Gemma).
- `rollback(n_keep)`: drop every cached position >= n_keep (`llama_memory_seq_rm`).
- `tokenize`, `token_bytes`, `detokenize`, metadata and special tokens.

Host memory is O(n_batch x n_vocab) for logits, never O(n_ctx x n_vocab): we never set logits_all.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ContextOverflowError, ModelLoadError, RollbackError, RpcError

GGUF_MAGIC = b"GGUF"
EXACT_CPU_BATCH = 7
EXACT_PREFILL_N_BATCH = 64

_backend_ready = False
_log_verbose = False
_log_last_shown = False
# ggml's log levels in the llama.cpp this package is built on: DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5.
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5


def _log_callback(level, text, user_data):
    # Show llama.cpp's errors always, its chatter only with verbose=True; CONT lines follow their head.
    global _log_last_shown
    show = _log_last_shown if level == _GGML_LOG_CONT else (_log_verbose or level >= _GGML_LOG_ERROR)
    _log_last_shown = show
    if show:
        sys.stderr.write(text.decode("utf-8", "replace"))


_log_callback_c = None


def _init_backend(verbose: bool | None) -> None:
    """Initialise llama.cpp once per process and install our log filter (`verbose`: show its log;
    None keeps the current setting)."""
    global _backend_ready, _log_verbose, _log_callback_c
    import llama_cpp

    if verbose is not None:
        _log_verbose = verbose
    if not _backend_ready:
        _log_callback_c = llama_cpp.llama_log_callback(_log_callback)  # keep a reference: C holds it
        llama_cpp.llama_log_set(_log_callback_c, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


# -- llama.cpp's RPC backend (remote devices) ---------------------------------------------------------
RPC_CONNECT_TIMEOUT = 5.0  # seconds to reach a server before giving up with a clear error
_GGML_DEVICE_TYPE_CPU, _GGML_DEVICE_TYPE_GPU, _GGML_DEVICE_TYPE_IGPU = 0, 1, 2
_rpc_devices: dict[str, list[int]] = {}  # endpoint -> its registered device pointers
_ggml_lib = None


def _ggml():
    """libggml's device registry through ctypes (llama-cpp-python binds only llama.h)."""
    global _ggml_lib
    if _ggml_lib is None:
        from llama_cpp._ggml import libggml as lib

        sigs = {
            "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
            "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
            "ggml_backend_register": ([ctypes.c_void_p], None),
            "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
            "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
            "ggml_backend_dev_count": ([], ctypes.c_size_t),
            "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
            "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
            "ggml_backend_dev_by_type": ([ctypes.c_int], ctypes.c_void_p),
            "ggml_print_backtrace": ([], None),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _ggml_lib = lib
    return _ggml_lib


def _rpc_proc(name: str, restype, *argtypes):
    """A function of llama.cpp's RPC backend, or RpcError when this build has none."""
    import llama_cpp

    _init_backend(None)
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC") if llama_cpp.llama_supports_rpc() else None
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise RpcError(
            "this build of llama-cpp-python has no RPC backend: rebuild it with -DGGML_RPC=ON in CMAKE_ARGS "
            "(the Makefile's default does so; add it to your own CMAKE_ARGS for CUDA or Metal builds)"
        )
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); RpcError for anything else."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"bad RPC endpoint {endpoint!r}: expected HOST:PORT, e.g. 192.168.1.20:50052")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")


_abort_callback_c = None


def _on_ggml_abort(message: bytes) -> None:
    # llama.cpp aborts the process when an RPC server goes away mid-computation; it cannot be
    # recovered from in-process, but it can end with a clear message instead of a core dump.
    text = message.decode("utf-8", "replace")
    if "rpc" in text.lower():  # ggml-rpc.cpp's aborts (its path or its message name RPC)
        sys.stderr.write(
            "\nerror: an RPC server went away in the middle of a computation (llama.cpp: "
            f"{text.strip()}).\nllama.cpp's RPC client cannot recover from this inside the process: restart the "
            "command once the server is back (this conversation is lost).\n"
        )
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.write(text + "\n")  # anything else: what ggml's default would print, then its abort
    try:
        _ggml().ggml_print_backtrace()
    except Exception:
        pass


def _install_rpc_abort_handler() -> None:
    global _abort_callback_c
    if _abort_callback_c is None:
        lib = _ggml()
        callback_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        _abort_callback_c = callback_type(_on_ggml_abort)  # kept: C holds it
        lib.ggml_set_abort_callback.argtypes = [callback_type]
        lib.ggml_set_abort_callback.restype = ctypes.c_void_p
        lib.ggml_set_abort_callback(_abort_callback_c)


def connect_rpc(endpoints) -> list[int]:
    """Register llama.cpp RPC servers (once per process) and return their devices. Each server is
    first reached with a plain TCP connection and a timeout, so an unreachable or refusing server
    is a clear error naming it, never a hang or an abort inside llama.cpp."""
    devices = []
    for endpoint in endpoints:
        endpoint = endpoint.strip()
        if endpoint in _rpc_devices:
            devices += _rpc_devices[endpoint]
            continue
        host, port = parse_endpoint(endpoint)
        try:
            with socket.create_connection((host, port), timeout=RPC_CONNECT_TIMEOUT):
                pass
        except OSError as e:
            reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
            raise RpcError(f"cannot reach the RPC server at {endpoint}: {reason} (is `cospec-local rpc-server` "
                           "running there, and the port open?)") from None
        add_server = _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
        _install_rpc_abort_handler()
        reg = add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"the RPC server at {endpoint} reports no devices")
        lib = _ggml()
        lib.ggml_backend_register(reg)
        found = [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
        _rpc_devices[endpoint] = found
        devices += found
    return devices


def local_offload_devices() -> list[int]:
    """This machine's own offload devices (GPUs): every registered non-CPU device that is not an
    RPC server's."""
    lib = _ggml()
    remote = {d for found in _rpc_devices.values() for d in found}
    kinds = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if dev not in remote:
            kinds.setdefault(lib.ggml_backend_dev_type(dev), []).append(dev)
    # As llama.cpp chooses: GPUs, else integrated GPUs; never CPU or accelerator devices (BLAS...).
    return kinds.get(_GGML_DEVICE_TYPE_GPU) or kinds.get(_GGML_DEVICE_TYPE_IGPU) or []


def start_rpc_server(host: str, port: int, n_threads: int) -> None:
    """Serve this machine's devices (its GPUs, else its CPU) to llama.cpp RPC clients; blocks for
    good (run it on a thread)."""
    start = _rpc_proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    lib = _ggml()
    devices = local_offload_devices() or [lib.ggml_backend_dev_by_type(_GGML_DEVICE_TYPE_CPU)]
    array = (ctypes.c_void_p * len(devices))(*devices)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    start(endpoint.encode(), None, n_threads, len(devices), array)


# -- how the installed llama.cpp was built ------------------------------------------------------------
# ggml's CPU feature names (its system-info string) -> the /proc/cpuinfo flag that says the CPU has
# it. A build that uses a feature the CPU lacks dies with SIGILL on its first matrix product.
_CPUINFO_FLAG = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "ARM_FMA": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm",
    "SVE": "sve", "SME": "sme", "SME2": "sme2",
}
KERNELS = ("exact", "fast")


@dataclass(frozen=True)
class BuildInfo:
    """How the installed llama.cpp was built, read from its system-info string."""

    system_info: str  # llama.cpp's own line, e.g. 'CPU : SSE3 = 1 | AVX = 1 | ... | REPACK = 1 |'
    backends: dict  # backend name -> {feature: value}

    @property
    def cpu_features(self) -> frozenset[str]:
        """Instruction-set features the CPU backend was compiled for (AVX2, AVX512, NEON...)."""
        cpu = self.backends.get("CPU", {})
        return frozenset(k for k, v in cpu.items() if k in _CPUINFO_FLAG and v == "1")

    @property
    def llamafile(self) -> bool:
        """llamafile's sgemm is compiled in: batched matrix products then round differently from
        single-token ones, so no setting makes verification rows bit-identical."""
        return self.backends.get("CPU", {}).get("LLAMAFILE") == "1"

    def guarantee(self, kernels: str, offloaded: bool) -> str:
        """What greedy output promises with these `kernels` on this build: one line for `info` and
        `bench`."""
        if kernels == "exact" and not self.llamafile and not offloaded:
            return "bit-exact: every verified row equals target-only decoding, greedy output is token-for-token target-only's"
        why = ("fast kernels (flash attention, repacked weights, large batches)" if kernels == "fast"
               else "llamafile's sgemm is compiled into this llama.cpp" if self.llamafile
               else "GPU kernels")
        return (f"near-exact ({why}): batched rows differ from single-token rows in the last bits, so greedy "
                "output equals target-only's except at near-ties, as in llama.cpp itself")


def build_info() -> BuildInfo:
    """Read how the installed llama.cpp was built (its system-info string)."""
    import llama_cpp

    _init_backend(None)
    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    backends: dict[str, dict[str, str]] = {}
    current = None
    for part in text.split("|"):
        if " : " in part:  # 'CPU : SSE3 = 1' starts a backend's section
            current, part = (x.strip() for x in part.split(" : ", 1))
            backends.setdefault(current, {})
        if current is not None and "=" in part:
            key, value = (x.strip() for x in part.split("=", 1))
            backends[current][key] = value
    return BuildInfo(text.strip(), backends)


def machine_cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as Linux reports them (/proc/cpuinfo), or None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


def missing_cpu_features(info: BuildInfo | None = None) -> list[str]:
    """Features the installed llama.cpp was compiled for that this CPU lacks ([] when none, or
    when the CPU cannot be read). Non-empty means the build will crash here (SIGILL)."""
    flags = machine_cpu_flags()
    if flags is None:
        return []
    info = info or build_info()
    return sorted(f for f in info.cpu_features if _CPUINFO_FLAG[f] not in flags)


def check_build_fits_cpu() -> None:
    """Raise ModelLoadError when the installed llama.cpp uses instructions this CPU lacks, instead
    of dying with 'Illegal instruction' in the first matrix product (once per process)."""
    global _build_checked
    if _build_checked:
        return
    missing = missing_cpu_features()
    if missing:
        raise ModelLoadError(
            f"the installed llama-cpp-python was built for CPU features this machine lacks ({', '.join(missing)}) "
            "and would crash with 'Illegal instruction': rebuild it here with `make llama-cpp` (the Makefile "
            "builds for this CPU), or pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python"
        )
    _build_checked = True


_build_checked = False


def default_threads() -> int:
    """Threads for llama.cpp: all cores on small machines, half the logical CPUs on big ones (SMT)."""
    n = os.cpu_count() or 1
    return n if n <= 4 else max(4, n // 2)


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
        self.lib = lib
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {path} (run with --verbose for its log)")
        self.users = 0

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.ptr:
            self.lib.llama_model_free(self.ptr)
            self.ptr = None


class LlamaModel:
    """One GGUF model with its own llama.cpp context holding a single sequence.

    `LlamaModel(path, options)` loads the weights; `model.new_context()` makes another context on
    the SAME weights (one copy in memory), for parallel conversations.
    """

    def __init__(self, path: str | os.PathLike, options: LoadOptions = LoadOptions(), *, _weights: "_Weights | None" = None):
        import llama_cpp

        self._lib = llama_cpp
        self.path = check_gguf_file(path) if _weights is None else Path(path)
        self.options = options
        _init_backend(options.verbose)
        check_build_fits_cpu()
        self._ctx = None
        self._weights = _weights or _Weights(llama_cpp, self.path, options)
        self._weights.users += 1
        self._model = self._weights.ptr

        n_threads = options.n_threads or default_threads()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = options.n_ctx
        # llama.cpp reserves a compute buffer for its largest batch, including n_batch rows of
        # logits (514 MiB for Gemma's 262k vocabulary at 512). With exact prefill on the CPU no
        # batch exceeds a few tokens, so a small n_batch reserves ~8x less per context.
        exact = options.kernels == "exact" and options.n_gpu_layers == 0
        n_batch = min(options.n_batch, EXACT_PREFILL_N_BATCH) if exact and options.exact_prefill else options.n_batch
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = 1
        ctx_params.n_threads = n_threads
        ctx_params.n_threads_batch = n_threads
        # A full-size sliding-window cache: with the pruned SWA cache, rolling back a rejected draft
        # could leave positions the next token must attend to already evicted.
        ctx_params.swa_full = True
        if options.kernels == "exact":  # fast: llama.cpp's choice (auto)
            ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            self._weights.release()
            self._model = None
            raise ModelLoadError(f"llama.cpp could not create a context of {options.n_ctx} tokens for {self.path}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)  # llama.cpp caps it at n_ctx
        self.n_threads = n_threads
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_past = 0  # tokens currently in the KV cache
        self.decode_seconds = 0.0  # time spent inside llama_decode, cumulative (overhead accounting)
        # Largest batch whose logits equal single-token logits bit for bit. Measured on the CPU
        # build (no llamafile, no repacking, no flash attention): batches of up to 7 tokens match
        # exactly at any context length, 8+ do not. On a GPU, or with fast kernels, nothing is
        # bit-exact anyway, so batches take their full size.
        self.exact_batch = EXACT_CPU_BATCH if exact else self.n_batch
        self._chunk = self.exact_batch if exact and options.exact_prefill else self.n_batch

        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._batch_token = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._batch_logits = np.ctypeslib.as_array(
            ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(self.n_batch,)
        )
        n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        n_seq_id[:] = 1
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = 0
        self._piece_cache: dict[int, bytes] = {}
        self.metadata = self._read_metadata()

    def new_context(self, n_threads: int | None = None) -> "LlamaModel":
        """Another context (own KV cache, own sequence) on these same weights: no second copy of
        the model in memory. `n_threads` defaults to this context's."""
        from dataclasses import replace

        options = replace(self.options, n_threads=n_threads or self.n_threads)
        return LlamaModel(self.path, options, _weights=self._weights)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and batch, and the weights once no other context uses them (safe to
        call twice)."""
        lib = self._lib
        if getattr(self, "_ctx", None):
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._weights.release()
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata ---------------------------------------------------------------------------------
    def _read_metadata(self) -> dict[str, str]:
        lib = self._lib
        out: dict[str, str] = {}
        key_buf = ctypes.create_string_buffer(256)
        for i in range(lib.llama_model_meta_count(self._model)):
            n = lib.llama_model_meta_key_by_index(self._model, i, key_buf, len(key_buf))
            key = key_buf.value.decode("utf-8", "replace") if n >= 0 else ""
            size = lib.llama_model_meta_val_str_by_index(self._model, i, None, 0)
            if size < 0:
                continue
            val_buf = ctypes.create_string_buffer(size + 1)
            lib.llama_model_meta_val_str_by_index(self._model, i, val_buf, size + 1)
            out[key] = val_buf.value.decode("utf-8", "replace")
        return out

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the GGUF, or None for base models."""
        return self.metadata.get("tokenizer.chat_template")

    @property
    def vocab_type(self) -> int:
        return int(self._lib.llama_vocab_type(self._vocab))

    @property
    def bos_id(self) -> int:
        return int(self._lib.llama_vocab_bos(self._vocab))

    @property
    def eos_id(self) -> int:
        return int(self._lib.llama_vocab_eos(self._vocab))

    @property
    def add_bos(self) -> bool:
        return bool(self._lib.llama_vocab_get_add_bos(self._vocab))

    def eog_ids(self) -> np.ndarray:
        """All end-of-generation token ids (scans the vocabulary once)."""
        is_eog = self._lib.llama_vocab_is_eog
        return np.array([t for t in range(self.n_vocab) if is_eog(self._vocab, t)], dtype=np.int32)

    def token_text(self, token: int) -> str:
        """The vocabulary entry of `token` as stored in the GGUF (e.g. '▁the', '<0x0A>')."""
        raw = self._lib.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def n_params(self) -> int:
        return int(self._lib.llama_model_n_params(self._model))

    def n_layer(self) -> int:
        return int(self._lib.llama_model_n_layer(self._model))

    # -- text ---------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text`; `add_bos` adds BOS when the model asks for it; `special` parses
        control-token text such as '<start_of_turn>'."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (self._lib.llama_token * n_max)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes `token` renders to (cached: called once per emitted token)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def detokenize(self, tokens: list[int]) -> str:
        """Text of `tokens` (special tokens are not rendered)."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    # -- evaluation -----------------------------------------------------------------------------------
    def eval(self, tokens: list[int] | np.ndarray, n_logits: int = 1) -> np.ndarray:
        """Append `tokens` to the KV cache and return logits of the last `n_logits` rows.

        The result has shape (n_logits, n_vocab) and is a VIEW of llama.cpp's output buffer: valid
        until the next `eval`. Copy the rows you keep. `n_logits=0` returns an empty array.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("eval needs at least one token")
        if not 0 <= n_logits <= min(n, self.n_batch):
            raise ValueError(f"n_logits={n_logits} must be in [0, min(len(tokens)={n}, n_batch={self.n_batch})]")
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {self.n_past} cached + {n} new tokens > n_ctx={self.n_ctx} "
                f"({self.path.name}); start a new chat or raise --ctx-size"
            )
        lib = self._lib
        tokens = np.asarray(tokens, dtype=np.int32)
        # All logit rows must sit in the last decode call, whose size is the chunk size unless it
        # needs more rows; the chunks before it have the chunk size.
        last_len = max(min(n, self._chunk), n_logits)
        starts = list(range(0, n - last_len, self._chunk)) + [n - last_len]
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else n
            m = end - start
            self._batch_token[:m] = tokens[start:end]
            self._batch_pos[:m] = np.arange(self.n_past, self.n_past + m, dtype=np.int32)
            self._batch_logits[:m] = 0
            if end == n and n_logits:
                self._batch_logits[m - n_logits : m] = 1
            self._batch.n_tokens = m
            t0 = time.perf_counter()
            rc = lib.llama_decode(self._ctx, self._batch)
            self.decode_seconds += time.perf_counter() - t0
            if rc != 0:
                self._resync_after_failure()
                if rc == 1:
                    raise ContextOverflowError(f"llama.cpp found no KV slot for {m} tokens ({self.path.name})")
                raise RuntimeError(f"llama_decode failed with code {rc} ({self.path.name})")
            self.n_past += m
        if n_logits == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = lib.llama_get_logits_ith(self._ctx, -n_logits)
        return np.ctypeslib.as_array(ptr, shape=(n_logits, self.n_vocab))

    def _resync_after_failure(self) -> None:
        # After a fatal decode some ubatches may remain cached: trust llama.cpp's own position.
        pos_max = self._lib.llama_memory_seq_pos_max(self._mem, 0)
        self.n_past = int(pos_max) + 1

    def rollback(self, n_keep: int) -> None:
        """Remove cached positions >= n_keep so the next `eval` continues after token n_keep - 1."""
        if n_keep < 0:
            raise ValueError("n_keep must be >= 0")
        ok = self._lib.llama_memory_seq_rm(self._mem, 0, n_keep, -1)
        if not ok:
            raise RollbackError(
                f"{self.path.name}: llama.cpp cannot remove part of this model's memory (recurrent or "
                "hybrid architecture); speculative decoding needs a model whose KV cache can roll back"
            )
        # Ask llama.cpp rather than trust our count: an interrupt between llama_decode returning and
        # our bookkeeping must not leave stale positions behind.
        self.n_past = min(n_keep, int(self._lib.llama_memory_seq_pos_max(self._mem, 0)) + 1)

    def reset(self) -> None:
        """Empty the KV cache."""
        self._lib.llama_memory_clear(self._mem, True)
        self.n_past = 0
