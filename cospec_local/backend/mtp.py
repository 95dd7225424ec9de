"""`MtpHead`: a model's own multi-token-prediction (MTP, "nextn") layer as a draft, as llama.cpp's
`--spec-type draft-mtp` runs it (common/speculative.cpp), driven from Python.

Qwen3.5/3.6 GGUFs carry one MTP block after the trunk: it reads the token at position p + 1
together with the target's last hidden state at position p (`h_p`, the rows llama.cpp calls the
"nextn embeddings") and predicts the token at p + 2, through the target's own output head. It
runs in a second llama.cpp context of type `LLAMA_CONTEXT_TYPE_MTP` on the same weights, with its
own (attention) KV cache, which must hold an entry (x_p, h_{p-1}) for every position the target's
cache holds. So the head *follows* the target: after every target decode it evaluates the same
tokens, each paired with the previous position's h (`follow`), and it takes back what the target
takes back (`rollback`). Drafting then continues from the last committed token:
(x_{L-1}, h_{L-2}) gives a row for position L, and each drafted token, paired with the MTP
layer's own output state, gives the next (`first_step`, `next_step`). Entries the draft writes
past the target's cache are overwritten by the next `follow`.

Two functions this needs are exported by libllama but not bound by llama-cpp-python 0.3.36:
`llama_set_embeddings_nextn` and `llama_get_embeddings_nextn` are declared in llama.cpp's
src/llama-ext.h (a "staging API") without `extern "C"`, so only their C++ (mangled) names exist;
they are looked up by those names (`_nextn_functions`). Free functions of plain pointer/bool
arguments have the C calling convention, so ctypes calls them as it calls the rest of the API.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

from ..errors import ModelLoadError

# Itanium C++ ABI names of llama-ext.h's staging functions (GCC and Clang on Linux and macOS).
_SET_NEXTN = "_Z26llama_set_embeddings_nextnP13llama_contextbb"
_GET_NEXTN = "_Z26llama_get_embeddings_nextnP13llama_context"


def _nextn_functions(lib):
    """(set_embeddings_nextn, get_embeddings_nextn) from libllama, or None where the build does
    not export them (another compiler's name mangling, an older llama.cpp)."""
    cdll = lib.llama_cpp._lib
    try:
        set_nextn, get_nextn = getattr(cdll, _SET_NEXTN), getattr(cdll, _GET_NEXTN)
    except AttributeError:
        return None
    set_nextn.argtypes, set_nextn.restype = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None
    get_nextn.argtypes, get_nextn.restype = [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)
    return set_nextn, get_nextn


def mtp_unavailable_reason(lib, model_ptr, loaded_mtp: bool) -> str | None:
    """Why a model cannot draft with its MTP layers, or None when it can."""
    if not lib.llama_model_n_layer_nextn(model_ptr):
        return "its GGUF has no MTP (nextn) layers"
    if not loaded_mtp:
        return "it was loaded without its MTP layers (LoadOptions.load_mtp=False)"
    if _nextn_functions(lib) is None:
        return ("this llama.cpp build does not export llama_set_embeddings_nextn / llama_get_embeddings_nextn "
                "under their C++ names")
    return None


class MtpHead:
    """The MTP layer of `model` (a `LlamaModel` loaded with its MTP layers) in its own context,
    following the target's cache (see the module docstring). Rows are in the target's ids."""

    def __init__(self, model):
        lib = model._lib
        self._lib = lib
        self.model = model
        self._set_nextn, self._get_nextn = _nextn_functions(lib)
        self.n_embd = int(lib.llama_model_n_embd(model._model))
        self.n_vocab = model.n_vocab
        params = lib.llama_context_default_params()
        params.ctx_type = lib.LLAMA_CONTEXT_TYPE_MTP
        params.n_ctx = model.n_ctx
        params.n_batch = params.n_ubatch = model.n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = model.n_threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lib.llama_init_from_model(model._model, params)
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp could not create an MTP context for {model.path.name}")
        self._mem = lib.llama_get_memory(self._ctx)
        # The target exports h for every row of a batch (unmasked); the head only for its outputs.
        self._set_nextn(model._ctx, True, False)
        self._set_nextn(self._ctx, True, True)
        self._batch = lib.llama_batch_ext_init(self._ctx)
        self._keep: list = []  # ctypes buffers the current batch points into
        self._zeros = np.zeros(self.n_embd, dtype=np.float32)
        # The target's h rows of its last decode call, from position `_rows_start`.
        self._rows = np.zeros((0, self.n_embd), dtype=np.float32)
        self._rows_start = 0
        self._state = self._zeros  # the MTP layer's output state after the last draft step
        self.seconds = 0.0  # time in draft steps, cumulative (following counts as the target's decode time)
        self.calls = 0  # draft steps that asked for a row, cumulative

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_ext_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- following the target ----------------------------------------------------------------------
    def h_before(self, pos: int) -> np.ndarray:
        """The target's h at position pos - 1 (zeros where it is unknown: at position 0, or after
        a rollback past the target's last call; a wrong h only makes the drafts worse, never the
        output, which the target verifies)."""
        i = pos - 1 - self._rows_start
        return self._rows[i] if 0 <= i < len(self._rows) else self._zeros

    def follow(self, tokens: np.ndarray, start: int) -> None:
        """The target just decoded `tokens` at positions start...: evaluate them here too, each
        paired with the previous position's h (no rows), and keep the target's new h rows."""
        n = len(tokens)
        h = np.ctypeslib.as_array(self._get_nextn(self.model._ctx), shape=(n, self.n_embd))
        paired = np.empty((n, self.n_embd), dtype=np.float32)
        paired[0] = self.h_before(start)
        paired[1:] = h[:-1]
        self._make_room(start)
        t0 = time.perf_counter()
        self._decode(tokens, start, paired, output_last=False)
        self.model.decode_seconds += time.perf_counter() - t0
        self._rows, self._rows_start = h.copy(), start

    def rollback(self, n_keep: int) -> None:
        """Remove entries at positions >= n_keep (the MTP cache is attention-only)."""
        self._lib.llama_memory_seq_rm(self._mem, 0, n_keep, -1)

    def _make_room(self, start: int) -> None:
        """Let the next batch start at `start`: drop what is cached from there on; llama.cpp wants
        positions consecutive, so after a gap (a target decode this head missed, e.g. interrupted
        between the two calls) start over from `start` (drafts then see less context)."""
        self.rollback(start)
        last = int(self._lib.llama_memory_seq_pos_max(self._mem, 0))
        if 0 <= last < start - 1:
            self._lib.llama_memory_clear(self._mem, True)

    def reset(self) -> None:
        self._lib.llama_memory_clear(self._mem, True)
        self._rows = self._rows[:0]

    # -- drafting -------------------------------------------------------------------------------------
    def first_step(self, token: int, pos: int) -> np.ndarray:
        """The row for position pos + 1, from the last committed token (at `pos`, which the target
        has not evaluated yet) and the target's h at pos - 1. A view, valid until the next call."""
        return self._step(token, pos, self.h_before(pos))

    def next_step(self, token: int, pos: int) -> np.ndarray:
        """The row for position pos + 1 after the drafted `token` at `pos`, from the MTP layer's
        own output state of the previous step."""
        return self._step(token, pos, self._state)

    def _step(self, token: int, pos: int, h: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        self._make_room(pos)
        self._decode(np.array([token], dtype=np.int32), pos, h[None, :], output_last=True)
        self._state = np.ctypeslib.as_array(self._get_nextn(self._ctx), shape=(self.n_embd,)).copy()
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.model.decode_seconds += seconds
        self.calls += 1
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def _decode(self, tokens: np.ndarray, start: int, h: np.ndarray, output_last: bool) -> None:
        lib, batch = self._lib, self._batch
        h = np.ascontiguousarray(h, dtype=np.float32)
        lib.llama_batch_ext_clear(batch)
        self._keep = [h]
        row_bytes = self.n_embd * 4
        base = h.ctypes.data
        for i, token in enumerate(tokens.tolist()):
            idx = lib.llama_batch_ext_add_token(batch, 0, token)
            if idx < 0:
                raise RuntimeError(f"llama_batch_ext_add_token failed ({idx}) for the MTP context")
            pos = (lib.llama_pos * 4)(start + i, 0, 0, 0)  # M-RoPE models read 4 position slots
            self._keep.append(pos)
            lib.llama_batch_ext_set_pos(batch, idx, pos)
            row = ctypes.cast(base + i * row_bytes, ctypes.POINTER(ctypes.c_float))
            lib.llama_batch_ext_set_embd_token(batch, idx, lib.llama_embd(row, 1, self.n_embd))
            if output_last and i == len(tokens) - 1:
                lib.llama_batch_ext_set_output_logits(batch, idx, True)
        rc = lib.llama_process(self._ctx, lib.LLAMA_PROCESS_TYPE_DECODE, batch)
        if rc != 0:
            raise RuntimeError(f"llama.cpp's MTP decode failed with code {rc} ({self.model.path.name})")
