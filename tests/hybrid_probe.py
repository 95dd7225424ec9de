"""Exploration of the tiny qwen35 models beyond what the tests assert (not collected by pytest):
`python tests/hybrid_probe.py [out_dir]` builds a target/draft pair that agrees on some tokens and
prints the smoke check (memory kind, seq_rm, state copy sizes and timings, llama.cpp's own
rollback) and the MTP check (whether the MTP layer loads and drafts from Python)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from hybrid import RawContext, build_llama_draft, build_qwen35, rs_rollback_check  # noqa: E402


def build_pair(out_dir, seed: int = 0, mtp: bool = False, residual_scale: float = 0.3,
               draft_layers: int = 1) -> tuple[Path, Path]:
    """(qwen35 target, llama draft) written to `out_dir`, agreeing on some tokens (module doc)."""
    out_dir = Path(out_dir)
    tag = f"s{seed}{'-mtp' if mtp else ''}"
    target = build_qwen35(out_dir / f"qwen35-{tag}-target.gguf", seed, mtp=mtp, tied_output=False,
                          residual_scale=residual_scale)
    draft = build_llama_draft(out_dir / f"qwen35-{tag}-llama-draft.gguf", seed, n_layer=draft_layers,
                              tied_output=False, residual_scale=residual_scale)
    return target, draft


def _median_seconds(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def smoke_check(target, draft=None, prompt: str = "The quick brown fox jumps over the lazy dog. " * 3) -> dict:
    """Load `target` with LlamaModel, decode, and try llama.cpp's memory and state APIs on it."""
    import ctypes

    import llama_cpp as lib

    from cospec_local.backend import LlamaModel, LoadOptions

    r: dict = {}
    opts = LoadOptions(n_ctx=256, n_threads=1)
    m = LlamaModel(target, opts)
    ctx, mem = m._ctx, m._mem
    r["is_hybrid"] = bool(lib.llama_model_is_hybrid(m._model))
    r["is_recurrent"] = bool(lib.llama_model_is_recurrent(m._model))
    r["n_layer"] = lib.llama_model_n_layer(m._model)
    r["n_layer_nextn"] = lib.llama_model_n_layer_nextn(m._model)
    r["n_vocab"] = m.n_vocab
    r["llamamodel_n_rs_seq"] = lib.llama_n_rs_seq(ctx)  # whatever LlamaModel asks for
    tokens = m.tokenize(prompt)
    r["n_prompt"] = len(tokens)
    logits = m.eval(tokens).copy()
    r["logits_finite"] = bool(np.isfinite(logits).all())
    r["logits_std"] = float(logits.std())
    greedy = [int(logits[0].argmax())]
    for _ in range(7):
        greedy.append(int(m.eval([greedy[-1]])[0].argmax()))
    r["greedy"] = m.detokenize(greedy)
    p = m.n_past - 2
    r["llamamodel_seq_rm_partial"] = bool(lib.llama_memory_seq_rm(mem, 0, p, -1))

    # Partial removal without snapshots: the recurrent state cannot drop its last tokens.
    raw = RawContext(m._model, n_rs_seq=0)
    raw.prefill(tokens)
    r["seq_rm_partial_n_rs_seq_0"] = raw.seq_rm(len(tokens) - 2)
    r["pos_max_after_refused_rm"] = raw.pos_max()  # unchanged: the recurrent side refuses first
    r["seq_rm_all_n_rs_seq_0"] = raw.seq_rm(0)
    raw.close()

    # State save / restore after a prefix, against a fresh context that decoded only the prefix.
    prefix, extra, nxt = tokens[:24], tokens[24:27], tokens[27]
    fresh = m.new_context()
    fresh.eval(prefix)
    want = fresh.eval([nxt])[0].copy()
    fresh.close()
    r["state"] = {}
    for name, flags in (("none", 0), ("partial_only", lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)):
        m.reset()
        m.eval(prefix)
        size = lib.llama_state_seq_get_size_ext(ctx, 0, flags)
        buf = (ctypes.c_uint8 * size)()
        save_s = _median_seconds(lambda: lib.llama_state_seq_get_data_ext(ctx, buf, size, 0, flags))
        wrote = lib.llama_state_seq_get_data_ext(ctx, buf, size, 0, flags)
        m.eval(extra)
        read = lib.llama_state_seq_set_data_ext(ctx, buf, size, 0, flags)
        # PARTIAL_ONLY restores the recurrent state alone: trim the attention cache by hand (the
        # recurrent side, now at the prefix's end, has nothing at these positions to refuse).
        rm = bool(lib.llama_memory_seq_rm(mem, 0, len(prefix), -1)) if flags else None
        pos_max = lib.llama_memory_seq_pos_max(mem, 0)
        m.n_past = pos_max + 1
        got = m.eval([nxt])[0].copy()
        restore_s = _median_seconds(lambda: lib.llama_state_seq_set_data_ext(ctx, buf, size, 0, flags))
        r["state"][name] = dict(size=size, wrote=wrote, read=read, seq_rm_after_restore=rm, pos_max=pos_max,
                                bit_identical=bool(np.array_equal(got, want)),
                                max_abs_diff=float(np.abs(got - want).max()),
                                save_ms=save_s * 1e3, restore_ms=restore_s * 1e3)

    # One decode call of one token (median of 20, at growing positions).
    m.reset()
    m.eval(prefix)
    toks = iter(range(1000, 1040))
    r["decode_1_token_ms"] = _median_seconds(lambda: m.eval([next(toks)])) * 1e3
    # A batch of 4 against the same 4 tokens one at a time (the chunked delta net vs its recurrence).
    m.reset()
    m.eval(prefix)
    batch = m.eval(tokens[24:28])[0].copy()
    m.reset()
    m.eval(prefix)
    for t in tokens[24:28]:
        one = m.eval([t])[0].copy()
    r["batch4_vs_single_bit_identical"] = bool(np.array_equal(batch, one))
    r["rs_rollback"] = rs_rollback_check(m._model, tokens)
    m.close()

    if draft is not None:
        d = LlamaModel(draft, opts)
        t = LlamaModel(target, opts)
        r["draft_n_vocab"] = d.n_vocab
        r["draft_same_tokenization"] = d.tokenize(prompt) == tokens
        # How often the draft's greedy token equals the target's along the target's greedy path.
        lt, ld = t.eval(tokens)[0], d.eval(tokens)[0]
        agree, n = 0, 32
        for _ in range(n):
            nt = int(lt.argmax())
            agree += nt == int(ld.argmax())
            lt, ld = t.eval([nt])[0], d.eval([nt])[0]
        r["draft_greedy_agreement"] = agree / n
        d.close()
        t.close()
    return r


