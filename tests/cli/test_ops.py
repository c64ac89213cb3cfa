"""The ops commands of the CLI against real Redis and databases: credits, subscription,
plans and reconcile."""

from __future__ import annotations

import pytest

from dispatcher import keys
from dispatcher.cli.main import main
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import smartplan as delivery
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import make_user, send_request, settings_environ


@pytest.fixture
def env(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    # The commands read the test's settings from the environment, its clock included.
    for name, value in settings_environ(runtime.settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(runtime.settings.templates_dir)  # no stray .env file
    make_user(runtime, "agent-1", timezone="America/Denver")
    return runtime


def test_subscription_and_credits_commands(
    env: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["subscription", "upgrade", "agent-1", "25k"]) == 0
    out = capsys.readouterr().out
    assert "plan 25k" in out and "$30.00 charged" in out and "order CE-" in out
    assert main(["subscription", "downgrade", "agent-1", "10k"]) == 0
    assert "10k from the next period" in capsys.readouterr().out
    assert main(["credits", "show", "agent-1"]) == 0
    out = capsys.readouterr().out
    assert "plan        25k (downgrade to 10k pending)" in out
    assert "0 used of 25,000, 25,000 remaining" in out
    assert "-07:00" in out  # the period is shown in the user's zone
    assert main(["subscription", "cancel", "agent-1"]) == 0
    assert credits(env, "agent-1").total == 5000


def test_bad_subscription_change_names_the_field(
    env: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["subscription", "upgrade", "agent-1", "gold"]) == 2
    assert "plan: unknown plan 'gold'" in capsys.readouterr().err
    assert main(["credits", "show", "nobody"]) == 2
    assert "user 'nobody' not found" in capsys.readouterr().err


def test_plans_lists_the_catalog(env: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plans"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["free", "5,000"] and lines[-1].split()[0] == "100k"


def test_reconcile_finds_and_repairs_lost_and_drifted_counters(
    env: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    rt = env
    make_user(rt, "agent-2")
    for n in range(3):
        send_id = submit_send(rt, InlineQueue(), send_request("agent-1", n=n)).send_id
        delivery.deliver(rt, send_id)
    assert credits(rt, "agent-2").used == 0
    assert main(["reconcile"]) == 0
    assert "2 users checked, 0 grants differ" in capsys.readouterr().out
    # Redis loses agent-1's grant, and agent-2's counter drifts
    user1, user2 = credits(rt, "agent-1"), credits(rt, "agent-2")
    rt.redis.delete(keys.grant("agent-1", user1.period, 1))
    rt.redis.hset(keys.grant("agent-2", user2.period, 1), "used", 4990)
    assert main(["reconcile"]) == 1
    out = capsys.readouterr().out
    assert "differs   agent-1 grant 2026-11:1: redis missing; ledger used=3 total=5000" in out
    assert "differs   agent-2 grant 2026-11:1: redis used=4990 total=5000" in out
    assert main(["reconcile", "--repair"]) == 0
    assert "2 grants repaired" in capsys.readouterr().out
    assert (credits(rt, "agent-1").used, credits(rt, "agent-2").used) == (3, 0)
    assert main(["reconcile"]) == 0


def test_suppression_alerts_and_relay_commands(
    env: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["suppression", "add", "agent-1", "Gone@Example.org", "--detail", "asked"]) == 0
    assert "gone@example.org suppressed for agent-1 (manual)" in capsys.readouterr().out
    assert main(["suppression", "list", "agent-1"]) == 0
    out = capsys.readouterr().out
    assert "gone@example.org" in out and "expires never" in out and "1 suppressed" in out
    assert (
        main(
            ["suppression", "add", "agent-1", "x@example.org", "--expires", "2020-01-01T00:00:00Z"]
        )
        == 2
    )
    assert "expires_at: must lie in the future" in capsys.readouterr().err
    why = ["--why", "re-confirmed consent"]
    assert main(["suppression", "remove", "agent-1", "gone@example.org", *why]) == 0
    assert main(["suppression", "remove", "agent-1", "gone@example.org", *why]) == 2
    assert "suppression 'gone@example.org' not found" in capsys.readouterr().err
    assert main(["suppression", "removals", "agent-1"]) == 0
    out = capsys.readouterr().out
    assert "gone@example.org" in out and "by cli:" in out and "re-confirmed consent" in out

    env.relay.halt("535 5.7.8 authentication failed (at login)")
    assert main(["relay", "status"]) == 0
    assert "HALTED" in capsys.readouterr().out
    assert main(["alerts"]) == 0
    out = capsys.readouterr().out
    assert "smtp_auth_failed" in out and "535 5.7.8" in out
    assert main(["relay", "resume"]) == 0
    assert "halt lifted" in capsys.readouterr().out
    assert main(["relay", "status"]) == 0
    assert "state   sending" in capsys.readouterr().out
