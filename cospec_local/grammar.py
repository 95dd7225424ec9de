"""Constrained decoding: a grammar restricts which tokens the reply may contain, in every mode.

The output follows the *constrained target*: at each position the target's (or r's) distribution
restricted to the tokens the grammar allows there, renormalised. Grammars are compiled and matched
by llguidance (Rust; token masks in tens of microseconds, consumed tokens can be rolled back), on a
tokenizer built once per model from its llama.cpp vocabulary (`LlamaModel.grammar_tokenizer`).

- `Grammar`: what the user asked for (a JSON schema, any JSON object, a regular expression, a Lark
  or GBNF grammar); `compile()` checks it and raises `GrammarError` naming what is wrong.
- `GrammarState`: one generation's matcher. It sits at the committed context and follows the
  pending tokens on demand: `forbidden(pending, j)` is the set of tokens the grammar forbids at
  pending position j, i.e. after the committed reply and pending tokens 0..j-1; `mask_row` sets
  them to -inf in a row of logits, which the engine does to every verified row (and the proposers
  to their draft rows) before anything reads them.
  `commit(tokens)` moves the committed state on; `forced()` lists the tokens that are the only one
  the grammar allows, one after the other (emitted with no model call: the constrained target is
  one-hot there); `fast_forward()` the canonical tokens of the bytes the grammar forces (a free
  proposal, verified like an n-gram match); `valid_prefix` cuts an n-gram proposal at its first
  forbidden token.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass

import numpy as np

from .errors import CospecError

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")
# JSON layout the compiled schemas produce: Python's json.dumps separators, no free whitespace
# (free whitespace lets a model pad forever; fixed layout also forces more tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(CospecError, ValueError):
    """An invalid schema, regular expression or grammar (the message says what is wrong)."""


@dataclass(frozen=True)
class Grammar:
    """A constraint on the reply: `kind` (one of GRAMMAR_KINDS) and its text (a JSON schema as
    JSON text, a regular expression, a Lark or GBNF grammar; empty for json_object)."""

    kind: str
    text: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Grammar":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        return cls("lark", text)

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        return cls("gbnf", text)

    def compile(self) -> str:
        """The llguidance grammar; raises GrammarError when the input is invalid. Cached: a client
        repeating its schema pays the checks once (~35 ms for a small schema)."""
        return _compile(self.kind, self.text)


@functools.lru_cache(maxsize=64)
def _compile(kind: str, text: str) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; choose one of {', '.join(GRAMMAR_KINDS)}")
    if kind in ("json_schema", "json_object"):
        schema = check_json_schema(text) if kind == "json_schema" else {"type": "object"}
        try:
            compiled = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    elif kind == "regex":
        compiled = LLMatcher.grammar_from_regex(text)
    else:
        if kind == "gbnf":
            try:
                text = any_to_lark(text)
            except Exception as e:  # its parser raises its own error types
                raise GrammarError(f"invalid GBNF grammar: {e}") from None
        compiled = LLMatcher.grammar_from_lark(text)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(compiled)
    if is_error:
        raise GrammarError(f"invalid {kind.replace('_', ' ')}: {messages[0] if messages else 'rejected'}")
    return compiled


def check_json_schema(text: str) -> dict:
    """The schema as a dict; GrammarError when it is not JSON or not a valid JSON schema."""
    import jsonschema

    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise GrammarError(f"invalid JSON schema{' at ' + where if where else ''}: {e.message}") from None
    return schema


class GrammarState:
    """One generation's grammar matcher over the target's vocabulary (see the module docstring)."""

    def __init__(self, tokenizer, compiled: str, n_vocab: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(tokenizer, compiled, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.n_vocab = n_vocab
        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._consumed: list[int] = []  # pending tokens consumed past the committed state
        self._forbidden: dict[int, np.ndarray | None] = {}  # pending position -> bool row (None: unreachable)
        self.seconds = 0.0  # time in grammar work (masks, consuming, rolling back)

    # -- following the pending tokens ----------------------------------------------------------------
    def _follow(self, pending: list[int], j: int) -> bool:
        """Put the matcher after the committed state and pending[:j]; False when a token there is
        forbidden (that position cannot be reached)."""
        target = pending[:j]
        keep = 0
        for a, b in zip(self._consumed, target):
            if a != b:
                break
            keep += 1
        if keep < len(self._consumed):
            self.matcher.rollback(len(self._consumed) - keep)
            del self._consumed[keep:]
            self._forbidden = {k: v for k, v in self._forbidden.items() if k <= keep}
        for token in target[keep:]:
            if self.matcher.validate_tokens([token]) != 1:
                return False
            self.matcher.consume_token(token)
            self._consumed.append(token)
        return True

    def forbidden(self, pending: list[int], j: int) -> np.ndarray | None:
        """The tokens forbidden at pending position j (a bool row over the vocabulary), or None
        when a pending token before j is forbidden (the position cannot be reached)."""
        if j in self._forbidden and len(self._consumed) >= j and self._consumed[:j] == pending[:j]:
            return self._forbidden[j]
        t0 = time.perf_counter()
        forbidden = None
        if self._follow(pending, j):
            self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.n_vocab]
            forbidden = allowed.view(bool) ^ True
        self._forbidden[j] = forbidden
        self.seconds += time.perf_counter() - t0
        return forbidden

    def mask_row(self, row: np.ndarray, pending: list[int], j: int, token_map=None) -> bool:
        """Set the logits of forbidden tokens at pending position j to -inf (in place; `token_map`:
        the row is in a draft's ids); False when the position cannot be reached."""
        forbidden = self.forbidden(pending, j)
        if forbidden is None:
            return False
        t0 = time.perf_counter()
        np.copyto(row, -np.inf, where=forbidden if token_map is None else forbidden[token_map.draft_to_target])
        self.seconds += time.perf_counter() - t0
        return True

    def valid_prefix(self, pending: list[int], tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` the grammar allows after the pending tokens."""
        t0 = time.perf_counter()
        n = self.matcher.validate_tokens(tokens) if self._follow(pending, len(pending)) else 0
        self.seconds += time.perf_counter() - t0
        return tokens[:n]

    # -- the committed state --------------------------------------------------------------------------
    def commit(self, tokens: list[int]) -> None:
        """`tokens` were emitted: the committed state moves past them (pending bookkeeping restarts)."""
        t0 = time.perf_counter()
        if self._consumed:
            self.matcher.rollback(len(self._consumed))
            self._consumed = []
        self._forbidden = {}
        for token in tokens:
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"internal error: the grammar rejected emitted token {token}: {self.matcher.get_error()}")
        self.seconds += time.perf_counter() - t0

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens after the committed state that are each the only token the grammar
        allows at their position (nothing is consumed)."""
        out: list[int] = []
        while len(out) < limit:
            forbidden = self.forbidden(out, len(out))
            if forbidden is None or len(forbidden) - np.count_nonzero(forbidden) != 1:
                break
            out.append(int(np.argmin(forbidden)))
        return out

    def fast_forward(self, limit: int) -> list[int]:
        """The canonical tokens of the bytes the grammar forces after the committed state (at most
        `limit`); another tokenization of the same bytes may also be allowed, so these are a
        proposal to verify, not tokens to emit."""
        t0 = time.perf_counter()
        self._follow([], 0)
        tokens = self.matcher.compute_ff_tokens()[:limit]
        self.seconds += time.perf_counter() - t0
        return tokens

    def is_accepting(self) -> bool:
        """Whether the committed reply is complete under the grammar."""
        self._follow([], 0)
        return self.matcher.is_accepting()