def _nextn_api():
    """llama_set_embeddings_nextn / llama_get_embeddings_nextn: declared in llama.cpp's
    src/llama-ext.h, exported by libllama.so with C++ (mangled) names, not bound by llama_cpp."""
    import ctypes

    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    set_nextn = getattr(lib, "_Z26llama_set_embeddings_nextnP13llama_contextbb")
    set_nextn.argtypes, set_nextn.restype = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None
    get_nextn = getattr(lib, "_Z26llama_get_embeddings_nextnP13llama_context")
    get_nextn.argtypes, get_nextn.restype = [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)
    return set_nextn, get_nextn


def mtp_check(path) -> dict:
    """Load an `mtp=True` target without and with load_mtp; with it, run llama.cpp's MTP draft
    step as common/speculative.cpp does: the target exports its pre-head hidden rows h (the
    "nextn" embeddings), an MTP context decodes each token paired with the previous position's h,
    then drafts from (next token, last h). An MTP context on a model loaded WITHOUT load_mtp
    aborts the process (GGML_ASSERT "MTP block missing nextn.eh_proj"), so none is made there."""
    import ctypes

    import llama_cpp as lib

    from cospec_local.backend._lib import _init_backend

    _init_backend(False)
    out = {}
    for load_mtp in (False, True):
        mp = lib.llama_model_default_params()
        mp.load_mtp = load_mtp
        model = lib.llama_model_load_from_file(str(path).encode(), mp)
        res = {"loaded": bool(model)}
        out[f"load_mtp={load_mtp}"] = res
        if not model:
            continue
        res["n_layer"] = lib.llama_model_n_layer(model)
        res["n_layer_nextn"] = lib.llama_model_n_layer_nextn(model)
        tgt = RawContext(model, n_batch=16)
        toks = list(range(1000, 1010))
        logits = tgt.decode(toks, 0)
        res["target_decodes"] = bool(np.isfinite(logits).all())
        if load_mtp:
            set_nextn, get_nextn = _nextn_api()
            dft = RawContext(model, n_batch=16, ctx_type=lib.LLAMA_CONTEXT_TYPE_MTP)
            set_nextn(tgt.ctx, True, False)
            set_nextn(dft.ctx, True, True)
            tgt.clear()
            tgt.decode(toks, 0)
            n_embd = lib.llama_model_n_embd(model)
            h = np.ctypeslib.as_array(get_nextn(tgt.ctx), shape=(len(toks), n_embd)).copy()
            batch = lib.llama_batch_ext_init(dft.ctx)
            keep = []

            def add(token, pos, row, output):
                idx = lib.llama_batch_ext_add_token(batch, 0, token)
                p = (lib.llama_pos * 4)(pos, 0, 0, 0)
                row = np.ascontiguousarray(row, dtype=np.float32)
                keep.extend([p, row])
                lib.llama_batch_ext_set_pos(batch, idx, p)
                lib.llama_batch_ext_set_embd_token(
                    batch, idx, lib.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, n_embd))
                if output:
                    lib.llama_batch_ext_set_output_logits(batch, idx, True)

            for k, t in enumerate(toks):  # catch-up: token k with h of position k - 1
                add(t, k, h[k - 1] if k else np.zeros(n_embd), False)
            rc1 = lib.llama_process(dft.ctx, lib.LLAMA_PROCESS_TYPE_DECODE, batch)
            lib.llama_batch_ext_clear(batch)
            add(int(logits.argmax()), len(toks), h[-1], True)  # the draft step
            rc2 = lib.llama_process(dft.ctx, lib.LLAMA_PROCESS_TYPE_DECODE, batch)
            mtp_logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(dft.ctx, -1), shape=(dft.n_vocab,))
            res["mtp_context"] = True
            res["mtp_process_rc"] = [rc1, rc2]
            res["mtp_logits_finite"] = bool(np.isfinite(mtp_logits).all())
            res["mtp_logits_std"] = float(mtp_logits.std())
            lib.llama_batch_ext_free(batch)
            dft.close()
        tgt.close()
        lib.llama_model_free(model)
    return out


if __name__ == "__main__":
    import json

    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hybrid_models")
    t0 = time.perf_counter()
    target = build_qwen35(out_dir / "qwen35-target.gguf", seed=0)
    target_mtp = build_qwen35(out_dir / "qwen35-mtp-target.gguf", seed=0, mtp=True)
    draft = build_llama_draft(out_dir / "qwen35-llama-draft.gguf", seed=0)
    pair = build_pair(out_dir, seed=0)
    print(f"built in {time.perf_counter() - t0:.1f} s:",
          {p.name: p.stat().st_size for p in (target, target_mtp, draft, *pair)})
    print(json.dumps(smoke_check(target, draft), indent=1))
    print("build_pair agreement:", smoke_check(*pair)["draft_greedy_agreement"])
    print(json.dumps(mtp_check(target_mtp), indent=1))
