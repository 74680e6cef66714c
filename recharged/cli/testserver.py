"""`recharged testserver`: the bundled Stripe-compatible server on its own, a sandbox for trying charges."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import click

from recharged.cli.app import main, out
from recharged.errors import InputError

if TYPE_CHECKING:
    from recharged.testing import TestCard

DEFAULT_PORT = 12111  # stripe-mock's: where Stripe's own SDKs look for a local server
SANDBOX_API_KEY = "sk_test_sandbox"  # the server takes any sk_test_... or rk_test_... key
SANDBOX_CUSTOMER = "cus_sandbox"
SANDBOX_EMAIL = "sandbox@example.com"


def sandbox_payment_method(test_card: str) -> str:
    """The id under which the sandbox customer holds one of Stripe's test cards: pm_card_visa -> pm_sandbox_visa."""
    return "pm_sandbox_" + test_card.removeprefix("pm_card_")


def _what_a_charge_does(card: TestCard) -> str:
    if card.outcome == "declined":
        return f"declined ({card.decline_code or card.code})"
    if card.outcome == "authentication_required":
        return "needs the customer to authenticate (action required)"
    if card.outcome == "processing":
        return "stays processing (a local card: no Stripe card does that)"
    words = "succeeds"
    if card.dispute_reason:
        words += f", then is disputed ({card.dispute_reason})"
    if card.refunds == "pending":
        words += "; its refunds start pending"
    elif card.refunds == "fail_later":
        words += "; its refunds fail later"
    return words


@main.command("testserver")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. It takes any test key and holds no real money: keep it on this machine.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on; 0 picks a free one (printed).",
)
def testserver(host: str, port: int) -> None:
    """Run the bundled Stripe-compatible test server until Ctrl-C or SIGTERM: a sandbox to try `sources add`,
    `topup` and `cycle` with no network and no Stripe account. It prints what to set to use it and the test cards
    it knows; everything is kept in memory and is gone when it stops."""
    # lazy: the server is only needed here (and by the demo and the tests)
    from recharged.testing import TEST_PAYMENT_METHODS, StripeTestServer

    server = StripeTestServer(host=host, port=port)
    try:
        server.start()
    except OSError as exc:
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port (0 picks a free one)"
            " or --host"
        ) from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cards = {sandbox_payment_method(name): name for name in TEST_PAYMENT_METHODS}
        server.add_customer(SANDBOX_CUSTOMER, cards, email=SANDBOX_EMAIL)
        rows = [("payment method", "Stripe's test card", "card", "a charge")]
        for pm, name in cards.items():
            card = TEST_PAYMENT_METHODS[name]
            rows.append((pm, name, f"{card.brand} ...{card.last4}", _what_a_charge_does(card)))
        widths = [max(len(row[i]) for row in rows) + 2 for i in range(3)]
        lines = [
            "recharged testserver: a Stripe-compatible server in test mode, for trying charges with no network.",
            "Everything is kept in memory and is gone when it stops.",
            "",
            "To use it, set in another shell (or stripe_api_base under [payments] in config.toml):",
            f"  export RECHARGED_PAYMENTS__STRIPE_API_BASE={server.url}",
            f"  export RECHARGED_STRIPE_API_KEY={SANDBOX_API_KEY}",
            "(any key that starts with sk_test_ or rk_test_ is taken)",
            "",
            f"Customer {SANDBOX_CUSTOMER} holds each of Stripe's test cards under the ids below; give an account one:",
            f"  recharged sources add ACCOUNT --customer {SANDBOX_CUSTOMER} --payment-method PAYMENT_METHOD"
            ' --actor "Jane Doe"',
            "",
        ]
        lines += ["".join(f"{cell:<{w}}" for cell, w in zip(row[:3], widths, strict=True)) + row[3] for row in rows]
        lines += [
            "",
            "Stripe's names (pm_card_visa, ...) also work where Stripe takes them: creating a customer with",
            "payment_method=..., or attaching one to a customer.",
            "",
            f"listening on {server.url} (Ctrl-C or SIGTERM stops it)",
        ]
        for line in lines:
            out.print(line, markup=False, highlight=False)
        stop.wait()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.print("recharged testserver: stopped", markup=False, highlight=False)
