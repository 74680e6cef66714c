"""The daemon's HTTP API on FastAPI: health and metrics for ops, usage and account reads for the dialer
platform, and Stripe webhooks. The OpenAPI document is at /openapi.json.

Every bad request gets a clear 4xx in one JSON shape, `{"error": {"status": ..., "message": ...}}`; nothing
is written for a request that is refused. Bodies are read with a size limit before anything parses them.
"""

from __future__ import annotations

import hmac
import json
import re
from datetime import datetime
from typing import Any, Literal, Protocol

import structlog
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from recharged import __version__, accounts
from recharged.clock import Clock
from recharged.daemon.health import CONTENT_TYPE as HEALTH_CONTENT_TYPE
from recharged.daemon.health import Health
from recharged.daemon.health import public as public_health
from recharged.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from recharged.daemon.metrics import Metrics
from recharged.daemon.runtime import Runtime
from recharged.daemon.webhooks import verified_event
from recharged.errors import DatabaseError, InputError, NotFoundError, SignatureError
from recharged.money import format_ledger
from recharged.rating import TimeRate, longest_call
from recharged.store.engine import Database
from recharged.usage import FIELDS

log = structlog.get_logger("recharged.http")
DIALER_KIND = "dialer"
_ACCOUNT_ID = re.compile(r"[\x21-\x7e]{1,64}")  # what accounts.new_account allows


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


# --- schemas (they make the OpenAPI document) --------------------------------------------------------------


class UsageBatch(BaseModel):
    events: list[Any] = Field(
        description="Usage events, each an object with the fields of the CSV import: "
        + ", ".join(FIELDS)
        + ". started_at is ISO 8601 with a UTC offset; time kinds need duration_seconds, count kinds quantity "
        "(or text for SMS); cost (a decimal string) overrides the rate.",
        examples=[
            [
                {
                    "event_id": "call-7781",
                    "account_id": "acme",
                    "kind": "dialer",
                    "started_at": "2026-11-22T10:15:00Z",
                    "duration_seconds": 70,
                }
            ]
        ],
    )


class EventResult(BaseModel):
    index: int
    event_id: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None = None


class UsageResult(BaseModel):
    accepted: int
    duplicate: int
    rejected: int
    results: list[EventResult]


class AccountView(BaseModel):
    account_id: str
    currency: str
    as_of: datetime
    balance: str = Field(description="in currency units with 5 decimals, as the ledger keeps it")
    threshold: str
    recharge_amount: str
    average_daily: str
    runway_days: str | None = Field(description="null when there is no usage to wear the balance down")
    auto_recharge: bool
    recharge_state: str
    state_reason: str | None
    retry_at: datetime | None
    due_since: datetime | None
    next_cycle_at: datetime | None
    decision: str = Field(description="what the next cycle would do: charge or skip")
    decision_reason: str
    dialer_rate_per_minute: str | None
    longest_call_seconds: int | None = Field(
        description="the longest call the balance pays for now at the account's dialer rate (null: no dialer rate)"
    )


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed request",
        401: "missing or unknown bearer token",
        404: "no such account",
        413: "body or batch too large",
        422: "well-formed but invalid",
        503: "the API is not configured, the database is unavailable, or the daemon is stopping",
    }.items()
}


async def _read_body(request: Request, limit: int) -> bytes:
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


