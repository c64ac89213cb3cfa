"""Typed settings read from the environment (and an optional .env file), built in one place.

pydantic-settings finds each field's variable (``SMTP_PORT`` for ``smtp_port``; an empty value
is unset) and pydantic parses it; the rules between settings and the .env reader are ours.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dispatcher.dkimkeys import SELECTOR, DkimKey, dkim_keys_text, domains_text
from dispatcher.errors import ConfigError
from dispatcher.redisclient import is_cluster, parse_cluster_url
from dispatcher.sealing import valid_key

#: The plan every user starts on; PLAN_CATALOG lists the paid plans and may not name it.
FREE_PLAN = "free"


def parse_catalog(variable: str, value: str) -> tuple[tuple[str, int, int], ...]:
    """``name:credits:price,...`` with the price in dollars and cents, e.g. ``10k:10000:15.00``."""
    out: list[tuple[str, int, int]] = []
    for item in (i.strip() for i in value.split(",") if i.strip()):
        parts = item.split(":")
        if len(parts) != 3:
            raise ConfigError(variable, f"{item!r} is not name:credits:price")
        name, credits, price = (p.strip() for p in parts)
        if not name or name == FREE_PLAN or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(variable, f"{name!r} is not a valid paid plan name")
        try:
            credits_n = int(credits)
            dollars, _, cents = price.partition(".")
            price_cents = int(dollars) * 100 + int((cents + "00")[:2] or 0)
        except ValueError:
            raise ConfigError(
                variable, f"{item!r}: credits must be whole, price like 15.00"
            ) from None
        if credits_n <= 0 or price_cents <= 0:
            raise ConfigError(variable, f"{item!r}: credits and price must be positive")
        if name in (n for n, _, _ in out):
            raise ConfigError(variable, f"plan {name!r} is listed twice")
        out.append((name, credits_n, price_cents))
    if not out:
        raise ConfigError(variable, "lists no plan")
    return tuple(out)


def _tokens_text(value: Any, info: ValidationInfo) -> Any:
    """A variable's ``a,b,c``; every token at least 8 characters. Tuples from code pass as
    they are."""
    if not isinstance(value, str):
        return value
    tokens = tuple(t.strip() for t in value.split(",") if t.strip())
    if any(len(t) < 8 for t in tokens):
        raise ConfigError(str(info.field_name).upper(), "every token must be at least 8 characters")
    return tokens


def _catalog_text(value: Any, info: ValidationInfo) -> Any:
    return parse_catalog(str(info.field_name).upper(), value) if isinstance(value, str) else value


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


#: Comma-separated in a variable (pydantic-settings would read a JSON list otherwise).
Tokens = Annotated[tuple[str, ...], BeforeValidator(_tokens_text)]
Catalog = Annotated[tuple[tuple[str, int, int], ...] | None, BeforeValidator(_catalog_text)]
#: true/false, yes/no, on/off, 1/0 (any case, spaces around ignored).
Flag = Annotated[bool, BeforeValidator(_stripped)]
#: How the SMTP relay connection is encrypted (any case, spaces around ignored).
SmtpTls = Annotated[
    Literal["opportunistic", "starttls", "implicit", "off"],
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
]

#: When SQLite makes a commit durable: ``normal`` (WAL's recommended level: a commit survives a
#: crash of any process; the last commits may roll back on a power cut or an OS crash) or
#: ``full`` (each commit is synced to disk first: survives those too, at a disk flush each).
SqliteSynchronous = Annotated[
    Literal["normal", "full"],
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
]


#: URL schemes of a single Redis server.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: The broker URL schemes Celery is run on here: Redis, and RabbitMQ (AMQP 0-9-1).
BROKER_SCHEMES = (*REDIS_SCHEMES, "amqp://", "amqps://", "pyamqp://")

#: Variables Celery reads from the environment by itself, over the app's configuration (the
#: ``celery`` command sets the first from ``-b`` or ``BROKER_URL``, the last from
#: ``--result-backend`` or ``RESULT_BACKEND``). Any of them naming another broker or a result
#: store would take the workers elsewhere than the API, so start-up refuses them:
#: ``BROKER_URL`` is the one setting.
CELERY_OWN_VARIABLES = (
    "CELERY_BROKER_URL",
    "CELERY_BROKER_READ_URL",
    "CELERY_BROKER_WRITE_URL",
    "CELERY_RESULT_BACKEND",
)

#: What a client's token may do (``API_CLIENTS``); see the README's Security section.
SCOPES = ("smartplan:send", "campaigns:write", "users:write", "billing", "read", "ops")
#: The scopes of a token listed in ``API_TOKENS`` (all but ``ops``) and in ``OPS_TOKENS``.
PRODUCER_SCOPES = tuple(s for s in SCOPES if s != "ops")


@dataclass(frozen=True)
class ApiClient:
    """One caller of the HTTP API: its name (logs and records say who called), its bearer
    token, what it may do, and the agents it may act for (None: every agent)."""

    name: str
    token: str = field(repr=False)
    scopes: frozenset[str]
    users: frozenset[str] | None = None


def _clients_text(value: Any) -> Any:
    """``API_CLIENTS`` as JSON: a list of {"name", "token", "scopes", "users"?}. Built in
    code, a tuple of :class:`ApiClient` passes as it is."""
    if not isinstance(value, str):
        return value
    try:
        items = json.loads(value) if value.strip() else []
    except json.JSONDecodeError as exc:
        raise ConfigError("API_CLIENTS", f"is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(items, list):
        raise ConfigError("API_CLIENTS", "must be a JSON list of clients")
    clients = []
    for n, item in enumerate(items):
        where = f"client {n + 1}"
        if not isinstance(item, dict) or set(item) - {"name", "token", "scopes", "users"}:
            raise ConfigError("API_CLIENTS", f"{where}: has name, token, scopes and users only")
        name, token, scopes = item.get("name"), item.get("token"), item.get("scopes")
        users = item.get("users")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise ConfigError("API_CLIENTS", f"{where}: name must be 1-64 letters, digits, _.-")
        if not isinstance(token, str):
            raise ConfigError("API_CLIENTS", f"{name}: token must be a string")
        if not isinstance(scopes, list) or not scopes or set(scopes) - set(SCOPES):
            raise ConfigError("API_CLIENTS", f"{name}: scopes must be some of {', '.join(SCOPES)}")
        if users is not None and not (
            isinstance(users, list) and users and all(isinstance(u, str) for u in users)
        ):
            raise ConfigError("API_CLIENTS", f"{name}: users must be a list of user ids")
        clients.append(
            ApiClient(name, token, frozenset(scopes), None if users is None else frozenset(users))
        )
    return tuple(clients)


Clients = Annotated[tuple[ApiClient, ...], BeforeValidator(_clients_text)]

Domains = Annotated[tuple[str, ...], BeforeValidator(domains_text)]
DkimKeys = Annotated[tuple[DkimKey, ...], BeforeValidator(dkim_keys_text)]


class Settings(BaseSettings):
    """Everything the dispatcher needs to know about its environment.

    Build with :meth:`from_env`; tests build it directly or with :meth:`with_overrides`.
    Built directly, it reads its arguments only, never the environment. Any invalid value
    raises :class:`ConfigError` naming the variable.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", enable_decoding=False)

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: The Celery broker every process publishes to and consumes from (API included); None is
    #: ``REDIS_URL``. ``amqp://`` is RabbitMQ (quorum queues). See :attr:`broker`.
    broker_url: str | None = Field(default=None, repr=False)
    database_url: str = "sqlite:///dispatcher.db"
    #: PostgreSQL only: no statement runs longer, and no lock is waited on longer, than this
    #: (0 turns the limit off); a stuck query frees its worker or request instead of holding it.
    database_statement_timeout_seconds: float = 30.0
    database_lock_timeout_seconds: float = 10.0
    #: Database connections a process keeps open for reuse. A process using more at once (the
    #: API's request threads, a worker's threads) opens up to 10 more, each closed as soon as
    #: it is given back: on PostgreSQL a new connection costs a server process and several
    #: round trips, so this should cover the process's usual concurrency.
    database_pool_size: int = 20
    #: SQLite only: see :data:`SqliteSynchronous` (PostgreSQL syncs every commit).
    sqlite_synchronous: SqliteSynchronous = "normal"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_username: str | None = None
    smtp_password: str | None = Field(default=None, repr=False)
    #: How the relay connection is encrypted: ``opportunistic`` (STARTTLS when the relay offers
    #: it), ``starttls`` (required), ``implicit`` (TLS from the first byte, port 465) or ``off``.
    smtp_tls: SmtpTls = "opportunistic"
    #: A PEM bundle of the CAs that may sign the relay's certificate (None: the system's).
    smtp_ca_file: str | None = None
    #: Send the relay login over a connection that is not encrypted (never, unless set).
    smtp_allow_plaintext_auth: Flag = False
    smtp_timeout: float = 30.0
    mail_from: str = "Command Email <no-reply@command-email.localhost>"
    #: Domains agents may send as (their own address in the From field), each with a key in
    #: DKIM_KEYS; an agent on another domain sends as the platform (see delivery/identity.py).
    #: The platform's own domain (MAIL_FROM's) may be listed too: its mail is then signed.
    sender_domains: Domains = ()
    #: The DKIM key of each domain of SENDER_DOMAINS (JSON, see :class:`DkimKey`).
    dkim_keys: DkimKeys = Field(default=(), repr=False)
    #: The selector of a DKIM_KEYS entry that names none.
    dkim_selector: str | None = None
    #: The folder of the compliance footer every campaign and SmartPlan email carries
    #: (``_footer.html``, ``_footer.txt``); None: TEMPLATES_DIR's ``email`` folder.
    footer_dir: str | None = None
    mailchimp_base_url: str | None = None
    #: Named API clients with scopes and, optionally, the agents they may act for (JSON).
    api_clients: Clients = Field(default=(), repr=False)
    #: Unnamed producer tokens with every scope but ``ops`` (clients named api-1, api-2, ...).
    api_tokens: Tokens = Field(default=(), repr=False)
    #: Bearer tokens of operators (scope ``ops``: lifting a relay halt over HTTP).
    ops_tokens: Tokens = Field(default=(), repr=False)
    free_plan_credits: int = 5000
    #: Paid plans as (name, monthly credits, price in cents); None keeps the built-in tiers.
    plan_catalog: Catalog = None
    renewal_sweep_seconds: int = 300
    #: How often beat starts the scheduled campaigns that are due (a campaign starts at most
    #: this long after its ``send_at``; under a minute, as promised to agents).
    schedule_sweep_seconds: int = 15
    #: How far ahead a campaign may be scheduled (``send_at``), in days.
    schedule_max_days: int = 365
    #: SMTP connections a worker process keeps open (and a campaign chunk reuses).
    smtp_pool_size: int = 8
    #: SmartPlan steps submitted together (``POST /v1/sends/batch``) are delivered this many
    #: to a task, their conversations side by side; 1 gives each its own task.
    smartplan_batch_size: int = 50
    #: SmartPlan steps go before campaigns: while SmartPlan tasks wait longer than this in
    #: their queue, campaigns slow to a fifth of their speed (delivery/priority.py); 0: off.
    smartplan_lag_seconds: float = 0.1
    #: An SMTP connection kept open between SmartPlan and system sends is closed after this
    #: long unused.
    smtp_idle_seconds: float = 30.0
    campaign_chunk_size: int = 500  # recipients per campaign task
    max_campaign_recipients: int = 100_000
    #: A Command Email campaign of at least this many valid recipients (starting now) is
    #: answered once its recipients are stored compactly on the campaign row and their credits
    #: reserved; its first chunk task writes the send rows. 0: every campaign is stored row by
    #: row before the answer.
    campaign_compact_from: int = 10_000
    max_message_bytes: int = 1_000_000
    #: The largest request body the HTTP API reads, in bytes (413 above it, refused before the
    #: body is read). None sizes it for the largest campaign: see :attr:`request_limit`.
    max_request_bytes: int | None = None
    #: Wall time one render of an agent's template may take (all its parts together); this,
    #: not TASK_TIME_LIMIT, bounds a render on a threads pool, where Celery enforces no limit.
    template_render_seconds: float = 2.0
    #: Largest rendered HTML or text part, in UTF-8 bytes.
    template_max_output_bytes: int = 2_000_000
    send_max_retries: int = 8
    send_lease_seconds: int = 300
    retry_backoff_seconds: float = 5.0
    retry_backoff_max_seconds: float = 900.0
    task_time_limit: int = 240
    visibility_timeout: int = 3600
    outcome_stream: str = "ced:smartplan:outcomes"
    templates_dir: str = str(Path(__file__).resolve().parent.parent / "templates")
    log_level: str = "INFO"
    #: Workers publish task events (received, started, succeeded, failed) so Flower and
    #: ``celery events`` can follow them; false saves a broker message per task and state.
    task_events: Flag = True
    #: A worker serves its process's metrics (its host's, with PROMETHEUS_MULTIPROC_DIR) on
    #: this port for Prometheus to scrape; None serves none (the API's /metrics still does).
    metrics_port: int | None = None
    #: Messages the SMTP relay takes from all workers together; None is unlimited.
    smtp_rate_per_second: int | None = None
    smtp_rate_per_hour: int | None = None
    #: Where recipients reach the one-click unsubscribe endpoint (HTTPS in production).
    public_base_url: str = "http://127.0.0.1:8000"
    #: Key that signs unsubscribe tokens; None uses a development key and says so in the log.
    unsubscribe_secret: str | None = Field(default=None, repr=False)
    #: How long a portal link (``POST /v1/users/{id}/portal-link``) may be opened after it was
    #: made; it is signed with ``UNSUBSCRIBE_SECRET`` under a key of its own.
    portal_link_seconds: int = 900
    #: How long the session a portal link or an operator's login opens lasts (page cookies).
    portal_session_seconds: int = 3600
    #: Fernet keys that seal stored secrets (MailChimp API keys): the first seals, all open
    #: (rotation); none uses a development key, refused for a public deployment.
    secret_keys: Tokens = Field(default=(), repr=False)
    #: The mailto: address in List-Unsubscribe; default unsubscribe@ the MAIL_FROM domain.
    unsubscribe_mailto: str | None = None
    #: How long sending stops after the relay refused our credentials (ops can resume sooner).
    relay_halt_seconds: int = 900
    #: Open tracking: a 1x1 image in each copy's HTML (off: see the README on privacy).
    track_opens: Flag = False
    #: Click tracking: each copy's http(s) links through a signed redirect (off by default).
    track_clicks: Flag = False
    #: Where the dispatcher POSTs its events (sent, failed, unknown, unsubscribed, bounced,
    #: complained), signed with ``EVENTS_WEBHOOK_SECRET``; None sends none.
    events_webhook_url: str | None = None
    #: The HMAC-SHA256 key of the events webhook's signature (at least 32 characters).
    events_webhook_secret: str | None = Field(default=None, repr=False)
    #: How often beat asks for the events not yet delivered to be pushed.
    events_push_seconds: float = 5.0
    #: Events per POST (one JSON document ``{"events": [...]}``).
    events_batch_size: int = 500
    #: Port of the inbound SMTP server (``serve-unsubscribe``); None: the platform's ``PORT``,
    #: else 2526. ``UNSUBSCRIBE_SMTP_PORT``, its earlier name, is read too.
    inbound_smtp_port: int | None = None
    #: Temporary failures reported after delivery (DSN 4.x.x or delayed, a relay's soft
    #: bounce), each on a different email, after which an address is suppressed.
    soft_bounce_limit: int = 3
    #: Amazon SES through SNS (``POST /v1/webhooks/ses``): a PEM file of the certificate SNS
    #: signs with. None: the certificate at the message's ``SigningCertURL`` (HTTPS, an
    #: ``sns.<region>.amazonaws.com`` host only), fetched once per process.
    ses_signing_cert_file: str | None = None
    #: The SNS topics (ARNs, comma-separated) SES notifications may come from; none refuses
    #: the route. SNS signs every AWS account's messages with the same certificate, so a
    #: message signed for someone else's topic must not be taken.
    ses_topic_arns: Tokens = ()
    #: SendGrid's Event Webhook verification key (``POST /v1/webhooks/sendgrid``): the
    #: base64 public key SendGrid shows for signed event webhooks; None refuses the route.
    sendgrid_webhook_public_key: str | None = Field(default=None, repr=False)
    #: Postmark (``POST /v1/webhooks/postmark``): ``user:password`` of the basic auth set in
    #: the webhook's URL; None refuses the route.
    postmark_webhook_auth: str | None = Field(default=None, repr=False)
    #: Mailgun's HTTP webhook signing key (``POST /v1/webhooks/mailgun``); None refuses it.
    mailgun_signing_key: str | None = Field(default=None, repr=False)
    #: How long the API and workers wait at start for the database schema to reach the
    #: migrations' head (a release still migrating) before giving up.
    schema_wait_seconds: float = 60.0
    #: Seconds added to the wall clock by every process built from these settings: tests and
    #: rehearsals (a month end, a renewal) run real processes in another period. 0 in production.
    clock_offset_seconds: float = 0.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the arguments: the environment is read by from_env, which is given it.
        return (init_settings,)

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_variable(
        cls, data: Any, handler: ModelWrapValidatorHandler[Settings]
    ) -> Settings:
        try:
            return handler(data)
        except ValidationError as error:
            raise _config_error(error) from None

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        self._check()
        return self

    def _check(self) -> None:
        """Every rule between settings; the first one broken raises :class:`ConfigError`."""
        self._check_limits()
        self._check_tokens()
        self._check_services()
        self._check_public()
        self._check_identity()
        if not math.isfinite(self.clock_offset_seconds):
            raise ConfigError("CLOCK_OFFSET_SECONDS", "must be a finite number of seconds")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("LOG_LEVEL", "must be DEBUG, INFO, WARNING or ERROR")

    def _check_limits(self) -> None:
        """Sizes, time limits and the order they must keep."""
        if self.free_plan_credits < 0:
            raise ConfigError("FREE_PLAN_CREDITS", "must be zero or more")
        if not 0 < self.smtp_port < 65536:
            raise ConfigError("SMTP_PORT", f"{self.smtp_port} is not a TCP port")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError("METRICS_PORT", f"{self.metrics_port} is not a TCP port")
        if self.max_message_bytes < 1024:
            raise ConfigError("MAX_MESSAGE_BYTES", "must be at least 1024")
        if not 0 < self.template_render_seconds <= self.task_time_limit:
            raise ConfigError(
                "TEMPLATE_RENDER_SECONDS",
                f"must be above 0 and at most TASK_TIME_LIMIT ({self.task_time_limit}s)",
            )
        if self.template_max_output_bytes < 10_000:
            raise ConfigError("TEMPLATE_MAX_OUTPUT_BYTES", "must be at least 10000")
        if self.send_max_retries < 0:
            raise ConfigError("SEND_MAX_RETRIES", "must be zero or more")
        if self.retry_backoff_max_seconds >= self.visibility_timeout:
            raise ConfigError(
                "RETRY_BACKOFF_MAX_SECONDS",
                f"must stay below VISIBILITY_TIMEOUT ({self.visibility_timeout}s), "
                "or a waiting retry would be redelivered",
            )
        if self.task_time_limit >= self.visibility_timeout:
            raise ConfigError(
                "TASK_TIME_LIMIT",
                f"must stay below VISIBILITY_TIMEOUT ({self.visibility_timeout}s)",
            )
        if self.send_lease_seconds <= self.task_time_limit:
            raise ConfigError(
                "SEND_LEASE_SECONDS",
                f"must exceed TASK_TIME_LIMIT ({self.task_time_limit}s) so a live send keeps it",
            )

    def _check_services(self) -> None:
        """Addresses of and rules for Redis, the plans, the SMTP relay and the database."""
        if "@" not in parseaddr(self.mail_from)[1]:
            raise ConfigError("MAIL_FROM", f"{self.mail_from!r} has no email address")
        if is_cluster(self.redis_url):
            try:
                parse_cluster_url(self.redis_url)
            except ValueError as exc:
                raise ConfigError("REDIS_URL", f"Redis Cluster: {exc}") from None
        elif not self.redis_url.startswith(REDIS_SCHEMES):
            raise ConfigError(
                "REDIS_URL",
                "must start with redis://, rediss:// or unix:// (one server), or "
                "redis+cluster:// or rediss+cluster:// (a Redis Cluster)",
            )
        if self.broker_url is not None and not self.broker_url.startswith(BROKER_SCHEMES):
            raise ConfigError(
                "BROKER_URL",
                f"must start with {', '.join(BROKER_SCHEMES)} (or be unset: REDIS_URL)",
            )
        if self.plan_catalog is not None:
            small = [n for n, c, _ in self.plan_catalog if c <= self.free_plan_credits]
            if small:
                raise ConfigError(
                    "PLAN_CATALOG", f"paid plan {small[0]!r} has no more credits than the free plan"
                )
        if not 1 <= self.database_pool_size <= 200:
            raise ConfigError("DATABASE_POOL_SIZE", "must be from 1 to 200")
        if not 1 <= self.smtp_pool_size <= 100:
            raise ConfigError("SMTP_POOL_SIZE", "must be from 1 to 100")
        if not 1 <= self.smartplan_batch_size <= 1000:
            raise ConfigError("SMARTPLAN_BATCH_SIZE", "must be from 1 to 1000")
        if not 0 <= self.smartplan_lag_seconds <= 3600:
            raise ConfigError("SMARTPLAN_LAG_SECONDS", "must be from 0 (off) to 3600")
        if not 0 < self.smtp_idle_seconds <= 3600:
            raise ConfigError("SMTP_IDLE_SECONDS", "must be more than 0 and at most 3600")
        if not 1 <= self.campaign_chunk_size <= 10_000:
            raise ConfigError("CAMPAIGN_CHUNK_SIZE", "must be from 1 to 10000")
        if self.max_campaign_recipients < 1:
            raise ConfigError("MAX_CAMPAIGN_RECIPIENTS", "must be at least 1")
        if self.campaign_compact_from < 0:
            raise ConfigError("CAMPAIGN_COMPACT_FROM", "must be 0 (never) or more")
        if self.max_request_bytes is not None and self.max_request_bytes < 1024:
            raise ConfigError("MAX_REQUEST_BYTES", "must be at least 1024 (or unset)")
        if self.renewal_sweep_seconds < 10:
            raise ConfigError("RENEWAL_SWEEP_SECONDS", "must be at least 10")
        if not 1 <= self.schedule_sweep_seconds <= 50:
            # A due campaign must start within a minute of its time, the sweep's own run
            # included.
            raise ConfigError("SCHEDULE_SWEEP_SECONDS", "must be between 1 and 50")
        if self.schedule_max_days < 1:
            raise ConfigError("SCHEDULE_MAX_DAYS", "must be at least 1")
        for name, rate in (
            ("SMTP_RATE_PER_SECOND", self.smtp_rate_per_second),
            ("SMTP_RATE_PER_HOUR", self.smtp_rate_per_hour),
        ):
            if rate is not None and rate < 1:
                raise ConfigError(name, "must be at least 1 (leave it unset for no limit)")
        for name, seconds in (
            ("DATABASE_STATEMENT_TIMEOUT_SECONDS", self.database_statement_timeout_seconds),
            ("DATABASE_LOCK_TIMEOUT_SECONDS", self.database_lock_timeout_seconds),
        ):
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ConfigError(name, "must be a number of seconds (0 for no limit)")
        if self.smtp_username and self.smtp_tls == "off" and not self.smtp_allow_plaintext_auth:
            raise ConfigError(
                "SMTP_TLS",
                "is off while SMTP_USERNAME is set: the relay login would travel in plain text "
                "(use starttls or implicit, or set SMTP_ALLOW_PLAINTEXT_AUTH=true)",
            )
        if self.smtp_ca_file is not None and not Path(self.smtp_ca_file).is_file():
            raise ConfigError("SMTP_CA_FILE", f"{self.smtp_ca_file} is not a readable file")
        if self.relay_halt_seconds < 1:
            raise ConfigError("RELAY_HALT_SECONDS", "must be at least 1")
        for name, value in (
            ("PORTAL_LINK_SECONDS", self.portal_link_seconds),
            ("PORTAL_SESSION_SECONDS", self.portal_session_seconds),
        ):
            if value < 1:
                raise ConfigError(name, "must be at least 1 second")
        if self.inbound_smtp_port is not None and not 0 < self.inbound_smtp_port < 65536:
            raise ConfigError("INBOUND_SMTP_PORT", f"{self.inbound_smtp_port} is not a TCP port")
        if self.soft_bounce_limit < 1:
            raise ConfigError("SOFT_BOUNCE_LIMIT", "must be at least 1")
        if (
            self.ses_signing_cert_file is not None
            and not Path(self.ses_signing_cert_file).is_file()
        ):
            raise ConfigError(
                "SES_SIGNING_CERT_FILE", f"{self.ses_signing_cert_file} is not a readable file"
            )
        if not all(a.startswith("arn:aws") and ":sns:" in a for a in self.ses_topic_arns):
            raise ConfigError("SES_TOPIC_ARNS", "every entry must be an SNS topic ARN")
        if self.postmark_webhook_auth is not None and ":" not in self.postmark_webhook_auth:
            raise ConfigError("POSTMARK_WEBHOOK_AUTH", "must be user:password")
        if not (math.isfinite(self.schema_wait_seconds) and self.schema_wait_seconds >= 0):
            raise ConfigError("SCHEMA_WAIT_SECONDS", "must be a number of seconds (0: no wait)")

    def _check_public(self) -> None:
        """What a deployment reachable from the internet needs (keys of its own)."""
        if not self.public_base_url.startswith(("https://", "http://")):
            raise ConfigError("PUBLIC_BASE_URL", "must start with https:// (or http:// locally)")
        if self.unsubscribe_secret is None and self.public_base_url.startswith("https://"):
            raise ConfigError(
                "UNSUBSCRIBE_SECRET",
                "must be set when PUBLIC_BASE_URL is a public https:// address (the development "
                "key is in the source, so anyone could unsubscribe anyone)",
            )
        if self.unsubscribe_secret is not None and len(self.unsubscribe_secret) < 16:
            raise ConfigError("UNSUBSCRIBE_SECRET", "must be at least 16 characters")
        if self.unsubscribe_mailto is not None and "@" not in self.unsubscribe_mailto:
            raise ConfigError("UNSUBSCRIBE_MAILTO", "must be an email address")
        for name, value in (
            ("PUBLIC_BASE_URL", self.public_base_url),
            ("UNSUBSCRIBE_MAILTO", self.unsubscribe_mailto),
        ):
            # Both go into the List-Unsubscribe header as they are: ASCII, no spaces.
            if value is not None and (not value.isascii() or any(c.isspace() for c in value)):
                raise ConfigError(
                    name, "must be ASCII without spaces (write an IDN domain as xn--...)"
                )
        if not self.secret_keys and self.public_base_url.startswith("https://"):
            raise ConfigError(
                "SECRET_KEYS",
                "must be set when PUBLIC_BASE_URL is a public https:// address (the development "
                "key is in the source); make one with `dispatcher secrets new-key`",
            )
        if not all(valid_key(k) for k in self.secret_keys):
            raise ConfigError("SECRET_KEYS", "every key must be a Fernet key (44 characters)")
        self._check_events_webhook()

    def _check_events_webhook(self) -> None:
        """The events webhook: an http(s) address with a signing key of its own."""
        url = self.events_webhook_url
        if url is None:
            return
        if not url.startswith(("https://", "http://")):
            raise ConfigError("EVENTS_WEBHOOK_URL", "must be an https:// (or http://) address")
        if self.events_webhook_secret is None or len(self.events_webhook_secret) < 32:
            raise ConfigError(
                "EVENTS_WEBHOOK_SECRET",
                "must be set, at least 32 characters, when EVENTS_WEBHOOK_URL is (the receiver "
                "checks each POST's signature with it)",
            )
        if not (math.isfinite(self.events_push_seconds) and self.events_push_seconds >= 1):
            raise ConfigError("EVENTS_PUSH_SECONDS", "must be at least 1 second")
        if not 1 <= self.events_batch_size <= 5000:
            raise ConfigError("EVENTS_BATCH_SIZE", "must be between 1 and 5000")

    def _check_identity(self) -> None:
        """Every sending domain has its DKIM key and selector, and the footer is there."""
        if self.dkim_selector is not None and not SELECTOR.fullmatch(self.dkim_selector):
            raise ConfigError("DKIM_SELECTOR", "must be a DNS label")
        keyed = {k.domain for k in self.dkim_keys}
        for domain in self.sender_domains:
            if domain not in keyed:
                raise ConfigError(
                    "DKIM_KEYS", f"has no key for {domain} (listed in SENDER_DOMAINS)"
                )
        for key in self.dkim_keys:
            if key.domain not in self.sender_domains:
                raise ConfigError("DKIM_KEYS", f"{key.domain} is not listed in SENDER_DOMAINS")
            if key.selector is None and self.dkim_selector is None:
                raise ConfigError(
                    "DKIM_KEYS", f"{key.domain}: names no selector and DKIM_SELECTOR is unset"
                )
        for name in ("_footer.html", "_footer.txt"):
            if not (Path(self.footer_folder) / name).is_file():
                raise ConfigError(
                    "FOOTER_DIR" if self.footer_dir else "TEMPLATES_DIR",
                    f"{self.footer_folder} has no {name} (the campaign footer)",
                )

    @property
    def footer_folder(self) -> str:
        """Where the campaign footer's templates are: ``FOOTER_DIR``, else TEMPLATES_DIR/email."""
        return self.footer_dir or str(Path(self.templates_dir) / "email")

    def dkim_key(self, domain: str) -> tuple[str, str] | None:
        """The selector and PEM private key that sign mail of ``domain``; None: not signed."""
        for key in self.dkim_keys:
            if key.domain == domain:
                return key.selector or self.dkim_selector or "", key.private_key_pem
        return None

    @property
    def request_limit(self) -> int:
        """``MAX_REQUEST_BYTES``, or by default room for the largest campaign: 1 KiB per
        recipient (id, address and merge fields; a typical one takes 100 to 300 bytes), three
        message parts of ``MAX_MESSAGE_BYTES`` and 64 KiB for the rest (about 100 MiB)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return self.max_campaign_recipients * 1024 + 3 * self.max_message_bytes + 65_536

    def _check_tokens(self) -> None:
        """Every token belongs to one client, and a public deployment's are long."""
        tokens = [*self.api_tokens, *self.ops_tokens, *(c.token for c in self.api_clients)]
        if len(set(tokens)) != len(tokens):
            raise ConfigError(
                "API_CLIENTS" if self.api_clients else "OPS_TOKENS",
                "every token must differ from every other (API_CLIENTS, API_TOKENS, OPS_TOKENS)",
            )
        if len({c.name for c in self.api_clients}) != len(self.api_clients):
            raise ConfigError("API_CLIENTS", "every client needs a name of its own")
        if self.public_base_url.startswith("https://") and any(len(t) < 32 for t in tokens):
            raise ConfigError(
                "API_CLIENTS" if self.api_clients else "API_TOKENS",
                "a public deployment's tokens must be at least 32 characters",
            )
        if any(len(c.token) < 8 for c in self.api_clients):
            raise ConfigError("API_CLIENTS", "every token must be at least 8 characters")

    @property
    def broker(self) -> str:
        """The Celery broker's URL: ``BROKER_URL``, else the credit counters' ``REDIS_URL``."""
        return self.broker_url or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        """Whether the broker is a Redis (its messages then come back after the visibility
        timeout) rather than RabbitMQ (back as soon as the consumer's connection closes)."""
        return self.broker.startswith(REDIS_SCHEMES)

    @property
    def mail_from_address(self) -> str:
        """The bare address of the system sender, used as the SMTP envelope sender."""
        return _bare_address(self.mail_from)

    @property
    def message_id_domain(self) -> str:
        """Right-hand side of every Message-ID we generate."""
        return self.mail_from_address.rpartition("@")[2]

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return type(self)(**{**dict(self), **changes})

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``) over an optional .env file.

        Raises :class:`ConfigError` naming the variable for any invalid value, and for any
        unknown variable in the .env file.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update(_read_env_file(Path(env_file)))
        values.update(environ)
        _refuse_celerys_own(environ, values.get("BROKER_URL"))
        read_as: dict[str, str] = {}
        for alias, name in ALIASES.items():
            # The variable's own name wins over its earlier one, wherever each was set.
            if values.get(alias) and not values.get(name):
                values[name] = values[alias]
                read_as[name] = alias
            values.pop(alias, None)
        try:
            return cls(**_Variables(cls, values)())
        except ConfigError as error:
            if error.variable not in read_as:
                raise
            raise ConfigError(read_as[error.variable], error.problem) from None


