"""Stored secrets sealed at rest: an agent's MailChimp API key is never in the database in the
clear, opens with any of SECRET_KEYS, and is sealed again with a new first key by
``dispatcher secrets rotate`` (keys stored before sealing existed included)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from dispatcher.cli.main import main
from dispatcher.errors import ConfigError
from dispatcher.models import User
from dispatcher.runtime import Runtime
from dispatcher.sealing import SecretUnreadable
from dispatcher.settings import Settings
from tests.helpers import make_user, settings_environ

API_KEY = "0123456789abcdef0123456789abcdef-us6"


def _stored(rt: Runtime, user_id: str) -> str:
    with rt.sessions() as session:
        value = session.scalar(select(User.mailchimp_api_key).where(User.id == user_id))
    assert value is not None
    return value


def test_a_mailchimp_key_is_sealed_at_rest_and_rotated_to_a_new_key(
    make_runtime: Callable[..., Runtime],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    rt = make_runtime(secret_keys=(old,))
    make_user(rt, "sealed", mailchimp_api_key=API_KEY, mailchimp_list_id="list1")
    make_user(rt, "legacy")
    with rt.sessions.begin() as session:  # a key stored before sealing existed
        session.execute(update(User).where(User.id == "legacy").values(mailchimp_api_key=API_KEY))
    stored = _stored(rt, "sealed")
    assert stored.startswith("fernet:") and API_KEY not in stored
    assert rt.sealer.open(stored) == API_KEY
    assert rt.sealer.open(_stored(rt, "legacy")) == API_KEY

    # Rotation: the new key first, `dispatcher secrets rotate`, then the old key dropped
    for name, value in settings_environ(settings.with_overrides(secret_keys=(new, old))).items():
        monkeypatch.setenv(name, value)
    assert main(["secrets", "rotate"]) == 0
    assert "2 stored secrets sealed with the first key" in capsys.readouterr().out
    only_new = make_runtime(secret_keys=(new,))
    for user_id in ("sealed", "legacy"):
        assert _stored(only_new, user_id).startswith("fernet:")
        assert only_new.sealer.open(_stored(only_new, user_id)) == API_KEY
    only_old = make_runtime(secret_keys=(old,))
    with pytest.raises(SecretUnreadable):
        only_old.sealer.open(_stored(only_old, "sealed"))


def test_a_public_deployment_needs_its_own_keys(settings: Settings) -> None:
    public = {
        "public_base_url": "https://mail.example.com",
        "unsubscribe_secret": "s" * 32,
        "api_tokens": ("t" * 32,),
    }
    with pytest.raises(ConfigError) as missing:
        settings.with_overrides(**public)
    assert missing.value.variable == "SECRET_KEYS"
    with pytest.raises(ConfigError) as bad:
        settings.with_overrides(secret_keys=("not-a-fernet-key",))
    assert bad.value.variable == "SECRET_KEYS"
    key = Fernet.generate_key().decode()
    assert settings.with_overrides(secret_keys=(key,), **public).secret_keys == (key,)
