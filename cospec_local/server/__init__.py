"""An OpenAI-compatible HTTP server (`cospec-local serve`) over P parallel slots.

- `Worker`: one slot: a `Pair` replica (its own llama.cpp contexts on the SHARED weights, see
  `api.Pair.replica`) with one `Conversation`; it decodes one request at a time on its own thread.
- `WorkerPool`: hands a free worker to each request, the one whose cache holds the longest prefix
  of the request's prompt (KV reuse across a chat's turns); requests beyond P wait in a FIFO queue.
- `Job`: runs one generation on a thread and passes its events to the event loop through a queue;
  a client that goes away sets `cancelled`, the thread stops at the next token, the engine trims its
  caches (its `finally`) and the worker goes back to the pool.
- The endpoints only translate: request JSON -> `GenerationConfig` and prompt tokens, engine
  events -> OpenAI's response and chunk shapes. Every `GenerationConfig` field but the policy file
  can be set per request (the request types are derived from the config). Errors use OpenAI's
  error JSON.

Modules: `types` (request bodies -> config and prompt), `pool` (slots, jobs, metrics),
`openai_format` (events -> OpenAI's objects, streamed or whole), `errors` (OpenAI's error shape),
`app` (`create_app`, `serve`).

Everything HTTP lives here (FastAPI, sse-starlette, prometheus-client: the `server` extra); the
library imports this package only when serving.
"""

from .app import Server, ServerSettings, create_app, serve, shutdown
from .errors import ApiError
from .pool import Job, Metrics, Worker, WorkerPool

__all__ = ["ApiError", "Job", "Metrics", "Server", "ServerSettings", "Worker", "WorkerPool", "create_app", "serve", "shutdown"]
