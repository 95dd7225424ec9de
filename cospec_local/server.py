"""An OpenAI-compatible HTTP server (`cospec-local serve`) over P parallel slots.

- `Worker`: one slot: a `Pair` replica (its own llama.cpp contexts on the SHARED weights, see
  `api.Pair.replica`) with one `Conversation`; it decodes one request at a time on its own thread.
- `WorkerPool`: hands a free worker to each request, the one whose cache holds the longest prefix
  of the request's prompt (KV reuse across a chat's turns); requests beyond P wait in a FIFO queue.
- `Job`: runs one generation on a thread and passes its events to the event loop through a queue;
  a client that goes away sets `cancelled`, the thread stops at the next token, the engine trims its
  caches (its `finally`) and the worker goes back to the pool.
- The endpoints only translate: request JSON -> `GenerationConfig` and prompt tokens, engine
  events -> OpenAI's response and chunk shapes. Errors use OpenAI's error JSON.

Everything HTTP lives here (FastAPI, sse-starlette, prometheus-client: the `server` extra); the
library imports this module only when serving.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Pair
from .chat import ChatTemplate
from .config import GenerationConfig
from .engine import DoneEvent
from .errors import ContextOverflowError, CospecError
from .slots import common_prefix



# -- errors ------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the server refuses, reported in OpenAI's error shape with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)


# -- request bodies ----------------------------------------------------------------------------------
class _GenerationFields(BaseModel):
    """Fields shared by both endpoints: OpenAI's standard ones, then cospec-local's extensions.
    Strict types (a string where a number belongs is a 400, not a silent conversion); unknown
    fields are ignored, as clients send many optional ones."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None  # negative (llama.cpp's -1): fresh entropy
    stop: str | list[str] | None = None
    n: int | None = None  # null or 1
    stream: bool | None = None
    stream_options: dict | None = None
    # Extensions (llama-server also takes top_k and min_p).
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    mode: str | None = None
    draft_max: int | None = Field(None, ge=1)
    adaptive: bool | None = None
    combine: str | None = None
    weights: list[float] | None = None
    mu: float | None = None
    gamma: list[int] | None = None
    threshold: float | None = None


