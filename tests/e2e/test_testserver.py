"""Issue 14, item 7: a local sandbox for charging. `recharged testserver` runs the bundled Stripe-compatible server
on its own, the README's "Trying charges locally" runs verbatim against it, the demo's config.toml says how to
charge its accounts again, and a processor that cannot be reached is reported within seconds."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from tenacity import wait_none

from recharged.errors import TransientPaymentError
from recharged.payments import ChargeRequest, StripeGateway
from recharged.testing import TEST_PAYMENT_METHODS
from tests.e2e.commands import REPO, command_runner, ok

BIN = Path(sys.executable).parent  # where `recharged` is installed beside the interpreter
README_PORT = 12111  # the default port, which the README's lines name


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any RECHARGED_ setting of the machine running the tests, `recharged` on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECHARGED_")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


class Testserver:
    """`recharged testserver` as a real process; `lines` holds what it printed up to its "listening" line."""

    __test__ = False

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recharged", "testserver", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=clean_env(),
        )
        self._buffer = b""
        self.lines = self.read_until("listening on ")
        self.url = self.lines[-1].split()[2]

    def read_until(self, prefix: str, timeout: float = 60.0) -> list[str]:
        """The lines printed up to and including the first that starts with `prefix` (blocks on the pipe: the
        server prints the line once it listens)."""
        assert self.process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    lines.append(line.decode())
                    if lines[-1].startswith(prefix):
                        return lines
                left = deadline - time.monotonic()
                chunk = os.read(self.process.stdout.fileno(), 65536) if left > 0 and selector.select(left) else b""
                if not chunk:
                    self.process.kill()
                    _, err = self.process.communicate()
                    pytest.fail(f"no line starting {prefix!r}; printed {lines}, stderr {err.decode()}")
                self._buffer += chunk

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send `sig`, wait for the exit; its status and what it printed after the "listening" line."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        out, _ = self.process.communicate(timeout=30)
        return self.process.returncode, (self._buffer + out).decode()


@pytest.fixture
def testserver(tmp_path: Path) -> Iterator[Callable[..., Testserver]]:
    started: list[Testserver] = []

    def start(*args: str) -> Testserver:
        server = Testserver(*args, cwd=tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate()


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_testserver_prints_what_to_set_and_its_test_cards_and_stops_cleanly(testserver, sig):
    server = testserver("--port", "0")
    printed = "\n".join(server.lines)
    assert re.fullmatch(r"http://127\.0\.0\.1:[1-9]\d*", server.url)
    assert f"export RECHARGED_PAYMENTS__STRIPE_API_BASE={server.url}" in printed
    assert "export RECHARGED_STRIPE_API_KEY=sk_test_sandbox" in printed
    for name, card in TEST_PAYMENT_METHODS.items():  # every card of the server's own table, by the id to use
        pm = "pm_sandbox_" + name.removeprefix("pm_card_")
        assert re.search(rf"^{pm} +{name} +{card.brand} \.\.\.{card.last4} +\S", printed, re.MULTILINE), pm
    assert re.search(r"^pm_sandbox_chargeDeclinedInsufficientFunds .* declined \(insufficient_funds\)$", printed, re.M)

    # what it printed works: the key, the customer and its cards are there
    held = requests.get(
        f"{server.url}/v1/customers/cus_sandbox/payment_methods",
        params={"limit": 100},
        auth=("sk_test_sandbox", ""),
        timeout=10,
    ).json()
    assert sorted(pm["id"] for pm in held["data"]) == sorted(
        "pm_sandbox_" + name.removeprefix("pm_card_") for name in TEST_PAYMENT_METHODS
    )

    status, rest = server.stop(sig)
    assert status == 0, rest
    assert "recharged testserver: stopped" in rest
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url, timeout=5)


def test_a_port_in_use_is_refused_with_what_to_do(testserver, tmp_path):
    first = testserver("--port", "0")
    port = first.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "recharged", "testserver", "--port", port],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "choose another --port (0 picks a free one)" in result.stderr
    assert "Traceback" not in result.stderr


def readme_blocks(heading: str) -> list[str]:
    """The ```sh blocks of one README section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def test_the_readmes_local_charging_lines_run_verbatim(testserver, tmp_path):
    start, commands = readme_blocks("### Trying charges locally")
    assert start.split("#")[0].split() == ["recharged", "testserver"]
    # The README's server listens on its default port; this one on a free port, so that tests can run side by
    # side: its address is the one thing put in place of the README's.
    server = testserver("--port", "0")
    readme_url = f"http://127.0.0.1:{README_PORT}"
    exports = [line.strip() for line in server.lines if line.strip().startswith("export ")]
    settings = ("export RECHARGED_PAYMENTS__STRIPE_API_BASE=", "export RECHARGED_STRIPE_API_KEY=")
    assert [line.replace(server.url, readme_url) for line in exports] == [
        line for line in commands.splitlines() if line.startswith(settings)
    ], "the README's export lines are the ones the testserver prints"

    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands.replace(readme_url, server.url)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr

    assert (tmp_path / "sandbox.db").exists()  # a fresh SQLite database of its own
    paid = requests.get(
        f"{server.url}/v1/payment_intents",
        params={"customer": "cus_sandbox", "limit": 100},
        auth=("sk_test_sandbox", ""),
        timeout=10,
    ).json()["data"]
    # the top-up (50.00 and 20% VAT) and the cycle's recharge up to the 100.00 threshold (50.00 and VAT)
    assert sorted((pi["status"], pi["amount"], pi["payment_method"]) for pi in paid) == [
        ("succeeded", 6000, "pm_sandbox_visa"),
        ("succeeded", 6000, "pm_sandbox_visa"),
    ]
    assert sorted(p.name for p in (tmp_path / "outbox").glob("recharged.receipt.*.eml")) == [
        "recharged.receipt.R-000001@example.com.eml",
        "recharged.receipt.R-000002@example.com.eml",
    ]
    verified = subprocess.run(
        ["recharged", "verify"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(RECHARGED_DATABASE__URL="sqlite:///sandbox.db"),
        timeout=120,
    )
    assert "ledger OK" in ok(verified)


@pytest.mark.slow
def test_the_demos_config_says_how_to_charge_its_accounts_again(testserver, tmp_path):
    ok(subprocess.run(["recharged", "demo", "--out", "demo"], capture_output=True, text=True, cwd=tmp_path,
                      env=clean_env(), timeout=300))  # fmt: skip
    config = tmp_path / "demo" / "config.toml"
    text = config.read_text()
    assert f'stripe_api_base = "http://127.0.0.1:{README_PORT}"' in text
    start = re.search(r"^#   (recharged testserver --port \d+)$", text, re.MULTILINE)
    key = re.search(r"^#   export RECHARGED_STRIPE_API_KEY=(\S+)$", text, re.MULTILINE)
    add = re.search(r"^#   (recharged --config .* sources add .*) \\\n#\s+(.*)$", text, re.MULTILINE)
    assert start, text
    assert key, text
    assert add, text
    assert start[1] == f"recharged testserver --port {README_PORT}"

    # the commands as the comment gives them, with the server on a free port instead of the default one
    server = testserver("--port", "0")
    env = clean_env(RECHARGED_STRIPE_API_KEY=key[1], RECHARGED_PAYMENTS__STRIPE_API_BASE=server.url)

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=120)  # fmt: skip

    assert "added visa ...4242 as default funding source" in ok(run(f"{add[1]} {add[2]}"))
    assert "finished" in ok(run(f"recharged --config {config} topup steady 20.00 --actor 'Demo Admin'"))
    assert "ledger OK" in ok(run(f"recharged --config {config} verify"))


def test_sources_add_fails_fast_and_says_why_when_the_processor_cannot_be_reached(tmp_path, db_url):
    """The README's `sources add` took 11 s to fail with no network (4 retries with back-off), and said
    "APIConnectionError: Unexpected error communicating with Stripe". The retry settings are the defaults here."""
    address = f"http://127.0.0.1:{closed_port()}"
    run = command_runner(
        tmp_path,
        clean_env(
            RECHARGED_DATABASE__URL=db_url,
            RECHARGED_PAYMENTS__STRIPE_API_BASE=address,
            RECHARGED_STRIPE_API_KEY="sk_test_cli",
            RECHARGED_ACTOR="Jane Doe",
        ),
    )
    ok(run("accounts", "create", "acme-law", "--email", "billing@acme-law.example", "--plan", "standard",
           "--vat-percent", "20"))  # fmt: skip
    started = time.monotonic()
    result = run("sources", "add", "acme-law", "--customer", "cus_123", "--payment-method", "pm_456")
    elapsed = time.monotonic() - started
    assert result.returncode == TransientPaymentError.exit_code, result.stderr
    assert (
        f"cannot reach the payment processor at {address}: connection refused; "
        "check [payments] stripe_api_base and the network"
    ) in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert elapsed < 5, f"took {elapsed:.1f} s"  # a generous bound around the command's own start-up
    assert "has no funding source" in ok(run("sources", "list", "acme-law"))


def test_only_admin_calls_give_up_early_when_nothing_can_be_sent():
    """A card check tries once more at most; a charge keeps its retries (the same key, nothing sent yet)."""
    retried: list[str] = []
    gateway = StripeGateway(
        "sk_test_x",
        api_base=f"http://127.0.0.1:{closed_port()}",
        max_retries=3,
        wait=wait_none(),
        on_retry=retried.append,
    )
    with pytest.raises(TransientPaymentError, match=r"cannot reach the payment processor at .*: connection refused"):
        gateway.card("cus_1", "pm_1")
    assert retried == ["card"]

    retried.clear()
    request = ChargeRequest("key-1", "cus_1", "pm_1", 1000, "USD", "top-up", {})
    with pytest.raises(TransientPaymentError, match="connection refused"):
        gateway.charge(request)
    assert retried == ["charge"] * 3
