"""Engine events -> OpenAI's replies: one drain of a job's events (`drain`), and the objects each
endpoint builds from it (`CompletionReply`, `ChatReply`), whole (`collect`) or as server-sent
chunks (`stream_response`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse

from ..config import GenerationConfig
from ..engine import DoneEvent, TokenEvent
from ..errors import CospecError
from ..tools import parse_tool_calls
from .errors import error_body
from .pool import _END, Job, Metrics


def usage(stats) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": stats.n_prompt, "completion_tokens": stats.n_generated,
            "total_tokens": stats.n_prompt + stats.n_generated}


def extension(stats, config: GenerationConfig) -> dict:
    """cospec-local's own figures for the reply (an extra field clients ignore)."""
    summary = stats.summary()
    return {"mode": config.mode, "tokens_per_second": round(summary["tokens_per_second"], 2),
            "acceptance_rate": round(summary["acceptance_rate"], 4), "model_calls_per_token": round(summary["model_calls_per_token"], 4),
            "n_prompt_cached": stats.n_prompt_cached, "n_overrides": stats.n_overrides}


# OpenAI's stand-in for a log probability of -inf (JSON has no infinities).
LOGPROB_FLOOR = -9999.0


def finish_reason(done: DoneEvent, tool_calls: list | None = None) -> str:
    """OpenAI's finish reason: the context filling up is a "length" too; a reply that ended with
    tool calls is "tool_calls"."""
    if done.finish_reason in ("length", "context"):
        return "length"
    return "tool_calls" if tool_calls else "stop"


class Reply:
    """One reply's identity (id, model, creation time) and its OpenAI objects; the subclasses give
    each endpoint's shapes. A stream is `opening()`, `piece(events)` per group of token events
    (their text, and their log probabilities when asked for), then `closing(done)` (and
    `usage_chunk(done)` with include_usage); a whole reply is `whole(events, done)`."""

    endpoint = ""
    id_prefix = ""
    chunk_object = ""

    def __init__(self, model: str, config: GenerationConfig, token_bytes):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.model, self.config, self.created = model, config, int(time.time())
        self.token_bytes = token_bytes  # target id -> bytes, for the tokens named in logprobs

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = self.token_bytes(token)
        return raw.decode("utf-8", "replace"), list(raw)

    def logprobs(self, events: list[TokenEvent]):
        """The logprobs object of these events (None when the request asked for none)."""
        return None

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _with_stats(self, out: dict, done: DoneEvent, with_usage: bool = True) -> dict:
        if with_usage:
            out["usage"] = usage(done.stats)
        out["cospec"] = extension(done.stats, self.config)
        return out

    def opening(self) -> dict | None:
        """The chunk sent before any text (None: none)."""
        return None

    def piece(self, events: list[TokenEvent]) -> dict | None:
        """The chunk of some token events (None: nothing to send)."""
        raise NotImplementedError

    def closing(self, done: DoneEvent, with_usage: bool) -> dict:
        """The last chunk with choices: the finish reason (and usage, unless a usage chunk follows)."""
        raise NotImplementedError

    def usage_chunk(self, done: DoneEvent) -> dict:
        """OpenAI's closing chunk for stream_options.include_usage: usage and no choices."""
        return self._with_stats({**self._head(self.chunk_object), "choices": []}, done)

    def whole(self, events: list[TokenEvent], done: DoneEvent) -> dict:
        """The non-streaming reply."""
        raise NotImplementedError

    def chunks(self, item: TokenEvent | DoneEvent, include_usage: bool) -> list[dict]:
        """The chunks an item of `drain` makes."""
        if isinstance(item, DoneEvent):
            # Usage: on the last chunk, or with include_usage on OpenAI's usage-only chunk.
            last = self.closing(item, with_usage=not include_usage)
            return [last, self.usage_chunk(item)] if include_usage else [last]
        chunk = self.piece([item])
        return [] if chunk is None else [chunk]


def _text(events: list[TokenEvent]) -> str:
    return "".join(event.text for event in events)


def _scored(events: list[TokenEvent]) -> list[TokenEvent]:
    """The events of tokens (the end's held-back text is none) that carry log probabilities."""
    return [event for event in events if event.token >= 0 and event.logprob is not None]


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class CompletionReply(Reply):
    """/v1/completions: text_completion objects, streamed or whole."""

    endpoint, id_prefix, chunk_object = "/v1/completions", "cmpl", "text_completion"

    def __init__(self, model: str, config: GenerationConfig, token_bytes):
        super().__init__(model, config, token_bytes)
        self.offset = 0  # characters of the completion sent so far (logprobs' text_offset)

    def _choice(self, events: list[TokenEvent], done: DoneEvent | None) -> dict:
        return {**self._head("text_completion"), "choices": [
            {"text": _text(events), "index": 0, "logprobs": self.logprobs(events),
             "finish_reason": finish_reason(done) if done else None}]}

    def logprobs(self, events):
        """Completions' shape: parallel lists of tokens, their log probabilities, their top
        alternatives ({token text: logprob}) and where each starts in the text."""
        if self.config.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for event in _scored(events):
            out["tokens"].append(self._token(event.token)[0])
            out["token_logprobs"].append(_logprob(event.logprob.logprob))
            out["top_logprobs"].append({self._token(t)[0]: _logprob(lp) for t, lp in event.logprob.top})
            out["text_offset"].append(self.offset)
            self.offset += len(event.text)
        return out

    def piece(self, events):
        if not _text(events) and not _scored(events):
            return None
        return self._choice(events, None)

    def closing(self, done: DoneEvent, with_usage: bool) -> dict:
        return self._with_stats(self._choice([], done), done, with_usage)

    def whole(self, events, done: DoneEvent) -> dict:
        return self._with_stats(self._choice(events, done), done)


