"""Settings from the environment: invalid values stop the process naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from dispatcher import db
from dispatcher.errors import ConfigError
from dispatcher.redisclient import is_cluster, parse_cluster_url
from dispatcher.settings import KNOWN_VARIABLES, Settings
from workers.app import create_app


def test_defaults_and_parsing() -> None:
    s = Settings.from_env(
        {
            "SMTP_PORT": "587",
            "SMTP_TLS": " Implicit ",
            "API_TOKENS": "token-aaaa1, token-bbbb2",
            "FREE_PLAN_CREDITS": "7",
        },
        env_file=None,
    )
    assert (s.smtp_port, s.smtp_tls, s.api_tokens, s.free_plan_credits) == (
        587,
        "implicit",
        ("token-aaaa1", "token-bbbb2"),
        7,
    )
    assert Settings.from_env({}, env_file=None).free_plan_credits == 5000
    assert "token-aaaa1" not in repr(s)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SMTP_PORT": "smtp"}, "SMTP_PORT"),
        ({"SMTP_PORT": "70000"}, "SMTP_PORT"),
        ({"SMTP_TLS": "maybe"}, "SMTP_TLS"),
        ({"SMTP_USERNAME": "relay", "SMTP_TLS": "off"}, "SMTP_TLS"),
        ({"SMTP_CA_FILE": "/nowhere/ca.pem"}, "SMTP_CA_FILE"),
        ({"DATABASE_LOCK_TIMEOUT_SECONDS": "-1"}, "DATABASE_LOCK_TIMEOUT_SECONDS"),
        ({"FREE_PLAN_CREDITS": "-1"}, "FREE_PLAN_CREDITS"),
        ({"API_TOKENS": "short"}, "API_TOKENS"),
        ({"MAIL_FROM": "nobody"}, "MAIL_FROM"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"BROKER_URL": "kafka://127.0.0.1:9092"}, "BROKER_URL"),
        ({"CELERY_BROKER_URL": "amqp://127.0.0.1"}, "CELERY_BROKER_URL"),
        ({"CELERY_RESULT_BACKEND": "redis://127.0.0.1"}, "CELERY_RESULT_BACKEND"),
        ({"REDIS_URL": "redis+cluster://10.0.0.1:7000/3"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://10.0.0.1:7000,10.0.0.2"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://"}, "REDIS_URL"),
        ({"VISIBILITY_TIMEOUT": "100"}, "RETRY_BACKOFF_MAX_SECONDS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"SMTP_RATE_PER_SECOND": "0"}, "SMTP_RATE_PER_SECOND"),
        ({"SMTP_RATE_PER_HOUR": "lots"}, "SMTP_RATE_PER_HOUR"),
        ({"PUBLIC_BASE_URL": "example.com"}, "PUBLIC_BASE_URL"),
        ({"PUBLIC_BASE_URL": "https://mail.example.com"}, "UNSUBSCRIBE_SECRET"),
        ({"UNSUBSCRIBE_SECRET": "short"}, "UNSUBSCRIBE_SECRET"),
        ({"UNSUBSCRIBE_MAILTO": "nobody"}, "UNSUBSCRIBE_MAILTO"),
        ({"RELAY_HALT_SECONDS": "0"}, "RELAY_HALT_SECONDS"),
        ({"TEMPLATE_RENDER_SECONDS": "0"}, "TEMPLATE_RENDER_SECONDS"),
        ({"TEMPLATE_RENDER_SECONDS": "241"}, "TEMPLATE_RENDER_SECONDS"),
        ({"TEMPLATE_RENDER_SECONDS": "nan"}, "TEMPLATE_RENDER_SECONDS"),
        ({"TEMPLATE_MAX_OUTPUT_BYTES": "100"}, "TEMPLATE_MAX_OUTPUT_BYTES"),
        ({"SQLITE_SYNCHRONOUS": "off"}, "SQLITE_SYNCHRONOUS"),
        ({"SMTP_IDLE_SECONDS": "0"}, "SMTP_IDLE_SECONDS"),
        ({"SMARTPLAN_LAG_SECONDS": "-1"}, "SMARTPLAN_LAG_SECONDS"),
        ({"SMARTPLAN_LAG_SECONDS": "nan"}, "SMARTPLAN_LAG_SECONDS"),
        ({"SCHEMA_WAIT_SECONDS": "-1"}, "SCHEMA_WAIT_SECONDS"),
        ({"SOFT_BOUNCE_LIMIT": "0"}, "SOFT_BOUNCE_LIMIT"),
        ({"SES_SIGNING_CERT_FILE": "/nonexistent/sns.pem"}, "SES_SIGNING_CERT_FILE"),
        ({"SES_TOPIC_ARNS": "my-topic-name"}, "SES_TOPIC_ARNS"),
        ({"POSTMARK_WEBHOOK_AUTH": "no-colon-here"}, "POSTMARK_WEBHOOK_AUTH"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env, env_file=None)
    assert info.value.variable == variable
    assert str(info.value).startswith(variable)


def test_a_cluster_url_names_its_seed_nodes_and_keeps_credentials_and_options() -> None:
    url = "rediss+cluster://user:p%40ss@10.0.0.1:7000, 10.0.0.2:7001,[::1]:7002/0?ssl=yes"
    s = Settings.from_env({"REDIS_URL": url}, env_file=None)
    assert is_cluster(s.redis_url) and not is_cluster("redis://10.0.0.1:6379/0")
    parsed = parse_cluster_url(s.redis_url)
    assert parsed.first == "rediss://user:p%40ss@10.0.0.1:7000/0?ssl=yes"
    assert parsed.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))


def test_the_celery_broker_refuses_a_cluster_url() -> None:
    settings = Settings(redis_url="redis+cluster://127.0.0.1:7000")
    with pytest.raises(ConfigError) as info:
        create_app(settings)
    assert info.value.variable == "BROKER_URL"
    assert "Redis Cluster" in str(info.value)
    # With a broker of its own, the counters may live on the cluster.
    app = create_app(settings.with_overrides(broker_url="redis://127.0.0.1:6399/0"))
    assert app.conf.broker_url == "redis://127.0.0.1:6399/0"


def test_env_file_is_read_under_the_environment_and_unknown_names_stop(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# local\nSMTP_PORT=2600\nexport MAIL_FROM='Ops <ops@example.org>'\n")
    s = Settings.from_env({"SMTP_PORT": "2700"}, env_file=env)
    assert (s.smtp_port, s.mail_from_address) == (2700, "ops@example.org")
    env.write_text("SMTP_PROT=2600\n")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({}, env_file=env)
    assert info.value.variable == "SMTP_PROT"


def test_every_setting_is_a_known_variable_and_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for field in Settings.model_fields:
        name = field.upper()
        assert name in KNOWN_VARIABLES, f"{name} would stop start-up when set in .env"
        assert f"`{name}`" in readme, f"{name} is not in the README's settings"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PUBLIC_BASE_URL", "https://bücher.example/unsub"),
        ("PUBLIC_BASE_URL", "https://example.com/u nsub"),
        ("UNSUBSCRIBE_MAILTO", "unsubscribe@bücher.example"),
        ("UNSUBSCRIBE_MAILTO", "unsub\r\nBcc: x@y.org@example.com"),
    ],
)
def test_unsubscribe_addresses_must_fit_a_header_as_they_are(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(unsubscribe_secret="s" * 16, **{name.lower(): value})
    assert caught.value.variable == name


@pytest.mark.parametrize(("level", "pragma"), [("normal", 1), (" FULL ", 2)])
def test_sqlite_commits_are_synced_as_configured(tmp_path: Path, level: str, pragma: int) -> None:
    s = Settings.from_env({"SQLITE_SYNCHRONOUS": level}, env_file=None)
    engine = db.make_engine(
        f"sqlite:///{tmp_path / 'd.db'}", sqlite_synchronous=s.sqlite_synchronous
    )
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == pragma
    engine.dispose()


def test_inbound_smtp_port_is_read_under_its_earlier_name_too(tmp_path: Path) -> None:
    assert Settings.from_env({}, env_file=None).inbound_smtp_port is None
    earlier = Settings.from_env({"UNSUBSCRIBE_SMTP_PORT": "2600"}, env_file=None)
    assert earlier.inbound_smtp_port == 2600
    both = {"UNSUBSCRIBE_SMTP_PORT": "2600", "INBOUND_SMTP_PORT": "2700"}
    assert Settings.from_env(both, env_file=None).inbound_smtp_port == 2700
    # Given the earlier name in a .env file: known, and a bad value names it
    env = tmp_path / ".env"
    env.write_text("UNSUBSCRIBE_SMTP_PORT=2800\n")
    assert Settings.from_env({}, env_file=env).inbound_smtp_port == 2800
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"UNSUBSCRIBE_SMTP_PORT": "70000"}, env_file=None)
    assert info.value.variable == "UNSUBSCRIBE_SMTP_PORT"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"INBOUND_SMTP_PORT": "smtp"}, env_file=None)
    assert info.value.variable == "INBOUND_SMTP_PORT"