def _parse_json(body: bytes) -> Any:
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
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the body is not valid JSON: a string holds a lone surrogate escape") from None
    return data


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(
        title="recharged",
        version=__version__,
        description="Prepaid balances and automatic recharges: usage in, balances out, Stripe webhooks.",
        docs_url=None,  # served below from the package's own copy of Swagger UI: /docs works offline
        redoc_url=None,
    )
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="recharged API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg')}")
        status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
        return _error(status, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(DatabaseError)
    async def _database_down(request: Request, exc: DatabaseError) -> JSONResponse:
        log.error("http.database_unavailable", path=request.url.path, error=str(exc))
        return _error(503, "the database is unavailable; try again later", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http.error", path=request.url.path, error=str(exc))
        return _error(500, "internal error; the daemon's log has the details")

    def authorize(request: Request) -> Runtime:
        runtime = backend.runtime()
        if not runtime.api_tokens:
            raise ApiError(
                503, "the API has no tokens configured: set RECHARGED_API_TOKENS or the credential api_tokens"
            )
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="recharged"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "an Authorization: Bearer <token> header is required", challenge)
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, known.encode()) for known in runtime.api_tokens):
            raise ApiError(401, "the bearer token is not valid", challenge)
        return runtime

    # --- ops ---------------------------------------------------------------------------------------------

    @app.get("/livez", tags=["ops"], summary="The process is alive (restart it when this fails)")
    def livez() -> JSONResponse:
        ok, why = backend.alive()
        return JSONResponse({"status": "pass" if ok else "fail", "output": why}, status_code=200 if ok else 503)

    @app.get("/readyz", tags=["ops"], summary="Ready for traffic: database reachable at the current schema")
    def readyz() -> JSONResponse:
        ok, why = backend.ready()
        return JSONResponse({"status": "pass" if ok else "fail", "output": why}, status_code=200 if ok else 503)

    @app.get(
        "/healthz",
        tags=["ops"],
        summary="Health in application/health+json: each check's status; its details with a bearer token",
    )
    def healthz(request: Request) -> Response:
        # Anyone may ask; only the holders of an API token read the details (errors, ids, the database address).
        detailed = "authorization" in request.headers
        if detailed:
            authorize(request)
        report = backend.health.report()
        status = 503 if report["status"] == "fail" else 200
        if not detailed:
            report = public_health(report)
        return Response(json.dumps(report), status_code=status, media_type=HEALTH_CONTENT_TYPE)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(backend.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # --- the dialer platform's API -------------------------------------------------------------------------

    @app.post(
        "/v1/usage",
        tags=["usage"],
        summary="Record a batch of usage events (idempotent by event_id)",
        response_model=UsageResult,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": UsageBatch.model_json_schema()}},
            }
        },
    )
    async def post_usage(request: Request) -> UsageResult:
        runtime = authorize(request)
        settings = runtime.settings.http
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "the body must be application/json")
        body = await _read_body(request, settings.max_body_bytes)
        data = _parse_json(body)
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise ApiError(422, 'the body must be an object with an "events" array')
        events = data["events"]
        if not events:
            raise ApiError(422, "events is empty")
        if len(events) > settings.max_events_per_request:
            raise ApiError(
                413, f"{len(events)} events in one request; at most {settings.max_events_per_request} are accepted"
            )
        outcomes = await run_in_threadpool(runtime.usage.record, events)  # one outcome per event, in order
        results = [
            EventResult(index=o.position, event_id=o.event_id, status=o.status, reason=o.reason) for o in outcomes
        ]
        counts = {
            status: sum(1 for r in results if r.status == status) for status in ("accepted", "duplicate", "rejected")
        }
        for status, count in counts.items():
            if count:
                backend.metrics.usage_events.labels(status).inc(count)
        touched = {str(events[r.index]["account_id"]).strip() for r in results if r.status == "accepted"}
        if touched:
            backend.usage_recorded(touched)
        return UsageResult(
            accepted=counts["accepted"], duplicate=counts["duplicate"], rejected=counts["rejected"], results=results
        )

    @app.get(
        "/v1/accounts/{account_id}",
        tags=["accounts"],
        summary="Balance, runway, threshold, auto-recharge state and the longest call the balance allows",
        response_model=AccountView,
        responses=ERRORS,
    )
    def get_account_view(account_id: str, request: Request) -> AccountView:
        runtime = authorize(request)
        if not _ACCOUNT_ID.fullmatch(account_id):  # never a valid id: no need to ask the database
            raise ApiError(404, "no such account")
        try:
            return account_view(backend, runtime, account_id)
        except NotFoundError:
            raise ApiError(404, f"no account {account_id!r}") from None

    @app.post(
        "/v1/webhooks/stripe",
        tags=["webhooks"],
        summary="Stripe events (signed): stored at once and handled off the request path, each id once",
        description="The event is kept in the inbox in one transaction and answered `stored` (to be handled), "
        "`duplicate` (this id came before) or `ignored` (a type recharged does not act on). Handling re-reads "
        "from Stripe whatever the event is about; `recharged events list` shows how each ended.",
        responses=ERRORS,
    )
    async def stripe_webhook(request: Request) -> JSONResponse:
        runtime = backend.runtime()
        if runtime.webhook_secret is None:
            raise ApiError(503, "webhooks are not configured: set RECHARGED_STRIPE_WEBHOOK_SECRET")
        body = await _read_body(request, runtime.settings.http.max_body_bytes)
        try:
            event = verified_event(
                body,
                request.headers.get("stripe-signature"),
                runtime.webhook_secret,
                runtime.settings.http.webhook_tolerance_seconds,
            )
        except SignatureError as exc:
            backend.metrics.webhooks.labels("bad_signature").inc()
            raise ApiError(400, str(exc)) from None
        except InputError as exc:
            backend.metrics.webhooks.labels("malformed").inc()
            raise ApiError(400, str(exc)) from None
        stored = await run_in_threadpool(runtime.events.store, event)  # the database down: 503, Stripe retries
        backend.metrics.webhooks.labels(stored.outcome).inc()
        if stored.outcome == "stored":
            backend.events_stored()  # handled off the request path, right away
        return JSONResponse({"received": True, "event": stored.event_id, "outcome": stored.outcome})

    return app


def account_view(backend: Backend, runtime: Runtime, account_id: str) -> AccountView:
    view = accounts.account_view(backend.db, runtime.settings, account_id, backend.clock.now())
    account, decision = view.account, view.plan.decision
    rates = runtime.settings.plans.get(account.plan)
    dialer = rates.rate_table().get(DIALER_KIND) if rates is not None else None
    longest = longest_call(decision.balance, dialer) if isinstance(dialer, TimeRate) else None
    return AccountView(
        account_id=account.id,
        currency=account.currency,
        as_of=view.at,
        balance=format_ledger(decision.balance),
        threshold=format_ledger(decision.threshold),
        recharge_amount=format_ledger(decision.recharge_amount),
        average_daily=format_ledger(decision.average_daily),
        runway_days=None if decision.runway_days is None else str(decision.runway_days),
        auto_recharge=account.auto_recharge,
        recharge_state=account.recharge_state,
        state_reason=account.state_reason,
        retry_at=account.retry_at,
        due_since=account.due_since,
        next_cycle_at=backend.next_cycle(),
        decision=decision.action,
        decision_reason=decision.reason,
        dialer_rate_per_minute=format_ledger(dialer.price_per_minute) if isinstance(dialer, TimeRate) else None,
        longest_call_seconds=longest,
    )
