"""What every endpoint of the HTTP API shares: the daemon it serves (`Backend`), the one error shape, tokens and
scopes, bodies read within a size limit and parsed strictly, and calls into the services with the token's name
on every audit record they write.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from recharged.audit import acting_via
from recharged.clock import Clock
from recharged.daemon.health import Health
from recharged.daemon.metrics import Metrics
from recharged.daemon.runtime import Runtime
from recharged.store.engine import Database
from recharged.tokens import ApiToken, find_token

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Backend(Protocol):
    """What the HTTP API needs from the daemon."""

    db: Database
    metrics: Metrics
    health: Health

    @property
    def clock(self) -> Clock: ...

    def runtime(self) -> Runtime: ...

    def alive(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...

    def next_cycle(self) -> datetime | None: ...

    def usage_recorded(self, account_ids: set[str]) -> None: ...

    def events_stored(self) -> None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_TEXTS = {
    400: "malformed request",
    401: "missing or unknown bearer token",
    403: "the token lacks the scope this endpoint needs",
    404: "no such resource",
    409: "conflicts with the resource's state (or the same request is still in flight)",
    413: "body or batch too large",
    415: "the body must be application/json",
    422: "well-formed but invalid",
    503: "the API is not configured, the database is unavailable, or the daemon is stopping",
}


def errors(*codes: int, bearer: bool = True) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of an endpoint (503 is everybody's, 401 every bearer token's)."""
    # and 422 every endpoint's with a path or query parameter: FastAPI refuses a malformed one, in our error shape
    wanted = sorted({503, *codes, *((401, 422) if bearer else ())})
    return {code: {"model": ErrorResponse, "description": ERROR_TEXTS[code]} for code in wanted}


@dataclass(frozen=True)
class Caller:
    """An authorized request: the daemon's runtime of the moment and the token it came with."""

    runtime: Runtime
    token: ApiToken

    @property
    def via(self) -> str:
        return f"api:{self.token.name}"


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="recharged"'}


def authorize(backend: Backend, request: Request, scope: str | None) -> Caller:
    """The caller, if its bearer token is known (401 otherwise) and has `scope` (403 otherwise; None: any token)."""
    runtime = backend.runtime()
    if not runtime.api_tokens:
        raise ApiError(503, "the API has no tokens configured: set RECHARGED_API_TOKENS or the credential api_tokens")
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "an Authorization: Bearer <token> header is required", CHALLENGE)
    token = find_token(runtime.api_tokens, presented.strip())
    if token is None:
        raise ApiError(401, "the bearer token is not valid", CHALLENGE)
    request.state.token = token.name  # for the request's log line
    if scope is not None and not token.allows(scope):
        raise ApiError(403, f"token {token.name!r} does not have the scope {scope!r} this endpoint needs")
    return Caller(runtime, token)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"the body is {declared} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _DuplicateKey(ValueError):
    pass


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a key given twice (json.loads would keep the last one silently)."""
    members: dict[str, Any] = {}
    for key, value in pairs:
        if key in members:
            raise _DuplicateKey(key)
        members[key] = value
    return members


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(body: bytes) -> Any:
    """The body's JSON; a 400 for anything json.loads refuses (including integers past Python's digit limit and
    nesting past the recursion limit), for an object that gives a key twice, and for strings with lone surrogate
    escapes, which no answer could echo."""
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except _DuplicateKey as exc:
        raise ApiError(
            400, f"the body is not valid JSON: the key {str(exc)[:100]!r} appears twice in one object"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
    if _SURROGATE_ESCAPE.search(body):  # only an escape makes a surrogate: UTF-8 itself cannot hold one
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError(400, "the body is not valid JSON: a string holds a lone surrogate escape") from None
    return data


async def json_body(request: Request, caller: Caller) -> Any:
    """The request's JSON body: application/json, within [http] max_body_bytes, parsed strictly."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "the body must be application/json")
    return parse_json(await read_body(request, caller.runtime.settings.http.max_body_bytes))


def problems(exc: ValidationError) -> str:
    found = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "body"
        found.append(f"{where}: {error.get('msg')}")
    return "; ".join(found)


async def model_body(request: Request, caller: Caller, model: type[M]) -> M:
    """The body validated against `model`: a 422 naming every field that is wrong."""
    data = await json_body(request, caller)
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, problems(exc)) from None


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a body read by `model_body` (FastAPI does not see it in the signature)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def call(caller: Caller, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a service function off the event loop; the audit records it writes carry the token's name."""

    def run() -> T:
        with acting_via(caller.via):
            return fn(*args, **kwargs)

    return await run_in_threadpool(run)
