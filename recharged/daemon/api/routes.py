"""The billing page's endpoints: accounts, automatic recharge, one-time purchases, recharges, funding sources,
receipts, statements, the ledger, daily usage, the audit trail and adjustments. Each calls the service function
the matching command calls; this module only reads requests and writes answers.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from recharged import accounts as accounts_service
from recharged import funding as sources_service
from recharged import views
from recharged.authorizations import Authorizer, NotAuthorized, available, balance_of
from recharged.daemon.api import models as m
from recharged.daemon.api.common import ApiError, Backend, Caller, authorize, call, errors, model_body, request_body
from recharged.errors import InputError
from recharged.history import account_history
from recharged.mail import receipts as receipts_service
from recharged.mail import statements as statements_service
from recharged.mail.notices import notify_from_plans
from recharged.mail.templating import render
from recharged.money import Units, format_ledger, parse_amount
from recharged.planning import plans_in
from recharged.rating import TimeRate, longest_call
from recharged.tokens import ACCOUNTS_READ, ADMIN, BILLING_WRITE, USAGE_WRITE
from recharged.topups import Topups, check_key, with_authentication

DIALER_KIND = "dialer"
MAX_USAGE_DAYS = 366
FROM_DAY = Annotated[date | None, Query(alias="from", description="first day (default: 30 days before to)")]
TO_DAY = Annotated[date | None, Query(description="last day (default: today)")]
PAGE_LIMIT = Query(20, ge=1, le=views.MAX_PAGE, description="how many to return (at most 100)")


def _amount(value: str, what: str) -> Units:
    try:
        return parse_amount(value, what=what)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None


def _json(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status, headers=headers)


def account_detail(backend: Backend, caller: Caller, account_id: str) -> m.AccountView:
    """Today's view of an account (balance, runway, what the next cycle would do) with its settings."""
    runtime = caller.runtime
    view = accounts_service.account_view(backend.db, runtime.settings, account_id, backend.clock.now())
    account, decision = view.account, view.plan.decision
    rates = runtime.settings.plans.get(account.plan)
    dialer = rates.rate_table().get(DIALER_KIND) if rates is not None else None
    free = available(account)  # what calls may still spend: balance - held for calls + overdraft
    longest = longest_call(free, dialer) if isinstance(dialer, TimeRate) else None
    settings = view.settings
    return m.AccountView(
        account_id=account.id,
        currency=account.currency,
        as_of=view.at,
        balance=format_ledger(account.balance),
        reserved=format_ledger(account.reserved),
        overdraft=format_ledger(account.overdraft),
        available=format_ledger(free),
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
        email=account.email,
        plan=account.plan,
        vat_percent=str(account.vat_percent),
        status=settings["status"],
        created_at=account.created_at,
        first_usage_at=account.first_usage_at,
        closed_at=account.closed_at,
        closed_reason=account.closed_reason,
        overrides={name: settings[name] for name in accounts_service.OVERRIDES},
    )


def _summary(row: accounts_service.AccountSummary, below: bool | None = None) -> m.AccountSummary:
    return m.AccountSummary(
        id=row.id,
        email=row.email,
        plan=row.plan,
        currency=row.currency,
        balance=format_ledger(row.balance),
        auto_recharge=row.auto_recharge,
        recharge_state=str(row.recharge_state),
        status="open" if row.closed_at is None else "closed",
        below_threshold=below,
    )


