"""A scripted stand-in for `backend.LlamaModel`: no model file, logits a pure function of the prefix.

`FakeModel` keeps the token list its "KV cache" holds and computes every logits row from that list
(the model's seed, the row's position and the last two tokens), so a cache the engine forgot to roll
back, or rolled back too far, gives different logits, just as a real model would. Like llama.cpp,
`eval` returns a view of one output buffer that the next `eval` overwrites (here with NaN first), so
an engine that keeps a row without copying it reads garbage.

`make_engine(seeds)` builds an `Engine` over fake models named as `api.Pair` names its slots:
draft, target, model1, model2, ...
"""

from __future__ import annotations

import numpy as np

from cospec_local.api import collect
from cospec_local.engine import DoneEvent, Engine, TokenEvent
from cospec_local.errors import ContextOverflowError
from cospec_local.slots import ModelSlot

N_VOCAB = 6
LOGIT_SCALE = 1.5  # standard normal x 1.5: peaked enough to be interesting, never one-hot


class FakeModel:
    """Enough of `backend.LlamaModel` for `ModelSlot` and `Engine`; `calls` counts evals with logits."""

    exact_batch = 7

    def __init__(self, seed: int, n_vocab: int = N_VOCAB, n_ctx: int = 512, eog: tuple[int, ...] = ()):
        self.seed = seed
        self.n_vocab = n_vocab
        self.n_ctx = n_ctx
        self.n_batch = n_ctx
        self._eog = tuple(eog)
        self.tokens: list[int] = []  # what the cache holds
        self.calls = 0  # eval calls that asked for logits (what ModelSlot counts as a model call)
        self.decode_seconds = 0.0  # LlamaModel's time inside llama_decode (nothing to time here)
        self.state_copy_seconds = 0.0  # LlamaModel's time copying recurrent states (none here)
        self._out = np.full((self.n_batch, n_vocab), np.nan, dtype=np.float32)
        self._memo: dict[tuple, np.ndarray] = {}

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    # -- the model as a function --------------------------------------------------------------------
    def logits_after(self, prefix) -> np.ndarray:
        """The logits row for the token after `prefix` (pure: reads nothing of the cache)."""
        prefix = [int(t) for t in prefix]
        last = ([-1, -1] + prefix)[-2:]
        key = (len(prefix), last[0], last[1])
        row = self._memo.get(key)
        if row is None:
            entropy = [self.seed, len(prefix), last[0] + 1, last[1] + 1]
            rng = np.random.default_rng(np.random.SeedSequence(entropy))
            row = (LOGIT_SCALE * rng.standard_normal(self.n_vocab)).astype(np.float32)
            row.flags.writeable = False
            self._memo[key] = row
        return row

    # -- the LlamaModel interface --------------------------------------------------------------------
    def eval(self, tokens, n_logits: int = 1) -> np.ndarray:
        """Append `tokens`; return the rows of the last `n_logits` positions (a view of a buffer
        the next eval overwrites, as llama.cpp's is)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("eval needs at least one token")
        if not 0 <= n_logits <= min(n, self.n_batch):
            raise ValueError(f"n_logits={n_logits} must be in [0, {min(n, self.n_batch)}]")
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(f"fake context overflow: {self.n_past} + {n} > {self.n_ctx}")
        for t in tokens:
            if not 0 <= int(t) < self.n_vocab:
                raise ValueError(f"token {t} outside the fake vocabulary")
        self._out[:] = np.nan
        self.tokens.extend(int(t) for t in tokens)
        if n_logits == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        self.calls += 1
        end = len(self.tokens)
        for i in range(n_logits):
            self._out[i] = self.logits_after(self.tokens[: end - n_logits + i + 1])
        return self._out[:n_logits]

    def rollback(self, n_keep: int) -> None:
        if n_keep < 0:
            raise ValueError("n_keep must be >= 0")
        del self.tokens[n_keep:]

    def reset(self) -> None:
        self.tokens = []

    def token_bytes(self, token: int) -> bytes:
        return bytes([ord("a") + int(token)])

    def detokenize(self, tokens) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode()

    def eog_ids(self) -> np.ndarray:
        return np.array(self._eog, dtype=np.int32)

    def close(self) -> None:
        pass


def slot_names(n: int) -> list[str]:
    """Slot names in `api.Pair` order: draft, target, model1, model2, ..."""
    return ["draft", "target"] + [f"model{i}" for i in range(1, n - 1)]


def make_engine(seeds=(11, 22), n_vocab: int = N_VOCAB, n_ctx: int = 512, eog: tuple[int, ...] = ()):
    """An Engine over one FakeModel per seed (first the draft, then the target, then model1...);
    returns (engine, models)."""
    models = [FakeModel(seed, n_vocab, n_ctx, eog) for seed in seeds]
    names = slot_names(len(models)) if len(models) > 1 else ["target"]
    engine = Engine([ModelSlot(name, model) for name, model in zip(names, models)], eog_ids=list(eog))
    return engine, models


def run(engine: Engine, prompt, config, conversation=None):
    """One generation: (GenerationResult, the TokenEvents, the DoneEvent)."""
    conversation = conversation or engine.new_conversation()
    events = list(engine.stream(list(prompt), config, conversation=conversation))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return collect(events), tokens, done


class ScriptedModel(FakeModel):
    """A character-level model that, after the last 'Assistant:' of its context, writes `script`
    one character per token (whatever the prompt says), then end-of-sequence. Token i is the
    character chr(i) for i < 128; EOS is token 128. Enough of LlamaModel for `api.ChatSession`."""

    EOS = 128
    MARKER = "Assistant:"

    def __init__(self, script: str):
        super().__init__(seed=0, n_vocab=129, n_ctx=4096, eog=(self.EOS,))
        self.script = script
        self.chat_template = None  # a base model: the chat uses the fallback transcript
        self.eos_id = self.EOS
        self.add_bos = False

    def logits_after(self, prefix) -> np.ndarray:
        text = "".join(chr(t) for t in prefix if t < 128)
        row = np.zeros(self.n_vocab, dtype=np.float32)
        # The reply so far: the text after the last marker that the script can have written.
        written = None
        at = text.rfind(self.MARKER)
        while at >= 0:
            candidate = text[at + len(self.MARKER) :]
            if self.script.startswith(candidate):
                written = candidate
                break
            at = text.rfind(self.MARKER, 0, at)
        if written is None or len(written) >= len(self.script):
            row[self.EOS] = 10.0
        else:
            row[ord(self.script[len(written)])] = 10.0
        return row

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def token_bytes(self, token: int) -> bytes:
        return chr(token).encode() if token < 128 else b""

    def token_text(self, token: int) -> str:
        return "</s>" if token == self.EOS else chr(token)


class ScriptedPair:
    """A `ScriptedModel` as the target of a one-model Pair (what `api.ChatSession` needs)."""

    def __init__(self, script: str):
        self.target = ScriptedModel(script)
        self.engine = Engine([ModelSlot("target", self.target)], eog_ids=[ScriptedModel.EOS])

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.target.tokenize(text)
