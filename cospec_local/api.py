"""Python API: load a draft/target pair, generate or stream, chat with KV reuse across turns.

    from cospec_local import load_pair, default_pair
    draft_path, target_path = default_pair()
    pair = load_pair(draft_path, target_path)
    result = pair.generate("The capital of France is", max_tokens=32, temperature=0)
    print(result.text, result.stats.tokens_per_second)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from .backend import LlamaModel, LoadOptions
from .chat import ChatTemplate
from .config import GenerationConfig
from .engine import DoneEvent, Engine, GenerationStats, TokenEvent
from .pair import PairReport, check_pair
from .verify import Verifier


@dataclass
class GenerationResult:
    """What `generate` returns: the text, the generated ids (target ids), their provenance and stats."""

    text: str
    tokens: list[int]
    sources: list[str]
    finish_reason: str
    stats: GenerationStats


def collect(events) -> GenerationResult:
    """Run a stream of engine events to the end and gather them into a GenerationResult."""
    parts, tokens, sources, done = [], [], [], None
    for event in events:
        if isinstance(event, DoneEvent):
            done = event
        else:
            parts.append(event.text)
            if event.token >= 0:  # -1: held-back text flushed at the end
                tokens.append(event.token)
                sources.append(event.source)
    return GenerationResult("".join(parts), tokens, sources, done.finish_reason, done.stats)


class Pair:
    """A target model and an optional draft, checked for compatibility, sharing one engine."""

    def __init__(
        self,
        target_path: str | os.PathLike,
        draft_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        target_ngl: int = 0,
        draft_ngl: int = 0,
        verbose: bool = False,
    ):
        self.target = LlamaModel(target_path, LoadOptions(n_ctx, n_threads, target_ngl, verbose=verbose))
        self.draft = None
        self.report: PairReport | None = None
        try:
            if draft_path is not None:
                self.draft = LlamaModel(draft_path, LoadOptions(n_ctx, n_threads, draft_ngl, verbose=verbose))
                self.report = check_pair(self.draft, self.target)
        except Exception:
            self.close()
            raise
        self.engine = Engine(self.target, self.draft, self.report.token_map if self.report else None)

    def close(self) -> None:
        """Free both models."""
        for model in (self.draft, self.target):
            if model is not None:
                model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Target token ids of `text` (BOS added when the model wants it and `add_bos`)."""
        return self.target.tokenize(text, add_bos=add_bos and self.target.add_bos)

    def _context(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenize(prompt)
        return list(prompt)

    def stream(
        self, prompt: str | list[int], config: GenerationConfig | None = None, verifier: Verifier | None = None, **overrides
    ) -> Iterator[TokenEvent | DoneEvent]:
        """Yield a TokenEvent per generated token, then a DoneEvent with the statistics.

        `overrides` are GenerationConfig fields (max_tokens=..., temperature=..., mode=...).
        """
        config = (config or GenerationConfig()).with_(**overrides)
        return self.engine.stream(self._context(prompt), config, verifier)

    def generate(
        self, prompt: str | list[int], config: GenerationConfig | None = None, verifier: Verifier | None = None, **overrides
    ) -> GenerationResult:
        """Generate a completion of `prompt` and return it with its statistics."""
        return collect(self.stream(prompt, config, verifier, **overrides))

    def chat(self, system: str | None = None) -> "ChatSession":
        """A multi-turn chat using the target's chat template (or a transcript for base models)."""
        return ChatSession(self, system)


class ChatSession:
    """Keeps the conversation and its tokens; each turn evaluates only the new text."""

    def __init__(self, pair: Pair, system: str | None = None):
        self.pair = pair
        eos_text = pair.target.token_text(pair.target.eos_id)
        self.template = ChatTemplate.for_model(pair.target.chat_template, eos_text=eos_text)
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the next turn starts a fresh context)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.tokens: list[int] = []
        self._rendered = ""  # the text self.tokens stand for

    def _turn_tokens(self, user_text: str) -> list[int]:
        self.messages.append({"role": "user", "content": user_text})
        full = self.template.render(self.messages, True)
        if self.tokens and full.startswith(self._rendered):
            delta = full[len(self._rendered) :]
            tokens = self.tokens + self.pair.target.tokenize(delta, add_bos=False)
        else:
            tokens = self.pair.tokenize(full)
        self._rendered = full
        return tokens

    def send(self, user_text: str, config: GenerationConfig | None = None, **overrides) -> Iterator[TokenEvent | DoneEvent]:
        """Stream the reply to `user_text`. Stopping early (break, Ctrl-C) keeps what was shown as
        the reply, and the session stays usable."""
        if not user_text.strip():
            raise ValueError("empty message")
        config = (config or GenerationConfig()).with_(**overrides)
        if self.template.stop:
            config = config.with_(stop=tuple(config.stop) + self.template.stop)
        context = self._turn_tokens(user_text)
        reply: list[str] = []
        engine = self.pair.engine
        try:
            for event in engine.stream(context, config):
                if isinstance(event, TokenEvent):
                    reply.append(event.text)
                yield event
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
            self.tokens = list(engine.context)
            self._rendered += self._token_text(context)

    def _token_text(self, context: list[int]) -> str:
        # The reply as the engine committed it (what the KV cache holds after the prompt).
        return self.pair.target.detokenize(self.pair.engine.context[len(context) :])

    def say(self, user_text: str, config: GenerationConfig | None = None, **overrides) -> GenerationResult:
        """Send a message and return the whole reply."""
        return collect(self.send(user_text, config, **overrides))


def load_pair(draft: str | os.PathLike | None, target: str | os.PathLike, **options) -> Pair:
    """Load and check a pair. `options`: n_ctx, n_threads, target_ngl, draft_ngl, verbose."""
    return Pair(target, draft, **options)
