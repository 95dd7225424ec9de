"""`LlamaModel`: one GGUF model, one llama.cpp context and one sequence (seq 0), evaluated through
llama-cpp-python's low-level ctypes API."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ContextOverflowError, ModelLoadError, RollbackError
from ._lib import _init_backend
from .mtp import MtpHead, mtp_unavailable_reason
from .build import check_build_fits_cpu, default_threads
from .weights import EXACT_CPU_BATCH, EXACT_PREFILL_N_BATCH, LoadOptions, _Weights, check_gguf_file

# Positions of recurrent state llama.cpp keeps for rollback (its n_rs_seq): a verification batch.
RECURRENT_SNAPSHOTS = EXACT_CPU_BATCH


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
        # Recurrent layers (Mamba, gated delta nets) keep one state, not one entry per position:
        # llama.cpp can keep snapshots of the last few positions' states for architectures that
        # support it (clamped to 0 otherwise), so a rejected verification batch rolls back natively.
        ctx_params.n_rs_seq = RECURRENT_SNAPSHOTS
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
        # "attention": positions can be removed from the end; "recurrent"/"hybrid": rolling back
        # needs llama.cpp's state snapshots (`n_rs_seq`) or our own checkpoints of the state.
        self.memory = ("hybrid" if llama_cpp.llama_model_is_hybrid(self._model)
                       else "recurrent" if llama_cpp.llama_model_is_recurrent(self._model) else "attention")
        self.native_snapshots = int(llama_cpp.llama_n_rs_seq(self._ctx))
        self._checkpoints = RecurrentCheckpoints(self) if self.memory != "attention" else None
        # Set per generation by the mode (copies cost a memcpy of the recurrent state per call).
        self.keeps_state_copies = True
        # Whether a rejected proposal can be taken back: always for attention; for recurrent
        # layers only if llama.cpp can copy their state (a backend might not serialise it).
        self.can_roll_back = self._checkpoints is None or llama_cpp.llama_state_seq_get_size_ext(
            self._ctx, 0, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) > 0

        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)  # llama.cpp caps it at n_ctx
        self.n_threads = n_threads
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_past = 0  # tokens currently in the KV cache
        self._last_call_start = 0  # position of the first token of the last llama_decode call
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
        # The model's own multi-token-prediction layers as a draft (`backend.mtp`), made on first use
        # (`enable_mtp`): from then on the head follows every decode of this context.
        self.n_mtp_layers = int(llama_cpp.llama_model_n_layer_nextn(self._model))
        self.mtp_unavailable = mtp_unavailable_reason(llama_cpp, self._model, self._weights.loaded_mtp)
        self.mtp: MtpHead | None = None

    def new_context(self, n_threads: int | None = None) -> "LlamaModel":
        """Another context (own KV cache, own sequence) on these same weights: no second copy of
        the model in memory. `n_threads` defaults to this context's."""
        from dataclasses import replace

        options = replace(self.options, n_threads=n_threads or self.n_threads)
        return LlamaModel(self.path, options, _weights=self._weights)

    def grammar_tokenizer(self):
        """llguidance's tokenizer for this model's vocabulary, ending at any end-of-generation token
        (built once per loaded model and shared by its contexts: ~1 s for a 150k vocabulary)."""
        weights = self._weights
        if weights.grammar_tokenizer is None:
            import warnings

            from llguidance.llamacpp import lltokenizer_from_vocab

            with warnings.catch_warnings():  # it reads token attributes through a deprecated binding
                warnings.simplefilter("ignore", DeprecationWarning)
                weights.grammar_tokenizer = lltokenizer_from_vocab(self._vocab, eos_token=[int(t) for t in self.eog_ids()])
        return weights.grammar_tokenizer

    def enable_mtp(self) -> MtpHead:
        """The MTP head of this context, made now if needed. It must see every decode from position
        0, so a context that already holds tokens is emptied first (the next prefill recomputes
        them). Raises ValueError where the model has no usable MTP layers (`mtp_unavailable`)."""
        if self.mtp is None:
            if self.mtp_unavailable is not None:
                raise ValueError(f"{self.path.name} cannot draft with MTP layers: {self.mtp_unavailable}")
            self.reset()
            self.mtp = MtpHead(self)
        return self.mtp

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and batch, and the weights once no other context uses them (safe to
        call twice)."""
        lib = self._lib
        if getattr(self, "mtp", None) is not None:
            self.mtp.close()
            self.mtp = None
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
        if self._checkpoints is not None and n_logits and self.keeps_state_copies:  # it may be rolled back
            self._checkpoints.save()
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
            self._last_call_start = self.n_past
            t0 = time.perf_counter()
            rc = lib.llama_decode(self._ctx, self._batch)
            self.decode_seconds += time.perf_counter() - t0
            if rc != 0:
                self._resync_after_failure()
                if rc == 1:
                    raise ContextOverflowError(f"llama.cpp found no KV slot for {m} tokens ({self.path.name})")
                raise RuntimeError(f"llama_decode failed with code {rc} ({self.path.name})")
            if self.mtp is not None:
                self.mtp.follow(tokens[start:end], self.n_past)
            self.n_past += m
            if self._checkpoints is not None:
                self._checkpoints.tokens.extend(tokens[start:end].tolist())
        if n_logits == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = lib.llama_get_logits_ith(self._ctx, -n_logits)
        return np.ctypeslib.as_array(ptr, shape=(n_logits, self.n_vocab))

    @property
    def state_copy_seconds(self) -> float:
        """Seconds spent saving and restoring copies of the recurrent state, cumulative."""
        return self._checkpoints.seconds if self._checkpoints is not None else 0.0

    def _resync_after_failure(self) -> None:
        # After a fatal decode some ubatches may remain cached: trust llama.cpp's own position.
        pos_max = self._lib.llama_memory_seq_pos_max(self._mem, 0)
        self.n_past = int(pos_max) + 1

    def rollback(self, n_keep: int) -> None:
        """Remove cached positions >= n_keep so the next `eval` continues after token n_keep - 1."""
        if n_keep < 0:
            raise ValueError("n_keep must be >= 0")
        if self._checkpoints is not None and n_keep >= self.n_past:
            return  # nothing cached past n_keep
        # llama.cpp's recurrent snapshots hold the states inside its last decode call only, and
        # its seq_rm says yes to a rollback past that call's first token, leaving a wrong state
        # (measured): past it, our own copies roll back instead.
        native = self._checkpoints is None or n_keep > self._last_call_start
        ok = native and self._lib.llama_memory_seq_rm(self._mem, 0, n_keep, -1)
        if not ok and self._checkpoints is not None:
            ok = self._checkpoints.restore(n_keep)
        if not ok:
            raise RollbackError(
                f"{self.path.name}: llama.cpp cannot remove part of this model's memory (recurrent or "
                "hybrid architecture); speculative decoding needs a model whose KV cache can roll back"
            )
        # Ask llama.cpp rather than trust our count: an interrupt between llama_decode returning and
        # our bookkeeping must not leave stale positions behind.
        self.n_past = min(n_keep, int(self._lib.llama_memory_seq_pos_max(self._mem, 0)) + 1)
        if self._checkpoints is not None:
            self._checkpoints.forget_after(self.n_past)
        if self.mtp is not None:
            self.mtp.rollback(self.n_past)

    def reset(self) -> None:
        """Empty the KV cache."""
        self._lib.llama_memory_clear(self._mem, True)
        self.n_past = 0
        if self._checkpoints is not None:
            self._checkpoints.forget_after(0)
        if self.mtp is not None:
            self.mtp.reset()


class RecurrentCheckpoints:
    """Copies of a recurrent or hybrid model's recurrent state, taken before each scoring call while
    `LlamaModel.keeps_state_copies` (the mode sets it where a rollback can reach past the model's
    last call), so that positions llama.cpp cannot remove (its own snapshots cover only the last batch, and not
    every architecture) can still be rolled back: restore the latest copy at or before the target
    position, drop the attention entries after it, and re-evaluate the tokens in between. Only
    the recurrent part is copied (`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`): attention entries are
    removed per position as usual. `seconds` counts the time spent saving and restoring
    (`GenerationStats.t_state_copies`)."""

    KEEP = 2 * EXACT_CPU_BATCH  # a draft's one-token calls and the verification after them

    def __init__(self, model: "LlamaModel"):
        self.model = model
        self.tokens: list[int] = []  # every token in the cache, to re-evaluate after a restore
        self._saved: list[tuple[int, ctypes.Array]] = []  # (position, recurrent state), oldest first
        self.seconds = 0.0

    def save(self) -> None:
        """Copy the recurrent state as it is now (at position model.n_past)."""
        lib, model = self.model._lib, self.model
        t0 = time.perf_counter()
        flags = lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = lib.llama_state_seq_get_size_ext(model._ctx, 0, flags)
        buf = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data_ext(model._ctx, buf, size, 0, flags) != size:
            raise RollbackError(f"{model.path.name}: llama.cpp could not copy this model's recurrent state")
        if self._saved and self._saved[-1][0] == model.n_past:
            self._saved.pop()
        self._saved.append((model.n_past, buf))
        del self._saved[: -self.KEEP]
        self.seconds += time.perf_counter() - t0

    def restore(self, n_keep: int) -> bool:
        """Roll the cache back to `n_keep` positions from the latest copy at or before it (with none,
        by evaluating the first `n_keep` tokens afresh); False when llama.cpp refuses the copy."""
        lib, model = self.model._lib, self.model
        usable = [(pos, buf) for pos, buf in self._saved if pos <= n_keep]
        if not usable:  # e.g. a new prompt sharing only an old prefix: recompute it
            replay = self.tokens[:n_keep]
            model.reset()
            if replay:
                model.eval(replay, 0)
            return True
        pos, buf = usable[-1]
        t0 = time.perf_counter()
        flags = lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        if lib.llama_state_seq_set_data_ext(model._ctx, buf, len(buf), 0, flags) != len(buf):
            return False
        # The recurrent state now ends at pos - 1: removing what follows touches only attention.
        if not lib.llama_memory_seq_rm(model._mem, 0, pos, -1):
            return False
        self.seconds += time.perf_counter() - t0
        model.n_past = pos
        replay = self.tokens[pos:n_keep]
        del self.tokens[pos:]
        self.forget_after(pos)
        if replay:
            model.eval(replay, 0)
        return True

    def forget_after(self, n_past: int) -> None:
        """The cache now holds `n_past` tokens: drop copies and tokens beyond it."""
        del self.tokens[n_past:]
        self._saved = [(pos, buf) for pos, buf in self._saved if pos <= n_past]
