"""Train the test-world model family on the CPU and export it to GGUF (`make models`).

    python -m models.train_family [--out models/family] [--only target,draft,counter]

Division of skills (deliberate, see models/family/README.md). Each model has blind spots: facts
its training never teaches. The draft knows the target's blind spots, so where the target first
goes wrong the draft's token is usually the right one (the premise of CoSpec); the draft's own
blind spots are facts the target knows, and they keep the draft the weaker model on average.
- `target`  (largest, best on average): both task families, but it never sees an addition column
  whose sum (digits + carry) is 13, and it gets no training signal for the counting step where
  the running tally goes from 3 to 4 (DataMix.count_hidden_from).
- `draft`   (smallest, cheap enough for speculative decoding): knows both of those facts, but never
  sees an addition column whose sum is 6 or less, and gets no signal for the tally step 4 -> 5.
- `counter` (draft-sized): the counting family only, every fact.

Every run is seeded (torch, data) and single-threaded, so it repeats exactly on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cospec_local.lab.testworld.gguf_export import EOS_ID, CharVocab, LlamaConfig
from cospec_local.lab.testworld.tasks import SPLIT_SIZE, Problem, make_add_problem, make_count_problem
from cospec_local.lab.testworld.torch_llama import TorchLlama

DEFAULT_OUT = Path(__file__).resolve().parent / "family"
PAD_ID = EOS_ID  # padded positions are masked out of the loss, so any id works


@dataclass(frozen=True)
class DataMix:
    """Training distribution: a weight per source and the carry probability of addition problems."""

    add_weight: float
    count_weight: float
    add_thin_sums: tuple[int, ...] = ()  # column sums made rare in this model's addition data
    add_thin_keep: float = 1.0  # probability of keeping a column whose sum is in add_thin_sums
    count_max_length: int = 20  # 20: the evaluation distribution (strings of 5..20 letters)
    # The model never gets a training signal for this counting fact: at the step where the running
    # tally goes from `count_hidden_from` to `count_hidden_from + 1`, the tally digit is masked out
    # of the loss (the text itself is unchanged, so every later step still trains normally).
    count_hidden_from: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Shape, data and optimisation of one family member."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    mix: DataMix
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    # Optional second stage: trained from this stage's final weights with a fresh optimizer, its own
    # seeds and its own schedule (so it can equally be resumed from the stage-1 GGUF).
    continuation: "ModelSpec | None" = None


FAMILY = {
    "target": ModelSpec("target", n_embd=256, n_layer=4, n_head=4, n_ff=1024,
                        mix=DataMix(add_weight=0.5, count_weight=0.5, add_thin_sums=(13,),
                                    add_thin_keep=0.0, count_hidden_from=3),
                        steps=700, lr=2e-3, seed=1,
                        # Stage 1 leaves the target copying letters without counting them; a
                        # count-heavy second stage teaches it (see models/family/README.md).
                        continuation=ModelSpec(
                            "target-stage2", n_embd=256, n_layer=4, n_head=4, n_ff=1024,
                            mix=DataMix(add_weight=0.35, count_weight=0.65, add_thin_sums=(13,),
                                        add_thin_keep=0.0, count_hidden_from=3),
                            steps=300, lr=1e-3, seed=11)),
    "draft": ModelSpec("draft", n_embd=64, n_layer=2, n_head=2, n_ff=192,
                       mix=DataMix(add_weight=0.5, count_weight=0.5, add_thin_sums=(0, 1, 2, 3, 4, 5, 6),
                                   add_thin_keep=0.0, count_hidden_from=4),
                       steps=4000, lr=3e-3, seed=2),
    "counter": ModelSpec("counter", n_embd=64, n_layer=2, n_head=2, n_ff=192,
                         mix=DataMix(add_weight=0.0, count_weight=1.0),
                         steps=2500, lr=3e-3, seed=3),
}


def sample_problem(mix: DataMix, rng: random.Random) -> Problem:
    """One training problem drawn from `mix` (train-split seeds only)."""
    seed = rng.randrange(SPLIT_SIZE)  # the train split is [0, SPLIT_SIZE)
    if rng.random() < mix.add_weight / (mix.add_weight + mix.count_weight):
        return make_add_problem(seed, thin_sums=mix.add_thin_sums, thin_keep=mix.add_thin_keep)
    return make_count_problem(seed, max_length=mix.count_max_length)


def hidden_solution_offsets(problem: Problem, mix: DataMix) -> set[int]:
    """Character offsets in `problem.solution` that `mix` keeps out of the loss (see
    DataMix.count_hidden_from): the tally digit written when the tally reaches
    count_hidden_from + 1. Empty for other problems."""
    if problem.family != "count" or mix.count_hidden_from is None:
        return set()
    offset, previous_tally = 0, 0
    for step in problem.solution.split("\n", 1)[0].split(" "):  # "c0 a0 b1 b2 d2"
        tally = int(step[1:])
        if tally == mix.count_hidden_from + 1 and previous_tally == mix.count_hidden_from:
            return set(range(offset + 1, offset + len(step)))
        offset += len(step) + 1
        previous_tally = tally
    return set()


def make_batch(problems: list[Problem], vocab: CharVocab,
               mix: DataMix | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, loss_mask): next-token pairs over BOS+prompt+solution+EOS; only the
    solution and EOS are scored, since prompts are random and cannot be predicted; offsets that
    `mix` hides (hidden_solution_offsets) are not scored either. The vocabulary is character-level,
    so a character offset in the solution is a token offset."""
    rows, masks = [], []
    for problem in problems:
        prompt_ids = vocab.encode(problem.prompt, add_bos=True)
        solution_ids = vocab.encode(problem.solution, add_bos=False) + [EOS_ID]
        hidden = hidden_solution_offsets(problem, mix) if mix is not None else set()
        rows.append(prompt_ids + solution_ids)
        masks.append([0] * (len(prompt_ids) - 1) + [0 if i in hidden else 1 for i in range(len(solution_ids))])
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1))
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.float)
    return tokens[:, :-1], tokens[:, 1:], mask


