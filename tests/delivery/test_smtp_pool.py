"""The SMTP connections SmartPlan and system sends keep open, against a real SMTP server.

A worker process sends every message on its warm event loop (``Runtime.run``) through the
transport's pool: connections are reused across sends, at most ``pool_size`` at once; a kept
connection the relay dropped or shed (421 at MAIL) costs one reconnect and never a lost or
doubled message; a refusal after DATA is never resent; idle connections are closed, and
shutdown QUITs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from devstack.devsmtp import DevSMTPServer, reply
from dispatcher.aio import LoopThread
from dispatcher.delivery import smartplan
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.transports.smtp import SMTPConfig, SMTPTransport
from dispatcher.errors import DeliveryDeferred
from dispatcher.models import SendStatus
from dispatcher.ports import OutboxOnly
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import make_user, send_request, wait_for


def _message(n: int) -> tuple[Envelope, bytes]:
    body = (
        f"From: a@example.com\r\nTo: r{n}@example.com\r\nSubject: m{n}\r\n"
        f"Message-ID: <m{n}@example.com>\r\n\r\nhello {n}\r\n"
    ).encode()
    return Envelope("bounces@example.com", (f"r{n}@example.com",)), body


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def _transport(server: DevSMTPServer, **options: float) -> SMTPTransport:
    config = SMTPConfig(host="127.0.0.1", port=server.port, tls="off", timeout=5.0)
    return SMTPTransport(config, pool_size=int(options.pop("pool_size", 2)), **options)


def _ids(server: DevSMTPServer) -> list[str]:
    return sorted(m.message_id for m in server.messages)


def test_sends_in_a_row_share_one_connection(smtp_server: DevSMTPServer, loop: LoopThread) -> None:
    transport = _transport(smtp_server)
    for n in range(10):
        assert loop.run(transport.send(*_message(n))).code == 250
    assert len(smtp_server.messages) == 10
    assert len(set(smtp_server.handler.mail_peers)) == 1
    assert transport.pool is not None and transport.pool.opened == 1


def test_concurrent_sends_use_at_most_pool_size_connections(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    transport = _transport(smtp_server, pool_size=3)
    with ThreadPoolExecutor(8) as threads:
        list(threads.map(lambda n: loop.run(transport.send(*_message(n))), range(40)))
    assert _ids(smtp_server) == sorted(f"<m{n}@example.com>" for n in range(40))
    assert 1 <= len(set(smtp_server.handler.mail_peers)) <= 3


def test_a_connection_the_relay_closed_while_kept_costs_one_reconnect(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    transport = _transport(smtp_server)
    loop.run(transport.send(*_message(1)))
    assert smtp_server.handler.close_connections() == 1
    loop.run(transport.send(*_message(2)))
    assert _ids(smtp_server) == ["<m1@example.com>", "<m2@example.com>"]
    assert transport.pool is not None and transport.pool.opened == 2


def test_a_kept_connection_the_relay_sheds_at_mail_costs_one_reconnect(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    transport = _transport(smtp_server)
    loop.run(transport.send(*_message(1)))
    smtp_server.handler.close_at_mail = 1  # 421 to the next MAIL on the kept connection
    loop.run(transport.send(*_message(2)))
    assert _ids(smtp_server) == ["<m1@example.com>", "<m2@example.com>"]
    peers = smtp_server.handler.mail_peers
    assert len(peers) == 3 and peers[0] == peers[1] != peers[2]


def test_a_new_connection_refused_at_mail_is_deferred_not_retried(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    transport = _transport(smtp_server)
    smtp_server.handler.close_at_mail = 2
    with pytest.raises(DeliveryDeferred):
        loop.run(transport.send(*_message(1)))
    assert smtp_server.messages == [] and len(smtp_server.handler.mail_peers) == 1


def test_a_refusal_after_data_on_a_kept_connection_is_never_resent(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    transport = _transport(smtp_server)
    loop.run(transport.send(*_message(1)))
    answers = iter(["421 4.7.0 try later"])
    smtp_server.handler.fault = lambda stage, _r: next(answers, None) if stage == "data" else None
    with pytest.raises(DeliveryDeferred):
        loop.run(transport.send(*_message(2)))
    assert _ids(smtp_server) == ["<m1@example.com>"]
    assert smtp_server.handler.attempts == 2  # the refused DATA was read once, not twice


def test_a_relay_restart_between_sends_costs_one_reconnect(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    transport = _transport(smtp_server)
    loop.run(transport.send(*_message(1)))
    port = smtp_server.port
    smtp_server.stop()
    again = DevSMTPServer(port=port)
    again.start()
    try:
        loop.run(transport.send(*_message(2)))
        assert [m.message_id for m in again.messages] == ["<m2@example.com>"]
    finally:
        again.stop()
    assert [m.message_id for m in smtp_server.messages] == ["<m1@example.com>"]


def test_idle_connections_are_closed_and_shutdown_quits_the_rest(
    smtp_server: DevSMTPServer, loop: LoopThread
) -> None:
    idle = _transport(smtp_server, idle_close_seconds=0.3)
    loop.run(idle.send(*_message(1)))
    wait_for(lambda: smtp_server.handler.quits == 1, timeout=5, what="idle connection closed")
    assert idle.pool is not None and idle.pool.idle == 0

    kept = _transport(smtp_server)
    with ThreadPoolExecutor(4) as threads:
        list(threads.map(lambda n: loop.run(kept.send(*_message(n))), range(2, 10)))
    opened = kept.pool.opened if kept.pool else 0
    loop.stop(before=kept.shutdown)
    assert smtp_server.handler.quits == 1 + opened
    assert len(smtp_server.messages) == 9


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_smartplan_sends_of_a_worker_reuse_its_connection_and_close_it_on_shutdown(
    smtp_server: DevSMTPServer, make_runtime: Callable[..., Runtime]
) -> None:
    rt = make_runtime()
    make_user(rt)
    ids = [submit_send(rt, OutboxOnly(), send_request(n=n)).send_id for n in range(6)]
    assert [smartplan.deliver(rt, i) for i in ids] == [SendStatus.SENT] * 6
    assert len(smtp_server.messages) == 6
    assert len(set(smtp_server.handler.mail_peers)) == 1
    rt.close()
    assert smtp_server.handler.quits == 1


def test_a_loop_thread_refuses_to_wait_for_itself() -> None:
    thread = LoopThread()
    try:

        async def inner() -> None:
            async def nothing() -> None:
                return None

            thread.run(nothing())

        with pytest.raises(RuntimeError, match="its own loop"):
            thread.run(inner())
    finally:
        thread.stop()


def test_reply_helper_still_answers_at_rcpt(smtp_server: DevSMTPServer, loop: LoopThread) -> None:
    """A refusal at RCPT on a kept connection is reset and the connection kept."""
    transport = _transport(smtp_server)
    loop.run(transport.send(*_message(1)))
    answers = iter([reply("550 5.1.1 no such user")])
    smtp_server.handler.fault = lambda stage, _r: next(answers, None) if stage == "rcpt" else None
    with pytest.raises(Exception, match="550"):
        loop.run(transport.send(*_message(2)))
    loop.run(transport.send(*_message(3)))
    assert _ids(smtp_server) == ["<m1@example.com>", "<m3@example.com>"]
    assert len(set(smtp_server.handler.mail_peers)) == 1
