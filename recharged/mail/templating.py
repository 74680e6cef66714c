"""Email templates: Jinja2, shipped in recharged/mail/templates/, overridable one file at a time from a folder.

Every message has a text template `NAME.txt` and an HTML template `NAME.html` (autoescaped). The subject is the
`subject` block of the text template. Templates receive plain JSON values (amounts as integer Units with their
currency) and format them with the filters below, so what a template shows is rounded only by `money`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    TemplateError,
    select_autoescape,
)

from recharged.clock import as_utc, parse_instant
from recharged.config import Settings
from recharged.errors import ConfigError, TemplateRenderError
from recharged.money import MINOR_EXPONENT, SYMBOLS, format_customer, to_decimal

TEMPLATES = (
    "receipt",
    "payment_declined",
    "action_required",
    "auto_recharge_suspended",
    "balance_low",
    "balance_exhausted",
    "spend_cap_reached",
    "settings_changed",
    "statement",
    "refund",
    "dispute",
)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


def money(units: int | None, currency: str) -> str:
    """What a customer reads: rounded half-up to the currency's minor unit ('$12.35', '¥1,000')."""
    return "-" if units is None else format_customer(int(units), currency)


def unit_price(units: int, currency: str) -> str:
    """A price as exact as it is set, at least to the minor unit: '$0.0085', '$0.02', '¥2'."""
    exact = to_decimal(int(units)).normalize()
    places = max(MINOR_EXPONENT[currency], -exact.as_tuple().exponent)  # type: ignore[operator]
    text = f"{exact:,.{places}f}"
    symbol = SYMBOLS.get(currency)
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def utc_time(value: str | datetime | None) -> str:
    """'22 Nov 2026, 12:00 UTC'."""
    if value is None:
        return "-"
    moment = parse_instant(value) if isinstance(value, str) else as_utc(value)
    return f"{moment:%d %b %Y, %H:%M} UTC"


def utc_date(value: str | date | None) -> str:
    """'22 Nov 2026'."""
    if value is None:
        return "-"
    day = date.fromisoformat(value[:10]) if isinstance(value, str) else value
    return f"{day:%d %b %Y}"


def percent(value: str | int | float) -> str:
    """'20%', '8.875%'."""
    text = str(value)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}%"


@lru_cache(maxsize=8)
def environment(templates_dir: str = "") -> Environment:
    """The template environment: an admin's folder first (if any), then the shipped templates."""
    loaders: list[Any] = []
    if templates_dir:
        folder = Path(templates_dir)
        if not folder.is_dir():
            raise ConfigError(f"outbox.templates_dir = {templates_dir!r}: no such folder")
        loaders.append(FileSystemLoader(str(folder)))
    loaders.append(PackageLoader("recharged.mail", "templates"))
    env = Environment(
        loader=ChoiceLoader(loaders),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(money=money, unit_price=unit_price, utc=utc_time, day=utc_date, percent=percent)
    return env


def common_context(settings: Settings) -> dict[str, Any]:
    """What every template may show about the business (as configured when the message is rendered)."""
    business = settings.business
    return {
        "business": {
            "name": business.name,
            "address_lines": [line for line in business.address.splitlines() if line.strip()],
            "vat_id": business.vat_id,
            "website": business.website,
            "email": settings.smtp.reply_to or settings.smtp.from_address,
        }
    }


def render(settings: Settings, name: str, context: dict[str, Any]) -> Rendered:
    """Render message `name` with `context` (the business details are added unless the context has its own)."""
    env = environment(settings.outbox.templates_dir)
    values = {**common_context(settings), **context}
    try:
        text_template = env.get_template(f"{name}.txt")
        html_template = env.get_template(f"{name}.html")
        if "subject" not in text_template.blocks:
            raise TemplateRenderError(f"{name}.txt has no {{% block subject %}}")
        subject_parts = text_template.blocks["subject"](text_template.new_context(values))
        subject = re.sub(r"\s+", " ", "".join(subject_parts)).strip()
        text = text_template.render(values)
        html = html_template.render(values)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        raise TemplateRenderError(f"template {name}{where}: {exc}") from exc
    if not subject:
        raise TemplateRenderError(f"template {name}: the subject is empty")
    return Rendered(subject[:250], text, html)
