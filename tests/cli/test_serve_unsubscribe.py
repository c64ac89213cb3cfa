"""Which port `dispatcher serve-unsubscribe` listens on: what ops set, else the platform's."""

from __future__ import annotations

import pytest

from dispatcher.cli.unsubscribe import listen_port
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings


@pytest.mark.parametrize(
    ("given", "environ", "expected"),
    [
        (2600, {"INBOUND_SMTP_PORT": "2700", "PORT": "5600"}, 2600),
        (None, {"INBOUND_SMTP_PORT": "2700", "PORT": "5600"}, 2700),
        (None, {"UNSUBSCRIBE_SMTP_PORT": "2800", "PORT": "5600"}, 2800),
        (None, {"PORT": "5600"}, 5600),
        (None, {}, 2526),
    ],
)
def test_port_is_the_option_then_inbound_smtp_port_then_the_process_s_port(
    given: int | None, environ: dict[str, str], expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("INBOUND_SMTP_PORT", "UNSUBSCRIBE_SMTP_PORT", "PORT"):
        monkeypatch.delenv(name, raising=False)
    if "PORT" in environ:
        monkeypatch.setenv("PORT", environ["PORT"])
    settings = Settings.from_env(environ, env_file=None)
    assert listen_port(given, settings) == expected


def test_a_bad_platform_port_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "web")
    with pytest.raises(ConfigError) as info:
        listen_port(None, Settings())
    assert info.value.variable == "PORT"
