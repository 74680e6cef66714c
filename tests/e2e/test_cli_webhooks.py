"""`recharged webhooks` and `check-config` as an admin runs them: a real process on the real clock, two real
receivers on loopback (one answering, one failing), and every delivery verified with the `standardwebhooks`
package as the CRM would."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.commands import command_runner, ok
from tests.helpers import OTHER_SECRET, SECRET, Receiver


@pytest.fixture
def receivers():
    with Receiver() as crm, Receiver(answers=(503,)) as billing:
        yield crm, billing


@pytest.fixture
def run(tmp_path, db_url, receivers):
    crm, billing = receivers
    config = tmp_path / "config.toml"
    config.write_text(
        f'[[webhooks.endpoints]]\nname = "crm"\nurl = "{crm.url}"\nevents = ["*"]\n\n'
        f'[[webhooks.endpoints]]\nname = "billing"\nurl = "{billing.url}"\nevents = ["auto_recharge.changed"]\n'
    )
    env = {
        **os.environ,
        "RECHARGED_DATABASE__URL": db_url,
        "RECHARGED_ACTOR": "Jane Doe",
        "RECHARGED_LOGGING__LEVEL": "warning",
        "RECHARGED_WEBHOOK_SECRET_CRM": SECRET,
        "RECHARGED_WEBHOOK_SECRET_BILLING": OTHER_SECRET,
    }
    env.pop("CREDENTIALS_DIRECTORY", None)
    runner = command_runner(tmp_path, env)
    return lambda *args, **extra: runner(*args, config=config, **extra)


def test_check_config_refuses_an_endpoint_without_its_secret_and_never_prints_one(run):
    refused = run("check-config", RECHARGED_WEBHOOK_SECRET_CRM="")
    assert refused.returncode == 78
    assert "'crm': no signing secret: set RECHARGED_WEBHOOK_SECRET_CRM or the credential webhook_secret_crm" in (
        refused.stderr
    )
    shown = ok(run("check-config"))
    assert 'secrets.webhook_secret_crm = "set, from environment RECHARGED_WEBHOOK_SECRET_CRM (value hidden)"' in shown
    assert "webhook_secret_billing" in shown
    assert SECRET not in shown
    assert OTHER_SECRET.removeprefix("whsec_") not in shown


def test_list_send_and_replay_from_the_command_line(run, receivers):
    crm, billing = receivers
    ok(run("db", "upgrade"))
    ok(run("accounts", "create", "acme", "--email", "billing@acme.example", "--plan", "standard", "--vat-percent", "0"))
    ok(run("auto-recharge", "acme", "--enable"))

    waiting = json.loads(ok(run("webhooks", "list", "--json")))
    assert sorted((d["endpoint"], d["status"], d["type"]) for d in waiting) == [
        ("billing", "pending", "auto_recharge.changed"),
        ("crm", "pending", "auto_recharge.changed"),
    ]
    event_id = waiting[0]["event_id"]

    sent = run("webhooks", "send")
    assert sent.returncode == 1, sent.stderr  # billing answered 503: to be retried
    assert "crm: delivered 1, to retry later 0, failed 0" in sent.stdout
    assert "billing: delivered 0, to retry later 1, failed 0" in sent.stdout
    [event] = crm.events()  # verified with the Standard Webhooks library, on the real clock
    assert (event["id"], event["type"], event["account_id"]) == (event_id, "auto_recharge.changed", "acme")
    assert event["data"]["changes"]["auto_recharge"] == {"before": False, "after": True}
    assert billing.events(OTHER_SECRET)[0]["id"] == event_id

    [pending] = json.loads(ok(run("webhooks", "list", "--status", "pending", "--json")))
    assert (pending["endpoint"], pending["attempts"], pending["last_status_code"]) == ("billing", 1, 503)
    assert pending["next_attempt_at"] is not None
    assert "billing" in ok(run("webhooks", "list"))

    replayed = ok(run("webhooks", "replay", event_id))
    assert f"event {event_id} queued again to 2 endpoints: billing, crm" in replayed
    assert run("webhooks", "send").returncode == 1
    assert [e["id"] for e in crm.events()] == [event_id, event_id]

    unknown = run("webhooks", "replay", "evt_nope")
    assert unknown.returncode == 3
    assert "no webhook event 'evt_nope'" in unknown.stderr