#: Earlier names of variables, still read: {earlier name: name}.
ALIASES = {"UNSUBSCRIBE_SMTP_PORT": "INBOUND_SMTP_PORT"}


#: Variables this project reads; anything else in a .env file is a typo and stops the process.
KNOWN_VARIABLES = (*(name.upper() for name in Settings.model_fields), *ALIASES)


class _Variables(EnvSettingsSource):
    """pydantic-settings' environment source over given variables instead of ``os.environ``.

    Names are upper case (``smtp_port`` is not ``SMTP_PORT``) and an empty value is unset, so
    an empty variable in the environment hides the .env file's value.
    """

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str]) -> None:
        self._variables = {k: v for k, v in variables.items() if k == k.upper() and v != ""}
        super().__init__(settings_cls, case_sensitive=False, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._variables.items()}


def _refuse_celerys_own(environ: Mapping[str, str], broker_url: str | None) -> None:
    """Stop on a variable Celery would follow on its own (see :data:`CELERY_OWN_VARIABLES`).

    The ``celery`` command copies ``BROKER_URL`` (and ``celery -b``) into ``CELERY_BROKER_URL``
    before the app loads: that copy names the same broker, and passes.
    """
    for name in CELERY_OWN_VARIABLES:
        value = environ.get(name)
        if not value or (name == "CELERY_BROKER_URL" and value == broker_url):
            continue
        raise ConfigError(
            name,
            "is read by Celery on its own, so the workers would use it and the API would "
            "not; set BROKER_URL instead (every process reads it)",
        )


