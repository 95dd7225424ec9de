"""The lab's direct model calls: the only places that read models without the engine's loop.

A measurement sometimes needs the raw calls: the time of one call by row count (`measure_costs`,
for bench's predictions; `decode_cost_ms`, for the test world's cost ratio), or a model's greedy
choice at every position of a given reference text (`first_disagreement`, teacher-forced scoring
through the slot's `score`, for the headroom oracle). Everything else decodes through the engine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from ..backend import LlamaModel, LoadOptions
from .testworld.gguf_export import EOS_ID, CharVocab


def measure_costs(pair, prompt: str, repeats: int = 30, max_rows: int = 9) -> dict:
    """Median time of a one-token call of each model after a short prefix, and the target's
    verification call time for 1..max_rows logit rows (interleaved, so drift hits both alike)."""
    target = pair.engine.slot("target")
    others = [slot for slot in pair.engine.slots if slot is not target]
    prefix = pair.tokenize(prompt)
    filler = (prefix[1:] * (max_rows // max(len(prefix) - 1, 1) + 2))[:max_rows]
    pair.engine.reset()
    for slot in pair.engine.slots:
        slot.model.eval(slot.to_model(prefix), 0)
    t_rows = {n: [] for n in range(1, max_rows + 1)}
    t_others = {slot.name: [] for slot in others}
    for _ in range(repeats):
        for n in t_rows:
            t0 = time.perf_counter()
            target.model.eval(filler[:n], n)
            t_rows[n].append(time.perf_counter() - t0)
            target.model.rollback(len(prefix))
        for slot in others:
            t0 = time.perf_counter()
            slot.model.eval(slot.to_model(filler[:1]), 1)
            t_others[slot.name].append(time.perf_counter() - t0)
            slot.model.rollback(len(prefix))
    pair.engine.reset()
    target_ms = statistics.median(t_rows[1]) * 1e3
    costs = {
        "target_call_ms": target_ms,
        "call_ms": {name: statistics.median(v) * 1e3 for name, v in t_others.items()},
        "verify_ms_by_rows": {n: statistics.median(v) * 1e3 for n, v in t_rows.items()},
    }
    if "draft" in costs["call_ms"]:
        costs["draft_call_ms"] = costs["call_ms"]["draft"]
        costs["c"] = costs["draft_call_ms"] / target_ms
    return costs


def first_disagreement(pair, prompt_ids: list[int], reference_ids: list[int], slot_name: str = "draft",
                       eos_id: int = EOS_ID) -> tuple[int, int] | None:
    """(position, model's token) of the first place where the slot's greedy choice differs from
    `reference_ids` (a completion of `prompt_ids` that ends with an implicit EOS); None if it never does."""
    slot = pair.engine.slot(slot_name)
    run = reference_ids + [eos_id]
    slot.prepare(prompt_ids)
    slot.prefill(prompt_ids)
    try:
        step = slot.model.exact_batch  # rows come in exact-size batches
        for start in range(0, len(run), step):
            end = min(start + step, len(run))
            slot.score(prompt_ids, run[: end - 1])  # rows for positions start..end-1
            for position in range(start, end):
                token = slot.to_shared(int(np.argmax(slot.rows[position])))
                if token != run[position]:
                    return position, token
        return None
    finally:
        slot.clear_rows()
        slot.rollback(len(prompt_ids))


def decode_cost_ms(path: str | Path, n_threads: int = 2, n_steps: int = 200, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time (ms) of one single-token decode with last-row
    logits, after a 20-token prompt."""
    model = LlamaModel(path, LoadOptions(n_ctx=512, n_threads=n_threads))
    prompt = CharVocab().encode("Q: 4571+3689=?\n1+9+")
    means = []
    for _ in range(repeats):
        model.reset()
        model.eval(prompt, 0)  # fills the KV cache for positions 0..19
        started = time.perf_counter()
        for step in range(n_steps):
            model.eval([prompt[1 + step % (len(prompt) - 1)]], 1)
        means.append((time.perf_counter() - started) * 1e3 / n_steps)
    model.close()
    return statistics.median(means)
