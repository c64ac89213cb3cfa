"""The one place that builds engines, clients and collaborators from settings, lazily."""

from __future__ import annotations

import logging
import threading
from collections.abc import Coroutine
from functools import cached_property
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import db, logs
from dispatcher.aio import LoopThread
from dispatcher.alerts import raise_alert
from dispatcher.clock import Clock, clock_for
from dispatcher.credits.ledger import snapshot_source
from dispatcher.credits.quota import QuotaLedger
from dispatcher.delivery import footer
from dispatcher.delivery.outcomes import OutcomeStream
from dispatcher.delivery.priority import Behind
from dispatcher.delivery.ratelimit import RateLimit
from dispatcher.delivery.relay import RelayGuard, relay_id
from dispatcher.delivery.transports.base import Transport
from dispatcher.delivery.transports.smtp import SMTPConfig, SMTPTransport
from dispatcher.models import AlertKind
from dispatcher.ports import CardOnFileGateway, OutboxOnly, PaymentGateway, StopFlag, TaskQueue
from dispatcher.redisclient import RedisClient, connect
from dispatcher.sealing import Sealer
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Runtime:
    """Shared collaborators of one process; nothing connects until first used."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        transport: Transport | None = None,
        queue: TaskQueue | None = None,
        gateway: PaymentGateway | None = None,
    ) -> None:
        self.settings = settings
        logs.configure(settings.log_level)
        footer.check(settings)  # the operator's footer, rendered once before anything is sent
        self.clock: Clock = clock or clock_for(settings.clock_offset_seconds)
        self._transport = transport
        #: Where follow-up work (notices, receipts) is enqueued; workers/ sets the Celery one.
        self.queue: TaskQueue = queue or OutboxOnly()
        self.gateway: PaymentGateway = gateway or CardOnFileGateway()
        #: The process's warm event loop: SMTP connections opened on it serve the next send.
        self.loop = LoopThread()
        #: Set when the process was told to stop; workers/ sets the one its pool shares.
        self.stopping: StopFlag = threading.Event()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the process's event loop from a synchronous caller (a worker
        thread) and return its result."""
        return self.loop.run(coro)

    @cached_property
    def engine(self) -> Engine:
        s = self.settings
        return db.make_engine(
            s.database_url,
            statement_timeout=s.database_statement_timeout_seconds,
            lock_timeout=s.database_lock_timeout_seconds,
            sqlite_synchronous=s.sqlite_synchronous,
            pool_size=s.database_pool_size,
        )

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.make_sessionmaker(self.engine)

    @cached_property
    def reads(self) -> sessionmaker[Session]:
        """Sessions that only read (on SQLite they wait for no writer; a write in one fails)."""
        return db.make_read_sessionmaker(self.engine)

    @cached_property
    def redis(self) -> RedisClient:
        """The quota store: one Redis, or a Redis Cluster when ``REDIS_URL`` names one."""
        return connect(
            self.settings.redis_url,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )

    @cached_property
    def sealer(self) -> Sealer:
        """Seals and opens stored secrets with ``SECRET_KEYS``."""
        return Sealer(self.settings.secret_keys)

    @cached_property
    def quota(self) -> QuotaLedger:
        return QuotaLedger(self.redis, snapshot_source(self.sessions))

    @cached_property
    def outcomes(self) -> OutcomeStream:
        return OutcomeStream(self.redis, self.settings.outcome_stream)

    @cached_property
    def behind(self) -> Behind:
        """Where SmartPlan tasks say they waited, so that campaigns yield to them."""
        return Behind(self.redis, self.settings.smartplan_lag_seconds)

    @cached_property
    def relay(self) -> RelayGuard:
        """The SMTP relay's halt switch and shared rate limit."""
        s = self.settings
        name = relay_id(s.smtp_host, s.smtp_port)

        def alert(detail: str) -> None:
            raise_alert(self, AlertKind.SMTP_AUTH_FAILED, detail, relay=name)

        return RelayGuard(
            self.redis,
            name,
            limit=RateLimit.from_settings(s),
            halt_seconds=s.relay_halt_seconds,
            on_halt=alert,
        )

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            s = self.settings
            self._transport = SMTPTransport(
                SMTPConfig(
                    host=s.smtp_host,
                    port=s.smtp_port,
                    username=s.smtp_username,
                    password=s.smtp_password,
                    tls=s.smtp_tls,
                    ca_file=s.smtp_ca_file,
                    allow_plaintext_auth=s.smtp_allow_plaintext_auth,
                    timeout=s.smtp_timeout,
                ),
                pool_size=s.smtp_pool_size,
                guard=self.relay,
                idle_close_seconds=s.smtp_idle_seconds,
            )
        return self._transport

    def close(self) -> None:
        """Release pooled connections (safe to call more than once)."""
        transport = self._transport
        self.loop.stop(before=transport.shutdown if transport is not None else None)
        if "redis" in self.__dict__:
            self.redis.close()
        if "engine" in self.__dict__:
            self.engine.dispose()