class ChatReply(Reply):
    """/v1/chat/completions: chat.completion.chunk objects, or one chat.completion."""

    endpoint, id_prefix, chunk_object = "/v1/chat/completions", "chatcmpl", "chat.completion.chunk"

    def __init__(self, model: str, config: GenerationConfig, token_bytes, tool_format: str | None = None):
        super().__init__(model, config, token_bytes)
        self.started = False  # leading whitespace of the reply (after "Assistant:") is not sent
        # With tools offered, the reply is read for calls once it is complete: a stream holds its
        # events back and sends the content and the calls with the closing chunk.
        self.tool_format = tool_format
        self.held: list[TokenEvent] = []

    def _message(self, events: list[TokenEvent]) -> tuple[str, list]:
        """The reply's content and tool calls."""
        text = _text(events).strip()
        return parse_tool_calls(text, self.tool_format) if self.tool_format else (text, [])

    def _delta(self, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {**self._head(self.chunk_object), "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    def logprobs(self, events):
        """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        if self.config.logprobs is None:
            return None
        content = []
        for event in _scored(events):
            text, raw = self._token(event.token)
            top = []
            for t, lp in event.logprob.top:
                t_text, t_raw = self._token(t)
                top.append({"token": t_text, "logprob": _logprob(lp), "bytes": t_raw})
            content.append({"token": text, "logprob": _logprob(event.logprob.logprob), "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def opening(self) -> dict:
        return self._delta({"role": "assistant", "content": ""})  # the opening chunk names the role

    def piece(self, events):
        if self.tool_format:
            self.held.extend(events)
            return None
        text, scored = _text(events), _scored(events)
        if not self.started:
            text = text.lstrip()  # the reply's leading whitespace is not sent
            self.started = bool(text)
        if not text and not scored:
            return None
        return self._delta({"content": text}, logprobs=self.logprobs(events))

    def closing(self, done: DoneEvent, with_usage: bool) -> dict:
        if not self.tool_format:
            return self._with_stats(self._delta({}, finish_reason(done)), done, with_usage)
        content, calls = self._message(self.held)
        delta = {"content": content or None}
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        return self._with_stats(self._delta(delta, finish_reason(done, calls), self.logprobs(self.held)), done, with_usage)

    def whole(self, events, done: DoneEvent) -> dict:
        content, calls = self._message(events)
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return self._with_stats({**self._head("chat.completion"), "choices": [
            {"index": 0, "message": message, "logprobs": self.logprobs(events),
             "finish_reason": finish_reason(done, calls)}]}, done)


# -- draining a job -------------------------------------------------------------------------------------
async def drain(job: Job) -> AsyncIterator[TokenEvent | DoneEvent | BaseException]:
    """The one drain of a job's events, for both endpoints, streamed or not: each token event
    with text or log probabilities, the DoneEvent, or an exception the generation raised (the
    last item then). It ends once the
    worker is back in the pool; closed before that (a client gone, an error), it cancels the
    generation so that the worker frees up within a token."""
    finished = False
    try:
        while (item := await job.next()) is not _END:
            if isinstance(item, BaseException):
                yield item
                return
            if isinstance(item, DoneEvent) or item.text or item.logprob is not None:
                yield item
        finished = True
    finally:
        if not finished:
            job.cancel()


async def wait_disconnected(request: Request, every: float = 0.25) -> None:
    """Return once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)


async def collect(request: Request, job: Job, reply: Reply) -> dict:
    """Run a job to the end and return the whole reply; a client that disconnects cancels it.
    An exception the generation raised is raised here (the server's 500 handler answers it)."""
    events, done = [], None
    # Nothing reads from a non-streaming client, so nothing else would notice it leave.
    watcher = asyncio.ensure_future(wait_disconnected(request))
    watcher.add_done_callback(lambda task: task.cancelled() or job.cancel())
    try:
        async with aclosing(drain(job)) as items:
            async for item in items:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DoneEvent):
                    done = item
                else:
                    events.append(item)
    finally:
        watcher.cancel()
    return reply.whole(events, done)


def stream_response(job: Job, reply: Reply, include_usage: bool, metrics: Metrics) -> EventSourceResponse:
    """The reply as server-sent events: OpenAI's chunks, then `data: [DONE]`. An error during the
    generation is sent as an error object (the status line has long gone out)."""

    async def events():
        finished, status = False, "200"
        try:
            opening = reply.opening()
            if opening is not None:
                yield {"data": json.dumps(opening)}
            async with aclosing(drain(job)) as items:
                async for item in items:
                    if isinstance(item, BaseException):
                        message = str(item) if isinstance(item, CospecError) else f"{type(item).__name__}: {item}"
                        yield {"data": json.dumps(error_body(message, "server_error"))}
                        status = "500"
                        break
                    for chunk in reply.chunks(item, include_usage):
                        yield {"data": json.dumps(chunk)}
            yield {"data": "[DONE]"}
            finished = True
            metrics.requests.labels(reply.endpoint, status).inc()
        finally:
            if not finished:  # gone before the drain began (or sending failed): stop decoding
                job.cancel()

    return EventSourceResponse(events(), ping=15)
