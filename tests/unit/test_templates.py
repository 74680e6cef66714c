"""Every email template renders with edge values (long names, non-ASCII, zero VAT, JPY without a minor unit),
HTML is escaped, subjects are one line, admins can override a template, and messages are well-formed MIME."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email.policy import default

import pytest

from recharged.config import load_settings
from recharged.errors import TemplateRenderError
from recharged.mail.mime import build_message, message_id_for
from recharged.mail.notices import GENERIC_DECLINE, customer_reason
from recharged.mail.templating import TEMPLATES, environment, render, unit_price
from recharged.store.models import OutboxMessage

AT = "2026-11-22T12:00:00+00:00"
LONG = "Ünïcødé Téléphonie & Fils — " + "très long nom " * 12  # 196 characters, near the limit of 200
HOSTILE = '<script>alert("x")</script> & Co'


def settings_with(tmp_path=None, **env: str):
    environ = {
        "RECHARGED_BUSINESS__NAME": "Société Générale de Téléphonie",
        "RECHARGED_BUSINESS__ADDRESS": "12 rue de l'Église\n75001 Paris\nFrance",
        "RECHARGED_BUSINESS__VAT_ID": "FR12345678901",
        "RECHARGED_SMTP__FROM_ADDRESS": "facturation@telephonie.example",
        **env,
    }
    return load_settings(None, environ=environ)


def receipt_context(currency="USD", vat=200_000, vat_percent="20", kind="auto", account="acme", email_="a@b.example"):
    amount = 1_000_000 if currency == "USD" else 100_000_000  # $10.00, ¥1,000
    return {
        "number": "R-000042",
        "issued_at": AT,
        "kind": kind,
        "copy": False,
        "account": {"id": account, "email": email_},
        "currency": currency,
        "amount": amount,
        "vat": vat,
        "vat_percent": vat_percent,
        "total": amount + vat,
        "card": {"brand": "amex", "last4": "0005"},
        "payment_reference": "pi_3Nabc",
        "balance_after": amount + 123_456,
        "minutes": 1234,
        "minutes_label": "dialer minutes",
        "price_per_minute": 2_000 if currency == "USD" else 200_000,
        "reason": {
            "window_days": 30,
            "average_daily": 600_000,
            "threshold_days": 7,
            "threshold": 4_200_000,
            "recharge_days": 14,
            "recharge_amount": amount,
            "note": None,
        }
        if kind == "auto"
        else None,
    }


def contexts(currency: str, account: str, email_: str) -> dict[str, dict]:
    """A context for every template."""
    base = {"account": {"id": account, "email": email_}, "currency": currency, "at": AT, "balance": 123_456}
    card = {"brand": "visa", "last4": "4242"}
    payment = {
        "reference": "pi_3Nabc",
        "receipt": "R-000042",
        "kind": "auto",
        "total": 1_200_000,
        "vat": 200_000,
        "date": AT,
        "card": card,
    }
    return {
        "receipt": receipt_context(currency, account=account, email_=email_),
        "payment_declined": base
        | {
            "kind": "auto",
            "total": 1_200_000,
            "card": card,
            "reason": GENERIC_DECLINE,
            "next": {"action": "retry", "card": None, "at": AT},
        },
        "action_required": base | {"kind": "topup", "total": 1_200_000, "card": card},
        "auto_recharge_suspended": base | {"failed_cycles": 4, "card": card, "reason": GENERIC_DECLINE},
        "balance_low": base | {"threshold": 4_200_000, "average_daily": 600_000, "runway_days": "0.2"},
        "balance_exhausted": base
        | {"balance": -5_000, "threshold": 4_200_000, "average_daily": 0, "runway_days": None},
        "spend_cap_reached": base
        | {"threshold": 4_200_000, "cap": 200_000_000, "period": "per 24 hours", "period_short": "24-hour"},
        "settings_changed": base
        | {
            "actor": "Zoë O'Brien-Łukasiewicz",
            "subject_what": "automatic recharge settings",
            "changes": [{"what": "Automatic recharge", "before": "off", "after": "on"}],
        },
        "statement": {
            "account": {"id": account, "email": email_},
            "currency": currency,
            "month": "2026-11",
            "period_label": "November 2026",
            "start": "2026-11-01",
            "last_day": "2026-11-30",
            "issued_at": AT,
            "partial": False,
            "opening": 5_000_000,
            "products": [
                {"label": "Dialer minutes", "quantity": "1,234", "unit": "min", "amount": 2_468_000, "events": 9},
                {"label": LONG, "quantity": "3", "unit": "segments", "amount": 23_700, "events": 2},
            ],
            "usage_total": 2_491_700,
            "credits": [{"date": AT, "description": "Purchase, receipt R-000042", "amount": 1_000_000}],
            "credits_total": 1_000_000,
            "reversals": [
                {"date": AT, "description": "Refund to your card, receipt R-000042", "amount": -500_000},
                {"date": AT, "description": LONG, "amount": -1},
            ],
            "reversals_total": -500_001,
            "closing": 3_008_299,
            "rounding_note": "Amounts are shown rounded.",
        },
        "refund": base
        | {
            "payment": payment,
            "refund": {"id": "re_1", "amount": 600_000, "balance_change": -500_000, "failed": False},
        },
        "dispute": base
        | {
            "payment": payment,
            "dispute": {
                "id": "du_1",
                "movement": "withdrawn",
                "amount": 1_200_000,
                "balance_change": -1_000_000,
                "reason": "the cardholder told the bank they did not make this payment",
            },
            "auto_recharge_paused": True,
        },
    }


@pytest.mark.parametrize("currency", ["USD", "JPY"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_renders_with_edge_values(name, currency):
    settings = settings_with(RECHARGED_BUSINESS__NAME=LONG)
    context = contexts(currency, account=HOSTILE.replace(" ", ""), email_="zoë@exämple.example")[name]
    rendered = render(settings, name, context)
    assert rendered.subject
    assert "\n" not in rendered.subject
    assert len(rendered.subject) <= 250
    assert "<script>" not in rendered.html
    assert "&lt;script&gt;" in rendered.html
    assert "<script>" in rendered.text  # the text part is not HTML: shown as given
    assert "Ünïcødé Téléphonie" in rendered.text
    assert "Ünïcødé Téléphonie" in rendered.html
    if currency == "JPY" and name != "settings_changed":  # the one notice without an amount
        assert "¥" in rendered.text
        assert "¥1,000.00" not in rendered.text


def test_receipt_shows_every_figure_rounded_to_the_minor_unit():
    text = render(settings_with(), "receipt", receipt_context()).text
    for expected in (
        "Receipt R-000042",
        "Date: 22 Nov 2026, 12:00 UTC",
        "Account: acme (a@b.example)",
        "Credited to your balance     $10.00",
        "VAT 20%                      $2.00",
        "Total charged                $12.00",
        "Paid with: Amex ending in 0005",
        "Payment reference: pi_3Nabc",
        "New balance: $11.23",  # 11.23456 rounded half-up to the cent
        "about 1,234 dialer minutes at $0.02 a minute",
        "your average daily usage over the last 30 days was $6.00; we keep at least 7 days ($42.00) and add "
        "14 days ($10.00) when the balance falls below that.",
        "Société Générale de Téléphonie",
        "12 rue de l'Église",
        "VAT ID: FR12345678901",
    ):
        assert expected in text, expected


def test_zero_vat_reads_none_and_a_topup_has_no_reason():
    rendered = render(settings_with(), "receipt", receipt_context(vat=0, vat_percent="0", kind="topup"))
    assert "VAT 0%                       none" in rendered.text
    assert "One-time purchase" in rendered.text
    assert "Why we charged you" not in rendered.text
    assert "Total charged                $10.00" in rendered.text


def test_jpy_has_no_minor_unit():
    text = render(settings_with(), "receipt", receipt_context("JPY", vat=10_000_000, vat_percent="10")).text
    assert "Credited to your balance     ¥1,000\n" in text
    assert "VAT 10%                      ¥100\n" in text
    assert "Total charged                ¥1,100\n" in text
    assert "at ¥2 a minute" in text


def test_prices_per_minute_keep_their_precision():
    assert unit_price(850, "USD") == "$0.0085"
    assert unit_price(2_000, "USD") == "$0.02"
    assert unit_price(150_000, "EUR") == "€1.50"
    assert unit_price(200_000, "JPY") == "¥2"


def test_a_copy_says_so_in_the_subject_and_body():
    rendered = render(settings_with(), "receipt", receipt_context() | {"copy": True})
    assert rendered.subject.startswith("[Copy] Receipt R-000042")
    assert "COPY" in rendered.text
    assert "Nothing was charged again" in rendered.html


def test_lost_stolen_and_fraud_declines_read_as_a_generic_decline():
    for code in ("lost_card", "stolen_card", "fraudulent", "pickup_card", "do_not_honor", "generic_decline", None):
        assert customer_reason(code, "card_declined") == GENERIC_DECLINE
    assert customer_reason("insufficient_funds", "card_declined") == "the card has insufficient funds"
    assert customer_reason(None, "expired_card") == "the card has expired"


def test_an_admin_template_overrides_the_shipped_one(tmp_path):
    (tmp_path / "receipt.txt").write_text(
        '{% extends "_base.txt" %}{% block subject %}Your receipt {{ number }}{% endblock %}'
        "{% block body %}Thanks! {{ total|money(currency) }}{% endblock %}"
    )
    settings = settings_with(RECHARGED_OUTBOX__TEMPLATES_DIR=str(tmp_path))
    rendered = render(settings, "receipt", receipt_context())
    assert rendered.subject == "Your receipt R-000042"
    assert rendered.text.startswith("Thanks! $12.00\n--\nSociété Générale de Téléphonie\n")
    assert "Receipt R-000042" in rendered.html  # the shipped HTML part still applies


def test_a_broken_override_is_a_clear_error(tmp_path):
    (tmp_path / "receipt.txt").write_text("{% block subject %}x{% endblock %}{{ no_such_value }}")
    settings = settings_with(RECHARGED_OUTBOX__TEMPLATES_DIR=str(tmp_path))
    with pytest.raises(TemplateRenderError, match=r"template receipt.*no_such_value"):
        render(settings, "receipt", receipt_context())
    environment.cache_clear()


def test_message_is_multipart_with_stable_message_id_and_encoded_headers():
    settings = settings_with(RECHARGED_SMTP__REPLY_TO="support@telephonie.example")
    row = OutboxMessage(
        key="receipt:R-000042",
        kind="receipt",
        to_address="billing@acme.example",
        context=receipt_context(),
        created_at=datetime(2026, 11, 22, 12, 0, tzinfo=UTC),
    )
    message_id, subject, raw = build_message(settings, row)
    assert message_id == "<recharged.receipt.R-000042@telephonie.example>"
    assert message_id == message_id_for("receipt:R-000042", "facturation@telephonie.example")
    assert raw.isascii()
    assert "\r\n" in raw
    parsed = email.message_from_string(raw, policy=default)
    assert parsed["Message-ID"] == message_id
    assert parsed["From"].addresses[0].display_name == "Société Générale de Téléphonie"
    assert parsed["Reply-To"] == "support@telephonie.example"
    assert parsed["Date"] == "Sun, 22 Nov 2026 12:00:00 +0000"
    assert parsed["Subject"] == subject == "Receipt R-000042: $10.00 added to your balance"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert "Société Générale" in parsed.get_body(("plain",)).get_content()
    assert build_message(settings, row)[2].split("\r\n\r\n", 1)[1].count("R-000042") == raw.split("\r\n\r\n", 1)[
        1
    ].count("R-000042")


def test_refund_and_dispute_notices_say_what_was_given_back_and_what_left_the_balance():
    refund = contexts("USD", "acme", "a@b.example")["refund"]
    rendered = render(settings_with(), "refund", refund)
    assert rendered.subject == "Refund of $6.00 to your card"
    assert "We refunded $6.00 of the payment pi_3Nabc (receipt R-000042), $12.00 charged" in rendered.text
    assert "taken off the balance of account acme: $5.00 (the refund gives back the VAT" in rendered.text
    returned = refund | {"refund": refund["refund"] | {"failed": True, "balance_change": 500_000}, "balance": -1}
    rendered = render(settings_with(), "refund", returned)
    assert rendered.subject == "Your refund of $6.00 was returned: $5.00 is back on your balance"
    assert "It is below zero: top it up" in rendered.text

    dispute = contexts("USD", "acme", "a@b.example")["dispute"]
    rendered = render(settings_with(), "dispute", dispute)
    assert rendered.subject == "Disputed payment of $12.00: automatic recharge paused"
    assert "What is paused: automatic recharge" in rendered.text
    won = dispute | {"dispute": dispute["dispute"] | {"movement": "reinstated", "balance_change": 1_000_000}}
    rendered = render(settings_with(), "dispute", won)
    assert rendered.subject == "Disputed payment of $12.00: $10.00 back on your balance"
    assert "decided in our favour" in rendered.text
    assert "stays paused until we turn it back on" in rendered.html


def test_a_statement_lists_refunds_and_disputes_on_their_own_lines():
    statement = contexts("USD", "acme", "a@b.example")["statement"]
    text = render(settings_with(), "statement", statement).text
    assert "Refunds and disputes" in text
    assert "Refund to your card, receipt R-000042" in text
    issued_before = {k: v for k, v in statement.items() if k not in ("reversals", "reversals_total")}
    assert "Refunds and disputes" not in render(settings_with(), "statement", issued_before).text
