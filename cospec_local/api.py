"""Python API: load a draft/target pair, generate or stream, chat with KV reuse across turns.

    from cospec_local import load_pair, default_pair
    draft_path, target_path = default_pair()
    pair = load_pair(draft_path, target_path)
    result = pair.generate("The capital of France is", max_tokens=32, temperature=0)
    print(result.text, result.stats.tokens_per_second)
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Iterator

from .backend import LlamaModel, LoadOptions
from .chat import ChatTemplate
from .config import GenerationConfig
from .engine import DoneEvent, Engine, GenerationStats, TokenEvent, TokenLogprob
from .grammar import Grammar
from .slots import ModelSlot
from .vocab import PairReport, check_pair
from .verify import Verifier


@dataclass
class GenerationResult:
    """What `generate` returns: the text, the generated ids (target ids), their provenance and stats."""

    text: str
    tokens: list[int]
    sources: list[str]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token, with GenerationConfig.logprobs


def collect(events) -> GenerationResult:
    """Run a stream of engine events to the end and gather them into a GenerationResult."""
    parts, tokens, sources, logprobs, done = [], [], [], [], None
    for event in events:
        if isinstance(event, DoneEvent):
            done = event
        else:
            parts.append(event.text)
            if event.token >= 0:  # -1: held-back text flushed at the end
                tokens.append(event.token)
                sources.append(event.source)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
    return GenerationResult("".join(parts), tokens, sources, done.finish_reason, done.stats,
                            logprobs if len(logprobs) == len(tokens) and tokens else None)


class Pair:
    """A target model, an optional draft and optional further models (`models`), checked for
    compatibility, sharing one engine. The name is historical: a Pair holds n >= 1 models."""

    def __init__(
        self,
        target_path: str | os.PathLike,
        draft_path: str | os.PathLike | None = None,
        *,
        models: tuple[str | os.PathLike, ...] = (),
        n_ctx: int = 4096,
        n_threads: int | None = None,
        draft_threads: int | None = None,
        target_ngl: int = 0,
        draft_ngl: int = 0,
        verbose: bool = False,
        target_rpc: tuple[str, ...] = (),
        draft_rpc: tuple[str, ...] = (),
        kernels: str = "exact",
    ):
        target_rpc, draft_rpc = tuple(target_rpc), tuple(draft_rpc)
        self.kernels = kernels
        self.target = LlamaModel(target_path, LoadOptions(n_ctx, n_threads, target_ngl, verbose=verbose, rpc=target_rpc,
                                                          kernels=kernels))
        self.draft = None
        self.extra: list[LlamaModel] = []
        self.report: PairReport | None = None
        self.extra_reports: list[PairReport] = []
        try:
            if draft_path is not None:
                self.draft = LlamaModel(draft_path, LoadOptions(n_ctx, draft_threads or n_threads, draft_ngl, verbose=verbose,
                                                                rpc=draft_rpc, kernels=kernels))
                self.report = check_pair(self.draft, self.target)
            for path in models:
                model = LlamaModel(path, LoadOptions(n_ctx, n_threads, target_ngl, verbose=verbose, rpc=target_rpc,
                                                     kernels=kernels))
                self.extra.append(model)
                self.extra_reports.append(check_pair(model, self.target))
        except Exception:
            self.close()
            raise
        self.eog_ids = self.target.eog_ids()  # scans the vocabulary once; replicas reuse it
        self._assemble()

    def _assemble(self) -> None:
        slots = []
        if self.draft is not None:
            slots.append(ModelSlot("draft", self.draft, self.report.token_map))
        slots.append(ModelSlot("target", self.target))
        for i, (model, report) in enumerate(zip(self.extra, self.extra_reports), start=1):
            slots.append(ModelSlot(f"model{i}", model, report.token_map))
        self.engine = Engine(slots, self.eog_ids)
        # The conversation of plain generate/stream calls: consecutive calls reuse its cache and
        # its learned draft length. Chats have their own (`chat()`).
        self.conversation = self.engine.new_conversation()

    def replica(self, n_threads: int | None = None, draft_threads: int | None = None) -> "Pair":
        """Another Pair on the SAME loaded weights with its own llama.cpp contexts (own KV caches,
        own engine): a second conversation can decode in parallel, on another thread, at the cost
        of the KV caches only. Close it before the Pair it came from."""
        twin = object.__new__(Pair)
        twin.report, twin.extra_reports, twin.eog_ids = self.report, self.extra_reports, self.eog_ids
        twin.kernels = self.kernels
        twin.target, twin.draft, twin.extra = None, None, []
        try:
            twin.target = self.target.new_context(n_threads)
            if self.draft is not None:
                twin.draft = self.draft.new_context(draft_threads or n_threads)
            for model in self.extra:
                twin.extra.append(model.new_context(n_threads))
        except Exception:
            twin.close()
            raise
        twin._assemble()
        return twin

    def close(self) -> None:
        """Free every model."""
        for model in (*self.extra, self.draft, self.target):
            if model is not None:  # a replica may have failed part-way
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
        self, prompt: str | list[int], config: GenerationConfig | None = None, verifier: Verifier | None = None,
        grammar: Grammar | None = None, **overrides
    ) -> Iterator[TokenEvent | DoneEvent]:
        """Yield a TokenEvent per generated token, then a DoneEvent with the statistics.

        `overrides` are GenerationConfig fields (max_tokens=..., temperature=..., mode=...);
        `grammar` constrains the completion (`Grammar.json_schema(...)`, `.regex`, `.lark`, ...). Bad
        input (an invalid grammar too) raises here, before the first event.
        """
        config = (config or GenerationConfig()).with_(**overrides)
        return self.engine.stream(self._context(prompt), config, verifier, self.conversation, grammar)

    def generate(
        self, prompt: str | list[int], config: GenerationConfig | None = None, verifier: Verifier | None = None,
        grammar: Grammar | None = None, **overrides
    ) -> GenerationResult:
        """Generate a completion of `prompt` (constrained by `grammar`, if given) with its statistics."""
        return collect(self.stream(prompt, config, verifier, grammar, **overrides))

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
        self.conversation = pair.engine.new_conversation()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the next turn starts a fresh context)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.tokens: list[int] = []
        self._rendered = ""  # the text self.tokens stand for

    def _turn_tokens(self, messages: list[dict]) -> tuple[list[int], str]:
        """The context for `messages` (reusing the tokens of the conversation so far) and its text."""
        full = self.template.render(messages, True)
        if self.tokens and full.startswith(self._rendered):
            delta = full[len(self._rendered) :]
            return self.tokens + self.pair.target.tokenize(delta, add_bos=False), full
        return self.pair.tokenize(full), full

    def send(self, user_text: str, config: GenerationConfig | None = None, grammar: Grammar | None = None,
             **overrides) -> Iterator[TokenEvent | DoneEvent]:
        """Stream the reply to `user_text` (constrained by `grammar`, if given). Bad input raises
        here (the conversation is unchanged); stopping early (break, Ctrl-C) keeps what was shown as
        the reply, and the session stays usable."""
        if not user_text.strip():
            raise ValueError("empty message")
        config = (config or GenerationConfig()).with_(**overrides)
        if self.template.stop:
            config = config.with_(stop=tuple(config.stop) + self.template.stop)
        messages = self.messages + [{"role": "user", "content": user_text}]
        context, rendered = self._turn_tokens(messages)
        events = self.pair.engine.stream(context, config, conversation=self.conversation, grammar=grammar)
        return self._relay(events, context, messages, rendered)

    def _relay(self, events, context: list[int], messages: list[dict], rendered: str) -> Iterator[TokenEvent | DoneEvent]:
        # The turn joins the conversation once the engine has started it (its first event); a
        # stream refused at that point (another one running) leaves the conversation unchanged.
        first = next(events)
        self.messages, self._rendered = messages, rendered
        reply: list[str] = []
        try:
            for event in itertools.chain([first], events):
                if isinstance(event, TokenEvent):
                    reply.append(event.text)
                yield event
        finally:
            events.close()
            self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
            self.tokens = list(self.conversation.context)
            # The reply as the engine committed it (what the KV cache holds after the prompt).
            self._rendered += self.pair.target.detokenize(self.tokens[len(context) :])

    def say(self, user_text: str, config: GenerationConfig | None = None, grammar: Grammar | None = None,
            **overrides) -> GenerationResult:
        """Send a message and return the whole reply."""
        return collect(self.send(user_text, config, grammar, **overrides))


def load_pair(draft: str | os.PathLike | None, target: str | os.PathLike, **options) -> Pair:
    """Load and check a pair. `options`: models (further GGUFs for the collaborative modes),
    n_ctx, n_threads, draft_threads (default n_threads), target_ngl (also used for further models),
    draft_ngl, verbose, target_rpc and draft_rpc ('host:port' llama.cpp RPC servers whose devices take
    that model's offloaded layers: e.g. a remote target with `target_ngl=99` and a local draft), and
    kernels ("exact", the default: bit-exact verification; "fast": llama.cpp's own kernels)."""
    return Pair(target, draft, **options)
