"""The FastAPI app (`create_app`) and `serve`, which runs it under uvicorn: routes, the API key,
and each endpoint's path from request to reply (the pieces live in the sibling modules)."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..api import Pair
from ..chat import ChatTemplate
from ..config import GenerationConfig
from ..errors import ContextOverflowError, CospecError
from ..grammar import Grammar
from ..ngram import SharedNgramPool
from .errors import ApiError, install_error_handlers
from .openai_format import ChatReply, CompletionReply, Reply, collect, stream_response, wait_disconnected
from .pool import Job, Metrics, Worker, WorkerPool
from .types import (ChatRequest, CompletionRequest, GenerationFields, build_config, chat_messages, check_supported,
                    completion_tokens, param_named_in, request_grammar, request_tools)


@dataclass
class ServerSettings:
    """What `serve` was started with."""

    model_id: str
    defaults: GenerationConfig
    api_key: str | None = None
    # Let n-gram proposals continue from earlier requests' text (a timing side channel: off by default).
    shared_ngrams: bool = False


class Server:
    """One server's state (slots, metrics, chat template) and its endpoints' work; `create_app`
    routes requests here."""

    def __init__(self, pairs: list[Pair], settings: ServerSettings):
        self.settings = settings
        self.metrics = Metrics(len(pairs))
        self.pool = WorkerPool([Worker(i, pair) for i, pair in enumerate(pairs)], self.metrics)
        if settings.shared_ngrams:
            ngram_pool = SharedNgramPool()
            for worker in self.pool.workers:
                worker.conversation.ngram_pool = ngram_pool
        self.first = pairs[0]  # tokenizes and answers model questions: every pair is a replica of it
        eos_text = self.first.target.token_text(self.first.target.eos_id)
        self.template = ChatTemplate.for_model(self.first.target.chat_template, eos_text=eos_text)
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        """Refuse a request without the server's API key (when it has one)."""
        if self.settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        # Constant-time comparison: response timing must not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def check_prompt(self, tokens: list[int], config: GenerationConfig, param: str) -> None:
        """Refuse, before queueing for a slot, what the engine would refuse: a mode these models
        cannot run, an empty prompt, a prompt the context cannot hold."""
        engine = self.first.engine
        try:
            engine.check(config)
        except ValueError as e:
            raise ApiError(400, str(e), param_named_in(str(e)) or "mode") from None
        if not tokens:
            raise ApiError(400, "the prompt is empty", param)
        if len(tokens) >= engine.n_ctx:
            raise ApiError(
                400, f"the prompt has {len(tokens)} tokens but the context holds {engine.n_ctx}: shorten it "
                "(or start the server with a larger --ctx-size)", param, "context_length_exceeded")

    async def acquire(self, request: Request, tokens: list[int]) -> Worker:
        """A worker for the request, giving up (499) if the client leaves while queued."""
        acquiring = asyncio.ensure_future(self.pool.acquire(tokens))
        gone = asyncio.ensure_future(wait_disconnected(request))
        try:
            await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if acquiring.done():
            return acquiring.result()
        acquiring.cancel()  # the client left while queued: it never gets a slot
        try:
            await acquiring
        except asyncio.CancelledError:
            pass
        else:  # handed a worker just as it was cancelled: give it back
            self.pool.release(acquiring.result())
        raise ApiError(499, "client closed the request while it was queued", kind="client_closed_request")

    async def start(self, request: Request, tokens: list[int], config: GenerationConfig, param: str,
                    grammar: Grammar | None = None) -> Job:
        """Validate, wait for a slot, and start the generation on it."""
        self.check_prompt(tokens, config, param)
        worker = await self.acquire(request, tokens)
        try:
            events = worker.pair.engine.stream(tokens, config, conversation=worker.conversation, grammar=grammar)
            return Job(self.pool, worker, events, asyncio.get_running_loop())
        except ContextOverflowError as e:
            self.pool.release(worker)
            raise ApiError(400, str(e), param, "context_length_exceeded") from None
        except (CospecError, ValueError) as e:
            self.pool.release(worker)
            raise ApiError(400, str(e), param_named_in(str(e))) from None
        except BaseException:
            self.pool.release(worker)
            raise

    async def answer(self, request: Request, body: GenerationFields, tokens: list[int], config: GenerationConfig,
                     param: str, reply_type: type[Reply], grammar: Grammar | None = None, **reply_options):
        """Run the generation (constrained by `grammar`, else by the request's response_format or
        grammar field) and answer with `reply_type`'s objects, streamed or whole."""
        check_supported(body)
        requested = request_grammar(body)
        if grammar is not None and requested is not None:
            raise ApiError(400, "a tool_choice that demands a call cannot be combined with response_format or grammar",
                           "tool_choice")
        job = await self.start(request, tokens, config, param, grammar or requested)
        reply = reply_type(body.model or self.settings.model_id, config, self.first.target.token_bytes, **reply_options)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return stream_response(job, reply, include_usage, self.metrics)
        out = await collect(request, job, reply)
        self.metrics.requests.labels(reply.endpoint, "200").inc()
        return out

    async def completions(self, body: CompletionRequest, request: Request):
        """POST /v1/completions."""
        config = build_config(body, self.settings.defaults, chat=False)
        tokens = completion_tokens(body, self.first)
        return await self.answer(request, body, tokens, config, "prompt", CompletionReply)

    async def chat_completions(self, body: ChatRequest, request: Request):
        """POST /v1/chat/completions: the conversation rendered by the model's chat template, whose
        end-of-turn strings stop the reply."""
        messages = chat_messages(body)
        config = build_config(body, self.settings.defaults, chat=True)
        if self.template.stop:
            config = config.with_(stop=tuple(config.stop) + self.template.stop)
        tools, call = request_tools(body, self.template.tool_format)
        try:
            rendered = self.template.render(messages, True, tools=tools)
        except Exception as e:  # a Jinja template refusing the conversation (roles out of order...)
            raise ApiError(400, f"the model's chat template refused these messages: {e}", "messages") from None
        tokens = self.first.tokenize(rendered)
        return await self.answer(request, body, tokens, config, "messages", ChatReply, call,
                                 tool_format=self.template.tool_format if tools else None)


def create_app(pairs: list[Pair], settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `pairs` (one per slot; replicas of the first)."""
    server = Server(pairs, settings)
    app = FastAPI(title="cospec-local", docs_url=None, redoc_url=None)
    app.state.server, app.state.pool, app.state.metrics = server, server.pool, server.metrics
    app.state.settings, app.state.template = settings, server.template
    install_error_handlers(app, server.metrics)
    auth = [Depends(server.check_key)]

    @app.get("/health")
    async def health():
        pool = server.pool
        return {"status": "ok", "slots": len(pool.workers), "slots_busy": pool.n_busy, "queue": pool.n_waiting}

    @app.get("/metrics", dependencies=auth)
    async def prometheus_metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [
            {"id": settings.model_id, "object": "model", "created": server.created, "owned_by": "cospec-local"}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        return await server.chat_completions(body, request)

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