def learning_rate(spec: ModelSpec, step: int) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 10% of the peak."""
    warmup = 100
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_gguf_weights(path: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array (PyTorch (out, in) shape) of a file written by this recipe."""
    import gguf

    return {t.name: t.data.copy() for t in gguf.GGUFReader(str(path)).tensors}


def train_model(spec: ModelSpec, vocab: CharVocab, init_weights: dict | None = None,
                log_every: int = 250) -> tuple[TorchLlama, dict]:
    """Train one stage of a family member (from `init_weights` when given, GGUF names -> arrays);
    returns the model and a summary (loss, seconds, parameters)."""
    torch.manual_seed(spec.seed)
    data_rng = random.Random(f"train:{spec.name}:{spec.seed}")
    config = LlamaConfig(n_vocab=vocab.n_vocab, n_embd=spec.n_embd, n_layer=spec.n_layer,
                         n_head=spec.n_head, n_ff=spec.n_ff, n_ctx=512)
    model = TorchLlama(config)
    if init_weights is not None:
        with torch.no_grad():
            for gguf_name, array in init_weights.items():
                model.w(gguf_name).copy_(torch.from_numpy(array))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    started = time.perf_counter()
    recent_losses = []
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step)
        inputs, targets, mask = make_batch([sample_problem(spec.mix, data_rng)
                                            for _ in range(spec.batch_size)], vocab, spec.mix)
        logits = model(inputs)
        token_losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       reduction="none")
        loss = (token_losses * mask.reshape(-1)).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            mean_loss = sum(recent_losses) / len(recent_losses)
            print(f"[{spec.name}] step {step + 1}/{spec.steps} loss {mean_loss:.4f} "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
            recent_losses = []
    summary = {"params": model.num_parameters(), "final_loss": round(mean_loss, 5),
               "train_seconds": round(time.perf_counter() - started, 1), "spec": asdict(spec)}
    return model, summary


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Train the requested family members and write GGUF files, summaries and SHA256SUMS."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", default=",".join(FAMILY), help="comma-separated member names")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: the CPU is shared)")
    parser.add_argument("--continue-from", type=Path,
                        help="stage-1 GGUF of the (single) --only member: run only its continuation")
    args = parser.parse_args(argv)
    if args.continue_from is not None and "," in args.only:
        parser.error("--continue-from needs a single --only member")
    torch.set_num_threads(args.threads)
    try:
        os.nice(19)  # training is background work: never slow down interactive use or benchmarks
    except OSError:
        pass
    vocab = CharVocab()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        spec = FAMILY[name]
        if args.continue_from is None:
            model, summary = train_model(spec, vocab)
            stage1_weights = model.numpy_weights()
        else:  # resume: the GGUF holds exactly the float32 stage-1 weights
            stage1_weights, summary = load_gguf_weights(args.continue_from), {"resumed_from": str(args.continue_from)}
        if spec.continuation is not None:
            model, stage2_summary = train_model(spec.continuation, vocab, init_weights=stage1_weights)
            summary = {**stage2_summary, "stage1": summary,
                       "train_seconds": round(stage2_summary["train_seconds"] + summary.get("train_seconds", 0), 1)}
        path = model.export_gguf(args.out / f"{name}.gguf", vocab, name=f"cospec-testworld-{name}")
        (args.out / f"{name}.train.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {path} ({summary['params']} parameters, {summary['train_seconds']} s)", flush=True)
    ggufs = sorted(args.out.glob("*.gguf"))
    (args.out / "SHA256SUMS").write_text("".join(f"{sha256_of(p)}  {p.name}\n" for p in ggufs))


if __name__ == "__main__":
    main()
