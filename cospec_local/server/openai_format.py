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
from ..engine import DoneEvent
from ..errors import CospecError
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


def finish_reason(done: DoneEvent) -> str:
    """OpenAI's finish reason: the context filling up is a "length" too."""
    return "length" if done.finish_reason in ("length", "context") else "stop"


class Reply:
    """One reply's identity (id, model, creation time) and its OpenAI objects; the subclasses give
    each endpoint's shapes. A stream is `opening()`, `piece(text)` per piece of text, then
    `closing(done)` (and `usage_chunk(done)` with include_usage); a whole reply is `whole(...)`."""

    endpoint = ""
    id_prefix = ""
    chunk_object = ""

    def __init__(self, model: str, config: GenerationConfig):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.model, self.config, self.created = model, config, int(time.time())

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

    def piece(self, text: str) -> dict | None:
        """The chunk of one piece of text (None: nothing to send)."""
        raise NotImplementedError

    def closing(self, done: DoneEvent, with_usage: bool) -> dict:
        """The last chunk with choices: the finish reason (and usage, unless a usage chunk follows)."""
        raise NotImplementedError

    def usage_chunk(self, done: DoneEvent) -> dict:
        """OpenAI's closing chunk for stream_options.include_usage: usage and no choices."""
        return self._with_stats({**self._head(self.chunk_object), "choices": []}, done)

    def whole(self, text: str, done: DoneEvent) -> dict:
        """The non-streaming reply."""
        raise NotImplementedError

    def chunks(self, item: str | DoneEvent, include_usage: bool) -> list[dict]:
        """The chunks an item of `drain` makes."""
        if isinstance(item, DoneEvent):
            # Usage: on the last chunk, or with include_usage on OpenAI's usage-only chunk.
            last = self.closing(item, with_usage=not include_usage)
            return [last, self.usage_chunk(item)] if include_usage else [last]
        chunk = self.piece(item)
        return [] if chunk is None else [chunk]


class CompletionReply(Reply):
    """/v1/completions: text_completion objects, streamed or whole."""

    endpoint, id_prefix, chunk_object = "/v1/completions", "cmpl", "text_completion"

    def _choice(self, text: str, done: DoneEvent | None) -> dict:
        return {**self._head("text_completion"), "choices": [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason(done) if done else None}]}

    def piece(self, text: str) -> dict:
        return self._choice(text, None)

    def closing(self, done: DoneEvent, with_usage: bool) -> dict:
        return self._with_stats(self._choice("", done), done, with_usage)

    def whole(self, text: str, done: DoneEvent) -> dict:
        return self._with_stats(self._choice(text, done), done)


class ChatReply(Reply):
    """/v1/chat/completions: chat.completion.chunk objects, or one chat.completion."""

    endpoint, id_prefix, chunk_object = "/v1/chat/completions", "chatcmpl", "chat.completion.chunk"

    def __init__(self, model: str, config: GenerationConfig):
        super().__init__(model, config)
        self.started = False  # leading whitespace of the reply (after "Assistant:") is not sent

    def _delta(self, delta: dict, reason: str | None = None) -> dict:
        return {**self._head(self.chunk_object), "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def opening(self) -> dict:
        return self._delta({"role": "assistant", "content": ""})  # the opening chunk names the role

    def piece(self, text: str) -> dict | None:
        if not self.started:
            text = text.lstrip()
            if not text:
                return None
            self.started = True
        return self._delta({"content": text})

    def closing(self, done: DoneEvent, with_usage: bool) -> dict:
        return self._with_stats(self._delta({}, finish_reason(done)), done, with_usage)

    def whole(self, text: str, done: DoneEvent) -> dict:
        return self._with_stats({**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text.strip()}, "logprobs": None,
             "finish_reason": finish_reason(done)}]}, done)


# -- draining a job -------------------------------------------------------------------------------------
async def drain(job: Job) -> AsyncIterator[str | DoneEvent | BaseException]:
    """The one drain of a job's events, for both endpoints, streamed or not: each piece of text,
    the DoneEvent, or an exception the generation raised (the last item then). It ends once the
    worker is back in the pool; closed before that (a client gone, an error), it cancels the
    generation so that the worker frees up within a token."""
    finished = False
    try:
        while (item := await job.next()) is not _END:
            if isinstance(item, BaseException):
                yield item
                return
            if isinstance(item, DoneEvent):
                yield item
            elif item.text:
                yield item.text
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
    parts, done = [], None
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
                    parts.append(item)
    finally:
        watcher.cancel()
    return reply.whole("".join(parts), done)


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