class CompletionRequest(_GenerationFields):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(_GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def _message_text(message: ChatMessage) -> str:
    """A message's text: a string, or the text parts of a content list (images are refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"only text content parts are supported, not {part.get('type')!r}", "messages")
        parts.append(part["text"])
    return "".join(parts)


# -- metrics -------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one server (its own registry, so several servers can live in one
    process, as in the tests)."""

    def __init__(self, n_slots: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cospec_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cospec_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.cached_tokens = Counter("cospec_prompt_tokens_cached", "Prompt tokens whose KV cache entries were reused.", registry=r)
        self.generated_tokens = Counter("cospec_generated_tokens", "Tokens generated.", registry=r)
        self.drafted_tokens = Counter("cospec_drafted_tokens", "Proposed tokens that were verified.", registry=r)
        self.accepted_tokens = Counter("cospec_accepted_tokens", "Proposed tokens that verification accepted.", registry=r)
        self.acceptance_rate = Gauge("cospec_acceptance_rate", "Accepted / drafted tokens since the server started.", registry=r)
        self.tokens_per_second = Gauge("cospec_tokens_per_second", "Decode tokens/s of the last finished request.", registry=r)
        self.decode_seconds = Histogram("cospec_decode_seconds", "Decode time per request.", registry=r)
        self.queue_length = Gauge("cospec_queue_length", "Requests waiting for a free slot.", registry=r)
        self.queue_wait = Histogram("cospec_queue_wait_seconds", "Time requests waited for a slot.", registry=r)
        self.queue_wait_max = Gauge("cospec_queue_wait_max_seconds", "Longest wait for a slot since the server started.", registry=r)
        self.slots_busy = Gauge("cospec_slots_busy", "Slots decoding a request.", registry=r)
        self.slots_total = Gauge("cospec_slots", "Parallel slots (--parallel).", registry=r)
        self.cancelled = Counter("cospec_cancelled", "Generations stopped because the client went away.", registry=r)
        self.slots_total.set(n_slots)
        self._drafted = self._accepted = 0

    def observe(self, stats) -> None:
        """Count one finished (or cancelled) generation."""
        self.prompt_tokens.inc(stats.n_prompt)
        self.cached_tokens.inc(stats.n_prompt_cached)
        self.generated_tokens.inc(stats.n_generated)
        self.drafted_tokens.inc(stats.n_drafted)
        self.accepted_tokens.inc(stats.n_accepted)
        self._drafted += stats.n_drafted
        self._accepted += stats.n_accepted
        if self._drafted:
            self.acceptance_rate.set(self._accepted / self._drafted)
        if stats.n_generated:
            self.tokens_per_second.set(stats.tokens_per_second)
            self.decode_seconds.observe(stats.t_decode)


# -- slots ----------------------------------------------------------------------------------------------
class Worker:
    """One slot: a Pair replica (own contexts, shared weights) and its conversation."""

    def __init__(self, index: int, pair: Pair):
        self.index = index
        self.pair = pair
        self.conversation = pair.engine.new_conversation()
        self.busy = False
        self.job: Job | None = None

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` this slot's target cache already holds."""
        return common_prefix(self.pair.engine.slots[self.pair.engine.target_index].history, tokens)


class WorkerPool:
    """Free workers go to requests in arrival order; runs on the event loop (no locks needed)."""

    def __init__(self, workers: list[Worker], metrics: Metrics):
        self.workers = workers
        self.metrics = metrics
        self._waiters: collections.deque[asyncio.Future] = collections.deque()  # FIFO: handed over in order
        self.longest_wait = 0.0

    @property
    def n_waiting(self) -> int:
        return sum(1 for fut in self._waiters if not fut.done())

    @property
    def n_busy(self) -> int:
        return sum(w.busy for w in self.workers)

    def _update(self) -> None:
        self.metrics.queue_length.set(self.n_waiting)
        self.metrics.slots_busy.set(self.n_busy)

    async def acquire(self, tokens: list[int]) -> Worker:
        """A free worker, preferring the one whose cache holds the longest prefix of `tokens`;
        waits in FIFO order when all are busy."""
        t0 = time.perf_counter()
        free = [w for w in self.workers if not w.busy]
        if free and not self._waiters:
            worker = max(free, key=lambda w: w.cached_prefix(tokens))
            worker.busy = True
            self._update()
            return worker
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._update()
        try:
            worker = await future
        except asyncio.CancelledError:
            # Gone while queued. If a worker was handed over at the same moment, pass it on.
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise
        finally:
            self._update()
        waited = time.perf_counter() - t0
        self.metrics.queue_wait.observe(waited)
        self.longest_wait = max(self.longest_wait, waited)
        self.metrics.queue_wait_max.set(self.longest_wait)
        return worker

    def release(self, worker: Worker) -> None:
        """Give `worker` to the first live waiter, or mark it free."""
        worker.job = None
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(worker)  # stays busy: handed over
                self._update()
                return
        worker.busy = False
        self._update()


_END = object()


class Job:
    """One generation on a worker thread. Its events reach the event loop through `queue`; a
    `cancel()` stops the thread at the next prefill piece or token (the engine then trims its caches)."""

    def __init__(self, pool: WorkerPool, worker: Worker, events, loop: asyncio.AbstractEventLoop):
        self.pool, self.worker, self.events, self.loop = pool, worker, events, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stats = None
        self.thread = threading.Thread(target=self._run, name=f"cospec-slot-{worker.index}", daemon=True)
        worker.job = self
        self.thread.start()

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    def _run(self) -> None:
        try:
            for event in self.events:
                if isinstance(event, DoneEvent):
                    self.stats = event.stats
                self._call(self.queue.put_nowait, event)
        except BaseException as e:  # reported to the request, never kills the server
            self._call(self.queue.put_nowait, e)
        finally:
            try:
                self.events.close()  # the engine's finally, if the loop above did not finish it
            except BaseException as e:
                self._call(self.queue.put_nowait, e)
            finally:
                self._call(self._finish)

    def _finish(self) -> None:
        """On the event loop: count the generation, free the slot, then end the event stream (so a
        client that sees the end finds its slot free)."""
        metrics = self.pool.metrics
        if self.stats is not None:
            metrics.observe(self.stats)
            if self.stats.finish_reason == "cancelled":
                metrics.cancelled.inc()
        self.pool.release(self.worker)
        self.queue.put_nowait(_END)

    def cancel(self) -> None:
        """Stop this job's generation. A no-op once the job has handed its worker back (on the
        event loop, like every caller): the worker's conversation may already serve another job."""
        if self.worker.job is self:
            self.worker.conversation.cancel()

    async def next(self):
        """The next event, an exception the generation raised, or _END."""
        return await self.queue.get()


async def _wait_disconnected(request: Request, every: float = 0.25) -> None:
    """Return once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)


# -- the app ----------------------------------------------------------------------------------------------
@dataclass
class ServerSettings:
    """What `serve` was started with."""

    model_id: str
    defaults: GenerationConfig
    api_key: str | None = None


_EXTENSION_FIELDS = ("top_k", "min_p", "mode", "draft_max", "adaptive", "combine", "mu", "threshold")


def build_config(body: _GenerationFields, defaults: GenerationConfig, max_tokens: int | None) -> GenerationConfig:
    """The request's GenerationConfig: server defaults, then the fields the request sets."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n} is not supported: this server returns one choice per request (n=1)", "n")
    changes = {name: getattr(body, name) for name in _EXTENSION_FIELDS}
    seed = body.seed if body.seed is None or body.seed >= 0 else None
    changes.update(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed)
    if body.weights is not None:
        changes["weights"] = tuple(body.weights)
    if body.gamma is not None:
        changes["gamma"] = tuple(body.gamma)
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        changes["stop"] = tuple(s for s in stops if s)
    try:
        return defaults.with_(**changes)
    except ValueError as e:
        raise ApiError(400, str(e), _param_named_in(str(e))) from None


def _param_named_in(message: str) -> str | None:
    """The request field a config error is about (the most specific name it mentions)."""
    return next((name for name in ("weights", "gamma", "combine", "threshold", "mu", "draft_max", "top_k", "top_p",
                                   "min_p", "temperature", "max_tokens", "mode") if re.search(rf"\b{name}\b", message)), None)


def create_app(pairs: list[Pair], settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `pairs` (one per slot; replicas of the first)."""
    metrics = Metrics(len(pairs))
    pool = WorkerPool([Worker(i, pair) for i, pair in enumerate(pairs)], metrics)
    first = pairs[0]
    eos_text = first.target.token_text(first.target.eos_id)
    template = ChatTemplate.for_model(first.target.chat_template, eos_text=eos_text)
    created = int(time.time())
    app = FastAPI(title="cospec-local", docs_url=None, redoc_url=None)
    app.state.pool, app.state.metrics, app.state.settings, app.state.template = pool, metrics, settings, template

    # -- errors: OpenAI's shape everywhere ------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        metrics.requests.labels(request.url.path, str(err.status)).inc()
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        problems = err.errors()
        first_problem = problems[0] if problems else {}
        if first_problem.get("type") == "json_invalid":
            message = f"malformed JSON body: {first_problem.get('ctx', {}).get('error', 'cannot parse it')}"
            param = None
        else:
            described = []
            for p in problems[:5]:
                loc = ".".join(str(x) for x in p.get("loc", ()) if x != "body")
                described.append(f"{loc or 'body'}: {p.get('msg')}")
            message = "invalid request: " + "; ".join(described)
            locs = [x for x in first_problem.get("loc", ()) if x != "body"]
            param = str(locs[0]) if locs else None
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    # -- plain endpoints --------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": len(pool.workers), "slots_busy": pool.n_busy, "queue": pool.n_waiting}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": created, "owned_by": "cospec-local"}]}

    # -- generation ---------------------------------------------------------------------------------
    def check_prompt(tokens: list[int], config: GenerationConfig, param: str) -> None:
        engine = first.engine
        try:
            engine.plan(config)
        except ValueError as e:
            raise ApiError(400, str(e), _param_named_in(str(e)) or "mode") from None
        if not tokens:
            raise ApiError(400, "the prompt is empty", param)
        if len(tokens) >= engine.n_ctx:
            raise ApiError(
                400, f"the prompt has {len(tokens)} tokens but the context holds {engine.n_ctx}: shorten it "
                "(or start the server with a larger --ctx-size)", param, "context_length_exceeded")

    async def start(request: Request, tokens: list[int], config: GenerationConfig, param: str) -> Job:
        """Validate, wait for a slot (giving up if the client leaves meanwhile), start the job."""
        check_prompt(tokens, config, param)
        acquiring = asyncio.ensure_future(pool.acquire(tokens))
        gone = asyncio.ensure_future(_wait_disconnected(request))
        try:
            await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not acquiring.done():  # the client left while queued: it never gets a slot
            acquiring.cancel()
            try:
                await acquiring
            except asyncio.CancelledError:
                pass
            else:
                pool.release(acquiring.result())
            raise ApiError(499, "client closed the request while it was queued", kind="client_closed_request")
        worker = acquiring.result()
        try:
            events = worker.pair.engine.stream(tokens, config, conversation=worker.conversation)
            return Job(pool, worker, events, asyncio.get_running_loop())
        except ContextOverflowError as e:
            pool.release(worker)
            raise ApiError(400, str(e), param, "context_length_exceeded") from None
        except (CospecError, ValueError) as e:
            pool.release(worker)
            raise ApiError(400, str(e), _param_named_in(str(e))) from None
        except BaseException:
            pool.release(worker)
            raise

    def usage(stats) -> dict:
        return {"prompt_tokens": stats.n_prompt, "completion_tokens": stats.n_generated,
                "total_tokens": stats.n_prompt + stats.n_generated}

    def extension(stats, config) -> dict:
        """cospec-local's own figures for the reply (an extra field clients ignore)."""
        return {"mode": config.mode, "tokens_per_second": round(stats.tokens_per_second, 2),
                "acceptance_rate": round(stats.acceptance_rate, 4), "model_calls_per_token": round(stats.model_calls_per_token, 4),
                "n_prompt_cached": stats.n_prompt_cached, "n_overrides": stats.n_overrides}

    def finish_reason(done: DoneEvent) -> str:
        return "length" if done.finish_reason in ("length", "context") else "stop"

    async def collect(request: Request, job: Job) -> tuple[str, DoneEvent]:
        """Run a job to the end for a non-streaming reply; a client that disconnects cancels it."""
        parts, done = [], None
        watcher = asyncio.ensure_future(_wait_disconnected(request))
        watcher.add_done_callback(lambda task: task.cancelled() or job.cancel())
        try:
            while True:
                item = await job.next()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DoneEvent):
                    done = item
                else:
                    parts.append(item.text)
        finally:
            watcher.cancel()
            if done is None:
                job.cancel()
        return "".join(parts), done

    def stream_response(job: Job, endpoint: str, make_chunk, include_usage: bool) -> EventSourceResponse:
        async def events():
            finished = False
            status = "200"
            try:
                opening = make_chunk(None, None, None)
                if opening is not None:
                    yield {"data": json.dumps(opening)}
                while True:
                    item = await job.next()
                    if item is _END:
                        break
                    if isinstance(item, BaseException):
                        message = str(item) if isinstance(item, CospecError) else f"{type(item).__name__}: {item}"
                        yield {"data": json.dumps(error_body(message, "server_error"))}
                        status = "500"
                        break
                    if isinstance(item, DoneEvent):
                        # Usage: on the last chunk, or with include_usage on OpenAI's usage-only chunk.
                        yield {"data": json.dumps(make_chunk("", item, None, not include_usage))}
                        if include_usage:
                            yield {"data": json.dumps(make_chunk(None, item, "usage", True))}
                    elif item.text:
                        piece = make_chunk(item.text, None, None)
                        if piece is not None:
                            yield {"data": json.dumps(piece)}
                yield {"data": "[DONE]"}
                finished = True
                metrics.requests.labels(endpoint, status).inc()
            finally:
                if not finished:  # the client went away (or sending failed): stop decoding
                    job.cancel()

        return EventSourceResponse(events(), ping=15)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        config = build_config(body, settings.defaults, body.max_tokens)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "a list of several prompts is not supported: send one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt is empty", "prompt")
            tokens = first.tokenize(prompt)
        else:
            n_vocab = first.engine.n_vocab
            bad = [t for t in prompt if not 0 <= t < n_vocab]
            if bad:
                raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary (0..{n_vocab - 1})", "prompt")
            tokens = list(prompt)
        job = await start(request, tokens, config, "prompt")
        rid, model, stamp = f"cmpl-{uuid.uuid4().hex[:24]}", body.model or settings.model_id, int(time.time())

        def chunk(text, done, kind, with_usage=True):
            if text is None and done is None:
                return None  # completions have no opening chunk
            out = {"id": rid, "object": "text_completion", "created": stamp, "model": model,
                   "choices": [{"text": text or "", "index": 0, "logprobs": None,
                                "finish_reason": finish_reason(done) if done else None}]}
            if kind == "usage":
                out["choices"] = []
            if done is not None:
                if with_usage:
                    out["usage"] = usage(done.stats)
                out["cospec"] = extension(done.stats, config)
            return out

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return stream_response(job, "/v1/completions", chunk, include_usage)
        text, done = await collect(request, job)
        metrics.requests.labels("/v1/completions", "200").inc()
        out = chunk(text, done, None)
        return out

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        messages = []
        for m in body.messages:
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _message_text(m)})
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise ApiError(400, "messages need at least one non-empty user message", "messages")
        config = build_config(body, settings.defaults, body.max_completion_tokens or body.max_tokens)
        if template.stop:
            config = config.with_(stop=tuple(config.stop) + template.stop)
        try:
            rendered = template.render(messages, True)
        except Exception as e:  # a Jinja template refusing the conversation (roles out of order...)
            raise ApiError(400, f"the model's chat template refused these messages: {e}", "messages") from None
        tokens = first.tokenize(rendered)
        job = await start(request, tokens, config, "messages")
        rid, model, stamp = f"chatcmpl-{uuid.uuid4().hex[:24]}", body.model or settings.model_id, int(time.time())

        if not body.stream:
            text, done = await collect(request, job)
            metrics.requests.labels("/v1/chat/completions", "200").inc()
            return {"id": rid, "object": "chat.completion", "created": stamp, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                                 "logprobs": None, "finish_reason": finish_reason(done)}],
                    "usage": usage(done.stats), "cospec": extension(done.stats, config)}

        started = [False]  # leading whitespace of the reply (after "Assistant:") is not sent

        def chunk(text, done, kind, with_usage=True):
            out = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": model}
            if kind == "usage":
                out["choices"] = []
            elif text is None:  # the opening chunk names the role
                out["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            elif done is not None:
                out["choices"] = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason(done)}]
            else:
                if not started[0]:
                    text = text.lstrip()
                    if not text:
                        return None
                    started[0] = True
                out["choices"] = [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
            if done is not None:
                if with_usage:
                    out["usage"] = usage(done.stats)
                out["cospec"] = extension(done.stats, config)
            return out

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return stream_response(job, "/v1/chat/completions", chunk, include_usage)

    return app


def shutdown(app: FastAPI) -> None:
    """Stop every running generation and wait for the slot threads: models must not be freed
    while a thread is inside llama.cpp (a cancel takes effect within one prefill piece or token)."""
    pool: WorkerPool = app.state.pool
    for worker in pool.workers:
        if worker.job is not None:
            worker.job.cancel()
    for worker in pool.workers:
        job = worker.job
        if job is not None:
            job.thread.join()


def serve(pair: Pair, settings: ServerSettings, host: str, port: int, parallel: int, slot_threads: int | None = None,
          slot_draft_threads: int | None = None, on_ready=None) -> None:
    """Serve `pair` and P - 1 replicas of it (shared weights) until interrupted; then stop every
    generation and free the models. `on_ready(url)` is called once the socket listens."""
    import uvicorn

    pairs = [pair]
    try:
        for _ in range(parallel - 1):
            pairs.append(pair.replica(slot_threads, slot_draft_threads))
        app = create_app(pairs, settings)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        if on_ready is not None:
            original_startup = server.startup

            async def startup(sockets=None):
                await original_startup(sockets)
                if server.started:
                    on_ready(f"http://{host if ':' not in host else '[' + host + ']'}:{port}")

            server.startup = startup
        try:
            server.run()
        finally:
            shutdown(app)
    finally:
        for replica in pairs[1:]:
            replica.close()
