"""Checking that a draft and a target can decode together, and mapping token ids between them.

Three drafts are supported:
- same vocabulary as the target (checked token by token, like llama.cpp's own check);
- a padded pair: the target has up to `MAX_EXTRA_TARGET_TOKENS` more tokens than the draft at the
  end of its vocabulary and every shared token is identical, as llama.cpp accepts (Qwen2.5's 0.5B
  GGUF has 151,936 tokens, its 7B-72B 152,064: padded embedding rows written as `[PAD...]`). The
  draft can never propose the target's extra tokens; when the target emits one, the draft is fed
  its unknown token (or its padding token, or token 0) at that position;
- a vocabulary-trimmed draft made by `cospec-local make-draft`, which stores the target id of each of
  its tokens in the GGUF metadata key `cospec.draft_to_target`. Target tokens the draft lacks are fed
  to the draft as its unknown token.
Drafts from another model family (another tokenizer) are refused up front with what would work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import IncompatiblePairError

DRAFT_TO_TARGET_KEY = "cospec.draft_to_target"
SOURCE_VOCAB_KEY = "cospec.source_vocab_size"
VOCAB_TYPES = {0: "none", 1: "SPM", 2: "BPE", 3: "WPM", 4: "UGM", 5: "RWKV", 6: "PLaMo2"}
# llama.cpp's own limit (SPEC_VOCAB_MAX_SIZE_DIFFERENCE in common/speculative.cpp).
MAX_EXTRA_TARGET_TOKENS = 128
WHAT_WORKS = (
    "a draft from the target's own family (same tokenizer, e.g. Qwen2.5-0.5B for a Qwen2.5 target), "
    "a vocabulary-trimmed copy of the target (`cospec-local make-draft TARGET -o draft.gguf`), "
    "or prompt-lookup drafts that need no draft model (`--draft-source ngram`)"
)


def tokenizer_name(model) -> str:
    """The tokenizer a GGUF declares, e.g. 'gpt2/qwen2' (BPE model / pre-tokenizer) or 'llama' (SPM)."""
    kind = model.metadata.get("tokenizer.ggml.model", VOCAB_TYPES.get(model.vocab_type, "?"))
    pre = model.metadata.get("tokenizer.ggml.pre")
    return f"{kind}/{pre}" if pre and pre != "default" else kind


@dataclass
class TokenMap:
    """Id translation between a draft and its target. `draft_to_target[i]` is the target id of
    draft token i; `target_to_draft[t]` the draft id of target token t (the draft's unknown token
    when it lacks t)."""

    draft_to_target: np.ndarray
    target_to_draft: np.ndarray
    n_missing: int  # target tokens with no draft id

    @classmethod
    def from_draft_ids(cls, draft_to_target: np.ndarray, n_target_vocab: int, draft_unk: int) -> "TokenMap":
        d2t = np.asarray(draft_to_target, dtype=np.int64)
        t2d = np.full(n_target_vocab, draft_unk, dtype=np.int64)
        t2d[d2t] = np.arange(len(d2t))
        return cls(d2t, t2d, int(n_target_vocab - len(np.unique(d2t))))

    def to_draft(self, target_ids) -> list[int]:
        return self.target_to_draft[np.asarray(target_ids, dtype=np.int64)].tolist()

    def to_target(self, draft_id: int) -> int:
        return int(self.draft_to_target[draft_id])

    def row(self, draft_probs: np.ndarray) -> "MappedRow":
        """A draft distribution read in target ids, without building a target-wide array."""
        return MappedRow(draft_probs, self)


class MappedRow:
    """A draft-vocabulary distribution seen as a row over TARGET ids (zero where the draft lacks
    a token). Supports what rejection sampling needs: `row[target_id]` and `residual_from(p)`."""

    def __init__(self, draft_probs: np.ndarray, token_map: TokenMap):
        self.draft_probs = draft_probs
        self.map = token_map

    def __getitem__(self, target_id: int) -> float:
        draft_id = self.map.target_to_draft[target_id]
        return float(self.draft_probs[draft_id]) if self.map.draft_to_target[draft_id] == target_id else 0.0

    def residual_from(self, target_probs: np.ndarray) -> np.ndarray:
        """max(0, p - q) over target ids."""
        out = target_probs.copy()
        out[self.map.draft_to_target] -= self.draft_probs
        return np.maximum(out, 0.0, out=out)


def read_draft_map(path) -> np.ndarray | None:
    """The `cospec.draft_to_target` array of a GGUF, or None. (llama.cpp does not expose array
    metadata, so this reads the file with the gguf package.)"""
    import gguf

    field = gguf.GGUFReader(path).fields.get(DRAFT_TO_TARGET_KEY)
    if field is None:
        return None
    return np.concatenate([field.parts[i] for i in field.data]).astype(np.int64)


@dataclass
class PairReport:
    """What the pair check found, for `cospec-local info`."""

    target_vocab: int
    draft_vocab: int
    vocab_type: str
    trimmed: bool  # a make-draft draft (its own token map)
    n_missing: int  # target tokens the draft lacks (trimmed away, or the target's padding)
    token_map: TokenMap | None
    tokenizer: str = ""  # e.g. 'gpt2/qwen2'

    @property
    def padded(self) -> bool:
        """The target has extra tokens past the end of an otherwise identical draft vocabulary."""
        return not self.trimmed and self.token_map is not None


def check_pair(draft, target) -> PairReport:
    """Raise IncompatiblePairError naming the first difference, else describe the pair.

    `draft` and `target` are `backend.LlamaModel`s (anything with the same vocabulary methods).
    """
    dname, tname = draft.path.name, target.path.name
    d_tok, t_tok = tokenizer_name(draft), tokenizer_name(target)
    if draft.vocab_type != target.vocab_type or d_tok != t_tok:
        raise IncompatiblePairError(
            f"the draft and the target use different tokenizers: draft {dname} has {d_tok} "
            f"({VOCAB_TYPES.get(draft.vocab_type, draft.vocab_type)}, {draft.n_vocab} tokens), target {tname} has "
            f"{t_tok} ({VOCAB_TYPES.get(target.vocab_type, target.vocab_type)}, {target.n_vocab} tokens), so their "
            f"token ids mean different things. What works: {WHAT_WORKS}"
        )
    # make-draft also writes this scalar key, which llama.cpp does expose: skip parsing other drafts.
    d2t = read_draft_map(draft.path) if SOURCE_VOCAB_KEY in draft.metadata else None
    token_map = None
    if d2t is not None:
        if len(d2t) != draft.n_vocab:
            raise IncompatiblePairError(
                f"{dname}: {DRAFT_TO_TARGET_KEY} has {len(d2t)} entries but the draft has {draft.n_vocab} tokens"
            )
        if d2t.min() < 0 or d2t.max() >= target.n_vocab:
            raise IncompatiblePairError(
                f"{dname}: its token map points outside the target's vocabulary of {target.n_vocab} tokens "
                f"(was it made from another model than {tname}?)"
            )
        unk = int(draft.metadata.get("tokenizer.ggml.unknown_token_id", 0))
        token_map = TokenMap.from_draft_ids(d2t, target.n_vocab, unk)
        pairs = ((i, int(d2t[i])) for i in range(draft.n_vocab))
    else:
        n_extra = target.n_vocab - draft.n_vocab
        if n_extra < 0 or n_extra > MAX_EXTRA_TARGET_TOKENS:
            raise IncompatiblePairError(
                f"vocabulary sizes differ: draft {dname} has {draft.n_vocab} tokens, target {tname} has "
                f"{target.n_vocab}; a pair may differ only by up to {MAX_EXTRA_TARGET_TOKENS} extra (padding) tokens "
                f"at the end of the TARGET's vocabulary, and the draft carries no token map. What works: {WHAT_WORKS}"
            )
        if n_extra:  # padded: shared ids are identical, the target's extra ones have no draft id
            fill = next((int(draft.metadata[k]) for k in ("tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")
                         if k in draft.metadata), 0)
            token_map = TokenMap.from_draft_ids(np.arange(draft.n_vocab), target.n_vocab, fill)
        pairs = ((i, i) for i in range(draft.n_vocab))
    for d_id, t_id in pairs:
        d_text, t_text = draft.token_text(d_id), target.token_text(t_id)
        if d_text != t_text:
            sizes = (f"vocabulary sizes differ (draft {draft.n_vocab}, target {target.n_vocab} tokens) and the "
                     "shared ids are not the same tokens, so this is no padded pair: "
                     if draft.n_vocab != target.n_vocab and d2t is None else "")
            raise IncompatiblePairError(
                f"{sizes}vocabularies differ: draft token {d_id} is {d_text!r} but target token {t_id} is {t_text!r}"
            )
    for role, d_id, t_id in (("BOS", draft.bos_id, target.bos_id), ("EOS", draft.eos_id, target.eos_id)):
        mapped = d_id if token_map is None or d_id < 0 else token_map.to_target(d_id)
        if mapped != t_id:
            raise IncompatiblePairError(f"{role} tokens differ: draft {dname} has {d_id}, target {tname} has {t_id}")
    return PairReport(
        target_vocab=target.n_vocab,
        draft_vocab=draft.n_vocab,
        vocab_type=VOCAB_TYPES.get(target.vocab_type, str(target.vocab_type)),
        trimmed=d2t is not None,
        n_missing=token_map.n_missing if token_map else 0,
        token_map=token_map,
        tokenizer=t_tok,
    )