def _read_env_file(path: Path) -> dict[str, str]:
    """The .env file, read strictly.

    Kept by hand rather than pydantic-settings' dotenv source, which would skip a line with
    no ``=`` and an unknown variable with an empty value (both stop start-up here), and would
    expand ``${...}`` inside values (a password may contain it).
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{path}:{number}", "expected NAME=value")
        if key not in KNOWN_VARIABLES:
            raise ConfigError(key, f"unknown variable in {path}")
        out[key] = value.strip().strip("'\"")
    return out


#: Our words for pydantic's parsing errors, after the value.
_PROBLEMS = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "float_parsing": "is not a number",
    "bool_parsing": "is not true/false",
}
_NOT_A_SETTING = "extra_forbidden"


def _config_error(error: ValidationError) -> ConfigError:
    """The first problem pydantic found, as a :class:`ConfigError` naming the variable."""
    first = error.errors(include_url=False)[0]
    variable = str(first["loc"][0]).upper() if first["loc"] else "SETTINGS"
    if first["type"] == _NOT_A_SETTING:
        return ConfigError(variable, "is not a setting")
    problem = _PROBLEMS.get(first["type"])
    if problem is None:
        return ConfigError(variable, first["msg"])
    return ConfigError(variable, f"{first['input']!r} {problem}")


@functools.lru_cache(maxsize=64)
def _bare_address(field: str) -> str:
    """The address of a From-style field (parsed once per process: every message asks)."""
    return parseaddr(field)[1]