def add_routes(app: FastAPI, backend: Backend) -> None:
    db = backend.db

    def _dialer_or_reader(request: Request) -> Caller:
        """The dialer's reads: its own `usage:write` token, or one that reads accounts."""
        caller = authorize(backend, request, None)
        if not (caller.token.allows(USAGE_WRITE) or caller.token.allows(ACCOUNTS_READ)):
            raise ApiError(403, f"token {caller.token.name!r} needs the scope 'usage:write' or 'accounts:read'")
        return caller

    # --- accounts -------------------------------------------------------------------------------------------

    @app.post(
        "/v1/accounts",
        tags=["accounts"],
        summary="Create an account (automatic recharge stays off until the customer signs up for it)",
        status_code=201,
        response_model=m.AccountView,
        responses={
            200: {"model": m.AccountView, "description": "the account exists with these settings: nothing changed"},
            **errors(400, 403, 409, 413, 415, 422),
        },
        openapi_extra=request_body(m.AccountCreate),
    )
    async def create_account(request: Request) -> JSONResponse:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.AccountCreate)
        fields = body.model_dump(exclude={"actor", "created_at"})
        fields = {k: None if v is None else str(v) for k, v in fields.items()}
        fields["created_at"] = None if body.created_at is None else body.created_at.isoformat()
        accounts_service.parse_actor(body.actor)
        try:
            new = accounts_service.new_account(fields, caller.runtime.settings, backend.clock.now())
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        result = await call(caller, accounts_service.create_accounts, db, [new], body.actor, backend.clock)
        view = await run_in_threadpool(account_detail, backend, caller, new.id)
        return _json(view, 201 if result.created else 200)

    @app.get(
        "/v1/accounts",
        tags=["accounts"],
        summary="List accounts in id order, with filters",
        response_model=m.AccountList,
        responses=errors(403, 422),
    )
    def list_accounts(
        request: Request,
        state: Literal["open", "closed", "all"] = "all",
        auto_recharge: bool | None = None,
        below_threshold: bool | None = Query(
            None,
            description="true: only accounts below their threshold (money held for calls counts as spent); "
            "false: only those at or above it",
        ),
        limit: int = PAGE_LIMIT,
        starting_after: str | None = Query(None, max_length=64, description="the last id of the page before"),
    ) -> m.AccountList:
        caller = authorize(backend, request, ACCOUNTS_READ)
        rows = []
        # paged in Python's (code point) order: PostgreSQL's collation may order ids otherwise than SQLite
        for row in sorted(accounts_service.list_accounts(db, status=state), key=lambda r: r.id):
            if starting_after is not None and row.id <= starting_after:
                continue
            if auto_recharge is not None and row.auto_recharge != auto_recharge:
                continue
            rows.append(row)
        below: dict[str, bool] = {}
        if below_threshold is not None:
            with db.reading() as session:
                plans = plans_in(session, caller.runtime.settings, backend.clock.now(), [r.id for r in rows])
                below = {p.account_id: p.decision.balance < p.decision.threshold for p in plans}
            rows = [r for r in rows if below.get(r.id) == below_threshold]
        page = rows[: limit + 1]
        data = [_summary(r, below.get(r.id) if below_threshold is not None else None) for r in page[:limit]]
        return m.AccountList(data=data, has_more=len(page) > limit)

    @app.get(
        "/v1/accounts/{account_id}",
        tags=["accounts"],
        summary="Balance, runway, threshold, auto-recharge state, the longest call the balance allows, settings",
        response_model=m.AccountView,
        responses=errors(403, 404),
    )
    def get_account(account_id: str, request: Request) -> m.AccountView:
        caller = authorize(backend, request, ACCOUNTS_READ)
        return account_detail(backend, caller, account_id)

    @app.get(
        "/v1/accounts/{account_id}/balance",
        tags=["authorizations"],
        summary="The balance, what calls hold and what is available: one row, for the dialer's hot path",
        response_model=m.BalanceView,
        responses=errors(403, 404),
    )
    def get_balance(
        account_id: str,
        request: Request,
        kind: Annotated[str, Query(max_length=40, description="the kind of call for longest_call_seconds")] = "dialer",
    ) -> Any:
        caller = _dialer_or_reader(request)
        return balance_of(db, caller.runtime.settings, account_id, kind.strip().lower())

    @app.patch(
        "/v1/accounts/{account_id}",
        tags=["accounts"],
        summary="Change an account's email, plan or VAT (signed and audited; the customer is told)",
        response_model=m.AccountView,
        responses=errors(400, 403, 404, 409, 413, 415, 422),
        openapi_extra=request_body(m.AccountChange),
    )
    async def change_account(account_id: str, request: Request) -> m.AccountView:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.AccountChange)
        await call(
            caller,
            accounts_service.change_account,
            db,
            account_id,
            actor=body.actor,
            clock=backend.clock,
            settings=caller.runtime.settings,
            email=body.email,
            plan=body.plan,
            vat_percent=None if body.vat_percent is None else str(body.vat_percent),
            overdraft=body.overdraft,
        )
        return await run_in_threadpool(account_detail, backend, caller, account_id)

    @app.put(
        "/v1/accounts/{account_id}/auto-recharge",
        tags=["accounts"],
        summary="Turn automatic recharge on or off, and set the account's own policy (signed and audited)",
        response_model=m.AccountView,
        responses=errors(400, 403, 404, 409, 413, 415, 422),
        openapi_extra=request_body(m.AutoRecharge),
    )
    async def put_auto_recharge(account_id: str, request: Request) -> m.AccountView:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.AutoRecharge)
        given = body.model_fields_set - {"enabled", "actor"}
        overrides = {name: "default" if getattr(body, name) is None else str(getattr(body, name)) for name in given}
        await call(
            caller,
            accounts_service.change_account,
            db,
            account_id,
            actor=body.actor,
            clock=backend.clock,
            settings=caller.runtime.settings,
            auto_recharge=body.enabled,
            overrides=overrides,
        )
        return await run_in_threadpool(account_detail, backend, caller, account_id)

    @app.post(
        "/v1/accounts/{account_id}/close",
        tags=["accounts"],
        summary="Close an account: never charged again, its balance kept (refused while a recharge is open)",
        response_model=m.StatusChange,
        responses=errors(400, 403, 404, 409, 413, 415, 422),
        openapi_extra=request_body(m.Signed),
    )
    async def close_account(account_id: str, request: Request, reason: str = Query(..., max_length=200)) -> Any:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.Signed)
        change = await call(
            caller, accounts_service.close_account, db, account_id, reason=reason, actor=body.actor, clock=backend.clock
        )
        return _status_change(change)

    @app.post(
        "/v1/accounts/{account_id}/reopen",
        tags=["accounts"],
        summary="Reopen a closed account (automatic recharge stays off until turned on)",
        response_model=m.StatusChange,
        responses=errors(400, 403, 404, 409, 413, 415, 422),
        openapi_extra=request_body(m.Signed),
    )
    async def reopen_account(account_id: str, request: Request) -> Any:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.Signed)
        change = await call(
            caller, accounts_service.reopen_account, db, account_id, actor=body.actor, clock=backend.clock
        )
        return _status_change(change)

    # --- one-time purchases and recharges -------------------------------------------------------------------

    @app.post(
        "/v1/accounts/{account_id}/topups",
        tags=["recharges"],
        summary="Buy minutes once: charged now, exactly once per Idempotency-Key",
        description="The same key with the same body answers what the first request did (409 while that one is "
        "still being charged); the same key with another body is a 422. The answer is the recharge: `phase` "
        "finished (credited, with its receipt), failed (`outcome` says why), or `requires_action` with the "
        "`client_secret` Stripe.js needs to let the customer authenticate.",
        status_code=201,
        response_model=m.RechargeView,
        responses=errors(400, 403, 404, 409, 413, 415, 422),
        openapi_extra={
            **request_body(m.TopupRequest),
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    "description": "a unique value per purchase (a UUID); retries send the same",
                }
            ],
        },
    )
    async def topup(account_id: str, request: Request) -> JSONResponse:
        caller = authorize(backend, request, BILLING_WRITE)
        try:
            key = check_key(request.headers.get("idempotency-key"))
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
        body = await model_body(request, caller, m.TopupRequest)
        actor = accounts_service.parse_actor(body.actor)
        amount = _amount(body.amount, "amount")
        topups = Topups(db, caller.runtime.recharges, backend.clock)
        answer = await call(
            caller, topups.buy, token=caller.token.name, key=key, account_id=account_id, amount=amount, actor=actor
        )
        headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
        return JSONResponse(m.RechargeView(**answer.body).model_dump(mode="json"), answer.status, headers)

    @app.get(
        "/v1/recharges/{recharge_id}",
        tags=["recharges"],
        summary="One recharge: phase, amounts, card, receipt, decision; what Stripe.js needs to authenticate it",
        response_model=m.RechargeView,
        responses=errors(403, 404),
    )
    def get_recharge(recharge_id: int, request: Request) -> m.RechargeView:
        caller = authorize(backend, request, ACCOUNTS_READ)
        body = views.get_recharge(db, recharge_id)
        return m.RechargeView(**with_authentication(body, caller.runtime.recharges.gateway))  # no transaction open

    @app.get(
        "/v1/accounts/{account_id}/recharges",
        tags=["recharges"],
        summary="The account's recharges, automatic and one-time, newest first",
        response_model=m.RechargeList,
        responses=errors(403, 404, 422),
    )
    def list_recharges(
        account_id: str, request: Request, limit: int = PAGE_LIMIT, starting_after: int | None = None
    ) -> m.RechargeList:
        caller = authorize(backend, request, ACCOUNTS_READ)
        page = views.list_recharges(db, account_id, limit=limit, starting_after=starting_after)
        gateway = caller.runtime.recharges.gateway
        data = [m.RechargeView(**with_authentication(row, gateway)) for row in page.data]
        return m.RechargeList(data=data, has_more=page.has_more)

    # --- funding sources ------------------------------------------------------------------------------------

    @app.get(
        "/v1/accounts/{account_id}/funding-sources",
        tags=["funding sources"],
        summary="The account's cards in charging order: the default first, then the backups",
        response_model=m.FundingSourceList,
        responses=errors(403, 404, 422),
    )
    def list_sources(
        account_id: str, request: Request, limit: int = PAGE_LIMIT, starting_after: str | None = None
    ) -> m.FundingSourceList:
        authorize(backend, request, ACCOUNTS_READ)
        page = views.page_of(sources_service.list_sources(db, account_id), "source", limit, starting_after)
        return m.FundingSourceList(data=[m.FundingSourceView(**row) for row in page.data], has_more=page.has_more)

    @app.post(
        "/v1/accounts/{account_id}/funding-sources",
        tags=["funding sources"],
        summary="Add a card collected with Stripe Elements, checked with Stripe (signed and audited)",
        status_code=201,
        response_model=m.FundingSourceView,
        responses=errors(400, 403, 404, 409, 413, 415, 422),
        openapi_extra=request_body(m.SourceAdd),
    )
    async def add_source(account_id: str, request: Request) -> JSONResponse:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.SourceAdd)
        accounts_service.parse_actor(body.actor)
        await run_in_threadpool(accounts_service.get_account, db, account_id)  # unknown: 404 before asking Stripe
        card = await run_in_threadpool(caller.runtime.recharges.gateway.card, body.customer, body.payment_method)
        source = await call(
            caller,
            sources_service.add_source,
            db,
            account_id,
            card,
            actor=body.actor,
            clock=backend.clock,
            make_default=body.default,
            notice_delay=caller.runtime.settings.outbox.admin_notice_delay,
        )
        return _json(m.FundingSourceView(**sources_service.describe(source)), 201)

    async def _source_action(
        caller: Caller, account_id: str, source_id: int, action: Any, actor: str
    ) -> m.FundingSourceList:
        """`action` (make_default, reactivate_source, remove_source) on one card; answers the cards left, in order."""
        await call(
            caller,
            action,
            db,
            account_id,
            source_id,
            actor=actor,
            clock=backend.clock,
            notice_delay=caller.runtime.settings.outbox.admin_notice_delay,
        )
        rows = await run_in_threadpool(sources_service.list_sources, db, account_id)
        return m.FundingSourceList(data=[m.FundingSourceView(**row) for row in rows], has_more=False)

    async def _signed_source_action(
        request: Request, account_id: str, source_id: int, action: Any
    ) -> m.FundingSourceList:
        caller = authorize(backend, request, BILLING_WRITE)
        body = await model_body(request, caller, m.Signed)
        return await _source_action(caller, account_id, source_id, action, body.actor)

    @app.post(
        "/v1/accounts/{account_id}/funding-sources/{source_id}/default",
        tags=["funding sources"],
        summary="Make a card the default; answers the cards in their new order",
        response_model=m.FundingSourceList,
        responses=errors(400, 403, 404, 413, 415, 422),
        openapi_extra=request_body(m.Signed),
    )
    async def make_default(account_id: str, source_id: int, request: Request) -> m.FundingSourceList:
        return await _signed_source_action(request, account_id, source_id, sources_service.make_default)

    @app.post(
        "/v1/accounts/{account_id}/funding-sources/{source_id}/reactivate",
        tags=["funding sources"],
        summary="A card declined for good has been fixed: charge it again",
        response_model=m.FundingSourceList,
        responses=errors(400, 403, 404, 413, 415, 422),
        openapi_extra=request_body(m.Signed),
    )
    async def reactivate(account_id: str, source_id: int, request: Request) -> m.FundingSourceList:
        return await _signed_source_action(request, account_id, source_id, sources_service.reactivate_source)

    @app.delete(
        "/v1/accounts/{account_id}/funding-sources/{source_id}",
        tags=["funding sources"],
        summary="Remove a card; a backup becomes the default if it was. Answers the cards left",
        response_model=m.FundingSourceList,
        responses=errors(403, 404, 422),
    )
    async def remove_source(
        account_id: str, source_id: int, request: Request, actor: str = Query(..., max_length=120)
    ) -> m.FundingSourceList:
        caller = authorize(backend, request, BILLING_WRITE)
        return await _source_action(caller, account_id, source_id, sources_service.remove_source, actor)

    # --- receipts, statements, ledger, usage, audit ---------------------------------------------------------

    @app.get(
        "/v1/accounts/{account_id}/receipts",
        tags=["documents"],
        summary="The account's credit receipts, oldest first, with the delivery status of each email",
        response_model=m.ReceiptList,
        responses=errors(403, 404, 422),
    )
    def list_receipts(
        account_id: str, request: Request, limit: int = PAGE_LIMIT, starting_after: str | None = None
    ) -> m.ReceiptList:
        authorize(backend, request, ACCOUNTS_READ)
        rows = [_receipt_row(r) for r in receipts_service.list_receipts(db, account_id)]
        page = views.page_of(rows, "number", limit, starting_after)
        return m.ReceiptList(data=[m.ReceiptSummary(**row) for row in page.data], has_more=page.has_more)

    @app.get(
        "/v1/receipts/{number}",
        tags=["documents"],
        summary="A receipt: JSON, or as its email shows it with Accept: text/plain or text/html",
        response_model=m.ReceiptView,
        responses={
            **errors(403, 404),
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}, "text/html": {"schema": {"type": "string"}}}
            },
        },
    )
    def get_receipt(number: str, request: Request) -> Any:
        caller = authorize(backend, request, ACCOUNTS_READ)
        receipt = receipts_service.get_receipt(db, number)
        wanted = _accepted(request.headers.get("accept", ""), ("application/json", "text/plain", "text/html"))
        if wanted != "application/json":
            rendered = render(caller.runtime.settings, "receipt", receipt.content)
            text = rendered.text if wanted == "text/plain" else rendered.html
            return Response(text, media_type=f"{wanted}; charset=utf-8")
        return m.ReceiptView(
            number=receipt.number,
            account_id=receipt.account_id,
            recharge_id=receipt.recharge_id,
            issued_at=receipt.issued_at,
            kind=str(receipt.kind),
            currency=receipt.currency,
            amount=format_ledger(receipt.amount),
            vat=format_ledger(receipt.vat),
            total=format_ledger(receipt.total),
            balance_after=format_ledger(receipt.balance_after),
            payment_reference=receipt.payment_reference,
            content=receipt.content,
        )

    @app.get(
        "/v1/accounts/{account_id}/statements/{month}",
        tags=["documents"],
        summary="A monthly statement (YYYY-MM): as issued, or as it stands for a month not issued yet; JSON or CSV",
        response_model=m.StatementView,
        responses={**errors(403, 404, 422), 200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
    )
    def get_statement(account_id: str, month: str, request: Request) -> Response:
        caller = authorize(backend, request, ACCOUNTS_READ)
        try:
            first = statements_service.parse_month(month)
        except (ValueError, InputError) as exc:
            raise ApiError(422, str(exc)) from None
        content = statements_service.statement_for(db, caller.runtime.settings, account_id, first, backend.clock.now())
        if _accepted(request.headers.get("accept", ""), ("application/json", "text/csv")) == "text/csv":
            return Response(statements_service.as_csv(content), media_type="text/csv; charset=utf-8")
        return JSONResponse(statements_service.as_json(content))

    @app.get(
        "/v1/accounts/{account_id}/entries",
        tags=["documents"],
        summary="The account's ledger, newest entry first",
        response_model=m.EntryList,
        responses=errors(403, 404, 422),
    )
    def list_entries(
        account_id: str, request: Request, limit: int = PAGE_LIMIT, starting_after: int | None = None
    ) -> m.EntryList:
        authorize(backend, request, ACCOUNTS_READ)
        currency = accounts_service.get_account(db, account_id).currency
        page = views.list_entries(db, account_id, limit=limit, starting_after=starting_after)
        return m.EntryList(currency=currency, data=[m.EntryView(**row) for row in page.data], has_more=page.has_more)

    @app.get(
        "/v1/accounts/{account_id}/usage",
        tags=["documents"],
        summary="Daily usage, balance, threshold and recharges per UTC day, from and to (inclusive, YYYY-MM-DD)",
        response_model=m.DailyUsage,
        responses=errors(403, 404, 422),
    )
    def daily_usage(
        account_id: str,
        request: Request,
        from_: FROM_DAY = None,
        to: TO_DAY = None,
    ) -> JSONResponse:
        caller = authorize(backend, request, ACCOUNTS_READ)
        last = to or backend.clock.now().date()
        first = from_ or date.fromordinal(last.toordinal() - 29)
        if first > last:
            raise ApiError(422, f"from {first} is after to {last}")
        if (last - first).days >= MAX_USAGE_DAYS:
            raise ApiError(422, f"at most {MAX_USAGE_DAYS} days at once")
        history = account_history(db, caller.runtime.settings, account_id, first, last)
        return JSONResponse(history.as_json())

    @app.get(
        "/v1/accounts/{account_id}/audit",
        tags=["documents"],
        summary="Who changed what, newest first: the signer, the API token, the values before and after",
        response_model=m.AuditList,
        responses=errors(403, 404, 422),
    )
    def list_audit(
        account_id: str, request: Request, limit: int = PAGE_LIMIT, starting_after: int | None = None
    ) -> m.AuditList:
        authorize(backend, request, ACCOUNTS_READ)
        page = views.list_audit(db, account_id, limit=limit, starting_after=starting_after)
        return m.AuditList(data=[m.AuditView(**row) for row in page.data], has_more=page.has_more)

    @app.post(
        "/v1/accounts/{account_id}/adjustments",
        tags=["accounts"],
        summary="A manual credit or debit (admin only): signed, audited, once per reference",
        status_code=201,
        response_model=m.AdjustmentResult,
        responses={
            200: {"model": m.AdjustmentResult, "description": "recorded before (same reference and amount)"},
            **errors(400, 403, 404, 409, 413, 415, 422),
        },
        openapi_extra=request_body(m.AdjustmentRequest),
    )
    async def adjust(account_id: str, request: Request) -> JSONResponse:
        caller = authorize(backend, request, ADMIN)
        body = await model_body(request, caller, m.AdjustmentRequest)
        if (body.credit is None) == (body.debit is None):
            raise ApiError(422, "give exactly one of credit or debit")
        what, given = ("credit", body.credit) if body.credit is not None else ("debit", body.debit or "")
        amount = _amount(given, what)
        if amount <= 0:
            raise ApiError(
                422, f"{what} is an amount to {'add' if what == 'credit' else 'take'}: give more than 0, without a sign"
            )
        amount = amount if what == "credit" else -amount
        recorded = await call(
            caller,
            accounts_service.adjust_balance,
            db,
            account_id,
            amount,
            reason=body.reason,
            actor=body.actor,
            clock=backend.clock,
            reference=body.reference,
        )
        account = await run_in_threadpool(accounts_service.get_account, db, account_id)
        result = m.AdjustmentResult(
            account_id=account_id,
            currency=account.currency,
            amount=format_ledger(amount),
            reference=body.reference,
            recorded=recorded,
            balance=format_ledger(account.balance),
        )
        return _json(result, 201 if recorded else 200)

    # --- call authorizations (the dialer, before each call) -------------------------------------------------

    refused: dict[int | str, dict[str, Any]] = {
        402: {"model": m.Refusal, "description": "the call may not be placed: `reason` says why"}
    }

    @app.post(
        "/v1/authorizations",
        tags=["authorizations"],
        summary="May this call be placed, and for how long? Holds its money until its usage settles it",
        description="201 with the authorization: the longest call the available money (balance - held for calls "
        "in progress + overdraft) pays for at the account's rate, never longer than asked. The same call_id "
        "again answers its first authorization (200). 402 when the call may not be placed. Send the call's usage "
        "with `authorization_id` to settle it; `DELETE` it when the call was not placed.",
        status_code=201,
        response_model=m.AuthorizationView,
        responses={
            200: {"model": m.AuthorizationView, "description": "this call was authorized before"},
            **refused,
            **errors(400, 403, 404, 413, 415, 422),
        },
        openapi_extra=request_body(m.AuthorizationRequest),
    )
    async def authorize_call(request: Request) -> JSONResponse:
        caller = authorize(backend, request, USAGE_WRITE)
        body = await model_body(request, caller, m.AuthorizationRequest)
        authorizer = Authorizer(db, caller.runtime.settings, backend.clock)
        try:
            granted = await call(
                caller,
                authorizer.authorize,
                body.account_id,
                body.kind.strip().lower(),
                body.call_id,
                body.requested_seconds,
            )
        except NotAuthorized:
            backend.metrics.authorizations.labels("refused").inc()
            raise
        backend.metrics.authorizations.labels("granted" if granted.created else "repeated").inc()
        return _json(m.AuthorizationView(**granted.authorization), 201 if granted.created else 200)

    @app.get(
        "/v1/authorizations/{authorization_id}",
        tags=["authorizations"],
        summary="One authorization: open, settled by its call's usage, released or expired",
        response_model=m.AuthorizationView,
        responses=errors(403, 404),
    )
    def get_authorization(authorization_id: int, request: Request) -> Any:
        caller = _dialer_or_reader(request)
        return Authorizer(db, caller.runtime.settings, backend.clock).get(authorization_id)

    @app.delete(
        "/v1/authorizations/{authorization_id}",
        tags=["authorizations"],
        summary="The call was not placed: its money is no longer held (again: nothing changes)",
        response_model=m.AuthorizationView,
        responses=errors(403, 404, 409),
    )
    async def release_authorization(authorization_id: int, request: Request) -> Any:
        caller = authorize(backend, request, USAGE_WRITE)
        return await call(caller, Authorizer(db, caller.runtime.settings, backend.clock).release, authorization_id)

    @app.post(
        "/v1/authorizations/{authorization_id}/extend",
        tags=["authorizations"],
        summary="More time for a call in progress, as far as the available money pays",
        response_model=m.AuthorizationView,
        responses={**refused, **errors(400, 403, 404, 409, 413, 415, 422)},
        openapi_extra=request_body(m.ExtendRequest),
    )
    async def extend_authorization(authorization_id: int, request: Request) -> Any:
        caller = authorize(backend, request, USAGE_WRITE)
        body = await model_body(request, caller, m.ExtendRequest)
        authorizer = Authorizer(db, caller.runtime.settings, backend.clock)
        try:
            return await call(caller, authorizer.extend, authorization_id, body.requested_seconds)
        except NotAuthorized:
            backend.metrics.authorizations.labels("refused").inc()  # a 402 as the authorization's own
            raise

    @app.post(
        "/v1/cycles",
        tags=["operations"],
        summary="Run one recharge cycle now (admin only), as `recharged cycle` does; answers what it did",
        description="Recovers recharges left half-way, decides every account afresh, charges the due ones and "
        "credits them; the daemon also runs cycles on its schedule, and two at once never charge an account twice.",
        response_model=m.CycleSummary,
        responses=errors(403),
    )
    async def run_cycle(request: Request) -> m.CycleSummary:
        caller = authorize(backend, request, ADMIN)
        runtime = caller.runtime
        notices = 0

        def notify(plans: Any) -> None:
            nonlocal notices
            notices = notify_from_plans(db, backend.clock.now(), plans)

        report = await call(
            caller,
            runtime.recharges.run_recorded_cycle,
            concurrency=runtime.settings.daemon.charge_concurrency,
            plans_seen=notify,
        )
        return m.CycleSummary(at=report.at, notices=notices, **report.summary())


def _status_change(change: accounts_service.StatusChange) -> m.StatusChange:
    return m.StatusChange(
        account_id=change.account_id,
        status="open" if change.status == "open" else "closed",
        at=change.at,
        balance=format_ledger(change.balance),
        currency=change.currency,
        reason=change.reason,
    )


def _receipt_row(row: receipts_service.ReceiptRow) -> dict[str, Any]:
    return {
        "number": row.number,
        "issued_at": row.issued_at,
        "kind": row.kind,
        "currency": row.currency,
        "amount": format_ledger(row.amount),
        "vat": format_ledger(row.vat),
        "vat_percent": str(row.vat_percent),
        "total": format_ledger(row.total),
        "card": row.card,
        "payment_reference": row.payment_reference,
        "email_status": None if row.email_status is None else str(row.email_status),
    }


def _accepted(header: str, offered: tuple[str, ...]) -> str:
    """Which of `offered` the Accept header prefers (the first offered when it names none of them)."""
    best, best_q = offered[0], Decimal(0)
    for part in header.split(","):
        kind, *params = (p.strip().lower() for p in part.split(";"))
        q = Decimal(1)
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = Decimal(value.strip())
                except ArithmeticError:
                    q = Decimal(0)
        if q <= best_q:
            continue
        match = next((o for o in offered if kind in (o, o.split("/")[0] + "/*", "*/*")), None)
        if match is not None:
            best, best_q = match, q
    return best
