"""Typed settings read from the environment (and an optional .env file), built in one place."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from dispatcher.errors import ConfigError

#: The plan every user starts on; PLAN_CATALOG lists the paid plans and may not name it.
FREE_PLAN = "free"

#: Variables this project reads; anything else in a .env file is a typo and stops the process.
KNOWN_VARIABLES = (
    "REDIS_URL",
    "DATABASE_URL",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_STARTTLS",
    "SMTP_TIMEOUT",
    "MAIL_FROM",
    "MAILCHIMP_BASE_URL",
    "API_TOKENS",
    "OPS_TOKENS",
    "FREE_PLAN_CREDITS",
    "PLAN_CATALOG",
    "SMTP_POOL_SIZE",
    "CAMPAIGN_CHUNK_SIZE",
    "MAX_CAMPAIGN_RECIPIENTS",
    "RENEWAL_SWEEP_SECONDS",
    "MAX_MESSAGE_BYTES",
    "SEND_MAX_RETRIES",
    "SEND_LEASE_SECONDS",
    "RETRY_BACKOFF_SECONDS",
    "RETRY_BACKOFF_MAX_SECONDS",
    "TASK_TIME_LIMIT",
    "VISIBILITY_TIMEOUT",
    "OUTCOME_STREAM",
    "TEMPLATES_DIR",
    "LOG_LEVEL",
    "SMTP_RATE_PER_SECOND",
    "SMTP_RATE_PER_HOUR",
    "PUBLIC_BASE_URL",
    "UNSUBSCRIBE_SECRET",
    "UNSUBSCRIBE_MAILTO",
    "RELAY_HALT_SECONDS",
    "CLOCK_OFFSET_SECONDS",
)


@dataclass(frozen=True)
class Settings:
    """Everything the dispatcher needs to know about its environment.

    Build with :meth:`from_env`; tests build it directly or with :meth:`with_overrides`.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "sqlite:///dispatcher.db"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_starttls: bool = False
    smtp_timeout: float = 30.0
    mail_from: str = "Command Email <no-reply@command-email.localhost>"
    mailchimp_base_url: str | None = None
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    #: Bearer tokens of operators: only these may lift a relay halt over HTTP.
    ops_tokens: tuple[str, ...] = field(default=(), repr=False)
    free_plan_credits: int = 5000
    #: Paid plans as (name, monthly credits, price in cents); None keeps the built-in tiers.
    plan_catalog: tuple[tuple[str, int, int], ...] | None = None
    renewal_sweep_seconds: int = 300
    smtp_pool_size: int = 8  # SMTP connections one campaign chunk reuses
    campaign_chunk_size: int = 500  # recipients per campaign task
    max_campaign_recipients: int = 100_000
    max_message_bytes: int = 1_000_000
    send_max_retries: int = 8
    send_lease_seconds: int = 300
    retry_backoff_seconds: float = 5.0
    retry_backoff_max_seconds: float = 900.0
    task_time_limit: int = 240
    visibility_timeout: int = 3600
    outcome_stream: str = "ced:smartplan:outcomes"
    templates_dir: str = str(Path(__file__).resolve().parent.parent / "templates")
    log_level: str = "INFO"
    #: Messages the SMTP relay takes from all workers together; None is unlimited.
    smtp_rate_per_second: int | None = None
    smtp_rate_per_hour: int | None = None
    #: Where recipients reach the one-click unsubscribe endpoint (HTTPS in production).
    public_base_url: str = "http://127.0.0.1:8000"
    #: Key that signs unsubscribe tokens; None uses a development key and says so in the log.
    unsubscribe_secret: str | None = field(default=None, repr=False)
    #: The mailto: address in List-Unsubscribe; default unsubscribe@ the MAIL_FROM domain.
    unsubscribe_mailto: str | None = None
    #: How long sending stops after the relay refused our credentials (ops can resume sooner).
    relay_halt_seconds: int = 900
    #: Seconds added to the wall clock by every process built from these settings: tests and
    #: rehearsals (a month end, a renewal) run real processes in another period. 0 in production.
    clock_offset_seconds: float = 0.0

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.free_plan_credits < 0:
            raise ConfigError("FREE_PLAN_CREDITS", "must be zero or more")
        if not 0 < self.smtp_port < 65536:
            raise ConfigError("SMTP_PORT", f"{self.smtp_port} is not a TCP port")
        if self.max_message_bytes < 1024:
            raise ConfigError("MAX_MESSAGE_BYTES", "must be at least 1024")
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
        if set(self.ops_tokens) & set(self.api_tokens):
            raise ConfigError("OPS_TOKENS", "an operator token must differ from every API token")
        if "@" not in parseaddr(self.mail_from)[1]:
            raise ConfigError("MAIL_FROM", f"{self.mail_from!r} has no email address")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("REDIS_URL", "must start with redis://, rediss:// or unix://")
        if self.plan_catalog is not None:
            small = [n for n, c, _ in self.plan_catalog if c <= self.free_plan_credits]
            if small:
                raise ConfigError(
                    "PLAN_CATALOG", f"paid plan {small[0]!r} has no more credits than the free plan"
                )
        if not 1 <= self.smtp_pool_size <= 100:
            raise ConfigError("SMTP_POOL_SIZE", "must be from 1 to 100")
        if not 1 <= self.campaign_chunk_size <= 10_000:
            raise ConfigError("CAMPAIGN_CHUNK_SIZE", "must be from 1 to 10000")
        if self.max_campaign_recipients < 1:
            raise ConfigError("MAX_CAMPAIGN_RECIPIENTS", "must be at least 1")
        if self.renewal_sweep_seconds < 10:
            raise ConfigError("RENEWAL_SWEEP_SECONDS", "must be at least 10")
        for name, rate in (
            ("SMTP_RATE_PER_SECOND", self.smtp_rate_per_second),
            ("SMTP_RATE_PER_HOUR", self.smtp_rate_per_hour),
        ):
            if rate is not None and rate < 1:
                raise ConfigError(name, "must be at least 1 (leave it unset for no limit)")
        if self.relay_halt_seconds < 1:
            raise ConfigError("RELAY_HALT_SECONDS", "must be at least 1")
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
        if not math.isfinite(self.clock_offset_seconds):
            raise ConfigError("CLOCK_OFFSET_SECONDS", "must be a finite number of seconds")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("LOG_LEVEL", "must be DEBUG, INFO, WARNING or ERROR")

    @property
    def mail_from_address(self) -> str:
        """The bare address of the system sender, used as the SMTP envelope sender."""
        return parseaddr(self.mail_from)[1]

    @property
    def message_id_domain(self) -> str:
        """Right-hand side of every Message-ID we generate."""
        return self.mail_from_address.rpartition("@")[2]

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``) over an optional .env file.

        Raises :class:`ConfigError` naming the variable for any invalid value, and for any
        unknown variable in the .env file.
        """
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update(_read_env_file(Path(env_file)))
        values.update(os.environ if environ is None else environ)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            name = f.name.upper()
            if name not in values or values[name] == "":
                continue
            kwargs[f.name] = _PARSERS.get(f.name, _text)(name, values[name])
        return cls(**kwargs)


def _read_env_file(path: Path) -> dict[str, str]:
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


def _text(_name: str, value: str) -> str:
    return value


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, f"{value!r} is not a whole number") from None


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(name, f"{value!r} is not a number") from None


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"{value!r} is not true/false")


def _tokens(name: str, value: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in value.split(",") if t.strip())
    if any(len(t) < 8 for t in tokens):
        raise ConfigError(name, "every token must be at least 8 characters")
    return tokens


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


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "smtp_port": _int,
    "smtp_starttls": _bool,
    "smtp_timeout": _float,
    "api_tokens": _tokens,
    "ops_tokens": _tokens,
    "free_plan_credits": _int,
    "plan_catalog": parse_catalog,
    "renewal_sweep_seconds": _int,
    "smtp_pool_size": _int,
    "campaign_chunk_size": _int,
    "max_campaign_recipients": _int,
    "max_message_bytes": _int,
    "send_max_retries": _int,
    "send_lease_seconds": _int,
    "retry_backoff_seconds": _float,
    "retry_backoff_max_seconds": _float,
    "task_time_limit": _int,
    "visibility_timeout": _int,
    "smtp_rate_per_second": _int,
    "smtp_rate_per_hour": _int,
    "relay_halt_seconds": _int,
    "clock_offset_seconds": _float,
}
