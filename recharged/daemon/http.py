"""The daemon's HTTP API on FastAPI: health and metrics for ops, usage for the dialer platform, the CRM's billing
page (`api/routes.py`: accounts, automatic recharge, top-ups, cards, receipts, statements, the ledger, the audit
trail), and Stripe webhooks. Tokens have names and scopes (`recharged.tokens`). The OpenAPI document is at
/openapi.json.

Every bad request gets a clear 4xx in one JSON shape, `{"error": {"status": ..., "message": ...}}`; nothing
is written for a request that is refused. Bodies are read with a size limit before anything parses them.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

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

from recharged import __version__
from recharged.authorizations import NotAuthorized
from recharged.daemon.api.common import (
    ApiError,
    Backend,
    authorize,
    error_response,
    errors,
    json_body,
    read_body,
)
from recharged.daemon.api.routes import add_routes
from recharged.daemon.health import CONTENT_TYPE as HEALTH_CONTENT_TYPE
from recharged.daemon.health import public as public_health
from recharged.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from recharged.daemon.webhooks import verified_event
from recharged.errors import (
    ConflictError,
    DatabaseError,
    InputError,
    NotFoundError,
    PaymentError,
    SignatureError,
    TransientPaymentError,
)
from recharged.tokens import USAGE_WRITE
from recharged.topups import InFlight
from recharged.usage import FIELDS, summarize

log = structlog.get_logger("recharged.http")

__all__ = ["Backend", "create_app"]

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"


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


class Probe(BaseModel):
    status: Literal["pass", "fail"]
    output: str


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


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(
        title="recharged",
        version=__version__,
        description="Prepaid balances and automatic recharges: usage in, balances out, Stripe webhooks.",
        docs_url=None,  # served below from the package's own copy of Swagger UI: /docs works offline
        redoc_url=None,
    )
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.middleware("http")
    async def _odd_paths(request: Request, call_next: Any) -> Response:
        # No id of ours holds a control character or is longer than 255 characters: such a path names nothing
        # (and PostgreSQL refuses NUL in a query), whichever endpoint it is under.
        path = request.url.path
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path) or any(len(part) > 255 for part in path.split("/")):
            return error_response(404, "no such resource")
        started = time.monotonic()
        response: Response = await call_next(request)
        # By the matched route's template, so that ids in paths do not make a series each.
        route = getattr(request.scope.get("route"), "path", "other")
        method = request.method if request.method in HTTP_METHODS else "other"
        backend.metrics.http_duration.labels(method, route, str(response.status_code)).observe(
            time.monotonic() - started
        )
        if path.startswith("/v1/") and path != "/v1/webhooks/stripe":
            # Who asked what, by the token's name (never the token); reads and usage at debug, changes at info.
            quiet = request.method in ("GET", "HEAD") or path == "/v1/usage"
            (log.debug if quiet else log.info)(
                "http.request",
                method=request.method,
                path=path,
                status=response.status_code,
                caller=getattr(request.state, "token", None),
                ms=round((time.monotonic() - started) * 1000, 1),
            )
        return response

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
        return error_response(exc.status, exc.message, exc.headers)

    # What the services refuse, in the API's words: nothing was changed by any of these.
    @app.exception_handler(NotFoundError)
    async def _not_found(_request: Request, exc: NotFoundError) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(ConflictError)
    async def _conflict(_request: Request, exc: ConflictError) -> JSONResponse:
        return error_response(409, str(exc), {"Retry-After": "5"} if isinstance(exc, InFlight) else None)

    @app.exception_handler(InputError)
    async def _invalid_input(_request: Request, exc: InputError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(NotAuthorized)
    async def _not_authorized(_request: Request, exc: NotAuthorized) -> JSONResponse:
        body = {"error": {"status": 402, "message": str(exc), "reason": exc.reason}}
        return JSONResponse(body, status_code=402)

    @app.exception_handler(TransientPaymentError)
    async def _processor_down(request: Request, exc: TransientPaymentError) -> JSONResponse:
        log.warning("http.processor_unavailable", path=request.url.path, error=str(exc))
        return error_response(503, f"the payment processor cannot be reached: {exc}", {"Retry-After": "30"})

    @app.exception_handler(PaymentError)
    async def _payment_refused(_request: Request, exc: PaymentError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg')}")
        status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
        return error_response(status, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(DatabaseError)
    async def _database_down(request: Request, exc: DatabaseError) -> JSONResponse:
        log.error("http.database_unavailable", path=request.url.path, error=str(exc))
        return error_response(503, "the database is unavailable; try again later", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http.error", path=request.url.path, error=str(exc))
        return error_response(500, "internal error; the daemon's log has the details")

    # --- ops ---------------------------------------------------------------------------------------------

    probe: dict[int | str, dict[str, Any]] = {503: {"model": Probe, "description": "fail: `output` says why"}}

    @app.get(
        "/livez",
        tags=["ops"],
        summary="The process is alive (restart it when this fails)",
        response_model=Probe,
        responses=probe,
    )
    def livez() -> JSONResponse:
        ok, why = backend.alive()
        return JSONResponse({"status": "pass" if ok else "fail", "output": why}, status_code=200 if ok else 503)

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Ready for traffic: database reachable at the current schema",
        response_model=Probe,
        responses=probe,
    )
    def readyz() -> JSONResponse:
        ok, why = backend.ready()
        return JSONResponse({"status": "pass" if ok else "fail", "output": why}, status_code=200 if ok else 503)

    @app.get(
        "/healthz",
        tags=["ops"],
        summary="Health in application/health+json: each check's status; its details with a bearer token",
        response_class=Response,
        responses={
            200: {"description": "pass or warn", "content": {HEALTH_CONTENT_TYPE: {"schema": {"type": "object"}}}},
            503: {"description": "fail", "content": {HEALTH_CONTENT_TYPE: {"schema": {"type": "object"}}}},
            401: errors(401)[401],
        },
    )
    def healthz(request: Request) -> Response:
        # Anyone may ask; only the holders of an API token read the details (errors, ids, the database address).
        detailed = "authorization" in request.headers
        if detailed:
            authorize(backend, request, None)
        report = backend.health.report()
        status = 503 if report["status"] == "fail" else 200
        if not detailed:
            report = public_health(report)
        return Response(json.dumps(report), status_code=status, media_type=HEALTH_CONTENT_TYPE)

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"description": "the text exposition format", "content": {"text/plain": {}}}},
    )
    def metrics() -> Response:
        return Response(backend.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # --- the dialer platform's API -------------------------------------------------------------------------

    @app.post(
        "/v1/usage",
        tags=["usage"],
        summary="Record a batch of usage events (idempotent by event_id)",
        response_model=UsageResult,
        responses=errors(400, 403, 413, 415, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": UsageBatch.model_json_schema()}},
            }
        },
    )
    async def post_usage(request: Request) -> Response:
        caller = authorize(backend, request, USAGE_WRITE)
        runtime, settings = caller.runtime, caller.runtime.settings.http
        data = await json_body(request, caller)
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
        counts = summarize(outcomes)
        for status, count in counts.items():
            if count:
                backend.metrics.usage_events.labels(status).inc(count)
        touched = {str(events[o.position]["account_id"]).strip() for o in outcomes if o.status == "accepted"}
        if touched:
            backend.usage_recorded(touched)
        # Written directly, in the shape of UsageResult: validating a thousand results again cost more than the answer
        results = [
            {"index": o.position, "event_id": o.event_id, "status": o.status, "reason": o.reason} for o in outcomes
        ]
        body = json.dumps({**counts, "results": results}, separators=(",", ":"), ensure_ascii=False)
        return Response(body.encode(), media_type="application/json")

    @app.post(
        "/v1/webhooks/stripe",
        tags=["webhooks"],
        summary="Stripe events (signed): stored at once and handled off the request path, each id once",
        description="The event is kept in the inbox in one transaction and answered `stored` (to be handled), "
        "`duplicate` (this id came before) or `ignored` (a type recharged does not act on). Handling re-reads "
        "from Stripe whatever the event is about; `recharged events list` shows how each ended.",
        responses=errors(400, 413, bearer=False),
    )
    async def stripe_webhook(request: Request) -> JSONResponse:
        runtime = backend.runtime()
        if runtime.webhook_secret is None:
            raise ApiError(503, "webhooks are not configured: set RECHARGED_STRIPE_WEBHOOK_SECRET")
        body = await read_body(request, runtime.settings.http.max_body_bytes)
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

    add_routes(app, backend)
    return app
