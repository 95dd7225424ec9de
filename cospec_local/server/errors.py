"""Errors in OpenAI's JSON shape, everywhere: refused requests, invalid bodies, unknown paths and
internal failures all answer {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from .pool import Metrics


class ApiError(Exception):
    """A request the server refuses, reported in OpenAI's error shape with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_validation_error(err: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for a body pydantic refused: malformed JSON, or up to five field problems
    with the first one's top-level field as `param` (what OpenAI's clients show)."""
    problems = err.errors()
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse it')}", None
    if first.get("type") == "extra_forbidden":
        name = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return (f"unrecognized request field {name!r}: this server does not implement it (the README lists the "
                "OpenAI fields and the extension fields it accepts)"), name.split(".")[0]
    described = []
    for p in problems[:5]:
        loc = ".".join(str(x) for x in p.get("loc", ()) if x != "body")
        described.append(f"{loc or 'body'}: {p.get('msg')}")
    locs = [x for x in first.get("loc", ()) if x != "body"]
    return "invalid request: " + "; ".join(described), (str(locs[0]) if locs else None)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer every error in OpenAI's shape, counting refused requests by endpoint and status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        metrics.requests.labels(request.url.path, str(err.status)).inc()
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        message, param = describe_validation_error(err)
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        # Unknown paths and methods: not counted (they are no endpoint's requests).
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)
